"""The embedded default model: assembled from its PyPI chunk packages, verified, written atomically."""
from __future__ import annotations

import hashlib

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
