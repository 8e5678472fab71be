"""glibc's malloc, told to reuse freed memory of the sizes a decode step allocates.

A decode step allocates its activations afresh: numpy temporaries and kernel outputs of 0.1-1 MB each (a 16-token
step of Qwen2.5-0.5B makes about 300). Once a model is loaded, glibc served each of them from fresh pages, which
the kernel zero-fills on first touch: 5,000-6,000 page faults a step, about 2 us each on the VMs measured, so 5-10%
of a batched step (a 311 KB SiLU output: 77 faults, 200 us instead of 50). With the mmap threshold at 1 MiB and
the trim threshold at 8 MiB (fixed values, which also switch off glibc's own adjustment of them) those
allocations reuse freed heap memory: 340 faults a step, 129-142 against 154-163 ms at 16 sequences (Zen 5, three
alternating runs). Larger arrays (a batch's logits) still come and go as their own mappings, and at most 8 MiB
of freed memory stays at the heap's top: peak RSS of the bench's runs +9 MB (4 and 32 MiB cost +14 to +21). Done
once, when the first model is loaded; only where the C library is glibc; ``GGML_BACKEND_MALLOC=default`` leaves
malloc as it is.

A pass over many tokens (a prompt) runs inside ``large_pass``: its arrays of several MB, allocated afresh in every
layer, reuse the previous layer's memory, which goes back to the system when the pass ends. Qwen2.5-0.5B, 2 Zen 5
cores, three alternating pairs: a 256-token prompt 5,000-9,000 page faults instead of 28,000-39,000 and 538-656
against 612-795 ms, a 1024-token one 16,500 instead of 129,000-143,000 and 2.96-3.27 against 3.32-3.85 s; peak
RSS the same (717 against 718-735 MB).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

M_TRIM_THRESHOLD = -1     # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 8 << 20

# During a pass over many tokens (a prompt): glibc's largest mmap threshold on 64-bit, and no trimming, so that
# each layer's arrays of several MB (a 256-token prompt's gate and up: 5 MB each on Qwen2.5-0.5B) reuse the
# previous layer's memory instead of faulting in fresh pages: 35,000 page faults of a 256-token prompt, 6-8% of
# its time on the Zen 5 VM. The memory goes back (malloc_trim) when the last such pass ends.
LARGE_MMAP_THRESHOLD = 32 << 20
LARGE_TRIM_THRESHOLD = 1 << 30     # (a C int)

_done: bool | None = None
_libc = None
_large_lock = threading.Lock()
_large_passes = 0


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
        global _libc
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):    # musl and others: no such options
            return False
        _libc = libc
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def large_pass():
    """Keep freed memory for reuse while a pass over many tokens runs (``LARGE_MMAP_THRESHOLD``), on threads that
    may overlap: the first to enter raises the thresholds, the last to leave puts them back and returns the free
    memory to the system. Nothing where ``reuse_freed_memory`` set nothing."""
    global _large_passes
    if not _done or _libc is None:
        yield
        return
    with _large_lock:
        _large_passes += 1
        if _large_passes == 1:
            _libc.mallopt(M_MMAP_THRESHOLD, LARGE_MMAP_THRESHOLD)
            _libc.mallopt(M_TRIM_THRESHOLD, LARGE_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _large_lock:
            _large_passes -= 1
            if _large_passes == 0:
                _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                _libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                _libc.malloc_trim(0)


# The least memory a copy the system cannot page out (a model file read into memory, weights re-laid at load) must
# leave available besides itself: the KV cache, activations, other processes.
SPARE_MIN = 512 << 20


def available_memory() -> int | None:
    """Bytes the system can still give this process (MemAvailable plus free swap), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        kib = int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])
        return kib * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
