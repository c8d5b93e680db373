"""Streaming inference: a model fed one time step at a time, its state carried.

    stream = lstm_fast.Stream(lstm, batch_size=1)   # lstm_fast.LSTM or LSTMCell
    for x_t in samples:                              # x_t [B, input_size]
        h_t = stream.step(x_t)                       # [B, hidden_size], the last layer's
    out = torch.empty(1, hidden); stream.step(x_t, out=out)   # no allocation at all

On the cpp backend (CPU, float32/float64, one direction, no projection) each layer's
step is one op writing into state buffers the stream owns (two sets, swapped every
step), so a step allocates nothing but its returned output, and nothing with out=.
Elsewhere the stream calls the module per step with the carried state (same results,
the module's own cost). Inference only: no graph is recorded; a model with dropout
between layers belongs in eval mode (the direct path never applies it).
"""
from __future__ import annotations

import torch

from . import _fast
from .nn import LSTM, LSTMCell


class Stream:
    """One step at a time through an lstm_fast.LSTM or LSTMCell, state carried.

    The parameters are read when the stream is made and on reset(): updates made in
    place (an optimizer step, load_state_dict) are seen; a replaced parameter or a
    module moved to another device or dtype needs reset().
    """

    def __init__(self, module: LSTM | LSTMCell, batch_size: int = 1, state=None):
        if not isinstance(module, (LSTM, LSTMCell)):
            raise TypeError(f"Stream takes an lstm_fast.LSTM or LSTMCell, got {type(module).__name__}")
        self.module, self.batch_size = module, int(batch_size)
        self.reset(state)

    def reset(self, state=None):
        """Start over from zeros, or from state = (h, c), each [layers, B, H] ([B, H] for a cell)."""
        m, cell = self.module, isinstance(self.module, LSTMCell)
        w = m.weight_ih if cell else m.weight_ih_l0
        layers = 1 if cell else m.num_layers
        shape = (layers, self.batch_size, m.hidden_size)
        if cell:
            self._layers = [(m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)]
            direct = True
        else:
            self._layers = [m._layer_weights(k, 0)[:4] for k in range(layers)]
            direct = not m.bidirectional and m.proj_size == 0
        # masks (zoneout, training-mode dropouts) run on the module's own path
        plain = not m._regularised() and not (m.training and getattr(m, "dropout", 0))
        self._direct = direct and plain and _fast.cpp_serves(m.backend, w, m.hidden_size)
        with torch.no_grad():
            self._h = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(2)]
            self._c = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(2)]
            if state is not None:
                h, c = state
                self._h[0].copy_(h.reshape(shape))
                self._c[0].copy_(c.reshape(shape))
        # per layer views of both buffer sets, made once
        self._hv = [list(t.unbind(0)) for t in self._h]
        self._cv = [list(t.unbind(0)) for t in self._c]
        self._cur = 0

    @property
    def state(self):
        """(h, c) now, [layers, B, H] ([B, H] for a cell): copies."""
        h, c = self._h[self._cur].clone(), self._c[self._cur].clone()
        return (h[0], c[0]) if isinstance(self.module, LSTMCell) else (h, c)

    @torch.no_grad()
    def step(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, input_size] -> the last layer's h [B, hidden_size]: a new tensor, or out."""
        cur, nxt = self._cur, 1 - self._cur
        if self._direct:
            op = torch.ops.lstm_fast.lstm_cell_out.default
            hv, cv, hn, cn = self._hv[cur], self._cv[cur], self._hv[nxt], self._cv[nxt]
            for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(self._layers):
                op(x, hv[k], cv[k], w_ih, w_hh, b_ih, b_hh, hn[k], cn[k])
                x = hn[k]
        else:
            self._step_module(x, cur, nxt)
        self._cur = nxt
        h = self._hv[nxt][-1]
        return h.clone() if out is None else out.copy_(h)

    def _step_module(self, x, cur, nxt):
        m = self.module
        if isinstance(m, LSTMCell):
            h, c = m(x, (self._hv[cur][0], self._cv[cur][0]))
            self._h[nxt][0].copy_(h)
            self._c[nxt][0].copy_(c)
            return
        _, (h, c) = m(x.unsqueeze(1 if m.batch_first else 0), (self._h[cur], self._c[cur]))
        self._h[nxt].copy_(h)
        self._c[nxt].copy_(c)
