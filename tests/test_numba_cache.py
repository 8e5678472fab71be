"""numba's kernel cache (ggml_backend/_numba_cache.py) is saved by one process at a time: a save waits for the lock
file in the cache folder, which another process (here: another open file description) may hold; and kernels built
from source files that changed since they were cached are dropped, whichever file changed."""
from __future__ import annotations

import os
import threading

import pytest
from numba.core import caching

import ggml_backend.quant  # noqa: F401  (installs the lock)
from ggml_backend._numba_cache import DIGEST_NAME, LOCK_NAME, drop_stale_kernels, serialize_cache_saves

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


def test_cached_kernels_go_when_any_source_they_are_built_from_changes(tmp_path):
    """numba keys a cached kernel on its own file's text only; ours link kernels of other files (decode_step's
    decode_layer is made of quant/decode.py's), so a change to any of them must drop the package's caches."""
    for name in ("quant", "model", "tokenizer"):
        (tmp_path / name / "__pycache__").mkdir(parents=True)
    (tmp_path / "quant" / "decode.py").write_text("# version 1\n")
    (tmp_path / "model" / "decode_step.py").write_text("# version 1\n")
    layer = tmp_path / "model" / "__pycache__" / "decode_step.decode_layer-153.py311.nbi"
    rows = tmp_path / "quant" / "__pycache__" / "decode.matvec-982.py311.1.nbc"
    elsewhere = tmp_path / "tokenizer" / "__pycache__" / "bpe.merge-1.py311.nbi"
    helper_marker = tmp_path / "model" / "__pycache__" / "ahead-0123abcd-decode.done"   # compile_helpers.py's
    for path in (layer, rows, elsewhere, helper_marker):
        path.write_text("compiled")
    assert drop_stale_kernels(tmp_path) is True          # no digest yet: whatever is there may be stale
    assert not layer.exists() and not rows.exists() and elsewhere.exists()
    assert not helper_marker.exists()     # a marker of kernels that are gone would keep their helper from starting
    assert (tmp_path / "quant" / "__pycache__" / DIGEST_NAME).is_file()
    layer.write_text("compiled against version 1")
    assert drop_stale_kernels(tmp_path) is False         # the same sources: the cache stays
    assert layer.exists()
    (tmp_path / "quant" / "decode.py").write_text("# version 2\n")    # only the callee's file changed
    assert drop_stale_kernels(tmp_path) is True
    assert not layer.exists() and elsewhere.exists()
    (tmp_path / "model" / "new_kernels.py").write_text("# a file added\n")
    layer.write_text("compiled against version 2")
    assert drop_stale_kernels(tmp_path) is True and not layer.exists()


def test_a_drop_that_waited_for_another_process_s_drop_keeps_what_that_one_compiled_since(tmp_path):
    """Two processes start on changed sources: the first drops the stale kernels and compiles anew while the second
    waits for the lock; the second must then find the digest current and leave the new kernels alone."""
    trees = []
    for name in ("waiting", "twin"):
        root = tmp_path / name
        for package in ("quant", "model"):
            (root / package / "__pycache__").mkdir(parents=True)
        (root / "quant" / "decode.py").write_text("# version 2\n")
        trees.append(root)
    waiting, twin = trees
    drop_stale_kernels(twin)                         # the digest the other process writes for these sources
    stamp = waiting / "quant" / "__pycache__" / DIGEST_NAME
    holder = os.open(stamp.parent / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)               # the other process, dropping
    result = []
    worker = threading.Thread(target=lambda: result.append(drop_stale_kernels(waiting)))
    worker.start()
    try:
        worker.join(0.5)
        assert worker.is_alive(), "the drop did not wait for the lock"
        fresh = waiting / "model" / "__pycache__" / "decode_step.decode_layer-153.py311.nbi"
        fresh.write_text("compiled against version 2")
        stamp.write_text((twin / "quant" / "__pycache__" / DIGEST_NAME).read_text())
    finally:
        os.close(holder)
    worker.join(30)
    assert result == [False] and fresh.exists()
