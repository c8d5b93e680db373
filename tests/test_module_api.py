"""Module behaviour beyond the numbers: parameters, state_dict, dropout, backend choice, functional form."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lstm_fast
from helpers import TOL
from lstm_fast.backends import select_backend
from lstm_fast.backends.base import LayerSizes

KW = dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True, proj_size=3)


def test_parameters_and_init_are_nn_lstm():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(**KW)
    torch.manual_seed(0)
    ours = lstm_fast.LSTM(**KW)
    assert isinstance(ours, torch.nn.LSTM)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n


def test_state_dict_round_trips_both_ways():
    ref = torch.nn.LSTM(**KW)
    ours = lstm_fast.LSTM(**KW)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.LSTM(**KW)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


def test_from_torch_and_to_torch_keep_config_and_weights():
    ref = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, dropout=0.25, dtype=torch.float64)
    ref.eval()
    ours = lstm_fast.LSTM.from_torch(ref, backend="reference")
    assert (ours.batch_first, ours.dropout, ours.training, ours.backend) == (True, 0.25, False, "reference")
    assert next(ours.parameters()).dtype == torch.float64
    back = ours.to_torch()
    assert type(back) is torch.nn.LSTM and not back.training
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    cell = torch.nn.LSTMCell(3, 4)
    fast_cell = lstm_fast.LSTMCell.from_torch(cell)
    assert type(fast_cell.to_torch()) is torch.nn.LSTMCell
    assert torch.equal(fast_cell.to_torch().weight_hh, cell.weight_hh)


def test_from_torch_and_to_torch_keep_frozen_parameters_frozen():
    ref = torch.nn.LSTM(4, 6, num_layers=2)
    ref.weight_hh_l0.requires_grad_(False)
    ref.bias_ih_l1.requires_grad_(False)
    frozen = {"weight_hh_l0", "bias_ih_l1"}
    for module in (lstm_fast.LSTM.from_torch(ref), lstm_fast.LSTM.from_torch(ref).to_torch()):
        assert {n for n, p in module.named_parameters() if not p.requires_grad} == frozen
    cell = torch.nn.LSTMCell(3, 4)
    cell.weight_ih.requires_grad_(False)
    for module in (lstm_fast.LSTMCell.from_torch(cell), lstm_fast.LSTMCell.from_torch(cell).to_torch()):
        assert [n for n, p in module.named_parameters() if not p.requires_grad] == ["weight_ih"]


def test_forget_bias_is_added_to_the_forget_slice_only():
    torch.manual_seed(0)
    plain = lstm_fast.LSTM(3, 4, num_layers=2)
    torch.manual_seed(0)
    biased = lstm_fast.LSTM(3, 4, num_layers=2, forget_bias=1.0)
    for layer in range(2):
        d = getattr(biased, f"bias_ih_l{layer}") - getattr(plain, f"bias_ih_l{layer}")
        torch.testing.assert_close(d, torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 8))
        assert torch.equal(getattr(biased, f"bias_hh_l{layer}"), getattr(plain, f"bias_hh_l{layer}"))
    torch.manual_seed(0)
    cell = lstm_fast.LSTMCell(3, 4, forget_bias=2.0)
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(3, 4)
    torch.testing.assert_close(cell.bias_ih - ref.bias_ih, torch.tensor([0.0] * 4 + [2.0] * 4 + [0.0] * 8))


def test_dropout_in_train_mode_drops_between_layers_at_the_rate():
    """Same RNG stream: our train-mode output equals layer-by-layer nn.LSTM with F.dropout between."""
    p, L = 0.3, 3
    torch.manual_seed(0)
    ours = lstm_fast.LSTM(8, 64, num_layers=L, dropout=p, backend="reference", dtype=torch.float64).train()
    layers = []
    for k in range(L):
        m = torch.nn.LSTM(8 if k == 0 else 64, 64, dtype=torch.float64)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(m, name + "_l0").data.copy_(getattr(ours, f"{name}_l{k}"))
        layers.append(m)
    x = torch.randn(20, 16, 8, dtype=torch.float64)

    seen = []
    real_dropout = torch.nn.functional.dropout

    def spy(t, p_=0.5, training=True, inplace=False):
        out = real_dropout(t, p_, training, inplace)
        seen.append(((out == 0) & (t != 0)).double().mean().item())
        return out

    torch.manual_seed(5)
    torch.nn.functional.dropout, saved = spy, torch.nn.functional.dropout
    try:
        y, _ = ours(x)
    finally:
        torch.nn.functional.dropout = saved
    torch.manual_seed(5)
    h = x
    for k, m in enumerate(layers):
        h, _ = m(h)
        if k < L - 1:
            h = torch.nn.functional.dropout(h, p, training=True)
    torch.testing.assert_close(y, h, **TOL[torch.float64])
    assert len(seen) == L - 1  # between layers only, never after the last
    # 20*16*64 = 20480 draws per layer: binomial std of the rate ~0.0032, 5 sigma = 0.016
    for rate in seen:
        assert abs(rate - p) < 0.016
    ours.eval()
    y_eval, _ = ours(x)
    ref = lstm_fast.LSTM.to_torch(ours).eval()
    torch.testing.assert_close(y_eval, ref(x)[0], **TOL[torch.float64])


def test_named_backend_that_cannot_serve_raises_with_reason():
    sizes = LayerSizes(T=2, B=2, H=3, P=3)
    for name, (ok, why) in lstm_fast.available_backends().items():
        assert isinstance(why, str) and why
        if not ok:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
                select_backend(name, torch.device("cpu"), torch.float32, sizes)
    with pytest.raises(RuntimeError, match="does not support"):
        select_backend("reference", torch.device("cpu"), torch.int64, sizes)


def test_environment_variable_sets_the_default(monkeypatch):
    sizes = LayerSizes(T=2, B=2, H=3, P=3)
    monkeypatch.setenv("LSTM_FAST_BACKEND", "reference")
    assert select_backend(None, torch.device("cpu"), torch.float32, sizes).name == "reference"
    monkeypatch.setenv("LSTM_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown lstm_fast backend"):
        lstm_fast.LSTM(2, 3)(torch.randn(2, 1, 2))


def test_auto_choice_is_available_and_supports_the_call():
    sizes = LayerSizes(T=2, B=2, H=3, P=3)
    chosen = select_backend("auto", torch.device("cpu"), torch.float32, sizes)
    assert chosen.is_available()[0] and chosen.supports(torch.device("cpu"), torch.float32, sizes)[0]


def test_inference_saves_nothing_and_builds_no_graph():
    m = lstm_fast.LSTM(3, 4)
    with torch.no_grad():
        y, (h, c) = m(torch.randn(2, 2, 3))
    assert y.grad_fn is None and h.grad_fn is None
    with torch.inference_mode():
        y, _ = m(torch.randn(2, 2, 3))
    assert y.grad_fn is None


def test_functional_layer_matches_single_layer_nn_lstm():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 6, proj_size=2, batch_first=True, dtype=torch.float64)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    h0, c0 = torch.randn(1, 3, 2, dtype=torch.float64), torch.randn(1, 3, 6, dtype=torch.float64)
    y_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    y, (h, c) = lstm_fast.lstm_layer(x, h0[0], c0[0], ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0,
                                     ref.bias_hh_l0, ref.weight_hr_l0, batch_first=True)
    for a, b in ((y, y_ref), (h, h_ref[0]), (c, c_ref[0])):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 6), B=st.integers(1, 4), I=st.integers(1, 6), H=st.integers(1, 9),
       layers=st.integers(1, 2), bidir=st.booleans(), batch_first=st.booleans(), proj=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_shapes_match_nn_lstm_with_auto_backend(T, B, I, H, layers, bidir, batch_first, proj, seed):
    torch.manual_seed(seed)
    P = max(1, H // 2) if proj and H > 1 else 0
    ref = torch.nn.LSTM(I, H, num_layers=layers, bidirectional=bidir, batch_first=batch_first, proj_size=P)
    ours = lstm_fast.LSTM.from_torch(ref)  # automatic backend choice
    x = torch.randn((B, T, I) if batch_first else (T, B, I), requires_grad=True)
    y_ref, (h_ref, c_ref) = ref(x)
    y, (h, c) = ours(x)
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    g = torch.randn_like(y)
    gx_ref, = torch.autograd.grad((y_ref * g).sum() + c_ref.sum(), x)
    gx, = torch.autograd.grad((y * g).sum() + c.sum(), x)
    torch.testing.assert_close(gx, gx_ref, **TOL[torch.float32])
