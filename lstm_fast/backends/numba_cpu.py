"""Numba CPU backend: the whole time loop, forward and BPTT, runs in compiled code.

Per step the recurrent product h_{t-1} @ W_hh^T is added to the precomputed gx[t]
and the gate activations and state update follow in the same compiled loop;
backward fuses the gate derivatives and runs dh_{t-1} = dgates_t @ W_hh per step.
dW_hh and dW_hr are single GEMMs over all T*B rows after the loop.

The per-step product goes to SciPy's OpenBLAS through np.dot (1.3-1.6x faster
than torch's MKL for these shapes on the 2-core EPYC build machine), except for
a handful of rows, where our own loop beats any BLAS call (see _SMALL_N).

Importing this module is cheap: numba is imported and the kernels are jitted
(cache=True, on disk) on first use by `_load()`. The kernels are plain Python
functions below; `_load()` rebinds each module-level name to its jitted
dispatcher, so they call each other through globals (closures would miss the
disk cache).

Threads: no parallel=True, so numba's own thread pool (and its threading layer)
is never started; the only threads are OpenBLAS's, held at 1 inside the time
loop (per-step products of 32x256x1024 ran 35-60 GFLOP/s on 1 thread but
0.7-57 GFLOP/s on 2 threads, the two cores being shared) and at most
torch.get_num_threads() for the large after-loop GEMMs.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import math
import os
import tempfile
import threading

import numpy as np
import torch

from .base import Backend, LayerSizes, weight_grads

# Rows per step up to which the recurrent product uses _matmul_nt's own loop instead
# of BLAS. Measured on the 2-core EPYC (GFLOP/s, own loop vs SciPy OpenBLAS sgemm,
# 1 thread): n=1,H=128: 35 vs 6; n=4: 42 vs 29; n=8: 45 vs 37-55; n=32,H=256: 47 vs 51-72.
_SMALL_N = 8
# Column block of the own loop: a block of 8 rows x 256 floats (8 KiB) of the output
# stays in L1 while all K rows of W^T stream past it.
_JBLOCK = 256
# Tile of the transposing copy after a BLAS product: 64 columns x 16 rows keeps the
# touched cache lines of both sides (4 KiB) in L1.
_TJ = 64
_TB = 16

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
# Kernels (jitted by _load). Shapes: T steps, B rows, H hidden, P state (= H without
# projection), G = 4H. All arrays C-contiguous.

def _matmul_nt(x, n, w, wt, tmp, out, base, add_base):
    """out[:n] = (base[:n] if add_base else 0) + x[:n] @ w.T

    x [>=n, K]; w [N, K] and wt [K, N] hold the same matrix in both layouts;
    out, base [>=n, N] (base may alias out only when add_base is False);
    tmp flat scratch of >= N*n elements.
    """
    N, K = w.shape
    # Inner loops index row slices from 0: an index like j0 + j or H + j makes numba
    # emit a negative-index check that stops LLVM from vectorizing (measured 10-20x).
    if n <= _SMALL_N:
        # out rows as axpys over the rows of w^T, 4 at a time (4 FMAs per load/store of out)
        k4 = K - K % 4
        for j0 in range(0, N, _JBLOCK):
            jn = min(_JBLOCK, N - j0)
            for b in range(n):
                o = out[b, j0:j0 + jn]
                if add_base:
                    bb = base[b, j0:j0 + jn]
                    for j in range(jn):
                        o[j] = bb[j]
                else:
                    for j in range(jn):
                        o[j] = 0
            for k in range(0, k4, 4):
                w0 = wt[k, j0:j0 + jn]
                w1 = wt[k + 1, j0:j0 + jn]
                w2 = wt[k + 2, j0:j0 + jn]
                w3 = wt[k + 3, j0:j0 + jn]
                for b in range(n):
                    a0 = x[b, k]
                    a1 = x[b, k + 1]
                    a2 = x[b, k + 2]
                    a3 = x[b, k + 3]
                    o = out[b, j0:j0 + jn]
                    for j in range(jn):
                        o[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]
            for k in range(k4, K):
                w0 = wt[k, j0:j0 + jn]
                for b in range(n):
                    a0 = x[b, k]
                    o = out[b, j0:j0 + jn]
                    for j in range(jn):
                        o[j] += a0 * w0[j]
    else:
        # OpenBLAS is fastest producing the transposed product ct = w @ x^T [N, n]
        # (sgemm 'T','N' with the small dimension as m: 57-72 vs 36-47 GFLOP/s at
        # n=32, H=256); it is transposed back in L1-sized tiles.
        ct = tmp[:N * n].reshape((N, n))
        np.dot(w, x[:n].T, ct)
        for j0 in range(0, N, _TJ):
            jn = min(_TJ, N - j0)
            for b0 in range(0, n, _TB):
                for b in range(b0, min(b0 + _TB, n)):
                    o = out[b, j0:j0 + jn]
                    c = ct[j0:j0 + jn, b]
                    if add_base:
                        bb = base[b, j0:j0 + jn]
                        for j in range(jn):
                            o[j] = c[j] + bb[j]
                    else:
                        for j in range(jn):
                            o[j] = c[j]


def _forward_kernel(gx, w_hh, w_hh_t, w_hr, w_hr_t, bs, reverse, need_grad, has_proj,
                    y, h, c, gates, cells, z, hpre, tmp, one):
    """gx [T,B,G]; w_hh [G,P], w_hh_t [P,G]; w_hr [P,H], w_hr_t [H,P] (dummies without
    projection); bs [T] active rows per step. In/out: h [B,P], c [B,H] hold h0, c0 and
    end as h_n, c_n. Out: y [T,B,P]; when need_grad, gates [T,B,G] (activated i,f,g,o)
    and cells [T,B,H]. Scratch: z [B,G], hpre [B,H], tmp [G*B]."""
    T, B, G = gx.shape
    H = G // 4
    P = h.shape[1]
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = bs[t]
        _matmul_nt(h, n, w_hh, w_hh_t, tmp, z, gx[t], True)
        for b in range(n):
            zb = z[b]
            # activations in place, one pointer per loop so that it vectorizes
            for j in range(2 * H):
                zb[j] = _sigmoid(zb[j])
            zg = zb[2 * H:3 * H]
            for j in range(H):
                zg[j] = _tanh(zg[j])
            zo = zb[3 * H:]
            for j in range(H):
                zo[j] = _sigmoid(zo[j])
            zi = zb[:H]
            zf = zb[H:2 * H]
            cb = c[b]
            hb = hpre[b] if has_proj else h[b]
            for j in range(H):
                cn = zf[j] * cb[j] + zi[j] * zg[j]
                cb[j] = cn
                hb[j] = zo[j] * _tanh(cn)
            if need_grad:
                gates[t, b] = zb
                cells[t, b] = cb
            if not has_proj:
                y[t, b] = hb
        if has_proj:
            _matmul_nt(hpre, n, w_hr, w_hr_t, tmp, h, h, False)
            for b in range(n):
                for p in range(P):
                    y[t, b, p] = h[b, p]
        for b in range(n, B):
            for p in range(P):
                y[t, b, p] = 0


def _backward_kernel(gates, cells, c0, grad_y, w_hh, w_hh_t, w_hr, w_hr_t, bs, reverse, has_proj,
                     dh, dc, dg, dr_all, hpre_all, dhh, dh_proj, tmp, one):
    """BPTT over the saved gates [T,B,G] and cells [T,B,H]. In/out: dh [B,P], dc [B,H]
    hold grad_h_n, grad_c_n and end as d_h0, d_c0. Out: dg [T,B,G] (= d_gx); with a
    projection also dr_all [T,B,P] (gradient reaching each projected output) and
    hpre_all [T,B,H] (o*tanh(c), recomputed), the operands of dW_hr. Scratch: dhh,
    dh_proj [B,H], tmp [G*B]."""
    T, B, G = gates.shape
    H = G // 4
    P = dh.shape[1]
    for s in range(T - 1, -1, -1):
        t = T - 1 - s if reverse else s
        tp = t + 1 if reverse else t - 1  # the step processed before t (valid for s > 0)
        n = bs[t]
        if has_proj:
            for b in range(n):
                for p in range(P):
                    dr_all[t, b, p] = dh[b, p] + grad_y[t, b, p]
            for b in range(n, B):
                for p in range(P):
                    dr_all[t, b, p] = 0
            _matmul_nt(dr_all[t], n, w_hr_t, w_hr, tmp, dh_proj, dh_proj, False)
        for b in range(n):
            gb = gates[t, b]
            ig = gb[:H]
            fg = gb[H:2 * H]
            gg = gb[2 * H:3 * H]
            og = gb[3 * H:]
            cp = c0[b] if s == 0 else cells[tp, b]
            tc = dhh[b]  # scratch row: tanh(c_t), then d(h_t) in place
            cl = cells[t, b]
            for j in range(H):
                tc[j] = _tanh(cl[j])
            if has_proj:
                hp = hpre_all[t, b]
                for j in range(H):
                    hp[j] = og[j] * tc[j]
                dhv = dh_proj[b]
            else:
                dhv = dh[b]
                gy = grad_y[t, b]
                for j in range(H):
                    dhv[j] += gy[j]
            db = dg[t, b]
            di = db[:H]
            df = db[H:2 * H]
            dgg = db[2 * H:3 * H]
            do = db[3 * H:]
            dcb = dc[b]
            for j in range(H):
                dcv = dcb[j] + dhv[j] * og[j] * (one - tc[j] * tc[j])
                di[j] = dcv * gg[j] * (ig[j] - ig[j] * ig[j])
                df[j] = dcv * cp[j] * (fg[j] - fg[j] * fg[j])
                dgg[j] = dcv * ig[j] * (one - gg[j] * gg[j])
                do[j] = dhv[j] * tc[j] * (og[j] - og[j] * og[j])
                dcb[j] = dcv * fg[j]
        for b in range(n, B):
            for j in range(G):
                dg[t, b, j] = 0
            if has_proj:
                for j in range(H):
                    hpre_all[t, b, j] = 0
        _matmul_nt(dg[t], n, w_hh_t, w_hh, tmp, dh, dh, False)


_KERNELS = ("_matmul_nt", "_forward_kernel", "_backward_kernel")


# ----------------------------------------------------------------------------------
# Lazy compilation

_lock = threading.Lock()
_loaded = False
_load_error = None
_blas_threads = None  # (get, set) of SciPy's OpenBLAS, or None when not found


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


def _find_blas_threads():
    """ctypes handles on the thread count of the OpenBLAS that scipy.linalg.cython_blas
    (and so np.dot inside numba) calls; None if SciPy ships another BLAS."""
    import scipy
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
    root = os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__)))
    for path in sorted(glob.glob(os.path.join(root, "scipy.libs", "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            get, set_ = lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
        except (OSError, AttributeError):
            continue
        get.restype, get.argtypes = ctypes.c_int, []
        set_.restype, set_.argtypes = None, [ctypes.c_int]
        return get, set_
    return None


def _load():
    """Import numba, register the activations and jit the kernels (once per process)."""
    global _loaded, _load_error, _blas_threads
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        import numba
        from numba import types
        from numba.extending import overload

        _blas_threads = _find_blas_threads()
        f32 = np.float32
        clamp = f32(_TANH_CLAMP)
        p1, p3, p5, p7, p9, p11, p13 = (f32(v) for v in _TANH_P)
        q0, q2, q4, q6 = (f32(v) for v in _TANH_Q)
        half = f32(0.5)

        def tanh32(x):
            x = min(max(x, -clamp), clamp)
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
            return x * p / q

        @overload(_tanh, jit_options={"fastmath": True, "error_model": "numpy"})
        def _ov_tanh(x):
            if x == types.float32:
                return tanh32
            return lambda x: np.tanh(x)

        @overload(_sigmoid, jit_options={"fastmath": True, "error_model": "numpy"})
        def _ov_sigmoid(x):
            if x == types.float32:
                return lambda x: half * _tanh(half * x) + half
            return lambda x: 1.0 / (1.0 + np.exp(-x))

        if not _cache_dir_ok():
            os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lstm_fast_numba_")
            numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
        g = globals()
        # nnan/ninf are left out so that NaN and inf propagate as in torch.
        fm = {"contract", "reassoc", "nsz", "arcp", "afn"}
        for name in _KERNELS:
            try:
                g[name] = numba.njit(cache=True, nogil=True, fastmath=fm, error_model="numpy")(g[name])
            except RuntimeError:  # no cache locator usable: compile without a cache
                g[name] = numba.njit(cache=False, nogil=True, fastmath=fm, error_model="numpy")(g[name])
        _loaded = True


@contextlib.contextmanager
def _blas_single_thread():
    """Per-step products are too small to split across threads (see module doc)."""
    if _blas_threads is None:
        yield
        return
    get, set_ = _blas_threads
    before = get()
    if before != 1:
        set_(1)
    try:
        yield
    finally:
        if before != 1:
            set_(before)


def _np(t):
    return t.detach().numpy()


class NumbaBackend(Backend):
    name = "numba"

    def is_available(self):
        try:
            import numba  # noqa: F401
            import scipy.linalg.cython_blas  # noqa: F401  (np.dot inside njit needs it)
        except Exception as exc:  # ImportError, or a broken install
            return False, f"numba or scipy unavailable: {type(exc).__name__}: {exc}"
        return True, f"numba {numba.__version__}"

    def supports(self, device, dtype, sizes: LayerSizes):
        if torch.device(device).type != "cpu":
            return False, f"numba backend runs on CPU only, got device {device}"
        if dtype not in _DTYPES:
            return False, f"numba backend supports float32 and float64, got {dtype}"
        return True, "CPU float32/float64"

    @staticmethod
    def _prep(gx, w_hh, w_hr, batch_sizes):
        T, B, G = gx.shape
        dt = gx.dtype
        w_hh = w_hh.detach().to(dt).contiguous()
        w_hh_t = w_hh.t().contiguous()
        if w_hr is not None:
            w_hr = w_hr.detach().to(dt).contiguous()
            w_hr_t = w_hr.t().contiguous()
        else:
            w_hr = w_hr_t = gx.new_empty(0, 0)
        if batch_sizes is None:
            bs = np.full(T, B, dtype=np.int64)
        else:
            bs = np.ascontiguousarray(batch_sizes.detach().cpu().numpy(), dtype=np.int64)
        return w_hh, w_hh_t, w_hr, w_hr_t, bs

    def forward(self, gx, h0, c0, w_hh, w_hr, batch_sizes, reverse, need_grad):
        _load()
        gx = gx.detach().contiguous()
        T, B, G = gx.shape
        H = G // 4
        P = h0.shape[-1]
        dt = gx.dtype
        w_hh, w_hh_t, w_hr, w_hr_t, bs = self._prep(gx, w_hh, w_hr, batch_sizes)
        has_proj = w_hr.numel() > 0
        y = gx.new_empty(T, B, P)
        h = h0.detach().to(dt).clone().contiguous()
        c = c0.detach().to(dt).clone().contiguous()
        if need_grad:
            # Saved for backward, per step: activated gates (4H) and cell state (H) per
            # row, 5*B*H*itemsize bytes (20*B*H in float32), plus y, which is the output.
            gates = gx.new_empty(T, B, G)
            cells = gx.new_empty(T, B, H)
        else:
            gates = cells = gx.new_empty(0, 0, 0)
        z = gx.new_empty(B, G)
        hpre = gx.new_empty(B, H)
        tmp = gx.new_empty(G * B)
        with _blas_single_thread():
            _forward_kernel(_np(gx), _np(w_hh), _np(w_hh_t), _np(w_hr), _np(w_hr_t), bs, bool(reverse),
                            bool(need_grad), has_proj, _np(y), _np(h), _np(c), _np(gates), _np(cells),
                            _np(z), _np(hpre), _np(tmp), _DTYPES[dt](1))
        saved = (gates, cells, y) if need_grad else ()
        return y, h.to(h0.dtype), c.to(c0.dtype), saved

    def backward(self, saved, grad_y, grad_hn, grad_cn, h0, c0, w_hh, w_hr, batch_sizes, reverse):
        _load()
        gates, cells, y = saved
        T, B, G = gates.shape
        H = G // 4
        dt = gates.dtype
        P = y.shape[-1]
        w_hh_n, w_hh_t, w_hr_n, w_hr_t, bs = self._prep(gates, w_hh, w_hr, batch_sizes)
        has_proj = w_hr is not None
        grad_y = grad_y.detach().to(dt).contiguous()
        dh = grad_hn.detach().to(dt).clone().contiguous()
        dc = grad_cn.detach().to(dt).clone().contiguous()
        c0a = c0.detach().to(dt).contiguous()
        dg = gates.new_empty(T, B, G)
        if has_proj:
            dr_all = gates.new_empty(T, B, P)
            hpre_all = gates.new_empty(T, B, H)
        else:
            dr_all = hpre_all = gates.new_empty(0, 0, 0)
        dhh = gates.new_empty(B, H)
        dh_proj = gates.new_empty(B, H)
        tmp = gates.new_empty(G * B)
        with _blas_single_thread():
            _backward_kernel(_np(gates), _np(cells), _np(c0a), _np(grad_y), _np(w_hh_n), _np(w_hh_t),
                             _np(w_hr_n), _np(w_hr_t), bs, bool(reverse), has_proj, _np(dh), _np(dc),
                             _np(dg), _np(dr_all), _np(hpre_all), _np(dhh), _np(dh_proj), _np(tmp), _DTYPES[dt](1))
        d_w_hh, d_w_hr = weight_grads(dg, y, h0.detach(), reverse, dr_all if has_proj else None, hpre_all)
        return (dg.to(grad_y.dtype), dh.to(h0.dtype), dc.to(c0.dtype), d_w_hh.to(w_hh.dtype),
                None if d_w_hr is None else d_w_hr.to(w_hr.dtype))
