"""Shared pieces of the test suite: which backends run here and how to compare."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import lstm_fast
from lstm_fast.backends import BACKEND_NAMES, get_backend  # noqa: F401 (re-exported for tests)
from lstm_fast.backends.base import LayerSizes

# Tolerances. float64: both sides agree to rounding (~1e-16) amplified by the
# recurrence and the T*B-term sums of the weight gradients; 1e-9 leaves 10^6
# headroom. float32: eps 1.2e-7 per op, amplified the same way over the short
# sequences used here; independent fp32 implementations land within ~1e-6.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
}


def device_of_tests():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def require(backend, device, dtype, T=4, B=3, H=7, P=None, packed=False):
    """Skip (with the backend's own reason) when it cannot run this case."""
    b = get_backend(backend)
    ok, why = b.is_available()
    if not ok and device.type == "cuda" and backend in ("cuda", "triton"):
        pytest.fail(f"a GPU is visible but the {backend} backend is not usable: {why}")  # not a silent skip
    if not ok:
        pytest.skip(f"{backend} unavailable: {why}")
    ok, why = b.supports(device, dtype, LayerSizes(T=T, B=B, H=H, P=P or H, packed=packed))
    if not ok:
        pytest.skip(f"{backend} does not support {device.type} {dtype}: {why}")


def assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _data(out):
    return out.data if isinstance(out, PackedSequence) else out


def check_against(ref, ours, build, dtype, label):
    """Compare two LSTM-like modules on outputs, final states and every gradient.

    build() -> (input, hx or None, {name: leaf tensor}); it is called once per
    module under the same seed, so both get equal but independent leaves.
    Upstream gradients are random on the output and on both final states.
    """
    runs = []
    for module in (ref, ours):
        torch.manual_seed(99)
        inp, hx, leaves = build()
        out, (h, c) = module(inp) if hx is None else module(inp, hx)
        runs.append((module, _data(out), h, c, leaves))
    (_, out_r, h_r, c_r, _), (_, out_o, h_o, c_o, _) = runs
    assert type(out_r) is type(out_o)
    assert_close(out_o, out_r, dtype, f"{label} output")
    assert_close(h_o, h_r, dtype, f"{label} h_n")
    assert_close(c_o, c_r, dtype, f"{label} c_n")

    torch.manual_seed(7)
    upstream = (torch.randn_like(out_r), torch.randn_like(h_r), torch.randn_like(c_r))
    grads = []
    for module, out, h, c, leaves in runs:
        loss = sum((t * g).sum() for t, g in zip((out, h, c), upstream))
        wrt = list(leaves.values()) + list(module.parameters())
        grads.append(torch.autograd.grad(loss, wrt))
    names = list(runs[0][4]) + [n for n, _ in ref.named_parameters()]
    assert len(names) == len(grads[0]) == len(grads[1])
    for name, g_o, g_r in zip(names, grads[1], grads[0]):
        assert_close(g_o, g_r, dtype, f"{label} grad {name}")


class CellAsLSTM(torch.nn.Module):
    """Presents a cell as (output, (h, c)) so check_against can compare it."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, inp, hx):
        h, c = self.cell(inp, hx)
        return h * 1.0, (h, c)


def from_torch(ref, backend):
    return lstm_fast.LSTM.from_torch(ref, backend=backend)
