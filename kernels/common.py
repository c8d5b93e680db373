"""Helpers shared by the LSTM kernels: activations and the autotune policy.

Under TRITON_INTERPRET=1 (CPU tensors, tests) triton.autotune with several
configs crashes and benchmarking is meaningless, so every kernel gets exactly
one fixed config there; on a GPU it gets its list of candidate configs.
The variable is read here, at import, because triton.jit reads it when it
decorates: both must agree.
"""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# libdevice calls are extern functions the interpreter cannot run.
_LIBDEVICE = tl.constexpr(not INTERPRETING)


def configs(gpu_configs, interpreter_config):
    return [interpreter_config] if INTERPRETING else gpu_configs


def bucket(n: int) -> int:
    """Power-of-two bucket of the batch size, passed as a runtime int that the
    kernels ignore: it only keys autotune, so a new B reuses its bucket's tuned
    config without benchmarking or compiling again."""
    return min(triton.next_power_of_2(max(int(n), 1)), 256)


@triton.jit
def sigmoid(x):
    # exp overflows to inf for very negative x, giving exactly 0: no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # There is no tl.tanh. On the GPU libdevice's tanhf (<= 2 ulp); the
    # interpreter's fallback 2*sigmoid(2x)-1 loses relative accuracy near 0
    # (absolute error ~1 ulp of 1), which measurably doubled fp32 gradient
    # error against an fp64 reference, so the GPU does not use it.
    if _LIBDEVICE:
        return libdevice.tanh(x)
    else:
        return 2.0 * sigmoid(2.0 * x) - 1.0
