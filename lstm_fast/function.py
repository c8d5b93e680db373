"""THE autograd boundary: one direction of one LSTM layer.

Everything outside (input projection, dropout, layer stacking) is ordinary
differentiable PyTorch; only the recurrence goes through this Function, which
hands it to the backend chosen for the call.
"""
from __future__ import annotations

import functools
import sys

import torch

from .backends import select_backend
from .backends.base import HALF_DTYPES, LayerSizes
from .backends.reference import ReferenceBackend


class LSTMRecurrence(torch.autograd.Function):
    """(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr) -> (y, h_n, c_n); shapes in backends/base.py.

    x [T, B, I] is the layer input, projected by the backend (forward_projected); with
    w_ih None it is the precomputed gx [T, B, 4H] and the biases are None.
    """

    @staticmethod
    def forward(ctx, x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend, need_grad):
        y, h_n, c_n, saved = _backend_forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse,
                                              backend, need_grad)
        ctx.backend, ctx.batch_sizes, ctx.reverse = backend, batch_sizes, reverse
        if need_grad:
            # x is saved in both forms: backward_projected needs the layer input, and the
            # differentiable backward recomputes from whichever x was given
            ctx.save_for_backward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, *saved)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, grad_y, grad_hn, grad_cn):
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must themselves be differentiable, which the
            # backends' fused backward is not
            return _differentiable_backward(ctx, grad_y, grad_hn, grad_cn)
        x, w_ih, _, _, h0, c0, w_hh, w_hr, *saved = ctx.saved_tensors
        upstream = (tuple(saved), grad_y.contiguous(), grad_hn.contiguous(), grad_cn.contiguous())
        need = ctx.needs_input_grad
        if w_ih is None:
            d_x, d_h0, d_c0, d_w_hh, d_w_hr = ctx.backend.backward(*upstream, h0, c0, w_hh, w_hr, ctx.batch_sizes,
                                                                   ctx.reverse)
            d_w_ih = d_b = None
        else:
            d_x, d_w_ih, d_b, d_h0, d_c0, d_w_hh, d_w_hr = ctx.backend.backward_projected(
                *upstream, x, w_ih, h0, c0, w_hh, w_hr, ctx.batch_sizes, ctx.reverse, need[0], need[1],
                need[2] or need[3])
        grads = [d_x, d_w_ih, d_b, d_b, d_h0, d_c0, d_w_hh, d_w_hr]
        grads = [g if n else None for g, n in zip(grads, need)]
        return (*grads, None, None, None, None)


def _differentiable_backward(ctx, grad_y, grad_hn, grad_cn):
    """The recurrence's gradients as a graph of torch ops, for second derivatives.

    Recomputes the layer from the saved inputs with the reference's out-of-place
    loop and differentiates it with create_graph=True: the returned gradients
    depend differentiably on the inputs and on grad_y/grad_hn/grad_cn. As slow
    as a Python loop over the steps; only create_graph=True takes this path.
    """
    inputs = ctx.saved_tensors[:8]
    x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr = inputs
    need = ctx.needs_input_grad[:8]
    with torch.enable_grad():
        gx = x if w_ih is None else torch.nn.functional.linear(x, w_ih, _bias(b_ih, b_hh))
        outputs = ReferenceBackend.forward_differentiable(gx, h0, c0, w_hh, w_hr, ctx.batch_sizes, ctx.reverse)
        wanted = [t for t, n in zip(inputs, need) if n]
        found = iter(torch.autograd.grad(outputs, wanted, (grad_y, grad_hn, grad_cn), create_graph=True,
                                         allow_unused=True))
    grads = [next(found) if n else None for n in need]
    return (*grads, None, None, None, None)


def _backend_forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend, need_grad):
    if w_ih is None:
        return backend.forward(x, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad)
    return backend.forward_projected(x, w_ih, _bias(b_ih, b_hh), h0, c0, w_hh, w_hr, batch_sizes, reverse,
                                     need_grad)


def _forward_without_grad(*args):
    """The recurrence when nothing needs a gradient: no autograd.Function around it,
    whose bookkeeping costs about 10 us a call (felt by one-step LSTMCell loops)."""
    return _backend_forward(*args)[:3]


def _bias(b_ih, b_hh):
    if b_ih is not None:
        return b_ih + b_hh if b_hh is not None else b_ih
    return b_hh


def outside_graph(fn):
    """Decorator: fn runs with torch.compile kept out of it and of every frame it calls.

    Traced code gets a graph break at the call; eager code that torch.compile is
    watching (a frame it declined, whose callees it would compile one by one) runs
    plainly. torch.compiler.disable is applied only once torch.compile has been used:
    it imports torch._dynamo (2 s), which importing lstm_fast should not.
    """
    disabled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args)
            disabled = torch.compiler.disable(fn)
        return disabled(*args)

    return call


@outside_graph
def _call_outside_graph(fn, *args):
    return fn(*args)


def _run(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend):
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As torch.nn.LSTM under autocast: on CUDA cuDNN's LSTM runs wholly in the autocast
        # dtype (ATen casts input, states and weights for it); elsewhere the LSTM is not on
        # autocast's lower-precision list and runs in the weights' dtype. Then the
        # recurrence runs with autocast off, so every backend sees one dtype.
        dtype = torch.get_autocast_dtype(device_type) if device_type == "cuda" else w_hh.dtype
        x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr = (
            None if t is None else t.to(dtype) for t in (x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr))
        with torch.autocast(device_type, enabled=False):
            return _run(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend)
    dtype = x.dtype
    if not all(w is None or w.dtype == dtype for w in (w_ih, w_hh, b_ih, b_hh, w_hr)):
        _raise_weight_dtype_mismatch(x, w_ih, w_hh, b_ih, b_hh, w_hr)
    T, B = x.shape[:2]
    H = w_hh.shape[0] // 4
    sizes = LayerSizes(T=T, B=B, H=H, P=h0.shape[-1], packed=batch_sizes is not None, reverse=reverse)
    chosen = select_backend(backend, x.device, x.dtype, sizes)
    if chosen.widens_16bit and x.dtype in HALF_DTYPES:
        # The backend computes in float32: widen here, and autograd's casts round the
        # outputs and, in backward, the gradients back to the 16-bit dtype.
        wide = [None if t is None else t.float() for t in (x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr)]
        return tuple(t.to(x.dtype) for t in _run(*wide, batch_sizes, reverse, chosen.name))
    # A trace is one graph for both grad modes (torch.jit.trace checks it by tracing
    # again under no_grad), so while tracing only requires_grad decides.
    need_grad = (torch.is_grad_enabled() or torch.jit.is_tracing()) and (
        x.requires_grad or h0.requires_grad or c0.requires_grad or w_hh.requires_grad
        or any(t is not None and t.requires_grad for t in (w_ih, b_ih, b_hh, w_hr)))
    opt = [None if t is None else t.contiguous() for t in (w_ih, b_ih, b_hh, w_hr)]
    args = (x.contiguous(), opt[0], opt[1], opt[2], h0.contiguous(), c0.contiguous(), w_hh.contiguous(), opt[3],
            batch_sizes, reverse, chosen, need_grad)
    recurrence = LSTMRecurrence.apply if need_grad else _forward_without_grad
    if chosen.traceable or not torch.compiler.is_compiling():
        return recurrence(*args)
    # numba's and Triton's launchers are Python around foreign kernels, which dynamo
    # cannot follow: under torch.compile the recurrence is an eager island
    return _call_outside_graph(recurrence, *args)


def _raise_weight_dtype_mismatch(x, w_ih, w_hh, b_ih, b_hh, w_hr):
    # torch.nn.LSTM fails on such a mix too (inside oneDNN or cuBLAS); no backend may
    # silently compute it in another precision
    for name, w in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh),
                    ("weight_hr", w_hr)):
        if w is not None and w.dtype != x.dtype:
            raise RuntimeError(f"lstm_fast: {name} dtype ({w.dtype}) does not match input dtype ({x.dtype})")


def lstm_recurrence(gx, h0, c0, w_hh, w_hr=None, *, batch_sizes=None, reverse=False, backend=None):
    """Run the recurrent part of one layer-direction on precomputed gx = x @ W_ih^T + b.

    gx [T, B, 4H], h0 [B, P], c0 [B, H], w_hh [4H, P], w_hr [P, H] or None.
    Returns y [T, B, P], h_n [B, P], c_n [B, H].
    """
    return _run(gx, None, None, None, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend)


def lstm_projected(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *, batch_sizes=None, reverse=False,
                   backend=None):
    """One layer-direction on its time-major input x [T, B, I]: the backend computes the
    input projection (one GEMM for all steps, or fused into its own launch).
    Returns y [T, B, P], h_n [B, P], c_n [B, H]."""
    return _run(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *,
               batch_first=False, reverse=False, backend=None):
    """Functional single-layer, single-direction LSTM with nn.LSTM's math and weight layout.

    x [T, B, I] ([B, T, I] with batch_first), h0 [B, P], c0 [B, H],
    w_ih [4H, I], w_hh [4H, P], b_ih/b_hh [4H] or None, w_hr [P, H] or None.
    Returns (y, (h_n, c_n)) with y [T, B, P] ([B, T, P] with batch_first).
    The input projection for all steps is one GEMM (or part of the backend's launch);
    only the recurrence loops.
    """
    if batch_first:
        x = x.transpose(0, 1)
    y, h_n, c_n = lstm_projected(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse=reverse, backend=backend)
    if batch_first:
        y = y.transpose(0, 1)
    return y, (h_n, c_n)


def input_projection(x, w_ih, b_ih=None, b_hh=None):
    """x [..., I] -> [..., 4H] = x @ W_ih^T + b_ih + b_hh, one GEMM for all steps."""
    return torch.nn.functional.linear(x, w_ih, _bias(b_ih, b_hh))
