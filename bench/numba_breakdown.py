"""Where one call of lstm_fast.LSTM(backend="numba") spends its time, beside torch.nn.LSTM.

    python -m bench.numba_breakdown [--configs T,B,I,H;...] [--repeats N]

Per configuration and mode, medians of interleaved repeats in this process:
  torch      torch.nn.LSTM, the whole call (oneDNN)
  ours       lstm_fast.LSTM(backend="numba"), the whole call
  launches   the compiled parts alone: the forward launch (slab packing, input
             projection, time loop) and in training the backward launch (BPTT),
             replayed with the arguments the call gave them
  rest       ours - launches: Python (module, autograd.Function, argument
             preparation) and, in training, the GEMMs done through torch after
             the loop (dW_hh, and dx, dW_ih, db of the input projection)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lstm_fast
from lstm_fast.backends import numba_cpu

DEFAULT = "100,32,256,256;200,8,128,128;100,1,128,128"


def _captured_launches(module, x, mode):
    """Run one call and keep the arguments of every numba launch it makes."""
    seen = []
    real = numba_cpu._launch

    def spy(parallel, worker, nc, *args):
        seen.append((parallel, worker, nc, args))
        return real(parallel, worker, nc, *args)

    numba_cpu._launch = spy
    try:
        _call(module, x, mode)()
    finally:
        numba_cpu._launch = real
    return seen


def _replay(launches):
    def run():
        for parallel, worker, nc, args in launches:
            args[0][:] = 0  # the call's sync counters start from zero
            numba_cpu._launch(parallel, worker, nc, *args)
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


def breakdown(T, B, I, H, mode, repeats):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H)
    ours = lstm_fast.LSTM.from_torch(ref, backend="numba")
    x = torch.randn(T, B, I, requires_grad=mode == "training")
    runners = {"torch": _call(ref, x, mode), "ours": _call(ours, x, mode),
               "launches": _replay(_captured_launches(ours, x, mode))}
    times = {k: [] for k in runners}
    for f in runners.values():
        f()
    for r in range(repeats):
        names = list(runners)
        for k in names[r % 3:] + names[:r % 3]:
            t0 = time.perf_counter()
            runners[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med["rest"] = med["ours"] - med["launches"]
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT, help="T,B,I,H;... (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms (median of "
          f"{args.repeats} interleaved repeats)\n")
    print("| config | mode | torch | ours | speedup | launches | rest |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.configs.split(";"):
        T, B, I, H = (int(v) for v in spec.split(","))
        for mode in ("inference", "training"):
            m = breakdown(T, B, I, H, mode, args.repeats)
            print(f"| T{T} B{B} I{I} H{H} | {mode} | {m['torch']:.3g} | {m['ours']:.3g} | "
                  f"{m['torch'] / m['ours']:.2f}x | {m['launches']:.3g} | {m['rest']:.3g} |")


if __name__ == "__main__":
    main()
