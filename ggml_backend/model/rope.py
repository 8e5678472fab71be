"""Rotary position embeddings, computed the way ggml does.

ggml builds each position's angle table by repeated multiplication in float32 (theta_i = p * base^(-2i/d),
accumulated as theta *= base^(-2/d)), then scales by freq_scale; we follow the same order of float32 operations so
our rotated q/k match llama.cpp's to the last bits.
"""
from __future__ import annotations

import numpy as np


def rope_cos_sin(positions: np.ndarray, n_dims: int, freq_base: float, freq_scale: float):
    """cos and sin tables, float32 [len(positions), n_dims // 2]."""
    # powf, cosf and sinf of glibc are correctly rounded in nearly all cases: computing in float64 and rounding to
    # float32 reproduces them (numpy's float32 cos/sin/power are vectorized approximations off by an ulp or more).
    exponent = np.float32(-2.0) / np.float32(n_dims)
    theta_scale = np.float32(np.float64(np.float32(freq_base)) ** np.float64(exponent))
    theta = positions.astype(np.float32).copy()
    thetas = np.empty((len(positions), n_dims // 2), dtype=np.float32)
    for i in range(n_dims // 2):
        thetas[:, i] = theta * np.float32(freq_scale)
        theta = theta * theta_scale
    thetas64 = thetas.astype(np.float64)
    return np.cos(thetas64).astype(np.float32), np.sin(thetas64).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_dims: int, mode: str) -> np.ndarray:
    """Rotate x [n_tokens, n_heads, head_dim] in place; dims past n_dims pass through unchanged.

    mode "normal" rotates adjacent pairs (x[2i], x[2i+1]) (llama); "neox" rotates (x[i], x[i + n_dims/2])
    (qwen2, gemma3)."""
    c = cos[:, None, :]
    s = sin[:, None, :]
    if mode == "normal":
        x0 = x[..., 0:n_dims:2].copy()
        x1 = x[..., 1:n_dims:2].copy()
        x[..., 0:n_dims:2] = x0 * c - x1 * s
        x[..., 1:n_dims:2] = x0 * s + x1 * c
    elif mode == "neox":
        half = n_dims // 2
        x0 = x[..., :half].copy()
        x1 = x[..., half:n_dims].copy()
        x[..., :half] = x0 * c - x1 * s
        x[..., half:n_dims] = x0 * s + x1 * c
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    return x
