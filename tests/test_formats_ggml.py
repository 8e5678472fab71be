"""Legacy GGML reader and writer: every synthetic ggjt v3 file against its GGUF twin, plus hand-made files of the
older containers (unversioned ggml, ggmf v1, ggjt v1/v2) to check what each may hold."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import ggml_backend
from ggml_backend.formats import UnsupportedVersionError, write_ggml
from ggml_backend.formats.ggml import gguf_tokens_from_legacy, legacy_token_types
from refdata import synthetic_file, synthetic_types


@pytest.mark.parametrize("type_name", synthetic_types())
def test_ggjt_v3_tensors_equal_gguf_twin(type_name):
    legacy = ggml_backend.load(synthetic_file(type_name, "ggml"))
    twin = ggml_backend.load(synthetic_file(type_name, "gguf"))
    assert (legacy.format, legacy.container, legacy.version, legacy.architecture) == ("ggml", "ggjt", 3, "llama")
    assert sorted(legacy.tensors) == sorted(twin.tensors)
    for name, t in twin.tensors.items():
        mine = legacy.tensors[name]
        assert (mine.type, mine.shape, mine.nbytes) == (t.type, t.shape, t.nbytes), name
        assert np.array_equal(mine.data, t.data), name
        assert mine.offset % 32 == 0 and mine.offset + mine.nbytes <= legacy.file_size
    assert legacy.tensors["token_embd.weight"].source_name == "tok_embeddings.weight"
    assert legacy.tensors["blk.3.ffn_gate.weight"].source_name == "layers.3.feed_forward.w1.weight"
    assert legacy.tensors["blk.3.ffn_down.weight"].source_name == "layers.3.feed_forward.w2.weight"
    assert legacy.tensors["blk.3.ffn_up.weight"].source_name == "layers.3.feed_forward.w3.weight"
    assert legacy.tensors["output_norm.weight"].source_name == "norm.weight"
    for key in ["llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.feed_forward_length", "llama.rope.dimension_count",
                "llama.context_length", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id"]:
        assert legacy.metadata[key] == twin.metadata[key], key
    assert np.array_equal(legacy.metadata["tokenizer.ggml.scores"], twin.metadata["tokenizer.ggml.scores"])
    assert np.array_equal(legacy.metadata["tokenizer.ggml.token_type"], twin.metadata["tokenizer.ggml.token_type"])
    # GGML stores no epsilon: the converter's default, not the twin's 1e-5.
    assert legacy.metadata["llama.attention.layer_norm_rms_epsilon"] == 5e-6
    assert legacy.hparams == {"n_vocab": 4096, "n_embd": 256, "n_mult": 256, "n_head": 8, "n_layer": 4,
                              "n_rot": 32, "ftype": legacy.metadata["general.file_type"]}


def test_legacy_vocab_is_exposed_as_stored():
    model = ggml_backend.load(synthetic_file("q4_0", "ggml"))
    vocab = model.vocab
    assert vocab.style == "ggml-legacy" and len(vocab) == 4096
    assert vocab.token_bytes[:4] == [b" \xe2\x81\x87 ", b"", b"", b"\x00"]  # convert.py's unk, empty controls
    assert vocab.token_bytes[3 + 0x41] == b"A" and vocab.token_bytes[3 + 0xE2] == b"\xe2"
    assert vocab.tokens[3 + 0xE2] == "\udce2"  # undecodable byte kept as a surrogate
    assert vocab.tokens[3 + 0xE2].encode("utf-8", "surrogateescape") == b"\xe2"
    assert vocab.token_bytes[259] == b"  "  # plain spaces, not U+2581
    assert model.metadata["tokenizer.ggml.tokens"][259] == "\u2581\u2581"
    assert model.metadata["tokenizer.ggml.tokens"][3 + 0xE2] == "<0xE2>"
    assert vocab.scores.dtype == np.float32 and vocab.token_types.dtype == np.int32
    twin = ggml_backend.load(synthetic_file("q4_0", "gguf"))
    assert np.array_equal(vocab.scores, twin.vocab.scores)


def test_ggjt_v3_rewrite_is_byte_identical(tmp_path):
    source = synthetic_file("q4_K_M", "ggml")
    model = ggml_backend.load(source)
    out = tmp_path / "copy.bin"
    write_ggml(out, model.hparams, list(zip(model.vocab.token_bytes, model.vocab.scores)),
               [(t.name, t.type, t.shape, t.data) for t in model.tensors.values()])
    assert out.read_bytes() == source.read_bytes()


def _tiny_llama_tensors(n_embd=64, n_head=4, n_head_kv=4, n_ff=96, n_layer=1, types=None, seed=0):
    """Random tensors of a tiny LLaMA in GGML names: (name, type name, numpy shape, bytes)."""
    types = types or {}
    rng = np.random.default_rng(seed)
    kv = n_embd // n_head * n_head_kv
    shapes = {"tok_embeddings.weight": (32, n_embd), "norm.weight": (n_embd,), "output.weight": (32, n_embd)}
    for i in range(n_layer):
        shapes.update({f"layers.{i}.attention.wq.weight": (n_embd, n_embd),
                       f"layers.{i}.attention.wk.weight": (kv, n_embd),
                       f"layers.{i}.attention.wv.weight": (kv, n_embd),
                       f"layers.{i}.attention.wo.weight": (n_embd, n_embd),
                       f"layers.{i}.feed_forward.w1.weight": (n_ff, n_embd),
                       f"layers.{i}.feed_forward.w2.weight": (n_embd, n_ff),
                       f"layers.{i}.feed_forward.w3.weight": (n_ff, n_embd),
                       f"layers.{i}.attention_norm.weight": (n_embd,),
                       f"layers.{i}.ffn_norm.weight": (n_embd,)})
    from ggml_backend.quant.types import get_type
    out = []
    for name, shape in shapes.items():
        row = get_type(types.get(name, "f32" if len(shape) == 1 else "f16"))
        nbytes = int(np.prod(shape)) // row.block_size * row.type_size
        out.append((name, row.name, shape, rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()))
    return out


def _write_legacy(path, magic: bytes, version, hparams, vocab, tensors, *, scores=True, padded=True):
    """A file in an old container, written by hand (our writer only writes ggjt v3)."""
    from ggml_backend.quant.types import get_type
    with open(path, "wb") as f:
        f.write(magic + (b"" if version is None else struct.pack("<I", version)))
        f.write(struct.pack("<7I", *(hparams[k] for k in ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer",
                                                           "n_rot", "ftype"))))
        for piece, score in vocab:
            f.write(struct.pack("<I", len(piece)) + piece + (struct.pack("<f", score) if scores else b""))
        for name, type_name, shape, data in tensors:
            dims = tuple(reversed(shape))
            f.write(struct.pack(f"<3I{len(dims)}I", len(dims), len(name), get_type(type_name).type_id, *dims))
            f.write(name.encode())
            if padded:
                f.write(b"\0" * (-f.tell() % 32))
            f.write(data)


HPARAMS = {"n_vocab": 4, "n_embd": 64, "n_mult": 32, "n_head": 4, "n_layer": 1, "n_rot": 16, "ftype": 1}
VOCAB = [(b" \xe2\x81\x87 ", 0.0), (b"", 0.0), (b"", 0.0), (b" hello", -1.5)]


@pytest.mark.parametrize("magic,version,scores,padded", [
    (b"lmgg", None, False, False), (b"fmgg", 1, True, False), (b"tjgg", 1, True, True), (b"tjgg", 2, True, True)])
def test_old_containers_with_f16_load(tmp_path, magic, version, scores, padded):
    path = tmp_path / "old.bin"
    tensors = _tiny_llama_tensors()
    _write_legacy(path, magic, version, HPARAMS, VOCAB, tensors, scores=scores, padded=padded)
    model = ggml_backend.load(path)
    assert model.container == {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}[magic]
    assert model.version == (version or 1)
    assert model.vocab.token_bytes == [p for p, _ in VOCAB]
    assert model.vocab.scores.tolist() == ([0, 0, 0, -1.5] if scores else [0, 0, 0, 0])
    assert model.metadata["tokenizer.ggml.tokens"] == ["<unk>", "<s>", "</s>", "\u2581hello"]
    assert model.metadata["llama.feed_forward_length"] == 96
    for name, _, shape, data in tensors:
        t = model.tensors[ggml_backend.formats.gguf_name_from_ggml(name)]
        assert t.shape == shape and t.data.tobytes() == data


@pytest.mark.parametrize("magic,version,type_name,readable", [
    (b"tjgg", 2, "q5_0", True), (b"tjgg", 2, "q5_1", True),
    (b"tjgg", 2, "q4_0", False), (b"tjgg", 2, "q4_1", False), (b"tjgg", 2, "q8_0", False),
    (b"tjgg", 1, "q8_0", False), (b"tjgg", 1, "q5_0", False), (b"fmgg", 1, "q4_0", False),
    (b"lmgg", None, "q4_1", False)])
def test_quantized_layouts_of_old_versions(tmp_path, magic, version, type_name, readable):
    path = tmp_path / "old.bin"
    tensors = _tiny_llama_tensors(types={"layers.0.attention.wq.weight": type_name})
    _write_legacy(path, magic, version, HPARAMS, VOCAB, tensors, scores=magic != b"lmgg", padded=magic == b"tjgg")
    if readable:
        model = ggml_backend.load(path)
        assert model.tensors["blk.0.attn_q.weight"].type.name == type_name
        assert model.tensors["blk.0.attn_q.weight"].data.tobytes() == tensors[3][3]
    else:
        with pytest.raises(UnsupportedVersionError, match=rf"{type_name} in a .*(v{version}|unversioned).*"
                                                          r"re-convert the original weights .* download a GGUF"):
            ggml_backend.load(path)


def test_n_head_kv_inferred_from_wk_and_overridable(tmp_path):
    path = tmp_path / "gqa.bin"
    tensors = _tiny_llama_tensors(n_embd=64, n_head=8, n_head_kv=2)
    hparams = dict(HPARAMS, n_head=8, n_rot=8)
    write_ggml(path, hparams, VOCAB, [(n, t, s, d) for n, t, s, d in tensors])
    model = ggml_backend.load(path)
    assert model.metadata["llama.attention.head_count_kv"] == 2
    assert model.tensors["blk.0.attn_k.weight"].shape == (16, 64)
    assert ggml_backend.load(path, n_head_kv=4).metadata["llama.attention.head_count_kv"] == 4
    with pytest.raises(ValueError, match="divisor"):
        ggml_backend.load(path, n_head_kv=3)


def test_token_conventions_follow_llama_cpp_converter():
    pieces = [b" \xe2\x81\x87 ", b"", b"", b"\x00", b"\xff", b"", b" a b", b"c", b"\xe2\x96"]
    assert gguf_tokens_from_legacy(pieces) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>", "", "\u2581a\u2581b",
                                               "<0x63>", "\udce2\udc96"]
    assert legacy_token_types(pieces).tolist() == [2, 3, 3, 6, 6, 3, 1, 6, 1]
