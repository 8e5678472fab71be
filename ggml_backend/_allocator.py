"""glibc's malloc, told to reuse freed memory of the sizes a decode step allocates.

A decode step allocates its activations afresh: numpy temporaries and kernel outputs of 0.1-1 MB each (a 16-token
step of Qwen2.5-0.5B makes about 300). Once a model is loaded, glibc served each of them from fresh pages, which
the kernel zero-fills on first touch: 5,000-6,000 page faults a step, about 2 us each on the VMs measured, so 5-10%
of a batched step (a 311 KB SiLU output: 77 faults, 200 us instead of 50). With the mmap threshold at 1 MiB and
the trim threshold at 8 MiB (fixed values, which also switch off glibc's own adjustment of them) those
allocations reuse freed heap memory: 340 faults a step, 129-142 against 154-163 ms at 16 sequences (Zen 5, three
alternating runs). Larger arrays (a prompt's activations, a batch's logits) still come and go as their own
mappings, and at most 8 MiB of freed memory stays at the heap's top: peak RSS of the bench's runs +9 MB (4 and 32
MiB cost +14 to +21). Done once, when the first model is loaded; only where the C library is glibc;
``GGML_BACKEND_MALLOC=default`` leaves malloc as it is.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1     # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 8 << 20

_done: bool | None = None


def reuse_freed_memory() -> bool:
    """Set glibc's thresholds (once per process); True when they are set."""
    global _done
    if _done is None:
        _done = _set_thresholds()
    return _done


def _set_thresholds() -> bool:
    if os.environ.get("GGML_BACKEND_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):    # musl and others: no such options
            return False
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
