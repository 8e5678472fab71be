"""The forward pass's norm and activation: each row's numbers do not depend on how many rows are computed with it
(one decode token or a prompt: rms_norm's serial and parallel builds), and they compute the formulas."""
from __future__ import annotations

import numpy as np

from ggml_backend.model.forward import rms_norm, silu


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


def test_silu_times_up_rows_are_the_same_alone_and_in_a_batch_and_follow_the_formula():
    rng = np.random.default_rng(1)
    gate = (rng.standard_normal((40, 4864)) * 6).astype(np.float32)
    gate[0, :6] = [-200.0, -88.0, -10.0, 0.0, 10.0, 200.0]
    up = rng.standard_normal((40, 4864)).astype(np.float32)
    batch = silu(gate) * up
    alone = np.concatenate([silu(gate[i:i + 1]) * up[i:i + 1] for i in range(len(gate))])
    assert np.array_equal(batch, alone)
    g = gate.astype(np.float64)
    expected = g / (1.0 + np.exp(-g)) * up
    assert np.allclose(batch, expected, rtol=2e-6, atol=1e-30)
    assert np.all(np.isfinite(batch))
