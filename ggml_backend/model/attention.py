"""Attention over the KV cache, one numba kernel.

Each (query, head) row is computed by the same loop whatever the batch it came in: BLAS would pick different
kernels (and summation orders) for different matrix sizes, and a prompt evaluated in one batch would then not give
the numbers of the same prompt evaluated on top of a cached prefix. With this kernel it does, so prompt caching
never changes what a fixed seed generates.

The arithmetic follows ggml's (llama.cpp without flash attention), by cache type (model/kv_cache.py):
scores = q.k * scale, where q meets the keys in the keys' own precision as ggml's matrix product converts it
(f16 keys: q rounded to f16; q8_0 keys: q quantized to q8_0, its blocks' integer dot products with the keys'
weighted by the two scales, which is the product of the dequantized vectors; f32 keys: q as it is); softmax
with the sum in float64 and a multiplication by its reciprocal; probabilities rounded to f16 when the values are
f16; then probabilities . values. (llama.cpp keeps q8_0 values only with flash attention, which
weights dequantized values the same way up to float rounding.)

The query heads that share a KV head are taken up to four at a time (``_attention_rows``), so that each key and
value is loaded and converted once for them; each head's arithmetic is the one it has alone, so a row's numbers
do not depend on the heads, tokens or sequences computed beside it.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

from ..quant import dequantize, quantize
from ..quant.activations import round_to_f16_inplace
from ..quant.simd import (
    float_from_bits, fma_f32, fma_f32x16, half_to_float, lane_sums_f32x16, load_16_f16, load_16_f32, round_to_half,
    splat_f32, store_16_f32, store_quarter_f32x16, sum_f32x16, times_f32x16, zero_f32x16,
)
from .kv_cache import dequantize_q8_0, rotate

_LOG2_E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)            # ln 2 in two parts: n * _LN2_HIGH is exact for |n| < 2**12
_LN2_LOW = np.float32(-2.12194440e-4)


@njit(cache=True, inline="always", fastmath=True)
def _exp_non_positive(x):
    """exp(x) for x <= 0 (a softmax's shifted scores) in plain float32 arithmetic that LLVM vectorizes, where
    numpy's exp is a libm call per value: 2**n * exp(r) with n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by its
    Taylor polynomial to r**7 (truncation below 1e-8, within a float32 ulp), 2**n built from its exponent bits.
    Below -87 (2**-126, the smallest normal float) the result is that floor; softmax rounds it away."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * _LOG2_E + np.float32(0.5))
    r = (x - n * _LN2_HIGH) - n * _LN2_LOW
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * float_from_bits((np.int32(n) + 127) << 23)


def _accumulate(acc, p, values, kv_head, j):
    """acc += p * value j of head kv_head (overloaded below)."""


def _normalize_probabilities(probs, inverse, values):
    """probs *= inverse (the softmax's reciprocal sum), then rounded to f16 when the values are f16 (ggml converts
    the weights for the f16 product); one pass."""


def _stored(x):
    """A key or value element as float32: f32 storage as it is, f16 storage (its bits) converted (overloaded)."""


@overload(_stored, inline="always")
def _stored_overload(x):
    if x == types.float32:
        return lambda x: x
    if x == types.uint16:
        return lambda x: half_to_float(x)
    return None


_STORAGE = (types.float32, types.uint16)   # what the kernel reads directly; q8_0 is dequantized for the call


def _load_16_stored(row, d):
    """Sixteen key elements from d as float32 (overloaded below)."""


@overload(_load_16_stored, inline="always")
def _load_16_stored_overload(row, d):
    if row.dtype == types.float32:
        return lambda row, d: load_16_f32(row, d)
    if row.dtype == types.uint16:
        return lambda row, d: load_16_f16(row, d)
    return None


# The score is written out in explicit <16 x float> operations. As a plain loop under the kernels' fast-math, LLVM
# summed its products in the vector lanes and interleaved chains that its tuning for the host CPU chose, so the
# same query gave other bits on another CPU model: a Sapphire Rapids put the synthetic model's q8_0-key logits 0.041
# from llama.cpp's, a Zen 4 within 0.001; with the explicit lanes the Sapphire Rapids is within 0.001 too, at the
# same speed. (Fast-math's reassociation may still regroup the written adds, but by target-independent rules; the
# softmax's total is still a loop LLVM vectorizes as it likes: left as it is, it moved no test here.)


@njit(cache=True, inline="always", fastmath=True)
def _score(q, t, h, keys, kv_head, j):
    """q[t, h] . key j of head kv_head (f32 or f16 storage) in one order on every CPU: sixteen lane sums, value d
    into lane d % 16 in turn (one fused multiply-add each), folded halves first (``sum_f32x16``), then the tail of a
    head that is not a multiple of 16, value by value. (ggml's AVX-512 dot products keep four such accumulators over each 64 values:
    that order put Gemma 3's logits 0.50 from llama.cpp's on a prompt of the real-model test, this one 0.23.)"""
    n = keys.shape[2]
    qr = q[t, h]
    kr = keys[kv_head, j]
    end = n - n % 16
    acc = zero_f32x16()
    for d in range(0, end, 16):
        acc = fma_f32x16(acc, load_16_f32(qr, d), _load_16_stored(kr, d))
    s = sum_f32x16(acc)
    for d in range(end, n):   # llvm.fma calls: one after the other, whatever the fast-math flags allow
        s = fma_f32(qr[d], _stored(kr[d]), s)
    return s


@njit(cache=True, inline="always", fastmath=True)
def _four_chains(a0, a1, a2, a3, x, k0, k1, k2, k3):
    """One query chunk ``x`` into the lane chains of four keys' chunks: (a_c + x * k_c for c in 0..3)."""
    return fma_f32x16(a0, x, k0), fma_f32x16(a1, x, k1), fma_f32x16(a2, x, k2), fma_f32x16(a3, x, k3)


@njit(cache=True, inline="always", fastmath=True)
def _scores_4x4(q0, q1, q2, q3, n_rows, flat, n, j, probs, at, scale):
    """probs[r, at + c] = ``_score`` of query row q_r (r < ``n_rows``; rows past it repeat one and are not stored)
    with key j + c of ``flat`` (one KV head's keys as one row, ``n`` values a key), times ``scale``, bit for bit:
    each (head, key) pair's lane chain as ``_score`` runs it, side by side, so that each key chunk is loaded and
    converted once for four heads, and the sixteen chains folded together (``lane_sums_f32x16``: the same pairs in
    the same order as ``sum_f32x16``). The caller makes the row views once: views made here, per tile, cost numba
    reference counting calls in the loop."""
    end = n - n % 16
    a00, a01, a02, a03 = zero_f32x16(), zero_f32x16(), zero_f32x16(), zero_f32x16()
    a10, a11, a12, a13 = zero_f32x16(), zero_f32x16(), zero_f32x16(), zero_f32x16()
    a20, a21, a22, a23 = zero_f32x16(), zero_f32x16(), zero_f32x16(), zero_f32x16()
    a30, a31, a32, a33 = zero_f32x16(), zero_f32x16(), zero_f32x16(), zero_f32x16()
    for d in range(0, end, 16):
        k0 = _load_16_stored(flat, j * n + d)
        k1 = _load_16_stored(flat, (j + 1) * n + d)
        k2 = _load_16_stored(flat, (j + 2) * n + d)
        k3 = _load_16_stored(flat, (j + 3) * n + d)
        a00, a01, a02, a03 = _four_chains(a00, a01, a02, a03, load_16_f32(q0, d), k0, k1, k2, k3)
        a10, a11, a12, a13 = _four_chains(a10, a11, a12, a13, load_16_f32(q1, d), k0, k1, k2, k3)
        a20, a21, a22, a23 = _four_chains(a20, a21, a22, a23, load_16_f32(q2, d), k0, k1, k2, k3)
        a30, a31, a32, a33 = _four_chains(a30, a31, a32, a33, load_16_f32(q3, d), k0, k1, k2, k3)
    sums = lane_sums_f32x16(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
    if end == n:    # no tail: scaled in the register (scalar reloads of the stored lanes stall store forwarding)
        sums = times_f32x16(sums, scale)
    store_quarter_f32x16(probs, 0, at, sums, 0)    # lanes 4 r .. 4 r + 3: row r's four keys
    if n_rows > 1:
        store_quarter_f32x16(probs, 1, at, sums, 1)
    if n_rows > 2:
        store_quarter_f32x16(probs, 2, at, sums, 2)
    if n_rows > 3:
        store_quarter_f32x16(probs, 3, at, sums, 3)
    if end < n:
        for r in range(n_rows):
            qr = q0 if r == 0 else q1 if r == 1 else q2 if r == 2 else q3
            for c in range(4):
                s = probs[r, at + c]
                for d in range(end, n):   # the tail as _score takes it
                    s = fma_f32(qr[d], _stored(flat[(j + c) * n + d]), s)
                probs[r, at + c] = s * scale


@njit(cache=True, inline="always", fastmath=True)
def _splat_4(probs, r, j):
    """probs[r, j .. j + 3], each in all lanes of an ``F32x16``."""
    return splat_f32(probs[r, j]), splat_f32(probs[r, j + 1]), splat_f32(probs[r, j + 2]), splat_f32(probs[r, j + 3])


@njit(cache=True, inline="always", fastmath=True)
def _add_weighted_4(acc, at, p0, p1, p2, p3, v0, v1, v2, v3):
    """acc[at:at + 16] = fma(p3, v3, fma(p2, v2, fma(p1, v1, fma(p0, v0, acc[at:at + 16]))))."""
    a = fma_f32x16(load_16_f32(acc, at), p0, v0)
    a = fma_f32x16(a, p1, v1)
    a = fma_f32x16(a, p2, v2)
    store_16_f32(acc, at, fma_f32x16(a, p3, v3))


@njit(cache=True, inline="always", fastmath=True)
def _accumulate_rows_4(acc, probs, n_rows, j, flat, key, n):
    """acc[r n .. r n + n] (row r < ``n_rows``, ``acc`` flat) += the four values from key ``key`` of ``flat`` (one
    KV head's values as one row, ``n`` a value) weighted by probs[r, j .. j + 3], each value chunk loaded and
    converted once for the rows. Each element takes the chain fma(p3, v3, fma(p2, v2, fma(p1, v1, fma(p0, v0,
    acc)))): the order LLVM made of the sum acc + ((p0 v0 + p1 v1) + (p2 v2 + p3 v3)) that this kernel wrote
    before, one row at a time, under fast-math (read in its x86 code: four ``vfmadd`` into the loaded acc, p0
    first), now written out, so a row's numbers do not depend on the rows beside it."""
    end = n - n % 16
    # each row's four weights splatted once, before the chunks (loaded per chunk, they were re-read past the stores
    # to acc, which may alias probs: one head a tile ran 10-25% slower than the former per-row loop)
    r1, r2, r3 = min(1, n_rows - 1), min(2, n_rows - 1), min(3, n_rows - 1)
    p00, p01, p02, p03 = _splat_4(probs, 0, j)
    p10, p11, p12, p13 = _splat_4(probs, r1, j)
    p20, p21, p22, p23 = _splat_4(probs, r2, j)
    p30, p31, p32, p33 = _splat_4(probs, r3, j)
    for d in range(0, end, 16):
        v0 = _load_16_stored(flat, key * n + d)
        v1 = _load_16_stored(flat, (key + 1) * n + d)
        v2 = _load_16_stored(flat, (key + 2) * n + d)
        v3 = _load_16_stored(flat, (key + 3) * n + d)
        _add_weighted_4(acc, d, p00, p01, p02, p03, v0, v1, v2, v3)
        if n_rows > 1:
            _add_weighted_4(acc, n + d, p10, p11, p12, p13, v0, v1, v2, v3)
        if n_rows > 2:
            _add_weighted_4(acc, 2 * n + d, p20, p21, p22, p23, v0, v1, v2, v3)
        if n_rows > 3:
            _add_weighted_4(acc, 3 * n + d, p30, p31, p32, p33, v0, v1, v2, v3)
    for d in range(end, n):
        for r in range(n_rows):
            a = fma_f32(probs[r, j], _stored(flat[key * n + d]), acc[r * n + d])
            a = fma_f32(probs[r, j + 1], _stored(flat[(key + 1) * n + d]), a)
            a = fma_f32(probs[r, j + 2], _stored(flat[(key + 2) * n + d]), a)
            acc[r * n + d] = fma_f32(probs[r, j + 3], _stored(flat[(key + 3) * n + d]), a)


@overload(_accumulate, inline="always")
def _accumulate_overload(acc, p, values, kv_head, j):
    if values.dtype not in _STORAGE:
        return None

    def accumulate(acc, p, values, kv_head, j):
        for d in range(values.shape[2]):
            acc[d] += p * _stored(values[kv_head, j, d])
    return accumulate


@overload(_normalize_probabilities, inline="always")
def _normalize_probabilities_overload(probs, inverse, values):
    if values.dtype == types.uint16:
        def normalize_probabilities(probs, inverse, values):
            for j in range(probs.size):
                probs[j] = round_to_half(probs[j] * inverse)
    else:
        def normalize_probabilities(probs, inverse, values):
            for j in range(probs.size):
                probs[j] *= inverse
    return normalize_probabilities


@njit(cache=True, inline="always", fastmath=True)
def _attention_rows(q, t, h, n_rows, keys, values, out, position, group, window, scale):
    """out[t, h + r] for r < ``n_rows`` (1-4 query heads of one KV head) = each query at ``position`` over
    ``keys``/``values`` [n_head_kv, >= position + 1, head_dim]: the one computation every query row takes, alone
    or in a batch of sequences, and whatever heads share its tile (each row's numbers are its own)."""
    kv_head = h // group
    first = 0
    if window > 0 and position - window + 1 > 0:
        first = position - window + 1
    n_keys = position + 1 - first
    probs = np.empty((n_rows, n_keys), np.float32)
    ks = keys[kv_head]
    flat = ks.reshape(ks.size)
    q0 = q[t, h]
    q1 = q[t, h + min(1, n_rows - 1)]
    q2 = q[t, h + min(2, n_rows - 1)]
    q3 = q[t, h + min(3, n_rows - 1)]
    j = 0
    while n_rows > 1 and j + 4 <= n_keys:   # one head alone shares nothing: _score, without three wasted rows
        _scores_4x4(q0, q1, q2, q3, n_rows, flat, keys.shape[2], first + j, probs, j, scale)
        j += 4
    while j < n_keys:
        for r in range(n_rows):
            probs[r, j] = _score(q, t, h + r, keys, kv_head, first + j) * scale
        j += 1
    for r in range(n_rows):
        row = probs[r]
        best = -np.inf
        for j in range(n_keys):
            if row[j] > best:
                best = row[j]
        total = 0.0
        for j in range(n_keys):
            e = _exp_non_positive(np.float32(row[j] - best))
            row[j] = e
            total += e
        _normalize_probabilities(row, np.float32(1.0 / total), values)
    n = values.shape[2]
    acc = np.zeros(n_rows * n, np.float32)
    vs = values[kv_head]
    flat_values = vs.reshape(vs.size)
    j = 0
    while j + 4 <= n_keys:   # keys in fours from the row's first key: the same grouping in any batch
        _accumulate_rows_4(acc, probs, n_rows, j, flat_values, first + j, n)
        j += 4
    for r in range(n_rows):
        row_acc = acc[r * n:(r + 1) * n]
        for jj in range(j, n_keys):
            _accumulate(row_acc, probs[r, jj], values, kv_head, first + jj)
        for d in range(n):
            out[t, h + r, d] = row_acc[d]


TILE_HEADS = 4     # query heads of one KV head that _attention_rows takes at a time (its score tiles' rows)


@njit(cache=True, inline="always")
def _head_tiles(group, width):
    """Tiles of up to ``width`` (1-4) query heads per KV head."""
    return (group + width - 1) // width


@njit(cache=True, inline="always")
def _tile_rows(tile, group, width):
    """(first query head, number of heads) of a token's tile ``tile``: KV head ``tile // _head_tiles(group,
    width)``'s heads, ``width`` at a time."""
    kv_head, within = divmod(tile, _head_tiles(group, width))
    first = width * within
    return kv_head * group + first, min(width, group - first)


@njit(cache=True, fastmath=True, nogil=True)
def attention_tile(q, t, tile, width, keys, values, out, position, group, window, scale):
    """``_attention_rows`` of tile ``tile`` (0 .. ``head_tile_count`` - 1, tiles of ``width`` heads) of token t,
    compiled as the attention kernels compile it, with fast-math: for callers compiled without it (decode_step's
    layer region), into which numba's inlining would bring its loops under their own flags (other sums, logits
    7e-7 to 0.2 from the kernels' after a few steps). A head's numbers do not depend on its tile."""
    h, n_rows = _tile_rows(tile, group, width)
    _attention_rows(q, t, h, n_rows, keys, values, out, position, group, window, scale)


@njit(cache=True)
def head_tile_count(n_head_kv, group, width):
    """How many tiles of ``width`` heads ``attention_tile`` takes a token's heads in."""
    return n_head_kv * _head_tiles(group, width)


@njit(cache=True)
def decode_tile_width(n_head_kv, group, n_threads):
    """The widest tiles (4, 2 or 1 heads) that still give each of ``n_threads`` threads a tile of one token's
    heads: Gemma 3 270M's four heads of one KV head are one tile of four, which one thread of two would take
    alone."""
    width = TILE_HEADS
    while width > 1 and head_tile_count(n_head_kv, group, width) < n_threads:
        width //= 2
    return width


@njit(cache=True)
def tile_width_of(n_head_kv, group, n_tiles):
    """The tile width whose ``head_tile_count`` is ``n_tiles`` (the widest, where widths give the same tiles)."""
    width = TILE_HEADS
    while width > 1 and head_tile_count(n_head_kv, group, width) != n_tiles:
        width //= 2
    return width


@njit(cache=True, inline="always")
def _from_both_ends(i, n_rows):
    """The row that iteration i of a launch over n_rows rows takes: 0, n_rows - 1, 1, n_rows - 2, ... A causal row's
    keys grow with its token, and numba gives each thread a block of iterations: in token order the second of two
    threads had three quarters of a prompt's work (two Zen 4 threads ran 1.33 times as fast as one; taken from both
    ends, 2.0 times)."""
    half = np.int64(i) // 2
    return half if i % 2 == 0 else n_rows - 1 - half


@njit(cache=True, inline="always")
def _unit_rows(i, n_units, tiles, group):
    """Iteration i of a launch over ``n_units`` (token, tile of heads) units, ``tiles`` a token, taken from both
    ends: (token, first query head, number of heads)."""
    unit = _from_both_ends(i, n_units)
    t = unit // tiles
    h, n_rows = _tile_rows(unit - t * tiles, group, TILE_HEADS)
    return t, h, n_rows


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def _attention_kernel(q, keys, values, out, start, group, window, scale):
    n_tokens, n_head, _ = q.shape
    tiles = head_tile_count(n_head // group, group, TILE_HEADS)     # per token: each KV head's tiles of heads
    n_units = n_tokens * tiles
    for i in prange(n_units):
        t, h, n_rows = _unit_rows(i, n_units, tiles, group)
        _attention_rows(q, t, h, n_rows, keys, values, out, start + t, group, window, scale)


@intrinsic
def _pointer_at(typingctx, address):
    """The int64 ``address`` (a numpy array's ``ctypes.data``) as a void pointer, for ``numba.carray``."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
    return types.voidptr(address), codegen


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def _attention_many_kernel(q, key_at, value_at, key_capacity, value_capacity, layer_shape, key_like, value_like, il,
                           sequence, positions, out, group, window, scale):
    """``_attention_kernel`` for rows of several sequences in one launch: row t belongs to sequence
    ``sequence[t]`` at ``positions[t]``, whose caches (``CacheTensor.data``, C-contiguous [n_layer, n_head_kv,
    capacity, head_dim], of key_like's / value_like's dtype) start at addresses key_at / value_at."""
    n_tokens, n_head, _ = q.shape
    n_layer, n_head_kv, head_dim_k, head_dim_v = layer_shape
    tiles = head_tile_count(n_head_kv, group, TILE_HEADS)
    n_units = n_tokens * tiles
    for i in prange(n_units):
        t, h, n_rows = _unit_rows(i, n_units, tiles, group)
        s = sequence[t]
        keys = carray(_pointer_at(key_at[s]), (n_layer, n_head_kv, key_capacity[s], head_dim_k), key_like.dtype)[il]
        values = carray(_pointer_at(value_at[s]), (n_layer, n_head_kv, value_capacity[s], head_dim_v),
                        value_like.dtype)[il]
        _attention_rows(q, t, h, n_rows, keys, values, out, positions[t], group, window, scale)


def attention(q: np.ndarray, keys, values, start: int, group: int, window: int, scale: float) -> np.ndarray:
    """softmax(q k^T * scale + causal/window mask) v.

    q: float32 [n_tokens, n_head, head_dim_k] for positions start..start+n_tokens-1; keys, values: one layer of
    the cache as (data [n_head_kv, n_ctx, head_dim], scales, stored rotated) (``CacheTensor.layer``; a bare
    float32 array is taken as f32 storage), filled up to start+n_tokens. Query at position p sees keys j <= p (and p - j < window
    when window > 0). Returns float32 [n_tokens, n_head, head_dim_v].

    q8_0 layers are dequantized to float32 for the call (the positions it reads; a transient copy of one layer):
    a kernel reading the int8 quants directly did not vectorize and ran 5x slower."""
    keys, key_scales, keys_rotated = keys if isinstance(keys, tuple) else (keys, None, False)
    values, value_scales, values_rotated = values if isinstance(values, tuple) else (values, None, False)
    n_tokens, n_head, head_dim_k = q.shape
    n_head_kv, n_ctx, _ = keys.shape
    if (keys.shape[2] != head_dim_k or values.shape[:2] != keys.shape[:2] or n_head != n_head_kv * group
            or start < 0 or start + n_tokens > n_ctx):
        raise ValueError(f"attention: inconsistent shapes q {q.shape}, keys {keys.shape}, values {values.shape}, "
                         f"start {start}, group {group}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if keys.dtype == np.uint16:            # ggml's f16 product converts q to f16
        q = round_to_f16_inplace(q.copy())
    elif keys.dtype == np.int8:            # and its q8_0 product quantizes q (rotated as the keys are) to q8_0
        if keys_rotated:
            q = rotate(q)
        q = dequantize("q8_0", quantize("q8_0", q), q.shape)
        keys = dequantize_q8_0(keys, key_scales, 0, start + n_tokens)
    if values.dtype == np.int8:
        values = dequantize_q8_0(values, value_scales, 0, start + n_tokens)
    out = np.empty((n_tokens, n_head, values.shape[2]), np.float32)
    _attention_kernel(q, keys, values, out, int(start), int(group), int(window), np.float32(scale))
    if values_rotated:                     # weighted sums of rotated values, rotated back
        out = rotate(out)
    return out


class SequencesAttention:
    """Attention for the rows of several sequences of one forward pass in one kernel launch per layer (a decode
    step of 16 sequences made 16 launches per layer, each a few microseconds of work: 6-9 ms of a step). Each
    row goes through the loop ``attention`` runs (``_attention_rows``), so its numbers are those of its sequence
    evaluated alone.

    Made per pass, before its keys and values are stored: it first gives every cache room for the pass's positions
    (``CacheTensor.grow``); the kernel reads the caches' arrays by address, so a cache released meanwhile (its
    arrays mapped anew) is refused, not read.
    ``SequencesAttention.possible`` says whether the caches allow it: f32 or f16 storage (q8_0 is dequantized per
    call), the same kinds in every sequence."""

    def __init__(self, caches, rows_per_sequence, positions):
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        last = np.cumsum(rows_per_sequence) - 1
        for cache, end in zip(caches, positions[last] + 1):
            cache.k.grow(int(end))
            cache.v.grow(int(end))
        first = caches[0]
        self._caches = caches       # keeps the arrays whose addresses the kernel reads alive
        self._keys = [cache.k.data for cache in caches]
        self._values = [cache.v.data for cache in caches]
        self._key_at = np.array([data.ctypes.data for data in self._keys], np.int64)
        self._value_at = np.array([data.ctypes.data for data in self._values], np.int64)
        self._key_capacity = np.array([data.shape[2] for data in self._keys], np.int64)
        self._value_capacity = np.array([data.shape[2] for data in self._values], np.int64)
        n_layer, n_head_kv, _, head_dim_k = first.k.data.shape
        self._shape = (n_layer, n_head_kv, head_dim_k, first.v.data.shape[3])
        self._sequence = np.repeat(np.arange(len(caches), dtype=np.int64), rows_per_sequence)
        self._positions = positions
        self._f16_keys = first.k.data.dtype == np.uint16

    @staticmethod
    def possible(caches) -> bool:
        """Whether one launch per layer is worth it and the caches allow it: two sequences or more, ``readable``."""
        return len(caches) >= 2 and SequencesAttention.readable(caches)

    @staticmethod
    def readable(caches) -> bool:
        """Whether the kernel can read these caches by address: f32 or f16 storage, C-contiguous, the same kinds
        in every cache."""
        kinds = {(cache.k.kind, cache.v.kind) for cache in caches}
        if len(kinds) != 1:
            return False
        key_kind, value_kind = kinds.pop()
        contiguous = all(c.k.data.flags.c_contiguous and c.v.data.flags.c_contiguous for c in caches)
        return contiguous and key_kind in ("f32", "f16") and value_kind in ("f32", "f16")

    def kernel_arguments(self) -> tuple:
        """What a compiled caller (model/decode_step.py) passes on to ``_attention_many_kernel`` and to its
        cache stores: ((key addresses, value addresses, their capacities, (n_layer, n_head_kv, head_dim_k,
        head_dim_v), the first sequence's key and value arrays (their dtypes), whether keys and values are f16),
        each row's sequence, each row's position)."""
        caches = (self._key_at, self._value_at, self._key_capacity, self._value_capacity, self._shape,
                  self._keys[0], self._values[0], self._f16_keys, self._values[0].dtype == np.uint16)
        return caches, self._sequence, self._positions

    def __call__(self, q: np.ndarray, il: int, group: int, window: int, scale: float) -> np.ndarray:
        """q float32 [n_rows, n_head, head_dim_k] (all sequences' rows, in order) over layer ``il`` of each row's
        cache, filled up to its position; float32 [n_rows, n_head, head_dim_v]."""
        for cache, keys, values in zip(self._caches, self._keys, self._values):
            if cache.k.data is not keys or cache.v.data is not values:   # never read a moved (freed) array
                raise RuntimeError("a cache was reallocated during the forward pass")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self._f16_keys:                 # ggml's f16 product converts q to f16
            q = round_to_f16_inplace(q.copy())
        out = np.empty((q.shape[0], q.shape[1], self._shape[3]), np.float32)
        _attention_many_kernel(q, self._key_at, self._value_at, self._key_capacity, self._value_capacity,
                               self._shape, self._keys[0],
                               self._values[0], int(il), self._sequence, self._positions, out, int(group),
                               int(window), np.float32(scale))
        return out
