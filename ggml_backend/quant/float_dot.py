"""SIMD products of plain float weights (f32, f16, bf16) with activation rows: ggml's ``vec_dot_f16`` and kin.

ggml multiplies f16 / bf16 weights with activations rounded to f16 / bf16 (each product then exact in float32)
and f32 weights with float32 activations, summing in float32. These kernels do the same with one fixed order for
every (row, token) result: two chains of sixteen float lanes, the values of each 32 in turn, 0-15 by fused
multiply-adds into the first chain and 16-31 into the second (a last 16 past the multiples of 32 into the first),
the chains added lane by lane and the sixteen lanes summed by ``sum_f32x16`` (halves first), then the values past
the last multiple of 16 one by one (``fma_f32``). The order does not depend on the tile a result is computed in,
the number of tokens, the thread or the instruction set (LLVM splits a 16-lane vector into two 256-bit halves on
AVX2 with the same per-lane arithmetic), so a token gives the same bits alone, in a batch and in a prompt
(continuous batching and prompt caching rely on that, as the block types' exact kernels give it). bf16 weights take
32 values at a time as pairs, as AVX512-BF16's ``vdpbf16ps`` does (``simd.dot_bf16_pairs``: lane i adds value
2i + 1's product, then 2i's; the instruction where the CPU has it, two fused multiply-adds elsewhere, the same bits
but for the instruction's flushing of denormals), the first 32 of each 64 into the first chain. Two chains,
not one: a row's fused multiply-adds wait on each other's latency, and with one chain a core asked for memory
too slowly (two Zen 4 threads, 4864 x 896 f16: 29 GB/s with one chain, 35 with four).

Tiles: a row at a time for a few tokens (decode; tiles of several rows read side by side streamed at half the
speed), four rows times four tokens on 512-bit paths for prompts (each weight vector converted once for four
tokens, each activation vector loaded once for four rows; chain a over all the values, then chain b, which
gives the same sums with 16 accumulators live instead of 32), over blocks of rows and tokens kept in L2. Before
these kernels every float product went through the BLAS path, a band of rows converted to float32 and handed to
sgemm, padded to 48 tokens for one (Qwen2.5-Coder-0.5B converted to F16, 2 Zen 4 threads: decode 1.0 tok/s
against llama.cpp's 28).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import (
    add_f32x16, dot_bf16_pairs, float_from_bits, fma_f32, fma_f32x16, half_bits, lane_sums_f32x16, load_16_bf16_at,
    load_16_f16_at, load_16_f32, load_16_f32_at, load_16_i32, load_32_bf16_pairs_at, load_f16, load_u32, prefetch,
    prefetch_nta, round_to_half, store_quarter_f32x16, sum_f32x16, zero_f32x16,
)

#: the storage code of each plain float type (the kernels' ``kind`` argument)
FLOAT_KINDS = {"f32": 0, "f16": 1, "bf16": 2}

_KERNEL = dict(cache=True, error_model="numpy", boundscheck=False)

#: from this many tokens on a launch on a 512-bit path takes tiles of four rows and four tokens (prompts); below,
#: and on 256-bit paths, a row at a time
FEW_TOKENS = 8

#: a prompt's launch walks each chunk in blocks of rows of about this many bytes (kept in L2 while a block of
#: tokens passes over them) ...
ROW_BLOCK_BYTES = 128 * 1024
#: ... and of tokens whose values take about this many bytes at the weights' size
TOKEN_BLOCK_BYTES = 256 * 1024


@njit(inline="always", **_KERNEL)
def _load_16(kind, w, o):
    """Sixteen weights from byte ``o`` of ``w`` as float32 (exact)."""
    if kind == 1:
        return load_16_f16_at(w, o)
    if kind == 2:
        return load_16_bf16_at(w, o)
    return load_16_f32_at(w, o)


@njit(inline="always", **_KERNEL)
def _load_1(kind, w, o):
    """The weight at byte ``o`` of ``w`` as float32 (exact)."""
    if kind == 1:
        return load_f16(w, o)
    if kind == 2:
        return float_from_bits((np.uint32(w[o]) | (np.uint32(w[o + 1]) << 8)) << 16)
    return float_from_bits(load_u32(w, o))


def _tile_source(n_rows: int, n_tokens: int, kind: int, split: bool = False) -> str:
    """The source of ``_tile_RxT``: rows r .. r + R (row r at byte ``o``) of storage ``kind`` times tokens t .. t + T
    (token t's values at x[xo:], also at xp[t * (k // 2):] as ``activation_pairs`` gives them: bf16's pairs, which
    its tiles read, and f16's halves, which its one- and two-row tiles read in rows of ``F16_HALVES_FROM_K`` values
    or more), each result by the module's order for its kind, into out[t + j, first + r + i]. Written out per
    shape so that the accumulators are named registers (numba has no arrays of vectors), and per kind: with the
    kind an argument, the tile carried every kind's loops and one Zen 4 core ran bf16 prompts a tenth slower (896 x
    896 times 256 tokens: 150-153 against 171-174 GFLOP/s, the loops themselves the same)."""
    pairs = [(i, j) for i in range(n_rows) for j in range(n_tokens)]
    rows, tokens = range(n_rows), range(n_tokens)
    size = 4 if kind == 0 else 2
    lines = [f"def _tile_{n_rows}x{n_tokens}(w, o, row_bytes, x, xp, xo, k, out, t, first, r):"]
    lines += [f"    a{i}_{j} = zero_f32x16()" for i, j in pairs]
    lines += [f"    b{i}_{j} = zero_f32x16()" for i, j in pairs]
    if kind == 2:   # 32 values a vector, as pairs (``dot_bf16_pairs``)
        lines += ["    half = k // 2"]
        load_w = "load_32_bf16_pairs_at(w, o + {i} * row_bytes + {at} * 2)"
        load_x = "load_16_i32(xp, (t + {j}) * half + {at} // 2)"
        if split:   # prompts: short rows ask for the next tile's rows (``PREFETCH_NEXT_ROWS_MAX_BYTES``)
            ahead = f"prefetch(w, o + ({n_rows} + {{i}}) * row_bytes + {{at}} * 2)"
            lines += _either("row_bytes <= PREFETCH_NEXT_ROWS_MAX_BYTES",
                             _chain_lines(32, load_w, load_x, "dot_bf16_pairs", rows, tokens, split, ahead),
                             _chain_lines(32, load_w, load_x, "dot_bf16_pairs", rows, tokens, split))
        else:
            lines += _chain_lines(32, load_w, load_x, "dot_bf16_pairs", rows, tokens, split, size=size)
    elif kind == 1 and not split:   # f16, a few tokens: long rows read the activations' f16 copy in xp
        load_w = f"_load_16({kind}, w, o + {{i}} * row_bytes + {{at}} * {size})"
        load_halves = "load_16_f16_at(xh, ((t + {j}) * halves + {at}) * 2)"
        lines += _either("k >= F16_HALVES_FROM_K",
                         ["    halves = 2 * (k // 2)", "    xh = xp.view(np.uint8)"]
                         + _chain_lines(16, load_w, load_halves, "fma_f32x16", rows, tokens, split, size=size),
                         _chain_lines(16, load_w, "load_16_f32(x, xo + {j} * k + {at})", "fma_f32x16", rows, tokens,
                                      split, size=size))
    else:           # f16 prompts / f32: 16 values a vector
        lines += _chain_lines(16, f"_load_16({kind}, w, o + {{i}} * row_bytes + {{at}} * {size})",
                              "load_16_f32(x, xo + {j} * k + {at})", "fma_f32x16", rows, tokens, split, size=size)
    if (n_rows, n_tokens) == (4, 4):
        # Rows without values left one by one: the sixteen sums at once, token j's four at out[t + j, first + r:]
        # [:4]. With each sum on its own the reductions cost short rows a sixth: one Zen 4 core, 256 tokens, bf16
        # 4864 x 896 and 896 x 896 185-205 against 158-172 GFLOP/s, f16 103-108 against 97-100; 896 x 4864 the same.
        chains = ", ".join(f"add_f32x16(a{i}_{j}, b{i}_{j})" for j in tokens for i in rows)
        lines += ["    if tail == k:", f"        sums = lane_sums_f32x16({chains})"]
        lines += [f"        store_quarter_f32x16(out, t + {j}, first + r, sums, {j})" for j in tokens]
        lines += ["        return"]
    lines += [f"    s{i}_{j} = sum_f32x16(add_f32x16(a{i}_{j}, b{i}_{j}))" for i, j in pairs]
    lines += ["    for d in range(tail, k):"]
    lines += [f"        v{i} = _load_1({kind}, w, o + {i} * row_bytes + d * {size})" for i in rows]
    lines += [f"        s{i}_{j} = fma_f32(v{i}, x[xo + {j} * k + d], s{i}_{j})" for i, j in pairs]
    lines += [f"    out[t + {j}, first + r + {i}] = s{i}_{j}" for i, j in pairs]
    return "\n".join(lines) + "\n"


def _either(condition: str, then_lines: list[str], else_lines: list[str]) -> list[str]:
    """Tile lines (indented for the tile's body) that run ``then_lines`` where ``condition`` holds, else
    ``else_lines``."""
    return ([f"    if {condition}:"] + ["    " + line for line in then_lines] + ["    else:"]
            + ["    " + line for line in else_lines])


def _chain_lines(step: int, load_w: str, load_x: str, dot: str, rows, tokens, split: bool,
                 ahead: str | None = None, size: int = 2) -> list[str]:
    """One kind's loops in a tile: ``step`` values a vector (``load_w`` / ``load_x``: the loads of row i's and
    token j's vector at value ``at``), the first ``step`` of each 2 * step into chain a and the second into b by
    ``dot``, a last ``step`` into a; ``tail``: where the values left one by one start. The chains are independent
    sums, so ``split`` (chain a over all the values, then chain b) gives the same bits with half the
    accumulators live at once. Without ``split`` (a few tokens, rows from memory) each step asks for the lines of
    its rows ``STREAM_AHEAD_BYTES`` on (``size``: bytes a weight). ``ahead``: with ``split``, a line asked for per
    row and step of each chain loop (row i's at value ``at``)."""
    pairs = [(i, j) for i in rows for j in tokens]

    def step_lines(at, acc, indent):
        pad = " " * indent
        asked = [f"{pad}" + ahead.format(i=i, at=at) for i in rows] if ahead and at != "end" else []
        return (asked + [f"{pad}w{i} = " + load_w.format(i=i, at=at) for i in rows]
                + [f"{pad}x{j} = " + load_x.format(j=j, at=at) for j in tokens]
                + [f"{pad}{acc}{i}_{j} = {dot}({acc}{i}_{j}, w{i}, x{j})" for i, j in pairs])

    lines = [f"    end = k - k % {2 * step}"]
    if split:
        lines += [f"    for d in range(0, end, {2 * step}):"] + step_lines("d", "a", 8)
        lines += [f"    if k - end >= {step}:"] + step_lines("end", "a", 8)
        lines += [f"    for d in range(0, end, {2 * step}):"] + step_lines(f"(d + {step})", "b", 8)
    else:
        lines += [f"    for d in range(0, end, {2 * step}):"]
        if STREAM_AHEAD_BYTES:
            lines += [f"        prefetch_nta(w, o + {i} * row_bytes + d * {size} + {STREAM_AHEAD_BYTES + line})"
                      for i in rows for line in range(0, 2 * step * size, 64)]
        lines += step_lines("(d + 0)", "a", 8) + step_lines(f"(d + {step})", "b", 8)
        lines += [f"    if k - end >= {step}:"] + step_lines("end", "a", 8)
    return lines + [f"    tail = k - k % {step}"]


#: a few tokens' tiles (decode: one row at a time, from memory) ask for their rows' lines this many bytes ahead,
#: ``prefetchnta`` (into L1, as little of the other levels as the CPU allows: the activations stay in L1 beside the
#: stream). One Zen 4 core, one token, Qwen2.5-0.5B's matrices from memory (huge pages), alternating in one process,
#: GB/s without / with: f32 output 23.7 / 28.0, gate and up 25.1 / 29.7, down 19.8 / 21.0; bf16 25.9 / 29.3,
#: 26.1 / 28.3, 27.3 / 29.3; f16 24.0 / 27.6, 21.8 / 25.0, 24.1 / 27.8. (128 and 384-512 bytes ahead gained less;
#: ``prefetcht0`` 2048 bytes ahead, as the block kernels ask, made f16 / bf16 4864 x 896 slower: 20-22 / 21-22 GB/s
#: without, 19-21 / 16-17 with.)
STREAM_AHEAD_BYTES = 256

#: bf16 prompt tiles whose rows take at most this many bytes ask for the next tile's rows (the lines each step of each
#: chain reads, four rows on): the rows of a block come from L2 once per four tokens, and the hardware prefetcher
#: does not see four rows' worth ahead. Two Zen 4 threads, Qwen2.5-0.5B's BF16 matrices, 256 tokens, alternating in
#: one process (the same bits): k = 896 (1792-byte rows) 323-331 -> 351-372 GFLOP/s; k = 4864 (9728-byte rows,
#: four of them and the next four more than a 32 KiB L1) 345-348 -> 320-323, so not there. f16 tiles, bound by
#: their conversions and fused multiply-adds: no gain at k = 896.
PREFETCH_NEXT_ROWS_MAX_BYTES = 2048

#: from this many values a row the f16 one- and two-row tiles read the activations' f16 copy (``_halves_into``), below
#: it their float32 values (no conversion; at most 8 KiB). One Zen 4 core, one token, Qwen2.5-0.5B's F16
#: matrices from memory (huge pages), alternating in one process: k = 896 (output, gate and up) 23.3-24.3 / 23.8-24.1
#: GB/s with the copy, 24.9-26.3 / 26.2-26.8 with float32; k = 4864 (down) 29.3-30.7 with the copy, 19.4-20.2 with
#: float32 (19.5 KB of activations and a 9.7 KB weight row do not both stay in a 32 KiB L1).
F16_HALVES_FROM_K = 2048

_TILE_SCOPE = dict(np=np, F16_HALVES_FROM_K=F16_HALVES_FROM_K,
                   PREFETCH_NEXT_ROWS_MAX_BYTES=PREFETCH_NEXT_ROWS_MAX_BYTES, prefetch=prefetch,
                   prefetch_nta=prefetch_nta,
                   _load_16=_load_16, _load_1=_load_1, zero_f32x16=zero_f32x16, load_16_f32=load_16_f32,
                   load_16_f16_at=load_16_f16_at, fma_f32x16=fma_f32x16, sum_f32x16=sum_f32x16,
                   add_f32x16=add_f32x16, fma_f32=fma_f32, load_16_i32=load_16_i32,
                   load_32_bf16_pairs_at=load_32_bf16_pairs_at, dot_bf16_pairs=dot_bf16_pairs,
                   lane_sums_f32x16=lane_sums_f32x16, store_quarter_f32x16=store_quarter_f32x16)


def _make_tile(n_rows: int, n_tokens: int, kind: int, split: bool = False):
    scope = dict(_TILE_SCOPE)
    exec(compile(_tile_source(n_rows, n_tokens, kind, split), f"<float_dot tile {n_rows}x{n_tokens} kind {kind}>",
                 "exec"), scope)
    # not cached on its own (no source file); compiled into the cached launch that calls it
    return njit(error_model="numpy", boundscheck=False)(scope[f"_tile_{n_rows}x{n_tokens}"])


def _make_rows_times_tokens(kind: int):
    """``_rows_times_tokens`` for one storage kind, on that kind's tiles."""
    tile_1x1, tile_1x2, tile_4x4 = _make_tile(1, 1, kind), _make_tile(1, 2, kind), _make_tile(4, 4, kind, True)

    def rows_times_tokens(w, start, row_bytes, n, x, xp, k, t, nt, out, first):
        xo = t * k
        r = 0
        if nt == 4:
            while r + 4 <= n:
                tile_4x4(w, start + r * row_bytes, row_bytes, x, xp, xo, k, out, t, first, r)
                r += 4
            while r < n:
                tile_1x2(w, start + r * row_bytes, row_bytes, x, xp, xo, k, out, t, first, r)
                tile_1x2(w, start + r * row_bytes, row_bytes, x, xp, xo + 2 * k, k, out, t + 2, first, r)
                r += 1
        elif nt == 2:
            for r in range(n):
                tile_1x2(w, start + r * row_bytes, row_bytes, x, xp, xo, k, out, t, first, r)
        else:
            for r in range(n):
                tile_1x1(w, start + r * row_bytes, row_bytes, x, xp, xo, k, out, t, first, r)
    # not cached on its own (a closure over generated tiles); compiled into the cached launch that calls it
    return njit(error_model="numpy", boundscheck=False)(rows_times_tokens)


_f32_rows_times_tokens, _f16_rows_times_tokens, _bf16_rows_times_tokens = (
    _make_rows_times_tokens(FLOAT_KINDS[name]) for name in ("f32", "f16", "bf16"))


@njit(**_KERNEL)
def _rows_times_tokens(kind, w, start, row_bytes, n, x, xp, k, t, nt, out, first):
    """Rows [0, n) (row 0 at byte ``start``) of storage ``kind`` times tokens [t, t + nt): four tokens (512-bit
    paths' prompts) in tiles of four rows (a last one, two or three a row at a time), else (nt: 1 or 2) a row at
    a time."""
    if kind == 2:
        _bf16_rows_times_tokens(w, start, row_bytes, n, x, xp, k, t, nt, out, first)
    elif kind == 1:
        _f16_rows_times_tokens(w, start, row_bytes, n, x, xp, k, t, nt, out, first)
    else:
        _f32_rows_times_tokens(w, start, row_bytes, n, x, xp, k, t, nt, out, first)


@njit(**_KERNEL)
def rows_product(kind, w, start, row_bytes, n, x, pairs, out, column, wide):
    """Rows [0, n) of a matrix (row 0 at byte ``start`` of ``w``) times every token of ``x`` (float32 [n_tokens, k],
    rounded to the weights' precision; ``pairs``: ``activation_pairs``) into out[t, column + i]: the tokens two at
    a time, so that their activations stay in cache while the rows stream past; on a 512-bit path (``wide``) a
    prompt's four at a time, in blocks of rows and tokens."""
    n_tokens, k = x.shape
    flat = x.reshape(-1)
    size = 4 if kind == 0 else 2
    # A row at a time for a few tokens (decode is memory-bound: one core streamed f16 rows from memory at 24-25
    # GB/s so, at 11-12 in tiles of two or four rows read side by side; one Zen 4 core, 4864 x 896). Prompts on
    # 512-bit paths in tiles of four rows and four tokens, chain a then chain b (16 accumulators and 8 loads for
    # 16 products a step), over blocks of rows and tokens that stay in L2. One Zen 4 core, 256 tokens (GFLOP/s,
    # thread CPU time, alternating processes), bf16 4864 x 896 / 896 x 4864 / 1152 x 896: 95-107 / 88-93 / 94-110
    # in tiles of two rows and four tokens with both chains at once over whole chunks, 122-136 / 81-99 / 116-130
    # here; f16 (at the core's fused multiply-add rate either way) 78-86 / 73-79 / 83-91 against 86-92 / 66-68 or
    # 91-94 (by process) / 91-95, even or better over a layer's shapes; 4 x 4 tiles over whole chunks took f16's
    # long rows to 63-64. Qwen2.5-Coder-0.5B as BF16, two threads: prompt of 256 tokens 0.60x -> 0.84x llama.cpp's,
    # then 1.15x with the work around the tiles made compiled and shared (benchmarks/README.md, fourteenth session).
    blocked = wide and n_tokens >= FEW_TOKENS
    row_block = max(4, ROW_BLOCK_BYTES // row_bytes // 4 * 4) if blocked else np.int64(1) << 62
    token_block = max(4, TOKEN_BLOCK_BYTES // (k * size) // 4 * 4) if blocked else np.int64(1) << 62
    for t0 in range(0, n_tokens, token_block):
        t1 = min(n_tokens, t0 + token_block)
        for r0 in range(0, n, row_block):
            t = t0
            while t < t1:
                nt = 4 if blocked and t1 - t >= 4 else min(2, t1 - t)
                _rows_times_tokens(kind, w, start + r0 * row_bytes, row_bytes, min(row_block, n - r0), flat, pairs,
                                   k, t, nt, out, column + r0)
                t += nt


@njit(parallel=True, **_KERNEL)
def float_product(kind, w, chunks, row_bytes, x, pairs, out, wide):
    """out[t, column + i] = row i of a chunk times token t of ``x`` (float32 [n_tokens, k], already rounded to the
    weights' precision; ``pairs``: ``activation_pairs``) for every chunk of ``chunks`` (``float_chunks``: int64
    rows of (byte of the chunk's first row in ``w``, its first output column, its rows), rows of ``row_bytes``
    bytes in storage ``kind``: FLOAT_KINDS), one parallel iteration each (``rows_product``)."""
    for c in prange(chunks.shape[0]):
        rows_product(kind, w, chunks[c, 0], row_bytes, chunks[c, 2], x, pairs, out, chunks[c, 1], wide)


@njit(**_KERNEL)
def float_rows(kind, w, starts, counts, row_bytes, x, pairs, out, first, lo, hi, wide):
    """Rows [lo, hi) of matrices laid end to end (matrix m's ``counts[m]`` rows from byte ``starts[m]`` of ``w``)
    times the tokens of ``x`` into out[t, first + row]: a thread's share of a launch that the caller divides
    (the compiled decode step's chunks)."""
    base = 0
    for m in range(starts.size):
        a, b = max(lo, base), min(hi, base + counts[m])
        if a < b:
            rows_product(kind, w, starts[m] + (a - base) * row_bytes, row_bytes, b - a, x, pairs, out, first + a,
                         wide)
        base += counts[m]


@njit(nogil=True, cache=True)
def _bf16_bits(bits):
    """The bfloat16 bits of the float32 of bits ``bits`` (uint32) as ggml_compute_fp32_to_bf16 rounds: NaNs made
    quiet, else to nearest even (``floats.float_to_bf16_bits``, one value)."""
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return (bits >> np.uint32(16)) | np.uint32(64)
    return np.uint32((np.uint64(bits) + np.uint64(0x7FFF) + np.uint64((bits >> np.uint32(16)) & np.uint32(1)))
                     >> np.uint64(16))


@njit(nogil=True, cache=True)
def _on_a_line(n, dtype):
    """An uninitialised 1-D array of n ``dtype`` values starting on a 64-byte cache line (``line_aligned_empty`` for
    Python callers): numba's arrays start on 32 bytes, and the float kernels load activations 64 bytes at a time,
    each load touching two lines where they start 32 bytes off one. One Zen 4 core, one token, 4864 x 896 from
    memory, the same process: f16 16.8-20.9 GB/s with the activations on a line, 13.3-15.2 off; bf16 12.5-13.8
    against 9.7-11.2."""
    size = np.empty(1, dtype).itemsize
    buffer = np.empty(n + 64 // size, dtype)
    skip = (-buffer.ctypes.data) % 64 // size
    return buffer[skip:skip + n]


@njit(inline="always", cache=True)
def _round_into(kind, source, target):
    """target[i] = source[i] rounded to the weights' precision (1-D float32 arrays of one length): f16 to nearest
    even, bf16 as ``_bf16_bits``, f32 as it is."""
    if kind == 1:
        for i in range(source.size):
            target[i] = round_to_half(source[i])
    elif kind == 2:
        source_bits, target_bits = source.view(np.uint32), target.view(np.uint32)
        for i in range(source.size):
            target_bits[i] = _bf16_bits(source_bits[i]) << np.uint32(16)
    else:
        target[:] = source


@njit(inline="always", cache=True)
def _pairs_into(row, lanes):
    """The bfloat16 pairs of a rounded row (1-D float32) into ``lanes`` (uint16, 2 * (row.size // 2) of them). A
    bfloat16 is its float32's top 16 bits, the second uint16 of the value: the pairs are every other uint16 of
    the row, a gather LLVM vectorizes (shifting and or-ing the values' bits two at a time took 0.61 ms for a
    prompt's 256 x 4864 activations, this 0.33 on one Zen 4 core)."""
    halves = row.view(np.uint16)
    for j in range(lanes.size):
        lanes[j] = halves[2 * j + 1]


@njit(inline="always", cache=True)
def _halves_into(row, lanes):
    """The f16 bits of a row rounded to half precision (1-D float32; exact) into ``lanes`` (uint16, 2 * (row.size //
    2) of them): what the f16 one- and two-row tiles read instead of the float32 row in long rows
    (``F16_HALVES_FROM_K``). With the float32 row (19.5 KB at k = 4864) and a weight row (9.7 KB) not both kept in
    L1, one Zen 4 core read f16 896 x 4864 from memory at 14-18 GB/s in some processes (bf16, whose pairs are half
    the size: 23.8)."""
    for j in range(lanes.size):
        lanes[j] = half_bits(row[j])


@njit(inline="always", cache=True)
def _lanes_into(kind, row, lanes):
    """What the tiles read beside a rounded row (1-D float32) into ``lanes`` (uint16, 2 * (row.size // 2) of
    them): bf16's pairs, f16's halves; nothing for f32."""
    if kind == 2:
        _pairs_into(row, lanes)
    elif kind == 1:
        _halves_into(row, lanes)


@njit(nogil=True, cache=True)
def rounded_activations(kind, x):
    """The rows x (float32 [n, k]) rounded to the weights' precision, as ``matmul.quantize_activations`` rounds
    them for f16 / bf16 weights (f32: a copy), on a cache line; compiled, for the compiled decode step."""
    source = np.ascontiguousarray(x)
    flat = _on_a_line(source.size, np.float32)
    _round_into(kind, source.reshape(-1), flat)
    return flat.reshape(source.shape)


@njit(nogil=True, cache=True)
def activation_pairs(kind, x):
    """What ``float_product`` takes beside the activations x (float32 [n_tokens, k], already rounded to the weights'
    precision), int32 [n_tokens * (k // 2)] on a cache line: for bf16 weights their bfloat16 bits in pairs (the
    values of ``dot_bf16_pairs``' lanes), for f16 their half-precision bits two to an int32; for f32 an empty
    array."""
    if kind == 0:
        return np.zeros(0, np.int32)
    n_tokens, k = x.shape
    half = k // 2
    rows = np.ascontiguousarray(x)
    pairs = _on_a_line(n_tokens * half * 2, np.uint16)
    for t in range(n_tokens):
        _lanes_into(kind, rows[t], pairs[2 * t * half:2 * (t + 1) * half])
    return pairs.view(np.int32)


@njit(inline="always", cache=True)
def _operands_row(kind, x, rounded, pairs, t):
    """Row t of x rounded into rounded[t] and its lanes (bf16's pairs, f16's halves) into pairs[t * (k // 2):], as
    ``rounded_activations`` and ``activation_pairs`` give them, in one pass over the row."""
    _round_into(kind, x[t], rounded[t])
    half = x.shape[1] // 2
    _lanes_into(kind, rounded[t], pairs[t * half:(t + 1) * half].view(np.uint16))


@njit(parallel=True, nogil=True, cache=True)
def _operands_parallel(kind, x, rounded, pairs):
    for t in prange(x.shape[0]):
        _operands_row(kind, x, rounded, pairs, t)


@njit(nogil=True, cache=True)
def _operands_serial(kind, x, rounded, pairs):
    for t in range(x.shape[0]):
        _operands_row(kind, x, rounded, pairs, t)


#: from this many values a prompt's activations are rounded on numba's threads (a launch costs more below)
PARALLEL_OPERAND_VALUES = 1 << 15


def line_aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting on a 64-byte cache line (``_on_a_line``, for Python callers; a
    load across two lines cost the f16 prompt kernel a third)."""
    return _on_a_line(int(np.prod(shape)), np.dtype(dtype).type).reshape(shape)


def float_operands(kind: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What ``float_product`` takes for activations x (float32 [n_tokens, k]): (x rounded to the weights' precision,
    ``activation_pairs`` of it), each on a cache line, in one pass over x, on
    numba's threads for a prompt's activations. (Rounded by numpy, then paired per launch, a BF16 prompt of 256
    tokens spent 5% of its time here; Qwen2.5-0.5B, two Zen 4 threads.)"""
    n_tokens, k = x.shape
    rounded = line_aligned_empty((n_tokens, k), np.float32)
    pairs = line_aligned_empty((n_tokens * (k // 2) if kind != FLOAT_KINDS["f32"] else 0,), np.int32)
    fill = _operands_parallel if x.size >= PARALLEL_OPERAND_VALUES else _operands_serial
    fill(kind, np.ascontiguousarray(x, np.float32), rounded, pairs)
    return rounded, pairs


def float_chunks(starts, counts, row_bytes: int, n_threads: int) -> np.ndarray:
    """The chunk table of ``float_product`` for matrices whose first rows lie at bytes ``starts`` (``counts`` rows
    each, their outputs side by side in that order): about four chunks per thread over all their rows (an even
    spread when a thread starts late), each a multiple of four rows where the matrix has them."""
    total = int(sum(counts))
    per = -(-total // max(1, 4 * n_threads))
    per = max(4, -(-per // 4) * 4)
    table, column = [], 0
    for start, count in zip(starts, counts):
        for first in range(0, int(count), per):
            rows = min(per, int(count) - first)
            table.append((int(start) + first * row_bytes, column + first, rows))
        column += int(count)
    return np.array(table, np.int64).reshape(-1, 3)
