"""The 256-value "K-quant" super-block formats: q2_K, q3_K, q4_K, q5_K, q6_K, and q8_K (activations only).

Layouts (ggml-common.h, QK_K = 256), halves little-endian:
  q2_K  scales[16] (low nibble: scale, high: min of each 16 values), qs[64] (2-bit), d, dmin      84 bytes
  q3_K  hmask[32] (3rd bit), qs[64] (low 2 bits), scales[12] (16 6-bit scales, biased by 32), d  110 bytes
  q4_K  d, dmin, scales[12] (8 6-bit scales + 8 6-bit mins), qs[128] (4-bit)                     144 bytes
  q5_K  d, dmin, scales[12], qh[32] (5th bit), qs[128]                                            176 bytes
  q6_K  ql[128] (low 4 bits), qh[64] (high 2 bits), scales:i8[16], d                              210 bytes
  q8_K  d:f32, qs:i8[256], bsums:i16[16] (sum of each 16 quants)                                  292 bytes

Each type's quantizer sits beside its dequantizer.

Dequantization follows ggml-quants.c dequantize_row_* operation by operation in float32 (scale products first,
then ``dl * q - ml``, no fused multiply-add), so it equals ggml's reference C and gguf-py bit for bit.

Quantization follows quantize_row_*_ref, which is what llama.cpp's quantizer (``llama_model_quantize``) runs when
no importance matrix is given: ``quantize_q4_K(src, dst, nrow, n_per_row, quant_weights)`` (and q2_K, q3_K, q5_K,
q6_K alike) calls ``quantize_row_q4_K_ref`` when ``quant_weights`` is NULL and the ``_impl`` variant (a different
search, driven by the imatrix) otherwise. The kernels are bit-equal to llama.cpp's bytes (tests/data/quantize):
every float operation is float32 in the C's order, with the C's int conversions (``nearest_int``'s bit trick,
uint8/int8 truncations), IEEE division (``error_model="numpy"``: x/0 is inf, not an exception) and no fastmath,
because one ulp in a search's error sum can flip which candidate scale wins. Scratch arrays are per call,
so memory stays at the output plus a few hundred bytes per thread whatever the tensor's size.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange

from .floats import HALF_TO_FLOAT, float_to_half_bits
from .legacy import _half, _signed_abs_max, read_only
from .types import register

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)   # ggml-quants.c: a group whose largest |x| is below this is all zero


# ---------------------------------------------------------------- block fields shared by several types

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



@njit(cache=True, inline="always")
def _scale_q3_K(j, src, scales_at):
    """The j-th (0..15) signed scale of a q3_K block: 6 bits, low 4 from bytes 0..7 (low nibbles first),
    high 2 from bytes 8..11, minus 32."""
    low = (np.int32(src[scales_at + (j % 8)]) >> (4 * (j // 8))) & 0xF
    high = (np.int32(src[scales_at + 8 + (j % 4)]) >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32



@njit(cache=True, inline="always")
def _nearest_int(v):
    """ggml's nearest_int, the same bit trick: the mantissa field of float32(v + 1.5 * 2**23), less 2**22.
    That is round half to even for |v| <= 4194303; ggml asserts that range, but release builds compile the assert
    out and awkward blocks do go beyond it (a value divided by a scale that rounded to a tiny half, or by inf),
    where the trick wraps: reproducing the trick itself keeps the clamps that follow seeing what llama.cpp's see.
    A NaN gives 0 (the default NaN's field is 0x400000)."""
    s = F32(v + F32(12582912.0))
    return np.int32((s.view(np.int32) & 0x7FFFFF) - 0x400000)


@njit(cache=True, inline="always")
def _wrap_int8(v):
    """C's (int8_t) of an int: the low byte, signed."""
    v = np.int32(v) & 0xFF
    return v - 256 if v >= 128 else v


@njit(cache=True, inline="always")
def _round_to_half(v):
    """float32 -> nearest half (ties to even) -> float32, as GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)).
    The quantizers re-read their own half scales, so they round in the kernel; the bytes of the half are written
    afterwards by numpy (float_to_half_bits), which rounds identically (tests/test_quant_quantize.py)."""
    if v == 0 or not np.isfinite(v):
        return v
    mantissa, exponent = math.frexp(np.float64(v))           # v = mantissa * 2**exponent, 0.5 <= |m| < 1
    quantum = 2.0 ** (exponent - 11) if exponent >= -13 else 2.0 ** -24   # normal halves: 11 bits
    rounded = np.rint(np.float64(v) / quantum) * quantum
    if abs(rounded) > 65504.0:
        return F32(np.inf) if rounded > 0 else F32(-np.inf)
    return F32(rounded)


@njit(cache=True, inline="always")
def _sqrtf(v):
    """C sqrtf: float64 sqrt rounded to float32 is the correctly rounded float32 root (53 >= 2 * 24 + 2)."""
    return F32(math.sqrt(np.float64(v)))


# ---------------------------------------------------------------- ggml-quants.c's scale searches
# Arguments as in the C, plus offsets: the group is x[start:start + n], its quants go to L[l_start:l_start + n].
# ``weights``/``Laux`` are scratch of at least n. Int quants are converted with F32() before every float
# operation: numba would promote float32 * int to float64, the C converts the int to float.

@njit(cache=True, error_model="numpy")
def _make_qx_quants(x, start, n, nmax, L, l_start):
    """make_qx_quants with rmse_type 1 and no importance weights (q6_K): the scale minimising the x**2-weighted
    error over 19 candidate grids; quants (offset by nmax) to L."""
    vmax = _signed_abs_max(x, start, n)
    amax = abs(vmax)
    if amax < GROUP_MAX_EPS:
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


@njit(cache=True, error_model="numpy")
def _make_q3_quants(x, start, n, nmax, L, l_start):
    """make_q3_quants with do_rmse (q3_K): quants from the largest |x|, then up to 5 sweeps that move single
    quants while that raises sumlx**2 / suml2 (x**2 weights). Returns the scale; quants + nmax to L."""
    vmax = _signed_abs_max(x, start, n)
    amax = abs(vmax)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[l_start + i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / vmax
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        v = x[start + i]
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
        L[l_start + i] = l
        w = v * v
        sumlx += w * v * F32(l)
        suml2 += w * F32(l) * F32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            v = x[start + i]
            w = v * v
            old = F32(L[l_start + i])
            slx = sumlx - w * v * old
            if slx > 0:
                sl2 = suml2 - w * old * old
                new_l = max(-nmax, min(nmax - 1, _nearest_int(v * sl2 / slx)))
                if new_l != L[l_start + i]:
                    slx += w * v * F32(new_l)
                    sl2 += w * F32(new_l) * F32(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[l_start + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[l_start + i] += nmax
    return sumlx / suml2 if suml2 > 0 else F32(0.0)


@njit(cache=True, error_model="numpy")
def _make_qkx2_quants(x, start, n, nmax, weights, L, l_start, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants (q2_K, q4_K, q5_K): an affine grid ``scale * l + min`` (min <= 0) over x, fitted by
    weighted least squares for nstep + 1 candidate grids; keeps the one of least weighted squared (or absolute,
    ``use_mad``) error. Returns (scale, the_min) with the_min = -min >= 0; quants 0..nmax to L."""
    lo = x[start]
    hi = x[start]
    sum_w = weights[0]
    sum_x = sum_w * x[start]
    for i in range(1, n):
        v = x[start + i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
        w = weights[i]
        sum_w += w
        sum_x += w * v
    if lo > 0:
        lo = F32(0.0)
    if hi == lo:
        for i in range(n):
            L[l_start + i] = 0
        return F32(0.0), -lo
    fnmax = F32(nmax)
    iscale = fnmax / (hi - lo)
    scale = F32(1.0) / iscale
    best_error = F32(0.0)
    for i in range(n):
        l = max(0, min(nmax, _nearest_int(iscale * (x[start + i] - lo))))
        L[l_start + i] = l
        diff = scale * F32(l) + lo - x[start + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -lo
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fnmax) / (hi - lo)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            l = max(0, min(nmax, _nearest_int(iscale * (x[start + i] - lo))))
            Laux[i] = l
            w = weights[i]
            sum_l += w * F32(l)
            sum_l2 += w * F32(l) * F32(l)
            sum_xl += w * F32(l) * x[start + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = F32(0.0)
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[start + i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[l_start + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                lo = this_min
    return scale, -lo


@njit(cache=True, inline="always")
def _pack_2bit(L, out, at):
    """q2_K/q3_K quants: byte l of each 32 (per 128 values) holds values l, l+32, l+64, l+96 at bits 0, 2, 4, 6."""
    for half in range(2):
        j = half * 128
        for l in range(32):
            out[at + half * 32 + l] = np.uint8((L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4)
                                                | (L[j + l + 96] << 6)) & 0xFF)


@njit(cache=True, inline="always")
def _pack_scales_k4(j, ls, lm, out, at):
    """q4_K/q5_K: the j-th 6-bit scale ``ls`` and min ``lm`` into scales[12] (the inverse of get_scale_min_k4):
    j < 4 whole in bytes j and j + 4; j >= 4 low nibbles in byte j + 4, top 2 bits in bits 6..7 of bytes j - 4
    (scale) and j (min)."""
    if j < 4:
        out[at + j] = np.uint8(ls)
        out[at + j + 4] = np.uint8(lm)
    else:
        out[at + j + 4] = np.uint8((ls & 0xF) | ((lm & 0xF) << 4))
        out[at + j - 4] = np.uint8(out[at + j - 4] | ((ls >> 4) << 6))
        out[at + j] = np.uint8(out[at + j] | ((lm >> 4) << 6))


def _super_blocks(values: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if x.size % QK_K:
        raise ValueError(f"{x.size} values are not a whole number of super-blocks of {QK_K}")
    return x


def _dequantizer(kernel, type_size):
    def dequantize(data: np.ndarray) -> np.ndarray:
        out = np.empty(data.size // type_size * QK_K, dtype=np.float32)
        kernel(read_only(data), HALF_TO_FLOAT, out)
        return out
    dequantize.__name__ = f"dequantize_{kernel.__name__.split('_dequantize_')[-1]}"
    return dequantize


def _quantizer(kernel, type_size, half_offsets):
    """Wrap a quantize kernel ``kernel(x, out, halves, first_block, end_block)``: it writes every byte of its
    blocks but the half scales, whose float32 values it leaves in ``halves[block, k]``; they go to the byte
    offsets ``half_offsets`` of each block."""
    def quantize(values: np.ndarray) -> np.ndarray:
        x = _super_blocks(values)
        nb = x.size // QK_K
        out = np.empty(nb * type_size, np.uint8)
        halves = np.empty((nb, len(half_offsets)), np.float32)
        _in_bands(kernel, nb, x, out, halves)
        blocks = out.reshape(nb, type_size)
        bits = float_to_half_bits(halves).view(np.uint8).reshape(nb, len(half_offsets), 2)
        for k, offset in enumerate(half_offsets):
            blocks[:, offset:offset + 2] = bits[:, k]
        return out
    quantize.__name__ = f"quantize_{kernel.__name__.split('_quantize_')[-1]}"
    return quantize


_BAND_BLOCKS = 256   # super-blocks per task: ~1-10 ms of work, so the pool's overhead stays below 1 %


def _in_bands(kernel, n_blocks, *arrays):
    """Run ``kernel(*arrays, first, end)`` over blocks [0, n_blocks) on numba.get_num_threads() threads.

    The kernels are serial and release the GIL (nogil), and bands of blocks go to a thread pool: the same speed
    as a prange kernel, but a serial kernel compiles in well under half the time of a parallel one, and these are
    the engine's largest kernels (CI compiles them on every fresh clone)."""
    threads = min(numba.get_num_threads(), -(-n_blocks // _BAND_BLOCKS))
    if threads <= 1:
        kernel(*arrays, 0, n_blocks)
        return
    bounds = list(range(0, n_blocks, _BAND_BLOCKS)) + [n_blocks]
    with ThreadPoolExecutor(threads, thread_name_prefix="quantize") as pool:
        for _ in pool.map(lambda band: kernel(*arrays, band[0], band[1]), zip(bounds[:-1], bounds[1:])):
            pass


# ---------------------------------------------------------------- q2_K
# block (84 bytes):  scales[16]        qs[64]                                  d     dmin
#                    0 ........ 15     16 ........................... 79      80-81 82-83
# scales[j] = (4-bit min << 4) | 4-bit scale of values 16j..16j+15;  value = d * scale * q - dmin * min
# qs: byte 16 + 32h + l holds quants of values 128h + l + {0, 32, 64, 96} at bits {0-1, 2-3, 4-5, 6-7}

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



@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_q2_K(x, out, halves, first, end):
    """quantize_row_q2_K_ref: per 16 values an affine 2-bit grid (make_qkx2_quants, |x| weights, least absolute
    error), the 16 scales and 16 mins each quantized to 4 bits against the largest, quants redone on the result."""
    L = np.empty(QK_K, np.int32)
    Laux = np.empty(16, np.int32)
    weights = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    for b in range(first, end):
        start = b * QK_K
        base = b * 84
        max_scale = F32(0.0)   # as the min is deducted, scales are positive
        max_min = F32(0.0)
        for j in range(16):
            for l in range(16):
                weights[l] = abs(x[start + 16 * j + l])
            scale, the_min = _make_qkx2_quants(x, start + 16 * j, 16, 3, weights, L, 16 * j, Laux,
                                               F32(-0.5), F32(0.1), 15, True)
            scales[j] = scale
            mins[j] = the_min
            if scale > max_scale:
                max_scale = scale
            if the_min > max_min:
                max_min = the_min
        d = F32(0.0)
        dmin = F32(0.0)
        if max_scale > 0:
            iscale = F32(15.0) / max_scale
            for j in range(16):
                out[base + j] = np.uint8(_nearest_int(iscale * scales[j]) & 0xFF)
            d = max_scale / F32(15.0)
        else:
            for j in range(16):
                out[base + j] = 0
        if max_min > 0:
            iscale = F32(15.0) / max_min
            for j in range(16):
                out[base + j] = np.uint8((np.int32(out[base + j]) | (_nearest_int(iscale * mins[j]) << 4)) & 0xFF)
            dmin = max_min / F32(15.0)
        halves[b, 0] = d
        halves[b, 1] = dmin
        d = _round_to_half(d)
        dmin = _round_to_half(dmin)
        for j in range(16):
            dl = d * F32(np.int32(out[base + j]) & 0xF)
            if dl == 0:
                continue
            ml = dmin * F32(np.int32(out[base + j]) >> 4)
            for i in range(16):
                L[16 * j + i] = max(0, min(3, _nearest_int((x[start + 16 * j + i] + ml) / dl)))
        _pack_2bit(L, out, base + 16)


dequantize_q2_K = _dequantizer(_dequantize_q2_K, 84)
quantize_q2_K = _quantizer(_quantize_q2_K, 84, (80, 82))


# ---------------------------------------------------------------- q3_K
# block (110 bytes): hmask[32]      qs[64]                scales[12]          d
#                    0 ...... 31    32 ............ 95    96 ........ 107     108-109
# value = d * (scale - 32) * (q - 4), q = 2 low bits from qs (packed as q2_K's) | 3rd bit from hmask:
#   hmask byte k, bit m = 3rd bit of value 32m + k
# scales: 16 6-bit values; low 4 bits of scale j in byte j % 8 (j < 8: low nibble, else high),
#   top 2 bits in byte 8 + j % 4 at bits 2 * (j // 4)

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



@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_q3_K(x, out, halves, first, end):
    """quantize_row_q3_K_ref: per 16 values a symmetric 3-bit grid (make_q3_quants), the 16 signed scales
    quantized to 6 bits against the one of largest magnitude, quants redone on the result."""
    L = np.empty(QK_K, np.int32)
    scales = np.empty(16, np.float32)
    for b in range(first, end):
        start = b * QK_K
        base = b * 110
        sc_at = base + 96
        max_scale = F32(0.0)
        amax = F32(0.0)
        for j in range(16):
            scale = _make_q3_quants(x, start + 16 * j, 16, 4, L, 16 * j)
            scales[j] = scale
            if abs(scale) > amax:
                amax = abs(scale)
                max_scale = scale
        for k in range(110):
            out[base + k] = 0
        d = F32(0.0)
        if max_scale != 0:
            iscale = F32(-32.0) / max_scale
            for j in range(16):
                l = max(-32, min(31, _wrap_int8(_nearest_int(iscale * scales[j])))) + 32
                if j < 8:
                    out[sc_at + j] = np.uint8(l & 0xF)
                else:
                    out[sc_at + j - 8] = np.uint8(out[sc_at + j - 8] | ((l & 0xF) << 4))
                l >>= 4
                out[sc_at + 8 + j % 4] = np.uint8(out[sc_at + 8 + j % 4] | (l << (2 * (j // 4))))
            d = F32(1.0) / iscale
        halves[b, 0] = d
        d = _round_to_half(d)
        for j in range(16):
            dl = d * F32(_scale_q3_K(j, out, sc_at))
            if dl == 0:
                continue
            for i in range(16):
                L[16 * j + i] = max(-4, min(3, _nearest_int(x[start + 16 * j + i] / dl))) + 4
        for j in range(QK_K):           # the 3rd bit of value j: bit j // 32 of hmask[j % 32]
            if L[j] > 3:
                out[base + j % 32] = np.uint8(out[base + j % 32] | (1 << (j // 32)))
                L[j] -= 4
        _pack_2bit(L, out, base + 32)


dequantize_q3_K = _dequantizer(_dequantize_q3_K, 110)
quantize_q3_K = _quantizer(_quantize_q3_K, 110, (108,))


# ---------------------------------------------------------------- q4_K
# block (144 bytes): d     dmin   scales[12]     qs[128]
#                    0-1   2-3    4 ...... 15    16 ............................ 143
# 8 groups of 32 values, each a 6-bit scale and 6-bit min (scales[12] as _pack_scales_k4 draws it);
# value = d * scale * q - dmin * min;  qs byte 16 + 32p + l: low nibble value 64p + l, high nibble 64p + 32 + l

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



@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_qK_affine(x, start, base, nmax, rmin, nstep, out, halves, b, L, Laux, weights, scales, mins):
    """The part quantize_row_q4_K_ref and quantize_row_q5_K_ref share: per 32 values an affine grid of nmax + 1
    levels (make_qkx2_quants, weights mean-|x| + |x|, least squares), the 8 scales and 8 mins quantized to 6 bits
    against the largest, then quants redone on the result (into L; packing differs)."""
    max_scale = F32(0.0)   # as the min is deducted, scales are positive
    max_min = F32(0.0)
    for j in range(8):
        sum_x2 = F32(0.0)
        for l in range(32):
            sum_x2 += x[start + 32 * j + l] * x[start + 32 * j + l]
        av_x = _sqrtf(sum_x2 / F32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(x[start + 32 * j + l])
        scale, the_min = _make_qkx2_quants(x, start + 32 * j, 32, nmax, weights, L, 32 * j, Laux,
                                           rmin, F32(0.1), nstep, False)
        scales[j] = scale
        mins[j] = the_min
        if scale > max_scale:
            max_scale = scale
        if the_min > max_min:
            max_min = the_min
    inv_scale = F32(63.0) / max_scale if max_scale > 0 else F32(0.0)
    inv_min = F32(63.0) / max_min if max_min > 0 else F32(0.0)
    for j in range(8):
        ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)    # uint8_t ls = nearest_int(...)
        lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
        _pack_scales_k4(j, ls, lm, out, base + 4)
    d = max_scale / F32(63.0)
    dmin = max_min / F32(63.0)
    halves[b, 0] = d
    halves[b, 1] = dmin
    d = _round_to_half(d)
    dmin = _round_to_half(dmin)
    for j in range(8):
        sc, m = _scale_min_k4(j, out, base + 4)
        dl = d * F32(sc)
        if dl == 0:
            continue
        ml = dmin * F32(m)
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, _nearest_int((x[start + 32 * j + i] + ml) / dl)))


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_q4_K(x, out, halves, first, end):
    """quantize_row_q4_K_ref (make_qkx2_quants with nmax 15, rmin -1, rdelta 0.1, 20 steps)."""
    L = np.empty(QK_K, np.int32)
    Laux = np.empty(32, np.int32)
    weights = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    for b in range(first, end):
        start = b * QK_K
        base = b * 144
        _quantize_qK_affine(x, start, base, 15, F32(-1.0), 20, out, halves, b, L, Laux, weights, scales, mins)
        for p in range(4):
            for l in range(32):
                out[base + 16 + 32 * p + l] = np.uint8(L[64 * p + l] | (L[64 * p + 32 + l] << 4))


dequantize_q4_K = _dequantizer(_dequantize_q4_K, 144)
quantize_q4_K = _quantizer(_quantize_q4_K, 144, (0, 2))


# ---------------------------------------------------------------- q5_K
# block (176 bytes): d     dmin   scales[12]    qh[32]        qs[128]
#                    0-1   2-3    4 ..... 15    16 ..... 47   48 ........................ 175
# as q4_K with 5-bit quants: the low 4 bits in qs (q4_K's nibble order), the 5th bit of value 64p + l in bit 2p
# of qh[l] and of value 64p + 32 + l in bit 2p + 1

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



@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_q5_K(x, out, halves, first, end):
    """quantize_row_q5_K_ref (make_qkx2_quants with nmax 31, rmin -0.5, rdelta 0.1, 15 steps)."""
    L = np.empty(QK_K, np.int32)
    Laux = np.empty(32, np.int32)
    weights = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    for b in range(first, end):
        start = b * QK_K
        base = b * 176
        _quantize_qK_affine(x, start, base, 31, F32(-0.5), 15, out, halves, b, L, Laux, weights, scales, mins)
        for l in range(32):
            out[base + 16 + l] = 0
        for p in range(4):
            for l in range(32):
                q1 = L[64 * p + l]
                q2 = L[64 * p + 32 + l]
                high = np.int32(out[base + 16 + l])
                if q1 > 15:
                    q1 -= 16
                    high |= 1 << (2 * p)
                if q2 > 15:
                    q2 -= 16
                    high |= 2 << (2 * p)
                out[base + 16 + l] = np.uint8(high)
                out[base + 48 + 32 * p + l] = np.uint8(q1 | (q2 << 4))


dequantize_q5_K = _dequantizer(_dequantize_q5_K, 176)
quantize_q5_K = _quantizer(_quantize_q5_K, 176, (0, 2))


# ---------------------------------------------------------------- q6_K
# block (210 bytes): ql[128]                 qh[64]              scales:i8[16]    d
#                    0 ............ 127      128 ....... 191     192 ..... 207    208-209
# value = d * scale[v // 16] * (q - 32); per half h (128 values): ql byte 64h + l holds the low 4 bits of
# values 128h + l (low nibble) and + 64 (high), byte 64h + 32 + l those of + 32 and + 96; qh byte 32h + l holds
# the top 2 bits of values 128h + l + {0, 32, 64, 96} at bits {0-1, 2-3, 4-5, 6-7}

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



@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_q6_K(x, out, halves, first, end):
    """quantize_row_q6_K_ref: per 16 values a symmetric 6-bit grid (make_qx_quants), the 16 signed scales
    quantized to int8 against the one of largest magnitude, quants redone on the result."""
    L = np.empty(QK_K, np.int32)
    sub_scales = np.empty(16, np.float32)
    for b in range(first, end):
        start = b * QK_K
        base = b * 210
        max_scale = F32(0.0)
        max_abs_scale = F32(0.0)
        for ib in range(16):
            scale = _make_qx_quants(x, start + 16 * ib, 16, 32, L, 16 * ib)
            sub_scales[ib] = scale
            if abs(scale) > max_abs_scale:
                max_abs_scale = abs(scale)
                max_scale = scale
        halves[b, 0] = 0
        for k in range(210):
            out[base + k] = 0
        if max_abs_scale < GROUP_MAX_EPS:
            continue                    # an all-zero block: every byte 0 (d = +0)
        iscale = F32(-128.0) / max_scale
        halves[b, 0] = F32(1.0) / iscale
        d_half = _round_to_half(F32(1.0) / iscale)
        for ib in range(16):
            out[base + 192 + ib] = np.uint8(min(127, _nearest_int(iscale * sub_scales[ib])) & 0xFF)
            d = d_half * F32(_int8(out[base + 192 + ib]))
            if d == 0:
                continue
            for i in range(16):
                L[16 * ib + i] = max(-32, min(31, _nearest_int(x[start + 16 * ib + i] / d))) + 32
        for half in range(2):
            j = half * 128
            for l in range(32):
                out[base + half * 64 + l] = np.uint8((L[j + l] & 0xF) | ((L[j + l + 64] & 0xF) << 4))
                out[base + half * 64 + l + 32] = np.uint8((L[j + l + 32] & 0xF) | ((L[j + l + 96] & 0xF) << 4))
                out[base + 128 + half * 32 + l] = np.uint8((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                                                           | ((L[j + l + 64] >> 4) << 4)
                                                           | ((L[j + l + 96] >> 4) << 6))


dequantize_q6_K = _dequantizer(_dequantize_q6_K, 210)
quantize_q6_K = _quantizer(_quantize_q6_K, 210, (208,))


# ---------------------------------------------------------------- q8_K (activations of dot products)
# block (292 bytes): d:f32 (0-3), qs:i8[256] (4-259), bsums:i16[16] (260-291)

Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", (QK_K,)), ("bsums", "<i2", (QK_K // 16,))])
assert Q8_K_BLOCK.itemsize == 292


@njit(cache=True, parallel=True)
def _dequantize_q8_K(src, scales, out):
    for b in prange(src.size // 292):
        d = scales[b]
        for j in range(QK_K):
            out[b * QK_K + j] = d * F32(_int8(src[b * 292 + 4 + j]))


def dequantize_q8_K(data: np.ndarray) -> np.ndarray:
    nb = data.size // 292
    out = np.empty(nb * QK_K, dtype=np.float32)
    scales = data.reshape(nb, 292)[:, :4].copy().view("<f4").reshape(nb)  # the f32 d of each block
    _dequantize_q8_K(read_only(data), scales, out)
    return out


@njit(cache=True, parallel=True)
def _quantize_q8_K(x, scales, qs, bsums):
    for b in prange(x.size // QK_K):
        start = b * QK_K
        vmax = _signed_abs_max(x, start, QK_K)
        amax = abs(vmax)
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



register("q2_K", dequantize=dequantize_q2_K, quantize=quantize_q2_K)
register("q3_K", dequantize=dequantize_q3_K, quantize=quantize_q3_K)
register("q4_K", dequantize=dequantize_q4_K, quantize=quantize_q4_K)
register("q5_K", dequantize=dequantize_q5_K, quantize=quantize_q5_K)
register("q6_K", dequantize=dequantize_q6_K, quantize=quantize_q6_K)
register("q8_K", dequantize=dequantize_q8_K, quantize=quantize_q8_K)
