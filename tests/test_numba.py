"""Numba backend against the reference backend (the spec), case by case.

Tolerances, relative to the largest magnitude of the reference tensor:
- float64: 1e-10. Both sides are exact float64 math that differs only in summation
  order (BLAS vs our loops); observed differences are ~1e-15.
- float32: 1e-5. float32 rounding (eps 6e-8) accumulated over T steps and K-long dot
  products, plus the rational tanh/sigmoid of the float32 kernels (max abs error
  3.5e-7); observed differences are <= 5e-7.
"""
import os
import subprocess
import sys

import pytest
import torch

from lstm_fast.backends import get_backend
from lstm_fast.backends.base import LayerSizes, LSTMState, RecurrentWeights, SequenceLayout
from lstm_fast.function import lstm_recurrence

backend = get_backend("numba")
ok, why = backend.is_available()
pytestmark = pytest.mark.skipif(not ok, reason=f"numba backend unavailable: {why}")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_inputs(T, B, H, P, dtype, packed=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    bs = None
    if packed:
        # non-increasing, first step full, last step partial: every row length differs
        bs = torch.sort(torch.randint(1, B + 1, (T,), generator=g), descending=True).values
        bs[0] = B
        bs[-1] = min(bs[-1].item(), max(1, B // 3))
    gx = rnd(T, B, 4 * H) if bs is None else rnd(int(bs.sum()), 4 * H)  # packed: PackedSequence's layout
    h0, c0 = rnd(B, P), rnd(B, H)
    w_hh = rnd(4 * H, P, scale=P ** -0.5)
    w_hr = rnd(P, H, scale=H ** -0.5) if P != H else None
    return gx, h0, c0, w_hh, w_hr, bs


def run(name, inputs, reverse, seed=1):
    gx, h0, c0, w_hh, w_hr, bs = inputs
    y, hn, cn = lstm_recurrence(gx, h0, c0, w_hh, w_hr, batch_sizes=bs, reverse=reverse, backend=name)
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (y, hn, cn)]
    loss = sum((t * u).sum() for t, u in zip((y, hn, cn), ups))
    params = [t for t in (gx, h0, c0, w_hh, w_hr) if t is not None]
    grads = torch.autograd.grad(loss, params)
    return [y, hn, cn, *grads]


NAMES = ["y", "h_n", "c_n", "d_gx", "d_h0", "d_c0", "d_w_hh", "d_w_hr"]

CASES = [
    # T, B, H, P, packed, reverse
    (5, 3, 8, 8, False, False),     # rows left over from 4-row blocks
    (5, 3, 8, 8, False, True),
    (6, 12, 16, 16, False, False),  # 4-row blocks only
    (6, 12, 16, 16, False, True),
    (9, 12, 16, 16, True, False),   # packed: active rows shrink across block boundaries
    (9, 12, 16, 5, True, False),    # packed + projection
    (9, 12, 16, 16, True, True),    # packed, reverse: rows join as the loop runs
    (9, 12, 16, 5, True, True),     # packed + projection, reverse
    (4, 10, 12, 7, False, True),    # projection, reverse
    (3, 2, 6, 3, False, False),     # projection, small batch
    (1, 4, 8, 8, False, False),     # T = 1
    (6, 1, 8, 8, False, False),     # B = 1
    (6, 3, 1, 1, False, True),      # H = 1
    (5, 9, 33, 33, True, False),    # H = 33 (odd, not a multiple of the unroll)
    (4, 5, 40, 40, False, False),   # 4-panel and 1-panel kernels on the leftover row
]


@pytest.mark.parametrize("split", [False, True], ids=["1thread", "split"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T,B,H,P,packed,reverse", CASES)
def test_matches_reference(T, B, H, P, packed, reverse, dtype, split, monkeypatch):
    """split: the time loop cut into chunks of hidden units over torch's threads
    (forced for these small sizes); with one thread the chunks run one after another."""
    from lstm_fast.backends.numba import threads as numba_threads

    if split:
        monkeypatch.setattr(numba_threads, "SPLIT_MIN", 0)
        monkeypatch.setattr(numba_threads, "chunk_count", lambda B, H, P: 2)
    inputs = make_inputs(T, B, H, P, dtype, packed)
    ours = run("numba", inputs, reverse)
    ref = run("reference", inputs, reverse)
    for name, a, b in zip(NAMES, ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = b.abs().max().item() or 1.0
        err = (a - b).abs().max().item() / scale
        assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def test_inference_saves_nothing():
    gx, h0, c0, w_hh, w_hr, _ = make_inputs(3, 4, 8, 8, torch.float32)
    state, weights = LSTMState(h0.detach(), c0.detach()), RecurrentWeights(w_hh.detach())
    y, hn, cn, saved = backend.forward(gx.detach(), state, weights, SequenceLayout(), False)
    assert saved == ()
    _, _, _, saved = backend.forward(gx.detach(), state, weights, SequenceLayout(), True)
    assert [tuple(s.shape) for s in saved] == [(3, 4, 32), (3, 4, 8)]


def test_supports():
    sizes = LayerSizes(T=2, B=2, H=4, P=4)
    assert backend.supports(torch.device("cpu"), torch.float32, sizes)[0]
    assert backend.supports(torch.device("cpu"), torch.float64, sizes)[0]
    for dtype in (torch.float16, torch.bfloat16):  # computed in float32 (function._run widens)
        assert backend.supports(torch.device("cpu"), dtype, sizes)[0] and backend.widens_16bit
    for device, dtype in [("cuda", torch.float32), ("cpu", torch.int32), ("cpu", torch.complex64)]:
        ok, why = backend.supports(torch.device(device), dtype, sizes)
        assert not ok and why


def _split_run(monkeypatch, team=None, threads=2):
    """Run a case with the time loop split into `threads` chunks (on `team` threads)."""
    from lstm_fast.backends.numba import threads as numba_threads

    monkeypatch.setattr(numba_threads, "SPLIT_MIN", 0)
    if team is not None:
        monkeypatch.setattr(numba_threads, "team_size", lambda n_chunks: team)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(7, 6, 24, 24, torch.float32, packed=True)
        return run("numba", inputs, False)
    finally:
        torch.set_num_threads(before)


def test_split_result_independent_of_team(monkeypatch):
    """Chunks a missing thread would have done are taken over: a team of one thread
    runs both chunks (no wait may hang); each chunk does the same arithmetic either
    way, so results are bitwise equal."""
    expect = _split_run(monkeypatch)
    got = _split_run(monkeypatch, team=1)
    for name, a, b in zip(NAMES, got, expect):
        assert torch.equal(a, b), name


def test_threads_respected(monkeypatch):
    """Chunks follow torch.get_num_threads(); numba's own thread setting is restored."""
    import numba

    from lstm_fast.backends.numba import threads as numba_threads

    seen = []
    real = numba_threads.launch

    def launch(parallel, worker, n_chunks, *args):
        seen.append(n_chunks)
        real(parallel, worker, n_chunks, *args)

    monkeypatch.setattr(numba_threads, "launch", launch)
    numba_before = numba.get_num_threads()
    _split_run(monkeypatch, threads=1)
    assert set(seen) == {1}
    seen.clear()
    _split_run(monkeypatch, threads=2)
    assert set(seen) == {min(2, numba.config.NUMBA_NUM_THREADS)}
    assert numba.get_num_threads() == numba_before


def test_import_is_cheap():
    code = ("import sys, lstm_fast.backends.numba.backend as m; "
            "assert 'numba' not in sys.modules, 'numba imported at module import'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("split", [False, True], ids=["1thread", "split"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kw,packed", [
    (dict(), False),
    (dict(bias=False, batch_first=True), False),
    (dict(proj_size=5, num_layers=2), False),
    (dict(bidirectional=True), True),
])
def test_module_fused_projection(kw, packed, dtype, split, monkeypatch):
    """The module path, where this backend computes the input projection inside its
    own launch, against torch.nn.LSTM: outputs, states and every gradient."""
    from torch.nn.utils.rnn import pack_sequence

    import lstm_fast
    from helpers import check_against
    from lstm_fast.backends.numba import threads as numba_threads

    if split:
        monkeypatch.setattr(numba_threads, "chunk_count", lambda B, H, P: 2)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(6, 20, **kw).to(dtype)
    ours = lstm_fast.LSTM.from_torch(ref, backend="numba")
    T, B = 5, 7

    def build():
        if packed:
            seqs = [torch.randn(n, 6, dtype=dtype, requires_grad=True) for n in (5, 3, 4, 1, 5, 2, 3)]
            return pack_sequence(seqs, enforce_sorted=False), None, {f"x{i}": s for i, s in enumerate(seqs)}
        shape = (B, T, 6) if kw.get("batch_first") else (T, B, 6)
        x = torch.randn(*shape, dtype=dtype, requires_grad=True)
        return x, None, {"x": x}

    check_against(ref, ours, build, dtype, f"numba {kw}")


def _split_module():
    import lstm_fast

    torch.manual_seed(0)
    ref = torch.nn.LSTM(64, 64)
    return ref, lstm_fast.LSTM.from_torch(ref, backend="numba"), torch.randn(6, 8, 64)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs(monkeypatch):
    """A child forked after the parent started numba's thread pool still computes
    (numba's OpenMP layer would abort its first parallel launch; it runs on one thread)."""
    from lstm_fast.backends.numba import threads as numba_threads

    monkeypatch.setattr(numba_threads, "SPLIT_MIN", 0)
    ref, ours, x = _split_module()
    with torch.no_grad():
        want = ours(x)[0]
    pid = os.fork()
    if pid == 0:  # child: exit code says whether it matched
        try:
            with torch.no_grad():
                got = ours(x)[0]
            os._exit(0 if torch.equal(got, want) else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_concurrent_calls(monkeypatch):
    """Calls from several Python threads at once (launches take turns) all match."""
    import threading

    from lstm_fast.backends.numba import threads as numba_threads

    monkeypatch.setattr(numba_threads, "SPLIT_MIN", 0)
    ref, ours, x = _split_module()
    with torch.no_grad():
        want = ref(x)[0]
    results, errors = [], []

    def work():
        try:
            with torch.no_grad():
                for _ in range(5):
                    results.append(ours(x)[0])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 15
    for got in results:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("split", [False, True], ids=["1thread", "split"])
def test_weight_grads_without_input_grad(split, monkeypatch):
    """Input that needs no gradient: dx is skipped, every weight gradient still matches."""
    import lstm_fast
    from lstm_fast.backends.numba import threads as numba_threads

    if split:
        monkeypatch.setattr(numba_threads, "chunk_count", lambda B, H, P: 2)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 12, num_layers=2).double()
    ours = lstm_fast.LSTM.from_torch(ref, backend="numba")
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    grads = []
    for mod in (ref, ours):
        y, (h, c) = mod(x)
        grads.append(torch.autograd.grad((y * y).sum() + h.sum() + c.sum(), list(mod.parameters())))
    for (name, _), a, b in zip(ref.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_workqueue_layer():
    """Correct results on numba's workqueue threading layer too (the layer is chosen
    per process, so this runs in a child process), with concurrent callers."""
    code = (
        "import threading, torch, lstm_fast\n"
        "from lstm_fast.backends.numba import threads as numba_threads\n"
        "numba_threads.SPLIT_MIN = 0\n"
        "torch.manual_seed(0)\n"
        "ref = torch.nn.LSTM(32, 32)\n"
        "ours = lstm_fast.LSTM.from_torch(ref, backend='numba')\n"
        "x = torch.randn(5, 4, 32)\n"
        "want = ref(x)[0].detach()\n"
        "bad = []\n"
        "def work():\n"
        "    for _ in range(3):\n"
        "        with torch.no_grad():\n"
        "            if not torch.allclose(ours(x)[0], want, rtol=2e-5, atol=2e-5): bad.append(1)\n"
        "ts = [threading.Thread(target=work) for _ in range(3)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "import numba; assert numba.threading_layer() == 'workqueue', numba.threading_layer()\n"
        "assert not bad\n")
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)


def _fully_shard():
    """torch.distributed's FSDP2 entry point, or None (it moved to torch.distributed.fsdp in 2.6)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return None
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


@pytest.mark.skipif(_fully_shard() is None, reason="torch.distributed with gloo and FSDP2 unavailable")
@pytest.mark.parametrize("split", [False, True], ids=["1thread", "split"])
def test_fsdp2_training(split, tmp_path, monkeypatch):
    """FSDP2 (fully_shard on the LSTM and on the model; one process, gloo, world size 1)
    trains as with torch.nn.LSTM. The backend once handed FSDP parameter storage that
    Tensor.numpy() had made non-resizable, so FSDP could not free it after forward, and
    returned d_h0/d_c0 in numpy-owned memory; h0 and c0 are parameters here to cover those."""
    import copy

    import torch.distributed as dist

    import lstm_fast
    from lstm_fast.backends.numba import threads as numba_threads

    if split:
        monkeypatch.setattr(numba_threads, "chunk_count", lambda B, H, P: 2)
    fully_shard = _fully_shard()

    class Model(torch.nn.Module):
        def __init__(self, lstm, head, h0, c0):
            super().__init__()
            self.lstm, self.head = lstm, head
            self.h0, self.c0 = torch.nn.Parameter(h0.clone()), torch.nn.Parameter(c0.clone())

        def forward(self, x):
            y, (h, c) = self.lstm(x, (self.h0, self.c0))
            return self.head(y).square().mean() + h.square().mean() + c.square().mean()

    torch.manual_seed(0)
    ref = torch.nn.LSTM(6, 16, num_layers=2, proj_size=5)
    head = torch.nn.Linear(5, 3)
    h0, c0 = torch.randn(2, 4, 5), torch.randn(2, 4, 16)
    x = torch.randn(7, 4, 6)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        runs = {}
        for name in ("torch", "numba"):
            lstm = copy.deepcopy(ref) if name == "torch" else lstm_fast.LSTM.from_torch(ref, backend="numba")
            model = Model(lstm, copy.deepcopy(head), h0, c0)
            fully_shard(model.lstm)
            fully_shard(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            losses = []
            for _ in range(3):
                loss = model(x)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            params = {n: p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
                      for n, p in model.named_parameters()}
            runs[name] = losses, params
    finally:
        dist.destroy_process_group()
    (ref_losses, ref_params), (losses, params) = runs["torch"], runs["numba"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]
    assert params.keys() == ref_params.keys()
    for n in ref_params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=1e-5, atol=1e-5, msg=n)
