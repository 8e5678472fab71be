"""Matrix products on ggml block formats against float64 oracles built from gguf-py's dequantize."""
from __future__ import annotations

import functools

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from ggml_backend.quant.activations import (
    quantize_activations_q8_0, quantize_activations_q8_1, quantize_activations_q8_K,
    quantize_row_q8_0, quantize_row_q8_1, quantize_row_q8_K,
)
from ggml_backend.quant.layouts import file_layout
from ggml_backend.quant.matmul import MatmulShapeError, WeightMatrix, gemm_available, matmul, matmul_many
from ggml_backend.quant.types import get_type

from refdata import SYNTHETIC_DIR as SYNTHETIC  # noqa: E402
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
KQUANTS = {"q2_K": "q2_K", "q3_K": "q3_K_M", "q4_K": "q4_K_M", "q5_K": "q5_K_M", "q6_K": "q5_K_M"}
TOKEN_COUNTS = [1, 3, 64]


def ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def dequantized_activations(vec_dot_type: str, x: np.ndarray):
    """x quantized the way the kernels quantize it, back in float64; plus the q8_1 ``s`` fields."""
    if vec_dot_type == "q8_K":
        qs, d, _ = quantize_activations_q8_K(x)
        block = 256
    elif vec_dot_type == "q8_1":
        qs, d, s = quantize_activations_q8_1(x)
        block = 32
    else:
        qs, d = quantize_activations_q8_0(x)
        block = 32
    values = (qs.reshape(len(x), -1, block) * d[..., None].astype(np.float64)).reshape(x.shape)
    return values, (s if vec_dot_type == "q8_1" else None)


def integer_oracle(name: str, weight_bytes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(dequantized W) @ (x quantized then dequantized) in float64: what the integer kernels compute exactly,
    up to float32 rounding. For q4_1 / q5_1 ggml uses the half-precision s = d*sum(q) of each activation block
    for the min term, so the oracle does too. A layout no file holds (q3_K_planes) is taken back to its file type's
    first (quant/layouts.py)."""
    qtype, weight_bytes = file_layout(name, weight_bytes)
    name = qtype.name
    w = dequantize(weight_bytes, ggml_type(name)).astype(np.float64)
    vec_dot = "q8_1" if name in ("q4_1", "q5_1") else ("q8_K" if name.endswith("K") else "q8_0")
    xd, s = dequantized_activations(vec_dot, x)
    y = xd @ w.T
    if s is not None:
        blocks = weight_bytes.reshape(weight_bytes.shape[0], -1, 24 if name == "q5_1" else 20)
        mins = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)   # [rows, n_blocks]
        exact_sums = xd.reshape(len(x), -1, 32).sum(axis=2)                              # d * sum(q)
        y += (s.astype(np.float64) - exact_sums) @ mins.T
    return y


def quantization_bound(w: np.ndarray, x: np.ndarray, block: int) -> np.ndarray:
    """Largest |W @ x - W @ q8(x)|: each activation moves by at most half a step (block amax / 127 / 2)."""
    amax = np.abs(x.reshape(len(x), -1, block)).max(axis=2)
    half_step = np.repeat(amax / 127 / 2 * 1.01, block, axis=1)
    return half_step @ np.abs(w).T + 1e-6


@functools.lru_cache(maxsize=None)
def kquant_weights(name: str) -> np.ndarray:
    """Real K-quant blocks from the synthetic files, regrouped 8 super-blocks to a row (k = 2048)."""
    reader = GGUFReader(SYNTHETIC / f"tiny-llama-{KQUANTS[name]}.gguf")
    for tensor in reader.tensors:
        if tensor.tensor_type == ggml_type(name) and len(tensor.data.shape) == 2:
            data = np.ascontiguousarray(tensor.data).reshape(-1)
            n_rows = data.size // (8 * tensor.data.shape[1]) if tensor.data.shape[1] < 300 else 0
            n_rows = min(n_rows, 96)
            return np.ascontiguousarray(data[: n_rows * 8 * tensor.data.shape[1]].reshape(n_rows, -1))
    raise AssertionError(f"no {name} tensor in the synthetic file")


def legacy_weights(name: str, rng) -> np.ndarray:
    w = rng.standard_normal((80, 512)).astype(np.float32)
    return np.ascontiguousarray(quantize(w, ggml_type(name)))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("n_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("name", LEGACY + list(KQUANTS))
def test_quantized_matmul_matches_oracles(name, n_tokens, rng):
    weight_bytes = kquant_weights(name) if name in KQUANTS else legacy_weights(name, rng)
    w = dequantize(weight_bytes, ggml_type(name)).astype(np.float64)
    k = w.shape[1]
    x = (rng.standard_normal((n_tokens, k)) * rng.uniform(0.1, 3.0, (n_tokens, 1))).astype(np.float32)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T

    # Integer path: llama.cpp's numerics, nearly exact against the float64 oracle.
    y_int = matmul(name, weight_bytes, x, method="int")
    assert y_int.shape == (n_tokens, w.shape[0]) and y_int.dtype == np.float32
    exact = integer_oracle(name, weight_bytes, x)
    assert np.all(np.abs(y_int - exact) <= 2e-6 * scale + 1e-6)

    # ... and within the activation quantization error of the plain float product.
    plain = x.astype(np.float64) @ w.T
    block = 256 if name in KQUANTS else 32
    assert np.all(np.abs(y_int - plain) <= quantization_bound(w, x, block) + 2e-6 * scale)

    # BLAS path: float products of the dequantized weights with the activations as 8-bit quantization leaves them,
    # so batch evaluation gets the integer path's numbers up to float32 summation order.
    y_blas = matmul(name, weight_bytes, x, method="blas")
    assert np.all(np.abs(y_blas - exact) <= 1e-5 * scale + 1e-5)

    # Integer GEMM (the prompt path on every SIMD path): the integer path's numbers up to float32
    # summation order (tests/test_gemm.py: its exact variant, which continuous batching uses, equals them bit for
    # bit for q4_0 and q5_0).
    candidates = [y_int, y_blas]
    if gemm_available(get_type(name), k):
        y_gemm = matmul(name, weight_bytes, x, method="gemm")
        assert np.all(np.abs(y_gemm - exact) <= 4e-6 * scale + 1e-6)
        candidates.append(y_gemm)
    else:
        with pytest.raises(MatmulShapeError, match="GEMM"):
            matmul(name, weight_bytes, x, method="gemm")

    # auto picks one of them.
    y_auto = matmul(name, weight_bytes, x)
    assert any(np.array_equal(y_auto, y) for y in candidates)


@pytest.mark.parametrize("n_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
def test_float_weights(name, n_tokens, rng):
    w = rng.standard_normal((40, 96)).astype(np.float32)
    if name == "f16":
        w = w.astype(np.float16).astype(np.float32)
        weight_bytes = w.astype(np.float16).view(np.uint8)
        x_round = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    elif name == "bf16":
        w = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
        weight_bytes = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        x_round = lambda a: ((a.view(np.uint32) + 0x7FFF + ((a.view(np.uint32) >> 16) & 1))  # noqa: E731
                             & 0xFFFF0000).view(np.float32).astype(np.float64)
    else:
        weight_bytes = w.view(np.uint8)
        x_round = lambda a: a.astype(np.float64)  # noqa: E731
    x = rng.standard_normal((n_tokens, 96)).astype(np.float32)
    y = matmul(name, weight_bytes, x)
    expected = x_round(x) @ w.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T
    assert np.all(np.abs(y - expected) <= 2e-6 * scale)
    if name != "f32":  # the activations really are rounded: the float64 product of unrounded x differs
        assert not np.allclose(y, x.astype(np.float64) @ w.T, rtol=0, atol=1e-7)


def test_one_dimensional_input_and_out_argument(rng):
    weight_bytes = legacy_weights("q8_0", rng)
    x = rng.standard_normal(512).astype(np.float32)
    y = matmul("Q8_0", weight_bytes, x)
    assert y.shape == (80,)
    out = np.empty((1, 80), np.float32)
    assert matmul(8, weight_bytes, x[None], out=out) is out
    np.testing.assert_array_equal(out[0], y)


@pytest.mark.parametrize("name", LEGACY + list(KQUANTS))
def test_one_token_on_the_calling_thread_equals_the_parallel_launch(name, rng, monkeypatch):
    """Small one-token products run on the calling thread (decode.matvec_here), larger ones in a parallel launch
    (decode.matvec): the same row kernel, the same bits."""
    import ggml_backend.quant.matmul as matmul_module
    if matmul_module.KERNEL_ISA is None:
        pytest.skip(reason="the generic kernels (CPUs without AVX2) have no calling-thread variant: nothing to compare")
    weight_bytes = kquant_weights(name) if name in KQUANTS else legacy_weights(name, rng)
    x = rng.standard_normal(weight_bytes.shape[1] // get_type(name).type_size * get_type(name).block_size)
    results = []
    for limit in (0, 1 << 30):        # nothing on the calling thread, then everything
        monkeypatch.setattr(matmul_module, "HERE_MAX_BYTES", limit)
        results.append(matmul(name, weight_bytes, x.astype(np.float32), method="int"))
    np.testing.assert_array_equal(results[0], results[1])
    assert np.all(np.isfinite(results[0])) and np.any(results[0] != 0)


def test_thread_counts_give_identical_results(rng):
    weight_bytes = kquant_weights("q6_K")
    x = rng.standard_normal((3, weight_bytes.shape[1] // 210 * 256)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        results = []
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append([matmul("q6_K", weight_bytes, x[:1], method="int"),
                            matmul("q6_K", weight_bytes, x, method="int")])
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])


def test_weight_matrix_and_shared_input(rng):
    q = WeightMatrix("q5_0", legacy_weights("q5_0", rng))
    k = WeightMatrix("q8_0", legacy_weights("q8_0", rng), shape=(80, 512))
    v = WeightMatrix("q4_1", legacy_weights("q4_1", rng).reshape(-1), shape=(80, 512))
    assert q.shape == (80, 512) and "q5_0" in repr(q)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    results = matmul_many([q, k, v], x, method="int")
    for weight, result in zip((q, k, v), results):
        np.testing.assert_array_equal(result, weight.matmul(x, method="int"))
    np.testing.assert_allclose(q.dequantize(), dequantize(q.bytes, ggml_type("q5_0")), rtol=0, atol=0)



def test_shared_input_of_one_row_gives_one_row_per_matrix(rng):
    """A 1-D activation gives 1-D results for every matrix of the call, block and float types alike."""
    q = WeightMatrix("q5_0", legacy_weights("q5_0", rng))
    f = WeightMatrix("f16", rng.standard_normal((8, 512)).astype(np.float16).view(np.uint8).reshape(8, 1024),
                     shape=(8, 512))
    x = rng.standard_normal(512).astype(np.float32)
    results = matmul_many([q, f], x)
    assert [r.shape for r in results] == [(80,), (8,)]
    for weight, result in zip((q, f), results):
        np.testing.assert_array_equal(result, weight.matmul(x[None, :]).reshape(-1))
    assert matmul_many([], x) == []

def test_reference_quantizers_match_ggml_bytes(rng):
    x = (rng.standard_normal(1024) * 5).astype(np.float32)
    x[:32] = 0.0  # an all-zero block: d = 0, no division by zero
    np.testing.assert_array_equal(quantize_row_q8_0(x), quantize(x, GGMLQuantizationType.Q8_0).reshape(-1))
    q8_1 = quantize_row_q8_1(x).reshape(-1, 36)
    assert q8_1.shape == (32, 36)
    qs = q8_1[:, 4:].view(np.int8).astype(np.int64)
    s = q8_1[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
    d = np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)   # ggml multiplies by d before its f16 rounding
    np.testing.assert_array_equal(s, (d * qs.sum(axis=1).astype(np.float32)).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(q8_1[:, 4:], quantize(x, GGMLQuantizationType.Q8_0).reshape(-1, 34)[:, 2:])


def test_q8_K_quantizer_follows_ggml_rule():
    x = np.linspace(-3.0, 1.0, 512, dtype=np.float32)
    x[256:] = 0.0
    blocks = quantize_row_q8_K(x).reshape(2, 292)
    d = blocks[:, :4].copy().view(np.float32)[:, 0]
    qs = blocks[:, 4:260].view(np.int8)
    bsums = blocks[:, 260:].copy().view(np.int16)
    # iscale = -127 / max with max the signed extreme (-3), so that extreme always maps to -127
    assert d[0] == np.float32(1.0) / (np.float32(-127.0) / np.float32(-3.0))
    assert qs[0, 0] == -127 and qs[0, 255] == -42
    assert quantize_row_q8_K(-x).reshape(2, 292)[0, 4] == np.uint8(256 - 127)  # +3 maps to -127 too
    np.testing.assert_array_equal(bsums[0], qs[0].astype(np.int64).reshape(16, 16).sum(axis=1))
    assert d[1] == 0 and not qs[1].any() and not bsums[1].any()


def test_bad_inputs_raise_value_error(rng):
    weight_bytes = legacy_weights("q4_0", rng)        # [80, 288]: 512 values per row
    x = rng.standard_normal((2, 512)).astype(np.float32)
    bad_calls = [
        lambda: matmul("q4_0", weight_bytes[:, :-18], x),                 # row bytes do not match k
        lambda: matmul("q4_0", weight_bytes, x[:, :480]),                 # k mismatch
        lambda: matmul("q4_0", weight_bytes, x[:, :500]),                 # not a whole number of blocks
        lambda: matmul("q4_0", weight_bytes, x.astype(np.float64)),       # dtype
        lambda: matmul("q4_0", weight_bytes, x[None]),                    # 3-D
        lambda: matmul("q4_0", weight_bytes.view(np.int8), x),            # weight dtype
        lambda: matmul("q4_0", weight_bytes.reshape(-1), x),              # 1-D weights
        lambda: matmul("q4_0", weight_bytes[:, ::2], x[:, :256]),         # non-contiguous weights
        lambda: matmul("q4_0", weight_bytes, x, out=np.empty((2, 79), np.float32)),
        lambda: matmul("q4_0", weight_bytes, x, out=np.empty((80, 2), np.float32).T),
        lambda: matmul("q4_0", weight_bytes, x, method="fast"),
        lambda: matmul("q8_K", weight_bytes, x),                          # not a weight type we multiply
        lambda: matmul("iq2_xs", weight_bytes, x),
        lambda: WeightMatrix("q4_0", weight_bytes.reshape(-1), shape=(81, 512)),
        lambda: matmul_many([WeightMatrix("q4_0", weight_bytes)], x[:, :256]),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    assert issubclass(MatmulShapeError, ValueError)


@pytest.mark.parametrize("n_rows", [1, 3, 4, 7, 37])
def test_q8_0_decode_kernel_row_groups(n_rows, rng):
    """The q8_0 one-token kernel walks rows four at a time: every remainder and chunking gives the exact
    llama.cpp sum (integer block dots scaled per block)."""
    from ggml_backend.quant import quantize as quantize_tensor
    k = 96
    weights = rng.standard_normal((n_rows, k)).astype(np.float32)
    w_bytes = quantize_tensor("q8_0", weights).reshape(n_rows, -1)
    x = rng.standard_normal(k).astype(np.float32)
    qs, d = quantize_activations_q8_0(x)
    blocks = w_bytes.reshape(n_rows, k // 32, 34)
    w_scale = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    w_quants = blocks[:, :, 2:].view(np.int8).astype(np.int64)
    dots = (w_quants * qs.reshape(1, k // 32, 32).astype(np.int64)).sum(-1)
    expected = (w_scale * d.reshape(1, -1).astype(np.float64) * dots).sum(-1)
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        got = matmul("q8_0", w_bytes, x, method="int")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_round_to_f16_inplace_matches_numpy(rng):
    from ggml_backend.quant.activations import round_to_f16_inplace
    ties = (np.arange(1, 500, dtype=np.uint32) << 13 | 0x1000) | (np.uint32(120) << 23)
    values = np.concatenate([rng.standard_normal(5000) * scale for scale in (1e-6, 1e-3, 1.0, 1e3)]
                            + [ties.view(np.float32), -ties.view(np.float32),
                               np.array([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, np.inf, -np.inf, 2.0 ** -25,
                                         1.5 * 2.0 ** -24], np.float64)]).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).astype(np.float32)
    got = round_to_f16_inplace(values.copy())
    assert np.array_equal(got, expected)
    with pytest.raises(ValueError):
        round_to_f16_inplace(values.astype(np.float64))


@pytest.mark.parametrize("n_rows", [1, 3, 4, 7, 37])
def test_q5_0_decode_kernel_row_groups(n_rows, rng):
    """The q5_0 one-token kernel takes the fifth bits from per-block tables of activation sums and walks rows four
    at a time: every remainder and chunking gives the exact integer block dots, scaled per block."""
    k = 96
    weights = rng.standard_normal((n_rows, k)).astype(np.float32)
    w_bytes = np.ascontiguousarray(quantize(weights, ggml_type("q5_0"))).reshape(n_rows, -1)
    w_bytes.reshape(n_rows, k // 32, 22)[0, 0, 2:6] = 255       # all fifth bits set in one block, clear in another
    w_bytes.reshape(n_rows, k // 32, 22)[-1, -1, 2:6] = 0
    x = rng.standard_normal(k).astype(np.float32)
    qs, d = quantize_activations_q8_0(x)
    blocks = w_bytes.reshape(n_rows, k // 32, 22)
    w_scale = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    high_bits = blocks[:, :, 2:6].copy().view(np.uint32)[:, :, 0].astype(np.int64)
    nibbles = blocks[:, :, 6:].astype(np.int64)
    quants = np.concatenate([nibbles & 15, nibbles >> 4], axis=2) | (((high_bits[:, :, None] >> np.arange(32)) & 1) << 4)
    dots = ((quants - 16) * qs.reshape(1, k // 32, 32).astype(np.int64)).sum(-1)
    expected = (w_scale * d.reshape(1, -1).astype(np.float64) * dots).sum(-1)
    scale = (np.abs(w_scale * d.reshape(1, -1) * dots)).sum(-1)
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            got = matmul("q5_0", w_bytes, x, method="int")
            assert np.all(np.abs(got - expected) <= 1e-6 * scale + 1e-7)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("n_rows", [1, 3, 5, 37])
@pytest.mark.parametrize("name", ["q4_K", "q6_K"])
def test_kquant_decode_kernels_row_groups(name, n_rows, rng):
    """The q4_K / q6_K one-token kernels walk rows two at a time (an odd last row twice) in chunks of four:
    every remainder gives the integer oracle's result."""
    weight_bytes = np.ascontiguousarray(kquant_weights(name)[:n_rows])
    k = weight_bytes.shape[1] // (144 if name == "q4_K" else 210) * 256
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = dequantize(weight_bytes, ggml_type(name)).astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T
    exact = integer_oracle(name, weight_bytes, x)
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            got = matmul(name, weight_bytes, x, method="int")
            assert np.all(np.abs(got - exact) <= 2e-6 * scale + 1e-6)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("n_rows", [1, 3, 4, 7, 37])
@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_nibble_decode_kernels_row_groups(name, n_rows, rng):
    """The q4_0 / q4_1 / q5_0 / q5_1 one-token kernels walk rows four at a time with the format's header offsets
    and the q8_1 block sums of the minimums as constants: every remainder and chunking, and blocks of extreme
    nibbles and fifth bits, give the integer oracle's result."""
    k = 96
    weight_bytes = np.ascontiguousarray(quantize(rng.standard_normal((n_rows, k)).astype(np.float32),
                                                 ggml_type(name))).reshape(n_rows, -1)
    blocks = weight_bytes.reshape(n_rows, k // 32, -1)
    blocks[0, 0, -16:] = 0xFF     # all nibbles 15 (and all fifth bits set) in one block, all 0 in another
    blocks[-1, -1, -16:] = 0
    if name.startswith("q5"):
        qh = 2 if name == "q5_0" else 4
        blocks[0, 0, qh:qh + 4] = 255
        blocks[-1, -1, qh:qh + 4] = 0
    x = (rng.standard_normal((1, k)) * 2.0).astype(np.float32)
    w = dequantize(weight_bytes, ggml_type(name)).astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T
    exact = integer_oracle(name, weight_bytes, x)
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            got = matmul(name, weight_bytes, x, method="int")
            assert np.all(np.abs(got - exact) <= 2e-6 * scale + 1e-6)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("n_rows, k", [(896, 4864), (4864, 896), (151936, 896), (128, 896), (1000, 64), (7, 4864)])
@pytest.mark.parametrize("n_workers", [1, 2, 3, 4])
def test_blas_bands_cover_the_rows_and_give_every_worker_as_many(n_rows, k, n_workers):
    from ggml_backend.quant.matmul import _SGEMM_MIN_WORK, BLAS_MIN_TOKENS, _blas_bands
    bands = _blas_bands(n_rows, k, n_workers)
    assert bands[0][0] == 0 and bands[-1][1] == n_rows
    assert all(last > first for first, last in bands)
    assert all(bands[i][1] == bands[i + 1][0] for i in range(len(bands) - 1))
    min_band = -(-_SGEMM_MIN_WORK // (BLAS_MIN_TOKENS * k))
    if n_rows >= min_band:
        assert all(last - first >= min_band for first, last in bands)     # each sgemm above the small kernels
    if len(bands) > n_workers:
        assert len(bands) % n_workers == 0                                # no worker left idle at the end
