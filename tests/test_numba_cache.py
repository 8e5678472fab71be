"""numba's kernel cache is saved by one process at a time (ggml_backend/_numba_cache.py): a save waits for the
lock file in the cache folder, which another process (here: another open file description) may hold."""
from __future__ import annotations

import os
import threading

import pytest
from numba.core import caching

import ggml_backend.quant  # noqa: F401  (installs the lock)
from ggml_backend._numba_cache import LOCK_NAME, serialize_cache_saves

fcntl = pytest.importorskip("fcntl", reason="the cache lock is a POSIX flock; without fcntl (Windows) numba's save "
                                            "is left as it is")


def test_the_lock_is_installed_once():
    assert serialize_cache_saves() is True
    assert getattr(caching.IndexDataCacheFile.save, "_ggml_backend_locked", False)
    assert serialize_cache_saves() is True       # a second call does not wrap it twice
    assert not getattr(caching.IndexDataCacheFile.save.__wrapped__, "_ggml_backend_locked", False)


def test_a_save_waits_while_another_holder_has_the_lock_and_then_lands(tmp_path):
    cache = caching.IndexDataCacheFile(str(tmp_path), "kernel", ("stamp", 1))
    holder = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)              # as another process saving at this moment would
    saved = threading.Event()

    def save():
        cache.save(("signature", "int64"), {"code": b"\x90" * 64})
        saved.set()

    worker = threading.Thread(target=save)
    worker.start()
    try:
        assert not saved.wait(0.5), "the save did not wait for the lock"
        assert not (tmp_path / "kernel.nbi").exists()
    finally:
        os.close(holder)                             # releases the lock
    worker.join(30)
    assert saved.is_set()
    assert cache.load(("signature", "int64")) == {"code": b"\x90" * 64}
