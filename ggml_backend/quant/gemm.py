"""Prompt processing on integer dot products: many tokens times a weight matrix in a ggml block format.

A prompt multiplies every weight by many tokens, so the arithmetic, not the memory, bounds it. The BLAS path
dequantizes bands of weights to float32 and runs sgemm: 16 float multiply-adds per instruction on AVX-512, 8 on
AVX2, plus the dequantization. Here weights stay 8-bit and one ``vpdpbusd`` on a 512-bit register does 64 byte
multiply-adds (32 on 256 bits). Two kernels, both with llama.cpp's quantized activations (``GemmTokens``: the type's
``vec_dot_type``, q8_0, q8_1 or q8_K) and the block decoders every other kernel uses (``decode._walk_rows``,
expanding a panel of rows once per block of tokens into signed byte quants q, value = q * scale - offset per 16
values):

**The prompt kernel** (``gemm_rows``; ``gemm_product``'s default; every SIMD path). The lanes of a register are
weight rows, 16 on AVX512-VNNI and 8 on AVX-VNNI and AVX2 (``simd.lane_rows``): the panel holds dword j (values
4j .. 4j + 3) of its rows side by side as unsigned q + 128, and a token's four activation bytes are broadcast to
the lanes (on AVX512-VNNI an embedded broadcast of ``vpdpbusd``'s memory operand). Per group of values sharing a
scale (32, or 16 for q2_K, q3_K, q6_K) and per token of a register tile (8 tokens on AVX512-VNNI's 32 registers,
4 on the others' 16)::

    acc_int = -128 * (sum of the token's x in the group)        # takes the panel's + 128 back out
    acc_int = vpdpbusd(acc_int, panel dword j, x dword j)        # 8 (or 4) times: exact group sums, one per row
    acc = acc + float(acc_int) * (scale_rows * scale_x)          # vcvtdq2ps, vmulps, vfmadd
    acc = acc - offset_rows * (d_x * sum x per 16)               # the kinds with offsets (q4_1 ... q5_K)

that is 11 instructions per 512 multiply-adds of a 32-group where a tile of 16 lanes of values spends 32, and the
results come out as 16 rows per store, with no horizontal sums. Each row's groups are summed exactly and added in
float32 one after the other, as llama.cpp's repacked kernels do. 2x the lane kernel on Zen 5 for every type.
q3_K's groups of 16 spent as many float steps as integer ones; its 6-bit scales times its 3-bit quants still fit a
byte (-scale * q: -128..124), so on the VNNI paths the panel holds them folded and a whole super-block is one
integer sum (64 ``vpdpbusd`` per token and register, then one float step with -d), which is also llama.cpp's
order for a q3_K row (integers over the super-block, then d * d_x). AVX2 gets the same bits group by group (below).
Two Zen 4 cores: 4096 x 4096 by 256 tokens 213 -> 255 GMAC/s, a 7B-shaped q3_K prompt 28 -> 35 tok/s. AVX2
has no ``vpdpbusd``: ``vpmaddubsw`` sums pairs of unsigned x signed products into int16, which q + 128 times x
could pass, so there the sides swap: the panel keeps the signed q (at most 32 in magnitude for every kind but
q8_0), the tokens' bytes are x + 128 (unsigned), and each group starts from -128 * the rows' sums of q, kept beside
the panel; ``vpmaddwd`` with ones then adds the pairs into the int32 lanes. q8_0's quants reach 127, so it
multiplies signed by signed instead: the panel's absolute values by the token's bytes with the panel's signs
(``vpsignb``, ggml's ``mul_sum_i8_pairs``; its activations stay within -127..127), from zero. The integers are the
same, so every path's prompt kernel gives the same numbers bit for bit (q3_K on AVX2: each group's exact sum times
its integer scale added in float32, exact below 2 ** 24, then the super-block's float step). Measured on a Sapphire
Rapids Xeon with the code compiled for an Alder Lake (AVX-VNNI) and for a Zen 3 (AVX2; see benchmarks/README.md):
prompts 1.7x / 1.5x those of dequantize + sgemm, 2.0x / 1.5x llama.cpp built for those instruction sets.

**The exact kernel** (``gemm``; ``exact=True``), for products of a few tokens (continuous batching) that must
give each token its one-token numbers: lanes are values. A register tile of PANEL_ROWS rows by TILE_TOKENS tokens
(16 float accumulators of 16 lanes), per 64 values and (row, token) ``dot = vpdpbusd(bias_row, x + 128, q)``
(the lane biases -128 * sums of four q take the 128 out) and ``acc += float(dot) * (scale_row * scale_x)``, the
16 lanes summed at the end; for q5_0 these are the one-token kernel's two 8-lane chains, for q8_0 (rows under
2048) its one chain (the halves folded in order), bit for bit (EXACT_KINDS). q4_0 and q8_0's longer rows need
neither: on this path their one-token and few-token kernels (``decode._rows_lanes``) put rows in lanes and give the
prompt kernel's numbers. The K-quants (q2_K to q6_K) have their own (``gemm_k``): a super-block's products summed
as integers (``vpmaddubsw``, then ``vpdpwssd`` with the groups' scales) before the float step the one-token kernel
takes per super-block, so they are its results bit for bit.

In both, each (row, token) result depends only on that row and that token, in a fixed order: a prompt's rows
come out the same whatever batch they are part of (prompt caching relies on it). Tokens are taken in blocks small
enough that a block's activations stay in L2 beside the panel; each thread takes a contiguous range of panels and
walks every block through them.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from .decode import (
    _KERNEL, KIND_ARGS, ConstantType, _k4_chunk, _k_group, _k_group_d, _k_scales, kind_code, minus_128_sums,
    paired_bsums, unpack_panel, unpack_row_panel,
)
from .simd import (
    AVX512VNNI, IsaType, add_bytes, add_f32x16, add_i32x8, add_lanes, dot_panel_dword, dot_signed_panel_dword,
    dot_u8_i8_x64, dot_word_pairs_x16, fma_i32x16, fma_i32x16_folded, fma_i32x8, fma_lanes, fnma_lanes,
    fold_halves_i32x16, has_vnni, high_nibbles_times_pairs, lane_rows, load_16_bytes_twice, load_16_f32, load_16_i32,
    load_64_bytes, load_f16, load_lane_floats, load_lane_ints, mul_f32x16, mul_i32x8, prefetch, scaled_dot,
    splat_bytes, splat_lane_floats, splat_lane_ints, store_32_bytes, store_8_i32, store_f32_lanes, sum_f32x16,
    sum_f32x8, to_f32x16, to_scale_words, zero_f32x16, zero_f32x8, zero_i32x16, zero_i32x8, zero_lane_ints, zero_lanes,
)

PANEL_ROWS = 4     # weight rows of a register tile of the exact GEMM (the kernel is written out for 4)
TILE_TOKENS = 4    # tokens of a register tile of the exact GEMM (likewise)
# the prompt GEMM's panel rows and register tile come from the path: lane_rows(isa) and _tile_tokens(isa)
PAD_TOKENS = 8     # GemmTokens pads its tokens to a multiple of every tile
CHUNKS_PER_THREAD = 2    # prange iterations per thread: some balancing when a thread is slowed

# Bytes of activations per block of tokens (the exact GEMM's x + 128 and lane scales, the prompt GEMM's quants):
# with the panel (4 * k * 3 or 16 * k + 8 * k bytes) a block stays in a 1 MiB L2.
BLOCK_BYTES = 768 * 1024


# The kinds whose GEMM results are the one-token kernel's bit for bit: q5_0 (q4_0 did, before its row lanes)
# accumulates in two 8-lane chains (even and odd blocks), which are the GEMM's 16 lanes, and sums them in the same
# order; q8_0 (rows under 2048: longer ones take row lanes) in one chain, into which the GEMM folds its two halves in
# order (``_scaled_add``; q8_0 given two chains in decode read 10-13 GB/s per core against 17-23 with its one). The
# K-quants have their own exact kernel (``gemm_k``).
K_EXACT_KINDS = (5, 6, 7, 8, 9)
EXACT_KINDS = (2, 4) + K_EXACT_KINDS

# Products with a few tokens (continuous batching, short prompts), which must give each token its one-token
# numbers, take the exact GEMM from this many tokens on, per kind; the others stay on the few-token tiles. Zen 5,
# 2 threads, Qwen2.5-0.5B's shapes, tiles / GEMM GMAC/s at 8 and 16 tokens: q4_0 71 / 72 and 72 / 95 (12 tokens),
# q5_0 63 / 63 and 63 / 84 (896 x 896: 34 / 42 at 8), q4_K 38 / 60 and 37 / 73 (12), q6_K 45-50 / 49 and 53 / 75;
# q8_0 71 / 48 and 72-94 / 65-79, so q8_0 (whose GEMM takes two dependent 8-lane fused adds per 64 values)
# stays on the tiles. Below 8 tokens the tiles are as fast or faster for every kind.
EXACT_FROM_TOKENS = {2: 8, 5: 8, 6: 8, 7: 8, 8: 8, 9: 8}


def isa_has_gemm(isa) -> bool:
    """Whether the SIMD path ``isa`` (simd.Isa or None) has the exact GEMMs (``gemm``, ``gemm_k``: few-token
    products that equal the one-token kernels): AVX512-VNNI only (``vpdpbusd`` on 512 bits)."""
    return isa is AVX512VNNI


#: the kinds whose quants exceed 32 in magnitude (q8_0): on AVX2 a pair of their products with unsigned x + 128
#: could pass ``vpmaddubsw``'s int16, so there they take the signed form (``_signed_panel``)
WIDE_QUANT_KINDS = (4,)


def prompt_gemm_takes(isa, kind) -> bool:
    """Whether the SIMD path ``isa`` (simd.Isa or None) runs the prompt kernel (``gemm_rows``) for a block kind
    (decode.KINDS; None for float types): every block kind on every SIMD path, sixteen rows a register on
    AVX512-VNNI, eight on AVX-VNNI (``vpdpbusd``) and AVX2 (``vpmaddubsw`` + ``vpmaddwd``)."""
    return isa is not None and kind is not None


def _signed_panel(kind: int, vnni: bool) -> bool:
    """Whether the prompt kernel multiplies signed quants by signed values (q8_0 on AVX2: ``vpsignb``) for a block
    kind (a decode.KINDS code) on a path with or without ``vpdpbusd``: asked at typing time by ``_panel_dot`` and at
    run time by ``GemmTokens.xs_for``."""
    return kind in WIDE_QUANT_KINDS and not vnni


# ----------------------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------------------

@njit(inline="always", **_KERNEL)
def _has_offsets(kind):
    """Whether the kind's groups have offsets (value = q * scale - offset): q4_1, q5_1, q2_K, q4_K, q5_K."""
    kc = kind_code(kind)
    return kc == 1 or kc == 3 or kc == 5 or kc == 7 or kc == 8


@njit(inline="always", **_KERNEL)
def _scaled_add(kind, acc, dot, scale_row, scale_x):
    """acc + float(dot) * (scale_row * scale_x): in 16 lanes (two chains, even and odd blocks: q4_0, q5_0 and the
    others), or folded into one 8-lane chain (q8_0, whose one-token kernel has one)."""
    if kind_code(kind) == 4:
        return fma_i32x16_folded(acc, dot, scale_row, scale_x)
    return fma_i32x16(acc, dot, scale_row, scale_x)


@njit(**_KERNEL)
def _token_step(kind, a0, a1, a2, a3, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3, xu, xsl, x, lx, isa):
    """One token's 64 values (at xu[x:], its lane scales at xsl[lx:]) against the panel's four rows."""
    u = load_64_bytes(xu, x)
    xs = load_16_f32(xsl, lx)
    a0 = _scaled_add(kind, a0, dot_u8_i8_x64(b0, u, q0, isa), s0, xs)
    a1 = _scaled_add(kind, a1, dot_u8_i8_x64(b1, u, q1, isa), s1, xs)
    a2 = _scaled_add(kind, a2, dot_u8_i8_x64(b2, u, q2, isa), s2, xs)
    a3 = _scaled_add(kind, a3, dot_u8_i8_x64(b3, u, q3, isa), s3, xs)
    return a0, a1, a2, a3


@njit(**_KERNEL)
def _offset_step(a0, a1, a2, a3, offsets, g, k16, xsum, gx):
    """One token's sums of 16 groups of 16 values (at xsum[gx:]) times the four rows' offsets of those groups."""
    sums = load_16_f32(xsum, gx)
    a0 = fnma_lanes(a0, load_16_f32(offsets, g), sums)
    a1 = fnma_lanes(a1, load_16_f32(offsets, g + k16), sums)
    a2 = fnma_lanes(a2, load_16_f32(offsets, g + 2 * k16), sums)
    a3 = fnma_lanes(a3, load_16_f32(offsets, g + 3 * k16), sums)
    return a0, a1, a2, a3


@njit(**_KERNEL)
def _store_column(out, t, n_tokens, row, a0, a1, a2, a3):
    # out's column ``row``: the caller adds the column of the matrix's first row
    out[t, row] = sum_f32x16(a0)
    if t + 1 < n_tokens:
        out[t + 1, row] = sum_f32x16(a1)
    if t + 2 < n_tokens:
        out[t + 2, row] = sum_f32x16(a2)
    if t + 3 < n_tokens:
        out[t + 3, row] = sum_f32x16(a3)


@njit(**_KERNEL)
def _tile(kind, quants, bias, scale, offsets, k, xu, xsl, xsum, n_sums, t, out, n_tokens, row, n_valid, isa):
    """out[t:t + 4, row:row + n_valid] from the panel and tokens t .. t + 3."""
    k4 = k // 4
    a00 = zero_f32x16()
    a01 = zero_f32x16()
    a02 = zero_f32x16()
    a03 = zero_f32x16()
    a10 = zero_f32x16()
    a11 = zero_f32x16()
    a12 = zero_f32x16()
    a13 = zero_f32x16()
    a20 = zero_f32x16()
    a21 = zero_f32x16()
    a22 = zero_f32x16()
    a23 = zero_f32x16()
    a30 = zero_f32x16()
    a31 = zero_f32x16()
    a32 = zero_f32x16()
    a33 = zero_f32x16()
    for c in range(k // 64):
        x = 64 * c
        lo = 16 * c
        q0 = load_64_bytes(quants, x)
        q1 = load_64_bytes(quants, k + x)
        q2 = load_64_bytes(quants, 2 * k + x)
        q3 = load_64_bytes(quants, 3 * k + x)
        b0 = load_16_i32(bias, lo)
        b1 = load_16_i32(bias, k4 + lo)
        b2 = load_16_i32(bias, 2 * k4 + lo)
        b3 = load_16_i32(bias, 3 * k4 + lo)
        s0 = load_16_f32(scale, lo)
        s1 = load_16_f32(scale, k4 + lo)
        s2 = load_16_f32(scale, 2 * k4 + lo)
        s3 = load_16_f32(scale, 3 * k4 + lo)
        a00, a10, a20, a30 = _token_step(kind, a00, a10, a20, a30, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3,
                                         xu, xsl, t * k + x, t * k4 + lo, isa)
        a01, a11, a21, a31 = _token_step(kind, a01, a11, a21, a31, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3,
                                         xu, xsl, (t + 1) * k + x, (t + 1) * k4 + lo, isa)
        a02, a12, a22, a32 = _token_step(kind, a02, a12, a22, a32, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3,
                                         xu, xsl, (t + 2) * k + x, (t + 2) * k4 + lo, isa)
        a03, a13, a23, a33 = _token_step(kind, a03, a13, a23, a33, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3,
                                         xu, xsl, (t + 3) * k + x, (t + 3) * k4 + lo, isa)
    if _has_offsets(kind):
        # offsets per 16 values, 16 groups at a time (the panel's rows are k / 16 apart and padded at the end;
        # the token sums are n_sums apart, zero past k / 16, which zeroes the neighbouring row's offsets read)
        k16 = k // 16
        for g in range(0, k16, 16):
            a00, a10, a20, a30 = _offset_step(a00, a10, a20, a30, offsets, g, k16, xsum, t * n_sums + g)
            a01, a11, a21, a31 = _offset_step(a01, a11, a21, a31, offsets, g, k16, xsum, (t + 1) * n_sums + g)
            a02, a12, a22, a32 = _offset_step(a02, a12, a22, a32, offsets, g, k16, xsum, (t + 2) * n_sums + g)
            a03, a13, a23, a33 = _offset_step(a03, a13, a23, a33, offsets, g, k16, xsum, (t + 3) * n_sums + g)
    _store_column(out, t, n_tokens, row, a00, a01, a02, a03)
    if n_valid > 1:
        _store_column(out, t, n_tokens, row + 1, a10, a11, a12, a13)
    if n_valid > 2:
        _store_column(out, t, n_tokens, row + 2, a20, a21, a22, a23)
    if n_valid > 3:
        _store_column(out, t, n_tokens, row + 3, a30, a31, a32, a33)


@njit(inline="always", **_KERNEL)
def _prefetch_next_panel(w, start, row_bytes, n_rows, row, part, n_parts):
    """Part ``part`` of ``n_parts`` of the next panel's weight bytes (the rows from ``row + PANEL_ROWS``), asked
    for while this panel's tiles run: unpacking a panel otherwise waits on memory for each of its lines (weights
    stream from memory once per product), a sixth to a quarter of a 16-token product's time on one core."""
    first = row + PANEL_ROWS
    if first >= n_rows:
        return
    n_bytes = min(PANEL_ROWS, n_rows - first) * row_bytes
    per_part = (n_bytes + 64 * n_parts - 1) // (64 * n_parts) * 64
    base = start + first * row_bytes
    for offset in range(part * per_part, min(n_bytes, (part + 1) * per_part), 64):
        prefetch(w, base + offset)


@njit(parallel=True, nogil=True, **_KERNEL)
def gemm(kind, w, start, row_bytes, n_rows, k, xu, xsl, xsum, out, column, block_tokens, n_chunks, isa):
    """out[t, column + r] = token t times weight row r, for the ``n_rows`` rows from byte ``start`` of ``w``
    (``kind``: the type's ``Kind``) and the tokens of ``out`` [n_tokens, >= column + n_rows].

    Token side, padded to a multiple of TILE_TOKENS tokens (padding: zero lane scales): ``xu`` uint8 [tokens * k]
    (x + 128), ``xsl`` float32 [tokens * k / 4] (each int32 lane's activation scale), ``xsum`` float32
    [tokens, n_sums] (d * the sum of each 16 quants, zeros from k / 16 to n_sums, a multiple of 16; may be empty
    for the kinds without offsets). ``k`` must be a multiple of 64. Each of ``n_chunks`` prange iterations takes
    a contiguous range of panels."""
    n_tokens = out.shape[0]
    n_tiles = (n_rows + PANEL_ROWS - 1) // PANEL_ROWS
    per_chunk = (n_tiles + n_chunks - 1) // n_chunks
    with_offsets = _has_offsets(kind)
    n_sums = xsum.shape[1]
    flat_sums = xsum.reshape(-1)
    for chunk in prange(n_chunks):
        first = min(n_tiles, chunk * per_chunk)
        last = min(n_tiles, first + per_chunk)
        if first < last:
            quants = np.empty(PANEL_ROWS * k, np.int8)
            bias = np.empty(PANEL_ROWS * k // 4, np.int32)
            scale = np.empty(PANEL_ROWS * k // 4, np.float32)
            offsets = np.zeros(PANEL_ROWS * k // 16 + 16 if with_offsets else 0, np.float32)
            for t0 in range(0, n_tokens, block_tokens):
                t1 = min(n_tokens, t0 + block_tokens)
                for tile in range(first, last):
                    row = PANEL_ROWS * tile
                    n_valid = min(PANEL_ROWS, n_rows - row)
                    if n_valid < PANEL_ROWS:    # the missing rows of the last panel: zeros, never stored
                        quants[:] = 0
                        bias[:] = 0
                        scale[:] = 0
                        offsets[:] = 0
                    unpack_panel(kind, w, start + row * row_bytes, row_bytes, n_valid, k, quants, bias, scale,
                                 offsets, isa)
                    n_parts = (t1 - t0 + TILE_TOKENS - 1) // TILE_TOKENS
                    for t in range(t0, t1, TILE_TOKENS):
                        _prefetch_next_panel(w, start, row_bytes, n_rows, row, (t - t0) // TILE_TOKENS, n_parts)
                        _tile(kind, quants, bias, scale, offsets, k, xu, xsl, flat_sums, n_sums, t, out, n_tokens,
                              column + row, n_valid, isa)


# ----------------------------------------------------------------------------------------------------------------
# The exact kernel for K-quants (q2_K to q6_K): a super-block's integer sums, then its float steps
# ----------------------------------------------------------------------------------------------------------------
#
# The one-token K-quant kernels sum a whole super-block (256 values) in eight int32 lanes, each 32-value group's
# dot products times its integer scales, before one float step per super-block: acc += float(sums) * (d * d_x).
# q4_K / q5_K add their minimums in a scalar chain, mins += (dmin * d_x) * float(sum of mins * the token's sums
# per 32), the row's result sum(acc) - mins; q2_K takes its minimums times the token's sums per 16 off the same
# eight lanes right after (``_q2_K_min_step``). Lanes are values here too, 64 at a time, with every product kept
# as an integer until the super-block ends:
#
#     sums = init_row                                   # -128 * (the row's scaled quant sums): takes x + 128 back
#     sums = vpdpwssd(sums, vpmaddubsw(x + 128, q), scale words)        # 4 times: 16 lanes, 64 values each time
#     acc = acc + float(sums[0:8] + sums[8:16]) * (d * d_x)             # the one-token kernel's eight lanes
#
# Integers are exact in any order, so the folded lanes are the one-token kernel's sums and each float step is its
# step: the results are its bit for bit. The minimums of the 16 (row, token) pairs of a tile are one vector, a lane
# per pair (``vpdpwssd`` of the rows' mins and the tokens' sums, then the chain's two multiplies and add, each
# rounded as the scalar chain rounds them). A panel holds its rows' signed quants (q2_K, q4_K, q5_K as they are;
# q3_K less 4, q6_K less 32), an int32 lane of scale words (the group's scale in both int16 halves) per four values,
# each super-block's initial lanes and d, for q4_K / q5_K the pairs' dmin and mins (lane 4 r + t: row r), for
# q2_K each row's dmin and scale bytes.


@njit(nogil=True, **_KERNEL)
def unpack_k_panel(kind, w, start, row_bytes, n_rows, k, quants, scale_words, init, d, dmin, mins, scale_bytes,
                   isa):
    """Up to PANEL_ROWS rows of a K-quant matrix from byte ``start`` as ``gemm_k``'s panel: quants int8 [4 k],
    scale_words int32 [k] (row r's at r k / 4), init int32 [4 * k / 256 * 16] and d float32 [4 * k / 256] (row r,
    super-block b at r * k / 256 + b); q4_K / q5_K: dmin float32 [k / 256 * 16] and mins int32 [k / 256 * 64]
    (super-block b, chunk c: lane 4 r + t of [(4 b + c) * 16:], mins 2c and 2c + 1 as int16 halves); q2_K: dmin
    at r * k / 256 + b and its sixteen scale bytes (scale | min << 4) at scale_bytes[16 * (r * k / 256 + b):]."""
    kc = kind_code(kind)
    nb = k // 256
    for r in range(n_rows):
        row = start + r * row_bytes
        for b in range(nb):
            x = r * k + 256 * b
            init_low = zero_i32x8()       # lanes 0-7 of the super-block's sums: the first 32 of each 64 values
            init_high = zero_i32x8()      # lanes 8-15: the second 32
            if kc == 7 or kc == 8:
                o = row + (144 if kc == 7 else 176) * b
                d[r * nb + b] = load_f16(w, o)
                dmin_value = load_f16(w, o + 2)
                for t in range(4):
                    dmin[16 * b + 4 * r + t] = dmin_value
                for c in range(4):
                    q_low, q_high, pair, mpair = _k4_chunk(kind, w, o, c)
                    store_32_bytes(quants, x + 64 * c, q_low)
                    store_32_bytes(quants, x + 64 * c + 32, q_high)
                    low, high = pair & 0xFF, (pair >> 8) & 0xFF
                    store_8_i32(scale_words, (x + 64 * c) // 4, to_scale_words(low))
                    store_8_i32(scale_words, (x + 64 * c) // 4 + 8, to_scale_words(high))
                    init_low = add_i32x8(init_low, mul_i32x8(minus_128_sums(q_low, isa), low))
                    init_high = add_i32x8(init_high, mul_i32x8(minus_128_sums(q_high, isa), high))
                    mins_word = (mpair & 0xFF) | (((mpair >> 8) & 0xFF) << 16)
                    for t in range(4):
                        mins[16 * (4 * b + c) + 4 * r + t] = mins_word
            else:
                o = row + (84 if kc == 5 else 110 if kc == 6 else 210) * b
                d[r * nb + b] = _k_group_d(kind, w, o)
                if kc == 5:
                    dmin[r * nb + b] = load_f16(w, o + 82)
                    for j in range(16):
                        scale_bytes[16 * (r * nb + b) + j] = w[o + j]
                all_scales = _k_scales(kind, w, o)
                for n in range(2):
                    for j in range(4):
                        q, scales = _k_group(kind, w, o, n, j, all_scales)
                        q = add_bytes(q, splat_bytes(0 if kc == 5 else -4 if kc == 6 else -32))
                        at = x + 128 * n + 32 * j
                        store_32_bytes(quants, at, q)
                        store_8_i32(scale_words, at // 4, to_scale_words(scales))
                        terms = mul_i32x8(minus_128_sums(q, isa), scales)
                        if j % 2 == 0:
                            init_low = add_i32x8(init_low, terms)
                        else:
                            init_high = add_i32x8(init_high, terms)
            store_8_i32(init, 16 * (r * nb + b), init_low)
            store_8_i32(init, 16 * (r * nb + b) + 8, init_high)


@njit(**_KERNEL)
def _k_step(i0, i1, i2, i3, q0, q1, q2, q3, s0, s1, s2, s3, xu, x, isa):
    """One token's 64 values (at xu[x:]) against the panel's four rows: their scaled integer sums."""
    u = load_64_bytes(xu, x)
    return (scaled_dot(i0, u, q0, s0, isa), scaled_dot(i1, u, q1, s1, isa),
            scaled_dot(i2, u, q2, s2, isa), scaled_dot(i3, u, q3, s3, isa))


@njit(**_KERNEL)
def _k_float_step(a0, a1, a2, a3, i0, i1, i2, i3, d, nb, b, x_scale):
    """The four rows' float step of a super-block for one token (activation scale ``x_scale``)."""
    a0 = fma_i32x8(a0, fold_halves_i32x16(i0), d[b] * x_scale)
    a1 = fma_i32x8(a1, fold_halves_i32x16(i1), d[nb + b] * x_scale)
    a2 = fma_i32x8(a2, fold_halves_i32x16(i2), d[2 * nb + b] * x_scale)
    a3 = fma_i32x8(a3, fold_halves_i32x16(i3), d[3 * nb + b] * x_scale)
    return a0, a1, a2, a3


@njit(inline="always", **_KERNEL)
def _q2_K_mins(scale_bytes, block, pairs, s):
    """The minimums of the super-block whose scale bytes are at scale_bytes[16 * block:] times one token's sums per
    16 (``paired_bsums`` at pairs[s:]), in the one-token kernel's eight lanes."""
    return high_nibbles_times_pairs(load_16_bytes_twice(scale_bytes, 16 * block), pairs, s)


@njit(**_KERNEL)
def _q2_K_min_step(a0, a1, a2, a3, scale_bytes, dmin, nb, b, bsums, s, x_scale):
    """q2_K: the four rows' minimums times one token's sums per 16 (at bsums[s:]), taken off as its one-token kernel
    takes them, in the same eight lanes right after the super-block's float step."""
    a0 = fma_i32x8(a0, _q2_K_mins(scale_bytes, b, bsums, s), -(dmin[b] * x_scale))
    a1 = fma_i32x8(a1, _q2_K_mins(scale_bytes, nb + b, bsums, s), -(dmin[nb + b] * x_scale))
    a2 = fma_i32x8(a2, _q2_K_mins(scale_bytes, 2 * nb + b, bsums, s), -(dmin[2 * nb + b] * x_scale))
    a3 = fma_i32x8(a3, _q2_K_mins(scale_bytes, 3 * nb + b, bsums, s), -(dmin[3 * nb + b] * x_scale))
    return a0, a1, a2, a3


@njit(**_KERNEL)
def _k_tile(kind, quants, scale_words, init, d, dmin, mins, scale_bytes, k, xu, xd, xd16, xsums, bsums, t, out,
            n_tokens, row, n_valid, pair_mins, isa):
    """out[t:t + 4, row:row + n_valid] from a K panel and tokens t .. t + 3."""
    kc = kind_code(kind)
    nb = k // 256
    k4 = k // 4
    tile = t // 4
    a00 = zero_f32x8()
    a01 = zero_f32x8()
    a02 = zero_f32x8()
    a03 = zero_f32x8()
    a10 = zero_f32x8()
    a11 = zero_f32x8()
    a12 = zero_f32x8()
    a13 = zero_f32x8()
    a20 = zero_f32x8()
    a21 = zero_f32x8()
    a22 = zero_f32x8()
    a23 = zero_f32x8()
    a30 = zero_f32x8()
    a31 = zero_f32x8()
    a32 = zero_f32x8()
    a33 = zero_f32x8()
    m = zero_f32x16()
    for b in range(nb):
        i00 = load_16_i32(init, 16 * b)
        i10 = load_16_i32(init, 16 * (nb + b))
        i20 = load_16_i32(init, 16 * (2 * nb + b))
        i30 = load_16_i32(init, 16 * (3 * nb + b))
        i01, i02, i03 = i00, i00, i00
        i11, i12, i13 = i10, i10, i10
        i21, i22, i23 = i20, i20, i20
        i31, i32, i33 = i30, i30, i30
        for c in range(4):
            x = 256 * b + 64 * c
            q0 = load_64_bytes(quants, x)
            q1 = load_64_bytes(quants, k + x)
            q2 = load_64_bytes(quants, 2 * k + x)
            q3 = load_64_bytes(quants, 3 * k + x)
            s0 = load_16_i32(scale_words, x // 4)
            s1 = load_16_i32(scale_words, k4 + x // 4)
            s2 = load_16_i32(scale_words, 2 * k4 + x // 4)
            s3 = load_16_i32(scale_words, 3 * k4 + x // 4)
            i00, i10, i20, i30 = _k_step(i00, i10, i20, i30, q0, q1, q2, q3, s0, s1, s2, s3, xu, t * k + x, isa)
            i01, i11, i21, i31 = _k_step(i01, i11, i21, i31, q0, q1, q2, q3, s0, s1, s2, s3, xu, (t + 1) * k + x,
                                         isa)
            i02, i12, i22, i32 = _k_step(i02, i12, i22, i32, q0, q1, q2, q3, s0, s1, s2, s3, xu, (t + 2) * k + x,
                                         isa)
            i03, i13, i23, i33 = _k_step(i03, i13, i23, i33, q0, q1, q2, q3, s0, s1, s2, s3, xu, (t + 3) * k + x,
                                         isa)
        a00, a10, a20, a30 = _k_float_step(a00, a10, a20, a30, i00, i10, i20, i30, d, nb, b, xd[t, b])
        a01, a11, a21, a31 = _k_float_step(a01, a11, a21, a31, i01, i11, i21, i31, d, nb, b, xd[t + 1, b])
        a02, a12, a22, a32 = _k_float_step(a02, a12, a22, a32, i02, i12, i22, i32, d, nb, b, xd[t + 2, b])
        a03, a13, a23, a33 = _k_float_step(a03, a13, a23, a33, i03, i13, i23, i33, d, nb, b, xd[t + 3, b])
        if kc == 5:
            s = 16 * (t * nb + b)
            a00, a10, a20, a30 = _q2_K_min_step(a00, a10, a20, a30, scale_bytes, dmin, nb, b, bsums, s, xd[t, b])
            a01, a11, a21, a31 = _q2_K_min_step(a01, a11, a21, a31, scale_bytes, dmin, nb, b, bsums, s + 16 * nb,
                                                xd[t + 1, b])
            a02, a12, a22, a32 = _q2_K_min_step(a02, a12, a22, a32, scale_bytes, dmin, nb, b, bsums, s + 32 * nb,
                                                xd[t + 2, b])
            a03, a13, a23, a33 = _q2_K_min_step(a03, a13, a23, a33, scale_bytes, dmin, nb, b, bsums, s + 48 * nb,
                                                xd[t + 3, b])
        if kc == 7 or kc == 8:
            n = zero_i32x16()
            for c in range(4):
                n = dot_word_pairs_x16(n, load_16_i32(mins, 16 * (4 * b + c)),
                                       load_16_i32(xsums, 16 * (4 * (tile * nb + b) + c)))
            scale = mul_f32x16(load_16_f32(dmin, 16 * b), load_16_f32(xd16, 16 * (tile * nb + b)))
            m = add_f32x16(m, mul_f32x16(scale, to_f32x16(n)))
    store_f32_lanes(pair_mins, 0, m, 16)
    _store_k_column(out, t, n_tokens, row, a00, a01, a02, a03, pair_mins, 0)
    if n_valid > 1:
        _store_k_column(out, t, n_tokens, row + 1, a10, a11, a12, a13, pair_mins, 4)
    if n_valid > 2:
        _store_k_column(out, t, n_tokens, row + 2, a20, a21, a22, a23, pair_mins, 8)
    if n_valid > 3:
        _store_k_column(out, t, n_tokens, row + 3, a30, a31, a32, a33, pair_mins, 12)


@njit(**_KERNEL)
def _store_k_column(out, t, n_tokens, row, a0, a1, a2, a3, pair_mins, lane):
    # sum(acc) - mins, as the one-token kernels end (pair_mins: zeros but for q4_K, q5_K)
    out[t, row] = sum_f32x8(a0) - pair_mins[lane]
    if t + 1 < n_tokens:
        out[t + 1, row] = sum_f32x8(a1) - pair_mins[lane + 1]
    if t + 2 < n_tokens:
        out[t + 2, row] = sum_f32x8(a2) - pair_mins[lane + 2]
    if t + 3 < n_tokens:
        out[t + 3, row] = sum_f32x8(a3) - pair_mins[lane + 3]


@njit(parallel=True, nogil=True, **_KERNEL)
def gemm_k(kind, w, start, row_bytes, n_rows, k, xu, xd, xd16, xsums, bsums, out, column, block_tokens, n_chunks,
           isa):
    """``gemm`` for the K_EXACT_KINDS: out[t, column + r] = token t times row r, each the one-token kernel's
    result bit for bit. Token side (``GemmTokens.k_lanes``, padded to a multiple of TILE_TOKENS): ``xu`` uint8
    [tokens * k] (x + 128), ``xd`` float32 [tokens, k / 256] (q8_K's d), and per tile of 4 tokens and super-block
    ``xd16`` float32 [16] and ``xsums`` int32 [4 * 16] (lane 4 r + t: token t's d, its sums of values 64 c ..
    64 c + 31 and 64 c + 32 .. 64 c + 63 as int16 halves); q2_K: ``bsums`` int16 [tokens * k / 16] (q8_K's sums
    per 16 as ``decode.paired_bsums`` lays them out)."""
    n_tokens = out.shape[0]
    nb = k // 256
    n_tiles = (n_rows + PANEL_ROWS - 1) // PANEL_ROWS
    per_chunk = (n_tiles + n_chunks - 1) // n_chunks
    for chunk in prange(n_chunks):
        first = min(n_tiles, chunk * per_chunk)
        last = min(n_tiles, first + per_chunk)
        if first < last:
            quants = np.empty(PANEL_ROWS * k, np.int8)
            scale_words = np.empty(k, np.int32)
            init = np.empty(PANEL_ROWS * nb * 16, np.int32)
            d = np.empty(PANEL_ROWS * nb, np.float32)
            dmin = np.zeros(nb * 16, np.float32)
            mins = np.zeros(nb * 64, np.int32)
            scale_bytes = np.zeros(PANEL_ROWS * nb * 16, np.uint8)
            pair_mins = np.empty(16, np.float32)
            for t0 in range(0, n_tokens, block_tokens):
                t1 = min(n_tokens, t0 + block_tokens)
                for tile in range(first, last):
                    row = PANEL_ROWS * tile
                    n_valid = min(PANEL_ROWS, n_rows - row)
                    if n_valid < PANEL_ROWS:    # the missing rows of the last panel: zeros, never stored
                        quants[:] = 0
                        scale_words[:] = 0
                        init[:] = 0
                        d[:] = 0
                        dmin[:] = 0
                        mins[:] = 0
                        scale_bytes[:] = 0
                    unpack_k_panel(kind, w, start + row * row_bytes, row_bytes, n_valid, k, quants, scale_words,
                                   init, d, dmin, mins, scale_bytes, isa)
                    n_parts = (t1 - t0 + TILE_TOKENS - 1) // TILE_TOKENS
                    for t in range(t0, t1, TILE_TOKENS):
                        _prefetch_next_panel(w, start, row_bytes, n_rows, row, (t - t0) // TILE_TOKENS, n_parts)
                        _k_tile(kind, quants, scale_words, init, d, dmin, mins, scale_bytes, k, xu, xd, xd16, xsums,
                                bsums, t, out, n_tokens, column + row, n_valid, pair_mins, isa)


# ----------------------------------------------------------------------------------------------------------------
# The prompt kernel: sixteen rows in the lanes of a register
# ----------------------------------------------------------------------------------------------------------------

# The kinds whose rows have a scale per 16 values (q2_K, q3_K, q6_K); the others have one per 32.
GROUPS_OF_16 = (5, 6, 9)


@njit(inline="always", **_KERNEL)
def _tile_tokens(isa):
    """Tokens of the prompt kernel's register tile: 8 on the wide path (32 registers hold 8 integer and 8 float
    accumulators), 4 on AVX-VNNI and AVX2 (16 registers)."""
    return lane_rows(isa) // 2


@njit(inline="always", **_KERNEL)
def _group_values(kind):
    """Values sharing one scale in a row: 16 (GROUPS_OF_16) or 32 (legacy kinds, q4_K, q5_K)."""
    return 16 if kind_code(kind) in GROUPS_OF_16 else 32


#: q3_K, whose prompt kernel sums each super-block in integers (``_row_tile``)
Q3_K = 6


def row_group_values(code: int, isa) -> int:
    """Values the prompt kernel sums in integers before its float step, for a kind (decode.KINDS code) on path
    ``isa``: a whole super-block for q3_K on the VNNI paths (its panel's quants are folded with their groups'
    scales: decode._walk_q3_K), else the kind's group (16 or 32). Which of ``GemmTokens.row_groups`` it reads."""
    if code == Q3_K and isa.vnni:
        return 256
    return 16 if code in GROUPS_OF_16 else 32


@njit(inline="always", **_KERNEL)
def _row_group_values(kind, isa):
    """``row_group_values`` inside the kernels (a constant)."""
    if kind_code(kind) == Q3_K and has_vnni(isa):
        return 256
    return _group_values(kind)


def _panel_dot(kind, acc, panel, p, xs, x, isa):
    """``acc`` plus the panel's dword column at byte ``p`` times the token's four bytes at xs[x]: unsigned by signed
    (``dot_panel_dword``), or signed by signed where ``_signed_panel`` (``dot_signed_panel_dword``)."""
    raise NotImplementedError("gemm._panel_dot runs inside the compiled kernels only")


@overload(_panel_dot, inline="always")
def _panel_dot_of(kind, acc, panel, p, xs, x, isa):
    if not isinstance(kind, ConstantType) or not isinstance(isa, IsaType):
        return None
    dot = dot_signed_panel_dword if _signed_panel(kind.code, isa.vnni) else dot_panel_dword

    def chosen(kind, acc, panel, p, xs, x, isa):
        return dot(acc, panel, p, xs, x, isa)
    return chosen


@njit(**_KERNEL)
def _dword_step(kind, a0, a1, a2, a3, a4, a5, a6, a7, panel, p, xs, x, k, isa):
    """Four values of the panel's rows (its dword column at byte ``p``) times the same four values of the tile's
    tokens (bytes x, x + k, ... of ``xs``, each broadcast to every lane): ``_panel_dot``, unsigned q + 128 times
    signed x on the VNNI paths, unsigned x + 128 times signed q on AVX2 (q8_0 there: signed q times signed x)."""
    a0 = _panel_dot(kind, a0, panel, p, xs, x, isa)
    a1 = _panel_dot(kind, a1, panel, p, xs, x + k, isa)
    a2 = _panel_dot(kind, a2, panel, p, xs, x + 2 * k, isa)
    a3 = _panel_dot(kind, a3, panel, p, xs, x + 3 * k, isa)
    if _tile_tokens(isa) > 4:
        a4 = _panel_dot(kind, a4, panel, p, xs, x + 4 * k, isa)
        a5 = _panel_dot(kind, a5, panel, p, xs, x + 5 * k, isa)
        a6 = _panel_dot(kind, a6, panel, p, xs, x + 6 * k, isa)
        a7 = _panel_dot(kind, a7, panel, p, xs, x + 7 * k, isa)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(**_KERNEL)
def _group_step(f0, f1, f2, f3, f4, f5, f6, f7, a0, a1, a2, a3, a4, a5, a6, a7, scale, x_scales, i, n_groups, isa):
    """Each token's group sums (exact integers, one per row) times the rows' scales and the token's scale."""
    f0 = fma_lanes(f0, a0, scale, splat_lane_floats(x_scales, i, isa))
    f1 = fma_lanes(f1, a1, scale, splat_lane_floats(x_scales, i + n_groups, isa))
    f2 = fma_lanes(f2, a2, scale, splat_lane_floats(x_scales, i + 2 * n_groups, isa))
    f3 = fma_lanes(f3, a3, scale, splat_lane_floats(x_scales, i + 3 * n_groups, isa))
    if _tile_tokens(isa) > 4:
        f4 = fma_lanes(f4, a4, scale, splat_lane_floats(x_scales, i + 4 * n_groups, isa))
        f5 = fma_lanes(f5, a5, scale, splat_lane_floats(x_scales, i + 5 * n_groups, isa))
        f6 = fma_lanes(f6, a6, scale, splat_lane_floats(x_scales, i + 6 * n_groups, isa))
        f7 = fma_lanes(f7, a7, scale, splat_lane_floats(x_scales, i + 7 * n_groups, isa))
    return f0, f1, f2, f3, f4, f5, f6, f7


@njit(**_KERNEL)
def _offsets_step(f0, f1, f2, f3, f4, f5, f6, f7, offset, xsum, gx, n_sums, isa):
    """The rows' offsets of 16 values times each token's d * (sum of those 16 quants), taken off."""
    f0 = fnma_lanes(f0, offset, splat_lane_floats(xsum, gx, isa))
    f1 = fnma_lanes(f1, offset, splat_lane_floats(xsum, gx + n_sums, isa))
    f2 = fnma_lanes(f2, offset, splat_lane_floats(xsum, gx + 2 * n_sums, isa))
    f3 = fnma_lanes(f3, offset, splat_lane_floats(xsum, gx + 3 * n_sums, isa))
    if _tile_tokens(isa) > 4:
        f4 = fnma_lanes(f4, offset, splat_lane_floats(xsum, gx + 4 * n_sums, isa))
        f5 = fnma_lanes(f5, offset, splat_lane_floats(xsum, gx + 5 * n_sums, isa))
        f6 = fnma_lanes(f6, offset, splat_lane_floats(xsum, gx + 6 * n_sums, isa))
        f7 = fnma_lanes(f7, offset, splat_lane_floats(xsum, gx + 7 * n_sums, isa))
    return f0, f1, f2, f3, f4, f5, f6, f7


@njit(**_KERNEL)
def _store_rows(out, n_cols, n_tokens, t, column, n_valid, f0, f1, f2, f3, f4, f5, f6, f7, isa):
    # token t + i's results for the panel's rows: out (flat) from (t + i) * n_cols + column, tokens past n_tokens
    # (padding) not stored
    store_f32_lanes(out, t * n_cols + column, f0, n_valid)
    if t + 1 < n_tokens:
        store_f32_lanes(out, (t + 1) * n_cols + column, f1, n_valid)
    if t + 2 < n_tokens:
        store_f32_lanes(out, (t + 2) * n_cols + column, f2, n_valid)
    if t + 3 < n_tokens:
        store_f32_lanes(out, (t + 3) * n_cols + column, f3, n_valid)
    if _tile_tokens(isa) > 4:
        if t + 4 < n_tokens:
            store_f32_lanes(out, (t + 4) * n_cols + column, f4, n_valid)
        if t + 5 < n_tokens:
            store_f32_lanes(out, (t + 5) * n_cols + column, f5, n_valid)
        if t + 6 < n_tokens:
            store_f32_lanes(out, (t + 6) * n_cols + column, f6, n_valid)
        if t + 7 < n_tokens:
            store_f32_lanes(out, (t + 7) * n_cols + column, f7, n_valid)


@njit(**_KERNEL)
def _row_tile(kind, quants, sums, scale, offsets, k, xs, starts, x_scales, n_groups, xsum, n_sums, t, out, n_cols,
              n_tokens, column, n_valid, isa):
    """Tokens t .. t + _tile_tokens(isa) - 1 times the panel's rows (P = lane_rows(isa)) into out (flat, n_cols
    per token) from ``column``. q3_K sums each super-block exactly before one float step (llama.cpp's order for
    its rows): on the VNNI paths in one piece (``_row_group_values``: the panel holds -scale * q, its scale is -d),
    on AVX2 group by group, each group's integer sum times its integer scale added in float32 (exact: the sums
    stay below 2 ** 22), then times d and the token's scale."""
    group = _row_group_values(kind, isa)
    q3_K_groups = kind_code(kind) == Q3_K and not has_vnni(isa)
    n = lane_rows(isa)
    f0 = zero_lanes(isa)
    f1 = zero_lanes(isa)
    f2 = zero_lanes(isa)
    f3 = zero_lanes(isa)
    f4 = zero_lanes(isa)
    f5 = zero_lanes(isa)
    f6 = zero_lanes(isa)
    f7 = zero_lanes(isa)
    e0 = zero_lanes(isa)     # q3_K on AVX2: the super-block's sums (four tokens there)
    e1 = e0
    e2 = e0
    e3 = e0
    for g in range(0, k, group):
        i = t * n_groups + g // group
        h = g // 16
        if has_vnni(isa):
            # each token's group sum starts at -128 * (its sum of x), which takes the panel's + 128 back out
            a0 = splat_lane_ints(starts, i, isa)
            a1 = splat_lane_ints(starts, i + n_groups, isa)
            a2 = splat_lane_ints(starts, i + 2 * n_groups, isa)
            a3 = splat_lane_ints(starts, i + 3 * n_groups, isa)
        elif kind_code(kind) in WIDE_QUANT_KINDS:
            # q8_0 on AVX2: signed by signed bytes (_signed_panel), nothing to take out
            a0 = zero_lane_ints(isa)
            a1 = a0
            a2 = a0
            a3 = a0
        else:
            # every token's group sums start at -128 * the rows' sums of q, which takes the tokens' + 128 out
            a0 = load_lane_ints(sums, n * h, isa)
            if group == 32:
                a0 = add_lanes(a0, load_lane_ints(sums, n * h + n, isa))
            a1 = a0
            a2 = a0
            a3 = a0
        a4 = a3
        a5 = a3
        a6 = a3
        a7 = a3
        if _tile_tokens(isa) > 4:
            a4 = splat_lane_ints(starts, i + 4 * n_groups, isa)
            a5 = splat_lane_ints(starts, i + 5 * n_groups, isa)
            a6 = splat_lane_ints(starts, i + 6 * n_groups, isa)
            a7 = splat_lane_ints(starts, i + 7 * n_groups, isa)
        x = t * k + g
        for j in range(group // 4):
            a0, a1, a2, a3, a4, a5, a6, a7 = _dword_step(kind, a0, a1, a2, a3, a4, a5, a6, a7, quants,
                                                         n * (g + 4 * j), xs, x + 4 * j, k, isa)
        if q3_K_groups:
            group_scale = load_lane_floats(scale, n * h, isa)
            e0 = fma_lanes(e0, a0, group_scale, np.float32(1.0))
            e1 = fma_lanes(e1, a1, group_scale, np.float32(1.0))
            e2 = fma_lanes(e2, a2, group_scale, np.float32(1.0))
            e3 = fma_lanes(e3, a3, group_scale, np.float32(1.0))
            if h % 16 == 15:     # the super-block's last group: its sums times d and the tokens' scales
                f0, f1, f2, f3, f4, f5, f6, f7 = _group_step(f0, f1, f2, f3, f4, f5, f6, f7, e0, e1, e2, e3, e3,
                                                             e3, e3, e3, load_lane_floats(offsets, n * h, isa),
                                                             x_scales, i, n_groups, isa)
                e0 = zero_lanes(isa)
                e1 = e0
                e2 = e0
                e3 = e0
        else:
            f0, f1, f2, f3, f4, f5, f6, f7 = _group_step(f0, f1, f2, f3, f4, f5, f6, f7, a0, a1, a2, a3, a4, a5, a6,
                                                         a7, load_lane_floats(scale, n * h, isa), x_scales, i,
                                                         n_groups, isa)
        if _has_offsets(kind):
            f0, f1, f2, f3, f4, f5, f6, f7 = _offsets_step(f0, f1, f2, f3, f4, f5, f6, f7,
                                                           load_lane_floats(offsets, n * h, isa), xsum,
                                                           t * n_sums + h, n_sums, isa)
            if group == 32:
                f0, f1, f2, f3, f4, f5, f6, f7 = _offsets_step(f0, f1, f2, f3, f4, f5, f6, f7,
                                                               load_lane_floats(offsets, n * h + n, isa), xsum,
                                                               t * n_sums + h + 1, n_sums, isa)
    _store_rows(out, n_cols, n_tokens, t, column, n_valid, f0, f1, f2, f3, f4, f5, f6, f7, isa)


@njit(parallel=True, nogil=True, **_KERNEL)
def gemm_rows(kind, w, start, row_bytes, n_rows, k, xs, starts, x_scales, xsum, out, column, block_tokens, n_chunks,
              isa):
    """``gemm``'s product on row-interleaved panels of ``lane_rows(isa)`` rows (16, or 8 on AVX-VNNI and AVX2):
    tokens padded to a multiple of PAD_TOKENS, ``xs`` their quants [tokens * k] (signed on the VNNI paths, + 128 as
    unsigned bytes on AVX2: ``GemmTokens.xs_for``), ``starts`` -128 * their sums (the VNNI paths) and ``x_scales``
    their scales [tokens, groups] per group of the kind's values (``_group_values``). Each row's groups are summed
    exactly in integers, then scaled and added in float32 one group after the other (llama.cpp's order for a row);
    no horizontal sums."""
    n_tokens, n_cols = out.shape
    flat_out = out.reshape(-1)
    panel_rows = lane_rows(isa)
    tile = _tile_tokens(isa)
    n_panels = (n_rows + panel_rows - 1) // panel_rows
    per_chunk = (n_panels + n_chunks - 1) // n_chunks
    n_groups = starts.shape[1]
    flat_starts = starts.reshape(-1)
    flat_scales = x_scales.reshape(-1)
    n_sums = xsum.shape[1]
    flat_sums = xsum.reshape(-1)
    for chunk in prange(n_chunks):
        first = min(n_panels, chunk * per_chunk)
        last = min(n_panels, first + per_chunk)
        if first < last:
            quants = np.empty(panel_rows * k, np.uint8)
            sums = np.zeros(k, np.int32)
            scale = np.empty(k, np.float32)
            offsets = np.zeros(k, np.float32)
            for t0 in range(0, n_tokens, block_tokens):
                t1 = min(n_tokens, t0 + block_tokens)
                for panel in range(first, last):
                    row = panel_rows * panel
                    n_valid = min(panel_rows, n_rows - row)
                    if n_valid < panel_rows:    # the missing rows of the last panel: zeros, never stored
                        quants[:] = 0
                        sums[:] = 0
                        scale[:] = 0
                        offsets[:] = 0
                    unpack_row_panel(kind, w, start + row * row_bytes, row_bytes, n_valid, k, quants, sums, scale,
                                     offsets, isa)
                    for t in range(t0, t1, tile):
                        _row_tile(kind, quants, sums, scale, offsets, k, xs, flat_starts, flat_scales, n_groups,
                                  flat_sums, n_sums, t, flat_out, n_cols, n_tokens, column + row, n_valid, isa)


# ----------------------------------------------------------------------------------------------------------------
# The token side, and the product
# ----------------------------------------------------------------------------------------------------------------

@njit(parallel=True, nogil=True, **_KERNEL)
def _row_side(qs, d, extra, sums_kind, xs, starts16, starts32, scales16, scales32, xsum):
    """Fill the arrays both GEMMs read (zeros, padded past the tokens) from quants qs [n, k] and scales
    d [n, k / block]: xs = qs; per 16 and per 32 values -128 * the sum of the quants (``starts``) and their scale;
    ``sums_kind`` 1 (q8_1: extra = s per 32) or 2 (q8_K: extra = sums per 16) fills xsum."""
    n_tokens, k = qs.shape
    block = k // d.shape[1]
    for t in prange(n_tokens):
        for g in range(k // 16):
            total = np.int32(0)
            for i in range(16 * g, 16 * g + 16):
                xs[t, i] = qs[t, i]
                total += np.int32(qs[t, i])
            starts16[t, g] = np.int32(-128) * total
            scales16[t, g] = d[t, 16 * g // block]
        for g in range(k // 32):
            starts32[t, g] = starts16[t, 2 * g] + starts16[t, 2 * g + 1]
            scales32[t, g] = d[t, 32 * g // block]
        if sums_kind == 1:       # llama.cpp's half-precision s = d * sum per 32, half to each 16
            for g in range(k // 16):
                xsum[t, g] = extra[t, g // 2] * np.float32(0.5)
        elif sums_kind == 2:     # d * q8_K's sums per 16
            for g in range(k // 16):
                xsum[t, g] = np.float32(extra[t, g]) * d[t, 16 * g // block]


@njit(nogil=True, **_KERNEL)
def _lane_side(qs, d, xu, xsl):
    """The exact GEMM's token arrays: xu = qs + 128 (unsigned), xsl = each int32 lane's scale (d of its block);
    the rows past the tokens 128 and zeros. Serial: these are a few tokens (a thread launch costs more)."""
    n_tokens, k = qs.shape
    block = k // d.shape[1]
    for t in range(xu.shape[0]):
        for i in range(k):
            xu[t, i] = np.uint8(qs[t, i]) ^ np.uint8(128) if t < n_tokens else np.uint8(128)
        for j in range(k // 4):
            xsl[t, j] = d[t, 4 * j // block] if t < n_tokens else np.float32(0.0)


@njit(nogil=True, **_KERNEL)
def _k_lane_side(qs, d, bsums, xu, xd, xd16, xsums):
    """``gemm_k``'s token arrays (see ``GemmTokens.k_lanes``) from q8_K activations (qs, d, sums per 16), but for
    the paired sums per 16."""
    n_tokens, k = qs.shape
    nb = k // 256
    for t in range(xu.shape[0]):
        real = t < n_tokens
        for i in range(k):
            xu[t, i] = np.uint8(qs[t, i]) ^ np.uint8(128) if real else np.uint8(128)
        for b in range(nb):
            xd[t, b] = d[t, b] if real else np.float32(0.0)
    for tile in range(xu.shape[0] // TILE_TOKENS):
        for b in range(nb):
            for tt in range(TILE_TOKENS):
                token = TILE_TOKENS * tile + tt
                for r in range(PANEL_ROWS):
                    xd16[tile, b, TILE_TOKENS * r + tt] = xd[token, b]
                for c in range(4):     # the sums of values 64 c .. 64 c + 31 and 64 c + 32 .. 64 c + 63
                    g = 16 * b + 4 * c
                    low = high = 0     # padding tokens: none
                    if token < n_tokens:
                        low = (bsums[token, g] + bsums[token, g + 1]) & 0xFFFF
                        high = (bsums[token, g + 2] + bsums[token, g + 3]) & 0xFFFF
                    for r in range(PANEL_ROWS):
                        xsums[tile, b, c, TILE_TOKENS * r + tt] = low | (high << 16)


class GemmTokens:
    """Activations quantized to a ``vec_dot_type`` (q8_0, q8_1, q8_K: ``matmul.QuantizedActivations``) laid out
    for the GEMMs, each layout made the first time a kernel asks for it and shared by the matrices that read the
    same input (q, k, v; gate, up). Rows past the tokens (up to a multiple of PAD_TOKENS) have zero scales."""

    def __init__(self, vec_dot_type: str, qs: np.ndarray, d: np.ndarray, extra: np.ndarray | None):
        n_tokens, k = qs.shape
        self.n_tokens, self.k = n_tokens, k
        self.padded = -(-n_tokens // PAD_TOKENS) * PAD_TOKENS
        self._vec_dot_type, self._qs, self._d, self._extra = vec_dot_type, qs, d, extra
        self._rows = self._lanes = self._k_lanes = self._unsigned = None

    def _row_arrays(self):
        if self._rows is None:
            padded, k = self.padded, self.k
            xs = np.zeros((padded, k), np.int8)
            starts16 = np.zeros((padded, k // 16), np.int32)
            starts32 = np.zeros((padded, k // 32), np.int32)
            scales16 = np.zeros((padded, k // 16), np.float32)
            scales32 = np.zeros((padded, k // 32), np.float32)
            # the offsets of q4_1, q5_1 (q8_1) and q2_K, q4_K, q5_K (q8_K) multiply d * the sum of each 16
            # quants; the rows are padded with zeros to a multiple of 16 groups (see _tile)
            sums_kind = {"q8_1": 1, "q8_K": 2}.get(self._vec_dot_type, 0)
            xsum = np.zeros((padded, -(-k // 256) * 16 if sums_kind else 0), np.float32)
            extra = self._extra if self._extra is not None else np.zeros((self.n_tokens, 0), np.float32)
            _row_side(self._qs, self._d, extra, sums_kind, xs, starts16, starts32, scales16, scales32, xsum)
            # per group of 16 and of 32 values (the kinds' groups: _group_values) the row kernel's starts, scales
            # and per super-block (q3_K on the VNNI paths: row_group_values)
            starts256 = starts16.reshape(padded, -1, 16).sum(axis=2, dtype=np.int32) if k % 256 == 0 else None
            scales256 = np.ascontiguousarray(scales16[:, ::16]) if k % 256 == 0 else None
            self._rows = (xs.reshape(-1), xsum, {16: (starts16, scales16), 32: (starts32, scales32),
                                                 256: (starts256, scales256)})
        return self._rows

    @property
    def xs(self) -> np.ndarray:
        """int8 [padded * k]: the quants, zeros past the tokens (the prompt GEMM's)."""
        return self._row_arrays()[0]

    def xs_for(self, isa, kind: int) -> np.ndarray:
        """The prompt GEMM's token bytes for a block kind on path ``isa``: ``xs`` on the VNNI paths and for q8_0
        (``_signed_panel``), else on AVX2 x + 128 as unsigned bytes (flat [padded * k]; made on first use)."""
        if isa.vnni or _signed_panel(kind, isa.vnni):
            return self.xs
        if self._unsigned is None:
            self._unsigned = self.xs.view(np.uint8) ^ np.uint8(128)
        return self._unsigned

    @property
    def xsum(self) -> np.ndarray:
        """float32 [padded, n_sums]: d * the sum of each 16 quants (q8_1, q8_K; empty for q8_0)."""
        return self._row_arrays()[1]

    @property
    def row_groups(self) -> dict:
        """{16: (starts, scales), 32: (starts, scales), 256: (starts, scales)}: the prompt GEMM's per-group token
        terms (``row_group_values``; 256: None where k is no multiple of 256)."""
        return self._row_arrays()[2]

    def lanes(self) -> tuple[np.ndarray, np.ndarray]:
        """The exact GEMM's xu (x + 128) and xsl (each int32 lane's scale), flat; made on first use."""
        if self._lanes is None:
            xu = np.empty((self.padded, self.k), np.uint8)
            xsl = np.empty((self.padded, self.k // 4), np.float32)
            _lane_side(self._qs, self._d, xu, xsl)
            self._lanes = (xu.reshape(-1), xsl.reshape(-1))
        return self._lanes

    def k_lanes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``gemm_k``'s token side (q8_K activations), made on first use: xu (x + 128), xd (d per super-block,
        zeros past the tokens), per tile of TILE_TOKENS tokens and super-block, in lane 4 r + t for every r,
        xd16 (token t's d) and xsums (its two sums per 32 of each 64 values, as int16 halves), and bsums (the
        sums per 16 as ``decode.paired_bsums`` lays them out, zeros past the tokens, flat)."""
        if self._k_lanes is None:
            padded, k = self.padded, self.k
            nb, tiles = k // 256, padded // TILE_TOKENS
            xu = np.empty((padded, k), np.uint8)
            xd = np.empty((padded, nb), np.float32)
            xd16 = np.empty((tiles, nb, PANEL_ROWS * TILE_TOKENS), np.float32)
            xsums = np.empty((tiles, nb, 4, PANEL_ROWS * TILE_TOKENS), np.int32)
            bsums = np.zeros((padded, k // 16), np.int16)
            bsums[:self.n_tokens] = paired_bsums(self._extra.reshape(-1)).reshape(self.n_tokens, k // 16)
            _k_lane_side(self._qs, self._d, self._extra, xu, xd, xd16, xsums)
            self._k_lanes = (xu.reshape(-1), xd, xd16.reshape(-1), xsums.reshape(-1), bsums.reshape(-1))
        return self._k_lanes

    def block_tokens(self) -> int:
        """Tokens per block of the exact GEMM: their x + 128 and lane scales (2 bytes per value) fill BLOCK_BYTES."""
        return max(PAD_TOKENS, BLOCK_BYTES // (2 * self.k) // PAD_TOKENS * PAD_TOKENS)

    def row_block_tokens(self) -> int:
        """Tokens per block of the prompt GEMM: their quants (a byte per value, the rest is small) fill
        BLOCK_BYTES."""
        return max(PAD_TOKENS, BLOCK_BYTES // self.k // PAD_TOKENS * PAD_TOKENS)


def gemm_product(kind: int, base: np.ndarray, start: int, n_rows: int, row_bytes: int, tokens: GemmTokens,
                 out: np.ndarray, isa, column: int = 0, exact: bool = False) -> None:
    """out[:, column:column + n_rows] = tokens times the rows of a matrix of ``kind`` (a decode.KINDS code) at byte
    ``start`` of ``base``: on the prompt kernel (``gemm_rows``), or with ``exact`` on ``gemm``, whose results for
    EXACT_KINDS are the one-token kernel's bit for bit. The caller checked every size (the kernels read without
    bounds checks) and that k % 64 == 0."""
    n_chunks = CHUNKS_PER_THREAD * max(1, numba.get_num_threads())
    code = KIND_ARGS[kind].code      # the kernels' code (a layout no file holds shares its file type's)
    if exact and code in K_EXACT_KINDS:
        xu, xd, xd16, xsums, bsums = tokens.k_lanes()
        gemm_k(KIND_ARGS[kind], base, start, row_bytes, n_rows, tokens.k, xu, xd, xd16, xsums, bsums, out, column,
               tokens.block_tokens(), n_chunks, isa)
    elif exact:
        xu, xsl = tokens.lanes()
        gemm(KIND_ARGS[kind], base, start, row_bytes, n_rows, tokens.k, xu, xsl, tokens.xsum, out, column,
             tokens.block_tokens(), n_chunks, isa)
    else:
        starts, x_scales = tokens.row_groups[row_group_values(code, isa)]
        gemm_rows(KIND_ARGS[kind], base, start, row_bytes, n_rows, tokens.k, tokens.xs_for(isa, code), starts, x_scales,
                  tokens.xsum, out, column, tokens.row_block_tokens(), n_chunks, isa)
