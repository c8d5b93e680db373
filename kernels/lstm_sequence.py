"""Whole-sequence LSTM kernels: one launch runs all T steps (small H, no projection).

Dimension glossary
    T   sequence length (runtime)
    B   rows of h0 / c0: the batch (runtime)
    R   rows of a per-step tensor (gx, y, gates, cells, their gradients), read as
        [R, width]: T*B in the padded layout (step t's rows start at t*B), N =
        sum(batch_sizes) in PackedSequence's (step t's rows start at row0[t], a table)
    n   rows active at step t: batch_sizes[t] when PACKED, else B (runtime); they are
        batch rows 0 .. n - 1 at rows row0[t] .. row0[t] + n - 1
    H   hidden size = recurrent state size (no projection here; compile time)
    B_BUCKET  power-of-two bucket of B: only the autotune key (runtime int)
    HP  H padded to a power of two >= 16 (tl.arange and tl.dot need it)
    G   4H: gates i, f, g, o stacked in nn.LSTM's order
Blocks
    BLOCK_B  batch rows per program; the grid is cdiv(B, BLOCK_B) programs,
             each independent for all T steps (no grid-wide synchronisation)

Each program loads the four gate tiles of W_hh once, keeps them on chip, and
carries h and c (forward) or dh and dc (backward) in registers from step to
step, so a step costs no launch and no round trip of the state through
memory. The weights take 4*HP*HP elements per program, which is what bounds H
(seq_max_h in lstm_fast/backends/triton_gpu.py: 64 for fp32, 128 for fp16/bf16;
bench/NOTES_triton.md#sequence-kernel-limits).

Packed input needs nothing more than the row table: a row inactive at a step keeps
its registers, so a sequence that ends (forward) holds its final state, and one that
has not started yet (REVERSE, which runs t = T-1 .. 0) still holds its h0 / c0.
"""
import triton
import triton.language as tl

from .cell import cell_bwd, cell_fwd
from .common import configs

# Candidates: no GPU timing yet, autotune picks; chosen from sm_90 resource reports at the largest
# HP each dtype allows (bench/NOTES_triton.md#sequence-kernel-configs).
# BLOCK_B 16: the smallest tensor-core M, the most programs at small B; 32/64 where shared memory fits.
# num_warps 8/16 spread the weight tiles: at 4 warps fp32 HP=64 spills 808 B, at 8 fp16 HP=128 spills 32 B.
# num_stages 2: lets the compiler prefetch gx[t+1], which does not depend on h (not measured).
_SEQ_GPU = [
    triton.Config({"BLOCK_B": bb}, num_warps=w, num_stages=2)
    for bb, w in ((16, 4), (16, 8), (16, 16), (32, 4), (32, 8), (64, 8))
]
# Interpreter: one config; 16 puts the tests' B=17 on two programs.
_SEQ_INTERP = triton.Config({"BLOCK_B": 16}, num_warps=4)
# 200 KB: the 227 KB a block may use, less a margin for the estimate in _prune
# (bench/NOTES_triton.md#sequence-shared-memory-estimate).
_SMEM_BUDGET = 200 * 1024
_SMEM_TILES = 14  # [BLOCK_B, HP] staging tiles of the backward, fitted to the resource reports


def _prune(configs_, named_args, **kwargs):
    """Drop configs whose batch tile is mostly padding or whose shared memory would not fit."""
    args = {**named_args, **kwargs}  # constexprs arrive as keyword arguments
    b, hp = args["B_BUCKET"], args["HP"]
    wb = args["p_w_hh"].element_size()
    keep = [c for c in configs_
            if c.kwargs["BLOCK_B"] <= max(16, b)  # 16: the smallest candidate
            and 4 * hp * hp * wb + _SMEM_TILES * c.kwargs["BLOCK_B"] * hp * wb <= _SMEM_BUDGET
            and (c.num_warps < 16 or hp >= 128)]  # 16 warps only where 8 spill (16-bit, HP=128)
    # Nothing fits only beyond the launcher's H limits: one config then, the compiler decides.
    return keep or configs_[:1]


@triton.autotune(configs=configs(_SEQ_GPU, _SEQ_INTERP), key=["H", "B_BUCKET", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["T", "B", "B_BUCKET"])
def lstm_fwd_seq_kernel(
    p_gx,     # [R, G] input projection with both biases, activation dtype
    p_w_hh,   # [G, H] recurrent weight (nn.LSTM layout), activation dtype
    p_h0,     # [B, H] initial hidden state, activation dtype
    p_c0,     # [B, H] initial cell state, any float dtype
    p_y,      # [R, H] out: h_t of every step, activation dtype
    p_cells,  # [R, H] fp32 out: c_t of every step (SAVE only)
    p_gates,  # [R, G] fp32 out: activations i, f, g, o (SAVE only)
    p_bs,     # [T] int32 active rows per step (PACKED only)
    p_row0,   # [T] int64 first row of each step (PACKED only)
    p_hn,     # [B, H] out: h_n, activation dtype
    p_cn,     # [B, H] out: c_n, fp32
    T, B,
    B_BUCKET, H: tl.constexpr, HP: tl.constexpr,
    REVERSE: tl.constexpr, PACKED: tl.constexpr, SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
):
    G: tl.constexpr = 4 * H
    w_dtype = p_w_hh.dtype.element_ty
    pid = tl.program_id(0)
    o_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_j = tl.arange(0, HP)
    m_b = o_b < B
    m_j = o_j < H
    m_bj = m_b[:, None] & m_j[None, :]
    o_bj = o_b[:, None] * H + o_j[None, :]

    # W^T per gate, [HP (k), HP (j)]: element (k, j) = w_hh[q*H + j, k]; padding is 0.
    o_w = o_j[None, :] * H + o_j[:, None]
    m_w = m_j[:, None] & m_j[None, :]
    b_wi = tl.load(p_w_hh + o_w, mask=m_w, other=0.0)
    b_wf = tl.load(p_w_hh + H * H + o_w, mask=m_w, other=0.0)
    b_wg = tl.load(p_w_hh + 2 * H * H + o_w, mask=m_w, other=0.0)
    b_wo = tl.load(p_w_hh + 3 * H * H + o_w, mask=m_w, other=0.0)

    b_h = tl.load(p_h0 + o_bj, mask=m_bj, other=0.0).to(tl.float32)
    b_c = tl.load(p_c0 + o_bj, mask=m_bj, other=0.0).to(tl.float32)
    for s in range(T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        if PACKED:
            n = tl.load(p_bs + t)
            row0 = tl.load(p_row0 + t)
        else:
            n = B
            row0 = tl.cast(t, tl.int64) * B
        m_act = o_b < n
        m_a = m_act[:, None] & m_j[None, :]
        o_rows = row0 + o_b[:, None]  # [BLOCK_B, 1] this step's rows
        o_gx = o_rows * G + o_j[None, :]
        b_hw = b_h.to(w_dtype)
        acc_i = tl.dot(b_hw, b_wi, tl.load(p_gx + o_gx, mask=m_a, other=0.0).to(tl.float32),
                       input_precision=DOT_PRECISION)
        acc_f = tl.dot(b_hw, b_wf, tl.load(p_gx + o_gx + H, mask=m_a, other=0.0).to(tl.float32),
                       input_precision=DOT_PRECISION)
        acc_g = tl.dot(b_hw, b_wg, tl.load(p_gx + o_gx + 2 * H, mask=m_a, other=0.0).to(tl.float32),
                       input_precision=DOT_PRECISION)
        acc_o = tl.dot(b_hw, b_wo, tl.load(p_gx + o_gx + 3 * H, mask=m_a, other=0.0).to(tl.float32),
                       input_precision=DOT_PRECISION)
        b_i, b_f, b_g, b_o, b_c_new, b_h_new = cell_fwd(acc_i, acc_f, acc_g, acc_o, b_c)
        # Inactive (packed) rows keep their state.
        b_c = tl.where(m_act[:, None], b_c_new, b_c)
        b_h = tl.where(m_act[:, None], b_h_new, b_h)
        o_rh = o_rows * H + o_j[None, :]
        tl.store(p_y + o_rh, b_h_new.to(p_y.dtype.element_ty), mask=m_a)
        if SAVE:
            tl.store(p_cells + o_rh, b_c_new, mask=m_a)
            tl.store(p_gates + o_gx, b_i, mask=m_a)
            tl.store(p_gates + o_gx + H, b_f, mask=m_a)
            tl.store(p_gates + o_gx + 2 * H, b_g, mask=m_a)
            tl.store(p_gates + o_gx + 3 * H, b_o, mask=m_a)
    tl.store(p_hn + o_bj, b_h.to(p_hn.dtype.element_ty), mask=m_bj)
    tl.store(p_cn + o_bj, b_c, mask=m_bj)


@triton.autotune(configs=configs(_SEQ_GPU, _SEQ_INTERP), key=["H", "B_BUCKET", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["T", "B", "B_BUCKET"])
def lstm_bwd_seq_kernel(
    p_gates,   # [R, G] fp32 saved activations i, f, g, o
    p_cells,   # [R, H] fp32 saved cell states c_t
    p_c0,      # [B, H] fp32 initial cell state
    p_w_hh,    # [G, H] recurrent weight, activation dtype
    p_gy,      # [R, H] gradient of y, activation dtype
    p_dhn,     # [B, H] fp32 gradient of h_n
    p_dcn,     # [B, H] fp32 gradient of c_n
    p_bs,      # [T] int32 active rows per step (PACKED only)
    p_row0,    # [T] int64 first row of each step (PACKED only)
    p_dgates,  # [R, G] fp32 out: gate pre-activation gradients
    p_dh0,     # [B, H] fp32 out: gradient of h0
    p_dc0,     # [B, H] fp32 out: gradient of c0
    T, B,
    B_BUCKET, H: tl.constexpr, HP: tl.constexpr,
    REVERSE: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
):
    G: tl.constexpr = 4 * H
    w_dtype = p_w_hh.dtype.element_ty
    pid = tl.program_id(0)
    o_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_j = tl.arange(0, HP)
    m_b = o_b < B
    m_j = o_j < H
    m_bj = m_b[:, None] & m_j[None, :]
    o_bj = o_b[:, None] * H + o_j[None, :]

    # W_hh per gate as stored, [HP (k: unit of the gate), HP (p)]: dh_{t-1} = sum_q dz_q @ W_q.
    o_w = o_j[:, None] * H + o_j[None, :]
    m_w = m_j[:, None] & m_j[None, :]
    b_wi = tl.load(p_w_hh + o_w, mask=m_w, other=0.0)
    b_wf = tl.load(p_w_hh + H * H + o_w, mask=m_w, other=0.0)
    b_wg = tl.load(p_w_hh + 2 * H * H + o_w, mask=m_w, other=0.0)
    b_wo = tl.load(p_w_hh + 3 * H * H + o_w, mask=m_w, other=0.0)

    b_dh = tl.load(p_dhn + o_bj, mask=m_bj, other=0.0)
    b_dc = tl.load(p_dcn + o_bj, mask=m_bj, other=0.0)
    for r in range(T):  # processing order run backwards
        # t_prev: the step processed before t in forward (its rows hold c_{t-1}), clamped at the ends
        if REVERSE:
            t = r
            first = t == T - 1
            t_prev = tl.minimum(t + 1, T - 1)
        else:
            t = T - 1 - r
            first = t == 0
            t_prev = tl.maximum(t - 1, 0)
        if PACKED:
            n = tl.load(p_bs + t)
            row0 = tl.load(p_row0 + t)
            n_prev = tl.minimum(n, tl.load(p_bs + t_prev))
            row_prev = tl.load(p_row0 + t_prev)
        else:
            n = B
            row0 = tl.cast(t, tl.int64) * B
            n_prev = B
            row_prev = tl.cast(t_prev, tl.int64) * B
        # rows >= n_prev start at this step from c0 (all rows at the first processed step)
        n_prev = tl.where(first, 0, n_prev)
        m_act = o_b < n
        m_a = m_act[:, None] & m_j[None, :]
        m_prev = (o_b < n_prev)[:, None]
        o_rows = row0 + o_b[:, None]  # [BLOCK_B, 1] this step's rows
        o_g = o_rows * G + o_j[None, :]
        o_rh = o_rows * H + o_j[None, :]
        b_i = tl.load(p_gates + o_g, mask=m_a, other=0.0)
        b_f = tl.load(p_gates + o_g + H, mask=m_a, other=0.0)
        b_g = tl.load(p_gates + o_g + 2 * H, mask=m_a, other=0.0)
        b_o = tl.load(p_gates + o_g + 3 * H, mask=m_a, other=0.0)
        b_c = tl.load(p_cells + o_rh, mask=m_a, other=0.0)
        # one load through per-row pointers: the previous step's row, or c0's
        p_c_rows = tl.where(m_prev, p_cells + (row_prev + o_b[:, None]) * H, p_c0 + o_b[:, None] * H)
        b_c_prev = tl.load(p_c_rows + o_j[None, :], mask=m_a, other=0.0)
        # Gradient reaching h_t: through step t+1 and from y[t].
        b_dht = b_dh + tl.load(p_gy + o_rh, mask=m_a, other=0.0).to(tl.float32)
        b_dzi, b_dzf, b_dzg, b_dzo, b_dc_prev = cell_bwd(b_dht, b_dc, b_i, b_f, b_g, b_o, b_c, b_c_prev)
        tl.store(p_dgates + o_g, b_dzi, mask=m_a)
        tl.store(p_dgates + o_g + H, b_dzf, mask=m_a)
        tl.store(p_dgates + o_g + 2 * H, b_dzg, mask=m_a)
        tl.store(p_dgates + o_g + 3 * H, b_dzo, mask=m_a)

        b_dh_new = tl.dot(b_dzi.to(w_dtype), b_wi, input_precision=DOT_PRECISION)
        b_dh_new = tl.dot(b_dzf.to(w_dtype), b_wf, b_dh_new, input_precision=DOT_PRECISION)
        b_dh_new = tl.dot(b_dzg.to(w_dtype), b_wg, b_dh_new, input_precision=DOT_PRECISION)
        b_dh_new = tl.dot(b_dzo.to(w_dtype), b_wo, b_dh_new, input_precision=DOT_PRECISION)
        # Inactive rows keep their gradient: of their final state before their last step
        # (forward), of their h0 / c0 after their first (REVERSE).
        b_dh = tl.where(m_act[:, None], b_dh_new, b_dh)
        b_dc = tl.where(m_act[:, None], b_dc_prev, b_dc)
    tl.store(p_dh0 + o_bj, b_dh, mask=m_bj)
    tl.store(p_dc0 + o_bj, b_dc, mask=m_bj)
