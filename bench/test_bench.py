"""The benchmark matrix as a pytest-benchmark suite, for CI history (--benchmark-json, --benchmark-compare).

    pytest bench --benchmark-only --benchmark-json=bench.json

One test per (mode, dtype, config, runner), grouped per configuration so the
baseline and the backends sit in one table. pytest-benchmark times each test
on its own, one after the other: a neighbour's burst can favour either side,
so speed claims come from `python -m bench`, which interleaves them.

Environment: LSTM_FAST_BENCH_CONFIGS (named sets or spec, default the quick
set of the device), LSTM_FAST_BENCH_DTYPES, LSTM_FAST_BENCH_BACKENDS (default:
the ones `python -m bench` times). Importable and collectable without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import configs as cfg
from bench import varlen
from bench.machine import TORCH_DTYPES, tf32, usable_cores
from bench.measure import BASELINE, make_base, make_module, make_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cases():
    shapes = cfg.resolve_configs(os.environ.get("LSTM_FAST_BENCH_CONFIGS"), DEVICE, quick=True)
    dtypes = (os.environ.get("LSTM_FAST_BENCH_DTYPES") or ",".join(cfg.default_dtypes(DEVICE, True))).split(",")
    wanted = os.environ.get("LSTM_FAST_BENCH_BACKENDS")
    try:
        from bench.cli import plan_backends
        plan = plan_backends(DEVICE, wanted.split(",") if wanted else None)
        names = [n for n, e in plan.items() if e["timed"]]
    except Exception:  # lstm_fast itself broken: still benchmark the baseline
        names = []
    cases = []
    for s in shapes:
        for d in dtypes:
            for m in s.modes:
                for n in [BASELINE, *names]:
                    cases.append(pytest.param(s, d, m, n, id=f"{m}-{d}-{s.name.replace(' ', '_')}-{n}"))
    return cases


@pytest.fixture(scope="module", autouse=True)
def _threads():
    if DEVICE == "cpu":
        old = torch.get_num_threads()
        torch.set_num_threads(usable_cores())
        yield
        torch.set_num_threads(old)
    else:
        yield


@pytest.mark.parametrize("shape,dtype,mode,runner", _cases())
def test_lstm(benchmark, shape, dtype, mode, runner):
    if dtype == "tf32" and DEVICE != "cuda":
        pytest.skip("tf32 is a GPU switch")
    with tf32(dtype == "tf32" if DEVICE == "cuda" else None):
        torch.manual_seed(0)
        tdtype = TORCH_DTYPES[dtype]
        base = make_base(shape, DEVICE, tdtype).train(mode == "training")
        x = torch.randn(shape.T, shape.B, shape.I, device=DEVICE, dtype=tdtype, requires_grad=mode == "training")
        width = (shape.proj or shape.H) * (2 if shape.bidir else 1)
        gy = torch.randn(*varlen.output_rows(shape), width, device=DEVICE, dtype=tdtype)
        try:
            step = make_step(make_module(runner, base), x, gy, mode, shape, runner == BASELINE)
            step()  # warm-up: JIT compilation, autotuning, cuDNN plans
        except (RuntimeError, NotImplementedError) as exc:
            if "not support" in str(exc) or isinstance(exc, NotImplementedError):
                pytest.skip(f"{runner}: {exc}")
            raise

        def run():
            step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{mode} {dtype} {shape.name}"
        share = varlen.real_share(shape)
        benchmark.extra_info.update(runner=runner, device=DEVICE, flops=cfg.lstm_flops(shape, mode) * share,
                                    tokens=round(shape.T * shape.B * share))
        benchmark(run)
