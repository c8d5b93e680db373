"""Where one call of lstm_fast.LSTM(backend="numba") spends its time, beside torch.nn.LSTM.

    python -m bench.numba_breakdown [--configs T,B,I,H;...] [--repeats N]

Per configuration and mode, medians of interleaved repeats in this process:
  torch      torch.nn.LSTM, the whole call (oneDNN)
  ours       lstm_fast.LSTM(backend="numba"), the whole call
  launches   the compiled parts alone: the forward launch (slab packing, input
             projection, time loop) and in training the backward launch (BPTT),
             replayed with the arguments the call gave them
  rest       ours - launches, split in two:
    backend  the rest inside the numba backend's methods: argument preparation
             and, in training, the GEMMs done through torch after the loop
             (dW_hh, and dx, dW_ih, db of the input projection)
    module   outside them: the module, the autograd.Function and, in training,
             autograd's engine
  cpp        lstm_fast.LSTM(backend="cpp"), the whole call (same structure in C++),
             when the extension is available
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lstm_fast
from lstm_fast.backends import get_backend
from lstm_fast.backends.numba import threads

DEFAULT = "100,32,256,256;200,8,128,128;100,1,128,128"


def _captured_launches(module, x, mode):
    """Run one call and keep the arguments of every numba launch it makes."""
    seen = []
    real = threads.launch

    def spy(parallel, worker, n_chunks, *args):
        seen.append((parallel, worker, n_chunks, args))
        return real(parallel, worker, n_chunks, *args)

    threads.launch = spy
    try:
        _call(module, x, mode)()
    finally:
        threads.launch = real
    return seen


def _replay(launches):
    def run():
        for parallel, worker, n_chunks, args in launches:
            args[0][:] = 0  # the call's sync counters start from zero
            threads.launch(parallel, worker, n_chunks, *args)
    return run


def _call(module, x, mode):
    if mode == "inference":
        def run():
            with torch.inference_mode():
                module(x)
        return run

    def run():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        y, _ = module(x)
        y.sum().backward()
    return run


def _timed_backend_methods(spent):
    """Make the numba backend add the time of each of its forward/backward calls to spent[0]."""
    backend = get_backend("numba")
    for name in ("forward_projected", "backward_projected"):
        method = getattr(type(backend), name).__get__(backend)

        def timed(*args, _method=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        setattr(backend, name, timed)
    return lambda: [backend.__dict__.pop(n, None) for n in ("forward_projected", "backward_projected")]


def breakdown(T, B, I, H, mode, repeats):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H)
    ours = lstm_fast.LSTM.from_torch(ref, backend="numba")
    x = torch.randn(T, B, I, requires_grad=mode == "training")
    runners = {"torch": _call(ref, x, mode), "ours": _call(ours, x, mode),
               "launches": _replay(_captured_launches(ours, x, mode))}
    if get_backend("cpp").is_available()[0]:
        runners["cpp"] = _call(lstm_fast.LSTM.from_torch(ref, backend="cpp"), x, mode)
    times = {k: [] for k in runners}
    in_backend, spent = [], [0.0]
    restore = _timed_backend_methods(spent)
    try:
        for f in runners.values():
            f()
        for r in range(repeats):
            names = list(runners)
            for k in names[r % len(names):] + names[:r % len(names)]:
                spent[0] = 0.0
                t0 = time.perf_counter()
                runners[k]()
                times[k].append(time.perf_counter() - t0)
                if k == "ours":
                    in_backend.append(spent[0])
    finally:
        restore()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med["rest"] = med["ours"] - med["launches"]
    med["module"] = med["ours"] - statistics.median(in_backend) * 1e3
    med["backend"] = med["rest"] - med["module"]
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT, help="T,B,I,H;... (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms (median of "
          f"{args.repeats} interleaved repeats)\n")
    print("| config | mode | torch | ours | speedup | launches | rest: backend | rest: module | cpp | cpp speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.configs.split(";"):
        T, B, I, H = (int(v) for v in spec.split(","))
        for mode in ("inference", "training"):
            m = breakdown(T, B, I, H, mode, args.repeats)
            cpp = f"{m['cpp']:.3g} | {m['torch'] / m['cpp']:.2f}x" if "cpp" in m else "- | -"
            print(f"| T{T} B{B} I{I} H{H} | {mode} | {m['torch']:.3g} | {m['ours']:.3g} | "
                  f"{m['torch'] / m['ours']:.2f}x | {m['launches']:.3g} | {m['backend']:.3g} | "
                  f"{m['module']:.3g} | {cpp} |")


if __name__ == "__main__":
    main()
