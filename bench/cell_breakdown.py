"""Where one call's microseconds go at batch 1, default backend (cpp), beside torch.nn.

    python -m bench.cell_breakdown [--hidden 8,64,256] [--repeats 15] [--threads N]

All times are per call (per step for the 50-step loops), medians of interleaved
repeats in this process, in microseconds.

LSTMCell, one step, inference (torch.no_grad):
  torch          torch.nn.LSTMCell(x, (h, c))
  torch _VF      torch's step without its module: torch._VF.lstm_cell (ATen's composite)
  ours           lstm_fast.LSTMCell(x, (h, c)): the short path (lstm_fast/_fast.py)
  op             torch.ops.lstm_fast.lstm_cell from Python: the step without the module
  op_out         lstm_cell_out into preallocated outputs: op without its two allocations
  enter op       entering any op from Python (torch.ops.aten.alias), the floor of "op"
  module call    nn.Module.__call__ around a forward that returns at once
From these: kernel ~ op_out - enter op; ours - op = the module call and the forward's
Python (watched(), the hx tests).
LSTMCell training, 50-step loop, forward + backward, per step:
  torch / ours   the whole step; "ours fwd" the forward with grad alone (the autograd
                 node recorded in C++), "ours bwd" = ours - ours fwd
LSTM, inference: one call at T=1 with (h, c) carried, and one at T=100:
  torch / ours   the module; op = ours' ops called directly (lstm_cell at T=1,
                 lstm_forward_projected at T=100)
numba: the same module calls with backend="numba", where its kernels are available.
Recurrence per step, B=1, I=8 (input projection negligible): the marginal cost of a
step, (time at T=1000 - time at T=100) / 900, and the rate at which W_hh's bytes
(4H x H floats, read once per step at batch 1) pass through the kernel.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lstm_fast
from lstm_fast.backends import get_backend


def timed(fns, repeats, inner):
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for r in range(repeats):
        names = list(fns)
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / inner * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


class _Nothing(torch.nn.Module):
    def forward(self, x, hx=None):
        return x


def cell_inference(H, repeats, numba):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(H, H)
    ours = lstm_fast.LSTMCell.from_torch(ref)
    w = [p.detach() for p in (ref.weight_ih, ref.weight_hh, ref.bias_ih, ref.bias_hh)]
    x, hx = torch.randn(1, H), (torch.randn(1, H), torch.randn(1, H))
    h_out, c_out = torch.empty(1, H), torch.empty(1, H)
    nothing = _Nothing()
    op, op_out, alias = (torch.ops.lstm_fast.lstm_cell.default, torch.ops.lstm_fast.lstm_cell_out.default,
                         torch.ops.aten.alias.default)
    fns = {"torch": lambda: ref(x, hx), "torch _VF": lambda: torch._VF.lstm_cell(x, hx, *w),
           "ours": lambda: ours(x, hx), "op": lambda: op(x, *hx, *w),
           "op_out": lambda: op_out(x, *hx, *w, h_out, c_out), "enter op": lambda: alias(x),
           "module call": lambda: nothing(x, hx)}
    if numba:
        nb = lstm_fast.LSTMCell.from_torch(ref, backend="numba")
        fns["numba"] = lambda: nb(x, hx)
    with torch.no_grad():
        return timed(fns, repeats, 200)


def cell_training(H, repeats, numba, T=50):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(H, H)
    mods = {"torch": ref, "ours": lstm_fast.LSTMCell.from_torch(ref)}
    if numba:
        mods["numba"] = lstm_fast.LSTMCell.from_torch(ref, backend="numba")
    xs = torch.randn(T, 1, H, requires_grad=True)

    def loop(m, backward=True):
        def run():
            for p in m.parameters():
                p.grad = None
            state, ys = (torch.zeros(1, H), torch.zeros(1, H)), []
            for t in range(T):
                state = m(xs[t], state)
                ys.append(state[0])
            if backward:
                torch.stack(ys).sum().backward()
        return run

    fns = {k: loop(m) for k, m in mods.items()}
    fns["ours fwd"] = loop(mods["ours"], backward=False)
    med = timed(fns, repeats, 2)
    out = {k: v / T for k, v in med.items()}
    out["ours bwd"] = out["ours"] - out["ours fwd"]
    return out


def lstm_inference(H, T, repeats, numba):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(H, H)
    ours = lstm_fast.LSTM.from_torch(ref)
    x, hx = torch.randn(T, 1, H), (torch.randn(1, 1, H), torch.randn(1, 1, H))
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in (ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0,
                                                   ref.bias_hh_l0))
    if T == 1:
        def direct():
            h, c = torch.ops.lstm_fast.lstm_cell.default(x[0], hx[0][0], hx[1][0], w_ih, w_hh, b_ih, b_hh)
            return h.unsqueeze(0), (torch.stack([h]), torch.stack([c]))
    else:
        def direct():
            return torch.ops.lstm_fast.lstm_forward_projected.default(x, w_ih, b_ih + b_hh, hx[0][0], hx[1][0], w_hh,
                                                                      None, None, False, False)
    fns = {"torch": lambda: ref(x, hx), "ours": lambda: ours(x, hx), "op": direct}
    if numba:
        nb = lstm_fast.LSTM.from_torch(ref, backend="numba")
        fns["numba"] = lambda: nb(x, hx)
    with torch.no_grad():
        return timed(fns, repeats, 200 if T == 1 else 20)


def recurrence_per_step(H, repeats):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, H)
    ours = lstm_fast.LSTM.from_torch(ref)
    xs = {T: torch.randn(T, 1, 8) for T in (100, 1000)}
    fns = {f"{name} T{T}": (lambda m=m, x=x: m(x)) for name, m in (("torch", ref), ("ours", ours))
           for T, x in xs.items()}
    with torch.no_grad():
        med = timed(fns, repeats, 2)
    out = {name: (med[f"{name} T1000"] - med[f"{name} T100"]) / 900 for name in ("torch", "ours")}
    out["GB/s"] = 16 * H * H / out["ours"] / 1e3
    return out


def _row(name, m, keys):
    cells = " | ".join(f"{m[k]:.1f}" if k in m else "-" for k in keys)
    speed = " | ".join(f"{m['torch'] / m[k]:.2f}x" if k in m else "-" for k in ("ours", "numba"))
    return f"| {name} | {cells} | {speed} |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", default="8,64,256")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    numba = get_backend("numba").is_available()[0]
    hs = [int(h) for h in args.hidden.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per call (per step in loops), "
          f"median of {args.repeats} interleaved repeats; B=1, I=H\n")
    keys = ("torch", "torch _VF", "ours", "op", "op_out", "enter op", "module call", "numba")
    print("LSTMCell step, no_grad\n\n| H | " + " | ".join(keys) + " | ours speedup | numba speedup |")
    print("|---" * (len(keys) + 3) + "|")
    for H in hs:
        print(_row(str(H), cell_inference(H, args.repeats, numba), keys))
    keys = ("torch", "ours", "ours fwd", "ours bwd", "numba")
    print("\nLSTMCell training, 50-step loop, per step\n\n| H | " + " | ".join(keys)
          + " | ours speedup | numba speedup |")
    print("|---" * (len(keys) + 3) + "|")
    for H in hs:
        print(_row(str(H), cell_training(H, args.repeats, numba), keys))
    keys = ("torch", "ours", "op", "numba")
    print("\nLSTM call, inference, (h, c) given\n\n| T, H | " + " | ".join(keys) + " | ours speedup | numba speedup |")
    print("|---" * (len(keys) + 3) + "|")
    for T in (1, 100):
        for H in hs:
            print(_row(f"T{T} H{H}", lstm_inference(H, T, args.repeats, numba), keys))
    print("\nRecurrence per step, B=1, I=8, no_grad: us per step, and W_hh's bytes per second through ours\n\n"
          "| H | W_hh KiB | torch | ours | ours GB/s |\n|---|---|---|---|---|")
    for H in sorted({64, 128, 256} | {h for h in hs if h >= 64}):  # below, a step is too short to difference
        m = recurrence_per_step(H, args.repeats)
        print(f"| {H} | {16 * H * H / 1024:g} | {m['torch']:.2f} | {m['ours']:.2f} | {m['GB/s']:.1f} |")


if __name__ == "__main__":
    main()
