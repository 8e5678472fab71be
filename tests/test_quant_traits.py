"""The type-traits table (quant/types.py, filled by quant/traits.py): every row complete, an incomplete one refused,
and the one block decoder per format (quant/blocks.py) giving the table's dequantized values."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import ggml_backend.quant  # noqa: F401  (fills the table)
from ggml_backend.quant import blocks, generic
from ggml_backend.quant.decode import KINDS
from ggml_backend.quant.float_dot import FLOAT_KINDS
from ggml_backend.quant.matmul import SUPPORTED_TYPES
from ggml_backend.quant.types import (
    MEMORY_ONLY, PRODUCT_SLOTS, STORAGE_SLOTS, TYPES, TYPES_BY_ID, IncompleteTypeError, ProductKernel,
    QuantType, get_type, register,
)


def _complete_slots():
    kernel = ProductKernel(simd_kind=None, generic=generic.few_tokens("q4_0"))
    return dict(unpack=blocks.unpack_q4_0, to_float=TYPES["q4_0"].to_float, from_float=TYPES["q4_0"].from_float,
                one_token=kernel, few_tokens=kernel)


@pytest.mark.parametrize("name", [*TYPES, *MEMORY_ONLY])
def test_every_row_is_complete(name):
    row = get_type(name)
    assert row.missing_slots() == []
    for slot in STORAGE_SLOTS:
        assert callable(getattr(row, slot)), slot
    if not row.weights:        # q8_1, q8_K: activation formats, no product with them as weights
        assert name not in SUPPORTED_TYPES
        return
    # a layout no file holds (q3_K_planes) is multiplied, but no file names it: its file type is the supported one
    assert (name in SUPPORTED_TYPES) == (not row.file_type)
    assert not row.file_type or (row.file_type in SUPPORTED_TYPES and row.type_id not in TYPES_BY_ID)
    for slot in PRODUCT_SLOTS:
        kernel = getattr(row, slot)
        assert isinstance(kernel, ProductKernel)
        if row.block_size == 1:   # the plain floats: float_dot.py's kernel of their storage (sgemm without AVX2)
            assert kernel.sgemm and kernel.simd_kind is None and kernel.float_kind == FLOAT_KINDS[name]
        else:                   # both kernel sets: the SIMD kind of decode.py and a generic kernel
            assert kernel.simd_kind == KINDS[name] and callable(kernel.generic)


@pytest.mark.parametrize("missing", STORAGE_SLOTS + PRODUCT_SLOTS)
def test_a_row_with_an_empty_slot_is_refused(missing):
    row = QuantType("q4_X", 1000, 32, 18, "q8_0", "q4_0's layout under another name")
    slots = _complete_slots()
    slots[missing] = None
    with pytest.raises(IncompleteTypeError, match=f"type q4_X: no {missing} given"):
        register(row, **slots)
    assert all(getattr(row, slot) is None for slot in STORAGE_SLOTS + PRODUCT_SLOTS)   # left as it was
    assert register(row, **_complete_slots()) is row and row.missing_slots() == []


def test_an_activation_only_row_needs_no_product_kernels_and_a_kernel_needs_a_generic_one():
    row = QuantType("q8_X", 1001, 32, 34, "q8_X", weights=False)
    slots = _complete_slots()
    del slots["one_token"], slots["few_tokens"]
    register(row, **slots)
    assert row.missing_slots() == []
    weights_row = QuantType("q4_Y", 1002, 32, 18, "q8_0")
    slots = _complete_slots()
    slots["one_token"] = ProductKernel(simd_kind=0, generic=None)
    with pytest.raises(IncompleteTypeError, match="one_token has no generic kernel"):
        register(weights_row, **slots)
    with pytest.raises(TypeError):
        register(weights_row, **_complete_slots(), dequantize=None)


@njit(cache=False)
def _values_by_unpack(kind, is_kquant, data, block_bytes, block_values, out):
    """Value i of every block as the unpack contract says (d * q + m; (d * scale) * q - dmin * min)."""
    q = np.empty(block_values, np.int16)
    scales = np.empty(16, np.int32)
    mins = np.empty(16, np.int32)
    for b in range(data.size // block_bytes):
        if is_kquant:
            d, dmin = blocks.unpack_kquant(kind, data, b, q, scales, mins, blocks.HALF_TO_FLOAT)
            for i in range(block_values):
                out[b * block_values + i] = (d * np.float32(scales[i // 16])) * np.float32(q[i]) \
                    - dmin * np.float32(mins[i // 16])
        else:
            d, m = blocks.unpack_legacy(kind, data, b, q, blocks.HALF_TO_FLOAT)
            for i in range(block_values):
                out[b * block_values + i] = np.float32(q[i]) * d + m


@pytest.mark.parametrize("name", [*blocks.LEGACY_CODES, *blocks.KQUANT_CODES])
def test_unpack_gives_the_tables_values(name):
    """The decoder's documented meaning (quants, scales, d, m) reproduces to_float: same numbers (== also equates
    the +0.0 that ``+ m`` makes of ggml's -0.0)."""
    row = get_type(name)
    rng = np.random.default_rng(row.type_id % 1000)
    x = rng.standard_normal(4 * row.block_size * (8 if row.block_size == 32 else 1)).astype(np.float32)
    data = row.from_float(x)
    expected = row.to_float(data)
    got = np.empty_like(expected)
    codes = blocks.KQUANT_CODES if name in blocks.KQUANT_CODES else blocks.LEGACY_CODES
    _values_by_unpack(codes[name], name in blocks.KQUANT_CODES, data, row.type_size, row.block_size, got)
    assert np.array_equal(got, expected)
    assert row.unpack is getattr(blocks, f"unpack_{name}")
