"""The block formats, decoded once: one scalar numba ``unpack`` per format, and the helpers every format shares.

An ``unpack`` gives one block as integers plus its float scales, in the order of the values:

* 32-value formats (q4_0 … q8_1): ``unpack_q4_0(src, b, q, table) -> (d, m)`` fills ``q`` (int16[32]) with
  the signed quants; value i = q[i] * d + m, where ``m`` is 0.0 for the formats without a minimum. (Callers that
  must be bit-exact leave ``+ m`` out for those: q * d + 0.0 turns ggml's -0.0 into +0.0.)
* 256-value super-blocks (q2_K … q8_K): ``unpack_q4_K(src, b, q, scales, mins, table) -> (d, dmin)`` fills ``q``
  (int16[256]) and, per 16 values, ``scales`` / ``mins`` (int32[16]); value i = (d * scales[i // 16]) * q[i] -
  dmin * mins[i // 16], which is ggml's dequantize_row_* operation by operation (0.0 mins and dmin subtract +0.0,
  which changes no float).

``src`` is a 1-D uint8 byte array (``half`` and ``int8`` also take an int8 view) of whole blocks, ``b`` the index of
the block (its byte offset, b times the block's size, a constant in each decoder, which LLVM folds into the
addressing: a run-time block size made the generic kernels a third slower), ``table`` ``HALF_TO_FLOAT``. ``unpack_legacy(kind, ...)`` / ``unpack_kquant(kind, ...)`` pick a format by its
code (``LEGACY_CODES`` / ``KQUANT_CODES``): one compiled family kernel serves every format of the family.

Block layouts (ggml-common.h; little-endian, d / m / dmin / s are IEEE halves, byte offsets within the block):

  q4_0  18 B  d 0-1 | qs 2-17                      byte j: low nibble = value j, high = value j + 16; q - 8
  q4_1  20 B  d 0-1 | m 2-3 | qs 4-19              nibbles as q4_0; value = q * d + m
  q5_0  22 B  d 0-1 | qh:u32 2-5 | qs 6-21         bit j of qh = 5th bit of value j; (nibble | bit << 4) - 16
  q5_1  24 B  d 0-1 | m 2-3 | qh 4-7 | qs 8-23     as q5_0 without the offset; value = q * d + m
  q8_0  34 B  d 0-1 | qs:i8 2-33
  q8_1  36 B  d 0-1 | s 2-3 (d * sum(qs), for dot products) | qs:i8 4-35
  q2_K  84 B  scales 0-15 (low nibble: scale, high: min, per 16 values) | qs 16-79 | d 80-81 | dmin 82-83
              qs byte 16 + 32h + l holds the 2-bit quants of values 128h + l + {0, 32, 64, 96} at bits {0-1, 2-3,
              4-5, 6-7}
  q3_K  110 B hmask 0-31 | qs 32-95 (low 2 bits, packed as q2_K's) | scales 96-107 | d 108-109
              bit m of hmask[k] = 3rd bit of value 32m + k (clear: q - 4); 16 six-bit scales biased by 32: low 4
              bits of scale j in byte j % 8 (j < 8 low nibble, else high), top 2 in byte 8 + j % 4 at 2 * (j // 4)
  q4_K  144 B d 0-1 | dmin 2-3 | scales 4-15 (8 six-bit scales + 8 mins, see scale_min_k4) | qs 16-143
              qs byte 16 + 32p + l: low nibble = value 64p + l, high = value 64p + 32 + l
  q5_K  176 B d 0-1 | dmin 2-3 | scales 4-15 | qh 16-47 | qs 48-175
              nibbles as q4_K; 5th bit of value 64p + l in bit 2p of qh[l], of value 64p + 32 + l in bit 2p + 1
  q6_K  210 B ql 0-127 | qh 128-191 | scales:i8 192-207 | d 208-209;  value = d * scale * (q - 32)
              per half h (128 values): ql byte 64h + l = low 4 bits of values 128h + l (low nibble) and + 64
              (high), byte 64h + 32 + l those of + 32 and + 96; qh byte 128 + 32h + l = top 2 bits of values
              128h + l + {0, 32, 64, 96} at bits {0-1, 2-3, 4-5, 6-7}
  q8_K  292 B d:f32 0-3 | qs:i8 4-259 | bsums:i16 260-291 (sums of 16 quants, for dot products)

A layout no file holds, which the loader re-lays a file's q3_K into where the SIMD kernels run it faster
(layouts.q3_K_to_planes; types.MEMORY_ONLY):

  q3_K_planes 110 B  planes 0-95 | scales 96-107 | d 108-109 (q3_K's scales and d, at q3_K's offsets)
              the three-bit quant q = low 2 bits | 3rd bit << 2 (0..7; value q - 4) of value 32 g + l (group g) in
              byte 32 p + l of plane p:   bits  0-2  3-5  6            7
                                  plane 0:      g0   g1   g6 bit 0     g6 bit 1
                                  plane 1:      g2   g3   g6 bit 2     g7 bit 2
                                  plane 2:      g4   g5   g7 bit 0     g7 bit 1
              so six groups take a shift and a mask, two take five operations (q3_K's hmask takes ~5 a group)
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from .types import get_type

F32 = np.float32

# float32 value of every half-float bit pattern, indexed by the pattern: the one fp16 -> fp32 table of the engine
# (exact, as ggml's GGML_FP16_TO_FP32 is).
HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
HALF_TO_FLOAT.setflags(write=False)

# Format codes of the family decoders (compile-time selectors of one kernel per family, not names).
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 = 0, 1, 2, 3, 4, 5
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, Q3_K_PLANES = 0, 1, 2, 3, 4, 5, 6
LEGACY_CODES = {"q4_0": Q4_0, "q4_1": Q4_1, "q5_0": Q5_0, "q5_1": Q5_1, "q8_0": Q8_0, "q8_1": Q8_1}
KQUANT_CODES = {"q2_K": Q2_K, "q3_K": Q3_K, "q4_K": Q4_K, "q5_K": Q5_K, "q6_K": Q6_K, "q8_K": Q8_K,
                "q3_K_planes": Q3_K_PLANES}


# ---------------------------------------------------------------- shared field readers

@njit(cache=True, inline="always")
def half(src, offset, table):
    """The float32 value of the little-endian half at src[offset:offset+2] (uint8 or int8 bytes)."""
    return table[(np.int32(src[offset]) & 0xFF) | ((np.int32(src[offset + 1]) & 0xFF) << 8)]


@njit(cache=True, inline="always")
def u32(src, offset):
    """The little-endian uint32 at src[offset:offset+4]."""
    return (np.uint32(src[offset]) | (np.uint32(src[offset + 1]) << np.uint32(8))
            | (np.uint32(src[offset + 2]) << np.uint32(16)) | (np.uint32(src[offset + 3]) << np.uint32(24)))


@njit(cache=True, inline="always")
def int8(byte):
    """A stored byte (uint8 or int8) read as C's int8_t: a truncating cast, no branch (vectorizes)."""
    return np.int32(np.int8(byte))


@njit(cache=True, inline="always")
def f32(src, offset, table):
    """The little-endian float32 at src[offset:offset+4] (q8_K's d; the f32 row's ``unpack``; ``table`` unused)."""
    return np.uint32(u32(src, offset)).view(np.float32)


@njit(cache=True, inline="always")
def bf16(src, offset, table):
    """The bfloat16 at src[offset:offset+2] as float32 (the upper half of one; ``table`` unused)."""
    return np.uint32((np.uint32(src[offset]) << np.uint32(16)) | (np.uint32(src[offset + 1]) << np.uint32(24))).view(
        np.float32)


@njit(cache=True, inline="always")
def scale_min_k4(j, src, at):
    """The j-th (0..7) 6-bit scale and min of a q4_K / q5_K block from the 12 bytes at src[at:at+12] (ggml's
    get_scale_min_k4): j < 4 whole in the low 6 bits of bytes j (scale) and j + 4 (min); j >= 4: low 4 bits in
    byte j + 4 (scale low nibble, min high nibble), top 2 bits in bits 6-7 of bytes j - 4 (scale) and j (min)."""
    if j < 4:
        return np.int32(src[at + j]) & 63, np.int32(src[at + j + 4]) & 63
    scale = (np.int32(src[at + j + 4]) & 15) | ((np.int32(src[at + j - 4]) >> 6) << 4)
    minimum = (np.int32(src[at + j + 4]) >> 4) | ((np.int32(src[at + j]) >> 6) << 4)
    return scale, minimum


@njit(cache=True, inline="always")
def scale_q3_K(j, src, at):
    """The j-th (0..15) signed scale of a q3_K block from the 12 bytes at src[at:at+12], minus its bias 32."""
    low = (np.int32(src[at + (j % 8)]) >> (4 * (j // 8))) & 0xF
    high = (np.int32(src[at + 8 + (j % 4)]) >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


@njit(cache=True, inline="always")
def nearest_int(v):
    """ggml's nearest_int (q8_K and the K-quant searches), the same bit trick: the mantissa field of float32(v + 1.5 * 2**23), less 2**22.
    That is round half to even for |v| <= 4194303; ggml asserts that range, but release builds compile the assert
    out and awkward blocks do go beyond it (a value divided by a scale that rounded to a tiny half, or by inf),
    where the trick wraps: reproducing the trick itself keeps the clamps that follow seeing what llama.cpp's see.
    A NaN gives 0 (the default NaN's field is 0x400000)."""
    s = F32(v + F32(12582912.0))
    return np.int32((s.view(np.int32) & 0x7FFFFF) - 0x400000)


@njit(cache=True, inline="always")
def round_to_f16(value):
    """float32 ``value`` rounded to IEEE half precision (nearest even, as F16C and GGML_FP32_TO_FP16 round), as a
    float32: what ggml gets when it stores a float as a half and reads it back. The kernels' one scalar half
    rounding (activation scales, the K-quant searches; it takes float64 values too, rounded once); float32 loops
    that must vectorize use ``simd.round_to_half`` (F16C's conversion there and back:
    ``activations.round_to_f16_inplace``, the attention's probabilities) and bytes ``floats.float_to_half_bits``
    (numpy), all equal to it on float32 (tests/test_quant_quantize.py)."""
    v = np.float64(value)
    magnitude = abs(v)
    if magnitude == 0.0 or not math.isfinite(magnitude):
        return F32(value)
    if magnitude >= 65520.0:            # rounds past the largest half (65504)
        return F32(math.copysign(math.inf, v))
    if magnitude < 6.103515625e-05:     # below 2**-14: half subnormals, a fixed quantum of 2**-24
        return F32(np.rint(v * 16777216.0) / 16777216.0)
    _, exponent = math.frexp(magnitude)  # magnitude = m * 2**exponent, 0.5 <= m < 1
    rounded = np.rint(math.ldexp(magnitude, 11 - exponent))   # 11 significant bits
    return F32(math.copysign(math.ldexp(rounded, exponent - 11), v))


# ---------------------------------------------------------------- 32-value formats

@njit(cache=True, inline="always")
def _nibbles(src, at, offset, q):
    for j in range(16):
        byte = np.int16(src[at + j])
        q[j] = (byte & 15) - offset
        q[j + 16] = (byte >> 4) - offset


@njit(cache=True, inline="always")
def _nibbles_fifth_bit(src, at, qh_at, offset, q):
    high_bits = (np.uint32(src[qh_at]) | (np.uint32(src[qh_at + 1]) << 8) | (np.uint32(src[qh_at + 2]) << 16)
                 | (np.uint32(src[qh_at + 3]) << 24))
    for j in range(16):
        byte = np.int16(src[at + j])
        q[j] = ((byte & 15) | np.int16(((high_bits >> j) & 1) << 4)) - offset
        q[j + 16] = ((byte >> 4) | np.int16(((high_bits >> (j + 16)) & 1) << 4)) - offset


@njit(cache=True, inline="always")
def unpack_q4_0(src, b, q, table):
    o = b * 18
    _nibbles(src, o + 2, 8, q)
    return half(src, o, table), F32(0.0)


@njit(cache=True, inline="always")
def unpack_q4_1(src, b, q, table):
    o = b * 20
    _nibbles(src, o + 4, 0, q)
    return half(src, o, table), half(src, o + 2, table)


@njit(cache=True, inline="always")
def unpack_q5_0(src, b, q, table):
    o = b * 22
    _nibbles_fifth_bit(src, o + 6, o + 2, 16, q)
    return half(src, o, table), F32(0.0)


@njit(cache=True, inline="always")
def unpack_q5_1(src, b, q, table):
    o = b * 24
    _nibbles_fifth_bit(src, o + 8, o + 4, 0, q)
    return half(src, o, table), half(src, o + 2, table)


@njit(cache=True, inline="always")
def unpack_q8_0(src, b, q, table):
    o = b * 34
    for j in range(32):
        q[j] = int8(src[o + 2 + j])
    return half(src, o, table), F32(0.0)


@njit(cache=True, inline="always")
def unpack_q8_1(src, b, q, table):
    o = b * 36
    for j in range(32):   # s (bytes 2-3) only serves dot products
        q[j] = int8(src[o + 4 + j])
    return half(src, o, table), F32(0.0)


@njit(cache=True, inline="always")
def unpack_legacy(kind, src, b, q, table):
    """The 32-value format of code ``kind``: (d, m)."""
    if kind == Q4_0:
        return unpack_q4_0(src, b, q, table)
    if kind == Q4_1:
        return unpack_q4_1(src, b, q, table)
    if kind == Q5_0:
        return unpack_q5_0(src, b, q, table)
    if kind == Q5_1:
        return unpack_q5_1(src, b, q, table)
    if kind == Q8_0:
        return unpack_q8_0(src, b, q, table)
    return unpack_q8_1(src, b, q, table)


# ---------------------------------------------------------------- 256-value super-blocks

@njit(cache=True, inline="always")
def unpack_q2_K(src, b, q, scales, mins, table):
    o = b * 84
    for j in range(16):
        packed = np.int32(src[o + j])
        scales[j] = packed & 15
        mins[j] = packed >> 4
    for n in range(2):
        for j in range(4):
            for l in range(32):
                q[128 * n + 32 * j + l] = ((np.int16(src[o + 16 + 32 * n + l])) >> (2 * j)) & 3
    return half(src, o + 80, table), half(src, o + 82, table)


@njit(cache=True, inline="always")
def _q3_K_scales(src, o, scales, mins):
    """q3_K and q3_K_planes: the sixteen six-bit scales less 32 (bytes 96-107), no minimums."""
    for j in range(16):
        scales[j] = scale_q3_K(j, src, o + 96)
        mins[j] = 0


@njit(cache=True, inline="always")
def unpack_q3_K(src, b, q, scales, mins, table):
    o = b * 110
    _q3_K_scales(src, o, scales, mins)
    for n in range(2):
        for j in range(4):
            for l in range(32):
                bits = (np.int16(src[o + 32 + 32 * n + l]) >> (2 * j)) & 3
                has_high = (np.int16(src[o + l]) >> (4 * n + j)) & 1
                q[128 * n + 32 * j + l] = bits - 4 + 4 * has_high
    return half(src, o + 108, table), F32(0.0)


@njit(cache=True, inline="always")
def unpack_q3_K_planes(src, b, q, scales, mins, table):
    o = b * 110
    _q3_K_scales(src, o, scales, mins)
    for l in range(32):
        p0 = np.int16(src[o + l])
        p1 = np.int16(src[o + 32 + l])
        p2 = np.int16(src[o + 64 + l])
        q[l] = (p0 & 7) - 4
        q[32 + l] = ((p0 >> 3) & 7) - 4
        q[64 + l] = (p1 & 7) - 4
        q[96 + l] = ((p1 >> 3) & 7) - 4
        q[128 + l] = (p2 & 7) - 4
        q[160 + l] = ((p2 >> 3) & 7) - 4
        q[192 + l] = (((p0 >> 6) & 3) | ((p1 >> 4) & 4)) - 4
        q[224 + l] = (((p2 >> 6) & 3) | ((p1 >> 5) & 4)) - 4
    return half(src, o + 108, table), F32(0.0)


@njit(cache=True, inline="always")
def _k4_scales(src, o, scales, mins):
    for j in range(8):
        scale, minimum = scale_min_k4(j, src, o + 4)
        scales[2 * j] = scale
        scales[2 * j + 1] = scale
        mins[2 * j] = minimum
        mins[2 * j + 1] = minimum


@njit(cache=True, inline="always")
def unpack_q4_K(src, b, q, scales, mins, table):
    o = b * 144
    _k4_scales(src, o, scales, mins)
    for c in range(4):
        for l in range(32):
            byte = np.int16(src[o + 16 + 32 * c + l])
            q[64 * c + l] = byte & 15
            q[64 * c + 32 + l] = byte >> 4
    return half(src, o, table), half(src, o + 2, table)


@njit(cache=True, inline="always")
def unpack_q5_K(src, b, q, scales, mins, table):
    o = b * 176
    _k4_scales(src, o, scales, mins)
    for c in range(4):
        for l in range(32):
            byte = np.int16(src[o + 48 + 32 * c + l])
            high = np.int16(src[o + 16 + l])
            q[64 * c + l] = (byte & 15) | (((high >> (2 * c)) & 1) << 4)
            q[64 * c + 32 + l] = (byte >> 4) | (((high >> (2 * c + 1)) & 1) << 4)
    return half(src, o, table), half(src, o + 2, table)


@njit(cache=True, inline="always")
def unpack_q6_K(src, b, q, scales, mins, table):
    o = b * 210
    for j in range(16):
        scales[j] = int8(src[o + 192 + j])
        mins[j] = 0
    for n in range(2):
        for l in range(32):
            low_a = np.int16(src[o + 64 * n + l])
            low_b = np.int16(src[o + 64 * n + 32 + l])
            high = np.int16(src[o + 128 + 32 * n + l])
            q[128 * n + l] = ((low_a & 15) | ((high & 3) << 4)) - 32
            q[128 * n + 32 + l] = ((low_b & 15) | (((high >> 2) & 3) << 4)) - 32
            q[128 * n + 64 + l] = ((low_a >> 4) | (((high >> 4) & 3) << 4)) - 32
            q[128 * n + 96 + l] = ((low_b >> 4) | (((high >> 6) & 3) << 4)) - 32
    return half(src, o + 208, table), F32(0.0)


@njit(cache=True, inline="always")
def unpack_q8_K(src, b, q, scales, mins, table):
    o = b * 292
    for j in range(16):   # bsums (bytes 260-291) only serve dot products
        scales[j] = 1
        mins[j] = 0
    for j in range(256):
        q[j] = int8(src[o + 4 + j])
    return f32(src, o, table), F32(0.0)


@njit(cache=True, inline="always")
def unpack_kquant(kind, src, b, q, scales, mins, table):
    """The super-block format of code ``kind``: (d, dmin)."""
    if kind == Q4_K:
        return unpack_q4_K(src, b, q, scales, mins, table)
    if kind == Q6_K:
        return unpack_q6_K(src, b, q, scales, mins, table)
    if kind == Q5_K:
        return unpack_q5_K(src, b, q, scales, mins, table)
    if kind == Q3_K:
        return unpack_q3_K(src, b, q, scales, mins, table)
    if kind == Q2_K:
        return unpack_q2_K(src, b, q, scales, mins, table)
    if kind == Q3_K_PLANES:
        return unpack_q3_K_planes(src, b, q, scales, mins, table)
    return unpack_q8_K(src, b, q, scales, mins, table)


# ---------------------------------------------------------------- to_float: blocks [first, end) -> float32
# Serial and nogil: the type table runs them over bands of blocks on a thread pool (``in_bands``), the BLAS path of
# CPUs without SIMD calls them on its band from its own worker thread. No fastmath: the floats are ggml's.

@njit(cache=True, nogil=True)
def legacy_to_float(kind, src, first, end, out, table):
    q = np.empty(32, np.int16)
    has_min = kind == Q4_1 or kind == Q5_1
    for b in range(first, end):
        d, m = unpack_legacy(kind, src, b, q, table)
        o = (b - first) * 32
        if has_min:
            for j in range(32):
                out[o + j] = F32(q[j]) * d + m
        else:
            for j in range(32):
                out[o + j] = F32(q[j]) * d


@njit(cache=True, nogil=True)
def kquant_to_float(kind, src, first, end, out, table):
    q = np.empty(256, np.int16)
    scales = np.empty(16, np.int32)
    mins = np.empty(16, np.int32)
    for b in range(first, end):
        d, dmin = unpack_kquant(kind, src, b, q, scales, mins, table)
        o = (b - first) * 256
        for j in range(16):
            scale = d * F32(scales[j])
            offset = dmin * F32(mins[j])
            for i in range(16):
                out[o + 16 * j + i] = scale * F32(q[16 * j + i]) - offset


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers(n_threads: int) -> ThreadPoolExecutor:
    """One pool for the process: a pool made per call cost milliseconds, more than a small tensor's work."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n_threads:
            _pool = ThreadPoolExecutor(n_threads, thread_name_prefix="ggml_backend-blocks")
        return _pool


def in_bands(kernel, n_blocks: int, band_blocks: int, *arrays) -> None:
    """Run ``kernel(*arrays, first, end)`` (serial, nogil) over blocks [0, n_blocks) in bands of ``band_blocks``
    on numba.get_num_threads() threads: a prange kernel's speed, but a serial kernel compiles in well under half
    the time of a parallel one (CI compiles every kernel on each fresh clone). The kernels never call back here,
    so the shared pool cannot wait on itself."""
    threads = min(numba.get_num_threads(), -(-n_blocks // band_blocks))
    if threads <= 1:
        kernel(*arrays, 0, n_blocks)
        return
    bounds = list(range(0, n_blocks, band_blocks)) + [n_blocks]
    for _ in _workers(threads).map(lambda band: kernel(*arrays, band[0], band[1]), zip(bounds[:-1], bounds[1:])):
        pass


def read_only(data: np.ndarray) -> np.ndarray:
    """A read-only view of ``data`` (no copy). Kernels always get read-only sources, so numba compiles one
    specialization per kernel instead of one for file mappings and another for writable arrays."""
    if not data.flags.writeable:
        return data
    view = data.view()
    view.flags.writeable = False
    return view


_TO_FLOAT_BAND_VALUES = 1 << 18   # values per thread-pool task: ~0.3 ms of work, far above the pool's overhead


def to_float_function(name: str):
    """The type table's ``to_float`` of format ``name`` (block sizes from its row in ``types``):
    ``to_float(data, out=None, parallel=True)`` takes a whole number of blocks (uint8, 1-D) and returns their
    float32 values (written into ``out`` when given; ``parallel`` False keeps the work on the calling thread, as
    the BLAS path's workers want)."""
    row = get_type(name)
    block_bytes, block_values = row.type_size, row.block_size
    if name in LEGACY_CODES:
        family_kernel, kind = legacy_to_float, LEGACY_CODES[name]
    else:
        family_kernel, kind = kquant_to_float, KQUANT_CODES[name]
    band = max(1, _TO_FLOAT_BAND_VALUES // block_values)

    def to_float(data: np.ndarray, out: np.ndarray | None = None, parallel: bool = True) -> np.ndarray:
        n_blocks = data.size // block_bytes
        if out is None:
            out = np.empty(n_blocks * block_values, np.float32)

        def kernel(src, result, first, end):
            family_kernel(kind, src, first, end, result[first * block_values:], HALF_TO_FLOAT)

        if parallel:
            in_bands(kernel, n_blocks, band, read_only(data), out)
        else:
            kernel(read_only(data), out, 0, n_blocks)
        return out

    to_float.__name__ = to_float.__qualname__ = f"dequantize_{name}"
    return to_float
