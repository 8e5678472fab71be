"""Attention over the KV cache, one numba kernel.

Each (query, head) row is computed by the same loop whatever the batch it came in: BLAS would pick different
kernels (and summation orders) for different matrix sizes, and a prompt evaluated in one batch would then not give
the numbers of the same prompt evaluated on top of a cached prefix. With this kernel it does, so prompt caching
never changes what a fixed seed generates.

The arithmetic follows ggml's (llama.cpp without flash attention): q rounded to f16 (done by the caller), keys and
values stored f16-rounded, scores = q.k * scale, softmax with the sum in float64 and a multiplication by its
reciprocal, probabilities rounded to f16, then probabilities . values.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..quant.activations import _round_bits_to_f16
from ..quant.simd import float_from_bits

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


@njit(cache=True, parallel=True, fastmath=True, nogil=True)
def _attention_kernel(q, keys, values, out, start, group, window, scale):
    n_tokens, n_head, head_dim_k = q.shape
    head_dim_v = values.shape[2]
    for row in prange(n_tokens * n_head):
        t = row // n_head
        h = row - t * n_head
        kv_head = h // group
        position = start + t
        first = 0
        if window > 0 and position - window + 1 > 0:
            first = position - window + 1
        n_keys = position + 1 - first
        probs = np.empty(n_keys, np.float32)
        best = -np.inf
        for j in range(n_keys):
            s = np.float32(0.0)
            for d in range(head_dim_k):
                s += q[t, h, d] * keys[kv_head, first + j, d]
            s *= scale
            probs[j] = s
            if s > best:
                best = s
        total = 0.0
        for j in range(n_keys):
            e = _exp_non_positive(np.float32(probs[j] - best))
            probs[j] = e
            total += e
        inverse = np.float32(1.0 / total)
        for j in range(n_keys):
            probs[j] *= inverse
        _round_bits_to_f16(probs, probs.view(np.uint32))
        acc = np.zeros(head_dim_v, np.float32)
        for j in range(n_keys):
            p = probs[j]
            for d in range(head_dim_v):
                acc[d] += p * values[kv_head, first + j, d]
        for d in range(head_dim_v):
            out[t, h, d] = acc[d]


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, group: int, window: int,
              scale: float) -> np.ndarray:
    """softmax(q k^T * scale + causal/window mask) v.

    q: float32 [n_tokens, n_head, head_dim_k] (already rounded to f16) for positions start..start+n_tokens-1;
    keys, values: float32 [n_head_kv, n_ctx, head_dim] of one layer, filled up to start+n_tokens. Query at position
    p sees keys j <= p (and p - j < window when window > 0). Returns float32 [n_tokens, n_head, head_dim_v]."""
    n_tokens, n_head, head_dim_k = q.shape
    n_head_kv, n_ctx, _ = keys.shape
    if (keys.shape[2] != head_dim_k or values.shape[:2] != keys.shape[:2] or n_head != n_head_kv * group
            or start < 0 or start + n_tokens > n_ctx):
        raise ValueError(f"attention: inconsistent shapes q {q.shape}, keys {keys.shape}, values {values.shape}, "
                         f"start {start}, group {group}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty((n_tokens, n_head, values.shape[2]), np.float32)
    _attention_kernel(q, keys, values, out, int(start), int(group), int(window), np.float32(scale))
    return out
