"""Builds lstm_fast and, ahead of time, its compiled extension lstm_fast._C.

The C++ (CPU) part is always built; the CUDA part whenever torch has CUDA and
nvcc is found. A failed extension build is reported and skipped, never fatal:
`lstm_fast.available_backends()` then says why `cpp`/`cuda` are missing.
Set LSTM_FAST_NO_EXT=1 to skip the extension, LSTM_FAST_NO_CUDA=1 to build
only the CPU part.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit root (bin/nvcc next to lib64/libcudart). Wrappers on PATH
    (a script named nvcc that execs the real one) make torch's own guess,
    dirname(dirname(which nvcc)), land on the wrong folder, so look for the
    folder that really holds the runtime library."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and glob.glob(os.path.join(root, "lib*", "libcudart*")):
            return root
    return None


def extension_modules():
    if os.environ.get("LSTM_FAST_NO_EXT") == "1":
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("lstm_fast: torch is not installed; building without the compiled extension", file=sys.stderr)
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and bool(cuda_sources) and os.environ.get("LSTM_FAST_NO_CUDA") != "1")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        try:
            visible = torch.cuda.is_available()
        except Exception:
            visible = False
        if not visible:
            # No GPU to detect: build for Volta..Hopper so the wheel runs on any of them,
            # Hopper (9.0, the H100) included.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "7.0;8.0;8.6;9.0+PTX"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

    cxx_flags = ["-O3", "-std=c++17"]
    if sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "lstm_fast._C", cpp_sources + cuda_sources,
            define_macros=[("LSTM_FAST_WITH_CUDA", "1")], extra_compile_args=extra)
    else:
        ext = cpp_extension.CppExtension("lstm_fast._C", cpp_sources, extra_compile_args=extra)

    class TolerantBuildExt(cpp_extension.BuildExtension):
        """A failed extension build leaves a pure-Python package that still imports."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - report and continue
                print(f"lstm_fast: WARNING: compiled extension not built ({exc}); "
                      "the cpp/cuda backends will be unavailable", file=sys.stderr)

    return [ext], {"build_ext": TolerantBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["lstm_fast", "lstm_fast.backends", "lstm_fast.kernels"],
    package_dir={"lstm_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
