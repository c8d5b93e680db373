"""The `triton` backend: launchers for the fused kernels in kernels/ (lstm_fast.kernels).

Two kernel paths, same saved tensors, same results:
  step      one forward / backward launch per time step; any H, projections
            (h_t = (o*tanh c_t) @ W_hr^T is a torch.mm per step).
  sequence  one launch runs all T steps; each program keeps W_hh for its batch
            tile on chip, so it needs small H (SEQ_MAX_H: 64 in fp32, 128 in
            fp16/bf16) and no projection.
Both read and write the call's own layout (backends/base.py): the per-step tensors
(gx, y, saved gates and cells, their gradients) are rows, [T*B, *] padded or
PackedSequence's [N, *] packed, and each step addresses its rows from its first
row (t*B, or the cumulative batch_sizes) with its active row count, so a packed
call computes and stores real tokens only. Rows that start at a step (all at the
first; packed reverse, those whose sequence ends at that t) read h0 / c0, the
others the previous step's rows; the reverse direction runs from the same rows.
Regulariser masks (StepMasks: recurrent dropout on h_{t-1}, zoneout of c and h) run
inside the step kernels, so a masked call takes the step path whatever `path` says
(the sequence kernels carry no masks).
`path` (attribute, or env LSTM_FAST_TRITON_PATH) = auto | step | sequence;
auto takes sequence whenever it applies (one launch instead of 2T; to be
confirmed by a GPU benchmark). A forced path that cannot serve a call
makes supports() say no, with the reason.

Precision. fp16/bf16: tensor-core dots on the stored dtype with fp32
accumulation (h_{t-1} enters the dot as stored, as in cuDNN; gate gradients
are rounded to it for the dh_{t-1} dot); gates, cell state and all gradients
between steps stay fp32, cast on store; dW_hh / dW_hr are fp32 GEMMs over all
T from fp32 gate gradients. fp32: the recurrent dots run in `fp32_precision` =
'ieee' | 'tf32' | 'tf32x3' (attribute, or env LSTM_FAST_TRITON_FP32_PRECISION);
unset, it follows torch's own matmul switch (torch.backends.cuda.matmul.
fp32_precision, else .allow_tf32), so the weight-gradient GEMMs (torch.mm) and
the kernels use the same precision. The interpreter computes every dot in
exact fp32 whatever is asked.

Devices. CUDA tensors; with TRITON_INTERPRET=1 (set before triton is
imported) CPU tensors only, through the Triton interpreter (tests).

This module imports neither triton nor the kernels until first use.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

from .. import _sources
from .base import Backend, LayerSizes, PackedRows, RecurrenceGrads, acc_dtype, step_order, weight_grads

PATHS = ("auto", "step", "sequence")
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")

# Largest H whose W_hh tiles the sequence kernel keeps on chip for all T steps, from
# ptxas's sm_90 shared-memory report (bench/NOTES_triton.md#sequence-kernel-limits);
# whether it beats the step kernels up to there awaits a GPU benchmark.
SEQ_MAX_H = {torch.float32: 64, torch.float16: 128, torch.bfloat16: 128}


# The forward step kernel's grid is (B / BLOCK_B, H / BLOCK_H); CUDA allows 65535 blocks on the
# second axis and the narrowest BLOCK_H candidate is 32 (kernels/lstm_step.py).
_MAX_GRID_Y = 65535
_MIN_BLOCK_H = 32


def seq_max_h(dtype) -> int:
    return SEQ_MAX_H.get(dtype, 64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _torch_fp32_precision() -> str:
    """'tf32' or 'ieee' as torch's own cuBLAS switch says (new API first)."""
    matmul = torch.backends.cuda.matmul
    try:
        new = getattr(matmul, "fp32_precision", None)  # torch >= 2.9
        if new in ("tf32", "ieee"):
            return new
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # torch refuses to answer after mixed legacy/new settings
        return "ieee"


class TritonBackend(Backend):
    name = "triton"
    # recurrent dropout and zoneout run inside the step kernels; a masked call takes the step path
    supports_masks = True

    def __init__(self):
        self.path = os.environ.get("LSTM_FAST_TRITON_PATH", "auto") or "auto"
        self.fp32_precision = os.environ.get("LSTM_FAST_TRITON_FP32_PRECISION") or None
        self._k = None  # (lstm_step, lstm_sequence) modules once loaded

    # ---------------------------------------------------------------- registry
    def _kernels(self):
        if self._k is None:
            pkg = _sources.import_folder("lstm_fast.kernels")
            step = importlib.import_module(pkg.__name__ + ".lstm_step")
            seq = importlib.import_module(pkg.__name__ + ".lstm_sequence")
            self._k = (step, seq)
        return self._k

    def is_available(self):
        try:
            import triton
        except Exception as exc:  # ImportError, or a broken install
            return False, f"triton is not importable: {type(exc).__name__}: {exc}"
        try:
            step, _ = self._kernels()
        except Exception as exc:
            return False, f"lstm_fast.kernels failed to load: {type(exc).__name__}: {exc}"
        if step.INTERPRETING:
            return True, "Triton interpreter (TRITON_INTERPRET=1), CPU tensors"
        if not torch.cuda.is_available():
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"

    def _interp(self):
        return self._kernels()[0].INTERPRETING if self._k is not None else _interpreting()

    def _check_path(self):
        if self.path not in PATHS:
            raise ValueError(f"triton backend path {self.path!r}: choose one of {', '.join(PATHS)}")

    def sequence_ok(self, sizes: LayerSizes, dtype) -> tuple[bool, str]:
        if dtype == torch.float64:  # a float64 W_hh tile set would fit only H <= 32: not worth a variant
            return False, "the sequence kernel holds W_hh on chip in 32 or 16 bits, not float64"
        if sizes.has_proj:
            return False, "the sequence kernel has no projection (proj_size > 0)"
        limit = seq_max_h(dtype)
        if max(16, _next_pow2(sizes.H)) > limit:
            return False, f"the sequence kernel holds W_hh on chip only for H <= {limit} in {dtype} (H={sizes.H})"
        return True, "fits"

    def use_sequence(self, sizes: LayerSizes, dtype) -> bool:
        self._check_path()
        return self.path != "step" and self.sequence_ok(sizes, dtype)[0]

    def supports(self, device, dtype, sizes: LayerSizes):
        self._check_path()
        # torch.jit.trace hands sizes as traced tensors; H and P are the weights' constant sizes
        sizes = sizes._replace(H=int(sizes.H), P=int(sizes.P))
        device = torch.device(device)
        if self._interp():
            if device.type != "cpu":
                return False, "under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors only"
            if dtype == torch.bfloat16:
                return False, "bfloat16 arithmetic is wrong in the Triton interpreter"
        elif device.type != "cuda":
            return False, f"Triton kernels need CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs CPU tensors)"
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return False, f"dtype {dtype} not supported (float32, float64, float16, bfloat16)"
        # Activation offsets (rows of [T, B, ..] buffers) are int64 in every kernel, so T*B*4H may pass 2^31;
        # weight offsets are int32, hence this bound on W_hh.
        if 4 * sizes.H * sizes.P >= 2 ** 31:
            return False, f"W_hh [4H, P] has 4*H*P = {4 * sizes.H * sizes.P} >= 2^31 elements (int32 weight offsets)"
        if triton_cdiv(sizes.H, _MIN_BLOCK_H) > _MAX_GRID_Y:
            return False, (f"H = {sizes.H} > {_MIN_BLOCK_H * _MAX_GRID_Y}: the forward step grid's second axis "
                           f"(H / {_MIN_BLOCK_H} programs) exceeds CUDA's {_MAX_GRID_Y}")
        if self.path == "sequence":
            ok, why = self.sequence_ok(sizes, dtype)
            if not ok:
                return False, f"path 'sequence' forced: {why}"
        if self.fp32_precision is not None and self.fp32_precision not in FP32_PRECISIONS:
            return False, f"fp32_precision {self.fp32_precision!r}: choose one of {', '.join(FP32_PRECISIONS)}"
        return True, "step kernels" + (" / sequence kernel" if self.use_sequence(sizes, dtype) else "")

    def dot_precision(self, dtype) -> str:
        if dtype != torch.float32:
            return "ieee"  # 16- and 64-bit operands: the flag does not apply
        choice = self.fp32_precision or _torch_fp32_precision()
        if choice not in FP32_PRECISIONS:
            raise ValueError(f"fp32_precision {choice!r}: choose one of {', '.join(FP32_PRECISIONS)}")
        return choice

    # ----------------------------------------------------------------- forward
    def forward(self, gx, state, weights, layout, need_grad, masks=None):
        with _on_device(gx.device):
            return self._forward(gx, state, weights, layout, need_grad, _Masks(masks, state.h))

    def _forward(self, gx, state, weights, layout, need_grad, masks):
        (h0, c0), (w_hh, w_hr), (batch_sizes, reverse) = state, weights, layout
        step_k, seq_k = self._kernels()
        rows_shape, G = gx.shape[:-1], gx.shape[-1]  # (T, B) padded, (N,) packed
        B, P = h0.shape
        H = G // 4
        packed = batch_sizes is not None
        T = len(batch_sizes) if packed else gx.shape[0]
        dtype, dev = gx.dtype, gx.device
        acc = acc_dtype(dtype)  # gates and cell states: float32, or float64 for float64 input
        w = w_hh.to(dtype).contiguous()
        prec = self.dot_precision(dtype)
        sizes = LayerSizes(T=T, B=B, H=H, P=P, packed=packed, reverse=reverse)
        # Per-step tensors in the call's own layout, addressed as [R, width] rows by the kernels.
        y = torch.empty(*rows_shape, P, dtype=dtype, device=dev)
        gates = torch.empty(*rows_shape, G, dtype=acc, device=dev) if need_grad else None
        cells = torch.empty(*rows_shape, H, dtype=acc, device=dev) if need_grad else None
        saved = (gates, cells) if need_grad else ()
        if gx.numel() == 0 or B == 0:  # nothing to compute: no launch with an empty grid
            return y, h0.clone(), c0.clone(), saved

        if self.use_sequence(sizes, dtype) and not masks.on:
            h_n = torch.empty(B, H, dtype=h0.dtype, device=dev)
            c_n = torch.empty(B, H, dtype=acc, device=dev)
            bs_dev, row0_dev = _step_tables(batch_sizes, dev)
            seq_k.lstm_fwd_seq_kernel[lambda m: (triton_cdiv(B, m["BLOCK_B"]),)](
                gx, w, h0, c0, y, cells if need_grad else y, gates if need_grad else y, bs_dev, row0_dev,
                h_n, c_n, T, B, H=H, HP=max(16, _next_pow2(H)), B_BUCKET=step_k.bucket(B),
                REVERSE=bool(reverse), PACKED=packed, SAVE=need_grad, DOT_PRECISION=prec)
            return y, h_n, c_n.to(c0.dtype), saved

        # Step path (and every masked call). Without saving, the cell state ping-pongs between two [B, H] slots.
        plan = _Plan(T, B, batch_sizes, reverse)
        gx2, y2 = gx.view(-1, G), y.view(-1, P)
        c_ping = None if need_grad else torch.empty(2 * B, H, dtype=acc, device=dev)
        c_buf = cells.view(-1, H) if need_grad else c_ping
        hpre = torch.empty(B, H, dtype=dtype, device=dev) if w_hr is not None else None
        w_hr_t = w_hr.to(dtype).t() if w_hr is not None else None
        gates_arg = gates.view(-1, G) if need_grad else c_buf
        c0_acc = c0.to(acc).contiguous()  # one row pointer serves c0 and the cell buffer: one dtype
        bb = step_k.bucket(B)
        zone_h_in_kernel = masks.zh is not None and hpre is None  # with W_hr, h zoneout follows the torch.mm
        for s, (n, n_prev, r0, r_prev) in enumerate(plan.steps):
            c_in, c_out = (r_prev, r0) if need_grad else ((s % 2) * B, ((s + 1) % 2) * B)
            step_k.lstm_fwd_step_kernel[lambda m, n=n: (triton_cdiv(n, m["BLOCK_B"]), triton_cdiv(H, m["BLOCK_H"]))](
                gx2, w, h0, y2, y2 if hpre is None else hpre, c0_acc, c_buf, c_buf, gates_arg, *masks.args(h0),
                n, n_prev, r0, r_prev, r0 if hpre is None else 0, c_in, c_out,
                H=H, P=P, B_BUCKET=bb, SAVE=need_grad, RMASK=masks.rmask is not None, ZONE_C=masks.zc is not None,
                ZONE_H=zone_h_in_kernel, DOT_PRECISION=prec)
            if hpre is not None:
                y_t = y2[r0:r0 + n]
                torch.mm(hpre[:n], w_hr_t, out=y_t)
                if masks.zh is not None:  # h_t = zh h_{t-1} + (1 - zh) W_hr h~_t
                    h_prev = torch.cat([y2[r_prev:r_prev + n_prev], h0[n_prev:n]])
                    y_t.add_(masks.zh[r0:r0 + n] * (h_prev - y_t))

        # Final states: each row's at its last processed step; rows never active keep h0, c0.
        last, active = plan.last_rows(dev)
        h_n = torch.where(active[:, None], y2.index_select(0, last), h0)
        if need_grad:
            c_last = c_buf.index_select(0, last)
        else:  # the slot written at each row's last step s: (s + 1) % 2
            c_last = c_ping.index_select(0, plan.last_slots(dev) * B + torch.arange(B, device=dev))
        c_n = torch.where(active[:, None], c_last, c0_acc)
        return y, h_n.to(h0.dtype), c_n.to(c0.dtype), saved

    # ---------------------------------------------------------------- backward
    def backward(self, saved, y, grads, state, weights, layout, masks=None):
        with _on_device(y.device):
            return self._backward(saved, y, grads, state, weights, layout, _Masks(masks, state.h))

    def _backward(self, saved, y, grads, state, weights, layout, masks):
        (grad_y, grad_hn, grad_cn), (h0, c0), (w_hh, w_hr), (batch_sizes, reverse) = grads, state, weights, layout
        step_k, seq_k = self._kernels()
        gates, cells = saved  # [T, B, *] padded, [N, *] packed, as forward saved them
        G = gates.shape[-1]
        B, P = h0.shape
        H = G // 4
        packed = batch_sizes is not None
        T = len(batch_sizes) if packed else gates.shape[0]
        dtype, dev = grad_y.dtype, grad_y.device
        acc = gates.dtype  # float32, or float64 for float64 input (as in forward)
        w = w_hh.to(y.dtype).contiguous()
        prec = self.dot_precision(y.dtype)
        sizes = LayerSizes(T=T, B=B, H=H, P=P, packed=packed, reverse=reverse)
        grad_y = grad_y.to(y.dtype).contiguous()
        d_gates = torch.empty_like(gates)  # every row is a real token: all written
        # the gradient reaching each projected output y_t = W_hr h_pre (step path: the sequence path has no W_hr)
        d_r_all = torch.empty(*y.shape, dtype=acc, device=dev) if w_hr is not None else None
        dh_n, dc_n = grad_hn.to(acc).contiguous(), grad_cn.to(acc).contiguous()

        if gates.numel() == 0 or B == 0:
            dh0, dc0 = dh_n, dc_n
        elif self.use_sequence(sizes, y.dtype) and not masks.on:
            dh0 = torch.empty(B, H, dtype=acc, device=dev)
            dc0 = torch.empty(B, H, dtype=acc, device=dev)
            bs_dev, row0_dev = _step_tables(batch_sizes, dev)
            seq_k.lstm_bwd_seq_kernel[lambda m: (triton_cdiv(B, m["BLOCK_B"]),)](
                gates, cells, c0.to(acc).contiguous(), w, grad_y, dh_n, dc_n, bs_dev, row0_dev, d_gates, dh0, dc0,
                T, B, H=H, HP=max(16, _next_pow2(H)), B_BUCKET=step_k.bucket(B),
                REVERSE=bool(reverse), PACKED=packed, DOT_PRECISION=prec)
        else:
            plan = _Plan(T, B, batch_sizes, reverse)
            g2, c2, gy2, dg2 = gates.view(-1, G), cells.view(-1, H), grad_y.view(-1, P), d_gates.view(-1, G)
            # Ping-pong gradient buffers for rows that continue into the step before; a row whose
            # h_{t-1} was h0 gets its gradient written to dh0 / dc0 (rows never active keep dh_n / dc_n).
            # A row read at step s was written at step s + 1, or never (forward: its sequence ends at s),
            # in which case both copies still hold dh_n / dc_n.
            dh, dc = dh_n.repeat(2, 1, 1), dc_n.repeat(2, 1, 1)
            dh0, dc0 = dh_n.clone(), dc_n.clone()
            if w_hr is not None:
                dr2 = d_r_all.view(-1, P)
                dh_proj = torch.empty(B, H, dtype=acc, device=dev)
                w_hr_f = w_hr.to(acc)
            c0_acc = c0.to(acc).contiguous()  # read beside the saved cells through one row pointer
            bb = step_k.bucket(B)
            k = 0
            zone_h_in_kernel = masks.zh is not None and w_hr is None
            for n, n_prev, r0, r_prev in reversed(plan.steps):
                carry = None
                if w_hr is not None:
                    d_r = dr2[r0:r0 + n]
                    torch.add(dh[k, :n], gy2[r0:r0 + n], out=d_r)
                    if masks.zh is not None:  # zh of it goes straight to h_{t-1}, the rest through W_hr
                        carry = masks.zh[r0:r0 + n] * d_r
                        d_r.sub_(carry)
                    torch.mm(d_r, w_hr_f, out=dh_proj[:n])
                    p_dh, add_gy = dh_proj, False
                else:
                    p_dh, add_gy = dh[k], True
                step_k.lstm_bwd_step_kernel[lambda m, n=n: (triton_cdiv(n, m["BLOCK_B"]),
                                                         triton_cdiv(P, m["BLOCK_P"]))](
                    g2, c2, c0_acc, w, p_dh, gy2, dc[k], dg2, dh[1 - k], dc[1 - k], dh0, dc0, *masks.args(h0),
                    n, n_prev, r0, r_prev,
                    H=H, P=P, B_BUCKET=bb, ADD_GY=add_gy, RMASK=masks.rmask is not None,
                    ZONE_C=masks.zc is not None, ZONE_H=zone_h_in_kernel, DOT_PRECISION=prec)
                if carry is not None:
                    dh[1 - k, :n_prev] += carry[:n_prev]
                    dh0[n_prev:n] += carry[n_prev:]
                k = 1 - k

        h_pre = None
        if w_hr is not None:  # h~_t = o tanh(c~_t); the saved cells are c_t, which zoneout moved from c~_t
            c_tilde = cells if masks.zc is None else _cell_before_zoneout(gates, cells, c0, layout)
            h_pre = gates[..., 3 * H:] * torch.tanh(c_tilde)
        d_w_hh, d_w_hr = weight_grads(d_gates, y, h0, reverse, d_r_all, h_pre, batch_sizes, masks.rmask)
        return RecurrenceGrads(d_gates.to(dtype), dh0.to(h0.dtype), dc0.to(c0.dtype), d_w_hh.to(w_hh.dtype),
                               None if d_w_hr is None else d_w_hr.to(w_hr.dtype))


class _Masks:
    """A call's StepMasks (backends/base.py) as the step kernels take them: rmask [B, P], zc
    [R, H] and zh [R, P] rows in the activation dtype, each None when off."""

    def __init__(self, masks, h0):
        rmask, zc, zh = masks if masks is not None else (None, None, None)
        self.rmask, self.zc, self.zh = (None if t is None else t.to(h0.dtype).contiguous().view(-1, t.shape[-1])
                                        for t in (rmask, zc, zh))
        self.on = any(t is not None for t in (rmask, zc, zh))

    def args(self, dummy):
        """The kernels' (p_rmask, p_zc, p_zh); `dummy` where a mask is off (never read)."""
        return tuple(dummy if t is None else t for t in (self.rmask, self.zc, self.zh))


def _cell_before_zoneout(gates, cells, c0, layout):
    """c~_t = f c_{t-1} + i g of every token, from the saved gates and the zoned cells c_t."""
    H = cells.shape[-1]
    if layout.batch_sizes is None:
        first = c0.to(cells.dtype).unsqueeze(0)
        c_prev = torch.cat([cells[1:], first]) if layout.reverse else torch.cat([first, cells[:-1]])
    else:
        index = PackedRows(layout.batch_sizes, layout.reverse).prev_index(cells.device)
        c_prev = torch.cat([cells, c0.to(cells.dtype)]).index_select(0, index)
    return gates[..., H:2 * H] * c_prev + gates[..., :H] * gates[..., 2 * H:3 * H]


class _Plan:
    """The step path's loop, as csrc's Plan: per processed step (t = 0 .. T-1, or T-1 .. 0
    when reverse) its active rows n, how many of them (n_prev) continue from the previous
    processed step's rows (the others start from h0 / c0), the first row r0 of its rows in
    the per-step tensors and r_prev of the previous step's. Padded: row0[t] = t*B."""

    def __init__(self, T, B, batch_sizes, reverse):
        if batch_sizes is None:
            self.rows = None
            sizes, row0 = [B] * T, [t * B for t in range(T)]
        else:
            self.rows = PackedRows(batch_sizes, reverse)
            sizes, row0 = self.rows.sizes, self.rows.starts
        self.T, self.B, self.reverse = T, B, reverse
        order = step_order(T, reverse)
        self.steps = [(sizes[t], min(sizes[t], sizes[order[s - 1]]) if s else 0, row0[t],
                       row0[order[s - 1]] if s else 0) for s, t in enumerate(order)]

    def last_rows(self, device):
        """(last [B] int64: each batch row's row at its last processed step (0 where none),
        active [B] bool: the rows that take part at all)."""
        b = torch.arange(self.B)
        if self.rows is None:
            last = b + (0 if self.reverse else (self.T - 1) * self.B)
            return last.to(device), torch.ones(self.B, dtype=torch.bool, device=device)
        n0 = self.rows.B  # batch_sizes[0]: rows beyond it never take part
        last = torch.zeros(self.B, dtype=torch.int64)
        last[:n0] = self.rows.last_index("cpu")
        return last.to(device), (b < n0).to(device)

    def last_slots(self, device):
        """[B] int64: which of the two ping-pong slots holds each row's last c_t."""
        if self.rows is None or self.reverse:  # every row's last step is the last processed one
            return torch.full((self.B,), self.T % 2, dtype=torch.int64, device=device)
        return (self.rows.lengths(self.B) % 2).to(device)


def _step_tables(batch_sizes, device):
    """The sequence kernels' packed tables: batch_sizes [T] int32 and each step's first row
    [T] int64 on the device (one-element placeholders for a padded call)."""
    if batch_sizes is None:
        return (torch.empty(1, dtype=torch.int32, device=device), torch.empty(1, dtype=torch.int64, device=device))
    rows = PackedRows(batch_sizes, False)
    return batch_sizes.to(device=device, dtype=torch.int32), rows.starts_t.to(device)


def _on_device(device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
