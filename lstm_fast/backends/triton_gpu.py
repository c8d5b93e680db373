"""The `triton` backend: launchers for the fused kernels in kernels/ (lstm_fast.kernels).

Two kernel paths, same saved tensors, same results:
  step      one forward / backward launch per time step; any H, projections
            (h_t = (o*tanh c_t) @ W_hr^T is a torch.mm per step).
  sequence  one launch runs all T steps; each program keeps W_hh for its batch
            tile on chip, so it needs small H (SEQ_MAX_H: 64 in fp32, 128 in
            fp16/bf16) and no projection.
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
from .base import LayerSizes, PackedRows, PaddedPacking, RecurrenceGrads, acc_dtype, weight_grads

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


class TritonBackend(PaddedPacking):
    name = "triton"

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
    def padded_forward(self, gx, state, weights, layout, need_grad):
        with _on_device(gx.device):
            y, h_n, c_n, saved = self._forward(gx, state, weights, layout, need_grad)
        if saved:  # cells [T, B, H] as every backend saves them (the recorded op's fake kernel says so)
            gates, cells = saved
            saved = (gates, cells[:-1])
        return y, h_n, c_n, saved

    def _forward(self, gx, state, weights, layout, need_grad):
        (h0, c0), (w_hh, w_hr), (batch_sizes, reverse) = state, weights, layout
        step_k, seq_k = self._kernels()
        T, B, G = gx.shape
        H, P = G // 4, h0.shape[1]
        dtype, dev = gx.dtype, gx.device
        acc = acc_dtype(dtype)  # gates and cell states: float32, or float64 for float64 input
        w = w_hh.to(dtype).contiguous()
        prec = self.dot_precision(dtype)
        packed = batch_sizes is not None
        sizes = LayerSizes(T=T, B=B, H=H, P=P, packed=packed, reverse=reverse)
        # y_ext[T+1]: y[t] in slot t, h0 in slot T, so step t reads h_{t-1} from one
        # slot of the same buffer and y is its first T slots (no offset). Packed rows
        # that are inactive must read as y = 0 (and stay finite for backward).
        alloc = torch.zeros if packed else torch.empty
        y_ext = alloc(T + 1, B, P, dtype=dtype, device=dev)
        y_ext[T] = h0
        y = y_ext[:T]
        gates = alloc(T, B, G, dtype=acc, device=dev) if need_grad else None
        cells = None
        if need_grad:  # cells_ext: same slot layout as y_ext
            cells = alloc(T + 1, B, H, dtype=acc, device=dev)
            cells[T] = c0
        bs = batch_sizes.tolist() if packed else None
        if T == 0 or B == 0:  # nothing to compute: no launch with an empty grid
            return y, h0.clone(), c0.clone(), ((gates, cells) if need_grad else ())

        if self.use_sequence(sizes, dtype):
            h_n = torch.empty(B, H, dtype=h0.dtype, device=dev)
            c_n = torch.empty(B, H, dtype=acc, device=dev)
            bs_dev = (batch_sizes.to(device=dev, dtype=torch.int32) if packed
                      else torch.empty(1, dtype=torch.int32, device=dev))
            dummy = y_ext
            seq_k.lstm_fwd_seq_kernel[lambda m: (triton_cdiv(B, m["BLOCK_B"]),)](
                gx, w, y_ext, cells if need_grad else dummy, bs_dev, c0,
                h_n, c_n, gates if need_grad else dummy,
                T, B, H=H, HP=max(16, _next_pow2(H)), B_BUCKET=step_k.bucket(B),
                REVERSE=bool(reverse), PACKED=packed, SAVE=need_grad, DOT_PRECISION=prec)
            saved = (gates, cells) if need_grad else ()
            return y, h_n, c_n.to(c0.dtype), saved

        # Step path. Without saving, the cell state ping-pongs between 2 slots.
        if not need_grad:
            cells = torch.empty(2, B, H, dtype=acc, device=dev)
            cells[0] = c0
        hpre = torch.empty(1, B, H, dtype=dtype, device=dev) if w_hr is not None else None
        w_hr_t = w_hr.to(dtype).t() if w_hr is not None else None
        gates_arg = gates if need_grad else cells
        bb = step_k.bucket(B)
        order = range(T - 1, -1, -1) if reverse else range(T)
        for s, t in enumerate(order):
            n = B if bs is None else bs[t]
            if n == 0:
                continue
            h_in, h_out = T if s == 0 else t + 1 if reverse else t - 1, t  # slot T: h0, c0
            c_in, c_out = (h_in, h_out) if need_grad else (s % 2, (s + 1) % 2)
            step_k.lstm_fwd_step_kernel[lambda m, n=n: (triton_cdiv(n, m["BLOCK_B"]), triton_cdiv(H, m["BLOCK_H"]))](
                gx, w, y_ext, y_ext if hpre is None else hpre, cells, gates_arg,
                B, n, t, h_in, h_out if hpre is None else 0, c_in, c_out,
                H=H, P=P, B_BUCKET=bb, SAVE=need_grad, DOT_PRECISION=prec)
            if hpre is not None:
                torch.mm(hpre[0, :n], w_hr_t, out=y_ext[h_out, :n])

        # Final states: each row's last active step (all rows: the last step).
        if packed:
            lengths = PackedRows(batch_sizes, False).lengths(B).to(dev)
            rows = torch.arange(B, device=dev)
            last = torch.where(lengths > 0, lengths - 1, T)  # rows never active: h0, c0 in slot T
            h_n = y_ext[last, rows]
            c_slot = last if need_grad else lengths % 2
            c_n = cells[c_slot, rows]
        else:
            last = 0 if reverse else T - 1
            h_n = y_ext[last].clone()
            c_n = cells[last if need_grad else T % 2].clone()
        saved = (gates, cells) if need_grad else ()
        return y, h_n.to(h0.dtype), c_n.to(c0.dtype), saved

    # ---------------------------------------------------------------- backward
    def padded_backward(self, saved, y, grads, state, weights, layout):
        gates, cells = saved  # the kernels read c_{t-1} from one buffer: c0 goes back in its slot
        cells = torch.cat([cells, state.c.to(cells.dtype).unsqueeze(0)])
        with _on_device(y.device):
            return self._backward((gates, cells), y, grads, state, weights, layout)

    def _backward(self, saved, y, grads, state, weights, layout):
        (grad_y, grad_hn, grad_cn), (h0, c0), (w_hh, w_hr), (batch_sizes, reverse) = grads, state, weights, layout
        step_k, seq_k = self._kernels()
        gates, cells = saved  # cells: [T + 1, B, H], c0 in slot T (see _forward)
        T, B, G = gates.shape
        H, P = G // 4, h0.shape[1]
        dtype, dev = grad_y.dtype, grad_y.device
        acc = gates.dtype  # float32, or float64 for float64 input (as in forward)
        w = w_hh.to(y.dtype).contiguous()
        prec = self.dot_precision(y.dtype)
        packed = batch_sizes is not None
        sizes = LayerSizes(T=T, B=B, H=H, P=P, packed=packed, reverse=reverse)
        grad_y = grad_y.to(y.dtype).contiguous()
        d_gates = (torch.zeros if packed else torch.empty)(T, B, G, dtype=acc, device=dev)
        d_r_all = None

        if self.use_sequence(sizes, y.dtype):
            dh0 = torch.empty(B, H, dtype=acc, device=dev)
            dc0 = torch.empty(B, H, dtype=acc, device=dev)
            bs_dev = (batch_sizes.to(device=dev, dtype=torch.int32) if packed
                      else torch.empty(1, dtype=torch.int32, device=dev))
            if T > 0 and B > 0:
                seq_k.lstm_bwd_seq_kernel[lambda m: (triton_cdiv(B, m["BLOCK_B"]),)](
                    gates, cells, w, grad_y, grad_hn.to(acc).contiguous(), grad_cn.to(acc).contiguous(),
                    bs_dev, d_gates, dh0, dc0,
                    T, B, H=H, HP=max(16, _next_pow2(H)), B_BUCKET=step_k.bucket(B),
                    REVERSE=bool(reverse), PACKED=packed, DOT_PRECISION=prec)
            else:
                dh0, dc0 = grad_hn.to(acc), grad_cn.to(acc)
        else:
            # Ping-pong gradient buffers. Rows inactive at a step were inactive
            # at every later step too, so both copies still hold grad_hn/grad_cn.
            dh = grad_hn.to(acc).unsqueeze(0).repeat(2, 1, 1)
            dc = grad_cn.to(acc).unsqueeze(0).repeat(2, 1, 1)
            if w_hr is not None:
                d_r_all = torch.zeros(T, B, P, dtype=acc, device=dev)
                dh_proj = torch.empty(B, H, dtype=acc, device=dev)
                w_hr_f = w_hr.to(acc)
            bs = batch_sizes.tolist() if packed else None
            bb = step_k.bucket(B)
            order = list(range(T - 1, -1, -1) if reverse else range(T))
            k = 0
            for s in range(T - 1, -1, -1):
                t = order[s]
                n = B if bs is None else bs[t]
                if n == 0:
                    continue
                c_t, c_prev = t, T if s == 0 else t + 1 if reverse else t - 1
                if w_hr is not None:
                    torch.add(dh[k, :n], grad_y[t, :n], out=d_r_all[t, :n])
                    torch.mm(d_r_all[t, :n], w_hr_f, out=dh_proj[:n])
                    p_dh, add_gy = dh_proj, False
                else:
                    p_dh, add_gy = dh[k], True
                step_k.lstm_bwd_step_kernel[lambda m, n=n: (triton_cdiv(n, m["BLOCK_B"]),
                                                         triton_cdiv(P, m["BLOCK_P"]))](
                    gates, cells, w, p_dh, grad_y, dc[k], d_gates, dh[1 - k], dc[1 - k],
                    B, n, t, c_t, c_prev,
                    H=H, P=P, B_BUCKET=bb, ADD_GY=add_gy, DOT_PRECISION=prec)
                k = 1 - k
            dh0, dc0 = dh[k], dc[k]

        h_pre = None
        if w_hr is not None:
            h_pre = gates[..., 3 * H:] * torch.tanh(cells[:T])
        d_w_hh, d_w_hr = weight_grads(d_gates, y, h0, reverse, d_r_all, h_pre)
        return RecurrenceGrads(d_gates.to(dtype), dh0.to(h0.dtype), dc0.to(c0.dtype), d_w_hh.to(w_hh.dtype),
                               None if d_w_hr is None else d_w_hr.to(w_hr.dtype))


def _on_device(device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
