"""The LSTM cell's pointwise math, written once for the forward and backward loops.

Gate order i, f, g, o; i, f, o through sigmoid, g through tanh. Per hidden unit:
    c_t = f * c_{t-1} + i * g          (new_cell)
    h_t = o * tanh(c_t)                (new_hidden, before any projection)
and backward, from the gradients reaching h_t and c_t, those of the four gate
pre-activations and of c_{t-1} (cell_grads). Kernels, jitted by jit.load; the loops
call them per element, and LLVM inlines them into the vectorized loops.

Parameters come in the order the formulas first use them: which product LLVM fuses
into an FMA follows the order of the loads, and this order gives the results of
the same formulas written in the loops (bench/NOTES_numba.md#cell-math).
"""
from __future__ import annotations

import math

# float32 tanh: Eigen's fast-tanh rational approximation, which vectorizes where libm's tanhf
# does not (max abs error 3.5e-7: bench/NOTES_numba.md#float32-tanh).
TANH_CLAMP = 7.90531110763549805
TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
          5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


# The activations' Python bodies give their meaning only: numba_bindings() registers
# dtype-specific compiled versions (exact in float64, the rational tanh in float32).
def tanh(x):
    return math.tanh(x)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def new_cell(f, c_prev, i, g):
    """c_t from c_{t-1} and the activated gates."""
    return f * c_prev + i * g


def new_hidden(o, tanh_c):
    """h_t (before any projection) from the output gate and tanh(c_t)."""
    return o * tanh_c


def cell_grads(dc, dh, o, tanh_c, g, i, c_prev, f, one):
    """Gradients of the gate pre-activations and of c_{t-1}: (di, df, dg, do, dc_prev).

    dh and dc are the gradients reaching h_t and c_t from later steps and outputs;
    i, f, g, o the activated gates of step t, tanh_c = tanh(c_t); one is 1 in the
    dtype of the others (a literal 1.0 would widen float32 math to float64)."""
    dc_t = dc + dh * o * (one - tanh_c * tanh_c)
    return (dc_t * g * (i - i * i),
            dc_t * c_prev * (f - f * f),
            dc_t * i * (one - g * g),
            dh * tanh_c * (o - o * o),
            dc_t * f)


KERNELS = ("new_cell", "new_hidden", "cell_grads")


def numba_bindings(numba):
    """Register the compiled activations (overloads of tanh and sigmoid); binds nothing."""
    import numpy as np
    from numba import types
    from numba.extending import overload

    from .jit import FASTMATH

    f32 = np.float32
    clamp = f32(TANH_CLAMP)
    p1, p3, p5, p7, p9, p11, p13 = (f32(v) for v in TANH_P)
    q0, q2, q4, q6 = (f32(v) for v in TANH_Q)
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
        # Past the clamp exactly +-1 as in torch (saturated gates get zero derivative, sigmoid(-inf) = 0);
        # NaN fails both tests and stays NaN through x * p / q (bench/NOTES_numba.md#float32-tanh).
        return one if x >= clamp else (-one if x <= -clamp else x * p / q)

    @overload(tanh, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
    def _tanh(x):
        if x == types.float32:
            return tanh32
        return lambda x: np.tanh(x)

    @overload(sigmoid, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
    def _sigmoid(x):
        if x == types.float32:
            return lambda x: half * tanh(half * x) + half
        return lambda x: 1.0 / (1.0 + np.exp(-x))

    return {}
