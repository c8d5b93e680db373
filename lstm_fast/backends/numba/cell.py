"""The LSTM cell's activations: gate order i, f, g, o; i, f, o through sigmoid, g through tanh."""
from __future__ import annotations

import math

# float32 tanh: the odd/even minimax rational approximation of Eigen's fast tanh (max
# abs error 3.5e-7 on [-20, 20], bench/NOTES_numba.md#float32-tanh). Unlike libm's tanhf
# it vectorizes (numba has no SVML here).
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


KERNELS = ()


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
        # Past the clamp: exactly +-1, as torch gives (true tanh is within 2.7e-7 of it),
        # so saturated gates get exactly zero derivative and sigmoid(-inf) = 0; the
        # rational part (inf/inf there for huge x) is not taken. NaN fails both tests
        # and stays NaN through x * p / q (clamping x first lost it).
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
