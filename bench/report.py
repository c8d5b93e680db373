"""Writing and reading reports: JSON, CSV, Markdown, plot, comparison of two runs."""
from __future__ import annotations

import csv
import json
import math
import os

from .measure import BASELINE

CSV_FIELDS = ["config", "T", "B", "I", "H", "L", "bidir", "proj", "dtype", "mode", "backend", "status",
              "median_ms", "min_ms", "max_ms", "repeats", "inner", "tokens_per_s", "gflops", "pct_peak",
              "floor_ms", "x_floor", "speedup", "peak_mem_mb", "max_rel_err", "err_flag", "reason"]


def baseline_label(info: dict, rows=()) -> str:
    label = "torch.nn.LSTM (cuDNN)" if info.get("device") == "cuda" else "torch.nn.LSTM (oneDNN)"
    if any(r.get("cell") for r in rows):  # cell configs loop torch's own cell
        label += "; for `cell` configs torch.nn.LSTMCell in the same Python loop"
    if any(r.get("steps") for r in rows):
        label += "; for `steps` configs the same module fed one time step per call, state carried"
    return label


def write_json(path, report):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)  # a run killed mid-write keeps the previous complete file


# Every CSV row carries the run's identity, so a row pasted elsewhere still says where it came from.
CSV_RUN_FIELDS = ["machine", "cpu_model", "cpu_cores", "gpu_name", "torch", "cudnn", "triton", "numba",
                  "tf32", "commit", "timestamp"]


def write_csv(path, report):
    m = report["machine"]
    run = {k: m.get(k) for k in CSV_RUN_FIELDS}
    run["commit"] = (m.get("git") or {}).get("commit")
    run["tf32"] = ";".join(f"{k}={v}" for k, v in (m.get("tf32") or {}).items())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + CSV_RUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in report["rows"]:
            row = {k: _csv_value(r.get(k)) for k in CSV_FIELDS}
            row.update({k: _csv_value(v) for k, v in run.items()})
            w.writerow(row)


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _f(v, fmt="{:.3g}"):
    return "–" if v is None else fmt.format(v)


def _ms(v):
    if v is None:
        return "–"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _short(s, n=90):
    s = str(s).replace("|", "/")
    return s if len(s) <= n else s[: n - 1] + "…"


def sections(rows):
    """(mode, dtype) pairs in the order they first appear."""
    seen = []
    for r in rows:
        k = (r["mode"], r["dtype"])
        if k not in seen:
            seen.append(k)
    return seen


def header_md(report) -> str:
    info, meta = report["machine"], report["run"]
    git = info.get("git", {})
    commit = (git.get("commit") or "?")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    peaks = ", ".join(f"{d} {v['gflops']:.0f} GFLOP/s" for d, v in report.get("matmul_peak", {}).items()
                      if v.get("gflops"))
    sizes = ", ".join(sorted({f"{v['n']}²" for v in report.get("matmul_peak", {}).values()}))
    lines = [
        f"# lstm_fast benchmark: {info.get('machine')}"
        + (f", contended ({meta['contend']} spinning processes)" if meta.get("contend") else ""),
        "",
        f"- when: {info.get('timestamp')}, commit {commit}, command `{meta.get('command')}`",
        f"- machine: {info.get('cpu_model')}, {info.get('cpu_cores')} cores, torch threads "
        f"{info.get('torch_threads')}" + (f"; vector ISA: {info['vector_isa']}" if info.get("vector_isa") else "")
        + (f", GPU {info['gpu_name']} ({info.get('gpu_sms')} SMs)" if info.get("gpu_name") else ""),
        f"- software: Python {info.get('python')}, torch {info.get('torch')}"
        + (f", CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}" if info.get("device") == "cuda" else "")
        + f", triton {info.get('triton')}, numba {info.get('numba')}, numpy {info.get('numpy')}",
        f"- TF32 at start: {info.get('tf32')}; dtype `tf32` = fp32 tensors with TF32 on for both sides, "
        "`fp32` on GPU = TF32 off for both",
        f"- load average start → end: {info.get('loadavg_start')} → {info.get('loadavg_end')}",
        f"- measured matmul rate (best of a square {sizes} product, at start and end): {peaks or 'not measured'}",
        f"- baseline: {baseline_label(info, report.get('rows', ()))}, same weights "
        f"(`lstm_fast.LSTM.from_torch`), input projection "
        "included on both sides; times are the median of interleaved repeats [min–max]; training = "
        "forward + backward to the input and every weight",
        f"- wall time of the run: {meta.get('wall_s', 0):.0f} s"
        + (f"; stopped early: {meta['stopped']}" if meta.get("stopped") else ""),
    ]
    if meta.get("contend"):
        lines.append(f"- ⚠ contended run (`--contend {meta['contend']}`): {meta['contend']} processes spun on the "
                     "cores (Python busy loops) while every row below was timed, so threads of every runner "
                     "were preempted; compare these rows with an uncontended run, not with each other's load")
    load = [x[0] for x in (info.get("loadavg_start"), info.get("loadavg_end")) if x]
    if info.get("device") == "cpu" and load and max(load) > (info.get("cpu_cores") or 1):
        lines.append(f"- ⚠ the 1-minute load average ({max(load):.1f}) exceeded the {info.get('cpu_cores')} cores: "
                     "other work shared the CPU; interleaving spreads it over all runners, but times are inflated "
                     "and ratios noisier (see each row's min–max). A multi-threaded runner (torch's OpenMP team) "
                     "suffers most when one of its threads loses its core: `--threads 1` gives the "
                     "single-thread comparison")
    lines += [
        "",
        "## Backends",
        "",
        "| backend | timed | why |",
        "|---|---|---|",
        f"| {BASELINE} | yes | baseline: {baseline_label(info)} |",
    ]
    for name, b in report.get("backends", {}).items():
        lines.append(f"| {name} | {'yes' if b['timed'] else 'no'} | {_short(b['note'], 160)} |")
    return "\n".join(lines)


def _config_cell(r, info):
    # † marks the shapes where cuDNN may take its persistent fp16 kernel: the hardest baseline
    return r["config"] + (" †" if info.get("device") == "cuda" and r.get("cudnn_persistent") else "")


def detail_md(report) -> str:
    rows, info = report["rows"], report["machine"]
    out = []
    for mode, dtype in sections(rows):
        out += ["", f"## {mode} · {dtype}", "",
                "| config | backend | median ms [min–max] | tokens/s | GFLOP/s | % matmul | x floor | speedup | peak MB"
                " | check |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if (r["mode"], r["dtype"]) != (mode, dtype):
                continue
            if r["status"] != "ok":
                out.append(f"| {_config_cell(r, info)} | {r['backend']} | {r['status']} | | | | | | | "
                           f"{_short(r['reason'])} |")
                continue
            check = ""
            if r.get("max_rel_err") is not None:
                check = f"{r['max_rel_err']:.1e}" + (" ⚠ CHECK" if r.get("err_flag") else "")
            out.append(
                f"| {_config_cell(r, info)} | {r['backend']} | {_ms(r['median_ms'])} "
                f"[{_ms(r['min_ms'])}–{_ms(r['max_ms'])}]"
                f" | {_f(r.get('tokens_per_s'), '{:.3g}')} | {_f(r.get('gflops'), '{:.3g}')}"
                f" | {_f(r.get('pct_peak'), '{:.1f}')} | {_f(r.get('x_floor'), '{:.2f}')}"
                f" | {_f(r.get('speedup'), '{:.2f}x')}"
                f" | {_f(r.get('peak_mem_mb'), '{:.3g}')} | {check} |")
    return "\n".join(out)


def overview_md(report) -> str:
    """One line per config: baseline time, then each backend's speedup (the table printed last)."""
    rows = report["rows"]
    names = [n for n in dict.fromkeys(r["backend"] for r in rows) if n != BASELINE]
    out = ["", "## Speedup over the baseline (median; >1 is faster)", "",
           "| mode | dtype | config | baseline ms | " + " | ".join(names) + " |",
           "|---|---|---|---|" + "---|" * len(names)]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["mode"], r["dtype"], r["config"]), {})[r["backend"]] = r
    for (mode, dtype, config), by in keyed.items():
        b = by.get(BASELINE, {})
        cells = []
        for n in names:
            r = by.get(n)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(r["status"])
            elif r.get("speedup") is None:
                cells.append(f"{_ms(r['median_ms'])} ms")
            else:
                cells.append(f"{r['speedup']:.2f}x" + (" ⚠" if r.get("err_flag") else ""))
        base = _ms(b.get("median_ms")) if b.get("status") == "ok" else b.get("status", "–")
        out.append(f"| {mode} | {dtype} | {config} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def summary_md(report) -> str:
    """Per (mode, dtype) and backend: geometric-mean, min and max speedup, and what did not run."""
    rows = report["rows"]
    out = ["| mode | dtype | backend | configs timed | geomean speedup | min | max | not run |",
           "|---|---|---|---|---|---|---|---|"]
    for mode, dtype in sections(rows):
        sub = [r for r in rows if (r["mode"], r["dtype"]) == (mode, dtype) and r["backend"] != BASELINE]
        for name in dict.fromkeys(r["backend"] for r in sub):
            mine = [r for r in sub if r["backend"] == name]
            sp = [r["speedup"] for r in mine if r["status"] == "ok" and r.get("speedup")]
            bad = {}
            for r in mine:
                if r["status"] != "ok":
                    bad[r["status"]] = bad.get(r["status"], 0) + 1
            flagged = sum(1 for r in mine if r.get("err_flag"))
            notrun = ", ".join(f"{v} {k}" for k, v in bad.items()) + (f"; {flagged} ⚠ check" if flagged else "")
            if sp:
                g = math.exp(sum(math.log(v) for v in sp) / len(sp))
                out.append(f"| {mode} | {dtype} | {name} | {len(sp)} | {g:.2f}x | {min(sp):.2f}x | {max(sp):.2f}x "
                           f"| {notrun} |")
            else:
                out.append(f"| {mode} | {dtype} | {name} | 0 | – | – | – | {notrun} |")
    return "\n".join(out)


NOTES_MD = """
## How these numbers are made
- One process, one configuration at a time: the baseline and every backend get the same
  weights and input, are warmed up, then timed round-robin (the first runner rotates each
  repeat); a row's time is the median of its repeats, with min and max. Speedup = baseline
  median / backend median. Times from different processes are not compared.
- GFLOP/s counts matmul work only: 8·B·T·H·(I_l+P) per layer-direction forward (+2·B·T·H·P
  with a projection), 3x that for training. % matmul = that rate over the measured square
  matmul rate of the same dtype on this machine.
- x floor: the row's time over the GEMM floor, the same matmuls alone (input projection,
  one product per step, and in training their gradient products) through torch.mm, timed
  in the same round-robin (bench/floor.py; floor ms in the JSON/CSV).
- Peak MB: GPU, torch.cuda.max_memory_allocated above the level before the call; CPU, the
  peak of torch's CPU allocator during one call (torch.profiler memory events), which does
  not see memory a backend allocates outside torch.
- † (GPU): fp16, one layer and direction, H and I multiples of 128, B a multiple of 8 and
  <= 128, H <= 1024: the shapes where cuDNN may use its fast persistent kernel.
- check: largest difference of the output (and, in training, input and W_hh gradients)
  from the baseline, relative to the baseline's largest magnitude; ⚠ marks a value beyond
  a loose sanity bound (the test suite does the exact checks).
"""


def markdown(report) -> str:
    return "\n".join([header_md(report), "", "## Summary", "", summary_md(report), detail_md(report), NOTES_MD,
                      overview_md(report).lstrip("\n"), ""])


def plot(report, path) -> str | None:
    """Speedup vs hidden size, one line per backend, one panel per (mode, dtype). None if matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r for r in report["rows"] if r["status"] == "ok" and r["backend"] != BASELINE and r.get("speedup")]
    panels = sections(rows)
    if not panels:
        return None
    names = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    ncol = min(2, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 4.2 * nrow), squeeze=False)
    for ax, (mode, dtype) in zip(axes.flat, panels):
        sub = [r for r in rows if (r["mode"], r["dtype"]) == (mode, dtype)]
        # The family with the most hidden sizes is the sweep: drawn as lines; other configs as markers.
        fams = {}
        for r in sub:
            fams.setdefault(r["family"], set()).add(r["H"])
        sweep = max(fams, key=lambda f: len(fams[f]))
        for n in names:
            line = sorted((r["H"], r["speedup"]) for r in sub if r["backend"] == n and r["family"] == sweep)
            if line:
                ax.plot(*zip(*line), "o-", color=colors[n], label=f"{n} ({sweep})")
            pts = [(r["H"], r["speedup"]) for r in sub if r["backend"] == n and r["family"] != sweep]
            if pts:
                ax.plot(*zip(*pts), "x", color=colors[n], ms=8, label=f"{n} (other configs)")
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size H")
        ax.set_ylabel(f"speedup over {baseline_label(report['machine'])}")
        ax.set_title(f"{mode} · {dtype}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"lstm_fast vs torch.nn.LSTM on {report['machine'].get('machine')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _key(r):
    return (r["config"], r["dtype"], r["mode"], r["backend"])


def _spread(r):
    """Relative noise of a row's median: half its samples' range, relative to the median.

    The range is the middle half of the samples (quartiles) when there are at
    least 4: the extremes of 40 samples on a shared machine are one
    neighbour's burst each and would excuse any change. Fewer samples: min-max.
    """
    s = sorted(r.get("samples_ms") or [])
    if len(s) >= 4:
        lo, hi = s[len(s) // 4], s[(3 * len(s)) // 4]
    else:
        lo, hi = r["min_ms"], r["max_ms"]
    return (hi - lo) / (2 * r["median_ms"])


def compare(old: dict, new: dict, noise_floor: float = 0.05) -> tuple[str, int]:
    """Markdown comparison of two reports and the number of regressions.

    Backends are judged on their speedup over the baseline measured in the same
    process (robust to the machine's mood between runs); the noise allowed
    combines the four rows' spreads (see _spread) in quadrature, as independent
    errors, and is at least noise_floor.
    Baseline rows show the time ratio for information only.
    """
    o = {_key(r): r for r in old["rows"] if r["status"] == "ok" and r.get("median_ms")}
    n = {_key(r): r for r in new["rows"] if r["status"] == "ok" and r.get("median_ms")}
    lines = [f"# Comparison: {old['machine'].get('machine')} ({old['machine'].get('timestamp')}) → "
             f"{new['machine'].get('machine')} ({new['machine'].get('timestamp')})", ""]
    if old["machine"].get("machine") != new["machine"].get("machine"):
        lines += ["**Different machines: the times are not comparable; speedups only roughly.**", ""]
    loads = [(r["machine"].get("loadavg_start") or [0])[0] for r in (old, new)]
    lines += [f"Load average at start: old {loads[0]}, new {loads[1]}"
              + (" (above the core count: that run's speedups carry the load's distortion)"
                 if max(loads) > (new["machine"].get("cpu_cores") or 1) and new["machine"].get("device") == "cpu"
                 else ""), ""]
    lines += ["| config | dtype | mode | backend | old ms | new ms | time ratio | old speedup | new speedup "
              "| change | noise | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    regressions = 0
    for k in [k for k in n if k in o]:
        a, b = o[k], n[k]
        ratio = b["median_ms"] / a["median_ms"]
        if k[3] == BASELINE:
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {_ms(a['median_ms'])} | {_ms(b['median_ms'])} "
                         f"| {ratio:.2f} | | | | | baseline (info) |")
            continue
        ba, bb = o.get(k[:3] + (BASELINE,)), n.get(k[:3] + (BASELINE,))
        if not (a.get("speedup") and b.get("speedup") and ba and bb):
            noise = max(noise_floor, math.hypot(_spread(a), _spread(b)))
            change = 1 / ratio
        else:
            noise = max(noise_floor, math.hypot(_spread(a), _spread(b), _spread(ba), _spread(bb)))
            change = b["speedup"] / a["speedup"]
        verdict = "REGRESSION" if change < 1 - noise else ("improved" if change > 1 + noise else "same")
        regressions += verdict == "REGRESSION"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {_ms(a['median_ms'])} | {_ms(b['median_ms'])} "
                     f"| {ratio:.2f} | {_f(a.get('speedup'), '{:.2f}x')} | {_f(b.get('speedup'), '{:.2f}x')} "
                     f"| {change:.2f} | ±{noise:.2f} | {verdict} |")
    only_old = [k for k in o if k not in n]
    only_new = [k for k in n if k not in o]
    if only_old or only_new:
        lines += ["", f"rows only in the old report: {len(only_old)}; only in the new one: {len(only_new)}"]
    lines += ["", f"{regressions} regression(s) beyond noise "
              "(change = new speedup / old speedup; without a baseline, old time / new time)."]
    return "\n".join(lines), regressions
