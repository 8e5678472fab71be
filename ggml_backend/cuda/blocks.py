"""Reading ggml's blocks on the device: the GPU's twin of quant/blocks.py's ``unpack_*`` (CUDA device functions: the
CPU's numba decoders cannot run on the device, so the layouts drawn there are read again here).

Every quantized type is read in *units* of 32 consecutive values of a row (a legacy block; an eighth of a K-quant
super-block), each unit split in two halves of 16 that carry their own scale and offset:

    value_i = d_h * q_i - m_h          (h = i // 16, q_i an integer)

``unit_params(kind, w, r, u)`` returns (d_0, m_0, d_1, m_1) of unit u of row r and ``unit_unpack(kind, w, r, u,
q)`` writes its integers q_0..q_31, where w is the matrix as stored in the file, uint8 [n_rows, row_bytes],
uploaded untouched. The dequantization kernel computes the formula above (the same float32 operations as
quant/legacy.py and quant/kquants.py: bit-exact in the simulator); the mat-vec kernels use the integers against
quantized activations.
f32/f16/bf16 matrices are uploaded as float32/uint16 arrays and read by ``float_value``.

Half and bfloat16 bit patterns become floats by arithmetic (ldexp of the integer significand), exact, so no
lookup table has to live in device memory. Integers read from the byte arrays are cast to int32 first: in the
simulator a uint8 minus 8 would wrap, on the device numba widens to int64 anyway.
"""
from __future__ import annotations

import math

import numpy as np

from .runtime import import_cuda

cuda = import_cuda()

# kind ids, one per quantized type (the table in kernels.py maps names onto them)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = range(10)
F32, F16, BF16 = 20, 21, 22
K_QUANTS = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)


@cuda.jit(device=True)
def half_to_float(bits):
    """IEEE half bits (an integer 0..65535) -> float32, exactly."""
    bits = np.int32(bits)
    sign = np.float32(-1.0) if bits & 0x8000 else np.float32(1.0)
    exponent = (bits >> 10) & 31
    mantissa = bits & 1023
    if exponent == 0:
        return sign * np.float32(math.ldexp(np.float64(mantissa), int(-24)))
    if exponent == 31:
        return sign * np.float32(math.inf) if mantissa == 0 else np.float32(math.nan)
    return sign * np.float32(math.ldexp(np.float64(mantissa + 1024), int(exponent - 25)))


@cuda.jit(device=True)
def bf16_to_float(bits):
    """bfloat16 bits -> float32 (the upper half of a float32), exactly."""
    bits = np.int32(bits)
    sign = np.float32(-1.0) if bits & 0x8000 else np.float32(1.0)
    exponent = (bits >> 7) & 255
    mantissa = bits & 127
    if exponent == 0:
        return sign * np.float32(math.ldexp(np.float64(mantissa), int(-133)))
    if exponent == 255:
        return sign * np.float32(math.inf) if mantissa == 0 else np.float32(math.nan)
    return sign * np.float32(math.ldexp(np.float64(mantissa + 128), int(exponent - 134)))


@cuda.jit(device=True)
def f16_at(w, r, o):
    return half_to_float(np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8))


@cuda.jit(device=True)
def scale_min_k4(j, w, r, s):
    """The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at w[r, s:s+12] (q4_K, q5_K)."""
    if j < 4:
        return np.int32(w[r, s + j]) & 63, np.int32(w[r, s + j + 4]) & 63
    scale = (np.int32(w[r, s + j + 4]) & 15) | ((np.int32(w[r, s + j - 4]) >> 6) << 4)
    minimum = (np.int32(w[r, s + j + 4]) >> 4) | ((np.int32(w[r, s + j]) >> 6) << 4)
    return scale, minimum


@cuda.jit(device=True)
def q3_K_scale(w, r, s, j):
    """Scale j (0..15) of a q3_K super-block whose 12 scale bytes start at s: 6 bits, minus 32."""
    if j < 8:
        low = np.int32(w[r, s + j]) & 15
    else:
        low = np.int32(w[r, s + j - 8]) >> 4
    high = (np.int32(w[r, s + 8 + (j % 4)]) >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


@cuda.jit(device=True)
def unit_params(kind, w, r, u):
    """(d_0, m_0, d_1, m_1) of unit u (values 32u..32u+31) of row r: value = d_h * q - m_h."""
    zero = np.float32(0.0)
    if kind == Q4_0:
        d = f16_at(w, r, u * 18)
        return d, zero, d, zero
    if kind == Q4_1:
        d = f16_at(w, r, u * 20)
        m = -f16_at(w, r, u * 20 + 2)
        return d, m, d, m
    if kind == Q5_0:
        d = f16_at(w, r, u * 22)
        return d, zero, d, zero
    if kind == Q5_1:
        d = f16_at(w, r, u * 24)
        m = -f16_at(w, r, u * 24 + 2)
        return d, m, d, m
    if kind == Q8_0:
        d = f16_at(w, r, u * 34)
        return d, zero, d, zero
    block = u // 8
    part = u - block * 8             # which 32 of the super-block's 256 values
    if kind == Q4_K or kind == Q5_K:
        o = block * (144 if kind == Q4_K else 176)
        d = f16_at(w, r, o)
        dmin = f16_at(w, r, o + 2)
        scale, minimum = scale_min_k4(part, w, r, o + 4)
        d1 = d * np.float32(scale)
        m1 = dmin * np.float32(minimum)
        return d1, m1, d1, m1
    if kind == Q6_K:
        o = block * 210
        d = f16_at(w, r, o + 208)
        return (d * np.float32(((np.int32(w[r, o + 192 + 2 * part]) ^ 128) - 128)), zero,
                d * np.float32(((np.int32(w[r, o + 193 + 2 * part]) ^ 128) - 128)), zero)
    if kind == Q3_K:
        o = block * 110
        d = f16_at(w, r, o + 108)
        return (d * np.float32(q3_K_scale(w, r, o + 96, 2 * part)), zero,
                d * np.float32(q3_K_scale(w, r, o + 96, 2 * part + 1)), zero)
    # Q2_K: scales byte j = (4-bit min << 4) | 4-bit scale of values 16j..16j+15
    o = block * 84
    d = f16_at(w, r, o + 80)
    dmin = f16_at(w, r, o + 82)
    packed0 = np.int32(w[r, o + 2 * part])
    packed1 = np.int32(w[r, o + 2 * part + 1])
    return (d * np.float32(packed0 & 15), dmin * np.float32(packed0 >> 4),
            d * np.float32(packed1 & 15), dmin * np.float32(packed1 >> 4))


@cuda.jit(device=True)
def unit_unpack(kind, w, r, u, q):
    """q[0..31] = the integers of unit u of row r (q: an int32 array of 32, the thread's own). One call per unit
    with the bytes read inline: in the simulator every device-function call costs ~0.1 ms."""
    if kind == Q4_0 or kind == Q4_1:
        o = u * 18 + 2 if kind == Q4_0 else u * 20 + 4
        offset = 8 if kind == Q4_0 else 0
        for j in range(16):
            b = np.int32(w[r, o + j])
            q[j] = (b & 15) - offset
            q[j + 16] = (b >> 4) - offset
    elif kind == Q5_0 or kind == Q5_1:
        h = u * 22 + 2 if kind == Q5_0 else u * 24 + 4
        offset = 16 if kind == Q5_0 else 0
        for j in range(16):
            b = np.int32(w[r, h + 4 + j])
            # bit i of the little-endian uint32 qh is the fifth bit of value i
            low_high = (np.int32(w[r, h + j // 8]) >> (j % 8)) & 1
            high_high = (np.int32(w[r, h + 2 + j // 8]) >> (j % 8)) & 1
            q[j] = ((b & 15) | (low_high << 4)) - offset
            q[j + 16] = ((b >> 4) | (high_high << 4)) - offset
    elif kind == Q8_0:
        for i in range(32):
            q[i] = (np.int32(w[r, u * 34 + 2 + i]) ^ 128) - 128
    else:
        block = u // 8
        part = u - block * 8          # which 32 of the super-block's 256 values
        if kind == Q4_K:
            o = block * 144 + 16 + 32 * (part // 2)
            shift = 4 * (part % 2)
            for i in range(32):
                q[i] = (np.int32(w[r, o + i]) >> shift) & 15
        elif kind == Q5_K:
            o = block * 176
            shift = 4 * (part % 2)
            for i in range(32):
                nibble = (np.int32(w[r, o + 48 + 32 * (part // 2) + i]) >> shift) & 15
                q[i] = nibble | (((np.int32(w[r, o + 16 + i]) >> part) & 1) << 4)
        elif kind == Q6_K:
            o = block * 210
            n = part // 4             # which 128 of the super-block
            quarter = part - 4 * n
            shift = 4 * (quarter // 2)
            for i in range(32):
                low = (np.int32(w[r, o + 64 * n + 32 * (quarter % 2) + i]) >> shift) & 15
                high = (np.int32(w[r, o + 128 + 32 * n + i]) >> (2 * quarter)) & 3
                q[i] = (low | (high << 4)) - 32
        elif kind == Q3_K:
            o = block * 110
            n = part // 4
            shift = part - 4 * n
            for i in range(32):
                bits = (np.int32(w[r, o + 32 + 32 * n + i]) >> (2 * shift)) & 3
                has_high = (np.int32(w[r, o + i]) >> (4 * n + shift)) & 1
                q[i] = bits - 4 + 4 * has_high
        else:  # Q2_K
            n = part // 4
            shift = part - 4 * n
            for i in range(32):
                q[i] = (np.int32(w[r, block * 84 + 16 + 32 * n + i]) >> (2 * shift)) & 3


@cuda.jit(device=True)
def float_value(kind, w, r, j):
    """Value j of row r of a float matrix (float32 array for F32, uint16 bit patterns for F16/BF16)."""
    if kind == F32:
        return np.float32(w[r, j])
    if kind == F16:
        return half_to_float(w[r, j])
    return bf16_to_float(w[r, j])
