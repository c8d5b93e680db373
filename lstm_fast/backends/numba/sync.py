"""Claiming work and waiting between the threads of one call (kernels, jitted by jit.load).

The work of each phase (one step's gate block, or its projection) is cut into
n_chunks chunks of hidden units (or projected columns). A thread first claims its
own chunk, then any chunk nobody has claimed, then waits until all chunks of the
phase are done. So a call finishes whatever number of threads the threading layer
actually runs (even one: it takes every chunk), and a thread the OS has not
scheduled yet does not hold the others up: its chunk is taken over.

Counters (see counters()): slot 0 counts finished chunks over all phases, slot
(1 + c) * LINE the phases chunk c has been claimed for; the last line sums each
thread's wall time and CPU time from its start of work, and the time its waits lasted
past the spin (see team_time()).
"""
from __future__ import annotations

import os
import time

import numpy as np

# int64 slots per counter: each counter gets a 64-byte cache line of its own.
LINE = 8
# Busy-wait iterations (with a pause hint) before a waiting thread starts yielding its
# core: about 50 us, chosen in bench/NOTES_numba.md#spin-wait.
SPINS = 2000


def counters(n_chunks):
    """The zeroed counters of one call (host side)."""
    return np.zeros((2 + n_chunks) * LINE, dtype=np.int64)


def team_time(counters, n_chunks):
    """(wall, CPU, stalled) ns of a finished call's threads, each counted from its own start
    (a thread started late by the threading layer costs nothing: its chunks were claimed);
    stalled: waits past the spin, when a partner held a chunk (on shared cores: preempted)."""
    base = (1 + n_chunks) * LINE
    return int(counters[base]), int(counters[base + 1]), int(counters[base + 2])


# clock ids of clock_ns(): CLOCK_MONOTONIC and CLOCK_THREAD_CPUTIME_ID on Linux
MONOTONIC, THREAD_CPU = 1, 3


# What the intrinsics of numba_bindings() do, as plain Python (one thread).
def atomic_add(arr, idx, val):
    """arr[idx] += val atomically; returns the previous value."""
    old = arr[idx]
    arr[idx] = old + val
    return old


def atomic_load(arr, idx):
    """arr[idx], read with acquire ordering."""
    return arr[idx]


def atomic_cas(arr, idx, expected, new):
    """arr[idx] = new if it holds expected, atomically; whether it did."""
    if arr[idx] != expected:
        return False
    arr[idx] = new
    return True


def spin_pause():
    """A hint to the core that this is a busy-wait."""


def yield_core():
    """Give the core to another thread (sched_yield)."""
    if hasattr(os, "sched_yield"):
        os.sched_yield()


def clock_ns(clock):
    """Nanoseconds of a clock: MONOTONIC, or this thread's CPU time (THREAD_CPU)."""
    return time.monotonic_ns() if clock == MONOTONIC else time.thread_time_ns()


def work_started():
    """(wall, CPU) clocks of this thread at the start of its work."""
    return clock_ns(MONOTONIC), clock_ns(THREAD_CPU)


def work_done(counters, n_chunks, started):
    """Adds this thread's wall and CPU time since work_started() to the counters."""
    atomic_add(counters, (1 + n_chunks) * LINE, clock_ns(MONOTONIC) - started[0])
    atomic_add(counters, (1 + n_chunks) * LINE + 1, clock_ns(THREAD_CPU) - started[1])


def claim(counters, chunk, phase):
    """True for exactly one caller per (chunk, phase); phases count up from 0."""
    return atomic_cas(counters, (1 + chunk) * LINE, phase, phase + 1)


def phase_end(counters, finished, n_chunks, phase):
    """Publish the `finished` chunks done by this thread, then wait for all of the phase."""
    if finished > 0:
        atomic_add(counters, 0, finished)
    target = n_chunks * (phase + 1)
    spins = 0
    since = 0
    while atomic_load(counters, 0) < target:
        spins += 1
        if spins < SPINS:
            spin_pause()
        else:
            if spins == SPINS:
                since = clock_ns(MONOTONIC)
            yield_core()
    if spins >= SPINS:
        atomic_add(counters, (1 + n_chunks) * LINE + 2, clock_ns(MONOTONIC) - since)


KERNELS = ("work_started", "work_done", "claim", "phase_end")


def numba_bindings(numba):
    """The intrinsics above as LLVM atomics and wait hints on int64 array elements."""
    import platform

    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .jit import element_pointer

    @intrinsic
    def atomic_add(typingctx, arr, idx, val):
        def codegen(context, builder, sig, args):
            ptr = element_pointer(context, builder, sig.args[0], args[0], args[1])
            return builder.atomic_rmw("add", ptr, args[2], "seq_cst")
        return types.int64(arr, idx, val), codegen

    @intrinsic
    def atomic_load(typingctx, arr, idx):
        def codegen(context, builder, sig, args):
            return builder.load_atomic(element_pointer(context, builder, sig.args[0], args[0], args[1]), "acquire",
                                       8)
        return types.int64(arr, idx), codegen

    @intrinsic
    def atomic_cas(typingctx, arr, idx, expected, new):
        def codegen(context, builder, sig, args):
            ptr = element_pointer(context, builder, sig.args[0], args[0], args[1])
            pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
            return builder.extract_value(pair, 1)
        return types.boolean(arr, idx, expected, new), codegen

    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

    @intrinsic
    def spin_pause(typingctx):
        def codegen(context, builder, sig, args):
            if is_x86:  # the core saves power and frees its sibling while spinning
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse2.pause")
                builder.call(fn, [])
            return context.get_dummy_value()
        return types.void(), codegen

    has_yield = os.name == "posix"

    @intrinsic
    def yield_core(typingctx):
        def codegen(context, builder, sig, args):
            if has_yield:  # libc's sched_yield, resolved in the process at load time
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                    "sched_yield")
                builder.call(fn, [])
            return context.get_dummy_value()
        return types.void(), codegen

    @intrinsic
    def clock_ns(typingctx, clock):
        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            if not has_yield:  # no clock_gettime: the team's times stay 0 (no solo fallback)
                return ir.Constant(i64, 0)
            timespec = ir.LiteralStructType([i64, i64])
            ts = cgutils.alloca_once(builder, timespec)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(32), [ir.IntType(32), timespec.as_pointer()]),
                "clock_gettime")
            builder.call(fn, [builder.trunc(args[0], ir.IntType(32)), ts])
            sec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 0))
            nsec = builder.load(cgutils.gep_inbounds(builder, ts, 0, 1))
            return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)
        return types.int64(clock), codegen

    return {"atomic_add": atomic_add, "atomic_load": atomic_load, "atomic_cas": atomic_cas,
            "spin_pause": spin_pause, "yield_core": yield_core, "clock_ns": clock_ns}
