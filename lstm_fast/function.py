"""THE autograd boundary: one direction of one LSTM layer.

Everything outside (input projection, dropout, layer stacking) is ordinary
differentiable PyTorch; only the recurrence goes through this Function, which
hands it to the backend chosen for the call.
"""
from __future__ import annotations

import torch

from .backends import select_backend
from .backends.base import LayerSizes


class LSTMRecurrence(torch.autograd.Function):
    """(gx, h0, c0, w_hh, w_hr) -> (y, h_n, c_n); shapes in backends/base.py."""

    @staticmethod
    def forward(ctx, gx, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend, need_grad):
        y, h_n, c_n, saved = backend.forward(gx, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad)
        ctx.backend, ctx.batch_sizes, ctx.reverse = backend, batch_sizes, reverse
        if need_grad:
            ctx.save_for_backward(h0, c0, w_hh, w_hr, *saved)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, grad_y, grad_hn, grad_cn):
        h0, c0, w_hh, w_hr, *saved = ctx.saved_tensors
        grads = ctx.backend.backward(tuple(saved), grad_y.contiguous(), grad_hn.contiguous(), grad_cn.contiguous(),
                                     h0, c0, w_hh, w_hr, ctx.batch_sizes, ctx.reverse)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
        return (*grads, None, None, None, None)


def lstm_recurrence(gx, h0, c0, w_hh, w_hr=None, *, batch_sizes=None, reverse=False, backend=None):
    """Run the recurrent part of one layer-direction on precomputed gx = x @ W_ih^T + b.

    gx [T, B, 4H], h0 [B, P], c0 [B, H], w_hh [4H, P], w_hr [P, H] or None.
    Returns y [T, B, P], h_n [B, P], c_n [B, H].
    """
    T, B, G = gx.shape
    sizes = LayerSizes(T=T, B=B, H=G // 4, P=h0.shape[-1], packed=batch_sizes is not None, reverse=reverse)
    chosen = select_backend(backend, gx.device, gx.dtype, sizes)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (gx, h0, c0, w_hh, w_hr))
    return LSTMRecurrence.apply(gx.contiguous(), h0.contiguous(), c0.contiguous(), w_hh.contiguous(),
                                None if w_hr is None else w_hr.contiguous(),
                                batch_sizes, reverse, chosen, need_grad)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *,
               batch_first=False, reverse=False, backend=None):
    """Functional single-layer, single-direction LSTM with nn.LSTM's math and weight layout.

    x [T, B, I] ([B, T, I] with batch_first), h0 [B, P], c0 [B, H],
    w_ih [4H, I], w_hh [4H, P], b_ih/b_hh [4H] or None, w_hr [P, H] or None.
    Returns (y, (h_n, c_n)) with y [T, B, P] ([B, T, P] with batch_first).
    The input projection for all steps is one GEMM; only the recurrence loops.
    """
    if batch_first:
        x = x.transpose(0, 1)
    gx = input_projection(x, w_ih, b_ih, b_hh)
    y, h_n, c_n = lstm_recurrence(gx, h0, c0, w_hh, w_hr, reverse=reverse, backend=backend)
    if batch_first:
        y = y.transpose(0, 1)
    return y, (h_n, c_n)


def input_projection(x, w_ih, b_ih=None, b_hh=None):
    """x [..., I] -> [..., 4H] = x @ W_ih^T + b_ih + b_hh, one GEMM for all steps."""
    bias = None
    if b_ih is not None:
        bias = b_ih + b_hh if b_hh is not None else b_ih
    elif b_hh is not None:
        bias = b_hh
    return torch.nn.functional.linear(x, w_ih, bias)
