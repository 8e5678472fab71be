"""Plain float types (f32, f16, bf16), and the half-precision helpers every block format uses.

Block formats store their scales as IEEE half floats. Numba has no float16 scalar type, so kernels read a scale's
two bytes as an integer and look it up in ``HALF_TO_FLOAT`` (all 65,536 halves converted once by numpy; exact,
which is what ggml's ``GGML_FP16_TO_FP32`` is too; the table lives in ``blocks.py``). Quantizers compute their scales in float32 inside the kernel
and convert them to half with numpy afterwards (``float_to_half_bits``): numpy rounds to nearest even, as ggml's
``GGML_FP32_TO_FP16`` does.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .blocks import HALF_TO_FLOAT  # noqa: F401  (re-exported: the one fp16 table)


def float_to_half_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half, round to nearest even (ggml's GGML_FP32_TO_FP16), as uint16 bit patterns: the bytes a
    file or a cache stores (the rounded float32 values come from blocks.round_to_f16 in kernels and
    activations.round_to_f16_inplace for arrays, which round identically)."""
    with np.errstate(over="ignore"):  # overflow to inf is the defined result, as in ggml
        return np.asarray(values, dtype=np.float32).astype(np.float16).view(np.uint16)


def float_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns exactly as ggml_compute_fp32_to_bf16: NaNs made quiet, else round to
    nearest even on the upper 16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet_nan = ((bits >> np.uint32(16)) | np.uint32(64)).astype(np.uint16)
    rounded = ((bits.astype(np.uint64) + (np.uint64(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))))
               >> np.uint64(16)).astype(np.uint16)
    return np.where(is_nan, quiet_nan, rounded)


@njit(cache=True)
def first_non_finite(values: np.ndarray) -> int:
    """Index of the first NaN or infinity in a 1-D float32 array, or -1: one pass, no temporary array."""
    for i in range(values.size):
        if not np.isfinite(values[i]):
            return i
    return -1


# ----- to_float: (uint8[n_bytes], out=None, parallel=True) -> float32[n_values], as the block formats' (blocks.py);
# the caller has validated the byte count. numpy's conversions are exact and already fast: ``parallel`` is unused.

def _into(values: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return values
    out[:] = values
    return out


def dequantize_f32(data: np.ndarray, out: np.ndarray | None = None, parallel: bool = True) -> np.ndarray:
    if out is None:
        return data.view(np.float32).copy()  # a copy: the source may be a read-only file mapping
    return _into(data.view(np.float32), out)


def dequantize_f16(data: np.ndarray, out: np.ndarray | None = None, parallel: bool = True) -> np.ndarray:
    return _into(data.view(np.float16).astype(np.float32), out)


def dequantize_bf16(data: np.ndarray, out: np.ndarray | None = None, parallel: bool = True) -> np.ndarray:
    return _into((data.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32), out)


# ----- quantize: (float32[n_values]) -> uint8[n_bytes] -----

def quantize_f32(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint8).copy()


def quantize_f16(values: np.ndarray) -> np.ndarray:
    return float_to_half_bits(values).reshape(-1).view(np.uint8)


def quantize_bf16(values: np.ndarray) -> np.ndarray:
    return float_to_bf16_bits(values).reshape(-1).view(np.uint8)


