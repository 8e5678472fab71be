"""Activation quantization on the device, the CPU path's arithmetic step for step (quant/activations.py): rows of
float32 activations -> q8_0 / q8_1 blocks of 32 (``id = 127/amax``, round to nearest even, half-precision
scales) or q8_K super-blocks of 256 (``iscale = -127/max``, sums of 16), and the f16 / bf16 roundings that f16 /
bf16 weights meet. Same inputs, same integers and scales as the CPU, so a mat-vec differs from the CPU's only by the
order of its float32 sums.

One work item per block, grid-stride: any launch shape gives the same result. q8_0 blocks on a GPU take a warp
each (``quantize_q8_0_warp_kernel``): one token's row of 5120 values is 160 blocks, and a thread per block read its
32 values one after the other; a lane per value reads them in one load, and the block's maximum and the sum of its
quants (the only cross-lane steps) are exact in any order.
"""
from __future__ import annotations

import math

import numpy as np

from .matvec import SHUFFLE, WARP, warp_layout
from .runtime import import_cuda

cuda = import_cuda()


@cuda.jit(device=True)
def round_to_bits(value, bits, min_normal_exponent):
    """float64 ``value`` rounded to ``bits`` significant bits, to nearest even, with the subnormal quantum of a
    format whose smallest normal is 2**min_normal_exponent (half: 11 bits, -14; bfloat16: 8 bits, -126).
    Overflow is left to the caller."""
    magnitude = abs(value)
    if magnitude == 0.0 or not math.isfinite(magnitude):
        return value
    mantissa, exponent = math.frexp(magnitude)          # magnitude = mantissa * 2**exponent, 0.5 <= mantissa < 1
    if exponent - 1 < min_normal_exponent:              # subnormal: a fixed quantum
        exponent = min_normal_exponent + 1
    rounded = np.float64(round(math.ldexp(magnitude, int(bits - exponent))))
    return math.copysign(math.ldexp(rounded, int(exponent - bits)), value)


@cuda.jit(device=True)
def round_to_f16(value):
    """IEEE half rounding of a float (quant/activations.round_to_f16): float64 result."""
    if abs(value) >= 65520.0 and math.isfinite(value):
        return math.copysign(math.inf, value)
    return round_to_bits(np.float64(value), 11, -14)


@cuda.jit(device=True)
def round_to_bf16(value):
    """bfloat16 rounding (nearest even), float64 result; NaN stays NaN."""
    return round_to_bits(np.float64(value), 8, -126)


@cuda.jit
def quantize_q8_0_kernel(x, qs, d, sums):
    """x float32 [n, k] -> qs int8 [n, k], d float32 [n, k/32], sums float32 [n, k/32] (q8_1's s = d*sum(qs))."""
    n_blocks = x.shape[1] // 32
    for item in range(cuda.grid(1), x.shape[0] * n_blocks, cuda.gridsize(1)):
        row = item // n_blocks
        start = (item - row * n_blocks) * 32
        amax = np.float32(0.0)
        for i in range(32):
            amax = max(amax, abs(x[row, start + i]))
        scale = np.float32(amax / np.float32(127.0))
        inverse = np.float32(np.float32(127.0) / amax) if amax != 0 else np.float32(0.0)
        total = 0
        for i in range(32):
            q = round(np.float32(x[row, start + i] * inverse))
            qs[row, start + i] = q
            total += q
        d[row, start // 32] = np.float32(round_to_f16(scale))
        sums[row, start // 32] = np.float32(round_to_f16(np.float32(np.float32(total) * scale)))


@cuda.jit(device=True)
def lanes_combine(partial, value, maximum):
    """The maximum (``maximum``) or the sum of ``value`` over a warp's lanes on a GPU, over the block's threads
    through the shared ``partial`` in the simulator; every thread gets it. Exact in any order for maxima and for
    integer sums. (ops.block_combine's docstring says why such a function lives in the module of its kernels.)"""
    if SHUFFLE:
        offset = WARP // 2
        while offset > 0:
            other = cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)
            value = max(value, other) if maximum else value + other
            offset //= 2
        return value
    t = cuda.threadIdx.x
    partial[t] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if t < stride:
            partial[t] = max(partial[t], partial[t + stride]) if maximum else partial[t] + partial[t + stride]
        cuda.syncthreads()
        stride //= 2
    result = partial[0]
    cuda.syncthreads()
    return result


@cuda.jit
def quantize_q8_0_warp_kernel(x, qs, d, sums):
    """quantize_q8_0_kernel with a warp per block on a GPU (lane i: value i; blocks must be whole warps), the
    whole block per q8_0 block in the simulator: the same integers and scales."""
    amaxes = cuda.shared.array(WARP if not SHUFFLE else 1, np.float32)   # the simulator's reductions only
    totals = cuda.shared.array(WARP if not SHUFFLE else 1, np.int32)
    lane, width, warps, first = warp_layout(cuda.threadIdx.x, cuda.blockIdx.x, cuda.blockDim.x)
    n_blocks = x.shape[1] // 32
    for item in range(first, x.shape[0] * n_blocks, cuda.gridDim.x * warps):
        row = item // n_blocks
        start = (item - row * n_blocks) * 32
        amax = np.float32(0.0)
        for i in range(lane, 32, width):
            amax = max(amax, abs(x[row, start + i]))
        amax = lanes_combine(amaxes, amax, True)
        scale = np.float32(amax / np.float32(127.0))
        inverse = np.float32(np.float32(127.0) / amax) if amax != 0 else np.float32(0.0)
        total = 0
        for i in range(lane, 32, width):
            q = round(np.float32(x[row, start + i] * inverse))
            qs[row, start + i] = q
            total += q
        total = lanes_combine(totals, np.int32(total), False)
        if lane == 0:
            d[row, start // 32] = np.float32(round_to_f16(scale))
            sums[row, start // 32] = np.float32(round_to_f16(np.float32(np.float32(total) * scale)))


@cuda.jit
def quantize_q8_K_kernel(x, qs, d, bsums):
    """x float32 [n, k] -> qs int8 [n, k], d float32 [n, k/256], bsums int32 [n, k/16] (ggml's
    quantize_row_q8_K_ref: the signed value of largest magnitude sets the scale)."""
    n_blocks = x.shape[1] // 256
    for item in range(cuda.grid(1), x.shape[0] * n_blocks, cuda.gridsize(1)):
        row = item // n_blocks
        block = item - row * n_blocks
        start = block * 256
        amax = np.float32(0.0)
        signed_max = np.float32(0.0)
        for i in range(256):
            magnitude = abs(x[row, start + i])
            if magnitude > amax:
                amax = magnitude
                signed_max = x[row, start + i]
        if amax == 0:
            d[row, block] = np.float32(0.0)
            for i in range(256):
                qs[row, start + i] = 0
            for j in range(16):
                bsums[row, block * 16 + j] = 0
            continue
        iscale = np.float32(np.float32(-127.0) / signed_max)
        for j in range(16):
            total = 0
            for i in range(16):
                q = min(127, round(np.float32(iscale * x[row, start + j * 16 + i])))
                qs[row, start + j * 16 + i] = q
                total += q
            bsums[row, block * 16 + j] = total
        d[row, block] = np.float32(np.float32(1.0) / iscale)


@cuda.jit
def round_rows_kernel(x, out, to_bf16):
    """out = x rounded to half (to_bf16 False) or bfloat16 precision, as float32: what f16 / bf16 weights meet."""
    n, k = x.shape
    for item in range(cuda.grid(1), n * k, cuda.gridsize(1)):
        row = item // k
        col = item - row * k
        if to_bf16:
            out[row, col] = np.float32(round_to_bf16(x[row, col]))
        else:
            out[row, col] = np.float32(round_to_f16(x[row, col]))
