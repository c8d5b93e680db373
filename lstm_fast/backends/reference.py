"""Plain-PyTorch backend: the oracle of the tests and the fallback for every device and dtype.

Written as an explicit time loop with hand-derived backward (BPTT), the same
algorithm the fused backends implement, so it doubles as their specification.
fp16/bf16 are computed in fp32 (gates, cell state, accumulation) and cast on store.
"""
from __future__ import annotations

import torch

from .base import Backend, LayerSizes, RecurrenceGrads, acc_dtype, active_rows, step_order, weight_grads


class ReferenceBackend(Backend):
    name = "reference"
    # traceable stays False: torch.compile would unroll the Python time loop (a graph of
    # T steps, recompiled for every new T)

    def is_available(self):
        return True, "plain PyTorch ops"

    def supports(self, device, dtype, sizes: LayerSizes):
        if not dtype.is_floating_point:
            return False, f"dtype {dtype} is not a floating point type"
        return True, "any device and floating dtype"

    def forward(self, gx, state, weights, layout, need_grad):
        y, h_n, c_n, acts = _steps(gx, state, weights, layout, keep=need_grad)
        return y, h_n, c_n, acts

    @staticmethod
    def forward_differentiable(gx, state, weights, layout):
        """forward() without saving: out-of-place torch ops only, so autograd can
        differentiate it to any order (the recurrence's backward recomputes through it
        for second derivatives). Returns y [T, B, P], h_n [B, P], c_n [B, H]."""
        return _steps(gx, state, weights, layout, keep=False)[:3]

    def backward(self, saved, y, grads, state, weights, layout):
        h0, c0 = state
        w_hh, w_hr = weights
        batch_sizes, reverse = layout
        grad_y, grad_hn, grad_cn = grads
        gates_all, cells = saved
        T, B, G = gates_all.shape
        H = G // 4
        acc = gates_all.dtype
        w_hh_a = w_hh.to(acc)
        w_hr_a = None if w_hr is None else w_hr.to(acc)
        dh = grad_hn.to(acc).clone()
        dc = grad_cn.to(acc).clone()
        c0_a = c0.to(acc)
        d_gates = gates_all.new_zeros(T, B, G)
        d_r_all = gates_all.new_zeros(T, B, dh.shape[1]) if w_hr is not None else None
        order = list(step_order(T, reverse))
        for s in range(T - 1, -1, -1):
            t = order[s]
            n = active_rows(batch_sizes, t, B)
            c_prev = c0_a[:n] if s == 0 else cells[order[s - 1], :n]
            d_r = dh[:n] + grad_y[t, :n].to(acc)
            i, f, g, o = gates_all[t, :n].chunk(4, 1)
            tc = torch.tanh(cells[t, :n])
            if w_hr_a is not None:
                d_r_all[t, :n] = d_r
                d_h = d_r.mm(w_hr_a)
            else:
                d_h = d_r
            d_c = dc[:n] + d_h * o * (1 - tc * tc)
            d_z = torch.cat([
                d_c * g * i * (1 - i),
                d_c * c_prev * f * (1 - f),
                d_c * i * (1 - g * g),
                d_h * tc * o * (1 - o),
            ], 1)
            d_gates[t, :n] = d_z
            dh[:n] = d_z.mm(w_hh_a)
            dc[:n] = d_c * f
        h_pre = None
        if w_hr is not None:
            o = gates_all[..., 3 * H:]
            h_pre = o * torch.tanh(cells)
        d_w_hh, d_w_hr = weight_grads(d_gates, y, h0, reverse, d_r_all, h_pre)
        return RecurrenceGrads(d_gates.to(grad_y.dtype), dh.to(h0.dtype), dc.to(c0.dtype), d_w_hh.to(w_hh.dtype),
                               None if d_w_hr is None else d_w_hr.to(w_hr.dtype))


def _steps(gx, state, weights, layout, keep):
    """The time loop, out of place. Returns y [T, B, P], h_n [B, P], c_n [B, H] and,
    when keep, (gates [T, B, 4H] activated i,f,g,o, cells [T, B, H]) in the
    accumulation dtype, else (). Rows inactive at a step (packed input) keep their
    state and get zeros in y, gates and cells."""
    (h0, c0), (w_hh, w_hr), (batch_sizes, reverse) = state, weights, layout
    T, B, G = gx.shape
    acc = acc_dtype(gx.dtype)
    w_hh_a = w_hh.to(acc)
    w_hr_a = None if w_hr is None else w_hr.to(acc)
    h, c = h0.to(acc), c0.to(acc)
    ys, gates, cells = [None] * T, [None] * T, [None] * T

    def padded(rows):  # rows [n, k] -> [B, k], zeros below
        return torch.cat([rows, rows.new_zeros(B - rows.shape[0], rows.shape[1])])

    for t in step_order(T, reverse):
        n = active_rows(batch_sizes, t, B)
        z = torch.addmm(gx[t, :n].to(acc), h[:n], w_hh_a.t())
        i, f, g, o = z.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c[:n] + i * g
        h_new = o * torch.tanh(c_new)
        if w_hr_a is not None:
            h_new = h_new.mm(w_hr_a.t())
        c = torch.cat([c_new, c[n:]])
        h = torch.cat([h_new, h[n:]])
        ys[t] = padded(h_new).to(gx.dtype)
        if keep:
            gates[t] = padded(torch.cat([i, f, g, o], 1))
            cells[t] = padded(c_new)
    if T == 0:
        H = G // 4
        y = gx.new_zeros(0, B, h0.shape[1])
        acts = (gx.new_zeros(0, B, G, dtype=acc), gx.new_zeros(0, B, H, dtype=acc)) if keep else ()
    else:
        y = torch.stack(ys)
        acts = (torch.stack(gates), torch.stack(cells)) if keep else ()
    return y, h.to(h0.dtype), c.to(c0.dtype), acts
