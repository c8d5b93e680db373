"""The compiled extension's backends: `cpp` (C++ on CPU) and `cuda` (CUDA kernels).

Both call the custom ops torch.ops.lstm_fast.lstm_forward / lstm_backward, and
`cpp` also lstm_forward_projected (csrc/lstm.h documents them). Importing this
module loads nothing; the extension is loaded (or JIT-built, see
lstm_fast/_ops.py) by is_available().
"""
from __future__ import annotations

import torch

from .. import _ops
from .base import Backend, LayerSizes, RecurrenceGrads


class _CompiledBackend(Backend):
    device_type = "?"
    dtypes: tuple = ()
    traceable = True  # custom ops with fake kernels (lstm_fast/_ops.py)

    def is_available(self):
        ok, how = _ops.load()
        if not ok:
            return False, how
        if not _ops.has_kernel(self.device_type):
            return False, f"the extension ({how}) was built without {self.device_type.upper()} kernels"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, f"{how}"

    def supports(self, device, dtype, sizes: LayerSizes):
        if torch.device(device).type != self.device_type:
            return False, f"runs on {self.device_type} tensors only, got {device}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return False, f"dtype {dtype} is not supported ({names})"
        return True, "ok"

    # the ops take the regularisers' masks (csrc/lstm.h StepMasks) in their loops
    supports_masks = True

    def forward(self, gx, state, weights, layout, need_grad, masks=None):
        y, h_n, c_n, gates, cells = torch.ops.lstm_fast.lstm_forward(gx, *state, *weights, *layout, bool(need_grad),
                                                                     *(masks or ()))
        return y, h_n, c_n, ((gates, cells) if need_grad else ())

    def backward(self, saved, y, grads, state, weights, layout, masks=None):
        gates, cells = saved
        d_gx, d_h0, d_c0, d_w_hh, d_w_hr = torch.ops.lstm_fast.lstm_backward(*grads, gates, cells, y, *state,
                                                                             *weights, *layout, *(masks or ()))
        return RecurrenceGrads(d_gx, d_h0, d_c0, d_w_hh, d_w_hr if weights.w_hr is not None else None)


class CppBackend(_CompiledBackend):
    """C++ time loop on CPU: per step, each thread computes the gates of its batch rows (from
    4 rows a thread while W_hh fits 1 MiB) or else of its hidden units, with one barrier per
    step (packed W_hh slab, register-blocked kernel), and their state update.

    float16/bfloat16 run in float32 (widens_16bit): the C++ loop has no 16-bit
    arithmetic, and float32 accumulation is what the GPU backends use too. torch's own
    CPU LSTM in these dtypes is slow where the CPU has no 16-bit matrix units:
    bench/reports/cpu-amd-epyc-2c-half times cpp 7-9x faster for inference and 18-44x
    for training on the 2-core EPYC.
    """

    name = "cpp"
    device_type = "cpu"
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    widens_16bit = True

    def loops_solo(self):
        return not torch.compiler.is_compiling() and torch.ops.lstm_fast.cpu_loops_solo()

    def forward_projected(self, x, projection, state, weights, layout, need_grad, masks=None):
        # each thread projects its own gate columns before the time loop (lstm.h)
        y, h_n, c_n, gates, cells = torch.ops.lstm_fast.lstm_forward_projected(
            x, *projection, *state, *weights, *layout, bool(need_grad), *(masks or ()))
        return y, h_n, c_n, ((gates, cells) if need_grad else ())


class CudaBackend(_CompiledBackend):
    """Per step a cuBLAS GEMM then one fused kernel; fp32 accumulation and cell state."""

    name = "cuda"
    device_type = "cuda"
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def supports(self, device, dtype, sizes: LayerSizes):
        ok, why = super().supports(device, dtype, sizes)
        if ok and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            # the per-step GEMM asks ATen for fp32 output from bf16 inputs: sm_80 or newer
            return False, "bfloat16 needs a GPU of compute capability 8.0 or higher"
        return ok, why
