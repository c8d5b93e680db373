"""The LSTM cell's pointwise math, written once for the step and the sequence kernels.

Dimension glossary
    every argument and result is a block of one shape, batch rows x hidden
    units, unit j at the same position in each; gate blocks hold gate q of
    unit j (column q*H + j of a [.., 4H] buffer, gates i, f, g, o in
    nn.LSTM's order)
    acc the blocks' dtype (fp32, or fp64), which every result keeps

Triton inlines these @triton.jit functions into each kernel: no call at run time
(register figures before and after: bench/NOTES_triton.md#shared-cell-code).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .common import INTERPRETING

# libdevice calls are extern functions the interpreter cannot run.
_LIBDEVICE = tl.constexpr(not INTERPRETING)


@triton.jit
def sigmoid(x):
    # exp overflows to inf for very negative x, giving exactly 0: no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # There is no tl.tanh. libdevice's tanhf on the GPU: the interpreter's 2*sigmoid(2x)-1
    # is inaccurate near 0 (bench/NOTES_triton.md#tanh-accuracy).
    if _LIBDEVICE:
        return libdevice.tanh(x)
    else:
        return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def cell_fwd(b_zi, b_zf, b_zg, b_zo, b_c_prev):
    """Gate pre-activations z_i, z_f, z_g, z_o and c_{t-1}
    -> activations i, f, g, o, c_t = f*c_{t-1} + i*g and o*tanh(c_t)."""
    b_i = sigmoid(b_zi)
    b_f = sigmoid(b_zf)
    b_g = tanh(b_zg)
    b_o = sigmoid(b_zo)
    b_c = b_f * b_c_prev + b_i * b_g
    return b_i, b_f, b_g, b_o, b_c, b_o * tanh(b_c)


@triton.jit
def cell_bwd(b_dh, b_dc, b_i, b_f, b_g, b_o, b_c, b_c_prev):
    """Gradients dh, dc reaching h_t and c_t, the saved activations i, f, g, o and
    cells c_t, c_{t-1} -> gate pre-activation gradients dz_i, dz_f, dz_g, dz_o and dc_{t-1}."""
    b_tc = tanh(b_c)  # tanh(c_t) is not saved: recomputing it costs one tanh per element
    b_dcell = b_dc + b_dh * b_o * (1.0 - b_tc * b_tc)  # all of c_t's gradient: direct and through h_t
    # sigmoid' = s*(1-s) and tanh' = 1-tanh^2, from the saved activations.
    b_dzi = b_dcell * b_g * b_i * (1.0 - b_i)
    b_dzf = b_dcell * b_c_prev * b_f * (1.0 - b_f)
    b_dzg = b_dcell * b_i * (1.0 - b_g * b_g)
    b_dzo = b_dh * b_tc * b_o * (1.0 - b_o)
    return b_dzi, b_dzf, b_dzg, b_dzo, b_dcell * b_f
