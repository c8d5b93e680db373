"""The usual call, short: one LSTMCell step or a one-direction LSTM call in plain
eager code on the cpp backend goes straight to the extension's ops.

At batch 1 a call's fixed cost outweighs its arithmetic (bench/NOTES_latency.md):
the full path (torch.nn's checks in Python, backend choice, the autograd.Function)
costs tens of microseconds a call. Here a module settles once whether its calls can
take the short path (FastChoice), and each call then makes a few cheap tests and
one op call; the ops check shapes, dtypes and devices in C++ and refuse anything
unusual, which then takes the full path and gets torch.nn's errors.
"""
from __future__ import annotations

import torch

from . import _ops
from .backends import select_backend
from .backends.base import LayerSizes

_is_compiling = torch.compiler.is_compiling
_is_exporting = torch.compiler.is_exporting
_is_tracing = torch._C._is_tracing
_interpreters = torch._C._functorch.peek_interpreter_stack
_is_autocast = torch.is_autocast_enabled
_SHORT_DTYPES = (torch.float32, torch.float64)


def watched() -> bool:
    """Whether anything besides plain eager execution sees this call: torch.compile, a
    graph recorder (jit.trace, export), a torch.func transform or CPU autocast. Those
    take the full path, which knows how to behave under each (0.6 us a call)."""
    return _is_compiling() or _is_tracing() or _is_exporting() or _interpreters() is not None or _is_autocast("cpu")


def cpp_serves(backend: str | None, weight: torch.Tensor, hidden_size: int) -> bool:
    """Whether the module's backend setting resolves to cpp for its weights (CPU,
    float32/float64) and the extension has the step ops."""
    chosen = cpu_backend(backend, weight, hidden_size)  # a refusal: the full path raises it with its message
    return chosen is not None and chosen.name == "cpp" and _ops.load()[0] and hasattr(torch.ops.lstm_fast, "lstm_cell")


class FastChoice:
    """Mixin for LSTM and LSTMCell: the module's answer to "may my calls take the short
    path?", kept in _short (None: not asked yet) and forgotten whenever what it rests on
    may have changed: a parameter set, replaced or deleted, the module moved or cast
    (_apply). The backend setting (backend=, LSTM_FAST_BACKEND) is read when it is asked."""

    _short = None

    def _forget_short(self):
        self.__dict__["_short"] = None

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self.__dict__["_short"] = None

    def __delattr__(self, name):
        super().__delattr__(name)
        self.__dict__["_short"] = None

    def register_parameter(self, name, param):
        super().register_parameter(name, param)
        self.__dict__["_short"] = None

    def __getstate__(self):  # pickle, deepcopy: the choice holds an op handle; a copy asks anew
        state = dict(super().__getstate__())
        state.pop("_short", None)
        return state

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.__dict__["_short"] = None
        return out


def lstm_call(module, layers, input, hx):
    """LSTM.forward's usual call on the short path, or None for the full path.

    layers: per layer (w_ih, w_hh, b_ih, b_hh). A one-step input (T=1) runs each layer
    as one lstm_cell op (differentiable in C++); a longer one without gradients runs
    each layer as one lstm_forward_projected op. Anything else returns None.
    """
    if type(input) is not torch.Tensor or input.dim() != 3:
        return None
    x = input.transpose(0, 1) if module.batch_first else input
    T, B = x.shape[0], x.shape[1]
    L, H = len(layers), module.hidden_size
    if hx is None:
        h0 = c0 = x.new_zeros(L, B, H)
    else:
        if type(hx) is not tuple or len(hx) != 2:
            return None
        h0, c0 = hx
        if h0.shape != (L, B, H) or c0.shape != (L, B, H):
            return None
    if T != 1 and torch.is_grad_enabled() and (
            input.requires_grad or (hx is not None and (h0.requires_grad or c0.requires_grad))
            or any(w is not None and w.requires_grad for layer in layers for w in layer)):
        return None  # training over a sequence: the autograd.Function of the full path
    hs, cs = [], []
    try:
        if T == 1:
            step = torch.ops.lstm_fast.lstm_cell.default
            y = x[0]
            for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
                y, c = step(y, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh)
                hs.append(y)
                cs.append(c)
            y = y.unsqueeze(0)
        else:
            run = torch.ops.lstm_fast.lstm_forward_projected.default
            y = x.contiguous()
            for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
                bias = b_ih + b_hh if b_ih is not None else None
                y, h, c, _, _ = run(y, w_ih, bias, h0[k], c0[k], w_hh, None, None, False, False)
                hs.append(h)
                cs.append(c)
    except RuntimeError:
        return None  # something unusual: the full path's checks say what, in torch.nn's words
    # stacked, h_n is a tensor of its own, never a view of the output
    hidden = (torch.stack(hs), torch.stack(cs))
    return (y.transpose(0, 1) if module.batch_first else y), hidden


_ONE_STEP = None


def backend_step(module, chosen, input, h, c):
    """One LSTMCell step on a backend that is not a torch op (numba), without the full
    path's per-call work (autocast test, backend choice, the shared checks): the
    module settled those once. Returns (h, c), or None for the full path."""
    global _ONE_STEP
    H = module.hidden_size
    size = (input.shape[0], H) if input.dim() == 2 else None
    # such kernels index raw memory: the shapes, dtype and device must agree exactly
    w_ih, w_hh, b_ih, b_hh = module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh
    if (size is None or input.shape[1] != module.input_size or h.shape != size or c.shape != size
            or input.dtype != w_ih.dtype or h.dtype != w_ih.dtype or c.dtype != w_ih.dtype
            or input.device != w_ih.device or h.device != w_ih.device or c.device != w_ih.device):
        return None
    from .backends.base import SequenceLayout
    from .function import RecurrenceCall, _forward_without_grad, _with_function
    if _ONE_STEP is None:
        _ONE_STEP = SequenceLayout(None, False)
    need_grad = torch.is_grad_enabled() and (
        input.requires_grad or h.requires_grad or c.requires_grad or w_ih.requires_grad or w_hh.requires_grad
        or (b_ih is not None and (b_ih.requires_grad or b_hh.requires_grad)))
    run = _with_function if need_grad else _forward_without_grad
    _, h, c = run(input.unsqueeze(0).contiguous(), w_ih, b_ih, b_hh, h.contiguous(), c.contiguous(), w_hh, None,
                  RecurrenceCall(chosen, _ONE_STEP, True, need_grad))
    return h, c


def cpu_backend(backend: str | None, weight: torch.Tensor, hidden_size: int):
    """The backend the module's setting resolves to for CPU float32/float64 weights, or None."""
    if weight.device.type != "cpu" or weight.dtype not in _SHORT_DTYPES:
        return None
    try:
        return select_backend(backend, weight.device, weight.dtype, LayerSizes(1, 1, hidden_size, hidden_size))
    except (RuntimeError, ValueError):
        return None
