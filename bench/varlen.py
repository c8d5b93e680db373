"""Variable-length inputs of the benchmark (Shape.varlen): how each runner is called.

The lengths are uniform in [T // 10, T] from a fixed seed, so every runner, dtype and
mode sees the same batch; "padded" runs the full [T, B, I] (the work a user pays
without packing), "packed" a PackedSequence built outside the timed call (as a data
loader would), "lengths" the padded input with its lengths: torch.nn.LSTM through the
pack / unpack boilerplate, lstm_fast through forward(..., lengths=).
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def lengths_of(shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(max(1, shape.T // 10), shape.T + 1, (shape.B,), generator=g)


def real_share(shape) -> float:
    """Real tokens over padded ones (1 for dense and padded calls)."""
    if shape.varlen in ("", "padded"):
        return 1.0
    return float(lengths_of(shape).sum()) / (shape.T * shape.B)


def module_input(shape, x):
    """(what the timed call receives, the leaf whose gradient training fills): x itself,
    or its PackedSequence, built once, whose data is a leaf of its own."""
    if shape.varlen == "packed":
        packed = pack_padded_sequence(x.detach(), lengths_of(shape), enforce_sorted=False)
        data = packed.data.requires_grad_(x.requires_grad)
        return packed._replace(data=data), data
    return x, x


def call(shape, module, inp, is_torch: bool):
    """The output tensor of one module call on inp (module_input's), as a user makes it."""
    if shape.varlen == "packed":
        return module(inp)[0].data
    if shape.varlen == "lengths":
        lengths = lengths_of(shape)
        if not is_torch:
            return module(inp, lengths=lengths)[0]
        out, _ = module(pack_padded_sequence(inp, lengths, enforce_sorted=False))
        return pad_packed_sequence(out, total_length=shape.T)[0]
    return module(inp)[0]


def output_rows(shape) -> tuple:
    """Leading sizes of the output: [N] packed, else [T, B]."""
    if shape.varlen == "packed":
        return (int(lengths_of(shape).sum()),)
    return (shape.T, shape.B)
