"""Matrix products on the device, on the weights' own blocks: y[t, r] = x[t] . W[r] (+ bias[r]).

* Decode (a few tokens): ``matvec_kernel(kind)``, one CUDA block per (token, weight row), its threads striding
  over the row's 32-value units. Each unit is an exact integer dot product of the weight's quants with the
  activation's (quantized to q8_0 / q8_1 / q8_K by quantize.py, as the CPU does), scaled as ggml scales it:

      legacy (q8_0 / q8_1 activations):  d_w * d_x * (q_w . q_x)  [+ m_w * s_x for q4_1 / q5_1]
      K-quants (q8_K activations):       d_x * sum_h (d_h * (q_w . q_x)_h - m_h * bsum_h)   (h: the halves of 16)

  then the block's partial sums meet in a shared-memory tree. Every (token, row) is computed alone, so the
  numbers of a token do not depend on the batch it came in (model/batching.py relies on that).
* f32 / f16 / bf16 weights: float dot products with the activations rounded to the weights' precision.
* Prompts (many tokens): ``dequantize_kernel(kind)`` writes float32 tiles of W, multiplied in gemm.py.

One kernel per kind: the kind is a constant of the kernel's closure, so each compiles to its own layout.
"""
from __future__ import annotations

import numpy as np

from . import blocks
from .blocks import K_QUANTS, float_value, unit_params, unit_unpack
from .runtime import MAX_THREADS, import_cuda

cuda = import_cuda()


@cuda.jit(device=True)
def block_sum(partial, value):
    """Sum ``value`` over the block's threads (a power of two of them) through the shared array ``partial``;
    every thread gets the total. The tree's order is fixed, so the result does not depend on timing."""
    t = cuda.threadIdx.x
    partial[t] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if t < stride:
            partial[t] += partial[t + stride]
        cuda.syncthreads()
        stride //= 2
    total = partial[0]
    cuda.syncthreads()       # partial is reused by the next call
    return total


_matvec_cache: dict = {}
_dequantize_cache: dict = {}


def matvec_kernel(kind: int):
    """The mat-vec kernel of a quantized ``kind``: (w uint8 [n_rows, row_bytes], xq int8 [n, k], xd float32
    [n, k/32 or k/256], xs float32 [n, k/32] (q8_1 sums) or int32 [n, k/16] (q8_K bsums), bias float32 [n_rows]
    or [0], out float32 [n, n_rows])."""
    if kind in _matvec_cache:
        return _matvec_cache[kind]
    k_quant = kind in K_QUANTS
    has_min = kind in (blocks.Q4_1, blocks.Q5_1)

    @cuda.jit
    def kernel(w, xq, xd, xs, bias, out):
        partial = cuda.shared.array(MAX_THREADS, np.float32)
        q = cuda.local.array(32, np.int32)
        n_tokens = xq.shape[0]
        n_rows = w.shape[0]
        n_units = xq.shape[1] // 32
        for item in range(cuda.blockIdx.x, n_tokens * n_rows, cuda.gridDim.x):
            t = item // n_rows
            r = item - t * n_rows
            acc = np.float32(0.0)
            for u in range(cuda.threadIdx.x, n_units, cuda.blockDim.x):
                d0, m0, d1, m1 = unit_params(kind, w, r, u)
                unit_unpack(kind, w, r, u, q)
                dot0 = 0
                dot1 = 0
                for i in range(16):
                    dot0 += q[i] * np.int32(xq[t, 32 * u + i])
                    dot1 += q[i + 16] * np.int32(xq[t, 32 * u + 16 + i])
                if k_quant:
                    part = d0 * np.float32(dot0) + d1 * np.float32(dot1)
                    part -= m0 * np.float32(xs[t, 2 * u]) + m1 * np.float32(xs[t, 2 * u + 1])
                    acc += xd[t, u // 8] * part
                else:
                    acc += (d0 * xd[t, u]) * np.float32(dot0 + dot1)
                    if has_min:
                        acc -= m0 * xs[t, u]          # m_h is minus the block's m
            total = block_sum(partial, acc)
            if cuda.threadIdx.x == 0:
                out[t, r] = total + bias[r] if bias.shape[0] > 0 else total

    _matvec_cache[kind] = kernel
    return kernel


def float_matvec_kernel(kind: int):
    """f32 / f16 / bf16 weights (float32 or uint16 [n_rows, k]) times activations x float32 [n, k], already
    rounded to the weights' precision."""
    if kind in _matvec_cache:
        return _matvec_cache[kind]

    @cuda.jit
    def kernel(w, x, bias, out):
        partial = cuda.shared.array(MAX_THREADS, np.float32)
        n_tokens, k = x.shape
        n_rows = w.shape[0]
        for item in range(cuda.blockIdx.x, n_tokens * n_rows, cuda.gridDim.x):
            t = item // n_rows
            r = item - t * n_rows
            acc = np.float32(0.0)
            for j in range(cuda.threadIdx.x, k, cuda.blockDim.x):
                acc += float_value(kind, w, r, j) * x[t, j]
            total = block_sum(partial, acc)
            if cuda.threadIdx.x == 0:
                out[t, r] = total + bias[r] if bias.shape[0] > 0 else total

    _matvec_cache[kind] = kernel
    return kernel


def dequantize_kernel(kind: int):
    """(w, first, out float32 [n, k]): rows first..first+n-1 of W as float32, bit for bit the CPU's dequantization
    (quant/legacy.py, quant/kquants.py) in the simulator."""
    if kind in _dequantize_cache:
        return _dequantize_cache[kind]
    is_float = kind in (blocks.F32, blocks.F16, blocks.BF16)

    @cuda.jit
    def kernel(w, first, out):
        q = cuda.local.array(32, np.int32)
        n, k = out.shape
        if is_float:
            for item in range(cuda.grid(1), n * k, cuda.gridsize(1)):
                row = item // k
                out[row, item - row * k] = float_value(kind, w, first + row, item - row * k)
            return
        n_units = k // 32
        for item in range(cuda.grid(1), n * n_units, cuda.gridsize(1)):
            row = item // n_units
            u = item - row * n_units
            d0, m0, d1, m1 = unit_params(kind, w, first + row, u)
            unit_unpack(kind, w, first + row, u, q)
            for i in range(16):
                out[row, 32 * u + i] = d0 * np.float32(q[i]) - m0
                out[row, 32 * u + 16 + i] = d1 * np.float32(q[i + 16]) - m1

    _dequantize_cache[kind] = kernel
    return kernel
