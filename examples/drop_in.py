"""Swap torch.nn.LSTM for lstm_fast.LSTM in an existing model and train it.

    python examples/drop_in.py [--backend auto|numba|cpp|cuda|triton|reference]

A toy task (predict the running sum's sign of a noisy sequence), only to show
that the module trains exactly where nn.LSTM does; the speed comparison is
`python -m bench`.
"""
import argparse
import time

import torch
from torch import nn

import lstm_fast


class Classifier(nn.Module):
    def __init__(self, lstm_cls, **lstm_kwargs):
        super().__init__()
        self.lstm = lstm_cls(input_size=8, hidden_size=64, num_layers=2, batch_first=True, **lstm_kwargs)
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def batch(B=32, T=50, device="cpu"):
    x = torch.randn(B, T, 8, device=device)
    return x, (x[..., 0].sum(1) > 0).long()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = Classifier(lstm_fast.LSTM, backend=args.backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(args.steps):
        x, target = batch(device=device)
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s on {device}")
    # the trained weights load straight into torch.nn.LSTM
    plain = Classifier(nn.LSTM).to(device)
    plain.load_state_dict(model.state_dict())
    x, _ = batch(device=device)
    with torch.no_grad():
        print("max |lstm_fast - torch.nn.LSTM| logits:", (plain(x) - model(x)).abs().max().item())


if __name__ == "__main__":
    main()
