"""Unit tests of the benchmark harness itself (fast): pytest bench --benchmark-skip."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from bench import configs as cfg
from bench import readme_perf
from bench import report as rep


def test_spec_parsing():
    shapes = cfg.parse_spec("T=100,B=32,H=256,modes=training;t=5,b=1,h=64,i=32,L=2,bi=1,proj=16")
    assert shapes[0] == cfg.S(100, 32, 256, modes=("training",))
    assert shapes[1] == cfg.Shape(T=5, B=1, I=32, H=64, L=2, bidir=True, proj=16)
    assert shapes[1].name == "T5 B1 I32 H64 L2 bi P16"
    with pytest.raises(ValueError):
        cfg.parse_spec("T=1,B=1")
    with pytest.raises(ValueError):
        cfg.parse_spec("T=1,B=1,H=4,foo=3")
    cell, = cfg.parse_spec("T=50,B=8,H=256,cell=1")
    assert cell.cell and cell.name == "T50 B8 I256 H256 cell" and cell != cfg.S(50, 8, 256)
    with pytest.raises(ValueError):  # a cell is one layer, one direction, no projection
        cfg.parse_spec("T=5,B=1,H=8,cell=1,L=2")
    steps, = cfg.parse_spec("T=5,B=1,H=8,steps=1")
    assert steps.steps and steps.name == "T5 B1 I8 H8 steps" and steps != cfg.S(5, 1, 8)
    with pytest.raises(ValueError):  # two kinds of loop
        cfg.parse_spec("T=5,B=1,H=8,steps=1,cell=1")


def test_named_sets_and_reference_configs():
    quick = cfg.resolve_configs(None, "cpu", quick=True)
    names = {(s.name, m) for s in quick for m in s.modes}
    for want in [("T100 B32 I256 H256", "training"), ("T100 B32 I256 H256", "inference"),
                 ("T200 B8 I128 H128", "training"), ("T100 B1 I128 H128", "inference")]:
        assert want in names
    both = cfg.resolve_configs("reference,sweep T=3,B=2,H=8", "cpu", quick=True)
    assert len(both) == len(cfg.REFERENCE_CPU) + len(cfg.SWEEP_CPU) + 1
    with pytest.raises(ValueError):
        cfg.resolve_configs("nonsense", "cpu", quick=True)


def test_flops():
    s = cfg.S(100, 32, 256)
    assert cfg.lstm_flops(s, "inference") == 8 * 32 * 100 * 256 * 512
    assert cfg.lstm_flops(s, "training") == 3 * 8 * 32 * 100 * 256 * 512
    # 2 layers, bidirectional, projection 16: layer 1 reads 2*16 features
    s = cfg.Shape(T=5, B=2, I=8, H=32, L=2, bidir=True, proj=16)
    l0 = 8 * 2 * 5 * 32 * (8 + 16) + 2 * 2 * 5 * 32 * 16
    l1 = 8 * 2 * 5 * 32 * (32 + 16) + 2 * 2 * 5 * 32 * 16
    assert cfg.lstm_flops(s, "inference") == 2 * (l0 + l1)


def _row(backend, ms, spread, speedup=None, config="T1 B1 I1 H1"):
    return {"config": config, "dtype": "fp32", "mode": "training", "backend": backend, "status": "ok",
            "median_ms": ms, "min_ms": ms * (1 - spread), "max_ms": ms * (1 + spread), "speedup": speedup,
            "H": 1, "family": "f", "tags": []}


def _report(rows, machine="m"):
    return {"machine": {"machine": machine, "timestamp": "t", "device": "cpu"}, "run": {"command": "x"},
            "backends": {"numba": {"timed": True, "note": ""}}, "rows": rows}


def test_compare_flags_only_changes_beyond_noise():
    old = _report([_row("torch", 10, 0.02, 1.0), _row("numba", 5, 0.02, 2.0)])
    same = _report([_row("torch", 12, 0.02, 1.0), _row("numba", 6.1, 0.02, 12 / 6.1)])
    worse = _report([_row("torch", 10, 0.02, 1.0), _row("numba", 8, 0.02, 1.25)])
    noisy = _report([_row("torch", 10, 0.5, 1.0), _row("numba", 8, 0.5, 1.25)])
    assert rep.compare(old, same)[1] == 0
    assert rep.compare(old, worse)[1] == 1
    assert rep.compare(old, noisy)[1] == 0  # the spread says the change is noise


def test_markdown_and_readme_section(tmp_path):
    r = _report([_row("torch", 10, 0.1, 1.0), _row("numba", 5, 0.1, 2.0),
                 dict(_row("numba", 5, 0.1), config="T2 B1 I1 H1", status="unsupported", reason="H too big")])
    r["machine"].update(git={"commit": "abc", "dirty": False})
    r["run"]["wall_s"] = 1.0
    md = rep.markdown(r)
    assert "2.00x" in md and "H too big" in md
    d = tmp_path / "reports" / "cpu-test"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(r))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- perf:start -->\nold\n<!-- perf:end -->\ntail\n")
    args = ["--readme", str(readme), "--reports", str(tmp_path / "reports")]
    assert readme_perf.main(args + ["--check"]) == 1
    assert readme_perf.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("tail\n") and "**2.00x** (5)" in text
    assert "reports/cpu-test/results.md" in text
    assert readme_perf.main(args + ["--check"]) == 0


def test_run_end_to_end_never_crashes_on_a_failing_backend(tmp_path, monkeypatch):
    """A tiny real run; a backend that raises gets a row with the reason, the rest completes."""
    from bench import cli, measure

    real = measure.make_module

    def flaky(name, base):
        if name == "reference" and getattr(base, "num_layers", 1) == 2:  # the cell loop has none
            raise NotImplementedError("reference refuses 2 layers (test)")
        return real(name, base)
    monkeypatch.setattr(measure, "make_module", flaky)
    out = tmp_path / "out"
    rc = cli.main(["--configs", "tiny", "--backends", "reference", "--repeats", "2", "--no-memory",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    for f in ("results.json", "results.csv", "results.md"):
        assert os.path.exists(out / f)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"torch", "reference"}
    bad = [r for r in rows if r["status"] != "ok"]
    assert bad and all(r["status"] == "unsupported" and r["L"] == 2 and r["backend"] == "reference" for r in bad)
    good = [r for r in rows if r["status"] == "ok" and r["backend"] == "reference"]
    assert good and all(r["speedup"] > 0 and r["max_rel_err"] < 1e-4 for r in good)
    assert any(r["cell"] for r in good)  # the LSTMCell loop config ran and was checked


def test_numba_breakdown_table(capsys):
    """The breakdown's parts add up: rest = backend + module, every figure a positive time."""
    pytest.importorskip("numba")
    from bench import numba_breakdown
    m = numba_breakdown.breakdown(4, 2, 8, 16, "training", repeats=3)
    for key in ("torch", "ours", "launches"):
        assert m[key] > 0
    assert m["rest"] == pytest.approx(m["backend"] + m["module"])
    numba_breakdown.main(["--configs", "4,2,8,16", "--repeats", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| T4 B2 I8 H16")]
    assert [r.split(" | ")[1] for r in rows] == ["inference", "training"]


def test_h200_sets_and_gpu_run_script():
    """The GPU run's matrix: FlashRNN's H100 comparison first, then the B x H sweep, as gpu_run.sh names them."""
    flash, = cfg.resolve_configs("flashrnn-gpu", "cuda", quick=False)
    assert (flash.T, flash.B, flash.I, flash.H, flash.L, flash.bidir, flash.proj) == (1024, 16, 768, 768, 1, False, 0)
    sweep = cfg.resolve_configs("h200-sweep-gpu", "cuda", quick=False)
    assert sorted((s.B, s.H) for s in sweep) == sorted((b, h) for b in (16, 64) for h in (256, 512, 1024))
    assert all(s.T == 1024 and s.I == s.H and s.L == 1 and s.modes == cfg.MODES for s in sweep)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_run.sh")
    with open(path) as f:
        script = f.read().replace('"', "")
    first = script.index("--configs flashrnn-gpu --dtype fp16,bf16,tf32,fp32")
    assert first < script.index("--configs h200-sweep-gpu --dtype bf16,fp32")
    bash = shutil.which("bash")
    if bash:
        run = subprocess.run([bash, "-n", path], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr


def test_contend_spinners_stop():
    """--contend K: K busy processes while timing, all gone after stop()."""
    from bench import contend

    procs = contend.start(2)
    try:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    finally:
        contend.stop(procs)
    assert all(p.poll() is not None for p in procs)
