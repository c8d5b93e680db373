"""Builds lstm_fast and, ahead of time, its compiled extension lstm_fast._C.

The C++ (CPU) part is always built; the CUDA part whenever torch has CUDA and
nvcc is found. A failed extension build is reported and skipped, never fatal:
`lstm_fast.available_backends()` then says why `cpp`/`cuda` are missing, and
lstm_fast/_ops.py can still JIT-build the same sources on first use.
Compiler flags and the default CUDA arch list live in csrc/build_config.py,
shared with that JIT build. The sources are also installed as package data
(lstm_fast/_csrc) so a wheel built without the extension can JIT-build them.
Set LSTM_FAST_NO_EXT=1 to skip the extension, LSTM_FAST_NO_CUDA=1 to build
only the CPU part.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_sources():
    """lstm_fast/_sources.py, which knows where kernels/ and csrc/ go; loaded by path
    because the package itself cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("lstm_fast_sources", os.path.join(ROOT, "lstm_fast", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCES = load_sources()


def extension_modules():
    if os.environ.get("LSTM_FAST_NO_EXT") == "1":
        return [], {}
    cfg = SOURCES.build_config()
    cuda_home = cfg.find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("lstm_fast: torch is not installed; building without the compiled extension", file=sys.stderr)
        return [], {}

    # Relative paths: setuptools wants them relative to setup.py.
    csrc = "csrc"
    cpp_sources = [os.path.relpath(p, ROOT) for p in cfg.sources(os.path.join(ROOT, csrc), with_cuda=False)]
    cuda_sources = [os.path.relpath(p, ROOT) for p in cfg.sources(os.path.join(ROOT, csrc), with_cuda=True)
                    if p.endswith(".cu")]
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
            os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.DEFAULT_CUDA_ARCH_LIST
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

    include_dirs = [os.path.join(ROOT, csrc)]

    def cpu_extension():
        return cpp_extension.CppExtension("lstm_fast._C", cpp_sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cfg.cxx_flags()})

    if with_cuda:
        ext = cpp_extension.CUDAExtension("lstm_fast._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cfg.cxx_flags(), "nvcc": cfg.nvcc_flags()})
    else:
        ext = cpu_extension()

    class TolerantBuildExt(cpp_extension.BuildExtension):
        """A failed CUDA build falls back to the CPU-only extension; a failed CPU
        build leaves a pure-Python package that still imports."""

        def run(self):
            try:
                super().run()
                return
            except Exception as exc:
                if not with_cuda:
                    print(f"lstm_fast: WARNING: compiled extension not built ({exc}); "
                          "the cpp backend will be unavailable", file=sys.stderr)
                    return
                print(f"lstm_fast: WARNING: CUDA build failed ({exc}); building the CPU part only",
                      file=sys.stderr)
            self.extensions = [cpu_extension()]
            try:
                super().run()
            except Exception as exc:
                print(f"lstm_fast: WARNING: compiled extension not built ({exc}); "
                      "the cpp/cuda backends will be unavailable", file=sys.stderr)

    return [ext], {"build_ext": TolerantBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["lstm_fast", "lstm_fast.backends", "lstm_fast.backends.numba", *SOURCES.FOLDERS],
    package_dir=SOURCES.FOLDERS,
    package_data={"lstm_fast._csrc": ["*.h", "*.cpp", "*.py", "cuda/*.cu", "cuda/*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
