"""How csrc/ is compiled, in one place for both builds of the extension:
setup.py (ahead of time, `pip install`) and lstm_fast/_ops.py (JIT fallback,
torch.utils.cpp_extension.load). Standard library only; loaded by file path.
"""
import glob
import os
import platform
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# No GPU visible to pick an architecture: Ampere (sm_80, also runs on sm_86/89)
# and Hopper (sm_90, the H100) cubins, plus sm_90 PTX for newer GPUs. CUDA 13
# dropped sm_70, so older lists fail there. Each extra arch adds a device pass.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def find_cuda_home():
    """The toolkit root (bin/nvcc next to lib*/libcudart). A wrapper script named
    nvcc on PATH makes torch's guess, dirname(dirname(which nvcc)), land on the
    wrong folder, so look for the folder that really holds the runtime library."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and glob.glob(os.path.join(root, "lib*", "libcudart*")):
            return root
    return None


def _host_cpu_flags():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


# The AVX-512 subsets ATen's 512-bit Vectorized needs (torch's own AVX512 build uses the same four).
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl")


def cxx_flags():
    """Host compiler flags. The extension is built for the CPU that builds it:
    AVX2+FMA, and AVX-512 on top, only when this machine has them (ATen's
    Vectorized then uses that ISA; csrc/lstm_vec.h picks it)."""
    # No -std: torch.utils.cpp_extension adds the standard its headers need (C++20 for 2.14, C++17 before).
    flags = ["-O3"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")  # at::parallel_for is inline OpenMP; the runtime is torch's libgomp
    host = _host_cpu_flags()
    if {"avx2", "fma"} <= host and os.environ.get("LSTM_FAST_NO_AVX2") != "1":
        flags += ["-mavx2", "-mfma"]
        if set(AVX512_FLAGS) <= host and os.environ.get("LSTM_FAST_NO_AVX512") != "1":
            flags += ["-m" + f for f in AVX512_FLAGS]
    return flags


def nvcc_flags():
    # No --use_fast_math: exact expf/tanhf keep fp32 close to the fp64 reference,
    # and the pointwise kernels they sit in are memory-bound.
    return ["-O3", "-lineinfo"]


def sources(root=HERE, with_cuda=False):
    """C++ sources, plus the CUDA ones when with_cuda (paths under root)."""
    files = sorted(glob.glob(os.path.join(root, "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))
    return files
