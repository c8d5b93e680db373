"""A character-level language model of Python's own help texts, trained with
truncated backpropagation through time, then sampled.

    python examples/char_lm.py [--steps 120] [--bf16] [--backend auto] [--device cpu] [--out examples/out/char_lm]

Text: the topic help pages that ship with Python (pydoc_data.topics, the text of
`help("FOR")` and friends; no download), about 460k characters of English prose and
code. A stacked two-layer LSTM with dropout between the layers reads B streams of
the text in chunks of T characters; the state is carried from chunk to chunk
(detached: truncated BPTT). lstm_fast.LSTM and torch.nn.LSTM are trained from the same
initial weights on the same chunks, lstm_fast's with recurrent dropout on h_{t-1}
inside its fused loop as well (--recurrent-dropout; torch.nn.LSTM has no such option,
and 0 makes the two models the same); tokens per second and validation bits per
character are printed side by side, then the lstm_fast model writes a sample, one
character per call with its state carried. --bf16 trains under CPU/GPU bfloat16
autocast (on this project's 2-core CPU with torch 2.14 torch.nn.LSTM runs under it
too; older torch versions crashed there).

Writes loss.png, sample.txt and summary.json to --out.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import pydoc_data.topics

import torch
from torch import nn

import lstm_fast
from common import Clock, finish, parser, prepare


class CharModel(nn.Module):
    def __init__(self, lstm, vocab):
        super().__init__()
        self.embed = nn.Embedding(vocab, lstm.input_size)
        self.lstm = lstm
        self.head = nn.Linear(lstm.hidden_size, vocab)

    def forward(self, chars, state=None):
        y, state = self.lstm(self.embed(chars), state)
        return self.head(y), state


def streams(codes, B):
    """The text as B contiguous streams, [B, len // B]."""
    n = len(codes) // B
    return codes[:n * B].view(B, n)


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def train(model, data, args, device):
    """(loss per step, tokens per second) of args.steps chunks of stateful TBPTT."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    losses, state, clock = [], None, Clock(device)
    chunks = (data.shape[1] - 1) // args.chunk
    for step in range(args.steps):
        t0 = (step % chunks) * args.chunk
        x = data[:, t0:t0 + args.chunk].to(device)
        target = data[:, t0 + 1:t0 + args.chunk + 1].to(device)
        if step % chunks == 0:
            state = None  # back at the start of the streams
        with clock:
            with autocast(args, device):
                logits, state = model(x, state)
                loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        state = tuple(s.detach() for s in state)  # truncated BPTT: the graph ends at the chunk
        losses.append(loss.item())
    return losses, args.steps * x.numel() / clock.seconds


@torch.no_grad()
def bits_per_char(model, data, args, device):
    model.eval()
    total, count, state = 0.0, 0, None
    for t0 in range(0, data.shape[1] - 1, args.chunk):
        x = data[:, t0:t0 + args.chunk].to(device)
        target = data[:, t0 + 1:t0 + args.chunk + 1].to(device)
        x = x[:, :target.shape[1]]
        with autocast(args, device):
            logits, state = model(x, state)
        total += nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum").item()
        count += target.numel()
    return total / count / math.log(2)


@torch.no_grad()
def sample(model, alphabet, prompt, length, temperature, device, generator):
    model.eval()
    codes = torch.tensor([[alphabet.index(ch) for ch in prompt]], device=device)
    logits, state = model(codes)
    out = list(prompt)
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float() / temperature, 0).cpu()
        code = int(torch.multinomial(probs, 1, generator=generator))
        out.append(alphabet[code])
        logits, state = model(torch.tensor([[code]], device=device), state)  # one character, state carried
    return "".join(out)


def main():
    p = parser(__doc__.splitlines()[0], "char_lm")
    p.add_argument("--steps", type=int, default=120, help="training chunks")
    p.add_argument("--chars", type=int, default=300_000, help="characters of training text")
    p.add_argument("--batch", type=int, default=32, help="parallel streams")
    p.add_argument("--chunk", type=int, default=64, help="characters per chunk (truncated BPTT length)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.2, help="between the layers (both models)")
    p.add_argument("--recurrent-dropout", type=float, default=0.1, help="on h_{t-1} (lstm_fast only)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    p.add_argument("--sample", type=int, default=300, help="characters to sample")
    args = p.parse_args()
    device = prepare(args)
    text = "".join(pydoc_data.topics.topics.values())
    alphabet = sorted(set(text))
    codes = torch.tensor([alphabet.index(ch) for ch in text])
    train_data = streams(codes[:args.chars], args.batch)
    valid_data = streams(codes[-len(codes) // 20:], args.batch)

    plain = CharModel(nn.LSTM(64, args.hidden, num_layers=2, dropout=args.dropout, batch_first=True),
                      len(alphabet)).to(device)
    fast = copy.deepcopy(plain)
    fast.lstm = lstm_fast.LSTM.from_torch(plain.lstm, backend=args.backend)
    if not 0 <= args.recurrent_dropout < 1:
        p.error("--recurrent-dropout must lie in [0, 1)")
    fast.lstm.recurrent_dropout = args.recurrent_dropout
    losses, speed, bpc = {}, {}, {}
    for name, model in (("lstm_fast", fast), ("torch", plain)):
        torch.manual_seed(args.seed)
        losses[name], speed[name] = train(model, train_data, args, device)
        bpc[name] = bits_per_char(model, valid_data, args, device)

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("torch", "torch.nn.LSTM"), ("lstm_fast", "lstm_fast.LSTM")):
        ax.plot([x / math.log(2) for x in losses[name]], label=label, alpha=0.8)
    ax.set(xlabel="chunk", ylabel="training bits per character", title="Stateful truncated BPTT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)

    text_out = sample(fast, alphabet, "The for statement", args.sample, 0.8, device,
                      torch.Generator().manual_seed(args.seed))
    with open(os.path.join(args.out, "sample.txt"), "w") as f:
        f.write(text_out + "\n")
    print(text_out, "\n")
    print(f"lstm_fast {speed['lstm_fast']:,.0f} chars/s, torch.nn.LSTM {speed['torch']:,.0f} chars/s "
          f"({speed['lstm_fast'] / speed['torch']:.2f}x)")
    finish(args, {
        "valid_bits_per_char_lstm_fast": bpc["lstm_fast"],
        "valid_bits_per_char_torch": bpc["torch"],
        "train_chars_per_s_lstm_fast": speed["lstm_fast"],
        "train_chars_per_s_torch": speed["torch"],
        "bf16_autocast": args.bf16,
        "recurrent_dropout_lstm_fast": args.recurrent_dropout,
    })


if __name__ == "__main__":
    main()
