"""The embedded default model: assembled from its PyPI chunk packages, verified, written atomically."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from ggml_backend import default_model
from refdata import real_model


def test_default_model_is_the_verified_qwen_file():
    path = real_model("qwen")
    assert path.stat().st_size == default_model.DEFAULT_MODEL_SIZE
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == default_model.DEFAULT_MODEL_SHA256


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(200)), bytes(300), b"tail" * 50]
    paths = []
    for i, data in enumerate(parts, start=1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        paths.append(p)
    whole = b"".join(parts)
    cache = tmp_path / "cache"
    monkeypatch.setenv("GGML_BACKEND_CACHE", str(cache))
    monkeypatch.setattr(default_model, "_chunk_paths", lambda: paths)
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_SIZE", len(whole))
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_SHA256", hashlib.sha256(whole).hexdigest())
    return paths, whole, cache


def test_assembly_concatenates_in_order_and_is_reused(fake_chunks):
    paths, whole, cache = fake_chunks
    target = default_model.default_model_path(progress=False)
    assert target.parent == cache and target.read_bytes() == whole
    paths[0].unlink()                       # a second call uses the assembled file, not the chunks
    assert default_model.default_model_path(progress=False) == target


def test_a_bad_checksum_leaves_no_file(fake_chunks, monkeypatch):
    paths, whole, cache = fake_chunks
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        default_model.default_model_path(progress=False)
    assert list(cache.iterdir()) == []       # neither the target nor a temporary file


def test_an_interrupted_assembly_leaves_no_half_file(fake_chunks, monkeypatch):
    paths, whole, cache = fake_chunks
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path) == str(paths[2]):
            raise KeyboardInterrupt          # the user pressed Ctrl-C while the last chunk was being copied
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(KeyboardInterrupt):
        default_model.default_model_path(progress=False)
    monkeypatch.setattr("builtins.open", real_open)
    assert list(cache.iterdir()) == []
    assert default_model.default_model_path(progress=False).read_bytes() == whole


def test_missing_chunk_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("GGML_BACKEND_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_CHUNK_PACKAGES", ["no_such_package_part1"])
    with pytest.raises(FileNotFoundError, match="pip install"):
        default_model.default_model_path(progress=False)


# ---- the stamp on use, rebuilding, stale temporary files ------------------------------------------------------------

@pytest.fixture
def bigger_chunks(tmp_path, monkeypatch):
    """Three chunks of 48 KiB of seeded random bytes: big enough for a 4 KiB overwrite to be 'some weights'."""
    import random
    rng = random.Random(7)
    parts = [b"GGUF" + rng.randbytes(48 * 1024 - 4), rng.randbytes(48 * 1024), rng.randbytes(48 * 1024)]
    paths = []
    for i, data in enumerate(parts, start=1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        paths.append(p)
    whole = b"".join(parts)
    cache = tmp_path / "cache"
    monkeypatch.setenv("GGML_BACKEND_CACHE", str(cache))
    monkeypatch.setattr(default_model, "_chunk_paths", lambda: paths)
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_SIZE", len(whole))
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_SHA256", hashlib.sha256(whole).hexdigest())
    return whole, cache


def _overwrite(path, offset, data, keep_mtime=False):
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("damage", ["weights", "weights, mtime put back", "header", "truncated"])
def test_a_damaged_cached_model_is_assembled_again(bigger_chunks, damage):
    whole, cache = bigger_chunks
    target = default_model.default_model_path(progress=False)
    assert (cache / (target.name + ".stamp")).is_file()
    if damage.startswith("weights"):
        _overwrite(target, 70_000, b"\xff" * 4096, keep_mtime="mtime" in damage)
    elif damage == "header":
        _overwrite(target, 0, b"JUNK" * 16)
    else:
        with open(target, "r+b") as f:
            f.truncate(len(whole) - 4096)
    assert target.read_bytes() != whole
    assert default_model.default_model_path(progress=False) == target
    assert target.read_bytes() == whole
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, target.name + ".stamp"])


def test_an_intact_file_with_a_stale_stamp_is_rehashed_not_rebuilt(bigger_chunks, monkeypatch):
    whole, cache = bigger_chunks
    target = default_model.default_model_path(progress=False)
    os.utime(target, ns=(0, 10 ** 18))                # touched: the stamp no longer matches
    (cache / (target.name + ".stamp")).unlink()       # and a file assembled before stamps existed has none
    monkeypatch.setattr(default_model, "_chunk_paths", lambda: pytest.fail("rebuilt an intact file"))
    assert default_model.default_model_path(progress=False).read_bytes() == whole
    assert (cache / (target.name + ".stamp")).is_file()
    assert default_model.default_model_path(progress=False) == target   # the new stamp holds


def test_stale_temporary_files_are_cleaned_but_a_running_assembly_is_not(bigger_chunks):
    import subprocess
    import sys
    whole, cache = bigger_chunks
    cache.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = cache / ".assembling-999999999-k3j4h5"          # its process is gone
        old = cache / ".assembling-q8w7e6"                      # an older version's name, untouched for an hour
        running = cache / f".assembling-{sleeper.pid}-a1b2c3"   # a live process, writing now
        fresh_unnamed = cache / ".assembling-z9y8x7"
        for p in (dead, old, running, fresh_unnamed):
            p.write_bytes(b"\0" * 1000)
        os.utime(old, (time.time() - 3600, time.time() - 3600))
        target = default_model.default_model_path(progress=False)
        assert target.read_bytes() == whole
        assert not dead.exists() and not old.exists()
        assert running.exists() and fresh_unnamed.exists()
        os.utime(running, (time.time() - 3600, time.time() - 3600))   # a hung assembly, long silent
        default_model.default_model_path(progress=False)
        assert not running.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_cache_path_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("GGML_BACKEND_CACHE", str(not_a_dir))
    with pytest.raises(NotADirectoryError, match=f"GGML_BACKEND_CACHE={not_a_dir} is not a directory"):
        default_model.default_model_path(progress=False)
    assert not_a_dir.read_text() == "x"
