"""SIMD decode kernels: one activation row (one token) times a weight matrix in a ggml block format.

Decode reads every weight byte once per token, so these kernels decide generation speed. Each is written as
llama.cpp's x86 ``ggml_vec_dot_*`` is: a weight block is expanded to 32 unsigned bytes (nibbles, fifth or sixth
bits OR-ed in), multiplied with the 32 signed activation quants by ``dot_u8_i8`` (``vpdpbusd`` or ``vpmaddubsw``),
the int32 lanes scaled and accumulated in eight float lanes, which are summed once per row. Offsets that make
weights signed (q4_0's -8, q5_0's -16, q3_K's -4, q6_K's -32, and -128 for q8_0's signed bytes on VNNI) are exact
integer terms: the lane sums of ``offset * x`` are computed once per activation row (``lane_bias``) and start
each block's accumulator, so each block's integer dot product is exactly ggml's.

A kernel computes whole rows (``_row_*``); ``matvec`` spreads the rows of one or several matrices over numba's
threads in equal chunks, in one launch; ``matmul_few`` does the same for a few tokens, each (row, token) by the
one-token code. ``dequantize_rows`` expands weight rows to float32 for the prompt path with the same block
decoders. The ``isa`` argument (see ``simd.py``) picks the instructions and is part of each compiled signature.

Layouts (bytes of one block; ``d``/``m``/``dmin`` are IEEE halves):
    q4_0  [d | 16 bytes: low nibbles = weights 0..15, high = 16..31]              w = q - 8
    q4_1  [d | m | 16 bytes of nibbles]                                           w = d q + m
    q5_0  [d | qh: u32, bit j = fifth bit of weight j | 16 bytes of nibbles]      w = q - 16
    q5_1  [d | m | qh | 16 bytes of nibbles]                                      w = d q + m
    q8_0  [d | 32 int8]
    q2_K  [16 bytes: scale | min << 4 per 16 | 64 bytes: 2 bits | d | dmin]      256 weights
    q3_K  [32 bytes hmask | 64 bytes: 2 bits | 12 bytes: 16 six-bit scales | d]   w = d (s - 32) (q - 4)
    q4_K  [d | dmin | 12 bytes: 8 six-bit scales and mins | 128 bytes of nibbles]
    q5_K  [d | dmin | 12 bytes of scales and mins | 32 bytes: fifth bits | 128 bytes of nibbles]
    q6_K  [128 bytes: low 4 bits | 64 bytes: top 2 bits | 16 int8 scales | d]      w = d s (q - 32)
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from numba import njit, prange

from .simd import (
    add_bytes, add_f32x8, add_i32x8, bits_to_bytes, dot_i8_i8, dot_u8_i8, fma_i32x8, high_nibbles_dot, load_8_i32,
    load_16_bytes, load_32_bytes, load_f16, load_u32, low_nibbles, mul_i32x8, or_bytes, pair_i32x8,
    pair_low_nibbles_i32x8, pair_scales_i32x8, shift_left, shift_right_and, signed_dot_offset, splat_bytes,
    store_8_i32, store_scaled, sum_f32x8, unpack_nibbles, zero_f32x8, zero_i32x8,
)

_KERNEL = dict(cache=True, error_model="numpy", boundscheck=False)


def _drop_kernels_cached_against_another_simd(package_dir: Path | None = None) -> None:
    """numba keys a cached kernel on the text of the file that defines it, but these kernels are made of simd.py's
    IR too: a cache compiled against another simd.py (an upgrade or an edit that changed only that file) would be
    loaded as if current. A digest of simd.py beside the cache says which one it was built against."""
    package_dir = package_dir or Path(__file__).resolve().parent
    cache_dir = package_dir / "__pycache__"
    try:
        digest = hashlib.sha256((package_dir / "simd.py").read_bytes()).hexdigest()
        stamp = cache_dir / "decode.simd-digest"
        if stamp.is_file() and stamp.read_text() == digest:
            return
        for cached in cache_dir.glob("decode.*.nb[ic]"):
            cached.unlink(missing_ok=True)
        cache_dir.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:   # a read-only install: numba then caches elsewhere, and so does nothing here
        pass


_drop_kernels_cached_against_another_simd()


# ----------------------------------------------------------------------------------------------------------------
# Block decoders: one per format, shared by the dot kernels and dequantize_rows. Each gives a block's quants as
# unsigned bytes (before the format's offset) or its packed scales as words.
# ----------------------------------------------------------------------------------------------------------------

@njit(inline="always", **_KERNEL)
def _q4_quants(w, nibbles):
    """q4_0 / q4_1: the 32 quants 0..15 from the 16 bytes at ``nibbles`` (low nibbles first)."""
    return unpack_nibbles(load_16_bytes(w, nibbles))


@njit(inline="always", **_KERNEL)
def _q5_quants(w, qh):
    """q5_0 / q5_1: the 32 quants 0..31 from the fifth bits (u32 at ``qh``) and the 16 bytes of nibbles after it."""
    return or_bytes(unpack_nibbles(load_16_bytes(w, qh + 4)), bits_to_bytes(load_u32(w, qh), 16))


@njit(inline="always", **_KERNEL)
def _scale_min_words(w, o):
    """q4_K / q5_K: the 12 scale bytes at ``o`` (ggml's kmask trick) as four words whose bytes are the six-bit
    scales 0-3, 4-7 and mins 0-3, 4-7."""
    u0 = load_u32(w, o)
    u1 = load_u32(w, o + 4)
    u2 = load_u32(w, o + 8)
    return (u0 & 0x3F3F3F3F, (u2 & 0x0F0F0F0F) | (((u0 >> 6) & 0x03030303) << 4),
            u1 & 0x3F3F3F3F, ((u2 >> 4) & 0x0F0F0F0F) | (((u1 >> 6) & 0x03030303) << 4))


@njit(inline="always", **_KERNEL)
def _with_fifth_bit(nibbles, high_bits, bit):
    """q5_K: four-bit quants plus bit ``bit`` of each byte of ``high_bits`` as their fifth bit."""
    return or_bytes(nibbles, shift_left(shift_right_and(high_bits, bit, 1), 4))


@njit(inline="always", **_KERNEL)
def _q6_K_quants(nibbles, top, shift):
    """q6_K: four-bit quants plus bits ``shift``, ``shift + 1`` of each byte of ``top`` as their top two bits."""
    return or_bytes(nibbles, shift_left(shift_right_and(top, shift, 3), 4))


@njit(inline="always", **_KERNEL)
def _q3_K_quants(packed, hmask, shift, bit):
    """q3_K: the two bits at ``shift`` of each byte of ``packed`` plus 4 where bit ``bit`` of ``hmask`` is set."""
    return or_bytes(shift_right_and(packed, shift, 3), shift_left(shift_right_and(hmask, bit, 1), 2))


@njit(inline="always", **_KERNEL)
def _q3_K_scale_words(w, s):
    """q3_K: the 12 scale bytes at ``s`` (ggml's kmask trick) as four words: byte j % 4 of word j // 4 is six-bit
    scale j plus 32."""
    a0 = load_u32(w, s)
    a1 = load_u32(w, s + 4)
    a2 = load_u32(w, s + 8)
    return ((a0 & 0x0F0F0F0F) | ((a2 & 0x03030303) << 4),
            (a1 & 0x0F0F0F0F) | (((a2 >> 2) & 0x03030303) << 4),
            ((a0 >> 4) & 0x0F0F0F0F) | (((a2 >> 4) & 0x03030303) << 4),
            ((a1 >> 4) & 0x0F0F0F0F) | (((a2 >> 6) & 0x03030303) << 4))


@njit(**_KERNEL)
def lane_bias(xq, offset, isa):
    """int32 [k/32 * 8]: for each 32-value block of ``xq`` the eight lane sums of ``-offset * x`` (the lanes of
    ``dot_u8_i8``), so that ``dot_u8_i8(bias, w + offset, x)`` is the exact dot product of w and x."""
    n_groups = xq.size // 32
    bias = np.empty(n_groups * 8, np.int32)
    weights = splat_bytes(offset)
    for g in range(n_groups):
        store_8_i32(bias, 8 * g, mul_i32x8(dot_u8_i8(zero_i32x8(), weights, load_32_bytes(xq, 32 * g), isa), -1))
    return bias


# ----------------------------------------------------------------------------------------------------------------
# Legacy quants (blocks of 32)
# ----------------------------------------------------------------------------------------------------------------

@njit(inline="always", **_KERNEL)
def _row_q4_0(w, start, xq, x_scale, bias, isa):
    # two float chains (even and odd blocks), as in _row_q5_0
    acc = zero_f32x8()
    acc1 = zero_f32x8()
    n = x_scale.size
    for b in range(0, n - 1, 2):
        o = start + 18 * b
        dot = dot_u8_i8(load_8_i32(bias, 8 * b), _q4_quants(w, o + 2), load_32_bytes(xq, 32 * b),
                        isa)
        acc = fma_i32x8(acc, dot, load_f16(w, o) * x_scale[b])
        o += 18
        dot = dot_u8_i8(load_8_i32(bias, 8 * b + 8), _q4_quants(w, o + 2),
                        load_32_bytes(xq, 32 * b + 32), isa)
        acc1 = fma_i32x8(acc1, dot, load_f16(w, o) * x_scale[b + 1])
    if n % 2:
        o = start + 18 * (n - 1)
        dot = dot_u8_i8(load_8_i32(bias, 8 * (n - 1)), _q4_quants(w, o + 2),
                        load_32_bytes(xq, 32 * (n - 1)), isa)
        acc = fma_i32x8(acc, dot, load_f16(w, o) * x_scale[n - 1])
    return sum_f32x8(add_f32x8(acc, acc1))


@njit(inline="always", **_KERNEL)
def _row_q4_1(w, start, xq, x_scale, x_sums, isa):
    acc = zero_f32x8()
    mins = np.float32(0.0)
    for b in range(x_scale.size):
        o = start + 20 * b
        q = _q4_quants(w, o + 4)
        dot = dot_u8_i8(zero_i32x8(), q, load_32_bytes(xq, 32 * b), isa)
        acc = fma_i32x8(acc, dot, load_f16(w, o) * x_scale[b])
        mins += load_f16(w, o + 2) * x_sums[b]
    return sum_f32x8(acc) + mins


@njit(inline="always", **_KERNEL)
def _row_q5_0(w, start, xq, x_scale, bias, isa):
    # Two float chains (even and odd blocks): one chain waits on each fma's latency, and rows of k = 896 (28
    # blocks) left little else to overlap (measured 8-9 -> 10-12 GB/s per core on a Zen 4).
    acc = zero_f32x8()
    acc1 = zero_f32x8()
    n = x_scale.size
    for b in range(0, n - 1, 2):
        o = start + 22 * b
        q = _q5_quants(w, o + 2)
        dot = dot_u8_i8(load_8_i32(bias, 8 * b), q, load_32_bytes(xq, 32 * b), isa)
        acc = fma_i32x8(acc, dot, load_f16(w, o) * x_scale[b])
        o += 22
        q = _q5_quants(w, o + 2)
        dot = dot_u8_i8(load_8_i32(bias, 8 * b + 8), q, load_32_bytes(xq, 32 * b + 32), isa)
        acc1 = fma_i32x8(acc1, dot, load_f16(w, o) * x_scale[b + 1])
    if n % 2:
        b = n - 1
        o = start + 22 * b
        q = _q5_quants(w, o + 2)
        dot = dot_u8_i8(load_8_i32(bias, 8 * b), q, load_32_bytes(xq, 32 * b), isa)
        acc = fma_i32x8(acc, dot, load_f16(w, o) * x_scale[b])
    return sum_f32x8(add_f32x8(acc, acc1))


@njit(inline="always", **_KERNEL)
def _row_q5_1(w, start, xq, x_scale, x_sums, isa):
    acc = zero_f32x8()
    mins = np.float32(0.0)
    for b in range(x_scale.size):
        o = start + 24 * b
        q = _q5_quants(w, o + 4)
        dot = dot_u8_i8(zero_i32x8(), q, load_32_bytes(xq, 32 * b), isa)
        acc = fma_i32x8(acc, dot, load_f16(w, o) * x_scale[b])
        mins += load_f16(w, o + 2) * x_sums[b]
    return sum_f32x8(acc) + mins


@njit(inline="always", **_KERNEL)
def _row_q8_0(w, start, xq, x_scale, bias, isa):
    acc = zero_f32x8()
    for b in range(x_scale.size):
        o = start + 34 * b
        dot = dot_i8_i8(load_8_i32(bias, 8 * b), load_32_bytes(w, o + 2), load_32_bytes(xq, 32 * b), isa)
        acc = fma_i32x8(acc, dot, load_f16(w, o) * x_scale[b])
    return sum_f32x8(acc)


# ----------------------------------------------------------------------------------------------------------------
# K-quants (super-blocks of 256; activations q8_K: one scale per 256, sums per 16)
# ----------------------------------------------------------------------------------------------------------------

@njit(**_KERNEL)
def pair_sums(x_bsums):
    """int32 [k/32]: sums of the activation quants per 32 (from q8_K's sums per 16)."""
    out = np.empty(x_bsums.size // 2, np.int32)
    for j in range(out.size):
        out[j] = x_bsums[2 * j] + x_bsums[2 * j + 1]
    return out


@njit(inline="always", **_KERNEL)
def _row_q4_K(w, start, xq, x_scale, sums32, isa):
    acc = zero_f32x8()
    mins = np.float32(0.0)
    for b in range(x_scale.size):
        o = start + 144 * b
        words = _scale_min_words(w, o + 4)
        sumi = zero_i32x8()
        min_total = 0
        for c in range(4):
            packed = load_32_bytes(w, o + 16 + 32 * c)
            x = 256 * b + 64 * c
            pair = words[c // 2] >> (16 * (c & 1))
            mpair = words[2 + c // 2] >> (16 * (c & 1))
            low = dot_u8_i8(zero_i32x8(), low_nibbles(packed), load_32_bytes(xq, x), isa)
            high = dot_u8_i8(zero_i32x8(), shift_right_and(packed, 4, 15), load_32_bytes(xq, x + 32), isa)
            sumi = add_i32x8(sumi, add_i32x8(mul_i32x8(low, pair & 0xFF), mul_i32x8(high, (pair >> 8) & 0xFF)))
            min_total += (mpair & 0xFF) * sums32[8 * b + 2 * c] + ((mpair >> 8) & 0xFF) * sums32[8 * b + 2 * c + 1]
        acc = fma_i32x8(acc, sumi, load_f16(w, o) * x_scale[b])
        mins += load_f16(w, o + 2) * x_scale[b] * np.float32(min_total)
    return sum_f32x8(acc) - mins


@njit(inline="always", **_KERNEL)
def _row_q5_K(w, start, xq, x_scale, sums32, isa):
    acc = zero_f32x8()
    mins = np.float32(0.0)
    for b in range(x_scale.size):
        o = start + 176 * b
        words = _scale_min_words(w, o + 4)
        high_bits = load_32_bytes(w, o + 16)
        sumi = zero_i32x8()
        min_total = 0
        for c in range(4):
            packed = load_32_bytes(w, o + 48 + 32 * c)
            x = 256 * b + 64 * c
            pair = words[c // 2] >> (16 * (c & 1))
            mpair = words[2 + c // 2] >> (16 * (c & 1))
            q_low = _with_fifth_bit(low_nibbles(packed), high_bits, 2 * c)
            q_high = _with_fifth_bit(shift_right_and(packed, 4, 15), high_bits, 2 * c + 1)
            low = dot_u8_i8(zero_i32x8(), q_low, load_32_bytes(xq, x), isa)
            high = dot_u8_i8(zero_i32x8(), q_high, load_32_bytes(xq, x + 32), isa)
            sumi = add_i32x8(sumi, add_i32x8(mul_i32x8(low, pair & 0xFF), mul_i32x8(high, (pair >> 8) & 0xFF)))
            min_total += (mpair & 0xFF) * sums32[8 * b + 2 * c] + ((mpair >> 8) & 0xFF) * sums32[8 * b + 2 * c + 1]
        acc = fma_i32x8(acc, sumi, load_f16(w, o) * x_scale[b])
        mins += load_f16(w, o + 2) * x_scale[b] * np.float32(min_total)
    return sum_f32x8(acc) - mins


@njit(inline="always", **_KERNEL)
def _row_q6_K(w, start, xq, x_scale, bias, isa):
    acc = zero_f32x8()
    for b in range(x_scale.size):
        o = start + 210 * b
        sumi = zero_i32x8()
        for n in range(2):
            low_a = load_32_bytes(w, o + 64 * n)
            low_b = load_32_bytes(w, o + 64 * n + 32)
            top = load_32_bytes(w, o + 128 + 32 * n)
            x = 256 * b + 128 * n
            g = 8 * (x // 32)
            s = o + 192 + 8 * n
            q = _q6_K_quants(low_nibbles(low_a), top, 0)
            dot = dot_u8_i8(load_8_i32(bias, g), q, load_32_bytes(xq, x), isa)
            sumi = add_i32x8(sumi, mul_i32x8(dot, pair_scales_i32x8(w, s)))
            q = _q6_K_quants(low_nibbles(low_b), top, 2)
            dot = dot_u8_i8(load_8_i32(bias, g + 8), q, load_32_bytes(xq, x + 32), isa)
            sumi = add_i32x8(sumi, mul_i32x8(dot, pair_scales_i32x8(w, s + 2)))
            q = _q6_K_quants(shift_right_and(low_a, 4, 15), top, 4)
            dot = dot_u8_i8(load_8_i32(bias, g + 16), q, load_32_bytes(xq, x + 64), isa)
            sumi = add_i32x8(sumi, mul_i32x8(dot, pair_scales_i32x8(w, s + 4)))
            q = _q6_K_quants(shift_right_and(low_b, 4, 15), top, 6)
            dot = dot_u8_i8(load_8_i32(bias, g + 24), q, load_32_bytes(xq, x + 96), isa)
            sumi = add_i32x8(sumi, mul_i32x8(dot, pair_scales_i32x8(w, s + 6)))
        acc = fma_i32x8(acc, sumi, load_f16(w, o + 208) * x_scale[b])
    return sum_f32x8(acc)


@njit(inline="always", **_KERNEL)
def _row_q3_K(w, start, xq, x_scale, bias, isa):
    acc = zero_f32x8()
    for b in range(x_scale.size):
        o = start + 110 * b
        words = _q3_K_scale_words(w, o + 96)
        hmask = load_32_bytes(w, o)
        sumi = zero_i32x8()
        for n in range(2):
            packed = load_32_bytes(w, o + 32 + 32 * n)
            for j in range(4):
                x = 256 * b + 128 * n + 32 * j
                pair = words[2 * n + j // 2] >> (16 * (j & 1))
                q = _q3_K_quants(packed, hmask, 2 * j, 4 * n + j)
                dot = dot_u8_i8(load_8_i32(bias, 8 * (x // 32)), q, load_32_bytes(xq, x), isa)
                sumi = add_i32x8(sumi, mul_i32x8(dot, pair_i32x8((pair & 0xFF) - 32, ((pair >> 8) & 0xFF) - 32)))
        acc = fma_i32x8(acc, sumi, load_f16(w, o + 108) * x_scale[b])
    return sum_f32x8(acc)


@njit(inline="always", **_KERNEL)
def _row_q2_K(w, start, xq, x_scale, x_bsums, isa):
    acc = zero_f32x8()
    mins = np.float32(0.0)
    for b in range(x_scale.size):
        o = start + 84 * b
        sumi = zero_i32x8()
        for n in range(2):
            packed = load_32_bytes(w, o + 16 + 32 * n)
            for j in range(4):
                x = 256 * b + 128 * n + 32 * j
                s = o + 8 * n + 2 * j      # the scale | min << 4 bytes of the two 16-value halves
                dot = dot_u8_i8(zero_i32x8(), shift_right_and(packed, 2 * j, 3), load_32_bytes(xq, x), isa)
                sumi = add_i32x8(sumi, mul_i32x8(dot, pair_low_nibbles_i32x8(w, s)))
        acc = fma_i32x8(acc, sumi, load_f16(w, o + 80) * x_scale[b])
        mins += load_f16(w, o + 82) * x_scale[b] * np.float32(high_nibbles_dot(w, o, x_bsums, 16 * b))
    return sum_f32x8(acc) - mins


# ----------------------------------------------------------------------------------------------------------------
# The one-token product: rows of one or several matrices of one type, in one parallel launch
# ----------------------------------------------------------------------------------------------------------------

# Kernel selectors: the ``kind`` argument of ``matvec``.
KINDS = {"q4_0": 0, "q4_1": 1, "q5_0": 2, "q5_1": 3, "q8_0": 4, "q2_K": 5, "q3_K": 6, "q4_K": 7, "q5_K": 8, "q6_K": 9}


@njit(inline="always", **_KERNEL)
def _rows(kind, w, start, row_bytes, n, xq, x_scale, x_sums, x_bsums, bias, out, first, isa):
    """out[first + i] = row i (of n, starting at byte ``start`` of ``w``) times the activations. One branch per
    kind outside the row loop, so each loop is the type's own kernel."""
    if kind == 0:
        for i in range(n):
            out[first + i] = _row_q4_0(w, start + i * row_bytes, xq, x_scale, bias, isa)
    elif kind == 1:
        for i in range(n):
            out[first + i] = _row_q4_1(w, start + i * row_bytes, xq, x_scale, x_sums, isa)
    elif kind == 2:
        for i in range(n):
            out[first + i] = _row_q5_0(w, start + i * row_bytes, xq, x_scale, bias, isa)
    elif kind == 3:
        for i in range(n):
            out[first + i] = _row_q5_1(w, start + i * row_bytes, xq, x_scale, x_sums, isa)
    elif kind == 4:
        for i in range(n):
            out[first + i] = _row_q8_0(w, start + i * row_bytes, xq, x_scale, bias, isa)
    elif kind == 5:
        for i in range(n):
            out[first + i] = _row_q2_K(w, start + i * row_bytes, xq, x_scale, x_bsums, isa)
    elif kind == 6:
        for i in range(n):
            out[first + i] = _row_q3_K(w, start + i * row_bytes, xq, x_scale, bias, isa)
    elif kind == 7:
        for i in range(n):
            out[first + i] = _row_q4_K(w, start + i * row_bytes, xq, x_scale, bias, isa)
    elif kind == 8:
        for i in range(n):
            out[first + i] = _row_q5_K(w, start + i * row_bytes, xq, x_scale, bias, isa)
    else:
        for i in range(n):
            out[first + i] = _row_q6_K(w, start + i * row_bytes, xq, x_scale, bias, isa)


@njit(**_KERNEL)
def _per_row_terms(kind, xq, x_bsums, isa):
    """What a kind's rows share for one activation row: the lane biases of its weight offset (q4_0, q5_0, q8_0,
    q3_K, q6_K) or the q8_K sums per 32 (q4_K, q5_K); an empty array where a kind needs neither."""
    if kind == 0:
        return lane_bias(xq, 8, isa)
    if kind == 2:
        return lane_bias(xq, 16, isa)
    if kind == 4:
        return lane_bias(xq, signed_dot_offset(isa), isa)
    if kind == 6:
        return lane_bias(xq, 4, isa)
    if kind == 9:
        return lane_bias(xq, 32, isa)
    if kind == 7 or kind == 8:
        return pair_sums(x_bsums)
    return np.empty(0, np.int32)


@njit(inline="always", **_KERNEL)
def _matrix_of_row(row_counts, first, m, matrix_first):
    """The matrix (m) holding output row ``first`` and the output index of its first row, walking on from
    matrix m whose first row is ``matrix_first``."""
    while first >= matrix_first + row_counts[m]:
        matrix_first += row_counts[m]
        m += 1
    return m, matrix_first


@njit(parallel=True, nogil=True, **_KERNEL)
def matvec(kind, w, starts, row_counts, row_bytes, xq, x_scale, x_sums, x_bsums, out, n_chunks, isa):
    """One activation row (one token) times the rows of one or more weight matrices of one type (``KINDS[type]``)
    that share it (q, k and v; gate and up), in one parallel launch: the decode step.

    ``w``: a byte array holding the matrices (the model file's memory map); matrix m's rows start at byte
    ``starts[m]``, ``row_counts[m]`` rows of ``row_bytes`` each, their results at ``out[sum(row_counts[:m]):]``.
    ``xq`` int8 [k] and ``x_scale`` float32 [k / block]: the activations quantized to the type's vec_dot_type;
    ``x_sums``: q8_1's s per block (float32; q4_1, q5_1), ``x_bsums``: q8_K's sums per 16 (int32; K-quants); each
    is unread (may be empty) for the other kinds. The weight rows of all the matrices are cut into ``n_chunks``
    equal chunks, one prange iteration each."""
    bias = _per_row_terms(kind, xq, x_bsums, isa)    # q4_K / q5_K: their sums per 32
    total = out.size
    per_chunk = (total + n_chunks - 1) // n_chunks
    for chunk in prange(n_chunks):
        first = min(total, chunk * per_chunk)
        last = min(total, first + per_chunk)
        m = 0
        matrix_first = 0
        while first < last:
            m, matrix_first = _matrix_of_row(row_counts, first, m, matrix_first)
            n = min(last, matrix_first + row_counts[m]) - first
            _rows(kind, w, starts[m] + (first - matrix_first) * row_bytes, row_bytes, n, xq, x_scale, x_sums,
                  x_bsums, bias, out, first, isa)
            first += n


@njit(parallel=True, nogil=True, **_KERNEL)
def matmul_few(kind, w, starts, row_counts, row_bytes, xq, x_scale, x_sums, x_bsums, out, n_chunks, isa):
    """``matvec`` for a few tokens: ``xq`` [n_tokens, k], ``x_scale`` / ``x_sums`` / ``x_bsums`` one row per token,
    ``out`` [n_tokens, total rows]. Each weight row meets every token while it is in L1, and each (row, token)
    result is computed alone by the one-token code, so a token gets the same numbers whatever batch it is part
    of (prompt caching relies on it)."""
    n_tokens = xq.shape[0]
    bias = np.empty((n_tokens, xq.shape[1] // 4), np.int32)   # q4_K / q5_K: their sums per 32 in the first k/32
    for t in range(n_tokens):
        terms = _per_row_terms(kind, xq[t], x_bsums[t], isa)
        bias[t, :terms.size] = terms
    total = out.shape[1]
    per_chunk = (total + n_chunks - 1) // n_chunks
    for chunk in prange(n_chunks):
        first = min(total, chunk * per_chunk)
        last = min(total, first + per_chunk)
        m = 0
        matrix_first = 0
        for r in range(first, last):
            m, matrix_first = _matrix_of_row(row_counts, r, m, matrix_first)
            start = starts[m] + (r - matrix_first) * row_bytes
            for t in range(n_tokens):
                _rows(kind, w, start, row_bytes, 1, xq[t], x_scale[t], x_sums[t], x_bsums[t], bias[t], out[t], r,
                      isa)


# ----------------------------------------------------------------------------------------------------------------
# Dequantization of weight rows to float32 (the BLAS path of prompt processing), with the same block expansion
# as the kernels above and the type table's arithmetic (a multiply, then a subtract: bit-exact to quant/legacy.py
# and quant/kquants.py)
# ----------------------------------------------------------------------------------------------------------------

@njit(nogil=True, **_KERNEL)
def dequantize_rows(kind, w, start, row_bytes, out, isa):
    """out[i] = row i of the matrix whose rows start at byte ``start`` of ``w`` (out: float32 [n, k])."""
    n_rows, k = out.shape
    flat = out.reshape(-1)
    zero = np.float32(0.0)
    for r in range(n_rows):
        row = start + r * row_bytes
        base = r * k
        if kind <= 4:     # legacy: blocks of 32
            for b in range(k // 32):
                if kind == 0:
                    o = row + 18 * b
                    d = load_f16(w, o)
                    store_scaled(flat, base + 32 * b, add_bytes(_q4_quants(w, o + 2), splat_bytes(-8)), d, d,
                                 zero, zero)
                elif kind == 1:
                    o = row + 20 * b
                    d = load_f16(w, o)
                    m = -load_f16(w, o + 2)
                    store_scaled(flat, base + 32 * b, _q4_quants(w, o + 4), d, d, m, m)
                elif kind == 2:
                    o = row + 22 * b
                    d = load_f16(w, o)
                    q = _q5_quants(w, o + 2)
                    store_scaled(flat, base + 32 * b, add_bytes(q, splat_bytes(-16)), d, d, zero, zero)
                elif kind == 3:
                    o = row + 24 * b
                    d = load_f16(w, o)
                    m = -load_f16(w, o + 2)
                    q = _q5_quants(w, o + 4)
                    store_scaled(flat, base + 32 * b, q, d, d, m, m)
                else:
                    o = row + 34 * b
                    d = load_f16(w, o)
                    store_scaled(flat, base + 32 * b, load_32_bytes(w, o + 2), d, d, zero, zero)
            continue
        for b in range(k // 256):
            x = base + 256 * b
            if kind == 7 or kind == 8:     # q4_K, q5_K
                size = 144 if kind == 7 else 176
                o = row + size * b
                d = load_f16(w, o)
                dmin = load_f16(w, o + 2)
                words = _scale_min_words(w, o + 4)
                for c in range(4):
                    scales = words[c // 2] >> (16 * (c & 1))
                    mins = words[2 + c // 2] >> (16 * (c & 1))
                    if kind == 7:
                        packed = load_32_bytes(w, o + 16 + 32 * c)
                        low = low_nibbles(packed)
                        high = shift_right_and(packed, 4, 15)
                    else:
                        packed = load_32_bytes(w, o + 48 + 32 * c)
                        bits = load_32_bytes(w, o + 16)
                        low = _with_fifth_bit(low_nibbles(packed), bits, 2 * c)
                        high = _with_fifth_bit(shift_right_and(packed, 4, 15), bits, 2 * c + 1)
                    d1 = d * np.float32(scales & 0xFF)
                    m1 = dmin * np.float32(mins & 0xFF)
                    d2 = d * np.float32((scales >> 8) & 0xFF)
                    m2 = dmin * np.float32((mins >> 8) & 0xFF)
                    store_scaled(flat, x + 64 * c, low, d1, d1, m1, m1)
                    store_scaled(flat, x + 64 * c + 32, high, d2, d2, m2, m2)
            elif kind == 9:                # q6_K
                o = row + 210 * b
                d = load_f16(w, o + 208)
                for n in range(2):
                    low_a = load_32_bytes(w, o + 64 * n)
                    low_b = load_32_bytes(w, o + 64 * n + 32)
                    top = load_32_bytes(w, o + 128 + 32 * n)
                    s = o + 192 + 8 * n
                    minus32 = splat_bytes(-32)
                    for part in range(4):
                        if part == 0:
                            q = _q6_K_quants(low_nibbles(low_a), top, 0)
                        elif part == 1:
                            q = _q6_K_quants(low_nibbles(low_b), top, 2)
                        elif part == 2:
                            q = _q6_K_quants(shift_right_and(low_a, 4, 15), top, 4)
                        else:
                            q = _q6_K_quants(shift_right_and(low_b, 4, 15), top, 6)
                        scale_a = d * np.float32(np.int8(w[s + 2 * part]))
                        scale_b = d * np.float32(np.int8(w[s + 2 * part + 1]))
                        store_scaled(flat, x + 128 * n + 32 * part, add_bytes(q, minus32), scale_a, scale_b,
                                     zero, zero)
            elif kind == 6:                # q3_K
                o = row + 110 * b
                d = load_f16(w, o + 108)
                hmask = load_32_bytes(w, o)
                words = _q3_K_scale_words(w, o + 96)
                for n in range(2):
                    packed = load_32_bytes(w, o + 32 + 32 * n)
                    for j in range(4):
                        g = 8 * n + 2 * j
                        q = _q3_K_quants(packed, hmask, 2 * j, 4 * n + j)
                        pair = words[g // 4] >> (8 * (g % 4))     # scales g and g + 1 (g is even)
                        scale_a = d * np.float32((pair & 0xFF) - 32)
                        scale_b = d * np.float32(((pair >> 8) & 0xFF) - 32)
                        store_scaled(flat, x + 128 * n + 32 * j, add_bytes(q, splat_bytes(-4)), scale_a, scale_b,
                                     zero, zero)
            else:                          # q2_K
                o = row + 84 * b
                d = load_f16(w, o + 80)
                dmin = load_f16(w, o + 82)
                for n in range(2):
                    packed = load_32_bytes(w, o + 16 + 32 * n)
                    for j in range(4):
                        s = o + 8 * n + 2 * j
                        scale_a = d * np.float32(np.int32(w[s]) & 15)
                        scale_b = d * np.float32(np.int32(w[s + 1]) & 15)
                        min_a = dmin * np.float32(np.int32(w[s]) >> 4)
                        min_b = dmin * np.float32(np.int32(w[s + 1]) >> 4)
                        store_scaled(flat, x + 128 * n + 32 * j, shift_right_and(packed, 2 * j, 3), scale_a, scale_b,
                                     min_a, min_b)
