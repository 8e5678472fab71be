"""Quantizers for float32 rows into ggml's 8-bit "dot product" formats: q8_0, q8_1 and q8_K.

A quantized weight row is multiplied with an activation row after the activation row has been quantized to the
weight type's ``vec_dot_type`` (see ``types.py``); the products are then integer dot products per block. Two
flavours exist, because ggml itself has two:

* the *reference* quantizers (``quantize_row_q8_0`` …: ggml-quants.c ``quantize_row_q8_0_ref``), used when a
  tensor is stored as q8_0/q8_1/q8_K. They give bytes identical to ggml's and gguf-py's: ``d = amax/127``,
  ``id = 1/d`` and ``roundf`` (ties away from zero). For q8_0 / q8_1 they are the type table's (legacy.py).
* the *activation* quantizers (``quantize_activations_q8_0`` …), used by the matrix products. They follow what
  llama.cpp's x86 CPU backend computes on this machine (arch/x86/quants.c): ``id = 127/amax`` and round to
  nearest even (``_mm256_round_ps``). q8_K has a single version (the x86 backend calls the reference one):
  ``iscale = -127/max`` where ``max`` is the signed value of largest magnitude, ``nearest_int`` (ties to even),
  capped at 127, and ``d = 1/iscale``.

The activation quantizers return the parts as separate arrays (quants int8, scales float32 already rounded to the
precision ggml stores them in, q8_1 block sums, q8_K sums of 16) so the matmul kernels need not parse bytes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import nearest_int, round_to_f16
from .float_dot import rounded_activations
from .legacy import quantize_q8_0, quantize_q8_1
from .simd import round_to_half

QK8_0 = 32   # values per q8_0 / q8_1 block
QK_K = 256   # values per q8_K super-block


@njit(cache=True, inline="always")
def _q8_0_row(x, row, qs, d, sums):
    """Quantize row ``row`` of ``x`` [n, k] in blocks of 32 into ``qs`` [n, k] and ``d`` [n, k/32]; ``sums``
    [n, k/32] gets d*sum(qs) rounded to half precision (the q8_1 ``s`` field; the caller ignores it for q8_0)."""
    for block in range(x.shape[1] // QK8_0):
        start = block * QK8_0
        amax = np.float32(0.0)
        for i in range(QK8_0):
            amax = max(amax, abs(x[row, start + i]))
        scale = np.float32(amax / np.float32(127.0))
        inverse = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        total = 0
        for i in range(QK8_0):
            q = int(np.rint(np.float32(x[row, start + i] * inverse)))
            qs[row, start + i] = q
            total += q
        d[row, block] = round_to_f16(scale)
        sums[row, block] = round_to_f16(np.float32(np.float32(total) * scale))


@njit(cache=True, parallel=True)
def _q8_0_kernel(x, qs, d, sums):
    for row in prange(x.shape[0]):
        _q8_0_row(x, row, qs, d, sums)


@njit(cache=True)
def _q8_0_kernel_serial(x, qs, d, sums):
    """``_q8_0_kernel`` on the calling thread: for a token or two, a parallel launch (a thread wake-up, ~100 per
    decode step) costs more than the work."""
    for row in range(x.shape[0]):
        _q8_0_row(x, row, qs, d, sums)


@njit(cache=True, inline="always")
def _q8_K_row(x, row, qs, d, bsums):
    """Quantize row ``row`` of ``x`` [n, k] in super-blocks of 256 (ggml ``quantize_row_q8_K_ref``)."""
    for block in range(x.shape[1] // QK_K):
        start = block * QK_K
        amax = np.float32(0.0)
        signed_max = np.float32(0.0)
        for i in range(QK_K):
            magnitude = abs(x[row, start + i])
            if magnitude > amax:
                amax = magnitude
                signed_max = x[row, start + i]
        if amax == 0:
            d[row, block] = 0.0
            for i in range(QK_K):
                qs[row, start + i] = 0
            for j in range(QK_K // 16):
                bsums[row, block * 16 + j] = 0
            continue
        iscale = np.float32(np.float32(-127.0) / signed_max)
        for j in range(QK_K // 16):
            total = 0
            for i in range(16):
                # nearest_int and an int8 store, as ggml: equal to rounding to even wherever iscale is finite,
                # and ggml's bytes where a subnormal block maximum made it infinite (the table's reference
                # quantizer is this one: kquants.quantize_q8_K)
                qs[row, start + j * 16 + i] = min(127, nearest_int(np.float32(iscale * x[row, start + j * 16 + i])))
                total += qs[row, start + j * 16 + i]
            bsums[row, block * 16 + j] = total
        d[row, block] = np.float32(np.float32(1.0) / iscale)


@njit(cache=True, parallel=True)
def _q8_K_kernel(x, qs, d, bsums):
    for row in prange(x.shape[0]):
        _q8_K_row(x, row, qs, d, bsums)


@njit(cache=True)
def _q8_K_kernel_serial(x, qs, d, bsums):
    for row in range(x.shape[0]):
        _q8_K_row(x, row, qs, d, bsums)


# Below this many rows the activation quantizers run on the calling thread (see _q8_0_kernel_serial).
SERIAL_ROWS = 4


def _as_rows(x: np.ndarray, block: int, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ValueError(f"{name}: activations must be float32, got {x.dtype}")
    if x.ndim not in (1, 2):
        raise ValueError(f"{name}: activations must be 1-D or 2-D, got shape {x.shape}")
    rows = np.ascontiguousarray(x.reshape(1, -1) if x.ndim == 1 else x)
    if rows.shape[1] % block:
        raise ValueError(f"{name}: row length {rows.shape[1]} is not a multiple of {block}")
    return rows


def _q8_0_parts(x):
    rows = _as_rows(x, QK8_0, "q8_0/q8_1")
    n, k = rows.shape
    qs = np.empty((n, k), np.int8)
    d = np.empty((n, k // QK8_0), np.float32)
    sums = np.empty((n, k // QK8_0), np.float32)
    (_q8_0_kernel_serial if n < SERIAL_ROWS else _q8_0_kernel)(rows, qs, d, sums)
    return qs, d, sums


def quantize_activations_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of float32 ``x`` ([n, k] or [k]) -> (qs int8 [n, k], d float32 [n, k/32]), as llama.cpp's x86 CPU
    backend quantizes activations for q4_0 / q5_0 / q8_0 weights."""
    qs, d, _ = _q8_0_parts(x)
    return qs, d


def quantize_activations_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``x`` -> (qs, d, s) for q4_1 / q5_1 weights; ``s`` = d * sum(qs) per block, half precision."""
    return _q8_0_parts(x)


def quantize_activations_q8_K(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``x`` ([n, k] or [k], k a multiple of 256) -> (qs int8 [n, k], d float32 [n, k/256],
    bsums int32 [n, k/16]) for K-quant weights."""
    rows = _as_rows(x, QK_K, "q8_K")
    n, k = rows.shape
    qs = np.empty((n, k), np.int8)
    d = np.empty((n, k // QK_K), np.float32)
    bsums = np.empty((n, k // 16), np.int32)
    (_q8_K_kernel_serial if n < SERIAL_ROWS else _q8_K_kernel)(rows, qs, d, bsums)
    return qs, d, bsums


def _pack_blocks(columns: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-block fields (each [n_blocks, bytes]) into the flat byte image of the blocks."""
    return np.ascontiguousarray(np.concatenate(columns, axis=1)).reshape(-1)


def quantize_row_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 values (a multiple of 32) -> q8_0 block bytes, identical to ggml's ``quantize_row_q8_0_ref``: the
    type table's quantizer (legacy.py), one for both."""
    return quantize_q8_0(np.asarray(x, np.float32).reshape(-1))


def quantize_row_q8_1(x: np.ndarray) -> np.ndarray:
    """float32 values (a multiple of 32) -> q8_1 block bytes (d, s = d*sum(qs), qs), like ggml's reference (the
    type table's quantizer, legacy.py)."""
    return quantize_q8_1(np.asarray(x, np.float32).reshape(-1))


def quantize_row_q8_K(x: np.ndarray) -> np.ndarray:
    """float32 values (a multiple of 256) -> q8_K block bytes (d f32, qs i8[256], bsums i16[16])."""
    qs, d, bsums = quantize_activations_q8_K(np.asarray(x).reshape(-1))
    n_blocks = d.size
    return _pack_blocks([d.reshape(n_blocks, 1).view(np.uint8),
                         qs.reshape(n_blocks, QK_K).view(np.uint8),
                         bsums.reshape(n_blocks, 16).astype(np.int16).view(np.uint8)])


def round_rows_to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float32 values rounded to half precision (ggml converts activations to f16 for f16 weights)."""
    return round_to_f16_inplace(np.array(x, dtype=np.float32, order="C"))


def round_rows_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> float32 values rounded to bfloat16 the way ggml's ``GGML_FP32_TO_BF16`` does (nearest even,
    NaN kept quiet): compiled (``float_dot.rounded_activations``), as ``floats.float_to_bf16_bits`` rounds in
    numpy, which took 2.3 and 7 ms for a prompt's 256 x 896 and 256 x 4864 activations against 0.07 and 0.4 (one
    Zen 4 core), a tenth of a BF16 prompt's time at four roundings a layer."""
    return rounded_activations(2, np.ascontiguousarray(x, dtype=np.float32))


__all__ = [
    "quantize_row_q8_0", "quantize_row_q8_1", "quantize_row_q8_K",
    "quantize_activations_q8_0", "quantize_activations_q8_1", "quantize_activations_q8_K",
    "round_rows_to_f16", "round_rows_to_bf16", "round_to_f16", "round_to_f16_inplace",
]


@njit(cache=True, nogil=True)
def _round_to_f16(values):
    """Round each float32 of ``values`` to half precision in place (F16C's rounding, vectorized): to nearest
    even, half subnormals kept, inf beyond the largest half, NaN stays NaN."""
    for i in range(values.size):
        values[i] = round_to_half(values[i])


def round_to_f16_inplace(x: np.ndarray) -> np.ndarray:
    """Round a C-contiguous float32 array to half precision in place (same values as
    ``x.astype(np.float16).astype(np.float32)``, without the two conversions' temporaries); returns ``x``."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("round_to_f16_inplace needs a C-contiguous float32 array")
    flat = x.reshape(-1)
    _round_to_f16(flat)
    return x
