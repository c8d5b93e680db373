"""Every example runs as a new user would run it (a fresh process, its command line),
with tiny settings: its pictures and summary exist and its numbers are finite."""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "sine_wave.py": (["--epochs", "2", "--points", "200", "--window", "16", "--hidden", "8", "--horizon", "20"],
                     ["training_curves.png", "forecast.png"]),
    "classify.py": (["--epochs", "1", "--train", "64", "--test", "32", "--max-len", "24", "--hidden", "8"],
                    ["confusion.png"]),
    "states.py": (["--steps", "3", "--length", "6", "--batch", "8", "--hidden", "8"],
                  ["forget_bias.png", "states.png", "cells.png"]),
    "char_lm.py": (["--steps", "3", "--chars", "6000", "--batch", "4", "--chunk", "16", "--hidden", "16",
                    "--sample", "20"], ["loss.png", "sample.txt"]),
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_example_runs(script, tmp_path):
    args, files = TINY[script]
    out = tmp_path / "out"
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--device", "cpu", "--out", str(out),
                    *args], check=True, cwd=ROOT, timeout=300)
    for name in files + ["summary.json"]:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    numbers = [v for v in summary.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers), summary
