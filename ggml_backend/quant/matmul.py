"""Matrix products with weights stored in ggml block formats: y = x @ W.T.

W has shape [n_rows (out features), k (in features)] and is stored as uint8 bytes [n_rows, row_bytes] (usually a
read-only view into a memory-mapped model file); x is float32 [n_tokens, k]; y is float32 [n_tokens, n_rows].

Numerics follow llama.cpp's CPU backend: each activation row is quantized to the weight type's ``vec_dot_type``
(q8_0, q8_1 or q8_K: see ``activations.py``), each block contributes an exact integer dot product scaled by the
block scales, and the per-row sums are accumulated in float32. f16 / bf16 weights meet activations rounded to f16 /
bf16; f32 weights meet float32 activations.

Two ways to compute the same product:

* ``"int"``: integer kernels. On a CPU with AVX2 they are the explicit-SIMD kernels of ``decode.py`` on its
  instruction set (``KERNEL_ISA``: VNNI or AVX2): one activation row (decode, memory-bound: every weight byte is
  read once per token) or a few (tiles of tokens that unpack each weight block once, each (row, token) result
  bit for bit the one-token kernel's), several matrices sharing the input in one launch (``matmul_many``). CPUs without AVX2 (or ``GGML_BACKEND_KERNELS=generic``) run the plain numba kernels
  below, which unpack each weight block once into a small int16 buffer and dot it with every activation row.
  Rows of W are split into equal chunks, one numba ``prange`` iteration each, so any thread count gets equal work.
* ``"blas"``: dequantize a band of W rows to float32 (``decode.dequantize_rows`` on a SIMD CPU, bit-exact to the
  type table) and hand it to numpy's sgemm.
  Its numerics differ (the activations are not quantized) but it is much faster when many tokens share each
  weight (prompt processing). ``method="auto"`` picks it from ``BLAS_MIN_TOKENS`` tokens on.

Every size a kernel relies on is checked here, in Python, before the kernel runs.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .activations import (
    quantize_activations_q8_0, quantize_activations_q8_1, quantize_activations_q8_K,
    round_rows_to_bf16, round_rows_to_f16,
)
from .decode import KINDS, matmul_few, matvec
from .decode import dequantize_rows as dequantize_simd
from .simd import choose_isa
from .types import QuantType, get_type


class MatmulShapeError(ValueError):
    """Weights or activations given to a matrix product have the wrong shape, dtype, size or memory layout."""


# From this many tokens on, method="auto" dequantizes W bands to float32 and uses numpy's sgemm. The band
# dequantization costs the same whatever the token count (Qwen2.5-0.5B: ~600 ms per forward pass on 2 Zen 4
# cores), the SIMD integer kernels ~18 ms per token: a 16-token prompt took 660 ms by sgemm and 290 ms by the
# integer kernels, a 48-token one about 890 ms either way (2026-12-01, 2 threads; see benchmarks/README.md).
BLAS_MIN_TOKENS = 48
_SGEMM_MIN_WORK = 1 << 21   # M*N*K of every sgemm of the BLAS path (see _blas_product)

# Weight rows dequantized per sgemm call on the BLAS path: a band of float32 small enough to stay in L2/L3
# (256 rows x 4864 values = 5 MB at most for the models we run) but big enough for sgemm to be efficient.
BLAS_BAND_ROWS = 256

# ggml half-precision bits -> float32, for reading block scales inside the kernels.
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

# The SIMD instruction set of the one-token kernels (simd.py): the best this CPU has, GGML_BACKEND_KERNELS to force
# one (avx512vnni, avx2) or the plain numba kernels (generic). None: the plain kernels.
try:
    KERNEL_ISA = choose_isa()
    _KERNEL_CHOICE_ERROR = None
except ValueError as error:   # a bad GGML_BACKEND_KERNELS: said by the first product, where callers handle errors
    KERNEL_ISA, _KERNEL_CHOICE_ERROR = None, str(error)


def _check_kernel_choice() -> None:
    if _KERNEL_CHOICE_ERROR is not None:
        raise ValueError(_KERNEL_CHOICE_ERROR)

# Kernel selectors (one compiled kernel per family, a branch per block picks the layout).
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 4
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 0, 1, 2, 3, 4
_LEGACY_KINDS = {"q4_0": Q4_0, "q4_1": Q4_1, "q5_0": Q5_0, "q5_1": Q5_1, "q8_0": Q8_0}
_KQUANT_KINDS = {"q2_K": Q2_K, "q3_K": Q3_K, "q4_K": Q4_K, "q5_K": Q5_K, "q6_K": Q6_K}
SUPPORTED_TYPES = ("f32", "f16", "bf16", *_LEGACY_KINDS, *_KQUANT_KINDS)


# ----------------------------------------------------------------------------------------------------------------
# Block unpacking: one block of a weight row -> int16 quant values (+ scales). Shared by the dot kernels and the
# dequantizers of the BLAS path so that both read the formats the same way.
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _f16(row, offset, f16_table):
    return f16_table[np.int32(row[offset]) | (np.int32(row[offset + 1]) << 8)]


@njit(cache=True, inline="always")
def _f16_signed(block, offset, f16_table):
    """The f16 at block[offset:offset+2] of an int8 view, as float32."""
    return f16_table[np.int32(np.uint8(block[offset])) | (np.int32(np.uint8(block[offset + 1])) << 8)]


@njit(cache=True, inline="always")
def _rows_per_chunk(n_rows, n_chunks):
    """Rows per parallel chunk: equal shares rounded up to a multiple of 4 (the row group of the decode kernels)."""
    per_chunk = (n_rows + n_chunks - 1) // n_chunks
    return (per_chunk + 3) // 4 * 4


@intrinsic
def _prefetch(typingctx, array, index):
    """A hint (LLVM ``llvm.prefetch``, read, into all cache levels) that ``array[index]`` of a 1-D array will be
    read soon. It changes no result and cannot fault."""
    signature = types.void(array, index)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        byte_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0i8")
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_pointer)
        builder.call(function, [address, int32(0), int32(3), int32(1)])
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True, inline="always")
def _prefetch_bytes(flat, start, n_bytes):
    """Prefetch ``flat[start:start + n_bytes]`` (a 1-D byte array), one hint per 64-byte cache line, clipped to the
    array. The decode kernels ask this way for the rows they will read a few row groups later: streamed from
    memory without it they ran at half the speed they reach on cached weights (benchmarks/README.md)."""
    last = flat.size - 1
    for offset in range(0, n_bytes, 64):
        _prefetch(flat, min(last, start + offset))


# Rows ahead of the current row group whose bytes the decode kernels prefetch.
PREFETCH_ROWS_AHEAD_4 = 8   # four-row kernels (q5_0, q8_0): two groups ahead
PREFETCH_ROWS_AHEAD_2 = 4   # two-row kernels (q4_K, q6_K): two groups ahead


@njit(cache=True, inline="always")
def _unpack_legacy(kind, row, signed_row, block, q, f16_table):
    """Unpack block ``block`` of a legacy-quant row into ``q`` (32 int16). Returns (d, m): value = d*q + m."""
    if kind == Q4_0:
        o = block * 18
        for j in range(16):
            byte = np.int16(row[o + 2 + j])
            q[j] = (byte & 15) - 8
            q[j + 16] = (byte >> 4) - 8
        return _f16(row, o, f16_table), np.float32(0.0)
    if kind == Q4_1:
        o = block * 20
        for j in range(16):
            byte = np.int16(row[o + 4 + j])
            q[j] = byte & 15
            q[j + 16] = byte >> 4
        return _f16(row, o, f16_table), _f16(row, o + 2, f16_table)
    if kind == Q5_0 or kind == Q5_1:
        o = block * 22 if kind == Q5_0 else block * 24
        h = o + 2 if kind == Q5_0 else o + 4
        high_bits = (np.uint32(row[h]) | (np.uint32(row[h + 1]) << 8) | (np.uint32(row[h + 2]) << 16)
                     | (np.uint32(row[h + 3]) << 24))
        offset = 16 if kind == Q5_0 else 0
        for j in range(16):
            byte = np.int16(row[h + 4 + j])
            q[j] = ((byte & 15) | np.int16(((high_bits >> j) & 1) << 4)) - offset
            q[j + 16] = ((byte >> 4) | np.int16(((high_bits >> (j + 16)) & 1) << 4)) - offset
        if kind == Q5_0:
            return _f16(row, o, f16_table), np.float32(0.0)
        return _f16(row, o, f16_table), _f16(row, o + 2, f16_table)
    # Q8_0
    o = block * 34
    for j in range(32):
        q[j] = signed_row[o + 2 + j]
    return _f16(row, o, f16_table), np.float32(0.0)


@njit(cache=True, inline="always")
def _scale_min_k4(j, row, s):
    """The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at row[s:s+12] (q4_K, q5_K)."""
    if j < 4:
        return np.int32(row[s + j]) & 63, np.int32(row[s + j + 4]) & 63
    scale = (np.int32(row[s + j + 4]) & 15) | ((np.int32(row[s + j - 4]) >> 6) << 4)
    minimum = (np.int32(row[s + j + 4]) >> 4) | ((np.int32(row[s + j]) >> 6) << 4)
    return scale, minimum


@njit(cache=True, inline="always")
def _unpack_kquant(kind, row, signed_row, block, q, scales, mins, f16_table):
    """Unpack super-block ``block`` of a K-quant row: ``q`` (256 int16), ``scales`` / ``mins`` (16 int32, one per
    16 values). Returns (d, dmin): value_i = d * scales[i//16] * q_i - dmin * mins[i//16]."""
    if kind == Q4_K or kind == Q5_K:
        o = block * (144 if kind == Q4_K else 176)
        for j in range(8):
            scale, minimum = _scale_min_k4(j, row, o + 4)
            scales[2 * j] = scale
            scales[2 * j + 1] = scale
            mins[2 * j] = minimum
            mins[2 * j + 1] = minimum
        if kind == Q4_K:
            for c in range(4):
                for l in range(32):
                    byte = np.int16(row[o + 16 + 32 * c + l])
                    q[64 * c + l] = byte & 15
                    q[64 * c + 32 + l] = byte >> 4
        else:
            for c in range(4):
                for l in range(32):
                    byte = np.int16(row[o + 48 + 32 * c + l])
                    high = np.int16(row[o + 16 + l])
                    q[64 * c + l] = (byte & 15) | (((high >> (2 * c)) & 1) << 4)
                    q[64 * c + 32 + l] = (byte >> 4) | (((high >> (2 * c + 1)) & 1) << 4)
        return _f16(row, o, f16_table), _f16(row, o + 2, f16_table)
    if kind == Q6_K:
        o = block * 210
        for j in range(16):
            scales[j] = signed_row[o + 192 + j]
            mins[j] = 0
        for n in range(2):
            for l in range(32):
                low_a = np.int16(row[o + 64 * n + l])
                low_b = np.int16(row[o + 64 * n + 32 + l])
                high = np.int16(row[o + 128 + 32 * n + l])
                q[128 * n + l] = ((low_a & 15) | ((high & 3) << 4)) - 32
                q[128 * n + 32 + l] = ((low_b & 15) | (((high >> 2) & 3) << 4)) - 32
                q[128 * n + 64 + l] = ((low_a >> 4) | (((high >> 4) & 3) << 4)) - 32
                q[128 * n + 96 + l] = ((low_b >> 4) | (((high >> 6) & 3) << 4)) - 32
        return _f16(row, o + 208, f16_table), np.float32(0.0)
    if kind == Q3_K:
        o = block * 110
        s = o + 96
        for j in range(16):
            low = (np.int32(row[s + j]) & 15) if j < 8 else (np.int32(row[s + j - 8]) >> 4)
            high = (np.int32(row[s + 8 + (j % 4)]) >> (2 * (j // 4))) & 3
            scales[j] = (low | (high << 4)) - 32
            mins[j] = 0
        for n in range(2):
            for j in range(4):
                for l in range(32):
                    bits = (np.int16(row[o + 32 + 32 * n + l]) >> (2 * j)) & 3
                    has_high = (np.int16(row[o + l]) >> (4 * n + j)) & 1
                    q[128 * n + 32 * j + l] = bits - 4 + 4 * has_high
        return _f16(row, o + 108, f16_table), np.float32(0.0)
    # Q2_K
    o = block * 84
    for j in range(16):
        packed = np.int32(row[o + j])
        scales[j] = packed & 15
        mins[j] = packed >> 4
    for n in range(2):
        for j in range(4):
            for l in range(32):
                q[128 * n + 32 * j + l] = (np.int16(row[o + 16 + 32 * n + l]) >> (2 * j)) & 3
    return _f16(row, o + 80, f16_table), _f16(row, o + 82, f16_table)


# ----------------------------------------------------------------------------------------------------------------
# Integer kernels
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, fastmath=True)
def _matmul_legacy(kind, w, w_signed, xq, xd, xs, out, n_chunks, f16_table):
    """out[t, r] = sum over blocks b of d_w * d_x * (q_w . q_x) (+ m_w * s_x for q4_1 / q5_1).

    Like ggml's AVX code, the float accumulation runs in 16 lanes (lane j gets the products of values j and
    j + 16 of every block), summed once per row: no horizontal reduction per block."""
    n_rows = w.shape[0]
    n_tokens, k = xq.shape
    n_blocks = k // 32
    rows_per_chunk = (n_rows + n_chunks - 1) // n_chunks
    has_min = kind == Q4_1 or kind == Q5_1
    for chunk in prange(n_chunks):
        first = chunk * rows_per_chunk
        last = min(n_rows, first + rows_per_chunk)
        q = np.empty(32, np.int16)
        lanes = np.zeros((n_tokens, 16), np.float32)
        acc_min = np.zeros(n_tokens, np.float32)
        for r in range(first, last):
            row = w[r]
            signed_row = w_signed[r]
            lanes[:] = 0.0
            acc_min[:] = 0.0
            for b in range(n_blocks):
                d, m = _unpack_legacy(kind, row, signed_row, b, q, f16_table)
                base = b * 32
                for t in range(n_tokens):
                    scale = d * xd[t, b]
                    for j in range(16):
                        lanes[t, j] += scale * np.float32(np.int32(q[j]) * np.int32(xq[t, base + j])
                                                          + np.int32(q[j + 16]) * np.int32(xq[t, base + 16 + j]))
                if has_min:
                    for t in range(n_tokens):
                        acc_min[t] += m * xs[t, b]
            for t in range(n_tokens):
                out[t, r] = lanes[t].sum() + acc_min[t]


@njit(cache=True, parallel=True, fastmath=True)
def _matmul_kquant(kind, w, w_signed, xq, xd, xbsums, out, n_chunks, f16_table):
    """out[t, r] = sum over super-blocks of d_x * (d_w * sum_j scale_j (q_w . q_x)_j - dmin_w * sum_j min_j bsum_j).

    The scaled integer products of a super-block are summed exactly in 16 int32 lanes, converted once per
    super-block and accumulated in 16 float lanes (as ggml's AVX code does), summed once per row."""
    n_rows = w.shape[0]
    n_tokens, k = xq.shape
    n_blocks = k // 256
    rows_per_chunk = (n_rows + n_chunks - 1) // n_chunks
    has_mins = kind == Q2_K or kind == Q4_K or kind == Q5_K
    for chunk in prange(n_chunks):
        first = chunk * rows_per_chunk
        last = min(n_rows, first + rows_per_chunk)
        q = np.empty(256, np.int16)
        scales = np.empty(16, np.int32)
        mins = np.empty(16, np.int32)
        int_lanes = np.zeros(16, np.int32)
        lanes = np.zeros((n_tokens, 16), np.float32)
        acc_min = np.zeros(n_tokens, np.float32)
        for r in range(first, last):
            row = w[r]
            signed_row = w_signed[r]
            lanes[:] = 0.0
            acc_min[:] = 0.0
            for b in range(n_blocks):
                d, dmin = _unpack_kquant(kind, row, signed_row, b, q, scales, mins, f16_table)
                base = b * 256
                for t in range(n_tokens):
                    int_lanes[:] = 0
                    for g in range(16):
                        group_scale = scales[g]
                        for i in range(16):
                            int_lanes[i] += group_scale * (np.int32(q[16 * g + i])
                                                           * np.int32(xq[t, base + 16 * g + i]))
                    scale = d * xd[t, b]
                    for i in range(16):
                        lanes[t, i] += scale * np.float32(int_lanes[i])
                    if has_mins:
                        min_total = np.int32(0)
                        for g in range(16):
                            min_total += mins[g] * xbsums[t, b * 16 + g]
                        acc_min[t] += (dmin * xd[t, b]) * np.float32(min_total)
            for t in range(n_tokens):
                out[t, r] = lanes[t].sum() - acc_min[t]


# ----------------------------------------------------------------------------------------------------------------
# Decode kernels (one activation row) for the types real models use. These carry the memory-bound token-by-token
# generation. What made them fast (benchmarks/README.md has the figures):
# * several rows per pass (four for q5_0 / q8_0, two for the K-quants) sharing the activation loads;
# * per (sub-)block integer dots written as 16- or 32-long loops with constant shifts and explicit int16 / int32
#   casts, which LLVM packs in 32-bit lanes (vpmaddwd); numba's int64 arithmetic otherwise gives 64-bit lanes;
# * software prefetch of the rows two groups ahead (``_prefetch_bytes``): weights streamed from memory ran at half
#   the speed of cached ones without it.
# Each block's integer dot is exact; it is scaled by d_w * d_x and summed in float32, as ggml does.
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def _q5_0_bit_sums(x_blocks, sums, sums16):
    """For the q5_0 fifth bits: ``sums[b, g, v]`` = sum of the activation quants x[b, 8g + i] over the set bits i of
    the byte value v (int32), and ``sums16[b]`` = 16 * sum of block b's quants.

    Built once per activation row (a few microseconds); the kernel then gets sum_j hbit_j * x_j of a block from
    four lookups, one per byte of ``qh``, instead of extracting 32 bits with variable shifts (which kept LLVM in
    64-bit vector lanes: benchmarks/README.md)."""
    for b in range(x_blocks.shape[0]):
        total = np.int32(0)
        for g in range(4):
            table = sums[b, g]
            table[0] = 0
            size = 1
            for i in range(8):   # values with bit i set = values below 2**i plus x_i
                xi = np.int32(x_blocks[b, 8 * g + i])
                total = np.int32(total + xi)
                for v in range(size):
                    table[size + v] = np.int32(table[v] + xi)
                size *= 2
        sums16[b] = np.int32(16 * total)


@njit(cache=True, inline="always")
def _rows_q5(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, qh, has_min, out, first, last, f16_table):
    """out[r] = sum_b d_w[r, b] * d_x[b] * (q_w[r, b] . q_x[b]) (+ m_w[r, b] * s_x[b] if ``has_min``) for rows
    [first, last) of q5_0 or q5_1 weights.

    ``blocks``: the weights as uint8 [n_rows, n_blocks, 22] (f16 scale, 4 bytes qh, 16 bytes of nibbles). A
    weight is nibble + 16*hbit - 16, so a block dot is sum(nibble_j x_j) + 16 * sum(hbit_j x_j) - 16 * sum(x_j):
    the nibble parts are two 16-long loops with constant shifts (LLVM packs them in 32-bit lanes with vpmaddwd),
    the fifth-bit part comes from the ``bit_sums`` tables (see ``_q5_0_bit_sums``), exactly. Four rows at a time
    share the activation loads, as in ``_rows_q8_0``.

    q5_1 (``[n_rows, n_blocks, 24]``: f16 d, f16 m, qh, nibbles) stores weights nibble + 16*hbit without offset: it
    passes zero ``sums16`` and its activation block sums ``x_sums`` (q8_1's s); q5_0 passes ``x_sums`` unread.
    ``qh`` (the offset of the fifth bits) and ``has_min`` are constants of ``_rows_q5_0`` / ``_rows_q5_1``, which
    inline this body: run-time offsets halved the speed of the q4 kernels."""
    n_blocks = x_blocks.shape[0]
    block_bytes = qh + 20
    nibbles = qh + 4
    flat = blocks.reshape(-1)
    row_bytes = n_blocks * block_bytes
    r = first
    while r + 4 <= last:
        acc0 = np.float32(0.0)
        acc1 = np.float32(0.0)
        acc2 = np.float32(0.0)
        acc3 = np.float32(0.0)
        for b in range(n_blocks):
            # four rows ahead are 4 * row_bytes contiguous bytes: 4 * block_bytes of them per block step
            _prefetch_bytes(flat, (r + PREFETCH_ROWS_AHEAD_4) * row_bytes + 4 * block_bytes * b, 4 * block_bytes)
            x = x_blocks[b]
            sums = bit_sums[b]
            w0 = blocks[r, b]
            w1 = blocks[r + 1, b]
            w2 = blocks[r + 2, b]
            w3 = blocks[r + 3, b]
            dot0 = np.int32(np.int32(np.int32(sums[0, w0[qh]] + sums[1, w0[qh + 1]])
                                     + np.int32(sums[2, w0[qh + 2]] + sums[3, w0[qh + 3]])) * 16 - sums16[b])
            dot1 = np.int32(np.int32(np.int32(sums[0, w1[qh]] + sums[1, w1[qh + 1]])
                                     + np.int32(sums[2, w1[qh + 2]] + sums[3, w1[qh + 3]])) * 16 - sums16[b])
            dot2 = np.int32(np.int32(np.int32(sums[0, w2[qh]] + sums[1, w2[qh + 1]])
                                     + np.int32(sums[2, w2[qh + 2]] + sums[3, w2[qh + 3]])) * 16 - sums16[b])
            dot3 = np.int32(np.int32(np.int32(sums[0, w3[qh]] + sums[1, w3[qh + 1]])
                                     + np.int32(sums[2, w3[qh + 2]] + sums[3, w3[qh + 3]])) * 16 - sums16[b])
            for j in range(16):   # low nibbles: values 0..15
                xv = np.int16(x[j])
                dot0 = np.int32(dot0 + np.int32(np.int16(w0[nibbles + j] & 15) * xv))
                dot1 = np.int32(dot1 + np.int32(np.int16(w1[nibbles + j] & 15) * xv))
                dot2 = np.int32(dot2 + np.int32(np.int16(w2[nibbles + j] & 15) * xv))
                dot3 = np.int32(dot3 + np.int32(np.int16(w3[nibbles + j] & 15) * xv))
            for j in range(16):   # high nibbles: values 16..31
                xv = np.int16(x[16 + j])
                dot0 = np.int32(dot0 + np.int32(np.int16(w0[nibbles + j] >> 4) * xv))
                dot1 = np.int32(dot1 + np.int32(np.int16(w1[nibbles + j] >> 4) * xv))
                dot2 = np.int32(dot2 + np.int32(np.int16(w2[nibbles + j] >> 4) * xv))
                dot3 = np.int32(dot3 + np.int32(np.int16(w3[nibbles + j] >> 4) * xv))
            xd = x_scale[b]
            acc0 += _f16(w0, 0, f16_table) * xd * np.float32(dot0)
            acc1 += _f16(w1, 0, f16_table) * xd * np.float32(dot1)
            acc2 += _f16(w2, 0, f16_table) * xd * np.float32(dot2)
            acc3 += _f16(w3, 0, f16_table) * xd * np.float32(dot3)
            if has_min:
                xs = x_sums[b]
                acc0 += _f16(w0, 2, f16_table) * xs
                acc1 += _f16(w1, 2, f16_table) * xs
                acc2 += _f16(w2, 2, f16_table) * xs
                acc3 += _f16(w3, 2, f16_table) * xs
        out[r] = acc0
        out[r + 1] = acc1
        out[r + 2] = acc2
        out[r + 3] = acc3
        r += 4
    while r < last:  # the last n_rows % 4 rows of the chunk
        acc = np.float32(0.0)
        for b in range(n_blocks):
            x = x_blocks[b]
            sums = bit_sums[b]
            w0 = blocks[r, b]
            dot = np.int32(np.int32(np.int32(sums[0, w0[qh]] + sums[1, w0[qh + 1]])
                                    + np.int32(sums[2, w0[qh + 2]] + sums[3, w0[qh + 3]])) * 16 - sums16[b])
            for j in range(16):
                dot = np.int32(dot + np.int32(np.int16(w0[nibbles + j] & 15) * np.int16(x[j]))
                               + np.int32(np.int16(w0[nibbles + j] >> 4) * np.int16(x[16 + j])))
            acc += _f16(w0, 0, f16_table) * x_scale[b] * np.float32(dot)
            if has_min:
                acc += _f16(w0, 2, f16_table) * x_sums[b]
        out[r] = acc
        r += 1


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q5_0(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, out, first, last, f16_table):
    _rows_q5(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, 2, False, out, first, last, f16_table)


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q5_1(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, out, first, last, f16_table):
    _rows_q5(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, 4, True, out, first, last, f16_table)


@njit(cache=True, parallel=True)
def _matvec_q5(blocks, x_blocks, x_scale, x_sums, has_min, out, n_chunks, f16_table):
    """q5_0 (``has_min`` False, ``x_sums`` unused) or q5_1 (``x_sums``: q8_1's per-block s) one-token product."""
    n_rows = blocks.shape[0]
    n_blocks = x_blocks.shape[0]
    bit_sums = np.empty((n_blocks, 4, 256), np.int32)
    sums16 = np.empty(n_blocks, np.int32)
    _q5_0_bit_sums(x_blocks, bit_sums, sums16)
    if has_min:   # q5_1 weights carry no -16 offset
        sums16[:] = 0
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        last = min(n_rows, first + rows_per_chunk)
        if has_min:
            _rows_q5_1(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, out, first, last, f16_table)
        else:
            _rows_q5_0(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, out, first, last, f16_table)


@njit(cache=True, error_model="numpy")
def _block_sums_times(x_blocks, factor, sums):
    """``sums[b]`` = factor * sum of the activation quants of block b (int32): the offset part of a block dot."""
    for b in range(x_blocks.shape[0]):
        total = np.int32(0)
        for j in range(32):
            total = np.int32(total + np.int32(x_blocks[b, j]))
        sums[b] = np.int32(factor * total)


@njit(cache=True, inline="always")
def _rows_q4(blocks, x_blocks, x_scale, x_offsets, x_sums, header, has_min, out, first, last, f16_table):
    """out[r] = sum_b d_w[r, b] * d_x[b] * (q_w[r, b] . q_x[b]) (+ m_w[r, b] * s_x[b] if ``has_min``) for rows
    [first, last) of q4_0 or q4_1 weights.

    ``blocks``: the weights as uint8 [n_rows, n_blocks, 18 or 20]: f16 d (and f16 m for q4_1), then 16 bytes of
    nibbles. A q4_0 weight is nibble - 8, so a block dot is sum(nibble_j x_j) - ``x_offsets[b]`` (8 * sum(x_j)),
    exactly; q4_1 passes zero offsets and its activation block sums ``x_sums`` (q8_1's s). ``_rows_q5_0`` without
    the fifth bits: four rows at a time share the activation loads. Inlined into ``_rows_q4_0`` / ``_rows_q4_1``
    so that ``header`` (bytes before the nibbles) and ``has_min`` are constants: a run-time header offset ran at
    less than half the speed."""
    n_blocks = x_blocks.shape[0]
    block_bytes = header + 16
    flat = blocks.reshape(-1)
    row_bytes = n_blocks * block_bytes
    r = first
    while r + 4 <= last:
        acc0 = np.float32(0.0)
        acc1 = np.float32(0.0)
        acc2 = np.float32(0.0)
        acc3 = np.float32(0.0)
        for b in range(n_blocks):
            # four rows ahead are 4 * row_bytes contiguous bytes: 4 * block_bytes of them per block step
            _prefetch_bytes(flat, (r + PREFETCH_ROWS_AHEAD_4) * row_bytes + 4 * block_bytes * b, 4 * block_bytes)
            x = x_blocks[b]
            w0 = blocks[r, b]
            w1 = blocks[r + 1, b]
            w2 = blocks[r + 2, b]
            w3 = blocks[r + 3, b]
            dot0 = np.int32(-x_offsets[b])
            dot1 = np.int32(-x_offsets[b])
            dot2 = np.int32(-x_offsets[b])
            dot3 = np.int32(-x_offsets[b])
            for j in range(16):   # low nibbles: values 0..15
                xv = np.int16(x[j])
                dot0 = np.int32(dot0 + np.int32(np.int16(w0[header + j] & 15) * xv))
                dot1 = np.int32(dot1 + np.int32(np.int16(w1[header + j] & 15) * xv))
                dot2 = np.int32(dot2 + np.int32(np.int16(w2[header + j] & 15) * xv))
                dot3 = np.int32(dot3 + np.int32(np.int16(w3[header + j] & 15) * xv))
            for j in range(16):   # high nibbles: values 16..31
                xv = np.int16(x[16 + j])
                dot0 = np.int32(dot0 + np.int32(np.int16(w0[header + j] >> 4) * xv))
                dot1 = np.int32(dot1 + np.int32(np.int16(w1[header + j] >> 4) * xv))
                dot2 = np.int32(dot2 + np.int32(np.int16(w2[header + j] >> 4) * xv))
                dot3 = np.int32(dot3 + np.int32(np.int16(w3[header + j] >> 4) * xv))
            xd = x_scale[b]
            acc0 += _f16(w0, 0, f16_table) * xd * np.float32(dot0)
            acc1 += _f16(w1, 0, f16_table) * xd * np.float32(dot1)
            acc2 += _f16(w2, 0, f16_table) * xd * np.float32(dot2)
            acc3 += _f16(w3, 0, f16_table) * xd * np.float32(dot3)
            if has_min:
                xs = x_sums[b]
                acc0 += _f16(w0, 2, f16_table) * xs
                acc1 += _f16(w1, 2, f16_table) * xs
                acc2 += _f16(w2, 2, f16_table) * xs
                acc3 += _f16(w3, 2, f16_table) * xs
        out[r] = acc0
        out[r + 1] = acc1
        out[r + 2] = acc2
        out[r + 3] = acc3
        r += 4
    while r < last:  # the last n_rows % 4 rows of the chunk
        acc = np.float32(0.0)
        for b in range(n_blocks):
            x = x_blocks[b]
            w0 = blocks[r, b]
            dot = np.int32(-x_offsets[b])
            for j in range(16):
                dot = np.int32(dot + np.int32(np.int16(w0[header + j] & 15) * np.int16(x[j]))
                               + np.int32(np.int16(w0[header + j] >> 4) * np.int16(x[16 + j])))
            acc += _f16(w0, 0, f16_table) * x_scale[b] * np.float32(dot)
            if has_min:
                acc += _f16(w0, 2, f16_table) * x_sums[b]
        out[r] = acc
        r += 1


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q4_0(blocks, x_blocks, x_scale, x_offsets, x_sums, out, first, last, f16_table):
    _rows_q4(blocks, x_blocks, x_scale, x_offsets, x_sums, 2, False, out, first, last, f16_table)


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q4_1(blocks, x_blocks, x_scale, x_offsets, x_sums, out, first, last, f16_table):
    _rows_q4(blocks, x_blocks, x_scale, x_offsets, x_sums, 4, True, out, first, last, f16_table)


@njit(cache=True, parallel=True)
def _matvec_q4(blocks, x_blocks, x_scale, x_sums, has_min, out, n_chunks, f16_table):
    """q4_0 (``has_min`` False, ``x_sums`` unused) or q4_1 (``x_sums``: q8_1's per-block s) one-token product."""
    n_rows = blocks.shape[0]
    x_offsets = np.empty(x_blocks.shape[0], np.int32)
    _block_sums_times(x_blocks, 0 if has_min else 8, x_offsets)
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        if has_min:
            _rows_q4_1(blocks, x_blocks, x_scale, x_offsets, x_sums, out, first, min(n_rows, first + rows_per_chunk),
                       f16_table)
        else:
            _rows_q4_0(blocks, x_blocks, x_scale, x_offsets, x_sums, out, first, min(n_rows, first + rows_per_chunk),
                       f16_table)


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q8_0(blocks, x_blocks, x_scale, out, first, last, f16_table):
    """out[r] = sum_b d_w[r, b] * d_x[b] * (q_w[r, b] . q_x[b]) for rows [first, last) of q8_0 weights.

    ``blocks`` is the weight matrix as int8 [n_rows, n_blocks, 34] (2 bytes of f16 scale, 32 quants), ``x_blocks``
    the activation quants int8 [n_blocks, 32]. Four rows are walked together in one fused inner loop: four
    independent integer dot products (kept in int32 by the explicit casts, so LLVM packs 16 lanes per vector
    instruction) hide each other's latency. Measured 3x the speed of one row at a time (benchmarks/README.md)."""
    n_blocks = x_blocks.shape[0]
    flat = blocks.reshape(-1)
    row_bytes = n_blocks * 34
    r = first
    while r + 4 <= last:
        acc0 = np.float32(0.0)
        acc1 = np.float32(0.0)
        acc2 = np.float32(0.0)
        acc3 = np.float32(0.0)
        for b in range(n_blocks):
            _prefetch_bytes(flat, (r + PREFETCH_ROWS_AHEAD_4) * row_bytes + 136 * b, 136)
            w0 = blocks[r, b]
            w1 = blocks[r + 1, b]
            w2 = blocks[r + 2, b]
            w3 = blocks[r + 3, b]
            xb = x_blocks[b]
            dot0 = np.int32(0)
            dot1 = np.int32(0)
            dot2 = np.int32(0)
            dot3 = np.int32(0)
            for j in range(32):
                xv = np.int16(xb[j])
                dot0 = np.int32(dot0 + np.int32(np.int16(w0[2 + j]) * xv))
                dot1 = np.int32(dot1 + np.int32(np.int16(w1[2 + j]) * xv))
                dot2 = np.int32(dot2 + np.int32(np.int16(w2[2 + j]) * xv))
                dot3 = np.int32(dot3 + np.int32(np.int16(w3[2 + j]) * xv))
            xd = x_scale[b]
            acc0 += _f16_signed(w0, 0, f16_table) * xd * np.float32(dot0)
            acc1 += _f16_signed(w1, 0, f16_table) * xd * np.float32(dot1)
            acc2 += _f16_signed(w2, 0, f16_table) * xd * np.float32(dot2)
            acc3 += _f16_signed(w3, 0, f16_table) * xd * np.float32(dot3)
        out[r] = acc0
        out[r + 1] = acc1
        out[r + 2] = acc2
        out[r + 3] = acc3
        r += 4
    while r < last:  # the last n_rows % 4 rows of the chunk
        acc = np.float32(0.0)
        for b in range(n_blocks):
            w0 = blocks[r, b]
            xb = x_blocks[b]
            dot = np.int32(0)
            for j in range(32):
                dot = np.int32(dot + np.int32(np.int16(w0[2 + j]) * np.int16(xb[j])))
            acc += _f16_signed(w0, 0, f16_table) * x_scale[b] * np.float32(dot)
        out[r] = acc
        r += 1


@njit(cache=True, parallel=True)
def _matvec_q8_0(blocks, x_blocks, x_scale, out, n_chunks, f16_table):
    n_rows = blocks.shape[0]
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        _rows_q8_0(blocks, x_blocks, x_scale, out, first, min(n_rows, first + rows_per_chunk), f16_table)


@njit(cache=True, inline="always")
def _q6_K_dot16_pair(w0, w1, low, low_shift, high, high_shift, x, x_offset):
    """Integer dots of 16 six-bit quants (unsigned, before the -32 offset) of two rows with x[x_offset:+16]:
    the low 4 bits are (w[low + i] >> low_shift) & 15, the top 2 bits (w[high + i] >> high_shift) & 3.
    Constant shifts after inlining; the int16 casts keep LLVM in 32-bit lanes (vpmaddwd)."""
    dot0 = np.int32(0)
    dot1 = np.int32(0)
    for i in range(16):
        xv = np.int16(x[x_offset + i])
        q0 = np.int16(np.int16((w0[low + i] >> low_shift) & 15) | np.int16(((w0[high + i] >> high_shift) & 3) << 4))
        q1 = np.int16(np.int16((w1[low + i] >> low_shift) & 15) | np.int16(((w1[high + i] >> high_shift) & 3) << 4))
        dot0 = np.int32(dot0 + np.int32(q0 * xv))
        dot1 = np.int32(dot1 + np.int32(q1 * xv))
    return dot0, dot1


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q6_K(blocks, scales, x, x_scale, x_bsums, out, first, last, f16_table):
    """out[r] = sum_b d_w * d_x * (sum_g scale_g * (u_g . x_g) - 32 * sum_g scale_g * bsum_g) for rows [first, last)
    of q6_K weights (u: the unsigned 6-bit quants; the -32 offset comes from the q8_K block sums, exactly as ggml).

    ``blocks``: uint8 [n_rows, n_blocks, 210] (128 bytes of low nibbles, 64 of top bits, 16 int8 scales, f16 d);
    ``scales``: the int8 view of the scale bytes. Two rows at a time share the activation loads (measured 2.7x the
    one-row kernel with 16 float lanes; benchmarks/README.md); an odd last row is computed twice."""
    n_blocks = x_scale.shape[0]
    flat = blocks.reshape(-1)
    row_bytes = n_blocks * 210
    for r in range(first, last, 2):
        r1 = min(r + 1, last - 1)   # an odd last row is computed twice
        acc0 = np.float32(0.0)
        acc1 = np.float32(0.0)
        for b in range(n_blocks):
            _prefetch_bytes(flat, (r + PREFETCH_ROWS_AHEAD_2) * row_bytes + 420 * b, 420)
            w0 = blocks[r, b]
            w1 = blocks[r1, b]
            s0 = scales[r, b]
            s1 = scales[r1, b]
            base = b * 256
            total0 = np.int32(0)
            total1 = np.int32(0)
            for n in range(2):
                for half in range(2):
                    l = 16 * half
                    g = 8 * n + half
                    ql = 64 * n + l
                    qh = 128 + 32 * n + l
                    v = base + 128 * n + l
                    d0, d1 = _q6_K_dot16_pair(w0, w1, ql, 0, qh, 0, x, v)
                    total0 = np.int32(total0 + np.int32(s0[g]) * d0)
                    total1 = np.int32(total1 + np.int32(s1[g]) * d1)
                    d0, d1 = _q6_K_dot16_pair(w0, w1, ql + 32, 0, qh, 2, x, v + 32)
                    total0 = np.int32(total0 + np.int32(s0[g + 2]) * d0)
                    total1 = np.int32(total1 + np.int32(s1[g + 2]) * d1)
                    d0, d1 = _q6_K_dot16_pair(w0, w1, ql, 4, qh, 4, x, v + 64)
                    total0 = np.int32(total0 + np.int32(s0[g + 4]) * d0)
                    total1 = np.int32(total1 + np.int32(s1[g + 4]) * d1)
                    d0, d1 = _q6_K_dot16_pair(w0, w1, ql + 32, 4, qh, 6, x, v + 96)
                    total0 = np.int32(total0 + np.int32(s0[g + 6]) * d0)
                    total1 = np.int32(total1 + np.int32(s1[g + 6]) * d1)
            offset0 = np.int32(0)
            offset1 = np.int32(0)
            for g in range(16):
                offset0 = np.int32(offset0 + np.int32(s0[g]) * x_bsums[16 * b + g])
                offset1 = np.int32(offset1 + np.int32(s1[g]) * x_bsums[16 * b + g])
            acc0 += _f16(w0, 208, f16_table) * x_scale[b] * np.float32(np.int32(total0 - 32 * offset0))
            acc1 += _f16(w1, 208, f16_table) * x_scale[b] * np.float32(np.int32(total1 - 32 * offset1))
        out[r] = acc0
        out[r1] = acc1


@njit(cache=True, inline="always")
def _q4_K_dot32_pair(w0, w1, offset, shift, x, x_offset):
    """Integer dots of 32 four-bit quants ((w[offset + i] >> shift) & 15) of two rows with x[x_offset:+32]."""
    dot0 = np.int32(0)
    dot1 = np.int32(0)
    for i in range(32):
        xv = np.int16(x[x_offset + i])
        dot0 = np.int32(dot0 + np.int32(np.int16((w0[offset + i] >> shift) & 15) * xv))
        dot1 = np.int32(dot1 + np.int32(np.int16((w1[offset + i] >> shift) & 15) * xv))
    return dot0, dot1


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q4_K(blocks, x, x_scale, x_bsums, out, first, last, f16_table):
    """out[r] = sum_b d_x * (d_w * sum_j scale_j (q_j . x_j) - dmin_w * sum_j min_j bsum_j) for rows [first, last)
    of q4_K weights (``blocks``: uint8 [n_rows, n_blocks, 144]). Two rows at a time, constant shifts per 32-value
    sub-block (the runtime shift of a loop over the 8 sub-blocks kept LLVM from vectorizing); an odd last row is
    computed twice."""
    n_blocks = x_scale.shape[0]
    flat = blocks.reshape(-1)
    row_bytes = n_blocks * 144
    for r in range(first, last, 2):
        r1 = min(r + 1, last - 1)
        acc0 = np.float32(0.0)
        acc1 = np.float32(0.0)
        min_acc0 = np.float32(0.0)
        min_acc1 = np.float32(0.0)
        for b in range(n_blocks):
            _prefetch_bytes(flat, (r + PREFETCH_ROWS_AHEAD_2) * row_bytes + 288 * b, 288)
            w0 = blocks[r, b]
            w1 = blocks[r1, b]
            base = b * 256
            total0 = np.int32(0)
            total1 = np.int32(0)
            mins0 = np.int32(0)
            mins1 = np.int32(0)
            for c in range(4):   # 64 values: 32 low nibbles (sub-block 2c), then 32 high nibbles (2c + 1)
                j = 2 * c
                scale0, min0 = _scale_min_k4(j, w0, 4)
                scale1, min1 = _scale_min_k4(j, w1, 4)
                scale0h, min0h = _scale_min_k4(j + 1, w0, 4)
                scale1h, min1h = _scale_min_k4(j + 1, w1, 4)
                sum_low = np.int32(x_bsums[16 * b + 2 * j] + x_bsums[16 * b + 2 * j + 1])
                sum_high = np.int32(x_bsums[16 * b + 2 * j + 2] + x_bsums[16 * b + 2 * j + 3])
                mins0 = np.int32(mins0 + np.int32(min0) * sum_low + np.int32(min0h) * sum_high)
                mins1 = np.int32(mins1 + np.int32(min1) * sum_low + np.int32(min1h) * sum_high)
                d0, d1 = _q4_K_dot32_pair(w0, w1, 16 + 32 * c, 0, x, base + 64 * c)
                e0, e1 = _q4_K_dot32_pair(w0, w1, 16 + 32 * c, 4, x, base + 64 * c + 32)
                total0 = np.int32(total0 + np.int32(scale0) * d0 + np.int32(scale0h) * e0)
                total1 = np.int32(total1 + np.int32(scale1) * d1 + np.int32(scale1h) * e1)
            xd = x_scale[b]
            acc0 += _f16(w0, 0, f16_table) * xd * np.float32(total0)
            acc1 += _f16(w1, 0, f16_table) * xd * np.float32(total1)
            min_acc0 += _f16(w0, 2, f16_table) * xd * np.float32(mins0)
            min_acc1 += _f16(w1, 2, f16_table) * xd * np.float32(mins1)
        out[r] = acc0 - min_acc0    # the min terms summed apart and subtracted once, as ggml does
        out[r1] = acc1 - min_acc1


@njit(cache=True, parallel=True)
def _matvec_q6_K(blocks, scales, x, x_scale, x_bsums, out, n_chunks, f16_table):
    n_rows = blocks.shape[0]
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        last = min(n_rows, first + rows_per_chunk)
        if first < last:
            _rows_q6_K(blocks, scales, x, x_scale, x_bsums, out, first, last, f16_table)


@njit(cache=True, parallel=True)
def _matvec_q4_K(blocks, x, x_scale, x_bsums, out, n_chunks, f16_table):
    n_rows = blocks.shape[0]
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        last = min(n_rows, first + rows_per_chunk)
        if first < last:
            _rows_q4_K(blocks, x, x_scale, x_bsums, out, first, last, f16_table)


# ----------------------------------------------------------------------------------------------------------------
# Dequantizers for the BLAS path: rows [first, last) of W -> float32 [last - first, k]
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, fastmath=True)
def _dequantize_legacy_rows(kind, w, w_signed, first, last, out, f16_table):
    n_blocks = out.shape[1] // 32
    for r in range(first, last):
        q = np.empty(32, np.int16)
        row = w[r]
        signed_row = w_signed[r]
        for b in range(n_blocks):
            d, m = _unpack_legacy(kind, row, signed_row, b, q, f16_table)
            for i in range(32):
                out[r - first, b * 32 + i] = d * np.float32(q[i]) + m


@njit(cache=True, nogil=True, fastmath=True)
def _dequantize_kquant_rows(kind, w, w_signed, first, last, out, f16_table):
    n_blocks = out.shape[1] // 256
    for r in range(first, last):
        q = np.empty(256, np.int16)
        scales = np.empty(16, np.int32)
        mins = np.empty(16, np.int32)
        row = w[r]
        signed_row = w_signed[r]
        for b in range(n_blocks):
            d, dmin = _unpack_kquant(kind, row, signed_row, b, q, scales, mins, f16_table)
            for j in range(16):
                scale = d * np.float32(scales[j])
                offset = dmin * np.float32(mins[j])
                for i in range(16):
                    out[r - first, b * 256 + 16 * j + i] = scale * np.float32(q[16 * j + i]) - offset


# ----------------------------------------------------------------------------------------------------------------
# Validation and dispatch
# ----------------------------------------------------------------------------------------------------------------

def _check_weights(qtype: QuantType, weight_bytes: np.ndarray, k: int) -> None:
    if qtype.name not in SUPPORTED_TYPES:
        raise MatmulShapeError(f"matmul does not support weights of type {qtype.name}")
    if not isinstance(weight_bytes, np.ndarray) or weight_bytes.dtype != np.uint8 or weight_bytes.ndim != 2:
        raise MatmulShapeError("weight bytes must be a 2-D uint8 array [n_rows, row_bytes], got "
                               f"{getattr(weight_bytes, 'dtype', type(weight_bytes))} "
                               f"{getattr(weight_bytes, 'shape', '')}")
    if k % qtype.block_size:
        raise MatmulShapeError(f"k = {k} is not a multiple of the {qtype.name} block size {qtype.block_size}")
    expected = k // qtype.block_size * qtype.type_size
    if weight_bytes.shape[1] != expected:
        raise MatmulShapeError(f"{qtype.name} rows of {k} values take {expected} bytes, "
                               f"but the weight rows hold {weight_bytes.shape[1]}")
    if not weight_bytes.flags.c_contiguous:
        raise MatmulShapeError("weight bytes must be C-contiguous")


def _as_activation_rows(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise MatmulShapeError(f"activations must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise MatmulShapeError(f"activations must be float32, got {x.dtype}")
    if x.ndim not in (1, 2):
        raise MatmulShapeError(f"activations must be [n_tokens, k] or [k], got shape {x.shape}")
    rows = x.reshape(1, -1) if x.ndim == 1 else x
    return np.ascontiguousarray(rows)


def _n_chunks(n_rows: int) -> int:
    # Several equal chunks per thread keep the threads evenly loaded without a scheduler.
    return max(1, min(n_rows, 4 * numba.get_num_threads()))


@dataclass
class QuantizedActivations:
    """Activation rows quantized once to one ``vec_dot_type``, reusable for every weight that shares it."""
    vec_dot_type: str
    rows: np.ndarray                 # float32 [n_tokens, k], as given (the BLAS path and f32 weights use it)
    qs: np.ndarray | None = None     # int8 [n_tokens, k]
    d: np.ndarray | None = None      # float32 [n_tokens, n_blocks]
    extra: np.ndarray | None = None  # q8_1: float32 s [n_tokens, n_blocks]; q8_K: int32 bsums [n_tokens, k/16]
    rounded: np.ndarray | None = None  # f16 / bf16: the rows rounded to that precision


def quantize_activations(vec_dot_type: str, x: np.ndarray, for_blas: bool = False) -> QuantizedActivations:
    """Quantize activation rows (float32 [n_tokens, k]) for weights whose ``vec_dot_type`` is given.

    ``for_blas``: the product will take the BLAS path, which multiplies float rows: give it the rows as the
    8-bit quantization leaves them (q * d), so a prompt evaluated in a batch gets the numbers llama.cpp gets, which
    quantizes activations whatever the batch size. Without that, models with large activation outliers (Gemma)
    move by tenths of a logit between batch and one-token evaluation."""
    rows = _as_activation_rows(x)
    if for_blas and vec_dot_type in ("q8_0", "q8_1", "q8_K"):
        quantizer = quantize_activations_q8_K if vec_dot_type == "q8_K" else quantize_activations_q8_1
        qs, d, extra = quantizer(rows)
        n_tokens, k = rows.shape
        block = k // d.shape[1]
        rounded = (qs.reshape(n_tokens, -1, block) * d[:, :, None]).astype(np.float32, copy=False)
        min_correction = None
        if vec_dot_type == "q8_1":
            # ggml multiplies q4_1/q5_1 block minimums by the half-precision s = d*sum(q), not the exact sum
            min_correction = extra - rounded.sum(axis=2, dtype=np.float32)
        return QuantizedActivations(vec_dot_type, rows, extra=min_correction, rounded=rounded.reshape(n_tokens, k))
    if vec_dot_type == "q8_0":
        qs, d = quantize_activations_q8_0(rows)
        return QuantizedActivations(vec_dot_type, rows, qs, d)
    if vec_dot_type == "q8_1":
        qs, d, s = quantize_activations_q8_1(rows)
        return QuantizedActivations(vec_dot_type, rows, qs, d, s)
    if vec_dot_type == "q8_K":
        qs, d, bsums = quantize_activations_q8_K(rows)
        return QuantizedActivations(vec_dot_type, rows, qs, d, bsums)
    if vec_dot_type == "f16":
        return QuantizedActivations(vec_dot_type, rows, rounded=round_rows_to_f16(rows))
    if vec_dot_type == "bf16":
        return QuantizedActivations(vec_dot_type, rows, rounded=round_rows_to_bf16(rows))
    if vec_dot_type == "f32":
        return QuantizedActivations(vec_dot_type, rows, rounded=rows)
    raise MatmulShapeError(f"unknown vec_dot_type {vec_dot_type!r}")


def _takes_blas_path(method: str, n_tokens: int) -> bool:
    """Whether a product of quantized weights with n_tokens rows runs on the BLAS path."""
    return method == "blas" or (method == "auto" and n_tokens >= BLAS_MIN_TOKENS)


def _float_weights(qtype: QuantType, weight_bytes: np.ndarray, first: int, last: int) -> np.ndarray:
    band = weight_bytes[first:last]
    if qtype.name == "f32":
        return band.view(np.float32)
    if qtype.name == "f16":
        return band.view(np.float16).astype(np.float32)
    # bf16: the upper half of a float32
    return (band.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequantize_band(qtype: QuantType, weight_bytes, first: int, last: int, k: int) -> np.ndarray:
    if qtype.name in ("f32", "f16", "bf16"):
        return _float_weights(qtype, weight_bytes, first, last)
    band = np.empty((last - first, k), np.float32)
    if KERNEL_ISA is not None:
        row_bytes = weight_bytes.shape[1]
        dequantize_simd(KINDS[qtype.name], weight_bytes.reshape(-1), first * row_bytes, row_bytes, band, KERNEL_ISA)
    elif qtype.name in _LEGACY_KINDS:
        _dequantize_legacy_rows(_LEGACY_KINDS[qtype.name], weight_bytes, weight_bytes.view(np.int8),
                                first, last, band, F16_TO_F32)
    else:
        _dequantize_kquant_rows(_KQUANT_KINDS[qtype.name], weight_bytes, weight_bytes.view(np.int8),
                                first, last, band, F16_TO_F32)
    return band


def dequantize_rows(weight_type, weight_bytes: np.ndarray, k: int, first: int = 0, last: int | None = None):
    """Rows [first, last) of a weight matrix as float32 [last - first, k] (the BLAS path's dequantizer)."""
    qtype = get_type(weight_type)
    _check_weights(qtype, weight_bytes, k)
    last = weight_bytes.shape[0] if last is None else last
    if not 0 <= first <= last <= weight_bytes.shape[0]:
        raise MatmulShapeError(f"row range [{first}, {last}) outside 0..{weight_bytes.shape[0]}")
    return np.ascontiguousarray(_dequantize_band(qtype, weight_bytes, first, last, k))


def _check_out(out, n_tokens: int, n_rows: int) -> np.ndarray:
    if out is None:
        return np.empty((n_tokens, n_rows), np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n_tokens, n_rows)
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise MatmulShapeError(f"out must be a writeable C-contiguous float32 array of shape {(n_tokens, n_rows)}")
    return out


def _matvec_fast(type_name: str, weight_bytes: np.ndarray, acts: QuantizedActivations, out) -> bool:
    """Run the fast integer kernel of ``type_name`` if there is one; False if not: the SIMD kernels of
    ``decode.py`` on the instruction set ``KERNEL_ISA`` (any number of tokens) when the CPU has one, else the
    plain numba one-token kernels below."""
    if KERNEL_ISA is not None and type_name in KINDS:
        _simd_matvec(type_name, weight_bytes.reshape(-1), [0], [weight_bytes.shape[0]], weight_bytes.shape[1],
                     acts, out)
        return True
    if acts.qs.shape[0] != 1:
        return False
    n_chunks = _n_chunks(weight_bytes.shape[0])
    if type_name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        has_min = type_name.endswith("_1")   # q4_1 / q5_1: value = d*q + m, activations q8_1 with block sums s
        n_rows, row_bytes = weight_bytes.shape
        block_bytes = get_type(type_name).type_size
        blocks = weight_bytes.reshape(n_rows, row_bytes // block_bytes, block_bytes)
        x_sums = acts.extra[0] if has_min else acts.d[0]   # q8_1's s; unread for q4_0 / q5_0
        matvec = _matvec_q4 if type_name.startswith("q4") else _matvec_q5
        matvec(blocks, acts.qs.reshape(-1, 32), acts.d[0], x_sums, has_min, out[0], n_chunks, F16_TO_F32)
    elif type_name == "q8_0":
        n_rows, row_bytes = weight_bytes.shape
        blocks = weight_bytes.view(np.int8).reshape(n_rows, row_bytes // 34, 34)
        _matvec_q8_0(blocks, acts.qs.reshape(-1, 32), acts.d[0], out[0], n_chunks, F16_TO_F32)
    elif type_name == "q4_K":
        blocks = weight_bytes.reshape(weight_bytes.shape[0], -1, 144)
        _matvec_q4_K(blocks, acts.qs[0], acts.d[0], acts.extra[0], out[0], n_chunks, F16_TO_F32)
    elif type_name == "q6_K":
        blocks = weight_bytes.reshape(weight_bytes.shape[0], -1, 210)
        _matvec_q6_K(blocks, blocks[:, :, 192:208].view(np.int8), acts.qs[0], acts.d[0], acts.extra[0], out[0],
                     n_chunks, F16_TO_F32)
    else:
        return False
    return True


def _simd_matvec(type_name: str, base: np.ndarray, starts, row_counts, row_bytes: int,
                 acts: QuantizedActivations, out: np.ndarray) -> None:
    """decode.matvec on ``KERNEL_ISA``: rows of matrices of one type at byte offsets ``starts`` of ``base`` times
    the activation rows ``acts`` into ``out`` [n_tokens, sum(row_counts)]. Every offset and size was checked by
    the caller (the kernels read without bounds checks)."""
    n_tokens = acts.qs.shape[0]
    x_sums = acts.extra if acts.vec_dot_type == "q8_1" else _no_columns(np.float32, n_tokens)
    x_bsums = acts.extra if acts.vec_dot_type == "q8_K" else _no_columns(np.int32, n_tokens)
    starts = np.asarray(starts, np.int64)
    row_counts = np.asarray(row_counts, np.int64)
    if n_tokens == 1:
        matvec(KINDS[type_name], base, starts, row_counts, row_bytes, acts.qs[0], acts.d[0], x_sums[0], x_bsums[0],
               out[0], _n_chunks(out.shape[1]), KERNEL_ISA)
    else:
        matmul_few(KINDS[type_name], base, starts, row_counts, row_bytes, acts.qs, acts.d, x_sums, x_bsums, out,
                   _n_chunks(out.shape[1]), KERNEL_ISA)


_NO_COLUMNS = {np.float32: np.zeros((1024, 0), np.float32), np.int32: np.zeros((1024, 0), np.int32)}


def _no_columns(dtype, n_rows: int) -> np.ndarray:
    """The unread x_sums / x_bsums of the kinds that take none: one empty row per token (no allocation per call
    for up to 1024 tokens)."""
    empty = _NO_COLUMNS[dtype]
    return empty[:n_rows] if n_rows <= len(empty) else np.zeros((n_rows, 0), dtype)


def _matmul_prepared(qtype: QuantType, weight_bytes: np.ndarray, acts: QuantizedActivations, out, method: str):
    rows = acts.rows
    n_tokens, k = rows.shape
    n_rows = weight_bytes.shape[0]
    _check_weights(qtype, weight_bytes, k)
    if acts.vec_dot_type != qtype.vec_dot_type:
        raise MatmulShapeError(f"{qtype.name} weights need {qtype.vec_dot_type} activations, "
                               f"got {acts.vec_dot_type}")
    out = _check_out(out, n_tokens, n_rows)
    if method not in ("auto", "int", "blas"):
        raise MatmulShapeError(f"method must be 'auto', 'int' or 'blas', got {method!r}")
    quantized = qtype.name in _LEGACY_KINDS or qtype.name in _KQUANT_KINDS
    if method == "auto":
        method = "blas" if (not quantized or n_tokens >= BLAS_MIN_TOKENS) else "int"

    if method == "int" and quantized:
        if acts.qs is None:  # activations prepared with for_blas=True
            raise MatmulShapeError("integer path needs quantized activations")
        if _matvec_fast(qtype.name, weight_bytes, acts, out):
            return out
        if qtype.name in _LEGACY_KINDS:
            extra = acts.extra if acts.extra is not None else acts.d  # xs is only read for q4_1 / q5_1
            _matmul_legacy(_LEGACY_KINDS[qtype.name], weight_bytes, weight_bytes.view(np.int8), acts.qs, acts.d,
                           extra, out, _n_chunks(n_rows), F16_TO_F32)
        else:
            _matmul_kquant(_KQUANT_KINDS[qtype.name], weight_bytes, weight_bytes.view(np.int8), acts.qs, acts.d,
                           acts.extra, out, _n_chunks(n_rows), F16_TO_F32)
        return out

    # BLAS: float32 (or f16/bf16-rounded) activations times float32 bands of W.
    lhs = acts.rounded if acts.rounded is not None else rows
    _blas_product(qtype, weight_bytes, lhs, out, k)
    if acts.vec_dot_type == "q8_1" and acts.qs is None and acts.extra is not None:
        blocks = weight_bytes.reshape(n_rows, -1, qtype.type_size)
        block_mins = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)   # [n_rows, n_blocks]
        out += acts.extra @ block_mins.T
    return out


_blas_pool: ThreadPoolExecutor | None = None
_blas_pool_lock = threading.Lock()
_blas_controller = None


def _blas_workers(n_workers: int) -> ThreadPoolExecutor:
    global _blas_pool
    with _blas_pool_lock:
        if _blas_pool is None or _blas_pool._max_workers < n_workers:
            _blas_pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="ggml_backend-blas")
        return _blas_pool


def single_threaded_blas():
    """A context in which numpy's BLAS runs on the calling thread only (threadpoolctl), or a no-op without it.

    Each of our workers runs its own sgemm on its own band; OpenBLAS's own busy-waiting threads on top of that
    cost 3x the CPU time and 3x the wall time of a prompt on a loaded 2-core machine (benchmarks/README.md).
    The forward pass holds it for its whole duration: any numpy product in it (attention was one, before it became
    a numba kernel) would otherwise wake OpenBLAS's threads, whose spinning halved the speed of the numba kernels
    that followed."""
    global _blas_controller
    try:
        if _blas_controller is None:
            from threadpoolctl import ThreadpoolController
            _blas_controller = ThreadpoolController()
        return _blas_controller.limit(limits=1, user_api="blas")
    except ImportError:
        return contextlib.nullcontext()


def _blas_product(qtype: QuantType, weight_bytes: np.ndarray, lhs: np.ndarray, out: np.ndarray, k: int) -> None:
    """out = lhs @ W.T: bands of W rows, each dequantized to float32 (small enough to stay in cache) and
    multiplied by a single-threaded sgemm, spread over numba's thread count of Python workers (both the
    dequantizer and numpy release the GIL)."""
    n_rows = weight_bytes.shape[0]
    n_tokens = lhs.shape[0]
    n_workers = max(1, numba.get_num_threads())
    # OpenBLAS switches to other kernels (other summation orders) for small products (M*N*K up to about 2**20)
    # and for M = 1..2: each row of the result must come out the same whatever the batch it was part of (prompt
    # caching relies on it), so every sgemm here stays above those sizes: bands at least _SGEMM_MIN_WORK / (16 k)
    # rows wide, and short batches padded with zero rows.
    min_band = -(-_SGEMM_MIN_WORK // (BLAS_MIN_TOKENS * k))
    band_rows = max(1, min(n_rows, max(min_band, min(BLAS_BAND_ROWS, -(-n_rows // n_workers)))))
    n_bands = max(1, n_rows // band_rows)
    bounds = [n_rows * i // n_bands for i in range(n_bands + 1)]
    bands = list(zip(bounds, bounds[1:]))
    min_rows = max(BLAS_MIN_TOKENS, -(-_SGEMM_MIN_WORK // (min(last - first for first, last in bands) * k)))
    if n_tokens < min_rows:
        padded = np.zeros((min_rows, k), np.float32)
        padded[:n_tokens] = lhs
        lhs = padded

    def multiply(band):
        first, last = band
        out[:, first:last] = (lhs @ _dequantize_band(qtype, weight_bytes, first, last, k).T)[:n_tokens]

    with single_threaded_blas():
        if n_workers == 1 or len(bands) == 1:
            for band in bands:
                multiply(band)
        else:
            list(_blas_workers(n_workers).map(multiply, bands))


def matmul(weight_type, weight_bytes: np.ndarray, x: np.ndarray, out: np.ndarray | None = None,
           method: str = "auto") -> np.ndarray:
    """y = x @ W.T for W stored as ``weight_bytes`` [n_rows, row_bytes] of ``weight_type``.

    ``x`` is float32 [n_tokens, k] (or [k], giving a [n_rows] result); the result is float32 [n_tokens, n_rows]
    (written into ``out`` when given). ``method``: "int" (llama.cpp's numerics), "blas" (dequantize + sgemm) or
    "auto" (int below ``BLAS_MIN_TOKENS`` tokens). Raises ``MatmulShapeError`` (a ValueError) on bad input."""
    _check_kernel_choice()
    qtype = get_type(weight_type)
    if qtype.name not in SUPPORTED_TYPES:
        raise MatmulShapeError(f"matmul does not support weights of type {qtype.name}")
    rows = _as_activation_rows(x)
    _check_weights(qtype, weight_bytes, rows.shape[1])
    acts = quantize_activations(qtype.vec_dot_type, rows, for_blas=_takes_blas_path(method, rows.shape[0]))
    if x.ndim == 1:
        result = _matmul_prepared(qtype, weight_bytes, acts, None if out is None else out.reshape(1, -1), method)
        return result.reshape(-1)
    return _matmul_prepared(qtype, weight_bytes, acts, out, method)


def _byte_root(weight_bytes: np.ndarray) -> tuple[np.ndarray, int]:
    """The 1-D byte array that holds ``weight_bytes`` (usually the model file's memory map) and the offset of its
    first byte there, so that several matrices of one file can be multiplied in one kernel launch. Falls back to
    the matrix itself when its owner is not one contiguous array."""
    owner = weight_bytes
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner.flags.c_contiguous:
        flat = owner.reshape(-1).view(np.uint8)
        offset = weight_bytes.ctypes.data - flat.ctypes.data
        if 0 <= offset and offset + weight_bytes.nbytes <= flat.nbytes:
            return flat, offset
    return weight_bytes.reshape(-1), 0


class WeightMatrix:
    """A weight matrix in a ggml format: ``bytes`` [n_rows, row_bytes] holding ``shape`` = (n_rows, k) values."""

    def __init__(self, weight_type, weight_bytes: np.ndarray, shape: tuple[int, int] | None = None):
        self.type = get_type(weight_type)
        if not isinstance(weight_bytes, np.ndarray) or weight_bytes.dtype != np.uint8:
            raise MatmulShapeError("weight bytes must be a uint8 numpy array")
        if shape is None:
            if weight_bytes.ndim != 2:
                raise MatmulShapeError("give the shape when the weight bytes are not 2-D")
            k = weight_bytes.shape[1] // self.type.type_size * self.type.block_size
            shape = (weight_bytes.shape[0], k)
        n_rows, k = int(shape[0]), int(shape[1])
        if k % self.type.block_size:
            raise MatmulShapeError(f"k = {k} is not a multiple of the {self.type.name} block size")
        row_bytes = k // self.type.block_size * self.type.type_size
        if weight_bytes.size != n_rows * row_bytes:
            raise MatmulShapeError(f"{self.type.name} [{n_rows}, {k}] takes {n_rows * row_bytes} bytes, "
                                   f"got {weight_bytes.size}")
        self.bytes = weight_bytes.reshape(n_rows, row_bytes)
        _check_weights(self.type, self.bytes, k)
        self.shape = (n_rows, k)
        self.root, self.offset = _byte_root(self.bytes)

    def __repr__(self) -> str:
        return f"WeightMatrix({self.type.name}, shape={self.shape})"

    def matmul(self, x: np.ndarray, out: np.ndarray | None = None, method: str = "auto") -> np.ndarray:
        return matmul(self.type, self.bytes, x, out, method)

    def dequantize(self) -> np.ndarray:
        return dequantize_rows(self.type, self.bytes, self.shape[1])


def matmul_many(weights: Sequence[WeightMatrix], x: np.ndarray, method: str = "auto") -> list[np.ndarray]:
    """x @ W.T for several matrices sharing the input (q, k, v or gate, up): the activations are quantized once
    per distinct ``vec_dot_type``. Returns one float32 [n_tokens, n_rows_i] array per matrix."""
    _check_kernel_choice()
    rows = _as_activation_rows(x)
    for weight in weights:
        if weight.shape[1] != rows.shape[1]:
            raise MatmulShapeError(f"{weight!r} needs rows of {weight.shape[1]} values, got {rows.shape[1]}")
    if KERNEL_ISA is not None and (method == "int" or (method == "auto" and rows.shape[0] < BLAS_MIN_TOKENS)):
        return _matvec_many(weights, rows, x.ndim == 1)
    prepared: dict[str, QuantizedActivations] = {}
    results = []
    for weight in weights:
        vdt = weight.type.vec_dot_type
        if vdt not in prepared:
            prepared[vdt] = quantize_activations(vdt, rows, for_blas=_takes_blas_path(method, rows.shape[0]))
        result = _matmul_prepared(weight.type, weight.bytes, prepared[vdt], None, method)
        results.append(result.reshape(-1) if x.ndim == 1 else result)
    return results


@dataclass
class _FusedGroup:
    """Matrices of one type in one byte array, multiplied in one launch (see ``_launch_plan``)."""
    type_name: str
    vec_dot_type: str
    members: list[int]          # indexes into the weights of the call
    base: np.ndarray            # the byte array holding them
    starts: np.ndarray          # int64 byte offsets of their first rows in ``base``
    counts: np.ndarray          # int64 rows of each
    row_bytes: int


def _launch_plan(weights: Sequence[WeightMatrix]) -> list[_FusedGroup]:
    """The fused launches for this list of matrices, worked out once per list and kept on its first matrix (the
    forward pass passes the same lists every token): matrices whose owners are the same bytes (views of one
    memory map) and whose type is the same share a launch."""
    plans = weights[0].__dict__.setdefault("_launch_plans", {})
    key = tuple(id(weight) for weight in weights)
    cached = plans.get(key)
    if cached is not None and all(a is b for a, b in zip(cached[0], weights)):
        return cached[1]
    groups: dict[tuple, list[int]] = {}
    for i, weight in enumerate(weights):
        if weight.type.name in KINDS:
            groups.setdefault((weight.type.name, weight.root.ctypes.data, weight.root.nbytes), []).append(i)
    plan = [_FusedGroup(name, get_type(name).vec_dot_type, members, weights[members[0]].root,
                        np.array([weights[i].offset for i in members], np.int64),
                        np.array([weights[i].shape[0] for i in members], np.int64),
                        weights[members[0]].bytes.shape[1])
            for (name, _, _), members in groups.items()]
    plans[key] = (list(weights), plan)
    return plan


def _matvec_many(weights: Sequence[WeightMatrix], rows: np.ndarray, flat: bool) -> list[np.ndarray]:
    """A few tokens times several matrices on the SIMD kernels: those of one type that live in one byte array
    (q, k, v or gate, up of a model file) are computed in one kernel launch, which halves the launches of a
    decode step."""
    prepared: dict[str, QuantizedActivations] = {}
    results: list[np.ndarray | None] = [None] * len(weights)
    for i, weight in enumerate(weights):
        if weight.type.name not in KINDS:   # f32 / f16 / bf16: the BLAS path
            vdt = weight.type.vec_dot_type
            if vdt not in prepared:
                prepared[vdt] = quantize_activations(vdt, rows)
            results[i] = _matmul_prepared(weight.type, weight.bytes, prepared[vdt], None, "auto")
    for group in _launch_plan(weights):
        if group.vec_dot_type not in prepared:
            prepared[group.vec_dot_type] = quantize_activations(group.vec_dot_type, rows)
        out = np.empty((len(rows), int(group.counts.sum())), np.float32)
        _simd_matvec(group.type_name, group.base, group.starts, group.counts, group.row_bytes,
                     prepared[group.vec_dot_type], out)
        first = 0
        for i, count in zip(group.members, group.counts):
            results[i] = out[:, first:first + count]
            first += count
    return [result.reshape(-1) if flat else result for result in results]


__all__ = ["matmul", "matmul_many", "WeightMatrix", "MatmulShapeError", "QuantizedActivations",
           "quantize_activations", "dequantize_rows", "SUPPORTED_TYPES", "BLAS_MIN_TOKENS",
           "single_threaded_blas"]
