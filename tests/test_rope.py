"""Rotary embeddings: the numba kernel gives the numbers of the float32 array formula (ggml's order of operations),
for both pair layouts, strided inputs, one row of angles for every token, and dims that pass through."""
import numpy as np
import pytest

from ggml_backend.model.rope import apply_rope, rope_cos_sin


def _formula(x, cos, sin, n_dims, mode):
    """The array formula: each product rounded to float32, then the sum (what llama.cpp's rope computes)."""
    x = x.copy()
    c, s = cos[:, None, :], sin[:, None, :]
    if mode == "normal":
        a, b = slice(0, n_dims, 2), slice(1, n_dims, 2)
    else:
        a, b = slice(0, n_dims // 2), slice(n_dims // 2, n_dims)
    x0, x1 = x[..., a].copy(), x[..., b].copy()
    x[..., a] = x0 * c - x1 * s
    x[..., b] = x0 * s + x1 * c
    return x


def _angles_formula(positions, n_dims, base, scale):
    theta_scale = np.float32(np.float64(np.float32(base)) ** np.float64(np.float32(-2.0) / np.float32(n_dims)))
    theta = positions.astype(np.float32)
    columns = []
    for _ in range(n_dims // 2):
        columns.append(theta * np.float32(scale))
        theta = theta * theta_scale
    thetas = np.stack(columns, axis=1).astype(np.float64)
    return np.cos(thetas).astype(np.float32), np.sin(thetas).astype(np.float32)


@pytest.mark.parametrize("mode", ["normal", "neox"])
@pytest.mark.parametrize("n_dims, head_dim", [(64, 64), (12, 16)])
def test_rotation_equals_the_array_formula(mode, n_dims, head_dim):
    rng = np.random.default_rng(3)
    positions = np.array([0, 1, 5, 4095, 70000])
    cos, sin = rope_cos_sin(positions, n_dims, 1e6, 0.5)
    expected_cos, expected_sin = _angles_formula(positions, n_dims, 1e6, 0.5)
    assert np.array_equal(cos, expected_cos) and np.array_equal(sin, expected_sin)
    x = (rng.standard_normal((len(positions), 3, head_dim)) * 40).astype(np.float32)
    expected = _formula(x, cos, sin, n_dims, mode)
    got = apply_rope(x.copy(), cos, sin, n_dims, mode)
    assert np.array_equal(got, expected)
    assert np.array_equal(got[..., n_dims:], x[..., n_dims:])   # past n_dims: untouched
    # a strided view (q, k, v side by side in one output row), rotated in place
    wide = np.zeros((len(positions), 3 * head_dim + 5), np.float32)
    wide[:, 2:2 + 3 * head_dim] = x.reshape(len(positions), -1)
    view = wide[:, 2:2 + 3 * head_dim].reshape(len(positions), 3, head_dim)
    apply_rope(view, cos, sin, n_dims, mode)
    assert np.array_equal(view, expected)
    assert not wide[:, :2].any() and not wide[:, -3:].any()


def test_one_row_of_angles_turns_every_token():
    rng = np.random.default_rng(4)
    cos, sin = rope_cos_sin(np.full(1, 17), 32, 10000.0, 1.0)
    x = rng.standard_normal((6, 2, 32)).astype(np.float32)
    expected = _formula(x, np.repeat(cos, 6, axis=0), np.repeat(sin, 6, axis=0), 32, "neox")
    assert np.array_equal(apply_rope(x, cos, sin, 32, "neox"), expected)


def test_bad_arguments_are_named():
    cos, sin = rope_cos_sin(np.arange(2), 8, 10000.0, 1.0)
    x = np.zeros((2, 1, 8), np.float32)
    with pytest.raises(ValueError, match="mode"):
        apply_rope(x, cos, sin, 8, "sideways")
    with pytest.raises(ValueError, match="float32"):
        apply_rope(x.astype(np.float64), cos, sin, 8, "neox")
    with pytest.raises(ValueError, match="tables"):
        apply_rope(np.zeros((3, 1, 8), np.float32), cos, sin, 8, "neox")
    with pytest.raises(ValueError, match="head_dim"):
        apply_rope(x, cos, sin, 10, "neox")
