"""GGUF reader and writer against gguf-py (the oracle) on the synthetic files, and on the real Qwen and Gemma
files against a table taken from one gguf-py read (gguf-py needs 10-13 s per real file; we need about 0.1 s)."""
from __future__ import annotations

import hashlib
import json
import struct
import time

import numpy as np
import pytest

import ggml_backend
from ggml_backend.formats import (CorruptFileError, GGUFValueType, UnsupportedVersionError,
                                  write_gguf)
from refdata import real_model, synthetic_file, synthetic_gguf_files, synthetic_types

gguf = pytest.importorskip("gguf", reason="gguf (gguf-py, a dev dependency) writes the reference files these tests compare with")


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def _assert_same_as_gguf_py(path):
    ours = ggml_backend.load(path)
    theirs = gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        expected = field.contents()
        got = _plain(ours.metadata[key])
        if isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-7), key
        else:
            assert got == expected, key
        assert int(ours.metadata_types[key]) == int(field.types[-1]), key
    assert ours.tensor_data_offset == theirs.data_offset
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.type.type_id == int(t.tensor_type)
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert (mine.offset, mine.nbytes) == (t.data_offset, t.n_bytes)
        assert mine.data.dtype == np.uint8 and not mine.data.flags.writeable
        assert np.array_equal(mine.data, np.asarray(t.data).reshape(-1).view(np.uint8))
    return ours


@pytest.mark.parametrize("type_name", synthetic_types())
def test_synthetic_gguf_matches_gguf_py(type_name):
    model = _assert_same_as_gguf_py(synthetic_file(type_name))
    assert (model.format, model.version, model.container, model.architecture) == ("gguf", 3, "gguf", "llama")
    assert model.alignment == 32 and model.file_size == synthetic_file(type_name).stat().st_size
    assert model.metadata["llama.embedding_length"] == 256 and model.metadata["llama.block_count"] == 4
    assert model.tensors["blk.0.ffn_gate.weight"].shape == (768, 256)
    assert model.tensors["token_embd.weight"].shape == (4096, 256)
    vocab = model.vocab
    assert len(vocab) == 4096 and vocab.tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert vocab.scores.dtype == np.float32 and vocab.token_types.dtype == np.int32
    assert vocab.token_types[:4].tolist() == [2, 3, 3, 6]
    assert (vocab.bos_token_id, vocab.eos_token_id, vocab.unknown_token_id) == (1, 2, 0)


def _root_buffer(array):
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


def test_tensor_views_share_one_memmap():
    model = ggml_backend.load(synthetic_file("q4_K_M"))
    roots = {id(_root_buffer(t.data)) for t in model.tensors.values()}
    assert roots == {id(_root_buffer(model.mmap))}
    assert isinstance(model.mmap, np.memmap)
    for t in model.tensors.values():
        assert t.data.nbytes == t.nbytes
        assert t.data.ctypes.data - model.mmap.ctypes.data == t.offset


@pytest.mark.parametrize("path", synthetic_gguf_files(), ids=lambda p: p.name)
def test_dequantize_uses_engine_kernels_and_matches_gguf_py(path):
    model = ggml_backend.load(path)
    for name in ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"]:
        t = model.tensors[name]
        expected = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(t.type.type_id))
        got = t.dequantize()
        assert got.dtype == np.float32 and got.shape == t.shape
        np.testing.assert_array_equal(got, expected.reshape(t.shape).astype(np.float32))


def test_rewrite_with_metadata_types_is_byte_identical(tmp_path):
    source = synthetic_file("q4_K_M")
    model = ggml_backend.load(source)
    out = tmp_path / "copy.gguf"
    write_gguf(out, model.metadata, [(t.name, t.type, t.shape, t.data) for t in model.tensors.values()],
               value_types=model.metadata_types)
    assert out.read_bytes() == source.read_bytes()


ALL_TYPES_METADATA = {
    "general.architecture": "llama",
    "t.u8": (7, GGUFValueType.UINT8), "t.i8": (-7, GGUFValueType.INT8),
    "t.u16": (65535, GGUFValueType.UINT16), "t.i16": (-300, GGUFValueType.INT16),
    "t.u32": (2 ** 32 - 1, GGUFValueType.UINT32), "t.i32": (-2 ** 31, GGUFValueType.INT32),
    "t.f32": (0.5, GGUFValueType.FLOAT32), "t.bool": (True, GGUFValueType.BOOL),
    "t.str": ("héllo ▁ wörld", GGUFValueType.STRING),
    "t.u64": (2 ** 64 - 1, GGUFValueType.UINT64), "t.i64": (-2 ** 63, GGUFValueType.INT64),
    "t.f64": (1.25e-300, GGUFValueType.FLOAT64),
    "t.arr_i16": (np.array([-1, 2, -3], np.int16), GGUFValueType.INT16),
    "t.arr_str": (["a", "", "ünï"], GGUFValueType.STRING),
    "t.arr_bool": ([True, False, True], GGUFValueType.BOOL),
    "t.nested": ([[1, 2], [3], []], GGUFValueType.ARRAY),
    "t.nested_str": ([["x", "y"], ["z"]], GGUFValueType.ARRAY),
}


def _write_all_types(path, version=3, alignment=32):
    metadata = {k: (v[0] if isinstance(v, tuple) else v) for k, v in ALL_TYPES_METADATA.items()}
    types = {k: v[1] for k, v in ALL_TYPES_METADATA.items() if isinstance(v, tuple)}
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    q8 = rng.integers(0, 256, 2 * 34, dtype=np.uint8)
    # Data given three ways: an array, a callable, and an iterator of chunks.
    tensors = [("a.weight", "f32", (3, 64), f32.view(np.uint8).reshape(-1)),
               ("b.weight", "q8_0", (2, 32), lambda: q8.tobytes()),
               ("c.weight", "f16", (5,), iter([b"\x00\x3c" * 2, b"\x00\xc0" * 3]))]
    write_gguf(path, metadata, tensors, alignment=alignment, value_types=types, version=version)
    return f32, q8


@pytest.mark.parametrize("version", [2, 3])
def test_every_value_type_round_trips_and_gguf_py_agrees(tmp_path, version):
    path = tmp_path / "all.gguf"
    f32, q8 = _write_all_types(path, version=version)
    model = ggml_backend.load(path)
    assert model.version == version
    for key, spec in ALL_TYPES_METADATA.items():
        value, vtype = spec if isinstance(spec, tuple) else (spec, GGUFValueType.STRING)
        assert model.metadata_types[key] == vtype, key
        got = model.metadata[key]
        if key == "t.nested":
            assert [a.tolist() for a in got] == value
        else:
            assert _plain(got) == _plain(value), key
    assert model.metadata["t.arr_i16"].dtype == np.int16
    assert np.array_equal(model.tensors["a.weight"].data.view(np.float32).reshape(3, 64), f32)
    assert np.array_equal(model.tensors["b.weight"].data, q8)
    assert model.tensors["c.weight"].dequantize().tolist() == [1, 1, -2, -2, -2]
    reader = gguf.GGUFReader(path)
    assert reader.fields["t.str"].contents() == "héllo ▁ wörld"
    assert reader.fields["t.u64"].contents() == 2 ** 64 - 1
    # gguf-py flattens nested arrays (its own FIXME) but sees the nesting in the types.
    assert reader.fields["t.nested_str"].contents() == ["x", "y", "z"]
    assert [int(t) for t in reader.fields["t.nested_str"].types] == [9, 9, 8]
    assert [t.name for t in reader.tensors] == ["a.weight", "b.weight", "c.weight"]


def test_custom_alignment(tmp_path):
    path = tmp_path / "aligned.gguf"
    _write_all_types(path, alignment=256)
    model = ggml_backend.load(path)
    assert model.alignment == 256 and model.metadata["general.alignment"] == 256
    assert all(t.offset % 256 == 0 for t in model.tensors.values())
    reader = gguf.GGUFReader(path)
    assert [t.data_offset for t in reader.tensors] == [t.offset for t in model.tensors.values()]


def test_gguf_v1_is_refused_clearly(tmp_path):
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<III", 1, 0, 0))
    with pytest.raises(UnsupportedVersionError, match=r"v1.gguf: GGUF version 1 .*re-convert.* at offset 4"):
        ggml_backend.load(path)


def test_writer_refuses_wrong_data_length(tmp_path):
    with pytest.raises(ValueError, match="got 100 bytes of data, its type and shape need 128"):
        write_gguf(tmp_path / "bad.gguf", {}, [("x", "f32", (32,), b"\0" * 100)])
    assert not (tmp_path / "bad.gguf").exists()


def test_bad_alignment_value_is_refused(tmp_path):
    path = tmp_path / "a.gguf"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 17) + b"general.alignment" + \
        struct.pack("<II", GGUFValueType.UINT32, 48)
    path.write_bytes(data)
    with pytest.raises(CorruptFileError, match="power of two"):
        ggml_backend.load(path)


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# Taken from one read of each file with gguf-py 0.19 (GGUFReader): tensor table rows are
# [name, type id, numpy shape, absolute data offset, bytes].
REAL_EXPECTED = {
    "qwen": dict(
        n_tensors=291, data_offset=5947776,
        tensor_table_sha256="8982098b3852320d7ddf159ac72b0c4bbba33ade417465b6abc602433fbc8447",
        tokens_sha256="81002a23808a2d445cc91b711d2a852075881550370f583c97b1dde56fbfd1c1",
        merges_sha256="4158f15f046118138c7f37536b12a369b424e739307473ed350ac2995e2c249c",
        first_rows=[["output.weight", 8, [151936, 896], 5947776, 144643072],
                    ["token_embd.weight", 6, [151936, 896], 150590848, 93592576],
                    ["blk.0.attn_norm.weight", 0, [896], 244183424, 3584]],
        last_row=["output_norm.weight", 0, [896], 491396480, 3584],
        tokens_head=["!", '"', "#"], tokens_tail=["[PAD151934]", "[PAD151935]"], merges_head=["Ġ Ġ", "ĠĠ ĠĠ"],
        arrays={"tokenizer.ggml.tokens": 151936, "tokenizer.ggml.token_type": 151936,
                "tokenizer.ggml.merges": 151387},
        scalars={"general.architecture": "qwen2", "general.type": "model",
                 "general.name": "Qwen2.5 Coder 0.5B Instruct AWQ", "general.finetune": "Instruct-AWQ",
                 "general.basename": "Qwen2.5-Coder", "general.size_label": "0.5B", "qwen2.block_count": 24,
                 "qwen2.context_length": 32768, "qwen2.embedding_length": 896,
                 "qwen2.feed_forward_length": 4864, "qwen2.attention.head_count": 14,
                 "qwen2.attention.head_count_kv": 2, "qwen2.rope.freq_base": 1000000.0,
                 "qwen2.attention.layer_norm_rms_epsilon": 9.999999974752427e-07, "general.file_type": 15,
                 "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                 "tokenizer.ggml.eos_token_id": 151645, "tokenizer.ggml.padding_token_id": 151643,
                 "tokenizer.ggml.bos_token_id": 151643, "tokenizer.ggml.add_bos_token": False,
                 "general.quantization_version": 2},
        chat_template_sha256="cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"),
    "gemma": dict(
        n_tensors=236, data_offset=6525120,
        tensor_table_sha256="e0ff75770683022cd03ba0562e9ffffe62a66df458c1c26c9dbb5ff0117bf3c2",
        tokens_sha256="ae721e107249f709c4542cb8867e02c0ebd4552268d36bb66ded71589a5c3a59",
        merges_sha256="4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945",
        first_rows=[["output_norm.weight", 0, [640], 6525120, 2560],
                    ["token_embd.weight", 8, [262144, 640], 6527680, 178257920],
                    ["blk.0.attn_k.weight", 6, [256, 640], 184785600, 112640]],
        last_row=["blk.17.post_ffw_norm.weight", 0, [640], 253110464, 2560],
        tokens_head=["<pad>", "<eos>", "<bos>"], tokens_tail=["<unused6240>", "<unused6241>"], merges_head=[],
        arrays={"general.tags": 4, "tokenizer.ggml.tokens": 262144, "tokenizer.ggml.scores": 262144,
                "tokenizer.ggml.token_type": 262144},
        scalars={"general.architecture": "gemma3", "general.type": "model", "general.name": "Gemma 3 270m",
                 "general.basename": "gemma-3", "general.size_label": "270M", "general.license": "gemma",
                 "gemma3.context_length": 32768, "gemma3.embedding_length": 640, "gemma3.block_count": 18,
                 "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
                 "gemma3.attention.layer_norm_rms_epsilon": 9.999999974752427e-07,
                 "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
                 "gemma3.rope.freq_base": 1000000.0, "gemma3.attention.sliding_window": 512,
                 "gemma3.attention.head_count_kv": 1, "tokenizer.ggml.model": "llama",
                 "tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": 2,
                 "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
                 "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
                 "tokenizer.ggml.add_sep_token": False, "tokenizer.ggml.add_eos_token": False,
                 "tokenizer.ggml.add_space_prefix": False, "general.quantization_version": 2,
                 "general.file_type": 15},
        chat_template_sha256=None),
}


@pytest.mark.parametrize("which", ["qwen", "gemma"])
def test_real_model_matches_gguf_py_table(which):
    path = real_model(which)
    start = time.perf_counter()
    model = ggml_backend.load(path)
    seconds = time.perf_counter() - start
    print(f"\n{which}: opened {path.name} in {seconds * 1000:.0f} ms")
    assert seconds < 2.0  # about 0.12 s on the 2-core build machine; gguf-py takes 10-13 s
    exp = REAL_EXPECTED[which]
    rows = [[t.name, t.type.type_id, list(t.shape), t.offset, t.nbytes] for t in model.tensors.values()]
    assert len(rows) == exp["n_tensors"] and model.tensor_data_offset == exp["data_offset"]
    assert rows[:3] == exp["first_rows"] and rows[-1] == exp["last_row"]
    assert _digest(rows) == exp["tensor_table_sha256"]
    tokens = model.metadata["tokenizer.ggml.tokens"]
    merges = model.metadata.get("tokenizer.ggml.merges", [])
    assert tokens[:3] == exp["tokens_head"] and tokens[-2:] == exp["tokens_tail"]
    assert merges[:2] == exp["merges_head"]
    assert _digest(tokens) == exp["tokens_sha256"] and _digest(merges) == exp["merges_sha256"]
    for key, value in exp["scalars"].items():
        assert model.metadata[key] == (pytest.approx(value, rel=1e-7) if isinstance(value, float) else value), key
    arrays = {k: len(v) for k, v in model.metadata.items() if isinstance(v, (list, np.ndarray))}
    assert arrays == exp["arrays"]
    template = model.metadata.get("tokenizer.chat_template")
    if exp["chat_template_sha256"] is None:
        assert template is None
    else:
        assert hashlib.sha256(template.encode()).hexdigest() == exp["chat_template_sha256"]
    assert model.vocab.tokens is tokens and len(model.vocab.merges) == len(merges)
    # A tensor view holds the file's bytes at its offset.
    last = list(model.tensors.values())[-1]
    with open(path, "rb") as f:
        f.seek(last.offset)
        assert f.read(last.nbytes) == last.data.tobytes()


def _big_string_arrays():
    rng = np.random.default_rng(7)
    pieces = ["a", "Ġthe", "ünï", "▁wörld", "你好", "🙂", "", " ", "\n", "<0xE4>", "x" * 300]
    plain = [pieces[i] + str(j) * int(rng.integers(0, 2)) for j, i in enumerate(rng.integers(0, len(pieces), 6000))]
    invalid = list(plain)
    invalid[4321] = b"ok\xff\xfe".decode("utf-8", "surrogateescape")          # bytes that are not UTF-8
    straddling = list(plain)
    # "你" is E4 BD A0: its lead byte ends one string and its continuation bytes start the next, so the two
    # joined decode as one character, but each alone is two strings of surrogate escapes
    straddling[100] = b"\xe4".decode("utf-8", "surrogateescape")
    straddling[101] = b"\xbd\xa0".decode("utf-8", "surrogateescape")
    return {"plain": (plain, True), "invalid": (invalid, False), "straddling": (straddling, False)}


@pytest.mark.parametrize("case", ["plain", "invalid", "straddling"])
def test_big_string_arrays_read_as_the_loop_reads_them(tmp_path, monkeypatch, case):
    """A vocabulary-sized string array is walked by the compiled reader and decoded in one piece; it must give
    exactly the per-string loop's strings, and leave to the loop what only per-string decoding gets right."""
    from ggml_backend.formats import gguf as gguf_module
    strings, compiled = _big_string_arrays()[case]
    path = tmp_path / "strings.gguf"
    write_gguf(path, {"t.before": "x", "t.big": strings, "t.after": 7}, [])
    outcomes = []
    read_compiled = gguf_module._read_string_array_compiled

    def spy(cursor, count):
        texts = read_compiled(cursor, count)
        outcomes.append(texts is not None)
        return texts
    monkeypatch.setattr(gguf_module, "_read_string_array_compiled", spy)
    fast = ggml_backend.load(path)
    assert outcomes == [compiled]
    monkeypatch.setattr(gguf_module, "_COMPILED_WALK_MIN", 10 ** 9)
    loop = ggml_backend.load(path)
    assert fast.metadata["t.big"] == loop.metadata["t.big"] == strings
    assert fast.metadata["t.after"] == loop.metadata["t.after"] == 7


def test_a_truncated_big_string_array_is_reported_as_by_the_loop(tmp_path, monkeypatch):
    from ggml_backend.formats import TruncatedFileError
    from ggml_backend.formats import gguf as gguf_module
    strings, _ = _big_string_arrays()["plain"]
    path = tmp_path / "strings.gguf"
    write_gguf(path, {"t.big": strings}, [])
    data = path.read_bytes()
    messages = []
    for cut in (len(data) // 2, len(data) // 2 + 3):    # inside a string, and (likely) inside a length
        path.write_bytes(data[:cut])
        for walk_min in (gguf_module._COMPILED_WALK_MIN, 10 ** 9):
            monkeypatch.setattr(gguf_module, "_COMPILED_WALK_MIN", walk_min)
            with pytest.raises((CorruptFileError, TruncatedFileError)) as error:
                ggml_backend.load(path)
            messages.append(str(error.value))
    assert messages[0] == messages[1] and messages[2] == messages[3]
    assert "'t.big'[" in messages[0] and "'t.big'[" in messages[2]
