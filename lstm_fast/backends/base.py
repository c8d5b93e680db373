"""The contract every backend implements.

Shapes (one layer, one direction):
    T  sequence length          B  batch size (rows of the padded batch)
    H  hidden size              P  recurrent state size (proj_size if > 0 else H)

    gx           [T, B, 4H]  input projection x @ W_ih^T + b_ih + b_hh, gate order i, f, g, o
    h0           [B, P]      initial hidden state
    c0           [B, H]      initial cell state
    w_hh         [4H, P]     recurrent weight
    w_hr         [P, H]      projection weight, or None
    batch_sizes  [T] int64 CPU tensor or None. When given (packed input) it is
                 non-increasing and row b is active at step t iff b < batch_sizes[t];
                 inactive rows keep their state and get y = 0. Never combined with
                 reverse=True (the module flips packed sequences itself).
    reverse      process t = T-1 .. 0 instead of 0 .. T-1

forward returns (y [T, B, P], h_n [B, P], c_n [B, H], saved) where saved is a
tuple of tensors the backend's backward needs (empty when need_grad is False).

backward(saved, grad_y, grad_hn, grad_cn, h0, c0, w_hh, w_hr, batch_sizes, reverse)
returns (d_gx [T, B, 4H], d_h0, d_c0, d_w_hh, d_w_hr or None). The weight
gradients are GEMMs over all T after the time loop (see weight_grads).

forward_projected / backward_projected are the same on the layer input x [T, B, I]
with the input projection (W_ih [4H, I], bias [4H]) as part of the backend's job;
the base class does it with torch around forward / backward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class LayerSizes(NamedTuple):  # a NamedTuple: built on every call, 3x cheaper than a dataclass
    T: int
    B: int
    H: int
    P: int
    packed: bool = False
    reverse: bool = False

    @property
    def has_proj(self) -> bool:
        # nn.LSTM requires proj_size < hidden_size, so P == H means no projection.
        return self.P != self.H


class Backend:
    """Base class; subclasses override everything but the helpers."""

    name = "?"
    # Whether torch.compile may trace into forward/backward: true when they are made of
    # torch ops (ATen, or custom ops with fake kernels). Otherwise the call runs eagerly
    # as its own island (one graph break per layer-direction).
    traceable = False
    # Whether float16/bfloat16 calls run in float32: function._run widens the inputs
    # and rounds the results back (autograd's casts do the same for the gradients).
    widens_16bit = False

    def is_available(self) -> tuple[bool, str]:
        raise NotImplementedError

    def supports(self, device: torch.device, dtype: torch.dtype, sizes: LayerSizes) -> tuple[bool, str]:
        raise NotImplementedError

    def forward(self, gx, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad):
        raise NotImplementedError

    def forward_projected(self, x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad):
        """forward() on the layer input x [T, B, I]: gx = x @ w_ih^T + bias (bias [4H] or
        None) is this backend's job. By default one GEMM here; a backend may fuse it
        into its own launch. The projection's gradients stay with the caller."""
        gx = torch.nn.functional.linear(x, w_ih, bias)
        return self.forward(gx, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad)

    def backward(self, saved, grad_y, grad_hn, grad_cn, h0, c0, w_hh, w_hr, batch_sizes, reverse):
        raise NotImplementedError

    def backward_projected(self, saved, grad_y, grad_hn, grad_cn, x, w_ih, h0, c0, w_hh, w_hr, batch_sizes,
                           reverse, need_dx, need_w_ih, need_bias):
        """backward() after forward_projected(): returns (dx, d_w_ih, d_bias, d_h0, d_c0,
        d_w_hh, d_w_hr), the first three None unless asked for. By default the
        projection's gradients are GEMMs over all T*B rows here."""
        d_gx, d_h0, d_c0, d_w_hh, d_w_hr = self.backward(saved, grad_y, grad_hn, grad_cn, h0, c0, w_hh, w_hr,
                                                         batch_sizes, reverse)
        G = d_gx.shape[-1]
        d_x = d_gx.matmul(w_ih.to(d_gx.dtype)) if need_dx else None
        d_w_ih = d_gx.reshape(-1, G).t().mm(x.reshape(-1, x.shape[-1]).to(d_gx.dtype)) if need_w_ih else None
        d_b = d_gx.sum((0, 1)) if need_bias else None
        return d_x, d_w_ih, d_b, d_h0, d_c0, d_w_hh, d_w_hr

    def __repr__(self) -> str:
        return f"<lstm_fast backend {self.name}>"


def graph_recorder() -> str | None:
    """The graph recorder tracing this call (torch.jit.trace or torch.export), or None.

    Their graphs hold torch ops only: a backend whose kernels are not torch ops
    (numba, Triton) would be left out of the recording, so it must decline.
    """
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    if is_exporting is not None and is_exporting():
        return "torch.export"
    return None


HALF_DTYPES = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of gates, cell state and accumulation: float32 for 16-bit input, else its own."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def step_order(T: int, reverse: bool) -> range:
    """Time indices in processing order."""
    return range(T - 1, -1, -1) if reverse else range(T)


def active_rows(batch_sizes, t: int, B: int) -> int:
    return B if batch_sizes is None else int(batch_sizes[t])


def weight_grads(d_gates, y, h0, reverse, d_r=None, h_pre=None):
    """Recurrent weight gradients as GEMMs over all T*B rows, after the time loop.

    dW_hh = sum_t d_gates[t]^T @ hprev[t], where hprev[t] is y of the previous
    step in processing order and h0 at the first; the shifted y is read as a
    view instead of being copied. With batch_sizes the active set only shrinks
    in processing order, so an active row's previous state is always that y,
    and inactive rows contribute nothing (their gate gradients are zero).
    d_gates [T, B, 4H] pre-activation gate gradients, y [T, B, P], h0 [B, P],
    d_r [T, B, P] gradient reaching each projected output, h_pre [T, B, H].
    Returns d_w_hh [4H, P], d_w_hr [P, H] or None, in d_gates' dtype.
    """
    T, B, G = d_gates.shape
    y, h0 = y.to(d_gates.dtype), h0.to(d_gates.dtype)
    if T == 0:  # no step: no weight was used
        return (d_gates.new_zeros(G, h0.shape[-1]),
                None if d_r is None else d_gates.new_zeros(d_r.shape[-1], h_pre.shape[-1]))
    first, later, before = (T - 1, slice(0, T - 1), slice(1, T)) if reverse else (0, slice(1, T), slice(0, T - 1))
    d_w_hh = d_gates[first].t().mm(h0)
    if T > 1:
        d_w_hh.addmm_(d_gates[later].reshape(-1, G).t(), y[before].reshape(-1, y.shape[-1]))
    d_w_hr = None
    if d_r is not None:
        d_w_hr = d_r.reshape(-1, d_r.shape[-1]).t().mm(h_pre.reshape(-1, h_pre.shape[-1]).to(d_r.dtype))
    return d_w_hh, d_w_hr
