"""Loading of the compiled ops (torch.ops.lstm_fast.*) and their fake kernels.

Order of attempts, on the first call of load():
1. `lstm_fast._C`, built ahead of time by `pip install` (setup.py).
2. A JIT build of the same sources with torch.utils.cpp_extension.load (ninja),
   cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
   The sources are found by lstm_fast/_sources.py (LSTM_FAST_CSRC, else the
   installed lstm_fast._csrc, else the repository's csrc/). LSTM_FAST_JIT=0 disables this step;
   CUDA kernels are JIT-built only when a GPU is visible (or LSTM_FAST_JIT_CUDA=1).
The first JIT build takes minutes (torch's headers are heavy); later ones hit the cache.

Importing this module is cheap and never fails; nothing is built until load().
`import lstm_fast` runs load_prebuilt(), which registers a prebuilt library's ops.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

from . import _sources
from .backends.base import acc_dtype

log = logging.getLogger("lstm_fast")

_lock = threading.Lock()
_state: tuple[bool, str] | None = None
_fakes_registered = False


def _jit_build() -> str:
    cfg = _sources.build_config()
    root = _sources.folder("lstm_fast._csrc")
    cuda_home = cfg.find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        # cpp_extension reads CUDA_HOME at import; its own guess can be wrong (see build_config)
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension
    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and (torch.cuda.is_available() or os.environ.get("LSTM_FAST_JIT_CUDA") == "1"))
    if with_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.DEFAULT_CUDA_ARCH_LIST
    sources = cfg.sources(root, with_cuda=with_cuda)
    log.info("lstm_fast: JIT-building the extension from %s (cuda=%s); this takes minutes once", root, with_cuda)
    cpp_extension.load(name="lstm_fast_jit_cuda" if with_cuda else "lstm_fast_jit_cpu", sources=sources,
                       extra_cflags=cfg.cxx_flags(), extra_cuda_cflags=cfg.nvcc_flags() if with_cuda else None,
                       extra_include_paths=[root], with_cuda=with_cuda, is_python_module=False, verbose=False)
    return f"JIT-built from {root}" + (" with CUDA" if with_cuda else " (CPU only)")


def load() -> tuple[bool, str]:
    """Make torch.ops.lstm_fast.* available: (ok, how or why not). Cached."""
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        try:
            from . import _C  # noqa: F401  (registers the ops)
            how = "prebuilt lstm_fast._C"
        except ImportError as exc:
            if os.environ.get("LSTM_FAST_JIT", "1") == "0":
                _state = (False, f"lstm_fast._C is not built ({exc}) and LSTM_FAST_JIT=0")
                return _state
            try:
                how = _jit_build()
            except Exception as jit_exc:
                _state = (False, f"lstm_fast._C is not built ({exc}) and the JIT build failed: "
                                 f"{type(jit_exc).__name__}: {jit_exc}")
                return _state
        _register_fakes()
        _state = (True, how)
        return _state


def load_prebuilt() -> None:
    """Register the prebuilt library's ops (and their fake kernels) now, building
    nothing: run by `import lstm_fast`, so that a saved program that calls them loads
    right after it. Without a prebuilt library, load() tries the JIT build on first use."""
    global _state
    if _state is not None:
        return
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except (ImportError, OSError):
        return
    with _lock:
        if _state is None:
            _register_fakes()
            _state = (True, "prebuilt lstm_fast._C")


def loaded() -> bool:
    """Whether the ops are registered already (never builds anything)."""
    return _state is not None and _state[0]


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library has kernels for 'cpu' or 'cuda'."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("lstm_fast::lstm_forward", key)


def _register_fakes() -> None:
    """Shape-only kernels so torch.compile / FakeTensor can trace the ops."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("lstm_fast::lstm_forward")
    def _forward_fake(gx, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad, recurrent_mask=None, zone_c=None,
                      zone_h=None):
        rows, G = gx.shape[:-1], gx.shape[-1]  # (T, B) padded, (N,) packed
        B, H, P = h0.shape[0], G // 4, h0.shape[1]
        acc = acc_dtype(gx.dtype)
        y = gx.new_empty((*rows, P))
        if need_grad:
            gates, cells = gx.new_empty((*rows, G), dtype=acc), gx.new_empty((*rows, H), dtype=acc)
        else:
            gates, cells = gx.new_empty((0,), dtype=acc), gx.new_empty((0,), dtype=acc)
        return y, h0.new_empty((B, P)), c0.new_empty((B, H)), gates, cells

    @torch.library.register_fake("lstm_fast::lstm_forward_projected")
    def _forward_projected_fake(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad,
                                recurrent_mask=None, zone_c=None, zone_h=None):
        return _forward_fake(x.new_empty((*x.shape[:-1], w_ih.shape[0])), h0, c0, w_hh, w_hr, batch_sizes,
                             reverse, need_grad)

    @torch.library.register_fake("lstm_fast::lstm_backward")
    def _backward_fake(grad_y, grad_hn, grad_cn, gates, cells, y, h0, c0, w_hh, w_hr, batch_sizes, reverse,
                       recurrent_mask=None, zone_c=None, zone_h=None):
        d_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty((0,))
        return (grad_y.new_empty(gates.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                w_hh.new_empty(w_hh.shape), d_w_hr)

    @torch.library.register_fake("lstm_fast::lstm_cell")
    def _cell_fake(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return h.new_empty(h.shape), c.new_empty(c.shape)

    @torch.library.register_fake("lstm_fast::lstm_cell_forward")
    def _cell_forward_fake(x, h, c, w_ih, w_hh, b_ih, b_hh, need_grad):
        gates = h.new_empty((x.shape[0], w_hh.shape[0]) if need_grad else (0,))
        return h.new_empty(h.shape), c.new_empty(c.shape), gates

    @torch.library.register_fake("lstm_fast::lstm_cell_backward")
    def _cell_backward_fake(grad_h, grad_c, gates, c, c_n, x, h, w_ih, w_hh, need):
        like = (x, h, c, w_ih, w_hh, w_hh[:, 0])
        return tuple(t.new_empty(t.shape) if n else t.new_empty((0,)) for t, n in zip(like, need))

    @torch.library.register_fake("lstm_fast::lstm_cell_out")
    def _cell_out_fake(x, h, c, w_ih, w_hh, b_ih, b_hh, h_out, c_out):
        return None
