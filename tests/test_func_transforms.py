"""torch.func and batched gradients through lstm_fast.LSTM, every backend.

The kernels of numba, Triton and the compiled extension take plain tensors; the
autograd.Function's vmap rule and the batched backward op hand them one element
at a time. float64, so that every comparison is tight (TOL in helpers.py).
"""
import pytest
import torch
from torch.func import functional_call, grad, jacrev, vjp, vmap

from helpers import BACKEND_NAMES, assert_close, device_of_tests, from_torch, require

DEVICE = device_of_tests()
DTYPE = torch.float64
KWARGS = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)
T, B = 4, 3


def _pair(backend):
    require(backend, DEVICE, DTYPE, T=T, B=B, H=5, P=2)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(**KWARGS, device=DEVICE, dtype=DTYPE)
    return ref, from_torch(ref, backend)


def _loss(module, params, x):
    y, (h, c) = functional_call(module, params, (x,))
    return y.pow(2).sum() + h.sin().sum() + (c * c).sum()


def _params(module):
    return {n: p.detach() for n, p in module.named_parameters()}


def _assert_dicts_close(ours, ref, what):
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close(ours[name], ref[name], DTYPE, f"{what} {name}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_func_grad_and_vjp_over_functional_call(backend):
    ref, ours = _pair(backend)
    x = torch.randn(T, B, 3, device=DEVICE, dtype=DTYPE)
    g_ref = grad(lambda p, x: _loss(ref, p, x), argnums=(0, 1))(_params(ref), x)
    g_ours = grad(lambda p, x: _loss(ours, p, x), argnums=(0, 1))(_params(ours), x)
    _assert_dicts_close(g_ours[0], g_ref[0], "torch.func.grad")
    assert_close(g_ours[1], g_ref[1], DTYPE, "torch.func.grad x")

    def outputs(module):
        return lambda p: functional_call(module, p, (x,))[0]

    y_ref, pull_ref = vjp(outputs(ref), _params(ref))
    y_ours, pull_ours = vjp(outputs(ours), _params(ours))
    assert_close(y_ours, y_ref, DTYPE, "vjp output")
    cot = torch.randn_like(y_ref)
    _assert_dicts_close(pull_ours(cot)[0], pull_ref(cot)[0], "vjp")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_per_sample_gradients_with_vmap_of_grad(backend):
    """vmap(grad(...)) over the batch against a loop of plain autograd, one sample at a
    time (torch.nn.LSTM's own vmap(grad) fails on CPU in torch 2.14.1)."""
    _, ours = _pair(backend)
    x = torch.randn(B, T, 3, device=DEVICE, dtype=DTYPE)  # one [T, 1, I] sequence per sample

    def sample_loss(p, xs):
        return _loss(ours, p, xs.unsqueeze(1))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))(_params(ours), x)
    for b in range(B):
        ours.zero_grad()
        _loss(ours, dict(ours.named_parameters()), x[b].unsqueeze(1)).backward()
        expected = {n: p.grad for n, p in ours.named_parameters()}
        _assert_dicts_close({n: g[b] for n, g in per_sample.items()}, expected, f"sample {b}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_jacrev_of_the_output(backend):
    ref, ours = _pair(backend)
    x = torch.randn(2, 1, 3, device=DEVICE, dtype=DTYPE)  # small: jacrev vmaps over every output element
    j_ref = jacrev(lambda x: ref(x)[0])(x)
    j_ours = jacrev(lambda x: ours(x)[0])(x)
    assert_close(j_ours, j_ref, DTYPE, "jacrev")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_autograd_grad_with_batched_grads(backend):
    """torch.autograd.grad(..., is_grads_batched=True), which gradcheck uses, vmaps the
    backward over a batch of upstream gradients."""
    ref, ours = _pair(backend)
    x0 = torch.randn(T, B, 3, device=DEVICE, dtype=DTYPE)
    torch.manual_seed(1)
    cots = torch.randn(4, T, B, 4, device=DEVICE, dtype=DTYPE)  # 4 upstream gradients of y [T, B, 2P]
    results = []
    for module in (ref, ours):
        x = x0.clone().requires_grad_()
        y, _ = module(x)
        wrt = [x, *module.parameters()]
        results.append(torch.autograd.grad(y, wrt, cots, is_grads_batched=True))
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, g_ours, g_ref in zip(names, results[1], results[0]):
        assert_close(g_ours, g_ref, DTYPE, f"batched grad {name}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_vmap_of_inference(backend):
    """vmap of the forward alone (no gradient) equals one call per element."""
    _, ours = _pair(backend)
    x = torch.randn(2, T, B, 3, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        y = vmap(lambda xs: ours(xs)[0])(x)
        for i in range(2):
            assert_close(y[i], ours(x[i])[0], DTYPE, f"vmap element {i}")


def test_forward_mode_is_refused_clearly():
    """README: forward-mode AD is not supported (no jvp rule); it must fail loudly."""
    _, ours = _pair("reference")
    x = torch.randn(T, B, 3, device=DEVICE, dtype=DTYPE)
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(lambda x: ours(x)[0], (x,), (torch.ones_like(x),))
