"""Timing one configuration: baseline and candidates interleaved, same weights, same input."""
from __future__ import annotations

import gc
import math
import os
import statistics
import time

import torch

from . import varlen
from .configs import Shape, cudnn_persistent, lstm_flops
from .floor import FLOOR, floor_step
from .machine import TORCH_DTYPES, tf32

BASELINE = "torch"

# Sanity bound on the largest output/gradient difference relative to the
# baseline's magnitude: flags a broken backend in the report. The exact
# accuracy checks live in tests/; these are loose on purpose (long sequences
# and low precision drift, and the baseline has its own error).
ERR_LIMIT = {"fp64": 1e-8, "fp32": 1e-3, "tf32": 3e-2, "fp16": 3e-2, "bf16": 1e-1}


class Options:
    def __init__(self, device: str, repeats: int | None = None, min_repeats: int | None = None,
                 max_repeats: int | None = None, measure_memory: bool = True, seed: int = 0):
        self.device = device
        self.repeats = repeats
        # Bounds on adaptive repeats. Minimum: 5 on CPU (a median of fewer is
        # one neighbour's burst away from wrong), 10 on GPU (cheap there).
        self.min_repeats = min_repeats or (10 if device == "cuda" else 5)
        self.max_repeats = max_repeats or (100 if device == "cuda" else 40)
        self.measure_memory = measure_memory
        self.seed = seed
        self.tight = False  # set for runs with a time budget


class CellLoop(torch.nn.Module):
    """An LSTMCell stepped over x [T, B, I] in a Python loop, presented as an LSTM
    layer: (y [T, B, H], (h_T, c_T)) from zero states."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    @property
    def weight_hh_l0(self):  # what outputs_of checks
        return self.cell.weight_hh

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        state = (h, torch.zeros_like(h))
        ys = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            ys.append(state[0])
        return torch.stack(ys), state


class RegularisedCellLoop(CellLoop):
    """The baseline of a regulariser config: an nn.LSTMCell loop drawing the masks
    lstm_fast.LSTM draws (recurrent_dropout: one mask on h_{t-1} per sequence, entering
    the cell as its hx; zoneout: Bernoulli per unit and step, blended after the cell)."""

    def __init__(self, cell, reg):
        super().__init__(cell)
        self.reg = reg
        name, p = reg.split("=")
        self.kind, self.p = name, float(p)

    def forward(self, x):
        B, H = x.shape[1], self.cell.hidden_size
        h = x.new_zeros(B, H)
        c = torch.zeros_like(h)
        keep = 1 - self.p
        m = torch.empty_like(h).bernoulli_(keep).div_(keep) if self.kind == "recurrent_dropout" else None
        ys = []
        for t in range(x.shape[0]):
            h_new, c_new = self.cell(x[t], (h * m if m is not None else h, c))
            if self.kind == "zoneout":
                zc, zh = torch.empty_like(c).bernoulli_(self.p), torch.empty_like(h).bernoulli_(self.p)
                c_new = torch.lerp(c_new, c, zc)
                h_new = torch.lerp(h_new, h, zh)
            h, c = h_new, c_new
            ys.append(h)
        return torch.stack(ys), (h, c)


class StepLoop(torch.nn.Module):
    """An LSTM fed x [T, B, I] one step per call ([1, B, I]), its state carried from
    call to call, presented as the whole layer: (y [T, B, H], (h_T, c_T))."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    @property
    def weight_hh_l0(self):  # what outputs_of checks
        return self.lstm.weight_hh_l0

    def forward(self, x):
        state, ys = None, []
        for t in range(x.shape[0]):
            y, state = self.lstm(x[t:t + 1], state)
            ys.append(y)
        return torch.cat(ys), state


def make_base(shape, device, dtype):
    """torch's module for one configuration: nn.LSTM, or an nn.LSTMCell loop."""
    if shape.reg:
        return RegularisedCellLoop(torch.nn.LSTMCell(shape.I, shape.H, device=device, dtype=dtype), shape.reg)
    if shape.cell:
        return CellLoop(torch.nn.LSTMCell(shape.I, shape.H, device=device, dtype=dtype))
    base = torch.nn.LSTM(shape.I, shape.H, shape.L, bidirectional=shape.bidir, proj_size=shape.proj)
    base = base.to(device=device, dtype=dtype)
    return StepLoop(base) if shape.steps else base


def make_module(name: str, base):
    if name == BASELINE:
        return base
    import lstm_fast
    if isinstance(base, RegularisedCellLoop):  # the same weights in an LSTM with the option
        name_p, p = base.reg.split("=")
        cell = base.cell
        module = lstm_fast.LSTM(cell.input_size, cell.hidden_size, backend=name, device=cell.weight_ih.device,
                                dtype=cell.weight_ih.dtype, **{name_p: float(p)})
        for src, dst in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0"), ("bias_ih", "bias_ih_l0"),
                         ("bias_hh", "bias_hh_l0")):
            getattr(module, dst).data.copy_(getattr(cell, src))
        return module
    if isinstance(base, CellLoop):
        return CellLoop(lstm_fast.LSTMCell.from_torch(base.cell, backend=name))
    if isinstance(base, StepLoop):
        return StepLoop(lstm_fast.LSTM.from_torch(base.lstm, backend=name))
    return lstm_fast.LSTM.from_torch(base, backend=name)


def make_step(module, x, gy, mode, shape=None, is_torch=True):
    """One call of the whole module as a user makes it; training includes backward to x and every weight.
    shape: the config, for variable-length input (bench/varlen.py); None calls module(x)."""
    params = list(module.parameters())
    inp, leaf = (x, x) if shape is None else varlen.module_input(shape, x)

    def forward():
        return module(inp)[0] if shape is None else varlen.call(shape, module, inp, is_torch)

    if mode == "inference":
        def step():
            with torch.inference_mode():
                return forward()
    else:
        def step():
            for p in params:
                p.grad = None
            leaf.grad = None
            y = forward()
            y.backward(gy)
            return y
    step.grad_leaf = leaf  # where the input's gradient lands
    return step


def outputs_of(module, x, gy, mode, shape=None, is_torch=True):
    """What the correctness check compares: output (and x / W_hh gradients in training)."""
    step = make_step(module, x, gy, mode, shape, is_torch)
    y = step()
    out = [y.detach().float().clone()]
    if mode == "training":
        out += [step.grad_leaf.grad.detach().float().clone(), module.weight_hh_l0.grad.detach().float().clone()]
    return out


def rel_err(got, want):
    err = 0.0
    for a, b in zip(got, want):
        scale = b.abs().max().item() or 1.0
        err = max(err, (a - b).abs().max().item() / scale)
    return err


def time_samples(step, inner, device):
    if device == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            step()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        step()
    return (time.perf_counter() - t0) / inner


def peak_memory(step, device):
    """Bytes the call allocates above what was held before it, at its peak.

    GPU: torch.cuda.max_memory_allocated. CPU: torch has no CPU peak counter,
    resource's ru_maxrss is a process-lifetime maximum (blind after the first
    large config) and tracemalloc does not see torch's allocator, so the call
    runs once under torch.profiler with profile_memory=True and the allocator's
    alloc/free events are summed in time order. It counts torch tensors only:
    memory a backend takes outside torch's allocator (NumPy/Numba arrays) is
    not seen.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


class _quiet_stderr:
    """The profiler's C++ side prints start/stop chatter to fd 2; keep CI logs readable."""

    def __enter__(self):
        try:
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self.saved = None

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)


def _status_of(exc: BaseException) -> tuple[str, str]:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "error", "out of memory"
    if isinstance(exc, (NotImplementedError,)) or "not support" in msg or "unsupported" in msg.lower():
        return "unsupported", msg
    return "error", msg


def base_row(shape: Shape, dtype: str, mode: str, name: str) -> dict:
    return {"config": shape.name, "family": shape.family, "tags": list(shape.tags),
            "T": shape.T, "B": shape.B, "I": shape.I, "H": shape.H, "L": shape.L,
            "bidir": shape.bidir, "proj": shape.proj, "cell": shape.cell, "steps": shape.steps, "dtype": dtype,
            "mode": mode,
            "backend": name, "status": "ok", "reason": "",
            "flops": lstm_flops(shape, mode) * varlen.real_share(shape),
            "varlen": shape.varlen, "real_share": varlen.real_share(shape),
            "cudnn_persistent": cudnn_persistent(shape, dtype)}


def run_config(shape: Shape, dtype: str, mode: str, names: list[str], opts: Options,
               target_s: float, peak_gflops: float | None, deadline: float | None = None) -> list[dict]:
    """Time every runner on one configuration; one row per runner, never raises for a runner's failure."""
    device = opts.device
    rows = {n: base_row(shape, dtype, mode, n) for n in [BASELINE, *names]}
    with tf32(dtype == "tf32" if device == "cuda" else None):
        torch.manual_seed(opts.seed)
        tdtype = TORCH_DTYPES[dtype]
        base = make_base(shape, device, tdtype)
        x = torch.randn(shape.T, shape.B, shape.I, device=device, dtype=tdtype)
        out_w = (shape.proj or shape.H) * (2 if shape.bidir else 1)
        gy = torch.randn(*varlen.output_rows(shape), out_w, device=device, dtype=tdtype)
        if mode == "training":
            x.requires_grad_(True)
            base.train()
        else:
            base.eval()

        if device == "cuda":
            from .machine import tf32_state
            for row in rows.values():
                row["tf32_state"] = tf32_state()  # the switches this row ran under
        steps, est, reference = {}, {}, None
        for n in rows:
            try:
                module = make_module(n, base)
                # Warm-up: compilation, autotuning, allocator caches. 1 call on CPU
                # (JIT compiles on the first), 2 on GPU (cuDNN plans, Triton autotune).
                got = outputs_of(module, x, gy, mode, shape, n == BASELINE)
                if device == "cuda":
                    outputs_of(module, x, gy, mode, shape, n == BASELINE)
                if n == BASELINE:
                    reference = got
                elif reference is not None and not shape.reg:  # masks are random draws: no comparison
                    err = rel_err(got, reference)
                    rows[n]["max_rel_err"] = err
                    rows[n]["err_flag"] = not (err <= ERR_LIMIT.get(dtype, 1e-3))
                step = make_step(module, x, gy, mode, shape, n == BASELINE)
                est[n] = time_samples(step, 1, device)
                steps[n] = step
            except Exception as exc:  # a backend that cannot run this config gets a row saying why
                rows[n]["status"], rows[n]["reason"] = _status_of(exc)
                if device == "cuda":
                    torch.cuda.empty_cache()
        if not steps:
            return list(rows.values())
        try:  # timed beside the runners; it becomes a column of theirs, not a row
            if shape.varlen not in ("", "padded"):
                raise ValueError("the floor counts dense GEMMs only")
            steps[FLOOR] = floor_step(shape, mode, device, tdtype)
            steps[FLOOR]()
            est[FLOOR] = time_samples(steps[FLOOR], 1, device)
            rows[FLOOR] = base_row(shape, dtype, mode, FLOOR)
        except Exception:  # no floor column for this config; the runners are unaffected
            steps.pop(FLOOR, None)

        # Several calls per sample on GPU where one call is short, so a sample
        # is >= 1 ms and event resolution (~µs) and launch jitter stay small.
        min_sample = 1e-3 if device == "cuda" else 0.0
        inner = {n: max(1, min(100, math.ceil(min_sample / max(est[n], 1e-7)))) for n in steps}
        round_s = sum(est[n] * inner[n] for n in steps)
        if opts.repeats:
            repeats = opts.repeats
        else:
            repeats = int(max(opts.min_repeats, min(opts.max_repeats, target_s / max(round_s, 1e-9))))
            if opts.tight and round_s * repeats > 2 * target_s:
                # Budgeted run on a slow or busy machine: 3 interleaved rounds
                # rather than skipping the configurations after this one.
                repeats = min(repeats, 3)

        samples = {n: [] for n in steps}
        order = list(steps)
        gc.collect()
        gc.disable()  # a collection inside one runner's sample would bias it
        try:
            for r in range(repeats):
                if deadline is not None and r >= 3 and time.time() > deadline:
                    break  # the run's budget is spent: 3 interleaved rounds are the floor
                # Round-robin, rotating who goes first, so drift and caches hit everyone alike.
                for n in order[r % len(order):] + order[:r % len(order)]:
                    if n not in steps:
                        continue
                    try:
                        samples[n].append(time_samples(steps[n], inner[n], device))
                    except Exception as exc:
                        rows[n]["status"], rows[n]["reason"] = _status_of(exc)
                        del steps[n]
        finally:
            gc.enable()

        for n, s in samples.items():
            row = rows[n]
            if not s or row["status"] != "ok":
                continue
            med = statistics.median(s)
            row.update(median_ms=med * 1e3, min_ms=min(s) * 1e3, max_ms=max(s) * 1e3, repeats=len(s),
                       inner=inner[n], samples_ms=[round(v * 1e3, 4) for v in s],
                       tokens_per_s=shape.T * shape.B * varlen.real_share(shape) / med,
                       gflops=row["flops"] / med / 1e9)
            if peak_gflops:
                row["pct_peak"] = 100.0 * row["gflops"] / peak_gflops
        runners = [n for n in steps if n != FLOOR]
        if opts.measure_memory and deadline is not None and time.time() > deadline:
            for n in runners:
                rows[n]["peak_mem_mb"] = None  # one more call each would overrun the budget
        elif opts.measure_memory:
            for n in runners:
                try:
                    rows[n]["peak_mem_mb"] = peak_memory(steps[n], device) / 2**20
                except Exception as exc:
                    rows[n]["peak_mem_mb"] = None
                    rows[n]["reason"] = f"memory not measured: {type(exc).__name__}: {exc}"[:200]
    floor = rows.pop(FLOOR, {}).get("median_ms")
    for row in rows.values():
        if floor and row.get("median_ms"):
            row["floor_ms"] = floor
            row["x_floor"] = row["median_ms"] / floor
    b = rows[BASELINE]
    for n, row in rows.items():
        if n != BASELINE and row.get("median_ms") and b.get("median_ms"):
            row["speedup"] = b["median_ms"] / row["median_ms"]
    if b.get("median_ms"):
        b["speedup"] = 1.0
    del base, steps
    if device == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())
