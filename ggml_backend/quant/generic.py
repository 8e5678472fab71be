"""The generic integer kernels: weights in a ggml block format times quantized activation rows, in plain numba
(no explicit SIMD), for CPUs without AVX2 (ARM, older x86) or ``GGML_BACKEND_KERNELS=generic``. CPUs with AVX2 run
``decode.py``'s kernels instead; both give llama.cpp's numerics (exact integer block dots, float32 sums).

* Few tokens (any type): ``_matmul_legacy`` / ``_matmul_kquant``, one compiled kernel per family, decode each
  weight block once with ``blocks.unpack_*`` into a small int16 buffer and dot it with every activation row.
* One token, for the types real models use (q4_0, q4_1, q5_0, q5_1, q8_0, q4_K, q6_K): hand-tuned kernels that
  walk several rows at a time and decode in registers (``blocks.half`` / ``blocks.scale_min_k4`` for the fields);
  q2_K, q3_K and q5_K take the family kernel.

Rows of W are split into equal chunks, one numba ``prange`` iteration each, so any thread count gets equal work.
The launchers at the end (``(w2d, acts, out, n_chunks) -> None``, ``acts`` holding ``qs``, ``d`` and ``extra`` as
``matmul.QuantizedActivations`` does) are the ``generic`` half of the type rows' ``ProductKernel``s (traits.py);
every size was checked by ``matmul.py``. ``fastmath`` here only lets LLVM reorder dot-product sums, as ggml's own
SIMD sums are ordered otherwise than its reference C; no result of this module has to be bit-exact with a table.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blocks import (
    HALF_TO_FLOAT, KQUANT_CODES, LEGACY_CODES, Q2_K, Q4_1, Q4_K, Q5_1, Q5_K, half, scale_min_k4 as _scale_min_k4,
    unpack_kquant, unpack_legacy,
)

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

# ----------------------------------------------------------------------------------------------------------------
# Family kernels (any number of tokens)
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, fastmath=True)
def _matmul_legacy(kind, w, xq, xd, xs, out, n_chunks, table):
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
            lanes[:] = 0.0
            acc_min[:] = 0.0
            for b in range(n_blocks):
                d, m = unpack_legacy(kind, row, b, q, table)
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
def _matmul_kquant(kind, w, xq, xd, xbsums, out, n_chunks, table):
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
            lanes[:] = 0.0
            acc_min[:] = 0.0
            for b in range(n_blocks):
                d, dmin = unpack_kquant(kind, row, b, q, scales, mins, table)
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
def _rows_q5(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, qh, has_min, out, first, last, table):
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
            acc0 += half(w0, 0, table) * xd * np.float32(dot0)
            acc1 += half(w1, 0, table) * xd * np.float32(dot1)
            acc2 += half(w2, 0, table) * xd * np.float32(dot2)
            acc3 += half(w3, 0, table) * xd * np.float32(dot3)
            if has_min:
                xs = x_sums[b]
                acc0 += half(w0, 2, table) * xs
                acc1 += half(w1, 2, table) * xs
                acc2 += half(w2, 2, table) * xs
                acc3 += half(w3, 2, table) * xs
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
            acc += half(w0, 0, table) * x_scale[b] * np.float32(dot)
            if has_min:
                acc += half(w0, 2, table) * x_sums[b]
        out[r] = acc
        r += 1


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q5_0(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, out, first, last, table):
    _rows_q5(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, 2, False, out, first, last, table)


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q5_1(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, out, first, last, table):
    _rows_q5(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, 4, True, out, first, last, table)


@njit(cache=True, parallel=True)
def _matvec_q5(blocks, x_blocks, x_scale, x_sums, has_min, out, n_chunks, table):
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
            _rows_q5_1(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, out, first, last, table)
        else:
            _rows_q5_0(blocks, x_blocks, x_scale, bit_sums, sums16, x_sums, out, first, last, table)


@njit(cache=True, error_model="numpy")
def _block_sums_times(x_blocks, factor, sums):
    """``sums[b]`` = factor * sum of the activation quants of block b (int32): the offset part of a block dot."""
    for b in range(x_blocks.shape[0]):
        total = np.int32(0)
        for j in range(32):
            total = np.int32(total + np.int32(x_blocks[b, j]))
        sums[b] = np.int32(factor * total)


@njit(cache=True, inline="always")
def _rows_q4(blocks, x_blocks, x_scale, x_offsets, x_sums, header, has_min, out, first, last, table):
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
            acc0 += half(w0, 0, table) * xd * np.float32(dot0)
            acc1 += half(w1, 0, table) * xd * np.float32(dot1)
            acc2 += half(w2, 0, table) * xd * np.float32(dot2)
            acc3 += half(w3, 0, table) * xd * np.float32(dot3)
            if has_min:
                xs = x_sums[b]
                acc0 += half(w0, 2, table) * xs
                acc1 += half(w1, 2, table) * xs
                acc2 += half(w2, 2, table) * xs
                acc3 += half(w3, 2, table) * xs
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
            acc += half(w0, 0, table) * x_scale[b] * np.float32(dot)
            if has_min:
                acc += half(w0, 2, table) * x_sums[b]
        out[r] = acc
        r += 1


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q4_0(blocks, x_blocks, x_scale, x_offsets, x_sums, out, first, last, table):
    _rows_q4(blocks, x_blocks, x_scale, x_offsets, x_sums, 2, False, out, first, last, table)


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q4_1(blocks, x_blocks, x_scale, x_offsets, x_sums, out, first, last, table):
    _rows_q4(blocks, x_blocks, x_scale, x_offsets, x_sums, 4, True, out, first, last, table)


@njit(cache=True, parallel=True)
def _matvec_q4(blocks, x_blocks, x_scale, x_sums, has_min, out, n_chunks, table):
    """q4_0 (``has_min`` False, ``x_sums`` unused) or q4_1 (``x_sums``: q8_1's per-block s) one-token product."""
    n_rows = blocks.shape[0]
    x_offsets = np.empty(x_blocks.shape[0], np.int32)
    _block_sums_times(x_blocks, 0 if has_min else 8, x_offsets)
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        if has_min:
            _rows_q4_1(blocks, x_blocks, x_scale, x_offsets, x_sums, out, first, min(n_rows, first + rows_per_chunk),
                       table)
        else:
            _rows_q4_0(blocks, x_blocks, x_scale, x_offsets, x_sums, out, first, min(n_rows, first + rows_per_chunk),
                       table)


@njit(cache=True, fastmath=True, error_model="numpy")
def _rows_q8_0(blocks, x_blocks, x_scale, out, first, last, table):
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
            acc0 += half(w0, 0, table) * xd * np.float32(dot0)
            acc1 += half(w1, 0, table) * xd * np.float32(dot1)
            acc2 += half(w2, 0, table) * xd * np.float32(dot2)
            acc3 += half(w3, 0, table) * xd * np.float32(dot3)
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
            acc += half(w0, 0, table) * x_scale[b] * np.float32(dot)
        out[r] = acc
        r += 1


@njit(cache=True, parallel=True)
def _matvec_q8_0(blocks, x_blocks, x_scale, out, n_chunks, table):
    n_rows = blocks.shape[0]
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        _rows_q8_0(blocks, x_blocks, x_scale, out, first, min(n_rows, first + rows_per_chunk), table)


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
def _rows_q6_K(blocks, scales, x, x_scale, x_bsums, out, first, last, table):
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
                for part in range(2):
                    l = 16 * part
                    g = 8 * n + part
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
            acc0 += half(w0, 208, table) * x_scale[b] * np.float32(np.int32(total0 - 32 * offset0))
            acc1 += half(w1, 208, table) * x_scale[b] * np.float32(np.int32(total1 - 32 * offset1))
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
def _rows_q4_K(blocks, x, x_scale, x_bsums, out, first, last, table):
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
            acc0 += half(w0, 0, table) * xd * np.float32(total0)
            acc1 += half(w1, 0, table) * xd * np.float32(total1)
            min_acc0 += half(w0, 2, table) * xd * np.float32(mins0)
            min_acc1 += half(w1, 2, table) * xd * np.float32(mins1)
        out[r] = acc0 - min_acc0    # the min terms summed apart and subtracted once, as ggml does
        out[r1] = acc1 - min_acc1


@njit(cache=True, parallel=True)
def _matvec_q6_K(blocks, scales, x, x_scale, x_bsums, out, n_chunks, table):
    n_rows = blocks.shape[0]
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        last = min(n_rows, first + rows_per_chunk)
        if first < last:
            _rows_q6_K(blocks, scales, x, x_scale, x_bsums, out, first, last, table)


@njit(cache=True, parallel=True)
def _matvec_q4_K(blocks, x, x_scale, x_bsums, out, n_chunks, table):
    n_rows = blocks.shape[0]
    rows_per_chunk = _rows_per_chunk(n_rows, n_chunks)
    for chunk in prange(n_chunks):
        first = min(n_rows, chunk * rows_per_chunk)
        last = min(n_rows, first + rows_per_chunk)
        if first < last:
            _rows_q4_K(blocks, x, x_scale, x_bsums, out, first, last, table)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: (w2d uint8 [n_rows, row_bytes], acts, out float32 [n_tokens, n_rows], n_chunks) -> None
# ----------------------------------------------------------------------------------------------------------------

def legacy_tokens(kind: int, w, acts, out, n_chunks: int) -> None:
    """Any number of tokens, 32-value formats (``kind``: blocks.LEGACY_CODES)."""
    extra = acts.extra if acts.extra is not None else acts.d   # xs is only read for q4_1 / q5_1
    _matmul_legacy(kind, w, acts.qs, acts.d, extra, out, n_chunks, HALF_TO_FLOAT)


def kquant_tokens(kind: int, w, acts, out, n_chunks: int) -> None:
    """Any number of tokens, super-block formats (``kind``: blocks.KQUANT_CODES)."""
    _matmul_kquant(kind, w, acts.qs, acts.d, acts.extra, out, n_chunks, HALF_TO_FLOAT)


def _nibble_one_token(matvec, has_min: bool, w, acts, out, n_chunks: int) -> None:
    """q4_0 / q5_0 (``has_min`` False) and q4_1 / q5_1 (value = d*q + m, q8_1 activations with block sums s)."""
    n_rows, row_bytes = w.shape
    n_blocks = acts.qs.shape[1] // 32
    blocks = w.reshape(n_rows, n_blocks, row_bytes // n_blocks)
    x_sums = acts.extra[0] if has_min else acts.d[0]   # q8_1's s; unread for q4_0 / q5_0
    matvec(blocks, acts.qs.reshape(-1, 32), acts.d[0], x_sums, has_min, out[0], n_chunks, HALF_TO_FLOAT)


def one_token_q8_0(w, acts, out, n_chunks: int) -> None:
    n_rows, row_bytes = w.shape
    blocks = w.view(np.int8).reshape(n_rows, row_bytes // 34, 34)
    _matvec_q8_0(blocks, acts.qs.reshape(-1, 32), acts.d[0], out[0], n_chunks, HALF_TO_FLOAT)


def one_token_q4_K(w, acts, out, n_chunks: int) -> None:
    blocks = w.reshape(w.shape[0], -1, 144)
    _matvec_q4_K(blocks, acts.qs[0], acts.d[0], acts.extra[0], out[0], n_chunks, HALF_TO_FLOAT)


def one_token_q6_K(w, acts, out, n_chunks: int) -> None:
    blocks = w.reshape(w.shape[0], -1, 210)
    _matvec_q6_K(blocks, blocks[:, :, 192:208].view(np.int8), acts.qs[0], acts.d[0], acts.extra[0], out[0],
                 n_chunks, HALF_TO_FLOAT)


one_token_q4_0 = partial(_nibble_one_token, _matvec_q4, False)
one_token_q4_1 = partial(_nibble_one_token, _matvec_q4, True)
one_token_q5_0 = partial(_nibble_one_token, _matvec_q5, False)
one_token_q5_1 = partial(_nibble_one_token, _matvec_q5, True)


def few_tokens(name: str):
    """The family kernel of type ``name`` (also the one-token kernel of the types without a hand-tuned one)."""
    if name in LEGACY_CODES:
        return partial(legacy_tokens, LEGACY_CODES[name])
    return partial(kquant_tokens, KQUANT_CODES[name])
