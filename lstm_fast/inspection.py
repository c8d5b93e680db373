"""lstm_fast.inspect: every step's states and gates of an LSTM, from its fused forward.

Each layer-direction runs once on its backend, saving what training saves (the
activated gates and the cell state per token); those tensors are handed back in
the input's layout instead of being kept for a backward pass.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .function import lstm_projected_states


class StepStates(NamedTuple):
    """One layer-direction at every step: h [.., P] (the output, after any projection),
    c [.., H] and the activated gates i, f, g, o [.., H] each. The leading dims are the
    input's: [T, B] (or [B, T] with batch_first; [T] for unbatched input)."""
    h: torch.Tensor
    c: torch.Tensor
    i: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    o: torch.Tensor


class Inspection(NamedTuple):
    """output and hidden as the module's forward returns them (output padded for packed or
    lengths= input), and states[layer * num_directions + direction] (h_n's order)."""
    output: torch.Tensor
    hidden: tuple[torch.Tensor, torch.Tensor]
    states: list[StepStates]


def inspect(module: nn.LSTM, input, hx=None, *, lengths=None) -> Inspection:
    """Run module (an lstm_fast.LSTM, or a torch.nn.LSTM, whose weights are used as they
    are) on input as forward would, without gradients, and return every step's h, c and
    gates for every layer and direction (Inspection). Packed input and lengths= give
    padded tensors, zeros past each sequence's length, in the batch's own order.
    Regularisers act as in forward (in training mode their masks are drawn)."""
    from .nn import LSTM, _checked_lengths

    if not isinstance(module, nn.LSTM):
        raise TypeError(f"lstm_fast.inspect takes an lstm_fast.LSTM or torch.nn.LSTM, got {type(module).__name__}")
    if not isinstance(module, LSTM):
        module = LSTM.from_torch(module)
    bf = module.batch_first
    if lengths is not None:
        if isinstance(input, PackedSequence) or not isinstance(input, torch.Tensor) or input.dim() != 3:
            raise ValueError("lengths= needs batched 3-D padded input")
        T, B = (input.shape[1], input.shape[0]) if bf else input.shape[:2]
        lengths = _checked_lengths(lengths, B, T)
        input = pack_padded_sequence(input, lengths, batch_first=bf, enforce_sorted=False)
        total = T
    else:
        total = len(input.batch_sizes) if isinstance(input, PackedSequence) else None
    packed = isinstance(input, PackedSequence)
    unbatched = not packed and isinstance(input, torch.Tensor) and input.dim() == 2
    records = []

    def run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *, batch_sizes, reverse, backend, masks=None):
        y, h_n, c_n, gates, cells = lstm_projected_states(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                          batch_sizes=batch_sizes, reverse=reverse,
                                                          backend=backend, masks=masks)
        records.append((y, cells.to(y.dtype), *gates.to(y.dtype).chunk(4, -1)))
        return y, h_n, c_n

    with torch.no_grad():
        output, hidden = module._forward(input, hx, run_layer=run_layer)

    def shaped(t):
        if packed:
            p = PackedSequence(t, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
            return pad_packed_sequence(p, batch_first=bf, total_length=total)[0]
        t = t.transpose(0, 1) if bf else t
        return t.squeeze(0 if bf else 1) if unbatched else t

    states = [StepStates(*(shaped(t) for t in record)) for record in records]
    return Inspection(shaped(output.data) if packed else output, hidden, states)
