"""Matrix products on the device, on the weights' own blocks: y[t, r] = x[t] . W[r] (+ bias[r]).

* Decode (a few tokens): ``matvec_kernel(kind)`` (launched by ``launch_matvec``), one warp per (token, weight
  row), its lanes striding over the row's 32-value units (``matvec_kernel_v1``, the first version, gave each item
  a block; it stays for A/B runs and for matrices whose rows are not aligned for the new one's loads). Each unit
  is an exact integer dot product of the weight's quants with the activation's (quantized to q8_0 / q8_1 / q8_K
  by quantize.py, as the CPU does), scaled as ggml scales it:

      legacy (q8_0 / q8_1 activations):  d_w * d_x * (q_w . q_x)  [+ m_w * s_x for q4_1 / q5_1]
      K-quants (q8_K activations):       d_x * sum_h (d_h * (q_w . q_x)_h - m_h * bsum_h)   (h: the halves of 16)

  then the warp's partial sums meet through shuffles (v1: the block's, in a shared-memory tree). Every (token,
  row) is computed alone, in an order fixed by the row's width, so the numbers of a token do not depend on the
  batch it came in (model/batching.py relies on that).
* f32 / f16 / bf16 weights: float dot products with the activations rounded to the weights' precision.
* Prompts (many tokens): ``dequantize_kernel(kind)`` writes float32 tiles of W, multiplied in gemm.py.

One kernel per kind: the kind is a constant of the kernel's closure, so each compiles to its own layout.
"""
from __future__ import annotations

import numpy as np

from . import blocks
from .blocks import (K_QUANTS, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, float_value, unit_params,
                     unit_unpack)
from .runtime import MAX_THREADS, import_cuda, launch_shape, simulated

cuda = import_cuda()


@cuda.jit(device=True)
def block_sum(partial, value):
    """Sum ``value`` over the block's threads (a power of two of them) through the shared array ``partial``;
    every thread gets the total. The tree's order is fixed, so the result does not depend on timing."""
    t = cuda.threadIdx.x
    partial[t] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if t < stride:
            partial[t] += partial[t + stride]
        cuda.syncthreads()
        stride //= 2
    total = partial[0]
    cuda.syncthreads()       # partial is reused by the next call
    return total


_matvec_cache: dict = {}
_dequantize_cache: dict = {}


def matvec_kernel_v1(kind: int):
    """The first mat-vec kernel (one block per item, a local array per unit; kept for A/B runs, see
    benchmarks/gpu_probe.py) of a quantized ``kind``: (w uint8 [n_rows, row_bytes], xq int8 [n, k], xd float32
    [n, k/32 or k/256], xs float32 [n, k/32] (q8_1 sums) or int32 [n, k/16] (q8_K bsums), bias float32 [n_rows]
    or [0], out float32 [n, n_rows])."""
    if ("v1", kind) in _matvec_cache:
        return _matvec_cache["v1", kind]
    k_quant = kind in K_QUANTS
    has_min = kind in (blocks.Q4_1, blocks.Q5_1)

    @cuda.jit
    def kernel(w, xq, xd, xs, bias, out):
        partial = cuda.shared.array(MAX_THREADS, np.float32)
        q = cuda.local.array(32, np.int32)
        n_tokens = xq.shape[0]
        n_rows = w.shape[0]
        n_units = xq.shape[1] // 32
        for item in range(cuda.blockIdx.x, n_tokens * n_rows, cuda.gridDim.x):
            t = item // n_rows
            r = item - t * n_rows
            acc = np.float32(0.0)
            for u in range(cuda.threadIdx.x, n_units, cuda.blockDim.x):
                d0, m0, d1, m1 = unit_params(kind, w, r, u)
                unit_unpack(kind, w, r, u, q)
                dot0 = 0
                dot1 = 0
                for i in range(16):
                    dot0 += q[i] * np.int32(xq[t, 32 * u + i])
                    dot1 += q[i + 16] * np.int32(xq[t, 32 * u + 16 + i])
                if k_quant:
                    part = d0 * np.float32(dot0) + d1 * np.float32(dot1)
                    part -= m0 * np.float32(xs[t, 2 * u]) + m1 * np.float32(xs[t, 2 * u + 1])
                    acc += xd[t, u // 8] * part
                else:
                    acc += (d0 * xd[t, u]) * np.float32(dot0 + dot1)
                    if has_min:
                        acc -= m0 * xs[t, u]          # m_h is minus the block's m
            total = block_sum(partial, acc)
            if cuda.threadIdx.x == 0:
                out[t, r] = total + bias[r] if bias.shape[0] > 0 else total

    _matvec_cache["v1", kind] = kernel
    return kernel


# --- decode: a warp per (token, row), a lane per 32-value unit --------------------------------------------------
# Why this shape. matvec_kernel_v1 (a block of 32 threads per item, byte loads, a local array per unit, a
# shared-memory tree) reached 60-430 GB/s of an H200's 4800: a warp-wide load costs the L1 a pass per 128-byte line
# it touches, and byte loads at the lanes' 18..210-byte stride pay that ~50 times per unit. Here a lane reads its
# unit 4 bytes at a time (16 where the layout is 16-aligned: q4_K / q5_K weights, the activations; where blocks are
# only 2-aligned, aligned words joined by a funnel shift), computes the unit's integer dot products with dp4a
# (four int8 products an instruction) straight from the packed words, no array in between, and the warp's partial
# sums meet through shuffles: no shared memory, no barrier. launch_matvec puts 4 warps in a block. On the H200
# (benchmarks/gpu_probe.py, one token): q4_0 [13824 x 5120] 446 -> 2357 GB/s, q8_0 [4096 x 4096] 575 -> 2575,
# q6_K [32000 x 5120] 424 -> 1714, q4_K [13824 x 5120] 375 -> 1550, q5_0 [4864 x 896] 279 -> 635.
#
# The integers and each unit's float formula are v1's (above); only the order in which units' terms are summed
# differs: lane l takes units l, l+32, ..., then a fixed shuffle tree. That order depends on nothing but the row
# width, so a row gives the same number whatever the launch (the grid, the number of tokens).
#
# In the simulator (no shuffles, no inline PTX) the same kernel runs with Python stand-ins for the intrinsics and
# the block as one "warp" (SIM_LAUNCH: 2 threads) reduced by block_sum.

WARP = 32
WARPS_PER_BLOCK = 4
_SIMULATED = simulated()
SHUFFLE = not _SIMULATED        # warp shuffles on a GPU; the simulator has none (a block stands for a warp there)

M1 = np.int32(0x01010101)        # the low bit of each byte
M2 = np.int32(0x03030303)
M4 = np.int32(0x0F0F0F0F)        # the low nibble of each byte
BIT4 = np.int32(0x10101010)      # bit 4 of each byte
SPREAD = np.int32(0x02040810)    # (4 bits) * SPREAD & BIT4: bit i of the nibble to bit 4 of byte i
MINUS8 = np.int32(-0x07070708)   # 0xF8F8F8F8: -8 in each byte
MINUS16 = np.int32(-0x0F0F0F10)  # 0xF0F0F0F0: -16 in each byte
LOW16 = np.int32(0xFFFF)


def _device_intrinsics():
    """dp4a, half -> float, a funnel shift and aligned loads at a byte offset of a uint8 / int8 array, as numba-cuda
    intrinsics (inline PTX and LLVM loads that say their alignment, so that 4 and 16 bytes are one instruction)."""
    from llvmlite import ir
    try:
        from numba.cuda import cgutils, types
        from numba.cuda.extending import intrinsic
    except ImportError:                   # numba's own (deprecated) CUDA target
        from numba.core import cgutils, types
        from numba.core.extending import intrinsic
    i16, i32 = ir.IntType(16), ir.IntType(32)

    def asm(builder, text, constraints, result, values):
        fnty = ir.FunctionType(result, [value.type for value in values])
        return builder.call(ir.InlineAsm(fnty, text, constraints), values)

    def int32_args(context, builder, sig, args):
        return [context.cast(builder, value, ty, types.int32) for value, ty in zip(args, sig.args)]

    @intrinsic
    def dp4a(typingctx, a, b, c):
        """c + the sum of the four products of a's and b's signed bytes."""
        def codegen(context, builder, sig, args):
            return asm(builder, "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", i32,
                       int32_args(context, builder, sig, args))
        return types.int32(a, b, c), codegen

    @intrinsic
    def funnel(typingctx, low, high, shift):
        """The 32 bits of (high:low) >> shift (shift 0..32)."""
        def codegen(context, builder, sig, args):
            return asm(builder, "shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r", i32,
                       int32_args(context, builder, sig, args))
        return types.int32(low, high, shift), codegen

    @intrinsic
    def half(typingctx, bits):
        """The float32 of IEEE half bits (the low 16 bits of an integer)."""
        def codegen(context, builder, sig, args):
            value = builder.trunc(context.cast(builder, args[0], sig.args[0], types.int32), i16)
            return asm(builder, "cvt.f32.f16 $0, $1;", "=f,h", ir.FloatType(), [value])
        return types.float32(bits), codegen

    def pointer(context, builder, sig, args, llty):
        array_type, row_type, offset_type = sig.args
        array = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, args[1], row_type, types.intp),
                 context.cast(builder, args[2], offset_type, types.intp)]
        return builder.bitcast(cgutils.get_item_pointer(context, builder, array_type, array, index), llty.as_pointer())

    @intrinsic
    def load16(typingctx, array, row, offset):
        """The uint16 at byte ``offset`` (even) of row ``row``, as int32."""
        def codegen(context, builder, sig, args):
            return builder.zext(builder.load(pointer(context, builder, sig, args, i16), align=2), i32)
        return types.int32(array, row, offset), codegen

    @intrinsic
    def load32(typingctx, array, row, offset):
        """The int32 at byte ``offset`` (a multiple of 4) of row ``row``."""
        def codegen(context, builder, sig, args):
            return builder.load(pointer(context, builder, sig, args, i32), align=4)
        return types.int32(array, row, offset), codegen

    @intrinsic
    def load128(typingctx, array, row, offset):
        """The 4 int32 at byte ``offset`` (a multiple of 16) of row ``row``, one 16-byte load."""
        vector = ir.VectorType(i32, 4)

        def codegen(context, builder, sig, args):
            loaded = builder.load(pointer(context, builder, sig, args, vector), align=16)
            words = [builder.extract_element(loaded, ir.Constant(i32, i)) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, words)
        return types.UniTuple(types.int32, 4)(array, row, offset), codegen

    return dp4a, funnel, half, load16, load32, load128


def _simulated_intrinsics():
    """The same operations in Python, for the simulator."""
    def signed(value):
        value &= 0xFFFFFFFF
        return np.int32(value - (1 << 32) if value >= 1 << 31 else value)

    def dp4a(a, b, c):
        total = int(c)
        for i in range(4):
            total += ((((int(a) >> 8 * i) & 255) ^ 128) - 128) * ((((int(b) >> 8 * i) & 255) ^ 128) - 128)
        return signed(total)

    def funnel(low, high, shift):
        return signed((((int(high) & 0xFFFFFFFF) << 32) | (int(low) & 0xFFFFFFFF)) >> min(int(shift), 32))

    def half(bits):
        return blocks.half_to_float(int(bits) & 0xFFFF)

    def load16(array, row, offset):
        return np.int32((int(array[row, offset]) & 255) | ((int(array[row, offset + 1]) & 255) << 8))

    def load32(array, row, offset):
        return signed(sum((int(array[row, offset + i]) & 255) << (8 * i) for i in range(4)))

    def load128(array, row, offset):
        return (load32(array, row, offset), load32(array, row, offset + 4), load32(array, row, offset + 8),
                load32(array, row, offset + 12))

    return dp4a, funnel, half, load16, load32, load128


dp4a, funnel, half, load16, load32, load128 = _simulated_intrinsics() if _SIMULATED else _device_intrinsics()


@cuda.jit(device=True)
def dot4(a, b, acc):
    """acc + the dot product of 16 signed bytes: four words of ``a`` (a tuple) with four of ``b``."""
    return dp4a(a[3], b[3], dp4a(a[2], b[2], dp4a(a[1], b[1], dp4a(a[0], b[0], acc))))


@cuda.jit(device=True)
def words4(w, r, a):
    """The 4 little-endian words of the 16 bytes at byte ``a`` (even) of row r: 5 aligned loads (the fifth reads
    the fourth again when ``a`` is aligned, so nothing past the 16 bytes' last word is read) and funnel shifts."""
    s = (a & 2) * 8
    b = a - (a & 2)
    w0 = load32(w, r, b)
    w1 = load32(w, r, b + 4)
    w2 = load32(w, r, b + 8)
    w3 = load32(w, r, b + 12)
    w4 = load32(w, r, b + 12 + (s >> 2))
    return funnel(w0, w1, s), funnel(w1, w2, s), funnel(w2, w3, s), funnel(w3, w4, s)


@cuda.jit(device=True)
def words8(w, r, a):
    """words4 of 32 bytes: 9 aligned loads."""
    s = (a & 2) * 8
    b = a - (a & 2)
    w0 = load32(w, r, b)
    w1 = load32(w, r, b + 4)
    w2 = load32(w, r, b + 8)
    w3 = load32(w, r, b + 12)
    w4 = load32(w, r, b + 16)
    w5 = load32(w, r, b + 20)
    w6 = load32(w, r, b + 24)
    w7 = load32(w, r, b + 28)
    w8 = load32(w, r, b + 28 + (s >> 2))
    return ((funnel(w0, w1, s), funnel(w1, w2, s), funnel(w2, w3, s), funnel(w3, w4, s)),
            (funnel(w4, w5, s), funnel(w5, w6, s), funnel(w6, w7, s), funnel(w7, w8, s)))


@cuda.jit(device=True)
def aligned4(w, r, a):
    """The 4 words at byte ``a`` (a multiple of 4)."""
    return load32(w, r, a), load32(w, r, a + 4), load32(w, r, a + 8), load32(w, r, a + 12)


@cuda.jit(device=True)
def nibbles(q, shift):
    """Bits shift..shift+3 of each byte of the 4 words q."""
    return (((q[0] >> shift) & M4), ((q[1] >> shift) & M4), ((q[2] >> shift) & M4), ((q[3] >> shift) & M4))


@cuda.jit(device=True)
def fifth_bits(bits):
    """Bit i (0..3) of ``bits`` to bit 4 of byte i."""
    return ((bits & 15) * SPREAD) & BIT4


@cuda.jit(device=True)
def with_fifth_bits(q, qh):
    """Nibble words q with the fifth bits of their 16 values from bits 0..15 of qh (q5_0 / q5_1)."""
    return (q[0] | fifth_bits(qh), q[1] | fifth_bits(qh >> 4), q[2] | fifth_bits(qh >> 8), q[3] | fifth_bits(qh >> 12))


@cuda.jit(device=True)
def crumbs(q, shift, hi, hi_shift, hi_mask, hi_to):
    """Bits shift, shift+1 (q3_K) or shift..shift+3 (q6_K: hi_mask M2, hi_to 4) of each byte of words q, with the
    bits hi_shift.. of the words hi (masked by hi_mask) above them at bit hi_to."""
    mask = M2 if hi_to == 2 else M4
    return ((((q[0] >> shift) & mask) | (((hi[0] >> hi_shift) & hi_mask) << hi_to)),
            (((q[1] >> shift) & mask) | (((hi[1] >> hi_shift) & hi_mask) << hi_to)),
            (((q[2] >> shift) & mask) | (((hi[2] >> hi_shift) & hi_mask) << hi_to)),
            (((q[3] >> shift) & mask) | (((hi[3] >> hi_shift) & hi_mask) << hi_to)))


@cuda.jit(device=True)
def legacy_unit(kind, w, r, u, xa, xb):
    """(d, m, q_w . q_x) of legacy unit (block) u of row r against the activation words xa (values 0..15) and xb
    (16..31); m is minus the block's min (q4_1 / q5_1), 0 otherwise."""
    zero = np.float32(0.0)
    if kind == Q4_0:
        o = 18 * u
        q = words4(w, r, o + 2)
        dot = dot4(nibbles(q, 0), xa, dot4(nibbles(q, 4), xb, np.int32(0)))
        return half(load16(w, r, o)), zero, dot4((MINUS8, MINUS8, MINUS8, MINUS8), xa,
                                                  dot4((MINUS8, MINUS8, MINUS8, MINUS8), xb, dot))
    if kind == Q4_1:
        o = 20 * u
        dm = load32(w, r, o)
        q = aligned4(w, r, o + 4)
        return half(dm), -half(dm >> 16), dot4(nibbles(q, 0), xa, dot4(nibbles(q, 4), xb, np.int32(0)))
    if kind == Q5_0:
        o = 22 * u
        qh, q0, q1, q2 = words4(w, r, o + 2)
        q = (q0, q1, q2, load16(w, r, o + 18) | (load16(w, r, o + 20) << 16))
        dot = dot4(with_fifth_bits(nibbles(q, 0), qh), xa, dot4(with_fifth_bits(nibbles(q, 4), qh >> 16), xb,
                                                                   np.int32(0)))
        return half(load16(w, r, o)), zero, dot4((MINUS16, MINUS16, MINUS16, MINUS16), xa,
                                                  dot4((MINUS16, MINUS16, MINUS16, MINUS16), xb, dot))
    if kind == Q5_1:
        o = 24 * u
        dm = load32(w, r, o)
        qh = load32(w, r, o + 4)
        q = aligned4(w, r, o + 8)
        return half(dm), -half(dm >> 16), dot4(with_fifth_bits(nibbles(q, 0), qh), xa,
                                               dot4(with_fifth_bits(nibbles(q, 4), qh >> 16), xb, np.int32(0)))
    # Q8_0
    o = 34 * u
    qa, qb = words8(w, r, o + 2)
    return half(load16(w, r, o)), zero, dot4(qa, xa, dot4(qb, xb, np.int32(0)))


@cuda.jit(device=True)
def scale_min_4(w, r, o, part):
    """(scale, min) of sub-block ``part`` of the q4_K / q5_K super-block at byte o: blocks.scale_min_k4 from words."""
    if part < 4:
        shift = 8 * part
        return (load32(w, r, o + 4) >> shift) & 63, (load32(w, r, o + 8) >> shift) & 63
    shift = 8 * (part - 4)
    packed = load32(w, r, o + 12) >> shift
    return ((packed & 15) | (((load32(w, r, o + 4) >> shift) >> 2) & 48),
            ((packed >> 4) & 15) | (((load32(w, r, o + 8) >> shift) >> 2) & 48))


@cuda.jit(device=True)
def k_quant_unit(kind, w, r, u, xa, xb, bsum0, bsum1):
    """(d_0, m_0, d_1, m_1, dot_0, dot_1) of K-quant unit u (values 32u..32u+31) of row r, as blocks.unit_params
    and the halves' integer dot products (bsum_h: the activation sums of the halves, for the offsets of q3_K / q6_K)."""
    zero = np.float32(0.0)
    block = u // 8
    part = u - block * 8             # which 32 of the super-block's 256 values
    n = part // 4                    # q2_K / q3_K / q6_K: which 128 of them
    quarter = part - 4 * n
    if kind == Q4_K or kind == Q5_K:
        o = block * (144 if kind == Q4_K else 176)
        dm = load32(w, r, o)
        scale, minimum = scale_min_4(w, r, o, part)
        d1 = half(dm) * np.float32(scale)
        m1 = half(dm >> 16) * np.float32(minimum)
        shift = 4 * (part % 2)
        if kind == Q4_K:
            qa = nibbles(load128(w, r, o + 16 + 32 * (part // 2)), shift)
            qb = nibbles(load128(w, r, o + 32 + 32 * (part // 2)), shift)
        else:
            qa = crumbs(load128(w, r, o + 48 + 32 * (part // 2)), shift, load128(w, r, o + 16), part, M1, 4)
            qb = crumbs(load128(w, r, o + 64 + 32 * (part // 2)), shift, load128(w, r, o + 32), part, M1, 4)
        return d1, m1, d1, m1, dot4(qa, xa, np.int32(0)), dot4(qb, xb, np.int32(0))
    if kind == Q6_K:
        o = block * 210
        d = half(load16(w, r, o + 208))
        scales = load16(w, r, o + 192 + 2 * part)
        qla, qlb = words8(w, r, o + 64 * n + 32 * (quarter % 2))
        qha, qhb = words8(w, r, o + 128 + 32 * n)
        shift = 4 * (quarter // 2)
        dot0 = dot4(crumbs(qla, shift, qha, 2 * quarter, M2, 4), xa, np.int32(0)) - 32 * bsum0
        dot1 = dot4(crumbs(qlb, shift, qhb, 2 * quarter, M2, 4), xb, np.int32(0)) - 32 * bsum1
        return (d * np.float32(((scales & 255) ^ 128) - 128), zero,
                d * np.float32((((scales >> 8) & 255) ^ 128) - 128), zero, dot0, dot1)
    if kind == Q3_K:
        o = block * 110
        d = half(load16(w, r, o + 108))
        low = load16(w, r, o + 96 + 2 * quarter) >> (4 * n)       # blocks.q3_K_scale of 2 part and 2 part + 1
        high = load16(w, r, o + 104 + 2 * (part % 2)) >> (2 * (part // 2))
        scale0 = ((low & 15) | ((high & 3) << 4)) - 32
        scale1 = (((low >> 8) & 15) | (((high >> 8) & 3) << 4)) - 32
        qa, qb = words8(w, r, o + 32 + 32 * n)
        ha, hb = words8(w, r, o)
        dot0 = dot4(crumbs(qa, 2 * quarter, ha, 4 * n + quarter, M1, 2), xa, np.int32(0)) - 4 * bsum0
        dot1 = dot4(crumbs(qb, 2 * quarter, hb, 4 * n + quarter, M1, 2), xb, np.int32(0)) - 4 * bsum1
        return d * np.float32(scale0), zero, d * np.float32(scale1), zero, dot0, dot1
    # Q2_K: scales byte j = (4-bit min << 4) | 4-bit scale of values 16j..16j+15
    o = block * 84
    dm = load32(w, r, o + 80)
    packed = load32(w, r, o + 4 * (part // 2)) >> (16 * (part % 2))
    d = half(dm)
    dmin = half(dm >> 16)
    shift = 2 * quarter
    qa = aligned4(w, r, o + 16 + 32 * n)
    qb = aligned4(w, r, o + 32 + 32 * n)
    qa = ((qa[0] >> shift) & M2, (qa[1] >> shift) & M2, (qa[2] >> shift) & M2, (qa[3] >> shift) & M2)
    qb = ((qb[0] >> shift) & M2, (qb[1] >> shift) & M2, (qb[2] >> shift) & M2, (qb[3] >> shift) & M2)
    return (d * np.float32(packed & 15), dmin * np.float32((packed >> 4) & 15),
            d * np.float32((packed >> 8) & 15), dmin * np.float32((packed >> 12) & 15),
            dot4(qa, xa, np.int32(0)), dot4(qb, xb, np.int32(0)))


@cuda.jit(device=True)
def warp_sum(value):
    """The sum of ``value`` over the warp's 32 lanes, in lane 0 (a fixed tree: 16, 8, 4, 2, 1 apart)."""
    offset = WARP // 2
    while offset > 0:
        value += cuda.shfl_down_sync(0xFFFFFFFF, value, offset)
        offset //= 2
    return value


@cuda.jit(device=True)
def warp_layout(thread, block, threads):
    """(lane, lanes, warps a block, first item) of the kernels that give each item a warp (the mat-vec's rows,
    attention's keys, the q8_0 quantizer's blocks): on a GPU a warp per item and blocks of whole warps; in the
    simulator the block stands for a warp. Its items are first, first + grid * warps, ... Takes the thread's
    indices as arguments: numba's simulator wants a device function that reads ``cuda.`` beside its kernels (see
    ops.block_combine), and this one serves three modules."""
    if SHUFFLE:
        warps = threads // WARP
        return thread % WARP, WARP, warps, block * warps + thread // WARP
    return thread, threads, 1, block


def matvec_kernel(kind: int):
    """The mat-vec kernel of a quantized ``kind``: (w uint8 [n_rows, row_bytes], xq int8 [n, k], xd float32
    [n, k/32 or k/256], xs float32 [n, k/32] (q8_1 sums) or int32 [n, k/16] (q8_K bsums), bias float32 [n_rows]
    or [0], out float32 [n, n_rows]). On a GPU its blocks must be whole warps (launch_matvec: 4); w's rows and xq
    16-byte aligned (device arrays are; launch_matvec checks)."""
    if kind in _matvec_cache:
        return _matvec_cache[kind]
    k_quant = kind in K_QUANTS
    has_min = kind in (blocks.Q4_1, blocks.Q5_1)
    partial_size = 1 if SHUFFLE else MAX_THREADS

    @cuda.jit
    def kernel(w, xq, xd, xs, bias, out):
        partial = cuda.shared.array(partial_size, np.float32)   # the simulator's block_sum only
        lane, width, warps, first = warp_layout(cuda.threadIdx.x, cuda.blockIdx.x, cuda.blockDim.x)
        n_tokens = xq.shape[0]
        n_rows = w.shape[0]
        n_units = xq.shape[1] // 32
        for item in range(first, n_tokens * n_rows, cuda.gridDim.x * warps):
            t = item // n_rows
            r = item - t * n_rows
            acc = np.float32(0.0)
            for u in range(lane, n_units, width):
                xa = load128(xq, t, 32 * u)
                xb = load128(xq, t, 32 * u + 16)
                if k_quant:
                    bsum0 = np.int32(xs[t, 2 * u])
                    bsum1 = np.int32(xs[t, 2 * u + 1])
                    d0, m0, d1, m1, dot0, dot1 = k_quant_unit(kind, w, r, u, xa, xb, bsum0, bsum1)
                    part = d0 * np.float32(dot0) + d1 * np.float32(dot1)
                    part -= m0 * np.float32(bsum0) + m1 * np.float32(bsum1)
                    acc += xd[t, u // 8] * part
                else:
                    d, m, dot = legacy_unit(kind, w, r, u, xa, xb)
                    acc += (d * xd[t, u]) * np.float32(dot)
                    if has_min:
                        acc -= m * xs[t, u]          # m is minus the block's min
            total = warp_sum(acc) if SHUFFLE else block_sum(partial, acc)
            if lane == 0:
                out[t, r] = total + bias[r] if bias.shape[0] > 0 else total

    _matvec_cache[kind] = kernel
    return kernel


def _aligned(array, alignment: int) -> bool:
    """Whether a device array's data and rows start at multiples of ``alignment`` bytes (in the simulator: its
    rows, so that it takes the kernel a GPU would)."""
    pointer = 0 if _SIMULATED else array.device_ctypes_pointer.value or 0
    return pointer % alignment == 0 and array.strides[0] % alignment == 0


def launch_matvec(kind: int, w, xq, xd, xs, bias, out, n_tokens: int, n_rows: int, stream=0) -> None:
    """out[t, r] = xq[t] . w[r] (+ bias[r]) with matvec_kernel(kind): a warp per item, 4 warps a block on a GPU
    (in the simulator the launch shape of runtime.launch_shape()). Its loads want the weights' rows at multiples
    of 4 bytes (16 for q4_K / q5_K) and the activations' at 16; a matrix whose rows are not (rows of an odd number
    of 18-byte q4_0 blocks) goes to matvec_kernel_v1."""
    shape = launch_shape()
    n_items = n_tokens * n_rows
    grid, threads = min(n_items, shape.blocks), min(shape.threads, MAX_THREADS)
    if not (_aligned(w, 16 if kind in (Q4_K, Q5_K) else 4) and _aligned(xq, 16)):
        kernel = matvec_kernel_v1(kind)
    else:
        kernel = matvec_kernel(kind)
        if not _SIMULATED:
            threads = WARP * WARPS_PER_BLOCK
            grid = min((n_items + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK, shape.blocks)
    kernel[grid, threads, stream](w, xq, xd, xs, bias, out)


def float_matvec_kernel(kind: int):
    """f32 / f16 / bf16 weights (float32 or uint16 [n_rows, k]) times activations x float32 [n, k], already
    rounded to the weights' precision."""
    if kind in _matvec_cache:
        return _matvec_cache[kind]

    @cuda.jit
    def kernel(w, x, bias, out):
        partial = cuda.shared.array(MAX_THREADS, np.float32)
        n_tokens, k = x.shape
        n_rows = w.shape[0]
        for item in range(cuda.blockIdx.x, n_tokens * n_rows, cuda.gridDim.x):
            t = item // n_rows
            r = item - t * n_rows
            acc = np.float32(0.0)
            for j in range(cuda.threadIdx.x, k, cuda.blockDim.x):
                acc += float_value(kind, w, r, j) * x[t, j]
            total = block_sum(partial, acc)
            if cuda.threadIdx.x == 0:
                out[t, r] = total + bias[r] if bias.shape[0] > 0 else total

    _matvec_cache[kind] = kernel
    return kernel


def dequantize_kernel(kind: int):
    """(w, first, out float32 [n, k]): rows first..first+n-1 of W as float32, bit for bit the CPU's dequantization
    (quant/legacy.py, quant/kquants.py) in the simulator."""
    if kind in _dequantize_cache:
        return _dequantize_cache[kind]
    is_float = kind in (blocks.F32, blocks.F16, blocks.BF16)

    @cuda.jit
    def kernel(w, first, out):
        q = cuda.local.array(32, np.int32)
        n, k = out.shape
        if is_float:
            for item in range(cuda.grid(1), n * k, cuda.gridsize(1)):
                row = item // k
                out[row, item - row * k] = float_value(kind, w, first + row, item - row * k)
            return
        n_units = k // 32
        for item in range(cuda.grid(1), n * n_units, cuda.gridsize(1)):
            row = item // n_units
            u = item - row * n_units
            d0, m0, d1, m1 = unit_params(kind, w, first + row, u)
            unit_unpack(kind, w, first + row, u, q)
            for i in range(16):
                out[row, 32 * u + i] = d0 * np.float32(q[i]) - m0
                out[row, 32 * u + 16 + i] = d1 * np.float32(q[i + 16]) - m1

    _dequantize_cache[kind] = kernel
    return kernel
