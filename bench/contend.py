"""--contend K: K processes keep the cores busy while the configurations are timed.

A time loop split over threads waits for all of them at every step; on shared
cores the OS preempts one of them now and then. This mode reproduces that case
on purpose: each spinner is a Python busy loop, started before the first timed
configuration and stopped after the last one (or on any exit of the run).
"""
from __future__ import annotations

import subprocess
import sys

SPIN = "while True: pass"


def _die_with_parent():
    """In the child: SIGKILL it when the benchmark process dies (Linux), so that no spinner outlives a killed run."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the finally below still stops them on a normal exit
        pass


def start(k: int) -> list:
    """K busy processes; stop() them in a finally."""
    procs = []
    try:
        for _ in range(max(0, k)):
            procs.append(subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL,
                                          preexec_fn=_die_with_parent))
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
