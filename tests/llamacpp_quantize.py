"""llama.cpp's own quantizer, called through ctypes: the ground truth for ggml_backend.quant.quantize.

llama-cpp-python ships ggml's base library (``llama_cpp/lib/libggml-base.so``), which exports

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);

With ``imatrix`` NULL this is what ``llama_model_quantize`` runs for a tensor without an importance matrix:
``quantize_q4_K(..., NULL)`` and its siblings call ``quantize_row_*_ref``. ``available()`` says whether the
library is here (tests skip with its reason otherwise); nothing in the package imports this module.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ggml_backend import quant


# Types ggml_quantize_chunk does not take (they only ever quantize activations), called as quantize_row_*_ref.
ROW_REF_TYPES = ("q8_1", "q8_K")


@lru_cache(maxsize=None)
def _library():
    """(the loaded libggml-base, None) or (None, why it is not available)."""
    try:
        import llama_cpp
    except ImportError as error:
        return None, f"llama_cpp is not installed ({error})"
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) if lib_dir.is_dir() else []
    if not candidates:
        return None, f"no libggml-base library in {lib_dir}"
    lib = ctypes.CDLL(os.fspath(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    for name in ROW_REF_TYPES:
        function = getattr(lib, f"quantize_row_{name}_ref")
        function.restype = None
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_version.restype = ctypes.c_char_p
    lib.ggml_commit.restype = ctypes.c_char_p
    return lib, ""


def available() -> tuple[bool, str]:
    lib, why = _library()
    return lib is not None, why


def version() -> str:
    lib, why = _library()
    if lib is None:
        raise RuntimeError(why)
    return f"ggml {lib.ggml_version().decode()} (commit {lib.ggml_commit().decode()})"


def ggml_quantize(name: str, values) -> np.ndarray:
    """llama.cpp's bytes for float32 ``values`` of shape [..., n_per_row] (imatrix NULL), as flat uint8.
    q8_1 and q8_K go through their quantize_row_*_ref (the output starts zeroed: q8_K's ref leaves the bsums of
    an all-zero block unwritten, and ours writes their true value, zero)."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(why)
    qtype = quant.get_type(name)
    x = np.ascontiguousarray(values, dtype=np.float32)
    n_per_row = x.shape[-1]
    nrows = x.size // n_per_row if n_per_row else 0
    if qtype.name in ROW_REF_TYPES:
        out = np.zeros(qtype.row_bytes(n_per_row) * nrows, np.uint8)
        getattr(lib, f"quantize_row_{qtype.name}_ref")(x.ctypes.data, out.ctypes.data, x.size)
        return out
    if lib.ggml_quantize_requires_imatrix(qtype.type_id):
        raise ValueError(f"{qtype.name} needs an importance matrix in llama.cpp")
    lib.ggml_quantize_init(qtype.type_id)
    out = np.zeros(qtype.row_bytes(n_per_row) * nrows, np.uint8)
    written = lib.ggml_quantize_chunk(qtype.type_id, x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)
    if written != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.size}")
    return out
