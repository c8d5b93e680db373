"""torch.export, torch.jit.trace and torch.jit.script of models holding lstm_fast
modules, with every backend that runs on CPU tensors here (triton through the
Triton interpreter, which conftest.py turns on): recorded with static and dynamic
batch and sequence sizes, run on new sizes, differentiated (gradients equal to
eager), saved, and loaded in a fresh process that only imports lstm_fast.

Each backend's recurrence is recorded as the op lstm_fast::recurrence_forward, whose
fake kernel gives the shapes and whose registered derivative runs the backend's
fused backward.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import lstm_fast
from helpers import TOL, assert_close, require

# triton: the fresh processes inherit TRITON_INTERPRET=1 from conftest.py
CPU_BACKENDS = ["cpp", "numba", "reference", "triton"]
DTYPE = torch.float32
LSTM_KWARGS = dict(input_size=5, hidden_size=6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)


class Tagger(torch.nn.Module):
    def __init__(self, backend, **kwargs):
        super().__init__()
        self.lstm = lstm_fast.LSTM(**kwargs, backend=backend)
        width = (kwargs.get("proj_size") or kwargs["hidden_size"]) * (2 if kwargs.get("bidirectional") else 1)
        self.cell = lstm_fast.LSTMCell(width, 4, backend=backend)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        h2, _ = self.cell(y[:, -1])
        return self.head(h2), h, c


def _model(backend, seed=0):
    require(backend, "cpu", DTYPE, T=4, B=3, H=6, P=3)
    torch.manual_seed(seed)
    return Tagger(backend, **LSTM_KWARGS)


def _loss(outputs):
    torch.manual_seed(11)
    return sum((o * torch.randn_like(o)).sum() for o in outputs)


def _check_same(recorded, model, x, label):
    """Outputs and every parameter's gradient of the recorded module equal the eager model's."""
    expected = model(x)
    got = recorded(x)
    for a, b in zip(got, expected):
        assert_close(a, b, DTYPE, f"{label} output")
    eager = torch.autograd.grad(_loss(expected), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    params = dict(recorded.named_parameters())
    grads = torch.autograd.grad(_loss(got), [params[n] for n in names])
    for name, a, b in zip(names, grads, eager):
        assert_close(a, b, DTYPE, f"{label} grad {name}")


def _ops_in(graph):
    return {str(n.target) for n in graph.nodes if "lstm_fast" in str(n.target)}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_export_runs_and_differentiates(backend, dynamic):
    model = _model(backend)
    shapes = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("time")}} if dynamic else None
    ep = torch.export.export(model, (torch.randn(3, 4, 5),), dynamic_shapes=shapes)
    assert _ops_in(ep.graph) == {"lstm_fast.recurrence_forward.default"}
    sizes = ((2, 7), (1, 1), (3, 4)) if dynamic else ((3, 4),)
    for B, T in sizes:
        _check_same(ep.module(), model, torch.randn(B, T, 5), f"{backend} export B={B} T={T}")


@pytest.mark.parametrize("need_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("packed,reverse", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["padded", "reverse", "packed", "packed_reverse"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_graph_op_fake_kernel_describes_the_backend(backend, packed, reverse, need_grad):
    """The op's fake kernel gives exactly the shapes, strides and dtypes the backend returns,
    the saved gates and cells included ([N, *] rows when packed): a recorded graph plans its
    buffers from them. (opcheck's aot_dispatch tests trace the backward with fake tensors, which
    only backends of torch ops could follow; compiled backward is covered above and in
    test_torch_compile.py.)"""
    T, B, H, I = 3, 3, 5, 4
    require(backend, "cpu", DTYPE, T=T, B=B, H=H, packed=packed, reverse=reverse)
    bs = torch.tensor([3, 2, 1]) if packed else None
    g = torch.Generator().manual_seed(6)

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(need_grad)

    x = r(6, I) if packed else r(T, B, I)
    args = (x, r(4 * H, I), r(4 * H), r(4 * H), r(B, H), r(B, H), r(4 * H, H), None, bs, reverse, backend, True,
            need_grad)
    torch.library.opcheck(torch.ops.lstm_fast.recurrence_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _fresh_process(code):
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]


_CHECK_LOADED = """
import torch, lstm_fast
model = {load}
x = torch.load({x!r})
expected = torch.load({expected!r})
outputs = model(x)
for a, b in zip(outputs, expected):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
expected_grads = torch.load({grads!r})
params = dict(model.named_parameters())
grads = torch.autograd.grad(sum(o.sum() for o in outputs), [params[n] for n in expected_grads])
for g, want in zip(grads, expected_grads.values()):
    torch.testing.assert_close(g, want, rtol=2e-5, atol=2e-5)
print("ok")
"""


def _save_expected(tmp_path, model, x):
    """x, the eager outputs and the eager gradients of their sum, for the fresh process."""
    torch.save(x, tmp_path / "x.pt")
    outputs = model(x)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(sum(o.sum() for o in outputs), [model.get_parameter(n) for n in names])
    torch.save([o.detach() for o in outputs], tmp_path / "expected.pt")
    torch.save(dict(zip(names, grads)), tmp_path / "grads.pt")
    return {name: str(tmp_path / f"{name}.pt") for name in ("x", "expected", "grads")}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_saved_exported_program_loads_in_a_fresh_process(backend, tmp_path):
    model = _model(backend, seed=1)
    shapes = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("time")}}
    ep = torch.export.export(model, (torch.randn(3, 4, 5),), dynamic_shapes=shapes)
    torch.export.save(ep, tmp_path / "model.pt2")
    files = _save_expected(tmp_path, model, torch.randn(2, 6, 5))
    _fresh_process(_CHECK_LOADED.format(load=f"torch.export.load({str(tmp_path / 'model.pt2')!r}).module()",
                                        **files))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_traced_model_trains_saves_and_loads(backend, tmp_path):
    model = _model(backend, seed=2)
    traced = torch.jit.trace(model, (torch.randn(3, 4, 5),))
    assert "lstm_fast::recurrence_forward" in str(traced.lstm.graph)
    _check_same(traced, model, torch.randn(3, 4, 5), f"{backend} jit.trace")
    torch.jit.save(traced, tmp_path / "model.ts")
    files = _save_expected(tmp_path, model, torch.randn(3, 4, 5))  # a trace keeps the traced T
    _fresh_process(_CHECK_LOADED.format(load=f"torch.jit.load({str(tmp_path / 'model.ts')!r})", **files))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scripted_model_trains_saves_and_loads(backend, tmp_path):
    model = _model(backend, seed=3)
    scripted = torch.jit.script(model)
    assert "lstm_fast.recurrence_forward" in scripted.lstm.code
    for B, T in ((3, 4), (1, 7)):
        _check_same(scripted, model, torch.randn(B, T, 5), f"{backend} jit.script B={B} T={T}")
    assert scripted.state_dict().keys() == model.state_dict().keys()
    torch.jit.save(scripted, tmp_path / "model.ts")
    files = _save_expected(tmp_path, model, torch.randn(2, 9, 5))
    _fresh_process(_CHECK_LOADED.format(load=f"torch.jit.load({str(tmp_path / 'model.ts')!r})", **files))


def test_scripted_modules_take_unbatched_input_and_no_state():
    require("cpp", "cpu", DTYPE, T=4, B=1, H=6, P=3)
    torch.manual_seed(4)
    lstm, cell = lstm_fast.LSTM(5, 6, proj_size=3), lstm_fast.LSTMCell(5, 6)
    for module, x in ((lstm, torch.randn(4, 5)), (cell, torch.randn(5))):
        scripted = torch.jit.script(module)
        expected, got = module(x), scripted(x)
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
            torch.testing.assert_close(a, b, **TOL[DTYPE])
    with pytest.raises(torch.jit.Error, match="input.size.-1. must be equal to input_size"):  # TorchScript's wrapper
        torch.jit.script(lstm)(torch.randn(4, 2, 7))


def test_import_registers_the_ops_without_building():
    """A fresh `import lstm_fast` has the graph op, the prebuilt library's ops and their
    fake kernels registered, and has compiled nothing (numba is not even imported)."""
    require("cpp", "cpu", DTYPE)
    _fresh_process("""
    import sys, torch, lstm_fast
    from torch._library.simple_registry import singleton
    for name in ("recurrence_forward", "recurrence_backward", "lstm_forward", "lstm_forward_projected",
                 "lstm_backward"):
        qualified = f"lstm_fast::{name}"
        assert any(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
                   for key in ("CPU", "CompositeExplicitAutograd")), name
        assert singleton.find(qualified).fake_impl.kernel is not None, name
    assert "numba" not in sys.modules
    print("ok")
    """)


def test_quantize_dynamic_leaves_lstm_fast_in_float_and_to_torch_quantizes():
    """quantize_dynamic swaps modules by exact type: lstm_fast.LSTM stays a float32
    lstm_fast module; converted with to_torch() first, it becomes torch's quantized LSTM."""
    require("cpp", "cpu", DTYPE)
    quantize = torch.ao.quantization.quantize_dynamic
    model = torch.nn.Sequential(lstm_fast.LSTM(5, 6))
    kept = quantize(model, {torch.nn.LSTM}, dtype=torch.qint8)
    assert type(kept[0]) is lstm_fast.LSTM and kept[0].weight_ih_l0.dtype == torch.float32
    converted = quantize(torch.nn.Sequential(model[0].to_torch()), {torch.nn.LSTM}, dtype=torch.qint8)
    assert type(converted[0]) is torch.ao.nn.quantized.dynamic.LSTM
    x = torch.randn(4, 3, 5)
    # int8 weights: the outputs move by about the weights' quantisation step, not more
    torch.testing.assert_close(converted(x)[0], model(x)[0], atol=0.05, rtol=0)
