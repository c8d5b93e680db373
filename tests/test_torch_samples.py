"""PyTorch's own sample and error inputs for nn.LSTM / nn.LSTMCell (torch.testing's module_db),
run through lstm_fast's modules for every backend."""
import pytest
import torch
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import lstm_fast
from helpers import BACKEND_NAMES, TOL, device_of_tests, require

DEVICE = device_of_tests()
INFOS = {info.module_cls: info for info in module_db if info.module_cls in (torch.nn.LSTM, torch.nn.LSTMCell)}
OURS = {torch.nn.LSTM: lstm_fast.LSTM, torch.nn.LSTMCell: lstm_fast.LSTMCell}


def _flatten(out):
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [out]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("module_cls", list(OURS), ids=lambda c: c.__name__)
def test_sample_inputs_match(module_cls, backend, dtype):
    require(backend, DEVICE, dtype, T=3, B=1, H=3, P=2)
    info = INFOS[module_cls]
    samples = info.module_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=True, training=False)
    assert samples
    for sample in samples:
        c = sample.constructor_input
        torch.manual_seed(0)
        ref = module_cls(*c.args, **c.kwargs, device=DEVICE, dtype=dtype)
        ours = OURS[module_cls](*c.args, **c.kwargs, device=DEVICE, dtype=dtype, backend=backend)
        ours.load_state_dict(ref.state_dict())
        f = sample.forward_input
        out_ref, out_ours = _flatten(ref(*f.args, **f.kwargs)), _flatten(ours(*f.args, **f.kwargs))
        for a, b in zip(out_ours, out_ref, strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype])
        if sample.reference_fn is not None:
            # torch wraps it as reference_fn(module, *args, **kwargs) on deep copies
            expected = _flatten(sample.reference_fn(ours, *f.args, **f.kwargs))
            for a, b in zip(out_ours, expected, strict=True):
                torch.testing.assert_close(a, b, **TOL[dtype])
        leaves = [t for t in _flatten((f.args, list(f.kwargs.values()))) if isinstance(t, torch.Tensor)]
        wrt_r = leaves + list(ref.parameters())
        g_r = torch.autograd.grad(sum(o.sum() for o in out_ref), wrt_r, allow_unused=True)
        g_o = torch.autograd.grad(sum(o.sum() for o in out_ours), leaves + list(ours.parameters()),
                                  allow_unused=True)
        for a, b in zip(g_o, g_r, strict=True):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("module_cls", list(OURS), ids=lambda c: c.__name__)
def test_error_inputs_match(module_cls):
    info = INFOS[module_cls]
    cases = info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float32, requires_grad=False,
                                          training=False)
    assert cases
    for case in cases:
        m = case.module_error_input
        c = m.constructor_input
        with pytest.raises(case.error_type, match=case.error_regex):
            ours = OURS[module_cls](*c.args, **c.kwargs)
            if case.error_on == ModuleErrorEnum.FORWARD_ERROR:
                ours(*m.forward_input.args, **m.forward_input.kwargs)
