"""The contract every backend implements.

Shapes (one layer, one direction):
    T  sequence length          B  batch size (rows of the padded batch)
    H  hidden size              P  recurrent state size (proj_size if > 0 else H)
    I  input size               G = 4H gate columns, order i, f, g, o

The arguments come in named bundles (below), the same names as csrc/lstm.h's structs:
    gx          [T, B, 4H]  input projection x @ W_ih^T + b_ih + b_hh (recurrence-only entry)
    x           [T, B, I]   the layer input (projecting entry: the backend computes gx)
    InputProjection(w_ih [4H, I], bias [4H] or None)
    LSTMState(h [B, P], c [B, H])            the initial state
    RecurrentWeights(w_hh [4H, P], w_hr [P, H] or None)
    SequenceLayout(batch_sizes, reverse)     batch_sizes: [T] int64 CPU tensor or None. When
        given (packed input) it is non-increasing and row b is active at step t iff
        b < batch_sizes[t]; inactive rows keep their state and get y = 0. Never combined
        with reverse=True (function._run refuses it). reverse: process t = T-1 .. 0.
    OutputGrads(y [T, B, P], h_n [B, P], c_n [B, H])   upstream gradients

Two entries, one per kind of input:
    forward(gx, state, weights, layout, need_grad)
    forward_projected(x, projection, state, weights, layout, need_grad)
both return (y [T, B, P], h_n [B, P], c_n [B, H], saved), saved being the backend's own
tensors for backward, exactly (gates, cells) or () when need_grad is False; y is kept
by the caller and handed back to backward.
    backward(saved, y, grads, state, weights, layout) -> RecurrenceGrads
    backward_projected(saved, y, grads, x, projection, state, weights, layout, wanted)
        -> ProjectedGrads, the projection's gradients only where `wanted` asks.
The weight gradients are GEMMs over all T after the time loop (see weight_grads).
The base class's forward_projected / backward_projected wrap forward / backward
with the projection done in torch.
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


class LSTMState(NamedTuple):
    h: torch.Tensor  # [B, P]
    c: torch.Tensor  # [B, H]


class RecurrentWeights(NamedTuple):
    w_hh: torch.Tensor  # [4H, P]
    w_hr: torch.Tensor | None = None  # [P, H], proj_size > 0 only


class InputProjection(NamedTuple):
    w_ih: torch.Tensor  # [4H, I]
    bias: torch.Tensor | None = None  # [4H], b_ih + b_hh


class SequenceLayout(NamedTuple):
    batch_sizes: torch.Tensor | None = None  # [T] int64 on the CPU, packed input only
    reverse: bool = False


class OutputGrads(NamedTuple):
    y: torch.Tensor  # [T, B, P]
    h_n: torch.Tensor  # [B, P]
    c_n: torch.Tensor  # [B, H]


class RecurrenceGrads(NamedTuple):
    gx: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    w_hh: torch.Tensor
    w_hr: torch.Tensor | None


class ProjectionWanted(NamedTuple):
    x: bool
    w_ih: bool
    bias: bool


class ProjectedGrads(NamedTuple):
    x: torch.Tensor | None
    w_ih: torch.Tensor | None
    bias: torch.Tensor | None
    h0: torch.Tensor
    c0: torch.Tensor
    w_hh: torch.Tensor
    w_hr: torch.Tensor | None


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

    def forward(self, gx, state: LSTMState, weights: RecurrentWeights, layout: SequenceLayout, need_grad: bool):
        raise NotImplementedError

    def forward_projected(self, x, projection: InputProjection, state: LSTMState, weights: RecurrentWeights,
                          layout: SequenceLayout, need_grad: bool):
        """forward() on the layer input x [T, B, I]. By default one GEMM here; a backend
        may fuse the projection into its own launch."""
        gx = torch.nn.functional.linear(x, projection.w_ih, projection.bias)
        return self.forward(gx, state, weights, layout, need_grad)

    def backward(self, saved, y, grads: OutputGrads, state: LSTMState, weights: RecurrentWeights,
                 layout: SequenceLayout) -> RecurrenceGrads:
        raise NotImplementedError

    def backward_projected(self, saved, y, grads: OutputGrads, x, projection: InputProjection, state: LSTMState,
                           weights: RecurrentWeights, layout: SequenceLayout,
                           wanted: ProjectionWanted) -> ProjectedGrads:
        """backward() after forward_projected(). By default the projection's gradients
        are GEMMs over all T*B rows here."""
        r = self.backward(saved, y, grads, state, weights, layout)
        d_gx, w_ih = r.gx, projection.w_ih
        d_x = d_gx.matmul(w_ih.to(d_gx.dtype)) if wanted.x else None
        d_w_ih = d_gx.reshape(-1, d_gx.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]).to(d_gx.dtype)) \
            if wanted.w_ih else None
        d_b = d_gx.sum((0, 1)) if wanted.bias else None
        return ProjectedGrads(d_x, d_w_ih, d_b, r.h0, r.c0, r.w_hh, r.w_hr)

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
