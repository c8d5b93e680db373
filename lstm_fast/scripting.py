"""TorchScript forms of lstm_fast.LSTM and LSTMCell.

torch.jit.script replaces each module by what its __prepare_scriptable__ returns:
one of these, holding the same Parameter objects under the same names (so
state_dict and optimizers carry over), whose forward calls the registered op
lstm_fast::recurrence_forward once per layer and direction. The op carries its
derivative, so a scripted model trains, and a saved one loads wherever
`import lstm_fast` has registered the op. Input: padded tensors (batched or not);
PackedSequence has no TorchScript form here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .backends import get_backend
from .function import _GRAPH_OP_BACKENDS


def _scripted_backend(module) -> str:
    name = module.backend or "auto"
    if name != "auto" and name not in _GRAPH_OP_BACKENDS:
        get_backend(name)  # an unknown name gets the registry's message
        raise RuntimeError(f"lstm_fast backend '{name}' cannot be scripted (its saved tensors have a layout "
                           f"the recorded op does not describe); choose one of {', '.join(_GRAPH_OP_BACKENDS)}")
    return name


class ScriptableLSTM(nn.Module):
    __constants__ = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                     "proj_size", "backend"]

    def __init__(self, lstm):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = lstm.input_size, lstm.hidden_size, lstm.num_layers
        self.bias, self.batch_first, self.dropout = lstm.bias, lstm.batch_first, float(lstm.dropout)
        self.bidirectional, self.proj_size = lstm.bidirectional, lstm.proj_size
        self.backend = _scripted_backend(lstm)
        self.train(lstm.training)
        for name, p in lstm.named_parameters(recurse=False):
            self.register_parameter(name, p)
        # five per layer-direction: w_ih, w_hh, b_ih, b_hh, w_hr; an empty tensor where absent
        absent = torch.empty(0)
        self.weights: list[Tensor] = []
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
                    self.weights.append(getattr(lstm, name + suffix, absent))

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None  # noqa: UP045 (TorchScript)
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        x = input.transpose(0, 1) if self.batch_first else input
        directions = 2 if self.bidirectional else 1
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = torch.zeros(self.num_layers * directions, x.size(1), state_size, dtype=x.dtype, device=x.device)
            c0 = torch.zeros(self.num_layers * directions, x.size(1), self.hidden_size, dtype=x.dtype,
                             device=x.device)
        else:
            h0, c0 = hx
            if not is_batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        need_grad = torch.is_grad_enabled() and (x.requires_grad or h0.requires_grad or c0.requires_grad
                                                 or any([w.requires_grad for w in self.weights]))
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(self.num_layers):
            outputs: list[Tensor] = []
            for direction in range(directions):
                k = layer * directions + direction
                w = self.weights[5 * k:5 * k + 5]
                out = torch.ops.lstm_fast.recurrence_forward(
                    x.contiguous(), w[0], w[2] if self.bias else None, w[3] if self.bias else None,
                    h0[k].contiguous(), c0[k].contiguous(), w[1], w[4] if self.proj_size > 0 else None, None,
                    direction == 1, self.backend, True, need_grad)
                outputs.append(out[0])
                h_n.append(out[1])
                c_n.append(out[2])
            x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = torch.nn.functional.dropout(x, self.dropout, True)
        h, c = torch.stack(h_n), torch.stack(c_n)
        output = x.transpose(0, 1) if self.batch_first else x
        if not is_batched:
            output = output.squeeze(batch_dim)
            h, c = h.squeeze(1), c.squeeze(1)
        return output, (h, c)


class ScriptableLSTMCell(nn.Module):
    __constants__ = ["input_size", "hidden_size", "bias", "backend"]

    def __init__(self, cell):
        super().__init__()
        self.input_size, self.hidden_size, self.bias = cell.input_size, cell.hidden_size, cell.bias
        self.backend = _scripted_backend(cell)
        for name, p in cell.named_parameters(recurse=False):
            self.register_parameter(name, p)
        if not self.bias:
            self.bias_ih: Optional[Tensor] = None  # noqa: UP045 (TorchScript)
            self.bias_hh: Optional[Tensor] = None  # noqa: UP045

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None  # noqa: UP045 (TorchScript)
                ) -> tuple[Tensor, Tensor]:
        if input.dim() != 1 and input.dim() != 2:
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(-1)} expected {self.input_size}")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            h = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            c = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        else:
            h, c = hx
            if not is_batched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        need_grad = torch.is_grad_enabled() and (input.requires_grad or h.requires_grad or c.requires_grad
                                                 or self.weight_ih.requires_grad or self.weight_hh.requires_grad)
        out = torch.ops.lstm_fast.recurrence_forward(input.unsqueeze(0).contiguous(), self.weight_ih, self.bias_ih,
                                                     self.bias_hh, h.contiguous(), c.contiguous(), self.weight_hh,
                                                     None, None, False, self.backend, True, need_grad)
        h, c = out[1], out[2]
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c
