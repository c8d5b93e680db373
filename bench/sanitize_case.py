"""Small LSTM cases for compute-sanitizer: every GPU kernel path, forward and backward.

    compute-sanitizer --tool memcheck python bench/sanitize_case.py cuda triton

Shapes are tiny (the sanitizer slows kernels ~100x) but cover each path the
backends have: odd sizes (H=33, I!=H, B=3), a stacked bidirectional model,
a projection, and fp32/fp16. Results are checked against the reference
backend on the same GPU, so a kernel that writes wrong memory without
faulting still shows. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every
tensor is its own allocation and out-of-bounds accesses reach the sanitizer
instead of landing inside a cached block. Exit status 1 on any failure.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout works too

# (T, B, I, H, layers, bidirectional, proj_size): H=32 and H=33 around the
# Triton sequence kernel's small-H path, H=96 for the per-step kernels.
CASES = [
    (5, 3, 20, 32, 1, False, 0),
    (4, 2, 16, 33, 1, False, 0),
    (3, 3, 24, 96, 2, True, 0),
    (4, 2, 16, 48, 1, False, 24),
]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def run_case(backend, case, dtype, device="cuda"):
    import lstm_fast

    T, B, I, H, L, bi, proj = case
    torch.manual_seed(0)
    base = torch.nn.LSTM(I, H, L, bidirectional=bi, proj_size=proj).to(device, dtype)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    results = {}
    for name in ("reference", backend):
        m = lstm_fast.LSTM.from_torch(base, backend=name)
        xi = x.clone().requires_grad_(True)
        y, (h, c) = m(xi)
        (y.float().square().sum() + h.float().sum() + c.float().sum()).backward()
        results[name] = [y, h, c, xi.grad] + [p.grad for p in m.parameters()]
    err = 0.0
    for a, b in zip(results[backend], results["reference"]):
        err = max(err, ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item())
    return err


def main(argv):
    backends = argv or ["cuda", "triton"]
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize")
        return 0
    from lstm_fast.backends import BACKEND_NAMES, get_backend

    failed = 0
    for backend in backends:
        # Only the backend under test is loaded: the triton run must not touch the compiled
        # extension, which gpu_run.sh builds at the same time.
        ok, why = get_backend(backend).is_available() if backend in BACKEND_NAMES else (False, "unknown backend")
        if not ok:
            print(f"{backend}: unavailable, not checked: {why.splitlines()[0] if why else ''}")
            continue
        for case in CASES:
            for dtype in (torch.float32, torch.float16):
                label = f"{backend} T{case[0]} B{case[1]} I{case[2]} H{case[3]} L{case[4]}" \
                        f"{' bi' if case[5] else ''}{f' P{case[6]}' if case[6] else ''} {str(dtype)[6:]}"
                try:
                    err = run_case(backend, case, dtype)
                    torch.cuda.synchronize()
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    status = "unsupported" if "not support" in msg else "FAILED"
                    failed += status == "FAILED"
                    print(f"{label}: {status}: {msg[:200]}")
                    continue
                good = err <= TOL[dtype]
                failed += not good
                print(f"{label}: {'ok' if good else 'MISMATCH'} (max rel err vs reference {err:.1e})")
    print(f"{failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
