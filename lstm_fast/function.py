"""THE autograd boundary: one direction of one LSTM layer.

Callers (lstm_fast.LSTM, LSTMCell and the functional entries below) go through
_run, which settles the dtype (autocast, 16-bit widening) and the backend, then
runs LSTMRecurrence. Its forward hands the recurrence to the backend, and on the
projecting entry the input projection too (the backend may fuse it into its own
loop); only dropout and layer stacking stay outside, in ordinary PyTorch.
"""
from __future__ import annotations

import contextlib
import functools
import sys

import torch

from ._threads import one_torch_thread
from .backends import AUTO_ORDER, get_backend, select_backend
from .backends.base import (
    HALF_DTYPES,
    InputProjection,
    LayerSizes,
    LSTMState,
    OutputGrads,
    ProjectionWanted,
    RecurrentWeights,
    SequenceLayout,
    StepMasks,
    acc_dtype,
    graph_recorder,
)
from .backends.reference import ReferenceBackend

_functorch = torch._C._functorch


class RecurrenceCall:
    """The non-tensor arguments of one LSTMRecurrence call. A plain class, not a
    NamedTuple: vmap must not look inside it for tensors to batch."""

    __slots__ = ("backend", "layout", "projected", "need_grad", "masks")

    def __init__(self, backend, layout: SequenceLayout, projected: bool, need_grad: bool, masks=None):
        self.backend, self.layout, self.projected, self.need_grad = backend, layout, projected, need_grad
        self.masks = masks  # StepMasks or None: constants of the call, kept for backward

    def __repr__(self) -> str:  # by content: torch.jit.trace compares graphs, which print it
        return (f"RecurrenceCall({self.backend.name}, packed={self.layout.batch_sizes is not None}, "
                f"reverse={self.layout.reverse}, projected={self.projected}, need_grad={self.need_grad})")


class LSTMRecurrence(torch.autograd.Function):
    """(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, call) -> (y, h_n, c_n, gates, cells).

    With call.projected, x [T, B, I] is the layer input and the backend projects it
    (w_ih [4H, I], bias b_ih + b_hh); otherwise x is the precomputed gx [T, B, 4H] and
    w_ih, b_ih, b_hh are None. Other shapes in backends/base.py. gates and cells are
    the backend's saved tensors, outputs only so that setup_context can keep them
    (torch.func needs forward without ctx); callers use the first three.
    """

    @staticmethod
    def forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, call):
        y, h_n, c_n, saved = _backend_forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, call)
        gates, cells = saved if saved else (x.new_empty(0), x.new_empty(0))
        # with no step to run a backend may hand the initial state back as it came
        h_n, c_n = (t.clone() if t is s else t for t, s in ((h_n, h0), (c_n, c0)))
        return y, h_n, c_n, gates, cells

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, call = inputs
        y, _, _, gates, cells = output
        ctx.call = call
        ctx.mark_non_differentiable(gates, cells)
        ctx.set_materialize_grads(False)  # no zero-filled [T, B, 4H] gradient for gates
        ctx.save_for_backward(*tensors, y, gates, cells)

    @staticmethod
    def backward(ctx, grad_y, grad_hn, grad_cn, _grad_gates, _grad_cells):
        call = ctx.call
        # on contended cores, the whole backward on one thread (bench/NOTES_cpp.md#preempted-threads)
        with one_torch_thread() if call.backend.loops_solo() else contextlib.nullcontext():
            grads = _input_grads(ctx.saved_tensors, ctx.needs_input_grad[:8], call.layout, call.backend.name,
                                 call.projected, (grad_y, grad_hn, grad_cn), call.masks)
        return (*grads, None)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _loop_over_batch(LSTMRecurrence.apply, info, in_dims, args)


def _input_grads(saved, needs_input_grad, layout, backend, projected, output_grads, masks=None):
    """The gradients of (x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr) from the saved
    (x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, y, gates, cells): the backward of
    LSTMRecurrence and of the op lstm_fast::recurrence_forward alike."""
    x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, y, gates, cells = saved
    grads = tuple(torch.zeros_like(like) if g is None else g.contiguous()
                  for g, like in zip(output_grads, (y, h0, c0)))
    need = list(needs_input_grad)
    args = (gates, cells, y, *grads, x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, layout.batch_sizes, layout.reverse,
            backend, projected, need)
    if masks is not None:
        if torch.is_grad_enabled() or _functorch.peek_interpreter_stack() is not None:
            raise NotImplementedError("lstm_fast: second derivatives and torch.func transforms of a call with "
                                      "recurrent_dropout or zoneout are not supported (use eval mode)")
        d = _recurrence_backward(*args, masks=masks)
    elif torch.compiler.is_compiling():
        # traced: cpp's and cuda's backward are torch ops; the others' is the op with a fake
        # kernel (no second derivatives in a compiled graph)
        traced = get_backend(backend).traceable
        d = _recurrence_backward(*args) if traced else torch.ops.lstm_fast.recurrence_backward(*args)
    elif torch.is_grad_enabled() or _functorch.peek_interpreter_stack() is not None:
        # create_graph=True or torch.func: a Function of its own gives the backward
        # its derivative and its vmap rule
        d = _RecurrenceBackward.apply(*args)
    elif any(_functorch.is_legacy_batchedtensor(g) for g in grads):
        # torch.autograd.grad(..., is_grads_batched=True) batches through the op
        d = torch.ops.lstm_fast.recurrence_backward(*args)
    else:
        d = _recurrence_backward(*args)
    d_x, d_w_ih, d_b, d_h0, d_c0, d_w_hh, d_w_hr = (g if n else None for g, n in zip(d, _wanted_outputs(need)))
    grads = (d_x, d_w_ih, d_b, d_b, d_h0, d_c0, d_w_hh, d_w_hr)
    return tuple(g if n else None for g, n in zip(grads, need))


def _loop_over_batch(apply, info, in_dims, args):
    """A vmap rule for kernels that take plain tensors only: one call per element of
    the vmapped dimension, results stacked along dim 0."""
    results = [apply(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)))
               for i in range(info.batch_size)]
    outputs = tuple(torch.stack(column) for column in zip(*results))
    return outputs, (0,) * len(outputs)


def _wanted_outputs(need):
    """recurrence_backward's outputs (x, w_ih, bias, h0, c0, w_hh, w_hr) that are asked for."""
    return (need[0], need[1], need[2] or need[3], *need[4:])


def _recurrence_backward(gates, cells, y, grad_y, grad_hn, grad_cn, x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr,
                         batch_sizes, reverse, backend, projected, need, masks=None):
    """The backend's fused backward. Returns (d_x, d_w_ih, d_bias, d_h0, d_c0, d_w_hh,
    d_w_hr), d_x being d_gx on the recurrence-only entry; empty tensors where not asked."""
    chosen = get_backend(backend)
    extra = {} if masks is None else {"masks": masks}
    grads, state = OutputGrads(grad_y, grad_hn, grad_cn), LSTMState(h0, c0)
    weights, layout = RecurrentWeights(w_hh, w_hr), SequenceLayout(batch_sizes, reverse)
    if projected:
        wanted = ProjectionWanted(need[0], need[1], need[2] or need[3])
        d = chosen.backward_projected((gates, cells), y, grads, x, InputProjection(w_ih, _bias(b_ih, b_hh)),
                                      state, weights, layout, wanted, **extra)
    else:
        r = chosen.backward((gates, cells), y, grads, state, weights, layout, **extra)
        d = (r.gx, None, None, r.h0, r.c0, r.w_hh, r.w_hr)
    return tuple(x.new_empty(0) if g is None else g for g in d)


_TensorOpt = torch.Tensor | None


@torch.library.custom_op("lstm_fast::recurrence_backward", mutates_args=())
def _recurrence_backward_op(gates: torch.Tensor, cells: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor,
                            grad_hn: torch.Tensor, grad_cn: torch.Tensor, x: torch.Tensor, w_ih: _TensorOpt,
                            b_ih: _TensorOpt, b_hh: _TensorOpt, h0: torch.Tensor, c0: torch.Tensor,
                            w_hh: torch.Tensor, w_hr: _TensorOpt, batch_sizes: _TensorOpt, reverse: bool,
                            backend: str, projected: bool, need: list[bool]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    inputs = (gates, cells, y, grad_y, grad_hn, grad_cn, x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr)
    out = _recurrence_backward(*inputs, batch_sizes, reverse, backend, projected, need)
    # an op's outputs may not alias its inputs (a backend may hand back grad_hn as d_h0)
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    return tuple(g.clone() if g.numel() and g.untyped_storage().data_ptr() in taken else g for g in out)


@_recurrence_backward_op.register_fake
def _(gates, cells, y, grad_y, grad_hn, grad_cn, x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse,
      backend, projected, need):
    need = _wanted_outputs(need)
    G = w_hh.shape[0]
    if projected:
        d_x, d_w_ih, d_b = x.new_empty(x.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(G)
    else:
        d_x, d_w_ih, d_b = x.new_empty(x.shape), None, None
    d = (d_x, d_w_ih, d_b, h0.new_empty(h0.shape), c0.new_empty(c0.shape), w_hh.new_empty(w_hh.shape),
         None if w_hr is None else w_hr.new_empty(w_hr.shape))
    return tuple(g if g is not None and n else x.new_empty(0) for g, n in zip(d, need))


@_recurrence_backward_op.register_vmap
def _(info, in_dims, *args):
    return _loop_over_batch(torch.ops.lstm_fast.recurrence_backward, info, in_dims, args)


# Backends whose saved tensors are gates [T, B, 4H] and cells [T, B, H] ([N, *] packed) in
# acc_dtype, the shapes the fake kernel below promises. triton enters through this opaque op,
# not triton_op/wrap_triton: its step path launches one kernel per step from a Python loop,
# which wrap_triton would unroll into T graph nodes, making T static.
_GRAPH_OP_BACKENDS = ("cpp", "cuda", "numba", "reference", "triton")


@torch.library.custom_op("lstm_fast::recurrence_forward", mutates_args=())
def _recurrence_forward_op(x: torch.Tensor, w_ih: _TensorOpt, b_ih: _TensorOpt, b_hh: _TensorOpt, h0: torch.Tensor,
                           c0: torch.Tensor, w_hh: torch.Tensor, w_hr: _TensorOpt, batch_sizes: _TensorOpt,
                           reverse: bool, backend: str, projected: bool, need_grad: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSTMRecurrence as one registered op: what graph recorders (torch.export,
    torch.jit.trace and script) and torch.compile record for any backend, its derivative
    registered on the op. backend "auto" picks on the call's device (scripted modules)."""
    chosen = _graph_op_backend(backend, x, h0, w_hh, batch_sizes, reverse)
    call = RecurrenceCall(chosen, SequenceLayout(batch_sizes, reverse), projected, need_grad)
    inputs = (x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr)
    outputs = LSTMRecurrence.forward(*inputs, call)
    # an op's outputs may alias neither its inputs nor each other (a backend may return views)
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    result = []
    for t in outputs:
        if t.numel() and t.untyped_storage().data_ptr() in taken:
            t = t.clone()
        if t.numel():
            taken.add(t.untyped_storage().data_ptr())
        result.append(t)
    return tuple(result)


@_recurrence_forward_op.register_fake
def _(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend, projected, need_grad):
    rows = x.shape[:1] if batch_sizes is not None else x.shape[:2]  # packed: [N, *] rows
    B, G, P = h0.shape[0], w_hh.shape[0], h0.shape[1]
    if need_grad:
        acc = acc_dtype(x.dtype)
        gates, cells = x.new_empty((*rows, G), dtype=acc), x.new_empty((*rows, G // 4), dtype=acc)
    else:
        gates, cells = x.new_empty(0), x.new_empty(0)
    return x.new_empty((*rows, P)), h0.new_empty((B, P)), c0.new_empty((B, G // 4)), gates, cells


def _recurrence_forward_setup(ctx, inputs, output):
    x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, batch_sizes, reverse, backend, projected, _ = inputs
    y, _, _, gates, cells = output
    ctx.layout, ctx.projected = SequenceLayout(batch_sizes, reverse), projected
    ctx.backend = _graph_op_backend(backend, x, h0, w_hh, batch_sizes, reverse).name
    ctx.save_for_backward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, y, gates, cells)


def _recurrence_forward_backward(ctx, grad_y, grad_hn, grad_cn, _grad_gates, _grad_cells):
    grads = _input_grads(ctx.saved_tensors, ctx.needs_input_grad[:8], ctx.layout, ctx.backend, ctx.projected,
                         (grad_y, grad_hn, grad_cn))
    return (*grads, None, None, None, None, None)


_recurrence_forward_op.register_autograd(_recurrence_forward_backward, setup_context=_recurrence_forward_setup)


def _graph_op_backend(name, x, h0, w_hh, batch_sizes, reverse):
    """The backend that runs lstm_fast::recurrence_forward: the named one, or for "auto"
    the first of the automatic order that the op can describe."""
    T = len(batch_sizes) if batch_sizes is not None else x.shape[0]
    sizes = LayerSizes(T, h0.shape[0], w_hh.shape[0] // 4, h0.shape[-1], batch_sizes is not None, reverse)
    if name not in ("auto", ""):
        if name not in _GRAPH_OP_BACKENDS:
            get_backend(name)  # an unknown name gets the registry's message
            raise RuntimeError(f"lstm_fast backend '{name}' cannot run as a recorded op (its saved tensors have "
                               f"a layout of their own); choose one of {', '.join(_GRAPH_OP_BACKENDS)}")
        return _checked_graph_op_backend(select_backend(name, x.device, x.dtype, sizes), x.dtype)
    reasons = []
    for candidate in AUTO_ORDER.get(x.device.type, ("reference",)):
        if candidate in _GRAPH_OP_BACKENDS:
            try:
                return _checked_graph_op_backend(select_backend(candidate, x.device, x.dtype, sizes), x.dtype)
            except RuntimeError as exc:
                reasons.append(str(exc))
    raise RuntimeError("no lstm_fast backend can run this recorded call (" + "; ".join(reasons) + ")")


def _checked_graph_op_backend(chosen, dtype):
    if chosen.widens_16bit and dtype in HALF_DTYPES:
        # lstm_fast's modules widen before the op; a scripted module calls it directly
        raise RuntimeError(f"lstm_fast backend '{chosen.name}' computes {dtype} in float32: convert the module "
                           f"and its input to float32 for a scripted or recorded call")
    return chosen


class _RecurrenceBackward(torch.autograd.Function):
    """LSTMRecurrence's backward as a node of its own, when the gradients must be
    differentiable (create_graph=True, torch.func) or vmapped: forward is the fused
    backward (recurrence_backward's arguments), backward the second derivatives."""

    @staticmethod
    def forward(*args):
        return torch.ops.lstm_fast.recurrence_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, batch_sizes, reverse, _, projected, need = inputs
        ctx.layout, ctx.projected, ctx.need = SequenceLayout(batch_sizes, reverse), projected, need
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, *cotangents):
        return _double_backward(ctx, *cotangents)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _loop_over_batch(_RecurrenceBackward.apply, info, in_dims, args)


def _double_backward(ctx, *cotangents):
    """Second derivatives: the first-order gradients recomputed as a graph of torch ops
    (the reference's out-of-place loop, differentiated with create_graph=True), then
    differentiated against the cotangents. As slow as a Python loop over the steps;
    only a backward through the gradients (create_graph=True) comes here."""
    gates, cells, y, grad_y, grad_hn, grad_cn, x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr = ctx.saved_tensors
    need = _wanted_outputs(ctx.need)
    with torch.enable_grad():
        # Each input enters the recomputation through a node of its own (a view), so a
        # gradient taken at it counts only the paths through this recurrence, not those
        # through another input derived from it (grad_y = 2 * y, h0 = f(x)); the view
        # keeps the result differentiable for higher orders.
        leaves = [None if t is None else t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
                  for t in (x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, grad_y, grad_hn, grad_cn)]
        x_, w_ih_, b_ih_, b_hh_, h0_, c0_, w_hh_, w_hr_, gy_, ghn_, gcn_ = leaves
        gx = torch.nn.functional.linear(x_, w_ih_, _bias(b_ih_, b_hh_)) if ctx.projected else x_
        outputs = ReferenceBackend.forward_differentiable(gx, LSTMState(h0_, c0_), RecurrentWeights(w_hh_, w_hr_),
                                                          ctx.layout)
        # one leaf per recurrence_backward output: d_bias is the gradient of b_ih (and of b_hh)
        per_output = (x_, w_ih_, b_ih_ if b_ih_ is not None else b_hh_, h0_, c0_, w_hh_, w_hr_)
        pairs = [(leaf, cot) for leaf, cot, n in zip(per_output, cotangents, need)
                 if n and cot is not None and leaf is not None]
        if not pairs:
            return (None,) * 19
        first = torch.autograd.grad(outputs, [leaf for leaf, _ in pairs], (gy_, ghn_, gcn_), create_graph=True,
                                    allow_unused=True)
        kept = [(g, cot) for g, (_, cot) in zip(first, pairs) if g is not None]
        # the op's inputs that ask for a gradient (gates, cells and y get none: the
        # recomputation already follows every path from the layer's inputs through them)
        asked = [(i, leaves[i - 6]) for i in range(6, 14) if ctx.needs_input_grad[i] and leaves[i - 6] is not None]
        asked += [(i, leaves[i + 5]) for i in range(3, 6) if ctx.needs_input_grad[i]]
        result = [None] * 19
        if kept and asked:
            second = torch.autograd.grad([g for g, _ in kept], [leaf for _, leaf in asked], [c for _, c in kept],
                                         allow_unused=True, create_graph=torch.is_grad_enabled())
            for (i, _), g in zip(asked, second):
                result[i] = g
    return tuple(result)


def _backend_forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, call):
    state, weights = LSTMState(h0, c0), RecurrentWeights(w_hh, w_hr)
    extra = {} if call.masks is None else {"masks": call.masks}
    if call.projected:
        return call.backend.forward_projected(x, InputProjection(w_ih, _bias(b_ih, b_hh)), state, weights,
                                              call.layout, call.need_grad, **extra)
    return call.backend.forward(x, state, weights, call.layout, call.need_grad, **extra)


def _forward_without_grad(*args):
    """The recurrence when nothing needs a gradient: no autograd.Function around it,
    whose bookkeeping costs about 10 us a call (felt by one-step LSTMCell loops)."""
    return _backend_forward(*args)[:3]


def _with_function(*args):
    return LSTMRecurrence.apply(*args)[:3]


def _with_graph_op(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, call):
    return torch.ops.lstm_fast.recurrence_forward(x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, call.layout.batch_sizes,
                                                  call.layout.reverse, call.backend.name, call.projected,
                                                  call.need_grad)[:3]


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


def _run(x, projection, state: LSTMState, weights: RecurrentWeights, layout: SequenceLayout, backend, masks=None):
    """One layer-direction. projection = (w_ih, b_ih, b_hh) when x [T, B, I] is the layer
    input, None when x is the precomputed gx [T, B, 4H]. masks: StepMasks or None.
    Returns y, h_n, c_n."""
    if masks is not None:
        return _run_masked(x, projection, state, weights, layout, backend, masks)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As torch.nn.LSTM under autocast: on CUDA cuDNN's LSTM runs wholly in the autocast
        # dtype (ATen casts input, states and weights for it); elsewhere the LSTM is not on
        # autocast's lower-precision list and runs in the weights' dtype. Then the
        # recurrence runs with autocast off, so every backend sees one dtype.
        dtype = torch.get_autocast_dtype(device_type) if device_type == "cuda" else weights.w_hh.dtype
        x, projection, state, weights = _cast(x, dtype), _cast(projection, dtype), _cast(state, dtype), \
            _cast(weights, dtype)
        with torch.autocast(device_type, enabled=False):
            return _run(x, projection, state, weights, layout, backend)
    _check_call(x, projection, state, weights, layout)
    h0, c0 = state
    w_hh, w_hr = weights
    packed = layout.batch_sizes is not None
    T, B = (len(layout.batch_sizes), h0.shape[0]) if packed else x.shape[:2]
    sizes = LayerSizes(T, B, w_hh.shape[0] // 4, h0.shape[-1], packed, layout.reverse)
    chosen = select_backend(backend, x.device, x.dtype, sizes)
    if chosen.widens_16bit and x.dtype in HALF_DTYPES:
        # The backend computes in float32: widen here, and autograd's casts round the
        # outputs and, in backward, the gradients back to the 16-bit dtype.
        wide = (_cast(t, torch.float32) for t in (x, projection, state, weights))
        return tuple(t.to(x.dtype) for t in _run(*wide, layout, chosen.name))
    w_ih, b_ih, b_hh = projection if projection is not None else (None, None, None)
    # A recorded graph serves both grad modes (torch.jit.trace checks it by tracing
    # again under no_grad), so while recording only requires_grad decides.
    recording = graph_recorder() is not None
    need_grad = (torch.is_grad_enabled() or recording) and (
        x.requires_grad or h0.requires_grad or c0.requires_grad or w_hh.requires_grad
        or (w_ih is not None and w_ih.requires_grad) or (b_ih is not None and b_ih.requires_grad)
        or (b_hh is not None and b_hh.requires_grad) or (w_hr is not None and w_hr.requires_grad))
    args = (x.contiguous(), _contiguous(w_ih), _contiguous(b_ih), _contiguous(b_hh), h0.contiguous(),
            c0.contiguous(), w_hh.contiguous(), _contiguous(w_hr),
            RecurrenceCall(chosen, layout, projection is not None, need_grad))
    compiling = torch.compiler.is_compiling()
    if (recording or (compiling and not chosen.traceable)) and chosen.name in _GRAPH_OP_BACKENDS:
        # a recorded graph holds the op with its derivative, and torch.compile traces it as one node
        return _with_graph_op(*args)
    # under a torch.func transform the kernels must see plain tensors: the Function's vmap rule gives them
    use_function = need_grad or (not compiling and _functorch.peek_interpreter_stack() is not None)
    recurrence = _with_function if use_function else _forward_without_grad
    if chosen.traceable or not compiling:
        return recurrence(*args)
    # a backend the op does not describe: Python around foreign kernels, which dynamo
    # cannot follow, so under torch.compile the recurrence is an eager island
    return _call_outside_graph(recurrence, *args)


def _run_masked(x, projection, state, weights, layout, backend, masks):
    """_run for a call with regulariser masks: always through LSTMRecurrence, on a backend
    whose loops take the masks (the reference for the others), never into a recorded graph."""
    if graph_recorder() is not None:
        raise RuntimeError("lstm_fast: recurrent_dropout and zoneout cannot be recorded into a graph "
                           "(torch.jit.trace, torch.export, ONNX); record the module without them")
    _check_call(x, projection, state, weights, layout)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # as _run: the call runs in one dtype, autocast off
        dtype = torch.get_autocast_dtype(device_type) if device_type == "cuda" else weights.w_hh.dtype
        x, projection, state, weights, masks = (_cast(t, dtype) for t in (x, projection, state, weights, masks))
        with torch.autocast(device_type, enabled=False):
            return _run_masked(x, projection, state, weights, layout, backend, masks)
    chosen = _masked_backend(x, state, weights, layout, backend)
    masks = _cast(masks, x.dtype)
    if chosen.widens_16bit and x.dtype in HALF_DTYPES:
        wx, wp, ws, ww, wm = (_cast(t, torch.float32) for t in (x, projection, state, weights, masks))
        return tuple(t.to(x.dtype) for t in _run_masked(wx, wp, ws, ww, layout, chosen.name, wm))
    h0, c0 = state
    w_ih, b_ih, b_hh = projection if projection is not None else (None, None, None)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, weights.w_hh, w_ih, b_ih, b_hh, weights.w_hr))
    masks = StepMasks(*(None if t is None else t.contiguous() for t in masks))
    args = (x.contiguous(), _contiguous(w_ih), _contiguous(b_ih), _contiguous(b_hh), h0.contiguous(),
            c0.contiguous(), weights.w_hh.contiguous(), _contiguous(weights.w_hr),
            RecurrenceCall(chosen, layout, projection is not None, need_grad, masks))
    recurrence = _with_function if need_grad else _forward_without_grad
    return _call_outside_graph(recurrence, *args) if torch.compiler.is_compiling() else recurrence(*args)


def _masked_backend(x, state, weights, layout, backend):
    """The backend of a masked call: the chosen one when its loops take masks, else the reference."""
    h0 = state.h
    packed = layout.batch_sizes is not None
    T, B = (len(layout.batch_sizes), h0.shape[0]) if packed else x.shape[:2]
    sizes = LayerSizes(T, B, weights.w_hh.shape[0] // 4, h0.shape[-1], packed, layout.reverse)
    chosen = select_backend(backend, x.device, x.dtype, sizes)
    return chosen if chosen.supports_masks else get_backend("reference")


def _contiguous(t):
    return None if t is None else t.contiguous()


def _cast(bundle, dtype):
    """A tensor, or a tuple of tensors and Nones (keeping its NamedTuple type), in dtype."""
    if bundle is None or isinstance(bundle, torch.Tensor):
        return bundle if bundle is None else bundle.to(dtype)
    values = (None if t is None else t.to(dtype) for t in bundle)
    return type(bundle)(*values) if hasattr(bundle, "_fields") else tuple(values)


def check_state(x, state, check_dtype: bool):
    """The initial state on x's device and, unless autocast will cast it, in x's dtype
    (nn.LSTM leaves this to its kernels; the same kind of clear error, up front)."""
    for name, t in zip(("hx", "cx"), state):
        if t.device != x.device:
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at "
                               f"{x.device} and hidden tensor at {t.device}")
        if check_dtype and t.dtype != x.dtype:
            raise RuntimeError(f"lstm_fast: {name} dtype ({t.dtype}) does not match input dtype ({x.dtype})")


def _check_call(x, projection, state, weights, layout):
    """The rules every backend shares, checked once here so that all answer alike."""
    if layout.batch_sizes is not None:
        _check_packed(x, state.h, layout.batch_sizes)
    dtype, (h0, c0) = x.dtype, state
    # one cheap test for the usual call; the messages come from the slow path
    if h0.dtype != dtype or c0.dtype != dtype or h0.device != x.device or c0.device != x.device:
        check_state(x, state, check_dtype=True)
    w_ih, b_ih, b_hh = projection if projection is not None else (None, None, None)
    w_hh, w_hr = weights
    if w_hh.dtype != dtype or (w_ih is not None and w_ih.dtype != dtype) or (b_ih is not None and b_ih.dtype != dtype) \
            or (b_hh is not None and b_hh.dtype != dtype) or (w_hr is not None and w_hr.dtype != dtype):
        for name, w in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh),
                        ("weight_hr", w_hr)):
            # torch.nn.LSTM fails on such a mix too (inside oneDNN or cuBLAS); no backend may
            # silently compute it in another precision
            if w is not None and w.dtype != dtype:
                raise RuntimeError(f"lstm_fast: {name} dtype ({w.dtype}) does not match input dtype ({dtype})")


def _check_packed(x, h0, batch_sizes):
    """batch_sizes describes x as PackedSequence's data (backends/base.py)."""
    if not isinstance(batch_sizes, torch.Tensor) or batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 \
            or batch_sizes.device.type != "cpu":
        raise ValueError("lstm_fast: batch_sizes must be a 1-D int64 CPU tensor (PackedSequence.batch_sizes)")
    if x.dim() != 2:
        raise ValueError(f"lstm_fast: with batch_sizes the input is packed, [N, features], got {x.dim()}-D")
    if len(batch_sizes) and (bool((batch_sizes[1:] > batch_sizes[:-1]).any()) or int(batch_sizes[-1]) < 1
                             or int(batch_sizes[0]) > h0.shape[0]):
        raise ValueError(f"lstm_fast: batch_sizes must be non-increasing, each in [1, B={h0.shape[0]}]")
    if int(batch_sizes.sum()) != x.shape[0]:
        raise ValueError(f"lstm_fast: the packed input has {x.shape[0]} rows but batch_sizes sum to "
                         f"{int(batch_sizes.sum())}")


def _check_shapes(x, projection, state, weights, packed=False):
    """Sizes that agree: kernels that index raw memory (numba) must never see others.
    Run by the functional entries; the modules check their input like torch.nn's and
    own weights of the right shapes, and a step of LSTMCell should not pay it twice."""
    (h0, c0), (w_hh, w_hr) = state, weights
    G = w_hh.shape[0] if w_hh.dim() == 2 else -1
    dims = 2 if packed else 3  # packed: PackedSequence's data [N, features], B rows of h0
    B = -1 if x.dim() != dims else h0.shape[0] if packed else x.shape[1]
    H, P = G // 4, h0.shape[-1]
    # x's features are w_ih's columns; gx's are the 4H gate columns
    features = G if projection is None else projection[0].shape[-1]
    if (x.dim() != dims or G % 4 or x.shape[-1] != features or h0.shape != (B, P) or c0.shape != (B, H)
            or w_hh.shape != (G, P) or (w_hr is None and P != H) or (w_hr is not None and w_hr.shape != (P, H))):
        raise RuntimeError(_shape_message(x, projection, state, weights))
    if projection is not None:
        w_ih, b_ih, b_hh = projection
        if w_ih.dim() != 2 or w_ih.shape[0] != G or any(b is not None and b.shape != (G,) for b in (b_ih, b_hh)):
            raise RuntimeError(_shape_message(x, projection, state, weights))


def _shape_message(x, projection, state, weights):
    names = ("x" if projection is not None else "gx", "h0", "c0", "w_hh", "w_hr", "w_ih", "b_ih", "b_hh")
    tensors = (x, *state, *weights, *(projection or (None, None, None)))
    shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, tensors) if t is not None)
    return ("lstm_fast: inconsistent shapes; expected x [T, B, I] (or gx [T, B, 4H]), h0 [B, P], c0 [B, H], "
            f"w_hh [4H, P], w_hr [P, H] (when P != H), w_ih [4H, I], biases [4H]; got {shapes}")


def lstm_recurrence(gx, h0, c0, w_hh, w_hr=None, *, batch_sizes=None, reverse=False, backend=None):
    """Run the recurrent part of one layer-direction on precomputed gx = x @ W_ih^T + b.

    gx [T, B, 4H], h0 [B, P], c0 [B, H], w_hh [4H, P], w_hr [P, H] or None.
    Returns y [T, B, P], h_n [B, P], c_n [B, H]. With batch_sizes (a PackedSequence's),
    gx is its packed data [N, 4H] and y comes packed alike, [N, P]; reverse runs each
    sequence from its own last step.
    """
    state, weights = LSTMState(h0, c0), RecurrentWeights(w_hh, w_hr)
    if batch_sizes is not None:
        _check_packed(gx, h0, batch_sizes)  # the layout's own message before the shapes'
    _check_shapes(gx, None, state, weights, packed=batch_sizes is not None)
    return _run(gx, None, state, weights, SequenceLayout(batch_sizes, reverse), backend)


def lstm_projected(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *, batch_sizes=None, reverse=False,
                   backend=None, masks=None):
    """One layer-direction on its time-major input x [T, B, I]: the backend computes the
    input projection (one GEMM for all steps, or fused into its own launch).
    Returns y [T, B, P], h_n [B, P], c_n [B, H]. With batch_sizes, x and y are packed
    ([N, I], [N, P]) as in lstm_recurrence. masks: the regularisers' StepMasks (backends/base.py)."""
    return _run(x, (w_ih, b_ih, b_hh), LSTMState(h0, c0), RecurrentWeights(w_hh, w_hr),
                SequenceLayout(batch_sizes, reverse), backend, masks)


def lstm_projected_states(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *, batch_sizes=None,
                          reverse=False, backend=None, masks=None):
    """lstm_projected's forward, without gradients, keeping what the backend saves per step:
    returns y, h_n, c_n, gates (activated i, f, g, o [T, B, 4H]) and cells (c_t [T, B, H]),
    the last two in the accumulation dtype ([N, *] each when packed)."""
    with torch.no_grad():
        projection, state = (w_ih, b_ih, b_hh), LSTMState(h0, c0)
        weights, layout = RecurrentWeights(w_hh, w_hr), SequenceLayout(batch_sizes, reverse)
        _check_call(x, projection, state, weights, layout)
        chosen = _masked_backend(x, state, weights, layout, backend) if masks is not None else \
            select_backend(backend, x.device, x.dtype, LayerSizes(
                len(batch_sizes) if batch_sizes is not None else x.shape[0], h0.shape[0], w_hh.shape[0] // 4,
                h0.shape[-1], batch_sizes is not None, reverse))
        dtype = x.dtype
        if chosen.widens_16bit and dtype in HALF_DTYPES:
            x, projection, state, weights, masks = (_cast(t, torch.float32) for t in
                                                     (x, projection, state, weights, masks))
        extra = {} if masks is None else {"masks": StepMasks(*(_cast(t, x.dtype) for t in masks))}
        y, h_n, c_n, saved = chosen.forward_projected(x.contiguous(), InputProjection(w_ih=projection[0].contiguous(),
                                                      bias=_bias(projection[1], projection[2])), state, weights,
                                                      layout, True, **extra)
        gates, cells = chosen.activations(saved, layout)
        return y.to(dtype), h_n.to(dtype), c_n.to(dtype), gates, cells


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
    _check_shapes(x, (w_ih, b_ih, b_hh), LSTMState(h0, c0), RecurrentWeights(w_hh, w_hr))
    y, h_n, c_n = lstm_projected(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse=reverse, backend=backend)
    if batch_first:
        y = y.transpose(0, 1)
    return y, (h_n, c_n)
