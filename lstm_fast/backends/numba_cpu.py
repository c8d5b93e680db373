"""Numba CPU backend: the whole time loop, forward and BPTT, runs in compiled code.

Per step the recurrent product h_{t-1} @ W_hh^T is added to the precomputed gx[t]
and the gate activations and state update follow in the same compiled loop;
backward fuses the gate derivatives and runs dh_{t-1} = dgates_t @ W_hh per step.
dW_hh and dW_hr are single GEMMs over all T*B rows after the loop.

Threads: a call's time loop is split over torch.get_num_threads() threads by
hidden units. Each thread computes all four gates of its units (a product with
its slab of W_hh, packed once per call for a register-blocked SIMD kernel), their
activations and state update; then every thread waits for the step to be done
(see _claim). The threads are numba's (parallel=True, one launch per call).

Importing this module is cheap: numba is imported and the kernels are jitted
(cache=True, on disk) on first use by `_load()`. The kernels are plain Python
functions below; `_load()` rebinds each module-level name to its jitted
dispatcher, so they call each other through globals (closures would miss the
disk cache).
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import threading

import numpy as np
import torch

from .base import HALF_DTYPES, Backend, LayerSizes, graph_recorder, weight_grads

# Bytes of one SIMD vector of the product kernels (AVX2). On CPUs with narrower
# vectors LLVM splits each operation; the packing is the same.
_VEC_BYTES = 32

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

# float32 tanh as the odd/even minimax rational approximation that Eigen uses for its
# fast tanh: max abs error 3.5e-7 on [-20, 20] (measured against float64 tanh), and
# unlike libm's tanhf it vectorizes (numba has no SVML here).
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
           5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


# ----------------------------------------------------------------------------------
# Activations: these Python bodies are only the uncompiled meaning; _load() registers
# dtype-specific compiled versions (exact in float64, the rational tanh in float32).
def _tanh(x):
    return math.tanh(x)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------
# Synchronisation between the threads of one call. The work of each phase (one
# step's gate block, or its projection) is cut into nc chunks of hidden units
# (or projected columns). A thread first claims its own chunk, then any chunk
# nobody has claimed, then waits until all nc chunks of the phase are done. So a
# call finishes whatever number of threads the threading layer actually runs
# (even one: it takes every chunk), and a thread the OS has not scheduled yet
# does not hold the others up: its chunk is taken over.
# sync: int64 [(1 + nc) * _LINE]; slot 0 counts finished chunks over all phases,
# slot (1 + c) * _LINE holds the number of phases chunk c has been claimed for.
# Each counter has a 64-byte line of its own.
_LINE = 8
# Busy-wait iterations (with a pause hint) before a waiting thread starts yielding
# its core: 49 us on the 2-core EPYC (measured), longer than one step of the
# shapes where splitting pays, much shorter than an OS time slice.
_SPINS = 2000


def _claim(sync, c, phase):
    """True for exactly one caller per (chunk c, phase); phases count up from 0."""
    return _atomic_cas(sync, (1 + c) * _LINE, phase, phase + 1)


def _phase_end(sync, finished, nc, phase):
    """Publish `finished` chunks done by this thread, then wait for all of the phase."""
    if finished > 0:
        _atomic_add(sync, 0, finished)
    target = nc * (phase + 1)
    spins = 0
    while _atomic_load(sync, 0) < target:
        spins += 1
        if spins < _SPINS:
            _spin_pause()
        else:
            _yield_core()


# ----------------------------------------------------------------------------------
# Kernels (jitted by _load). Shapes: T steps, B rows, H hidden, P state (= H without
# projection), G = 4H; nc chunks, chunk c owning hidden units ucut[c]:ucut[c+1] and
# state columns pcut[c]:pcut[c+1] (the same cut when P = H). All arrays C-contiguous.

def _copy(dst, src, n):
    """dst[:n] = src[:n] as a plain loop (numba's slice assignment costs ~0.3 us a call)."""
    for j in range(n):
        dst[j] = src[j]


# Per-step products c[n, M] = x[n, K] @ S with S packed by _pack_slab: panels of PW = 2
# vectors of columns, panel p stored [K][PW] contiguous at p * K * PW of the flat
# slab, columns past M zero. A kernel keeps an MR x (NP panels) block of c in
# vector registers while it streams K: per k, one broadcast of x[r, k] per row
# and 2 * NP vector loads of S. 1 thread, float32, 2-core EPYC: 59-68 GFLOP/s
# for n >= 4 (LLVM's own vectorization of the same loops: 30-48) and 33-37 for
# n = 1, where every step streams the slab from L2.

# Elements of x per row block of _slab_gemm: 128 KiB of float32, a quarter of a
# core's L2 on the EPYC (the whole-sequence input projection has T*B rows).
_ROW_BLOCK_ELEMS = 32768


def _mk_6x1(x, r0, s, base, K, out, col):
    """out[r0:r0+6, col:col+PW] = x[r0:r0+6, :K] @ panel at s[base:] (12 accumulators:
    enough FMAs in flight to cover their latency)."""
    L = _lanes(s)
    PW = 2 * L
    a00 = _vzero(s)
    a01 = _vzero(s)
    a10 = _vzero(s)
    a11 = _vzero(s)
    a20 = _vzero(s)
    a21 = _vzero(s)
    a30 = _vzero(s)
    a31 = _vzero(s)
    a40 = _vzero(s)
    a41 = _vzero(s)
    a50 = _vzero(s)
    a51 = _vzero(s)
    x0 = x[r0]
    x1 = x[r0 + 1]
    x2 = x[r0 + 2]
    x3 = x[r0 + 3]
    x4 = x[r0 + 4]
    x5 = x[r0 + 5]
    for k in range(K):
        w0 = _vload(s, base + k * PW)
        w1 = _vload(s, base + k * PW + L)
        v = _vsplat(x0[k])
        a00 = _vfma(v, w0, a00)
        a01 = _vfma(v, w1, a01)
        v = _vsplat(x1[k])
        a10 = _vfma(v, w0, a10)
        a11 = _vfma(v, w1, a11)
        v = _vsplat(x2[k])
        a20 = _vfma(v, w0, a20)
        a21 = _vfma(v, w1, a21)
        v = _vsplat(x3[k])
        a30 = _vfma(v, w0, a30)
        a31 = _vfma(v, w1, a31)
        v = _vsplat(x4[k])
        a40 = _vfma(v, w0, a40)
        a41 = _vfma(v, w1, a41)
        v = _vsplat(x5[k])
        a50 = _vfma(v, w0, a50)
        a51 = _vfma(v, w1, a51)
    _vstore(out[r0], col, a00)
    _vstore(out[r0], col + L, a01)
    _vstore(out[r0 + 1], col, a10)
    _vstore(out[r0 + 1], col + L, a11)
    _vstore(out[r0 + 2], col, a20)
    _vstore(out[r0 + 2], col + L, a21)
    _vstore(out[r0 + 3], col, a30)
    _vstore(out[r0 + 3], col + L, a31)
    _vstore(out[r0 + 4], col, a40)
    _vstore(out[r0 + 4], col + L, a41)
    _vstore(out[r0 + 5], col, a50)
    _vstore(out[r0 + 5], col + L, a51)


def _mk_4x1(x, r0, s, base, K, out, col):
    """out[r0:r0+4, col:col+PW] = x[r0:r0+4, :K] @ panel at s[base:]. Written out like
    _mk_6x1: register blocks need named accumulators, numba cannot unroll them."""
    L = _lanes(s)
    PW = 2 * L
    a00 = _vzero(s)
    a01 = _vzero(s)
    a10 = _vzero(s)
    a11 = _vzero(s)
    a20 = _vzero(s)
    a21 = _vzero(s)
    a30 = _vzero(s)
    a31 = _vzero(s)
    x0 = x[r0]
    x1 = x[r0 + 1]
    x2 = x[r0 + 2]
    x3 = x[r0 + 3]
    for k in range(K):
        w0 = _vload(s, base + k * PW)
        w1 = _vload(s, base + k * PW + L)
        v = _vsplat(x0[k])
        a00 = _vfma(v, w0, a00)
        a01 = _vfma(v, w1, a01)
        v = _vsplat(x1[k])
        a10 = _vfma(v, w0, a10)
        a11 = _vfma(v, w1, a11)
        v = _vsplat(x2[k])
        a20 = _vfma(v, w0, a20)
        a21 = _vfma(v, w1, a21)
        v = _vsplat(x3[k])
        a30 = _vfma(v, w0, a30)
        a31 = _vfma(v, w1, a31)
    _vstore(out[r0], col, a00)
    _vstore(out[r0], col + L, a01)
    _vstore(out[r0 + 1], col, a10)
    _vstore(out[r0 + 1], col + L, a11)
    _vstore(out[r0 + 2], col, a20)
    _vstore(out[r0 + 2], col + L, a21)
    _vstore(out[r0 + 3], col, a30)
    _vstore(out[r0 + 3], col + L, a31)


def _mk_1x4(x, r, s, base, K, out, col):
    """out[r, col:col+4PW] = x[r, :K] @ the 4 panels from s[base:]."""
    L = _lanes(s)
    PW = 2 * L
    PS = K * PW
    a0 = _vzero(s)
    a1 = _vzero(s)
    a2 = _vzero(s)
    a3 = _vzero(s)
    a4 = _vzero(s)
    a5 = _vzero(s)
    a6 = _vzero(s)
    a7 = _vzero(s)
    xr = x[r]
    for k in range(K):
        v = _vsplat(xr[k])
        i = base + k * PW
        a0 = _vfma(v, _vload(s, i), a0)
        a1 = _vfma(v, _vload(s, i + L), a1)
        a2 = _vfma(v, _vload(s, i + PS), a2)
        a3 = _vfma(v, _vload(s, i + PS + L), a3)
        a4 = _vfma(v, _vload(s, i + 2 * PS), a4)
        a5 = _vfma(v, _vload(s, i + 2 * PS + L), a5)
        a6 = _vfma(v, _vload(s, i + 3 * PS), a6)
        a7 = _vfma(v, _vload(s, i + 3 * PS + L), a7)
    o = out[r]
    _vstore(o, col, a0)
    _vstore(o, col + L, a1)
    _vstore(o, col + PW, a2)
    _vstore(o, col + PW + L, a3)
    _vstore(o, col + 2 * PW, a4)
    _vstore(o, col + 2 * PW + L, a5)
    _vstore(o, col + 3 * PW, a6)
    _vstore(o, col + 3 * PW + L, a7)


def _mk_1x1(x, r, s, base, K, out, col):
    """out[r, col:col+PW] = x[r, :K] @ panel at s[base:]."""
    L = _lanes(s)
    PW = 2 * L
    a0 = _vzero(s)
    a1 = _vzero(s)
    xr = x[r]
    for k in range(K):
        v = _vsplat(xr[k])
        a0 = _vfma(v, _vload(s, base + k * PW), a0)
        a1 = _vfma(v, _vload(s, base + k * PW + L), a1)
    _vstore(out[r], col, a0)
    _vstore(out[r], col + L, a1)


def _slab_gemm(x, n, s, m, out):
    """out[:n, :ceil(m / PW) * PW] = x[:n] @ S for the first m columns of slab s.

    x [>=n, K] (rows contiguous); s flat packed slab (see above) with K rows;
    out [>=n, >= that width], not aliasing x or s. Columns past m get zeros."""
    K = x.shape[1]
    PW = 2 * _lanes(s)
    npan = (m + PW - 1) // PW
    # Rows: 6-row groups when there are at least 12 rows, then 4-row groups, then
    # single rows (each streams the whole slab for one row: the count of 6-row groups
    # leaves as few as it can, e.g. 32 = 4*6 + 2*4, 33 = 4*6 + 2*4 + 1). 1 thread, float32,
    # K=256, 512 columns: 6-row groups ran 72-84 GFLOP/s at 96 rows and 52-69 at
    # 1200 against 62-63 and 50-59 for 4-row ones.
    g6 = n // 6 if n >= 12 else 0
    if g6 > 0 and (n - 6 * g6) % 4 >= 2:  # one 6-row group fewer leaves fewer single rows
        g6 -= 1
    n6 = 6 * g6
    n4 = n6 + (n - n6) // 4 * 4
    # Blocks of ~_ROW_BLOCK_ELEMS elements of x (kept in L2), panel-outer within a
    # block: one panel (K * PW elements) stays in L1 across the block's row groups.
    rb = max(6, _ROW_BLOCK_ELEMS // K // 6 * 6)
    for r0 in range(0, n6, rb):
        r1 = min(r0 + rb, n6)
        for p in range(npan):
            for r in range(r0, r1, 6):
                _mk_6x1(x, r, s, p * K * PW, K, out, p * PW)
    for p in range(npan):
        for r in range(n6, n4, 4):
            _mk_4x1(x, r, s, p * K * PW, K, out, p * PW)
    np4 = npan - npan % 4
    for r in range(n4, n):
        for p in range(0, np4, 4):
            _mk_1x4(x, r, s, p * K * PW, K, out, p * PW)
        for p in range(np4, npan):
            _mk_1x1(x, r, s, p * K * PW, K, out, p * PW)


def _pack_slab(a, sel, m, by_column, s):
    """One chunk's slab s (flat, see _slab_gemm) of w^T, where w row j < m is
    a[sel[j], :] (by_column False) or a[:, sel[j]] (True); K is the other dimension
    of a. Padding columns get zeros."""
    PW = 2 * _lanes(s)
    K = a.shape[0] if by_column else a.shape[1]
    width = s.shape[0] // K  # npan * PW
    for j in range(m, width):
        base = j // PW * K * PW + j % PW
        for k in range(K):
            s[base + k * PW] = 0
    if by_column:
        # row k of a feeds row k of every panel: read a by rows, write runs of PW
        for k in range(K):
            row = a[k]
            for j in range(m):
                s[j // PW * K * PW + k * PW + j % PW] = row[sel[j]]
    else:
        for j in range(m):
            base = j // PW * K * PW + j % PW
            row = a[sel[j]]
            for k in range(K):
                s[base + k * PW] = row[k]


def _forward_units(cc, t, n, hprev, fused, gx2, gxc_c, bias, s_c, ucut, need_grad, has_proj,
                   y, h, c, gates, cells, hpre, z_c):
    """Step t, chunk cc: all four gates of units u0:u1 for the n active rows, then the
    cell and hidden update. The input projection of row b is gx2[t*B + b] (gate q at
    q*H + u0) or, when fused, the chunk's own gxc_c[t*B + b] (gate q at q*nj) plus
    bias [G]. s_c: the chunk's W_hh slab; z_c [B, >=4nj padded] scratch."""
    u0 = ucut[cc]
    nj = ucut[cc + 1] - u0
    if nj == 0:
        return
    B = y.shape[1]
    H = c.shape[1]
    # z_c[b] = [i | f | g | o] pre-activations (without gx) of this chunk's units
    _slab_gemm(hprev, n, s_c, 4 * nj, z_c)
    base, stride = (0, nj) if fused else (u0, H)
    for b in range(n):
        zb = z_c[b]
        gxb = gxc_c[t * B + b] if fused else gx2[t * B + b]
        # one pointer pair (plus bias) per loop so that each vectorizes
        for q in range(4):
            zq = zb[q * nj:(q + 1) * nj]
            gq = gxb[q * stride + base:q * stride + base + nj]
            bq = bias[q * H + u0:q * H + u0 + nj]
            if q == 2:
                for j in range(nj):
                    zq[j] = _tanh(zq[j] + gq[j] + bq[j])
            else:
                for j in range(nj):
                    zq[j] = _sigmoid(zq[j] + gq[j] + bq[j])
        zi = zb[:nj]
        zf = zb[nj:2 * nj]
        zg = zb[2 * nj:3 * nj]
        zo = zb[3 * nj:4 * nj]
        cb = c[b, u0:u0 + nj]
        hb = hpre[b, u0:u0 + nj] if has_proj else y[t, b, u0:u0 + nj]
        for j in range(nj):
            cn = zf[j] * cb[j] + zi[j] * zg[j]
            cb[j] = cn
            hb[j] = zo[j] * _tanh(cn)
        if not has_proj:
            _copy(h[b, u0:u0 + nj], hb, nj)
        if need_grad:
            gb = gates[t, b]
            for q in range(4):
                _copy(gb[q * H + u0:q * H + u0 + nj], zb[q * nj:(q + 1) * nj], nj)
            _copy(cells[t, b, u0:u0 + nj], cb, nj)


def _forward_proj(cc, t, n, hpre, sr_c, pcut, y, h, z_c):
    """Step t, chunk cc: projected state columns p0:p1 = hpre @ W_hr[p0:p1]^T."""
    p0 = pcut[cc]
    npc = pcut[cc + 1] - p0
    if npc == 0:
        return
    _slab_gemm(hpre, n, sr_c, npc, z_c)
    for b in range(n):
        zb = z_c[b, :npc]
        _copy(y[t, b, p0:p0 + npc], zb, npc)
        _copy(h[b, p0:p0 + npc], zb, npc)


def _forward_worker(k, nc, sync, fused, gx2, x2, w_ih, sel_i, cnt_i, si, gxc, bias, h0, bs, reverse, need_grad,
                    has_proj, ucut, pcut, w_hh, sel_w, cnt_w, sw, w_hr, sel_r, cnt_r, sr, y, h, c, gates, cells, hpre,
                    z):
    """Thread k's part of the forward time loop (see _claim for the scheme).
    Input projection: gx2 [T*B, G] precomputed, or when fused, phase 0 computes each
    chunk's gxc[cc] [T*B, 4nj padded] = x2 [T*B, I] @ its W_ih slab si[cc] (W_ih rows
    sel_i[cc, :cnt_i[cc]]); bias [G] is added per step (zeros when gx2 holds it).
    h0 [B,P]; bs [T] active rows per step. Slabs per chunk cc: sw[cc] of
    W_hh^T [P, 4nj] (its units' gates in [i|f|g|o] blocks), sr[cc] of W_hr^T[:, p0:p1]
    [H, npc]. In/out: c [B,H] c0 -> c_n; out: h [B,P] h_n (rows at their last active
    step), y [T,B,P] (inactive rows untouched), gates [T,B,G] and cells [T,B,H] when
    need_grad. Scratch: hpre [B,H], z [nc, B, padded width]. Phase 0 packs the slabs
    (each by the thread that is likely to use it) from w_hh rows sel_w[cc, :cnt_w[cc]]
    and w_hr rows sel_r[cc, :cnt_r[cc]]."""
    T = y.shape[0]
    done = 0
    for i in range(nc):
        cc = (k + i) % nc
        if _claim(sync, cc, 0):
            _pack_slab(w_hh, sel_w[cc], cnt_w[cc], False, sw[cc])
            if has_proj:
                _pack_slab(w_hr, sel_r[cc], cnt_r[cc], False, sr[cc])
            if fused:
                _pack_slab(w_ih, sel_i[cc], cnt_i[cc], False, si[cc])
                _slab_gemm(x2, x2.shape[0], si[cc], cnt_i[cc], gxc[cc])
            done += 1
    _phase_end(sync, done, nc, 0)
    phase = 1
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = bs[t]
        hprev = h0 if s == 0 else y[t + 1 if reverse else t - 1]
        done = 0
        for i in range(nc):
            cc = (k + i) % nc
            if _claim(sync, cc, phase):
                _forward_units(cc, t, n, hprev, fused, gx2, gxc[cc], bias, sw[cc], ucut, need_grad, has_proj,
                               y, h, c, gates, cells, hpre, z[cc])
                done += 1
        _phase_end(sync, done, nc, phase)
        phase += 1
        if has_proj:
            done = 0
            for i in range(nc):
                cc = (k + i) % nc
                if _claim(sync, cc, phase):
                    _forward_proj(cc, t, n, hpre, sr[cc], pcut, y, h, z[cc])
                    done += 1
            _phase_end(sync, done, nc, phase)
            phase += 1


def _forward_parallel(nc, sync, fused, gx2, x2, w_ih, sel_i, cnt_i, si, gxc, bias, h0, bs, reverse, need_grad,
                      has_proj, ucut, pcut, w_hh, sel_w, cnt_w, sw, w_hr, sel_r, cnt_r, sr, y, h, c, gates, cells,
                      hpre, z):
    for k in prange(nc):
        _forward_worker(k, nc, sync, fused, gx2, x2, w_ih, sel_i, cnt_i, si, gxc, bias, h0, bs, reverse, need_grad,
                        has_proj, ucut, pcut, w_hh, sel_w, cnt_w, sw, w_hr, sel_r, cnt_r, sr, y, h, c, gates, cells,
                        hpre, z)


def _backward_carry(cc, tn, nn, dg, sb_c, pcut, dh, z_c):
    """dh[:nn, p0:p1] = dg[tn, :nn] @ W_hh[:, p0:p1]: the gradient reaching h of the
    step before tn (rows not active at tn keep theirs)."""
    p0 = pcut[cc]
    npc = pcut[cc + 1] - p0
    if npc == 0:
        return
    _slab_gemm(dg[tn], nn, sb_c, npc, z_c)
    for b in range(nn):
        _copy(dh[b, p0:p0 + npc], z_c[b, :npc], npc)


def _backward_units(cc, s, t, tp, n, gates, cells, c0, grad_y, dr_all, sr_c, ucut, has_proj,
                    dh, dc, dg, hpre_all, z_c, tc, one):
    """Step t, chunk cc: gate derivatives of units u0:u1 and dc_{t-1}; with a projection
    first the gradient reaching h_pre = d_r[t] @ W_hr[:, u0:u1]. tp: the step before t
    in processing order (s > 0). tc [>=nj] scratch."""
    u0 = ucut[cc]
    nj = ucut[cc + 1] - u0
    if nj == 0:
        return
    H = dc.shape[1]
    if has_proj:
        _slab_gemm(dr_all[t], n, sr_c, nj, z_c)
    for b in range(n):
        gb = gates[t, b]
        ig = gb[u0:u0 + nj]
        fg = gb[H + u0:H + u0 + nj]
        gg = gb[2 * H + u0:2 * H + u0 + nj]
        og = gb[3 * H + u0:3 * H + u0 + nj]
        cp = c0[b, u0:u0 + nj] if s == 0 else cells[tp, b, u0:u0 + nj]
        cl = cells[t, b, u0:u0 + nj]
        for j in range(nj):
            tc[j] = _tanh(cl[j])
        if has_proj:
            hp = hpre_all[t, b, u0:u0 + nj]
            for j in range(nj):
                hp[j] = og[j] * tc[j]
            dhv = z_c[b, :nj]
        else:
            dhv = dh[b, u0:u0 + nj]
            gy = grad_y[t, b, u0:u0 + nj]
            for j in range(nj):
                dhv[j] += gy[j]
        db = dg[t, b]
        di = db[u0:u0 + nj]
        df = db[H + u0:H + u0 + nj]
        dgg = db[2 * H + u0:2 * H + u0 + nj]
        do = db[3 * H + u0:3 * H + u0 + nj]
        dcb = dc[b, u0:u0 + nj]
        for j in range(nj):
            dcv = dcb[j] + dhv[j] * og[j] * (one - tc[j] * tc[j])
            di[j] = dcv * gg[j] * (ig[j] - ig[j] * ig[j])
            df[j] = dcv * cp[j] * (fg[j] - fg[j] * fg[j])
            dgg[j] = dcv * ig[j] * (one - gg[j] * gg[j])
            do[j] = dhv[j] * tc[j] * (og[j] - og[j] * og[j])
            dcb[j] = dcv * fg[j]


def _backward_worker(k, nc, sync, gates, cells, c0, grad_y, bs, reverse, has_proj, ucut, pcut,
                     w_hh, sel_w, cnt_w, sb, w_hr, sel_r, cnt_r, sr, dh, dc, dg, dr_all, hpre_all, z, tcs, one):
    """Thread k's part of BPTT over the saved gates [T,B,G] and cells [T,B,H]. Slabs
    per chunk cc: sb[cc] of W_hh[:, p0:p1] [G, npc], sr[cc] of W_hr[:, u0:u1] [P, nj].
    In/out: dh [B,P] grad_h_n -> d_h0, dc [B,H] grad_c_n -> d_c0. Out: dg [T,B,G]
    (= d_gx; inactive rows untouched); with a projection dr_all [T,B,P] (gradient
    reaching each projected output) and hpre_all [T,B,H] (o*tanh(c), recomputed), the
    operands of dW_hr. Scratch: z [nc, B, padded width], tcs [nc, >=nj]. Phase 0 packs
    the slabs from w_hh columns sel_w[cc, :cnt_w[cc]], w_hr columns sel_r[cc, :cnt_r[cc]]."""
    T = gates.shape[0]
    done = 0
    for i in range(nc):
        cc = (k + i) % nc
        if _claim(sync, cc, 0):
            _pack_slab(w_hh, sel_w[cc], cnt_w[cc], True, sb[cc])
            if has_proj:
                _pack_slab(w_hr, sel_r[cc], cnt_r[cc], True, sr[cc])
            done += 1
    _phase_end(sync, done, nc, 0)
    phase = 1
    tn = -1  # the step processed before t here (the later one in forward order)
    for s in range(T - 1, -1, -1):
        t = T - 1 - s if reverse else s
        tp = t + 1 if reverse else t - 1  # the step before t in forward order (s > 0)
        n = bs[t]
        # Phase 1, by state columns: finish dh (from step tn) and, with a projection,
        # the gradient reaching y[t]. Without a projection the column and unit cuts
        # coincide and phase 2 only reads its own columns: one phase does both.
        done = 0
        for i in range(nc):
            cc = (k + i) % nc
            if _claim(sync, cc, phase):
                if tn >= 0:
                    _backward_carry(cc, tn, bs[tn], dg, sb[cc], pcut, dh, z[cc])
                if has_proj:
                    p0 = pcut[cc]
                    p1 = pcut[cc + 1]
                    for b in range(n):
                        drb = dr_all[t, b, p0:p1]
                        dhb = dh[b, p0:p1]
                        gyb = grad_y[t, b, p0:p1]
                        for j in range(p1 - p0):
                            drb[j] = dhb[j] + gyb[j]
                else:
                    _backward_units(cc, s, t, tp, n, gates, cells, c0, grad_y, dr_all, sr[cc], ucut, has_proj,
                                    dh, dc, dg, hpre_all, z[cc], tcs[cc], one)
                done += 1
        _phase_end(sync, done, nc, phase)
        phase += 1
        if has_proj:
            done = 0
            for i in range(nc):
                cc = (k + i) % nc
                if _claim(sync, cc, phase):
                    _backward_units(cc, s, t, tp, n, gates, cells, c0, grad_y, dr_all, sr[cc], ucut, has_proj,
                                    dh, dc, dg, hpre_all, z[cc], tcs[cc], one)
                    done += 1
            _phase_end(sync, done, nc, phase)
            phase += 1
        tn = t
    # the first step's dg reaches h0
    done = 0
    for i in range(nc):
        cc = (k + i) % nc
        if _claim(sync, cc, phase):
            _backward_carry(cc, tn, bs[tn], dg, sb[cc], pcut, dh, z[cc])
            done += 1
    _phase_end(sync, done, nc, phase)


def _backward_parallel(nc, sync, gates, cells, c0, grad_y, bs, reverse, has_proj, ucut, pcut,
                       w_hh, sel_w, cnt_w, sb, w_hr, sel_r, cnt_r, sr, dh, dc, dg, dr_all, hpre_all, z, tcs, one):
    for k in prange(nc):
        _backward_worker(k, nc, sync, gates, cells, c0, grad_y, bs, reverse, has_proj, ucut, pcut,
                         w_hh, sel_w, cnt_w, sb, w_hr, sel_r, cnt_r, sr, dh, dc, dg, dr_all, hpre_all, z, tcs, one)


_KERNELS = ("_claim", "_phase_end", "_copy", "_pack_slab", "_mk_6x1", "_mk_4x1", "_mk_1x4", "_mk_1x1", "_slab_gemm", "_forward_units", "_forward_proj", "_forward_worker",
            "_backward_carry", "_backward_units", "_backward_worker")
_PARALLEL_KERNELS = ("_forward_parallel", "_backward_parallel")


# ----------------------------------------------------------------------------------
# Lazy compilation

_lock = threading.Lock()
_loaded = False


def _cache_dir_ok() -> bool:
    """Numba caches next to this file (__pycache__), else in the user cache dir; when
    neither is writable, point it at a temp folder (NUMBA_CACHE_DIR is respected)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    try:
        os.makedirs(here, exist_ok=True)
        return os.access(here, os.W_OK)
    except OSError:
        return False


def _intrinsics(numba):
    """LLVM-level helpers numba lacks: atomics and wait hints on int64 array elements
    (for _claim/_phase_end) and SIMD vectors of _VEC_BYTES (for the product kernels)."""
    import platform

    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model

    def element(context, builder, aryty, ary, idx):
        return cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, ary),
                                        [idx])

    @intrinsic
    def atomic_add(typingctx, arr, idx, val):
        def codegen(context, builder, sig, args):
            ptr = element(context, builder, sig.args[0], args[0], args[1])
            return builder.atomic_rmw("add", ptr, args[2], "seq_cst")
        return types.int64(arr, idx, val), codegen

    @intrinsic
    def atomic_load(typingctx, arr, idx):
        def codegen(context, builder, sig, args):
            return builder.load_atomic(element(context, builder, sig.args[0], args[0], args[1]), "acquire", 8)
        return types.int64(arr, idx), codegen

    @intrinsic
    def atomic_cas(typingctx, arr, idx, expected, new):
        def codegen(context, builder, sig, args):
            ptr = element(context, builder, sig.args[0], args[0], args[1])
            pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
            return builder.extract_value(pair, 1)
        return types.boolean(arr, idx, expected, new), codegen

    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

    @intrinsic
    def spin_pause(typingctx):
        def codegen(context, builder, sig, args):
            if is_x86:  # tells the core this is a spin-wait (saves power, frees the sibling)
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse2.pause")
                builder.call(fn, [])
            return context.get_dummy_value()
        return types.void(), codegen

    has_yield = os.name == "posix"

    @intrinsic
    def yield_core(typingctx):
        def codegen(context, builder, sig, args):
            if has_yield:  # libc's sched_yield, resolved in the process at load time
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                    "sched_yield")
                builder.call(fn, [])
            return context.get_dummy_value()
        return types.void(), codegen

    class VecType(types.Type):
        """A SIMD vector of dtype filling _VEC_BYTES, held in one register."""

        def __init__(self, dtype):
            self.dtype = dtype
            self.lanes = _VEC_BYTES * 8 // dtype.bitwidth
            super().__init__(name=f"lstm_fast_vec({dtype}x{self.lanes})")

    @register_model(VecType)
    class VecModel(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            elem = dmm.lookup(fe_type.dtype).get_value_type()
            super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.lanes))

    @intrinsic
    def lanes(typingctx, arr):
        n = _VEC_BYTES * 8 // arr.dtype.bitwidth

        def codegen(context, builder, sig, args):
            return ir.Constant(ir.IntType(64), n)
        return types.int64(arr), codegen

    @intrinsic
    def vzero(typingctx, arr):
        vt = VecType(arr.dtype)

        def codegen(context, builder, sig, args):
            return ir.Constant(context.get_value_type(vt), None)
        return vt(arr), codegen

    @intrinsic
    def vload(typingctx, arr, idx):  # unaligned load of arr[idx:idx + lanes]
        vt = VecType(arr.dtype)

        def codegen(context, builder, sig, args):
            ptr = element(context, builder, sig.args[0], args[0], args[1])
            vptr = builder.bitcast(ptr, context.get_value_type(vt).as_pointer())
            return builder.load(vptr, align=arr.dtype.bitwidth // 8)
        return vt(arr, idx), codegen

    @intrinsic
    def vstore(typingctx, arr, idx, v):  # arr[idx:idx + lanes] = v
        def codegen(context, builder, sig, args):
            ptr = element(context, builder, sig.args[0], args[0], args[1])
            builder.store(args[2], builder.bitcast(ptr, args[2].type.as_pointer()), align=arr.dtype.bitwidth // 8)
            return context.get_dummy_value()
        return types.void(arr, idx, v), codegen

    @intrinsic
    def vsplat(typingctx, x):  # every lane = x
        vt = VecType(x)

        def codegen(context, builder, sig, args):
            ty = context.get_value_type(vt)
            one = builder.insert_element(ir.Constant(ty, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), [0] * vt.lanes)
            return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined), zeros)
        return vt(x), codegen

    @intrinsic
    def vfma(typingctx, a, b, c):  # a * b + c, fused where the CPU has FMA
        def codegen(context, builder, sig, args):
            ty = args[0].type
            bits = 32 if isinstance(ty.element, ir.FloatType) else 64
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]),
                                                f"llvm.fmuladd.v{ty.count}f{bits}")
            return builder.call(fn, list(args))
        return a(a, b, c), codegen

    return {"_atomic_add": atomic_add, "_atomic_load": atomic_load, "_atomic_cas": atomic_cas,
            "_spin_pause": spin_pause, "_yield_core": yield_core, "_lanes": lanes, "_vzero": vzero,
            "_vload": vload, "_vstore": vstore, "_vsplat": vsplat, "_vfma": vfma}


# LLVM fast-math flags of every kernel and activation. nnan/ninf are left out so that
# NaN and inf propagate as in torch: with them (fastmath=True) LLVM folded the
# activation's saturation test to true for a NaN input, giving tanh(NaN) = 1.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}


def _load():
    """Import numba, register the activations and jit the kernels (once per process)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        import numba
        from numba import types
        from numba.extending import overload

        f32 = np.float32
        clamp = f32(_TANH_CLAMP)
        p1, p3, p5, p7, p9, p11, p13 = (f32(v) for v in _TANH_P)
        q0, q2, q4, q6 = (f32(v) for v in _TANH_Q)
        half = f32(0.5)
        one = f32(1.0)

        def tanh32(x):
            x2 = x * x
            p = x2 * p13 + p11
            p = x2 * p + p9
            p = x2 * p + p7
            p = x2 * p + p5
            p = x2 * p + p3
            p = x2 * p + p1
            q = x2 * q6 + q4
            q = x2 * q + q2
            q = x2 * q + q0
            # Past the clamp: exactly +-1, as torch gives (true tanh is within 2.7e-7 of
            # it), so saturated gates get exactly zero derivative and sigmoid(-inf) = 0;
            # the rational part (inf/inf there for huge x) is not taken. NaN fails both
            # tests and stays NaN through x * p / q (clamping x first lost it).
            return one if x >= clamp else (-one if x <= -clamp else x * p / q)

        @overload(_tanh, jit_options={"fastmath": _FASTMATH, "error_model": "numpy"})
        def _ov_tanh(x):
            if x == types.float32:
                return tanh32
            return lambda x: np.tanh(x)

        @overload(_sigmoid, jit_options={"fastmath": _FASTMATH, "error_model": "numpy"})
        def _ov_sigmoid(x):
            if x == types.float32:
                return lambda x: half * _tanh(half * x) + half
            return lambda x: 1.0 / (1.0 + np.exp(-x))

        if not _cache_dir_ok():
            os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lstm_fast_numba_")
            numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
        # omp first: a parallel launch took 4.5 us with it and 125 us with workqueue on the
        # 2-core EPYC (tbb is rarely installed). Correctness does not depend on the layer
        # (see _claim); a layer the user chose through numba's variables is kept.
        if not any(os.environ.get(v) for v in ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY")):
            numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
        g = globals()
        g.update(_intrinsics(numba))
        g["prange"] = numba.prange
        for name in _KERNELS + _PARALLEL_KERNELS:
            opts = dict(nogil=True, fastmath=_FASTMATH, error_model="numpy", boundscheck=False)
            if name in _PARALLEL_KERNELS:
                opts["parallel"] = True
            else:
                # No reference counting: the kernels allocate nothing, and every array
                # view would otherwise update its parent's count atomically, from both
                # threads on the same counters (_forward_units had 18 increfs and 52
                # decrefs in its LLVM IR, _forward_worker 43 and 90; now none).
                opts["_nrt"] = False
            try:
                g[name] = numba.njit(cache=True, **opts)(g[name])
            except RuntimeError:  # no cache locator usable: compile without a cache
                g[name] = numba.njit(cache=False, **opts)(g[name])
        _loaded = True


_TYPESTR = {dt: np.dtype(npdt).str for dt, npdt in ((torch.float32, np.float32), (torch.float64, np.float64),
                                                     (torch.int64, np.int64))}


class _TensorMemory:
    """A tensor's memory as numpy's __array_interface__; holds the tensor alive."""

    __slots__ = ("tensor", "__array_interface__")


def _np(t, dtype=None):
    """t (converted to dtype if given) as a C-contiguous numpy array: a view of t's memory
    when t already is one. Not Tensor.numpy(): that marks the storage non-resizable for
    good, and FSDP2 then fails to free an unsharded parameter (storage.resize_(0))."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    t = t.contiguous()
    memory = _TensorMemory()
    memory.tensor = t
    memory.__array_interface__ = {"data": (t.data_ptr(), False), "shape": t.shape, "typestr": _TYPESTR[t.dtype],
                                  "version": 3}
    return np.asarray(memory)


def _state(t, dtype):
    """A contiguous copy of t in dtype, allocated by torch, for the kernels to update in place."""
    t = t.detach()
    return t.clone(memory_format=torch.contiguous_format) if t.dtype == dtype else t.to(dtype).contiguous()


# A call splits its time loop over threads only when a step has at least this many
# multiply-adds, B * 4H * P (each step ends in one or two waits for all chunks).
# T=100, fp32, 2 chunks vs 1 on the 2-core EPYC (a neighbour busy on one core),
# forward / backward: 4096 (B=1,H=32) 0.65x / 0.79x; 16384 (B=1,H=64) 1.02x / 0.92x;
# 32768 (B=2,H=64) 1.14x / 0.96x; 65536 (B=1,H=128 and B=4,H=64) 1.2x / 1.1x.
# LSTM_FAST_NUMBA_SPLIT_MIN overrides it (0: always split).
_SPLIT_MIN = int(os.environ.get("LSTM_FAST_NUMBA_SPLIT_MIN", 65536))


# The process that started numba's thread pool. A child forked from it runs its
# calls on one thread: numba's GNU OpenMP layer aborts a forked child's first
# parallel launch ("fork() called from a process already using GNU OpenMP").
_pool_pid = None
# numba's workqueue layer aborts on concurrent launches from two threads; launches
# are serialised (calls from several threads then take turns, none crashes).
_launch_lock = threading.Lock()


def _chunks(B, H, P):
    """Chunks (= threads asked for) of one call: torch's thread count, capped by numba's pool."""
    import numba

    if _pool_pid not in (None, os.getpid()):
        return 1
    nt = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    return nt if nt > 1 and B * 4 * H * P >= _SPLIT_MIN else 1


def _team(nc):
    """Threads the parallel launch runs with (a hook for tests of smaller teams)."""
    return nc


@functools.lru_cache(maxsize=64)
def _cuts(N, nc):
    """(Cached: never written.) nc + 1 boundaries cutting range(N) into parts of whole 8-element vectors
    (parts differ by at most one vector), so the pointwise loops rarely have tails."""
    units = (N + 7) // 8
    return np.array([min(N, units * i // nc * 8) for i in range(nc + 1)], dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _widest(N, nc):
    """(Cached.) The largest part of _cuts(N, nc) (np.max on the cuts costs ~9 us a call)."""
    return int(np.diff(_cuts(N, nc)).max())


def _slab(a, N, nc, by_column, blocks=1, stride=0):
    """Arguments for the workers to pack chunk slabs of a (_pack_slab) in their first
    phase: (a, sel [nc, max], counts [nc], slabs [nc, npan * K * PW] to fill), numpy.
    Chunk c's rows (or columns) of a are q * stride + j for q < blocks and j in its
    part of range(N) (_cuts)."""
    sel, counts, most = _chunk_index(N, nc, blocks, stride)
    pw = 2 * _VEC_BYTES // a.itemsize
    K = a.shape[0] if by_column else a.shape[1]
    npan = max(1, -(-most // pw))
    return a, sel, counts, np.empty((nc, npan * K * pw), a.dtype)


@functools.lru_cache(maxsize=64)
def _no_slab(dtype, nc):
    """(Cached: never written.) _slab's arguments for a slab the call does not use."""
    return _dummy(dtype, (0, 0)), np.zeros((nc, 1), np.int64), np.zeros(nc, np.int64), np.empty((nc, 0), dtype)


@functools.lru_cache(maxsize=64)
def _dummy(dtype, shape):
    """(Cached: never read or written.) An empty array standing for an unused argument;
    shape keeps the leading chunk dimension where the kernels take a view per chunk."""
    return np.empty(shape, dtype)


@functools.lru_cache(maxsize=64)
def _zeros(n, dtype):
    """(Cached: never written.)"""
    return np.zeros(n, dtype)


def _scratch(dtype, B, *slabs):
    """Per-chunk product outputs [nc, B, width], width the widest slab's padded columns."""
    width = max(sl[3].shape[1] // (sl[0].shape[0] if by_col else sl[0].shape[1])
                for sl, by_col in slabs if sl[0].size)
    return np.empty((slabs[0][0][3].shape[0], B, width), dtype)


@functools.lru_cache(maxsize=64)
def _chunk_index(N, nc, blocks, stride):
    """(Cached: never written.) See _slab."""
    cut = _cuts(N, nc)
    sizes = np.diff(cut)
    sel = np.zeros((len(sizes), max(1, int(sizes.max()) * blocks)), dtype=np.int64)
    for c, n in enumerate(sizes):
        sel[c, :n * blocks] = (np.arange(blocks)[:, None] * stride + cut[c] + np.arange(n)[None, :]).ravel()
    return sel, sizes * blocks, int(sizes.max()) * blocks


@functools.lru_cache(maxsize=64)
def _full_batch(T, B):
    """(Cached: never written.) Active rows per step without packing."""
    return np.full(T, B, dtype=np.int64)


def _launch(parallel, worker, nc, *args):
    """Run worker(k, nc, *args) for k < nc: directly for one chunk (no thread pool),
    else on a numba team of _team(nc) threads, numba's thread count restored after."""
    global _pool_pid
    if nc == 1:
        worker(0, 1, *args)
        return
    import numba

    with _launch_lock:
        _pool_pid = os.getpid()
        before = numba.get_num_threads()
        numba.set_num_threads(min(_team(nc), numba.config.NUMBA_NUM_THREADS))
        try:
            parallel(nc, *args)
        finally:
            numba.set_num_threads(before)


class NumbaBackend(Backend):
    name = "numba"
    widens_16bit = True  # float16/bfloat16 calls run in float32 (function._run)

    def is_available(self):
        try:
            import numba  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            return False, f"numba unavailable: {type(exc).__name__}: {exc}"
        return True, f"numba {numba.__version__}"

    def supports(self, device, dtype, sizes: LayerSizes):
        if torch.device(device).type != "cpu":
            return False, f"numba backend runs on CPU only, got device {device}"
        if dtype not in _DTYPES and dtype not in HALF_DTYPES:
            return False, f"numba backend supports float32, float64 (and 16-bit, in float32), got {dtype}"
        recorder = graph_recorder()
        if recorder:
            return False, f"numba kernels run outside torch, so {recorder} cannot record them (cpp can)"
        return True, "CPU float32/float64 (16-bit widened to float32)"

    @staticmethod
    def _plan(T, B, H, P, batch_sizes):
        """(active rows per step, chunks, unit cut, column cut)"""
        if batch_sizes is None:
            bs = _full_batch(T, B)
        else:
            bs = _np(batch_sizes.detach().cpu(), torch.int64)
        nc = _chunks(B, H, P)
        return bs, nc, _cuts(H, nc), _cuts(P, nc)

    def forward(self, gx, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad):
        return self._forward(gx, None, None, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad)

    def forward_projected(self, x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad):
        # The input projection runs inside the parallel launch: each thread computes
        # its chunk's gate columns for all T*B rows with the step's product kernel
        # (no separate GEMM call, no [T,B,4H] tensor through torch).
        return self._forward(x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad)

    def _forward(self, x, w_ih, bias, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad):
        """x is gx [T,B,4H] when w_ih is None, else the layer input [T,B,I]."""
        _load()
        fused = w_ih is not None
        T, B = x.shape[:2]
        H = w_hh.shape[0] // 4
        G = 4 * H
        P = h0.shape[-1]
        dt = x.dtype
        npdt = _DTYPES[dt]
        has_proj = w_hr is not None
        if T == 0 or B == 0:  # nothing to run: the states pass through
            saved = (x.new_zeros(T, B, G), x.new_zeros(T, B, H)) if need_grad else ()
            y = x.new_zeros(T, B, P)
            return y, h0.detach().clone(), c0.detach().clone(), (*saved, y) if need_grad else ()
        bs, nc, ucut, pcut = self._plan(T, B, H, P, batch_sizes)
        pack_w = _slab(_np(w_hh, dt), H, nc, False, 4, H)
        pack_r = _slab(_np(w_hr, dt), P, nc, False) if has_proj else _no_slab(npdt, nc)
        x2 = _np(x, dt).reshape(T * B, -1)
        if fused:
            pack_i = _slab(_np(w_ih, dt), H, nc, False, 4, H)
            gxc = np.empty((nc, T * B, pack_i[3].shape[1] // x2.shape[1]), npdt)
            bias_n = _np(bias, dt) if bias is not None else _zeros(G, npdt)
            gx2 = _dummy(npdt, (0, 0))
        else:
            pack_i = _no_slab(npdt, nc)
            gxc = _dummy(npdt, (nc, 0, 0))
            bias_n = _zeros(G, npdt)
            gx2 = x2
        packed = batch_sizes is not None
        y = x.new_zeros(T, B, P) if packed else x.new_empty(T, B, P)  # inactive rows stay 0
        h0n = _np(h0, dt)
        h = _state(h0, dt)
        c = _state(c0, dt)
        if need_grad:
            # Saved for backward, per step: activated gates (4H) and cell state (H) per
            # row, 5*B*H*itemsize bytes (20*B*H in float32), plus y, which is the output.
            gates = x.new_empty(T, B, G)
            cells = x.new_empty(T, B, H)
            gates_n, cells_n = _np(gates), _np(cells)
        else:
            gates_n = cells_n = _dummy(npdt, (0, 0, 0))
        hpre = np.empty((B, H), npdt) if has_proj else _dummy(npdt, (0, 0))
        z = _scratch(npdt, B, (pack_w, False), (pack_r, False))
        sync = np.zeros((1 + nc) * _LINE, dtype=np.int64)
        _launch(_forward_parallel, _forward_worker, nc, sync, fused, gx2, x2, *pack_i, gxc, bias_n, h0n, bs,
                bool(reverse), bool(need_grad), has_proj, ucut, pcut, *pack_w, *pack_r, _np(y), _np(h),
                _np(c), gates_n, cells_n, hpre, z)
        saved = (gates, cells, y) if need_grad else ()
        return y, h.to(h0.dtype), c.to(c0.dtype), saved

    def backward(self, saved, grad_y, grad_hn, grad_cn, h0, c0, w_hh, w_hr, batch_sizes, reverse):
        _load()
        gates, cells, y = saved
        T, B, G = gates.shape
        H = G // 4
        dt = gates.dtype
        npdt = _DTYPES[dt]
        P = y.shape[-1]
        has_proj = w_hr is not None
        if T == 0 or B == 0:  # no step ran: the final-state gradients reach h0 and c0 unchanged
            return (grad_y.new_zeros(T, B, G), grad_hn.detach().clone().to(h0.dtype),
                    grad_cn.detach().clone().to(c0.dtype), torch.zeros_like(w_hh),
                    None if w_hr is None else torch.zeros_like(w_hr))
        bs, nc, ucut, pcut = self._plan(T, B, H, P, batch_sizes)
        pack_w = _slab(_np(w_hh, dt), P, nc, True)
        pack_r = _slab(_np(w_hr, dt), H, nc, True) if has_proj else _no_slab(npdt, nc)
        dh = _state(grad_hn, dt)
        dc = _state(grad_cn, dt)
        packed = batch_sizes is not None
        alloc = gates.new_zeros if packed else gates.new_empty  # inactive rows stay 0
        dg = alloc(T, B, G)
        if has_proj:
            dr_all = alloc(T, B, P)
            hpre_all = alloc(T, B, H)
            dr_n, hpre_n = _np(dr_all), _np(hpre_all)
        else:
            dr_all = hpre_all = None
            dr_n = hpre_n = _dummy(npdt, (0, 0, 0))
        z = _scratch(npdt, B, (pack_w, True), (pack_r, True))
        tcs = np.empty((nc, _widest(H, nc)), npdt)
        sync = np.zeros((1 + nc) * _LINE, dtype=np.int64)
        _launch(_backward_parallel, _backward_worker, nc, sync, _np(gates), _np(cells), _np(c0, dt),
                _np(grad_y, dt), bs, bool(reverse), has_proj, ucut, pcut, *pack_w, *pack_r, _np(dh), _np(dc),
                _np(dg), dr_n, hpre_n, z, tcs, npdt(1))
        d_w_hh, d_w_hr = weight_grads(dg, y, h0.detach(), reverse, dr_all, hpre_all)
        return (dg.to(grad_y.dtype), dh.to(h0.dtype), dc.to(c0.dtype), d_w_hh.to(w_hh.dtype),
                None if d_w_hr is None else d_w_hr.to(w_hr.dtype))
