"""Variable-length input beyond PackedSequence itself (test_drop_in.py covers packed
modules against torch.nn.LSTM): lengths= on padded input, and inference of long
sequences in blocks of steps, in every backend."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

from helpers import BACKEND_NAMES, assert_close, device_of_tests, from_torch, require
from lstm_fast.backends import base

DEVICE = device_of_tests()
DTYPES = [torch.float64, torch.float32]


class PackedTorch(torch.nn.Module):
    """torch.nn.LSTM with the pack / unpack boilerplate lengths= replaces."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, lengths, hx):
        packed = pack_padded_sequence(x, lengths, batch_first=self.lstm.batch_first, enforce_sorted=False)
        out, hidden = self.lstm(packed, hx)
        T = x.shape[1 if self.lstm.batch_first else 0]
        return pad_packed_sequence(out, batch_first=self.lstm.batch_first, total_length=T)[0], hidden


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("lengths_as", ["tensor", "list"])
@pytest.mark.parametrize("kwargs", [dict(batch_first=True, num_layers=2, bidirectional=True, proj_size=3),
                                    dict(batch_first=False, bidirectional=True)], ids=["bf_L2_bi_proj", "tm_bi"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_lengths_equals_packing(backend, kwargs, lengths_as, dtype):
    """forward(x, lengths=...) is the packed computation with enforce_sorted=False:
    padded output with zeros past each length, final states at each length, every
    gradient (x, the initial states and the parameters), in any order of lengths and
    either batch_first."""
    require(backend, DEVICE, dtype, T=6, B=5, H=6, P=kwargs.get("proj_size") or 6, packed=True, reverse=True)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 6, **kwargs).to(DEVICE, dtype)
    ours = from_torch(ref, backend)
    lengths = torch.tensor([3, 6, 1, 5, 6])
    shape = (5, 6, 4) if kwargs["batch_first"] else (6, 5, 4)
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    D = ref.num_layers * (2 if ref.bidirectional else 1)
    h0 = torch.randn(D, 5, ref.proj_size or 6, device=DEVICE, dtype=dtype)
    c0 = torch.randn(D, 5, 6, device=DEVICE, dtype=dtype)
    results = []
    for module, call in ((PackedTorch(ref), lambda m, x, hx: m(x, lengths, hx)),
                         (ours, lambda m, x, hx: m(x, hx, lengths=lengths if lengths_as == "tensor"
                                                   else lengths.tolist()))):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        out, (h, c) = call(module, leaves[0], tuple(leaves[1:]))
        torch.manual_seed(1)
        loss = sum((t * torch.randn_like(t)).sum() for t in (out, h, c))
        grads = torch.autograd.grad(loss, [*leaves, *module.parameters()])
        results.append((out, h, c, grads))
    (out_r, h_r, c_r, g_r), (out_o, h_o, c_o, g_o) = results
    for name, a, b in (("output", out_o, out_r), ("h_n", h_o, h_r), ("c_n", c_o, c_r)):
        assert_close(a, b, dtype, f"{backend} {name}")
    t = torch.arange(6)
    past = (t[None, :] >= lengths[:, None]) if kwargs["batch_first"] else (t[:, None] >= lengths[None, :])
    assert torch.count_nonzero(out_o[past.to(DEVICE)]) == 0, "output past a length must be zero"
    for i, (a, b) in enumerate(zip(g_o, g_r)):
        assert_close(a, b, dtype, f"{backend} grad {i}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_inference_in_blocks_of_steps(backend, monkeypatch):
    """Without grad the projection runs in blocks of steps (bounded memory): a sequence
    spanning several blocks gives the one-block result, dense and packed, both
    directions. Python-side blocks are made small here; the cpp loop's own block
    (4M gx elements) is crossed by T*B*4H = 1100*4*1024."""
    dtype = torch.float64
    require(backend, DEVICE, dtype, T=1100, B=4, H=256, packed=True, reverse=True)
    monkeypatch.setattr(base, "BLOCK_ELEMENTS", 4 * 4 * 256 * 7)  # 7 steps of B=4, H=256
    torch.manual_seed(0)
    T = 1100 if backend == "cpp" else 40
    ref = torch.nn.LSTM(3, 256, bidirectional=True).to(DEVICE, dtype)
    ours = from_torch(ref, backend)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randn(n, 3, generator=g, dtype=dtype).to(DEVICE) for n in (T, T - 5, 17, 1)]
    for inp in (pack_sequence(seqs), torch.randn(T, 4, 3, generator=g, dtype=dtype).to(DEVICE)):
        with torch.no_grad():
            want, (h_r, c_r) = ref(inp)
            got, (h_o, c_o) = ours(inp)
        for name, a, b in (("output", got, want), ("h_n", h_o, h_r), ("c_n", c_o, c_r)):
            assert_close(getattr(a, "data", a), getattr(b, "data", b), dtype, f"{backend} {name}")
