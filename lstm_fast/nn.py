"""nn.LSTM / nn.LSTMCell drop-ins whose recurrence runs on lstm_fast backends.

The modules subclass torch's own, so parameters, their names, shapes,
initialisation, state_dict, repr and isinstance checks are nn.LSTM's exactly;
only forward changes.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _ops
from ._fast import FastChoice, backend_step, cpp_serves, cpu_backend, lstm_call, watched
from .backends import BACKEND_NAMES
from .backends.base import PackedRows, StepMasks, graph_recorder
from .function import check_state, lstm_projected, outside_graph


def _check_backend_name(backend):
    if backend is not None and backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown lstm_fast backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)} or 'auto'")


def _probability(name, p):
    """p as a float in [0, 1), or ValueError (as nn.LSTM's dropout check)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(p) or not 0 <= p < 1:
        raise ValueError(f"{name} should be a number in range [0, 1) representing a probability, got {p!r}")
    return float(p)


def _zoneout_pair(zoneout):
    """zoneout=p or (p_c, p_h) as the pair (p_c, p_h)."""
    if isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout should be a probability or a pair (p_c, p_h), got {zoneout!r}")
        return _probability("zoneout p_c", zoneout[0]), _probability("zoneout p_h", zoneout[1])
    p = _probability("zoneout", zoneout)
    return p, p


def _zone_mask(p, shape, like, training):
    """Per-step zoneout weights of c_{t-1} (or h_{t-1}): Bernoulli(p) in training, the
    expectation p in eval (the convention of haste's zoneout); None when p is 0."""
    if not p:
        return None
    if training:
        return _bernoulli(p, shape, like)
    return torch.full(shape, p, dtype=like.dtype, device=like.device)


def _bernoulli(p, shape, like):
    """Bernoulli(p) draws as 0/1 in like's dtype and device, repeatable under torch.manual_seed:
    on CPU the extension's counter-based fill, seeded from torch's generator, draws in parallel
    (torch's bernoulli_ is serial; bench/NOTES_cpp.md#zoneout-masks)."""
    if like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64) \
            and not torch.compiler.is_compiling() and _ops.loaded():
        seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64))
        return torch.ops.lstm_fast.bernoulli_mask(like, list(shape), float(p), seed)
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(p)


class _FastOptions:
    """backend=, forget_bias= and the recurrent regularisers, shared by LSTM and LSTMCell
    (mixed in before torch's class)."""

    def __init__(self, *args, backend: str | None = None, forget_bias: float = 0.0, recurrent_dropout: float = 0.0,
                 zoneout: float | tuple[float, float] = 0.0, weight_drop: float = 0.0, **kwargs):
        _check_backend_name(backend)
        self.backend = backend
        self.forget_bias = float(forget_bias)
        self.recurrent_dropout = _probability("recurrent_dropout", recurrent_dropout)
        self.zoneout = _zoneout_pair(zoneout)
        self.weight_drop = _probability("weight_drop", weight_drop)
        super().__init__(*args, **kwargs)

    def _regularised(self) -> bool:
        """Whether a call draws masks: zoneout always (its eval form is the expectation),
        the dropouts in training."""
        return any(self.zoneout) or (self.training and (self.recurrent_dropout > 0 or self.weight_drop > 0))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not getattr(self, "forget_bias", 0.0):
            return
        if not self.bias:
            raise ValueError("forget_bias needs bias=True")
        H = self.hidden_size
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("bias_ih"):
                    p[H:2 * H] += self.forget_bias


def _regulariser_repr(module):
    s = f", recurrent_dropout={module.recurrent_dropout}" if module.recurrent_dropout else ""
    if any(module.zoneout):
        p_c, p_h = module.zoneout
        s += f", zoneout={p_c}" if p_c == p_h else f", zoneout=({p_c}, {p_h})"
    return s + (f", weight_drop={module.weight_drop}" if module.weight_drop else "")


def _copy_weights(src, dst):
    """dst's parameters get src's values and requires_grad flags (a frozen weight stays frozen)."""
    dst.load_state_dict(src.state_dict())
    for name, p in src.named_parameters():
        dst.get_parameter(name).requires_grad_(p.requires_grad)


class LSTM(FastChoice, _FastOptions, nn.LSTM):
    """torch.nn.LSTM with fused kernels. Same constructor, plus:

    backend: 'auto' (default: LSTM_FAST_BACKEND or automatic choice) or a name
        from lstm_fast.available_backends(); a named backend that cannot serve
        a call raises instead of falling back.
    forget_bias: added to the forget-gate slice of bias_ih at initialisation.
    recurrent_dropout: p of one Bernoulli mask per sequence and layer-direction on
        h_{t-1} where it enters h_{t-1} @ W_hh^T, scaled by 1/(1-p) (Gal & Ghahramani 2016).
    zoneout: p, or (p_c, p_h): each unit of c and h keeps its previous value with that
        probability at each step (Krueger et al. 2017); in eval the expectation.
    weight_drop: DropConnect on W_hh, one mask per forward call (Merity et al. 2018).
    The three are off by default; the dropouts act in training mode only.
    """

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.backend not in (None, "auto"):
            s += f", backend={self.backend!r}"
        return s + _regulariser_repr(self)

    @classmethod
    def from_torch(cls, module: nn.LSTM, backend: str | None = None) -> LSTM:
        """An lstm_fast.LSTM with the same configuration, device, dtype and weights."""
        p = next(module.parameters())
        new = cls(module.input_size, module.hidden_size, module.num_layers, bias=module.bias,
                  batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                  proj_size=module.proj_size, device=p.device, dtype=p.dtype, backend=backend)
        _copy_weights(module, new)
        new.train(module.training)
        return new

    def to_torch(self) -> nn.LSTM:
        _refuse_zoneout(self, "to_torch()")
        p = next(self.parameters())
        new = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                      batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
                      proj_size=self.proj_size, device=p.device, dtype=p.dtype)
        _copy_weights(self, new)
        new.train(self.training)
        return new

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in this module's place (the Python forward is not
        TorchScript): the same parameters, a forward calling the registered op."""
        from .scripting import ScriptableLSTM
        _refuse_zoneout(self, "torch.jit.script")
        return ScriptableLSTM(self)

    def _layer_weights(self, layer, direction):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")

        def get(name):
            return getattr(self, name + suffix)

        b_ih = get("bias_ih") if self.bias else None
        b_hh = get("bias_hh") if self.bias else None
        w_hr = get("weight_hr") if self.proj_size > 0 else None
        return get("weight_ih"), get("weight_hh"), b_ih, b_hh, w_hr

    def forward(self, input, hx=None, lengths=None):
        """nn.LSTM's forward, plus lengths=: for a padded batch input, each sequence's
        length (a 1-D integer tensor or sequence, B values in [1, T], any order). The call
        then computes only each sequence's real steps, exactly as packing the batch with
        enforce_sorted=False would, and returns padded output (zeros past each length)
        and the final states at each length."""
        if lengths is not None:
            return self._forward_lengths(input, hx, lengths)
        if not watched():  # first: traced code must not see (or set) the cached choice
            short = self._short if self._short is not None else self._decide_short()
            out = lstm_call(self, short, input, hx) if short else None
            if out is not None:
                return out
        if graph_recorder() is not None and _exporting_to_onnx():
            _refuse_zoneout(self, "ONNX export")
            return self._onnx_forward(input, hx)
        if torch.compiler.is_compiling():  # traced (torch._dynamo.config.allow_rnn = True)
            return self._forward(input, hx)
        # torch.compile declines nn.LSTM and its subclasses by default and runs them
        # eagerly, as it does torch's own LSTM; without this it would still compile each
        # function the forward calls, separately and for every new shape.
        return _forward_outside_graph(self, input, hx)

    def _decide_short(self):
        """Whether calls may take the short path (lstm_fast/_fast.py): one direction, no
        projection, no dropout or regulariser to apply, the cpp backend. Kept until
        FastChoice forgets it (train/eval and option changes are attribute sets)."""
        ok = (not self.bidirectional and self.proj_size == 0 and not (self.dropout and self.training)
              and not self._regularised()  # masks run on the full path
              and all(n in self._parameters for n in self._flat_weights_names)
              and cpp_serves(self.backend, self.weight_ih_l0, self.hidden_size))
        short = [self._layer_weights(k, 0)[:4] for k in range(self.num_layers)] if ok else False
        self.__dict__["_short"] = short
        return short

    def _forward_lengths(self, input, hx, lengths):
        if isinstance(input, PackedSequence):
            raise ValueError("lengths= is for padded input; a PackedSequence already holds its lengths")
        if not isinstance(input, torch.Tensor) or input.dim() != 3:
            raise ValueError(f"lengths= needs batched 3-D input, got "
                             f"{input.dim() if isinstance(input, torch.Tensor) else type(input).__name__}"
                             f"{'D' if isinstance(input, torch.Tensor) else ''} input")
        T, B = (input.shape[1], input.shape[0]) if self.batch_first else input.shape[:2]
        lengths = _checked_lengths(lengths, B, T)
        # The real tokens are gathered once into PackedSequence's layout (every backend
        # then reads one dense [N, I] block) and the output scattered back: one
        # index_select and one index_copy, whose gradients are the same two ops. (torch's
        # pack_padded_sequence / pad_packed_sequence cost 2.2 ms more per inference call and
        # 14.6 ms per training step at T=100, B=32, I=H=256: bench/NOTES_varlen.md.)
        sorted_lengths, sorted_indices = torch.sort(lengths, descending=True, stable=True)
        batch_sizes = (sorted_lengths.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)
        batch_sizes = batch_sizes[:int(sorted_lengths[0])]
        t, j = PackedRows(batch_sizes, False).token_steps()  # j: the row in sorted order
        b = sorted_indices[j]
        index = (b * T + t if self.batch_first else t * B + b).to(input.device)
        data = input.reshape(T * B, input.shape[-1]).index_select(0, index)
        sorted_indices = sorted_indices.to(input.device)
        unsorted_indices = torch.empty_like(sorted_indices)
        unsorted_indices[sorted_indices] = torch.arange(B, device=input.device)
        out, hidden = self.forward(PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices), hx)
        padded = out.data.new_zeros(T * B, out.data.shape[-1]).index_copy(0, index, out.data)
        return padded.view(B, T, -1) if self.batch_first else padded.view(T, B, -1), hidden

    def _onnx_forward(self, input, hx):
        """What torch.onnx.export records: torch's own LSTM computation on the same
        parameters, which both exporters write as standard ONNX operators. The
        TorchScript-based exporter has no LSTM node with a projection, so there
        each projected layer-direction is a loop of matmuls and gate math."""
        if self.proj_size == 0:
            return nn.LSTM.forward(self, input, hx)
        if isinstance(input, PackedSequence):
            raise ValueError("lstm_fast: ONNX export of PackedSequence input with proj_size > 0 is not supported "
                             "(ONNX's LSTM has no projection); pass padded input")
        return self._forward(input, hx, run_layer=_onnx_projected_layer)

    def _forward(self, input, hx=None, run_layer=lstm_projected):
        orig_input = input
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch_sizes = None
        is_batched = True
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(batch_dim)
            sorted_indices = unsorted_indices = None

        if hx is None:
            def zeros(size):
                return torch.zeros(self.num_layers * num_directions, max_batch_size, size, dtype=input.dtype,
                                   device=input.device)

            hx = (zeros(real_hidden_size), zeros(self.hidden_size))
        else:
            # nn.LSTM skips this check for packed input and fails inside its kernels;
            # packed input is batched, so it gets the batched message here.
            want = 3 if is_batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if isinstance(hx, (tuple, list)) and len(hx) != 2:
                raise RuntimeError("lstm expects two hidden states")
            if not is_batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if batch_sizes is not None:
            # nn.LSTM's order for packed input: permute to sorted order, then check
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)
        _check_state_placement(input, hx)
        if batch_sizes is None:
            hx = self.permute_hidden(hx, sorted_indices)

        if batch_sizes is not None:
            x = input  # the packed data [N, I]: the backends step through it in place
        else:
            x = input.transpose(0, 1) if self.batch_first else input
            if x.shape[0] == 0:  # nn.LSTM's kernels refuse it with this message
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        h_n, c_n = [], []
        regularised = self._regularised()
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_weights(layer, direction)
                k = layer * num_directions + direction
                extra = {}
                if regularised:
                    w_hh, extra["masks"] = self._regularise(x, w_hh, batch_sizes, max_batch_size, real_hidden_size)
                y, h, c = run_layer(x, hx[0][k], hx[1][k], w_ih, w_hh, b_ih, b_hh, w_hr,
                                    batch_sizes=batch_sizes, reverse=direction == 1, backend=self.backend, **extra)
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if num_directions == 1 else torch.cat(outputs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = torch.nn.functional.dropout(x, self.dropout, training=True)
        hidden = (torch.stack(h_n), torch.stack(c_n))

        if batch_sizes is not None:
            return PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        output = x.transpose(0, 1) if self.batch_first else x
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden


    def _regularise(self, x, w_hh, batch_sizes, B, P):
        """(W_hh after weight_drop, StepMasks or None) for one layer-direction, drawn from
        torch's generator: x [T, B, *] (packed [N, *]) gives the per-step shapes."""
        if self.training and self.weight_drop > 0:
            w_hh = torch.nn.functional.dropout(w_hh, self.weight_drop, training=True)
        rec = None
        if self.training and self.recurrent_dropout > 0:
            keep = 1 - self.recurrent_dropout
            rec = torch.empty(B, P, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)
        rows = tuple(x.shape[:1] if batch_sizes is not None else x.shape[:2])
        p_c, p_h = self.zoneout
        masks = StepMasks(rec, _zone_mask(p_c, (*rows, self.hidden_size), x, self.training),
                          _zone_mask(p_h, (*rows, P), x, self.training))
        return w_hh, masks if masks.any() else None


def _refuse_zoneout(module, what):
    # zoneout changes the eval-mode computation too, which torch's LSTM and the scripted
    # or exported forms do not have
    if any(module.zoneout):
        raise ValueError(f"lstm_fast: {what} is not available for a module with zoneout (it changes the "
                         f"eval-mode computation as well)")


@outside_graph
def _forward_outside_graph(module, input, hx):
    return module._forward(input, hx)


def _checked_lengths(lengths, B, T):
    """lengths= as a CPU int64 tensor [B], or ValueError naming what is wrong with it."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be integers, got a tensor of dtype {lengths.dtype}")
        lengths = lengths.to("cpu", torch.int64)
    else:
        values = list(lengths)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"lengths must be integers, got {[type(v).__name__ for v in values][:4]}")
        lengths = torch.tensor(values, dtype=torch.int64)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (one length per sequence), got shape {tuple(lengths.shape)}")
    if lengths.numel() != B:
        raise ValueError(f"lengths has {lengths.numel()} values for a batch of {B} sequences")
    if B and int(lengths.min()) < 1:
        raise ValueError(f"every length must be at least 1, got {int(lengths.min())}")
    if B and int(lengths.max()) > T:
        raise ValueError(f"a length ({int(lengths.max())}) exceeds the sequence length of the input ({T})")
    return lengths


def _exporting_to_onnx() -> bool:
    """Whether torch.onnx.export (either exporter) is recording this call. Marked as
    dynamo's assume_constant_result (see backends._probe): traced, it is a constant."""
    return torch.onnx.is_in_onnx_export()


_exporting_to_onnx._dynamo_marked_constant = True
_projected_step_loop = None


def _onnx_projected_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes=None, reverse=False, backend=None):
    """One projected layer-direction as plain torch ops for the TorchScript-based ONNX
    exporter: the time loop is scripted, so it is written as an ONNX Loop over the
    actual sequence length (a traced Python loop would fix T)."""
    global _projected_step_loop
    steps = _projected_steps  # the dynamo exporter traces the Python loop (its T is fixed)
    if torch.jit.is_tracing():
        if _projected_step_loop is None:  # scripted on first use: compiling it costs time at import
            _projected_step_loop = torch.jit.script(_projected_steps)
        steps = _projected_step_loop
    gx = torch.nn.functional.linear(x, w_ih, b_ih)
    if b_hh is not None:
        gx = gx + b_hh
    if reverse:  # run forward over the time-reversed input, then reverse the output back
        backwards = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
        gx = gx.index_select(0, backwards)
    y, h, c = steps(gx, h0, c0, w_hh, w_hr)
    if reverse:
        y = y.index_select(0, backwards)
    return y, h, c


def _projected_steps(gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor, w_hr: torch.Tensor):
    ys = []
    for t in range(gx.shape[0]):
        i, f, g, o = (gx[t] + torch.mm(h, w_hh.t())).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.mm(torch.sigmoid(o) * torch.tanh(c), w_hr.t())
        ys.append(h)
    return torch.stack(ys), h, c


def _check_state_placement(input, hx):
    check_state(input, hx, check_dtype=not torch.is_autocast_enabled(input.device.type))


class LSTMCell(FastChoice, _FastOptions, nn.LSTMCell):
    """torch.nn.LSTMCell with the fused step; same constructor plus backend=, forget_bias=
    and zoneout= (as LSTM's; recurrent_dropout and weight_drop hold a mask for a whole
    sequence, which a one-step cell does not see: use LSTM for them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.recurrent_dropout or self.weight_drop:
            raise ValueError("LSTMCell takes zoneout only: recurrent_dropout and weight_drop draw one mask per "
                             "sequence, which a one-step cell cannot see (use lstm_fast.LSTM)")

    def extra_repr(self) -> str:
        return super().extra_repr() + _regulariser_repr(self)

    @classmethod
    def from_torch(cls, module: nn.LSTMCell, backend: str | None = None) -> LSTMCell:
        p = module.weight_ih
        new = cls(module.input_size, module.hidden_size, bias=module.bias, device=p.device, dtype=p.dtype,
                  backend=backend)
        _copy_weights(module, new)
        return new

    def to_torch(self) -> nn.LSTMCell:
        _refuse_zoneout(self, "to_torch()")
        p = self.weight_ih
        new = nn.LSTMCell(self.input_size, self.hidden_size, bias=self.bias, device=p.device, dtype=p.dtype)
        _copy_weights(self, new)
        return new

    def __prepare_scriptable__(self):
        from .scripting import ScriptableLSTMCell
        _refuse_zoneout(self, "torch.jit.script")
        return ScriptableLSTMCell(self)

    def _decide_short(self):
        """(step op, w_ih, w_hh, b_ih, b_hh) when calls may take the short path
        (lstm_fast/_fast.py), else False. Kept until FastChoice forgets it."""
        p = self._parameters
        short = False
        if "weight_ih" in p and "weight_hh" in p and not any(self.zoneout):  # zoneout's masks: the full path
            if cpp_serves(self.backend, p["weight_ih"], self.hidden_size):
                short = (torch.ops.lstm_fast.lstm_cell.default, p["weight_ih"], p["weight_hh"], p.get("bias_ih"),
                         p.get("bias_hh"))
            else:
                chosen = cpu_backend(self.backend, p["weight_ih"], self.hidden_size)
                # other CPU backends (numba) skip the per-call choice and checks at least
                short = (None, chosen) if chosen is not None else False
        self.__dict__["_short"] = short
        return short

    def forward(self, input, hx=None):
        if type(hx) is tuple and len(hx) == 2 and not watched():  # traced code must not see the cached choice
            short = self._short if self._short is not None else self._decide_short()
            if short and short[0] is not None:
                step, w_ih, w_hh, b_ih, b_hh = short
                try:
                    return step(input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)
                except RuntimeError:
                    pass  # something unusual: the checks below say what, in torch.nn's words
            elif short:
                out = backend_step(self, short[1], input, hx[0], hx[1])
                if out is not None:
                    return out
        if graph_recorder() is not None and _exporting_to_onnx():
            _refuse_zoneout(self, "ONNX export")
            return nn.LSTMCell.forward(self, input, hx)  # written as standard ONNX operators
        # A cell stepped in a Python loop pays this method's cost every step: the usual
        # call (2-D input, a (h, c) pair of the right shapes, device and dtype) is
        # recognised with a few cheap tests; anything else takes the full checks.
        usual = type(hx) is tuple and len(hx) == 2 and input.dim() == 2
        if usual:
            h, c = hx
            size = (input.shape[0], self.hidden_size)
            usual = (input.shape[1] == self.input_size and h.shape == size and c.shape == size
                     and h.device == input.device and c.device == input.device
                     and h.dtype == input.dtype and c.dtype == input.dtype)
        is_batched = True
        if not usual:
            input, hx, is_batched = self._checked_args(input, hx)
        masks = None
        if self.zoneout[0] or self.zoneout[1]:  # one step: per-step masks [1, B, H]
            shape = (1, input.shape[0], self.hidden_size)
            masks = StepMasks(None, _zone_mask(self.zoneout[0], shape, input, self.training),
                              _zone_mask(self.zoneout[1], shape, input, self.training))
        _, h, c = lstm_projected(input.unsqueeze(0), hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih,
                                 self.bias_hh, backend=self.backend, masks=masks)
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    def _checked_args(self, input, hx):
        """torch.nn.LSTMCell's checks and messages; returns the batched input [B, I],
        (h, c) [B, H] each, and whether the input was batched."""
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            def zeros():
                return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)

            hx = (zeros(), zeros())  # two tensors: torch.compile refuses one tensor passed twice
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        # torch's lstm_cell op checks these (after the Python checks above)
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not "
                            f"{type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        _check_cell_args(self, input, hx)
        return input, hx, is_batched


def _check_cell_args(cell, input, hx):
    """The checks torch's lstm_cell kernel makes, with its messages."""
    if input.size(1) != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {cell.input_size}")
    for i, state in enumerate(hx):
        if input.size(0) != state.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{i} batch size {state.size(0)}")
        if state.size(1) != cell.hidden_size:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {state.size(1)}, "
                               f"expected {cell.hidden_size}")
    _check_state_placement(input, hx)  # input vs weight dtype: function._run checks it for every caller
