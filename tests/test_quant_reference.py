"""Quantization bit for bit equal to llama.cpp's, for every type it quantizes without an importance matrix.

tests/data/quantize/llamacpp.npz holds llama.cpp's bytes (ggml_quantize_chunk, imatrix NULL, i.e. its
quantize_row_*_ref) for fixed awkward inputs and for rows of the synthetic model's tensors; make_reference.py
there regenerates it. When llama-cpp-python is installed, the same comparison also runs live on wider seeded
random inputs and on whole tensors.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ggml_backend import load, quant
from llamacpp_quantize import available, ggml_quantize

DATA = Path(__file__).resolve().parent / "data" / "quantize"
TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K"]
K_TYPES = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
LLAMA_CPP, WHY_NOT = available()
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason=f"live comparison with llama.cpp's quantizer: {WHY_NOT}")


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "llamacpp.npz") as arrays:
        return {name: arrays[name] for name in arrays.files}


def _make_reference_module():
    spec = importlib.util.spec_from_file_location("make_reference", DATA / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_bytes(name: str, ours: np.ndarray, theirs: np.ndarray, values: np.ndarray, what: str) -> None:
    """Equal bytes, or a failure naming the first differing block, its input and both encodings."""
    qtype = quant.get_type(name)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape, (ours.dtype, ours.shape, theirs.shape)
    if np.array_equal(ours, theirs):
        return
    size = qtype.type_size
    differing = np.nonzero((ours != theirs).reshape(-1, size).any(axis=1))[0]
    first = int(differing[0])
    block_values = values.reshape(-1, qtype.block_size)[first]
    byte_offsets = np.nonzero(ours.reshape(-1, size)[first] != theirs.reshape(-1, size)[first])[0]
    pytest.fail(f"{name} ({what}): {differing.size} of {ours.size // size} blocks differ from llama.cpp; "
                f"first block {first} (values {first * qtype.block_size}..), bytes {byte_offsets.tolist()[:12]}\n"
                f"  ours   {ours.reshape(-1, size)[first].tolist()}\n"
                f"  theirs {theirs.reshape(-1, size)[first].tolist()}\n"
                f"  input  {block_values.tolist()}")


@pytest.mark.parametrize("name", TYPES)
def test_quantize_equals_llama_cpp_bytes(reference, name):
    x = reference["inputs"]
    assert_same_bytes(name, quant.quantize(name, x), reference[name], x, "stored awkward inputs")
    assert quant.quantize(name, x).size == quant.get_type(name).row_bytes(x.shape[-1]) * x.shape[0]


@pytest.mark.parametrize("name", K_TYPES)
def test_tensors_split_among_threads_give_the_same_bytes(reference, name):
    """More super-blocks than one band of work (kquants._BAND_BLOCKS): the bands, done on several threads,
    join into llama.cpp's bytes of the whole."""
    from ggml_backend.quant import kquants
    x = np.tile(reference["inputs"], (13, 1))       # 832 super-blocks: 3 bands of 256 and one of 64
    assert x.size // 256 > 2 * kquants._BAND_BLOCKS
    assert_same_bytes(name, quant.quantize(name, x), np.tile(reference[name], 13), x, "the inputs 13 times")


@pytest.mark.parametrize("name", K_TYPES)
def test_requantized_model_rows_equal_llama_cpp(reference, name):
    """Rows of a real tensor of the synthetic model (llama.cpp's own quantization of it), dequantized and
    quantized again: the same bytes as llama.cpp's re-quantization."""
    where = dict(entry.split("=", 1) for entry in reference["model_tensors"].tolist())
    file_name, tensor_name = where[name].split(":", 1)
    path = DATA.parent / "synthetic" / file_name
    tensor = load(str(path)).tensors[tensor_name]
    assert quant.get_type(tensor.type).name == name
    rows = tensor.dequantize().reshape(-1, 256)[:16]
    assert_same_bytes(name, quant.quantize(name, rows), reference[f"model_{name}"], rows, where[name])


@needs_llama_cpp
@pytest.mark.parametrize("name", TYPES)
def test_wider_random_inputs_equal_llama_cpp_live(name):
    make_reference = _make_reference_module()
    for seed in range(100, 106):
        x = make_reference.random_rows(48, seed)
        with np.errstate(all="ignore"):
            theirs = ggml_quantize(name, x)
        assert_same_bytes(name, quant.quantize(name, x), theirs, x, f"random rows, seed {seed}")


@needs_llama_cpp
@pytest.mark.parametrize("name", K_TYPES)
def test_whole_model_tensors_requantize_like_llama_cpp_live(name):
    """Every tensor of this type in the synthetic models (as far as 64 rows of 256 each), through both."""
    checked = 0
    for path in sorted((DATA.parent / "synthetic").glob("tiny-llama-*.gguf")):
        for tensor_name, tensor in load(str(path)).tensors.items():
            if quant.get_type(tensor.type).name != name:
                continue
            rows = tensor.dequantize().reshape(-1, tensor.shape[-1])[:64]
            assert_same_bytes(name, quant.quantize(name, rows), ggml_quantize(name, rows), rows,
                              f"{path.name}:{tensor_name}")
            checked += 1
    assert checked >= 2


# ------------------------------------------------------------------ round trips within each format's error

K_ERRORS = {  # on Gaussian rows of random scale: (mean relative RMS error, worst super-block's, worst |error|/amax)
    "q2_K": (0.32, 0.40, 0.45), "q3_K": (0.17, 0.20, 0.25), "q4_K": (0.08, 0.095, 0.10),
    "q5_K": (0.04, 0.05, 0.055), "q6_K": (0.02, 0.025, 0.02),
}


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_round_trip_error(name):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((32, 1024)) * rng.exponential(1.0, (32, 1))).astype(np.float32)
    raw = quant.quantize(name, x)
    assert raw.size == quant.get_type(name).row_bytes(1024) * 32
    back = quant.dequantize(name, raw, x.shape).reshape(-1, 256)
    blocks = x.reshape(-1, 256)
    relative_rms = np.sqrt(((blocks - back) ** 2).mean(axis=1) / (blocks ** 2).mean(axis=1))
    worst = np.abs(blocks - back).max(axis=1) / np.abs(blocks).max(axis=1)
    mean_bound, block_bound, worst_bound = K_ERRORS[name]
    assert relative_rms.mean() < mean_bound and relative_rms.max() < block_bound, relative_rms.max()
    assert worst.max() < worst_bound


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_zero_and_constant_blocks(name):
    x = np.zeros((2, 256), np.float32)
    x[1] = -3.0
    raw = quant.quantize(name, x).reshape(2, -1)
    assert not raw[0].any()                               # an all-zero super-block is all zero bytes
    back = quant.dequantize(name, raw.reshape(-1), x.shape)
    assert not back[0].any()
    assert np.abs(back[1] + 3.0).max() <= 3.0 * 2.0 ** -8  # a constant block comes back within half rounding


# ------------------------------------------------------------------ the type table and bad input

@pytest.mark.parametrize("name", TYPES + ["f16", "bf16", "f32"])
def test_every_quantizer_is_on_the_type_table(name):
    qtype = quant.get_type(name)
    assert qtype.quantize is not None and quant.get_type(name.upper()) is qtype
    x = np.linspace(-1, 1, 512, dtype=np.float32)
    assert np.array_equal(qtype.quantize(x), quant.quantize(name, x))
    assert qtype.quantize(x).size * 8 / x.size == qtype.bits_per_weight


def test_bits_per_weight_of_k_quants():
    assert {name: quant.get_type(name).bits_per_weight for name in K_TYPES} == {
        "q2_K": 2.625, "q3_K": 3.4375, "q4_K": 4.5, "q5_K": 5.5, "q6_K": 6.5625}


@pytest.mark.parametrize("name", ["q4_K", "q8_0"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_values_are_refused_with_their_index(name, bad):
    x = np.ones((2, 256), np.float64)
    x[1, 17] = bad
    with pytest.raises(ValueError, match=r"index \(1, 17\)"):
        quant.quantize(name, x)
    assert np.isfinite(quant.quantize("f32", x[0])).all()


@pytest.mark.parametrize("name", K_TYPES)
def test_partial_super_blocks_are_refused(name):
    with pytest.raises(ValueError, match="whole number"):
        quant.quantize(name, np.zeros((2, 128), np.float32))
