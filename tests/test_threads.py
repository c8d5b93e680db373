"""The thread count of the CPU time loops: torch's count, within the affinity mask and the cgroup quota."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import needs_cpp
from lstm_fast import _threads


@pytest.fixture
def fake_os(monkeypatch):
    """Set the affinity, the cgroup files and torch's count; returns a setter."""
    def setup(affinity=8, files=None, torch_threads=8):
        files = files or {}
        monkeypatch.setattr(_threads, "_affinity", lambda: affinity)
        monkeypatch.setattr(_threads, "_read", lambda path: files.get(path))
        monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)
        monkeypatch.setattr(_threads, "_os_limit", None)
    return setup


V2 = "/sys/fs/cgroup/cpu.max"
V1Q, V1P = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


@pytest.mark.parametrize("affinity, files, torch_threads, expected", [
    (8, {}, 8, 8),                                      # no quota: the affinity mask
    (2, {}, 8, 2),                                      # taskset to 2 CPUs
    (8, {}, 3, 3),                                      # torch.set_num_threads(3) is the user's knob
    (8, {V2: "max 100000"}, 8, 8),                      # v2, no quota
    (8, {V2: "200000 100000"}, 8, 2),                   # v2: 2 CPUs
    (8, {V2: "150000 100000"}, 8, 1),                   # 1.5 CPUs: rounded down
    (8, {V2: "50000 100000"}, 8, 1),                    # half a CPU: at least one thread
    (1, {V2: "400000 100000"}, 8, 1),                   # the mask is smaller than the quota
    (8, {V1Q: "300000", V1P: "100000"}, 8, 3),          # v1 quota
    (8, {V1Q: "-1", V1P: "100000"}, 8, 8),              # v1, no quota
    (8, {V2: "400000 100000"}, 2, 2),                   # torch's count below both
])
def test_usable_threads(fake_os, affinity, files, torch_threads, expected):
    fake_os(affinity, files, torch_threads)
    assert _threads.usable_threads() == expected


def test_os_limit_read_once_per_process(fake_os, monkeypatch):
    fake_os(affinity=4)
    assert _threads.os_thread_limit() == 4
    monkeypatch.setattr(_threads, "_affinity", lambda: 1)
    assert _threads.os_thread_limit() == 4  # cached for this process
    monkeypatch.setattr(_threads, "_os_limit", (-1, 4))  # as seen from a forked child
    assert _threads.os_thread_limit() == 1


def test_numba_chunks_follow_the_policy(fake_os, monkeypatch):
    pytest.importorskip("numba")
    from lstm_fast.backends.numba import threads as numba_threads

    monkeypatch.setattr(numba_threads, "SPLIT_MIN", 0)
    monkeypatch.setattr(numba_threads, "_pool_pid", None)
    import numba
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 16)
    fake_os(affinity=8, files={V2: "200000 100000"}, torch_threads=8)
    assert numba_threads.chunk_count(8, 64, 64) == 2
    fake_os(affinity=8, files={}, torch_threads=1)
    assert numba_threads.chunk_count(8, 64, 64) == 1


def test_one_torch_thread_restores_the_count():
    before = torch.get_num_threads()
    with _threads.one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), _threads.one_torch_thread():
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_backward_runs_on_one_thread_while_the_loops_run_solo(monkeypatch):
    """While a backend's loops have fallen back to one thread (contended cores), the whole
    backward of the layer runs on one torch thread, and the user's count is back after."""
    import lstm_fast
    from lstm_fast.backends import get_backend

    backend = get_backend("reference")
    seen = []
    plain = backend.backward_projected

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return plain(*args, **kwargs)

    monkeypatch.setattr(backend, "backward_projected", spy)
    lstm = lstm_fast.LSTM(8, 8, backend="reference")
    x = torch.randn(5, 3, 8, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for solo in (False, True):
            monkeypatch.setattr(backend, "loops_solo", lambda solo=solo: solo)
            lstm(x)[0].sum().backward()
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]


def test_cpp_loops_not_solo_on_a_single_thread():
    """cpu_loops_solo() only turns on after a split call stalled; one-thread calls never split."""
    from lstm_fast.backends import get_backend

    cpp = get_backend("cpp")
    if not cpp.is_available()[0]:
        pytest.skip(cpp.is_available()[1])
    import lstm_fast
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lstm_fast.LSTM(64, 64, backend="cpp")(torch.randn(20, 16, 64))
        assert cpp.loops_solo() is False
    finally:
        torch.set_num_threads(before)


def test_numba_solo_fallback_rule(fake_os, monkeypatch):
    """A split launch that lost over half its threads' time, and over 1 ms, makes the next calls
    run on one thread for a while; a short wake-up delay or a busy team does not."""
    pytest.importorskip("numba")
    import numba

    from lstm_fast.backends.numba import threads as numba_threads
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 16)
    monkeypatch.setattr(numba_threads, "_pool_pid", None)
    monkeypatch.setattr(numba_threads, "_solo_until", 0.0)
    monkeypatch.setattr(numba_threads, "_solo_pause", numba_threads.SOLO_MIN_S)
    fake_os(affinity=2, torch_threads=2)
    ms = 1_000_000
    numba_threads.note_split(10 * ms, 9 * ms, 0)           # busy team
    numba_threads.note_split(1 * ms // 2, 0, 0)             # all lost, but under 1 ms
    assert numba_threads.chunk_count(16, 128, 128) == 2
    numba_threads.note_split(20 * ms, 12 * ms, 4 * ms)      # preempted 8 ms, waited 4 ms more
    assert numba_threads.solo_active() and numba_threads.chunk_count(16, 128, 128) == 1
    assert numba_threads._solo_pause == 2 * numba_threads.SOLO_MIN_S  # a failed retry would wait longer
    monkeypatch.setattr(numba_threads, "_solo_until", 0.0)
    monkeypatch.setattr(numba_threads, "SPLIT_MIN", 0)  # LSTM_FAST_NUMBA_SPLIT_MIN=0: always split, no fallback
    numba_threads.note_split(20 * ms, 0, 20 * ms)
    assert not numba_threads.solo_active() and numba_threads.chunk_count(1, 1, 1) == 2


def test_numba_split_launch_reports_its_team_time(monkeypatch):
    """The counters of a real split launch carry the team's wall and CPU time."""
    pytest.importorskip("numba")
    import lstm_fast
    from lstm_fast.backends.numba import threads as numba_threads

    seen = []
    monkeypatch.setattr(numba_threads, "SPLIT_MIN", 0)
    monkeypatch.setattr(numba_threads, "_pool_pid", None)
    monkeypatch.setattr(numba_threads, "note_split", lambda *times: seen.append(times))
    monkeypatch.setattr(numba_threads, "team_size", lambda n_chunks: n_chunks)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lstm_fast.LSTM(32, 32, backend="numba")(torch.randn(30, 4, 32))
    finally:
        torch.set_num_threads(before)
    if not seen:
        pytest.skip("this machine gives the process a single CPU: no split launch")
    wall, cpu, stalled = seen[0]
    assert wall > 0 and 0 < cpu and stalled >= 0


def _run_fresh(code, env):
    """code in a fresh Python process (the thread and solo state are the process's); it must print ok."""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


SPLIT_LOOPS_CODE = r"""
import torch, lstm_fast
from torch.nn.utils.rnn import pack_padded_sequence
torch.set_num_threads(2)
torch.manual_seed(0)
dt = torch.float64
# batches of 14 and 15 rows: the 6- and 7-row leftovers of 8-row register blocks (AVX-512)
# packed lengths: the rows split gives threads rows of about equal work, not equal count
cases = [dict(), dict(proj_size=5, num_layers=2), dict(bidirectional=True), dict(packed=[7, 5, 5, 2]),
         dict(packed=[7, 7, 6, 3, 2, 1, 1], bidirectional=True, proj_size=4), dict(batch=15),
         dict(batch=14, proj_size=5), dict(batch=2), dict(batch=3, bidirectional=True)]
for kw in cases:
    lengths = kw.pop("packed", None)
    batch = len(lengths) if lengths else kw.pop("batch", 4)
    ref = torch.nn.LSTM(6, 9, dtype=dt, **kw)
    ours = lstm_fast.LSTM.from_torch(ref, backend="cpp")
    x = torch.randn(7, batch, 6, dtype=dt, requires_grad=True)
    outs = []
    for m in (ref, ours):
        packed = lengths is not None
        y, (h, c) = m(pack_padded_sequence(x, lengths) if packed else x)
        y = y.data if packed else y
        leaves = [x, *m.parameters()]
        grads = torch.autograd.grad((y.sum() + h.square().sum() + c.sum()), leaves)
        outs.append((y, h, c, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
# the regularisers: the reference backend with the same masks
for kw in (dict(zoneout=(0.2, 0.3)), dict(recurrent_dropout=0.3), dict(zoneout=0.2, proj_size=4)):
    outs = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(1)
        m = lstm_fast.LSTM(6, 9, dtype=dt, backend=backend, **kw)
        torch.manual_seed(2)
        x = torch.randn(7, 4, 6, dtype=dt, requires_grad=True)
        y, (h, c) = m(x)
        outs.append((y, h, c, *torch.autograd.grad(y.sum() + c.sum(), [x, *m.parameters()])))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
print("ok")
"""


@needs_cpp
@pytest.mark.parametrize("split_by", ("rows", "units"))
@pytest.mark.parametrize("team", ("two threads", "one thread granted of two"))
def test_cpp_split_loops_match_torch(team, split_by):
    """The split time loops (every call split: LSTM_FAST_CPU_SPLIT_MIN=0), by batch rows and by
    hidden units, against torch.nn.LSTM and, with masks, the reference backend, forward and
    every gradient. With OMP_THREAD_LIMIT=1 the parallel region gets one thread where two were
    asked for: the loop must split by the team it got."""
    env = dict(os.environ, LSTM_FAST_CPU_SPLIT_MIN="0", LSTM_FAST_CPU_SPLIT_BY=split_by)
    if team == "one thread granted of two":
        env["OMP_THREAD_LIMIT"] = "1"
    _run_fresh(SPLIT_LOOPS_CODE, env)


CPP_SPLIT_CHOICE_CODE = r"""
import torch, lstm_fast
split, note = torch.ops.lstm_fast.cpu_loop_split, torch.ops.lstm_fast.cpu_note_split
torch.set_num_threads(2)
# quiet: by rows from 4 rows a thread while W_hh (4H x P float32) fits 1 MiB, else by units
assert tuple(split(100, 16, 128, 128, 128, False)) == (2, True)
assert tuple(split(100, 4, 128, 128, 128, False)) == (2, False)
assert tuple(split(100, 16, 1024, 1024, 0, False)) == (2, False)
assert tuple(split(100, 1, 8, 8, 8, False)) == (1, False)  # below the split threshold
# a split call whose threads got no CPU for 10 ms sends the process solo; five in a row
# push the retry 4 s away, time enough for the checks below
for _ in range(5):
    note(2, 0, 10_000_000)
assert torch.ops.lstm_fast.cpu_loops_solo()
assert tuple(split(100, 16, 128, 128, 128, False)) == (1, False)  # a short loop runs solo
assert tuple(split(100, 32, 256, 256, 256, False)) == (2, True)   # a long one still by rows
torch.set_num_threads(1)
assert tuple(split(100, 32, 256, 256, 0, True)) == (2, True)  # the backward's one thread is the solo guard's
assert tuple(split(100, 32, 256, 256, 256, False)) == (1, False)  # the forward's is the user's
torch.set_num_threads(2)
# the long loop split by rows while solo, against torch.nn.LSTM (float64: W_hh is 512 KiB)
torch.manual_seed(0)
ref = torch.nn.LSTM(128, 128, dtype=torch.float64)
ours = lstm_fast.LSTM.from_torch(ref, backend="cpp")
x = torch.randn(300, 32, 128, dtype=torch.float64, requires_grad=True)
outs = []
for m in (ref, ours):
    y, (h, c) = m(x)
    outs.append((y, h, c, *torch.autograd.grad(y.sum() + c.sum(), [x, *m.parameters()])))
assert torch.ops.lstm_fast.cpu_loops_solo()
for a, b in zip(*outs):
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
print("ok")
"""


@needs_cpp
def test_cpp_split_choice_quiet_and_solo():
    """How a cpp loop splits: by rows or units when quiet; after a stalled call, solo for short
    loops and by rows over the stalled team for long ones, the backward's one-thread guard
    notwithstanding; and such a call's results (fresh process: the solo state is the process's)."""
    if _threads.os_thread_limit() < 2:
        pytest.skip("this machine gives the process a single CPU: no split")
    env = {k: v for k, v in os.environ.items() if k not in ("LSTM_FAST_CPU_SPLIT_MIN", "LSTM_FAST_CPU_SPLIT_BY")}
    _run_fresh(CPP_SPLIT_CHOICE_CODE, env)


@needs_cpp
@pytest.mark.parametrize("op, args, message", [
    ("cpu_loop_split", (-1, 4, 8, 8, 8, False), "sizes must be"),
    ("cpu_loop_split", (10, 4, 0, 8, 8, False), "sizes must be"),
    ("cpu_loop_split", (1 << 21, 4, 8, 8, 8, False), "at most 2\\^20 steps"),
    ("cpu_loop_split", (1, 1 << 40, 1, 1, 0, False), "at most 2\\^20 steps"),
    ("cpu_note_split", (0, 1, 1), "threads must be"),
    ("cpu_note_split", (2, -1, 5), "threads must be"),
])
def test_cpp_split_ops_reject_bad_input(op, args, message):
    """The split ops for tests and tools raise a clear error on bad sizes or times."""
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.lstm_fast, op)(*args)
