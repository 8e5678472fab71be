"""Everything of a layer that is not a weight product, on the device, in the CPU path's order of float
operations (model/forward.py, model/rope.py, model/attention.py): RMS norm, RoPE, SwiGLU / GeGLU, residual adds,
the KV cache store and attention over the device cache.

Grouped by what they do; each kernel loops over its work items with a grid stride (any launch shape, same
numbers). Where the CPU sums in float64 (RMS norm's sum of squares, softmax's denominator) these do too.
"""
from __future__ import annotations

import math

import numpy as np

from .blocks import half_to_float
from .quantize import round_to_f16
from .runtime import MAX_THREADS, import_cuda
from ..model.rope import rotate_pair

cuda = import_cuda()


@cuda.jit(device=True)
def block_sum(partial, value):
    """matvec.block_sum, again: numba's simulator swaps the ``cuda`` name of a device function's module around
    each call, which races between a block's threads when that module is not the calling kernel's (a thread
    could see the real numba.cuda mid-call); a device function that uses ``cuda.`` lives beside its kernels."""
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
    cuda.syncthreads()
    return total


# --- norms and element-wise ---------------------------------------------------------------------------------

@cuda.jit
def rms_norm_kernel(x, weight, eps, out):
    """out[r] = (x[r] * 1/sqrt(mean(x[r]^2) + eps)) * weight, x [n, k] (rows may be heads: weight [k])."""
    partial = cuda.shared.array(MAX_THREADS, np.float64)
    n, k = x.shape
    for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        acc = np.float64(0.0)
        for j in range(cuda.threadIdx.x, k, cuda.blockDim.x):
            value = np.float64(x[r, j])
            acc += value * value
        total = block_sum(partial, acc)
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
def cache_value(cache, scales, kind, h, j, d):
    """Value d of position j of head h of a cache layer, as float32 (a q8_0 layer: the block's half scale times
    the quant, as model/kv_cache.dequantize_q8_0 computes it)."""
    if kind == CACHE_F16:
        return half_to_float(cache[h, j, d])
    if kind == CACHE_Q8_0:
        return half_to_float(scales[h, j, d // 32]) * np.float32(cache[h, j, d])
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
        position = start + t
        first = 0
        if window > 0 and position - window + 1 > 0:
            first = position - window + 1
        n_keys = position + 1 - first
        best = -math.inf
        for j in range(cuda.threadIdx.x, n_keys, cuda.blockDim.x):
            s = np.float32(0.0)
            for d in range(head_dim_k):
                s += q[t, h, d] * cache_value(keys, key_scales, key_kind, kv_head, first + j, d)
            s = s * scale
            probs[item, j] = s
            best = max(best, np.float64(s))
        # the maximum: a tree of maxima through the shared array
        tid = cuda.threadIdx.x
        partial[tid] = best
        cuda.syncthreads()
        stride = cuda.blockDim.x // 2
        while stride > 0:
            if tid < stride:
                partial[tid] = max(partial[tid], partial[tid + stride])
            cuda.syncthreads()
            stride //= 2
        best32 = np.float32(partial[0])
        cuda.syncthreads()
        acc = np.float64(0.0)
        for j in range(cuda.threadIdx.x, n_keys, cuda.blockDim.x):
            e = exp_non_positive(np.float32(probs[item, j] - best32))
            probs[item, j] = e
            acc += np.float64(e)
        total = block_sum(partial, acc)
        inverse = np.float32(1.0 / total)
        for j in range(cuda.threadIdx.x, n_keys, cuda.blockDim.x):
            p = probs[item, j] * inverse
            probs[item, j] = np.float32(round_to_f16(p)) if value_kind == CACHE_F16 else p
        cuda.syncthreads()
        for d in range(cuda.threadIdx.x, head_dim_v, cuda.blockDim.x):
            a = np.float32(0.0)
            for j in range(n_keys):
                a += probs[item, j] * cache_value(values, value_scales, value_kind, kv_head, first + j, d)
            out[t, h * head_dim_v + d] = a
        cuda.syncthreads()
