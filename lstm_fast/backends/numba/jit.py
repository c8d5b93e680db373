"""Jitting the kernels, once per process, on first use (load()).

Each kernel module (sync, gemm, cell, loops) holds plain Python functions and names
them in KERNELS (and PARALLEL_KERNELS); load() binds what the module's
numba_bindings(numba) returns (intrinsics, prange) into its namespace, then rebinds
each kernel's name to its jitted dispatcher, module by module in dependency order.
Kernels call each other through module globals (gemm.slab_gemm(...)), which numba
resolves at compile time to those dispatchers; closures would miss the disk cache.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading

from . import cell, gemm, loops, sync

# Dependency order: a module's kernels call only kernels of the modules before it.
KERNEL_MODULES = (sync, gemm, cell, loops)

# LLVM fast-math flags of every kernel and activation; without nnan/ninf, so that NaN and inf
# propagate as in torch (with them LLVM folded tanh(NaN) to 1: bench/NOTES_numba.md#traps).
FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

_lock = threading.Lock()
_loaded = False


def element_pointer(context, builder, aryty, ary, idx):
    """LLVM pointer to element idx of a 1-d array (for the intrinsics of sync and gemm)."""
    from numba.core import cgutils

    return cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, ary), [idx])


def _cache_dir_ok() -> bool:
    """Numba caches next to the kernel modules (__pycache__), else in the user cache dir;
    False when neither is writable (NUMBA_CACHE_DIR set by the user counts as writable)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    try:
        os.makedirs(here, exist_ok=True)
        return os.access(here, os.W_OK)
    except OSError:
        return False


def _sources_digest() -> str:
    """sha256 of the kernel modules' sources and this one's, which sets their options ("" if
    one cannot be read)."""
    digest = hashlib.sha256()
    try:
        for path in [__file__] + [module.__file__ for module in KERNEL_MODULES]:
            with open(path, "rb") as f:
                digest.update(f.read())
    except OSError:
        return ""
    return digest.hexdigest()


def _cache_class():
    """numba's disk cache keyed also on the kernel modules' sources.

    numba invalidates a function's cached code when its own file changes, but a
    caller's code holds its callees compiled in: after an edit of gemm.py the cached
    loops would still run the old product kernel."""
    from numba.core.caching import FunctionCache

    digest = _sources_digest()

    class KernelCache(FunctionCache):
        def _index_key(self, sig, codegen):
            return (*super()._index_key(sig, codegen), digest)

    return KernelCache


def _jit(numba, func, parallel, cache_class):
    opts = dict(nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)
    if parallel:
        opts["parallel"] = True
    else:
        # No reference counting: the kernels allocate nothing, and each view's count update was
        # an atomic on counters shared by all threads (bench/NOTES_numba.md#traps).
        opts["_nrt"] = False
    dispatcher = numba.njit(**opts)(func)
    try:
        dispatcher._cache = cache_class(func)  # what cache=True does, with cache_class for numba's own
    except RuntimeError:  # no cache locator usable: compile without a cache
        pass
    return dispatcher


def load():
    """Import numba, bind the intrinsics and jit the kernels (once per process)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        import numba

        if not _cache_dir_ok():
            os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lstm_fast_numba_")
            numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
        # omp first: the fastest launch (bench/NOTES_numba.md#threads). Results do not depend on
        # the layer (sync.py); a layer chosen through numba's variables is kept.
        if not any(os.environ.get(v) for v in ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")):
            numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
        cache_class = _cache_class()
        for module in KERNEL_MODULES:
            names = vars(module)
            names.update(module.numba_bindings(numba))
            parallel = getattr(module, "PARALLEL_KERNELS", ())
            for name in module.KERNELS + parallel:
                names[name] = _jit(numba, names[name], name in parallel, cache_class)
        _loaded = True
