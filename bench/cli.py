"""python -m bench: the benchmark report of lstm_fast against torch.nn.LSTM."""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --quick must finish within 3 minutes on the 2-core build machine. The budget
# counts from the start of the process (imports, backend loading and the matmul
# rate included); repeats adapt to it and configs not started by then are
# skipped, so the last config's overrun and the plot (~10 s there) must fit in
# the rest.
QUICK_BUDGET_S = {"cpu": 160.0, "cuda": 120.0}
# Full run: seconds of timing aimed at per configuration (repeats adapt).
FULL_TARGET_S = {"cpu": 8.0, "cuda": 2.0}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n"
                                       "  python -m bench --quick\n"
                                       "  python -m bench --configs reference --backends numba,cpp\n"
                                       "  python -m bench --configs 'T=100,B=32,H=256,modes=training;T=50,B=1,H=64'\n"
                                       "  python -m bench --compare old/results.json new/results.json\n")
    p.add_argument("--quick", action="store_true", help="small matrix within a time budget (CI)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backends", help="comma-separated backends to time (default: every available one that is "
                                      "a performance path on this device)")
    p.add_argument("--configs", help="named sets joined by ',' (reference, sweep, stacked, extra, quick-cpu, "
                                     "full-cpu, cell, quick-gpu, full-gpu, sweep-gpu, tiny) and/or spec strings "
                                     "'T=..,B=..,H=..[,I=..,L=..,bi=1,proj=..,cell=1,modes=training+inference];...'")
    p.add_argument("--dtype", help="comma-separated: fp32, tf32 (GPU: fp32 with TF32 on), fp16, bf16, fp64")
    p.add_argument("--modes", help="comma-separated: inference, training")
    p.add_argument("--out", help="results folder (default bench/results/<timestamp>/)")
    p.add_argument("--budget", type=float, help="seconds for the whole run: repeats adapt, configs not started "
                                                "within it are skipped (default: 160 with --quick on CPU, "
                                                "none otherwise)")
    p.add_argument("--repeats", type=int, help="fixed number of interleaved repeats (default: adaptive)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all usable cores)")
    p.add_argument("--contend", type=int, default=0, metavar="K",
                   help="K processes spin on the cores while configurations are timed (shared cores, preempted "
                        "threads); the report header says so")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="print the matrix and the backend plan, run nothing")
    p.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"), help="compare two reports and exit")
    p.add_argument("--noise-floor", type=float, default=0.05, help="smallest relative change --compare flags")
    p.add_argument("--fail-on-regression", action="store_true", help="--compare exits 1 on a regression")
    p.add_argument("--summary", metavar="results.json",
                   help="print the per-backend speedup summary of a report and exit")
    return p.parse_args(argv)


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _first_line(text, limit=300):
    """Reasons can carry a whole compiler log; the report keeps its first line."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def plan_backends(device, requested):
    """{name: {available, timed, note}}: which backends this run times and why the others are left out."""
    import torch

    import lstm_fast
    from lstm_fast.backends import get_backend
    from lstm_fast.backends.base import LayerSizes

    plan = {}
    for name, (ok, why) in lstm_fast.available_backends().items():
        why = _first_line(why)
        entry = {"available": bool(ok), "timed": False, "note": why}
        plan[name] = entry
        if requested is not None and name not in requested:
            entry["note"] = "not requested (--backends)" + ("" if ok else f"; unavailable: {why}")
            continue
        if not ok:
            entry["note"] = f"unavailable: {why}"
            continue
        explicit = requested is not None
        if name == "triton" and device == "cpu" and not explicit:
            entry["note"] = ("on CPU Triton runs only in its interpreter (TRITON_INTERPRET=1), a correctness "
                             "tool, not a performance path; timed on GPU only")
            continue
        if name == "reference" and not explicit:
            entry["note"] = ("the oracle: a Python loop over time steps, not a performance path; "
                             "time it with --backends reference")
            continue
        probe = LayerSizes(T=8, B=4, H=32, P=32)
        sup, swhy = get_backend(name).supports(torch.device(device), torch.float32, probe)
        if not sup:
            entry["note"] = f"does not run on {device}: {swhy}"
            continue
        entry["timed"] = True
    if requested:
        for name in requested:
            if name not in plan:
                raise SystemExit(f"unknown backend {name!r}; known: {', '.join(plan)}")
    return plan


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from . import report as rep

    if args.compare:
        text, n = rep.compare(rep.load(args.compare[0]), rep.load(args.compare[1]), args.noise_floor)
        print(text)
        return 1 if (n and args.fail_on_regression) else 0
    if args.summary:
        print(rep.summary_md(rep.load(args.summary)))
        return 0

    t_start = time.time()
    import faulthandler
    faulthandler.enable()  # a backend that crashes the process still names itself in the log
    import torch

    from . import configs as cfg
    from . import contend, machine
    from .measure import BASELINE, Options, base_row, run_config
    from .progress import Progress

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # Every usable core for both sides; the backends read torch.get_num_threads().
        torch.set_num_threads(args.threads or machine.usable_cores())

    shapes = cfg.resolve_configs(args.configs, device, args.quick)
    dtypes = _csv(args.dtype) or cfg.default_dtypes(device, args.quick)
    for d in dtypes:
        if d not in cfg.DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(cfg.DTYPES)}")
        if d == "tf32" and device != "cuda":
            raise SystemExit("dtype tf32 is a GPU switch; on CPU use fp32")
    modes = _csv(args.modes) or list(cfg.MODES)
    for m in modes:
        if m not in cfg.MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(cfg.MODES)}")
    matrix = [(s, d, m) for s in shapes for d in dtypes for m in cfg.MODES if m in modes and m in s.modes]
    plan = plan_backends(device, _csv(args.backends))
    names = [n for n, e in plan.items() if e["timed"]]

    if args.list:
        for n, e in plan.items():
            print(f"{n:10s} {'TIMED' if e['timed'] else 'left out'}: {e['note']}")
        for s, d, m in matrix:
            print(f"{m:9s} {d:5s} {s.name}")
        print(f"{len(matrix)} configurations x {len(names) + 1} runners on {device}")
        return 0

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    budget = args.budget if args.budget is not None else (QUICK_BUDGET_S[device] if args.quick else None)
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{device}")
    os.makedirs(out, exist_ok=True)
    info = machine.describe(device, ROOT)
    report = {
        "schema": 1,
        "machine": info,
        "run": {"command": "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                  else argv)),
                "quick": args.quick, "device": device, "configs": args.configs or cfg.default_set(device, args.quick),
                "dtypes": dtypes, "modes": modes, "budget_s": budget, "seed": args.seed,
                "contend": args.contend},
        "backends": plan,
        "matmul_peak": {},
        "rows": [],
    }
    print(f"lstm_fast benchmark on {info['machine']} ({device}); {len(matrix)} configurations, runners: "
          f"{', '.join([BASELINE] + names)}; results -> {out}", file=sys.stderr)
    for n, e in plan.items():
        if not e["timed"]:
            print(f"  {n}: left out: {e['note']}", file=sys.stderr)
    for d in dtypes:
        report["matmul_peak"][d] = machine.matmul_rate(device, d)

    opts = Options(device, repeats=args.repeats, measure_memory=not args.no_memory, seed=args.seed)
    opts.tight = budget is not None
    json_path = os.path.join(out, "results.json")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)  # a timeout still leaves the partial report behind

    bar = Progress(len(matrix), enabled=not args.no_progress)
    stopped = None
    spinners = []
    try:
        spinners = contend.start(args.contend)
        for k, (shape, dtype, mode) in enumerate(matrix):
            label = f"{mode} {dtype} {shape.name}"
            elapsed = time.time() - t_start
            if stopped is None and budget is not None and elapsed > budget:
                stopped = f"time budget ({budget:.0f} s) spent"
            if stopped:
                for n in [BASELINE, *names]:
                    row = base_row(shape, dtype, mode, n)
                    row.update(status="skipped", reason=stopped)
                    report["rows"].append(row)
                bar.update(label + " (skipped)")
                continue
            if budget is not None:
                # Two thirds of the per-config share goes to timed repeats; warm-up,
                # the memory call and the correctness check take the rest.
                target = max(0.3, (budget - elapsed) / (len(matrix) - k) * 0.66)
            else:
                target = FULL_TARGET_S[device]
            peak = report["matmul_peak"].get(dtype, {}).get("gflops")
            try:
                rows = run_config(shape, dtype, mode, names, opts, target, peak,
                                  deadline=None if budget is None else t_start + budget)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # the harness itself failed on this config: record it, go on
                rows = []
                for n in [BASELINE, *names]:
                    row = base_row(shape, dtype, mode, n)
                    row.update(status="error", reason=f"harness: {type(exc).__name__}: {exc}"[:300])
                    rows.append(row)
            for r in rows:
                r["contend"] = args.contend
            report["rows"] += rows
            rep.write_json(json_path, report)
            bar.update(label)
    except KeyboardInterrupt:
        stopped = "interrupted"
        bar.write("interrupted: writing the partial report")
    finally:
        contend.stop(spinners)
        bar.close()

    machine.finish(info)
    # The matmul rate again: a neighbour's burst at the start would otherwise
    # make every % of it too high. The report keeps the better of the two.
    for d in dtypes:
        try:
            again = machine.matmul_rate(device, d)
        except KeyboardInterrupt:
            break
        first = report["matmul_peak"].get(d, {})
        if again.get("gflops") and again["gflops"] > (first.get("gflops") or 0):
            report["matmul_peak"][d] = again
            for r in report["rows"]:
                if r["dtype"] == d and r.get("gflops"):
                    r["pct_peak"] = 100.0 * r["gflops"] / again["gflops"]
    report["run"]["stopped"] = stopped
    png = None if args.no_plot else rep.plot(report, os.path.join(out, "plot.png"))
    report["run"]["wall_s"] = time.time() - t_start
    rep.write_json(json_path, report)
    rep.write_csv(os.path.join(out, "results.csv"), report)
    md = rep.markdown(report)
    if png:
        md += "\n![speedup vs hidden size](plot.png)\n"
    elif not args.no_plot:
        md += "\n(no plot: matplotlib is not installed)\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out}/results.json, results.csv, results.md" + (", plot.png" if png else "")
          + f" in {report['run']['wall_s']:.0f} s", file=sys.stderr)
    return 130 if stopped == "interrupted" else 0
