"""Numba CPU backend: the whole time loop, forward and BPTT, runs in compiled code.

Per step the recurrent product h_{t-1} @ W_hh^T is added to the precomputed gx[t]
and the gate activations and state update follow in the same compiled loop;
backward fuses the gate derivatives and runs dh_{t-1} = dgates_t @ W_hh per step.
dW_hh and dW_hr are single GEMMs over all T*B rows after the loop.

Threads: a call's time loop is split over torch.get_num_threads() threads by
hidden units. Each thread computes all four gates of its units (a product with
its slab of W_hh, packed once per call for a register-blocked SIMD kernel), their
activations and state update; then every thread waits for the step to be done
(sync.py). The threads are numba's (parallel=True, one launch per call).

Importing this module is cheap: numba is imported and the kernels are jitted
(cache=True, on disk) on first use, by jit.load(). This module is the host side:
it plans a call (chunks, slabs, scratch), gives the kernels numpy views of the
tensors and launches them.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..base import (
    HALF_DTYPES,
    Backend,
    LayerSizes,
    RecurrenceGrads,
    in_time_blocks,
    weight_grads,
)
from . import jit, loops, sync, threads
from .gemm import panel_width

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_TYPESTR = {dt: np.dtype(npdt).str for dt, npdt in ((torch.float32, np.float32), (torch.float64, np.float64),
                                                     (torch.int64, np.int64))}


class _TensorMemory:
    """A tensor's memory as numpy's __array_interface__; holds the tensor alive."""

    __slots__ = ("tensor", "__array_interface__")


def _array(t, dtype=None):
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


@functools.lru_cache(maxsize=64)
def _cuts(N, n_chunks):
    """(Cached: never written.) n_chunks + 1 boundaries cutting range(N) into parts of whole
    8-element vectors (parts differ by at most one vector), so the pointwise loops rarely
    have tails."""
    vectors = (N + 7) // 8
    return np.array([min(N, vectors * i // n_chunks * 8) for i in range(n_chunks + 1)], dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _widest(N, n_chunks):
    """(Cached.) The largest part of _cuts(N, n_chunks); np.max on the cuts costs more
    (bench/NOTES_numba.md#host-preparation)."""
    return int(np.diff(_cuts(N, n_chunks)).max())


@functools.lru_cache(maxsize=64)
def _chunk_index(N, n_chunks, blocks, stride):
    """(Cached: never written.) See _slabs."""
    cut = _cuts(N, n_chunks)
    sizes = np.diff(cut)
    index = np.zeros((len(sizes), max(1, int(sizes.max()) * blocks)), dtype=np.int64)
    for c, n in enumerate(sizes):
        index[c, :n * blocks] = (np.arange(blocks)[:, None] * stride + cut[c] + np.arange(n)[None, :]).ravel()
    return index, sizes * blocks, int(sizes.max()) * blocks


def _slabs(a, N, n_chunks, by_column, blocks=1, stride=0):
    """The bundle from which the workers pack the chunks' slabs of weight a in their first
    phase (gemm.pack_chunk_slab): (a, index [n_chunks, most], counts [n_chunks], slabs
    [n_chunks, n_panels * K * PW] to fill). Chunk c's rows (or columns) of a are
    q * stride + j for q < blocks and j in its part of range(N) (_cuts)."""
    index, counts, most = _chunk_index(N, n_chunks, blocks, stride)
    pw = panel_width(a.itemsize)
    K = a.shape[0] if by_column else a.shape[1]
    n_panels = max(1, -(-most // pw))
    return a, index, counts, np.empty((n_chunks, n_panels * K * pw), a.dtype)


@functools.lru_cache(maxsize=64)
def _no_slabs(dtype, n_chunks):
    """(Cached: never written.) _slabs' bundle for a weight the call does not have."""
    return _dummy(dtype, (0, 0)), np.zeros((n_chunks, 1), np.int64), np.zeros(n_chunks, np.int64), \
        np.empty((n_chunks, 0), dtype)


@functools.lru_cache(maxsize=64)
def _dummy(dtype, shape):
    """(Cached: never read or written.) An empty array standing for an unused argument;
    shape keeps the leading chunk dimension where the kernels take a view per chunk."""
    return np.empty(shape, dtype)


@functools.lru_cache(maxsize=64)
def _zeros(n, dtype):
    """(Cached: never written.)"""
    return np.zeros(n, dtype)


def _products(dtype, B, *weight_slabs):
    """Per-chunk product outputs [n_chunks, B, width], width the widest slab's padded columns;
    weight_slabs: (_slabs bundle, by_column) pairs."""
    width = max(slabs[3].shape[1] // (slabs[0].shape[0] if by_column else slabs[0].shape[1])
                for slabs, by_column in weight_slabs if slabs[0].size)
    return np.empty((weight_slabs[0][0][3].shape[0], B, width), dtype)


@functools.lru_cache(maxsize=64)
def _full_batch(T, B):
    """(Cached: never written.) Active rows per step and their first rows, without packing."""
    return np.full(T, B, dtype=np.int64), np.arange(T, dtype=np.int64) * B


def _layout(x, h0, batch_sizes):
    """(T, B, shape of a per-step tensor but its width) for x in the padded or packed layout."""
    if batch_sizes is None:
        return x.shape[0], x.shape[1], tuple(x.shape[:2])
    return len(batch_sizes), h0.shape[0], (x.shape[0],)


def _masks(masks, dt, P, H):
    """((rmask [B, P], zc [rows, H], zh [rows, P]) as arrays, empty where off; which are on)."""
    npdt = _DTYPES[dt]
    parts = tuple(masks) if masks is not None else (None, None, None)
    arrays = tuple(_dummy(npdt, (0, 0)) if t is None else _array(t, dt).reshape(-1, w)
                   for t, w in zip(parts, (P, H, P)))
    return arrays, tuple(t is not None for t in parts)


class NumbaBackend(Backend):
    name = "numba"
    widens_16bit = True  # float16/bfloat16 calls run in float32 (function._run)
    supports_masks = True  # the loops take StepMasks (loops.py)

    def loops_solo(self):
        return threads.solo_active()

    def is_available(self):
        try:
            import numba
        except Exception as exc:  # ImportError, or a broken install
            return False, f"numba unavailable: {type(exc).__name__}: {exc}"
        return True, f"numba {numba.__version__}"

    def supports(self, device, dtype, sizes: LayerSizes):
        if torch.device(device).type != "cpu":
            return False, f"numba backend runs on CPU only, got device {device}"
        if dtype not in _DTYPES and dtype not in HALF_DTYPES:
            return False, f"numba backend supports float32, float64 (and 16-bit, in float32), got {dtype}"
        return True, "CPU float32/float64 (16-bit widened to float32)"

    @staticmethod
    def _plan(T, B, H, P, batch_sizes):
        """((active rows per step, their first row), chunks, unit cuts, state column cuts)"""
        if batch_sizes is None:
            rows = _full_batch(T, B)
        else:
            bs = batch_sizes.detach().to("cpu", torch.int64).numpy()
            rows = (bs, np.cumsum(bs) - bs)
        n_chunks = threads.chunk_count(B, H, P)
        return rows, n_chunks, _cuts(H, n_chunks), _cuts(P, n_chunks)

    def forward(self, gx, state, weights, layout, need_grad, masks=None):
        return self._forward(gx, None, state, weights, layout, need_grad, masks)

    def forward_projected(self, x, projection, state, weights, layout, need_grad, masks=None):
        # The input projection runs inside the parallel launch: each thread computes
        # its chunk's gate columns for all T*B rows with the step's product kernel
        # (no separate GEMM call, no [T,B,4H] tensor through torch). Without grad, in
        # blocks of steps, so that the projection of a long sequence is never held whole.
        if need_grad or masks is not None:
            return self._forward(x, projection, state, weights, layout, need_grad, masks)
        return in_time_blocks(lambda xb, st, lay, _: self._forward(xb, projection, st, weights, lay, False),
                              x, state, layout, weights.w_hh.shape[0])

    def _forward(self, x, projection, state, weights, layout, need_grad, masks=None):
        """x is gx [T,B,4H] when projection is None, else the layer input [T,B,I] ([N,*] packed)."""
        jit.load()
        (h0, c0), (w_hh, w_hr), (batch_sizes, reverse) = state, weights, layout
        fused = projection is not None
        w_ih, bias = projection if fused else (None, None)
        T, B, rows_shape = _layout(x, h0, batch_sizes)
        H = w_hh.shape[0] // 4
        G = 4 * H
        P = h0.shape[-1]
        dt = x.dtype
        npdt = _DTYPES[dt]
        has_proj = w_hr is not None
        if T == 0 or B == 0:  # nothing to run: the states pass through
            saved = (x.new_zeros(*rows_shape, G), x.new_zeros(*rows_shape, H)) if need_grad else ()
            return x.new_zeros(*rows_shape, P), h0.detach().clone(), c0.detach().clone(), saved
        (bs, row0), n_chunks, unit_cuts, col_cuts = self._plan(T, B, H, P, batch_sizes)
        w_hh_slabs = _slabs(_array(w_hh, dt), H, n_chunks, False, 4, H)
        w_hr_slabs = _slabs(_array(w_hr, dt), P, n_chunks, False) if has_proj else _no_slabs(npdt, n_chunks)
        x_rows = _array(x, dt).reshape(-1, x.shape[-1])
        h0_n = _array(h0, dt)
        if fused:
            w_ih_slabs = _slabs(_array(w_ih, dt), H, n_chunks, False, 4, H)
            gx_chunks = np.empty((n_chunks, x_rows.shape[0], w_ih_slabs[3].shape[1] // x_rows.shape[1]), npdt)
            bias_n = _array(bias, dt) if bias is not None else _zeros(G, npdt)
            inputs = (x_rows, _dummy(npdt, (0, 0)), bias_n, h0_n, bs, row0)
        else:
            w_ih_slabs = _no_slabs(npdt, n_chunks)
            gx_chunks = _dummy(npdt, (n_chunks, 0, 0))
            inputs = (_dummy(npdt, (0, 0)), x_rows, _zeros(G, npdt), h0_n, bs, row0)
        y = x.new_empty(*rows_shape, P)
        h = _state(h0, dt)
        c = _state(c0, dt)
        if need_grad:
            # Saved for backward, per step: activated gates (4H) and cell state (H) per
            # row, 5*B*H*itemsize bytes (20*B*H in float32), plus y, which is the output.
            gates = x.new_empty(*rows_shape, G)
            cells = x.new_empty(*rows_shape, H)
            saved_n = (_array(gates).reshape(-1, G), _array(cells).reshape(-1, H))
        else:
            saved_n = (_dummy(npdt, (0, 0)),) * 2
        h_pre = np.empty((B, H), npdt) if has_proj else _dummy(npdt, (0, 0))
        products = _products(npdt, B, (w_hh_slabs, False), (w_hr_slabs, False))
        (rmask, zc, zh), on = _masks(masks, dt, P, H)
        # both parities of the masked state start as h0 * mask: a row reads it until it first runs
        hm = _array((h0.to(dt) * masks.recurrent.to(dt)).repeat(2, 1, 1)) if on[0] else _dummy(npdt, (2, 0, 0))
        threads.launch(loops.forward_parallel, loops.forward_worker, n_chunks, sync.counters(n_chunks),
                       (fused, bool(reverse), bool(need_grad), has_proj, *on), (unit_cuts, col_cuts), inputs,
                       w_ih_slabs, w_hh_slabs, w_hr_slabs, (_array(y).reshape(-1, P), _array(h), _array(c)), saved_n,
                       (gx_chunks, h_pre, products), (rmask, hm, zc, zh))
        saved = (gates, cells) if need_grad else ()
        return y, h.to(h0.dtype), c.to(c0.dtype), saved

    def backward(self, saved, y, grads, state, weights, layout, masks=None):
        jit.load()
        (grad_y, grad_hn, grad_cn), (h0, c0), (w_hh, w_hr), (batch_sizes, reverse) = grads, state, weights, layout
        gates, cells = saved
        T, B, rows_shape = _layout(gates, h0, batch_sizes)
        G = gates.shape[-1]
        H = G // 4
        dt = gates.dtype
        npdt = _DTYPES[dt]
        P = y.shape[-1]
        has_proj = w_hr is not None
        if T == 0 or B == 0:  # no step ran: the final-state gradients reach h0 and c0 unchanged
            return RecurrenceGrads(grad_y.new_zeros(*rows_shape, G), grad_hn.detach().clone().to(h0.dtype),
                                   grad_cn.detach().clone().to(c0.dtype), torch.zeros_like(w_hh),
                                   None if w_hr is None else torch.zeros_like(w_hr))
        (bs, row0), n_chunks, unit_cuts, col_cuts = self._plan(T, B, H, P, batch_sizes)
        w_hh_slabs = _slabs(_array(w_hh, dt), P, n_chunks, True)
        w_hr_slabs = _slabs(_array(w_hr, dt), H, n_chunks, True) if has_proj else _no_slabs(npdt, n_chunks)
        dh = _state(grad_hn, dt)
        dc = _state(grad_cn, dt)
        dg = gates.new_empty(*rows_shape, G)
        if has_proj:
            dr_all = gates.new_empty(*rows_shape, P)
            hpre_all = gates.new_empty(*rows_shape, H)
            proj_grads = (_array(dr_all).reshape(-1, P), _array(hpre_all).reshape(-1, H))
        else:
            dr_all = hpre_all = None
            proj_grads = (_dummy(npdt, (0, 0)),) * 2
        products = _products(npdt, B, (w_hh_slabs, True), (w_hr_slabs, True))
        tanh_c = np.empty((n_chunks, _widest(H, n_chunks)), npdt)
        inputs = (_array(gates).reshape(-1, G), _array(cells).reshape(-1, H), _array(c0, dt),
                  _array(grad_y, dt).reshape(-1, P), bs, row0)
        (rmask, zc, zh), on = _masks(masks, dt, P, H)
        carry = np.empty((B, P), npdt) if on[2] else _dummy(npdt, (0, 0))
        threads.launch(loops.backward_parallel, loops.backward_worker, n_chunks, sync.counters(n_chunks),
                       (bool(reverse), has_proj, *on), (unit_cuts, col_cuts), inputs, w_hh_slabs, w_hr_slabs,
                       (_array(dh), _array(dc), _array(dg).reshape(-1, G)), proj_grads, (products, tanh_c), npdt(1),
                       (rmask, carry, zc, zh))
        d_w_hh, d_w_hr = weight_grads(dg, y, h0.detach(), reverse, dr_all, hpre_all, batch_sizes,
                                      None if masks is None else masks.recurrent)
        return RecurrenceGrads(dg.to(grad_y.dtype), dh.to(h0.dtype), dc.to(c0.dtype), d_w_hh.to(w_hh.dtype),
                               None if d_w_hr is None else d_w_hr.to(w_hr.dtype))
