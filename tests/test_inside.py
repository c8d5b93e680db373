"""Inside the fused loop: lstm_fast.inspect (every step's states and gates) and the
recurrent regularisers (recurrent_dropout, zoneout, weight_drop), on every backend,
against a Python loop over the steps of each sequence written here: torch.nn.LSTMCell
where it applies (no projection, no masks), the same gate math in torch ops otherwise.
"""
import pytest
import torch
from torch.nn.utils.rnn import pad_packed_sequence

import lstm_fast
from helpers import BACKEND_NAMES, INTERPRETED, assert_close, device_of_tests, require
from lstm_fast.backends.base import StepMasks

DEVICE = device_of_tests()

CONFIGS = [
    ("plain", dict(input_size=5, hidden_size=7)),
    ("stacked_bidir", dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True)),
    ("proj_bidir_bf", dict(input_size=5, hidden_size=6, proj_size=3, num_layers=2, bidirectional=True,
                           batch_first=True)),
]


def loop_layer(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, masks=None):
    """One layer-direction as a Python loop over each sequence's own steps. x [T, B, I]
    padded time-major, lengths [B]; masks as StepMasks with per-step ones padded
    [T, B, *]. Returns per-step (h, c, i, f, g, o) [T, B, *] (zeros past each length),
    h_n and c_n; differentiable in every argument."""
    T, B = x.shape[:2]
    H = w_hh.shape[0] // 4
    m, zc, zh = masks if masks is not None else StepMasks()
    cell = None
    if w_hr is None and masks is None:  # torch's own cell computes h and c
        cell = torch.nn.LSTMCell(x.shape[-1], H, bias=b_ih is not None, dtype=x.dtype, device=x.device)
    per_step = [[[None] * B for _ in range(T)] for _ in range(6)]
    h_n, c_n = [], []
    for b in range(B):
        L = int(lengths[b])
        h, c = h0[b], c0[b]
        for t in (range(L - 1, -1, -1) if reverse else range(L)):
            h_in = h if m is None else h * m[b]
            z = x[t, b] @ w_ih.t() + h_in @ w_hh.t()
            if b_ih is not None:
                z = z + b_ih + b_hh
            i, f, g, o = z.chunk(4)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            if cell is not None:
                with torch.no_grad():
                    for name, w in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih),
                                    ("bias_hh", b_hh)):
                        if w is not None:
                            getattr(cell, name).copy_(w)
                h_new, c_new = cell(x[t, b][None], (h[None], c[None]))
                h_new, c_new = h_new[0], c_new[0]
            else:
                c_new = f * c + i * g
                h_new = o * c_new.tanh()
                if w_hr is not None:
                    h_new = h_new @ w_hr.t()
                if zc is not None:
                    c_new = zc[t, b] * c + (1 - zc[t, b]) * c_new
                if zh is not None:
                    h_new = zh[t, b] * h + (1 - zh[t, b]) * h_new
            h, c = h_new, c_new
            for k, v in enumerate((h, c, i, f, g, o)):
                per_step[k][t][b] = v
        h_n.append(h)
        c_n.append(c)
    widths = (h0.shape[-1], H, H, H, H, H)
    stacked = [torch.stack([torch.stack([v if v is not None else x.new_zeros(w) for v in row]) for row in rows])
               for rows, w in zip(per_step, widths)]
    return stacked, torch.stack(h_n), torch.stack(c_n)


def loop_module(module, x, lengths, hx=None, recorded=None):
    """The whole module as loops (eval-mode dropout between layers): x [T, B, I] padded
    time-major. recorded: per layer-direction (w_hh, masks padded) to use instead of the
    module's own W_hh and no masks. Returns (output [T, B, *], (h_n, c_n), states)."""
    dirs = 2 if module.bidirectional else 1
    P = module.proj_size or module.hidden_size
    L = module.num_layers * dirs
    T, B = x.shape[:2]
    h0 = hx[0] if hx is not None else x.new_zeros(L, B, P)
    c0 = hx[1] if hx is not None else x.new_zeros(L, B, module.hidden_size)
    states, h_n, c_n = [], [], []
    for layer in range(module.num_layers):
        ys = []
        for d in range(dirs):
            k = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh, w_hr = module._layer_weights(layer, d)
            masks = None
            if recorded is not None:
                w_hh, masks = recorded[k]
            per_step, h, c = loop_layer(x, lengths, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr, d == 1, masks)
            states.append(per_step)
            ys.append(per_step[0])
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(ys, -1)
    return x, (torch.stack(h_n), torch.stack(c_n)), states


def _inputs(cfg, T, B, dtype, packed, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, cfg["input_size"], generator=g, dtype=torch.float64).to(DEVICE, dtype)
    lengths = torch.tensor([T - (b * 2) % T for b in range(B)]) if packed else torch.full((B,), T)
    return x, lengths


def _batch_major(t, batch_first):
    return t.transpose(0, 1) if batch_first else t


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_inspect_matches_cell_loop(backend, name, cfg, packed):
    dtype = torch.float64 if backend not in INTERPRETED else torch.float32
    require(backend, DEVICE, dtype, P=cfg.get("proj_size") or None, packed=packed)
    torch.manual_seed(0)
    module = lstm_fast.LSTM(**cfg, backend=backend, device=DEVICE, dtype=dtype)
    T, B = 5, 3
    x, lengths = _inputs(cfg, T, B, dtype, packed)
    bf = module.batch_first
    got = lstm_fast.inspect(module, _batch_major(x, bf), lengths=lengths if packed else None)
    with torch.no_grad():
        out, (h_n, c_n), states = loop_module(module, x, lengths)
    assert_close(got.output, _batch_major(out, bf), dtype, "output")
    assert_close(got.hidden[0], h_n, dtype, "h_n")
    assert_close(got.hidden[1], c_n, dtype, "c_n")
    assert len(got.states) == len(states)
    for k, (ours, want) in enumerate(zip(got.states, states)):
        for field, w in zip(ours._fields, want):
            assert_close(getattr(ours, field), _batch_major(w, bf), dtype, f"layer-direction {k} {field}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_inspect_packed_input_and_unbatched(backend):
    dtype = torch.float64 if backend not in INTERPRETED else torch.float32
    require(backend, DEVICE, dtype, packed=True)
    torch.manual_seed(1)
    module = lstm_fast.LSTM(3, 4, bidirectional=True, backend=backend, device=DEVICE, dtype=dtype)
    seqs = [torch.randn(n, 3, dtype=dtype, device=DEVICE) for n in (2, 4, 3)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    got = lstm_fast.inspect(module, packed)
    padded, lengths = pad_packed_sequence(packed)
    with torch.no_grad():
        out, _, states = loop_module(module, padded, lengths)
    assert_close(got.output, out, dtype, "output")
    for k in range(2):
        assert_close(got.states[k].c, states[k][1], dtype, f"direction {k} c")
        assert_close(got.states[k].f, states[k][3], dtype, f"direction {k} f")
    one = lstm_fast.inspect(module, seqs[1])  # unbatched: [T, *]
    assert one.states[0].g.shape == (4, 4)
    assert_close(one.states[1].h, got.states[1].h[:, 1], dtype, "unbatched h")


def test_inspect_rejects_other_modules():
    with pytest.raises(TypeError, match="lstm_fast.LSTM or torch.nn.LSTM"):
        lstm_fast.inspect(torch.nn.GRU(3, 4), torch.randn(2, 1, 3))
