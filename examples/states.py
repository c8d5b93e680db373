"""Inside a trained LSTM: h_t, c_t and the gates over time, and the forget-bias trick.

    python examples/states.py [--steps 300] [--backend auto] [--device cpu] [--out examples/out/states]

Task (long memory): a sequence of T noisy steps whose first step carries a sign in a
marker channel; the model must report that sign at the last step. The same model is
trained with the forget gate's bias initialised at 0.0 and at 1.0
(lstm_fast.LSTM(..., forget_bias=1.0), Jozefowicz et al. 2015): with 1.0 the cell
keeps the early information from the start, its gradient reaches the first step, and
training takes off sooner (training curves side by side; at the defaults 1.0 solves
the task within a few dozen steps, 0.0 stays at chance). torch.nn.LSTM is trained from the same weights as the 1.0
model, for the time per epoch.

Then lstm_fast.inspect runs the trained model once and returns every step's h, c and
i, f, g, o: heatmaps over time and the few cells that hold the sign, as line plots.

Writes forget_bias.png, states.png, cells.png and summary.json to --out.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

import lstm_fast
from common import Clock, finish, parser, prepare, side_by_side


class Memory(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(lstm.hidden_size, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1]).squeeze(-1)


def batch(B, T, generator, device):
    """x [B, T, 2] (noise, marker), the sign to remember [B]."""
    sign = torch.randint(2, (B,), generator=generator).float() * 2 - 1
    x = torch.zeros(B, T, 2)
    x[:, :, 0] = 0.5 * torch.randn(B, T, generator=generator)
    x[:, 0, 1] = sign
    return x.to(device), (sign > 0).float().to(device)


def train(model, args, device):
    """(accuracy per step, seconds per 100 steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    accuracy, clock = [], Clock(device)
    for _ in range(args.steps):
        x, target = batch(args.batch, args.length, g, device)
        with clock:
            logits = model(x)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        accuracy.append(float(((logits > 0).float() == target).float().mean()))
    return accuracy, clock.seconds / args.steps * 100


def smooth(values, k=10):
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def main():
    p = parser(__doc__.splitlines()[0], "states")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--length", type=int, default=20, help="sequence length T")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args()
    device = prepare(args)

    curves, times, models = {}, {}, {}
    for bias in (0.0, 1.0):
        torch.manual_seed(args.seed)  # the same initial weights apart from the forget bias
        model = Memory(lstm_fast.LSTM(2, args.hidden, batch_first=True, forget_bias=bias,
                                      backend=args.backend)).to(device)
        plain = copy.deepcopy(model)
        plain.lstm = model.lstm.to_torch()
        curves[bias], times["lstm_fast"] = train(model, args, device)
        models[bias] = model
    _, times["torch"] = train(plain, args, device)  # the forget_bias=1.0 model's twin, for timing

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for bias in (0.0, 1.0):
        ax.plot(smooth(curves[bias]), label=f"forget_bias={bias}")
    ax.set(xlabel="training step", ylabel="accuracy (moving average of 10)", ylim=(0.4, 1.02),
           title=f"Remember the first of {args.length} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "forget_bias.png"), dpi=120)

    # one fused forward of the trained model, every step's states and gates kept
    x, _ = batch(2, args.length, torch.Generator().manual_seed(args.seed + 1), device)
    x[:, 0, 1] = torch.tensor([1.0, -1.0], device=device)  # one sequence of each sign
    target = torch.tensor([1.0, 0.0])
    seen = lstm_fast.inspect(models[1.0].lstm.eval(), x)
    s = seen.states[0]  # layer 0, forward direction; tensors [B, T, H] (batch_first)
    panels = [("h", s.h), ("c", s.c), ("input gate i", s.i), ("forget gate f", s.f), ("candidate g", s.g),
              ("output gate o", s.o)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 11), sharex=True)
    for ax, (name, t) in zip(axes, panels):
        signed = name in ("h", "c", "candidate g")  # values around 0; the gates lie in (0, 1)
        image = ax.imshow(t[0].T.cpu(), aspect="auto", cmap="RdBu_r" if signed else "viridis")
        ax.set_ylabel(f"{name}\nunit")
        fig.colorbar(image, ax=ax, pad=0.01)
    axes[0].set_title(f"first sequence, sign {int(target[0].item()) * 2 - 1:+d}")
    axes[-1].set_xlabel("t")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "states.png"), dpi=110)

    # the cells whose values differ most between the two signs hold the memory
    gap = (s.c[0] - s.c[1]).abs().mean(0)
    units = gap.topk(3).indices.tolist()
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for k, u in enumerate(units):
        for b, style in ((0, "-"), (1, "--")):
            sign = int(target[b].item()) * 2 - 1
            axes[0].plot(s.c[b, :, u].cpu(), style, color=f"C{k}", label=f"unit {u}, sign {sign:+d}")
            axes[1].plot(s.f[b, :, u].cpu(), style, color=f"C{k}")
    axes[0].set(ylabel="c_t", title="The cells that remember the sign")
    axes[1].set(ylabel="forget gate f_t", xlabel="t", ylim=(0, 1.02))
    axes[0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "cells.png"), dpi=120)

    last = max(1, args.steps // 5)  # the last fifth of training
    print(side_by_side(times, "s per 100 steps"))
    finish(args, {
        "final_accuracy_forget_bias_0": sum(curves[0.0][-last:]) / last,
        "final_accuracy_forget_bias_1": sum(curves[1.0][-last:]) / last,
        "inspect_max_abs_h_vs_output": float((seen.output - s.h).abs().max()),
        "seconds_per_100_steps_lstm_fast": times["lstm_fast"],
        "seconds_per_100_steps_torch": times["torch"],
    })


if __name__ == "__main__":
    main()
