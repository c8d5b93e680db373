"""Fused LSTM step kernels: one launch per time step, any hidden size.

Dimension glossary
    R   rows of a per-step tensor (gx, y, gates, cells, their gradients), read as
        [R, width]: T*B in the padded layout (step t's rows start at t*B), N =
        sum(batch_sizes) in PackedSequence's (step t's rows start at row0[t]); the
        launcher passes each step's first row, so one kernel serves both
    R'  rows of a buffer the launcher picks per call: R (y, the saved cells) or a
        [B, *] or [2, B, *] scratch (projection, inference), addressed by a row argument
    B   rows of the initial state h0 / c0 and of the [B, *] state buffers (runtime)
    N   rows active at this step (runtime, N <= B): the step's rows are row .. row + N - 1
        for batch rows 0 .. N - 1; rows >= N are neither read nor written
    N_PREV  rows of this step whose h_{t-1} / c_{t-1} are the previous processed step's
        rows (runtime, N_PREV <= N); rows N_PREV .. N - 1 start here from h0 / c0 (all rows
        at the first step; packed reverse, the rows whose sequence ends at this t)
    H   hidden size (compile time)
    P   recurrent state size: proj_size if > 0 else H (compile time)
    G   4H: gates i, f, g, o stacked in nn.LSTM's order
    B_BUCKET  power-of-two bucket of B: only the autotune key (runtime int, unused
        by the code, so a new B never recompiles)
    acc the accumulation dtype of gates, cell states and gradients: fp32, or fp64
        when the activations are fp64 (read from p_c_out's type, nothing to pass)
Blocks
    BLOCK_B  batch rows per program
    BLOCK_H  hidden units per program (forward; each for all 4 gates)
    BLOCK_P  columns of dh_{t-1} per program (backward)
    BLOCK_K  chunk of the reduction dim (P forward, H backward); >= 16, the
             smallest tl.dot K on the GPU

All buffers are contiguous. Row offsets are int64 (row + b, times the width), so
R*G may exceed 2^31; weight offsets are int32 (the launcher checks G*P < 2^31).
Every kernel is idempotent (the rows it writes are not rows it reads), so autotune
may run it repeatedly.
"""
import triton
import triton.language as tl

from .cell import cell_bwd, cell_fwd
from .common import INTERPRETING, bucket, configs  # noqa: F401 (INTERPRETING, bucket: the launchers read them here)

# Forward candidates: no GPU timing yet, autotune picks; chosen from sm_90 resource reports at
# H = P = 512 (bench/NOTES_triton.md#step-forward-configs).
# BLOCK_B 16: the smallest tensor-core M; 32 and 64 reuse each W tile for more rows.
# BLOCK_H 32-128: narrow tiles spread a small-B step over more SMs, wide ones reuse each h tile.
# BLOCK_K 32 beyond 16-row tiles: 64 x 64 x 64 needs 240 KB of shared memory (227 KB allowed).
# num_warps 8 beyond 16 x 64 x 32: 4-warp fp32 tiles there spilled 136-1072 B.
# num_stages 3: pipelines the K loop's loads (not measured).
_FWD_GPU = [
    triton.Config({"BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=3)
    for bb, bh, bk, w in ((16, 32, 64, 4), (16, 64, 32, 4), (16, 64, 64, 8), (16, 128, 32, 8),
                          (32, 64, 32, 8), (32, 128, 32, 8), (64, 64, 32, 8), (64, 128, 32, 8))
]
# Interpreter: one config; 32 keeps H=33 in the tests multi-block and masked.
_FWD_INTERP = triton.Config({"BLOCK_B": 16, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=4)

# Backward candidates, chosen as above (bench/NOTES_triton.md#step-backward-configs): ten
# [BLOCK_B, BLOCK_K] tiles of gate derivatives beside the accumulator make it heavier than the forward.
# num_warps 8: fp32 is spill-free only for 16 x 64/128 x 32 at 8 warps (4 warps spill 32-88 B).
# BLOCK_B 32/64: for fp16 (spill-free but 56 B at 64 x 64); fp32 spills or runs out of shared memory there.
# BLOCK_K 32, num_stages 3: as in the forward.
_BWD_GPU = [
    triton.Config({"BLOCK_B": bb, "BLOCK_P": bp, "BLOCK_K": bk}, num_warps=w, num_stages=3)
    for bb, bp, bk, w in ((16, 64, 32, 4), (16, 64, 32, 8), (16, 128, 32, 8), (16, 32, 32, 4),
                          (32, 64, 32, 8), (32, 128, 32, 8), (64, 64, 32, 8))
]
# Interpreter: as in the forward.
_BWD_INTERP = triton.Config({"BLOCK_B": 16, "BLOCK_P": 32, "BLOCK_K": 32}, num_warps=4)


def _prune(configs_, named_args, **kwargs):
    """Drop configs whose tiles are mostly padding for this call's sizes."""
    args = {**named_args, **kwargs}  # constexprs arrive as keyword arguments
    b = args["B_BUCKET"]
    cols = args["H"] if "BLOCK_H" in configs_[0].kwargs else args["P"]
    width = max(32, triton.next_power_of_2(cols))  # 32: the narrowest candidate always stays
    keep = [c for c in configs_
            if c.kwargs["BLOCK_B"] <= max(16, b)  # 16: the smallest candidate always stays
            and c.kwargs.get("BLOCK_H", c.kwargs.get("BLOCK_P")) <= width]
    return keep


@triton.autotune(configs=configs(_FWD_GPU, _FWD_INTERP), key=["H", "P", "B_BUCKET", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["N", "N_PREV", "row_x", "row_h_prev", "row_h_out", "row_c_prev", "row_c_out",
                               "B_BUCKET"])
def lstm_fwd_step_kernel(
    p_gx,      # [R, G] input projection with both biases, activation dtype; the step's rows from row_x
    p_w_hh,    # [G, P] recurrent weight (nn.LSTM layout), activation dtype
    p_h0,      # [B, P] initial hidden state, activation dtype: h_{t-1} of rows >= N_PREV
    p_h_prev,  # [R', P] h_{t-1} of rows < N_PREV from row row_h_prev (the previous step's y)
    p_h_out,   # [R', H] receives o*tanh(c_t) from row row_h_out (h_t itself without projection)
    p_c0,      # [B, H] acc initial cell state: c_{t-1} of rows >= N_PREV
    p_c_prev,  # [R', H] acc c_{t-1} of rows < N_PREV from row row_c_prev
    p_c_out,   # [R', H] acc receives c_t from row row_c_out (may be p_c_prev's buffer: other rows)
    p_gates,   # [R, G] acc activations i, f, g, o saved for backward, from row_x (SAVE only)
    p_rmask,   # [B, P] recurrent dropout mask on h_{t-1}, activation dtype (RMASK only)
    p_zc,      # [R, H] cell zoneout: 1 keeps c_{t-1}, activation dtype, from row_x (ZONE_C only)
    p_zh,      # [R, H] hidden zoneout (P = H here), activation dtype, from row_x (ZONE_H only)
    N, N_PREV, row_x, row_h_prev, row_h_out, row_c_prev, row_c_out,
    B_BUCKET, H: tl.constexpr, P: tl.constexpr,
    SAVE: tl.constexpr, RMASK: tl.constexpr, ZONE_C: tl.constexpr, ZONE_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    G: tl.constexpr = 4 * H
    ACC: tl.constexpr = p_c_out.dtype.element_ty  # fp32, or fp64 for fp64 input
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_b = o_b < N
    m_prev = (o_b < N_PREV)[:, None]  # rows continuing from the previous step; the others start from h0 / c0
    m_j = o_j < H
    m_bj = m_b[:, None] & m_j[None, :]

    # Gate pre-activations start from gx; gate q of unit j is column q*H + j.
    o_gx = (row_x + o_b)[:, None] * G + o_j[None, :]
    acc_i = tl.load(p_gx + o_gx, mask=m_bj, other=0.0).to(ACC)
    acc_f = tl.load(p_gx + o_gx + H, mask=m_bj, other=0.0).to(ACC)
    acc_g = tl.load(p_gx + o_gx + 2 * H, mask=m_bj, other=0.0).to(ACC)
    acc_o = tl.load(p_gx + o_gx + 3 * H, mask=m_bj, other=0.0).to(ACC)

    # + h_{t-1} @ W_hh^T, K = P in chunks; W^T[k, q*H + j] = w_hh[q*H + j, k].
    # [BLOCK_B, 1] row pointers of h_{t-1}: one load per chunk whichever buffer a row reads
    # (two masked loads instead cost 56-88 B of spills and more shared memory in fp32, sm_90)
    p_h_rows = tl.where(m_prev, p_h_prev + (row_h_prev + o_b)[:, None] * P, p_h0 + o_b[:, None] * P)
    for k0 in range(0, P, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < P
        b_h = tl.load(p_h_rows + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        if RMASK:  # recurrent dropout: h_{t-1} * mask enters the product (h0's rows too)
            b_h *= tl.load(p_rmask + o_b[:, None] * P + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        o_w = o_j[None, :] * P + o_k[:, None]  # [BLOCK_K, BLOCK_H]
        m_w = m_k[:, None] & m_j[None, :]
        b_wi = tl.load(p_w_hh + o_w, mask=m_w, other=0.0)
        b_wf = tl.load(p_w_hh + H * P + o_w, mask=m_w, other=0.0)
        b_wg = tl.load(p_w_hh + 2 * H * P + o_w, mask=m_w, other=0.0)
        b_wo = tl.load(p_w_hh + 3 * H * P + o_w, mask=m_w, other=0.0)
        acc_i = tl.dot(b_h, b_wi, acc_i, input_precision=DOT_PRECISION)
        acc_f = tl.dot(b_h, b_wf, acc_f, input_precision=DOT_PRECISION)
        acc_g = tl.dot(b_h, b_wg, acc_g, input_precision=DOT_PRECISION)
        acc_o = tl.dot(b_h, b_wo, acc_o, input_precision=DOT_PRECISION)

    p_c_rows = tl.where(m_prev, p_c_prev + (row_c_prev + o_b)[:, None] * H, p_c0 + o_b[:, None] * H)
    b_c_prev = tl.load(p_c_rows + o_j[None, :], mask=m_bj, other=0.0)
    b_i, b_f, b_g, b_o, b_c, b_hid = cell_fwd(acc_i, acc_f, acc_g, acc_o, b_c_prev)
    o_xh = (row_x + o_b)[:, None] * H + o_j[None, :]  # the step's rows of the [R, H] masks
    if ZONE_C:  # c_t = zc c_{t-1} + (1 - zc) c~_t; h~_t above read c~_t
        b_zc = tl.load(p_zc + o_xh, mask=m_bj, other=0.0).to(ACC)
        b_c = b_c + b_zc * (b_c_prev - b_c)
    if ZONE_H:  # h_t = zh h_{t-1} + (1 - zh) h~_t, h_{t-1} unmasked (P = H: unit j is column j)
        b_zh = tl.load(p_zh + o_xh, mask=m_bj, other=0.0).to(ACC)
        b_h_prev = tl.load(p_h_rows + o_j[None, :], mask=m_bj, other=0.0).to(ACC)
        b_hid = b_hid + b_zh * (b_h_prev - b_hid)
    tl.store(p_c_out + (row_c_out + o_b)[:, None] * H + o_j[None, :], b_c, mask=m_bj)
    tl.store(p_h_out + (row_h_out + o_b)[:, None] * H + o_j[None, :], b_hid.to(p_h_out.dtype.element_ty), mask=m_bj)
    if SAVE:
        p_g = p_gates + o_gx
        tl.store(p_g, b_i, mask=m_bj)
        tl.store(p_g + H, b_f, mask=m_bj)
        tl.store(p_g + 2 * H, b_g, mask=m_bj)
        tl.store(p_g + 3 * H, b_o, mask=m_bj)


@triton.autotune(configs=configs(_BWD_GPU, _BWD_INTERP), key=["H", "P", "B_BUCKET", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["N", "N_PREV", "row_x", "row_prev", "B_BUCKET"])
def lstm_bwd_step_kernel(
    p_gates,    # [R, G] acc saved activations i, f, g, o; the step's rows from row_x
    p_cells,    # [R, H] acc saved cell states: c_t from row_x, c_{t-1} of rows < N_PREV from row_prev
    p_c0,       # [B, H] acc initial cell state: c_{t-1} of rows >= N_PREV
    p_w_hh,     # [G, P] recurrent weight, activation dtype
    p_dh,       # [B, H] acc gradient reaching h_t from later steps (already through W_hr with projection)
    p_gy,       # [R, H] gradient of the output y, activation dtype, from row_x (ADD_GY only)
    p_dc,       # [B, H] acc gradient reaching c_t from later steps
    p_dgates,   # [R, G] acc out: gradient of the gate pre-activations, from row_x
    p_dh_prev,  # [B, P] acc out: dh_{t-1} = d_gates @ W_hh of rows < N_PREV
    p_dc_prev,  # [B, H] acc out: dc_{t-1} = d_c * f of rows < N_PREV
    p_dh0,      # [B, P] acc out: the same for rows >= N_PREV, whose h_{t-1} was h0: the gradient of h0
    p_dc0,      # [B, H] acc out: the gradient of c0 for those rows
    p_rmask,    # [B, P] recurrent dropout mask, activation dtype (RMASK only)
    p_zc,       # [R, H] cell zoneout, activation dtype, from row_x (ZONE_C only)
    p_zh,       # [R, H] hidden zoneout (P = H here), activation dtype, from row_x (ZONE_H only)
    N, N_PREV, row_x, row_prev,
    B_BUCKET, H: tl.constexpr, P: tl.constexpr,
    ADD_GY: tl.constexpr, RMASK: tl.constexpr, ZONE_C: tl.constexpr, ZONE_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    G: tl.constexpr = 4 * H
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_b = o_b < N
    m_prev = (o_b < N_PREV)[:, None]  # rows continuing from the previous step; the others started from h0 / c0
    m_p = o_p < P
    # Every column program needs the gate gradients of all 4H rows of W_hh, so
    # each recomputes them; only the first one stores them (and dc_{t-1}).
    is_writer = pid_p == 0
    w_dtype = p_w_hh.dtype.element_ty

    o_rg = (row_x + o_b)[:, None] * G  # [BLOCK_B, 1] the step's rows of the [R, G] buffers
    o_rh = (row_x + o_b)[:, None] * H  # and of the [R, H] ones
    p_c_rows = tl.where(m_prev, p_cells + (row_prev + o_b)[:, None] * H, p_c0 + o_b[:, None] * H)  # c_{t-1}
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=p_dh_prev.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        m_bk = m_b[:, None] & m_k[None, :]
        o_bk = o_b[:, None] * H + o_k[None, :]
        o_g = o_rg + o_k[None, :]
        b_i = tl.load(p_gates + o_g, mask=m_bk, other=0.0)
        b_f = tl.load(p_gates + o_g + H, mask=m_bk, other=0.0)
        b_g = tl.load(p_gates + o_g + 2 * H, mask=m_bk, other=0.0)
        b_o = tl.load(p_gates + o_g + 3 * H, mask=m_bk, other=0.0)
        b_c = tl.load(p_cells + o_rh + o_k[None, :], mask=m_bk, other=0.0)
        b_c_prev = tl.load(p_c_rows + o_k[None, :], mask=m_bk, other=0.0)
        b_dh = tl.load(p_dh + o_bk, mask=m_bk, other=0.0)
        if ADD_GY:
            b_dh += tl.load(p_gy + o_rh + o_k[None, :], mask=m_bk, other=0.0).to(b_dh.dtype)
        b_dc = tl.load(p_dc + o_bk, mask=m_bk, other=0.0)
        b_dc_cell = b_dc
        if ZONE_H:  # zh of the gradient reaching h_t goes straight to h_{t-1} (added after the loop)
            b_dh = b_dh * (1.0 - tl.load(p_zh + o_rh + o_k[None, :], mask=m_bk, other=0.0).to(b_dh.dtype))
        if ZONE_C:  # the saved c_t is zoned: the gates saw c~_t = f c_{t-1} + i g, which gets (1 - zc) of dc
            b_zc = tl.load(p_zc + o_rh + o_k[None, :], mask=m_bk, other=0.0).to(b_dc.dtype)
            b_c = b_f * b_c_prev + b_i * b_g
            b_dc_cell = b_dc * (1.0 - b_zc)

        b_dzi, b_dzf, b_dzg, b_dzo, b_dc_prev = cell_bwd(b_dh, b_dc_cell, b_i, b_f, b_g, b_o, b_c, b_c_prev)
        if ZONE_C:
            b_dc_prev += b_zc * b_dc
        m_st = m_bk & is_writer
        tl.store(p_dgates + o_g, b_dzi, mask=m_st)
        tl.store(p_dgates + o_g + H, b_dzf, mask=m_st)
        tl.store(p_dgates + o_g + 2 * H, b_dzg, mask=m_st)
        tl.store(p_dgates + o_g + 3 * H, b_dzo, mask=m_st)
        tl.store(p_dc_prev + o_bk, b_dc_prev, mask=m_st & m_prev)
        tl.store(p_dc0 + o_bk, b_dc_prev, mask=m_st & ~m_prev)

        # dh_{t-1}[:, p] += sum over gates q of dz_q @ w_hh[q*H + k, p]
        o_w = o_k[:, None] * P + o_p[None, :]  # [BLOCK_K, BLOCK_P]
        m_w = m_k[:, None] & m_p[None, :]
        acc = tl.dot(b_dzi.to(w_dtype), tl.load(p_w_hh + o_w, mask=m_w, other=0.0), acc,
                     input_precision=DOT_PRECISION)
        acc = tl.dot(b_dzf.to(w_dtype), tl.load(p_w_hh + H * P + o_w, mask=m_w, other=0.0), acc,
                     input_precision=DOT_PRECISION)
        acc = tl.dot(b_dzg.to(w_dtype), tl.load(p_w_hh + 2 * H * P + o_w, mask=m_w, other=0.0), acc,
                     input_precision=DOT_PRECISION)
        acc = tl.dot(b_dzo.to(w_dtype), tl.load(p_w_hh + 3 * H * P + o_w, mask=m_w, other=0.0), acc,
                     input_precision=DOT_PRECISION)

    o_bp = o_b[:, None] * P + o_p[None, :]
    m_bp = m_b[:, None] & m_p[None, :]
    if RMASK:  # h_{t-1} entered the product masked
        acc *= tl.load(p_rmask + o_bp, mask=m_bp, other=0.0).to(acc.dtype)
    if ZONE_H:  # + zh dh_t, the direct path (P = H: column p is unit p)
        o_rp = (row_x + o_b)[:, None] * H + o_p[None, :]
        b_dh_p = tl.load(p_dh + o_bp, mask=m_bp, other=0.0)
        if ADD_GY:
            b_dh_p += tl.load(p_gy + o_rp, mask=m_bp, other=0.0).to(acc.dtype)
        acc += tl.load(p_zh + o_rp, mask=m_bp, other=0.0).to(acc.dtype) * b_dh_p
    tl.store(p_dh_prev + o_bp, acc, mask=m_bp & m_prev)
    tl.store(p_dh0 + o_bp, acc, mask=m_bp & ~m_prev)
