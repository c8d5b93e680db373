"""Next-value prediction of a noisy sine wave, then a free-running forecast.

    python examples/sine_wave.py [--epochs 12] [--backend auto] [--device cpu] [--out examples/out/sine_wave]

An LSTM reads windows of the series and predicts each next value. The same model is
trained twice from the same initial weights on the same batches, with lstm_fast.LSTM
and with torch.nn.LSTM: the two training curves lie on top of each other (the
summary prints their largest gap). Then the lstm_fast model, fed its own predictions
one step at a time with its state carried between calls, continues the wave past
the end of the data.

Writes training_curves.png, forecast.png and summary.json to --out.
"""
from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn

import lstm_fast
from common import Clock, finish, parser, prepare, side_by_side

PERIOD = 50  # samples per period of the wave


class Predictor(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(lstm.hidden_size, 1)

    def forward(self, x, state=None):
        y, state = self.lstm(x, state)
        return self.head(y), state


def series(n, noise, generator):
    t = torch.arange(n, dtype=torch.float32)
    clean = torch.sin(2 * math.pi * t / PERIOD)
    return clean, clean + noise * torch.randn(n, generator=generator)


def train(model, data, args, device):
    """Returns (mean loss per epoch, seconds per epoch)."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)  # the same batches for both models
    starts = torch.arange(0, len(data) - args.window - 1)
    losses, clock = [], Clock(device)
    for _ in range(args.epochs):
        total, count = 0.0, 0
        with clock:
            for batch in starts[torch.randperm(len(starts), generator=order)].split(args.batch):
                idx = batch[:, None] + torch.arange(args.window + 1)
                windows = data[idx].unsqueeze(-1).to(device)  # [B, W + 1, 1]
                pred, _ = model(windows[:, :-1])
                loss = nn.functional.mse_loss(pred, windows[:, 1:])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, count = total + loss.item() * len(batch), count + len(batch)
        losses.append(total / count)
    return losses, clock.seconds / args.epochs


@torch.no_grad()
def forecast(model, history, steps, device):
    """Reads history, then feeds back its own prediction for `steps` steps."""
    pred, state = model(history.view(1, -1, 1).to(device))
    value, out = pred[:, -1:], []
    for _ in range(steps):
        out.append(value.item())
        value, state = model(value, state)  # one step, state carried
    return torch.tensor(out)


def main():
    p = parser(__doc__.splitlines()[0], "sine_wave")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--points", type=int, default=1200, help="length of the training series")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--horizon", type=int, default=3 * PERIOD, help="steps of the free-running forecast")
    args = p.parse_args()
    device = prepare(args)
    clean, noisy = series(args.points + args.horizon, args.noise, torch.Generator().manual_seed(args.seed))
    data = noisy[:args.points]

    plain = Predictor(nn.LSTM(1, args.hidden, batch_first=True)).to(device)
    fast = copy.deepcopy(plain)  # same initial weights, then the LSTM swapped
    fast.lstm = lstm_fast.LSTM.from_torch(plain.lstm, backend=args.backend)
    curves, times = {}, {}
    for name, model in (("lstm_fast", fast), ("torch", plain)):
        curves[name], times[name] = train(model, data, args, device)

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, args.epochs + 1), curves["torch"], "o-", label="torch.nn.LSTM", lw=3, alpha=0.5)
    ax.plot(range(1, args.epochs + 1), curves["lstm_fast"], "x--", label="lstm_fast.LSTM")
    ax.set(xlabel="epoch", ylabel="training MSE", yscale="log", title="Same weights, same batches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "training_curves.png"), dpi=120)

    future = forecast(fast, data, args.horizon, device).cpu()
    ahead = torch.arange(args.points, args.points + args.horizon)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    shown = torch.arange(args.points - 2 * PERIOD, args.points)
    ax.plot(shown, noisy[shown], color="0.6", lw=1, label="noisy data (model input)")
    ax.plot(ahead, clean[ahead], color="k", lw=1, label="true wave")
    ax.plot(ahead, future, color="C3", lw=2, label="free-running forecast")
    ax.axvline(args.points, color="0.8", ls=":")
    ax.set(xlabel="t", title="lstm_fast forecast, one step per call")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "forecast.png"), dpi=120)

    gap = max(abs(a - b) / b for a, b in zip(curves["lstm_fast"], curves["torch"]))
    print(side_by_side(times))
    finish(args, {
        "final_mse_lstm_fast": curves["lstm_fast"][-1],
        "final_mse_torch": curves["torch"][-1],
        "largest_relative_gap_between_curves": gap,
        "forecast_rmse_vs_true_wave": float((future - clean[ahead]).pow(2).mean().sqrt()),
        "seconds_per_epoch_lstm_fast": times["lstm_fast"],
        "seconds_per_epoch_torch": times["torch"],
    })


if __name__ == "__main__":
    main()
