"""The backend matrix: every backend against torch.nn.LSTM and the reference backend.

Each test takes every name in BACKEND_NAMES; a backend that is unavailable here, or
that refuses a case, is skipped with its own reason. Compared are the outputs, h_n,
c_n and the gradient of every input, state and parameter, with random upstream
gradients on the output and on both final states, within TOL[dtype] (helpers.py):

- whole modules against torch.nn.LSTM / LSTMCell: odd sizes, projections, stacked,
  bidirectional, batch_first, unbatched, packed (sorted and unsorted), frozen parts;
- one layer-direction through the functional entries, lstm_recurrence (on gx) and
  lstm_projected (on x), against torch's own LSTM kernel and the reference backend:
  packed, reverse, projections, rows past batch_sizes[0], T=1, B=1, H=1, H=33;
- gradcheck and gradgradcheck in float64, 16-bit and float32 errors against float64,
  NaN/inf, saturation, empty inputs, autocast.

What is unique to one backend (kernel paths, thread splits, op checks) lives in
test_<backend>.py.
"""
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import lstm_fast
from helpers import (
    BACKEND_NAMES,
    INTERPRETED,
    TORCH,
    CellAsLSTM,
    assert_close,
    assert_results_close,
    assert_within_2x_torch,
    call_layer,
    check_against,
    device_of_tests,
    from_torch,
    get_backend,
    layer_errors_vs_fp64,
    layer_inputs,
    require,
    run_layer,
    widened,
)
from lstm_fast.backends.base import InputProjection, LSTMState, RecurrentWeights, SequenceLayout
from lstm_fast.function import lstm_projected

DEVICE = device_of_tests()
DTYPES = [torch.float64, torch.float32]

# (id, constructor kwargs, T, B)
CONFIGS = [
    ("plain", dict(input_size=5, hidden_size=7), 4, 3),
    ("batch_first", dict(input_size=5, hidden_size=7, batch_first=True), 4, 3),
    ("stacked_bidir", dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True), 3, 2),
    ("proj", dict(input_size=5, hidden_size=8, proj_size=3), 4, 3),
    ("proj_stacked_bidir_bf", dict(input_size=5, hidden_size=6, proj_size=2, num_layers=2,
                                   bidirectional=True, batch_first=True), 3, 2),
    ("no_bias", dict(input_size=5, hidden_size=7, bias=False), 3, 2),
    ("T1", dict(input_size=5, hidden_size=7), 1, 3),
    ("B1", dict(input_size=5, hidden_size=7), 4, 1),
    ("H1", dict(input_size=3, hidden_size=1), 4, 2),
    ("H33", dict(input_size=4, hidden_size=33), 3, 2),
    ("dropout_eval", dict(input_size=3, hidden_size=5, num_layers=3, dropout=0.5), 3, 2),
]


def _sizes(kwargs):
    L = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    return L, kwargs.get("proj_size") or kwargs["hidden_size"], kwargs["hidden_size"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("name,kwargs,T,B", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_batched(backend, name, kwargs, T, B, dtype, with_state):
    L, P, H = _sizes(kwargs)
    require(backend, DEVICE, dtype, T=T, B=B, H=H, P=P)
    torch.manual_seed(0)
    # Train mode, so that on a GPU the reference is cuDNN, whose backward refuses eval
    # mode; the dropout config needs eval mode, and there torch's own CUDA loop runs.
    eval_mode = kwargs.get("dropout", 0) > 0
    ref = torch.nn.LSTM(**kwargs, device=DEVICE, dtype=dtype).train(not eval_mode)
    ours = from_torch(ref, backend).train(not eval_mode)

    def build():
        shape = (B, T, kwargs["input_size"]) if kwargs.get("batch_first") else (T, B, kwargs["input_size"])
        leaves = {"input": torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)}
        hx = None
        if with_state:
            leaves["h0"] = torch.randn(L, B, P, device=DEVICE, dtype=dtype, requires_grad=True)
            leaves["c0"] = torch.randn(L, B, H, device=DEVICE, dtype=dtype, requires_grad=True)
            hx = (leaves["h0"], leaves["c0"])
        return leaves["input"], hx, leaves

    with torch.backends.cudnn.flags(enabled=not eval_mode):
        check_against(ref, ours, build, dtype, f"{backend}/{name}")


# (T, B, H, P, batch_sizes, reverse) of one layer with I=16; the GPU quick run (-m gpu:
# cuda and triton against cuDNN) takes the first four, the odd sizes run in the full one
LOW_PRECISION_LAYOUTS = [
    pytest.param(12, 5, 32, 32, None, False, id="noproj", marks=pytest.mark.gpu),
    pytest.param(12, 5, 32, 24, None, False, id="proj", marks=pytest.mark.gpu),
    pytest.param(12, 5, 32, 32, (5, 5, 5, 4, 4, 4, 3, 3, 2, 2, 1, 1), False, id="packed", marks=pytest.mark.gpu),
    pytest.param(12, 5, 32, 24, None, True, id="proj_reverse", marks=pytest.mark.gpu),
    pytest.param(12, 5, 32, 24, (5, 5, 5, 4, 4, 4, 3, 3, 2, 2, 1, 1), True, id="proj_packed_reverse"),
    pytest.param(1, 5, 33, 17, (5,), False, id="T1_H33_proj_packed"),
    pytest.param(6, 1, 33, 17, None, True, id="B1_H33_proj_reverse"),
    pytest.param(6, 3, 1, 1, None, True, id="H1_reverse"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("T,B,H,P,batch_sizes,reverse", LOW_PRECISION_LAYOUTS)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_error_within_2x_torch(backend, T, B, H, P, batch_sizes, reverse, dtype):
    """float32 and 16-bit input, one layer-direction: every output and gradient no further
    from a float64 reference than twice torch's own LSTM kernel in that dtype on this device."""
    bs = None if batch_sizes is None else torch.tensor(batch_sizes)
    require(backend, DEVICE, dtype, T=T, B=B, H=H, P=P, packed=bs is not None, reverse=reverse)
    errors = layer_errors_vs_fp64(backend, DEVICE, dtype, T=T, B=B, I=16, H=H, P=P, batch_sizes=bs, reverse=reverse)
    assert_within_2x_torch(errors, dtype)


UNBATCHED = [c for c in CONFIGS if c[0] in ("plain", "batch_first", "proj_stacked_bidir_bf")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,kwargs,T,B", UNBATCHED, ids=[c[0] for c in UNBATCHED])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_unbatched(backend, name, kwargs, T, B, dtype):
    L, P, H = _sizes(kwargs)
    require(backend, DEVICE, dtype, T=T, B=1, H=H, P=P)
    torch.manual_seed(1)
    ref = torch.nn.LSTM(**kwargs, device=DEVICE, dtype=dtype)
    ours = from_torch(ref, backend)

    def build():
        leaves = {"input": torch.randn(T, kwargs["input_size"], device=DEVICE, dtype=dtype, requires_grad=True),
                  "h0": torch.randn(L, P, device=DEVICE, dtype=dtype, requires_grad=True),
                  "c0": torch.randn(L, H, device=DEVICE, dtype=dtype, requires_grad=True)}
        return leaves["input"], (leaves["h0"], leaves["c0"]), leaves

    check_against(ref, ours, build, dtype, f"{backend}/unbatched/{name}")


PACKED = [
    ("plain", dict(input_size=5, hidden_size=7)),
    ("proj_stacked_bidir", dict(input_size=4, hidden_size=6, proj_size=3, num_layers=2, bidirectional=True)),
    ("bidir_batch_first", dict(input_size=4, hidden_size=5, bidirectional=True, batch_first=True)),
]


# (order, with_state): sorted input skips the permutation of the states either way
PACKED_ORDERS = [("unsorted", True), ("unsorted", False), ("sorted", True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order,with_state", PACKED_ORDERS, ids=["unsorted-hx", "unsorted-no_hx", "sorted-hx"])
@pytest.mark.parametrize("name,kwargs", PACKED, ids=[c[0] for c in PACKED])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_packed(backend, name, kwargs, order, with_state, dtype):
    """pack_sequence with enforce_sorted=False (the module permutes the states by
    sorted_indices and back) and with sequences already sorted by length (no permutation)."""
    L, P, H = _sizes(kwargs)
    lengths = [3, 5, 1, 5, 2]  # with ties and a length-1 sequence
    if order == "sorted":
        lengths.sort(reverse=True)
    require(backend, DEVICE, dtype, T=max(lengths), B=len(lengths), H=H, P=P, packed=True)
    torch.manual_seed(2)
    ref = torch.nn.LSTM(**kwargs, device=DEVICE, dtype=dtype)
    ours = from_torch(ref, backend)

    def build():
        leaves = {f"seq{i}": torch.randn(n, kwargs["input_size"], device=DEVICE, dtype=dtype, requires_grad=True)
                  for i, n in enumerate(lengths)}
        packed = pack_sequence(list(leaves.values()), enforce_sorted=order == "sorted")
        hx = None
        if with_state:
            leaves["h0"] = torch.randn(L, len(lengths), P, device=DEVICE, dtype=dtype, requires_grad=True)
            leaves["c0"] = torch.randn(L, len(lengths), H, device=DEVICE, dtype=dtype, requires_grad=True)
            hx = (leaves["h0"], leaves["c0"])
        return packed, hx, leaves

    check_against(ref, ours, build, dtype, f"{backend}/packed/{name}/{order}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_frozen_input_and_parameters(backend, dtype):
    """An input that needs no gradient and frozen parameters (fine-tuning): the others get
    torch.nn.LSTM's gradients. Layer 0 then asks for no projection gradient at all, layer
    1 for d_x and the bias's but not W_ih's (backward_projected's `wanted`)."""
    kwargs = dict(input_size=5, hidden_size=7, num_layers=2, proj_size=3)
    L, P, H = _sizes(kwargs)
    T, B = 4, 3
    require(backend, DEVICE, dtype, T=T, B=B, H=H, P=P)
    torch.manual_seed(4)
    ref = torch.nn.LSTM(**kwargs, device=DEVICE, dtype=dtype)
    for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0", "weight_ih_l1", "weight_hr_l1"):
        getattr(ref, name).requires_grad_(False)
    ours = from_torch(ref, backend)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["weight_hh_l0", "weight_hr_l0",
                                                                          "weight_hh_l1", "bias_ih_l1", "bias_hh_l1"]

    def build():
        x = torch.randn(T, B, kwargs["input_size"], device=DEVICE, dtype=dtype)
        leaves = {"h0": torch.randn(L, B, P, device=DEVICE, dtype=dtype, requires_grad=True),
                  "c0": torch.randn(L, B, H, device=DEVICE, dtype=dtype, requires_grad=True)}
        return x, (leaves["h0"], leaves["c0"]), leaves

    check_against(ref, ours, build, dtype, f"{backend}/frozen")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_lstm_cell(backend, dtype):
    import lstm_fast

    require(backend, DEVICE, dtype, T=1, B=3, H=6)
    torch.manual_seed(3)
    ref = torch.nn.LSTMCell(4, 6, device=DEVICE, dtype=dtype)
    ours = lstm_fast.LSTMCell.from_torch(ref, backend=backend)
    x = torch.randn(3, 4, device=DEVICE, dtype=dtype)
    h0, c0 = torch.randn(3, 6, device=DEVICE, dtype=dtype), torch.randn(3, 6, device=DEVICE, dtype=dtype)
    def build():
        leaves = {"input": x.clone().requires_grad_(), "h0": h0.clone().requires_grad_(),
                  "c0": c0.clone().requires_grad_()}
        return leaves["input"], (leaves["h0"], leaves["c0"]), leaves

    check_against(CellAsLSTM(ref), CellAsLSTM(ours), build, dtype, f"{backend}/cell")
    # unbatched cell, no state
    torch.testing.assert_close(ours(x[0]), ref(x[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_nan_and_inf_propagate(backend, dtype):
    """NaN or inf in the input reaches the same outputs as in torch.nn.LSTM (no kernel
    may clamp a NaN into a number)."""
    require(backend, DEVICE, dtype, T=4, B=2, H=16)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 16).to(DEVICE, dtype)
    x = torch.randn(4, 2, 8, device=DEVICE, dtype=dtype)
    x[1, 0, 3] = float("nan")
    x[2, 1, 0] = float("inf")
    with torch.no_grad():
        want, (wh, wc) = ref(x)
        got, (gh, gc) = from_torch(ref, backend)(x)
    for name, a, b in (("output", got, want), ("h_n", gh, wh), ("c_n", gc, wc)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs"
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: inf pattern differs"
        assert_close(a[finite], b[finite], dtype, name)


# ------------------------------------------------------------ one layer-direction

ENTRIES = ["recurrence", "projected"]  # lstm_recurrence on gx [T, B, 4H], lstm_projected on x [T, B, I]

# (id, T, B, I, H, P, batch_sizes, reverse); I is the projecting entry's input size
LAYER_CASES = [
    ("plain", 5, 3, 6, 8, 8, None, False),
    ("reverse", 5, 3, 6, 8, 8, None, True),
    ("packed", 7, 4, 6, 8, 8, (4, 4, 3, 3, 2, 1, 1), False),
    ("packed_reverse", 7, 4, 6, 8, 8, (4, 4, 3, 3, 2, 1, 1), True),
    ("proj", 6, 3, 10, 8, 5, None, False),
    ("proj_reverse", 6, 3, 6, 8, 5, None, True),
    ("proj_packed", 7, 4, 6, 8, 5, (4, 3, 3, 2, 2, 2, 1), False),
    ("proj_packed_reverse", 7, 4, 6, 8, 5, (4, 3, 3, 2, 2, 2, 1), True),
    ("T1", 1, 3, 6, 8, 8, None, False),
    ("T1_proj_reverse", 1, 3, 6, 8, 5, None, True),
    ("T1_packed_proj_H33", 1, 5, 4, 33, 17, (5,), False),
    ("B1", 5, 1, 6, 8, 8, None, False),
    ("H1_reverse", 5, 3, 3, 1, 1, None, True),
    ("H33_packed", 5, 5, 4, 33, 33, (5, 4, 4, 2, 1), False),
    ("H33_proj_reverse", 5, 4, 4, 33, 17, None, True),
    ("B17", 2, 17, 3, 5, 5, None, False),  # more rows than one 16-row tile
    # rows past batch_sizes[0] (packed input never has them; the functional entries allow
    # them): they keep their state, whose gradients pass straight through
    ("rows_past_batch_sizes", 3, 5, 4, 6, 4, (3, 3, 1), False),
    ("rows_past_batch_sizes_reverse", 3, 5, 4, 6, 4, (3, 3, 1), True),
    ("T1_rows_past_batch_sizes", 1, 5, 4, 8, 5, (2,), False),
]
CASE_IDS = [c[0] for c in LAYER_CASES]


def _layer_case(backend, case, entry, dtype):
    """Skip where the backend refuses the case; else (leaves, batch_sizes, reverse)."""
    _, T, B, I, H, P, batch_sizes, reverse = case
    require(backend, DEVICE, dtype, T=T, B=B, H=H, P=P, packed=batch_sizes is not None, reverse=reverse)
    leaves = layer_inputs(T, B, H, P, dtype, DEVICE, I=I if entry == "projected" else None, batch_sizes=batch_sizes)
    return leaves, None if batch_sizes is None else torch.tensor(batch_sizes), reverse


# the GPU quick run (-m gpu) takes float64 through lstm_recurrence: the backend's own
# kernels (cuda and triton project with the base class's GEMM), compared tightly
ENTRY_DTYPES = [pytest.param(e, d, id=f"{e}-{d}", marks=pytest.mark.gpu if (e, d) == ("recurrence", torch.float64)
                             else ()) for e in ENTRIES for d in DTYPES]


@pytest.mark.parametrize("entry,dtype", ENTRY_DTYPES)
@pytest.mark.parametrize("case", LAYER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_layer_matches_torch_and_reference(backend, case, entry, dtype):
    """One layer-direction: outputs and every gradient (gx or x, h0, c0, each weight and
    bias) against torch's LSTM kernel and against the reference backend; packed cases in
    PackedSequence's layout, both directions."""
    leaves, batch_sizes, reverse = _layer_case(backend, case, entry, dtype)
    ours = run_layer(backend, leaves, batch_sizes, reverse)
    for oracle in (TORCH, "reference"):
        if oracle != backend:
            want = run_layer(oracle, leaves, batch_sizes, reverse)
            assert_results_close(ours, want, dtype, f"{backend}/{case[0]}/{entry} vs {oracle}")


# The backends that compute 16-bit input in float32 (the others keep 16 bits; for them
# test_error_within_2x_torch is the precision check)
WIDENING = [n for n in BACKEND_NAMES if get_backend(n).widens_16bit]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", [c for c in LAYER_CASES if c[1] > 1], ids=[c[0] for c in LAYER_CASES if c[1] > 1])
@pytest.mark.parametrize("backend", WIDENING)
def test_16bit_is_the_float32_result_rounded(backend, case, entry, dtype):
    """16-bit input on a backend that widens it: every output and gradient is the float32
    computation on the widened inputs rounded once to the input dtype, so within one unit
    in the last place (TOL[dtype]) of the reference's float32 result."""
    leaves, batch_sizes, reverse = _layer_case(backend, case, entry, dtype)
    ours = run_layer(backend, leaves, batch_sizes, reverse)
    want = run_layer("reference", widened(leaves), batch_sizes, reverse, upstream_dtype=dtype)
    for name, w in want.items():
        assert ours[name].dtype == dtype, name
        assert_close(ours[name].float(), w, dtype, f"{backend}/{case[0]}/{entry} {name}")


# (id, T, B, I, H, P, batch_sizes, reverse), small: gradcheck perturbs every input element
GRADCHECK_CASES = [
    ("plain", 3, 2, 2, 3, 3, None, False),
    ("proj_reverse", 3, 2, 2, 3, 2, None, True),
    ("proj_packed", 4, 3, 2, 3, 2, (3, 2, 2, 1), False),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradcheck_layer(backend, case, entry):
    """First derivatives of one layer-direction against finite differences in float64:
    central differences with eps 1e-6 are good to ~1e-10 here, atol 1e-7 and rtol 1e-5
    leave 10^3 headroom. Interpreted kernels take gradcheck's fast mode (one random
    direction instead of every input element)."""
    leaves, batch_sizes, reverse = _layer_case(backend, case, entry, torch.float64)
    names = list(leaves)

    def layer(*args):
        return call_layer(backend, dict(zip(names, args)), batch_sizes, reverse)

    assert torch.autograd.gradcheck(layer, tuple(leaves.values()), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=backend in INTERPRETED)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in LAYER_CASES if c[0] in ("plain", "packed", "proj_reverse")],
                         ids=["plain", "packed", "proj_reverse"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_forward_without_grad_saves_nothing(backend, case, dtype):
    """The backend's forward and forward_projected with need_grad=False save nothing; with
    it they save exactly (gates, cells); the outputs are the same either way, and the
    reference's."""
    b = get_backend(backend)
    for entry in ENTRIES:
        leaves, bs, reverse = _layer_case(backend, case, entry, dtype)
        t = {k: v.detach() for k, v in leaves.items()}
        state, weights = LSTMState(t["h0"], t["c0"]), RecurrentWeights(t["w_hh"], t.get("w_hr"))
        layout = SequenceLayout(bs, reverse)
        results = {}
        for need_grad in (False, True):
            if entry == "recurrence":
                results[need_grad] = b.forward(t["gx"], state, weights, layout, need_grad)
            else:
                projection = InputProjection(t["w_ih"], t["b_ih"] + t["b_hh"])
                results[need_grad] = b.forward_projected(t["x"], projection, state, weights, layout, need_grad)
        assert results[False][3] == (), entry
        saved = results[True][3]
        assert isinstance(saved, tuple) and len(saved) == 2 and all(isinstance(s, torch.Tensor) for s in saved)
        with torch.no_grad():
            want = call_layer("reference", t, bs, reverse)
        for name, lean, full, w in zip(("y", "h_n", "c_n"), results[False][:3], results[True][:3], want):
            assert_close(lean, full, dtype, f"{backend}/{entry} {name} without vs with grad")
            assert_close(lean, w, dtype, f"{backend}/{entry} {name} vs reference")


SECOND_ORDER_CONFIGS = [
    ("plain", dict(input_size=3, hidden_size=5), False),
    ("proj_bidir_stacked", dict(input_size=3, hidden_size=4, proj_size=2, num_layers=2, bidirectional=True), False),
    ("packed", dict(input_size=3, hidden_size=5), True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,kwargs,packed", SECOND_ORDER_CONFIGS, ids=[c[0] for c in SECOND_ORDER_CONFIGS])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_second_order_gradient_penalty(backend, name, kwargs, packed):
    """A gradient penalty (create_graph=True, then backward through the gradient)
    gives torch.nn.LSTM's second-order gradients for the input, both states and
    every parameter; the first-order gradient taken with create_graph matches too."""
    dtype = torch.float64
    L, P, H = _sizes(kwargs)
    require(backend, DEVICE, dtype, T=4, B=3, H=H, P=P, packed=packed)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(**kwargs, device=DEVICE, dtype=dtype)
    ours = from_torch(ref, backend)
    x0 = torch.randn(4, 3, kwargs["input_size"], device=DEVICE, dtype=dtype)
    s0 = (torch.randn(L, 3, P, device=DEVICE, dtype=dtype), torch.randn(L, 3, H, device=DEVICE, dtype=dtype))
    results = []
    for module in (ref, ours):
        # cuDNN's LSTM has no double backward; torch's own loop on CUDA has
        with torch.backends.cudnn.flags(enabled=False):
            x, h0, c0 = (t.clone().requires_grad_(True) for t in (x0, *s0))
            inp = pack_sequence([x[:4, 0], x[:3, 1], x[:2, 2]]) if packed else x
            out, (h_n, c_n) = module(inp, (h0, c0))
            out = out.data if packed else out
            loss = out.pow(2).sum() + h_n.pow(3).sum() + c_n.sin().sum()
            g_x, g_h0 = torch.autograd.grad(loss, (x, h0), create_graph=True)
            penalty = g_x.pow(2).sum() + (g_h0 * g_x.sum()).sum()
            wrt = [x, h0, c0, *module.parameters()]
            results.append((g_x.detach(), torch.autograd.grad(penalty, wrt, allow_unused=True)))
    (g_ref, second_ref), (g_ours, second_ours) = results
    assert_close(g_ours, g_ref, dtype, "d_x with create_graph")
    names = ["x", "h0", "c0"] + [n for n, _ in ref.named_parameters()]
    for n, a, b in zip(names, second_ours, second_ref):
        assert (a is None) == (b is None), f"{n}: second-order gradient presence differs"
        if b is not None:
            assert_close(a, b, dtype, f"second-order grad {n}")


@pytest.mark.parametrize("entry", ["projected", "recurrence"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradgradcheck_layer(backend, entry):
    """Second derivatives of one layer with projection, reverse direction, also with
    respect to the upstream gradients, against finite differences (float64); through
    the layer input (lstm_projected) and through a precomputed gx (lstm_recurrence).
    Interpreted kernels take the fast mode, as in test_gradcheck_layer: each of the
    full mode's hundreds of perturbed backward passes runs them in the interpreter,
    while the second derivatives themselves come from the reference's recomputation
    for every backend (function._double_backward)."""
    dtype = torch.float64
    require(backend, DEVICE, dtype, T=3, B=2, H=3, P=2)
    torch.manual_seed(0)
    T, B, I, H, P = 3, 2, 2, 3, 2

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)

    if entry == "projected":
        args = [randn(*s) for s in ((T, B, I), (B, P), (B, H), (4 * H, I), (4 * H, P), (4 * H,), (4 * H,), (P, H))]

        def layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
            return lstm_projected(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse=True, backend=backend)
    else:
        args = [randn(*s) for s in ((T, B, 4 * H), (B, P), (B, H), (4 * H, P), (P, H))]

        def layer(gx, h0, c0, w_hh, w_hr):
            return lstm_fast.lstm_recurrence(gx, h0, c0, w_hh, w_hr, reverse=True, backend=backend)

    assert torch.autograd.gradgradcheck(layer, args, fast_mode=backend in INTERPRETED)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_empty_batch(backend):
    """B = 0 gives torch.nn.LSTM's empty outputs and zero weight gradients."""
    dtype = torch.float32
    require(backend, DEVICE, dtype, T=3, B=1, H=4)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=2).to(DEVICE, dtype)
    ours = from_torch(ref, backend)
    x = torch.randn(3, 0, 3, device=DEVICE, dtype=dtype, requires_grad=True)
    want, (wh, wc) = ref(x)
    got, (gh, gc) = ours(x)
    assert got.shape == want.shape and gh.shape == wh.shape and gc.shape == wc.shape
    (got.sum() + gh.sum() + gc.sum()).backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("P", [4, 2], ids=["noproj", "proj"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_empty_sequence_functional(backend, P, entry):
    """T = 0 through the functional entries (nn.LSTM refuses it; lstm_recurrence and
    lstm_projected allow it): the states pass through, their gradients reach h0 and c0,
    every other input gets none or zeros."""
    dtype = torch.float32
    require(backend, DEVICE, dtype, T=1, B=2, H=4, P=P)
    leaves = layer_inputs(0, 2, 4, P, dtype, DEVICE, I=3 if entry == "projected" else None)
    h0, c0 = leaves["h0"], leaves["c0"]
    y, h, c = call_layer(backend, leaves)
    assert y.shape == (0, 2, P) and torch.equal(h, h0) and torch.equal(c, c0)
    grads = torch.autograd.grad(h.sum() + 2 * c.sum(), list(leaves.values()), allow_unused=True)
    grads = dict(zip(leaves, grads))
    assert torch.equal(grads.pop("h0"), torch.ones_like(h0)) and torch.equal(grads.pop("c0"), 2 * torch.ones_like(c0))
    for name, g in grads.items():
        assert g is None or torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_saturated_gates_match_torch(backend):
    """Pre-activations far past saturation (and inf) give torch.nn.LSTM's values: gates
    at exactly 0 or 1, zero derivatives (NaN where torch has 0 * inf)."""
    dtype = torch.float32
    require(backend, DEVICE, dtype, T=1, B=2, H=1)
    ref = torch.nn.LSTM(1, 1).to(DEVICE, dtype)
    with torch.no_grad():
        ref.weight_ih_l0.fill_(1.0)
        ref.weight_hh_l0.zero_()
        ref.bias_ih_l0.zero_()
        ref.bias_hh_l0.zero_()
    ours = from_torch(ref, backend)
    results = []
    for module in (ref, ours):
        x = torch.tensor([[[20.0], [float("inf")]]], device=DEVICE, dtype=dtype, requires_grad=True)
        _, (h, c) = module(x)
        (h.sum() + c.sum()).backward()
        results.append([h.detach(), c.detach(), x.grad, module.weight_ih_l0.grad])
    for name, got, want in zip(("h_n", "c_n", "d_x", "d_w_ih"), results[1], results[0]):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern {got} vs {want}"
        finite = ~torch.isnan(want)
        if name == "h_n":  # o * tanh(c) = tanh(1): not saturated, equal to rounding only
            assert_close(got[finite], want[finite], dtype, name)
        else:  # exact 1, 0 from saturation
            assert torch.equal(got[finite], want[finite]), f"{name}: {got} vs {want}"


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_cpu_autocast_runs_in_the_weights_dtype(backend):
    """Under CPU autocast the LSTM is not a lower-precision op: every backend computes in
    the weights' dtype, whatever dtype the input arrives in (an autocast layer before it
    hands over bfloat16), and returns that dtype."""
    if DEVICE.type != "cpu":
        pytest.skip("CPU autocast")
    dtype = torch.float32
    require(backend, DEVICE, dtype, T=3, B=2, H=6)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 6, num_layers=2)
    ours = from_torch(ref, backend)
    cell = lstm_fast.LSTMCell.from_torch(torch.nn.LSTMCell(4, 6), backend=backend)
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        want, (wh, wc) = ours(x.bfloat16().float())
        want_cell = cell(x[0].bfloat16().float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for given in (x.bfloat16().float(), x.bfloat16()):
                got, (gh, gc) = ours(given)
                for name, a, b in (("output", got, want), ("h_n", gh, wh), ("c_n", gc, wc)):
                    assert a.dtype == torch.float32, name
                    assert_close(a, b, dtype, name)
                got_cell = cell(given[0])
                for a, b in zip(got_cell, want_cell):
                    assert a.dtype == torch.float32
                    assert_close(a, b, dtype, "LSTMCell")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_autocast_matches_torch(backend):
    """Under CUDA autocast torch runs its LSTM in float16 (input, states and weights cast);
    so do we: same output dtypes, values within float16 rounding of torch's."""
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA device")
    require(backend, DEVICE, torch.float16, T=5, B=4, H=32)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(16, 32, num_layers=2).to(DEVICE)
    ours = from_torch(ref, backend)
    x = torch.randn(5, 4, 16, device=DEVICE)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        want, (wh, wc) = ref(x)
        got, (gh, gc) = ours(x)
    for name, a, b in (("output", got, want), ("h_n", gh, wh), ("c_n", gc, wc)):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        # float16 eps is 9.8e-4; two implementations differ by a few ulps per step and
        # layer, so 2e-2 bounds them on |values| < 1 over 5 steps and 2 layers
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)
