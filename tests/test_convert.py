"""``ggml-backend convert``: every synthetic GGML v3 file becomes a GGUF whose tensors equal its GGUF twin's byte
for byte and whose vocabulary matches the twin's (tokens, scores, token types)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import ggml_backend
from ggml_backend.cli.main import main
from ggml_backend.formats import UnsupportedVersionError, write_ggml
from refdata import synthetic_file, synthetic_types

# Keys the twin has that a GGML file cannot supply (llama.cpp defaults them the same way when absent), and keys
# the converter adds that llama.cpp's quantizer did not write into the twin.
NOT_IN_GGML = {"llama.rope.freq_base", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
               "general.quantization_version"}
ADDED_BY_CONVERTER = {"general.description", "tokenizer.ggml.pre"}


@pytest.mark.parametrize("type_name", synthetic_types())
def test_convert_matches_gguf_twin(tmp_path, type_name, capsys):
    out = tmp_path / f"{type_name}.gguf"
    assert main(["convert", str(synthetic_file(type_name, "ggml")), str(out), "--eps", "1e-5"]) == 0
    converted = ggml_backend.load(out)
    twin = ggml_backend.load(synthetic_file(type_name, "gguf"))
    assert list(converted.tensors) == list(twin.tensors)  # the synthetic files keep one order
    for name, t in twin.tensors.items():
        mine = converted.tensors[name]
        assert (mine.type, mine.shape) == (t.type, t.shape), name
        assert np.array_equal(mine.data, t.data), name
    assert converted.metadata["tokenizer.ggml.tokens"] == twin.metadata["tokenizer.ggml.tokens"]
    assert np.array_equal(converted.vocab.scores, twin.vocab.scores)
    assert np.array_equal(converted.vocab.token_types, twin.vocab.token_types)
    assert set(twin.metadata) - set(converted.metadata) == NOT_IN_GGML
    assert set(converted.metadata) - set(twin.metadata) == ADDED_BY_CONVERTER
    for key in set(twin.metadata) & set(converted.metadata) - {"general.name"}:
        expected, got = twin.metadata[key], converted.metadata[key]
        if isinstance(expected, np.ndarray):
            assert np.array_equal(got, expected), key
        else:
            assert got == expected, key
        assert converted.metadata_types[key] == twin.metadata_types[key], key
    assert converted.metadata["general.description"].startswith("converted from legacy GGJTv3 MOSTLY_")


def test_converted_file_reads_in_gguf_py(tmp_path):
    gguf = pytest.importorskip("gguf", reason="gguf (gguf-py, a dev dependency) writes the reference files these tests compare with")
    out = tmp_path / "q4_K_M.gguf"
    assert main(["convert", str(synthetic_file("q4_K_M", "ggml")), str(out), "--context-length", "4096",
                 "--name", "tiny"]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.name"].contents() == "tiny"
    assert reader.fields["llama.context_length"].contents() == 4096
    assert reader.fields["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(5e-6)
    assert reader.fields["tokenizer.ggml.tokens"].contents()[259] == "\u2581\u2581"
    assert len(reader.tensors) == 39


def test_convert_gqa_option_and_refusals(tmp_path, capsys):
    source = synthetic_file("q4_0", "ggml")
    out = tmp_path / "gqa.gguf"
    assert main(["convert", str(source), str(out), "--gqa", "2"]) == 0
    assert ggml_backend.load(out).metadata["llama.attention.head_count_kv"] == 4
    assert main(["convert", str(source), str(out)]) == 1  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(source), str(tmp_path / "x.gguf"), "--gqa", "3"]) == 1
    assert "--gqa 3 does not divide n_head 8" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"hello world, not a model")
    assert main(["convert", str(bad), str(tmp_path / "y.gguf")]) == 1
    assert "not a GGUF or GGML model file" in capsys.readouterr().err


def test_convert_refuses_old_quantized_layout(tmp_path, capsys):
    import struct
    path = tmp_path / "v2.bin"
    write_ggml(path, {"n_embd": 32, "n_mult": 32, "n_head": 1, "n_layer": 0, "n_rot": 32, "ftype": 2},
               [(b"a", 0.0)], [("tok_embeddings.weight", "f32", (1, 32), b"\0" * 128)])
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 2)
    # change the tensor to q4_0 in the v2 file (v2's q4_0 blocks differ from today's, so it must be refused)
    path.write_bytes(bytes(raw).replace(struct.pack("<3I", 2, 21, 0), struct.pack("<3I", 2, 21, 2)))
    assert main(["convert", str(path), str(tmp_path / "out.gguf")]) == 1
    assert "is q4_0 in a ggjt v2 file" in capsys.readouterr().err
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(UnsupportedVersionError, match="re-convert the original weights"):
        ggml_backend.load(path)


def test_llama_cpp_loads_the_converted_file(tmp_path):
    """llama.cpp itself (through llama-cpp-python, a benchmark baseline, not a dependency) accepts our output and
    gives the same logits as on the reference GGUF twin. Run in a subprocess: a native crash must not take the
    test session down."""
    import importlib.util
    import json
    import subprocess
    import sys
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(reason="llama-cpp-python is not installed (pip install llama-cpp-python builds it from source)")
    out = tmp_path / "q4_0.gguf"
    assert main(["convert", str(synthetic_file("q4_0", "ggml")), str(out), "--eps", "1e-5"]) == 0
    script = (
        "import json, sys, numpy as np, llama_cpp\n"
        "res = []\n"
        "for path in sys.argv[1:]:\n"
        "    llm = llama_cpp.Llama(path, n_ctx=64, verbose=False)\n"
        "    llm.eval([1, 450, 996, 1735])\n"
        "    res.append(np.asarray(llm.scores[llm.n_tokens - 1]).tolist())\n"
        "print(json.dumps(res))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(synthetic_file("q4_0", "gguf"))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    converted, twin = (np.array(r) for r in json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_array_equal(converted, twin)


# ---- convert never loses data ---------------------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_convert_refuses_to_write_over_its_input_even_with_force(tmp_path, capsys, link):
    source = tmp_path / "model.ggmlv3.bin"
    source.write_bytes(synthetic_file("q4_0", "ggml").read_bytes())
    before = source.read_bytes()
    out = tmp_path / "model.gguf"
    if link == "hard":
        os.link(source, out)
    else:
        out.symlink_to(source)
    assert main(["convert", str(source), str(out), "--force"]) == 1
    assert "is the input file itself" in _one_error_line(capsys)
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ggmlv3.bin", "model.gguf"]


def test_convert_never_replaces_what_is_not_a_regular_file(tmp_path, capsys):
    source = str(synthetic_file("q4_0", "ggml"))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    targets = [(fifo, "is a FIFO, not a regular file"), (folder, "is a directory, not a regular file")]
    if os.path.exists("/dev/full"):
        targets.append((Path("/dev/full"), "is a character device, not a regular file"))
    for target, message in targets:
        kind = os.stat(target).st_mode
        assert main(["convert", source, str(target), "--force"]) == 1
        assert message in _one_error_line(capsys)
        assert os.stat(target).st_mode == kind          # still there, still what it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pipe"]   # no temporary file left


def test_a_failed_write_keeps_the_old_output_and_removes_only_its_temporary_file(tmp_path, capsys, monkeypatch):
    import errno
    from ggml_backend.formats import gguf
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the previous conversion")
    real_write = gguf.write_tensor_data
    calls = []

    def full_disk(out_file, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(out_file, name, *args, **kwargs)
    monkeypatch.setattr(gguf, "write_tensor_data", full_disk)
    assert main(["convert", str(synthetic_file("q4_0", "ggml")), str(out), "--force"]) == 1
    assert "No space left on device" in _one_error_line(capsys)
    assert out.read_bytes() == b"the previous conversion"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    monkeypatch.setattr(gguf, "write_tensor_data", real_write)
    out.chmod(0o640)
    assert main(["convert", str(synthetic_file("q4_0", "ggml")), str(out), "--force"]) == 0
    assert ggml_backend.load(out).format == "gguf" and [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    assert out.stat().st_mode & 0o777 == 0o640          # an overwritten file keeps its permissions


@pytest.mark.parametrize("option, message", [
    (["--context-length", "-5"], "--context-length must be an integer from 1 to 4294967295, got -5"),
    (["--context-length", str(2 ** 32)], "--context-length must be an integer from 1"),
    (["--eps", "nan"], "--eps must be a finite number between 0 and 1"),
    (["--eps=-1e-5"], "--eps must be a finite number"),
    (["--gqa", "0"], "--gqa must be a positive integer"),
])
def test_convert_option_ranges(tmp_path, capsys, option, message):
    out = tmp_path / "out.gguf"
    assert main(["convert", str(synthetic_file("q4_0", "ggml")), str(out)] + option) == 1
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_unexpected_errors_are_one_line_unless_verbose(tmp_path, capsys, monkeypatch):
    from ggml_backend.cli import convert as convert_module

    def broken(*args, **kwargs):
        raise KeyError("blk.0.attn_q.weight")
    monkeypatch.setattr(convert_module, "convert", broken)
    argv = ["convert", str(synthetic_file("q4_0", "ggml")), str(tmp_path / "x.gguf")]
    assert main(argv) == 1
    assert "error: KeyError: 'blk.0.attn_q.weight' (an internal error; --verbose shows where)" in \
        _one_error_line(capsys)
    assert main(argv + ["--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err
