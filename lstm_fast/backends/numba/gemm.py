"""Per-step products out[n, M] = x[n, K] @ S with S a packed slab (kernels, jitted by jit.load).

A slab holds panels of PW = 2 SIMD vectors of columns: panel p is stored [K][PW]
contiguous at p * K * PW of the flat slab, columns past M are zero. A block kernel
keeps an MR x (NP panels) block of out in vector registers while it streams K: per
k, one broadcast of x[r, k] per row and 2 * NP vector loads of S. Speeds against
LLVM's own vectorization: bench/NOTES_numba.md#product-kernel.
"""
from __future__ import annotations

import numpy as np

# Bytes of one SIMD vector (AVX2). On CPUs with narrower vectors LLVM splits each
# operation; the packing is the same.
VEC_BYTES = 32

# Elements of x per row block of slab_gemm: 128 KiB of float32, a quarter of the L2 of
# the machine that chose it (bench/NOTES_numba.md#product-kernel).
ROW_BLOCK_ELEMS = 32768


def panel_width(itemsize):
    """PW, columns per panel, for elements of itemsize bytes (host side)."""
    return 2 * VEC_BYTES // itemsize


# What the vector intrinsics of numba_bindings() do, as plain Python on numpy arrays.
def lanes(arr):
    """Elements of arr's dtype in one vector."""
    return VEC_BYTES // arr.itemsize


def vzero(arr):
    """A vector of zeros of arr's dtype."""
    return np.zeros(lanes(arr), arr.dtype)


def vload(arr, idx):
    """arr[idx:idx + lanes] (unaligned)."""
    return arr[idx:idx + lanes(arr)].copy()


def vstore(arr, idx, v):
    """arr[idx:idx + lanes] = v (unaligned)."""
    arr[idx:idx + len(v)] = v


def vsplat(x):
    """A vector with every lane x."""
    return np.full(VEC_BYTES // np.asarray(x).itemsize, x)


def vfma(a, b, c):
    """a * b + c, fused where the CPU has FMA."""
    return a * b + c


def block_6x1(x, row, slab, start, K, out, col):
    """out[row:row+6, col:col+PW] = x[row:row+6, :K] @ the panel at slab[start:]. Twelve
    accumulators: enough FMAs in flight to cover their latency."""
    L = lanes(slab)
    PW = 2 * L
    a00 = vzero(slab)
    a01 = vzero(slab)
    a10 = vzero(slab)
    a11 = vzero(slab)
    a20 = vzero(slab)
    a21 = vzero(slab)
    a30 = vzero(slab)
    a31 = vzero(slab)
    a40 = vzero(slab)
    a41 = vzero(slab)
    a50 = vzero(slab)
    a51 = vzero(slab)
    x0 = x[row]
    x1 = x[row + 1]
    x2 = x[row + 2]
    x3 = x[row + 3]
    x4 = x[row + 4]
    x5 = x[row + 5]
    for k in range(K):
        w0 = vload(slab, start + k * PW)
        w1 = vload(slab, start + k * PW + L)
        v = vsplat(x0[k])
        a00 = vfma(v, w0, a00)
        a01 = vfma(v, w1, a01)
        v = vsplat(x1[k])
        a10 = vfma(v, w0, a10)
        a11 = vfma(v, w1, a11)
        v = vsplat(x2[k])
        a20 = vfma(v, w0, a20)
        a21 = vfma(v, w1, a21)
        v = vsplat(x3[k])
        a30 = vfma(v, w0, a30)
        a31 = vfma(v, w1, a31)
        v = vsplat(x4[k])
        a40 = vfma(v, w0, a40)
        a41 = vfma(v, w1, a41)
        v = vsplat(x5[k])
        a50 = vfma(v, w0, a50)
        a51 = vfma(v, w1, a51)
    vstore(out[row], col, a00)
    vstore(out[row], col + L, a01)
    vstore(out[row + 1], col, a10)
    vstore(out[row + 1], col + L, a11)
    vstore(out[row + 2], col, a20)
    vstore(out[row + 2], col + L, a21)
    vstore(out[row + 3], col, a30)
    vstore(out[row + 3], col + L, a31)
    vstore(out[row + 4], col, a40)
    vstore(out[row + 4], col + L, a41)
    vstore(out[row + 5], col, a50)
    vstore(out[row + 5], col + L, a51)


def block_4x1(x, row, slab, start, K, out, col):
    """out[row:row+4, col:col+PW] = x[row:row+4, :K] @ the panel at slab[start:]. Written
    out like block_6x1: register blocks need named accumulators, numba cannot unroll them."""
    L = lanes(slab)
    PW = 2 * L
    a00 = vzero(slab)
    a01 = vzero(slab)
    a10 = vzero(slab)
    a11 = vzero(slab)
    a20 = vzero(slab)
    a21 = vzero(slab)
    a30 = vzero(slab)
    a31 = vzero(slab)
    x0 = x[row]
    x1 = x[row + 1]
    x2 = x[row + 2]
    x3 = x[row + 3]
    for k in range(K):
        w0 = vload(slab, start + k * PW)
        w1 = vload(slab, start + k * PW + L)
        v = vsplat(x0[k])
        a00 = vfma(v, w0, a00)
        a01 = vfma(v, w1, a01)
        v = vsplat(x1[k])
        a10 = vfma(v, w0, a10)
        a11 = vfma(v, w1, a11)
        v = vsplat(x2[k])
        a20 = vfma(v, w0, a20)
        a21 = vfma(v, w1, a21)
        v = vsplat(x3[k])
        a30 = vfma(v, w0, a30)
        a31 = vfma(v, w1, a31)
    vstore(out[row], col, a00)
    vstore(out[row], col + L, a01)
    vstore(out[row + 1], col, a10)
    vstore(out[row + 1], col + L, a11)
    vstore(out[row + 2], col, a20)
    vstore(out[row + 2], col + L, a21)
    vstore(out[row + 3], col, a30)
    vstore(out[row + 3], col + L, a31)


def block_1x4(x, row, slab, start, K, out, col):
    """out[row, col:col+4PW] = x[row, :K] @ the 4 panels from slab[start:]."""
    L = lanes(slab)
    PW = 2 * L
    PS = K * PW
    a0 = vzero(slab)
    a1 = vzero(slab)
    a2 = vzero(slab)
    a3 = vzero(slab)
    a4 = vzero(slab)
    a5 = vzero(slab)
    a6 = vzero(slab)
    a7 = vzero(slab)
    xr = x[row]
    for k in range(K):
        v = vsplat(xr[k])
        i = start + k * PW
        a0 = vfma(v, vload(slab, i), a0)
        a1 = vfma(v, vload(slab, i + L), a1)
        a2 = vfma(v, vload(slab, i + PS), a2)
        a3 = vfma(v, vload(slab, i + PS + L), a3)
        a4 = vfma(v, vload(slab, i + 2 * PS), a4)
        a5 = vfma(v, vload(slab, i + 2 * PS + L), a5)
        a6 = vfma(v, vload(slab, i + 3 * PS), a6)
        a7 = vfma(v, vload(slab, i + 3 * PS + L), a7)
    o = out[row]
    vstore(o, col, a0)
    vstore(o, col + L, a1)
    vstore(o, col + PW, a2)
    vstore(o, col + PW + L, a3)
    vstore(o, col + 2 * PW, a4)
    vstore(o, col + 2 * PW + L, a5)
    vstore(o, col + 3 * PW, a6)
    vstore(o, col + 3 * PW + L, a7)


def block_1x1(x, row, slab, start, K, out, col):
    """out[row, col:col+PW] = x[row, :K] @ the panel at slab[start:]."""
    L = lanes(slab)
    PW = 2 * L
    a0 = vzero(slab)
    a1 = vzero(slab)
    xr = x[row]
    for k in range(K):
        v = vsplat(xr[k])
        a0 = vfma(v, vload(slab, start + k * PW), a0)
        a1 = vfma(v, vload(slab, start + k * PW + L), a1)
    vstore(out[row], col, a0)
    vstore(out[row], col + L, a1)


def slab_gemm(x, n_rows, slab, n_cols, out):
    """out[:n_rows, :ceil(n_cols / PW) * PW] = x[:n_rows] @ S for the first n_cols columns of slab.

    x [>=n_rows, K] (rows contiguous); slab flat, packed (see the module) with K rows;
    out [>=n_rows, >= that width], aliasing neither. Columns past n_cols get zeros."""
    K = x.shape[1]
    PW = 2 * lanes(slab)
    n_panels = (n_cols + PW - 1) // PW
    # 6-row groups from 12 rows on, then 4-row groups, then single rows (each streams the whole
    # slab), as few of those as can be (32 = 4*6 + 2*4): bench/NOTES_numba.md#product-kernel.
    groups6 = n_rows // 6 if n_rows >= 12 else 0
    if groups6 > 0 and (n_rows - 6 * groups6) % 4 >= 2:  # one 6-row group fewer leaves fewer single rows
        groups6 -= 1
    end6 = 6 * groups6
    end4 = end6 + (n_rows - end6) // 4 * 4
    # Blocks of about ROW_BLOCK_ELEMS elements of x (kept in L2), panel-outer within a
    # block: one panel (K * PW elements) stays in L1 across the block's row groups.
    block = max(6, ROW_BLOCK_ELEMS // K // 6 * 6)
    for r0 in range(0, end6, block):
        r1 = min(r0 + block, end6)
        for p in range(n_panels):
            for r in range(r0, r1, 6):
                block_6x1(x, r, slab, p * K * PW, K, out, p * PW)
    for p in range(n_panels):
        for r in range(end6, end4, 4):
            block_4x1(x, r, slab, p * K * PW, K, out, p * PW)
    end_panels4 = n_panels - n_panels % 4
    for r in range(end4, n_rows):
        for p in range(0, end_panels4, 4):
            block_1x4(x, r, slab, p * K * PW, K, out, p * PW)
        for p in range(end_panels4, n_panels):
            block_1x1(x, r, slab, p * K * PW, K, out, p * PW)


def pack_slab(a, index, count, by_column, slab):
    """Fill one chunk's slab (flat, see the module) with w^T, where w's row j < count is
    a[index[j], :] (by_column False) or a[:, index[j]] (True); K is the other dimension
    of a. Padding columns get zeros."""
    PW = 2 * lanes(slab)
    K = a.shape[0] if by_column else a.shape[1]
    width = slab.shape[0] // K  # n_panels * PW
    for j in range(count, width):
        start = j // PW * K * PW + j % PW
        for k in range(K):
            slab[start + k * PW] = 0
    if by_column:
        # row k of a feeds row k of every panel: read a by rows, write runs of PW
        for k in range(K):
            row = a[k]
            for j in range(count):
                slab[j // PW * K * PW + k * PW + j % PW] = row[index[j]]
    else:
        for j in range(count):
            start = j // PW * K * PW + j % PW
            row = a[index[j]]
            for k in range(K):
                slab[start + k * PW] = row[k]


def pack_chunk_slab(weight_slabs, chunk, by_column):
    """pack_slab for one chunk of a bundle (weight, index, counts, slabs) (see loops.py)."""
    weight, index, counts, slabs = weight_slabs
    pack_slab(weight, index[chunk], counts[chunk], by_column, slabs[chunk])


KERNELS = ("block_6x1", "block_4x1", "block_1x4", "block_1x1", "slab_gemm", "pack_slab", "pack_chunk_slab")


def numba_bindings(numba):
    """The vector operations above as LLVM vectors of VEC_BYTES held in registers."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model

    from .jit import element_pointer

    class VecType(types.Type):
        """A SIMD vector of dtype filling VEC_BYTES, held in one register."""

        def __init__(self, dtype):
            self.dtype = dtype
            self.lanes = VEC_BYTES * 8 // dtype.bitwidth
            super().__init__(name=f"lstm_fast_vec({dtype}x{self.lanes})")

    @register_model(VecType)
    class VecModel(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            elem = dmm.lookup(fe_type.dtype).get_value_type()
            super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.lanes))

    @intrinsic
    def lanes(typingctx, arr):
        n = VEC_BYTES * 8 // arr.dtype.bitwidth

        def codegen(context, builder, sig, args):
            return ir.Constant(ir.IntType(64), n)
        return types.int64(arr), codegen

    @intrinsic
    def vzero(typingctx, arr):
        vt = VecType(arr.dtype)

        def codegen(context, builder, sig, args):
            return ir.Constant(context.get_value_type(vt), None)
        return vt(arr), codegen

    @intrinsic
    def vload(typingctx, arr, idx):
        vt = VecType(arr.dtype)

        def codegen(context, builder, sig, args):
            ptr = element_pointer(context, builder, sig.args[0], args[0], args[1])
            vptr = builder.bitcast(ptr, context.get_value_type(vt).as_pointer())
            return builder.load(vptr, align=arr.dtype.bitwidth // 8)
        return vt(arr, idx), codegen

    @intrinsic
    def vstore(typingctx, arr, idx, v):
        def codegen(context, builder, sig, args):
            ptr = element_pointer(context, builder, sig.args[0], args[0], args[1])
            builder.store(args[2], builder.bitcast(ptr, args[2].type.as_pointer()), align=arr.dtype.bitwidth // 8)
            return context.get_dummy_value()
        return types.void(arr, idx, v), codegen

    @intrinsic
    def vsplat(typingctx, x):
        vt = VecType(x)

        def codegen(context, builder, sig, args):
            ty = context.get_value_type(vt)
            one = builder.insert_element(ir.Constant(ty, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), [0] * vt.lanes)
            return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined), zeros)
        return vt(x), codegen

    @intrinsic
    def vfma(typingctx, a, b, c):
        def codegen(context, builder, sig, args):
            ty = args[0].type
            bits = 32 if isinstance(ty.element, ir.FloatType) else 64
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]),
                                                f"llvm.fmuladd.v{ty.count}f{bits}")
            return builder.call(fn, list(args))
        return a(a, b, c), codegen

    return {"lanes": lanes, "vzero": vzero, "vload": vload, "vstore": vstore, "vsplat": vsplat, "vfma": vfma}
