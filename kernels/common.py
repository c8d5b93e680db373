"""The autotune policy shared by the LSTM kernels.

Under TRITON_INTERPRET=1 (CPU tensors, tests) triton.autotune with several
configs crashes and benchmarking is meaningless, so every kernel gets exactly
one fixed config there; on a GPU it gets its list of candidate configs.
The variable is read here, at import, because triton.jit reads it when it
decorates: both must agree.
"""
import os

import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(gpu_configs, interpreter_config):
    return [interpreter_config] if INTERPRETING else gpu_configs


def bucket(n: int) -> int:
    """Power-of-two bucket of the batch size, passed as a runtime int that the
    kernels ignore: it only keys autotune, so a new B reuses its bucket's tuned
    config without benchmarking or compiling again."""
    # 256: one tuning serves every larger batch (a choice that bounds tuning runs, not measured).
    return min(triton.next_power_of_2(max(int(n), 1)), 256)
