"""The shared-core training case: one fresh process per measurement, with and without busy neighbours.

    python -m bench.contention [--spinners 2] [--procs 3] [--runners torch,cpp,numba] [--ddp] [--out DIR]

A training step (zero_grad, forward, loss = output.sum(), backward; T=100, B=16, I=H=128,
float32, 2 torch threads) is timed in fresh processes: each prints the median of --steps
steps after --warmup steps. Conditions: quiet, then with --spinners `while True: pass`
processes on the cores (bench/contend.py); with --ddp, also two DistributedDataParallel
ranks (gloo) of 2 threads each, every rank one process, quiet and with the spinners. Runners alternate within a round,
so slow periods of the machine fall on all of them. The table gives each condition's
processes (the worst decides whether a machine with neighbours is usable) and the
ratios of the worst process to torch.nn.LSTM's worst and to the runner's quiet median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .cli import ROOT


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spinners", type=int, default=2, help="busy processes of the contended condition")
    p.add_argument("--procs", type=int, default=3, help="fresh processes per runner and condition")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each process")
    p.add_argument("--runners", default="torch,cpp", help="torch and lstm_fast backends, comma-separated")
    p.add_argument("--size", default="T=100,B=16,I=128,H=128")
    p.add_argument("--ddp", action="store_true", help="also two DDP ranks (gloo) per measurement")
    p.add_argument("--out", help="folder for contention.json and contention.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _size(spec):
    return {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}


def _child(args):
    """One process (or DDP rank): time the steps, print {"median_ms", "steps_ms"} as JSON."""
    import torch

    spec = json.loads(args.child)
    torch.set_num_threads(spec["threads"])
    s = _size(spec["size"])
    torch.manual_seed(0)
    if spec["runner"] == "torch":
        lstm = torch.nn.LSTM(s["I"], s["H"])
    else:
        import lstm_fast
        lstm = lstm_fast.LSTM(s["I"], s["H"], backend=spec["runner"])
    rank = spec.get("rank")
    if rank is not None:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=2)
        lstm = torch.nn.parallel.DistributedDataParallel(lstm)
    x = torch.randn(s["T"], s["B"], s["I"])
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        lstm.zero_grad()
        out, _ = lstm(x)
        out.sum().backward()
        if i >= spec["warmup"]:
            times.append((time.perf_counter() - t0) * 1e3)
    if rank is not None:
        torch.distributed.destroy_process_group()
    print(json.dumps({"median_ms": statistics.median(times), "steps_ms": times}))


def _spawn(spec):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "bench.contention", "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _collect(proc):
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"a measured process failed ({proc.returncode}):\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure(runner, base, ddp):
    """Medians (ms) of one measurement: one process, or the two DDP ranks."""
    if not ddp:
        return [_collect(_spawn({**base, "runner": runner}))["median_ms"]]
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ranks = [_spawn({**base, "runner": runner, "rank": r, "store": store}) for r in range(2)]
        return [_collect(p)["median_ms"] for p in ranks]


def run(args):
    from . import contend

    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    base = {"threads": args.threads, "size": args.size, "steps": args.steps, "warmup": args.warmup}
    conditions = [("quiet", 0, False), (f"{args.spinners} spinners", args.spinners, False)]
    if args.ddp:
        conditions += [("DDP 2 ranks, quiet", 0, True), (f"DDP 2 ranks, {args.spinners} spinners", args.spinners, True)]
    results = {}
    for name, k, ddp in conditions:
        spinners = contend.start(k)
        try:
            for _ in range(args.procs):
                for runner in runners:
                    results.setdefault(name, {}).setdefault(runner, []).extend(measure(runner, base, ddp))
        finally:
            contend.stop(spinners)
        print(f"{name}: " + "; ".join(f"{r} {' / '.join(f'{m:.0f}' for m in v)} ms"
                                      for r, v in results[name].items()), flush=True)
    return results


def table(results, args):
    quiet = {r: statistics.median(v) for r, v in results["quiet"].items()}
    ddp_quiet = {r: statistics.median(v) for r, v in results.get("DDP 2 ranks, quiet", {}).items()}
    lines = [f"Training step {args.size}, float32, {args.threads} torch threads per process, median of "
             f"{args.steps} steps after {args.warmup}; {args.procs} fresh processes per runner and condition "
             f"(DDP: both ranks of each).", "",
             "| condition | runner | per-process medians (ms) | worst | worst / torch's worst "
             "| worst / own quiet median | worst / own quiet DDP median |",
             "|---|---|---|---|---|---|---|"]
    for name, by_runner in results.items():
        torch_worst = max(by_runner["torch"]) if "torch" in by_runner else None
        for runner, medians in by_runner.items():
            worst = max(medians)
            vs_torch = f"{worst / torch_worst:.2f}" if torch_worst else "-"
            vs_ddp = f"{worst / ddp_quiet[runner]:.2f}" if name.startswith("DDP") and runner in ddp_quiet else "-"
            lines.append(f"| {name} | {runner} | {' / '.join(f'{m:.1f}' for m in medians)} | {worst:.1f} | "
                         f"{vs_torch} | {worst / quiet[runner]:.2f} | {vs_ddp} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        _child(args)
        return 0
    from . import machine

    load = machine._loadavg()
    results = run(args)
    md = table(results, args)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        git = machine.git_state(ROOT)
        commit = (git["commit"] or "?")[:10] + (" (uncommitted changes)" if git["dirty"] else "")
        meta = {"command": "python -m bench.contention " + " ".join(argv),
                "git": git, "load_before": load, "cpus": os.cpu_count()}
        with open(os.path.join(args.out, "contention.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        with open(os.path.join(args.out, "contention.md"), "w") as f:
            f.write(f"# Shared cores: training step in fresh processes\n\n`{meta['command']}` at commit "
                    f"{commit}; load average before the run {load}; {meta['cpus']} CPUs.\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
