"""Rotary position embeddings, computed the way ggml does.

ggml builds each position's angle table by repeated multiplication in float32 (theta_i = p * base^(-2i/d),
accumulated as theta *= base^(-2/d)), then scales by freq_scale; we follow the same order of float32 operations so
our rotated q/k match llama.cpp's to the last bits.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _angles(positions, half, theta_scale, freq_scale):
    """thetas [n, half]: p * freq_scale, then p * theta_scale ** i by repeated float32 multiplication (ggml's
    order)."""
    thetas = np.empty((positions.size, half), np.float32)
    for t in range(positions.size):
        theta = np.float32(positions[t])
        for i in range(half):
            thetas[t, i] = theta * freq_scale
            theta = theta * theta_scale
    return thetas


def rope_cos_sin(positions: np.ndarray, n_dims: int, freq_base: float, freq_scale: float):
    """cos and sin tables, float32 [len(positions), n_dims // 2]."""
    # powf, cosf and sinf of glibc are correctly rounded in nearly all cases: computing in float64 and rounding to
    # float32 reproduces them (numpy's float32 cos/sin/power are vectorized approximations off by an ulp or more).
    exponent = np.float32(-2.0) / np.float32(n_dims)
    theta_scale = np.float32(np.float64(np.float32(freq_base)) ** np.float64(exponent))
    thetas = _angles(np.asarray(positions, np.float32).reshape(-1), n_dims // 2, theta_scale, np.float32(freq_scale))
    thetas64 = thetas.astype(np.float64)
    return np.cos(thetas64).astype(np.float32), np.sin(thetas64).astype(np.float32)


def rotate_pair(x, t, h, i, half, neox, cos, sin):
    """Rotate pair i of head h of token t of x [n_tokens, n_heads, head_dim] in place by angle cos[t, i], sin[t, i]:
    (i, i + half) for neox, else (2i, 2i + 1). The float32 products are rounded before the sum (numpy's order, no
    fused multiply-add: numba contracts nothing without fastmath). One formula for both devices: compiled here for
    the CPU and by cuda/ops.py for the GPU."""
    a = i if neox else 2 * i
    b = i + half if neox else 2 * i + 1
    x0 = x[t, h, a]
    x1 = x[t, h, b]
    c = cos[t, i]
    s = sin[t, i]
    x[t, h, a] = x0 * c - x1 * s
    x[t, h, b] = x0 * s + x1 * c


_rotate_pair = njit(inline="always", cache=True)(rotate_pair)


@njit(nogil=True, cache=True)
def _rotate(x, cos, sin, n_dims, neox):
    """Every pair of every head of every token (a decode step rotated q and k of each layer with eight numpy
    operations on tiny arrays before: 70 us a layer on a Zen 3)."""
    half = n_dims // 2
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                _rotate_pair(x, t, h, i, half, neox, cos, sin)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_dims: int, mode: str) -> np.ndarray:
    """Rotate x [n_tokens, n_heads, head_dim] (float32) in place by the angles of cos, sin [n_tokens, n_dims / 2]
    (or [1, n_dims / 2]: the same angles for every token); dims past n_dims pass through unchanged.

    mode "normal" rotates adjacent pairs (x[2i], x[2i+1]) (llama); "neox" rotates (x[i], x[i + n_dims/2])
    (qwen2, gemma3)."""
    if mode not in ("normal", "neox"):
        raise ValueError(f"unknown rope mode {mode!r}")
    if x.ndim != 3 or x.dtype != np.float32 or n_dims > x.shape[2] or n_dims % 2:
        raise ValueError(f"rope needs float32 [n_tokens, n_heads, head_dim >= {n_dims}] and even dims, "
                         f"got {x.dtype} {x.shape}")
    half = n_dims // 2
    if cos.shape not in ((x.shape[0], half), (1, half)) or sin.shape != cos.shape:
        raise ValueError(f"rope tables must be [{x.shape[0]}, {half}] or [1, {half}], got {cos.shape} and "
                         f"{sin.shape}")
    if cos.shape[0] != x.shape[0]:   # one row for every token (np.broadcast_to costs more than a decode step's rope)
        cos, sin = np.repeat(cos, x.shape[0], axis=0), np.repeat(sin, x.shape[0], axis=0)
    _rotate(x, np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32), int(n_dims),
            mode == "neox")
    return x
