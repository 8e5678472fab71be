"""SIMD decode kernels: one activation row (one token) times a weight matrix in a ggml block format.

Decode reads every weight byte once per token, so these kernels decide generation speed. Each is written as
llama.cpp's x86 ``ggml_vec_dot_*`` is: a weight block is expanded to 32 unsigned bytes (nibbles, fifth or sixth
bits OR-ed in), multiplied with the 32 signed activation quants by ``dot_u8_i8`` (``vpdpbusd`` or ``vpmaddubsw``),
the int32 lanes scaled and accumulated in eight float lanes, which are summed once per row. Offsets that make
weights signed (q4_0's -8, q5_0's -16, and -128 for q8_0's signed bytes on VNNI) are exact integer terms: the lane
sums of ``offset * x``, computed once per activation row (``lane_bias``) and starting each block's accumulator, or
for the legacy kinds' one-token rows taken from the block's activations in a register (``_legacy_row_dot``: the
same integers), so each block's integer dot product is exactly ggml's. q4_0 (every path) and q8_0's long rows
(AVX512-VNNI) take row lanes instead: the lanes of a register are weight rows, each row's block summed exactly
(see "rows in lanes"). q2_K, q3_K and q6_K multiply their 16-value scales into ``vpmaddubsw``'s int16 pair sums
(``scaled_dot``: ``vpdpwssd`` or ``vpmaddwd``, as ggml does, no ``vpmulld``), each group's scale words by one
in-half ``vpshufb``; q3_K's -4 and q6_K's -32 are taken off those pair sums, the offset's pair sums with the
activations computed once per activation row (``offset_pairs``), so that each lane holds the same integers on every
path and in the exact GEMM (``gemm_k``, which multiplies q - 4 and q - 32).

A kernel computes a row times one token (``_row_*``) or a tile of TILE tokens (``_tile_*``, which unpacks each
weight block once for all of them, with the same block decoders and per-token steps, so each (row, token) result
is the one-token kernel's bit for bit); ``matvec`` spreads the rows of one or several matrices over numba's threads
in equal chunks, in one launch; ``matmul_few`` does the same for a few tokens, in tiles. ``dequantize_rows``
expands weight rows to float32 for the prompt path with the same block decoders. The ``isa`` argument (see
``simd.py``) picks the instructions and is part of each compiled signature. q2_K, whose 2-bit quants of values l
and 128 + l share a byte, takes both halves of a super-block in one 512-bit register on AVX512-VNNI (``_dots_wide``)
and folds the lanes back to the eight of the 256-bit form, whose integers they equal.

Layouts (bytes of one block; ``d``/``m``/``dmin`` are IEEE halves):
    q4_0  [d | 16 bytes: low nibbles = weights 0..15, high = 16..31]              w = q - 8
    q4_1  [d | m | 16 bytes of nibbles]                                           w = d q + m
    q5_0  [d | qh: u32, bit j = fifth bit of weight j | 16 bytes of nibbles]      w = q - 16
    q5_1  [d | m | qh | 16 bytes of nibbles]                                      w = d q + m
    q8_0  [d | 32 int8]
    q2_K  [16 bytes: scale | min << 4 per 16 | 64 bytes: 2 bits | d | dmin]      256 weights
    q3_K  [32 bytes hmask | 64 bytes: 2 bits | 12 bytes: 16 six-bit scales | d]   w = d (s - 32) (q - 4)
          q3_K_planes (in memory only, quant/layouts.py): [96 bytes: three planes of 3-bit quants | q3_K's scales | d]
    q4_K  [d | dmin | 12 bytes: 8 six-bit scales and mins | 128 bytes of nibbles]
    q5_K  [d | dmin | 12 bytes of scales and mins | 32 bytes: fifth bits | 128 bytes of nibbles]
    q6_K  [128 bytes: low 4 bits | 64 bytes: top 2 bits | 16 int8 scales | d]      w = d s (q - 32)
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.datamodel import models
from numba.core.imputils import lower_constant
from numba.extending import NativeValue, intrinsic, overload, register_model, typeof_impl, unbox

from .simd import (
    IsaType, add_bytes, add_f32x8, add_i32x8, as_bytes, bits_to_bytes, broadcast_scale_word, byte_scale_words,
    bytes_as_i32x16, dot_i8_i8, dot_u8_i8, fma_i32x8, fnma_i32x8, fold_halves_i32x16, group_scale_words,
    high_nibbles_times_pairs, load_16_bytes, load_16_bytes_twice, load_16_i32, load_32_bytes,
    load_64_bytes, load_8_i32, load_f16, load_f16_pair, load_f16_pair_times, load_u32, load_u64, low_nibbles, mul_i32x8,
    offset_pair_sums, or_bytes, pair_scales_i32x8, pairs_scaled_dot, prefetch, prefetch_nta, scale_pair_i32x8,
    scale_qword_halves, scale_word_halves, scaled_dot, shift_left, shift_right_and,
    signed_dot_offset, splat_bytes, spread_scale_pairs, store_32_bytes, store_8_i32, store_dwords, store_halves_f32x8,
    store_scaled, sum_f32x8, to_scale_words, unpack_nibbles, word_dot_8, word_halves_down, zero_f32x8, zero_i32x16,
    zero_i32x8,
)
from .generic import _block_sums_times
from .types import get_type
from .simd import (
    add_i32x16, dot_u8_i8_x64, fifth_bits_x8, five_bit_block_sums_x8, flip_sign_bits, fma_float_lanes, fma_lanes,
    half_sums, has_vnni, lane_rows, load_f16_8_rows, load_f16_rows, load_rows_2x16, load_rows_4x16, load_u32_8_rows,
    nibble_block_sums_x8, prefetch_to_l2, splat_dword_x64, splat_i32, splat_lane_floats,
    store_f32_lanes, times_byte_halves, transpose_dwords, transpose_row_pairs, zero_lanes,
)

_KERNEL = dict(cache=True, error_model="numpy", boundscheck=False)


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
def _q3_K_plane_quants(w, o, g):
    """q3_K_planes (blocks.py draws it): group g's quants 0..7 of the super-block at byte ``o``; groups 0-5 a shift
    and a mask of their plane, 6 and 7 their low two bits from plane 0 or 2 and the third from plane 1."""
    if g < 6:
        return shift_right_and(load_32_bytes(w, o + 32 * (g // 2)), 3 * (g % 2), 7)
    third = shift_right_and(load_32_bytes(w, o + 32), g - 2, 4)      # plane 1's bit 6 (g6) or 7 (g7) to bit 2
    return or_bytes(shift_right_and(load_32_bytes(w, o + (0 if g == 6 else 64)), 6, 3), third)


@njit(nogil=True, **_KERNEL)
def planes_of_q3_K(src, out, first, end):
    """q3_K super-blocks [first, end) of ``src`` re-laid as q3_K_planes into ``out``, 32 bytes at a time by the
    two layouts' decoders (scales and d copied as they are)."""
    for b in range(first, end):
        o = 110 * b
        hmask = load_32_bytes(src, o)
        low = load_32_bytes(src, o + 32)
        high = load_32_bytes(src, o + 64)
        q0, q1 = _q3_K_quants(low, hmask, 0, 0), _q3_K_quants(low, hmask, 2, 1)
        q2, q3 = _q3_K_quants(low, hmask, 4, 2), _q3_K_quants(low, hmask, 6, 3)
        q4, q5 = _q3_K_quants(high, hmask, 0, 4), _q3_K_quants(high, hmask, 2, 5)
        q6, q7 = _q3_K_quants(high, hmask, 4, 6), _q3_K_quants(high, hmask, 6, 7)
        store_32_bytes(out, o, or_bytes(or_bytes(q0, shift_left(q1, 3)), shift_left(shift_right_and(q6, 0, 3), 6)))
        store_32_bytes(out, o + 32, or_bytes(or_bytes(q2, shift_left(q3, 3)), or_bytes(
            shift_left(shift_right_and(q6, 2, 1), 6), shift_left(shift_right_and(q7, 2, 1), 7))))
        store_32_bytes(out, o + 64, or_bytes(or_bytes(q4, shift_left(q5, 3)), shift_left(shift_right_and(q7, 0, 3), 6)))
        for i in range(96, 110):
            out[o + i] = src[o + i]


@njit(inline="always", **_KERNEL)
def _third_bit_at(q, bit):
    return shift_left(shift_right_and(q, 2, 1), bit)


@njit(inline="always", **_KERNEL)
def _low_bits_at(q, shift):
    return shift_left(shift_right_and(q, 0, 3), shift)


@njit(nogil=True, **_KERNEL)
def q3_K_of_planes(src, out, first, end):
    """``planes_of_q3_K``'s inverse: q3_K_planes super-blocks [first, end) of ``src`` back in q3_K's layout."""
    for b in range(first, end):
        o = 110 * b
        q0, q1 = _q3_K_plane_quants(src, o, 0), _q3_K_plane_quants(src, o, 1)
        q2, q3 = _q3_K_plane_quants(src, o, 2), _q3_K_plane_quants(src, o, 3)
        q4, q5 = _q3_K_plane_quants(src, o, 4), _q3_K_plane_quants(src, o, 5)
        q6, q7 = _q3_K_plane_quants(src, o, 6), _q3_K_plane_quants(src, o, 7)
        store_32_bytes(out, o, or_bytes(
            or_bytes(or_bytes(_third_bit_at(q0, 0), _third_bit_at(q1, 1)), or_bytes(_third_bit_at(q2, 2), _third_bit_at(q3, 3))),
            or_bytes(or_bytes(_third_bit_at(q4, 4), _third_bit_at(q5, 5)), or_bytes(_third_bit_at(q6, 6), _third_bit_at(q7, 7)))))
        store_32_bytes(out, o + 32, or_bytes(or_bytes(_low_bits_at(q0, 0), _low_bits_at(q1, 2)),
                                             or_bytes(_low_bits_at(q2, 4), _low_bits_at(q3, 6))))
        store_32_bytes(out, o + 64, or_bytes(or_bytes(_low_bits_at(q4, 0), _low_bits_at(q5, 2)),
                                             or_bytes(_low_bits_at(q6, 4), _low_bits_at(q7, 6))))
        for i in range(96, 110):
            out[o + i] = src[o + i]


@njit(inline="always", **_KERNEL)
def _q3_K_scale_qwords(w, s):
    """q3_K: the 12 scale bytes at ``s`` as two 64-bit words: byte j % 8 of word j // 8 is six-bit scale j plus 32
    (ggml's kmask trick on 64-bit words: bytes 0-7 hold the scales' low four bits, scales 0-7 in the low nibbles and
    8-15 in the high ones; bytes 8-11 their top two bits, scale j's at bits 2 (j // 4) of byte j % 4)."""
    low = load_u64(w, s)
    top = load_u32(w, s + 8)
    nibbles = 0x0F0F0F0F0F0F0F0F
    bits = 0x03030303
    return ((low & nibbles) | (((top & bits) | (((top >> 2) & bits) << 32)) << 4),
            ((low >> 4) & nibbles) | ((((top >> 4) & bits) | (((top >> 6) & bits) << 32)) << 4))


@njit(inline="always", **_KERNEL)
def _q3_K_scale_words(w, s):
    """``_q3_K_scale_qwords`` as four 32-bit words: byte j % 4 of word j // 4 is six-bit scale j plus 32."""
    low, high = _q3_K_scale_qwords(w, s)
    return low & 0xFFFFFFFF, (low >> 32) & 0xFFFFFFFF, high & 0xFFFFFFFF, (high >> 32) & 0xFFFFFFFF


@njit(inline="always", **_KERNEL)
def offset_lanes(offset, values, isa):
    """-offset * the sum of each four of the 32 signed bytes ``values``, in dot_u8_i8's eight lanes: what takes an
    offset back out of a dot product of (w + offset) with the values, started from these lanes."""
    return mul_i32x8(dot_u8_i8(zero_i32x8(), splat_bytes(offset), values, isa), -1)


@njit(inline="always", **_KERNEL)
def minus_128_sums(q, isa):
    """``offset_lanes`` of 128 and the 32 signed quants ``q``: what takes the 128 back out of a dot product of
    x + 128 (unsigned) with q (the tiles of ``_unsigned_x`` kinds, the GEMMs' panels)."""
    return offset_lanes(128, q, isa)


@njit(**_KERNEL)
def lane_bias(xq, offset, isa):
    """int32 [k/32 * 8]: for each 32-value block of ``xq`` the eight lane sums of ``-offset * x`` (the lanes of
    ``dot_u8_i8``), so that ``dot_u8_i8(bias, w + offset, x)`` is the exact dot product of w and x."""
    n_groups = xq.size // 32
    bias = np.empty(n_groups * 8, np.int32)
    for g in range(n_groups):
        store_8_i32(bias, 8 * g, offset_lanes(offset, load_32_bytes(xq, 32 * g), isa))
    return bias


# ----------------------------------------------------------------------------------------------------------------
# Kernels: one weight row times one token (``_row_*``, decode) or times a tile of TILE tokens (``_tile_*``, a few
# tokens: continuous batching, short prompts). Both are built from the same pieces per block format: a decoder that
# unpacks a block (or a 32-value group of a super-block) into unsigned byte quants and its scales, and a step that
# adds one token's dot product with them to that token's accumulators. A tile unpacks each block once and runs
# the step for its tokens; each token keeps its own accumulators, fed in the order the one-token kernel feeds
# them, so a (row, token) result is bit for bit the same alone or in any batch (prompt caching and continuous
# batching rely on it). Only the integer parts are regrouped (exact); every float operation stays per token.
#
# The activation arrays hold all the tokens of a launch: ``xq`` int8 [n_tokens * k] (token t at t * k),
# ``x_scale`` float32 [n_tokens, k / block], ``x_sums`` float32 [n_tokens, k / 32] (q8_1's s: q4_1, q5_1),
# ``x_bsums`` [n_tokens * k / 16] (q8_K's sums per 16: q2_K's, as int16 in ``paired_bsums``' order), ``bias``
# int32 [n_tokens * k / 4] (token t at t * k / 4: the lane biases of ``lane_bias``, q4_K / q5_K's sums per 32 as int16
# (``pair_sums``), q3_K / q6_K's ``offset_pairs``, or on AVX512-VNNI q2_K's activations
# reordered by ``joined_halves``), ``xu``: ``xq`` + 128 as unsigned bytes (the tiles of ``_unsigned_x`` kinds). ``kind``
# is a ``Kind`` (a compile-time constant), so each kind's branches fold away.
# ----------------------------------------------------------------------------------------------------------------

# Tokens per tile. 4 keeps a tile's accumulators (two chains for q5_0: 8 vectors) and the unpacked block
# in AVX2's 16 vector registers; the tiles are written out for 4, and a ``TileSize`` constant drops the last
# tokens' steps for the tiles of 2 and 3. q8_0 on AVX2 also has tiles of 8 (``_eight_token_tiles``).
TILE = 4

# Kernel selectors: ``KIND_ARGS[KINDS[type]]`` is the ``kind`` argument of ``matvec`` / ``matmul_few``, the int
# code that of ``dequantize_rows``.
KINDS = {"q4_0": 0, "q4_1": 1, "q5_0": 2, "q5_1": 3, "q8_0": 4, "q2_K": 5, "q3_K": 6, "q4_K": 7, "q5_K": 8, "q6_K": 9,
         "q3_K_planes": 10}

# A layout no file holds (types.MEMORY_ONLY) runs its file type's kernels, told apart by a second constant, the
# layout, which only its block decoders read (``kind_layout``): (kernel code, layout) of each such selector.
Q3_K_PLANES = 1
_RELAID_KINDS = {"q3_K_planes": (KINDS["q3_K"], Q3_K_PLANES)}


class KernelConstant:
    """An integer that the kernels take as a compile-time constant: its numba type carries the value, so each value
    gets its own compiled (and cached) kernels, in which the branches for other values are constant-folded away,
    as ``simd.Isa`` does for instruction sets. ``Kind`` and ``TileSize`` are the two uses."""

    label = "constant"

    def __init__(self, code: int, name: str, layout: int = 0):
        self.code = code
        self.name = name
        self.layout = layout
        self._type = None

    @property
    def _numba_type_(self):
        if self._type is None:
            self._type = ConstantType(self.label, self.code, self.layout)
        return self._type

    def __getstate__(self):
        # as Isa's: without the numba type made on first use (numba's cache keys a kernel that closes over constants
        # on their pickled bytes, and a type's fields include a per-process serial number)
        return {**self.__dict__, "_type": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Kind(KernelConstant):
    """A block format (``KIND_ARGS[KINDS[name]]``). (A run-time kind made one kernel holding every type's code:
    with tiles, numba took minutes and gigabytes to compile it.)"""

    label = "kind"


class TileSize(KernelConstant):
    """The number of tokens of a tile (1 .. TILE): a tile function is written once for TILE tokens and each size gets
    its own compiled copy in which the steps of the absent tokens are constant-folded away (tiles of 2 and 3
    tokens take the N mod TILE leftovers)."""

    label = "tile_size"


class ConstantType(types.Dummy):
    def __init__(self, label: str, code: int, layout: int = 0):
        self.label = label
        self.code = code
        self.layout = layout
        super().__init__(name=f"{label}[{code}]" if layout == 0 else f"{label}[{code}_{layout}]")


@typeof_impl.register(KernelConstant)
def _typeof_constant(value, context):
    return value._numba_type_


register_model(ConstantType)(models.OpaqueModel)


@lower_constant(ConstantType)
def _lower_constant(context, builder, typ, value):
    # a module-level constant named in a kernel (``_Q4_0``, ``_TILE_4`` ...): its value is its type
    return context.get_dummy_value()


@unbox(ConstantType)
def _unbox_constant(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


def _kind_arg(name: str, code: int) -> Kind:
    kernel_code, layout = _RELAID_KINDS.get(name, (code, 0))
    return Kind(kernel_code, name, layout)


KIND_ARGS = [_kind_arg(name, code) for name, code in sorted(KINDS.items(), key=lambda item: item[1])]


def _constant_reader(label: str, field: str = "code"):
    @intrinsic
    def read(typingctx, constant):
        if not isinstance(constant, ConstantType) or constant.label != label:
            return None
        code = getattr(constant, field)

        def codegen(context, builder, sig, args):
            return ir.IntType(64)(code)
        return types.int64(constant), codegen
    return read


#: the code (``KINDS``) of a ``Kind`` / the token count of a ``TileSize``, as constants of the compiled kernel
kind_code = _constant_reader("kind")
#: the layout of a ``Kind``: 0 for a file's, Q3_K_PLANES for q3_K_planes
kind_layout = _constant_reader("kind", "layout")
tile_size = _constant_reader("tile_size")


# Legacy quants (blocks of 32): q4_0 (kind 0), q4_1 (1), q5_0 (2), q5_1 (3), q8_0 (4)

# How far ahead in the weight bytes the one-token and few-token kernels ask for the next lines of their rows (every
# kind): the hardware prefetcher alone does not keep up with them. On a Zen 3 rows from memory ran at half their
# speed from cache without it (one core, 896 x 4864: q8_0 7.2 against 15.1 GB/s, q6_K 5.2 against 15.0); q4_K
# 9.8-10.7 -> 11.3-12.2 GB/s with it (three alternating runs). On a 2-core Sapphire Rapids VM (5 December 2026)
# q4_1, q5_1, q2_K and q3_K, which did not ask yet, ran at a third of their speed from cache; with it, one core
# 4096 x 4096, two alternating rounds: q4_1 4.3-4.4 -> 11.9-12.4 GB/s, q2_K 3.7-3.8 -> 9.6-9.7, q3_K 7.6-7.8 ->
# 10.3-10.7 (q4_0, q4_K unchanged). Asked for by ``prefetchnta`` (into L1, as little of the other levels as the CPU
# allows; ``prefetcht0`` before): the activations and their block terms stay in L1 beside the stream. One Zen 4 core,
# 4096 x 4096 (bench_kernels, two alternating rounds): q8_0 25.7-26.8 -> 28.3-29.9 GB/s, q6_K 22.0-23.9 -> 24.8-25.5,
# q4_K 19.6-20.1 -> 20.2-21.3, q5_0 17.7-18.1 -> 17.9-18.8, q4_0 and q4_1 unchanged; Qwen2.5-0.5B q4_K_M decode on
# two threads beside llama.cpp in one process (bench --paired, two rounds each) 67.3-68.0 -> 72.1-73.7 tok/s.
_STREAM_AHEAD = 2048

@njit(inline="always", **_KERNEL)
def _prefetch_ahead(w, o, n_lines):
    """Ask for the ``n_lines`` cache lines ``_STREAM_AHEAD`` bytes past byte ``o`` of ``w`` (n_lines: a constant
    per kernel, the lines one block or super-block spans)."""
    for line in range(n_lines):
        prefetch_nta(w, o + _STREAM_AHEAD + 64 * line)


@njit(**_KERNEL)
def _legacy_block(kind, w, row, b):
    """Block ``b`` of the row at byte ``row``: (32 quants as bytes, d, m); m is 0 for the kinds without one. The
    lane kinds: q4_1, q5_0, q5_1 (these three on AVX512-VNNI; row lanes on the 256-bit paths), q8_0 (q4_0 takes
    the row lanes on every path)."""
    kc = kind_code(kind)
    # d (and m) by ``load_f16_pair``: one plain load (the kinds with one scale read the block's next two bytes too)
    if kc == 1:
        o = row + 20 * b
        _prefetch_ahead(w, o, 1)
        d, m = load_f16_pair(w, o)
        return _q4_quants(w, o + 4), d, m
    if kc == 2:
        o = row + 22 * b
        _prefetch_ahead(w, o, 1)
        return _q5_quants(w, o + 2), load_f16_pair(w, o)[0], np.float32(0.0)
    if kc == 3:
        o = row + 24 * b
        _prefetch_ahead(w, o, 1)
        d, m = load_f16_pair(w, o)
        return _q5_quants(w, o + 4), d, m
    o = row + 34 * b
    _prefetch_ahead(w, o, 1)
    return load_32_bytes(w, o + 2), load_f16_pair(w, o)[0], np.float32(0.0)


@njit(**_KERNEL)
def _legacy_dot(kind, acc, q, scale, xv, lanes, isa):
    """acc + float(exact dot of block quants ``q`` with the block's 32 activations ``xv``, in dot_u8_i8's lanes)
    * scale. The offset kinds (q5_0 -16, q8_0's signed bytes on VNNI) start from ``lanes``, the
    ``offset_lanes`` of their offset and ``xv`` (zeros where ``_legacy_offset`` is 0)."""
    kc = kind_code(kind)
    if kc == 4:
        dot = dot_i8_i8(lanes, q, xv, isa)
    elif kc == 1 or kc == 3:
        dot = dot_u8_i8(zero_i32x8(), q, xv, isa)
    else:
        dot = dot_u8_i8(lanes, q, xv, isa)
    return fma_i32x8(acc, dot, scale)


@njit(**_KERNEL)
def _legacy_offset(kind, isa):
    """What ``lane_bias`` takes out of a legacy kind's dot products: q5_0's 16, q8_0's ``signed_dot_offset`` (128
    on VNNI, 0 on AVX2); 0 for q4_1 / q5_1 (their minimums are separate terms)."""
    kc = kind_code(kind)
    return 16 if kc == 2 else signed_dot_offset(isa) if kc == 4 else 0


@njit(**_KERNEL)
def _legacy_row_dot(kind, acc, q, scale, xq, x, isa):
    """``_legacy_dot`` for the one-token kernel: the offset kinds' lanes are computed from the block's own 32
    activations, already in a register, instead of loaded from the ``bias`` array (the same integers). That
    array is as large as the activations, and the two together (2 k bytes) no longer stayed in a 32 KiB L1 beside
    the streaming weights from k = 11008 on (7B models' ffn_down): q4_0 per core fell from 14-15 to 7 GB/s there
    on a Zen 4. (The one offset kind on AVX2, q5_0, takes the row lanes there.)"""
    xv = load_32_bytes(xq, x)
    offset = _legacy_offset(kind, isa)
    lanes = zero_i32x8() if offset == 0 else offset_lanes(offset, xv, isa)
    return _legacy_dot(kind, acc, q, scale, xv, lanes, isa)


@njit(inline="always", **_KERNEL)
def _row_block_dot(kind, acc, q, scale, xq, x, bias, g, isa):
    """``_legacy_row_dot``, or for the offset kinds with the block's lanes loaded from ``bias`` at g where the
    caller has them (``_one_token_terms``: rows up to STORED_LANES_MAX_K values): one load instead of a ``vpdpbusd``
    and a ``vpsubd`` on the pipes that also take the block's dot product, conversion and fused add. Kinds without an
    offset keep their zero lanes in a register (a few-token launch hands them a zeroed ``bias``)."""
    if _legacy_offset(kind, isa) != 0 and bias.size:
        return _legacy_dot(kind, acc, q, scale, load_32_bytes(xq, x), load_8_i32(bias, g), isa)
    return _legacy_row_dot(kind, acc, q, scale, xq, x, isa)


@njit(inline="always", **_KERNEL)
def _row_legacy(kind, w, start, xq, k, x_scale, x_sums, bias, t, isa):
    """Row ``start`` of a lane kind times token t; ``bias``: the tokens' ``lane_bias`` of the offset kinds (q5_0,
    q8_0 on VNNI; token t at t * k / 4), or empty, and then each block's lanes come from its activations
    (``_legacy_row_dot``): the same integers either way."""
    kc = kind_code(kind)
    x0 = t * k
    g0 = t * (k // 4)
    n = x_scale.shape[1]
    acc = zero_f32x8()
    if kc == 2:
        # Two float chains (even and odd blocks): one chain waits on each fma's latency, and rows of k = 896 (28
        # blocks) left little else to overlap (measured 8-9 -> 10-12 GB/s per core on a Zen 4). The chains take
        # turns (each block's result becomes the other chain's turn) rather than a loop by twos and an odd tail:
        # that tail's calls made numba keep four array incref / decref pairs per row (atomic, and the accumulators
        # spilled around them), a third of a 896-wide row's time.
        acc1 = zero_f32x8()
        for b in range(n):
            q, d, _ = _legacy_block(kind, w, start, b)
            done = _row_block_dot(kind, acc, q, d * x_scale[t, b], xq, x0 + 32 * b, bias, g0 + 8 * b, isa)
            acc = acc1
            acc1 = done
        return sum_f32x8(add_f32x8(acc1, acc))   # even n: (odd chain, even chain); odd n: (even, odd): a + b = b + a
    mins = np.float32(0.0)
    for b in range(n):
        q, d, m = _legacy_block(kind, w, start, b)
        acc = _row_block_dot(kind, acc, q, d * x_scale[t, b], xq, x0 + 32 * b, bias, g0 + 8 * b, isa)
        if kc == 1 or kc == 3:
            mins += m * x_sums[t, b]
    if kc == 1 or kc == 3:
        return sum_f32x8(acc) + mins
    return sum_f32x8(acc)


@njit(**_KERNEL)
def _unsigned_x(kind, isa):
    """Whether a tile of ``kind`` takes the activations as unsigned bytes (x + 128) against signed weights, so that
    its per-token step needs no lane biases: on VNNI the offset kind q5_0 and q8_0 (``vpdpbusd`` cannot
    saturate). Not on AVX2: there the per-token step costs the same either way (a ``vpaddd`` of the token's lane
    biases from memory, or a ``vpsubd`` of the block's -128 sums), but the signed weights cost each block an add
    and a ``vpmaddubsw`` / ``vpmaddwd`` for those sums, and two constant registers that the four tokens' eight
    accumulators needed (16-token products on Zen 3, one core: q4_0 25-26 -> 31-32, q5_0 23 -> 26-28 GMAC/s);
    and q8_0's ``vpmaddubsw`` could saturate (255 * -128 * 2)."""
    kc = kind_code(kind)
    return signed_dot_offset(isa) == 128 and (kc == 2 or kc == 4)


@njit(**_KERNEL)
def _tile_block(kind, w, row, b, isa):
    """Block ``b`` for a tile: (quants, lanes to start each token's dot product from, d, m). Where ``_unsigned_x``:
    the signed weights (q - offset) and the lanes of -128 * their sums, so that dot_u8_i8(those lanes, x + 128, w)
    is exactly the lanes of the one-token kernel's dot product (integers: the same numbers); else the decoder's
    quants and zeros (unused)."""
    q, d, m = _legacy_block(kind, w, row, b)
    if _unsigned_x(kind, isa):
        kc = kind_code(kind)
        signed = add_bytes(q, splat_bytes(-16 if kc == 2 else 0))
        return signed, minus_128_sums(signed, isa), d, m
    return q, zero_i32x8(), d, m


@njit(**_KERNEL)
def _tile_dot(kind, acc, q, lanes, scale, xq, xu, x, bias, g, isa):
    """One token's step of a tile: ``_legacy_dot``, or where ``_unsigned_x`` the same lanes from the unsigned
    activations ``xu`` (x + 128) and ``_tile_block``'s signed weights and start lanes."""
    if _unsigned_x(kind, isa):
        return fma_i32x8(acc, dot_u8_i8(lanes, load_32_bytes(xu, x), q, isa), scale)
    stored = zero_i32x8() if _legacy_offset(kind, isa) == 0 else load_8_i32(bias, g)
    return _legacy_dot(kind, acc, q, scale, load_32_bytes(xq, x), stored, isa)


@njit(inline="always", **_KERNEL)
def _tile_legacy(kind, w, start, xq, xu, k, x_scale, x_sums, bias, t, width, isa):
    """``_row_legacy`` for the ``width`` (a ``TileSize``) tokens from t, each block unpacked once."""
    nt = tile_size(width)
    kc = kind_code(kind)
    x0 = t * k
    g0 = t * (k // 4)
    kq = k // 4
    n = x_scale.shape[1]
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    if kc == 2:
        c0 = zero_f32x8()       # each token's two chains take turns per block, as in _row_legacy
        c1 = zero_f32x8()
        c2 = zero_f32x8()
        c3 = zero_f32x8()
        for b in range(n):
            q, lanes, d, _ = _tile_block(kind, w, start, b, isa)
            x = x0 + 32 * b
            g = g0 + 8 * b
            done = _tile_dot(kind, a0, q, lanes, d * x_scale[t, b], xq, xu, x, bias, g, isa)
            a0 = c0
            c0 = done
            if nt > 1:
                done = _tile_dot(kind, a1, q, lanes, d * x_scale[t + 1, b], xq, xu, x + k, bias, g + kq, isa)
                a1 = c1
                c1 = done
            if nt > 2:
                done = _tile_dot(kind, a2, q, lanes, d * x_scale[t + 2, b], xq, xu, x + 2 * k, bias, g + 2 * kq, isa)
                a2 = c2
                c2 = done
            if nt > 3:
                done = _tile_dot(kind, a3, q, lanes, d * x_scale[t + 3, b], xq, xu, x + 3 * k, bias, g + 3 * kq, isa)
                a3 = c3
                c3 = done
        return (sum_f32x8(add_f32x8(c0, a0)), sum_f32x8(add_f32x8(c1, a1)), sum_f32x8(add_f32x8(c2, a2)),
                sum_f32x8(add_f32x8(c3, a3)))
    m0 = np.float32(0.0)
    m1 = np.float32(0.0)
    m2 = np.float32(0.0)
    m3 = np.float32(0.0)
    for b in range(n):
        q, lanes, d, m = _tile_block(kind, w, start, b, isa)
        x = x0 + 32 * b
        g = g0 + 8 * b
        a0 = _tile_dot(kind, a0, q, lanes, d * x_scale[t, b], xq, xu, x, bias, g, isa)
        if nt > 1:
            a1 = _tile_dot(kind, a1, q, lanes, d * x_scale[t + 1, b], xq, xu, x + k, bias, g + kq, isa)
        if nt > 2:
            a2 = _tile_dot(kind, a2, q, lanes, d * x_scale[t + 2, b], xq, xu, x + 2 * k, bias, g + 2 * kq, isa)
        if nt > 3:
            a3 = _tile_dot(kind, a3, q, lanes, d * x_scale[t + 3, b], xq, xu, x + 3 * k, bias, g + 3 * kq, isa)
        if kc == 1 or kc == 3:
            m0 += m * x_sums[t, b]
            if nt > 1:
                m1 += m * x_sums[t + 1, b]
            if nt > 2:
                m2 += m * x_sums[t + 2, b]
            if nt > 3:
                m3 += m * x_sums[t + 3, b]
    if kc == 1 or kc == 3:
        return sum_f32x8(a0) + m0, sum_f32x8(a1) + m1, sum_f32x8(a2) + m2, sum_f32x8(a3) + m3
    return sum_f32x8(a0), sum_f32x8(a1), sum_f32x8(a2), sum_f32x8(a3)


@njit(**_KERNEL)
def _eight_token_tiles(kind, isa):
    """Whether ``_rows_legacy`` takes 8 tokens at a time (``_tile8_legacy``): q8_0 on AVX2, where 8 tokens share
    each block's load and scale (one core, three alternating rounds at 8-16 tokens: the output head's shape
    30.2-32.3 -> 33.4-34.1 G multiply-adds a second, 4864 x 896 29.2-30.3 -> 31.4-32.1, 896 x 4864 +1-3%). Not q5_0
    (nor q4_0 when it took these kernels): their two chains per token (even and odd blocks) do not fit AVX2's
    registers for 8 tokens; walking the row once per chain left 24 token pointers for 16 general registers (the
    spills: 25-30% slower), and with the activations regrouped instead the tiles of 4 compiled beside them slowed
    down (benchmarks/README.md). Not q4_1 / q5_1 (eight minimum sums more), nor VNNI (not measured)."""
    return signed_dot_offset(isa) == 0 and kind_code(kind) == 4


@njit(inline="always", **_KERNEL)
def _tile8_legacy(kind, w, start, xq, xu, k, x_scale, bias, t, isa):
    """``_row_legacy`` for the 8 tokens from t (a one-chain kind of ``_eight_token_tiles``), each block loaded
    once: each token's chain operation for operation as the one-token kernel builds it."""
    kq = k // 4
    n = x_scale.shape[1]
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    a4 = zero_f32x8()
    a5 = zero_f32x8()
    a6 = zero_f32x8()
    a7 = zero_f32x8()
    for b in range(n):
        q, lanes, d, _ = _tile_block(kind, w, start, b, isa)
        x = t * k + 32 * b
        g = t * kq + 8 * b
        a0 = _tile_dot(kind, a0, q, lanes, d * x_scale[t, b], xq, xu, x, bias, g, isa)
        a1 = _tile_dot(kind, a1, q, lanes, d * x_scale[t + 1, b], xq, xu, x + k, bias, g + kq, isa)
        a2 = _tile_dot(kind, a2, q, lanes, d * x_scale[t + 2, b], xq, xu, x + 2 * k, bias, g + 2 * kq, isa)
        a3 = _tile_dot(kind, a3, q, lanes, d * x_scale[t + 3, b], xq, xu, x + 3 * k, bias, g + 3 * kq, isa)
        a4 = _tile_dot(kind, a4, q, lanes, d * x_scale[t + 4, b], xq, xu, x + 4 * k, bias, g + 4 * kq, isa)
        a5 = _tile_dot(kind, a5, q, lanes, d * x_scale[t + 5, b], xq, xu, x + 5 * k, bias, g + 5 * kq, isa)
        a6 = _tile_dot(kind, a6, q, lanes, d * x_scale[t + 6, b], xq, xu, x + 6 * k, bias, g + 6 * kq, isa)
        a7 = _tile_dot(kind, a7, q, lanes, d * x_scale[t + 7, b], xq, xu, x + 7 * k, bias, g + 7 * kq, isa)
    return (sum_f32x8(a0), sum_f32x8(a1), sum_f32x8(a2), sum_f32x8(a3), sum_f32x8(a4), sum_f32x8(a5),
            sum_f32x8(a6), sum_f32x8(a7))


# K-quants (super-blocks of 256; activations q8_K: one scale per 256, sums per 16)

@njit(**_KERNEL)
def pair_sums(x_bsums):
    """int32 [k/64]: the sums of the activation quants per 32 (from q8_K's sums per 16) as int16, two to an int32
    (its int16 view is [k/32]; each fits: 32 values of at most 127 in size), as ``word_dot_8`` reads them."""
    out = np.empty(x_bsums.size // 4, np.int32)
    words = out.view(np.int16)
    for j in range(words.size):
        words[j] = x_bsums[2 * j] + x_bsums[2 * j + 1]
    return out


# q4_K (kind 7) and q5_K (kind 8): four chunks of 64 values per super-block, each with two six-bit scales and mins

@njit(inline="always", **_KERNEL)
def _k4_quants(kind, w, o, c):
    """Chunk ``c`` of the super-block at byte ``o``: its low and high 32 quants as bytes."""
    if kind_code(kind) == 7:
        packed = load_32_bytes(w, o + 16 + 32 * c)
        return low_nibbles(packed), shift_right_and(packed, 4, 15)
    packed = load_32_bytes(w, o + 48 + 32 * c)
    high_bits = load_32_bytes(w, o + 16)
    return (_with_fifth_bit(low_nibbles(packed), high_bits, 2 * c),
            _with_fifth_bit(shift_right_and(packed, 4, 15), high_bits, 2 * c + 1))


@njit(**_KERNEL)
def _k4_chunk(kind, w, o, c):
    """``_k4_quants`` of chunk ``c``, its two scales and its two mins (bytes 0 and 1 of each word): the exact
    GEMM's panels."""
    words = _scale_min_words(w, o + 4)
    q_low, q_high = _k4_quants(kind, w, o, c)
    return q_low, q_high, words[c // 2] >> (16 * (c & 1)), words[2 + c // 2] >> (16 * (c & 1))


@njit(inline="always", **_KERNEL)
def _k4_scales(w, o):
    """The super-block's eight scales and eight mins as words, once per super-block: scales 0-3 in words 0-3 of both
    halves of the first register, 4-7 in the second (``broadcast_scale_word`` takes group j's from them with one of
    four shuffle masks), the mins 0-7 in words 0-7 of the third (``word_dot_8``)."""
    s0, s1, m0, m1 = _scale_min_words(w, o + 4)
    scales, mins = scale_word_halves(s0, s1, m0, m1, 0)
    return scales, word_halves_down(scales), mins


@njit(**_KERNEL)
def _k4_dot(sumi, q_low, q_high, first4, last4, c, xq, x, isa):
    """One token's integer sums of chunk ``c`` (groups 2c and 2c + 1): the scaled dot products of its 64
    activations at xq[x:], each group's scale in the words of ``scaled_dot`` (ggml's way: no ``vpmulld``)."""
    scales = first4 if c < 2 else last4
    sumi = scaled_dot(sumi, q_low, load_32_bytes(xq, x), broadcast_scale_word(scales, (2 * c) % 4), isa)
    return scaled_dot(sumi, q_high, load_32_bytes(xq, x + 32), broadcast_scale_word(scales, (2 * c + 1) % 4), isa)


@njit(inline="always", **_KERNEL)
def _add_scaled(a0, a1, a2, a3, i0, i1, i2, i3, d, x_scale, t, b, width):
    """A super-block's integer sums of the ``width`` (a ``TileSize``) tokens from t, times its d and each token's
    scale, added to their float accumulators (the others returned as they are)."""
    nt = tile_size(width)
    a0 = fma_i32x8(a0, i0, d * x_scale[t, b])
    if nt > 1:
        a1 = fma_i32x8(a1, i1, d * x_scale[t + 1, b])
    if nt > 2:
        a2 = fma_i32x8(a2, i2, d * x_scale[t + 2, b])
    if nt > 3:
        a3 = fma_i32x8(a3, i3, d * x_scale[t + 3, b])
    return a0, a1, a2, a3


@njit(**_KERNEL)
def _row_k4(kind, w, start, xq, k, x_scale, sums, t, isa):
    """Row ``start`` times token t. ``sums``: the tokens' ``pair_sums`` (token t's at t * k / 4)."""
    kc = kind_code(kind)
    size = 144 if kc == 7 else 176
    x0 = t * k
    s0 = t * (k // 4)
    acc = zero_f32x8()
    mins = np.float32(0.0)
    for b in range(x_scale.shape[1]):
        o = start + size * b
        _prefetch_ahead(w, o, 3)
        first4, last4, min_words = _k4_scales(w, o)
        sumi = zero_i32x8()
        for c in range(4):
            q_low, q_high = _k4_quants(kind, w, o, c)
            sumi = _k4_dot(sumi, q_low, q_high, first4, last4, c, xq, x0 + 256 * b + 64 * c, isa)
        d, dmin = load_f16_pair(w, o)
        acc = fma_i32x8(acc, sumi, d * x_scale[t, b])
        mins += dmin * x_scale[t, b] * np.float32(word_dot_8(min_words, sums, s0 + 4 * b))
    return sum_f32x8(acc) - mins


@njit(inline="always", **_KERNEL)
def _tile_k4(kind, w, start, xq, k, x_scale, sums, t, width, isa):
    """``_row_k4`` for the ``width`` (a ``TileSize``) tokens from t, each chunk unpacked once."""
    nt = tile_size(width)
    kc = kind_code(kind)
    size = 144 if kc == 7 else 176
    kq = k // 4
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    m0 = np.float32(0.0)
    m1 = np.float32(0.0)
    m2 = np.float32(0.0)
    m3 = np.float32(0.0)
    for b in range(x_scale.shape[1]):
        o = start + size * b
        first4, last4, min_words = _k4_scales(w, o)
        i0 = zero_i32x8()
        i1 = zero_i32x8()
        i2 = zero_i32x8()
        i3 = zero_i32x8()
        for c in range(4):
            q_low, q_high = _k4_quants(kind, w, o, c)
            x = t * k + 256 * b + 64 * c
            i0 = _k4_dot(i0, q_low, q_high, first4, last4, c, xq, x, isa)
            if nt > 1:
                i1 = _k4_dot(i1, q_low, q_high, first4, last4, c, xq, x + k, isa)
            if nt > 2:
                i2 = _k4_dot(i2, q_low, q_high, first4, last4, c, xq, x + 2 * k, isa)
            if nt > 3:
                i3 = _k4_dot(i3, q_low, q_high, first4, last4, c, xq, x + 3 * k, isa)
        d, dmin = load_f16_pair(w, o)
        s = t * kq + 4 * b
        a0, a1, a2, a3 = _add_scaled(a0, a1, a2, a3, i0, i1, i2, i3, d, x_scale, t, b, width)
        m0 += dmin * x_scale[t, b] * np.float32(word_dot_8(min_words, sums, s))
        if nt > 1:
            m1 += dmin * x_scale[t + 1, b] * np.float32(word_dot_8(min_words, sums, s + kq))
        if nt > 2:
            m2 += dmin * x_scale[t + 2, b] * np.float32(word_dot_8(min_words, sums, s + 2 * kq))
        if nt > 3:
            m3 += dmin * x_scale[t + 3, b] * np.float32(word_dot_8(min_words, sums, s + 3 * kq))
    return sum_f32x8(a0) - m0, sum_f32x8(a1) - m1, sum_f32x8(a2) - m2, sum_f32x8(a3) - m3


# q2_K (kind 5), q3_K (6), q6_K (9): eight groups of 32 values per super-block, each with two 16-value scales

@njit(inline="always", **_KERNEL)
def _k_scales(kind, w, o):
    """q2_K / q3_K: the sixteen 16-value scales of the super-block at byte ``o``, one per int32 lane (q3_K's less
    32), expanded once per super-block; zeros for q6_K, whose groups load their own int8 scales."""
    kc = kind_code(kind)
    if kc == 5:
        return bytes_as_i32x16(load_u32(w, o) & 0x0F0F0F0F, load_u32(w, o + 4) & 0x0F0F0F0F,
                               load_u32(w, o + 8) & 0x0F0F0F0F, load_u32(w, o + 12) & 0x0F0F0F0F, 0)
    if kc == 6:
        s0, s1, s2, s3 = _q3_K_scale_words(w, o + 96)
        return bytes_as_i32x16(s0, s1, s2, s3, -32)
    return zero_i32x16()


@njit(inline="always", **_KERNEL)
def _k_quants(kind, w, o, n, j):
    """Group 4 n + j (values 128 n + 32 j ..) of the super-block at byte ``o``: its quants as unsigned bytes (before
    the offset: q3_K -4, q6_K -32)."""
    kc = kind_code(kind)
    if kc == 5:
        return shift_right_and(load_32_bytes(w, o + 16 + 32 * n), 2 * j, 3)
    if kc == 6 and kind_layout(kind) == Q3_K_PLANES:
        return _q3_K_plane_quants(w, o, 4 * n + j)
    if kc == 6:
        return _q3_K_quants(load_32_bytes(w, o + 32 + 32 * n), load_32_bytes(w, o), 2 * j, 4 * n + j)
    low = load_32_bytes(w, o + 64 * n + 32 * (j & 1))     # groups 0, 1: low nibbles; 2, 3: high nibbles
    nibbles = low_nibbles(low) if j < 2 else shift_right_and(low, 4, 15)
    return _q6_K_quants(nibbles, load_32_bytes(w, o + 128 + 32 * n), 2 * j)


@njit(inline="always", **_KERNEL)
def _k_group(kind, w, o, n, j, scales):
    """``_k_quants`` of group 4 n + j and its two scales in dot_u8_i8's lanes as int32 (q2_K, q3_K: from
    ``scales``, the super-block's ``_k_scales``): the exact GEMM's panels."""
    if kind_code(kind) == 9:
        return _k_quants(kind, w, o, n, j), pair_scales_i32x8(w, o + 192 + 8 * n + 2 * j)
    return _k_quants(kind, w, o, n, j), scale_pair_i32x8(scales, 8 * n + 2 * j)


@njit(inline="always", **_KERNEL)
def _q2_K_scale_source(kind, w, o):
    # bytes 0-15 and 8-23 (the first half's scales, then the second's first), so that the groups of both halves
    # take their scales by the same four shuffle masks
    return (shift_right_and(load_16_bytes_twice(w, o), 0, 15), shift_right_and(load_16_bytes_twice(w, o + 8), 0, 15))


@njit(inline="always", **_KERNEL)
def _q3_K_scale_source(kind, w, o):
    low, high = _q3_K_scale_qwords(w, o + 96)
    return scale_qword_halves(low, high, -32)


@njit(inline="always", **_KERNEL)
def _q6_K_scale_source(kind, w, o):
    return scale_word_halves(load_u32(w, o + 192), load_u32(w, o + 196), load_u32(w, o + 200),
                             load_u32(w, o + 204), 0)


def _k_scale_source(kind, w, o):
    """What ``_k_group_scales`` takes each group's scales from, once per super-block: q2_K its four-bit scales in
    both halves of two registers (``load_16_bytes_twice``: scales 0-7 first in one, 8-15 in the other), q3_K (its
    scales less 32) and q6_K (its int8 scales) as ``scale_word_halves``."""
    raise NotImplementedError("decode._k_scale_source runs inside the compiled kernels only")


@overload(_k_scale_source, inline="always")
def _k_scale_source_of(kind, w, o):
    if not isinstance(kind, ConstantType) or kind.code not in (5, 6, 9):
        return None
    form = {5: _q2_K_scale_source, 6: _q3_K_scale_source, 9: _q6_K_scale_source}[kind.code]

    def source(kind, w, o):
        return form(kind, w, o)
    return source


@njit(inline="always", **_KERNEL)
def _q2_K_group_scales(kind, w, o, n, j, source):
    return byte_scale_words(source[n], 2 * j)


@njit(inline="always", **_KERNEL)
def _halves_group_scales(kind, w, o, n, j, source):
    return group_scale_words(source[n], j)




def _k_group_scales(kind, w, o, n, j, source):
    """The scales of group 4 n + j as ``_k_group_dot`` takes them, the words of ``scaled_dot``: one ``vpshufb`` from
    ``source``, the super-block's ``_k_scale_source``."""
    raise NotImplementedError("decode._k_group_scales runs inside the compiled kernels only")


@overload(_k_group_scales, inline="always")
def _k_group_scales_of(kind, w, o, n, j, source):
    if not isinstance(kind, ConstantType) or kind.code not in (5, 6, 9):
        return None
    form = {5: _q2_K_group_scales, 6: _halves_group_scales, 9: _halves_group_scales}[kind.code]

    def scales(kind, w, o, n, j, source):
        return form(kind, w, o, n, j, source)
    return scales


@njit(**_KERNEL)
def _k_group_dot(kind, sumi, q, scales, xq, x, bias, g, isa):
    """sumi + one token's dot products of a group with xq[x:x + 32] times the group's scales (``scales`` from
    ``_k_group_scales``), multiplied into the pair sums (``scaled_dot``, ggml's way; no ``vpmulld``). q6_K's -32
    is taken off those pair sums, the offset's pair sums with the token's values read from bias[g:g + 8]
    (``offset_pairs``: computed once per activation row, where a second ``vpmaddubsw`` per row and group had q6_K
    read 12% slower on Zen 4 than lane biases and a ``vpmulld``); q3_K's -4 the same way. Taken once per
    super-block instead (its scales times the token's sums per 16 by one ``vpmaddwd``: 3% faster on one AVX2 run,
    within noise on another) the same sum lands in other lanes, and the float steps that follow give other bits
    than the exact GEMM (``gemm_k``) and than the other paths. ``vpdpwssd`` (AVX512-VNNI) adds into ``sumi``
    itself: ``_dots_narrow`` keeps a chain per half super-block."""
    kc = kind_code(kind)
    if kc == 5:
        return scaled_dot(sumi, q, load_32_bytes(xq, x), scales, isa)
    return pairs_scaled_dot(sumi, q, load_32_bytes(xq, x), load_8_i32(bias, g), scales, isa)


@njit(**_KERNEL)
def _k_group_d(kind, w, o):
    """The super-block's d (q2_K: then dmin at the next two bytes), by ``load_f16_pair``: q3_K's and q6_K's d are
    their super-blocks' last two bytes, so theirs is the second half of the pair before."""
    kc = kind_code(kind)
    if kc == 5:
        return load_f16_pair(w, o + 80)[0]
    return load_f16_pair(w, o + (106 if kc == 6 else 206))[1]


def _super_block_dots(kind, w, o, xq, x, bias, g, k, width, isa):
    """The integer dot products of the super-block at byte ``o`` with the ``width`` (a ``TileSize``) tokens whose
    values start at xq[x], xq[x + k], ... (lane biases at bias[g], bias[g + k / 4], ...), each group scaled by its
    two scales, summed over the eight groups in ``dot_u8_i8``'s eight lanes (lane i: values 4i .. 4i + 3 of each
    group): four ``I32x8``, zeros past ``width``. Exact integers, so the narrow and wide forms give the same lanes."""
    raise NotImplementedError("decode._super_block_dots runs inside the compiled kernels only")


@njit(inline="always", **_KERNEL)
def _dots_narrow(kind, w, o, xq, x, bias, g, k, width, isa):
    """``_super_block_dots`` one 32-value group at a time (every kind of the family, every path). With ``vpdpwssd``
    q3_K and q6_K accumulate each half super-block (four groups) in a chain of its own, the two added after: one
    core of an AMD EPYC Zen 4, q3_K 4096 x 4096 from memory, alternating processes, read 15.4-15.8 GB/s with each
    group's scaled pairs from zero and added after (eight chains, seven adds: 115 instructions a super-block),
    16.7-17.0 with two chains (103), 15.8-16.0 with one chain of eight, 16.3-16.6 with four of two; q6_K the same
    within noise. Integer sums, so the lanes hold the same values every way."""
    nt = tile_size(width)
    kq = k // 4
    i0 = zero_i32x8()
    i1 = zero_i32x8()
    i2 = zero_i32x8()
    i3 = zero_i32x8()
    source = _k_scale_source(kind, w, o)
    halves_apart = has_vnni(isa) and kind_code(kind) != 5
    for n in range(2):
        if halves_apart:
            h0, h1, h2, h3 = zero_i32x8(), zero_i32x8(), zero_i32x8(), zero_i32x8()
        else:
            h0, h1, h2, h3 = i0, i1, i2, i3
        for j in range(4):
            q = _k_quants(kind, w, o, n, j)
            scales = _k_group_scales(kind, w, o, n, j, source)
            xg = x + 128 * n + 32 * j
            gg = g + 32 * n + 8 * j
            h0 = _k_group_dot(kind, h0, q, scales, xq, xg, bias, gg, isa)
            if nt > 1:
                h1 = _k_group_dot(kind, h1, q, scales, xq, xg + k, bias, gg + kq, isa)
            if nt > 2:
                h2 = _k_group_dot(kind, h2, q, scales, xq, xg + 2 * k, bias, gg + 2 * kq, isa)
            if nt > 3:
                h3 = _k_group_dot(kind, h3, q, scales, xq, xg + 3 * k, bias, gg + 3 * kq, isa)
        if halves_apart:
            i0, i1, i2, i3 = add_i32x8(i0, h0), add_i32x8(i1, h1), add_i32x8(i2, h2), add_i32x8(i3, h3)
        else:
            i0, i1, i2, i3 = h0, h1, h2, h3
    return i0, i1, i2, i3


@njit(inline="always", **_KERNEL)
def _dots_wide(kind, w, o, xq, x, bias, g, k, width, isa):
    """``_super_block_dots`` for q2_K on AVX512-VNNI: group j of both halves at once in 512-bit registers (their
    2-bit quants share bytes: one load and shift serve both), the sixteen scales expanded once per super-block and
    spread to each pair of groups by one permute. The activations come from ``bias``, which holds them in that
    order (``joined_halves``: one load per pair of groups instead of two and an insert). q3_K takes the narrow
    form on every path: one core of an AMD EPYC Zen 4 (which runs a 512-bit instruction as two 256-bit halves),
    4096 x 4096 from memory, alternating processes, read 13.1-13.5 GB/s in this form (13.7-14.3 from q3_K's
    planes) against 14.5-15.8 in the narrow one from the planes; q2_K 14.6-15.3 here against 13.8-14.1 narrow."""
    nt = tile_size(width)
    kq = k // 4
    scales = to_scale_words(_k_scales(kind, w, o))
    packed = load_64_bytes(w, o + 16)    # 16 bytes of scale | min << 4, then the quants
    i0 = zero_i32x16()
    i1 = zero_i32x16()
    i2 = zero_i32x16()
    i3 = zero_i32x16()
    for j in range(4):
        q = shift_right_and(packed, 2 * j, 3)
        pair = spread_scale_pairs(scales, j)
        i0 = scaled_dot(i0, q, as_bytes(load_16_i32(bias, g + 16 * j)), pair, isa)
        if nt > 1:
            i1 = scaled_dot(i1, q, as_bytes(load_16_i32(bias, g + kq + 16 * j)), pair, isa)
        if nt > 2:
            i2 = scaled_dot(i2, q, as_bytes(load_16_i32(bias, g + 2 * kq + 16 * j)), pair, isa)
        if nt > 3:
            i3 = scaled_dot(i3, q, as_bytes(load_16_i32(bias, g + 3 * kq + 16 * j)), pair, isa)
    return fold_halves_i32x16(i0), fold_halves_i32x16(i1), fold_halves_i32x16(i2), fold_halves_i32x16(i3)


def _wide_dots(kind, isa) -> bool:
    """Whether ``_super_block_dots`` of this kind on this path is ``_dots_wide`` (at typing time)."""
    return kind.code == 5 and isa.wide


@overload(_super_block_dots)   # not inline="always" at numba's level (its IR inlining warns here); LLVM inlines it
def _super_block_dots_of(kind, w, o, xq, x, bias, g, k, width, isa):
    if not isinstance(kind, ConstantType) or not isinstance(isa, IsaType):
        return None
    form = _dots_wide if _wide_dots(kind, isa) else _dots_narrow

    def dots(kind, w, o, xq, x, bias, g, k, width, isa):
        return form(kind, w, o, xq, x, bias, g, k, width, isa)
    return dots


@njit(inline="always", **_KERNEL)
def _q2_K_scaled(acc, sums, w, o, packed, pairs, s, x_scale):
    """acc + float(sums) * (d * x_scale) - float(minimums . bsums) * (dmin * x_scale) for the q2_K super-block at
    byte ``o`` (``packed``: its scale bytes as ``load_16_bytes_twice``; ``pairs``: the token's ``paired_bsums``
    from ``s``), rounded as two fused multiply-adds."""
    d_x, dmin_x = load_f16_pair_times(w, o + 80, x_scale)
    return fnma_i32x8(fma_i32x8(acc, sums, d_x), high_nibbles_times_pairs(packed, pairs, s), dmin_x)


@njit(inline="always", **_KERNEL)
def _row_groups(kind, w, start, xq, k, x_scale, x_bsums, bias, t, isa):
    """Row ``start`` times token t: ``_tile_groups`` for one token (its other tokens' steps fold away)."""
    return _tile_groups(kind, w, start, xq, k, x_scale, x_bsums, bias, t, _TILE_1, isa)[0]


@njit(inline="always", **_KERNEL)
def _tile_groups(kind, w, start, xq, k, x_scale, x_bsums, bias, t, width, isa):
    """One row times the ``width`` (a ``TileSize``) tokens from t, each super-block unpacked once: per token its
    exact integer sums (``_super_block_dots``) scaled by d and the token's scale, q2_K's minimums taken off in the
    same eight float lanes, which are summed once at the end. ``x_bsums``: q2_K's sums per 16 as
    ``paired_bsums`` lays them out (unread by q3_K and q6_K)."""
    nt = tile_size(width)
    kc = kind_code(kind)
    size = 84 if kc == 5 else 110 if kc == 6 else 210
    kb = k // 16
    a0 = zero_f32x8()
    a1 = zero_f32x8()
    a2 = zero_f32x8()
    a3 = zero_f32x8()
    for b in range(x_scale.shape[1]):
        o = start + size * b
        if kc == 9:
            _prefetch_ahead(w, o, 4)
        else:
            _prefetch_ahead(w, o, 2)
        i0, i1, i2, i3 = _super_block_dots(kind, w, o, xq, t * k + 256 * b, bias, t * (k // 4) + 64 * b, k,
                                           width, isa)
        if kc == 5:   # the sums times d, then the minimums times dmin taken off (d, dmin by one conversion)
            s = t * kb + 16 * b
            packed = load_16_bytes_twice(w, o)
            a0 = _q2_K_scaled(a0, i0, w, o, packed, x_bsums, s, x_scale[t, b])
            if nt > 1:
                a1 = _q2_K_scaled(a1, i1, w, o, packed, x_bsums, s + kb, x_scale[t + 1, b])
            if nt > 2:
                a2 = _q2_K_scaled(a2, i2, w, o, packed, x_bsums, s + 2 * kb, x_scale[t + 2, b])
            if nt > 3:
                a3 = _q2_K_scaled(a3, i3, w, o, packed, x_bsums, s + 3 * kb, x_scale[t + 3, b])
        else:
            a0, a1, a2, a3 = _add_scaled(a0, a1, a2, a3, i0, i1, i2, i3, _k_group_d(kind, w, o), x_scale, t, b, width)
    return sum_f32x8(a0), sum_f32x8(a1), sum_f32x8(a2), sum_f32x8(a3)


# ----------------------------------------------------------------------------------------------------------------
# Launches: rows of one or several matrices of one type, one token (matvec) or a few (matmul_few)
# ----------------------------------------------------------------------------------------------------------------

@njit(inline="always", **_KERNEL)
def _store_tile(out, t, r, ys, width):
    nt = tile_size(width)
    out[t, r] = ys[0]
    if nt > 1:
        out[t + 1, r] = ys[1]
    if nt > 2:
        out[t + 2, r] = ys[2]
    if nt > 3:
        out[t + 3, r] = ys[3]


# One compiled function per kind and family: out[t, first + i] = row i (of n, starting at byte ``start`` of ``w``)
# times token t, for every token of ``out``: whole tiles of TILE tokens, then the N mod TILE rest in one tile of 2
# or 3 tokens (or the one-token kernel for 1), so every N >= 2 unpacks each block once per tile (the same numbers
# either way).

_TILE_1, _TILE_2, _TILE_3, _TILE_4 = (TileSize(width, f"tile{width}") for width in (1, 2, 3, 4))


@njit(**_KERNEL)
def _one_token_rows_legacy(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    for i in range(n):    # token 0 as a constant, which the row kernel's addressing folds
        row = start + i * row_bytes
        out[0, first + i] = _row_legacy(kind, w, row, xq, k, x_scale, x_sums, bias, 0, isa)


@njit(**_KERNEL)
def _rows_legacy(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    tiled8 = out.shape[0] - out.shape[0] % 8 if _eight_token_tiles(kind, isa) else 0
    tiled = tiled8 + (out.shape[0] - tiled8) // TILE * TILE
    rest = out.shape[0] - tiled
    for i in range(n):
        row = start + i * row_bytes
        for t in range(0, tiled8, 8):
            y = _tile8_legacy(kind, w, row, xq, xu, k, x_scale, bias, t, isa)
            for j in range(8):
                out[t + j, first + i] = y[j]
        for t in range(tiled8, tiled, TILE):
            ys = _tile_legacy(kind, w, row, xq, xu, k, x_scale, x_sums, bias, t, _TILE_4, isa)
            _store_tile(out, t, first + i, ys, _TILE_4)
        t = tiled
        if rest == 3:
            ys = _tile_legacy(kind, w, row, xq, xu, k, x_scale, x_sums, bias, t, _TILE_3, isa)
            _store_tile(out, t, first + i, ys, _TILE_3)
        elif rest == 2:
            ys = _tile_legacy(kind, w, row, xq, xu, k, x_scale, x_sums, bias, t, _TILE_2, isa)
            _store_tile(out, t, first + i, ys, _TILE_2)
        elif rest == 1:
            out[t, first + i] = _row_legacy(kind, w, row, xq, k, x_scale, x_sums, bias, t, isa)


@njit(**_KERNEL)
def _one_token_rows_k4(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    for i in range(n):    # token 0 as a constant, which the row kernel's addressing folds
        row = start + i * row_bytes
        out[0, first + i] = _row_k4(kind, w, row, xq, k, x_scale, bias, 0, isa)


@njit(**_KERNEL)
def _rows_k4(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    tiled = out.shape[0] - out.shape[0] % TILE
    rest = out.shape[0] - tiled
    for i in range(n):
        row = start + i * row_bytes
        for t in range(0, tiled, TILE):
            ys = _tile_k4(kind, w, row, xq, k, x_scale, bias, t, _TILE_4, isa)
            _store_tile(out, t, first + i, ys, _TILE_4)
        t = tiled
        if rest == 3:
            ys = _tile_k4(kind, w, row, xq, k, x_scale, bias, t, _TILE_3, isa)
            _store_tile(out, t, first + i, ys, _TILE_3)
        elif rest == 2:
            ys = _tile_k4(kind, w, row, xq, k, x_scale, bias, t, _TILE_2, isa)
            _store_tile(out, t, first + i, ys, _TILE_2)
        elif rest == 1:
            out[t, first + i] = _row_k4(kind, w, row, xq, k, x_scale, bias, t, isa)


@njit(**_KERNEL)
def _one_token_rows_groups(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    for i in range(n):    # token 0 as a constant, which the row kernel's addressing folds
        row = start + i * row_bytes
        out[0, first + i] = _row_groups(kind, w, row, xq, k, x_scale, x_bsums, bias, 0, isa)


@njit(**_KERNEL)
def _rows_groups(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    tiled = out.shape[0] - out.shape[0] % TILE
    rest = out.shape[0] - tiled
    for i in range(n):
        row = start + i * row_bytes
        for t in range(0, tiled, TILE):
            ys = _tile_groups(kind, w, row, xq, k, x_scale, x_bsums, bias, t, _TILE_4, isa)
            _store_tile(out, t, first + i, ys, _TILE_4)
        t = tiled
        if rest == 3:
            ys = _tile_groups(kind, w, row, xq, k, x_scale, x_bsums, bias, t, _TILE_3, isa)
            _store_tile(out, t, first + i, ys, _TILE_3)
        elif rest == 2:
            ys = _tile_groups(kind, w, row, xq, k, x_scale, x_bsums, bias, t, _TILE_2, isa)
            _store_tile(out, t, first + i, ys, _TILE_2)
        elif rest == 1:
            out[t, first + i] = _row_groups(kind, w, row, xq, k, x_scale, x_bsums, bias, t, isa)


# ----------------------------------------------------------------------------------------------------------------
# q4_0 and q8_0 on AVX512-VNNI, q4_0, q4_1, q5_0 and q5_1 on AVX2 and AVX-VNNI: rows in lanes, straight from the file
#
# The lanes of a 512-bit register are sixteen weight rows (as in gemm.py's prompt kernel; of a 256-bit one on AVX2,
# eight), built per block from the rows where they lie: 16 quant bytes of each row, a 16 x 4 (8 x 4) transpose of
# their dwords, so that register m holds bytes 4m .. 4m + 3 of every row; the scales come by scalar loads. q4_0's
# low nibbles are values 4m .. 4m + 3, its high ones 16 + 4m ..; q8_0 takes two such transposes (values 0-15,
# 16-31), its signed bytes made unsigned by adding 128 (q8_0 rows under 2048 values keep the lane kernels:
# ``_Q8_0_LANES_MIN_K``). Per token and block, the token's four activation bytes broadcast (an
# embedded broadcast of ``vpdpbusd``):
#
#     sums = -offset * (sum of the token's 32 x)                # q4_0: 8 (value = nibble - 8); q8_0: 128
#     sums = vpdpbusd(sums, unsigned dword j, x dword j)        # 8 times: each row's block sum, exact
#     acc = acc + float(sums) * (d_rows * d_x)                  # vcvtdq2ps, vmulps, vfmadd
#
# which is the prompt GEMM's arithmetic for these kinds (each row's blocks summed exactly, then added in float32 one
# after the other), so their one-token, few-token and prompt products give the same numbers on this path. A
# block's decoding serves up to eight tokens: on two Zen 4 cores a 7B-shaped q4_0 matrix took 8 tokens at 239 G
# multiply-adds a second against 81-89 on the lane tiles, and one token read 22-23 GB/s per core from memory
# against 17 (4096-wide rows; q8_0 27-30 against 22-25).
#
# AVX2 (q4_0, q4_1, q5_0, q5_1; q8_0's unsigned bytes times activations could saturate ``vpmaddubsw``) sums each row's
# block in int16 and widens once (``nibble_block_sums_x8``; q5_0's and q5_1's values reach 31, so two int16 sums of four
# registers: ``five_bit_block_sums_x8``); its lanes are the same integers and the same float steps, so q4_0 gives the
# same bits on both paths. Where the lane kernel (``_row_legacy``) spent 14 vector operations a block and row, of which
# 4 for the block's scale and 3 for its offset, eight rows share a block's scale multiply, offset and conversion here.
#
# q5_0 (offset 16) takes the row lanes on the 256-bit paths only: each row's 32 fifth bits (its qh word) are gathered
# into a lane (``load_u32_8_rows``) and spread to 16 or 0 per value byte (``fifth_bits_x8``: one in-half ``vpshufb`` for
# two registers, then a mask, a compare and a mask per register). On an EPYC Zen 4 without AVX-512 (AVX2) one core read
# 10.3-10.8 GB/s in the lane kernel and 12.0-12.7 in row lanes (4096 x 4096). On AVX512-VNNI q5_0 keeps the lane kernel
# and the exact GEMM built to give its numbers (two float chains of eight lanes), so its one-token numbers there and on
# the 256-bit paths differ in float rounding (the same exact integer block sums, summed in another order); on the
# 256-bit paths its one-token, few-token and prompt products are now the same numbers. Sixteen-row lanes for q5_0 on
# AVX512-VNNI (the qh words of sixteen rows gathered into one register, the fifth bits spread by an in-lane
# ``vpshufb``, a ``vptestmb`` and a masked move) were built and measured on an EPYC Zen 4 (7 December, Qwen2.5-0.5B,
# whose q/o/gate/up are q5_0, alternating fresh processes): its layers took 19.3-22.8 against 17.0-18.4 ms a token
# on one thread and 12.9-15.2 against 10.4-11.1 on two, with the next panel prefetched into L2 or (panels up to
# 10 KiB) into L1; so the lane kernel stays.
#
# q4_1 and q5_1 take them on the 256-bit paths too, their minimums as one more multiply-add per block and token
# (the rows' m times the token's q8_1 sum, ``_lanes_step``). The same EPYC, one core, 4096 x 4096, two alternating
# rounds: one token q4_1 12.8 -> 14.4 GB/s, q5_1 11.8 -> 12.5-13.1; 4 to 16 tokens 30 -> 49-51 (q4_1) and 26 ->
# 42-45 (q5_1) G multiply-adds a second.
# ----------------------------------------------------------------------------------------------------------------

# panels up to this size are prefetched into L1 (q4_0 rows of 896, 7.9 KiB: 19 against 15 GB/s per core on Zen 4),
# larger ones into L2, where they do not push the panel being read out of a 32 KiB L1 (q4_0 rows of 4096, 36 KiB:
# 20-21 against 12-13 GB/s; q8_0 rows of 896, 14.9 KiB: 21.6 against 16.8)
_L1_PANEL_BYTES = 8 * 1024


@njit(**_KERNEL)
def _lanes_token_x16(values, xq, x, start, isa):
    low = splat_i32(start)
    high = splat_i32(0)
    low = dot_u8_i8_x64(low, values[0], splat_dword_x64(xq, x), isa)
    high = dot_u8_i8_x64(high, values[4], splat_dword_x64(xq, x + 16), isa)
    low = dot_u8_i8_x64(low, values[1], splat_dword_x64(xq, x + 4), isa)
    high = dot_u8_i8_x64(high, values[5], splat_dword_x64(xq, x + 20), isa)
    low = dot_u8_i8_x64(low, values[2], splat_dword_x64(xq, x + 8), isa)
    high = dot_u8_i8_x64(high, values[6], splat_dword_x64(xq, x + 24), isa)
    low = dot_u8_i8_x64(low, values[3], splat_dword_x64(xq, x + 12), isa)
    high = dot_u8_i8_x64(high, values[7], splat_dword_x64(xq, x + 28), isa)
    return add_i32x16(low, high)


def _lanes_token(kind, values, xq, x, start, isa):
    """One token's exact block sums for the panel's rows (``values``: ``_lanes_block``'s eight registers; the
    token's 32 quants at xq[x:], ``start`` its ``block_starts`` entry)."""
    raise NotImplementedError("decode._lanes_token runs inside the compiled kernels only")


@overload(_lanes_token, inline="always")
def _lanes_token_of(kind, values, xq, x, start, isa):
    if not isinstance(kind, ConstantType) or not isinstance(isa, IsaType):
        return None
    if isa.wide:
        return lambda kind, values, xq, x, start, isa: _lanes_token_x16(values, xq, x, start, isa)
    if kind.code == 2 or kind.code == 3:    # q5_0's and q5_1's values reach 31: int16 sums of four registers
        return lambda kind, values, xq, x, start, isa: five_bit_block_sums_x8(start, values, xq, x, isa)
    return lambda kind, values, xq, x, start, isa: nibble_block_sums_x8(start, values, xq, x, isa)


@njit(inline="always", **_KERNEL)
def _lanes_block_x16(kind, w, o, row_bytes):
    four = 4 * row_bytes
    m0, m1, m2, m3 = transpose_dwords(load_rows_4x16(w, o + 2, row_bytes),
                                      load_rows_4x16(w, o + 2 + four, row_bytes),
                                      load_rows_4x16(w, o + 2 + 2 * four, row_bytes),
                                      load_rows_4x16(w, o + 2 + 3 * four, row_bytes))
    if kind_code(kind) == 0:
        values = (shift_right_and(m0, 0, 15), shift_right_and(m1, 0, 15), shift_right_and(m2, 0, 15),
                  shift_right_and(m3, 0, 15), shift_right_and(m0, 4, 15), shift_right_and(m1, 4, 15),
                  shift_right_and(m2, 4, 15), shift_right_and(m3, 4, 15))
    else:
        m4, m5, m6, m7 = transpose_dwords(load_rows_4x16(w, o + 18, row_bytes),
                                          load_rows_4x16(w, o + 18 + four, row_bytes),
                                          load_rows_4x16(w, o + 18 + 2 * four, row_bytes),
                                          load_rows_4x16(w, o + 18 + 3 * four, row_bytes))
        values = (flip_sign_bits(m0), flip_sign_bits(m1), flip_sign_bits(m2), flip_sign_bits(m3),
                  flip_sign_bits(m4), flip_sign_bits(m5), flip_sign_bits(m6), flip_sign_bits(m7))
    return values


# Where the 256-bit row lanes find a legacy kind's nibbles and fifth bits in its block (q4_0, q4_1, q5_0, q5_1):
# after d (q4_0), d and m (q4_1), d and the fifth bits (q5_0), d, m and the fifth bits (q5_1)
_NIBBLES_AT = (2, 4, 6, 8)
_FIFTH_BITS_AT = (0, 0, 2, 4)


@njit(inline="always", **_KERNEL)
def _lanes_block_x8(kind, w, o, row_bytes):
    four = 4 * row_bytes      # each register pairs row i with row i + 4 (``transpose_row_pairs``)
    code = kind_code(kind)
    q = o + _NIBBLES_AT[code]
    m0, m1, m2, m3 = transpose_row_pairs(load_rows_2x16(w, q, four),
                                         load_rows_2x16(w, q + row_bytes, four),
                                         load_rows_2x16(w, q + 2 * row_bytes, four),
                                         load_rows_2x16(w, q + 3 * row_bytes, four))
    values = (shift_right_and(m0, 0, 15), shift_right_and(m1, 0, 15), shift_right_and(m2, 0, 15),
              shift_right_and(m3, 0, 15), shift_right_and(m0, 4, 15), shift_right_and(m1, 4, 15),
              shift_right_and(m2, 4, 15), shift_right_and(m3, 4, 15))
    if code == 2 or code == 3:
        high = load_u32_8_rows(w, o + _FIFTH_BITS_AT[code], row_bytes)
        values = (or_bytes(values[0], fifth_bits_x8(high, 0)), or_bytes(values[1], fifth_bits_x8(high, 1)),
                  or_bytes(values[2], fifth_bits_x8(high, 2)), or_bytes(values[3], fifth_bits_x8(high, 3)),
                  or_bytes(values[4], fifth_bits_x8(high, 4)), or_bytes(values[5], fifth_bits_x8(high, 5)),
                  or_bytes(values[6], fifth_bits_x8(high, 6)), or_bytes(values[7], fifth_bits_x8(high, 7)))
    return values


def _lanes_block(kind, w, o, row_bytes, isa):
    """Block at byte ``o`` of a panel's rows (``lane_rows(isa)`` of them, ``row_bytes`` apart): its values as
    unsigned bytes in eight registers (register j: values 4j .. 4j + 3 of every row)."""
    raise NotImplementedError("decode._lanes_block runs inside the compiled kernels only")


@overload(_lanes_block)   # not inline="always" at numba's level (its IR inlining warns here); LLVM inlines it
def _lanes_block_of(kind, w, o, row_bytes, isa):
    if not isinstance(isa, IsaType):
        return None
    if isa.wide:
        return lambda kind, w, o, row_bytes, isa: _lanes_block_x16(kind, w, o, row_bytes)
    return lambda kind, w, o, row_bytes, isa: _lanes_block_x8(kind, w, o, row_bytes)


def _lanes_f16(w, o, row_bytes, isa):
    """The half float at byte ``o`` of each of a panel's rows (``row_bytes`` apart) in its lane: a block's d, or
    q4_1's / q5_1's m."""
    raise NotImplementedError("decode._lanes_f16 runs inside the compiled kernels only")


@overload(_lanes_f16, inline="always")
def _lanes_f16_of(w, o, row_bytes, isa):
    if not isinstance(isa, IsaType):
        return None
    if isa.wide:
        return lambda w, o, row_bytes, isa: load_f16_rows(w, o, row_bytes)
    return lambda w, o, row_bytes, isa: load_f16_8_rows(w, o, row_bytes)


# bytes of a block of the legacy kinds (codes 0-4: q4_0, q4_1, q5_0, q5_1, q8_0), from the type table
_LEGACY_BLOCK_BYTES = tuple(get_type(name).type_size for name, code in sorted(KINDS.items(), key=lambda item: item[1])
                            if code <= 4)


@njit(inline="always", **_KERNEL)
def _lanes_step(kind, f, values, d, m, xq, x, start, x_scale, sums, g, isa):
    """One token's step of a row-lane panel: ``f`` + the block's exact row sums (``_lanes_token``) times the rows'
    scales ``d`` and the token's ``x_scale``; for q4_1 / q5_1 then + the rows' minimums ``m`` times the token's q8_1
    sum sums[g] (as llama.cpp's vec_dot adds m * s per block; the prompt kernel adds its offsets per 16 values)."""
    f = fma_lanes(f, _lanes_token(kind, values, xq, x, start, isa), d, x_scale)
    if kind_code(kind) == 1 or kind_code(kind) == 3:
        f = fma_float_lanes(f, m, splat_lane_floats(sums, g, isa))
    return f


@njit(inline="always", **_KERNEL)
def _lanes_panel(kind, w, base, row_bytes, xq, k, x_scale, sums, starts, starts_stride, t, width, out, at, stride,
                 n_store, isa):
    """A panel of rows of ``kind`` (a row-lane kind, ``_takes_row_lanes``; ``lane_rows(isa)`` rows) from byte
    ``base`` of ``w`` times the ``width`` (1, 2, 4 or 8, a constant after inlining) tokens from t: token u's quants at
    xq[u * k:], scales x_scale[u], for q4_1 / q5_1 its q8_1 sums (d * the sum of each block's quants) at
    sums[u * k / 32:], block starts (``block_starts``: -offset * the sum of each block's quants) at
    starts[u * starts_stride:]; its results, the first ``n_store`` lanes, at out[at + (u - t) * stride:]."""
    n_blocks = k // 32
    code = kind_code(kind)
    block_bytes = _LEGACY_BLOCK_BYTES[code]
    with_mins = code == 1 or code == 3
    rows = lane_rows(isa)
    panel_block = rows * block_bytes
    f0 = zero_lanes(isa)
    f1 = zero_lanes(isa)
    f2 = zero_lanes(isa)
    f3 = zero_lanes(isa)
    f4 = zero_lanes(isa)
    f5 = zero_lanes(isa)
    f6 = zero_lanes(isa)
    f7 = zero_lanes(isa)
    ahead = base + rows * row_bytes
    near = rows * row_bytes <= _L1_PANEL_BYTES
    for b in range(n_blocks):
        o = base + block_bytes * b
        # the next panel (contiguous rows), its share per block, while this one is read
        nxt = ahead + panel_block * b
        for line in range(0, panel_block, 64):
            if near:
                prefetch(w, nxt + line)
            else:
                prefetch_to_l2(w, nxt + line)
        values = _lanes_block(kind, w, o, row_bytes, isa)
        d = _lanes_f16(w, o, row_bytes, isa)
        m = _lanes_f16(w, o + 2, row_bytes, isa) if with_mins else d
        x = t * k + 32 * b
        s = t * starts_stride + b
        g = t * n_blocks + b
        f0 = _lanes_step(kind, f0, values, d, m, xq, x, starts[s], x_scale[t, b], sums, g, isa)
        if width > 1:
            f1 = _lanes_step(kind, f1, values, d, m, xq, x + k, starts[s + starts_stride], x_scale[t + 1, b], sums,
                             g + n_blocks, isa)
        if width > 2:
            f2 = _lanes_step(kind, f2, values, d, m, xq, x + 2 * k, starts[s + 2 * starts_stride], x_scale[t + 2, b],
                             sums, g + 2 * n_blocks, isa)
            f3 = _lanes_step(kind, f3, values, d, m, xq, x + 3 * k, starts[s + 3 * starts_stride], x_scale[t + 3, b],
                             sums, g + 3 * n_blocks, isa)
        if width > 4:
            f4 = _lanes_step(kind, f4, values, d, m, xq, x + 4 * k, starts[s + 4 * starts_stride], x_scale[t + 4, b],
                             sums, g + 4 * n_blocks, isa)
            f5 = _lanes_step(kind, f5, values, d, m, xq, x + 5 * k, starts[s + 5 * starts_stride], x_scale[t + 5, b],
                             sums, g + 5 * n_blocks, isa)
            f6 = _lanes_step(kind, f6, values, d, m, xq, x + 6 * k, starts[s + 6 * starts_stride], x_scale[t + 6, b],
                             sums, g + 6 * n_blocks, isa)
            f7 = _lanes_step(kind, f7, values, d, m, xq, x + 7 * k, starts[s + 7 * starts_stride], x_scale[t + 7, b],
                             sums, g + 7 * n_blocks, isa)
    store_f32_lanes(out, at, f0, n_store)
    if width > 1:
        store_f32_lanes(out, at + stride, f1, n_store)
    if width > 2:
        store_f32_lanes(out, at + 2 * stride, f2, n_store)
        store_f32_lanes(out, at + 3 * stride, f3, n_store)
    if width > 4:
        store_f32_lanes(out, at + 4 * stride, f4, n_store)
        store_f32_lanes(out, at + 5 * stride, f5, n_store)
        store_f32_lanes(out, at + 6 * stride, f6, n_store)
        store_f32_lanes(out, at + 7 * stride, f7, n_store)


@njit(**_KERNEL)
def _lanes_tokens(kind, w, base, row_bytes, xq, k, x_scale, sums, starts, starts_stride, out, at, n_store, isa):
    """A panel's rows (``lane_rows(isa)``) times every token of ``x_scale``, eight at a time, then four, two,
    one."""
    n_tokens = x_scale.shape[0]
    stride = out.size // n_tokens
    t = 0
    # the widths are literal constants, so that each inlined panel keeps only its tokens' accumulators
    while n_tokens - t >= 8:
        _lanes_panel(kind, w, base, row_bytes, xq, k, x_scale, sums, starts, starts_stride, t, 8, out, at + t * stride,
                     stride, n_store, isa)
        t += 8
    if n_tokens - t >= 4:
        _lanes_panel(kind, w, base, row_bytes, xq, k, x_scale, sums, starts, starts_stride, t, 4, out, at + t * stride,
                     stride, n_store, isa)
        t += 4
    if n_tokens - t >= 2:
        _lanes_panel(kind, w, base, row_bytes, xq, k, x_scale, sums, starts, starts_stride, t, 2, out, at + t * stride,
                     stride, n_store, isa)
        t += 2
    if n_tokens - t >= 1:
        _lanes_panel(kind, w, base, row_bytes, xq, k, x_scale, sums, starts, starts_stride, t, 1, out, at + t * stride,
                     stride, n_store, isa)


# q8_0 rows shorter than this keep the lane kernels (``_rows_legacy``): rows of 896 (Qwen2.5-0.5B's output matrix)
# read 21.5-22.3 GB/s per core in row lanes against 24.6, 32-35 against 36-37 G multiply-adds a second on two cores
# (rows of 4096: 27-30 GB/s against 22-25). The choice is per matrix (its k), so each matrix keeps one arithmetic.
_Q8_0_LANES_MIN_K = 2048


@njit(inline="always", **_KERNEL)
def _in_lanes(kind, k):
    """Whether rows of ``k`` values of a row-lane kind take the row lanes (all but q8_0's short rows)."""
    return kind_code(kind) != 4 or k >= _Q8_0_LANES_MIN_K


@njit(**_KERNEL)
def _rows_lanes(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    """``_rows`` of the row-lane kinds (``_rows_in_lanes``): the n rows from byte ``start`` a panel
    (``lane_rows(isa)``: 16 or 8) at a time (``bias``: each token's ``block_starts`` at the start of its row of
    ``bias``, ``bias.size / n_tokens`` apart); the last rows
    past a multiple of the panel are copied beside zero rows into a panel of their own."""
    if not _in_lanes(kind, k):
        _rows_legacy(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa)
        return
    flat = out.reshape(-1)
    sums = x_sums.reshape(-1)
    starts_stride = bias.size // x_scale.shape[0]
    rows = lane_rows(isa)
    full = n // rows
    for p in range(full):
        _lanes_tokens(kind, w, start + rows * p * row_bytes, row_bytes, xq, k, x_scale, sums, bias, starts_stride,
                      flat, first + rows * p, rows, isa)
    rest = n - rows * full
    if rest:
        tail = np.zeros(rows * row_bytes, np.uint8)
        begin = start + rows * full * row_bytes
        tail[:rest * row_bytes] = w[begin:begin + rest * row_bytes]
        _lanes_tokens(kind, tail, 0, row_bytes, xq, k, x_scale, sums, bias, starts_stride, flat, first + rows * full,
                      rest, isa)


@njit(**_KERNEL)
def _one_token_rows_lanes(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    if _in_lanes(kind, k):
        _rows_lanes(kind, w, start, row_bytes, n, xq, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa)
    else:
        _one_token_rows_legacy(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa)


@njit(**_KERNEL)
def block_starts(xq, offset):
    """int32 [n / 32]: -offset * the sum of each 32 quants of ``xq`` (what takes a weight offset back out of a
    block's dot product: q4_0's 8, q8_0's 128 made unsigned)."""
    if offset == 0:    # q4_1 / q5_1: their minimums are a term of their own, nothing to sum
        return np.zeros(xq.size // 32, np.int32)
    starts = np.empty(xq.size // 32, np.int32)
    _block_sums_times(xq.reshape(-1, 32), -offset, starts)
    return starts


@njit(inline="always", **_KERNEL)
def _takes_row_lanes(kind, k, isa):
    """Whether rows of ``k`` values of ``kind`` take the row-lane kernels on path ``isa`` (``_rows_in_lanes``'s rule,
    in compiled code, with q8_0's row length): their token side is then ``block_starts``."""
    code = kind_code(kind)
    return (code == 0 or (code <= 3 and lane_rows(isa) == 8)
            or (code == 4 and lane_rows(isa) == 16 and _in_lanes(kind, k)))


def _rows_in_lanes(kind, isa) -> bool:
    """Whether ``kind`` on path ``isa`` (types, at typing time) takes the row-lane kernels: q4_0 on every path,
    q4_1, q5_0 and q5_1 on the 256-bit paths (AVX2, AVX-VNNI), q8_0 on AVX512-VNNI."""
    return kind.code == 0 or (kind.code <= 3 and not isa.wide) or (kind.code == 4 and isa.wide)


def _rows(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    """The rows of ``kind`` (a ``Kind`` constant) for a few tokens (tiles): its family's row function, chosen at
    compile time, so a kernel compiles only the kinds it is called with (a model's first run compiles its own 3-5
    types, not all ten)."""
    raise NotImplementedError("decode._rows runs inside the compiled kernels only")


def _one_token_rows(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    """``_rows`` for one token (decode): the family's row kernel alone, without the tiles (half the code to
    compile for ``matvec``)."""
    raise NotImplementedError("decode._one_token_rows runs inside the compiled kernels only")


_FAMILY_ROWS = {1: _rows_legacy, 2: _rows_legacy, 3: _rows_legacy, 4: _rows_legacy,
                5: _rows_groups, 6: _rows_groups, 9: _rows_groups, 7: _rows_k4, 8: _rows_k4}
_FAMILY_ONE_TOKEN_ROWS = {1: _one_token_rows_legacy, 2: _one_token_rows_legacy,
                          3: _one_token_rows_legacy, 4: _one_token_rows_legacy, 5: _one_token_rows_groups,
                          6: _one_token_rows_groups, 9: _one_token_rows_groups, 7: _one_token_rows_k4,
                          8: _one_token_rows_k4}


@overload(_rows, inline="always")
def _rows_of_kind(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    if not isinstance(kind, ConstantType) or kind.label != "kind" or not isinstance(isa, IsaType):
        return None
    family = _rows_lanes if _rows_in_lanes(kind, isa) else _FAMILY_ROWS[kind.code]

    def rows(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
        family(kind, w, start, row_bytes, n, xq, xu, k, x_scale, x_sums, x_bsums, bias, out, first, isa)
    return rows


@overload(_one_token_rows, inline="always")
def _one_token_rows_of_kind(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
    if not isinstance(kind, ConstantType) or kind.label != "kind" or not isinstance(isa, IsaType):
        return None
    family = _one_token_rows_lanes if _rows_in_lanes(kind, isa) else _FAMILY_ONE_TOKEN_ROWS[kind.code]

    def rows(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa):
        family(kind, w, start, row_bytes, n, xq, k, x_scale, x_sums, x_bsums, bias, out, first, isa)
    return rows


@njit(**_KERNEL)
def joined_halves(xq):
    """int32 [k/4]: the bytes of ``xq`` in the order ``_dots_wide`` reads them: per super-block of 256 values, for
    j = 0..3, values 32 j .. 32 j + 31 then 128 + 32 j .. 128 + 32 j + 31 (group j of both halves: one 512-bit
    load each)."""
    joined = np.empty(xq.size // 4, np.int32)
    joined_bytes = joined.view(np.int8)
    for b in range(xq.size // 256):
        for j in range(4):
            store_32_bytes(joined_bytes, 256 * b + 64 * j, load_32_bytes(xq, 256 * b + 32 * j))
            store_32_bytes(joined_bytes, 256 * b + 64 * j + 32, load_32_bytes(xq, 256 * b + 128 + 32 * j))
    return joined


@njit(**_KERNEL)
def offset_pairs(xq, offset):
    """int32 [k/4]: the int16 pair sums of ``offset`` x (``offset_pair_sums``) for each 32 values of ``xq``, sixteen
    per eight int32, at the values' index / 4: what the groups of q3_K (offset 4) and q6_K (32) take off their pair
    sums (``pairs_scaled_dot``), computed once per activation row instead of once per row and group."""
    pairs = np.empty(xq.size // 4, np.int32)
    for g in range(xq.size // 32):
        store_8_i32(pairs, 8 * g, offset_pair_sums(offset, load_32_bytes(xq, 32 * g)))
    return pairs


def _k_group_terms(kind, xq, x_bsums, isa):
    """``joined_halves(xq)`` where the kind's super-blocks take ``_dots_wide``, else ``offset_pairs`` of q3_K's
    offset (4) or q6_K's (32); an empty array for q2_K's narrow groups (and the kinds of other
    families, typed here too)."""
    raise NotImplementedError("decode._k_group_terms runs inside the compiled kernels only")


@overload(_k_group_terms, inline="always")
def _k_group_terms_of(kind, xq, x_bsums, isa):
    if not isinstance(kind, ConstantType) or not isinstance(isa, IsaType):
        return None
    if _wide_dots(kind, isa):
        return lambda kind, xq, x_bsums, isa: joined_halves(xq)
    if kind.code == 6:
        return lambda kind, xq, x_bsums, isa: offset_pairs(xq, 4)
    if kind.code == 9:
        return lambda kind, xq, x_bsums, isa: offset_pairs(xq, 32)
    return lambda kind, xq, x_bsums, isa: np.empty(0, np.int32)


# what the row-lane kernels take out of each block's sums: q4_0's 8, q5_0's 16, q8_0's 128 (made unsigned on
# AVX512-VNNI); q4_1 and q5_1 have minimums instead (a term of their own)
_LANE_OFFSETS = (8, 0, 16, 0, 128)


@njit(**_KERNEL)
def _per_row_terms(kind, xq, x_bsums, isa):
    """What a kind's rows share for one activation row: the block starts of the row-lane kinds (q4_0, q8_0 on VNNI),
    the lane biases of a weight offset (q5_0, short q8_0 rows on VNNI), the q8_K sums per 32 (q4_K, q5_K), the
    activations in ``_dots_wide``'s order (q2_K on AVX512-VNNI), the pair sums of the weights' offset
    (``offset_pairs``: q3_K, q6_K); an empty
    array where a kind needs none of them."""
    code = kind_code(kind)
    if _takes_row_lanes(kind, xq.size, isa):
        return block_starts(xq, _LANE_OFFSETS[code])
    if code == 2 or (code == 4 and signed_dot_offset(isa) != 0):   # q8_0 on AVX2 has no offset
        return lane_bias(xq, _legacy_offset(kind, isa), isa)
    if code == 5 or code == 6 or code == 9:
        return _k_group_terms(kind, xq, x_bsums, isa)
    if code == 7 or code == 8:
        return pair_sums(x_bsums)
    return np.empty(0, np.int32)


# Rows of at most this many values of the lane kinds with an offset read their lanes' offsets from ``lane_bias``'s
# array (k bytes beside the k bytes of activations; ``_row_block_dot``); longer rows compute them per block, as the
# array and the activations together (2 k bytes) no longer stayed in a 32 KiB L1 beside the streaming weights at
# k = 11008 (see ``_legacy_row_dot``).
STORED_LANES_MAX_K = 4096


@njit(**_KERNEL)
def _one_token_terms(kind, xq, x_bsums, isa):
    """``_per_row_terms`` for the one-token kernels. The lane kinds with an offset (q5_0, q8_0's rows under 2048 on
    VNNI) take their lane biases from this array for rows up to STORED_LANES_MAX_K values, else from their
    registers (``_legacy_row_dot``: nothing to compute here); q4_0, and q8_0's longer rows on AVX512-VNNI, take the
    row-lane kernels' block starts."""
    code = kind_code(kind)
    if (code == 2 or code == 4) and not _takes_row_lanes(kind, xq.size, isa) and xq.size > STORED_LANES_MAX_K:
        return np.empty(0, np.int32)
    return _per_row_terms(kind, xq, x_bsums, isa)


@njit(**_KERNEL)
def paired_bsums(x_bsums):
    """q8_K's sums per 16 (int32, 16 per super-block) as int16 in the order q2_K's minimum term reads them
    (``high_nibbles_times_pairs``): per super-block sums 0, 8, 1, 9, ..., 7, 15. Each fits: 16 values of at most
    127 in size."""
    pairs = np.empty(x_bsums.size, np.int16)
    for s in range(0, x_bsums.size, 16):
        for i in range(8):
            pairs[s + 2 * i] = x_bsums[s + i]
            pairs[s + 2 * i + 1] = x_bsums[s + i + 8]
    return pairs


def _min_sums(kind, x_bsums):
    """The sums per 16 as the row kernels read them: ``paired_bsums`` for q2_K, an empty int16 array for the other
    kinds (which read none; their rows are typed with q2_K's branch too)."""
    raise NotImplementedError("decode._min_sums runs inside the compiled kernels only")


@overload(_min_sums, inline="always")
def _min_sums_of(kind, x_bsums):
    if not isinstance(kind, ConstantType):
        return None
    if kind.code == 5:
        return lambda kind, x_bsums: paired_bsums(x_bsums)
    return lambda kind, x_bsums: np.empty(0, np.int16)


@njit(inline="always", **_KERNEL)
def _chunk_rows(total, chunk, n_chunks):
    """Output rows first..last of chunk ``chunk`` of ``n_chunks`` equal chunks (in output order) of ``total``."""
    per_chunk = (total + n_chunks - 1) // n_chunks
    first = min(total, chunk * per_chunk)
    return first, min(total, first + per_chunk)


@njit(inline="always", **_KERNEL)
def _piece(starts, row_counts, row_bytes, first, last):
    """The rows from output row ``first`` (before ``last``) that one matrix holds: (the byte of the first, how
    many). A launch's matrices are few (q, k, v at most), so the walk from the first matrix costs nothing."""
    m = 0
    matrix_first = 0
    while first >= matrix_first + row_counts[m]:
        matrix_first += row_counts[m]
        m += 1
    return starts[m] + (first - matrix_first) * row_bytes, min(last, matrix_first + row_counts[m]) - first


@njit(inline="always", **_KERNEL)
def one_token_operands(kind, xq, x_scale, x_sums, x_bsums, out, isa):
    """What ``_one_token_rows`` takes besides the weights for one activation row: the rows' shared terms
    (``_one_token_terms``: q4_K / q5_K's sums per 32 ...), the sums per 16 as the row kernels read them
    (``_min_sums``), and ``out``, the scales and the q8_1 sums in the few-token layout (one token)."""
    return (_one_token_terms(kind, xq, x_bsums, isa), _min_sums(kind, x_bsums), out.reshape(1, out.size),
            x_scale.reshape(1, x_scale.size), x_sums.reshape(1, x_sums.size))


@njit(parallel=True, nogil=True, **_KERNEL)
def matvec(kind, w, starts, row_counts, row_bytes, xq, x_scale, x_sums, x_bsums, out, n_chunks, isa):
    """One activation row (one token) times the rows of one or more weight matrices of one type (``kind``: its
    ``Kind`` constant, ``KIND_ARGS[KINDS[type]]``, so each type compiles its own kernel when first used)
    that share it (q, k and v; gate and up), in one parallel launch: the decode step.

    ``w``: a byte array holding the matrices (the model file's memory map); matrix m's rows start at byte
    ``starts[m]``, ``row_counts[m]`` rows of ``row_bytes`` each, their results at ``out[sum(row_counts[:m]):]``.
    ``xq`` int8 [k] and ``x_scale`` float32 [k / block]: the activations quantized to the type's vec_dot_type;
    ``x_sums``: q8_1's s per block (float32; q4_1, q5_1), ``x_bsums``: q8_K's sums per 16 (int32; K-quants); each
    is unread (may be empty) for the other kinds. The weight rows of all the matrices are cut into ``n_chunks``
    equal chunks, one prange iteration each."""
    bias, min_sums, rows, scales, sums = one_token_operands(kind, xq, x_scale, x_sums, x_bsums, out, isa)
    for chunk in prange(n_chunks):
        matvec_chunk(kind, w, starts, row_counts, row_bytes, xq, scales, sums, min_sums, bias, rows, chunk, n_chunks,
                     isa)


@njit(inline="always", **_KERNEL)
def matvec_chunk(kind, w, starts, row_counts, row_bytes, xq, scales, sums, min_sums, bias, rows, chunk, n_chunks, isa):
    """Chunk ``chunk`` of ``n_chunks`` (equal, in output order) of ``matvec``'s rows, with its operands
    (``one_token_operands``: bias, min_sums, rows, scales, sums)."""
    first, last = _chunk_rows(rows.shape[1], chunk, n_chunks)
    while first < last:
        start, n = _piece(starts, row_counts, row_bytes, first, last)
        _one_token_rows(kind, w, start, row_bytes, n, xq, xq.size, scales, sums, min_sums, bias, rows, first, isa)
        first += n


@njit(nogil=True, **_KERNEL)
def matvec_here(kind, w, starts, row_counts, row_bytes, xq, x_scale, x_sums, x_bsums, out, isa):
    """``matvec`` on the calling thread, without a parallel launch: for the small matrices of a decode step (q, k,
    v, the attention output: 0.1-0.7 MB), where waking the other threads costs as much as the rows. The same row
    kernel, so the same numbers."""
    bias, min_sums, rows, scales, sums = one_token_operands(kind, xq, x_scale, x_sums, x_bsums, out, isa)
    first = 0
    for m in range(row_counts.size):
        _one_token_rows(kind, w, starts[m], row_bytes, row_counts[m], xq, xq.size, scales, sums, min_sums, bias,
                        rows, first, isa)
        first += row_counts[m]


@njit(parallel=True, nogil=True, **_KERNEL)
def matmul_few(kind, w, starts, row_counts, row_bytes, xq, x_scale, x_sums, x_bsums, out, n_chunks, isa):
    """``matvec`` for a few tokens: ``xq`` [n_tokens, k], ``x_scale`` / ``x_sums`` / ``x_bsums`` one row per token,
    ``out`` [n_tokens, total rows]. Each weight row meets every token while it is in L1, a tile of TILE tokens at
    a time that unpacks each of its blocks once; each (row, token) result is the one-token kernel's, bit for bit,
    whatever batch the token is part of (prompt caching and continuous batching rely on it)."""
    n_tokens, k = xq.shape
    bias = np.zeros((n_tokens, k // 4), np.int32)   # q4_K / q5_K: their sums per 32 in the first k/32
    for t in range(n_tokens):
        terms = _per_row_terms(kind, xq[t], x_bsums[t], isa)
        bias[t, :terms.size] = terms
    flat_xq = xq.reshape(-1)
    flat_xu = flat_xq.view(np.uint8) ^ np.uint8(128)   # x + 128 as unsigned bytes (see _unsigned_x)
    flat_bsums = _min_sums(kind, x_bsums.reshape(-1))
    flat_bias = bias.reshape(-1)
    for chunk in prange(n_chunks):
        first, last = _chunk_rows(out.shape[1], chunk, n_chunks)
        while first < last:
            start, n = _piece(starts, row_counts, row_bytes, first, last)
            _rows(kind, w, start, row_bytes, n, flat_xq, flat_xu, k, x_scale, x_sums, flat_bsums, flat_bias, out,
                  first, isa)
            first += n


# ----------------------------------------------------------------------------------------------------------------
# Weight rows expanded group by group (32 values: two 16-value halves with a scale and an offset each, value =
# q * scale - offset), with the same block expansion as the kernels above. One walk per row, three sinks:
# ``_FLOATS`` writes float32 values with the type table's arithmetic (a multiply, then a subtract: bit-exact to
# quant/legacy.py and quant/kquants.py; the BLAS path of prompt processing), ``_PANEL`` writes the signed byte
# quants, their lane biases and the halves' scales and offsets per int32 lane (gemm.py's exact few-token GEMM),
# ``_ROW_PANEL`` the same numbers with 16 rows interleaved dword by dword (gemm.py's prompt GEMM).
# ----------------------------------------------------------------------------------------------------------------

class Sink(KernelConstant):
    """Where ``_walk_rows`` puts each group: ``_FLOATS``, ``_PANEL`` or ``_ROW_PANEL``."""

    label = "sink"


_FLOATS, _PANEL, _ROW_PANEL = Sink(0, "floats"), Sink(1, "panel"), Sink(2, "row panel")
sink_code = _constant_reader("sink")


@njit(inline="always", **_KERNEL)
def _emit_floats(floats, quants, bias, lane_scale, lane_offset, r, row_base, base, q, scale_a, scale_b, offset_a,
                 offset_b, isa):
    store_scaled(floats, base, q, scale_a, scale_b, offset_a, offset_b)


@njit(inline="always", **_KERNEL)
def _emit_panel(floats, quants, bias, lane_scale, lane_offset, r, row_base, base, q, scale_a, scale_b, offset_a,
                offset_b, isa):
    store_32_bytes(quants, base, q)
    store_8_i32(bias, base // 4, minus_128_sums(q, isa))
    store_halves_f32x8(lane_scale, base // 4, scale_a, scale_b)
    if lane_offset.size:
        lane_offset[base // 16] = offset_a
        lane_offset[base // 16 + 1] = offset_b


@njit(inline="always", **_KERNEL)
def _emit_row_panel(floats, quants, bias, lane_scale, lane_offset, r, row_base, base, q, scale_a, scale_b, offset_a,
                    offset_b, isa):
    # row-interleaved (gemm.py's prompt kernel), P = lane_rows(isa) rows (16, or 8 on AVX-VNNI and AVX2): dword j
    # of every row side by side (quants[4 P j + 4 r:4 P j + 4 r + 4] = row r's values 4j .. 4j + 3), and per 16
    # values h the rows' scale and offset at [P h + r]. On the VNNI paths the quants are unsigned q + 128 (the
    # kernel takes 128 * the token's sums back out); on AVX2 they stay signed (the tokens' bytes are the unsigned
    # side there) and ``bias`` holds -128 * each row's sum of its 16 quants, which takes the tokens' + 128 out
    n = lane_rows(isa)
    v = base - row_base
    h = v // 16
    if has_vnni(isa):
        store_dwords(quants, n * v + 4 * r, 4 * n, add_bytes(q, splat_bytes(-128)))
    else:
        store_dwords(quants, n * v + 4 * r, 4 * n, q)
        low, high = half_sums(q)
        bias[n * h + r] = np.int32(-128) * low
        bias[n * h + n + r] = np.int32(-128) * high
    lane_scale[n * h + r] = scale_a
    lane_scale[n * h + n + r] = scale_b
    lane_offset[n * h + r] = offset_a
    lane_offset[n * h + n + r] = offset_b


def _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, row_base, base, q, scale_a, scale_b, offset_a,
          offset_b, isa):
    """One 32-value group (values ``base`` .. ``base + 31`` of the destination; row r's from ``row_base``): signed
    byte quants ``q`` and, for each 16-value half, its scale and offset, into ``sink``'s arrays. ``_PANEL`` keeps
    ``lane_offset`` only where it has room (the kinds with offsets: q4_1, q5_1, q2_K, q4_K, q5_K), one per 16
    values. The sink's function is chosen at compile time (``_emit_of_sink``)."""
    raise NotImplementedError("decode._emit runs inside the compiled kernels only")


_SINK_EMIT = {0: _emit_floats, 1: _emit_panel, 2: _emit_row_panel}


@overload(_emit, inline="always")
def _emit_of_sink(sink, floats, quants, bias, lane_scale, lane_offset, r, row_base, base, q, scale_a, scale_b,
                  offset_a, offset_b, isa):
    if not isinstance(sink, ConstantType) or sink.label != "sink":
        return None
    emit = _SINK_EMIT[sink.code]

    def chosen(sink, floats, quants, bias, lane_scale, lane_offset, r, row_base, base, q, scale_a, scale_b,
               offset_a, offset_b, isa):
        emit(floats, quants, bias, lane_scale, lane_offset, r, row_base, base, q, scale_a, scale_b, offset_a,
             offset_b, isa)
    return chosen


@njit(inline="always", **_KERNEL)
def _walk_legacy(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa):
    """Values v0 .. v1 of the row at byte ``row`` (destination from ``base``) of a legacy kind: blocks of 32."""
    kc = kind_code(kind)
    zero = np.float32(0.0)
    for b in range(v0 // 32, v1 // 32):
        if kc == 0:
            o = row + 18 * b
            d = load_f16(w, o)
            _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, base + 32 * b,
                  add_bytes(_q4_quants(w, o + 2), splat_bytes(-8)), d, d, zero, zero, isa)
        elif kc == 1:
            o = row + 20 * b
            d = load_f16(w, o)
            m = -load_f16(w, o + 2)
            _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, base + 32 * b,
                  _q4_quants(w, o + 4), d, d, m, m, isa)
        elif kc == 2:
            o = row + 22 * b
            d = load_f16(w, o)
            q = _q5_quants(w, o + 2)
            _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, base + 32 * b,
                  add_bytes(q, splat_bytes(-16)), d, d, zero, zero, isa)
        elif kc == 3:
            o = row + 24 * b
            d = load_f16(w, o)
            m = -load_f16(w, o + 2)
            q = _q5_quants(w, o + 4)
            _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, base + 32 * b, q,
                  d, d, m, m, isa)
        else:
            o = row + 34 * b
            d = load_f16(w, o)
            _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, base + 32 * b,
                  load_32_bytes(w, o + 2), d, d, zero, zero, isa)


@njit(inline="always", **_KERNEL)
def _walk_k4(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa):
    """q4_K, q5_K: super-blocks of 256, eight groups of 32 with six-bit scales and mins."""
    kc = kind_code(kind)
    for b in range(v0 // 256, v1 // 256):
        x = base + 256 * b
        size = 144 if kc == 7 else 176
        o = row + size * b
        d = load_f16(w, o)
        dmin = load_f16(w, o + 2)
        words = _scale_min_words(w, o + 4)
        for c in range(4):
            scales = words[c // 2] >> (16 * (c & 1))
            mins = words[2 + c // 2] >> (16 * (c & 1))
            if kc == 7:
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
            _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, x + 64 * c, low,
                  d1, d1, m1, m1, isa)
            _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, x + 64 * c + 32,
                  high, d2, d2, m2, m2, isa)


@njit(inline="always", **_KERNEL)
def _walk_q6_K(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa):
    zero = np.float32(0.0)
    for b in range(v0 // 256, v1 // 256):
        x = base + 256 * b
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
                _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, x + 128 * n + 32 * part,
                      add_bytes(q, minus32), scale_a, scale_b, zero, zero, isa)


@njit(inline="always", **_KERNEL)
def _walk_q3_K(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa):
    # The prompt GEMM's row panel (``_ROW_PANEL``) sums a whole super-block in integers (gemm.py, ``_row_tile``):
    # on the VNNI paths its quants are folded with their groups' scales, -scale * q (-32..31 times -4..3:
    # -128..124, a signed byte) with -d as the rows' scale; on AVX2 (whose byte products must stay small) they stay
    # q, the groups' integer scales go as floats into ``lane_scale`` and d into ``lane_offset``, which q3_K has no
    # other use for. Both give sum(scale * q * x) exactly, then one float step per super-block.
    zero = np.float32(0.0)
    row_panel = sink_code(sink) == 2
    for b in range(v0 // 256, v1 // 256):
        x = base + 256 * b
        o = row + 110 * b
        d = load_f16(w, o + 108)
        words = _q3_K_scale_words(w, o + 96)
        for n in range(2):
            for j in range(4):
                g = 8 * n + 2 * j
                q = add_bytes(_k_quants(kind, w, o, n, j), splat_bytes(-4))
                pair = words[g // 4] >> (8 * (g % 4))     # scales g and g + 1 (g is even)
                int_a = np.int32(pair & 0xFF) - 32
                int_b = np.int32((pair >> 8) & 0xFF) - 32
                if row_panel and has_vnni(isa):
                    q, scale_a, scale_b, offset = times_byte_halves(q, -int_a, -int_b), -d, -d, zero
                elif row_panel:
                    scale_a, scale_b, offset = np.float32(int_a), np.float32(int_b), d
                else:
                    scale_a, scale_b, offset = d * np.float32(int_a), d * np.float32(int_b), zero
                _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, x + 128 * n + 32 * j,
                      q, scale_a, scale_b, offset, offset, isa)


@njit(inline="always", **_KERNEL)
def _walk_q2_K(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa):
    for b in range(v0 // 256, v1 // 256):
        x = base + 256 * b
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
                _emit(sink, floats, quants, bias, lane_scale, lane_offset, r, base, x + 128 * n + 32 * j,
                      shift_right_and(packed, 2 * j, 3), scale_a, scale_b, min_a, min_b, isa)


def _walk_slice(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa):
    """Values v0 .. v1 (multiples of the kind's block) of the row at byte ``row`` into ``sink``: the kind's own
    walk, chosen at compile time (``_walk_of_kind``), so that a kernel types and compiles one format's code and
    one sink's, not all ten and all three (a dequantizer took 11 s to compile per type on a Zen 3 before)."""
    raise NotImplementedError("decode._walk_slice runs inside the compiled kernels only")


_KIND_WALK = {0: _walk_legacy, 1: _walk_legacy, 2: _walk_legacy, 3: _walk_legacy, 4: _walk_legacy,
              5: _walk_q2_K, 6: _walk_q3_K, 7: _walk_k4, 8: _walk_k4, 9: _walk_q6_K}


@overload(_walk_slice, inline="always")
def _walk_of_kind(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa):
    if not isinstance(kind, ConstantType) or kind.label != "kind":
        return None
    walk = _KIND_WALK[kind.code]

    def chosen(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa):
        walk(kind, w, row, base, r, v0, v1, sink, floats, quants, bias, lane_scale, lane_offset, isa)
    return chosen


@njit(inline="always", **_KERNEL)
def _walk_rows(kind, w, start, row_bytes, n_rows, k, sink, floats, quants, bias, lane_scale, lane_offset, isa):
    """Every group of ``n_rows`` rows (from byte ``start`` of ``w``, ``row_bytes`` apart) into ``sink``; row r's
    values go to r * k .. r * k + k - 1 of the destination."""
    # the row panel interleaves its rows: it is written 256 values of every row at a time, so that the panel's
    # bytes for those (4 KiB) stay in L1 while the rows fill them
    slice_values = 256 if sink_code(sink) == 2 else k
    for v0 in range(0, k, slice_values):
        v1 = min(k, v0 + slice_values)
        for r in range(n_rows):
            _walk_slice(kind, w, start + r * row_bytes, r * k, r, v0, v1, sink, floats, quants, bias, lane_scale,
                        lane_offset, isa)


@njit(nogil=True, **_KERNEL)
def dequantize_rows(kind, w, start, row_bytes, out, isa):
    """out[i] = row i of the matrix whose rows start at byte ``start`` of ``w`` (out: float32 [n, k]); ``kind``
    is the type's ``Kind``."""
    n_rows, k = out.shape
    unused = np.empty(0, np.float32)     # the panel's arrays (the _PANEL branch is compiled away)
    _walk_rows(kind, w, start, row_bytes, n_rows, k, _FLOATS, out.reshape(-1), np.empty(0, np.int8),
               np.empty(0, np.int32), unused, unused, isa)


@njit(nogil=True, **_KERNEL)
def unpack_panel(kind, w, start, row_bytes, n_rows, k, quants, bias, lane_scale, lane_offset, isa):
    """Rows of the matrix from byte ``start`` as a GEMM panel: quants int8 [n_rows * k], bias int32 and lane_scale
    float32 [n_rows * k / 4] (per int32 lane), lane_offset float32 [n_rows * k / 16] (per 16 values; may be empty
    for the kinds without offsets)."""
    _walk_rows(kind, w, start, row_bytes, n_rows, k, _PANEL, np.empty(0, np.float32), quants, bias, lane_scale,
               lane_offset, isa)


@njit(nogil=True, **_KERNEL)
def unpack_row_panel(kind, w, start, row_bytes, n_rows, k, quants, sums, scale, offset, isa):
    """Up to ``lane_rows(isa)`` rows (16 or 8) of the matrix from byte ``start`` as a row-interleaved GEMM panel
    (see ``_emit_row_panel``): quants uint8 [lane_rows * k] (q + 128 on the VNNI paths, q on AVX2), on AVX2 sums
    int32 [k] (-128 * each row's sum per 16 values), scale and offset float32 [k] (zeros for the kinds without
    offsets; 16 rows fill them, 8 their first half); the entries of rows past ``n_rows`` are left as they are."""
    _walk_rows(kind, w, start, row_bytes, n_rows, k, _ROW_PANEL, np.empty(0, np.float32), quants, sums, scale,
               offset, isa)
