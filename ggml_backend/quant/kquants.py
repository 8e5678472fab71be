"""The 256-value "K-quant" super-block formats: q2_K, q3_K, q4_K, q5_K, q6_K, and q8_K (activations only).

Layouts (ggml-common.h, QK_K = 256), halves little-endian:
  q2_K  scales[16] (low nibble: scale, high: min of each 16 values), qs[64] (2-bit), d, dmin      84 bytes
  q3_K  hmask[32] (3rd bit), qs[64] (low 2 bits), scales[12] (16 6-bit scales, biased by 32), d  110 bytes
  q4_K  d, dmin, scales[12] (8 6-bit scales + 8 6-bit mins), qs[128] (4-bit)                     144 bytes
  q5_K  d, dmin, scales[12], qh[32] (5th bit), qs[128]                                            176 bytes
  q6_K  ql[128] (low 4 bits), qh[64] (high 2 bits), scales:i8[16], d                              210 bytes
  q8_K  d:f32, qs:i8[256], bsums:i16[16] (sum of each 16 quants)                                  292 bytes

Quantization is implemented for q6_K and q8_K (quantize_row_*_ref, bit-equal to llama.cpp's C).
Dequantization follows ggml-quants.c dequantize_row_* operation by operation in float32 (scale products first,
then ``dl * q - ml``, no fused multiply-add), so it equals ggml's reference C and gguf-py bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .floats import HALF_TO_FLOAT, float_to_half_bits
from .legacy import _half, read_only
from .types import register

F32 = np.float32
QK_K = 256


@njit(cache=True, inline="always")
def _scale_min_k4(j, src, scales_at):
    """The j-th (0..7) 6-bit scale and min of a q4_K/q5_K block (ggml's get_scale_min_k4)."""
    if j < 4:
        sc = np.int32(src[scales_at + j]) & 63
        m = np.int32(src[scales_at + j + 4]) & 63
    else:
        sc = (np.int32(src[scales_at + j + 4]) & 0xF) | ((np.int32(src[scales_at + j - 4]) >> 6) << 4)
        m = (np.int32(src[scales_at + j + 4]) >> 4) | ((np.int32(src[scales_at + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, inline="always")
def _int8(byte):
    v = np.int32(byte)
    return v - 256 if v >= 128 else v


@njit(cache=True, parallel=True)
def _dequantize_q2_K(src, half_to_float, out):
    for b in prange(src.size // 84):
        base = b * 84
        d = _half(src, base + 80, half_to_float)
        dmin = _half(src, base + 82, half_to_float)
        o = b * QK_K
        for half in range(2):           # two halves of 128 values, each using 32 bytes of qs
            q_at = base + 16 + half * 32
            for shift_index in range(4):
                shift = 2 * shift_index
                for part in range(2):   # 16 values from q[0:16], then 16 from q[16:32]
                    sc = np.int32(src[base + half * 8 + shift_index * 2 + part])
                    dl = d * F32(sc & 0xF)
                    ml = dmin * F32(sc >> 4)
                    for l in range(16):
                        q = (np.int32(src[q_at + part * 16 + l]) >> shift) & 3
                        out[o] = dl * F32(q) - ml
                        o += 1


@njit(cache=True, inline="always")
def _scale_q3_K(j, src, scales_at):
    """The j-th (0..15) signed scale of a q3_K block: 6 bits, low 4 from bytes 0..7 (low nibbles first),
    high 2 from bytes 8..11, minus 32."""
    low = (np.int32(src[scales_at + (j % 8)]) >> (4 * (j // 8))) & 0xF
    high = (np.int32(src[scales_at + 8 + (j % 4)]) >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


@njit(cache=True, parallel=True)
def _dequantize_q3_K(src, half_to_float, out):
    for b in prange(src.size // 110):
        base = b * 110
        d_all = _half(src, base + 108, half_to_float)
        o = b * QK_K
        scale_index = 0
        mask = 1                        # hmask bit of the current 32 values: one bit per 2-bit plane
        for half in range(2):
            q_at = base + 32 + half * 32
            for shift_index in range(4):
                shift = 2 * shift_index
                for part in range(2):
                    dl = d_all * F32(_scale_q3_K(scale_index, src, base + 96))
                    scale_index += 1
                    for l in range(16):
                        k = part * 16 + l
                        q = (np.int32(src[q_at + k]) >> shift) & 3
                        if (np.int32(src[base + k]) & mask) == 0:
                            q -= 4
                        out[o] = dl * F32(q)
                        o += 1
                mask <<= 1


@njit(cache=True, parallel=True)
def _dequantize_q4_K(src, half_to_float, out):
    for b in prange(src.size // 144):
        base = b * 144
        d = _half(src, base, half_to_float)
        dmin = _half(src, base + 2, half_to_float)
        o = b * QK_K
        for pair in range(4):           # 64 values: 32 low nibbles, then 32 high nibbles of the same bytes
            q_at = base + 16 + pair * 32
            sc, m = _scale_min_k4(2 * pair, src, base + 4)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = _scale_min_k4(2 * pair + 1, src, base + 4)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            for l in range(32):
                out[o + l] = d1 * F32(np.int32(src[q_at + l]) & 0xF) - m1
                out[o + 32 + l] = d2 * F32(np.int32(src[q_at + l]) >> 4) - m2
            o += 64


@njit(cache=True, parallel=True)
def _dequantize_q5_K(src, half_to_float, out):
    for b in prange(src.size // 176):
        base = b * 176
        d = _half(src, base, half_to_float)
        dmin = _half(src, base + 2, half_to_float)
        qh_at = base + 16
        o = b * QK_K
        for pair in range(4):
            q_at = base + 48 + pair * 32
            sc, m = _scale_min_k4(2 * pair, src, base + 4)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = _scale_min_k4(2 * pair + 1, src, base + 4)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            bit1 = 2 * pair
            bit2 = 2 * pair + 1
            for l in range(32):
                qh = np.int32(src[qh_at + l])
                q1 = (np.int32(src[q_at + l]) & 0xF) + (((qh >> bit1) & 1) << 4)
                q2 = (np.int32(src[q_at + l]) >> 4) + (((qh >> bit2) & 1) << 4)
                out[o + l] = d1 * F32(q1) - m1
                out[o + 32 + l] = d2 * F32(q2) - m2
            o += 64


@njit(cache=True, parallel=True)
def _dequantize_q6_K(src, half_to_float, out):
    for b in prange(src.size // 210):
        base = b * 210
        d = _half(src, base + 208, half_to_float)
        for half in range(2):
            ql_at = base + half * 64
            qh_at = base + 128 + half * 32
            sc_at = base + 192 + half * 8
            o = b * QK_K + half * 128
            for l in range(32):
                is_ = l // 16
                low0 = np.int32(src[ql_at + l])
                low1 = np.int32(src[ql_at + l + 32])
                qh = np.int32(src[qh_at + l])
                q1 = ((low0 & 0xF) | (((qh >> 0) & 3) << 4)) - 32
                q2 = ((low1 & 0xF) | (((qh >> 2) & 3) << 4)) - 32
                q3 = ((low0 >> 4) | (((qh >> 4) & 3) << 4)) - 32
                q4 = ((low1 >> 4) | (((qh >> 6) & 3) << 4)) - 32
                out[o + l] = d * F32(_int8(src[sc_at + is_])) * F32(q1)
                out[o + l + 32] = d * F32(_int8(src[sc_at + is_ + 2])) * F32(q2)
                out[o + l + 64] = d * F32(_int8(src[sc_at + is_ + 4])) * F32(q3)
                out[o + l + 96] = d * F32(_int8(src[sc_at + is_ + 6])) * F32(q4)


@njit(cache=True, parallel=True)
def _dequantize_q8_K(src, scales, out):
    for b in prange(src.size // 292):
        d = scales[b]
        for j in range(QK_K):
            out[b * QK_K + j] = d * F32(_int8(src[b * 292 + 4 + j]))


def _dequantizer(kernel, type_size):
    def dequantize(data: np.ndarray) -> np.ndarray:
        out = np.empty(data.size // type_size * QK_K, dtype=np.float32)
        kernel(read_only(data), HALF_TO_FLOAT, out)
        return out
    dequantize.__name__ = f"dequantize_{kernel.__name__.split('_dequantize_')[-1]}"
    return dequantize


dequantize_q2_K = _dequantizer(_dequantize_q2_K, 84)
dequantize_q3_K = _dequantizer(_dequantize_q3_K, 110)
dequantize_q4_K = _dequantizer(_dequantize_q4_K, 144)
dequantize_q5_K = _dequantizer(_dequantize_q5_K, 176)
dequantize_q6_K = _dequantizer(_dequantize_q6_K, 210)


def dequantize_q8_K(data: np.ndarray) -> np.ndarray:
    nb = data.size // 292
    out = np.empty(nb * QK_K, dtype=np.float32)
    scales = data.reshape(nb, 292)[:, :4].copy().view("<f4").reshape(nb)  # the f32 d of each block
    _dequantize_q8_K(read_only(data), scales, out)
    return out


# ---------------------------------------------------------------- q8_K quantization (quantize_row_q8_K_ref)

Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", (QK_K,)), ("bsums", "<i2", (QK_K // 16,))])
assert Q8_K_BLOCK.itemsize == 292


@njit(cache=True, inline="always")
def _nearest_int(v):
    """ggml's nearest_int: round half to even (it adds 1.5 * 2**23 in float32), for |v| < 2**22."""
    return np.int32(np.rint(v))


@njit(cache=True, parallel=True)
def _quantize_q8_K(x, scales, qs, bsums):
    for b in prange(x.size // QK_K):
        start = b * QK_K
        amax = F32(0.0)
        vmax = F32(0.0)
        for j in range(QK_K):
            ax = abs(x[start + j])
            if ax > amax:
                amax = ax
                vmax = x[start + j]
        if amax == 0:
            scales[b] = 0
            for j in range(QK_K):
                qs[b, j] = 0
            for j in range(QK_K // 16):
                bsums[b, j] = 0   # ggml leaves these unwritten; zero is their true value
            continue
        iscale = F32(-127.0) / vmax
        for j in range(QK_K):
            qs[b, j] = min(127, _nearest_int(iscale * x[start + j]))
        for j in range(QK_K // 16):
            total = 0
            for i in range(16):
                total += qs[b, j * 16 + i]
            bsums[b, j] = total
        scales[b] = F32(1.0) / iscale


def quantize_q8_K(values: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if x.size % QK_K:
        raise ValueError(f"{x.size} values are not a whole number of q8_K blocks of {QK_K}")
    nb = x.size // QK_K
    blocks = np.empty(nb, dtype=Q8_K_BLOCK)
    scales = np.empty(nb, np.float32)
    qs = np.empty((nb, QK_K), np.int8)
    bsums = np.empty((nb, QK_K // 16), np.int16)
    _quantize_q8_K(x, scales, qs, bsums)
    blocks["d"] = scales
    blocks["qs"] = qs
    blocks["bsums"] = bsums
    return blocks.view(np.uint8).reshape(-1)


# ---------------------------------------------------------------- q4_K and q6_K quantization (the *_ref paths,
# which llama.cpp's quantizer takes when no importance matrix is given). These re-read their own half scales,
# so the kernels round float32 to half themselves.

@njit(cache=True, inline="always")
def _round_to_half(v):
    """float32 -> nearest half (ties to even) -> float32, as GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))."""
    if v == 0 or not np.isfinite(v):
        return v
    mantissa, exponent = math.frexp(np.float64(v))           # v = mantissa * 2**exponent, 0.5 <= |m| < 1
    quantum = 2.0 ** (exponent - 11) if exponent >= -13 else 2.0 ** -24   # normal halves: 11 bits
    rounded = np.rint(np.float64(v) / quantum) * quantum
    if abs(rounded) > 65504.0:
        return F32(np.inf) if rounded > 0 else F32(-np.inf)
    return F32(rounded)


@njit(cache=True)
def _make_qx_quants(x, start, n, nmax, L, l_start):
    """ggml's make_qx_quants with rmse_type 1 and no importance weights: the scale minimising the x**2-weighted
    error over 19 candidate grids; quants (offset by nmax) go to L[l_start:l_start+n]."""
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[start + i])
        if ax > amax:
            amax = ax
            vmax = x[start + i]
    if amax < F32(1e-15):
        for i in range(n):
            L[l_start + i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / vmax
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[start + i])))
        L[l_start + i] = l + nmax
        w = x[start + i] * x[start + i]
        sumlx += w * x[start + i] * F32(l)
        suml2 += w * F32(l) * F32(l)
    scale = sumlx / suml2 if suml2 != 0 else F32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / vmax
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[start + i])))
            w = x[start + i] * x[start + i]
            sumlx += w * x[start + i] * F32(l)
            suml2 += w * F32(l) * F32(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[l_start + i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * x[start + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, parallel=True)
def _quantize_q6_K(x, out, L, sub_scales, halves):
    for b in prange(x.size // QK_K):
        start = b * QK_K
        base = b * 210
        max_scale = F32(0.0)
        max_abs_scale = F32(0.0)
        for ib in range(16):
            scale = _make_qx_quants(x, start + 16 * ib, 16, 32, L[b], 16 * ib)
            sub_scales[b, ib] = scale
            if abs(scale) > max_abs_scale:
                max_abs_scale = abs(scale)
                max_scale = scale
        halves[b] = 0
        for k in range(210):
            out[base + k] = 0
        if max_abs_scale < F32(1e-15):
            continue                    # an all-zero block: every byte 0 (d = +0)
        iscale = F32(-128.0) / max_scale
        d_half = _round_to_half(F32(1.0) / iscale)
        for ib in range(16):
            sc = min(127, _nearest_int(iscale * sub_scales[b, ib]))
            out[base + 192 + ib] = np.uint8(sc & 0xFF)
            d = d_half * F32(_int8(out[base + 192 + ib]))
            if d == 0:
                continue
            for i in range(16):
                l = max(-32, min(31, _nearest_int(x[start + 16 * ib + i] / d)))
                L[b, 16 * ib + i] = l + 32
        for half in range(2):
            j = half * 128
            for l in range(32):
                q1 = L[b, j + l] & 0xF
                q2 = L[b, j + l + 32] & 0xF
                q3 = L[b, j + l + 64] & 0xF
                q4 = L[b, j + l + 96] & 0xF
                out[base + half * 64 + l] = np.uint8(q1 | (q3 << 4))
                out[base + half * 64 + l + 32] = np.uint8(q2 | (q4 << 4))
                out[base + 128 + half * 32 + l] = np.uint8((L[b, j + l] >> 4) | ((L[b, j + l + 32] >> 4) << 2)
                                                           | ((L[b, j + l + 64] >> 4) << 4)
                                                           | ((L[b, j + l + 96] >> 4) << 6))
        halves[b] = F32(1.0) / iscale  # written as a half by the caller (numpy rounds as ggml does)


def quantize_q6_K(values: np.ndarray) -> np.ndarray:
    x = _super_blocks(values)
    nb = x.size // QK_K
    out = np.empty(nb * 210, np.uint8)
    halves = np.empty(nb, np.float32)
    _quantize_q6_K(x, out, np.empty((nb, QK_K), np.int32), np.empty((nb, 16), np.float32), halves)
    out.reshape(nb, 210)[:, 208:210] = float_to_half_bits(halves).view(np.uint8).reshape(nb, 2)
    return out


def _super_blocks(values: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if x.size % QK_K:
        raise ValueError(f"{x.size} values are not a whole number of super-blocks of {QK_K}")
    return x


register("q2_K", dequantize=dequantize_q2_K)
register("q3_K", dequantize=dequantize_q3_K)
register("q4_K", dequantize=dequantize_q4_K)
register("q5_K", dequantize=dequantize_q5_K)
register("q6_K", dequantize=dequantize_q6_K, quantize=quantize_q6_K)
register("q8_K", dequantize=dequantize_q8_K, quantize=quantize_q8_K)
