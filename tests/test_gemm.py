"""The integer GEMM of the prompt path (quant/gemm.py): every block kind against the integer kernels, the edges of
its tiles (rows and tokens not multiples of 4, several token blocks), and each (row, token) result independent of
the batch around it (prompt caching relies on that). Runs where the CPU has AVX512-VNNI; test_matmul checks that
method="gemm" is refused on a path without VNNI. The prompt kernel's AVX-VNNI form (8-row panels) gives the same
numbers bit for bit: test_avx2_codegen compiles it for an Alder Lake."""
from __future__ import annotations

import numpy as np
import pytest

import ggml_backend.quant.gemm as gemm_module
from ggml_backend.quant import quantize
from ggml_backend.quant.decode import KINDS
from ggml_backend.quant.matmul import KERNEL_ISA, MatmulShapeError, matmul, matmul_many, WeightMatrix
from ggml_backend.quant.types import get_type

pytestmark = pytest.mark.skipif(not gemm_module.isa_has_gemm(KERNEL_ISA), reason="the exact GEMMs need AVX512-VNNI")


def weights(name: str, n_rows: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_rows, k)) * rng.uniform(0.2, 2.0, (n_rows, 1))).astype(np.float32)
    return np.ascontiguousarray(quantize(name, w).reshape(n_rows, -1))


def activations(n_tokens: int, k: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_tokens, k)) * rng.uniform(0.1, 3.0, (n_tokens, 1))).astype(np.float32)


def exact_gemm(name: str, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The product on the exact (lane) GEMM, whatever the token count."""
    from ggml_backend.quant.matmul import KERNEL_ISA, quantize_activations
    out = np.empty((len(x), len(w)), np.float32)
    acts = quantize_activations(get_type(name).vec_dot_type, x)
    gemm_module.gemm_product(KINDS[name], w.reshape(-1), 0, len(w), w.shape[1], acts.gemm_tokens(), out, KERNEL_ISA,
                             exact=True)
    return out


@pytest.mark.parametrize("name", sorted(KINDS, key=KINDS.get))
def test_every_kind_matches_the_integer_kernels(name):
    # 13 rows (a last panel of 1 for the exact GEMM's 4, a lone partial one for the prompt GEMM's 16), 51 tokens
    # (a last tile of 3 / of 3 of 8), k = 512 (legacy) / 768 (K-quants: 3 super-blocks)
    k = 768 if "_K" in name else 512
    w = weights(name, 13, k)
    x = activations(51, k)
    y_int = matmul(name, w, x, method="int")
    bound = 4e-6 * (np.abs(x).astype(np.float64) @ np.abs(
        WeightMatrix(name, w, (13, k)).dequantize().astype(np.float64)).T) + 1e-6
    for y_gemm in (matmul(name, w, x, method="gemm"), exact_gemm(name, w, x)):
        assert np.all(np.abs(y_gemm - y_int) <= bound), name
    if KINDS[name] in gemm_module.EXACT_KINDS:   # the one-token kernel's numbers, bit for bit
        assert np.array_equal(exact_gemm(name, w, x), y_int)
    if name == "q4_0":                           # its row-lane kernels: the prompt GEMM's numbers, bit for bit
        assert np.array_equal(matmul(name, w, x, method="gemm"), y_int)


@pytest.mark.parametrize("name", ["q8_0", "q5_0", "q3_K", "q6_K"])
def test_the_prompt_gemm_sums_each_group_exactly(name):
    """The prompt GEMM's numbers for a row: each group's exact integer dot product scaled by the row's and the
    token's scales, added in float32 one group after the other (llama.cpp's order; q3_K per super-block, see
    the next test), near the float64 product of the quantized activations and the dequantized weights; 5 full row
    panels and one of 3 rows, 19 tokens."""
    from ggml_backend.quant.matmul import quantize_activations
    k = 512
    w = weights(name, 83, k, seed=9)
    x = activations(19, k, seed=10)
    got = matmul(name, w, x, method="gemm")
    acts = quantize_activations(get_type(name).vec_dot_type, x)
    values = WeightMatrix(name, w, (83, k)).dequantize().astype(np.float64)
    qx = acts.qs.astype(np.float64) * np.repeat(acts.d.astype(np.float64), k // acts.d.shape[1], axis=1)
    reference = qx @ values.T
    bound = 2e-6 * (np.abs(qx) @ np.abs(values).T) + 1e-6
    assert np.all(np.abs(got - reference) <= bound)


def test_q3_K_prompt_gemm_sums_each_super_block_in_integers():
    """q3_K's prompt GEMM: per super-block the exact integer sum of scale * q * x over its 256 values (the panel
    folds the scales into the quants on the VNNI paths; AVX2 adds the groups' sums exactly in float32), times
    d_w * d_x once, added in float32 super-block after super-block. The reference reads scale * q from the
    dequantized weights with each block's d set to 1 (exact small integers) and does the float steps in float64
    (exact: the sums stay below 2 ** 22), rounding each to float32 as a fused multiply-add does."""
    from ggml_backend.quant.matmul import quantize_activations
    n_rows, k, n_tokens = 37, 1024, 19
    w = weights("q3_K", n_rows, k, seed=21)
    x = activations(n_tokens, k, seed=22)
    got = matmul("q3_K", w, x, method="gemm")
    blocks = w.reshape(n_rows, k // 256, 110)
    d_w = blocks[:, :, 108:110].copy().view(np.float16)[:, :, 0].astype(np.float32)
    unit = blocks.copy()
    unit[:, :, 108:110] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    scaled_q = WeightMatrix("q3_K", unit.reshape(n_rows, -1), (n_rows, k)).dequantize()
    assert np.array_equal(scaled_q, np.round(scaled_q)) and np.abs(scaled_q).max() <= 128
    acts = quantize_activations("q8_K", x)
    sums = np.einsum("rbv,tbv->trb", scaled_q.astype(np.int64).reshape(n_rows, -1, 256),
                     acts.qs.astype(np.int64).reshape(n_tokens, -1, 256))
    expected = np.zeros((n_tokens, n_rows), np.float32)
    for b in range(k // 256):
        scale = (d_w[None, :, b] * acts.d[:, b, None]).astype(np.float32)
        expected = (sums[:, :, b].astype(np.float64) * scale.astype(np.float64)
                    + expected.astype(np.float64)).astype(np.float32)
    assert np.array_equal(got, expected)


def test_q3_K_prompt_gemm_takes_any_block_bytes_and_the_edge_of_its_folded_byte():
    """Blocks of random bytes (untrusted files), one row at the folded byte's edge: every scale -32 times every
    quant -4 (-scale * q = -128 on the VNNI paths); the float64 product of the quantized activations and the
    dequantized weights within float32's rounding."""
    from ggml_backend.quant.matmul import quantize_activations
    rng = np.random.default_rng(5)
    n_rows, k, n_tokens = 21, 512, 11
    blocks = rng.integers(0, 256, (n_rows, k // 256, 110), dtype=np.uint8)
    blocks[:, :, 108:110] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[0, :, :108] = 0            # high bits, low bits and six-bit scales all zero: q = -4, scale = -32
    w = blocks.reshape(n_rows, -1)
    x = activations(n_tokens, k, seed=6)
    got = matmul("q3_K", w, x, method="gemm")
    values = WeightMatrix("q3_K", w, (n_rows, k)).dequantize().astype(np.float64)
    assert values[0].min() == values[0].max() > 1.27      # d * 128 everywhere
    acts = quantize_activations("q8_K", x)
    qx = acts.qs.astype(np.float64) * np.repeat(acts.d.astype(np.float64), k // acts.d.shape[1], axis=1)
    bound = 1e-6 * (np.abs(qx) @ np.abs(values).T)
    assert np.all(np.abs(got - qx @ values.T) <= bound)


@pytest.mark.parametrize("name", ["q5_0", "q4_K", "q4_1", "q6_K"])
def test_each_result_is_independent_of_the_batch(name, monkeypatch):
    k = 512 if name in ("q5_0", "q4_1") else 1024
    w = weights(name, 40, k, seed=3)
    x = activations(70, k, seed=4)
    whole = matmul(name, w, x, method="gemm")
    # the same tokens in other batches: a prefix, a suffix, one token padded by others
    assert np.array_equal(matmul(name, w, x[:49], method="gemm"), whole[:49])
    assert np.array_equal(matmul(name, w, x[21:], method="gemm"), whole[21:])
    assert np.array_equal(matmul(name, w, x[5:6], method="gemm"), whole[5:6])
    # several token blocks (a block far smaller than L2) give the same numbers as one
    monkeypatch.setattr(gemm_module, "BLOCK_BYTES", 2 * k * 8)
    assert np.array_equal(matmul(name, w, x, method="gemm"), whole)


def test_auto_takes_the_gemm_for_prompts_and_the_tiles_below():
    w = weights("q5_0", 64, 896)
    x = activations(48, 896)
    assert np.array_equal(matmul("q5_0", w, x), matmul("q5_0", w, x, method="gemm"))
    few = x[:47]
    assert np.array_equal(matmul("q5_0", w, few), matmul("q5_0", w, few, method="int"))
    (many,) = matmul_many([WeightMatrix("q5_0", w)], x)
    assert np.array_equal(many, matmul("q5_0", w, x, method="gemm"))


def test_rows_of_a_length_the_tiles_cannot_take_fall_back_or_are_refused():
    w = weights("q8_0", 8, 96)                    # k = 96: three blocks, not a multiple of 64
    x = activations(50, 96)
    with pytest.raises(MatmulShapeError, match="GEMM"):
        matmul("q8_0", w, x, method="gemm")
    y = matmul("q8_0", w, x)                      # auto: the BLAS path
    assert np.allclose(y, matmul("q8_0", w, x, method="int"), rtol=1e-4, atol=1e-3)
    with pytest.raises(MatmulShapeError, match="GEMM"):
        matmul("f16", np.zeros((4, 128), np.uint8), activations(50, 64), method="gemm")


@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
@pytest.mark.parametrize("n_rows", [16, 37, 5, 200])
def test_rows_in_lanes_give_one_numbers_for_any_tokens_and_rows(name, n_rows):
    """q4_0 and q8_0 on AVX512-VNNI (decode._rows_lanes: sixteen rows per register, straight from the file;
    q8_0 from rows of 2048): one token, a few (tiles of 8, 4, 2, 1 and their remainders), a fused launch of two
    matrices and a prompt on the GEMM all give each (row, token) the same bits, whatever the batch; rows past a
    multiple of 16 (a panel of zeros beside them) and matrices of fewer than 16 rows included."""
    k = 2048 if name == "q8_0" else 896
    w = weights(name, n_rows, k, seed=11)
    w2 = weights(name, 20, k, seed=12)
    x = activations(50, k, seed=13)
    prompt = matmul(name, w, x, method="gemm")
    for n_tokens in (1, 2, 3, 7, 8, 13, 47):
        assert np.array_equal(matmul(name, w, x[:n_tokens], method="int"), prompt[:n_tokens]), n_tokens
    assert np.array_equal(matmul(name, w, x[9:10], method="int"), prompt[9:10])
    y, y2 = matmul_many([WeightMatrix(name, w), WeightMatrix(name, w2)], x[:11])
    assert np.array_equal(y, prompt[:11])
    assert np.array_equal(y2, matmul(name, w2, x, method="gemm")[:11])


def test_short_q8_0_rows_keep_their_lane_kernels():
    """q8_0 rows under 2048 values stay on the one-token lane kernel and its tiles (faster there than row lanes):
    a few tokens give each token its one-token bits."""
    w = weights("q8_0", 37, 896, seed=14)
    x = activations(13, 896, seed=15)
    alone = np.concatenate([matmul("q8_0", w, x[t:t + 1], method="int") for t in range(len(x))])
    assert np.array_equal(matmul("q8_0", w, x, method="int"), alone)


@pytest.mark.parametrize("name", ["q5_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"])
def test_few_token_products_on_the_gemm_keep_one_token_numbers(name):
    """Continuous batching and short prompts: from gemm.EXACT_FROM_TOKENS[kind] tokens the integer path runs the
    exact GEMM (q8_0: the tiles, which are faster), which must give every token exactly its one-token result, in
    one matrix or a fused launch."""
    from ggml_backend.quant.gemm import EXACT_FROM_TOKENS, EXACT_KINDS
    from ggml_backend.quant.matmul import _exact_gemm
    assert KINDS[name] in EXACT_KINDS
    k = 1024 if "_K" in name else 896
    w = weights(name, 36, k, seed=5)
    w2 = weights(name, 20, k, seed=6)
    x = activations(EXACT_FROM_TOKENS.get(KINDS[name], 8) + 5, k, seed=7)
    assert _exact_gemm(KINDS[name], x.shape) == (KINDS[name] in EXACT_FROM_TOKENS)
    alone = np.concatenate([matmul(name, w, x[t:t + 1], method="int") for t in range(len(x))])
    assert np.array_equal(matmul(name, w, x, method="int"), alone)
    y, y2 = matmul_many([WeightMatrix(name, w), WeightMatrix(name, w2)], x)
    assert np.array_equal(y, alone)
    assert np.array_equal(y2, np.concatenate([matmul(name, w2, x[t:t + 1], method="int") for t in range(len(x))]))


@pytest.mark.parametrize("k", [896, 4096, 4160])
def test_q5_0_one_token_lanes_stored_or_computed_give_the_same_numbers(k):
    """q5_0's one-token kernel (the lane kernel on AVX512-VNNI) takes its blocks' offset lanes from an array for rows
    up to decode.STORED_LANES_MAX_K values and computes them per block for longer rows: the same integers, so each
    token's result stays the few-token kernel's and the exact GEMM's, bit for bit, on both sides of that bound."""
    from ggml_backend.quant.decode import STORED_LANES_MAX_K
    assert 896 <= STORED_LANES_MAX_K == 4096 < 4160
    assert KINDS["q5_0"] in gemm_module.EXACT_KINDS
    w = weights("q5_0", 21, k, seed=k)
    x = activations(9, k, seed=k + 1)
    alone = np.concatenate([matmul("q5_0", w, x[t:t + 1], method="int") for t in range(len(x))])
    assert np.array_equal(matmul("q5_0", w, x[:3], method="int"), alone[:3])
    assert np.array_equal(exact_gemm("q5_0", w, x), alone)
