"""What is unique to the `triton` backend.

The comparisons every backend shares (torch.nn.LSTM, the reference, gradcheck,
float64, errors against float64) are in test_drop_in.py. Here: both kernel
paths (step, sequence) forced in turn, and the dispatch between them; the fp32
dot precisions; the kernels compiled for sm_90 without a GPU; on a GPU (tests
marked `gpu`) each path and precision against cuDNN's own error, and no
recompilation for new T or B.

Without a GPU the kernels run on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported): float32 on small shapes,
forward and every gradient (gx, h0, c0, w_hh, w_hr), packed and reverse. The
interpreter is slow, so T and H stay tiny.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from torch.nn.utils.rnn import pack_sequence

import lstm_fast
from helpers import TOL, assert_results_close, check_against, layer_inputs, run_layer, tf32
from lstm_fast.backends import get_backend
from lstm_fast.backends.base import LayerSizes, LSTMState, RecurrentWeights, SequenceLayout
from lstm_fast.function import lstm_layer, lstm_recurrence

HAS_CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu") if INTERP else torch.device("cuda")


@pytest.fixture
def triton_backend():
    b = get_backend("triton")
    ok, why = b.is_available()
    if not ok and HAS_CUDA and not INTERP:
        pytest.fail(f"a GPU is visible but the triton backend is not usable: {why}")
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    saved = (b.path, b.fp32_precision)
    yield b
    b.path, b.fp32_precision = saved


def _batch_sizes(T, B, seed):
    """Non-increasing batch_sizes with the first row full length and varied lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(1, T + 1, (B,), generator=g).tolist(), reverse=True)
    lengths[0] = T
    return torch.tensor([sum(l > t for l in lengths) for t in range(T)], dtype=torch.int64)


# (id, T, B, H, P, packed, reverse): B=1, T=1, H not a multiple of 16/32, packed, reverse.
CASES = [
    ("B1_H5", 3, 1, 5, 5, False, False),
    ("T1_H16", 1, 3, 16, 16, False, False),
    ("H33", 3, 2, 33, 33, False, False),
    ("reverse_H16", 4, 3, 16, 16, False, True),
    ("packed_H5", 5, 5, 5, 5, True, False),
    ("packed_H33", 4, 4, 33, 33, True, False),
    ("packed_reverse_H5", 5, 5, 5, 5, True, True),
    ("B17_H5", 2, 17, 5, 5, False, False),  # two batch tiles of 16
]
PROJ_CASES = [  # projection: step path only
    ("proj_H9_P5", 3, 3, 9, 5, False, False),
    ("proj_packed", 4, 4, 9, 5, True, False),
    ("proj_packed_reverse", 4, 4, 9, 5, True, True),
    ("proj_reverse_B1", 3, 1, 33, 17, False, True),
]


@pytest.mark.skipif(not INTERP, reason="interpreter tests run where there is no GPU")
@pytest.mark.parametrize("path", ["step", "sequence"])
@pytest.mark.parametrize("name,T,B,H,P,packed,reverse", CASES + PROJ_CASES, ids=[c[0] for c in CASES + PROJ_CASES])
def test_interpreter_matches_reference(triton_backend, path, name, T, B, H, P, packed, reverse):
    """Each kernel path forced: outputs and every gradient against the reference; the
    sequence path refuses a projection, with its reason."""
    triton_backend.path = path
    sizes = LayerSizes(T=T, B=B, H=H, P=P, packed=packed, reverse=reverse)
    ok, why = triton_backend.supports(DEVICE, torch.float32, sizes)
    bs = _batch_sizes(T, B, seed=T * 100 + B) if packed else None
    leaves = layer_inputs(T, B, H, P, torch.float32, DEVICE, batch_sizes=bs)
    if P != H and path == "sequence":
        assert not ok and "projection" in why
        with pytest.raises(RuntimeError, match="projection"):
            lstm_recurrence(*leaves.values(), batch_sizes=bs, backend="triton")
        return
    assert ok, why
    ours, ref = run_layer("triton", leaves, bs, reverse), run_layer("reference", leaves, bs, reverse)
    assert_results_close(ours, ref, torch.float32, f"{name}/{path}")


@pytest.mark.skipif(not INTERP, reason="interpreter tests run where there is no GPU")
@pytest.mark.parametrize("path", ["step", "sequence"])
@pytest.mark.parametrize("packed,reverse", [(False, False), (True, False), (True, True), (False, True)])
def test_interpreter_inference(triton_backend, path, packed, reverse):
    """No grad, each kernel path forced: nothing saved, the step path ping-pongs the cell state."""
    triton_backend.path = path
    T, B, H = 5, 4, 7
    bs = _batch_sizes(T, B, seed=3) if packed else None
    leaves = {k: v.detach() for k, v in layer_inputs(T, B, H, H, torch.float32, DEVICE, batch_sizes=bs).items()}
    with torch.no_grad():
        ref = lstm_recurrence(*leaves.values(), batch_sizes=bs, reverse=reverse, backend="reference")
        ours = lstm_recurrence(*leaves.values(), batch_sizes=bs, reverse=reverse, backend="triton")
    for name, a, b in zip(("y", "h_n", "c_n"), ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("path,proj", [("step", 0), ("step", 3), ("sequence", 0)],
                         ids=["step", "step_proj", "sequence"])
def test_packed_module_matches_torch(triton_backend, path, proj):
    """Each kernel path forced on PackedSequence input in its own layout: a bidirectional
    lstm_fast.LSTM (forward and reverse directions, enforce_sorted=False, a projection on
    the step path) against torch.nn.LSTM, outputs, states and every gradient."""
    triton_backend.path = path
    torch.manual_seed(3)
    kwargs = dict(input_size=4, hidden_size=6, proj_size=proj, bidirectional=True)
    ref = torch.nn.LSTM(**kwargs).to(DEVICE)
    ours = lstm_fast.LSTM.from_torch(ref, backend="triton")
    lengths = [2, 5, 1, 5, 3]  # unsorted, with ties and a length-1 sequence
    P = proj or 6

    def build():
        leaves = {f"seq{i}": torch.randn(n, 4, device=DEVICE, requires_grad=True) for i, n in enumerate(lengths)}
        leaves["h0"] = torch.randn(2, len(lengths), P, device=DEVICE, requires_grad=True)
        leaves["c0"] = torch.randn(2, len(lengths), 6, device=DEVICE, requires_grad=True)
        packed = pack_sequence([leaves[f"seq{i}"] for i in range(len(lengths))], enforce_sorted=False)
        return packed, (leaves["h0"], leaves["c0"]), leaves

    check_against(ref, ours, build, torch.float32, f"packed/{path}/proj={proj}")


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["step", "sequence"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_packed_call_allocates_no_padded_batch(triton_backend, path, reverse):
    """A packed call works on its N = sum(batch_sizes) rows only: no tensor of the padded
    [T, B, *] batch's size is created in forward or backward (every ATen op's output is
    watched; the kernels allocate nothing), and the saved gates and cells have N rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point():  # the interpreter views buffers as bytes
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    triton_backend.path = path
    T, B, H = 12, 8, 5
    bs = torch.tensor([B] + [1] * (T - 1))  # one long sequence: N = 19 real tokens of T*B = 96
    N = int(bs.sum())
    leaves = layer_inputs(T, B, H, H, torch.float32, DEVICE, batch_sizes=bs)
    with Largest():
        y, h_n, c_n = lstm_recurrence(*leaves.values(), batch_sizes=bs, reverse=reverse, backend="triton")
        torch.autograd.grad((y * y).sum() + h_n.sum() + c_n.sum(), list(leaves.values()))
    # the largest per-step tensors of the call are gx and gates, [N, 4H]; a padded y or cells has T*B*H
    assert Largest.numel < T * B * H, Largest.numel
    state, weights = LSTMState(leaves["h0"], leaves["c0"]), RecurrentWeights(leaves["w_hh"])
    with torch.no_grad():
        y, _, _, (gates, cells) = triton_backend.forward(leaves["gx"], state, weights, SequenceLayout(bs, reverse),
                                                         True)
    assert y.shape == (N, H) and gates.shape == (N, 4 * H) and cells.shape == (N, H)


MASK_CASES = [  # (id, P, packed, reverse, masks on: recurrent, zone_c, zone_h)
    ("all", 5, False, False, (True, True, True)),
    ("recurrent_reverse", 5, False, True, (True, False, False)),
    ("zone_c_packed", 5, True, False, (False, True, False)),
    ("zone_h_packed_reverse", 5, True, True, (False, False, True)),
    ("proj_all_packed_reverse", 3, True, True, (True, True, True)),
    ("proj_zone_h", 3, False, False, (False, False, True)),
]
# the sequence path refuses a projection outright, masks or not
MASK_RUNS = [(p, *c) for p in ("step", "sequence") for c in MASK_CASES if p == "step" or c[1] == 5]


@pytest.mark.gpu
@pytest.mark.parametrize("path,name,P,packed,reverse,on", MASK_RUNS, ids=[f"{r[0]}-{r[1]}" for r in MASK_RUNS])
def test_masks_match_reference(triton_backend, monkeypatch, path, name, P, packed, reverse, on):
    """Recurrent dropout and zoneout inside the step kernels (a masked call takes the step
    path whichever is asked): outputs and every gradient against the reference's loop with
    the same masks, packed and reverse, with a projection (zoneout of h after W_hr)."""
    from lstm_fast.backends.base import StepMasks
    from lstm_fast.function import lstm_projected

    triton_backend.path = path
    T, B, H, I = 4, 3, 5, 2
    bs = torch.tensor([3, 2, 2, 1]) if packed else None
    rows = (int(bs.sum()),) if packed else (T, B)
    g = torch.Generator().manual_seed(8)
    masks = StepMasks(*(None if t is None else t.to(DEVICE) for t in (
        (torch.rand(B, P, generator=g) > 0.3).float() / 0.7 if on[0] else None,
        torch.rand(*rows, H, generator=g) if on[1] else None,  # zoneout's eval form: any value in [0, 1]
        (torch.rand(*rows, P, generator=g) > 0.5).float() if on[2] else None)))
    leaves = layer_inputs(T, B, H, P, torch.float32, DEVICE, I=I, batch_sizes=bs)
    results = []

    def not_here(*args, **kwargs):
        raise AssertionError("a masked triton call was handed to the reference backend")

    for backend in ("triton", "reference"):
        with monkeypatch.context() as m:
            if backend == "triton":
                reference = type(get_backend("reference"))
                m.setattr(reference, "forward", not_here)
                m.setattr(reference, "forward_projected", not_here)
            y, h_n, c_n = lstm_projected(*(leaves[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")),
                                         leaves.get("w_hr"), batch_sizes=bs, reverse=reverse, backend=backend,
                                         masks=masks)
        ups = torch.Generator().manual_seed(9)
        loss = sum((t * torch.randn(t.shape, generator=ups).to(DEVICE)).sum() for t in (y, h_n, c_n))
        results.append((y, h_n, c_n, *torch.autograd.grad(loss, list(leaves.values()))))
    for what, a, b in zip(["y", "h_n", "c_n", *(f"d_{k}" for k in leaves)], *results):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m, what=what: f"{name} {what}: {m}")


def test_dispatch_and_limits(triton_backend):
    from lstm_fast.backends.triton_gpu import seq_max_h

    b = triton_backend
    f32 = torch.float32
    limit = seq_max_h(f32)
    assert limit == 64 and seq_max_h(torch.float16) == seq_max_h(torch.bfloat16) == 128
    small = LayerSizes(T=3, B=2, H=limit, P=limit)
    big = LayerSizes(T=3, B=2, H=limit + 1, P=limit + 1)
    proj = LayerSizes(T=3, B=2, H=8, P=4)
    b.path = "auto"
    assert b.use_sequence(small, f32) and not b.use_sequence(big, f32) and not b.use_sequence(proj, f32)
    assert b.use_sequence(big, torch.float16)
    assert b.supports(DEVICE, f32, big)[0]
    b.path = "step"
    assert not b.use_sequence(small, f32)
    b.path = "sequence"
    ok, why = b.supports(DEVICE, f32, big)
    assert not ok and f"H <= {limit}" in why
    b.path = "auto"
    assert b.supports(DEVICE, torch.float64, small)[0] and not b.use_sequence(small, torch.float64)
    b.path = "sequence"
    ok, why = b.supports(DEVICE, torch.float64, small)
    assert not ok and "float64" in why
    b.path = "auto"
    other = torch.device("cuda") if INTERP else torch.device("cpu")
    ok, why = b.supports(other, torch.float32, small)
    assert not ok and why
    b.path = "bogus"
    with pytest.raises(ValueError, match="path"):
        b.supports(DEVICE, torch.float32, small)


def test_fp32_precision_choice(triton_backend):
    b = triton_backend
    for choice in ("ieee", "tf32", "tf32x3"):
        b.fp32_precision = choice
        assert b.dot_precision(torch.float32) == choice
    assert b.dot_precision(torch.float16) == "ieee"  # 16-bit operands: flag does not apply
    b.fp32_precision = None  # follow torch's switch
    assert b.dot_precision(torch.float32) in ("ieee", "tf32")
    b.fp32_precision = "fast"
    ok, why = b.supports(DEVICE, torch.float32, LayerSizes(T=1, B=1, H=4, P=4))
    assert not ok and "fp32_precision" in why

def test_kernels_compile_for_sm90():
    """Every kernel specialisation the launchers make (meta tensors, quick case set)
    compiles to an sm_90 cubin with Triton's real compiler, no GPU needed: errors the
    interpreter cannot see (types, dot shapes, shared memory, ptxas) fail here."""
    pytest.importorskip("triton")
    script = os.path.join(os.path.dirname(__file__), "triton_sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert " 0 failed" in run.stdout and "compiled" in run.stdout, run.stdout[-2000:]



# --------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not HAS_CUDA or INTERP, reason="needs a CUDA device (and TRITON_INTERPRET unset)")


def _lstm_grads(fn, x, h0, c0, params, upstream):
    """Outputs and gradients (x, h0, c0, each param) of one call, as float64."""
    x, h0, c0 = (t.detach().requires_grad_() for t in (x, h0, c0))
    params = [p.detach().requires_grad_() for p in params]
    y, (h, c) = fn(x, h0, c0, params)
    loss = sum((t.double() * u).sum() for t, u in zip((y, h, c), upstream))
    grads = torch.autograd.grad(loss, [x, h0, c0] + params)
    return [t.detach().double() for t in (y, h, c, *grads)]


def _cudnn(x, h0, c0, params):
    """torch.nn.LSTM's own kernel call (cuDNN on CUDA) for one layer, one direction."""
    y, h, c = torch._VF.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), params, True, 1, 0.0, True, False, False)
    return y, (h[0], c[0])


def _layer(backend):
    def run(x, h0, c0, params):
        w_ih, w_hh, b_ih, b_hh, *rest = params
        return lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, rest[0] if rest else None, backend=backend)
    return run


GPU_NAMES = ["y", "h_n", "c_n", "d_x", "d_h0", "d_c0", "d_w_ih", "d_w_hh", "d_b_ih", "d_b_hh", "d_w_hr"]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                             (torch.float16, None), (torch.bfloat16, None)],
                         ids=["fp32-ieee", "fp32-tf32", "fp16", "bf16"])
@pytest.mark.parametrize("path,H,P", [("sequence", 64, 64), ("sequence", 128, 128), ("step", 64, 64),
                                      ("step", 256, 256), ("step", 200, 200), ("step", 128, 48)],
                         ids=["seq-H64", "seq-H128", "step-H64", "step-H256", "step-H200", "step-proj"])
def test_gpu_vs_cudnn_error(triton_backend, dtype, precision, path, H, P):
    """Our distance from a float64 reference <= 2x cuDNN's in the same dtype and
    TF32 setting, for every output and gradient (plus one ulp of the result's
    scale, so an exactly-rounded cuDNN value does not demand the impossible).
    With TF32 allowed cuDNN may still keep some of its GEMMs in full fp32, so
    there the baseline is the larger of cuDNN's error and that of the same layer in
    plain torch ops (the reference backend: every GEMM through cuBLAS in TF32)."""
    triton_backend.path = path
    triton_backend.fp32_precision = precision
    T, B, I = 24, 10, 96
    ok, why = triton_backend.supports(torch.device("cuda"), dtype, LayerSizes(T=T, B=B, H=H, P=P))
    if not ok:
        pytest.skip(why)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(5)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dev)

    k = H ** -0.5
    params64 = [r(4 * H, I, scale=k), r(4 * H, P, scale=k), r(4 * H, scale=k), r(4 * H, scale=k)]
    if P != H:
        params64.append(r(P, H, scale=k))
    x64, h064, c064 = r(T, B, I), r(B, P), r(B, H)
    upstream = [r(T, B, P), r(B, P), r(B, H)]

    with tf32(precision == "tf32"):
        truth = _lstm_grads(_cudnn, x64, h064, c064, params64, upstream)
        low = [t.to(dtype) for t in (x64, h064, c064)]
        lowp = [p.to(dtype) for p in params64]
        baselines = [_lstm_grads(_cudnn, *low, lowp, upstream)]
        if precision == "tf32":
            baselines.append(_lstm_grads(_layer("reference"), *low, lowp, upstream))
        ours = _lstm_grads(_layer("triton"), *low, lowp, upstream)
    eps = torch.finfo(dtype).eps
    for k, (name, t, a) in enumerate(zip(GPU_NAMES, truth, ours)):
        err_ours = (a - t).abs().max().item()
        err_base = max((b[k] - t).abs().max().item() for b in baselines)
        bound = 2 * err_base + eps * t.abs().max().item()
        assert err_ours <= bound, f"{name}: ours {err_ours:.3e} > 2 x baseline {err_base:.3e} (+1 ulp)"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path", ["step", "sequence"])
@pytest.mark.parametrize("packed,reverse", [(False, False), (True, False), (True, True), (False, True)])
def test_gpu_fp32_ieee_matches_reference(triton_backend, path, packed, reverse):
    """Same check as the interpreter tests, on the GPU with exact fp32 dots."""
    triton_backend.path = path
    triton_backend.fp32_precision = "ieee"
    with tf32(False):
        T, B, H = 7, 19, 33
        bs = _batch_sizes(T, B, seed=11) if packed else None
        leaves = layer_inputs(T, B, H, H, torch.float32, DEVICE, batch_sizes=bs)
        ref = run_layer("reference", leaves, bs, reverse)
        ours = run_layer("triton", leaves, bs, reverse)
    assert_results_close(ours, ref, torch.float32, path)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path", ["step", "sequence"])
def test_gpu_no_recompile_for_new_T_or_B(triton_backend, path):
    """T and B are runtime values: new T and B (same power-of-two bucket of B)
    reuse the compiled kernels."""
    triton_backend.path = path
    step_k, seq_k = triton_backend._kernels()
    kernels = ([step_k.lstm_fwd_step_kernel, step_k.lstm_bwd_step_kernel] if path == "step"
               else [seq_k.lstm_fwd_seq_kernel, seq_k.lstm_bwd_seq_kernel])

    def n_compiled():
        try:
            return sum(len(c[0]) for k in kernels for c in k.fn.device_caches.values())
        except AttributeError:
            pytest.skip("this triton version keeps no device_caches to count")

    def call(T, B):
        leaves = layer_inputs(T, B, 32, 32, torch.float16, DEVICE)
        run_layer("triton", leaves)

    call(5, 9)
    before = n_compiled()
    call(11, 13)
    call(3, 16)
    torch.cuda.synchronize()
    assert n_compiled() == before


# ------------------------------------------------------ offsets beyond int32
def test_int32_limits_in_supports(triton_backend):
    """Activations of T*B*4H >= 2^31 elements are served (the kernels index rows in int64); a W_hh of
    2^31 elements (int32 weight offsets) and an H whose step grid exceeds CUDA's second axis are refused,
    each with the limit in the reason. Sizes only: nothing is allocated."""
    from lstm_fast.backends import triton_gpu

    b = triton_backend
    b.path = "auto"
    for sizes in (LayerSizes(T=65, B=2 ** 20, H=8, P=8), LayerSizes(T=2 ** 20, B=4096, H=256, P=256),
                  LayerSizes(T=3, B=2 ** 31 - 1, H=512, P=512), LayerSizes(T=3, B=2, H=23170, P=23170)):
        assert b.supports(DEVICE, torch.float32, sizes)[0], sizes
    ok, why = b.supports(DEVICE, torch.float32, LayerSizes(T=3, B=2, H=23171, P=23171))
    assert not ok and "2^31" in why and "W_hh" in why
    limit = triton_gpu._MIN_BLOCK_H * triton_gpu._MAX_GRID_Y
    assert b.supports(DEVICE, torch.float32, LayerSizes(T=3, B=2, H=limit, P=1))[0]
    ok, why = b.supports(DEVICE, torch.float32, LayerSizes(T=3, B=2, H=limit + 1, P=1))
    assert not ok and "65535" in why
    step_k, _ = b._kernels()
    assert min(c.kwargs["BLOCK_H"] for c in step_k._FWD_GPU) == triton_gpu._MIN_BLOCK_H


@pytest.mark.skipif(not INTERP, reason="interpreter tests run where there is no GPU")
def test_interpreter_step_beyond_int32_offsets():
    """One forward step at t = T-1 of a gx [T, B, 4H] with more than 2^31 elements: its rows start past
    int32's range, which the interpreter's int32 arithmetic wraps as the GPU's does. Only that step's
    slice is written, so the 4 GiB buffer stays address space, not memory. In a child process: a
    wrapped offset reads outside the buffer and may crash it."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; "
            "import test_triton as m; m._step_beyond_int32()")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _step_beyond_int32():
    from lstm_fast.backends.triton_gpu import triton_cdiv

    step_k, _ = get_backend("triton")._kernels()
    H = P = 16
    B, G = 4, 64
    T = 2 ** 31 // (B * G) + 2
    try:
        gx = torch.empty(T, B, G, dtype=torch.float16)
    except RuntimeError as exc:
        print(f"cannot reserve {T * B * G * 2 / 2 ** 30:.1f} GiB of address space: {exc}")
        sys.exit(3)
    t = T - 1
    assert t * B * G >= 2 ** 31
    g = torch.Generator().manual_seed(3)
    gx[t] = torch.randn(B, G, generator=g).half()
    w = (torch.randn(G, P, generator=g) * 0.4).half()
    y_ext = torch.randn(2, B, P, generator=g).half()  # rows 0..B-1: h_{t-1}; rows B..2B-1 receive h_t
    cells = torch.randn(2, B, H, generator=g)  # the same for c_{t-1}, c_t
    h0, c0 = torch.zeros(B, P).half(), torch.zeros(B, H)  # not read: every row continues (N_PREV = B)
    step_k.lstm_fwd_step_kernel[lambda m: (triton_cdiv(B, m["BLOCK_B"]), triton_cdiv(H, m["BLOCK_H"]))](
        gx, w, h0, y_ext, y_ext, c0, cells, cells, cells, h0, h0, h0, B, B, t * B, 0, B, 0, B,
        H=H, P=P, B_BUCKET=step_k.bucket(B), SAVE=False, RMASK=False, ZONE_C=False, ZONE_H=False,
        DOT_PRECISION="ieee")
    z = gx[t].double() + y_ext[0].double() @ w.double().T
    i, f, gg, o = torch.sigmoid(z[:, :H]), torch.sigmoid(z[:, H:2 * H]), torch.tanh(z[:, 2 * H:3 * H]), \
        torch.sigmoid(z[:, 3 * H:])
    c = f * cells[0].double() + i * gg
    torch.testing.assert_close(cells[1].double(), c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_ext[1].double(), o * torch.tanh(c), rtol=2e-3, atol=2e-3)


@gpu
@pytest.mark.gpu
def test_gpu_beyond_int32_offsets():
    """gx, gates and their gradients with T*B*4H > 2^31 elements (H=8, B=2^20, T=65, float16, ~35 GB at
    peak): the cuda backend and both triton paths match the reference on the rows at both ends of the
    batch, the last step's rows lying past int32 offsets. One test, backends in turn: memory is freed
    between them."""
    import lstm_fast.backends as registry

    T, B, H = 65, 2 ** 20, 8
    assert T * B * 4 * H > 2 ** 31
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(7)
    rows = torch.cat([torch.arange(3), torch.arange(B - 16, B)]).to(dev)
    triton = registry.get_backend("triton")
    saved = triton.path
    try:
        for name, path in (("cuda", None), ("triton", "step"), ("triton", "sequence")):
            ok, why = registry.get_backend(name).is_available()
            if not ok:
                pytest.fail(f"a GPU is visible but {name} is not usable: {why}")
            if path:
                triton.path = path
            gx = torch.randn(T, B, 4 * H, device=dev, dtype=torch.float16, generator=g).requires_grad_()
            h0, c0 = (torch.randn(B, H, device=dev, dtype=torch.float16, generator=g).requires_grad_()
                      for _ in range(2))
            w_hh = (torch.randn(4 * H, H, device=dev, dtype=torch.float16, generator=g) * 0.4).requires_grad_()
            y, h, c = lstm_recurrence(gx, h0, c0, w_hh, None, backend=name)
            gy = torch.randn(T, B, H, device=dev, dtype=torch.float16, generator=g)
            d_gx, d_h0, d_c0 = torch.autograd.grad(y, [gx, h0, c0], grad_outputs=gy)
            got = [y[:, rows], h[rows], c[rows], d_gx[:, rows], d_h0[rows], d_c0[rows]]
            del y, h, c, d_gx, d_h0, d_c0
            leaves = [t.detach()[:, rows].double().requires_grad_() if t.dim() == 3 else
                      t.detach()[rows].double().requires_grad_() for t in (gx, h0, c0)]
            del gx
            torch.cuda.empty_cache()
            w64 = w_hh.detach().double()
            y_r, h_r, c_r = lstm_recurrence(*leaves, w64, None, backend="reference")
            want = [y_r, h_r, c_r, *torch.autograd.grad(y_r, leaves, grad_outputs=gy[:, rows].double())]
            label = f"{name} {path or ''}"
            for k, (a, b) in enumerate(zip(got, want)):
                torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2,
                                           msg=lambda m, k=k, label=label: f"{label} output {k}: {m}")
            del got, want, leaves
            torch.cuda.empty_cache()
    finally:
        triton.path = saved
