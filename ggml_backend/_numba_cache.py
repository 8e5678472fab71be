"""numba's on-disk kernel cache, written by one process at a time.

Every process that finds a kernel missing from the cache compiles it and saves it: on a fresh install, two Ray
replicas, two server workers or two test workers can save kernels of one function at the same moment. numba's
save is read the index, pick the first free data file number, write the index, write the data file; two processes
that read the index before either wrote it pick the same number for different signatures, and the index of one
can end up beside the data of the other: a later process would load one kernel under another's signature (wrong
numbers, or a crash where their array layouts differ). Saves take an exclusive ``flock`` on a lock file in the
cache folder, so the read, the pick and both writes happen as one step. Loads need no lock: both files are written
under temporary names and renamed, and an index entry whose data file is not there yet makes numba compile again.

Installed once, when ``ggml_backend.quant`` is imported (before any kernel is compiled or loaded); it wraps
numba's save for every cache of the process (a lock around a save is harmless to other users' kernels). Where
``fcntl`` does not exist (Windows) or numba's cache class has another shape, nothing is changed.
"""
from __future__ import annotations

import functools
import os

LOCK_NAME = "ggml_backend-cache.lock"


def serialize_cache_saves() -> bool:
    """Wrap numba's cache save in an exclusive file lock (once per process: the wrapper is marked); True when it is
    in place."""
    try:
        import fcntl
        from numba.core.caching import IndexDataCacheFile
    except ImportError:
        return False
    save = getattr(IndexDataCacheFile, "save", None)
    if save is None:
        return False
    if getattr(save, "_ggml_backend_locked", False):
        return True

    @functools.wraps(save)
    def locked_save(self, key, data):
        try:
            fd = os.open(os.path.join(self._cache_path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except (OSError, AttributeError):   # a read-only folder: numba's own save fails or falls back there
            return save(self, key, data)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return save(self, key, data)
        finally:
            os.close(fd)    # closing releases the lock

    locked_save._ggml_backend_locked = True
    IndexDataCacheFile.save = locked_save
    return True
