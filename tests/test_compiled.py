"""The compiled extension's backends (`cpp`, `cuda`) against the reference backend.

Every output (y, h_n, c_n) and every gradient (gx, h0, c0, w_hh, w_hr) with
upstream gradients on y and on both final states; packed batch_sizes, reverse,
projection and odd sizes; gradcheck in float64; opcheck of the custom ops
(schema, fake kernels, torch.compile's AOT dispatch). CUDA tests run only
where a GPU is visible and compare low precision against cuDNN's own error.
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_within_2x_torch, layer_errors_vs_fp64
from lstm_fast.backends import get_backend
from lstm_fast.function import lstm_recurrence

CPP_OK, CPP_WHY = get_backend("cpp").is_available()
CUDA_OK, CUDA_WHY = get_backend("cuda").is_available()
needs_cpp = pytest.mark.skipif(not CPP_OK, reason=f"cpp backend unavailable: {CPP_WHY}")
# Skipped only where no GPU is visible: with one, an unusable cuda backend (say a
# CPU-only build of the extension) makes these tests fail with its reason, not pass
# by skipping.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible")

# Same algorithm, different summation order (BLAS blocking vs torch ops):
# float64 agrees to ~1e-15; float32 to a few ulp per step, accumulated over T.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-6)}

# (T, B, H, P, packed, reverse)
CASES = [
    (6, 3, 8, 8, False, False),
    (6, 3, 8, 8, False, True),
    (7, 4, 8, 8, True, False),
    (6, 3, 8, 5, False, False),   # projection
    (6, 3, 8, 5, False, True),    # projection, reverse
    (7, 4, 8, 5, True, False),    # projection, packed
    (1, 3, 8, 8, False, False),   # T=1
    (1, 3, 8, 5, False, True),    # T=1 with projection, reverse
    (1, 5, 33, 17, True, False),  # T=1 packed, projection, vector tail
    (5, 1, 8, 8, False, False),   # B=1
    (5, 3, 1, 1, False, False),   # H=1
    (5, 5, 33, 33, True, False),  # H=33: vector tail
    (5, 4, 33, 17, False, True),  # H=33 with projection
]


def batch_sizes_for(T, B, gen):
    """Non-increasing, starts at B, ends >= 1, with at least one drop when possible."""
    sizes = torch.randint(1, B + 1, (T,), generator=gen).sort(descending=True).values
    sizes[0] = B
    if T > 1 and B > 1:
        sizes[-1] = 1
    return sizes.to(torch.int64)


def make_inputs(T, B, H, P, packed, dtype, device="cpu", seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    gx = rnd(T, B, 4 * H)
    h0, c0 = rnd(B, P), rnd(B, H)
    w_hh = rnd(4 * H, P, scale=P ** -0.5)
    w_hr = rnd(P, H, scale=H ** -0.5) if P != H else None
    bs = batch_sizes_for(T, B, gen) if packed else None
    return gx, h0, c0, w_hh, w_hr, bs


def run(backend, inputs, reverse, seed=1, upstream_dtype=None):
    """Outputs and all gradients under random upstream gradients on y, h_n and c_n
    (their values rounded to upstream_dtype first, if given)."""
    gx, h0, c0, w_hh, w_hr, bs = inputs
    y, h_n, c_n = lstm_recurrence(gx, h0, c0, w_hh, w_hr, batch_sizes=bs, reverse=reverse, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    ups = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(upstream_dtype or t.dtype).to(t.dtype)
           .to(t.device) for t in (y, h_n, c_n)]
    loss = sum((t * u).sum() for t, u in zip((y, h_n, c_n), ups))
    leaves = [t for t in (gx, h0, c0, w_hh, w_hr) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    names = ["y", "h_n", "c_n"] + [f"d_{n}" for n, t in zip(("gx", "h0", "c0", "w_hh", "w_hr"),
                                                           (gx, h0, c0, w_hh, w_hr)) if t is not None]
    return dict(zip(names, [y, h_n, c_n, *grads]))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("T,B,H,P,packed,reverse", CASES)
def test_cpp_matches_reference(T, B, H, P, packed, reverse, dtype):
    inputs = make_inputs(T, B, H, P, packed, dtype)
    ours, ref = run("cpp", inputs, reverse), run("reference", inputs, reverse)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and ours[name].shape == ref[name].shape, name
        torch.testing.assert_close(ours[name], ref[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")
    if packed:  # padded rows of y are exactly zero, as in the reference
        bs = inputs[5]
        for t in range(T):
            assert torch.count_nonzero(ours["y"][t, int(bs[t]):]).item() == 0


@needs_cpp
@pytest.mark.parametrize("P", [8, 5], ids=["noproj", "proj"])
def test_cpp_single_step_with_inactive_rows(P):
    """The op's contract allows rows past batch_sizes[0] (packed input never has them,
    the op's callers may): they keep their state, get y = 0 and zero gradients."""
    gx, h0, c0, w_hh, w_hr, _ = make_inputs(1, 5, 8, P, False, torch.float64)
    inputs = (gx, h0, c0, w_hh, w_hr, torch.tensor([2]))
    ours, ref = run("cpp", inputs, False), run("reference", inputs, False)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], **TOL[torch.float64], msg=lambda m: f"{name}: {m}")
    assert torch.count_nonzero(ours["y"][0, 2:]).item() == 0


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T,B,H,P,packed,reverse", [c for c in CASES if c[0] > 1])
def test_cpp_half_precision_is_the_float32_result_rounded(T, B, H, P, packed, reverse, dtype):
    """16-bit input runs in float32: every result is the float32 computation on the
    widened inputs, rounded once to the input dtype (so within one unit in the last
    place of it, plus float32 noise)."""
    inputs = make_inputs(T, B, H, P, packed, dtype)
    wide = [t.detach().float().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs]
    ours, ref = run("cpp", inputs, reverse), run("reference", wide, reverse, upstream_dtype=dtype)
    for name in ref:
        assert ours[name].dtype == dtype, name
        torch.testing.assert_close(ours[name].float(), ref[name], rtol=torch.finfo(dtype).eps, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


# Above the cpp backend's split threshold (B*4H*P >= 8192, csrc/lstm_cpu.cpp):
# the time loop runs split over hidden units across threads, one barrier per step.
SPLIT_CASES = [
    (7, 6, 40, 40, False, False),
    (7, 6, 40, 40, True, False),
    (7, 6, 40, 40, False, True),
    (7, 6, 40, 24, True, False),   # projection, packed
    (6, 5, 33, 33, True, False),   # uneven split with a vector tail
    (6, 6, 33, 17, False, True),   # projection, reverse
]


@needs_cpp
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("T,B,H,P,packed,reverse", SPLIT_CASES)
def test_cpp_threaded_matches_reference(T, B, H, P, packed, reverse, dtype, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(T, B, H, P, packed, dtype)
        ours, ref = run("cpp", inputs, reverse), run("reference", inputs, reverse)
    finally:
        torch.set_num_threads(before)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")


@needs_cpp
def test_cpp_inference_saves_nothing_and_matches():
    inputs = make_inputs(9, 4, 16, 16, True, torch.float32, requires_grad=False)
    gx, h0, c0, w_hh, w_hr, bs = inputs
    with torch.no_grad():
        ours = lstm_recurrence(gx, h0, c0, w_hh, w_hr, batch_sizes=bs, backend="cpp")
        ref = lstm_recurrence(gx, h0, c0, w_hh, w_hr, batch_sizes=bs, backend="reference")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    *_, gates, cells = torch.ops.lstm_fast.lstm_forward(gx, h0, c0, w_hh, None, bs, False, False)
    assert gates.numel() == 0 and cells.numel() == 0


@needs_cpp
def test_cpp_empty_sequence():
    gx, h0, c0, w_hh, w_hr, _ = make_inputs(0, 3, 4, 4, False, torch.float64)
    out = run("cpp", (gx, h0, c0, w_hh, w_hr, None), False)
    torch.testing.assert_close(out["h_n"], h0.detach())
    torch.testing.assert_close(out["c_n"], c0.detach())
    assert out["d_w_hh"].abs().max().item() == 0


@needs_cpp
@pytest.mark.parametrize("P,packed,reverse", [(4, False, False), (4, True, False), (3, False, True), (3, True, False)])
def test_cpp_gradcheck(P, packed, reverse):
    gx, h0, c0, w_hh, w_hr, bs = make_inputs(4, 3, 4, P, packed, torch.float64)
    leaves = tuple(t for t in (gx, h0, c0, w_hh, w_hr) if t is not None)

    def f(*args):
        a = list(args) + [None] * (5 - len(args))
        return lstm_recurrence(*a[:5], batch_sizes=bs, reverse=reverse, backend="cpp")

    assert torch.autograd.gradcheck(f, leaves)


@needs_cpp
def test_cpp_rejects_bad_input():
    gx, h0, c0, w_hh, _, _ = make_inputs(3, 2, 4, 4, False, torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match="w_hh must be"):
        torch.ops.lstm_fast.lstm_forward(gx, h0, c0, w_hh[:, :3], None, None, False, False)
    with pytest.raises(RuntimeError, match="non-increasing"):
        torch.ops.lstm_fast.lstm_forward(gx, h0, c0, w_hh, None, torch.tensor([1, 2, 2]), False, False)
    with pytest.raises(RuntimeError, match="float32 and float64 only"):
        torch.ops.lstm_fast.lstm_forward(gx.half(), h0.half(), c0.half(), w_hh.half(), None, None, False, False)


def op_args(T, B, H, P, packed, reverse, dtype, device, need_grad):
    gx, h0, c0, w_hh, w_hr, bs = make_inputs(T, B, H, P, packed, dtype, device, requires_grad=False)
    fwd = (gx, h0, c0, w_hh, w_hr, bs, reverse, need_grad)
    return fwd


def check_ops(device, dtype):
    for T, B, H, P, packed, reverse in [(4, 3, 8, 8, False, False), (5, 3, 8, 5, True, False),
                                        (4, 2, 8, 5, False, True)]:
        for need_grad in (False, True):
            torch.library.opcheck(torch.ops.lstm_fast.lstm_forward.default,
                                  op_args(T, B, H, P, packed, reverse, dtype, device, need_grad))
        fwd = op_args(T, B, H, P, packed, reverse, dtype, device, True)
        gx, h0, c0, w_hh, w_hr, bs, _, _ = fwd
        y, h_n, c_n, gates, cells = torch.ops.lstm_fast.lstm_forward(*fwd)
        bwd = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), gates, cells, y, h0, c0, w_hh,
               w_hr, bs, reverse)
        torch.library.opcheck(torch.ops.lstm_fast.lstm_backward.default, bwd)


@needs_cpp
def test_cpp_opcheck():
    check_ops("cpu", torch.float32)


def projected_args(T, B, I, H, P, packed, reverse, dtype, need_grad, bias=True):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64).to(dtype)
    w_ih = (torch.randn(4 * H, I, generator=g, dtype=torch.float64) * I ** -0.5).to(dtype)
    b = torch.randn(4 * H, generator=g, dtype=torch.float64).to(dtype) if bias else None
    _, h0, c0, w_hh, w_hr, bs = make_inputs(T, B, H, P, packed, dtype, requires_grad=False)
    return x, w_ih, b, h0, c0, w_hh, w_hr, bs, reverse, need_grad


@needs_cpp
@pytest.mark.parametrize("split", ["0", "1000000000"], ids=["split", "1thread"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpp_forward_projected(dtype, split):
    """The op that projects x inside the time loop equals projecting first, then lstm_forward;
    opcheck on its schema and fake kernel."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    cases = [(6, 5, 7, 16, 16, False, False, True), (7, 4, 12, 8, 5, True, False, False),
             (5, 13, 3, 24, 24, False, True, True)]
    code = (
        f"import torch, lstm_fast, sys; sys.path.insert(0, {here!r}); from test_compiled import projected_args;"
        "from lstm_fast.backends import get_backend; get_backend('cpp').is_available();"
        f"dtype = {dtype}; cases = {cases!r}\n"
        "for T, B, I, H, P, packed, reverse, bias in cases:\n"
        "    for need_grad in (False, True):\n"
        "        a = projected_args(T, B, I, H, P, packed, reverse, dtype, need_grad, bias)\n"
        "        got = torch.ops.lstm_fast.lstm_forward_projected(*a)\n"
        "        gx = torch.nn.functional.linear(a[0], a[1], a[2])\n"
        "        want = torch.ops.lstm_fast.lstm_forward(gx, *a[3:])\n"
        "        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)\n"
        "        for n, u, v in zip(['y', 'h_n', 'c_n', 'gates', 'cells'], got, want):\n"
        "            torch.testing.assert_close(u, v, **tol, msg=n)\n"
        "        torch.library.opcheck(torch.ops.lstm_fast.lstm_forward_projected.default, a)\n")
    # the split threshold is read once per process, so each setting runs in its own
    env = dict(os.environ, LSTM_FAST_CPU_SPLIT_MIN=split)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@needs_cpp
def test_cpp_forward_projected_rejects_bad_input():
    x, w_ih, b, h0, c0, w_hh, w_hr, bs, rev, ng = projected_args(3, 2, 5, 4, 4, False, False, torch.float32, False)
    with pytest.raises(RuntimeError, match="w_ih must be"):
        torch.ops.lstm_fast.lstm_forward_projected(x, w_ih[:, :4], b, h0, c0, w_hh, None, None, False, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.lstm_fast.lstm_forward_projected(x, w_ih, b[:-1], h0, c0, w_hh, None, None, False, False)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.lstm_fast.lstm_forward_projected(x[0], w_ih, b, h0, c0, w_hh, None, None, False, False)


# ----------------------------------------------------------------------------- CUDA

def test_cuda_refuses_bfloat16_before_sm80(monkeypatch):
    """supports() decides from the device's capability alone (no GPU needed to check it)."""
    from lstm_fast.backends.base import LayerSizes
    cuda = get_backend("cuda")
    sizes = LayerSizes(T=2, B=2, H=8, P=8)
    for cap, want in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        ok, why = cuda.supports(torch.device("cuda"), torch.bfloat16, sizes)
        assert ok is want, (cap, why)
        assert cuda.supports(torch.device("cuda"), torch.float16, sizes)[0]


@pytest.mark.gpu
@needs_cuda
def test_cuda_backend_available_on_a_gpu():
    assert CUDA_OK, f"a GPU is visible but the cuda backend is not usable: {CUDA_WHY}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("P", [64, 48], ids=["noproj", "proj"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_error_within_2x_cudnn(dtype, P):
    errors = layer_errors_vs_fp64("cuda", torch.device("cuda"), dtype, T=20, B=8, I=32, H=64, P=P)
    assert_within_2x_torch(errors, dtype)


@pytest.mark.parametrize("T,B,H,P,packed,reverse", CASES)
@pytest.mark.gpu
@needs_cuda
def test_cuda_fp64_matches_reference(T, B, H, P, packed, reverse):
    inputs = make_inputs(T, B, H, P, packed, torch.float64, "cuda")
    ours, ref = run("cuda", inputs, reverse), run("reference", inputs, reverse)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], **TOL[torch.float64], msg=lambda m: f"{name}: {m}")


# Packed/reverse/projection in low precision against the float64 reference:
# half has 11 significant bits, bfloat16 8; errors of a few units in the last
# place per step, accumulated over T=7 steps and the GEMMs' rounding of inputs.
LOWP_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-2, atol=2e-2),
            torch.bfloat16: dict(rtol=1e-1, atol=1e-1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("T,B,H,P,packed,reverse", [c for c in CASES if c[4] or c[5] or c[2] != c[3]])
@pytest.mark.gpu
@needs_cuda
def test_cuda_low_precision_packed_reverse_proj(T, B, H, P, packed, reverse, dtype):
    inputs64 = make_inputs(T, B, H, P, packed, torch.float64, "cuda")
    inputs = tuple(t.detach().to(dtype).requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                   else t for t in inputs64)
    ours, ref = run("cuda", inputs, reverse), run("reference", inputs64, reverse)
    for name in ref:
        assert ours[name].dtype == dtype
        torch.testing.assert_close(ours[name].double(), ref[name], **LOWP_TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_opcheck(dtype):
    check_ops("cuda", dtype)
