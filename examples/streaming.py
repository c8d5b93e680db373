"""A model fed one sample at a time, its LSTM state carried from step to step:
per-step latency percentiles of torch.nn.LSTM against lstm_fast doing the same.

    python examples/streaming.py [--backend auto|cpp|numba|...] [--device cpu|cuda]
                                 [--steps 2000] [--hidden 128] [--layers 1]

Each runner feeds the same samples through LSTM + a linear head:
  torch.nn.LSTM   module call on a [1, 1, I] input with (h, c) carried
  lstm_fast.LSTM  the same call on lstm_fast's module (same weights)
  lstm_fast.Stream  Stream.step writing into a preallocated output
The runners take turns in blocks of steps, so a busy neighbour hits them alike.
"""
import argparse
import statistics
import time

import torch
from torch import nn

import lstm_fast


def percentiles(samples_us):
    s = sorted(samples_us)
    return {p: s[min(len(s) - 1, int(p / 100 * len(s)))] for p in (50, 90, 99)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--input", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--block", type=int, default=50, help="steps per runner before the next takes its turn")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    ref = nn.LSTM(args.input, args.hidden, args.layers).to(dev).eval()
    ours = lstm_fast.LSTM.from_torch(ref, backend=args.backend).eval()
    head = nn.Linear(args.hidden, 1).to(dev)
    samples = torch.randn(args.steps, 1, args.input, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def module_runner(m):
        state = None

        def step(x):
            nonlocal state
            y, state = m(x.unsqueeze(0), state)
            return head(y[0])
        return step

    stream, out = lstm_fast.Stream(ours, batch_size=1), torch.empty(1, args.hidden, device=dev)

    def stream_step(x):
        return head(stream.step(x, out=out))

    runners = {"torch.nn.LSTM": module_runner(ref), "lstm_fast.LSTM": module_runner(ours),
               "lstm_fast.Stream": stream_step}
    times = {k: [] for k in runners}
    outputs = {k: [] for k in runners}
    with torch.inference_mode():
        for step in runners.values():  # warm-up (first-call costs), not timed
            step(samples[0])
        stream.reset()
        runners["torch.nn.LSTM"], runners["lstm_fast.LSTM"] = module_runner(ref), module_runner(ours)
        for start in range(0, args.steps, args.block):
            block = range(start, min(start + args.block, args.steps))
            for name, step in runners.items():
                for t in block:
                    t0 = time.perf_counter()
                    y = step(samples[t])
                    sync()
                    times[name].append((time.perf_counter() - t0) * 1e6)
                    outputs[name].append(float(y))
    base = outputs["torch.nn.LSTM"]
    print(f"{args.steps} steps, I={args.input} H={args.hidden} layers={args.layers}, {dev}, backend={args.backend}, "
          f"torch threads {torch.get_num_threads()}; per-step latency in us (LSTM + linear head)")
    print(f"{'runner':18} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}  max |out - torch|")
    result = {}
    for name in runners:
        q = percentiles(times[name])
        diff = max(abs(a - b) for a, b in zip(outputs[name], base))
        result[name] = dict(q, mean=statistics.fmean(times[name]), diff=diff)
        print(f"{name:18} {q[50]:8.1f} {q[90]:8.1f} {q[99]:8.1f} {statistics.fmean(times[name]):8.1f}  {diff:.2e}")
    return result


if __name__ == "__main__":
    main()
