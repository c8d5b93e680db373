"""Shared pieces of the test suite: which backends run here and how to compare."""
import contextlib

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import lstm_fast
from lstm_fast.backends import BACKEND_NAMES, get_backend  # noqa: F401 (re-exported for tests)
from lstm_fast.backends.base import LayerSizes
from lstm_fast.function import lstm_projected

# Tolerances. float64: both sides agree to rounding (~1e-16) amplified by the
# recurrence and the T*B-term sums of the weight gradients; 1e-9 leaves 10^6
# headroom. float32: eps 1.2e-7 per op, amplified the same way over the short
# sequences used here; independent fp32 implementations land within ~1e-6.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
}


@contextlib.contextmanager
def tf32(enabled):
    """TF32 on or off for cuBLAS and cuDNN alike, restored afterwards. torch
    refuses to read the legacy flags once the new fp32_precision API was used;
    then nothing is restored."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        old = (m.allow_tf32, c.allow_tf32)
    except RuntimeError:
        old = None
    m.allow_tf32 = c.allow_tf32 = enabled
    try:
        yield
    finally:
        if old is not None:
            m.allow_tf32, c.allow_tf32 = old


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


# Whole-layer errors against a float64 reference: in a low-precision dtype ours must
# stay within 2x torch.nn.LSTM's own error in that dtype on the same device (cuDNN on
# a GPU, ATen/oneDNN on CPU), plus one unit in the last place, so a lucky, near-exact
# torch value cannot fail the test.
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
ERROR_NAMES = ["y", "h_n", "c_n", "d_x", "d_h0", "d_c0", "d_w_ih", "d_w_hh", "d_b_ih", "d_b_hh", "d_w_hr"]


def layer_errors_vs_fp64(backend, device, dtype, T, B, I, H, P):
    """(ours, torch's) max relative errors per quantity (ERROR_NAMES), one whole layer
    with its input projection, as lstm_fast.LSTM runs it."""
    torch.manual_seed(0)
    lstm64 = torch.nn.LSTM(I, H, proj_size=P if P != H else 0).double()
    x64 = torch.randn(T, B, I, dtype=torch.float64)
    h064, c064 = torch.randn(1, B, P, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64)
    ups = [torch.randn(T, B, P, dtype=torch.float64), torch.randn(1, B, P, dtype=torch.float64),
           torch.randn(1, B, H, dtype=torch.float64)]
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"] + (["weight_hr_l0"] if P != H else [])

    def ours(backend, dev, dt):
        p = {n: getattr(lstm64, n).detach().to(dev, dt).requires_grad_() for n in names}
        x = x64.to(dev, dt).requires_grad_()
        h0, c0 = h064[0].to(dev, dt).requires_grad_(), c064[0].to(dev, dt).requires_grad_()
        y, h_n, c_n = lstm_projected(x, h0, c0, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                                     p["bias_hh_l0"], p.get("weight_hr_l0"), backend=backend)
        outs = [y, h_n.unsqueeze(0), c_n.unsqueeze(0)]
        loss = sum((o * u.to(dev, dt)).sum() for o, u in zip(outs, ups))
        grads = torch.autograd.grad(loss, [x, h0, c0] + [p[n] for n in names])
        return [o.double().cpu() for o in outs] + [g.double().cpu() for g in grads]

    def by_torch(dt):
        m = torch.nn.LSTM(I, H, proj_size=P if P != H else 0).to(device, dt)
        m.load_state_dict({k: v.to(dt) for k, v in lstm64.state_dict().items()})
        x = x64.to(device, dt).requires_grad_()
        h0, c0 = h064.to(device, dt).requires_grad_(), c064.to(device, dt).requires_grad_()
        y, (h_n, c_n) = m(x, (h0, c0))
        outs = [y, h_n, c_n]
        loss = sum((o * u.to(device, dt)).sum() for o, u in zip(outs, ups))
        grads = torch.autograd.grad(loss, [x, h0, c0] + [getattr(m, n) for n in names])
        grads = [grads[0], grads[1][0], grads[2][0], *grads[3:]]
        return [o.double().cpu() for o in outs] + [g.double().cpu() for g in grads]

    ref = ours("reference", "cpu", torch.float64)

    def err(vals):
        return [((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for a, r in zip(vals, ref)]

    return err(ours(backend, device, dtype)), err(by_torch(dtype))


def assert_within_2x_torch(ours, by_torch, dtype):
    for name, e_ours, e_torch in zip(ERROR_NAMES, ours, by_torch):
        assert e_ours <= 2 * e_torch + ULP[dtype], f"{name}: ours {e_ours:.2e} vs torch {e_torch:.2e}"
