"""One step at a time: the lstm_cell ops (csrc/lstm_step.cpp), the modules' short path
(lstm_fast/_fast.py) and lstm_fast.Stream, against torch.nn.LSTMCell / nn.LSTM."""
import importlib.util
import pathlib

import pytest
import torch
from torch import nn

import lstm_fast
from helpers import TOL
from lstm_fast.backends import get_backend

pytestmark = pytest.mark.skipif(not get_backend("cpp").is_available()[0], reason="the extension is not built")

DTYPES = (torch.float64, torch.float32)
# B up to 512 (kDotMaxRows): the dot-product kernels; 1 takes the one-row kernel, 3
# and 7 the multi-row passes and their leftovers (AVX-512: 4+2+1, AVX2: 3+3+1);
# 520: the GEMM path (more than kDotMaxRows)
SIZES = ((1, 5, 7), (3, 17, 70), (7, 33, 20), (70, 9, 17), (520, 6, 9))


def _close(got, want, dtype):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])


def _leaves(module, *tensors):
    return [*tensors, *module.parameters()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,I,H", SIZES)
@pytest.mark.parametrize("bias", (True, False))
def test_cell_loop_matches_torch(dtype, B, I, H, bias):
    """Five steps of a Python loop: outputs and the gradients of x, h0, c0 and every weight."""
    torch.manual_seed(0)
    ref = nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    ours = lstm_fast.LSTMCell.from_torch(ref)
    x = torch.randn(5, B, I, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    c0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    results = []
    for m in (ref, ours):
        state, ys = (h0, c0), []
        for t in range(5):
            state = m(x[t], state)
            ys.append(state[0])
        outs = (torch.stack(ys), state[1])
        grads = torch.autograd.grad(outs, _leaves(m, x, h0, c0), [torch.ones_like(o) for o in outs])
        results.append((*outs, *grads))
    assert "CellFunction" in ours(x[0], (h0, c0))[0].grad_fn.name()  # the short path ran
    _close(results[1], results[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cell_no_grad_and_inference_mode(dtype):
    ref = nn.LSTMCell(6, 9, dtype=dtype)
    ours = lstm_fast.LSTMCell.from_torch(ref)
    x, hx = torch.randn(2, 6, dtype=dtype), (torch.randn(2, 9, dtype=dtype), torch.randn(2, 9, dtype=dtype))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got, want = ours(x, hx), ref(x, hx)
        assert got[0].grad_fn is None
        _close(got, want, dtype)


def test_cell_op_opcheck():
    """Schema, fake kernel, autograd registration and tracing by aot_autograd."""
    d = torch.float64
    for bias in (True, False):
        x, h, c = (torch.randn(2, n, dtype=d, requires_grad=True) for n in (3, 4, 4))
        w_ih, w_hh = torch.randn(16, 3, dtype=d, requires_grad=True), torch.randn(16, 4, dtype=d, requires_grad=True)
        b = [torch.randn(16, dtype=d, requires_grad=True) for _ in range(2)] if bias else [None, None]
        torch.library.opcheck(torch.ops.lstm_fast.lstm_cell, (x, h, c, w_ih, w_hh, *b))
        plain = [t.detach() if t is not None else None for t in (x, h, c, w_ih, w_hh, *b)]
        torch.library.opcheck(torch.ops.lstm_fast.lstm_cell_forward, (*plain, True))
        h_out, c_out = torch.empty(2, 4, dtype=d), torch.empty(2, 4, dtype=d)
        torch.library.opcheck(torch.ops.lstm_fast.lstm_cell_out, (*plain, h_out, c_out))


def test_cell_second_derivatives():
    """create_graph=True: the backward recomputes the step with ATen's differentiable ops."""
    d = torch.float64
    torch.manual_seed(1)
    args = [torch.randn(*s, dtype=d, requires_grad=True) for s in ((2, 3), (2, 4), (2, 4), (16, 3), (16, 4), (16,))]
    op = torch.ops.lstm_fast.lstm_cell
    assert torch.autograd.gradgradcheck(lambda *a: op(*a, a[-1] * 2), args)
    # an input derived from another one: each gets only the paths through it
    x = args[0]
    assert torch.autograd.gradgradcheck(lambda x, w: op(x, x @ w[:3, :4] * 0.5, *args[2:], None), (x, args[4]))


def test_cell_checks_and_messages_stay_torch_s():
    """Calls the ops refuse take the full path: unbatched input, hx=None, torch.nn's errors."""
    ref = nn.LSTMCell(4, 5)
    ours = lstm_fast.LSTMCell.from_torch(ref)
    x = torch.randn(4)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x, (torch.zeros(5), torch.zeros(5))), ref(x, (torch.zeros(5), torch.zeros(5))))
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 3 expected 4"):
        ours(torch.randn(2, 3), (torch.zeros(2, 5), torch.zeros(2, 5)))
    with pytest.raises(RuntimeError, match="Input batch size 2 doesn't match hidden0 batch size 3"):
        ours(torch.randn(2, 4), (torch.zeros(3, 5), torch.zeros(3, 5)))


def test_cell_choice_follows_the_module():
    """The short-path decision is redone when parameters move, change dtype or are replaced."""
    torch.manual_seed(2)
    ref = nn.LSTMCell(3, 4)
    ours = lstm_fast.LSTMCell.from_torch(ref)
    x, hx = torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))
    ours(x, hx)
    assert ours._short
    ours.double()
    ref.double()
    xd, hxd = x.double(), tuple(t.double() for t in hx)
    _close(ours(xd, hxd), ref(xd, hxd), torch.float64)
    new = nn.Parameter(torch.randn(16, 4, dtype=torch.float64))
    ours.weight_hh = new
    ref.weight_hh = nn.Parameter(new.detach().clone())
    _close(ours(xd, hxd), ref(xd, hxd), torch.float64)
    ours.half()
    assert not ours._decide_short()  # 16-bit: the full path (widened by the backend)
    ref_backend = lstm_fast.LSTMCell(3, 4, backend="reference")
    ref_backend(x, hx)
    assert ref_backend._short[0] is None and ref_backend._short[1].name == "reference"  # no cpp op


def test_modules_pickle_and_copy_after_a_call():
    """The kept choice (an op handle) is not part of a module's state."""
    import copy
    import io
    torch.manual_seed(6)
    x, hx = torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))
    for m, call in ((lstm_fast.LSTMCell(3, 4), lambda m: m(x, hx)[0]),
                    (lstm_fast.LSTM(3, 4), lambda m: m(x.unsqueeze(0))[0])):
        want = call(m)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        for other in (torch.load(buf, weights_only=False), copy.deepcopy(m)):
            assert other._short is None
            torch.testing.assert_close(call(other), want)
            assert other._short  # asked anew, on its own parameters
            kept = other._short[1:3] if isinstance(other, lstm_fast.LSTMCell) else other._short[0][:2]
            assert all(any(k is p for p in other.parameters()) for k in kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers,batch_first", ((1, False), (2, True)))
def test_lstm_one_step_calls_match_torch(dtype, layers, batch_first):
    """nn.LSTM fed one step per call with its state carried: outputs and every gradient."""
    torch.manual_seed(3)
    ref = nn.LSTM(5, 6, layers, batch_first=batch_first, dtype=dtype)
    ours = lstm_fast.LSTM.from_torch(ref)
    x = torch.randn(4, 2, 5, dtype=dtype, requires_grad=True)
    results = []
    for m in (ref, ours):
        state, ys = None, []
        for t in range(4):
            step = x[t].unsqueeze(1 if batch_first else 0)
            y, state = m(step, state)
            ys.append(y)
        outs = (torch.cat(ys, 1 if batch_first else 0), *state)
        grads = torch.autograd.grad(outs, _leaves(m, x), [torch.ones_like(o) for o in outs])
        results.append((*outs, *grads))
    _close(results[1], results[0], dtype)
    y, (h, _) = ours(x[0].unsqueeze(0))
    assert y.data_ptr() != h.data_ptr()  # h_n is no view of the output


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_sequence_inference_matches_torch(dtype):
    torch.manual_seed(4)
    ref = nn.LSTM(5, 6, 2, dtype=dtype)
    ours = lstm_fast.LSTM.from_torch(ref)
    x = torch.randn(7, 3, 5, dtype=dtype)
    hx = (torch.randn(2, 3, 6, dtype=dtype), torch.randn(2, 3, 6, dtype=dtype))
    with torch.inference_mode():
        got, want = ours(x, hx), ref(x, hx)
    _close((got[0], *got[1]), (want[0], *want[1]), dtype)
    for p in ours.parameters():  # grad mode on, nothing asks for a gradient
        p.requires_grad_(False)
    got = ours(x, hx)
    assert got[0].grad_fn is None
    _close((got[0], *got[1]), (want[0], *want[1]), dtype)


@pytest.mark.parametrize("kind", ("cell", "lstm", "lstm-reference"))
def test_stream_matches_module_calls(kind):
    torch.manual_seed(5)
    if kind == "cell":
        m = lstm_fast.LSTMCell(4, 6)
    else:
        m = lstm_fast.LSTM(4, 6, 2, backend="reference" if kind == "lstm-reference" else None).eval()
    stream = lstm_fast.Stream(m, batch_size=2)
    assert stream._direct == (kind != "lstm-reference")
    xs = torch.randn(6, 2, 4)
    state = None
    out = torch.empty(2, 6)
    with torch.no_grad():
        for t in range(6):
            if kind == "cell":
                state = m(xs[t], state)
                want = state[0]
            else:
                y, state = m(xs[t].unsqueeze(0), state)
                want = y[0]
            got = stream.step(xs[t], out=out) if t % 2 else stream.step(xs[t])
            torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(stream.state[1], state[1], **TOL[torch.float32])
    stream.reset(state)
    torch.testing.assert_close(stream.state[0], state[0])


def test_cell_out_refuses_overlap():
    x, h, c = torch.randn(1, 3), torch.randn(1, 4), torch.randn(1, 4)
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(RuntimeError, match="may not share memory"):
        torch.ops.lstm_fast.lstm_cell_out(x, h, c, w_ih, w_hh, None, None, h, torch.empty(1, 4))


def test_streaming_example_runs():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "streaming.py"
    spec = importlib.util.spec_from_file_location("streaming_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "20", "--hidden", "8", "--input", "3", "--block", "5"])
    assert set(result) == {"torch.nn.LSTM", "lstm_fast.LSTM", "lstm_fast.Stream"}
    for name, r in result.items():
        assert r[50] <= r[90] <= r[99]
        assert r["diff"] < 1e-5, name  # float32, 20 steps of H=8: rounding differences only
