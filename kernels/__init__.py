"""@triton.jit kernels of lstm_fast's `triton` backend (installed as lstm_fast.kernels).

Only kernels live here; launchers, dispatch and dtype policy are in
lstm_fast/backends/triton_gpu.py. Importing this package imports triton.
"""
