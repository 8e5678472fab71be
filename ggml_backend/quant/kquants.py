"""The 256-value "K-quant" super-block formats: q2_K, q3_K, q4_K, q5_K, q6_K, and q8_K (activations only).

Layouts: drawn once in ``blocks.py`` (q2_K 84 bytes, q3_K 110, q4_K 144, q5_K 176, q6_K 210, q8_K 292).

Dequantization is ``blocks.kquant_to_float`` on ``blocks.unpack_*``: ggml-quants.c dequantize_row_* operation by
operation in float32 (scale products first, then ``dl * q - ml``, no fused multiply-add), so it equals ggml's
reference C and gguf-py bit for bit.

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

import numpy as np
from numba import njit

from .activations import quantize_row_q8_K
from .blocks import (
    in_bands, int8 as _int8, nearest_int as _nearest_int, round_to_f16, scale_min_k4 as _scale_min_k4, scale_q3_K as _scale_q3_K,
    to_float_function,
)
from .floats import float_to_half_bits
from .legacy import _signed_abs_max

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)   # ggml-quants.c: a group whose largest |x| is below this is all zero


@njit(cache=True, inline="always")
def _wrap_int8(v):
    """C's (int8_t) of an int: the low byte, signed."""
    v = np.int32(v) & 0xFF
    return v - 256 if v >= 128 else v


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
    in_bands(kernel, n_blocks, _BAND_BLOCKS, *arrays)


# ---------------------------------------------------------------- q2_K
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
        d = round_to_f16(d)
        dmin = round_to_f16(dmin)
        for j in range(16):
            dl = d * F32(np.int32(out[base + j]) & 0xF)
            if dl == 0:
                continue
            ml = dmin * F32(np.int32(out[base + j]) >> 4)
            for i in range(16):
                L[16 * j + i] = max(0, min(3, _nearest_int((x[start + 16 * j + i] + ml) / dl)))
        _pack_2bit(L, out, base + 16)


quantize_q2_K = _quantizer(_quantize_q2_K, 84, (80, 82))


# ---------------------------------------------------------------- q3_K
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
        d = round_to_f16(d)
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


quantize_q3_K = _quantizer(_quantize_q3_K, 110, (108,))


# ---------------------------------------------------------------- q4_K
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
    d = round_to_f16(d)
    dmin = round_to_f16(dmin)
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


quantize_q4_K = _quantizer(_quantize_q4_K, 144, (0, 2))


# ---------------------------------------------------------------- q5_K
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


quantize_q5_K = _quantizer(_quantize_q5_K, 176, (0, 2))


# ---------------------------------------------------------------- q6_K
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
        d_half = round_to_f16(F32(1.0) / iscale)
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


quantize_q6_K = _quantizer(_quantize_q6_K, 210, (208,))


# ---------------------------------------------------------------- q8_K (activations of dot products)
# Its reference quantizer is activations.quantize_row_q8_K (the one the matrix products use too).

Q8_K_BLOCK = np.dtype([("d", "<f4"), ("qs", "i1", (QK_K,)), ("bsums", "<i2", (QK_K // 16,))])
assert Q8_K_BLOCK.itemsize == 292
quantize_q8_K = quantize_row_q8_K


# ---------------------------------------------------------------- dequantization (the type table's to_float)
# Built on blocks.unpack_* (layouts drawn there).

dequantize_q2_K = to_float_function("q2_K")
dequantize_q3_K = to_float_function("q3_K")
dequantize_q3_K_planes = to_float_function("q3_K_planes")
dequantize_q4_K = to_float_function("q4_K")
dequantize_q5_K = to_float_function("q5_K")
dequantize_q6_K = to_float_function("q6_K")
dequantize_q8_K = to_float_function("q8_K")
