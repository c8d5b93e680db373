"""How many threads a call gets, and the parallel launch on numba's thread pool."""
from __future__ import annotations

import os
import threading
import time

from ..._threads import usable_threads
from . import sync

# Multiply-adds per step (B * 4H * P) from which a call splits its time loop over threads
# (bench/NOTES_numba.md#split-threshold); LSTM_FAST_NUMBA_SPLIT_MIN overrides it, 0: always.
SPLIT_MIN = int(os.environ.get("LSTM_FAST_NUMBA_SPLIT_MIN", 65536))

# The process that started numba's thread pool: a child forked from it runs on one thread, since
# numba's GNU OpenMP layer aborts a forked child's first parallel launch (bench/NOTES_numba.md#traps).
_pool_pid = None
# numba's workqueue layer aborts on concurrent launches from two threads; launches are
# serialised (calls from several threads then take turns, none crashes).
_launch_lock = threading.Lock()


# Solo fallback, as the cpp loops' (csrc/lstm_cpu.cpp): after a split launch that lost more
# than half its threads' time, and at least 1 ms (a preemption; waking a thread costs
# microseconds), the next calls run on one thread, without the pool, for a while; each
# failed retry doubles the pause (0.25 s .. 4 s). Lost: off the core, or waiting past the
# spin for a partner's chunk (bench/NOTES_numba.md#preempted-threads).
SOLO_MIN_S, SOLO_MAX_S, STALL_MIN_NS = 0.25, 4.0, 1_000_000
_solo_until = 0.0
_solo_pause = SOLO_MIN_S


def solo_active() -> bool:
    return SPLIT_MIN > 0 and time.monotonic() < _solo_until


def note_split(wall_ns, cpu_ns, stalled_ns):
    """After a split launch: its threads' wall time, CPU time and waits past the spin, summed."""
    global _solo_until, _solo_pause
    if SPLIT_MIN == 0:
        return
    lost = min(wall_ns, wall_ns - cpu_ns + stalled_ns)
    if 2 * lost > wall_ns and lost > STALL_MIN_NS:
        _solo_until = time.monotonic() + _solo_pause
        _solo_pause = min(2 * _solo_pause, SOLO_MAX_S)
    else:
        _solo_pause = SOLO_MIN_S


def chunk_count(B, H, P):
    """Chunks (= threads asked for) of one call: usable_threads() (torch's thread count within the
    process's CPU affinity and cgroup quota), capped by numba's pool."""
    import numba

    if _pool_pid not in (None, os.getpid()):
        return 1
    n_threads = min(usable_threads(), numba.config.NUMBA_NUM_THREADS)
    return n_threads if n_threads > 1 and B * 4 * H * P >= SPLIT_MIN and not solo_active() else 1


def team_size(n_chunks):
    """Threads the parallel launch runs with (a hook for tests of smaller teams)."""
    return n_chunks


def launch(parallel, worker, n_chunks, *args):
    """Run worker(k, n_chunks, *args) for k < n_chunks: directly for one chunk (no thread
    pool), else parallel(n_chunks, *args) on a numba team of team_size(n_chunks) threads,
    numba's thread count restored after. args[0]: the call's sync.counters."""
    global _pool_pid
    if n_chunks == 1:
        worker(0, 1, *args)
        return
    import numba

    with _launch_lock:
        _pool_pid = os.getpid()
        before = numba.get_num_threads()
        numba.set_num_threads(min(team_size(n_chunks), numba.config.NUMBA_NUM_THREADS))
        try:
            parallel(n_chunks, *args)
        finally:
            numba.set_num_threads(before)
    note_split(*sync.team_time(args[0], n_chunks))
