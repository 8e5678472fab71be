"""``use_mmap=False`` / ``--no-mmap``: the model file read into the process's memory (formats/resident.py) instead
of mapped: the same bytes and the same numbers, read-only, huge-page aligned; a clear error, before allocating,
when the memory cannot hold it, and when the file is shorter than announced."""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

import ggml_backend
from ggml_backend.formats import ModelFileError, resident
from refdata import synthetic_file


def test_a_file_read_into_memory_has_the_mapped_bytes_read_only_and_aligned():
    path = synthetic_file("q4_K_M")
    mapped = ggml_backend.load(path)
    in_memory = ggml_backend.load(path, in_memory=True)
    assert not isinstance(in_memory.mmap, np.memmap)
    assert in_memory.mmap.ctypes.data % resident.HUGE_PAGE == 0
    assert np.array_equal(in_memory.mmap, mapped.mmap)
    assert in_memory.tensors.keys() == mapped.tensors.keys()
    for name, tensor in in_memory.tensors.items():
        assert tensor.data.ctypes.data - in_memory.mmap.ctypes.data == tensor.offset
        assert np.array_equal(tensor.data, mapped.tensors[name].data)
    with pytest.raises(ValueError, match="read-only"):
        in_memory.mmap[0] = 0


def test_not_enough_memory_is_a_clear_error_before_allocating(monkeypatch):
    path = synthetic_file("q4_0")   # in tests/data: the test runs in a fresh clone too
    monkeypatch.setattr(resident, "available_memory", lambda: 100 << 20)
    with pytest.raises(MemoryError, match="needs .* MiB and 512 MiB to spare, 100 MiB are available: map it"):
        ggml_backend.load(path, in_memory=True)
    with pytest.raises(MemoryError, match="use_mmap=False"):
        ggml_backend.Llama(str(path), n_ctx=64, use_mmap=False, verbose=False)
    assert isinstance(ggml_backend.load(path).mmap, np.memmap)      # mapping it asks for no such room


def test_a_file_shorter_than_its_size_is_a_model_file_error(tmp_path):
    path = tmp_path / "short.gguf"
    path.write_bytes(synthetic_file("q4_0").read_bytes()[:4096])
    with pytest.raises(OSError, match="ended after 4096 of its 5000 bytes"):
        resident.read_into_memory(path, 5000)
    path.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelFileError, match="short.gguf"):
        ggml_backend.load(path, in_memory=True)


def test_the_engine_gives_the_same_numbers_from_memory_as_from_the_map():
    path = str(synthetic_file("q4_K_M"))
    tokens = list(range(1, 40))
    mapped = ggml_backend.Llama(path, n_ctx=64, verbose=False, logits_all=True)
    in_memory = ggml_backend.Llama(path, n_ctx=64, verbose=False, logits_all=True, use_mmap=False)
    assert not isinstance(in_memory.model_file.mmap, np.memmap)
    mapped.eval(tokens)
    in_memory.eval(tokens)
    assert np.array_equal(np.asarray(mapped.scores[:len(tokens)]), np.asarray(in_memory.scores[:len(tokens)]))


def test_the_server_and_its_models_file_take_use_mmap(tmp_path):
    from ggml_backend.cli.serve import add_arguments, build_config
    from ggml_backend.server.config import ModelConfig, load_models_file
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - alias: a\n    use_mmap: false\n  - alias: b\n")
    first, second = load_models_file(str(path), ModelConfig(alias="x"))
    assert (first.use_mmap, second.use_mmap) == (False, True)
    path.write_text("models:\n  - alias: a\n    use_mmap: maybe\n")
    with pytest.raises(ValueError, match="use_mmap must be true or false, got 'maybe'"):
        load_models_file(str(path), ModelConfig(alias="x"))
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    model = str(synthetic_file("q4_0"))
    config, _ = build_config(parser.parse_args(["-m", model, "--no-mmap"]))
    assert config.models[0].use_mmap is False
    config, _ = build_config(parser.parse_args(["-m", model]))
    assert config.models[0].use_mmap is True


def _mapping_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping of this process that holds ``address`` (Linux's /proc/self/smaps)."""
    current = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                first, last = (int(part, 16) for part in head.split("-"))
                current = first <= address < last
            elif current and head == "VmFlags:":
                return line.split()[1:]
    return None


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.exists("/proc/self/smaps"),
                    reason="huge-page advice and /proc/self/smaps are Linux's")
def test_a_mapped_file_is_advised_onto_huge_pages():
    # the kernel then reads the file into 2 MiB page-cache folios and maps them whole (formats.advise_huge_pages)
    model = ggml_backend.load(synthetic_file("q4_0"))
    assert isinstance(model.mmap.base, np.memmap)
    assert "hg" in _mapping_flags(model.mmap.ctypes.data)
    in_memory = ggml_backend.load(synthetic_file("q4_0"), in_memory=True)   # resident.py advises its own memory
    assert "hg" in _mapping_flags(in_memory.mmap.ctypes.data)
