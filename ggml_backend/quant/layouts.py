"""Weights re-laid at load: the layouts no file holds (``types.MEMORY_ONLY``) that this CPU's kernels run faster
than their file type, and the one place that decides which weights take them.

q3_K on every SIMD path (AVX2, AVX-VNNI, AVX512-VNNI) runs as ``q3_K_planes`` (blocks.py draws it): a q3_K group's
three bits come from two places (two bits of ``qs``, one of ``hmask``), which takes ~37 vector operations for the
eight groups of a super-block; the planes hold each group's three bits together, 19 operations. One core of an
AVX2-only AMD EPYC Zen 4 (AVX-512 hidden by its VM), 4096 x 4096 from memory, alternating in one process: 10.65 ->
12.75 GB/s (medians; 0.55 -> 0.65 of the 19.5 GB/s that core read then); a 7B-shaped q3_K model decodes 12-20%
faster. With AVX-512 shown (the same Zen 4), the AVX512-VNNI path's 256-bit groups read 14.5-15.8 GB/s from the
planes against 13.1-13.5 for its former 512-bit loop on the file's layout. The values, scales and d are q3_K's,
and so are the results, bit for bit. CPUs without SIMD kernels keep the file's layout.

The loader (``model/forward.py``, ``relaid_tensor``) re-lays each q3_K matrix in place: a mapped file is mapped
copy-on-write (formats/__init__.py), so the pages written become the process's own and the file is never written;
a file read into memory (``formats/resident.py``) is the process's own already. Resident memory stays the file's
size, every weight stays in the one byte array the compiled decode step reads, and the file's tensor entry takes
the layout's type, so any later reader sees a consistent (type, bytes) pair. The GPU takes the file layout back at
upload (``file_layout``); writers read files, not a loaded model's bytes. ``GGML_BACKEND_RELAYOUT=0`` keeps every
weight in its file's layout.
"""
from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np

from .._allocator import SPARE_MIN, available_memory
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
    if relayout is None or KERNEL_ISA is None or not relayout_enabled():
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
    return _RELAYOUTS[get_type(layout).file_type][1](data).reshape(data.shape)


def relaid_tensor(tensors: dict, name: str):
    """Tensor ``name`` of a model file's ``tensors`` (``ModelFile.tensors``) in the layout this CPU's kernels run
    fastest (``run_layout``): re-laid in place, in the file's copy-on-write mapping (formats/__init__.py; the pages
    written become the process's own, the file is untouched) or in its copy in memory, so that every weight stays in
    one byte array (the compiled decode step takes one), and the entry's type replaced by the layout's, so that
    the file's tensors stay a consistent (type, bytes) pair for any later reader (a second model on the same file
    finds it re-laid). Left in its file's layout where its bytes cannot be written (a read-only mapping) or where the
    memory available would not hold the written pages with SPARE_MIN to spare: the file's pages can be paged out
    and read again under memory pressure, written ones cannot. Returns the entry."""
    with _RELAY_LOCK:      # two models built on one file at once must not both re-lay it
        return _relaid_tensor(tensors, name)


_RELAY_LOCK = threading.Lock()


def _relaid_tensor(tensors: dict, name: str):
    tensor = tensors[name]
    target = run_layout(tensor.type)
    if target is tensor.type:
        return tensor
    writable = tensor.data.view()
    try:
        writable.flags.writeable = True
    except ValueError:
        return tensor
    available = available_memory()
    if available is not None and available < 2 * tensor.nbytes + SPARE_MIN:   # the pages written and a copy
        return tensor
    writable[...] = relayout_of(target, tensor.data)   # by a copy: the kernels are not written to work in place
    tensors[name] = tensor = dataclasses.replace(tensor, type=target)
    return tensor


def file_layout(qtype, data: np.ndarray) -> tuple[QuantType, np.ndarray]:
    """(the file type, ``data`` in its layout) for weights of a layout no file holds (a new array); (``qtype``,
    ``data``) unchanged for a file type."""
    row = get_type(qtype)
    if not row.file_type:
        return row, data
    return get_type(row.file_type), _RELAYOUTS[row.file_type][2](data).reshape(data.shape)
