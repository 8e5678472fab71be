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

Stale kernels: numba keys a cached kernel on the text of the file that defines it, but our kernels are built of
kernels from other files (``decode_layer`` in model/decode_step.py links quant/decode.py's row kernels, which
inline simd.py's intrinsics; gemm.py's are made of decode.py's). After an edit or a ``git pull`` that changed only
decode.py, ``decode_layer`` would load from the cache as it was: the old kernels (wrong numbers, or a crash where an
array layout changed). ``drop_stale_kernels`` keeps a digest of every source file the kernels come from beside the
cache and drops the package's cached kernels when it changes.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

LOCK_NAME = "ggml_backend-cache.lock"
#: the package folders whose modules define cached kernels that call each other's (their __pycache__ folders hold
#: numba's cache files, and every .py file in them counts towards the digest)
KERNEL_PACKAGES = ("quant", "model")
DIGEST_NAME = "ggml_backend-kernel-sources.digest"


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


def kernel_sources(package_dir: Path | None = None) -> list[Path]:
    """The source files the package's cached kernels are built from (every .py file of ``KERNEL_PACKAGES``)."""
    package_dir = package_dir or Path(__file__).resolve().parent
    return [source for name in KERNEL_PACKAGES for source in sorted((package_dir / name).glob("*.py"))]


def kernel_sources_digest(package_dir: Path | None = None, stamps: bool = False) -> str:
    """A digest of the kernels' source files: of their text, or with ``stamps`` of their modification times and
    sizes (what numba's own cache index compares, so a file touched without an edit counts too). OSError when a
    file cannot be read."""
    digest = hashlib.sha256()
    for source in kernel_sources(package_dir):
        digest.update(f"{source.parent.name}/{source.name}\0".encode())
        if stamps:
            status = source.stat()
            digest.update(f"{status.st_mtime_ns} {status.st_size}\0".encode())
        else:
            digest.update(source.read_bytes())
    return digest.hexdigest()


def drop_stale_kernels(package_dir: Path | None = None) -> bool:
    """Drop numba's cached kernels of ``KERNEL_PACKAGES`` when any of their source files differs from those the
    cache was built from (a digest of them beside the cache, in the first package's __pycache__); True when
    something was dropped. Under the saves' lock, so that no process saves a kernel halfway through a drop."""
    package_dir = package_dir or Path(__file__).resolve().parent
    folders = [package_dir / name for name in KERNEL_PACKAGES]
    try:
        digest = kernel_sources_digest(package_dir)
        stamp = folders[0] / "__pycache__" / DIGEST_NAME

        def current() -> bool:
            return stamp.is_file() and stamp.read_text() == digest

        if current():
            return False
        stamp.parent.mkdir(exist_ok=True)
        fd = os.open(stamp.parent / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:   # a read-only install: numba then caches elsewhere (NUMBA_CACHE_DIR), keyed as it keys them
        return False
    try:
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:
            pass
        if current():   # another process dropped them while this one waited: what it has saved since is current
            return False
        for folder in folders:
            for pattern in ("*.nbi", "*.nbc", "ahead-*"):   # ahead-*: compile_helpers.py's markers and locks
                for cached in (folder / "__pycache__").glob(pattern):
                    cached.unlink(missing_ok=True)
        stamp.write_text(digest)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def prepare_kernel_cache() -> None:
    """Once per process, before any kernel is compiled or loaded: stale kernels dropped, saves serialized."""
    drop_stale_kernels()
    serialize_cache_saves()
