"""A model file's bytes in the process's own memory, on huge pages where Linux offers them, instead of mapped
(``Llama(use_mmap=False)``, ``--no-mmap``: llama.cpp's switch for reading the file into memory).

Decode streams every weight once per token. From a file mapping the weights sit on 4 KiB pages of the page cache,
so the kernels take a TLB miss every 4 KiB; inside a VM each miss walks two page tables. Read into anonymous
memory advised ``MADV_HUGEPAGE``, the same bytes sit on 2 MiB pages (512 times fewer misses). Measured on a 2-core
AMD EPYC Zen 3 VM (AVX2), Qwen2.5-Coder-0.5B q4_K_M, five alternating pairs of runs of 150 decode steps: 32.5-41.0
(median 34.6) against 36.8-39.5 (median 37.5) ms a token; the 7B-shaped q4_0 file (3.8 GB), four alternating
pairs: 3.20, 4.21, 4.74, 4.62 against 4.31, 3.71, 3.96, 3.59 tokens/s (llama.cpp 4.38-4.74 in the same window).

It costs no more resident memory than the mapping, whose pages are all resident after the first token: the file
is read with ``readinto`` (its pages stay in the page cache, which the kernel may drop), never mapped. What it
does cost: the load reads the file and the kernel must find and zero huge pages, which on that VM took 1.2-4.3 s
more than mapping for the 491 MB file and 17-33 s for the 3.8 GB one (the same read into 4 KiB pages: 3.2 s;
the hypervisor backs each fresh huge page slowly); and processes that load one file no longer share its pages.
Hence not the default.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from .._allocator import SPARE_MIN, available_memory

HUGE_PAGE = 2 << 20
# What must stay available besides the file: a tenth of it, and at least 512 MiB (KV cache, activations, other
# processes): a mapped file's pages can be evicted and read again under pressure, a copy's cannot.
SPARE_FRACTION = 0.1
READ_CHUNK = 64 << 20


def read_into_memory(path: Path, size: int) -> np.ndarray:
    """The first ``size`` bytes of the file at ``path`` as a read-only uint8 array in anonymous memory whose start
    is 2 MiB aligned and advised ``MADV_HUGEPAGE`` (where the platform has them; plain memory elsewhere).
    MemoryError, before anything is allocated, unless the memory available (MemAvailable and free swap) holds it with the spare above (Linux
    lets a process allocate more than there is and kills it when it touches the pages); OSError if the file is
    shorter than ``size`` or cannot be read."""
    available = available_memory()
    spare = max(SPARE_MIN, int(SPARE_FRACTION * size))
    if available is not None and available < size + spare:
        raise MemoryError(f"{path}: reading the model file into memory (use_mmap=False, --no-mmap) needs "
                          f"{size / 2**20:.0f} MiB and {spare / 2**20:.0f} MiB to spare, {available / 2**20:.0f} "
                          "MiB are available: map it instead (the default)")
    if not hasattr(mmap, "MAP_PRIVATE"):      # Windows: no anonymous private mappings, no huge pages to ask for
        data = np.empty(size, np.uint8)
    else:
        try:
            region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as exc:
            raise MemoryError(f"{path}: cannot allocate {size} bytes to read the model file into: {exc}") from None
        if hasattr(mmap, "MADV_HUGEPAGE"):
            region.madvise(mmap.MADV_HUGEPAGE)
        whole = np.frombuffer(region, np.uint8)
        skip = -whole.ctypes.data % HUGE_PAGE
        data = whole[skip:skip + size]
    with open(path, "rb") as file:
        view = memoryview(data)
        done = 0
        while done < size:
            n = file.readinto(view[done:done + READ_CHUNK])
            if not n:
                raise OSError(f"{path}: the file ended after {done} of its {size} bytes while being read")
            done += n
    data.flags.writeable = False
    return data
