"""How many threads a call gets, and the parallel launch on numba's thread pool."""
from __future__ import annotations

import os
import threading

from ..._threads import usable_threads

# Multiply-adds per step (B * 4H * P) from which a call splits its time loop over threads
# (bench/NOTES_numba.md#split-threshold); LSTM_FAST_NUMBA_SPLIT_MIN overrides it, 0: always.
SPLIT_MIN = int(os.environ.get("LSTM_FAST_NUMBA_SPLIT_MIN", 65536))

# The process that started numba's thread pool: a child forked from it runs on one thread, since
# numba's GNU OpenMP layer aborts a forked child's first parallel launch (bench/NOTES_numba.md#traps).
_pool_pid = None
# numba's workqueue layer aborts on concurrent launches from two threads; launches are
# serialised (calls from several threads then take turns, none crashes).
_launch_lock = threading.Lock()


def chunk_count(B, H, P):
    """Chunks (= threads asked for) of one call: usable_threads() (torch's thread count within the
    process's CPU affinity and cgroup quota), capped by numba's pool."""
    import numba

    if _pool_pid not in (None, os.getpid()):
        return 1
    n_threads = min(usable_threads(), numba.config.NUMBA_NUM_THREADS)
    return n_threads if n_threads > 1 and B * 4 * H * P >= SPLIT_MIN else 1


def team_size(n_chunks):
    """Threads the parallel launch runs with (a hook for tests of smaller teams)."""
    return n_chunks


def launch(parallel, worker, n_chunks, *args):
    """Run worker(k, n_chunks, *args) for k < n_chunks: directly for one chunk (no thread
    pool), else parallel(n_chunks, *args) on a numba team of team_size(n_chunks) threads,
    numba's thread count restored after."""
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
