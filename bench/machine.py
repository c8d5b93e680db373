"""What ran the benchmark: hardware, software versions, switches, and the matmul rate."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import time

import torch

TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16, "fp64": torch.float64}


def cpu_model() -> str:
    """The model name, with family and model numbers where the name alone is vague
    (a VM's "AMD EPYC" may be any generation)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def vector_isas() -> str:
    """The vector ISA of torch's CPU kernels and of lstm_fast's compiled ones."""
    ours = "not built"
    try:
        from lstm_fast import _ops
        if _ops.load()[0]:
            ours = torch.ops.lstm_fast.cpu_vector_isa()
    except Exception as exc:  # an older build without the op, or none
        ours = f"unknown ({type(exc).__name__})"
    return f"torch {torch.backends.cpu.get_cpu_capability()}, lstm_fast {ours}"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception as exc:  # optional package: record why it is absent
        return f"unavailable ({type(exc).__name__})"


def git_state(root: str) -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    return {"commit": run("rev-parse", "HEAD") or None,
            "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def _new_tf32_api() -> bool:
    # torch >= 2.9: per-backend fp32_precision. Reading a legacy allow_tf32 switch after
    # setting the new one raises, so a run uses one API only.
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "rnn")


_NEW_TF32_SWITCHES = (("cuda.matmul", lambda: torch.backends.cuda.matmul),
                      ("cudnn.rnn", lambda: torch.backends.cudnn.rnn),
                      ("cudnn.conv", lambda: torch.backends.cudnn.conv))


def tf32_state() -> dict:
    if _new_tf32_api():
        state = {f"{name}.fp32_precision": get().fp32_precision for name, get in _NEW_TF32_SWITCHES}
        state["fp32_precision"] = getattr(torch.backends, "fp32_precision", None)
        return state
    return {"matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}


@contextlib.contextmanager
def tf32(enabled: bool | None):
    """TF32 on or off for both cuBLAS and cuDNN's RNN (None: leave as is)."""
    if enabled is None:
        yield
        return
    if _new_tf32_api():
        # cudnn.rnn is what torch.nn.LSTM reads; conv is set alike because the
        # operator-less cuDNN query refuses conv and rnn disagreeing.
        old = [(get(), get().fp32_precision) for _, get in _NEW_TF32_SWITCHES]
        for mod, _ in old:
            mod.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            for mod, value in old:
                mod.fp32_precision = value
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def describe(device: str, root: str) -> dict:
    info = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "vector_isa": vector_isas(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "triton": _version("triton"),
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "tf32": tf32_state(),
        "env": {k: os.environ[k] for k in ("LSTM_FAST_BACKEND", "TRITON_INTERPRET", "NUMBA_NUM_THREADS",
                                           "NUMBA_THREADING_LAYER", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                           "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "loadavg_start": _loadavg(),
        "git": git_state(root),
    }
    try:
        import lstm_fast
        info["lstm_fast"] = getattr(lstm_fast, "__version__", "?")
    except Exception as exc:
        info["lstm_fast"] = f"unavailable ({exc})"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_name=p.name, gpu_sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}")
        info["machine"] = f"{p.name}"
    else:
        info["gpu_name"] = None
        info["machine"] = f"{info['cpu_model']}, {info['cpu_cores']} cores"
    return info


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype_name: str) -> dict:
    """Best GFLOP/s of a large square matmul in this dtype: the machine's practical peak.

    Size: 2048 on CPU (about 0.2 s per product on 2 EPYC cores, large enough to
    reach the BLAS plateau), 8192 on GPU (H100 reaches its plateau well below).
    The best of the repeats is the rate the hardware can give, the others are
    disturbed by neighbours; the run measures it at start and end and keeps the best.
    """
    n = 8192 if device == "cuda" else 2048
    dtype = TORCH_DTYPES[dtype_name]
    if device == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # On CPUs without 16-bit matrix units torch emulates these GEMMs (0.3 GFLOP/s on
        # the 2-core EPYC: one 2048^2 product takes a minute), which is no ceiling for
        # backends that compute in float32: no % of peak for these rows.
        return {"n": n, "gflops": None, "note": f"not measured: {dtype_name} GEMMs on CPU are no hardware peak"}
    reps = 10 if device == "cuda" else 3
    with tf32(dtype_name == "tf32" if device == "cuda" else None):
        try:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            torch.mm(a, b)
            times = []
            for _ in range(reps):
                if device == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    torch.mm(a, b)
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e) / 1e3)
                else:
                    t0 = time.perf_counter()
                    torch.mm(a, b)
                    times.append(time.perf_counter() - t0)
        except Exception as exc:
            return {"n": n, "gflops": None, "error": f"{type(exc).__name__}: {exc}"}
    flops = 2.0 * n ** 3
    return {"n": n, "gflops": flops / min(times) / 1e9, "median_gflops": flops / sorted(times)[len(times) // 2] / 1e9}


def finish(info: dict):
    info["loadavg_end"] = _loadavg()
