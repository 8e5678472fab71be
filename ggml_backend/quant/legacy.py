"""The 32-value block formats: q4_0, q4_1, q5_0, q5_1, q8_0, q8_1.

Layouts: drawn once in ``blocks.py``, whose ``unpack_*`` decoders the dequantizers here are built on.

Dequantization does ggml's float operations in ggml's order (dequantize_row_*), in float32 and without fused
multiply-adds, so results equal ggml's reference C (and gguf-py) bit for bit. Quantization follows
``quantize_row_*_ref`` (round-to-nearest, scale from the float32 block maximum); its float32 scales are turned into
halves by numpy afterwards (round to nearest even, like GGML_FP32_TO_FP16).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .blocks import to_float_function
from .floats import float_to_half_bits

F32 = np.float32


# ---------------------------------------------------------------- dequantization (the type table's to_float)
# (uint8[n_bytes] whole blocks) -> float32[n_values], built on blocks.unpack_*.

dequantize_q4_0 = to_float_function("q4_0")
dequantize_q4_1 = to_float_function("q4_1")
dequantize_q5_0 = to_float_function("q5_0")
dequantize_q5_1 = to_float_function("q5_1")
dequantize_q8_0 = to_float_function("q8_0")
dequantize_q8_1 = to_float_function("q8_1")


# ---------------------------------------------------------------- quantization kernels
# Input: float32 values [n_blocks * 32]. Output: per-block float32 scale (and min / sum) plus the packed quants;
# the Python wrappers assemble the blocks.

@njit(cache=True, inline="always")
def _signed_abs_max(x, start, n):
    """The value of largest magnitude in x[start:start+n] (first one on ties), as ggml's q4_0/q5_0 search."""
    amax = F32(0.0)
    vmax = F32(0.0)
    for j in range(n):
        v = x[start + j]
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return vmax


@njit(cache=True, inline="always")
def _min_max(x, start, n):
    lo = F32(np.inf)   # ggml starts from +-FLT_MAX; the same for finite input
    hi = F32(-np.inf)
    for j in range(n):
        v = x[start + j]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi


@njit(cache=True, inline="always")
def _round_half_away(v):
    """C roundf: nearest integer, halves away from zero (exact: float32 + 0.5 is exact in float64), as an int the
    way x86 converts it: NaN and infinities (in a block whose 1/d overflowed) give the "integer indefinite"
    INT_MIN, whose low byte, 0, is what ggml's int8 store keeps."""
    f = np.float64(v)
    if not abs(f) < 2147483648.0:
        return np.int32(-2147483648)
    if f >= 0:
        return np.int32(math.floor(f + 0.5))
    return -np.int32(math.floor(-f + 0.5))


@njit(cache=True, inline="always")
def _trunc_to_int(v):
    """C's (int8_t)/(uint8_t) cast of a float as x86 compilers emit it (cvttss2si, then the low byte): toward
    zero; NaN and out-of-range values give INT_MIN, whose low byte is 0. Callers keep the low byte."""
    f = np.float64(v)
    if not abs(f) < 2147483648.0:
        return np.int32(-2147483648)
    return np.int32(math.trunc(f))


@njit(cache=True, inline="always")
def _low_byte_signed(v):
    """The int8 a C store of the int ``v`` into an int8_t keeps."""
    v = np.int64(v) & 0xFF
    return v - 256 if v >= 128 else v


@njit(cache=True, parallel=True)
def _quantize_q4_0(x, scales, qs):
    for b in prange(x.size // 32):
        start = b * 32
        d = _signed_abs_max(x, start, 32) / F32(-8.0)
        inv = F32(1.0) / d if d != 0 else F32(0.0)
        scales[b] = d
        for j in range(16):
            q0 = min(15, _low_byte_signed(_trunc_to_int(x[start + j] * inv + F32(8.5))))
            q1 = min(15, _low_byte_signed(_trunc_to_int(x[start + j + 16] * inv + F32(8.5))))
            qs[b, j] = np.uint8(q0 | (q1 << 4))


@njit(cache=True, parallel=True)
def _quantize_q4_1(x, scales, mins, qs):
    for b in prange(x.size // 32):
        start = b * 32
        lo, hi = _min_max(x, start, 32)
        d = (hi - lo) / F32(15.0)
        inv = F32(1.0) / d if d != 0 else F32(0.0)
        scales[b] = d
        mins[b] = lo
        for j in range(16):
            q0 = min(15, _low_byte_signed(_trunc_to_int((x[start + j] - lo) * inv + F32(0.5))))
            q1 = min(15, _low_byte_signed(_trunc_to_int((x[start + j + 16] - lo) * inv + F32(0.5))))
            qs[b, j] = np.uint8(q0 | (q1 << 4))


@njit(cache=True, parallel=True)
def _quantize_q5_0(x, scales, qh, qs):
    for b in prange(x.size // 32):
        start = b * 32
        d = _signed_abs_max(x, start, 32) / F32(-16.0)
        inv = F32(1.0) / d if d != 0 else F32(0.0)
        scales[b] = d
        high = np.uint32(0)
        for j in range(16):
            q0 = min(31, _low_byte_signed(_trunc_to_int(x[start + j] * inv + F32(16.5))))
            q1 = min(31, _low_byte_signed(_trunc_to_int(x[start + j + 16] * inv + F32(16.5))))
            qs[b, j] = np.uint8((q0 & 0xF) | ((q1 & 0xF) << 4))
            high |= np.uint32((q0 >> 4) & 1) << np.uint32(j)
            high |= np.uint32((q1 >> 4) & 1) << np.uint32(j + 16)
        qh[b] = high


@njit(cache=True, parallel=True)
def _quantize_q5_1(x, scales, mins, qh, qs):
    for b in prange(x.size // 32):
        start = b * 32
        lo, hi = _min_max(x, start, 32)
        d = (hi - lo) / F32(31.0)
        inv = F32(1.0) / d if d != 0 else F32(0.0)
        scales[b] = d
        mins[b] = lo
        high = np.uint32(0)
        for j in range(16):
            # ggml has no MIN(31, ...) here: (max - min) * (31 / (max - min)) + 0.5 cannot reach 32
            q0 = _trunc_to_int((x[start + j] - lo) * inv + F32(0.5)) & 0x1F
            q1 = _trunc_to_int((x[start + j + 16] - lo) * inv + F32(0.5)) & 0x1F
            qs[b, j] = np.uint8((q0 & 0xF) | ((q1 & 0xF) << 4))
            high |= np.uint32((q0 >> 4) & 1) << np.uint32(j)
            high |= np.uint32((q1 >> 4) & 1) << np.uint32(j + 16)
        qh[b] = high


@njit(cache=True, parallel=True)
def _quantize_q8(x, scales, sums, qs):
    """q8_0 and q8_1: d = amax / 127, q = roundf(x / d); sums[b] = d * sum(q) (q8_1's s, before rounding)."""
    for b in prange(x.size // 32):
        start = b * 32
        amax = F32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[start + j]))
        d = amax / F32(127.0)
        inv = F32(1.0) / d if d != 0 else F32(0.0)
        scales[b] = d
        total = 0
        for j in range(32):
            q = _low_byte_signed(_round_half_away(x[start + j] * inv))
            qs[b, j] = np.int8(q)
            total += q
        sums[b] = F32(total) * d


def _as_blocks(values: np.ndarray, block: int) -> np.ndarray:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if flat.size % block:
        raise ValueError(f"{flat.size} values are not a whole number of blocks of {block}")
    return flat


def quantize_q4_0(values: np.ndarray) -> np.ndarray:
    x = _as_blocks(values, 32)
    nb = x.size // 32
    scales = np.empty(nb, np.float32)
    out = np.empty((nb, 18), np.uint8)
    _quantize_q4_0(x, scales, out[:, 2:])
    out[:, 0:2] = float_to_half_bits(scales).view(np.uint8).reshape(nb, 2)
    return out.reshape(-1)


def quantize_q4_1(values: np.ndarray) -> np.ndarray:
    x = _as_blocks(values, 32)
    nb = x.size // 32
    scales = np.empty(nb, np.float32)
    mins = np.empty(nb, np.float32)
    out = np.empty((nb, 20), np.uint8)
    _quantize_q4_1(x, scales, mins, out[:, 4:])
    out[:, 0:2] = float_to_half_bits(scales).view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = float_to_half_bits(mins).view(np.uint8).reshape(nb, 2)
    return out.reshape(-1)


def quantize_q5_0(values: np.ndarray) -> np.ndarray:
    x = _as_blocks(values, 32)
    nb = x.size // 32
    scales = np.empty(nb, np.float32)
    qh = np.empty(nb, np.uint32)
    out = np.empty((nb, 22), np.uint8)
    _quantize_q5_0(x, scales, qh, out[:, 6:])
    out[:, 0:2] = float_to_half_bits(scales).view(np.uint8).reshape(nb, 2)
    out[:, 2:6] = qh.astype("<u4").view(np.uint8).reshape(nb, 4)
    return out.reshape(-1)


def quantize_q5_1(values: np.ndarray) -> np.ndarray:
    x = _as_blocks(values, 32)
    nb = x.size // 32
    scales = np.empty(nb, np.float32)
    mins = np.empty(nb, np.float32)
    qh = np.empty(nb, np.uint32)
    out = np.empty((nb, 24), np.uint8)
    _quantize_q5_1(x, scales, mins, qh, out[:, 8:])
    out[:, 0:2] = float_to_half_bits(scales).view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = float_to_half_bits(mins).view(np.uint8).reshape(nb, 2)
    out[:, 4:8] = qh.astype("<u4").view(np.uint8).reshape(nb, 4)
    return out.reshape(-1)


def _quantize_q8_blocks(values: np.ndarray, with_sum: bool) -> np.ndarray:
    x = _as_blocks(values, 32)
    nb = x.size // 32
    scales = np.empty(nb, np.float32)
    sums = np.empty(nb, np.float32)
    header = 4 if with_sum else 2
    out = np.empty((nb, header + 32), np.uint8)
    _quantize_q8(x, scales, sums, out[:, header:].view(np.int8))
    out[:, 0:2] = float_to_half_bits(scales).view(np.uint8).reshape(nb, 2)
    if with_sum:
        out[:, 2:4] = float_to_half_bits(sums).view(np.uint8).reshape(nb, 2)
    return out.reshape(-1)


def quantize_q8_0(values: np.ndarray) -> np.ndarray:
    return _quantize_q8_blocks(values, with_sum=False)


def quantize_q8_1(values: np.ndarray) -> np.ndarray:
    return _quantize_q8_blocks(values, with_sum=True)


