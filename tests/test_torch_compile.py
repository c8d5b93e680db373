"""torch.compile, torch.export and torch.jit.trace on models that hold lstm_fast
modules, for every backend.

torch.compile declines nn.LSTM and its subclasses unless
torch._dynamo.config.allow_rnn is set, and runs them eagerly; lstm_fast.LSTM
then runs wholly outside dynamo. LSTMCell, the functional API and LSTM under
allow_rnn are traced: cpp and cuda land in the graph as their own custom ops,
numba, triton and the reference as the op lstm_fast::recurrence_forward (a fake
kernel, a registered derivative), so fullgraph=True works with every backend.
Results must equal torch.nn's, gradients included. torch.jit.trace and
torch.export record the same op.

Most tests compile with the "aot_eager" backend: it runs dynamo and AOTAutograd
(the tracing that meets our code: fake kernels, the autograd.Function) without
Inductor's code generation, which takes tens of seconds per graph on a small
CPU; one test uses Inductor itself.
"""
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import lstm_fast
from helpers import BACKEND_NAMES, CellAsLSTM, check_against, device_of_tests, from_torch, get_backend, require
from lstm_fast.function import _GRAPH_OP_BACKENDS as GRAPH_OP_BACKENDS

DEVICE = device_of_tests()
# Part of the GPU run too (-m gpu): there cuda and triton run on CUDA tensors; here triton
# runs in the Triton interpreter (conftest.py).
pytestmark = pytest.mark.gpu
DTYPE = torch.float32
KWARGS = dict(input_size=5, hidden_size=6, proj_size=2, num_layers=2, bidirectional=True, batch_first=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _lstm_build(B, T):
    def build():
        x = torch.randn(B, T, 5, device=DEVICE, dtype=DTYPE, requires_grad=True)
        h0 = torch.randn(4, B, 2, device=DEVICE, dtype=DTYPE, requires_grad=True)
        c0 = torch.randn(4, B, 6, device=DEVICE, dtype=DTYPE, requires_grad=True)
        return x, (h0, c0), {"input": x, "h0": h0, "c0": c0}
    return build


def _cell_build():
    x = torch.randn(3, 4, device=DEVICE, dtype=DTYPE, requires_grad=True)
    h0 = torch.randn(3, 6, device=DEVICE, dtype=DTYPE, requires_grad=True)
    c0 = torch.randn(3, 6, device=DEVICE, dtype=DTYPE, requires_grad=True)
    return x, (h0, c0), {"input": x, "h0": h0, "c0": c0}


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_compiled_model_runs_the_lstm_eagerly_and_matches(backend):
    require(backend, DEVICE, DTYPE, T=4, B=3, H=6, P=2)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(**KWARGS, device=DEVICE, dtype=DTYPE)
    compiled = torch.compile(from_torch(ref, backend), backend="aot_eager")
    for B, T in ((3, 4), (2, 5), (1, 3)):  # new shapes must not recompile anything of ours
        check_against(ref, compiled, _lstm_build(B, T), DTYPE, f"{backend} compiled B={B} T={T}")
    # Declined like nn.LSTM, and none of the functions its forward calls compiled one
    # by one (they were: 11 graphs for these shapes, then dynamo's recompile limit).
    assert counters["stats"].get("unique_graphs", 0) == 0, dict(counters["stats"])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_traced_cell_matches(backend, monkeypatch):
    require(backend, DEVICE, DTYPE, T=1, B=3, H=6)

    def slow_path(*args):
        raise AssertionError("compiled backward took the create_graph recomputation")

    # first-order training must run the backend's fused backward
    monkeypatch.setattr(lstm_fast.function, "_double_backward", slow_path)
    torch.manual_seed(1)
    ref = torch.nn.LSTMCell(4, 6, device=DEVICE, dtype=DTYPE)
    ours = lstm_fast.LSTMCell.from_torch(ref, backend=backend)
    # Backends of torch ops are traced; the others enter as the op lstm_fast::recurrence_forward.
    fullgraph = backend in GRAPH_OP_BACKENDS or get_backend(backend).traceable
    compiled = torch.compile(CellAsLSTM(ours), backend="aot_eager", fullgraph=fullgraph)
    check_against(CellAsLSTM(ref), compiled, _cell_build, DTYPE, f"{backend} traced cell")
    assert counters["stats"]["unique_graphs"] >= 1  # it was traced, not declined


@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b in GRAPH_OP_BACKENDS])
def test_lstm_in_one_graph_under_allow_rnn(backend):
    require(backend, DEVICE, DTYPE, T=4, B=3, H=6, P=2)
    torch.manual_seed(2)
    ref = torch.nn.LSTM(**KWARGS, device=DEVICE, dtype=DTYPE)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(from_torch(ref, backend), backend="aot_eager", fullgraph=True, dynamic=True)
        # dynamo specialises sizes 0 and 1, and gives equal sizes one symbol: B and T stay
        # clear of 1 and of the fixed sizes (2, 4, 5, 6), so a specialisation would show
        for B, T in ((3, 7), (7, 3), (8, 9)):
            check_against(ref, compiled, _lstm_build(B, T), DTYPE, f"{backend} allow_rnn fullgraph B={B} T={T}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # no recompilation
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b in GRAPH_OP_BACKENDS])
def test_functional_layer_in_one_graph(backend):
    require(backend, DEVICE, DTYPE, T=4, B=3, H=6)
    torch.manual_seed(5)
    ref = torch.nn.LSTM(4, 6, device=DEVICE, dtype=DTYPE)
    weights = [p.detach().clone().requires_grad_() for p in ref.parameters()]

    def layer(x, h0, c0):
        y, (h, c) = lstm_fast.lstm_layer(x, h0, c0, *weights, backend=backend)
        return y.tanh().sum() + h.sum() * c.sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3, 4, device=DEVICE, dtype=DTYPE, requires_grad=True)  # [T, B, I]
    h0 = torch.randn(3, 6, device=DEVICE, dtype=DTYPE, requires_grad=True)
    c0 = torch.randn(3, 6, device=DEVICE, dtype=DTYPE, requires_grad=True)
    got = torch.autograd.grad(compiled(x, h0, c0), [x, h0, c0, *weights])
    y, (h, c) = ref(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    expected = torch.autograd.grad(y.tanh().sum() + h.sum() * c.sum(), [x, h0, c0, *ref.parameters()])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_first_use_inside_a_fullgraph_compile():
    """The first lstm_fast call of a process may be inside torch.compile(fullgraph=True):
    backend objects exist from import and availability is a trace-time constant, so
    no import or lock lands in the trace (a fresh process, so nothing is cached).
    The backend is named: it must be one whose availability costs no kernel build."""
    backend = "cuda" if DEVICE.type == "cuda" else "cpp"
    require(backend, DEVICE, DTYPE, T=1, B=3, H=6)
    code = f"""
import torch, lstm_fast
cell = lstm_fast.LSTMCell(4, 6, backend="{backend}").to("{DEVICE.type}")
f = torch.compile(cell, backend="aot_eager", fullgraph=True)
x = torch.randn(3, 4, device="{DEVICE.type}", requires_grad=True)
h, c = f(x)
h.sum().backward()
ref = torch.nn.LSTMCell(4, 6).to("{DEVICE.type}")
ref.load_state_dict(cell.state_dict())
x2 = x.detach().clone().requires_grad_()
h2, _ = ref(x2)
h2.sum().backward()
torch.testing.assert_close(h, h2, rtol=2e-5, atol=2e-5)
torch.testing.assert_close(x.grad, x2.grad, rtol=2e-5, atol=2e-5)
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_inductor_compiles_a_cell_step_with_the_compiled_op():
    backend = "cuda" if DEVICE.type == "cuda" else "cpp"
    require(backend, DEVICE, DTYPE, T=1, B=3, H=6)
    torch.manual_seed(3)
    ref = torch.nn.LSTMCell(4, 6, device=DEVICE, dtype=DTYPE)
    ours = lstm_fast.LSTMCell.from_torch(ref, backend=backend)

    def step(x, hx):  # a cell plus the pointwise work inductor fuses around it
        h, c = ours(torch.tanh(x), hx)
        return h * 2.0 + 1.0, c

    compiled = torch.compile(step, fullgraph=True)
    x, hx, _ = _cell_build()
    h, c = compiled(x, hx)
    h_ref, c_ref = ref(torch.tanh(x), hx)
    torch.testing.assert_close(h, h_ref * 2.0 + 1.0, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(c, c_ref, rtol=2e-5, atol=2e-5)


class _Head(torch.nn.Module):
    def __init__(self, backend=None):
        super().__init__()
        self.lstm = lstm_fast.LSTM(5, 7, batch_first=True, backend=backend)
        self.fc = torch.nn.Linear(7, 2)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def _record(recorder, model, x):
    if recorder == "jit.trace":
        return torch.jit.trace(model, (x,))
    return torch.export.export(model, (x,)).module()


@pytest.mark.parametrize("recorder", ["jit.trace", "export"])
def test_graph_recorders_record_triton(recorder):
    """triton is recorded as lstm_fast::recurrence_forward: new input values are computed,
    not replayed, and the gradients through the recorded module equal eager ones."""
    require("triton", DEVICE, DTYPE, T=4, B=3, H=7)
    torch.manual_seed(5)
    model = _Head("triton").to(DEVICE)
    graph = _record(recorder, model, torch.randn(3, 4, 5, device=DEVICE))
    assert "recurrence_forward" in (str(graph.inlined_graph) if recorder == "jit.trace" else graph.code)
    x = torch.randn(3, 4, 5, device=DEVICE)
    results = []
    for module in (graph, model):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        params = dict(module.named_parameters())
        grads = torch.autograd.grad((out * out).sum(), [leaf] + [params[n] for n, _ in model.named_parameters()])
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("recorder", ["jit.trace", "export"])
def test_graph_recorders_record_the_automatic_choice(recorder):
    torch.manual_seed(4)
    model = _Head().to(DEVICE)
    graph = _record(recorder, model, torch.randn(3, 4, 5, device=DEVICE))
    x = torch.randn(3, 4, 5, device=DEVICE)  # new values: the graph must compute them, not replay
    torch.testing.assert_close(graph(x), model(x), rtol=2e-5, atol=2e-5)
