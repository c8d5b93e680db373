"""Shared pieces of the test suite: which backends run here, the inputs, the
tolerances and the comparison runners."""
import contextlib
import os

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import lstm_fast
from lstm_fast.backends import BACKEND_NAMES, get_backend  # noqa: F401 (re-exported for tests)
from lstm_fast.backends.base import LayerSizes
from lstm_fast.function import lstm_projected, lstm_recurrence

# Tolerances by dtype, for assert_close(ours, expected) of two computations of the same
# quantity from the same inputs (assert_close passes |a - b| <= atol + rtol * |b|).
TOL = {
    # rounding ~1e-16 on both sides, amplified by the recurrence and the T*B-term sums of
    # the weight gradients; 1e-9 leaves 10^6 headroom
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    # eps 1.2e-7 per op, amplified the same way over the short sequences used here;
    # independent float32 implementations land within ~1e-6
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    # against the float32 computation of the same inputs: one rounding to 11 bits (at most
    # half of eps relative), atol for float32 noise on values near zero
    torch.float16: dict(rtol=torch.finfo(torch.float16).eps, atol=1e-5),
    # the same with 8 bits
    torch.bfloat16: dict(rtol=torch.finfo(torch.bfloat16).eps, atol=1e-5),
}

# Tests of the compiled extension's cpp backend itself (its ops, its thread rules).
_CPP_OK, _CPP_WHY = get_backend("cpp").is_available()
needs_cpp = pytest.mark.skipif(not _CPP_OK, reason=f"cpp backend unavailable: {_CPP_WHY}")

# Backends whose kernels run in the Triton interpreter here: each launch costs Python
# time per program, so the costliest checks take their cheaper form for them.
INTERPRETED = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set()


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


def require(backend, device, dtype, T=4, B=3, H=7, P=None, packed=False, reverse=False):
    """Skip (with the backend's own reason) when it cannot run this case."""
    b = get_backend(backend)
    ok, why = b.is_available()
    if not ok and device.type == "cuda" and backend in ("cuda", "triton"):
        pytest.fail(f"a GPU is visible but the {backend} backend is not usable: {why}")  # not a silent skip
    if not ok:
        pytest.skip(f"{backend} unavailable: {why}")
    ok, why = b.supports(device, dtype, LayerSizes(T=T, B=B, H=H, P=P or H, packed=packed, reverse=reverse))
    if not ok:
        pytest.skip(f"{backend} does not support {device.type} {dtype}: {why}")


def assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------- one layer-direction

TORCH = "torch"  # run_layer's name for torch's own LSTM kernel (ATen on CPU, cuDNN on a GPU)


def layer_inputs(T, B, H, P, dtype, device, I=None, bias=True, seed=0, batch_sizes=None):
    """The leaves of one layer-direction, all requiring grad, from float64 draws rounded to
    dtype (so every dtype sees the same values). I=None: the recurrence-only entry,
    {gx, h0, c0, w_hh[, w_hr]}; otherwise the projecting one, {x, h0, c0, w_ih, w_hh
    [, b_ih, b_hh][, w_hr]}. gx / x are [T, B, *], or packed [sum(batch_sizes), *] when
    batch_sizes is given. Weights scaled by fan-in^-1/2 as nn.LSTM's init, so the
    gates are not saturated."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    rows = (T, B) if batch_sizes is None else (int(sum(batch_sizes)),)
    leaves = {"gx": rnd(*rows, 4 * H)} if I is None else {"x": rnd(*rows, I)}
    leaves.update(h0=rnd(B, P), c0=rnd(B, H))
    if I is not None:
        leaves["w_ih"] = rnd(4 * H, I, scale=I ** -0.5)
    leaves["w_hh"] = rnd(4 * H, P, scale=P ** -0.5)
    if I is not None and bias:
        leaves.update(b_ih=rnd(4 * H, scale=H ** -0.5), b_hh=rnd(4 * H, scale=H ** -0.5))
    if P != H:
        leaves["w_hr"] = rnd(P, H, scale=H ** -0.5)
    return leaves


def widened(leaves, dtype=torch.float32):
    """The same leaves in another dtype, as fresh leaves."""
    return {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}


def call_layer(backend, leaves, batch_sizes=None, reverse=False):
    """(y, h_n, c_n) of one layer-direction: through lstm_recurrence (leaves with gx) or
    lstm_projected (leaves with x) on the named backend, or through torch's own LSTM
    kernel for backend=TORCH."""
    if backend == TORCH:
        return torch_layer(leaves, batch_sizes, reverse)
    if "gx" in leaves:
        return lstm_recurrence(leaves["gx"], leaves["h0"], leaves["c0"], leaves["w_hh"], leaves.get("w_hr"),
                               batch_sizes=batch_sizes, reverse=reverse, backend=backend)
    return lstm_projected(leaves["x"], leaves["h0"], leaves["c0"], leaves["w_ih"], leaves["w_hh"],
                          leaves.get("b_ih"), leaves.get("b_hh"), leaves.get("w_hr"),
                          batch_sizes=batch_sizes, reverse=reverse, backend=backend)


def torch_layer(leaves, batch_sizes=None, reverse=False):
    """One layer-direction on torch's LSTM kernel (what torch.nn.LSTM runs), with the
    functional entries' conventions: gx enters as the input of a layer whose W_ih is the
    identity (x @ I is exact), reverse flips time (a packed reverse layer is the backward
    half of torch's bidirectional kernel), and rows past batch_sizes[0] keep their state
    (torch's packed kernel takes the first batch_sizes[0] rows, the others pass through)."""
    if "gx" in leaves:
        gx = leaves["gx"]
        x, w_ih, biases = gx, torch.eye(gx.shape[-1], dtype=gx.dtype, device=gx.device), []
    else:
        x, w_ih = leaves["x"], leaves["w_ih"]
        biases = [leaves["b_ih"], leaves["b_hh"]] if "b_ih" in leaves else []
    h0, c0 = leaves["h0"], leaves["c0"]
    params = [w_ih, leaves["w_hh"], *biases] + ([leaves["w_hr"]] if "w_hr" in leaves else [])
    if batch_sizes is None:
        x = x.flip(0) if reverse else x
        y, h, c = torch._VF.lstm(x, (h0[None], c0[None]), params, bool(biases), 1, 0.0, True, False, False)
        return (y.flip(0) if reverse else y), h[0], c[0]
    active = int(batch_sizes[0])
    hx = (h0[None, :active], c0[None, :active])
    if reverse:  # the forward half runs on copies and is dropped
        params = [p.detach() for p in params] + params
        hx = tuple(torch.cat([s.detach(), s]) for s in hx)
    y, h, c = torch._VF.lstm(x, batch_sizes, hx, params, bool(biases), 1, 0.0, True, bool(reverse))
    k = 1 if reverse else 0
    P = h0.shape[-1]
    return y[:, k * P:(k + 1) * P], torch.cat([h[k], h0[active:]]), torch.cat([c[k], c0[active:]])


def run_layer(backend, leaves, batch_sizes=None, reverse=False, upstream_dtype=None, seed=1):
    """Outputs and the gradient of every leaf of one layer-direction (call_layer), with
    random upstream gradients on y, h_n and c_n (drawn in float64, rounded to
    upstream_dtype first if given). Returns {"y", "h_n", "c_n", "d_<leaf>"...}."""
    y, h_n, c_n = call_layer(backend, leaves, batch_sizes, reverse)
    g = torch.Generator().manual_seed(seed)
    outs = (y, h_n, c_n)
    ups = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(upstream_dtype or t.dtype).to(t)
           for t in outs]
    grads = torch.autograd.grad(sum((t * u).sum() for t, u in zip(outs, ups)), list(leaves.values()))
    return {"y": y, "h_n": h_n, "c_n": c_n, **{f"d_{k}": v for k, v in zip(leaves, grads)}}


def assert_results_close(ours, expected, dtype, label):
    """Every entry of two run_layer results: same names, dtypes and shapes, values within TOL[dtype]."""
    assert ours.keys() == expected.keys(), label
    for name, want in expected.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, f"{label} {name}: {got.dtype}{list(got.shape)}"
        assert_close(got, want, dtype, f"{label} {name}")


# ----------------------------------------------------------------- whole modules


def _data(out):
    return out.data if isinstance(out, PackedSequence) else out


def check_against(ref, ours, build, dtype, label):
    """Compare two LSTM-like modules on outputs, final states and every gradient.

    build() -> (input, hx or None, {name: leaf tensor}); it is called once per
    module under the same seed, so both get equal but independent leaves.
    Upstream gradients are random on the output and on both final states.
    Gradients are taken for every leaf and every parameter that requires one.
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
        wrt = list(leaves.values()) + [p for p in module.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, wrt))
    names = list(runs[0][4]) + [n for n, p in ref.named_parameters() if p.requires_grad]
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


# ----------------------------------------------------------------- errors against float64

# Whole-layer errors against a float64 reference: in a lower precision ours must stay
# within 2x torch's own LSTM error in that dtype on the same device (cuDNN on a GPU,
# ATen/oneDNN on CPU), plus one unit in the last place (torch.finfo(dtype).eps) of the
# quantity's scale, so a lucky, near-exact torch value cannot fail the test.


def layer_errors_vs_fp64(backend, device, dtype, T, B, I, H, P, batch_sizes=None, reverse=False):
    """{name: (ours, torch's)} max relative errors of every output and gradient of one
    layer-direction with its input projection (lstm_projected, as lstm_fast.LSTM runs
    it), against the reference backend in float64."""
    leaves64 = layer_inputs(T, B, H, P, torch.float64, "cpu", I=I, batch_sizes=batch_sizes)
    ref = run_layer("reference", leaves64, batch_sizes, reverse)

    def errors(name, dev):
        low = {k: v.detach().to(dev, dtype).requires_grad_() for k, v in leaves64.items()}
        got = run_layer(name, low, batch_sizes, reverse)
        return {k: ((got[k].double().cpu() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                for k, r in ref.items()}

    ours, by_torch = errors(backend, device), errors(TORCH, device)
    return {k: (ours[k], by_torch[k]) for k in ref}


def assert_within_2x_torch(errors, dtype):
    ulp = torch.finfo(dtype).eps
    for name, (e_ours, e_torch) in errors.items():
        assert e_ours <= 2 * e_torch + ulp, f"{name}: ours {e_ours:.2e} vs torch {e_torch:.2e}"
