"""Matrix products with weights stored in ggml block formats: y = x @ W.T.

W has shape [n_rows (out features), k (in features)] and is stored as uint8 bytes [n_rows, row_bytes] (usually a
read-only view into a memory-mapped model file); x is float32 [n_tokens, k]; y is float32 [n_tokens, n_rows].

Numerics follow llama.cpp's CPU backend: each activation row is quantized to the weight type's ``vec_dot_type``
(q8_0, q8_1 or q8_K: see ``activations.py``), each block contributes an exact integer dot product scaled by the
block scales, and the per-row sums are accumulated in float32. f16 / bf16 weights meet activations rounded to f16 /
bf16; f32 weights meet float32 activations.

Three ways to compute the same product:

* ``"int"``: integer kernels, the ones the weight type's row names (``types.py``: ``one_token`` for one activation
  row, ``few_tokens`` for more). On a CPU with AVX2 they are the explicit-SIMD kernels of ``decode.py`` on its
  instruction set (``KERNEL_ISA``: VNNI or AVX2): one activation row (decode, memory-bound: every weight byte is
  read once per token) or a few (tiles of tokens that unpack each weight block once, each (row, token) result
  bit for bit the one-token kernel's), several matrices sharing the input in one launch (``matmul_many``). CPUs
  without AVX2 (or ``GGML_BACKEND_KERNELS=generic``) run the plain numba kernels of ``generic.py``.
* ``"gemm"``: the integer GEMM of ``gemm.py`` for many tokens (prompt processing) on AVX512-VNNI: weights kept
  8-bit, 16 rows in the lanes of a 512-bit ``vpdpbusd`` times tiles of 8 tokens, with llama.cpp's quantized
  activations; 1.5-2.5x the BLAS path on a Zen 4 in its first form, twice that since (Zen 5). ``method="auto"``
  picks it from ``BLAS_MIN_TOKENS`` tokens on where the CPU has it (and k is a multiple of 64).
* f32 / f16 / bf16 weights take ``float_dot.py``'s SIMD kernels for "auto" and "int" on a CPU with AVX2 (ggml's
  ``vec_dot_f16`` numerics, one summation order whatever the token count), else the BLAS path.
* ``"blas"``: dequantize a band of W rows to float32 (``decode.dequantize_rows`` on a SIMD CPU, the type table's
  ``to_float`` elsewhere: the same floats) and hand it to numpy's sgemm. Its numerics differ (the activations are
  not quantized) but it is much faster when many tokens share each weight (prompt processing). ``method="auto"``
  picks it from ``BLAS_MIN_TOKENS`` tokens on where the GEMM is not available (CPUs without AVX512-VNNI, k not a
  multiple of 64).

This module is validation, dispatch (asking the type's row), the fused launch plans of ``matmul_many`` and the
BLAS path; attention is not here (``model/attention.py``, numba kernels of its own).
Every size a kernel relies on is checked here, in Python, before the kernel runs.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numba
import numpy as np

from .activations import (
    quantize_activations_q8_0, quantize_activations_q8_1, quantize_activations_q8_K,
)
from .decode import KIND_ARGS, KINDS, matmul_few, matvec, matvec_here  # noqa: F401  (KINDS: model/batching asks it)
from .decode import dequantize_rows as dequantize_simd
from .float_dot import FLOAT_KINDS, float_chunks, float_operands, float_product, line_aligned_empty
from .gemm import EXACT_FROM_TOKENS, GemmTokens, gemm_product, isa_has_gemm, prompt_gemm_takes
from .simd import choose_isa
from .types import MEMORY_ONLY, TYPES, QuantType, get_type


class MatmulShapeError(ValueError):
    """Weights or activations given to a matrix product have the wrong shape, dtype, size or memory layout."""


# From this many tokens on, method="auto" takes the prompt path: the integer GEMM where the CPU has it, else
# dequantized W bands into numpy's sgemm. Below it the few-token kernels, whose (row, token) results are the
# one-token kernel's bit for bit (continuous batching and prompt caching rely on that). For sgemm the band
# dequantization costs the same whatever the token count (Qwen2.5-0.5B: ~600 ms per forward pass on 2 Zen 4
# cores), the SIMD integer kernels ~18 ms per token: a 16-token prompt took 660 ms by sgemm and 290 ms by the
# integer kernels, a 48-token one about 890 ms either way (2026-12-01, 2 threads; see benchmarks/README.md).
BLAS_MIN_TOKENS = 48
_SGEMM_MIN_WORK = 1 << 21   # M*N*K of every sgemm of the BLAS path (see _blas_product)

# Weight rows dequantized per sgemm call on the BLAS path: a band of float32 small enough to stay in L2/L3
# (256 rows x 4864 values = 5 MB at most for the models we run) but big enough for sgemm to be efficient.
BLAS_BAND_ROWS = 256

# The SIMD instruction set of the one-token kernels (simd.py): the best this CPU has, GGML_BACKEND_KERNELS to force
# one (avx512vnni, avx2) or the plain numba kernels (generic). None: the plain kernels.
try:
    KERNEL_ISA = choose_isa()
    _KERNEL_CHOICE_ERROR = None
except ValueError as error:   # a bad GGML_BACKEND_KERNELS: said by the first product, where callers handle errors
    KERNEL_ISA, _KERNEL_CHOICE_ERROR = None, str(error)


def prompt_path() -> str:
    """What prompt products (``method="auto"`` from BLAS_MIN_TOKENS tokens) run on here, in words."""
    if KERNEL_ISA is not None:
        others = [name for name, kind in KINDS.items() if not prompt_gemm_takes(KERNEL_ISA, kind)]
        rest = f"; {', '.join(others)} on dequantized weights into numpy's sgemm" if others else ""
        return f"the integer GEMM ({KERNEL_ISA.name}{rest})"
    return "dequantized weights into numpy's sgemm (BLAS)"


def _check_kernel_choice() -> None:
    if _KERNEL_CHOICE_ERROR is not None:
        raise ValueError(_KERNEL_CHOICE_ERROR)

# The weight types the products take: every row of the table with product kernels (traits.py fills them).
SUPPORTED_TYPES = tuple(row.name for row in TYPES.values() if row.weights and row.one_token is not None)
# ... and the layouts no file holds, which a loader re-lays file types into (types.MEMORY_ONLY)
_PRODUCT_TYPES = SUPPORTED_TYPES + tuple(MEMORY_ONLY)


# ----------------------------------------------------------------------------------------------------------------
# Validation and dispatch
# ----------------------------------------------------------------------------------------------------------------

def _check_weights(qtype: QuantType, weight_bytes: np.ndarray, k: int) -> None:
    if qtype.name not in _PRODUCT_TYPES:
        raise MatmulShapeError(f"matmul does not support weights of type {qtype.name}")
    if not isinstance(weight_bytes, np.ndarray) or weight_bytes.dtype != np.uint8 or weight_bytes.ndim != 2:
        raise MatmulShapeError("weight bytes must be a 2-D uint8 array [n_rows, row_bytes], got "
                               f"{getattr(weight_bytes, 'dtype', type(weight_bytes))} "
                               f"{getattr(weight_bytes, 'shape', '')}")
    if k % qtype.block_size:
        raise MatmulShapeError(f"k = {k} is not a multiple of the {qtype.name} block size {qtype.block_size}")
    expected = k // qtype.block_size * qtype.type_size
    if weight_bytes.shape[1] != expected:
        raise MatmulShapeError(f"{qtype.name} rows of {k} values take {expected} bytes, "
                               f"but the weight rows hold {weight_bytes.shape[1]}")
    if not weight_bytes.flags.c_contiguous:
        raise MatmulShapeError("weight bytes must be C-contiguous")


def _as_activation_rows(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise MatmulShapeError(f"activations must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise MatmulShapeError(f"activations must be float32, got {x.dtype}")
    if x.ndim not in (1, 2):
        raise MatmulShapeError(f"activations must be [n_tokens, k] or [k], got shape {x.shape}")
    rows = x.reshape(1, -1) if x.ndim == 1 else x
    return np.ascontiguousarray(rows)


def _n_chunks(n_rows: int) -> int:
    # Several equal chunks per thread keep the threads evenly loaded without a scheduler.
    return max(1, min(n_rows, 4 * numba.get_num_threads()))


@dataclass
class QuantizedActivations:
    """Activation rows quantized once to one ``vec_dot_type``, reusable for every weight that shares it."""
    vec_dot_type: str
    rows: np.ndarray                 # float32 [n_tokens, k], as given (the BLAS path and f32 weights use it)
    qs: np.ndarray | None = None     # int8 [n_tokens, k]
    d: np.ndarray | None = None      # float32 [n_tokens, n_blocks]
    extra: np.ndarray | None = None  # q8_1: float32 s [n_tokens, n_blocks]; q8_K: int32 bsums [n_tokens, k/16]
    rounded: np.ndarray | None = None  # f16 / bf16: the rows rounded to that precision (on a cache line)
    pairs: np.ndarray | None = None    # f16 / bf16: float_dot.activation_pairs of the rounded rows
    _gemm: GemmTokens | None = None

    def gemm_tokens(self) -> GemmTokens:
        """These activations laid out for the integer GEMM (built once, shared by the matrices that read them)."""
        if self._gemm is None:
            self._gemm = GemmTokens(self.vec_dot_type, self.qs, self.d, self.extra)
        return self._gemm


def quantize_activations(vec_dot_type: str, x: np.ndarray, for_blas: bool = False) -> QuantizedActivations:
    """Quantize activation rows (float32 [n_tokens, k]) for weights whose ``vec_dot_type`` is given.

    ``for_blas``: the product will take the BLAS path, which multiplies float rows: give it the rows as the
    8-bit quantization leaves them (q * d), so a prompt evaluated in a batch gets the numbers llama.cpp gets, which
    quantizes activations whatever the batch size. Without that, models with large activation outliers (Gemma)
    move by tenths of a logit between batch and one-token evaluation."""
    rows = _as_activation_rows(x)
    if for_blas and vec_dot_type in ("q8_0", "q8_1", "q8_K"):
        quantizer = quantize_activations_q8_K if vec_dot_type == "q8_K" else quantize_activations_q8_1
        qs, d, extra = quantizer(rows)
        n_tokens, k = rows.shape
        block = k // d.shape[1]
        rounded = (qs.reshape(n_tokens, -1, block) * d[:, :, None]).astype(np.float32, copy=False)
        min_correction = None
        if vec_dot_type == "q8_1":
            # ggml multiplies q4_1/q5_1 block minimums by the half-precision s = d*sum(q), not the exact sum
            min_correction = extra - rounded.sum(axis=2, dtype=np.float32)
        return QuantizedActivations(vec_dot_type, rows, extra=min_correction, rounded=rounded.reshape(n_tokens, k))
    if vec_dot_type == "q8_0":
        qs, d = quantize_activations_q8_0(rows)
        return QuantizedActivations(vec_dot_type, rows, qs, d)
    if vec_dot_type == "q8_1":
        qs, d, s = quantize_activations_q8_1(rows)
        return QuantizedActivations(vec_dot_type, rows, qs, d, s)
    if vec_dot_type == "q8_K":
        qs, d, bsums = quantize_activations_q8_K(rows)
        return QuantizedActivations(vec_dot_type, rows, qs, d, bsums)
    if vec_dot_type in ("f16", "bf16"):
        rounded, pairs = float_operands(FLOAT_KINDS[vec_dot_type], rows)
        return QuantizedActivations(vec_dot_type, rows, rounded=rounded, pairs=pairs)
    if vec_dot_type == "f32":
        return QuantizedActivations(vec_dot_type, rows, rounded=rows)
    raise MatmulShapeError(f"unknown vec_dot_type {vec_dot_type!r}")


def gemm_available(qtype: QuantType, k: int) -> bool:
    """Whether prompt products of ``qtype`` weights with rows of k values can take the integer GEMM on this CPU."""
    kind = qtype.one_token.simd_kind
    return _gemm_takes(kind, k, prompt_gemm_takes(KERNEL_ISA, kind))


def _gemm_takes(kind: int | None, k: int, path_has_it: bool) -> bool:
    """Whether an integer GEMM (``path_has_it``: the kernel path has it) takes a block kind (decode.KINDS; None for
    float types) and rows of k values."""
    return path_has_it and kind is not None and k % 64 == 0


def _product_path(qtype: QuantType, method: str, n_tokens: int, k: int) -> str:
    """The way ("int", "gemm", "float" or "blas") a product of ``qtype`` weights with n_tokens rows of k values
    runs ("float": the plain float types on a SIMD CPU, for "auto" and "int")."""
    if method not in ("auto", "int", "gemm", "blas"):
        raise MatmulShapeError(f"method must be 'auto', 'int', 'gemm' or 'blas', got {method!r}")
    if method == "gemm" and not gemm_available(qtype, k):
        raise MatmulShapeError(f"the integer GEMM needs a SIMD path (q8_0: one with VNNI; kernels: "
                               f"{KERNEL_ISA.name if KERNEL_ISA else 'generic'}), a block type and k a multiple "
                               f"of 64 ({qtype.name}, k = {k})")
    if qtype.one_token.sgemm:
        return "float" if method in ("auto", "int") and KERNEL_ISA is not None else "blas"
    if method != "auto":
        return method
    if n_tokens < BLAS_MIN_TOKENS:
        return "int"
    return "gemm" if gemm_available(qtype, k) else "blas"


def _dequantize_band(qtype: QuantType, weight_bytes, first: int, last: int, k: int) -> np.ndarray:
    """Rows [first, last) of W as float32 [last - first, k], bit for bit the type table's ``to_float``: the SIMD
    decoder of ``decode.py`` on a SIMD CPU, else the table's own dequantizer on this thread (the BLAS workers run
    one band each)."""
    kind = qtype.one_token.simd_kind
    if KERNEL_ISA is not None and kind is not None:
        band = np.empty((last - first, k), np.float32)
        row_bytes = weight_bytes.shape[1]
        dequantize_simd(KIND_ARGS[kind], weight_bytes.reshape(-1), first * row_bytes, row_bytes, band, KERNEL_ISA)
        return band
    return qtype.to_float(weight_bytes[first:last].reshape(-1), parallel=False).reshape(last - first, k)


def dequantize_rows(weight_type, weight_bytes: np.ndarray, k: int, first: int = 0, last: int | None = None):
    """Rows [first, last) of a weight matrix as float32 [last - first, k] (the BLAS path's dequantizer)."""
    qtype = get_type(weight_type)
    _check_weights(qtype, weight_bytes, k)
    last = weight_bytes.shape[0] if last is None else last
    if not 0 <= first <= last <= weight_bytes.shape[0]:
        raise MatmulShapeError(f"row range [{first}, {last}) outside 0..{weight_bytes.shape[0]}")
    return np.ascontiguousarray(_dequantize_band(qtype, weight_bytes, first, last, k))


def _check_out(out, n_tokens: int, n_rows: int) -> np.ndarray:
    if out is None:
        return np.empty((n_tokens, n_rows), np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n_tokens, n_rows)
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise MatmulShapeError(f"out must be a writeable C-contiguous float32 array of shape {(n_tokens, n_rows)}")
    return out


def _integer_product(qtype: QuantType, weight_bytes: np.ndarray, acts: QuantizedActivations, out) -> None:
    """The row's integer kernel for this many tokens: the SIMD kernels of ``decode.py`` on the instruction set
    ``KERNEL_ISA`` when the CPU has one, else the generic numba kernel (generic.py)."""
    kernel = qtype.one_token if acts.qs.shape[0] == 1 else qtype.few_tokens
    if _exact_gemm(kernel.simd_kind, acts.qs.shape):
        gemm_product(kernel.simd_kind, weight_bytes.reshape(-1), 0, weight_bytes.shape[0], weight_bytes.shape[1],
                     acts.gemm_tokens(), out, KERNEL_ISA, exact=True)
    elif KERNEL_ISA is not None and kernel.simd_kind is not None:
        _simd_matvec(kernel.simd_kind, weight_bytes.reshape(-1), np.zeros(1, np.int64),
                     np.array([weight_bytes.shape[0]], np.int64), weight_bytes.shape[1], acts, out)
    else:
        kernel.generic(weight_bytes, acts, out, _n_chunks(weight_bytes.shape[0]))


def _exact_gemm(kind: int | None, shape: tuple[int, int]) -> bool:
    """Whether a few-token product (shape: its activations' [n_tokens, k]) takes the exact GEMM, whose results are
    the few-token kernels' bit for bit (gemm.EXACT_FROM_TOKENS: from how many tokens, per kind)."""
    return (kind is not None and shape[0] >= EXACT_FROM_TOKENS.get(KIND_ARGS[kind].code, shape[0] + 1)
            and _gemm_takes(kind, shape[1], isa_has_gemm(KERNEL_ISA)))


def _simd_matvec(kind: int, base: np.ndarray, starts: np.ndarray, row_counts: np.ndarray, row_bytes: int,
                 acts: QuantizedActivations, out: np.ndarray) -> None:
    """decode.matvec on ``KERNEL_ISA``: rows of matrices of one type at byte offsets ``starts`` (int64) of ``base``
    times the activation rows ``acts`` into ``out`` [n_tokens, sum(row_counts)]. Every offset and size was checked
    by the caller (the kernels read without bounds checks)."""
    n_tokens = acts.qs.shape[0]
    x_sums = acts.extra if acts.vec_dot_type == "q8_1" else _no_columns(np.float32, n_tokens)
    x_bsums = acts.extra if acts.vec_dot_type == "q8_K" else _no_columns(np.int32, n_tokens)
    if n_tokens == 1 and out.shape[1] * row_bytes <= HERE_MAX_BYTES:
        matvec_here(KIND_ARGS[kind], base, starts, row_counts, row_bytes, acts.qs[0], acts.d[0], x_sums[0],
                    x_bsums[0], out[0], KERNEL_ISA)
    elif n_tokens == 1:
        matvec(KIND_ARGS[kind], base, starts, row_counts, row_bytes, acts.qs[0], acts.d[0], x_sums[0], x_bsums[0],
               out[0], _n_chunks(out.shape[1]), KERNEL_ISA)
    else:
        matmul_few(KIND_ARGS[kind], base, starts, row_counts, row_bytes, acts.qs, acts.d, x_sums, x_bsums, out,
                   _n_chunks(out.shape[1]), KERNEL_ISA)


# One token times at most this many weight bytes runs on the calling thread (decode.matvec_here): waking the other
# threads costs more than such rows. Qwen2.5-0.5B's q8_0 value projections (128 rows, 122 KB; 12 per decode step)
# took 0.45 instead of 0.74-0.77 ms a step on 2 Zen 3 cores, alternating runs; its q5_0 q/k/v and output
# projections (0.5-0.7 MB) took the same time either way, so they stay parallel.
HERE_MAX_BYTES = 256 << 10

_NO_COLUMNS = {np.float32: np.zeros((1024, 0), np.float32), np.int32: np.zeros((1024, 0), np.int32)}


def _no_columns(dtype, n_rows: int) -> np.ndarray:
    """The unread x_sums / x_bsums of the kinds that take none: one empty row per token (no allocation per call
    for up to 1024 tokens)."""
    empty = _NO_COLUMNS[dtype]
    return empty[:n_rows] if n_rows <= len(empty) else np.zeros((n_rows, 0), dtype)


def _matmul_prepared(qtype: QuantType, weight_bytes: np.ndarray, acts: QuantizedActivations, out, method: str):
    rows = acts.rows
    n_tokens, k = rows.shape
    n_rows = weight_bytes.shape[0]
    _check_weights(qtype, weight_bytes, k)
    if acts.vec_dot_type != qtype.vec_dot_type:
        raise MatmulShapeError(f"{qtype.name} weights need {qtype.vec_dot_type} activations, "
                               f"got {acts.vec_dot_type}")
    out = _check_out(out, n_tokens, n_rows)
    path = _product_path(qtype, method, n_tokens, k)
    if path in ("int", "gemm"):
        if acts.qs is None:  # activations prepared with for_blas=True
            raise MatmulShapeError("integer path needs quantized activations")
        if path == "gemm":
            gemm_product(qtype.one_token.simd_kind, weight_bytes.reshape(-1), 0, n_rows, weight_bytes.shape[1],
                         acts.gemm_tokens(), out, KERNEL_ISA)
        else:
            _integer_product(qtype, weight_bytes, acts, out)
        return out

    if path == "float":
        _float_product(qtype, weight_bytes, acts, out)
        return out
    lhs = acts.rounded if acts.rounded is not None else rows
    # BLAS: float32 (or f16/bf16-rounded) activations times float32 bands of W.
    _blas_product(qtype, weight_bytes, lhs, out, k)
    if acts.vec_dot_type == "q8_1" and acts.qs is None and acts.extra is not None:
        blocks = weight_bytes.reshape(n_rows, -1, qtype.type_size)
        block_mins = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)   # [n_rows, n_blocks]
        out += acts.extra @ block_mins.T
    return out


def _float_product(qtype: QuantType, weight_bytes: np.ndarray, acts: QuantizedActivations, out: np.ndarray) -> None:
    """out = activations @ W.T for f32 / f16 / bf16 weights on ``float_dot.py``'s kernel, on numba's threads."""
    root, start = _byte_root(weight_bytes)
    row_bytes = weight_bytes.shape[1]
    chunks = float_chunks([start], [weight_bytes.shape[0]], row_bytes, numba.get_num_threads())
    _float_launch(qtype.one_token.float_kind, root, chunks, row_bytes, acts, out)   # out: C-contiguous (_check_out)


def _float_launch(kind: int, base: np.ndarray, chunks: np.ndarray, row_bytes: int, acts: QuantizedActivations,
                  out: np.ndarray) -> None:
    """One launch of ``float_product`` over ``chunks`` of ``base``'s rows (storage ``kind``) into ``out``: the
    activations as ``quantize_activations`` rounded and paired them (on cache lines), f32's rows moved onto a
    line where they are off one."""
    if kind == FLOAT_KINDS["f32"]:
        lhs, pairs = _line_aligned(np.ascontiguousarray(acts.rows, np.float32)), _NO_PAIRS
    else:
        lhs, pairs = acts.rounded, acts.pairs
    float_product(kind, base, chunks, row_bytes, lhs, pairs, out, KERNEL_ISA.wide)


_NO_PAIRS = np.zeros(0, np.int32)


def _line_aligned(a: np.ndarray) -> np.ndarray:
    """``a`` (C-contiguous) starting on a 64-byte cache line (a copy where it does not): the float kernels load
    activations 64 bytes at a time, and from an array that numpy's allocator had placed off a line each load
    touched two. One Zen 4 core, f16 896 x 4864 times 256 tokens: 55-68 GFLOP/s with the activations 16-48 bytes
    off a line, 85-93 on one (the same process, the activations moved)."""
    if a.ctypes.data % 64 == 0:
        return a
    aligned = line_aligned_empty(a.shape, a.dtype)
    aligned[...] = a
    return aligned


_blas_pool: ThreadPoolExecutor | None = None
_blas_pool_lock = threading.Lock()
_blas_controller = None


def _blas_workers(n_workers: int) -> ThreadPoolExecutor:
    global _blas_pool
    with _blas_pool_lock:
        if _blas_pool is None or _blas_pool._max_workers < n_workers:
            _blas_pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="ggml_backend-blas")
        return _blas_pool


def single_threaded_blas():
    """A context in which numpy's BLAS runs on the calling thread only (threadpoolctl), or a no-op without it.

    Each of our workers runs its own sgemm on its own band; OpenBLAS's own busy-waiting threads on top of that
    cost 3x the CPU time and 3x the wall time of a prompt on a loaded 2-core machine (benchmarks/README.md).
    The forward pass holds it for its whole duration: any numpy product in it (attention was one, before it became
    a numba kernel) would otherwise wake OpenBLAS's threads, whose spinning halved the speed of the numba kernels
    that followed."""
    global _blas_controller
    try:
        if _blas_controller is None:
            from threadpoolctl import ThreadpoolController
            _blas_controller = ThreadpoolController()
        return _blas_controller.limit(limits=1, user_api="blas")
    except ImportError:
        return contextlib.nullcontext()


def _blas_bands(n_rows: int, k: int, n_workers: int) -> list[tuple[int, int]]:
    """The bands of weight rows [first, last) that ``_blas_product`` dequantizes and multiplies one at a time:
    about BLAS_BAND_ROWS rows (fewer for a small matrix, so that every worker gets one), never below the width
    that keeps each sgemm above OpenBLAS's small-product kernels (see _blas_product), and as many for each
    worker."""
    min_band = -(-_SGEMM_MIN_WORK // (BLAS_MIN_TOKENS * k))
    band_rows = max(1, min(n_rows, max(min_band, min(BLAS_BAND_ROWS, -(-n_rows // n_workers)))))
    n_bands = max(1, n_rows // band_rows)
    if n_bands > n_workers and n_bands % n_workers:
        # 3 bands of Qwen's 896-row ffn_down on 2 workers kept one idle for a third of the product (2 Zen 3
        # cores, 256 tokens: q4_K 90-108 -> 104-120, q6_K 86-100 -> 121-137 GFLOP/s with 4 bands)
        fewer = n_bands // n_workers * n_workers
        more = fewer + n_workers
        n_bands = more if n_rows // more >= min_band else fewer
    bounds = [n_rows * i // n_bands for i in range(n_bands + 1)]
    return list(zip(bounds, bounds[1:]))


def _blas_product(qtype: QuantType, weight_bytes: np.ndarray, lhs: np.ndarray, out: np.ndarray, k: int) -> None:
    """out = lhs @ W.T: bands of W rows, each dequantized to float32 (small enough to stay in cache) and
    multiplied by a single-threaded sgemm, spread over numba's thread count of Python workers (both the
    dequantizer and numpy release the GIL)."""
    n_rows = weight_bytes.shape[0]
    n_tokens = lhs.shape[0]
    n_workers = max(1, numba.get_num_threads())
    # OpenBLAS switches to other kernels (other summation orders) for small products (M*N*K up to about 2**20)
    # and for M = 1..2: each row of the result must come out the same whatever the batch it was part of (prompt
    # caching relies on it), so every sgemm here stays above those sizes: bands at least _SGEMM_MIN_WORK /
    # (BLAS_MIN_TOKENS k) rows wide (_blas_bands), and short batches padded with zero rows.
    bands = _blas_bands(n_rows, k, n_workers)
    min_rows = max(BLAS_MIN_TOKENS, -(-_SGEMM_MIN_WORK // (min(last - first for first, last in bands) * k)))
    if n_tokens < min_rows:
        padded = np.zeros((min_rows, k), np.float32)
        padded[:n_tokens] = lhs
        lhs = padded

    def multiply(band):
        first, last = band
        out[:, first:last] = (lhs @ _dequantize_band(qtype, weight_bytes, first, last, k).T)[:n_tokens]

    with single_threaded_blas():
        if n_workers == 1 or len(bands) == 1:
            for band in bands:
                multiply(band)
        else:
            list(_blas_workers(n_workers).map(multiply, bands))


def matmul(weight_type, weight_bytes: np.ndarray, x: np.ndarray, out: np.ndarray | None = None,
           method: str = "auto") -> np.ndarray:
    """y = x @ W.T for W stored as ``weight_bytes`` [n_rows, row_bytes] of ``weight_type``.

    ``x`` is float32 [n_tokens, k] (or [k], giving a [n_rows] result); the result is float32 [n_tokens, n_rows]
    (written into ``out`` when given). ``method``: "int" (llama.cpp's numerics), "gemm" (the same quantized
    activations, many tokens at a time; AVX512-VNNI), "blas" (dequantize + sgemm) or "auto" (int below
    ``BLAS_MIN_TOKENS`` tokens, then gemm where available, else blas). Raises ``MatmulShapeError`` (a ValueError)
    on bad input."""
    _check_kernel_choice()
    qtype = get_type(weight_type)
    if qtype.name not in _PRODUCT_TYPES:
        raise MatmulShapeError(f"matmul does not support weights of type {qtype.name}")
    rows = _as_activation_rows(x)
    _check_weights(qtype, weight_bytes, rows.shape[1])
    path = _product_path(qtype, method, rows.shape[0], rows.shape[1])
    acts = quantize_activations(qtype.vec_dot_type, rows, for_blas=path == "blas")
    if x.ndim == 1:
        result = _matmul_prepared(qtype, weight_bytes, acts, None if out is None else out.reshape(1, -1), method)
        return result.reshape(-1)
    return _matmul_prepared(qtype, weight_bytes, acts, out, method)


def _byte_root(weight_bytes: np.ndarray) -> tuple[np.ndarray, int]:
    """The 1-D byte array that holds ``weight_bytes`` (usually the model file's memory map) and the offset of its
    first byte there, so that several matrices of one file can be multiplied in one kernel launch. Falls back to
    the matrix itself when its owner is not one contiguous array."""
    owner = weight_bytes
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner.flags.c_contiguous:
        flat = owner.reshape(-1).view(np.uint8)
        offset = weight_bytes.ctypes.data - flat.ctypes.data
        if 0 <= offset and offset + weight_bytes.nbytes <= flat.nbytes:
            return flat, offset
    return weight_bytes.reshape(-1), 0


class WeightMatrix:
    """A weight matrix in a ggml format: ``bytes`` [n_rows, row_bytes] holding ``shape`` = (n_rows, k) values."""

    def __init__(self, weight_type, weight_bytes: np.ndarray, shape: tuple[int, int] | None = None):
        self.type = get_type(weight_type)
        if not isinstance(weight_bytes, np.ndarray) or weight_bytes.dtype != np.uint8:
            raise MatmulShapeError("weight bytes must be a uint8 numpy array")
        if shape is None:
            if weight_bytes.ndim != 2:
                raise MatmulShapeError("give the shape when the weight bytes are not 2-D")
            k = weight_bytes.shape[1] // self.type.type_size * self.type.block_size
            shape = (weight_bytes.shape[0], k)
        n_rows, k = int(shape[0]), int(shape[1])
        if k % self.type.block_size:
            raise MatmulShapeError(f"k = {k} is not a multiple of the {self.type.name} block size")
        row_bytes = k // self.type.block_size * self.type.type_size
        if weight_bytes.size != n_rows * row_bytes:
            raise MatmulShapeError(f"{self.type.name} [{n_rows}, {k}] takes {n_rows * row_bytes} bytes, "
                                   f"got {weight_bytes.size}")
        self.bytes = weight_bytes.reshape(n_rows, row_bytes)
        _check_weights(self.type, self.bytes, k)
        self.shape = (n_rows, k)
        self.root, self.offset = _byte_root(self.bytes)

    def __repr__(self) -> str:
        return f"WeightMatrix({self.type.name}, shape={self.shape})"

    def matmul(self, x: np.ndarray, out: np.ndarray | None = None, method: str = "auto") -> np.ndarray:
        return matmul(self.type, self.bytes, x, out, method)

    def dequantize(self) -> np.ndarray:
        return dequantize_rows(self.type, self.bytes, self.shape[1])


def matmul_many(weights: Sequence[WeightMatrix], x: np.ndarray, method: str = "auto") -> list[np.ndarray]:
    """x @ W.T for several matrices sharing the input (q, k, v or gate, up): the activations are quantized once
    per distinct ``vec_dot_type``. Returns one float32 [n_tokens, n_rows_i] array per matrix."""
    _check_kernel_choice()
    rows = _as_activation_rows(x)
    if not weights:
        return []
    plan = _launch_plan(weights)
    if plan.k != rows.shape[1]:
        for weight in weights:
            if weight.shape[1] != rows.shape[1]:
                raise MatmulShapeError(f"{weight!r} needs rows of {weight.shape[1]} values, got {rows.shape[1]}")
    if KERNEL_ISA is not None and (method == "int" or (method == "auto" and rows.shape[0] < BLAS_MIN_TOKENS)):
        return _matvec_many(plan, rows, x.ndim == 1)
    prepared: dict[tuple[str, bool], QuantizedActivations] = {}
    results = []
    for weight in weights:
        key = (weight.type.vec_dot_type, _product_path(weight.type, method, rows.shape[0], rows.shape[1]) == "blas")
        if key not in prepared:
            prepared[key] = quantize_activations(key[0], rows, for_blas=key[1])
        result = _matmul_prepared(weight.type, weight.bytes, prepared[key], None, method)
        results.append(result.reshape(-1) if x.ndim == 1 else result)
    return results


@dataclass
class _FusedGroup:
    """Matrices of one type in one byte array, multiplied in one launch (see ``_launch_plan``)."""
    simd_kind: int | None       # decode.KINDS code of their type; None for the plain floats (``float_kind``)
    vec_dot_type: str
    members: list[int]          # indexes into the weights of the call
    base: np.ndarray            # the byte array holding them
    starts: np.ndarray          # int64 byte offsets of their first rows in ``base``
    counts: np.ndarray          # int64 rows of each
    row_bytes: int
    float_kind: int | None = None         # f32 / f16 / bf16: float_dot.FLOAT_KINDS code of their storage
    total: int = field(init=False)        # sum(counts): the launch's output columns
    columns: tuple = field(init=False)    # (first, last) output columns of each member
    _chunks: dict = field(init=False, default_factory=dict)   # float_dot's chunk tables by thread count

    def __post_init__(self):
        bounds = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        self.total = bounds[-1]
        self.columns = tuple(zip(bounds[:-1], bounds[1:]))

    def float_chunks(self, n_threads: int) -> np.ndarray:
        table = self._chunks.get(n_threads)
        if table is None:
            table = self._chunks[n_threads] = float_chunks(self.starts, self.counts, self.row_bytes, n_threads)
        return table


@dataclass
class _LaunchPlan:
    """What ``_matvec_many`` does for one list of matrices, worked out once: the fused launches, the matrices
    without SIMD kernels (f32 / f16 / bf16 on a CPU without AVX2: the BLAS path) and the row length they all
    take (None if they differ: matmul_many then names the one that does not fit)."""
    weights: list
    groups: list[_FusedGroup]
    float_members: list[int]
    k: int | None


def _launch_plan(weights: Sequence[WeightMatrix]) -> _LaunchPlan:
    """The fused launches for this list of matrices, worked out once per list and kept on its first matrix (the
    forward pass passes the same lists every token; a decode step makes about a hundred of these calls, so the
    lookup is one dict get and one list comparison, by identity: WeightMatrix has no __eq__): matrices whose
    owners are the same bytes (views of one memory map) and whose type is the same share a launch."""
    plans = weights[0].__dict__.setdefault("_launch_plans", {})
    key = tuple(map(id, weights))
    cached = plans.get(key)
    if cached is not None and cached.weights == list(weights):
        return cached
    groups: dict[tuple, list[int]] = {}
    float_members = []
    for i, weight in enumerate(weights):
        kernel = weight.type.one_token
        if kernel.simd_kind is not None or (kernel.float_kind is not None and KERNEL_ISA is not None):
            groups.setdefault((weight.type.name, weight.root.ctypes.data, weight.root.nbytes), []).append(i)
        else:
            float_members.append(i)
    fused = [_FusedGroup(get_type(name).one_token.simd_kind, get_type(name).vec_dot_type, members,
                         weights[members[0]].root,
                         np.array([weights[i].offset for i in members], np.int64),
                         np.array([weights[i].shape[0] for i in members], np.int64),
                         weights[members[0]].bytes.shape[1], get_type(name).one_token.float_kind)
             for (name, _, _), members in groups.items()]
    lengths = {weight.shape[1] for weight in weights}
    plan = _LaunchPlan(list(weights), fused, float_members, lengths.pop() if len(lengths) == 1 else None)
    plans[key] = plan
    return plan


def _matvec_many(plan: _LaunchPlan, rows: np.ndarray, flat: bool) -> list[np.ndarray]:
    """A few tokens times several matrices on the SIMD kernels: those of one type that live in one byte array
    (q, k, v or gate, up of a model file) are computed in one kernel launch, which halves the launches of a
    decode step. (About a hundred calls per decode step: what can be worked out once is in the plan.)"""
    weights = plan.weights
    prepared: dict[str, QuantizedActivations] = {}
    results: list[np.ndarray | None] = [None] * len(weights)
    for i in plan.float_members:   # f32 / f16 / bf16 without AVX2: the BLAS path
        weight = weights[i]
        vdt = weight.type.vec_dot_type
        if vdt not in prepared:
            prepared[vdt] = quantize_activations(vdt, rows)
        result = _matmul_prepared(weight.type, weight.bytes, prepared[vdt], None, "auto")
        results[i] = result.reshape(-1) if flat else result
    for group in plan.groups:
        acts = prepared.get(group.vec_dot_type)
        if acts is None:
            acts = prepared[group.vec_dot_type] = quantize_activations(group.vec_dot_type, rows)
        out = np.empty((len(rows), group.total), np.float32)
        if group.simd_kind is None:   # f32 / f16 / bf16 (float_dot.py), the activations rounded to their precision
            _float_launch(group.float_kind, group.base, group.float_chunks(numba.get_num_threads()), group.row_bytes,
                          acts, out)
        elif _exact_gemm(group.simd_kind, rows.shape):
            for start, (first, last) in zip(group.starts.tolist(), group.columns):
                gemm_product(group.simd_kind, group.base, start, last - first, group.row_bytes, acts.gemm_tokens(),
                             out, KERNEL_ISA, first, exact=True)
        else:
            _simd_matvec(group.simd_kind, group.base, group.starts, group.counts, group.row_bytes, acts, out)
        for i, (first, last) in zip(group.members, group.columns):
            results[i] = out[0, first:last] if flat else out[:, first:last]
    return results


__all__ = ["matmul", "matmul_many", "WeightMatrix", "MatmulShapeError", "QuantizedActivations",
           "quantize_activations", "dequantize_rows", "SUPPORTED_TYPES", "BLAS_MIN_TOKENS",
           "single_threaded_blas"]
