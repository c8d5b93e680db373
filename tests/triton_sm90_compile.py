"""Compile every Triton kernel launch of the `triton` backend for sm_90, without a GPU.

    python tests/triton_sm90_compile.py [--full] [--all-configs] [--arch 90]

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's
compiler: an error that only the GPU compile path raises (type rules, tl.dot
shapes, shared memory, libdevice calls, ptxas) would otherwise first show on a
GPU. So the backend's launchers are driven with tensors on torch's `meta`
device (their torch ops work there), each kernel launch is recorded instead of
run, and every recorded launch is compiled to a cubin for the target
architecture with Triton's own compiler (ptxas ships with triton; no driver is
needed). Covered: both paths (step, sequence), forward with and without saving,
backward, projection, packed, reverse, regulariser masks; float32 in tf32 and ieee, float16,
bfloat16 (QUICK_CASES; --full: every combination). Each kernel specialisation
is compiled with the first autotune config its pruning keeps; --all-configs
compiles every kept one.

Prints one line per compile (shared memory; registers and stack bytes, i.e.
spills, as cuobjdump --dump-resource-usage reports them, where triton ships
cuobjdump) and exits non-zero if any failed. Needs triton and must run without
TRITON_INTERPRET (tests/test_triton.py starts it so).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the compiler")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from lstm_fast.backends.base import LSTMState, OutputGrads, RecurrentWeights, SequenceLayout, StepMasks
from lstm_fast.backends.triton_gpu import TritonBackend

_PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.int32: "*i32", torch.int64: "*i64"}


def record_launches(cases):
    """(kernel Autotuner, args dict) for every launch the backend makes on meta tensors."""
    seen = []

    def fake_run(self, *args, **kwargs):
        named = dict(zip(self.fn.arg_names, args))
        named.update({k: v for k, v in kwargs.items() if k in self.fn.arg_names})
        seen.append((self, named))

    real_run = Autotuner.run
    Autotuner.run = fake_run
    try:
        _drive_backend(cases)
    finally:
        Autotuner.run = real_run
    return seen


# (dtype, fp32 precision, path, H, P, packed, reverse[, masked]). H=48: the sequence path fits and
# 48 is no multiple of the blocks; H=96, P=40: step path with a projection; H=200: step
# path only (beyond every sequence limit). The quick set gives each dtype both paths and
# each of packed / reverse / projection at least once, and the sequence kernels packed reverse.
QUICK_CASES = [
    (torch.float32, "tf32", "sequence", 48, 48, True, False),
    (torch.float32, "tf32", "step", 96, 40, False, True),
    (torch.float32, "tf32", "step", 200, 200, False, False),
    (torch.float32, "ieee", "sequence", 48, 48, False, True),
    (torch.float32, "ieee", "step", 200, 200, True, False),
    (torch.float16, None, "sequence", 48, 48, False, False),
    (torch.float16, None, "step", 96, 40, True, False),
    (torch.bfloat16, None, "sequence", 48, 48, True, False),
    (torch.bfloat16, None, "step", 200, 200, False, True),
    (torch.float64, None, "step", 96, 40, True, False),  # float64: step path only
    (torch.float32, "ieee", "sequence", 48, 48, True, True),  # packed reverse: rows joining from h0 / c0
    # masked: recurrent dropout and both zoneouts (the step kernels, whatever the path)
    (torch.float32, "tf32", "step", 96, 40, True, True, True),
    (torch.float16, None, "sequence", 48, 48, False, False, True),
]
FULL_CASES = [(dtype, prec, path, H, P, packed, reverse)
              for dtype, precs in ((torch.float32, ("tf32", "ieee", "tf32x3")), (torch.float16, (None,)),
                                   (torch.bfloat16, (None,)))
              for prec in precs
              for path, H, P in (("sequence", 48, 48), ("step", 48, 48), ("step", 96, 40), ("step", 200, 200))
              for packed, reverse in ((False, False), (False, True), (True, False), (True, True))] + [
    (torch.float64, None, "step", H, P, packed, reverse)
    for H, P in ((48, 48), (96, 40), (200, 200)) for packed, reverse in ((False, False), (False, True), (True, False))
] + [(dtype, prec, "step", H, P, True, True, True) for dtype, prec in ((torch.float32, "tf32"), (torch.float32, "ieee"),
     (torch.float16, None), (torch.bfloat16, None), (torch.float64, None)) for H, P in ((48, 48), (96, 40))]


def _drive_backend(cases):
    meta = torch.device("meta")
    b = TritonBackend()
    T, B = 3, 5
    batch_sizes = torch.tensor([5, 3, 2])
    for dtype, prec, path, H, P, packed, reverse, *masked in cases:
        b.path, b.fp32_precision = path, prec
        bs = batch_sizes if packed else None

        def mk(*shape, dtype=dtype):
            return torch.empty(*shape, dtype=dtype, device=meta)

        rows = (int(batch_sizes.sum()),) if packed else (T, B)  # packed: PackedSequence's [N, *] rows
        gx, h0, c0, w_hh = mk(*rows, 4 * H), mk(B, P), mk(B, H), mk(4 * H, P)
        w_hr = mk(P, H) if P != H else None
        state, weights, layout = LSTMState(h0, c0), RecurrentWeights(w_hh, w_hr), SequenceLayout(bs, reverse)
        extra = {"masks": StepMasks(mk(B, P), mk(*rows, H), mk(*rows, P))} if masked and masked[0] else {}
        y, h_n, c_n, saved = b.forward(gx, state, weights, layout, True, **extra)
        b.forward(gx, state, weights, layout, False, **extra)
        b.backward(saved, y, OutputGrads(mk(*rows, P), mk(B, P), mk(B, H)), state, weights, layout, **extra)


def _signature(fn, named, config):
    sig, constexprs = {}, {}
    for p in fn.params:
        name = p.name
        value = config.kwargs[name] if name in config.kwargs else named[name]
        if p.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return sig, constexprs


def _resources(cubin: bytes) -> str:
    """', R registers, S B stack' from cuobjdump's resource report; '' without cuobjdump."""
    try:
        tool = triton.knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            report = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                    timeout=60).stdout
    except Exception:  # figures are informative; the compile itself is the check
        return ""
    m = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return f", {m.group(1)} registers, {m.group(2)} B stack" if m else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true",
                    help="every dtype x path x packed/reverse case (~100 compiles, ~280 with --all-configs)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config pruning keeps")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int (default 90)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)

    jobs = {}  # one compile per distinct specialisation
    for tuner, named in record_launches(FULL_CASES if args.full else QUICK_CASES):
        prune = getattr(tuner, "early_config_prune", None)
        configs = prune(tuner.configs, named) if prune else tuner.configs
        for config in configs if args.all_configs else configs[:1]:
            sig, constexprs = _signature(tuner.fn, named, config)
            key = (tuner.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
                   config.num_warps, config.num_stages)
            jobs.setdefault(key, (tuner.fn, sig, constexprs, config))

    print(f"triton {triton.__version__}: {len(jobs)} kernel specialisations for sm_{args.arch}", flush=True)
    failed = 0
    for (name, _, _, warps, stages), (fn, sig, constexprs, _config) in jobs.items():
        shown = ", ".join(f"{k}={v}" for k, v in constexprs.items())
        types = ",".join(t[1:] for t in sig.values() if t.startswith("*"))
        t0 = time.time()
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                                    options={"num_warps": warps, "num_stages": stages})
            md = kernel.metadata
            print(f"ok    {name}({types}) {shown} warps={warps} stages={stages}: "
                  f"{time.time() - t0:.1f} s, {md.shared} B shared{_resources(kernel.asm['cubin'])}", flush=True)
        except Exception as exc:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAIL  {name}({types}) {shown} warps={warps} stages={stages}: "
                  f"{type(exc).__name__}: {str(exc).strip()[:2000]}", flush=True)
    print(f"{len(jobs) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
