"""The forward and backward time loops, one worker per thread (kernels, jitted by jit.load).

Shapes: T steps, B rows, H hidden units, P state columns (= H without projection),
G = 4H. Per-step arrays are 2-D [rows, width]: step t is rows row0[t] .. row0[t] +
batch_sizes[t] - 1 (t*B .. for a padded batch, PackedSequence's layout when packed;
lstm_fast/backends/base.py). The units are cut into n_chunks chunks: chunk c owns hidden units
unit_cuts[c]:unit_cuts[c + 1] and state columns col_cuts[c]:col_cuts[c + 1] (the same
cut when P = H). A worker claims chunks phase by phase (sync.py). All arrays are
C-contiguous.

The workers take their arrays in bundles (tuples, unpacked on entry):
    flags        forward (fused, reverse, need_grad, has_proj, has_rmask, has_zc, has_zh), backward
                 (reverse, has_proj, has_rmask, has_zc, has_zh): the last three say which
                 regulariser masks (backends/base.py StepMasks) the call has
    masks        forward (rmask [B, P], hm [2, B, P] h_{t-1} * rmask by step parity, zc
                 [rows, H], zh [rows, P]); backward (rmask, carry [B, P] scratch, zc, zh);
                 empty arrays for those off
    cuts         (unit_cuts [n_chunks + 1], col_cuts [n_chunks + 1])
    *_slabs      (weight, index [n_chunks, most], counts [n_chunks], slabs [n_chunks, size]):
                 chunk c's slab of a weight, packed in phase 0 by gemm.pack_chunk_slab
Plain tuples rather than namedtuples: numba types a namedtuple argument in Python
on every call (bench/NOTES_numba.md#kernel-arguments).
"""
from __future__ import annotations

from . import cell, gemm, sync

# numba.prange once jit.load() has bound it.
prange = range


def copy_into(dst, src, n):
    """dst[:n] = src[:n] as a plain loop (bench/NOTES_numba.md#traps: slice assignment is slow)."""
    for j in range(n):
        dst[j] = src[j]


def forward_units(chunk, r0, n_rows, h_prev, with_prev, flags, cuts, inputs, gx_chunk, slab, out, saved, h_pre,
                  product, masks, r_prev, n_prev):
    """One step (rows r0 .. r0 + n_rows - 1), one chunk: all four gates of its hidden
    units u0:u1, then their cell and hidden update. h_{t-1} of the first with_prev rows
    is h_prev (the previous step's y rows); the others start from h0 at this step.

    The input projection of row b is gx_rows[r0 + b] (gate q at q*H + u0) or, when
    fused, the chunk's own gx_chunk[r0 + b] (gate q at q*n_units) plus bias [G].
    slab: the chunk's W_hh slab; product [B, >= 4 n_units, padded]: scratch.
    Zoneout reads the unmasked h_{t-1}: y rows r_prev .. for the first n_prev rows, else h0."""
    fused, _, need_grad, has_proj, has_rmask, has_zc, has_zh = flags
    rmask, hm, zc, zh = masks
    unit_cuts = cuts[0]
    u0 = unit_cuts[chunk]
    n_units = unit_cuts[chunk + 1] - u0
    if n_units == 0:
        return
    _, gx_rows, bias, h0, _, _ = inputs
    y, h, c = out
    gates, cells = saved
    H = c.shape[1]
    # product[b] = [i | f | g | o] pre-activations (without the input projection) of the chunk's units
    if with_prev > 0:
        gemm.slab_gemm(h_prev, with_prev, slab, 4 * n_units, product)
    if n_rows > with_prev:
        gemm.slab_gemm(h0[with_prev:], n_rows - with_prev, slab, 4 * n_units, product[with_prev:])
    start, stride = (0, n_units) if fused else (u0, H)
    for b in range(n_rows):
        zb = product[b]
        gxb = gx_chunk[r0 + b] if fused else gx_rows[r0 + b]
        # one pointer pair (plus bias) per loop, so that each vectorizes
        for q in range(4):
            zq = zb[q * n_units:(q + 1) * n_units]
            gq = gxb[q * stride + start:q * stride + start + n_units]
            bq = bias[q * H + u0:q * H + u0 + n_units]
            if q == 2:
                for j in range(n_units):
                    zq[j] = cell.tanh(zq[j] + gq[j] + bq[j])
            else:
                for j in range(n_units):
                    zq[j] = cell.sigmoid(zq[j] + gq[j] + bq[j])
        gate_i = zb[:n_units]
        gate_f = zb[n_units:2 * n_units]
        gate_g = zb[2 * n_units:3 * n_units]
        gate_o = zb[3 * n_units:4 * n_units]
        cb = c[b, u0:u0 + n_units]
        hb = h_pre[b, u0:u0 + n_units] if has_proj else y[r0 + b, u0:u0 + n_units]
        if has_zc:  # c_t = c~_t + zc (c_{t-1} - c~_t); h~_t reads c~_t
            zcb = zc[r0 + b, u0:u0 + n_units]
            for j in range(n_units):
                c_new = cell.new_cell(gate_f[j], cb[j], gate_i[j], gate_g[j])
                cb[j] = c_new + zcb[j] * (cb[j] - c_new)
                hb[j] = cell.new_hidden(gate_o[j], cell.tanh(c_new))
        else:
            for j in range(n_units):
                c_new = cell.new_cell(gate_f[j], cb[j], gate_i[j], gate_g[j])
                cb[j] = c_new
                hb[j] = cell.new_hidden(gate_o[j], cell.tanh(c_new))
        if not has_proj:
            zone_h(b, r0, u0, n_units, r_prev, n_prev, y, h0, zh, rmask, hm, has_zh, has_rmask)
            copy_into(h[b, u0:u0 + n_units], hb, n_units)
        if need_grad:
            gb = gates[r0 + b]
            for q in range(4):
                copy_into(gb[q * H + u0:q * H + u0 + n_units], zb[q * n_units:(q + 1) * n_units], n_units)
            copy_into(cells[r0 + b, u0:u0 + n_units], cb, n_units)


def zone_h(b, r0, e0, n_cols, r_prev, n_prev, y, h0, zh, rmask, hm, has_zh, has_rmask):
    """Row b's state columns e0:e0 + n_cols of y_t: hidden zoneout against h_{t-1} (y row
    r_prev + b when b < n_prev, else h0), then the masked copy for the next step (hm)."""
    yb = y[r0 + b, e0:e0 + n_cols]
    if has_zh:
        hp = y[r_prev + b, e0:e0 + n_cols] if b < n_prev else h0[b, e0:e0 + n_cols]
        zb = zh[r0 + b, e0:e0 + n_cols]
        for j in range(n_cols):
            yb[j] = yb[j] + zb[j] * (hp[j] - yb[j])
    if has_rmask:
        mb = rmask[b, e0:e0 + n_cols]
        nb = hm[b, e0:e0 + n_cols]
        for j in range(n_cols):
            nb[j] = yb[j] * mb[j]


def forward_proj(chunk, r0, n_rows, h_pre, slab, col_cuts, out, product, flags, h0, masks, r_prev, n_prev):
    """One step (rows r0 ..), one chunk: projected state columns p0:p1 = h_pre @ W_hr[p0:p1]^T,
    then hidden zoneout and the masked copy (zone_h)."""
    p0 = col_cuts[chunk]
    n_cols = col_cuts[chunk + 1] - p0
    if n_cols == 0:
        return
    y, h, _ = out
    has_rmask, has_zh = flags[4], flags[6]
    rmask, hm, _, zh = masks
    gemm.slab_gemm(h_pre, n_rows, slab, n_cols, product)
    for b in range(n_rows):
        zb = product[b, :n_cols]
        copy_into(y[r0 + b, p0:p0 + n_cols], zb, n_cols)
        zone_h(b, r0, p0, n_cols, r_prev, n_prev, y, h0, zh, rmask, hm, has_zh, has_rmask)
        copy_into(h[b, p0:p0 + n_cols], y[r0 + b, p0:p0 + n_cols], n_cols)


def forward_worker(thread, n_chunks, counters, flags, cuts, inputs, w_ih_slabs, w_hh_slabs, w_hr_slabs, out, saved,
                   scratch, masks):
    """This thread's part of the forward time loop (thread: its prange index).

    inputs   (x_rows [rows, I] the layer input when fused, gx_rows [rows, G] the
             precomputed input projection otherwise, bias [G] (zeros when gx_rows holds
             it), h0 [B, P], batch_sizes [T] active rows per step, row0 [T] their first row)
    *_slabs  of W_ih, W_hh and W_hr, by rows: chunk c's slab of W_hh^T [P, 4 n_units]
             (its units' gates in [i|f|g|o] blocks), of W_ih^T likewise, of
             W_hr^T[:, p0:p1] [H, n_cols]
    out      (y [rows, P]; h [B, P] h_n, rows at their last active step; c [B, H] c0
             in, c_n out)
    saved    (gates [rows, G], cells [rows, H]) for backward, when need_grad
    scratch  (gx_chunks [n_chunks, rows, padded 4 n_units] the fused input projection,
             computed in phase 0; h_pre [B, H]; products [n_chunks, B, padded width])
    """
    fused, reverse, _, has_proj, has_rmask = flags[:5]
    x_rows, _, _, h0, batch_sizes, row0 = inputs
    rmask, hm, zc, zh = masks
    ih_slabs = w_ih_slabs[3]
    hh_slabs = w_hh_slabs[3]
    hr_slabs = w_hr_slabs[3]
    y = out[0]
    gx_chunks, h_pre, products = scratch
    T = batch_sizes.shape[0]
    done = 0
    for i in range(n_chunks):
        chunk = (thread + i) % n_chunks
        if sync.claim(counters, chunk, 0):
            gemm.pack_chunk_slab(w_hh_slabs, chunk, False)
            if has_proj:
                gemm.pack_chunk_slab(w_hr_slabs, chunk, False)
            if fused:
                gemm.pack_chunk_slab(w_ih_slabs, chunk, False)
                gemm.slab_gemm(x_rows, x_rows.shape[0], ih_slabs[chunk], w_ih_slabs[2][chunk], gx_chunks[chunk])
            done += 1
    sync.phase_end(counters, done, n_chunks, 0)
    phase = 1
    for step in range(T):
        t = T - 1 - step if reverse else step
        n_rows = batch_sizes[t]
        r0 = row0[t]
        with_prev = 0  # rows whose h_{t-1} is the previous step's y (the others start at h0)
        h_prev = y[r0:r0]
        r_prev = 0
        if step > 0:
            t_prev = t + 1 if reverse else t - 1
            with_prev = min(n_rows, batch_sizes[t_prev])
            r_prev = row0[t_prev]
            h_prev = y[r_prev:r_prev + with_prev]
        n_prev = with_prev
        # this step writes the masked h_t into the other parity of hm
        step_masks = (rmask, hm[(step + 1) % 2], zc, zh)
        gemm_prev, gemm_with_prev = h_prev, with_prev
        if has_rmask:  # every row's masked h_{t-1} (h0 * mask for rows not yet written)
            gemm_prev, gemm_with_prev = hm[step % 2][:n_rows], n_rows
        done = 0
        for i in range(n_chunks):
            chunk = (thread + i) % n_chunks
            if sync.claim(counters, chunk, phase):
                forward_units(chunk, r0, n_rows, gemm_prev, gemm_with_prev, flags, cuts, inputs, gx_chunks[chunk],
                              hh_slabs[chunk], out, saved, h_pre, products[chunk], step_masks, r_prev, n_prev)
                done += 1
        sync.phase_end(counters, done, n_chunks, phase)
        phase += 1
        if has_proj:
            done = 0
            for i in range(n_chunks):
                chunk = (thread + i) % n_chunks
                if sync.claim(counters, chunk, phase):
                    forward_proj(chunk, r0, n_rows, h_pre, hr_slabs[chunk], cuts[1], out, products[chunk], flags, h0,
                                 step_masks, r_prev, n_prev)
                    done += 1
            sync.phase_end(counters, done, n_chunks, phase)
            phase += 1


def forward_parallel(n_chunks, counters, flags, cuts, inputs, w_ih_slabs, w_hh_slabs, w_hr_slabs, out, saved,
                     scratch, masks):
    """forward_worker on a team of threads, one prange iteration each."""
    for thread in prange(n_chunks):
        started = sync.work_started()
        forward_worker(thread, n_chunks, counters, flags, cuts, inputs, w_ih_slabs, w_hh_slabs, w_hr_slabs, out, saved,
                       scratch, masks)
        sync.work_done(counters, n_chunks, started)


def backward_carry(chunk, r_next, n_next, d_gates, slab, col_cuts, dh, product, masks, has_rmask, has_zh):
    """dh[:n_next, p0:p1] = d_gates[rows r_next ..] @ W_hh[:, p0:p1]: the gradient reaching h
    of the step before that one (rows not active there keep theirs); times the recurrent
    mask, plus hidden zoneout's direct part (carry) when those are on."""
    p0 = col_cuts[chunk]
    n_cols = col_cuts[chunk + 1] - p0
    if n_cols == 0:
        return
    gemm.slab_gemm(d_gates[r_next:], n_next, slab, n_cols, product)
    rmask, carry, _, _ = masks
    for b in range(n_next):
        dhb = dh[b, p0:p0 + n_cols]
        copy_into(dhb, product[b, :n_cols], n_cols)
        if has_rmask:
            mb = rmask[b, p0:p0 + n_cols]
            for j in range(n_cols):
                dhb[j] *= mb[j]
        if has_zh:
            kb = carry[b, p0:p0 + n_cols]
            for j in range(n_cols):
                dhb[j] += kb[j]


def output_grad(chunk, r0, n_rows, col_cuts, dh, grad_y, d_r, masks, has_zh):
    """d_r[r0 + b, p0:p1] = dh + grad_y: the gradient reaching the projected output of a step
    (with hidden zoneout, zh of it is carried to h_{t-1} instead)."""
    p0 = col_cuts[chunk]
    p1 = col_cuts[chunk + 1]
    _, carry, _, zh = masks
    for b in range(n_rows):
        drb = d_r[r0 + b, p0:p1]
        dhb = dh[b, p0:p1]
        gyb = grad_y[r0 + b, p0:p1]
        for j in range(p1 - p0):
            drb[j] = dhb[j] + gyb[j]
        if has_zh:
            kb = carry[b, p0:p1]
            zb = zh[r0 + b, p0:p1]
            for j in range(p1 - p0):
                kb[j] = zb[j] * drb[j]
                drb[j] -= kb[j]


def backward_units(chunk, r0, r_prev, with_prev, n_rows, inputs, slab, unit_cuts, has_proj, grads, proj_grads,
                   product, tanh_c, one, masks, has_zc, has_zh):
    """One step (rows r0 ..), one chunk: gate derivatives of its units u0:u1 and dc_{t-1};
    with a projection first the gradient reaching h_pre, d_r @ W_hr[:, u0:u1] (slab).
    c_{t-1} of the first with_prev rows is in cells at rows r_prev ..; the others started
    from c0 at this step. tanh_c [>= n_units]: scratch."""
    u0 = unit_cuts[chunk]
    n_units = unit_cuts[chunk + 1] - u0
    if n_units == 0:
        return
    gates, cells, c0, grad_y, _, _ = inputs
    dh, dc, d_gates = grads
    d_r, h_pre = proj_grads
    H = dc.shape[1]
    if has_proj:
        gemm.slab_gemm(d_r[r0:], n_rows, slab, n_units, product)
    for b in range(n_rows):
        gb = gates[r0 + b]
        gate_i = gb[u0:u0 + n_units]
        gate_f = gb[H + u0:H + u0 + n_units]
        gate_g = gb[2 * H + u0:2 * H + u0 + n_units]
        gate_o = gb[3 * H + u0:3 * H + u0 + n_units]
        c_prev = cells[r_prev + b, u0:u0 + n_units] if b < with_prev else c0[b, u0:u0 + n_units]
        c_t = cells[r0 + b, u0:u0 + n_units]
        if has_zc:  # cells hold c_t; the gates saw c~_t = f c_{t-1} + i g
            for j in range(n_units):
                tanh_c[j] = cell.tanh(cell.new_cell(gate_f[j], c_prev[j], gate_i[j], gate_g[j]))
        else:
            for j in range(n_units):
                tanh_c[j] = cell.tanh(c_t[j])
        if has_proj:
            hp = h_pre[r0 + b, u0:u0 + n_units]
            for j in range(n_units):
                hp[j] = cell.new_hidden(gate_o[j], tanh_c[j])
            dh_b = product[b, :n_units]
        else:
            dh_b = dh[b, u0:u0 + n_units]
            gy = grad_y[r0 + b, u0:u0 + n_units]
            for j in range(n_units):
                dh_b[j] += gy[j]
            if has_zh:  # zh of the gradient reaching h_t goes straight to h_{t-1}
                kb = masks[1][b, u0:u0 + n_units]
                zb = masks[3][r0 + b, u0:u0 + n_units]
                for j in range(n_units):
                    kb[j] = zb[j] * dh_b[j]
                    dh_b[j] -= kb[j]
        db = d_gates[r0 + b]
        d_i = db[u0:u0 + n_units]
        d_f = db[H + u0:H + u0 + n_units]
        d_g = db[2 * H + u0:2 * H + u0 + n_units]
        d_o = db[3 * H + u0:3 * H + u0 + n_units]
        dc_b = dc[b, u0:u0 + n_units]
        if has_zc:  # c_t = zc c_{t-1} + (1 - zc) c~_t
            zcb = masks[2][r0 + b, u0:u0 + n_units]
            for j in range(n_units):
                kept = zcb[j] * dc_b[j]
                d_i[j], d_f[j], d_g[j], d_o[j], dc_prev = cell.cell_grads(
                    dc_b[j] - kept, dh_b[j], gate_o[j], tanh_c[j], gate_g[j], gate_i[j], c_prev[j], gate_f[j], one)
                dc_b[j] = dc_prev + kept
        else:
            for j in range(n_units):
                d_i[j], d_f[j], d_g[j], d_o[j], dc_b[j] = cell.cell_grads(
                    dc_b[j], dh_b[j], gate_o[j], tanh_c[j], gate_g[j], gate_i[j], c_prev[j], gate_f[j], one)


def backward_worker(thread, n_chunks, counters, flags, cuts, inputs, w_hh_slabs, w_hr_slabs, grads, proj_grads, scratch,
                    one, masks):
    """This thread's part of BPTT (thread: its prange index).

    inputs      (gates [rows, G] and cells [rows, H] saved by forward, c0 [B, H],
                grad_y [rows, P], batch_sizes [T], row0 [T])
    *_slabs     of W_hh and W_hr, by columns: chunk c's slab of W_hh[:, p0:p1] [G, n_cols],
                of W_hr[:, u0:u1] [P, n_units]
    grads       (dh [B, P] grad_h_n in, d_h0 out; dc [B, H] grad_c_n in, d_c0 out;
                d_gates [rows, G] out, = d_gx)
    proj_grads  with a projection, out: (d_r [rows, P] the gradient reaching each projected
                output, h_pre [rows, H] = o * tanh(c) recomputed): the operands of dW_hr
    scratch     (products [n_chunks, B, padded width], tanh_c [n_chunks, >= n_units])
    one         1 in the dtype of the arrays: a literal 1.0 would widen float32 math to float64
    """
    reverse, has_proj, has_rmask, has_zc, has_zh = flags
    unit_cuts, col_cuts = cuts
    _, _, _, grad_y, batch_sizes, row0 = inputs
    hh_slabs = w_hh_slabs[3]
    hr_slabs = w_hr_slabs[3]
    dh, _, d_gates = grads
    d_r = proj_grads[0]
    products, tanh_c = scratch
    T = batch_sizes.shape[0]
    done = 0
    for i in range(n_chunks):
        chunk = (thread + i) % n_chunks
        if sync.claim(counters, chunk, 0):
            gemm.pack_chunk_slab(w_hh_slabs, chunk, True)
            if has_proj:
                gemm.pack_chunk_slab(w_hr_slabs, chunk, True)
            done += 1
    sync.phase_end(counters, done, n_chunks, 0)
    phase = 1
    t_next = -1  # the step processed before t here (the later one in forward order)
    for step in range(T - 1, -1, -1):
        t = T - 1 - step if reverse else step
        n_rows = batch_sizes[t]
        r0 = row0[t]
        r_prev = 0
        with_prev = 0  # rows whose c_{t-1} is the previous step's (the others started at c0)
        if step > 0:
            t_prev = t + 1 if reverse else t - 1  # the step before t in forward order
            r_prev = row0[t_prev]
            with_prev = min(n_rows, batch_sizes[t_prev])
        # Phase 1, by state columns: finish dh (from step t_next) and, with a projection, the gradient
        # reaching y[t]; without one the column and unit cuts coincide, so the unit phase joins it.
        done = 0
        for i in range(n_chunks):
            chunk = (thread + i) % n_chunks
            if sync.claim(counters, chunk, phase):
                if t_next >= 0:
                    backward_carry(chunk, row0[t_next], batch_sizes[t_next], d_gates, hh_slabs[chunk], col_cuts, dh,
                                   products[chunk], masks, has_rmask, has_zh)
                if has_proj:
                    output_grad(chunk, r0, n_rows, col_cuts, dh, grad_y, d_r, masks, has_zh)
                else:
                    backward_units(chunk, r0, r_prev, with_prev, n_rows, inputs, hr_slabs[chunk], unit_cuts, has_proj,
                                   grads, proj_grads, products[chunk], tanh_c[chunk], one, masks, has_zc, has_zh)
                done += 1
        sync.phase_end(counters, done, n_chunks, phase)
        phase += 1
        if has_proj:
            done = 0
            for i in range(n_chunks):
                chunk = (thread + i) % n_chunks
                if sync.claim(counters, chunk, phase):
                    backward_units(chunk, r0, r_prev, with_prev, n_rows, inputs, hr_slabs[chunk], unit_cuts, has_proj,
                                   grads, proj_grads, products[chunk], tanh_c[chunk], one, masks, has_zc, False)
                    done += 1
            sync.phase_end(counters, done, n_chunks, phase)
            phase += 1
        t_next = t
    # the first step's d_gates reach h0
    done = 0
    for i in range(n_chunks):
        chunk = (thread + i) % n_chunks
        if sync.claim(counters, chunk, phase):
            backward_carry(chunk, row0[t_next], batch_sizes[t_next], d_gates, hh_slabs[chunk], col_cuts, dh,
                           products[chunk], masks, has_rmask, has_zh)
            done += 1
    sync.phase_end(counters, done, n_chunks, phase)


def backward_parallel(n_chunks, counters, flags, cuts, inputs, w_hh_slabs, w_hr_slabs, grads, proj_grads, scratch,
                      one, masks):
    """backward_worker on a team of threads, one prange iteration each."""
    for thread in prange(n_chunks):
        started = sync.work_started()
        backward_worker(thread, n_chunks, counters, flags, cuts, inputs, w_hh_slabs, w_hr_slabs, grads, proj_grads,
                        scratch, one, masks)
        sync.work_done(counters, n_chunks, started)


KERNELS = ("copy_into", "zone_h", "forward_units", "forward_proj", "forward_worker", "backward_carry", "output_grad",
           "backward_units", "backward_worker")
PARALLEL_KERNELS = ("forward_parallel", "backward_parallel")


def numba_bindings(numba):
    """numba's prange for the parallel kernels."""
    return {"prange": numba.prange}
