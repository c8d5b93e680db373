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
    SequenceLayout(batch_sizes, reverse)     batch_sizes: [T] int64 CPU tensor or None;
        reverse: process t = T-1 .. 0.
    OutputGrads(y [T, B, P], h_n [B, P], c_n [B, H])   upstream gradients

Two layouts of the per-step tensors (gx, x, y, gates, cells, grad_y, d_gx):
    padded  (batch_sizes None): [T, B, *], step t is rows t*B .. t*B + B - 1.
    packed  (batch_sizes given): PackedSequence's data, [N, *] with N = sum(batch_sizes),
        B = batch_sizes[0] rows of h0; step t holds the first batch_sizes[t] rows of the
        batch (non-increasing in t), at rows row_starts[t] .. + batch_sizes[t] - 1. Only
        real tokens are stored and computed. A row enters the recurrence with its h0/c0
        at its first processed step (t = 0 forward, its last t when reverse) and its
        h_n/c_n are taken after its last processed step.

Two entries, one per kind of input (shapes below for the padded layout):
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


class StepMasks(NamedTuple):
    """The recurrent regularisers' masks of one call (lstm_fast.LSTM draws them), each
    None when off; values in the call's dtype. Every backend computes:
        z_t  = gx_t + (h_{t-1} * recurrent) @ W_hh^T          (recurrent dropout)
        c~_t = f * c_{t-1} + i * g,   h~_t = o * tanh(c~_t)   (then W_hr when projected)
        c_t  = zone_c_t * c_{t-1} + (1 - zone_c_t) * c~_t     (zoneout)
        h_t  = zone_h_t * h_{t-1} + (1 - zone_h_t) * h~_t
    and saves c_t (not c~_t) as cells; y_t = h_t."""
    recurrent: torch.Tensor | None = None  # [B, P], the same at every step (scaled by 1/(1-p))
    zone_c: torch.Tensor | None = None  # per step, [T, B, H] or [N, H] packed: 1 keeps c_{t-1}
    zone_h: torch.Tensor | None = None  # per step, [T, B, P] or [N, P]: 1 keeps h_{t-1}

    def any(self) -> bool:
        return self.recurrent is not None or self.zone_c is not None or self.zone_h is not None


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
    # torch ops (ATen, or custom ops with fake kernels). Otherwise the call enters the graph
    # as the op lstm_fast::recurrence_forward (function._GRAPH_OP_BACKENDS), or runs eagerly
    # as its own island (one graph break per layer-direction).
    traceable = False
    # Whether float16/bfloat16 calls run in float32: function._run widens the inputs
    # and rounds the results back (autograd's casts do the same for the gradients).
    widens_16bit = False
    # Whether forward/backward (and their projected forms) take masks=StepMasks and run
    # them in their own loops; function._run hands a masked call to the reference otherwise.
    supports_masks = False

    def loops_solo(self) -> bool:
        """Whether this backend's time loops currently run on one thread because split calls
        stalled on shared cores; LSTMRecurrence's backward then runs on one torch thread too."""
        return False

    def is_available(self) -> tuple[bool, str]:
        raise NotImplementedError

    def supports(self, device: torch.device, dtype: torch.dtype, sizes: LayerSizes) -> tuple[bool, str]:
        raise NotImplementedError

    def forward(self, gx, state: LSTMState, weights: RecurrentWeights, layout: SequenceLayout, need_grad: bool):
        raise NotImplementedError

    def forward_projected(self, x, projection: InputProjection, state: LSTMState, weights: RecurrentWeights,
                          layout: SequenceLayout, need_grad: bool, **masks):
        """forward() on the layer input x [T, B, I]. By default one GEMM here; a backend
        may fuse the projection into its own launch. Without grad, in blocks of steps
        (in_time_blocks): gx of the whole sequence is never held. masks: masks=StepMasks,
        only for a backend with supports_masks (then the call runs whole)."""
        def run(x, state, layout, need_grad):
            gx = torch.nn.functional.linear(x, projection.w_ih, projection.bias)
            return self.forward(gx, state, weights, layout, need_grad, **masks)

        if need_grad or masks:
            return run(x, state, layout, True)
        return in_time_blocks(run, x, state, layout, weights.w_hh.shape[0])

    def backward(self, saved, y, grads: OutputGrads, state: LSTMState, weights: RecurrentWeights,
                 layout: SequenceLayout) -> RecurrenceGrads:
        raise NotImplementedError

    def activations(self, saved, layout: SequenceLayout):
        """(gates, cells) of a forward's saved tensors in the call's own layout: activated
        i, f, g, o [T, B, 4H] and c_t [T, B, H] of every step ([N, *] packed, rows in
        PackedSequence order), in the accumulation dtype. What lstm_fast.inspect reads."""
        return saved

    def backward_projected(self, saved, y, grads: OutputGrads, x, projection: InputProjection, state: LSTMState,
                           weights: RecurrentWeights, layout: SequenceLayout,
                           wanted: ProjectionWanted, **masks) -> ProjectedGrads:
        """backward() after forward_projected(). By default the projection's gradients
        are GEMMs over all T*B rows here."""
        r = self.backward(saved, y, grads, state, weights, layout, **masks)
        d_gx, w_ih = r.gx, projection.w_ih
        d_x = d_gx.matmul(w_ih.to(d_gx.dtype)) if wanted.x else None
        d_w_ih = d_gx.reshape(-1, d_gx.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]).to(d_gx.dtype)) \
            if wanted.w_ih else None
        d_b = d_gx.reshape(-1, d_gx.shape[-1]).sum(0) if wanted.bias else None
        return ProjectedGrads(d_x, d_w_ih, d_b, r.h0, r.c0, r.w_hh, r.w_hr)

    def __repr__(self) -> str:
        return f"<lstm_fast backend {self.name}>"


def graph_recorder() -> str | None:
    """The graph recorder tracing this call (torch.jit.trace or torch.export), or None.

    Their graphs hold torch ops only: a backend whose kernels are not torch ops
    (numba, Triton) would be left out of the recording, so function._run records
    such a call as the op lstm_fast::recurrence_forward.
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


class PackedRows:
    """Where each step's rows sit in the packed layout (see the module docstring).

    sizes[t] rows of step t start at row starts[t]. prev_index() and last_index()
    locate, for every token, the state it starts from, and for every batch row, its
    final token: in the packed layout a row's previous state is not at a fixed shift.
    """

    def __init__(self, batch_sizes: torch.Tensor, reverse: bool):
        self.batch_sizes = batch_sizes.to("cpu", torch.int64)
        self.reverse = bool(reverse)
        self.sizes = self.batch_sizes.tolist()
        self.T = len(self.sizes)
        self.B = self.sizes[0] if self.sizes else 0
        self.N = sum(self.sizes)
        ends = torch.cumsum(self.batch_sizes, 0)
        self.starts_t = ends - self.batch_sizes
        self.starts = self.starts_t.tolist()

    def token_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, b): the time index and the batch row of every token, [N] int64 each, on the CPU."""
        t = torch.repeat_interleave(torch.arange(self.T), self.batch_sizes)
        return t, torch.arange(self.N) - self.starts_t[t]

    def lengths(self, B: int | None = None) -> torch.Tensor:
        """[B] int64: each batch row's number of steps (0 for rows past batch_sizes[0])."""
        rows = torch.arange(self.B if B is None else B)
        return (self.batch_sizes.unsqueeze(0) > rows.unsqueeze(1)).sum(1)

    def prev_index(self, device) -> torch.Tensor:
        """[N] int64: token r's previous state is row prev_index[r] of cat([y, h0]) (y
        [N, P] in this layout, h0 [B, P] after it: index N + b for a row's first step)."""
        t, b = self.token_steps()
        t_prev = t + 1 if self.reverse else t - 1
        inside = (t_prev >= 0) & (t_prev < self.T)
        t_prev = t_prev.clamp(0, max(self.T - 1, 0))
        has_prev = inside & (b < self.batch_sizes[t_prev])
        return torch.where(has_prev, self.starts_t[t_prev] + b, self.N + b).to(device)

    def batch_row(self, device) -> torch.Tensor:
        """[N] int64: the batch row (0 .. B-1) of every token."""
        return self.token_steps()[1].to(device)

    def last_index(self, device) -> torch.Tensor:
        """[B] int64: the row of each batch row's last processed token."""
        b = torch.arange(self.B)
        if self.reverse:
            return b.to(device)  # every row ends at t = 0, the first B rows
        return (self.starts_t[self.lengths() - 1] + b).to(device)

    def step_rows(self, t: int) -> slice:
        return slice(self.starts[t], self.starts[t] + self.sizes[t])


# Inference input projections are computed for at most this many gx elements at a time
# (16 MB in float32): peak memory is the output plus this block, whatever T is.
BLOCK_ELEMENTS = 1 << 22


def in_time_blocks(run, x, state, layout, gx_width):
    """run(x_block, state, layout_block, False) over blocks of consecutive steps in
    processing order, each block starting from the state the last one ended with;
    returns (y, h_n, c_n, ()) as one call would. gx_width: gx elements per row."""
    h0 = state.h
    packed = layout.batch_sizes is not None
    T, B = (len(layout.batch_sizes), h0.shape[0]) if packed else x.shape[:2]
    steps = max(1, BLOCK_ELEMENTS // max(1, B * gx_width))
    if T <= steps:
        return run(x, state, layout, False)
    rows = PackedRows(layout.batch_sizes, False) if packed else None
    y = None
    starts = range(0, T, steps)
    for t0 in (reversed(starts) if layout.reverse else starts):
        t1 = min(T, t0 + steps)
        if packed:
            r0, r1 = rows.starts[t0], rows.starts[t1 - 1] + rows.sizes[t1 - 1]
            part = SequenceLayout(layout.batch_sizes[t0:t1], layout.reverse)
        else:
            r0, r1, part = t0, t1, layout
        yb, h, c, _ = run(x[r0:r1], state, part, False)
        if y is None:
            y = yb.new_empty((x.shape[0], *yb.shape[1:]))
        y[r0:r1] = yb
        state = LSTMState(h, c)
    return y, state.h, state.c, ()


def weight_grads(d_gates, y, h0, reverse, d_r=None, h_pre=None, batch_sizes=None, recurrent_mask=None):
    """Recurrent weight gradients as GEMMs over all tokens, after the time loop.

    dW_hh = sum_t d_gates[t]^T @ hprev[t], where hprev[t] is y of the previous
    step in processing order and h0 at the first. Padded: the shifted y is read as
    a view. Packed: hprev is gathered (PackedRows.prev_index), as a row's previous
    state is y of the step before or, at its first step, its h0.
    d_gates [T, B, 4H] pre-activation gate gradients, y [T, B, P], h0 [B, P],
    d_r [T, B, P] gradient reaching each projected output, h_pre [T, B, H]
    ([N, *] each when packed); recurrent_mask [B, P]: hprev * mask entered the product.
    Returns d_w_hh [4H, P], d_w_hr [P, H] or None, in d_gates' dtype.
    """
    G = d_gates.shape[-1]
    y, h0 = y.to(d_gates.dtype), h0.to(d_gates.dtype)
    d_w_hr = None
    if d_r is not None:
        d_w_hr = d_r.reshape(-1, d_r.shape[-1]).t().mm(h_pre.reshape(-1, h_pre.shape[-1]).to(d_r.dtype))
    if recurrent_mask is not None:  # every token's previous state, masked by its batch row's mask
        m = recurrent_mask.to(d_gates.dtype)
        h0 = h0 * m
        if batch_sizes is None:
            y = y * m
        else:
            y = y * m.index_select(0, PackedRows(batch_sizes, reverse).batch_row(m.device))
    if batch_sizes is not None:
        index = PackedRows(batch_sizes, reverse).prev_index(d_gates.device)
        hprev = torch.cat([y, h0]).index_select(0, index)
        return d_gates.t().mm(hprev), d_w_hr
    T = d_gates.shape[0]
    if T == 0:  # no step: no weight was used
        return d_gates.new_zeros(G, h0.shape[-1]), d_w_hr
    first, later, before = (T - 1, slice(0, T - 1), slice(1, T)) if reverse else (0, slice(1, T), slice(0, T - 1))
    d_w_hh = d_gates[first].t().mm(h0)
    if T > 1:
        d_w_hh.addmm_(d_gates[later].reshape(-1, G).t(), y[before].reshape(-1, y.shape[-1]))
    return d_w_hh, d_w_hr
