"""Reference quantization: bit-equal to gguf-py's where it has one, to an independent numpy transcription of
ggml's quantize_row_q8_K_ref otherwise, within the formats' error bounds, and strict about its input."""
from __future__ import annotations

import numpy as np
import pytest

from ggml_backend import quant

gguf = pytest.importorskip("gguf", reason="gguf (gguf-py, a dev dependency) writes the reference files these tests compare with")

GGUF_PY_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16", "f32"]


def awkward_values(seed: int, rows: int = 24, row_len: int = 512) -> np.ndarray:
    """Seeded random rows at many magnitudes, plus the blocks that break careless quantizers."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, row_len)) * rng.exponential(1.0, (rows, 1))).astype(np.float32)
    x[0] = 0.0                                        # all zeros: d = 0, id = 0
    x[1, :32] = 0.0
    x[1, 5] = 1e-30                                   # a lone tiny value: d underflows to a zero half
    x[2, 7] = 3.0e4                                   # one huge value dominating its block
    x[3, :32] = -np.abs(x[3, :32])                    # negative maximum
    x[3, 40] = -1000.0
    x[4, :32] = 2.5                                   # constant block: max == min
    x[5, :32] = np.arange(32) - 16.0                  # exact grid points, rounding ties for q8
    x[6, :32] = 0.5
    x[6, 9] = -0.5                                    # +max and -max tie in magnitude: the first wins
    x[7, :256] = np.linspace(-1, 1, 256)
    x[8] *= 1e-6                                      # tiny scales (subnormal halves)
    x[9, :64] = rng.integers(-127, 128, 64) / 127.0   # values landing on q8 half-steps
    x[10, 100] = -7e4                                 # scale beyond the half range (inf d, as in ggml)
    return x


@pytest.mark.parametrize("name", GGUF_PY_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_equals_gguf_py_bit_for_bit(name, seed):
    x = awkward_values(seed)
    if name not in ("f32", "f16", "bf16"):
        x = x[:10]  # the overflowing row 10 makes gguf-py's numpy warn; its bytes are checked below
    ours = quant.quantize(name, x)
    with np.errstate(all="ignore"):
        ref = np.asarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType[name.upper()]))
    ref = np.ascontiguousarray(ref).view(np.uint8).reshape(-1)
    assert ours.dtype == np.uint8 and ours.ndim == 1
    assert ours.size == quant.get_type(name).row_bytes(x.shape[-1]) * x.shape[0]
    if not np.array_equal(ours, ref):
        size = quant.get_type(name).type_size
        bad = np.nonzero((ours != ref).reshape(-1, size).any(axis=1))[0]
        pytest.fail(f"{name}: {bad.size} blocks differ from gguf-py, first {bad[:5]}")


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_overflowing_scale_matches_gguf_py(name):
    x = np.zeros(32, np.float32)
    x[3] = -7e4 if name.endswith("_0") else 7e4
    x[4] = -1e5
    with np.errstate(all="ignore"):
        ref = np.asarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType[name.upper()])).view(np.uint8)
    assert np.array_equal(quant.quantize(name, x), ref.reshape(-1))


def test_bf16_rounds_to_even_and_keeps_nans_quiet():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F800001, 0xFF800000, 0x00000001, 0x7F7FFFFF],
                    dtype=np.uint32)
    ours = quant.quantize("bf16", bits.view(np.float32)).view(np.uint16)
    assert ours.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7FC0, 0xFF80, 0x0000, 0x7F80]
    ref = np.asarray(gguf.quants.quantize(bits.view(np.float32), gguf.GGMLQuantizationType.BF16))
    assert np.array_equal(ours, ref.view(np.uint16))


# ------------------------------------------------------------------ q8_1 and q8_K (no gguf-py quantizer)

def test_q8_1_is_q8_0_plus_scaled_sum():
    x = awkward_values(2)[:10]
    q8_0 = quant.quantize("q8_0", x).reshape(-1, 34)
    q8_1 = quant.quantize("q8_1", x).reshape(-1, 36)
    assert np.array_equal(q8_1[:, 0:2], q8_0[:, 0:2])      # same d
    assert np.array_equal(q8_1[:, 4:], q8_0[:, 2:])        # same quants
    d = x.reshape(-1, 32)
    d = np.abs(d).max(axis=1) / np.float32(127)
    sums = q8_0[:, 2:].view(np.int8).astype(np.int32).sum(axis=1)
    expected = (sums.astype(np.float32) * d.astype(np.float32)).astype(np.float16)
    assert np.array_equal(q8_1[:, 2:4].copy().view(np.float16).reshape(-1), expected)
    back = quant.dequantize("q8_1", q8_1.reshape(-1), x.shape)
    assert np.array_equal(back, quant.dequantize("q8_0", q8_0.reshape(-1), x.shape))


def q8_K_by_numpy(x: np.ndarray):
    """ggml's quantize_row_q8_K_ref, transcribed independently (numpy, float32 throughout)."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    first_max = np.abs(blocks).argmax(axis=1)
    vmax = blocks[np.arange(len(blocks)), first_max]
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax == 0, np.float32(0), np.float32(-127.0) / vmax).astype(np.float32)
    products = (iscale[:, None] * blocks).astype(np.float32)
    qs = np.minimum(127, np.rint(products)).astype(np.int8)
    with np.errstate(divide="ignore"):
        d = np.where(vmax == 0, np.float32(0), np.float32(1.0) / iscale).astype(np.float32)
    bsums = qs.astype(np.int16).reshape(-1, 16, 16).sum(axis=2).astype(np.int16)
    return d, qs, bsums


def test_q8_K_matches_ggml_reference_and_bsums_are_sums_of_16():
    x = awkward_values(3)[:10]
    raw = quant.quantize("q8_K", x)
    assert raw.size == 292 * x.size // 256
    blocks = raw.view(quant.kquants.Q8_K_BLOCK)
    d, qs, bsums = q8_K_by_numpy(x)
    assert np.array_equal(blocks["d"].view(np.uint32), d.view(np.uint32))
    assert np.array_equal(blocks["qs"], qs)
    assert np.array_equal(blocks["bsums"], bsums)
    assert np.array_equal(blocks["bsums"],
                          blocks["qs"].astype(np.int32).reshape(-1, 16, 16).sum(axis=2))
    assert (blocks["bsums"][0] == 0).all() and (blocks["d"][:2] == 0).all()  # the zero row
    assert blocks["qs"].min() >= -127 and blocks["qs"].max() <= 127
    back = quant.dequantize("q8_K", raw, x.shape)
    assert np.array_equal(back, (blocks["d"][:, None] * blocks["qs"].astype(np.float32)).reshape(x.shape))


def test_q8_K_rounds_ties_to_even_like_nearest_int():
    x = np.zeros(256, np.float32)
    x[0] = -127.0                                  # iscale = -127 / max = 1: quants are the values
    x[1:6] = [0.5, 1.5, 2.5, -0.5, -2.5]
    qs = quant.quantize("q8_K", x).view(quant.kquants.Q8_K_BLOCK)["qs"][0]
    assert qs[:6].tolist() == [-127, 0, 2, 2, 0, -2]   # the max always lands on -127


# ------------------------------------------------------------------ round trips within the format's error

ERROR_PER_SCALE = {  # worst |x - dequantized| in units of the block's step, plus the halves' rounding slack
    "q4_0": 1.0, "q5_0": 1.0,   # the side opposite the max can clip by one step
    "q4_1": 0.5, "q5_1": 0.5, "q8_0": 0.5, "q8_1": 0.5, "q8_K": 0.5,
}
STEPS = {"q4_0": 8, "q5_0": 16, "q8_0": 127, "q8_1": 127, "q8_K": 127, "q4_1": 15, "q5_1": 31}


@pytest.mark.parametrize("name", sorted(ERROR_PER_SCALE))
def test_round_trip_error_is_within_one_step(name):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((16, 512)) * rng.exponential(1.0, (16, 1))).astype(np.float32)
    back = quant.dequantize(name, quant.quantize(name, x), x.shape)
    block = quant.get_type(name).block_size
    xb, bb = x.reshape(-1, block), back.reshape(-1, block)
    if name in ("q4_1", "q5_1"):
        spread = xb.max(axis=1) - xb.min(axis=1)
        slack = 2.0 ** -10 * (np.abs(xb.min(axis=1)) + spread)  # d and m are halves
    else:
        spread = np.abs(xb).max(axis=1)
        slack = 2.0 ** -10 * spread if name != "q8_K" else 1e-6 * spread
    step = spread / STEPS[name]
    error = np.abs(xb - bb).max(axis=1)
    assert (error <= ERROR_PER_SCALE[name] * step * 1.001 + slack).all()
    assert np.sqrt(np.mean((xb - bb) ** 2)) < 0.5 * np.sqrt(np.mean(step ** 2))


def test_float_round_trips():
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(quant.dequantize("f32", quant.quantize("f32", x), x.shape), x)
    assert np.array_equal(quant.dequantize("f16", quant.quantize("f16", x), x.shape),
                          x.astype(np.float16).astype(np.float32))
    bf = quant.dequantize("bf16", quant.quantize("bf16", x), x.shape)
    assert np.abs(bf - x).max() <= np.abs(x).max() * 2.0 ** -8


# ------------------------------------------------------------------ input checks

def test_quantize_rejects_partial_blocks_and_unimplemented_types():
    with pytest.raises(ValueError, match="whole number"):
        quant.quantize("q4_0", np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError, match="whole number"):
        quant.quantize("q8_K", np.zeros(128, np.float32))
    with pytest.raises(ValueError, match="scalar"):
        quant.quantize("q8_0", np.float32(1.0))
    assert quant.quantize("q8_0", np.zeros((0, 32), np.float32)).size == 0


def test_quantize_accepts_float64_and_lists():
    values = [float(i) for i in range(32)]
    assert np.array_equal(quant.quantize("q8_0", values),
                          quant.quantize("q8_0", np.array(values, dtype=np.float64)))


# ------------------------------------------------------------------ q6_K (quantize_row_q6_K_ref)
# Bit for bit against llama.cpp's own bytes: tests/test_quant_reference.py (every K-quant and legacy type);
# here q6_K is held to the format's layout and error.

def test_q6_K_round_trip_error_and_zero_block():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    x[0, :256] = 0.0
    raw = quant.quantize("q6_K", x)
    assert raw.size == 210 * x.size // 256
    assert not raw[:210].any()                                # an all-zero super-block is all zero bytes
    back = quant.dequantize("q6_K", raw, x.shape)
    assert not back[0, :256].any()
    relative_rms = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    assert relative_rms < 0.022                               # 6 bits: about 1.8 % on Gaussian data
    worst = np.abs(back - x).reshape(-1, 256).max(axis=1) / np.abs(x).reshape(-1, 256).max(axis=1).clip(1e-30)
    assert worst[1:].max() < 0.02
    # the block scale is the half of 1 / iscale with iscale = -128 / (signed largest sub-block scale)
    d = raw.reshape(-1, 210)[:, 208:210].copy().view(np.float16).astype(np.float32).reshape(-1)
    scales = raw.reshape(-1, 210)[:, 192:208].view(np.int8)
    assert (scales[1:].min(axis=1) == -128).all()           # the largest sub-block scale always lands on -128
    assert (d[1:] != 0).all()


def test_q6_K_rejects_partial_super_blocks():
    with pytest.raises(ValueError, match="whole number"):
        quant.quantize("q6_K", np.zeros((2, 128), np.float32))


def test_kernel_half_rounding_equals_numpy():
    """The scalar half rounding of the kernels (blocks.round_to_f16), the array one (round_to_f16_inplace) and the
    bytes one (float_to_half_bits) all round as numpy's float16 conversion does."""
    from numba import njit
    from ggml_backend.quant.activations import round_to_f16_inplace
    from ggml_backend.quant.blocks import HALF_TO_FLOAT, round_to_f16
    from ggml_backend.quant.floats import float_to_half_bits

    @njit(cache=False)
    def round_all(values):
        out = np.empty_like(values)
        for i in range(values.size):
            out[i] = round_to_f16(values[i])
        return out

    rng = np.random.default_rng(7)
    values = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([values[np.isfinite(values)],
                             np.array([65504, 65519.99, 65520, 2 ** -24, 2 ** -25, 3 * 2 ** -26, -0.0], np.float32)])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).astype(np.float32)
    assert np.array_equal(round_all(values).view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(round_to_f16_inplace(values.copy()).view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(HALF_TO_FLOAT[float_to_half_bits(values)].view(np.uint32), expected.view(np.uint32))
