"""The plain float types' SIMD kernels (quant/float_dot.py): their one summation order, the same bits whatever the
tile, token count, thread count or launch, and the path each call takes."""
import os

import numba
import numpy as np
import pytest

import ggml_backend.quant.matmul as matmul_module
from ggml_backend.quant.float_dot import (F16_HALVES_FROM_K, FEW_TOKENS, FLOAT_KINDS, ROW_BLOCK_BYTES,
                                         TOKEN_BLOCK_BYTES, activation_pairs, float_chunks, float_product)
from ggml_backend.quant.floats import float_to_bf16_bits
from ggml_backend.quant.matmul import WeightMatrix, matmul, matmul_many

@pytest.fixture
def rng():
    return np.random.default_rng(7)


needs_simd = pytest.mark.skipif(matmul_module.KERNEL_ISA is None,
                                reason="CPUs without AVX2 (or GGML_BACKEND_KERNELS=generic) take the BLAS path")


def _weights(name, n_rows, k, rng):
    """(the weight bytes [n_rows, row_bytes], their values as float32)."""
    values = rng.standard_normal((n_rows, k)).astype(np.float32)
    if name == "f16":
        stored = values.astype(np.float16)
        return stored.view(np.uint8).reshape(n_rows, -1), stored.astype(np.float32)
    if name == "bf16":
        bits = float_to_bf16_bits(values).reshape(n_rows, k)
        return bits.view(np.uint8).reshape(n_rows, -1), (bits.astype(np.uint32) << 16).view(np.float32)
    return values.view(np.uint8).reshape(n_rows, -1), values


def _rounded(name, x):
    if name == "f16":
        return x.astype(np.float16).astype(np.float32)
    if name == "bf16":
        return (float_to_bf16_bits(x).reshape(x.shape).astype(np.uint32) << 16).view(np.float32)
    return x


def _in_the_order(w, x, name):
    """The module's order in numpy: two chains of sixteen float32 lanes, added lane by lane, halves summed first,
    then the tail value by value. f16: values 0-15 of each 32 into the first chain, 16-31 into the second (a last
    16 into the first); bf16: each 32 values into lane i as value 2i + 1 then 2i (``vdpbf16ps``), the first 32 of
    each 64 into the first chain (a last 32 too). f16 / bf16 products are exact in float32, so each fused
    multiply-add is the rounded sum of the exact product and numpy's float32 adds give the same bits."""
    k = w.shape[0]
    chains = [np.zeros(16, np.float32), np.zeros(16, np.float32)]
    if name == "bf16":
        tail = k - k % 32
        for m, d in enumerate(range(0, tail, 32)):
            chains[m % 2] = chains[m % 2] + w[d + 1:d + 32:2] * x[d + 1:d + 32:2]
            chains[m % 2] = chains[m % 2] + w[d:d + 32:2] * x[d:d + 32:2]
    else:
        tail = k - k % 16
        for m, d in enumerate(range(0, tail, 16)):
            chains[m % 2] = chains[m % 2] + w[d:d + 16] * x[d:d + 16]
    lanes = chains[0] + chains[1]
    while lanes.size > 1:
        half = lanes.size // 2
        lanes = lanes[:half] + lanes[half:]
    s = lanes[0]
    for d in range(tail, k):
        s = np.float32(s + w[d] * x[d])
    return s


@needs_simd
@pytest.mark.parametrize("name", ["f16", "bf16"])
@pytest.mark.parametrize("k", [16, 61, 96, 200, 250, 320, F16_HALVES_FROM_K - 1, F16_HALVES_FROM_K + 37])
def test_each_result_is_the_documented_order(name, k, rng):
    """Short rows and rows from ``F16_HALVES_FROM_K`` on (f16's one- and two-row tiles read float32 activations in
    the first, their f16 copy in the second): the same order."""
    weight_bytes, w = _weights(name, 7, k, rng)
    x = _rounded(name, rng.standard_normal((3, k)).astype(np.float32))
    y = matmul(name, weight_bytes, x)
    expected = np.array([[_in_the_order(w[r], x[t], name) for r in range(7)] for t in range(3)], np.float32)
    np.testing.assert_array_equal(y, expected)


@needs_simd
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("n_rows,k", [(1, 16), (7, 61), (41, 96), (130, 272), (9, F16_HALVES_FROM_K + 21)])
def test_a_token_gives_the_same_bits_in_any_batch_and_tile(name, n_rows, k, rng):
    """Tokens alone, in few-token launches (a row at a time) and in prompts (tiles of four rows and four tokens on
    512-bit paths; both walks run here whatever the CPU): every (row, token) result the same bits."""
    weight_bytes, w = _weights(name, n_rows, k, rng)
    x = rng.standard_normal((FEW_TOKENS + 11, k)).astype(np.float32)
    alone = np.concatenate([matmul(name, weight_bytes, x[t:t + 1]) for t in range(len(x))])
    for n_tokens in (2, 3, 5, FEW_TOKENS, len(x)):
        np.testing.assert_array_equal(matmul(name, weight_bytes, x[:n_tokens]), alone[:n_tokens])
    lhs = _rounded(name, x)
    for wide in (False, True):
        for n_threads in (1, 3):
            out = np.full((len(x), n_rows + 5), np.nan, np.float32)
            chunks = float_chunks([0], [n_rows], weight_bytes.shape[1], n_threads) + np.array([0, 5, 0])
            float_product(FLOAT_KINDS[name], weight_bytes.reshape(-1), chunks, weight_bytes.shape[1], lhs,
                          activation_pairs(FLOAT_KINDS[name], lhs), out, wide)
            np.testing.assert_array_equal(out[:, 5:], alone)
            assert np.isnan(out[:, :5]).all()     # nothing written outside the launch's columns
    scale = np.abs(lhs).astype(np.float64) @ np.abs(w.astype(np.float64)).T
    assert np.all(np.abs(alone - lhs.astype(np.float64) @ w.astype(np.float64).T) <= 2e-6 * scale + 1e-30)


@needs_simd
@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
def test_prompts_over_several_blocks_of_rows_and_tokens_give_each_tokens_bits(name, rng):
    """A prompt long enough and rows long enough that a chunk's walk crosses blocks of rows and of tokens (and a
    chunk's rows are not a multiple of the four-row tile, and k leaves a tail): each result the token's alone."""
    n_rows, k, n_tokens = 30, 4100, 53
    weight_bytes, w = _weights(name, n_rows, k, rng)
    size = weight_bytes.shape[1] // k
    assert ROW_BLOCK_BYTES // weight_bytes.shape[1] < n_rows and TOKEN_BLOCK_BYTES // (k * size) < n_tokens
    x = rng.standard_normal((n_tokens, k)).astype(np.float32)
    lhs = _rounded(name, x)
    chunks = np.array([[0, 0, 17], [17 * weight_bytes.shape[1], 17, 13]], np.int64)
    out = np.full((n_tokens, n_rows), np.nan, np.float32)
    float_product(FLOAT_KINDS[name], weight_bytes.reshape(-1), chunks, weight_bytes.shape[1], lhs,
                  activation_pairs(FLOAT_KINDS[name], lhs), out, True)
    alone = np.concatenate([matmul(name, weight_bytes, x[t:t + 1]) for t in range(n_tokens)])
    np.testing.assert_array_equal(out, alone)
    if name != "f32":
        expected = np.array([_in_the_order(w[r], lhs[t], name) for r in (0, 16, 29) for t in (0, 52)], np.float32)
        np.testing.assert_array_equal(out[[0, 52, 0, 52, 0, 52], [0, 0, 16, 16, 29, 29]], expected)


def test_compiled_rounding_and_pairs_equal_the_python_paths(rng):
    """Activations are rounded and bf16 pairs built in compiled code, by the decode step and by a prompt's one pass
    (``float_operands``, its arrays on cache lines): the same bits as numpy's rounding and the pairs' numpy
    construction, NaN, infinities, subnormals and odd k included."""
    from ggml_backend.quant.float_dot import float_operands, rounded_activations
    from ggml_backend.quant.matmul import quantize_activations
    x = (rng.standard_normal((4, 37)) * 1e3).astype(np.float32)
    x[0, :6] = [np.nan, np.inf, -np.inf, 1e-40, -3.4e38, 65520.0]
    bf16 = (float_to_bf16_bits(x).reshape(x.shape).astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore"):        # -3.4e38 and 65520 become -inf and inf in half precision, as in ggml
        f16 = x.astype(np.float16).astype(np.float32)
    numpy_rounded = {"f32": x, "f16": f16, "bf16": bf16}
    for name, kind in FLOAT_KINDS.items():
        expected = numpy_rounded[name]
        np.testing.assert_array_equal(rounded_activations(kind, x).view(np.uint32), expected.view(np.uint32))
        np.testing.assert_array_equal(quantize_activations(name, x).rounded.view(np.uint32), expected.view(np.uint32))
    rounded = rounded_activations(FLOAT_KINDS["bf16"], x)
    assert rounded.ctypes.data % 64 == 0 and activation_pairs(FLOAT_KINDS["bf16"], rounded).ctypes.data % 64 == 0
    halves = (rounded.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(activation_pairs(FLOAT_KINDS["bf16"], rounded),
                                  np.ascontiguousarray(halves[:, :36]).view(np.int32).reshape(-1))
    f16 = rounded_activations(FLOAT_KINDS["f16"], x)    # f16: the rounded values' half bits (what the few-token
    np.testing.assert_array_equal(activation_pairs(FLOAT_KINDS["f16"], f16),        # tiles read), f32: nothing
                                  np.ascontiguousarray(f16[:, :36].astype(np.float16)).view(np.int32).reshape(-1))
    assert activation_pairs(FLOAT_KINDS["f32"], x).size == 0
    for name, kind in FLOAT_KINDS.items():    # a prompt's one pass (on numba's threads from 32768 values)
        for rows in (x, np.tile(x, (1000, 1))):
            together, pairs = float_operands(kind, rows)
            alone = rounded_activations(kind, rows)
            np.testing.assert_array_equal(together.view(np.uint32), alone.view(np.uint32))
            np.testing.assert_array_equal(pairs, activation_pairs(kind, alone))
            assert together.ctypes.data % 64 == 0 and (pairs.size == 0 or pairs.ctypes.data % 64 == 0)


def test_sixteen_lane_sums_at_once_equal_each_sum_and_land_in_their_quarters(rng):
    """The 4 x 4 tile closes with ``lane_sums_f32x16`` (sixteen sums in one register) and four quarter stores: each
    sum the bits of ``sum_f32x16`` on its own vector (values over seven orders of magnitude, so that a change in
    the pairs or their order shows), each quarter in its row, into a contiguous and a strided output."""
    from numba import njit

    from ggml_backend.quant.simd import lane_sums_f32x16, load_16_f32, store_quarter_f32x16, sum_f32x16

    @njit(cache=False)
    def sums(a, out, alone):
        both = lane_sums_f32x16(
            load_16_f32(a, 0), load_16_f32(a, 16), load_16_f32(a, 32), load_16_f32(a, 48), load_16_f32(a, 64),
            load_16_f32(a, 80), load_16_f32(a, 96), load_16_f32(a, 112), load_16_f32(a, 128), load_16_f32(a, 144),
            load_16_f32(a, 160), load_16_f32(a, 176), load_16_f32(a, 192), load_16_f32(a, 208), load_16_f32(a, 224),
            load_16_f32(a, 240))
        for m in range(16):
            alone[m] = sum_f32x16(load_16_f32(a, 16 * m))
        store_quarter_f32x16(out, 0, 1, both, 0)
        store_quarter_f32x16(out, 1, 1, both, 1)
        store_quarter_f32x16(out, 2, 1, both, 2)
        store_quarter_f32x16(out, 3, 1, both, 3)

    for _ in range(50):
        a = (rng.standard_normal(256) * 10.0 ** rng.integers(-3, 4, 256)).astype(np.float32)
        alone = np.zeros(16, np.float32)
        for out in (np.zeros((4, 6), np.float32), np.zeros((4, 12), np.float32)[:, ::2]):
            sums(a, out, alone)
            np.testing.assert_array_equal(out[:, 1:5].reshape(-1).view(np.uint32), alone.view(np.uint32))
            assert not out[:, [0, 5]].any()
        assert len(set(alone.tolist())) > 1


@needs_simd
@pytest.mark.parametrize("name", ["f16", "bf16"])
def test_activations_off_a_cache_line_are_moved_onto_one(name, rng):
    """The launch moves activations that start off a 64-byte line onto one (a load across two lines cost the f16
    prompt kernel a third): the same results from activations at any offset, and the copy on a line."""
    from ggml_backend.quant.matmul import _line_aligned
    weight_bytes, _ = _weights(name, 40, 256, rng)
    x = rng.standard_normal((FEW_TOKENS + 3, 256)).astype(np.float32)
    results = []
    for offset in (0, 4, 16, 36):    # bytes off a line
        buffer = np.empty(x.size * 4 + 128, np.uint8)
        skip = -buffer.ctypes.data % 64 + offset
        shifted = buffer[skip:skip + x.nbytes].view(np.float32).reshape(x.shape)
        shifted[...] = x
        assert shifted.ctypes.data % 64 == offset
        moved = _line_aligned(shifted)
        assert moved.ctypes.data % 64 == 0 and np.array_equal(moved, x)
        assert (moved is shifted) == (offset == 0)
        results.append(matmul(name, weight_bytes, shifted))
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


@needs_simd
def test_thread_counts_and_shared_launches_give_identical_results(rng):
    q = WeightMatrix("f16", _weights("f16", 96, 64, rng)[0])
    k = WeightMatrix("f16", _weights("f16", 16, 64, rng)[0])
    v = WeightMatrix("bf16", _weights("bf16", 24, 64, rng)[0])
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        results = []
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append(matmul_many([q, k, v], x))
    finally:
        numba.set_num_threads(before)
    for other in results:
        for weight, got, first in zip((q, k, v), other, results[0]):
            np.testing.assert_array_equal(got, first)
            np.testing.assert_array_equal(got, weight.matmul(x))


def test_bf16_without_the_instruction_gives_its_bits(tmp_path):
    """On a CPU with AVX512-BF16 the bf16 kernels use ``vdpbf16ps``; compiled for the same CPU without it (another
    process, its own numba cache) they take the two fused multiply-adds instead: the same bits."""
    import subprocess
    import sys

    from ggml_backend.quant.simd import has_native_bf16_dot, host_features
    if matmul_module.KERNEL_ISA is None or not has_native_bf16_dot():
        pytest.skip(reason="this CPU has no AVX512-BF16: its bf16 kernels already take the emulation")
    features = ",".join(("-" if name == "avx512bf16" else "+") + name for name in sorted(host_features()))
    script = (
        "import numpy as np, sys\n"
        "from ggml_backend.quant.matmul import matmul\n"
        "from ggml_backend.quant.simd import has_native_bf16_dot\n"
        "rng = np.random.default_rng(3)\n"
        "from ggml_backend.quant.floats import float_to_bf16_bits\n"
        "w = float_to_bf16_bits(rng.standard_normal((37, 250)).astype(np.float32)).reshape(37, 250)\n"
        "x = rng.standard_normal((9, 250)).astype(np.float32)\n"
        "sys.stdout.write(str(has_native_bf16_dot()) + ' ' + matmul('bf16', w.view(np.uint8), x).tobytes().hex())\n")
    results = []
    for env_features in (None, features):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / f"cache{len(results)}"))
        if env_features:
            env["NUMBA_CPU_FEATURES"] = env_features
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(done.stdout.split())
    assert [native for native, _ in results] == ["True", "False"]
    assert results[0][1] == results[1][1]


def test_the_blas_path_stays_for_method_blas_and_cpus_without_avx2(rng, monkeypatch):
    weight_bytes, w = _weights("f16", 40, 96, rng)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    blas = matmul("f16", weight_bytes, x, method="blas")
    expected = _rounded("f16", x).astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(blas, expected, rtol=1e-5, atol=1e-5)
    calls = []
    monkeypatch.setattr(matmul_module, "float_product", lambda *args: calls.append(args))
    monkeypatch.setattr(matmul_module, "KERNEL_ISA", None)
    np.testing.assert_array_equal(matmul("f16", weight_bytes, x), blas)
    assert calls == []


def test_float_chunks_cover_every_row_once():
    starts, counts, row_bytes = [0, 10_000, 50_000], [9, 130, 4], 64
    for n_threads in (1, 2, 3, 16):
        table = float_chunks(starts, counts, row_bytes, n_threads)
        covered = []
        for start, column, rows in table.tolist():
            member = max(i for i, s in enumerate(starts) if s <= start)
            first_row = (start - starts[member]) // row_bytes
            assert column == sum(counts[:member]) + first_row and rows > 0
            covered += [(member, first_row + i) for i in range(rows)]
        assert sorted(covered) == [(m, r) for m, c in enumerate(counts) for r in range(c)]


@needs_simd
def test_the_real_model_converted_to_bf16_and_f16(gemma_path, tmp_path):
    """Gemma 3 270M written as BF16 and F16 by our quantizer (the q4_K_M file's values, dequantized): a prompt in
    one batch (tiles of rows) and token by token (a row at a time) give the same logits, bit for bit, and they
    are the q4_K_M model's within what 8-bit against 16-bit activations move (the same top token)."""
    from ggml_backend import Llama
    from ggml_backend.tools.quantize import quantize_model
    original = Llama(str(gemma_path), n_ctx=64, verbose=False)
    tokens = original.tokenize(b"The capital of France is Paris, and the capital of Italy is")
    assert len(tokens) > FEW_TOKENS
    original.eval(tokens)
    reference = original.session.last_logits.copy()
    for file_type in ("BF16", "F16"):
        path = tmp_path / f"gemma-{file_type}.gguf"
        quantize_model(gemma_path, path, file_type, allow_requantize=True)
        llm = Llama(str(path), n_ctx=64, verbose=False)
        llm.eval(tokens)
        batch = llm.session.last_logits.copy()
        llm.reset()
        for token in tokens:
            llm.eval([token])
        np.testing.assert_array_equal(llm.session.last_logits, batch)
        assert np.argmax(batch) == np.argmax(reference)
        assert np.abs(batch - reference).max() < 0.1 * np.abs(reference).max()
        del llm
        path.unlink()
