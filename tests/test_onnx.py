"""ONNX export of models holding lstm_fast modules, run by onnxruntime on the CPU.

While torch.onnx.export records a model, lstm_fast.LSTM and LSTMCell run torch's own
computation on their (identical) parameters, so the exporters write standard ONNX
operators: an LSTM node per layer, or for proj_size > 0 (ONNX's LSTM has no
projection) with the TorchScript-based exporter a Loop of matmuls and gate math.
"""
import pytest
import torch

import lstm_fast
from lstm_fast import nn as fast_nn

# onnxruntime's CPU kernels and torch's compute the same float32 sums in other
# orders; over these short sequences the difference stays near 1e-7
ATOL = RTOL = 1e-5
SIZES = dict(input_size=5, hidden_size=7)
CONFIGS = {
    "one-layer": dict(),
    "two-layer-bidirectional": dict(num_layers=2, bidirectional=True),
    "projected": dict(proj_size=3),
    "projected-bidirectional": dict(num_layers=2, bidirectional=True, proj_size=3),
}


class Tagger(torch.nn.Module):
    """An LSTM over [B, T, I] and a per-step linear head: the usual deployed shape."""

    def __init__(self, **kwargs):
        super().__init__()
        self.lstm = lstm_fast.LSTM(**SIZES, batch_first=True, **kwargs)
        hidden = kwargs.get("proj_size") or SIZES["hidden_size"]
        self.head = torch.nn.Linear(hidden * (2 if kwargs.get("bidirectional") else 1), 2)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return self.head(y), h, c


class CellStep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = lstm_fast.LSTMCell(**SIZES)

    def forward(self, x, h, c):
        return self.cell(x, (h, c))


@pytest.mark.parametrize("config", [name for name, kwargs in CONFIGS.items() if kwargs.get("proj_size")])
def test_projected_decomposition_equals_torch(config):
    """The loop the TorchScript-based exporter records for projected layers, run
    eagerly, gives torch.nn.LSTM's outputs (this needs no ONNX packages)."""
    torch.manual_seed(0)
    model = Tagger(**CONFIGS[config]).eval()
    x = torch.randn(3, 6, 5)
    h0 = torch.randn(model.lstm.num_layers * (2 if model.lstm.bidirectional else 1), 3,
                     model.lstm.proj_size or 7)
    c0 = torch.randn(h0.shape[0], 3, 7)
    ours = model.lstm._forward(x, (h0, c0), run_layer=fast_nn._onnx_projected_layer)
    expected = model.lstm.to_torch()(x, (h0, c0))
    for a, b in zip((ours[0], *ours[1]), (expected[0], *expected[1])):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------ with onnx and onnxruntime


def _onnx_packages():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    return onnx, ort


def _export(model, args, path, exporter, names, dynamic):
    """dynamic: {input name: {axis: axis name}}."""
    if exporter == "torchscript":
        torch.onnx.export(model, args, path, dynamo=False, input_names=names,
                          dynamic_axes=dynamic)
    else:
        pytest.importorskip("onnxscript")
        shapes = {name: {axis: torch.export.Dim.DYNAMIC for axis in dynamic.get(name, {})} for name in names}
        torch.onnx.export(model, args, path, dynamo=True, input_names=names, dynamic_shapes=shapes)


def _run(ort, path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, feeds)})


def _standard_ops(onnx, path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), \
        sorted({(n.domain, n.op_type) for n in model.graph.node})
    return model.graph.node


EXPORTERS = ["torchscript", "dynamo"]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("config", CONFIGS)
def test_lstm_exports_standard_onnx_that_onnxruntime_runs(config, exporter, tmp_path):
    onnx, ort = _onnx_packages()
    torch.manual_seed(1)
    model = Tagger(**CONFIGS[config]).eval()
    path = tmp_path / "tagger.onnx"
    # The dynamo exporter (torch 2.14) traces lstm_fast's module with the sequence length
    # fixed (it refuses a dynamic time axis); its batch axis is dynamic. The TorchScript-
    # based exporter makes both axes dynamic.
    axes = {0: "batch", 1: "time"} if exporter == "torchscript" else {0: "batch"}
    _export(model, (torch.randn(2, 5, 5),), path, exporter, ["x"], {"x": axes})
    nodes = _standard_ops(onnx, path)
    kinds = [n.op_type for n in nodes]
    if exporter == "torchscript":
        if model.lstm.proj_size:
            assert "LSTM" not in kinds and "Loop" in kinds, kinds
        else:
            lstm_nodes = [n for n in nodes if n.op_type == "LSTM"]
            assert len(lstm_nodes) == model.lstm.num_layers, kinds
            want = b"bidirectional" if model.lstm.bidirectional else b"forward"
            for n in lstm_nodes:
                direction = [a.s for a in n.attribute if a.name == "direction"]
                assert direction == [want] or (want == b"forward" and not direction), direction
    elif model.lstm.proj_size:
        # torch's own dynamo export of a projected nn.LSTM writes an LSTM node onnxruntime
        # rejects (initial_c of the projected size); lstm_fast writes the exact loop, unrolled
        assert "LSTM" not in kinds and "MatMul" in kinds, kinds
    else:
        # the dynamo exporter writes what it writes for torch.nn.LSTM (since torch 2.9, a
        # Loop when shapes are dynamic); ours must export exactly as the torch module
        reference = tmp_path / "torch.onnx"
        torch_model = Tagger(**CONFIGS[config]).eval()
        torch_model.load_state_dict(model.state_dict())
        torch_model.lstm = model.lstm.to_torch()
        _export(torch_model, (torch.randn(2, 5, 5),), reference, exporter, ["x"], {"x": axes})
        assert kinds == [n.op_type for n in _standard_ops(onnx, reference)]
    sizes = ((2, 5), (3, 9), (1, 1)) if exporter == "torchscript" else ((2, 5), (3, 5), (1, 5))
    for B, T in sizes:  # new sizes along the dynamic axes
        x = torch.randn(B, T, 5)
        with torch.no_grad():
            expected = model(x)
        for got, want in zip(_run(ort, path, [x]), expected):
            torch.testing.assert_close(torch.from_numpy(got), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_cell_exports_standard_onnx_that_onnxruntime_runs(exporter, tmp_path):
    onnx, ort = _onnx_packages()
    torch.manual_seed(2)
    model = CellStep().eval()
    path = tmp_path / "cell.onnx"
    args = (torch.randn(2, 5), torch.randn(2, 7), torch.randn(2, 7))
    names = ["x", "h", "c"]
    _export(model, args, path, exporter, names, {n: {0: "batch"} for n in names})
    kinds = {n.op_type for n in _standard_ops(onnx, path)}
    assert {"Sigmoid", "Tanh"} <= kinds, kinds
    for B in (2, 4):
        feeds = (torch.randn(B, 5), torch.randn(B, 7), torch.randn(B, 7))
        with torch.no_grad():
            expected = model(*feeds)
        for got, want in zip(_run(ort, path, feeds), expected):
            torch.testing.assert_close(torch.from_numpy(got), want, atol=ATOL, rtol=RTOL)
