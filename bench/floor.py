"""The GEMM floor of a configuration: the module's matmuls alone, nothing else.

Every LSTM implementation here does at least these products, with the same
shapes; timing them through torch.mm (the BLAS torch calls: MKL/oneDNN on CPU,
cuBLAS on GPU) in the same process and round-robin as the runners gives each
row a "x floor": its time over this one. Near 1 means the gate math, the time
loop and the framework around the GEMMs cost little; the per-step products are
kept per step, as the recurrence forces them to be.
"""
from __future__ import annotations

import torch

from .configs import Shape

FLOOR = "gemm floor"


def floor_step(shape: Shape, mode: str, device: str, dtype: torch.dtype):
    """A callable running the GEMMs counted by configs.lstm_flops for one module call."""
    T, B, H = shape.T, shape.B, shape.H
    P = shape.proj or H
    D = 2 if shape.bidir else 1
    G = 4 * H

    def mat(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    products = []  # (a, b, out): out = a @ b
    for layer in range(shape.L):
        width = shape.I if layer == 0 else P * D
        for _ in range(D):
            x, w_ih, w_hh = mat(T * B, width), mat(width, G), mat(P, G)
            gx, h, w_hr, hp = mat(T * B, G), mat(B, P), mat(H, P), mat(B, H)
            steps = [(h, w_hh, mat(B, G))] + ([(hp, w_hr, mat(B, P))] if shape.proj else [])
            products.append((x, w_ih, gx))
            products += steps * T
            if mode == "training":
                dg = gx
                products.append((dg, w_ih.t(), mat(T * B, width)))          # d x
                products.append((dg.t(), x, mat(G, width)))                 # d W_ih
                back = [(mat(B, G), w_hh.t(), mat(B, P))]                   # d h per step
                if shape.proj:
                    back.append((mat(B, P), w_hr.t(), mat(B, H)))
                products += back * T
                products.append((dg.t(), mat(T * B, P), mat(G, P)))        # d W_hh
                if shape.proj:
                    products.append((mat(P, T * B), mat(T * B, H), mat(P, H)))  # d W_hr

    def step():
        for a, b, out in products:
            torch.mm(a, b, out=out)

    return step
