"""Prompt processing on integer dot products: many tokens times a weight matrix in a ggml block format (AVX512-VNNI).

A prompt multiplies every weight by many tokens, so the arithmetic, not the memory, bounds it. The BLAS path
dequantizes bands of weights to float32 and runs sgemm: 16 float multiply-adds per instruction, plus the
dequantization. Here weights stay 8-bit: one ``vpdpbusd`` on a 512-bit register does 64 byte multiply-adds, and its
16 int32 lanes are converted and scaled in float once per 64 values (``vcvtdq2ps``, ``vmulps``, ``vfmadd``).

The work is cut as a register tile of PANEL_ROWS weight rows by TILE_TOKENS tokens (16 float accumulators of 16
lanes), which shares each weight load among 4 tokens and each activation load among 4 rows:

* **the panel** (weight side): ``decode._walk_rows`` expands PANEL_ROWS rows once per block of tokens, with the
  block decoders every other kernel uses, into signed byte quants q (value = q * scale - offset per 16-value half),
  the lane biases -128 * (sums of four q), the scale of each int32 lane and the offset of each 16 values;
* **the token side** (``GemmTokens``): the activations quantized to the type's ``vec_dot_type`` (llama.cpp's
  numbers: q8_0, q8_1 or q8_K), as unsigned bytes x + 128, with their scale per lane (and d * the sum of each 16
  quants, for the kinds with offsets).

Per 64 values, for each (row, token): ``dot = vpdpbusd(bias_row, x + 128, q)`` is the exact integer dot product of
x and q in each lane (the bias takes the 128 back out), and ``acc += float(dot) * (scale_row * scale_x)``; the
kinds whose groups have offsets (q4_1, q5_1, q2_K, q4_K, q5_K) then subtract ``offset_row * (d_x * sum x)`` per 16
values, 16 groups per instruction. Each (row, token) result depends only on that row and that token, in a fixed
order: a prompt's rows come out the same whatever batch they are part of (prompt caching relies on it).

Tokens are taken in blocks small enough that a block's activations stay in L2 beside the panel; each thread
takes a contiguous range of panels and walks every block through them.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .decode import _KERNEL, KIND_ARGS, kind_code, unpack_panel
from .simd import (
    AVX512VNNI, dot_u8_i8_x64, fma_i32x16, fnma_f32x16, load_16_f32, load_16_i32, load_64_bytes, sum_f32x16,
    zero_f32x16,
)

PANEL_ROWS = 4     # weight rows of a register tile (the kernel is written out for 4)
TILE_TOKENS = 4    # tokens of a register tile (likewise)
CHUNKS_PER_THREAD = 2    # prange iterations per thread: some balancing when a thread is slowed

# Bytes of activations (x + 128 and lane scales) per block of tokens: with the panel (about 4 * k * 3 bytes) a
# block stays in a 1 MiB L2.
BLOCK_BYTES = 768 * 1024


# The kinds whose GEMM results are the one-token kernel's bit for bit: q4_0 and q5_0 accumulate in two 8-lane
# chains (even and odd blocks), which are the GEMM's 16 lanes, and sum them in the same order. (q8_0 given two
# chains as well read 10-13 GB/s per core in decode against 17-23 with its one chain: it stays out.) Products
# with a few tokens (continuous batching, short prompts), which must give each token's one-token numbers, may take
# the GEMM for these kinds from EXACT_MIN_TOKENS tokens on (1.4x the few-token tiles at 8 tokens, 1.7-1.9x at 16,
# on a Zen 4; about even at 4).
EXACT_KINDS = (0, 2)
EXACT_MIN_TOKENS = 8


def isa_has_gemm(isa) -> bool:
    """Whether the SIMD path ``isa`` (simd.Isa or None) has the integer GEMM: AVX512-VNNI only (``vpdpbusd`` on
    512 bits; AVX2 CPUs keep dequantize + sgemm)."""
    return isa is AVX512VNNI


# ----------------------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------------------

@njit(inline="always", **_KERNEL)
def _has_offsets(kind):
    """Whether the kind's groups have offsets (value = q * scale - offset): q4_1, q5_1, q2_K, q4_K, q5_K."""
    kc = kind_code(kind)
    return kc == 1 or kc == 3 or kc == 5 or kc == 7 or kc == 8


@njit(**_KERNEL)
def _token_step(a0, a1, a2, a3, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3, xu, xsl, x, lx, isa):
    """One token's 64 values (at xu[x:], its lane scales at xsl[lx:]) against the panel's four rows."""
    u = load_64_bytes(xu, x)
    xs = load_16_f32(xsl, lx)
    a0 = fma_i32x16(a0, dot_u8_i8_x64(b0, u, q0, isa), s0, xs)
    a1 = fma_i32x16(a1, dot_u8_i8_x64(b1, u, q1, isa), s1, xs)
    a2 = fma_i32x16(a2, dot_u8_i8_x64(b2, u, q2, isa), s2, xs)
    a3 = fma_i32x16(a3, dot_u8_i8_x64(b3, u, q3, isa), s3, xs)
    return a0, a1, a2, a3


@njit(**_KERNEL)
def _offset_step(a0, a1, a2, a3, offsets, g, k16, xsum, gx):
    """One token's sums of 16 groups of 16 values (at xsum[gx:]) times the four rows' offsets of those groups."""
    sums = load_16_f32(xsum, gx)
    a0 = fnma_f32x16(a0, load_16_f32(offsets, g), sums)
    a1 = fnma_f32x16(a1, load_16_f32(offsets, g + k16), sums)
    a2 = fnma_f32x16(a2, load_16_f32(offsets, g + 2 * k16), sums)
    a3 = fnma_f32x16(a3, load_16_f32(offsets, g + 3 * k16), sums)
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
        a00, a10, a20, a30 = _token_step(a00, a10, a20, a30, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3,
                                         xu, xsl, t * k + x, t * k4 + lo, isa)
        a01, a11, a21, a31 = _token_step(a01, a11, a21, a31, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3,
                                         xu, xsl, (t + 1) * k + x, (t + 1) * k4 + lo, isa)
        a02, a12, a22, a32 = _token_step(a02, a12, a22, a32, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3,
                                         xu, xsl, (t + 2) * k + x, (t + 2) * k4 + lo, isa)
        a03, a13, a23, a33 = _token_step(a03, a13, a23, a33, q0, q1, q2, q3, b0, b1, b2, b3, s0, s1, s2, s3,
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
                    for t in range(t0, t1, TILE_TOKENS):
                        _tile(kind, quants, bias, scale, offsets, k, xu, xsl, flat_sums, n_sums, t, out, n_tokens,
                              column + row, n_valid, isa)


# ----------------------------------------------------------------------------------------------------------------
# The token side, and the product
# ----------------------------------------------------------------------------------------------------------------

@njit(parallel=True, nogil=True, **_KERNEL)
def _token_side(qs, d, extra, sums_kind, xu, xsl, xsum):
    """Fill ``GemmTokens``'s arrays from quants qs [n, k] (as uint8) and scales d [n, k / block]: xu = qs + 128,
    xsl = each lane's d; ``sums_kind`` 1 (q8_1: extra = s per 32) or 2 (q8_K: extra = sums per 16) fills xsum."""
    n_tokens, k = qs.shape
    n_blocks = d.shape[1]
    lanes = k // n_blocks // 4       # int32 lanes per block
    for t in prange(n_tokens):
        for i in range(k):
            xu[t, i] = qs[t, i] ^ np.uint8(128)
        for b in range(n_blocks):
            scale = d[t, b]
            for j in range(lanes):
                xsl[t, b * lanes + j] = scale
        if sums_kind == 1:       # llama.cpp's half-precision s = d * sum per 32, half to each 16
            for g in range(k // 16):
                xsum[t, g] = extra[t, g // 2] * np.float32(0.5)
        elif sums_kind == 2:     # d * q8_K's sums per 16
            for b in range(n_blocks):
                for g in range(16 * b, 16 * b + 16):
                    xsum[t, g] = np.float32(extra[t, g]) * d[t, b]


class GemmTokens:
    """Activations quantized to a ``vec_dot_type`` (q8_0, q8_1, q8_K: ``matmul.QuantizedActivations``) laid out
    for ``gemm``; built once per input and shared by the matrices that read it (q, k, v; gate, up). Rows past
    the tokens (up to a multiple of TILE_TOKENS) have zero scales."""

    def __init__(self, vec_dot_type: str, qs: np.ndarray, d: np.ndarray, extra: np.ndarray | None):
        n_tokens, k = qs.shape
        padded = -(-n_tokens // TILE_TOKENS) * TILE_TOKENS
        self.n_tokens, self.k = n_tokens, k
        xu = np.empty((padded, k), np.uint8)
        xsl = np.empty((padded, k // 4), np.float32)
        # the offsets of q4_1, q5_1 (q8_1) and q2_K, q4_K, q5_K (q8_K) multiply d * the sum of each 16 quants;
        # the rows are padded with zeros to a multiple of 16 groups (see _tile)
        sums_kind = {"q8_1": 1, "q8_K": 2}.get(vec_dot_type, 0)
        xsum = np.zeros((padded, -(-k // 256) * 16 if sums_kind else 0), np.float32)
        xu[n_tokens:] = 128
        xsl[n_tokens:] = 0
        no_extra = np.zeros((n_tokens, 0), np.float32)
        _token_side(qs.view(np.uint8), d, extra if extra is not None else no_extra, sums_kind, xu, xsl, xsum)
        self.xu = xu.reshape(-1)
        self.xsl = xsl.reshape(-1)
        self.xsum = xsum

    def block_tokens(self) -> int:
        """Tokens per block: their x + 128 and lane scales (2 bytes per value) fill BLOCK_BYTES."""
        return max(TILE_TOKENS, BLOCK_BYTES // (2 * self.k) // TILE_TOKENS * TILE_TOKENS)


def gemm_product(kind: int, base: np.ndarray, start: int, n_rows: int, row_bytes: int, tokens: GemmTokens,
                 out: np.ndarray, isa, column: int = 0) -> None:
    """out[:, column:column + n_rows] = tokens times the rows of a matrix of ``kind`` (a decode.KINDS code) at byte
    ``start`` of ``base``. The caller checked every size (the kernel reads without bounds checks) and that
    k % 64 == 0."""
    gemm(KIND_ARGS[kind], base, start, row_bytes, n_rows, tokens.k, tokens.xu, tokens.xsl, tokens.xsum, out, column,
         tokens.block_tokens(), CHUNKS_PER_THREAD * max(1, numba.get_num_threads()), isa)
