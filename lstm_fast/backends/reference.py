"""Plain-PyTorch backend: the oracle of the tests and the fallback for every device and dtype.

Written as an explicit time loop with hand-derived backward (BPTT), the same
algorithm the fused backends implement, so it doubles as their specification.
fp16/bf16 are computed in fp32 (gates, cell state, accumulation) and cast on store.
"""
from __future__ import annotations

import torch

from .base import Backend, LayerSizes, PackedRows, RecurrenceGrads, StepMasks, acc_dtype, step_order, weight_grads


class ReferenceBackend(Backend):
    name = "reference"
    supports_masks = True
    # traceable stays False: torch.compile would unroll the Python time loop (a graph of
    # T steps, recompiled for every new T)

    def is_available(self):
        return True, "plain PyTorch ops"

    def supports(self, device, dtype, sizes: LayerSizes):
        if not dtype.is_floating_point:
            return False, f"dtype {dtype} is not a floating point type"
        return True, "any device and floating dtype"

    def forward(self, gx, state, weights, layout, need_grad, masks=None):
        y, h_n, c_n, acts = _steps(gx, state, weights, layout, keep=need_grad, masks=masks)
        return y, h_n, c_n, acts

    @staticmethod
    def forward_differentiable(gx, state, weights, layout, masks=None):
        """forward() without saving: out-of-place torch ops only, so autograd can
        differentiate it to any order (the recurrence's backward recomputes through it
        for second derivatives). Returns y [T, B, P], h_n [B, P], c_n [B, H]."""
        return _steps(gx, state, weights, layout, keep=False, masks=masks)[:3]

    def backward(self, saved, y, grads, state, weights, layout, masks=None):
        h0, c0 = state
        w_hh, w_hr = weights
        batch_sizes, reverse = layout
        grad_y, grad_hn, grad_cn = grads
        gates_all, cells = saved
        rows, T, B = _layout_rows(gates_all.shape, h0.shape[0], batch_sizes)
        G = gates_all.shape[-1]
        H = G // 4
        acc = gates_all.dtype
        g_rows, c_rows, gy_rows = (t.reshape(-1, t.shape[-1]) for t in (gates_all, cells, grad_y))
        w_hh_a = w_hh.to(acc)
        w_hr_a = None if w_hr is None else w_hr.to(acc)
        dh = grad_hn.to(acc).clone()
        dc = grad_cn.to(acc).clone()
        c0_a = c0.to(acc)
        d_gates = gates_all.new_zeros(g_rows.shape)
        d_r_all = gates_all.new_zeros(gy_rows.shape) if w_hr is not None else None
        h_pre_rows = gates_all.new_zeros(c_rows.shape) if w_hr is not None else None
        m, zc, zh = _acc_masks(masks, acc)
        order = list(step_order(T, reverse))
        for s in range(T - 1, -1, -1):
            r = rows[order[s]]
            n = r.stop - r.start
            # a row's previous cell state: the step before's, or c0 at the row's first step
            c_prev = c0_a[:n] if s == 0 else _with_initial(c_rows[rows[order[s - 1]]], c0_a, n)
            d_r = dh[:n] + gy_rows[r].to(acc)  # the gradient reaching h_t
            carry_h = None
            if zh is not None:  # h_t = zh h_{t-1} + (1 - zh) h~_t
                carry_h = zh[r] * d_r
                d_r = (1 - zh[r]) * d_r
            i, f, g, o = g_rows[r].chunk(4, 1)
            # cells hold c_t; under cell zoneout h~_t and the gates saw c~_t = f c_{t-1} + i g
            c_new = c_rows[r] if zc is None else f * c_prev + i * g
            tc = torch.tanh(c_new)
            if w_hr_a is not None:
                d_r_all[r] = d_r
                h_pre_rows[r] = o * tc
                d_h = d_r.mm(w_hr_a)
            else:
                d_h = d_r
            dc_t = dc[:n]
            d_c = (dc_t if zc is None else (1 - zc[r]) * dc_t) + d_h * o * (1 - tc * tc)
            d_z = torch.cat([
                d_c * g * i * (1 - i),
                d_c * c_prev * f * (1 - f),
                d_c * i * (1 - g * g),
                d_h * tc * o * (1 - o),
            ], 1)
            d_gates[r] = d_z
            d_h_prev = d_z.mm(w_hh_a)
            if m is not None:
                d_h_prev = d_h_prev * m[:n]
            dh[:n] = d_h_prev if carry_h is None else d_h_prev + carry_h
            dc[:n] = d_c * f if zc is None else d_c * f + zc[r] * dc_t
        h_pre = h_pre_rows
        if batch_sizes is None:  # back to [T, B, *]
            d_gates = d_gates.view(T, B, G)
            d_r_all = None if d_r_all is None else d_r_all.view(T, B, d_r_all.shape[-1])
            h_pre = None if h_pre is None else h_pre.view(T, B, H)
        d_w_hh, d_w_hr = weight_grads(d_gates, y, h0, reverse, d_r_all, h_pre, batch_sizes, m)
        return RecurrenceGrads(d_gates.to(grad_y.dtype), dh.to(h0.dtype), dc.to(c0.dtype), d_w_hh.to(w_hh.dtype),
                               None if d_w_hr is None else d_w_hr.to(w_hr.dtype))


def _layout_rows(shape, B, batch_sizes):
    """(rows of each time index, T, B) for a per-step tensor of this shape."""
    if batch_sizes is None:
        T = shape[0]
        return [slice(t * B, (t + 1) * B) for t in range(T)], T, B
    packed = PackedRows(batch_sizes, False)
    return [packed.step_rows(t) for t in range(packed.T)], packed.T, packed.B


def _with_initial(prev_rows, initial, n):
    """The first n rows of a state whose rows past prev_rows' come from initial (a row at its first step)."""
    k = prev_rows.shape[0]
    return prev_rows[:n] if k >= n else torch.cat([prev_rows, initial[k:n]])


def _acc_masks(masks, acc):
    """(recurrent [B, P], zone_c [rows, H], zone_h [rows, P]) in acc, per-step ones as rows; Nones when off."""
    m, zc, zh = masks if masks is not None else StepMasks()
    return (None if m is None else m.to(acc), None if zc is None else zc.reshape(-1, zc.shape[-1]).to(acc),
            None if zh is None else zh.reshape(-1, zh.shape[-1]).to(acc))


def _steps(gx, state, weights, layout, keep, masks=None):
    """The time loop, out of place. Returns y, h_n [B, P], c_n [B, H] and, when keep,
    (gates activated i,f,g,o, cells) in the accumulation dtype, else (); y, gates and
    cells in gx's layout (padded [T, B, *] or packed [N, *]). masks: StepMasks (base.py)."""
    (h0, c0), (w_hh, w_hr), (batch_sizes, reverse) = state, weights, layout
    rows, T, B = _layout_rows(gx.shape, h0.shape[0], batch_sizes)
    G = gx.shape[-1]
    gx_rows = gx.reshape(-1, G)
    acc = acc_dtype(gx.dtype)
    w_hh_a = w_hh.to(acc)
    w_hr_a = None if w_hr is None else w_hr.to(acc)
    h, c = h0.to(acc), c0.to(acc)
    m, zc, zh = _acc_masks(masks, acc)
    ys, gates, cells = [None] * T, [None] * T, [None] * T
    for t in step_order(T, reverse):
        r = rows[t]
        n = r.stop - r.start
        # rows past n keep their state: not yet started (reverse) or already done (forward)
        z = torch.addmm(gx_rows[r].to(acc), h[:n] if m is None else h[:n] * m[:n], w_hh_a.t())
        i, f, g, o = z.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c[:n] + i * g
        h_new = o * torch.tanh(c_new)
        if w_hr_a is not None:
            h_new = h_new.mm(w_hr_a.t())
        if zc is not None:
            c_new = torch.lerp(c_new, c[:n], zc[r])
        if zh is not None:
            h_new = torch.lerp(h_new, h[:n], zh[r])
        c = torch.cat([c_new, c[n:]])
        h = torch.cat([h_new, h[n:]])
        ys[t] = h_new.to(gx.dtype)
        if keep:
            gates[t] = torch.cat([i, f, g, o], 1)
            cells[t] = c_new
    H, P = G // 4, h0.shape[1]
    shape = (T, B) if batch_sizes is None else (gx.shape[0],)

    def joined(parts, width, dtype):
        return torch.cat(parts).view(*shape, width) if parts else gx.new_zeros(*shape, width, dtype=dtype)

    y = joined(ys, P, gx.dtype)
    acts = (joined(gates, G, acc), joined(cells, H, acc)) if keep else ()
    return y, h.to(h0.dtype), c.to(c0.dtype), acts
