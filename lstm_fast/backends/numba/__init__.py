"""Numba CPU backend (see backend.py). Importing it imports neither numba nor a kernel's
compiled code: jit.load() does that on first use.

Modules, each kernel module depending only on those before it:
    sync     claiming chunks and waiting between the threads of one call
    gemm     the packed-slab product kernels and slab packing
    cell     the LSTM cell's pointwise math
    loops    the forward and backward time loops, one worker per thread
    jit      jits the kernel modules above, once per process
    threads  how many threads a call gets, and the parallel launch
    backend  NumbaBackend: host-side planning around the launches
"""
