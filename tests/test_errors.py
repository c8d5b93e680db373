"""Bad input gets the exception torch.nn.LSTM / LSTMCell raise: same type, same message."""
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import lstm_fast
from helpers import require

I, H, T, B = 4, 5, 3, 2


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# (id, constructor kwargs, forward args builder)
FORWARD_CASES = [
    ("input_size", {}, lambda: (_x(T, B, I + 1),)),
    ("input_4d", {}, lambda: (_x(T, B, I, 1),)),
    ("input_1d", {}, lambda: (_x(I),)),
    ("h0_hidden_size", {}, lambda: (_x(T, B, I), (_x(1, B, H + 1), _x(1, B, H)))),
    ("c0_hidden_size", {}, lambda: (_x(T, B, I), (_x(1, B, H), _x(1, B, H + 2)))),
    ("h0_batch", {}, lambda: (_x(T, B, I), (_x(1, B + 1, H), _x(1, B, H)))),
    ("c0_batch", {}, lambda: (_x(T, B, I), (_x(1, B, H), _x(1, B + 1, H)))),
    ("h0_layers", {}, lambda: (_x(T, B, I), (_x(2, B, H), _x(1, B, H)))),
    ("batched_2d_states", {}, lambda: (_x(T, B, I), (_x(B, H), _x(B, H)))),
    ("unbatched_3d_states", {}, lambda: (_x(T, I), (_x(1, 1, H), _x(1, 1, H)))),
    ("batch_first_batch", dict(batch_first=True), lambda: (_x(B, T, I), (_x(1, T, H), _x(1, T, H)))),
    ("proj_h0_size", dict(proj_size=2), lambda: (_x(T, B, I), (_x(1, B, H), _x(1, B, H)))),
    ("bidir_layers", dict(bidirectional=True), lambda: (_x(T, B, I), (_x(1, B, H), _x(1, B, H)))),
    ("input_dtype", {}, lambda: (_x(T, B, I, dtype=torch.float64),)),
    ("hx_three_states", {}, lambda: (_x(T, B, I), (_x(1, B, H), _x(1, B, H), _x(1, B, H)))),
    ("hx_one_state", {}, lambda: (_x(T, B, I), (_x(1, B, H),))),
    ("empty_sequence", {}, lambda: (_x(0, B, I),)),
    ("empty_sequence_batch_first", dict(batch_first=True), lambda: (_x(B, 0, I),)),
    ("empty_sequence_unbatched", {}, lambda: (_x(0, I),)),
]

# For packed input nn.LSTM has no Python check and fails deep inside its
# kernels ("mat1 and mat2 shapes cannot be multiplied ..."). We raise the same
# message nn.LSTM gives for the equivalent padded input, and its type where
# torch's accidental one differs (an IndexError for 2-D states).
PACKED_CASES = [
    ("packed_input_size", lambda: (pack_sequence([_x(3, I + 1), _x(2, I + 1)]),),
     "input.size(-1) must be equal to input_size. Expected 4, got 5"),
    ("packed_h0_batch", lambda: (pack_sequence([_x(3, I), _x(2, I)]), (_x(1, 3, H), _x(1, 3, H))),
     "Expected hidden[0] size (1, 2, 5), got [1, 3, 5]"),
    ("packed_h0_dims", lambda: (pack_sequence([_x(3, I), _x(2, I)]), (_x(2, H), _x(2, H))),
     "For batched 3-D input, hx and cx should also be 3-D but got (2-D, 2-D) tensors"),
]


def _error_of(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("name,kwargs,args", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_errors_match_nn_lstm(name, kwargs, args):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, **kwargs)
    ours = lstm_fast.LSTM.from_torch(ref)
    expected = _error_of(lambda: ref(*args()))
    assert _error_of(lambda: ours(*args())) == expected


@pytest.mark.parametrize("name,args,message", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_packed_errors_are_clear(name, args, message):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H)
    ours = lstm_fast.LSTM.from_torch(ref)
    _error_of(lambda: ref(*args()))  # torch fails too, only less clearly
    assert _error_of(lambda: ours(*args())) == (RuntimeError, message)


CTOR_CASES = [
    ("hidden_zero", (I, 0), {}),
    ("hidden_negative", (I, -1), {}),
    ("hidden_float", (I, 5.0), {}),
    ("layers_zero", (I, H, 0), {}),
    ("dropout_high", (I, H), dict(dropout=1.5)),
    ("dropout_bool", (I, H), dict(dropout=True)),
    ("proj_negative", (I, H), dict(proj_size=-1)),
    ("proj_too_big", (I, H), dict(proj_size=H)),
    ("unknown_kwarg", (I, H), dict(nonsense=1)),
]


@pytest.mark.parametrize("name,args,kwargs", CTOR_CASES, ids=[c[0] for c in CTOR_CASES])
def test_constructor_errors_match_nn_lstm(name, args, kwargs):
    expected = _error_of(lambda: torch.nn.LSTM(*args, **kwargs))
    got = _error_of(lambda: lstm_fast.LSTM(*args, **kwargs))
    assert got == expected


CELL_CASES = [
    ("input_size", lambda: (_x(B, I + 1),)),
    ("input_3d", lambda: (_x(1, B, I),)),
    ("h0_3d", lambda: (_x(B, I), (_x(1, B, H), _x(B, H)))),
    ("h0_batch", lambda: (_x(B, I), (_x(B + 1, H), _x(B, H)))),
    ("c0_batch", lambda: (_x(B, I), (_x(B, H), _x(B + 1, H)))),
    ("h0_hidden", lambda: (_x(B, I), (_x(B, H + 1), _x(B, H)))),
    ("c0_hidden", lambda: (_x(B, I), (_x(B, H), _x(B, H + 1)))),
    ("three_states", lambda: (_x(B, I), (_x(B, H), _x(B, H), _x(B, H)))),
    ("one_state", lambda: (_x(B, I), (_x(B, H),))),
    ("one_state_unbatched", lambda: (_x(I), (_x(H),))),
    ("hx_not_tuple", lambda: (_x(B, I), _x(B, H))),
]


@pytest.mark.parametrize("name,args", CELL_CASES, ids=[c[0] for c in CELL_CASES])
def test_cell_errors_match_nn_lstmcell(name, args):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(I, H)
    ours = lstm_fast.LSTMCell.from_torch(ref)
    assert _error_of(lambda: ours(*args())) == _error_of(lambda: ref(*args()))


def test_state_dtype_mismatch_is_clear():
    ours = lstm_fast.LSTM(I, H)
    with pytest.raises(RuntimeError, match="dtype"):
        ours(_x(T, B, I), (_x(1, B, H, dtype=torch.float64), _x(1, B, H)))


@pytest.mark.parametrize("backend", lstm_fast.BACKEND_NAMES)
def test_weight_dtype_mix_is_refused(backend):
    """One float64 weight in a float32 module: torch.nn.LSTM fails (inside oneDNN); no
    backend may compute it silently in float32."""
    require(backend, torch.device("cpu"), torch.float32, T=T, B=B, H=H)
    ours = lstm_fast.LSTM(I, H, backend=backend)
    ours.weight_hh_l0 = torch.nn.Parameter(ours.weight_hh_l0.detach().double())
    with pytest.raises(RuntimeError, match=r"weight_hh dtype \(torch.float64\) does not match input dtype"):
        ours(_x(T, B, I))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown lstm_fast backend 'nope'"):
        lstm_fast.LSTM(I, H, backend="nope")


def test_forget_bias_needs_bias():
    with pytest.raises(ValueError, match="forget_bias needs bias=True"):
        lstm_fast.LSTM(I, H, bias=False, forget_bias=1.0)


def _functional_backends():
    return [b for b in lstm_fast.BACKEND_NAMES if b != "cuda"]  # CPU tensors; cuda needs a GPU


BAD_PACKED = [
    ((T, B, 4 * H), [2, 1, 1], "the input is packed, \\[N, features\\]"),
    ((5, 4 * H), [2, 2, 2], "packed input has 5 rows but batch_sizes sum to 6"),
    ((5, 4 * H), [1, 2, 2], "non-increasing"),
    ((5, 4 * H), [B + 1, 2, 2], "non-increasing"),
    ((5, 4 * H), [2.0, 2.0, 1.0], "int64 CPU tensor"),
]


@pytest.mark.parametrize("backend", _functional_backends())
@pytest.mark.parametrize("shape,batch_sizes,message", BAD_PACKED, ids=["padded", "rows", "increasing", "above_B",
                                                                       "float"])
def test_functional_bad_packed_layout_is_refused_alike(backend, shape, batch_sizes, message):
    """batch_sizes that do not describe the packed input: one ValueError in every backend."""
    gx, h0, c0, w_hh = _x(*shape), _x(B, H), _x(B, H), _x(4 * H, H)
    with pytest.raises(ValueError, match=message):
        lstm_fast.lstm_recurrence(gx, h0, c0, w_hh, batch_sizes=torch.tensor(batch_sizes), reverse=True,
                                  backend=backend)


@pytest.mark.parametrize("backend", _functional_backends())
@pytest.mark.parametrize("state", ["h0", "c0"])
def test_functional_state_dtype_mismatch_is_refused_alike(backend, state):
    """float64 states with float32 input: one rule for all backends, the module's message."""
    gx, w_hh = _x(T, B, 4 * H), _x(4 * H, H)
    h0 = _x(B, H, dtype=torch.float64 if state == "h0" else torch.float32)
    c0 = _x(B, H, dtype=torch.float64 if state == "c0" else torch.float32)
    name = "hx" if state == "h0" else "cx"
    with pytest.raises(RuntimeError, match=rf"lstm_fast: {name} dtype \(torch.float64\) does not match input dtype"):
        lstm_fast.lstm_recurrence(gx, h0, c0, w_hh, backend=backend)


BAD_LENGTHS = [
    ([0, 2], "at least 1, got 0"),
    ([-1, 2], "at least 1, got -1"),
    ([T + 1, 2], f"exceeds the sequence length of the input \\({T}\\)"),
    ([2], f"1 values for a batch of {B} sequences"),
    ([2, 2, 2], f"3 values for a batch of {B} sequences"),
    (torch.tensor([2.0, 1.0]), "must be integers, got a tensor of dtype torch.float32"),
    ([2.0, 1.0], "must be integers"),
    (torch.tensor([[2, 1]]), "must be 1-D"),
]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("lengths,message", BAD_LENGTHS, ids=["zero", "negative", "too_long", "too_few", "too_many",
                                                             "float_tensor", "float_list", "2d"])
def test_bad_lengths_raise_value_error(lengths, message, batch_first):
    """lengths= that cannot describe the padded batch: a ValueError naming the problem,
    before anything runs."""
    m = lstm_fast.LSTM(I, H, batch_first=batch_first)
    x = _x(B, T, I) if batch_first else _x(T, B, I)
    with pytest.raises(ValueError, match=message):
        m(x, lengths=lengths)


def test_lengths_with_packed_or_unbatched_input_raises():
    m = lstm_fast.LSTM(I, H)
    with pytest.raises(ValueError, match="a PackedSequence already holds its lengths"):
        m(pack_sequence([_x(2, I), _x(1, I)]), lengths=[2, 1])
    with pytest.raises(ValueError, match="needs batched 3-D input"):
        m(_x(T, I), lengths=[T])


@pytest.mark.parametrize("backend", _functional_backends())
@pytest.mark.parametrize("wrong", ["h0 batch", "c0 hidden", "w_hh columns", "w_ih rows", "bias", "x features"])
def test_functional_shape_mismatch_is_refused_alike(backend, wrong):
    """Sizes that disagree raise one clear error in every backend, before any kernel
    (numba's kernels index raw memory: unchecked, they wrote past their buffers)."""
    x, h0, c0 = _x(T, B, I), _x(B, H), _x(B, H)
    w_ih, w_hh, b = _x(4 * H, I), _x(4 * H, H), _x(4 * H)
    bad = {"h0 batch": dict(h0=_x(B + 1, H)), "c0 hidden": dict(c0=_x(B, H + 1)),
           "w_hh columns": dict(w_hh=_x(4 * H, H + 1)), "w_ih rows": dict(w_ih=_x(4 * H + 4, I)),
           "bias": dict(b=_x(4 * H - 1)), "x features": dict(x=_x(T, B, I + 1))}[wrong]
    args = {**dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b=b), **bad}
    with pytest.raises(RuntimeError, match="lstm_fast: inconsistent shapes"):
        lstm_fast.lstm_layer(args["x"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["b"], None,
                             backend=backend)
