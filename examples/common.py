"""What every example shares: its command-line options, output folder, timing and summary.

Each example trains the same model twice from the same initial weights, once with
lstm_fast and once with torch.nn.LSTM, and prints both times per epoch side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch


def parser(description: str, name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backend", default="auto", help="lstm_fast backend (auto, cpp, numba, cuda, triton, reference)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join("examples", "out", name), help="folder for the PNGs and summary.json")
    p.add_argument("--seed", type=int, default=0)
    return p


def prepare(args) -> torch.device:
    """Seeds torch, creates the output folder and uses a non-interactive plotting backend."""
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    return torch.device(args.device)


class Clock:
    """Wall time of a block, with the device synchronised on both ends."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0


def finish(args, summary: dict) -> None:
    """Prints the summary and writes it to summary.json; refuses non-finite numbers."""
    for key, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{key} is not finite: {value}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    width = max(map(len, summary))
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    print(f"wrote {args.out}/")


def side_by_side(times: dict, unit: str = "s/epoch") -> str:
    """'lstm_fast 0.41 s/epoch, torch.nn.LSTM 0.93 s/epoch (2.3x)' from {name: seconds per unit}."""
    fast, plain = times["lstm_fast"], times["torch"]
    return f"lstm_fast {fast:.3g} {unit}, torch.nn.LSTM {plain:.3g} {unit} ({plain / fast:.2f}x)"
