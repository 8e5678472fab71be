"""Tensor types: the type table, dequantization (to float32) and reference quantization (from float32).

    dequantize(qtype, data, shape)           raw bytes of a tensor -> float32 array of `shape`
    dequantize_rows(qtype, data2d, row_ids)  selected rows of a [n_rows, row_bytes] byte matrix -> float32
    quantize(qtype, values)                  float32 [..., k] -> the tensor's bytes (flat uint8), as llama.cpp's
                                             quantize_row_*_ref would write them

``qtype`` is a type name (``"q4_K"``, any case), a ggml type id, or a ``types.QuantType``.
Importing this package fills every row of the type table in ``types`` with its traits (``traits.py``).
"""
from __future__ import annotations

import math

import numpy as np

from .. import _threading  # noqa: F401  (numba's threading layer, chosen before any parallel kernel runs)
from .._numba_cache import prepare_kernel_cache

prepare_kernel_cache()   # before any kernel: stale cached kernels dropped, one process at a time saves (_numba_cache)

from . import floats, kquants, legacy, traits  # noqa: F401  (traits.py fills the type table's rows)
from .types import QuantType, get_type

__all__ = ["QuantType", "get_type", "dequantize", "dequantize_rows", "quantize"]


def _byte_vector(data) -> np.ndarray:
    """A 1-D contiguous uint8 view of ``data`` (a copy only if it is not contiguous)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    array = np.asarray(data)  # np.memmap -> plain ndarray view of the same memory
    if array.dtype != np.uint8:
        raise ValueError(f"tensor data must be uint8 bytes, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"tensor data must be a 1-D byte array, got shape {array.shape}")
    return np.ascontiguousarray(array)


def _kernel(row: QuantType, which: str):
    kernel = getattr(row, which)
    if kernel is None:
        raise ValueError(f"{which} is not implemented for {row.name}")
    return kernel


def dequantize(qtype, data, shape) -> np.ndarray:
    """Dequantize a whole tensor: ``data`` holds its bytes (1-D uint8, e.g. a read-only memmap slice), ``shape``
    its dimensions with the row length last. Returns a new float32 array of that shape."""
    row = get_type(qtype)
    shape = tuple(int(n) for n in shape)
    if not shape or any(n < 0 for n in shape):
        raise ValueError(f"invalid tensor shape {shape}")
    row_len = shape[-1]
    n_rows = math.prod(shape[:-1])
    expected = row.row_bytes(row_len) * n_rows  # raises ValueError when rows are not whole blocks
    array = _byte_vector(data)
    if array.nbytes != expected:
        raise ValueError(f"{row.name} tensor of shape {shape} needs {expected} bytes, got {array.nbytes}")
    if expected == 0:
        return np.zeros(shape, dtype=np.float32)
    return _kernel(row, "to_float")(array).reshape(shape)


def dequantize_rows(qtype, data2d, row_ids) -> np.ndarray:
    """Dequantize only the rows ``row_ids`` of a [n_rows, row_bytes] uint8 matrix (an embedding lookup).
    Returns float32 [len(row_ids), row_len]."""
    row = get_type(qtype)
    matrix = np.asarray(data2d)
    if matrix.dtype != np.uint8 or matrix.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 byte matrix, got dtype {matrix.dtype} shape {matrix.shape}")
    n_rows, row_bytes = matrix.shape
    if row_bytes % row.type_size:
        raise ValueError(f"{row_bytes} bytes per row is not a whole number of {row.name} blocks "
                         f"of {row.type_size} bytes")
    row_len = row_bytes // row.type_size * row.block_size
    ids = np.asarray(row_ids)
    if ids.ndim != 1:
        ids = ids.reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"row ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        bad = ids[(ids < 0) | (ids >= n_rows)][0]
        raise ValueError(f"row id {bad} is out of range for a tensor of {n_rows} rows")
    if ids.size == 0 or row_len == 0:
        return np.zeros((ids.size, row_len), dtype=np.float32)
    selected = np.ascontiguousarray(matrix[ids]).reshape(-1)  # copies only the rows asked for
    return _kernel(row, "to_float")(selected).reshape(ids.size, row_len)


def quantize(qtype, values) -> np.ndarray:
    """Quantize float values (shape [..., k], k a multiple of the block size) into the tensor's bytes.

    Block types refuse NaN and infinity (ValueError naming the first one's index): llama.cpp would write blocks
    of garbage scales for them, and no later step could tell. f32, f16 and bf16 store them as they are."""
    row = get_type(qtype)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
        x = np.asarray(values, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("cannot quantize a scalar; give an array whose last dimension is the row length")
    x = np.ascontiguousarray(x)
    row.row_bytes(x.shape[-1])  # raises ValueError when rows are not whole blocks
    kernel = _kernel(row, "from_float")
    flat = x.reshape(-1)
    if row.block_size > 1:
        bad = floats.first_non_finite(flat)
        if bad >= 0:
            where = tuple(int(i) for i in np.unravel_index(bad, x.shape))
            raise ValueError(f"cannot quantize to {row.name}: the value at index {where} is {flat[bad]}, "
                             f"not a finite number")
    return kernel(flat)
