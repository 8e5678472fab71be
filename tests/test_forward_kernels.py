"""The forward pass's norm and activation: each row's numbers do not depend on how many rows are computed with it
(one decode token or a prompt: rms_norm's serial and parallel builds), and they compute the formulas."""
from __future__ import annotations

import numpy as np
import pytest

from ggml_backend.model.forward import rms_norm, swiglu


def test_rms_norm_rows_are_the_same_alone_and_in_a_batch_and_follow_ggml():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 896)) * rng.uniform(0.01, 50, (64, 1))).astype(np.float32)
    weight = rng.standard_normal(896).astype(np.float32)
    batch = rms_norm(x, weight, 1e-6)
    alone = np.concatenate([rms_norm(x[i:i + 1], weight, 1e-6) for i in range(len(x))])
    assert np.array_equal(batch, alone)
    mean = (np.square(x, dtype=np.float64).sum(axis=1, keepdims=True) / 896).astype(np.float32)
    expected = (x * (np.float32(1.0) / np.sqrt(mean + np.float32(1e-6)))) * weight
    assert np.allclose(batch, expected, rtol=1e-6, atol=0)
    heads = x.reshape(64, 14, 64)                     # q_norm / k_norm: per head over the last axis
    assert np.array_equal(rms_norm(heads, weight[:64], 1e-6)[3], rms_norm(heads[3], weight[:64], 1e-6))


def test_swiglu_rows_are_the_same_alone_and_in_a_batch_and_follow_the_formula():
    rng = np.random.default_rng(1)
    gate = (rng.standard_normal((40, 4864)) * 6).astype(np.float32)
    gate[0, :8] = [-200.0, -100.0, -88.0, -10.0, 0.0, 10.0, 95.0, 200.0]   # e^-x past 2^126 and past 2^192
    up = rng.standard_normal((40, 4864)).astype(np.float32)
    batch = swiglu(gate, up)
    alone = np.concatenate([swiglu(gate[i:i + 1], up[i:i + 1]) for i in range(len(gate))])
    assert np.array_equal(batch, alone)
    in_place = gate.copy()
    assert swiglu(in_place, up, out=in_place) is in_place and np.array_equal(in_place, batch)
    g = gate.astype(np.float64)
    expected = g / (1.0 + np.exp(-g)) * up
    assert np.allclose(batch, expected, rtol=2e-6, atol=1e-30)
    assert np.all(np.isfinite(batch))
    with pytest.raises(ValueError, match="same 2-D shape"):
        swiglu(gate, up[:, :8])


def _fma(a, b, c):
    """fmaf in float64: a * b is exact there (24 + 24 bits), so one rounding to float64 then one to float32 (a
    double rounding that differs from fmaf's only on exact float32 ties, which these inputs do not hit)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def _ggml_v_expf_avx2(x):
    """ggml's AVX2 ggml_v_expf (vec.h) written out lane by lane in numpy."""
    f = np.float32
    z = _fma(x, f(float.fromhex("0x1.715476p+0")), f(float.fromhex("0x1.8p23")))
    n = z - f(float.fromhex("0x1.8p23"))
    b = _fma(-n, f(float.fromhex("0x1.7f7d1cp-20")), _fma(-n, f(float.fromhex("0x1.62e4p-1")), x))
    e = (z.view(np.uint32) << np.uint32(23)).astype(np.uint32)
    k = (e + np.float32(1).view(np.uint32)).view(np.float32)
    u = b * b
    j = _fma(_fma(_fma(f(float.fromhex("0x1.0e4020p-7")), b, f(float.fromhex("0x1.573e2ep-5"))), u,
                  _fma(f(float.fromhex("0x1.555e66p-3")), b, f(float.fromhex("0x1.fffdb6p-2")))),
             u, f(float.fromhex("0x1.ffffecp-1")) * b)
    g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0))
    s1 = (g + np.uint32(0x7F000000)).view(np.float32)
    s2 = (e - g).view(np.float32)
    far = np.abs(n) > 126
    very_far = np.abs(n) > 192
    return np.where(very_far, s1 * s1, np.where(far, _fma(s2, j, s2) * s1, _fma(k, j, k)))


def test_swiglu_takes_e_to_the_x_as_ggml_does_bit_for_bit():
    """llama.cpp's SwiGLU (ggml_vec_swiglu_f32 on AVX2, NEON, SSE2 + FMA): x / (1 + ggml_v_expf(-x)) * g."""
    rng = np.random.default_rng(2)
    gate = np.concatenate([rng.standard_normal(20000) * 8, rng.uniform(-110, 110, 4000),
                           [-104.0, -103.0, -88.7, -87.0, 87.0, 88.5, 89.0, 103.0, 104.0, 0.0, -0.0]])
    gate = gate.astype(np.float32)
    gate = gate[: len(gate) // 8 * 8].reshape(1, -1)
    up = rng.standard_normal(gate.shape).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = (gate / (np.float32(1.0) + _ggml_v_expf_avx2(-gate))) * up
    assert np.array_equal(swiglu(gate, up), expected)
