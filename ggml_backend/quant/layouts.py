"""Weights re-laid at load: the layouts no file holds (``types.MEMORY_ONLY``) that this CPU's kernels run faster
than their file type, and the one place that decides which weights take them.

q3_K on the 256-bit SIMD paths (AVX2, AVX-VNNI) runs as ``q3_K_planes`` (blocks.py draws it): a q3_K group's three
bits come from two places (two bits of ``qs``, one of ``hmask``), which takes ~37 vector operations for the eight
groups of a super-block; the planes hold each group's three bits together, 19 operations. One core of an AVX2-only
AMD EPYC Zen 4 (AVX-512 hidden by its VM), 4096 x 4096 from memory, alternating in one process: 11.5 -> 14.0 GB/s
at best (0.57 -> 0.69 of the 20.3 GB/s that core reads). The values, scales and d are q3_K's, and so are the
results, bit for bit. The AVX512-VNNI path keeps the file's layout (its ``_dots_wide`` takes both halves'
two-bit quants by one shift; the planes share no bytes between halves), as do CPUs without SIMD kernels.

The loader (``model/forward.py``) re-lays a matrix of a memory-mapped file into a new array and gives the file's
pages of it back to the kernel (``MADV_DONTNEED``: a later read faults them in from the file again), so resident
memory stays the file's size; a file read into memory (``formats/resident.py``) keeps its layout (its pages are
anonymous: given back they would read as zeros). Writers and the GPU take the file layout back
(``file_layout``). ``GGML_BACKEND_RELAYOUT=0`` keeps every weight in its file's layout.
"""
from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from .blocks import in_bands, read_only
from .decode import planes_of_q3_K, q3_K_of_planes
from .kquants import quantize_q3_K
from .types import MEMORY_ONLY, QuantType, get_type

ENV = "GGML_BACKEND_RELAYOUT"


def _relaid_blocks(kernel, data: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    data = np.ascontiguousarray(data).reshape(-1)
    if data.dtype != np.uint8 or data.size % 110:
        raise ValueError(f"q3_K super-blocks are 110 bytes each: got {data.size} {data.dtype} values")
    if out is None:
        out = np.empty(data.size, np.uint8)
    elif out.dtype != np.uint8 or out.size != data.size or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 array of {data.size} bytes")
    in_bands(kernel, data.size // 110, _BAND_BLOCKS, read_only(data), out.reshape(-1))
    return out


_BAND_BLOCKS = 4096     # super-blocks (450 KB) per thread-pool task


def q3_K_to_planes(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """q3_K super-blocks (uint8, whole blocks) re-laid as q3_K_planes (the same values, scales and d), flat."""
    return _relaid_blocks(planes_of_q3_K, data, out)


def q3_K_from_planes(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """q3_K_planes super-blocks back in q3_K's file layout (``q3_K_to_planes``' inverse, byte for byte), flat."""
    return _relaid_blocks(q3_K_of_planes, data, out)


def quantize_q3_K_planes(values: np.ndarray) -> np.ndarray:
    """``quantize_q3_K``'s blocks in the planes layout (the type table's from_float of q3_K_planes)."""
    return q3_K_to_planes(quantize_q3_K(values))

# file type -> (its layout in memory, file bytes -> that layout, that layout -> file bytes)
_RELAYOUTS = {"q3_K": (MEMORY_ONLY["q3_K_planes"], q3_K_to_planes, q3_K_from_planes)}


def relayout_enabled() -> bool:
    """Whether ``GGML_BACKEND_RELAYOUT`` allows re-laying (unset or 1; 0 keeps the file layouts)."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def run_layout(file_type) -> QuantType:
    """The row the engine multiplies weights of ``file_type`` in on this CPU: a layout of ``types.MEMORY_ONLY``
    where this CPU's kernel path runs it faster, else the file type itself."""
    from .matmul import KERNEL_ISA
    row = get_type(file_type)
    relayout = _RELAYOUTS.get(row.name)
    if relayout is None or KERNEL_ISA is None or KERNEL_ISA.wide or not relayout_enabled():
        return row
    return relayout[0]


def relaid(file_type, data: np.ndarray) -> tuple[QuantType, np.ndarray]:
    """(``run_layout(file_type)``, ``data`` (whole blocks of ``file_type``, any shape) in it): ``data`` itself where
    the layout is the file's, else a new array of the same shape."""
    row = get_type(file_type)
    target = run_layout(row)
    return (row, data) if target is row else (target, relayout_of(target, data))


def relayout_of(layout, data: np.ndarray) -> np.ndarray:
    """``data``, whole blocks of ``layout``'s file type (any shape), in the layout no file holds ``layout``, as a new
    array of the same shape (on any CPU: the tests and the bench use it too)."""
    out = np.empty(data.shape, np.uint8)
    _RELAYOUTS[get_type(layout).file_type][1](data, out.reshape(-1))
    return out


def loaded_matrix(file_type, data: np.ndarray, mapping: np.ndarray) -> tuple[QuantType, np.ndarray]:
    """``relaid`` for a weight matrix of a model file, ``data`` a view of ``mapping`` (the file's bytes): re-laid
    only where ``mapping`` maps the file, whose pages of ``data`` are then given back (``give_back_pages``), so
    that resident memory stays the file's size; a file read into memory keeps its layout."""
    if not isinstance(mapping, np.memmap) or _madvise is None:
        return get_type(file_type), data
    row, out = relaid(file_type, data)
    if out is not data:
        give_back_pages(mapping, data)
    return row, out


def file_layout(qtype, data: np.ndarray) -> tuple[QuantType, np.ndarray]:
    """(the file type, ``data`` in its layout) for weights of a layout no file holds; (``qtype``, ``data``)
    unchanged for a file type."""
    row = get_type(qtype)
    if not row.file_type:
        return row, data
    out = np.empty(data.shape, np.uint8)
    _RELAYOUTS[row.file_type][2](data, out.reshape(-1))
    return get_type(row.file_type), out


def give_back_pages(mapping: np.ndarray, view: np.ndarray) -> int:
    """Give the whole pages of ``view`` (a view of ``mapping``) back to the kernel where ``mapping`` maps a file
    (``np.memmap``): a later read faults them in from the file again. Returns the bytes given back (0 for any
    other array, whose pages would read as zeros, or where the system has no ``madvise``)."""
    if not isinstance(mapping, np.memmap) or _madvise is None:
        return 0
    page = mmap.PAGESIZE
    first = -(-view.ctypes.data // page) * page
    last = (view.ctypes.data + view.nbytes) // page * page
    if last <= first or _madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED):
        return 0
    return last - first


def _libc_madvise():
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


_madvise = _libc_madvise()
