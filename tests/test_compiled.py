"""What is unique to the compiled extension's backends (`cpp`, `cuda`).

The comparisons every backend shares (torch.nn.LSTM, the reference, gradcheck,
16-bit) are in test_drop_in.py. Here: the cpp time loop split over threads
above its threshold, the custom ops themselves (opcheck: schema, fake kernels,
torch.compile's AOT dispatch), their input validation and what they save, and
the cuda backend's capability rules.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_results_close, layer_inputs, needs_cpp, run_layer
from lstm_fast.backends import get_backend

CUDA_OK, CUDA_WHY = get_backend("cuda").is_available()
# Skipped only where no GPU is visible: with one, an unusable cuda backend (say a
# CPU-only build of the extension) makes these tests fail with its reason, not pass
# by skipping.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible")


def op_inputs(T, B, H, P, dtype, device="cpu", I=None, bias=True, seed=0, batch_sizes=None):
    """layer_inputs as plain tensors, for calling the ops directly."""
    leaves = layer_inputs(T, B, H, P, dtype, device, I=I, bias=bias, seed=seed, batch_sizes=batch_sizes)
    return {k: v.detach() for k, v in leaves.items()}


# Above the cpp backend's split threshold (B*4H*P >= 8192, csrc/lstm_cpu.cpp): the
# time loop runs split over threads, by hidden units with one barrier per step below
# 4 rows a thread, by batch rows (cut by work when packed) from there.
# (T, B, H, P, batch_sizes, reverse)
SPLIT_CASES = [
    (7, 6, 40, 40, None, False),
    (7, 6, 40, 40, (6, 6, 5, 4, 4, 2, 1), False),
    (7, 6, 40, 40, None, True),
    (7, 6, 40, 24, (6, 5, 5, 3, 2, 1, 1), False),   # projection, packed
    (7, 6, 40, 40, (6, 6, 5, 4, 4, 2, 1), True),    # packed, reverse: rows join as it runs
    (7, 6, 40, 24, (6, 5, 5, 3, 2, 1, 1), True),    # projection, packed, reverse
    (6, 5, 33, 33, (5, 5, 4, 3, 1, 1), False),      # uneven split with a vector tail
    (6, 6, 33, 17, None, True),                     # projection, reverse
    (5, 8, 40, 40, None, False),                    # by rows
    (7, 9, 40, 40, (9, 9, 8, 6, 4, 2, 1), True),    # by rows, packed, reverse
    (6, 12, 33, 17, (12, 11, 11, 7, 3, 1), False),  # by rows, projection, packed
]


@needs_cpp
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("entry", ["recurrence", "projected"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("T,B,H,P,batch_sizes,reverse", SPLIT_CASES)
def test_cpp_threaded_matches_reference(T, B, H, P, batch_sizes, reverse, dtype, entry, threads):
    """Outputs and every gradient with the time loop split across threads (lstm_forward,
    and lstm_forward_projected, whose threads also project their own gate columns)."""
    bs = None if batch_sizes is None else torch.tensor(batch_sizes)
    leaves = layer_inputs(T, B, H, P, dtype, "cpu", I=5 if entry == "projected" else None, batch_sizes=batch_sizes)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run_layer("cpp", leaves, bs, reverse)
    finally:
        torch.set_num_threads(before)
    assert_results_close(ours, run_layer("reference", leaves, bs, reverse), dtype, f"cpp {threads} threads")


@needs_cpp
@pytest.mark.parametrize("projected", [False, True], ids=["lstm_forward", "lstm_forward_projected"])
def test_cpp_ops_save_nothing_without_grad(projected):
    """need_grad=False: the ops return empty gates and cells (nothing kept for backward)."""
    bs = (4, 3, 3, 2, 1)
    t = op_inputs(5, 4, 8, 8, torch.float32, I=3 if projected else None, batch_sizes=bs)
    state = (t["h0"], t["c0"], t["w_hh"], None, torch.tensor(bs), False)
    for need_grad in (False, True):
        if projected:
            out = torch.ops.lstm_fast.lstm_forward_projected(t["x"], t["w_ih"], t["b_ih"], *state, need_grad)
        else:
            out = torch.ops.lstm_fast.lstm_forward(t["gx"], *state, need_grad)
        gates, cells = out[3:]
        assert (gates.numel() > 0) == need_grad and (cells.numel() > 0) == need_grad


@needs_cpp
def test_cpp_rejects_bad_input():
    t = op_inputs(3, 2, 4, 4, torch.float32)
    gx, h0, c0, w_hh = t["gx"], t["h0"], t["c0"], t["w_hh"]
    with pytest.raises(RuntimeError, match="w_hh must be"):
        torch.ops.lstm_fast.lstm_forward(gx, h0, c0, w_hh[:, :3], None, None, False, False)
    with pytest.raises(RuntimeError, match="non-increasing"):
        torch.ops.lstm_fast.lstm_forward(gx.reshape(6, -1)[:5], h0, c0, w_hh, None, torch.tensor([1, 2, 2]), False,
                                         False)
    with pytest.raises(RuntimeError, match="batch_sizes sum to 5"):
        torch.ops.lstm_fast.lstm_forward(gx.reshape(6, -1), h0, c0, w_hh, None, torch.tensor([2, 2, 1]), False, False)
    with pytest.raises(RuntimeError, match="packed gx must be"):
        torch.ops.lstm_fast.lstm_forward(gx, h0, c0, w_hh, None, torch.tensor([2, 2, 2]), False, False)
    with pytest.raises(RuntimeError, match="float32 and float64 only"):
        torch.ops.lstm_fast.lstm_forward(gx.half(), h0.half(), c0.half(), w_hh.half(), None, None, False, False)


def op_args(T, B, H, P, batch_sizes, reverse, dtype, device, need_grad):
    t = op_inputs(T, B, H, P, dtype, device, batch_sizes=batch_sizes)
    return (t["gx"], t["h0"], t["c0"], t["w_hh"], t.get("w_hr"), batch_sizes, reverse, need_grad)


def check_ops(device, dtype):
    for T, B, H, P, bs, reverse in [(4, 3, 8, 8, None, False), (5, 3, 8, 5, (3, 3, 2, 1, 1), False),
                                    (5, 3, 8, 8, (3, 3, 2, 1, 1), True), (4, 2, 8, 5, None, True)]:
        bs = None if bs is None else torch.tensor(bs)
        for need_grad in (False, True):
            torch.library.opcheck(torch.ops.lstm_fast.lstm_forward.default,
                                  op_args(T, B, H, P, bs, reverse, dtype, device, need_grad))
        fwd = op_args(T, B, H, P, bs, reverse, dtype, device, True)
        gx, h0, c0, w_hh, w_hr, bs, _, _ = fwd
        y, h_n, c_n, gates, cells = torch.ops.lstm_fast.lstm_forward(*fwd)
        bwd = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), gates, cells, y, h0, c0, w_hh,
               w_hr, bs, reverse)
        torch.library.opcheck(torch.ops.lstm_fast.lstm_backward.default, bwd)


@needs_cpp
def test_cpp_opcheck():
    check_ops("cpu", torch.float32)


def projected_args(T, B, I, H, P, batch_sizes, reverse, dtype, need_grad, bias=True):
    """lstm_forward_projected's arguments: x, w_ih, bias (b_ih + b_hh), h0, c0, w_hh, w_hr,
    batch_sizes, reverse, need_grad."""
    t = op_inputs(T, B, H, P, dtype, I=I, bias=bias, seed=5, batch_sizes=batch_sizes)
    b = t["b_ih"] + t["b_hh"] if bias else None
    bs = None if batch_sizes is None else torch.tensor(batch_sizes)
    return t["x"], t["w_ih"], b, t["h0"], t["c0"], t["w_hh"], t.get("w_hr"), bs, reverse, need_grad


@needs_cpp
@pytest.mark.parametrize("split", ["0", "1000000000"], ids=["split", "1thread"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpp_forward_projected(dtype, split):
    """The op that projects x inside the time loop equals projecting first, then lstm_forward;
    opcheck on its schema and fake kernel."""
    here = os.path.dirname(os.path.abspath(__file__))
    cases = [(6, 5, 7, 16, 16, None, False, True), (7, 4, 12, 8, 5, (4, 4, 3, 3, 2, 1, 1), False, False),
             (7, 4, 12, 8, 8, (4, 4, 3, 3, 2, 1, 1), True, True), (5, 13, 3, 24, 24, None, True, True)]
    code = (
        f"import torch, lstm_fast, sys; sys.path.insert(0, {here!r}); from test_compiled import projected_args;"
        "from helpers import TOL; from lstm_fast.backends import get_backend; get_backend('cpp').is_available();"
        f"dtype = {dtype}; cases = {cases!r}\n"
        "for T, B, I, H, P, bs, reverse, bias in cases:\n"
        "    for need_grad in (False, True):\n"
        "        a = projected_args(T, B, I, H, P, bs, reverse, dtype, need_grad, bias)\n"
        "        got = torch.ops.lstm_fast.lstm_forward_projected(*a)\n"
        "        gx = torch.nn.functional.linear(a[0], a[1], a[2])\n"
        "        want = torch.ops.lstm_fast.lstm_forward(gx, *a[3:])\n"
        "        for n, u, v in zip(['y', 'h_n', 'c_n', 'gates', 'cells'], got, want):\n"
        "            torch.testing.assert_close(u, v, **TOL[dtype], msg=n)\n"
        "        torch.library.opcheck(torch.ops.lstm_fast.lstm_forward_projected.default, a)\n")
    # the split threshold is read once per process, so each setting runs in its own
    env = dict(os.environ, LSTM_FAST_CPU_SPLIT_MIN=split)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@needs_cpp
def test_cpp_forward_projected_rejects_bad_input():
    x, w_ih, b, h0, c0, w_hh, _, _, _, _ = projected_args(3, 2, 5, 4, 4, None, False, torch.float32, False)
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
@pytest.mark.gpu
@needs_cuda
def test_cuda_opcheck(dtype):
    check_ops("cuda", dtype)


def test_cuda_serves_activations_beyond_int32_offsets():
    """The cuda backend takes T*B*4H >= 2^31 (the GPU run checks the results: test_triton.py's
    test_gpu_beyond_int32_offsets), because every offset its kernels compute is int64_t: no int or
    unsigned local inside a __global__ function, grid-stride loops over int64_t. Sizes and source only."""
    import re

    from lstm_fast import _sources
    from lstm_fast.backends.base import LayerSizes

    sizes = LayerSizes(T=65, B=2 ** 20, H=8, P=8)
    assert 65 * 2 ** 20 * 32 > 2 ** 31
    for dtype in (torch.float32, torch.float16):
        assert get_backend("cuda").supports(torch.device("cuda"), dtype, sizes)[0]
    with open(os.path.join(_sources.folder("lstm_fast._csrc"), "cuda", "lstm_cuda.cu")) as f:
        src = f.read()
    kernels = re.findall(r"__global__ void (\w+)\((.*?)\n}\n", src, flags=re.S)
    assert len(kernels) >= 3, "kernel bodies not found: the check below would pass vacuously"
    for name, body in kernels:
        assert not re.search(r"\b(int|unsigned|int32_t|uint32_t|long)\s+\w+\s*[=;,)]", body), name
        loops = re.findall(r"for \((\w+) ", body)
        assert loops and set(loops) == {"int64_t"}, (name, loops)
