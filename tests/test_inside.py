"""Inside the fused loop: lstm_fast.inspect (every step's states and gates) and the
recurrent regularisers (recurrent_dropout, zoneout, weight_drop), on every backend,
against a Python loop over the steps of each sequence written here: torch.nn.LSTMCell
where it applies (no projection, no masks), the same gate math in torch ops otherwise.
"""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

import lstm_fast
from helpers import BACKEND_NAMES, INTERPRETED, assert_close, device_of_tests, require
from lstm_fast import nn as lstm_nn
from lstm_fast.backends.base import StepMasks
from lstm_fast.function import lstm_projected

# A mask op seen by autograd as part of the graph warns at backward (and would be
# differentiated through in a later torch): the masks must stay outside the graph.
pytestmark = pytest.mark.filterwarnings("error:.*autograd kernel was not registered:UserWarning")

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
            if cell is not None:  # torch.nn.LSTMCell's forward on these (differentiable) weights
                weights = {"weight_ih": w_ih, "weight_hh": w_hh}
                if b_ih is not None:
                    weights.update(bias_ih=b_ih, bias_hh=b_hh)
                h_new, c_new = torch.func.functional_call(cell, weights, (x[t, b][None], (h[None], c[None])))
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


# ----------------------------------------------------------------- regularisers

REGULARISERS = [
    ("recurrent_dropout", dict(recurrent_dropout=0.3)),
    ("zoneout", dict(zoneout=(0.2, 0.35))),
    ("weight_drop", dict(weight_drop=0.4)),
    ("all", dict(recurrent_dropout=0.25, zoneout=0.3, weight_drop=0.2)),
]


def _recording(module):
    """Wraps module._regularise to keep what each layer-direction drew, in call order."""
    drawn = []
    original = module._regularise

    def record(*args):
        w_hh, masks = original(*args)
        drawn.append((w_hh, masks))
        return w_hh, masks

    module._regularise = record
    return drawn


def _padded_masks(masks, lengths, T):
    """A call's StepMasks (packed in sorted order, as lengths= runs it) as the loop's:
    recurrent [B, P] and per-step [T, B, *] in the batch's own order."""
    if masks is None:
        return None
    sorted_lengths, sorted_indices = torch.sort(lengths, descending=True, stable=True)
    unsorted = torch.empty_like(sorted_indices)
    unsorted[sorted_indices] = torch.arange(len(lengths))
    batch_sizes = (sorted_lengths.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)
    batch_sizes = batch_sizes[:int(sorted_lengths[0])]
    m, zc, zh = masks

    def pad(z):
        if z is None:
            return None
        return pad_packed_sequence(PackedSequence(z, batch_sizes, sorted_indices.to(z.device),
                                                  unsorted.to(z.device)), total_length=T)[0]

    return StepMasks(None if m is None else m[unsorted.to(m.device)], pad(zc), pad(zh))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("reg_name,reg", REGULARISERS, ids=[r[0] for r in REGULARISERS])
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_regularised_matches_loop(backend, name, cfg, reg_name, reg, packed, training):
    """Outputs, final states and every gradient against the loop with the masks the call drew."""
    dtype = torch.float64 if backend not in INTERPRETED else torch.float32
    require(backend, DEVICE, dtype, P=cfg.get("proj_size") or None, packed=packed)
    if backend in INTERPRETED and (name != "plain" or reg_name != "all"):
        pytest.skip("interpreted kernels: the plain configuration with every regulariser")
    torch.manual_seed(2)
    module = lstm_fast.LSTM(**cfg, **reg, backend=backend, device=DEVICE, dtype=dtype).train(training)
    T, B = 5, 3
    x, lengths = _inputs(cfg, T, B, dtype, packed)
    dirs = 2 if module.bidirectional else 1
    P = module.proj_size or module.hidden_size
    g = torch.Generator().manual_seed(5)
    h0 = torch.randn(module.num_layers * dirs, B, P, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    c0 = torch.randn(module.num_layers * dirs, B, module.hidden_size, generator=g, dtype=torch.float64).to(
        DEVICE, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
    drawn = _recording(module)
    bf = module.batch_first
    out, (h_n, c_n) = module(_batch_major(leaves[0], bf), (leaves[1], leaves[2]),
                             lengths=lengths if packed else None)
    out = _batch_major(out, bf)
    # eval: zoneout still draws (its expectation), the dropouts are off
    assert len(drawn) == (module.num_layers * dirs if training or "zoneout" in reg else 0)
    recorded = [(w, _padded_masks(m, lengths, T) if packed else m) for w, m in drawn] or None
    ref_leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
    ref_out, (ref_h, ref_c), _ = loop_module(module, ref_leaves[0], lengths, (ref_leaves[1], ref_leaves[2]),
                                             recorded=recorded)
    assert_close(out, ref_out, dtype, "output")
    assert_close(h_n, ref_h, dtype, "h_n")
    assert_close(c_n, ref_c, dtype, "c_n")
    ups = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in (out, h_n, c_n)]
    params = list(module.parameters())
    # retain_graph: the loop reuses the dropped W_hh the call drew (one graph shared by both)
    ours = torch.autograd.grad(sum((t * u).sum() for t, u in zip((out, h_n, c_n), ups)), leaves + params,
                               retain_graph=True)
    theirs = torch.autograd.grad(sum((t * u).sum() for t, u in zip((ref_out, ref_h, ref_c), ups)),
                                 ref_leaves + params)
    names = ["x", "h0", "c0"] + [n for n, _ in module.named_parameters()]
    for n, a, b in zip(names, ours, theirs):
        assert_close(a, b, dtype, f"grad {n}")


def test_masks_follow_the_seed_and_eval_is_plain():
    torch.manual_seed(0)
    module = lstm_fast.LSTM(4, 6, 2, recurrent_dropout=0.3, weight_drop=0.3, backend="reference",
                            dtype=torch.float64)
    plain = lstm_fast.LSTM(4, 6, 2, backend="reference", dtype=torch.float64)
    plain.load_state_dict(module.state_dict())
    assert module.state_dict().keys() == torch.nn.LSTM(4, 6, 2).state_dict().keys()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(module(x)[0])
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert not torch.allclose(runs[0], plain(x)[0])
    module.eval()
    assert torch.equal(module(x)[0], plain(x)[0])


@pytest.mark.parametrize("kwargs", [
    dict(recurrent_dropout=1.0), dict(recurrent_dropout=-0.1), dict(recurrent_dropout="0.1"),
    dict(recurrent_dropout=True), dict(recurrent_dropout=float("nan")), dict(weight_drop=1.5),
    dict(weight_drop=None), dict(zoneout=1.0), dict(zoneout=(0.1,)), dict(zoneout=(0.1, 1.0)),
    dict(zoneout=[0.1, "a"]),
])
def test_bad_probabilities_raise(kwargs):
    with pytest.raises(ValueError, match="zoneout|recurrent_dropout|weight_drop"):
        lstm_fast.LSTM(3, 4, **kwargs)


def test_cell_takes_zoneout_only():
    with pytest.raises(ValueError, match="zoneout only"):
        lstm_fast.LSTMCell(3, 4, recurrent_dropout=0.2)
    with pytest.raises(ValueError, match="zoneout only"):
        lstm_fast.LSTMCell(3, 4, weight_drop=0.2)
    with pytest.raises(ValueError, match="zoneout"):
        lstm_fast.LSTMCell(3, 4, zoneout=(0.1, 0.2)).to_torch()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cell_zoneout(training):
    torch.manual_seed(0)
    cell = lstm_fast.LSTMCell(3, 4, zoneout=(0.3, 0.6), dtype=torch.float64).train(training)
    x, h, c = (torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4))
    torch.manual_seed(9)
    h1, c1 = cell(x, (h, c))
    torch.manual_seed(9)
    if training:
        zc, zh = (lstm_nn._bernoulli(p, (2, 4), x) for p in (0.3, 0.6))  # the module's draws, replayed
    else:
        zc, zh = torch.full((2, 4), 0.3, dtype=torch.float64), torch.full((2, 4), 0.6, dtype=torch.float64)
    h_new, c_new = torch.nn.LSTMCell.forward(cell, x, (h, c))
    assert_close(c1, zc * c + (1 - zc) * c_new, torch.float64, "c")
    assert_close(h1, zh * h + (1 - zh) * h_new, torch.float64, "h")


def test_functional_entry_takes_masks():
    """lstm_projected with explicit masks: doubling the recurrent input changes y."""
    g = torch.Generator().manual_seed(0)
    T, B, I, H = 4, 2, 3, 5
    x, h0, c0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((T, B, I), (B, H), (B, H)))
    w_ih, w_hh = torch.randn(4 * H, I, dtype=torch.float64), torch.randn(4 * H, H, dtype=torch.float64)
    masks = StepMasks(torch.full((B, H), 2.0, dtype=torch.float64), torch.zeros(T, B, H, dtype=torch.float64),
                      None)
    y0 = lstm_projected(x, h0, c0, w_ih, w_hh, backend="reference")[0]
    y1 = lstm_projected(x, h0, c0, w_ih, w_hh, backend="reference", masks=masks)[0]
    assert not torch.allclose(y0, y1)  # the recurrent input doubled


def test_short_paths_keep_regularisers():
    """The one-op short paths (LSTMCell step, LSTM one step or without grad, Stream) must
    not skip a regulariser: zoneout's eval expectation changes the result, so a module
    with it must equal its own full path, not the plain LSTM."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4)
    plain = lstm_fast.LSTM(4, 6).eval()
    zoned = lstm_fast.LSTM(4, 6, zoneout=0.5).eval()
    zoned.load_state_dict(plain.state_dict())
    with torch.no_grad():
        y_plain, _ = plain(x)
        y_zoned, _ = zoned(x)
        stream = lstm_fast.Stream(zoned, batch_size=3)
        y_stream = stream.step(x[0])
    assert not torch.allclose(y_plain, y_zoned)
    torch.testing.assert_close(y_stream, y_zoned[0])
    cell = lstm_fast.LSTMCell(4, 6, zoneout=0.5).eval()
    cell_plain = lstm_fast.LSTMCell(4, 6).eval()
    cell_plain.load_state_dict(cell.state_dict())
    hx = (torch.randn(3, 6), torch.randn(3, 6))
    with torch.no_grad():
        h_zoned, _ = cell(x[0], hx)
        h_plain, _ = cell_plain(x[0], hx)
    # eval zoneout: h = p h_prev + (1 - p) h~
    torch.testing.assert_close(h_zoned, 0.5 * hx[0] + 0.5 * h_plain)


def test_bernoulli_draws():
    """The zoneout draws: 0/1 only, mean within 6 binomial standard deviations of p,
    repeatable under torch.manual_seed, the same whatever the thread count."""
    like = torch.empty(0, dtype=torch.float32)
    n, p = 200_000, 0.1
    torch.manual_seed(3)
    a = lstm_nn._bernoulli(p, (n,), like)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(a.mean().item() - p) < 6 * (p * (1 - p) / n) ** 0.5
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(3)
        assert torch.equal(lstm_nn._bernoulli(p, (n,), like), a)
    finally:
        torch.set_num_threads(before)
    assert not torch.equal(lstm_nn._bernoulli(p, (n,), like), a)  # the generator moved on
    assert lstm_nn._bernoulli(0.0, (100,), like).sum() == 0 and lstm_nn._bernoulli(1.0, (100,), like).sum() == 100
