"""The SIMD one-token kernels (quant/decode.py) on every instruction-set path this CPU can run.

Each path is compared with the float64 oracle of test_matmul (dequantized weights times the quantized activations:
what the integer kernels compute exactly, up to float32 summation) and with the plain numba kernels. CI runs every
path its machine supports; a path the CPU lacks is reported as skipped with its reason.
"""
from __future__ import annotations

import numpy as np
import pytest

import ggml_backend.quant.matmul as matmul_module
from ggml_backend.cli.bench_kernels import SCALE_OFFSETS, random_weights
from ggml_backend.quant import simd
from ggml_backend.quant.decode import KINDS
from ggml_backend.quant.matmul import WeightMatrix, matmul, matmul_many
from ggml_backend.quant.types import get_type

from test_matmul import integer_oracle  # noqa: E402

ALL_PATHS = [simd.AVX512VNNI, simd.AVXVNNI, simd.AVX2]
SUPPORTED = simd.supported_isas()


def path_param(isa):
    missing = [need for need in isa.needs if need not in simd.host_features()]
    return pytest.param(isa, id=isa.name, marks=pytest.mark.skipif(
        bool(missing), reason=f"this CPU lacks {', '.join(missing)} (the {isa.name} path cannot run here)"))


PATHS = [path_param(isa) for isa in ALL_PATHS]


def product(isa, type_name, weights, x):
    """matmul on one kernel path (None: the plain numba kernels)."""
    saved = matmul_module.KERNEL_ISA
    matmul_module.KERNEL_ISA = isa
    try:
        return matmul(type_name, weights, x, method="int")
    finally:
        matmul_module.KERNEL_ISA = saved


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("type_name", list(KINDS))
def test_each_type_equals_the_integer_oracle(isa, type_name):
    rng = np.random.default_rng(KINDS[get_type(type_name).file_type or type_name])   # q3_K_planes: q3_K's weights
    block = 256 if "_K" in type_name else 32
    for n_rows, n_blocks in ((1, 1), (7, 3), (67, 9 if block == 256 else 29)):
        k = n_blocks * block
        weights = random_weights(type_name, n_rows, k, rng)
        x = rng.standard_normal((1, k)).astype(np.float32)
        y = product(isa, type_name, weights, x)
        oracle = integer_oracle(type_name, weights, x)
        scale = np.abs(oracle).max() + 1e-6
        assert np.abs(y - oracle).max() / scale < 2e-6, (type_name, n_rows, k)
        plain = product(None, type_name, weights, x)
        assert np.abs(y - plain).max() / scale < 2e-6


@pytest.mark.parametrize("isa", PATHS)
def test_extreme_quants_do_not_saturate(isa):
    """Quants at their extremes against activations of +-127: q8_0 weights of -128 and 127 (vpmaddubsw would
    saturate on w + 128; the AVX2 path takes signs apart), and every other type with all quant bits set."""
    rng = np.random.default_rng(5)
    half = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for type_name in KINDS:
        block = 256 if "_K" in type_name else 32
        weights = random_weights(type_name, 8, 2 * block, rng)
        blocks = weights.reshape(8, 2, -1)
        if type_name == "q8_0":
            blocks[:4, :, 2:] = 0x80            # -128
            blocks[4:, :, 2:] = 0x7F            # 127
        else:
            blocks[:] = 0xFF
            for offset in SCALE_OFFSETS[get_type(type_name).file_type or type_name]:
                blocks[:, :, offset:offset + 2] = half
        x = np.where(rng.random((1, 2 * block)) < 0.5, -1.0, 1.0).astype(np.float32)
        y = product(isa, type_name, weights, x)
        oracle = integer_oracle(type_name, weights, x)
        assert np.abs(y - oracle).max() / (np.abs(oracle).max() + 1e-6) < 2e-6, type_name


@pytest.mark.parametrize("isa", PATHS)
def test_matrices_of_one_file_share_one_launch_with_identical_results(isa):
    """q, k, v views of one byte buffer (as in a memory-mapped model file) go through one fused launch; each
    result equals that matrix's own product bit for bit, whatever the chunk boundaries."""
    rng = np.random.default_rng(11)
    k = 512
    row_bytes = k // 32 * 22
    sizes = [96, 16, 16]
    buffer = np.zeros(64 + sum(sizes) * row_bytes + 100, np.uint8)
    offset = 64
    matrices = []
    for n in sizes:
        data = random_weights("q5_0", n, k, rng)
        view = buffer[offset:offset + data.nbytes]
        view[:] = data.reshape(-1)
        matrices.append(WeightMatrix("q5_0", view, (n, k)))
        offset += data.nbytes
    assert len({(m.root.ctypes.data, m.root.nbytes) for m in matrices}) == 1
    x = rng.standard_normal(k).astype(np.float32)
    saved = matmul_module.KERNEL_ISA
    matmul_module.KERNEL_ISA = isa
    try:
        fused = matmul_many(matrices, x)
        alone = [m.matmul(x) for m in matrices]
    finally:
        matmul_module.KERNEL_ISA = saved
    for a, b in zip(fused, alone):
        assert a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="compares the avx512vnni path's q2_K / q3_K kernels with the avx2 "
                    f"ones, and this CPU runs only {', '.join(isa.name for isa in SUPPORTED) or 'the generic kernels'}")
@pytest.mark.parametrize("type_name", ["q2_K", "q3_K", "q3_K_planes"])
def test_the_avx512vnni_q2_K_q3_K_kernels_give_the_avx2_ones_bits(type_name):
    """On AVX512-VNNI q2_K takes two 32-value groups per 512-bit register (decode._dots_wide) and q3_K scales its
    pair sums by ``vpdpwssd``; their integer lanes are the AVX2 form's, so both paths give the same bits, alone and
    in a tile of tokens."""
    rng = np.random.default_rng(3)
    weights = random_weights(type_name, 21, 3 * 256, rng)
    for n_tokens in (1, 5):
        x = rng.standard_normal((n_tokens, 3 * 256)).astype(np.float32)
        wide, narrow = (product(isa, type_name, weights, x) for isa in (simd.AVX512VNNI, simd.AVX2))
        assert np.array_equal(wide, narrow), n_tokens


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="compares q4_0's row lanes on the avx512vnni and avx2 paths, and this "
                    f"CPU runs only {', '.join(isa.name for isa in SUPPORTED) or 'the generic kernels'}")
@pytest.mark.parametrize("n_rows", [8, 5, 37, 200])
def test_q4_0_row_lanes_give_the_same_bits_on_both_paths(n_rows):
    """q4_0 takes row lanes on both paths (decode._rows_lanes: sixteen rows per 512-bit register with ``vpdpbusd``
    on AVX512-VNNI, eight per 256-bit one with int16 block sums on AVX2): the same exact block sums and the same
    float steps, so the same bits, for one token and for tiles of 8, 4, 2 and 1 tokens, with rows past a multiple of
    either panel (copied beside zero rows) and rows of 4096 values (panels prefetched into L2)."""
    rng = np.random.default_rng(40 + n_rows)
    for k in (896, 4096):
        weights = random_weights("q4_0", n_rows, k, rng)
        x = rng.standard_normal((15, k)).astype(np.float32)
        x[::4, :3] *= 30.0
        for n_tokens in (1, 15):
            vnni, avx2 = (product(isa, "q4_0", weights, x[:n_tokens]) for isa in (simd.AVX512VNNI, simd.AVX2))
            assert np.array_equal(vnni, avx2), (k, n_tokens)


NARROW_PATHS = [path_param(isa) for isa in (simd.AVXVNNI, simd.AVX2)]


@pytest.mark.parametrize("isa", NARROW_PATHS)
@pytest.mark.parametrize("type_name", ["q4_0", "q5_0"])
@pytest.mark.parametrize("n_rows", [8, 5, 37])
def test_row_lanes_of_the_256_bit_paths_give_the_prompt_gemms_numbers(isa, type_name, n_rows):
    """q4_0 and q5_0 take row lanes on AVX2 and AVX-VNNI (eight rows a 256-bit register; q5_0's fifth bits spread
    from each row's 32-bit qh, its values summed as int16 four registers at a time): one token, a few (tiles of 8,
    4, 2, 1 and their remainders) and a prompt on the 8-row prompt GEMM give each (row, token) the same bits,
    whatever the batch; rows past a multiple of 8 (copied beside zero rows), rows of 896 (panels prefetched into
    L1) and of 4096 (into L2), and extreme quants (every fifth bit set, nibbles of 15) included."""
    rng = np.random.default_rng(70 + n_rows + KINDS[type_name])
    for k in (896, 4096):
        weights = random_weights(type_name, n_rows, k, rng)
        if type_name == "q5_0":
            weights.reshape(n_rows, -1, 22)[:2, :, 2:] = 0xFF    # values 31 throughout the first two rows
        x = rng.standard_normal((50, k)).astype(np.float32)
        x[::4, :3] *= 30.0
        saved = matmul_module.KERNEL_ISA
        matmul_module.KERNEL_ISA = isa
        try:
            prompt = matmul(type_name, weights, x, method="gemm")
            for n_tokens in (1, 2, 3, 7, 8, 13, 47):
                assert np.array_equal(matmul(type_name, weights, x[:n_tokens], method="int"), prompt[:n_tokens]), \
                    (k, n_tokens)
            assert np.array_equal(matmul(type_name, weights, x[9:10], method="int"), prompt[9:10])
        finally:
            matmul_module.KERNEL_ISA = saved
        oracle = integer_oracle(type_name, weights, x[:3])
        assert np.abs(prompt[:3] - oracle).max() / (np.abs(oracle).max() + 1e-6) < 2e-6


@pytest.mark.skipif(reason="compares the avxvnni path with the avx2 one, and this CPU lacks AVX-VNNI",
                    condition=simd.AVXVNNI not in SUPPORTED or simd.AVX2 not in SUPPORTED)
@pytest.mark.parametrize("type_name", list(KINDS))
def test_the_avxvnni_path_gives_the_avx2_paths_bits(type_name):
    """The AVX-VNNI path is the AVX2 path's kernels with ``vpdpbusd`` / ``vpdpwssd`` (and VNNI's unsigned
    activations in the few-token tiles of q5_0 and q8_0): exact integer sums either way and the same float steps,
    so the same bits, for one token and for a tile of five."""
    rng = np.random.default_rng(60 + KINDS[type_name])
    k = 1024 if "_K" in type_name else 640
    weights = random_weights(type_name, 37, k, rng)
    for n_tokens in (1, 5):
        x = rng.standard_normal((n_tokens, k)).astype(np.float32)
        vnni, avx2 = (product(isa, type_name, weights, x) for isa in (simd.AVXVNNI, simd.AVX2))
        assert np.array_equal(vnni, avx2), n_tokens


def test_path_choice(monkeypatch):
    monkeypatch.setenv("GGML_BACKEND_KERNELS", "generic")
    assert simd.choose_isa() is None
    monkeypatch.setenv("GGML_BACKEND_KERNELS", "auto")
    assert simd.choose_isa() is (SUPPORTED[0] if SUPPORTED else None)
    monkeypatch.setenv("GGML_BACKEND_KERNELS", "neon")
    with pytest.raises(ValueError, match="GGML_BACKEND_KERNELS='neon'"):
        simd.choose_isa()
    for isa in ALL_PATHS:
        monkeypatch.setenv("GGML_BACKEND_KERNELS", isa.name)
        if isa in SUPPORTED:
            assert simd.choose_isa() is isa
        else:
            with pytest.raises(ValueError, match="this CPU lacks"):
                simd.choose_isa()


def model_logits(path, name, batch):
    """Logits of every position of a prompt on the tiny synthetic Llama, on one kernel path, the prompt evaluated
    in one batch or one token at a time."""
    from ggml_backend import Llama
    from refdata import SYNTHETIC_DIR
    saved = matmul_module.KERNEL_ISA
    matmul_module.KERNEL_ISA = path
    try:
        llm = Llama(str(SYNTHETIC_DIR / name), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
        tokens = llm.tokenize(b"Once upon a time there was", add_bos=True)
        if batch:
            llm.eval(tokens)
        else:
            for token in tokens:
                llm.eval([token])
        return np.array(llm.scores[:len(tokens)])
    finally:
        matmul_module.KERNEL_ISA = saved


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("name", ["tiny-llama-q4_K_M.gguf", "tiny-llama-q4_0.gguf"])
def test_a_model_on_every_path(isa, name):
    """On the SIMD kernels a prompt in one batch gives the logits of the same tokens one at a time bit for bit
    (each (row, token) dot product is computed alone, so prompt caching can never change a result). Against the
    plain kernels, position by position, logits agree to float32 noise except where an activation sits on an 8-bit
    rounding boundary and moves by one quantization step (tenths of a logit at most)."""
    batch = model_logits(isa, name, batch=True)
    one_by_one = model_logits(isa, name, batch=False)
    assert np.array_equal(batch, one_by_one)
    plain = model_logits(None, name, batch=False)
    per_position = np.abs(one_by_one - plain).max(axis=1)
    assert np.median(per_position) < 1e-5 and per_position.max() < 0.2, per_position


def test_a_bad_kernel_choice_is_one_clear_error():
    """A bad GGML_BACKEND_KERNELS does not break the import: the CLI says so in one line and exits non-zero."""
    import os
    import subprocess
    import sys
    from refdata import SYNTHETIC_DIR
    env = {**os.environ, "GGML_BACKEND_KERNELS": "neon"}
    result = subprocess.run([sys.executable, "-m", "ggml_backend", "run", "-m",
                             str(SYNTHETIC_DIR / "tiny-llama-q4_0.gguf"), "-n", "2", "-p", "hi"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "GGML_BACKEND_KERNELS='neon'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("isa", PATHS + [pytest.param(None, id="generic")])
def test_prompt_path_dequantization_is_bit_exact_to_the_type_table(isa):
    """The BLAS path's weight bands (decode.dequantize_rows, or on CPUs without SIMD the table's own to_float on the
    band) give the type table's floats bit for bit."""
    from ggml_backend.quant import dequantize
    rng = np.random.default_rng(3)
    saved = matmul_module.KERNEL_ISA
    matmul_module.KERNEL_ISA = isa
    try:
        for type_name in KINDS:
            k = 512 if "_K" in type_name else 96
            weights = random_weights(type_name, 9, k, rng)
            table = np.asarray(dequantize(type_name, weights.reshape(-1), (9, k)))
            band = matmul_module.dequantize_rows(type_name, weights, k, 2, 9)
            assert np.array_equal(band.view(np.uint32), table[2:9].view(np.uint32)), type_name
    finally:
        matmul_module.KERNEL_ISA = saved


FEW_TOKEN_COUNTS = (2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 47)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("type_name", list(KINDS))
def test_few_tokens_give_each_token_its_one_token_result_bit_for_bit(isa, type_name):
    """matmul_few (tiles of 8 tokens (q8_0 on AVX2) or 4 that unpack each weight block once, then the rest in a
    tile of 4, 2 or 3, or one token alone) gives every (row, token) exactly what the one-token kernel gives that
    token alone, for any token count, in a fused launch of three matrices of one buffer (q, k, v), with an odd
    block count (the two-chain kernels' last block) and an even one. Continuous batching and prompt caching rely
    on it."""
    rng = np.random.default_rng(100 + KINDS[type_name])
    block = 256 if "_K" in type_name else 32
    for n_blocks in ((3, 2) if block == 256 else (7, 4)):
        k = n_blocks * block
        row_bytes = random_weights(type_name, 1, k, rng).nbytes
        sizes = [9, 5, 3]
        buffer = np.zeros(32 + sum(sizes) * row_bytes, np.uint8)
        matrices = []
        offset = 32
        for n in sizes:
            view = buffer[offset:offset + n * row_bytes]
            view[:] = random_weights(type_name, n, k, rng).reshape(-1)
            matrices.append(WeightMatrix(type_name, view, (n, k)))
            offset += n * row_bytes
        x = rng.standard_normal((max(FEW_TOKEN_COUNTS), k)).astype(np.float32)
        x[::7, :5] *= 40.0    # a few outliers, so tokens get very different scales
        saved = matmul_module.KERNEL_ISA
        matmul_module.KERNEL_ISA = isa
        try:
            alone = [matmul_many(matrices, row) for row in x]
            for n_tokens in FEW_TOKEN_COUNTS:
                few = matmul_many(matrices, x[:n_tokens], method="int")
                for m in range(len(matrices)):
                    expected = np.stack([alone[t][m] for t in range(n_tokens)])
                    assert np.array_equal(few[m].view(np.uint32), expected.view(np.uint32)), (k, n_tokens, m)
            single = matmul(type_name, matrices[0].bytes, x[:5], method="int")
            assert np.array_equal(single.view(np.uint32), np.stack([a[0] for a in alone[:5]]).view(np.uint32))
        finally:
            matmul_module.KERNEL_ISA = saved


def test_load_f16_pair_converts_every_half_exactly():
    """``load_f16_pair`` (one 32-bit load, one conversion for a block's d and m) gives numpy's float16 -> float32
    for every bit pattern, in both halves (the last pair is the array's last four bytes)."""
    from numba import njit

    @njit
    def pairs(raw):
        out = np.empty((raw.size // 4, 2), np.float32)
        for i in range(raw.size // 4):
            out[i, 0], out[i, 1] = simd.load_f16_pair(raw, 4 * i)
        return out

    halves = np.arange(1 << 16, dtype=np.uint16)
    rng = np.random.default_rng(7)
    raw = np.stack([halves, rng.permutation(halves)], axis=1).reshape(-1).view(np.uint8)
    got = pairs(raw)
    expected = raw.view(np.float16).astype(np.float32).reshape(-1, 2)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))

    @njit
    def first_halves(raw, out):
        for i in range(out.size):
            out[i] = simd.load_f16_pair(raw, 4 * i)[0]

    out = np.empty(raw.size // 4, np.float32)
    first_halves(raw, out)
    assert np.array_equal(out[~nan[:, 0]], expected[~nan[:, 0], 0])
    # one half used: no vpinsrw (with AVX512-FP16 each half is a plain load, vmovsh, by design); whether the
    # kernels keep the 32-bit load where LLVM narrowed it is test_avx2_codegen's check (compiled without AVX-512)
    asm = first_halves.inspect_asm(first_halves.signatures[0])
    assert "vpinsrw" not in asm
    if "avx512fp16" not in simd.target_features():
        assert "vmovsh" not in asm
