"""Prompt processing: y = x @ W.T for many tokens, with W dequantized a band of rows at a time into float32
(matvec.dequantize_kernel) and multiplied by a shared-memory tiled GEMM: each block loads a tile of x and a tile
of the band into shared memory and every thread accumulates one output in float32.

This is the GPU's twin of the CPU's BLAS path (quant/matmul.py): the activations are not quantized, so its
numbers differ from the decode kernels' by about what the CPU's sgemm path differs from its integer kernels, and
it is taken from the same token count on (BLAS_MIN_TOKENS).
"""
from __future__ import annotations

import numpy as np

from .runtime import import_cuda

cuda = import_cuda()

_gemm_cache: dict = {}


def gemm_kernel(tile: int):
    """(x float32 [n, k], w float32 [m, k], bias float32 [m] or [0], col0, out float32 [n, n_out]):
    out[:, col0:col0+m] = x @ w.T (+ bias). Launched with blocks of (tile, tile) threads."""
    if tile in _gemm_cache:
        return _gemm_cache[tile]

    @cuda.jit
    def kernel(x, w, bias, col0, out):
        x_tile = cuda.shared.array((tile, tile), np.float32)
        w_tile = cuda.shared.array((tile, tile), np.float32)
        n, k = x.shape
        m = w.shape[0]
        tx = cuda.threadIdx.x          # the output column (weight row) within the tile
        ty = cuda.threadIdx.y          # the output row (token) within the tile
        tiles_n = (n + tile - 1) // tile
        tiles_m = (m + tile - 1) // tile
        for item in range(cuda.blockIdx.x, tiles_n * tiles_m, cuda.gridDim.x):
            row = (item // tiles_m) * tile + ty
            col = (item % tiles_m) * tile + tx
            w_row = (item % tiles_m) * tile + ty     # the weight row this thread loads
            acc = np.float32(0.0)
            for k0 in range(0, k, tile):
                x_tile[ty, tx] = x[row, k0 + tx] if row < n and k0 + tx < k else np.float32(0.0)
                w_tile[ty, tx] = w[w_row, k0 + tx] if w_row < m and k0 + tx < k else np.float32(0.0)
                cuda.syncthreads()
                for j in range(tile):
                    acc += x_tile[ty, j] * w_tile[tx, j]
                cuda.syncthreads()
            if row < n and col < m:
                out[row, col0 + col] = acc + bias[col] if bias.shape[0] > 0 else acc

    _gemm_cache[tile] = kernel
    return kernel
