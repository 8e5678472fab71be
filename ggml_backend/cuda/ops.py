"""Everything of a layer that is not a weight product, on the device, in the CPU path's order of float
operations (model/forward.py, model/rope.py, model/attention.py): RMS norm, RoPE, SwiGLU / GeGLU, residual adds,
the KV cache store and attention over the device cache.

Grouped by what they do; each kernel loops over its work items with a grid stride (any launch shape, same
numbers). Where the CPU sums in float64 (RMS norm's sum of squares, softmax's denominator) these do too.
"""
from __future__ import annotations

import math

import numpy as np

from .matvec import SHUFFLE, half, warp_layout, warp_sum
from .quantize import round_to_f16
from .runtime import MAX_THREADS, import_cuda
from ..model.rope import rotate_pair

cuda = import_cuda()


@cuda.jit(device=True)
def block_combine(partial, value, maximum):
    """The sum (or with ``maximum`` the maximum) of ``value`` over the block's threads (a power of two of them)
    through the shared ``partial``, in a fixed tree (the result does not depend on timing); every thread gets it
    (attention's softmax takes the scores' maximum). matvec.block_sum's sum, again: numba's simulator swaps the
    ``cuda`` name of a device function's module around each call, which races between a block's threads when
    that module is not the calling kernel's (a thread could see the real numba.cuda mid-call); a device function
    that uses ``cuda.`` lives beside its kernels."""
    t = cuda.threadIdx.x
    partial[t] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if t < stride:
            partial[t] = max(partial[t], partial[t + stride]) if maximum else partial[t] + partial[t + stride]
        cuda.syncthreads()
        stride //= 2
    result = partial[0]
    cuda.syncthreads()
    return result


# --- norms and element-wise ---------------------------------------------------------------------------------

# RMS norm's block on a GPU (kernels.rms_norm): a decode step normalizes one row of n_embd (5120 for a 13B) a few
# times a layer, and with 32 threads each thread's 160 loads, one after the other, took tens of microseconds; 256
# threads read a row in 20 loads each. The float64 sum of squares is summed in another order (a tree of 256
# partial sums instead of 32): the same float32 mean but for a rounding tie of the float64 sum.
NORM_THREADS = 256


@cuda.jit
def rms_norm_kernel(x, weight, eps, out):
    """out[r] = (x[r] * 1/sqrt(mean(x[r]^2) + eps)) * weight, x [n, k] (rows may be heads: weight [k]). A block
    per row, at most NORM_THREADS threads (a power of two)."""
    partial = cuda.shared.array(NORM_THREADS, np.float64)
    n, k = x.shape
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        acc = np.float64(0.0)
        for j in range(cuda.threadIdx.x, k, cuda.blockDim.x):
            value = np.float64(x[r, j])
            acc += value * value
        total = block_combine(partial, acc, False)
        mean = np.float32(total / k)
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(mean + eps)))
        for j in range(cuda.threadIdx.x, k, cuda.blockDim.x):
            out[r, j] = (x[r, j] * scale) * weight[j]


@cuda.jit
def add_kernel(x, y):
    """x += y (the residual stream), both [n, k]."""
    n, k = x.shape
    for item in range(cuda.grid(1), n * k, cuda.gridsize(1)):
        r = item // k
        x[r, item - r * k] += y[r, item - r * k]


@cuda.jit
def swiglu_kernel(gate, up):
    """gate = silu(gate) * up, silu(g) = g / (1 + exp(-g)): the CPU's model/forward.swiglu with the device's expf
    (within 2e-6 of it; the CPU computes e^-g as ggml's vectorized kernels do)."""
    n, k = gate.shape
    for item in range(cuda.grid(1), n * k, cuda.gridsize(1)):
        r = item // k
        c = item - r * k
        g = gate[r, c]
        gate[r, c] = (g / (np.float32(math.exp(-g)) + np.float32(1.0))) * up[r, c]


@cuda.jit(device=True)
def gelu_tanh(x):
    """model/forward.gelu_tanh: ggml's table of GELU at every half, i.e. the input rounded to f16, GELU in float32
    (tanh approximation), the output rounded to f16; x <= -10 gives 0 and x >= 10 gives x."""
    if x <= np.float32(-10.0):
        return np.float32(0.0)
    if x >= np.float32(10.0):
        return x
    h = np.float32(round_to_f16(x))
    inner = np.float32(0.7978845608028654) * h * (np.float32(1.0) + np.float32(0.044715) * h * h)
    y = np.float32(0.5) * h * (np.float32(1.0) + np.float32(math.tanh(inner)))
    return np.float32(round_to_f16(y))


@cuda.jit
def geglu_kernel(gate, up):
    n, k = gate.shape
    for item in range(cuda.grid(1), n * k, cuda.gridsize(1)):
        r = item // k
        c = item - r * k
        gate[r, c] = gelu_tanh(gate[r, c]) * up[r, c]


@cuda.jit
def gather_rows_kernel(x, rows, out):
    """out[i] = x[rows[i]] (the rows whose logits are wanted)."""
    k = x.shape[1]
    for item in range(cuda.grid(1), rows.shape[0] * k, cuda.gridsize(1)):
        i = item // k
        out[i, item - i * k] = x[rows[i], item - i * k]


@cuda.jit
def copy_columns_kernel(src, first, out):
    """out[r, c] = src[r, first + c]: one matrix's part of a fused product (kernels.DeviceProjection)."""
    n, k = out.shape
    for item in range(cuda.grid(1), n * k, cuda.gridsize(1)):
        r = item // k
        out[r, item - r * k] = src[r, first + item - r * k]


# --- rotary position embeddings ------------------------------------------------------------------------------

_rotate_pair = cuda.jit(device=True)(rotate_pair)   # the CPU's formula (model/rope.py), compiled for the GPU


@cuda.jit
def rope_kernel(x, cos, sin, n_dims, neox):
    """Rotate x [n_tokens, n_heads, head_dim] in place by the tables cos/sin [n_tokens, n_dims/2] (computed on the
    host by model/rope.rope_cos_sin, exactly as the CPU path computes them). neox: pairs (i, i + n_dims/2)
    (qwen2, gemma3); else adjacent pairs (2i, 2i+1) (llama)."""
    n_tokens, n_heads, _ = x.shape
    half = n_dims // 2
    for item in range(cuda.grid(1), n_tokens * n_heads * half, cuda.gridsize(1)):
        t = item // (n_heads * half)
        rest = item - t * n_heads * half
        h = rest // half
        _rotate_pair(x, t, h, rest - h * half, half, neox, cos, sin)


# --- the KV cache ---------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def float_to_half_bits(value):
    """float32 -> IEEE half bit pattern, round to nearest even (quant/floats.float_to_half_bits)."""
    if value != value:
        return 0x7E00
    rounded = round_to_f16(value)
    sign = 0x8000 if math.copysign(1.0, rounded) < 0 else 0
    magnitude = abs(rounded)
    if magnitude == 0.0:
        return sign
    if math.isinf(magnitude):
        return sign | 0x7C00
    mantissa, exponent = math.frexp(magnitude)       # magnitude = mantissa * 2**exponent, 0.5 <= mantissa < 1
    if exponent - 1 < -14:                           # subnormal: multiples of 2**-24
        return sign | np.int32(math.ldexp(magnitude, int(24)))
    return sign | ((exponent - 1 + 15) << 10) | (np.int32(math.ldexp(mantissa, int(11))) - 1024)


# cache storage kinds (model/kv_cache.py): float32 values, half bit patterns, q8_0 quants with half scales
CACHE_F32, CACHE_F16, CACHE_Q8_0 = 0, 1, 2


@cuda.jit
def store_kv_kernel(src, cache, starts, span, as_half):
    """cache[h, start + t, d] = src[t, h, d] (start = starts[span]): one layer of the cache [n_head_kv, n_ctx,
    head_dim], stored as float32, or as half bit patterns (uint16) when as_half."""
    n_tokens, n_heads, head_dim = src.shape
    start = starts[span]
    for item in range(cuda.grid(1), n_tokens * n_heads * head_dim, cuda.gridsize(1)):
        t = item // (n_heads * head_dim)
        rest = item - t * n_heads * head_dim
        h = rest // head_dim
        d = rest - h * head_dim
        if as_half:
            cache[h, start + t, d] = float_to_half_bits(src[t, h, d])
        else:
            cache[h, start + t, d] = src[t, h, d]


@cuda.jit(device=True)
def q8_0_reference_scale(x, row, first):
    """ggml's quantize_row_q8_0_ref for the 32 values x[row, first:first+32]: (d, 1/d or 0), float32."""
    amax = np.float32(0.0)
    for i in range(32):
        amax = max(amax, abs(x[row, first + i]))
    d = np.float32(amax / np.float32(127.0))
    inverse = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
    return d, inverse


@cuda.jit(device=True)
def round_half_away(value):
    """C roundf: halves away from zero."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


@cuda.jit
def store_kv_q8_0_kernel(src, quants, scales, starts, span):
    """Rows src [n_tokens * n_head_kv, head_dim] (token-major, rotated already where the cache rotates) into one
    q8_0 cache layer: quants int8 [n_head_kv, n_ctx, head_dim], half scales uint16 [n_head_kv, n_ctx, head_dim/32],
    by ggml's reference quantizer, as model/kv_cache.CacheTensor.write stores them."""
    n_rows, head_dim = src.shape
    n_heads = quants.shape[0]
    n_blocks = head_dim // 32
    start = starts[span]
    for item in range(cuda.grid(1), n_rows * n_blocks, cuda.gridsize(1)):
        row = item // n_blocks
        b = item - row * n_blocks
        t = row // n_heads
        h = row - t * n_heads
        d, inverse = q8_0_reference_scale(src, row, 32 * b)
        for i in range(32):
            quants[h, start + t, 32 * b + i] = round_half_away(np.float32(src[row, 32 * b + i] * inverse))
        scales[h, start + t, b] = float_to_half_bits(d)


@cuda.jit
def q8_0_round_trip_kernel(x):
    """x [n, k] replaced by its q8_0 quantization, dequantized (ggml's reference quantizer; the half scale times
    the quant): what q meets q8_0 keys as (model/attention.py)."""
    n, k = x.shape
    n_blocks = k // 32
    for item in range(cuda.grid(1), n * n_blocks, cuda.gridsize(1)):
        row = item // n_blocks
        first = 32 * (item - row * n_blocks)
        d, inverse = q8_0_reference_scale(x, row, first)
        half_d = np.float32(round_to_f16(d))
        for i in range(32):
            x[row, first + i] = half_d * np.float32(round_half_away(np.float32(x[row, first + i] * inverse)))


@cuda.jit
def rotate_kernel(x, hadamard, out):
    """out = x @ hadamard for rows x [n, k]: the normalized Hadamard rotation of q8_0 caches' heads
    (model/kv_cache.rotate; float32 sums in index order where the CPU's BLAS picks its own)."""
    n, k = x.shape
    for item in range(cuda.grid(1), n * k, cuda.gridsize(1)):
        row = item // k
        col = item - row * k
        acc = np.float32(0.0)
        for i in range(k):
            acc += x[row, i] * hadamard[i, col]
        out[row, col] = acc


# --- attention ------------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def exp_non_positive(x):
    """model/attention._exp_non_positive: exp(x) for x <= 0 as 2**n * p(r), the same polynomial."""
    x = max(x, np.float32(-87.0))
    n = np.float32(math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5)))
    r = (x - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * np.float32(math.ldexp(np.float64(1.0), int(n)))


@cuda.jit(device=True)
def stored_value(cache, scales, kind, h, j, d):
    """Value d of position j of head h of a cache layer, as float32 (a q8_0 layer: the block's half scale times
    the quant, as model/kv_cache.dequantize_q8_0 computes it); halves by the device's exact cvt.f32.f16."""
    if kind == CACHE_F16:
        return half(cache[h, j, d])
    if kind == CACHE_Q8_0:
        return half(scales[h, j, d // 32]) * np.float32(cache[h, j, d])
    return np.float32(cache[h, j, d])


@cuda.jit
def attention_kernel(q, keys, key_scales, values, value_scales, key_kind, value_kind, probs, out, starts, span,
                     group, window, scale):
    """softmax(q k^T * scale + causal / sliding-window mask) v for q [n_tokens, n_head, hd_k] at positions
    starts[span]..., over one cache layer keys [n_head_kv, n_ctx, hd_k], values [n_head_kv, n_ctx, hd_v] stored as
    key_kind / value_kind (CACHE_F32, CACHE_F16, CACHE_Q8_0 with its scales; q arrives as the CPU path prepares
    it for those keys: rounded to f16, or rotated and q8_0-rounded; see kernels.attention). One block per (token,
    head): its threads share the keys for the scores, then the value dimensions for the weighted sum; probs
    [n_tokens * n_head, >= n_keys] is scratch. The CPU path's arithmetic: float32 scores, the maximum subtracted,
    the sum of exponentials in float64, multiplied by its float32 reciprocal, rounded to f16 when the values are
    f16, the weighted sum in key order."""
    partial = cuda.shared.array(MAX_THREADS, np.float64)
    n_tokens, n_head, head_dim_k = q.shape
    head_dim_v = values.shape[2]
    start = starts[span]
    for item in range(cuda.blockIdx.x, n_tokens * n_head, cuda.gridDim.x):
        t = item // n_head
        h = item - t * n_head
        kv_head = h // group
        first, n_keys = key_range(start + t, window)
        best = -math.inf
        for j in range(cuda.threadIdx.x, n_keys, cuda.blockDim.x):
            s = np.float32(0.0)
            for d in range(head_dim_k):
                s += q[t, h, d] * stored_value(keys, key_scales, key_kind, kv_head, first + j, d)
            s = s * scale
            probs[item, j] = s
            best = max(best, np.float64(s))
        best32 = np.float32(block_combine(partial, best, True))
        acc = np.float64(0.0)
        for j in range(cuda.threadIdx.x, n_keys, cuda.blockDim.x):
            e = exp_non_positive(np.float32(probs[item, j] - best32))
            probs[item, j] = e
            acc += np.float64(e)
        total = block_combine(partial, acc, False)
        inverse = np.float32(1.0 / total)
        for j in range(cuda.threadIdx.x, n_keys, cuda.blockDim.x):
            p = probs[item, j] * inverse
            probs[item, j] = np.float32(round_to_f16(p)) if value_kind == CACHE_F16 else p
        cuda.syncthreads()
        for d in range(cuda.threadIdx.x, head_dim_v, cuda.blockDim.x):
            a = np.float32(0.0)
            for j in range(n_keys):
                a += probs[item, j] * stored_value(values, value_scales, value_kind, kv_head, first + j, d)
            out[t, h * head_dim_v + d] = a
        cuda.syncthreads()


# --- attention in three kernels -------------------------------------------------------------------------------
# Why. attention_kernel (above) gives one block of 32 threads to a (token, head): for the scores each thread takes
# whole keys and walks head_dim alone, so a warp's lanes read 32 different key rows at once, each load waiting for
# the previous iteration's (hundreds of sequential, latency-bound loads a thread); the weighted sum then walks all
# keys sequentially per output dimension; half values go through a float64 ldexp; and a decode step launches only
# n_head blocks on a GPU of 132 SMs. The same arithmetic is split here into three kernels, each with the
# parallelism of its own phase (a CUDA graph replays the three launches for about a microsecond each):
#
#   attention_scores_kernel   a warp per (token, head, key): lanes over head_dim (a key row read by one coalesced
#                             load per 32 values), the lanes' float32 partial sums added by a fixed shuffle tree;
#   attention_softmax_kernel  a block per (token, head): maximum, exponentials, float64 sum, reciprocal, f16 rounding
#                             exactly as attention_kernel computes them (order-free max; a float64 tree of the sum);
#   attention_values_kernel   a block per (token, head, slice of 32 value dimensions): ATTENTION_SPLITS warps, each
#                             the weighted sum of one contiguous range of keys in key order (loads of four keys
#                             issued before their four additions), lanes over the slice's dimensions; the ranges'
#                             sums then added in range order through shared memory.
#
# Each number depends on the row alone (its head_dim, its number of keys), never on the launch shape or on how many
# tokens and heads the launch holds, so prompts and decode steps, eager runs and graph replays give the same values.
# Against attention_kernel only the order of the float32 sums differs (within a few ulps). Half values are converted
# by the device's cvt.f32.f16 (matvec.half; exact). In the simulator (no shuffles) a block stands for a warp and
# reduces by block_combine, as matvec_kernel does by block_sum.

ATTENTION_SPLITS = 8     # contiguous key ranges per row in the weighted sum: a warp each on a GPU
ATTENTION_SLICE = 32     # value dimensions per block of the weighted sum: a lane each on a GPU
ATTENTION_PARTIALS = ATTENTION_SPLITS * ATTENTION_SLICE   # the weighted sum's block (a constant for shared.array)


@cuda.jit(device=True)
def key_range(position, window):
    """(first key, number of keys) the query at ``position`` attends to: causal, within ``window`` when > 0."""
    first = 0
    if window > 0 and position - window + 1 > 0:
        first = position - window + 1
    return first, position + 1 - first


@cuda.jit
def attention_scores_kernel(q, keys, key_scales, key_kind, probs, starts, span, group, window, scale):
    """probs[t * n_head + h, j] = (q[t, h] . key first + j of head h // group) * scale, float32, for every key j of
    the row (the row's first key and count by key_range at position starts[span] + t). On a GPU a warp per (row,
    key): lane l sums dimensions l, l + 32, ... in order, then warp_sum's fixed tree; blocks must be whole warps."""
    partial = cuda.shared.array(MAX_THREADS if not SHUFFLE else 1, np.float32)   # the simulator's block_combine only
    lane, width, warps, first_item = warp_layout(cuda.threadIdx.x, cuda.blockIdx.x, cuda.blockDim.x)
    n_tokens, n_head, head_dim = q.shape
    start = starts[span]
    # the most keys a row has (the last token's), read from the device like the positions: a graph's replay
    # launches as many warps as its capture did, and those past this step's keys find no work
    most_keys = start + n_tokens
    if window > 0 and most_keys > window:
        most_keys = window
    for item in range(first_item, n_tokens * n_head * most_keys, cuda.gridDim.x * warps):
        row = item // most_keys
        j = item - row * most_keys
        t = row // n_head
        h = row - t * n_head
        first, n_keys = key_range(start + t, window)
        if j >= n_keys:      # the same item for the whole warp (block): all its threads skip together
            continue
        acc = np.float32(0.0)
        if key_kind == CACHE_F16:    # the common cache, its loop without the storage branch (loads run ahead)
            for d in range(lane, head_dim, width):
                acc += q[t, h, d] * half(keys[h // group, first + j, d])
        else:
            for d in range(lane, head_dim, width):
                acc += q[t, h, d] * stored_value(keys, key_scales, key_kind, h // group, first + j, d)
        total = warp_sum(acc) if SHUFFLE else block_combine(partial, acc, False)
        if lane == 0:
            probs[row, j] = total * scale


@cuda.jit
def attention_softmax_kernel(probs, value_kind, starts, span, n_tokens, n_head, window):
    """Each row of scores in probs (attention_scores_kernel's) replaced by its softmax, attention_kernel's
    arithmetic: the float32 maximum subtracted, exp_non_positive, the sum in float64 (a tree over the block),
    multiplied by its float32 reciprocal, rounded to f16 when the values are f16. A block per row."""
    partial = cuda.shared.array(MAX_THREADS, np.float64)
    tid = cuda.threadIdx.x
    start = starts[span]
    for row in range(cuda.blockIdx.x, n_tokens * n_head, cuda.gridDim.x):
        _, n_keys = key_range(start + row // n_head, window)
        best = -math.inf
        for j in range(tid, n_keys, cuda.blockDim.x):
            best = max(best, np.float64(probs[row, j]))
        best32 = np.float32(block_combine(partial, best, True))
        acc = np.float64(0.0)
        for j in range(tid, n_keys, cuda.blockDim.x):
            e = exp_non_positive(np.float32(probs[row, j] - best32))
            probs[row, j] = e
            acc += np.float64(e)
        total = block_combine(partial, acc, False)
        inverse = np.float32(1.0 / total)
        for j in range(tid, n_keys, cuda.blockDim.x):
            p = probs[row, j] * inverse
            probs[row, j] = np.float32(round_to_f16(p)) if value_kind == CACHE_F16 else p


@cuda.jit
def attention_values_kernel(probs, values, value_scales, value_kind, out, starts, span, group, window):
    """out[t, h * hd_v + d] = sum over the row's keys j of probs[row, j] * value first + j of head h // group,
    dimension d (probs: attention_softmax_kernel's). A block per (row, slice of ATTENTION_SLICE dimensions); the
    keys cut into ATTENTION_SPLITS contiguous ranges of ceil(n_keys / ATTENTION_SPLITS), each summed in key order
    (on a GPU by a warp, a lane per dimension: blocks of ATTENTION_SPLITS * ATTENTION_SLICE threads), the ranges'
    sums added in range order."""
    partial = cuda.shared.array(ATTENTION_PARTIALS, np.float32)
    tid = cuda.threadIdx.x
    n_tokens = out.shape[0]
    head_dim = values.shape[2]
    n_head = out.shape[1] // head_dim
    n_slices = (head_dim + ATTENTION_SLICE - 1) // ATTENTION_SLICE
    start = starts[span]
    for item in range(cuda.blockIdx.x, n_tokens * n_head * n_slices, cuda.gridDim.x):
        row = item // n_slices
        first_d = (item - row * n_slices) * ATTENTION_SLICE
        t = row // n_head
        h = row - t * n_head
        kv_head = h // group
        first, n_keys = key_range(start + t, window)
        per_split = (n_keys + ATTENTION_SPLITS - 1) // ATTENTION_SPLITS
        for part in range(tid, ATTENTION_PARTIALS, cuda.blockDim.x):
            split = part // ATTENTION_SLICE
            d = first_d + part - split * ATTENTION_SLICE
            acc = np.float32(0.0)
            if d < head_dim:
                j = split * per_split
                end = min(j + per_split, n_keys)
                while value_kind == CACHE_F16 and j + 4 <= end:   # f16 (the common cache): no storage branch
                    b0 = values[kv_head, first + j, d]             # between the loads, so all eight are issued
                    b1 = values[kv_head, first + j + 1, d]         # before the first addition waits
                    b2 = values[kv_head, first + j + 2, d]
                    b3 = values[kv_head, first + j + 3, d]
                    p0 = probs[row, j]
                    p1 = probs[row, j + 1]
                    p2 = probs[row, j + 2]
                    p3 = probs[row, j + 3]
                    acc += p0 * half(b0)
                    acc += p1 * half(b1)
                    acc += p2 * half(b2)
                    acc += p3 * half(b3)
                    j += 4
                while j + 4 <= end:      # four keys' loads in flight, added in key order
                    p0 = probs[row, j]
                    p1 = probs[row, j + 1]
                    p2 = probs[row, j + 2]
                    p3 = probs[row, j + 3]
                    v0 = stored_value(values, value_scales, value_kind, kv_head, first + j, d)
                    v1 = stored_value(values, value_scales, value_kind, kv_head, first + j + 1, d)
                    v2 = stored_value(values, value_scales, value_kind, kv_head, first + j + 2, d)
                    v3 = stored_value(values, value_scales, value_kind, kv_head, first + j + 3, d)
                    acc += p0 * v0
                    acc += p1 * v1
                    acc += p2 * v2
                    acc += p3 * v3
                    j += 4
                while j < end:
                    acc += probs[row, j] * stored_value(values, value_scales, value_kind, kv_head, first + j, d)
                    j += 1
            partial[part] = acc
        cuda.syncthreads()
        for lane in range(tid, ATTENTION_SLICE, cuda.blockDim.x):
            d = first_d + lane
            if d < head_dim:
                total = partial[lane]
                for split in range(1, ATTENTION_SPLITS):
                    total += partial[split * ATTENTION_SLICE + lane]
                out[t, h * head_dim + d] = total
        cuda.syncthreads()
