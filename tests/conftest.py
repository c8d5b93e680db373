import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is
# present; the variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def full_fp32_on_cuda():
    """On a GPU, float32 on both sides of every comparison is full float32: torch's
    defaults let cuDNN's LSTM use TF32 (a 10-bit mantissa, errors near 1e-3), far
    outside the float32 tolerances. Tests of TF32 itself switch it on inside."""
    if not torch.cuda.is_available():
        yield
        return
    from helpers import tf32
    with tf32(False):
        yield
