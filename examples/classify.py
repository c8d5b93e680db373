"""Which standard-library package does this snippet of source code come from?

    python examples/classify.py [--epochs 4] [--backend auto] [--device cpu] [--out examples/out/classify]

Data: the Python standard library's own sources, which every Python installation
ships (no download): snippets of 16 to 96 characters cut from the .py files of
json, email, asyncio and unittest, every other file of each package kept for the
test set. Snippets differ in length, so a batch is padded and its lengths passed
along: lstm_fast.LSTM takes them as `lengths=`, torch.nn.LSTM as a PackedSequence
(pack_padded_sequence). A bidirectional two-layer LSTM reads the characters and its
final states classify the snippet. Both are trained from the same initial weights
on the same batches (their first steps agree to float rounding, which hundreds of
Adam steps then amplify); accuracy and time per epoch are printed side by side.

Writes confusion.png (the lstm_fast model on the test set) and summary.json to --out.
"""
from __future__ import annotations

import copy
import glob
import importlib
import os

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fast
from common import Clock, finish, parser, prepare, side_by_side

PACKAGES = ["json", "email", "asyncio", "unittest"]
VOCAB = 128  # ASCII; anything else maps to 127


class SnippetClassifier(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, lstm.input_size)
        self.lstm = lstm
        self.head = nn.Linear(2 * lstm.hidden_size, len(PACKAGES))

    def forward(self, chars, lengths):
        x = self.embed(chars)
        if isinstance(self.lstm, lstm_fast.LSTM):
            _, (h, _) = self.lstm(x, lengths=lengths)
        else:  # what torch.nn.LSTM needs for the same computation
            _, (h, _) = self.lstm(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))
        return self.head(torch.cat([h[-2], h[-1]], 1))  # last layer, both directions


def package_sources(name):
    """(train text, test text) of one package: its .py files, alternating."""
    folder = os.path.dirname(importlib.import_module(name).__file__)
    files = sorted(glob.glob(os.path.join(folder, "**", "*.py"), recursive=True))
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    return "\n".join(texts[0::2]), "\n".join(texts[1::2])


def snippets(texts, count, lo, hi, generator):
    """count (chars [count, hi], lengths [count], labels [count]) cut at random from texts."""
    labels = torch.randint(len(texts), (count,), generator=generator)
    lengths = torch.randint(lo, hi + 1, (count,), generator=generator)
    chars = torch.zeros(count, hi, dtype=torch.long)
    for i, (label, n) in enumerate(zip(labels.tolist(), lengths.tolist())):
        text = texts[label]
        start = int(torch.randint(len(text) - n, (1,), generator=generator))
        codes = [min(ord(ch), VOCAB - 1) for ch in text[start:start + n]]
        chars[i, :n] = torch.tensor(codes)
    return chars, lengths, labels


def train(model, data, args, device):
    chars, lengths, labels = data
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    clock = Clock(device)
    for _ in range(args.epochs):
        with clock:
            for idx in torch.randperm(len(labels), generator=order).split(args.batch):
                loss = nn.functional.cross_entropy(model(chars[idx].to(device), lengths[idx].to(device)),
                                                   labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
    return clock.seconds / args.epochs


@torch.no_grad()
def predict(model, data, device):
    chars, lengths, _ = data
    return torch.cat([model(c.to(device), n.to(device)).argmax(1).cpu()
                      for c, n in zip(chars.split(256), lengths.split(256))])


def main():
    p = parser(__doc__.splitlines()[0], "classify")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train", type=int, default=2000, help="training snippets")
    p.add_argument("--test", type=int, default=600, help="test snippets")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=96)
    args = p.parse_args()
    device = prepare(args)
    sources = [package_sources(name) for name in PACKAGES]
    g = torch.Generator().manual_seed(args.seed)
    train_set = snippets([s[0] for s in sources], args.train, args.min_len, args.max_len, g)
    test_set = snippets([s[1] for s in sources], args.test, args.min_len, args.max_len, g)

    plain = SnippetClassifier(nn.LSTM(32, args.hidden, num_layers=2, bidirectional=True,
                                      batch_first=True)).to(device)
    fast = copy.deepcopy(plain)
    fast.lstm = lstm_fast.LSTM.from_torch(plain.lstm, backend=args.backend)
    times, accuracy, predictions = {}, {}, {}
    for name, model in (("lstm_fast", fast), ("torch", plain)):
        times[name] = train(model, train_set, args, device)
        predictions[name] = predict(model.eval(), test_set, device)
        accuracy[name] = float((predictions[name] == test_set[2]).float().mean())

    confusion = torch.zeros(len(PACKAGES), len(PACKAGES), dtype=torch.long)
    confusion.index_put_((test_set[2], predictions["lstm_fast"]), torch.ones_like(test_set[2]), accumulate=True)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(confusion, cmap="Blues")
    for i in range(len(PACKAGES)):
        for j in range(len(PACKAGES)):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    ax.set_xticks(range(len(PACKAGES)), PACKAGES)
    ax.set_yticks(range(len(PACKAGES)), PACKAGES)
    ax.set(xlabel="predicted", ylabel="true package",
           title=f"lstm_fast, test accuracy {accuracy['lstm_fast']:.1%}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "confusion.png"), dpi=120)

    print(side_by_side(times))
    finish(args, {
        "test_accuracy_lstm_fast": accuracy["lstm_fast"],
        "test_accuracy_torch": accuracy["torch"],
        "chance": 1 / len(PACKAGES),
        "seconds_per_epoch_lstm_fast": times["lstm_fast"],
        "seconds_per_epoch_torch": times["torch"],
    })


if __name__ == "__main__":
    main()
