"""Tokenizers against llama.cpp's own token ids (shared/reference), SentencePiece as a second oracle for the SPM
vocabulary, and ctransformers' GGML-era tokenization for the ggjt files. Vocabularies come from the model files."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

import ggml_backend
from ggml_backend.tokenizer import Tokenizer, TokenizerError
from refdata import REAL_DIR, real_model, require_synthetic, synthetic_file, synthetic_types

REAL_REFERENCE_DIR = REAL_DIR


def model_metadata(path) -> dict:
    """GGUF metadata of a model file (the one place to change if the loader's interface changes)."""
    return ggml_backend.load(path).metadata


def real_reference(name: str) -> dict:
    path = REAL_REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(reason=f"{path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_metadata(model_metadata(synthetic_file("q4_0")))  # one vocabulary in every type


@pytest.fixture(scope="module")
def qwen():
    return Tokenizer.from_metadata(model_metadata(real_model("qwen")))


@pytest.fixture(scope="module")
def gemma():
    return Tokenizer.from_metadata(model_metadata(real_model("gemma")))


@pytest.fixture(scope="module")
def synthetic_reference():
    return json.loads((require_synthetic() / "synthetic.json").read_text(encoding="utf-8"))


# ----- SPM on the synthetic vocabulary --------------------------------------------------------------------------

def test_synthetic_spm_matches_llama_cpp(tiny, synthetic_reference):
    checked = 0
    for text, expected in synthetic_reference["tokenize"].items():
        assert tiny.encode(text, add_bos=True) == expected["gguf_add_bos"], text
        assert tiny.encode(text, add_bos=False) == expected["gguf_no_bos"], text
        assert tiny.decode(tiny.encode(text, add_bos=False)) == text.encode("utf-8"), text
        assert tiny.decode(tiny.encode(text, add_bos=True), skip_special=True) == text.encode("utf-8"), text
        checked += 1
    assert checked >= 10


def test_synthetic_spm_matches_sentencepiece(tiny):
    sentencepiece = pytest.importorskip("sentencepiece", reason="sentencepiece (a dev dependency) is the reference SPM tokenizer")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(require_synthetic() / "spm.model"))
    rng = random.Random(1234)
    alphabet = "abcdefghij klmnopqrstuvwxyz ABCXYZ 0123456789 .,;:!?()[]{}=_\n\té日本🦙—“"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        assert tiny.encode(text, add_bos=False) == processor.encode(text), text


def test_synthetic_vocabulary_properties(tiny):
    assert (tiny.kind, tiny.n_vocab, tiny.bos_id, tiny.eos_id, tiny.add_bos) == ("spm", 4096, 1, 2, True)
    assert tiny.add_space_prefix and tiny.eot_id is None and tiny.eog_ids == {2}
    assert tiny.is_control(1) and tiny.is_control(2) and not tiny.is_control(1043)
    assert tiny.token_to_piece(1043) == b" H"          # '▁H'
    assert tiny.token_to_piece(3 + 0x41) == b"A"       # <0x41>
    assert tiny.token_to_piece(1) == b"<s>" and tiny.token_to_piece(1, special=False) == b""
    # decode keeps the spaces of later tokens; only the prefix space of the first text token goes
    ids = tiny.encode("Hello world", add_bos=True)
    assert tiny.decode(ids) == b"<s>Hello world"
    assert tiny.decode(ids, strip_space_prefix=False, skip_special=True) == b" Hello world"
    assert b"".join(tiny.token_to_piece(t) for t in ids[1:]) == b" Hello world"


def test_special_tokens_are_parsed_only_on_request(tiny):
    assert tiny.encode("a</s>b", add_bos=False, special=True) == \
        tiny.encode("a", add_bos=False) + [2] + tiny.encode("b", add_bos=False)
    plain = tiny.encode("a</s>b", add_bos=False, special=False)
    assert 2 not in plain and tiny.decode(plain) == b"a</s>b"


def test_invalid_utf8_bytes_fall_back_to_byte_tokens(tiny):
    data = b"ab\xff\xfecd"
    ids = tiny.encode(data, add_bos=False)
    assert 3 + 0xFF in ids and 3 + 0xFE in ids
    assert tiny.decode(ids) == data


def test_spm_round_trips_2000_characters_of_source(tiny, gemma):
    text = (Path(__file__).read_text(encoding="utf-8") * 3)[:2000]
    for tok in (tiny, gemma):
        ids = tok.encode(text, special=True)
        assert tok.decode(ids, skip_special=True) == text.encode("utf-8")


# ----- GGML-era vocabularies (ctransformers) ---------------------------------------------------------------------

def _read_ggjt_vocab(path) -> dict:
    """The vocabulary of a ggjt v3 file, raw: magic, version, 7 u32 hparams, then (len, bytes, f32 score)s."""
    with open(path, "rb") as f:
        magic, version, n_vocab = struct.unpack("<III", f.read(12))
        assert (magic, version) == (0x67676A74, 3)
        f.read(6 * 4)
        tokens, scores = [], []
        for _ in range(n_vocab):
            (length,) = struct.unpack("<I", f.read(4))
            tokens.append(f.read(length))
            scores.append(struct.unpack("<f", f.read(4))[0])
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores}


def _assert_matches_ctransformers(tok: Tokenizer, reference: dict) -> None:
    for text, expected in reference.items():
        ids = tok.encode(text)
        # ctransformers' Python wrapper hands the C side a buffer of len(text) + 1 ids and keeps what fits
        assert ids[:len(text) + 1] == expected, text
        assert len(ids) == len(expected) or len(expected) == len(text) + 1, text
        assert tok.decode(ids) == text.encode("utf-8"), text


@pytest.mark.parametrize("type_name", synthetic_types())
def test_ggml_legacy_matches_ctransformers(type_name):
    path = synthetic_file(type_name, "ggml")
    reference = json.loads(Path(f"{path}.ctransformers-last-logits.npy.tok.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_metadata(model_metadata(path), ggml_legacy=True)
    _assert_matches_ctransformers(tok, reference)


def test_ggml_legacy_from_raw_vocabulary():
    path = synthetic_file("q4_0", "ggml")
    reference = json.loads(Path(f"{path}.ctransformers-last-logits.npy.tok.json").read_text(encoding="utf-8"))
    raw = _read_ggjt_vocab(path)
    as_bytes = Tokenizer.from_metadata(raw, ggml_legacy=True)
    _assert_matches_ctransformers(as_bytes, reference)
    latin1 = dict(raw)
    latin1["tokenizer.ggml.tokens"] = [t.decode("latin-1") if len(t) == 1 else t.decode("utf-8")
                                       for t in raw["tokenizer.ggml.tokens"]]
    _assert_matches_ctransformers(Tokenizer.from_metadata(latin1, ggml_legacy=True), reference)
    assert as_bytes.encode("") == [] and as_bytes.encode(" ") == [1, 3933]  # no implicit leading space
    assert as_bytes.decode([0, 1, 2]) == " \u2047 ".encode("utf-8")        # empty control pieces


# ----- byte-level BPE: Qwen2.5-Coder ------------------------------------------------------------------------------

def test_qwen_matches_llama_cpp(qwen):
    reference = real_reference("qwen2.5-coder-0.5b.json")
    for text, expected in reference["tokenize"].items():
        assert qwen.encode(text, add_bos=True, special=True) == expected["add_bos_special"], text
        assert qwen.encode(text, add_bos=False, special=False) == expected["no_bos_no_special"], text
        assert qwen.decode(qwen.encode(text, add_bos=False)) == text.encode("utf-8"), text
        assert qwen.decode(qwen.encode(text, special=True)) == text.encode("utf-8"), text
    for case in reference["greedy"]:
        assert qwen.encode(case["prompt"], add_bos=True, special=True) == case["prompt_tokens"]
        text = qwen.decode(case["greedy_tokens"], skip_special=True).decode("utf-8")
        assert text == case["greedy_text"]


def test_qwen_vocabulary_properties(qwen):
    assert (qwen.kind, qwen.pre, qwen.n_vocab, qwen.add_bos) == ("bpe", "qwen2", 151936, False)
    assert (qwen.bos_id, qwen.eos_id, qwen.eot_id) == (151643, 151645, 151645)
    assert {151643, 151645, 151662, 151663, 151664} <= qwen.eog_ids
    assert qwen.is_control(151644) and not qwen.is_control(9707)
    assert qwen.token_to_piece(151644) == b"<|im_start|>" and qwen.token_to_piece(151644, special=False) == b""
    assert qwen.token_to_piece(220) == b" " and qwen.token_to_piece(198) == b"\n"
    # user-defined tokens are split out even without special parsing, as llama.cpp does
    assert qwen.encode("<tool_call>", special=False) == [151657]
    assert qwen.decode([151644, 872], skip_special=True) == b"user"


def test_bpe_round_trips_2000_characters_of_source(qwen):
    text = (Path(__file__).read_text(encoding="utf-8") * 3)[:2000]
    ids = qwen.encode(text)
    assert qwen.decode(ids) == text.encode("utf-8")


def test_bpe_invalid_utf8_round_trips(qwen):
    data = b"x\xff\xc3(\xe2\x82 end"
    assert qwen.decode(qwen.encode(data)) == data


# ----- SPM with user-defined tokens: Gemma 3 -------------------------------------------------------------------

def test_gemma_matches_llama_cpp(gemma):
    reference = real_reference("gemma-3-270m.json")
    for text, expected in reference["tokenize"].items():
        assert gemma.encode(text, add_bos=True, special=True) == expected["add_bos_special"], text
        assert gemma.encode(text, add_bos=False, special=False) == expected["no_bos_no_special"], text
        assert gemma.decode(gemma.encode(text, add_bos=False)) == text.encode("utf-8"), text
    for case in reference["greedy"]:
        assert gemma.encode(case["prompt"], add_bos=True, special=True) == case["prompt_tokens"]
        assert gemma.decode(case["greedy_tokens"], skip_special=True).decode("utf-8") == case["greedy_text"]


def test_gemma_vocabulary_properties(gemma):
    assert (gemma.kind, gemma.n_vocab, gemma.bos_id, gemma.eos_id, gemma.eot_id) == ("spm", 262144, 2, 1, 106)
    assert gemma.add_bos and not gemma.add_space_prefix
    assert {1, 106} <= gemma.eog_ids
    turn = "<start_of_turn>user\nhi<end_of_turn>\n"
    ids = gemma.encode(turn, add_bos=False, special=True)
    assert ids[0] == gemma.token_id("<start_of_turn>") and 106 in ids
    assert gemma.decode(ids) == turn.encode("utf-8")
    assert 106 not in gemma.encode(turn, add_bos=False, special=False)


# ----- behaviour on small hand-made vocabularies ---------------------------------------------------------------

def _spm_metadata(pieces, **extra) -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
    scores = [0.0] * 259 + [s for _, s in pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": types}
    metadata.update(extra)
    return metadata


def test_spm_merges_highest_score_first_and_leftmost_on_ties():
    tok = Tokenizer.from_metadata(_spm_metadata(
        [("a", -1.0), ("b", -1.0), ("ab", -2.0), ("ba", -2.0), ("bb", -0.5), ("bbb", -3.0)],
        **{"tokenizer.ggml.add_space_prefix": False}))
    ids = {tok.token_text(i): i for i in range(259, tok.n_vocab)}
    assert tok.encode("aba", add_bos=False) == [ids["ab"], ids["a"]]          # tie: leftmost pair first
    assert tok.encode("abb", add_bos=False) == [ids["a"], ids["bb"]]          # bb scores better than ab
    assert tok.encode("abbb", add_bos=False) == [ids["a"], ids["bbb"]]        # b+b left, then bb+b
    assert tok.encode("cab", add_bos=False) == [259 - 256 + ord("c"), ids["ab"]]  # 'c' is not a piece: <0x63>


def test_special_token_partition_takes_longest_tokens_first():
    metadata = _spm_metadata([("x", -1.0), ("y", -1.0)], **{"tokenizer.ggml.add_space_prefix": False})
    metadata["tokenizer.ggml.tokens"] += ["<ab>", "<ab><cd>", "TT"]
    metadata["tokenizer.ggml.scores"] += [0.0, 0.0, 0.0]
    metadata["tokenizer.ggml.token_type"] += [3, 3, 4]
    tok = Tokenizer.from_metadata(metadata)
    short, long, user = tok.n_vocab - 3, tok.n_vocab - 2, tok.n_vocab - 1
    assert tok.encode("x<ab><cd>y<ab>TT", add_bos=False, special=True) == \
        [tok.token_id("x"), long, tok.token_id("y"), short, user]
    plain = tok.encode("x<ab>TTy", add_bos=False, special=False)
    assert user in plain and short not in plain and tok.decode(plain) == b"x<ab>TTy"


def test_bad_input_raises_value_errors(tiny):
    with pytest.raises(ValueError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                                 "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(TokenizerError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
                                 "tokenizer.ggml.token_type": [1]})
    with pytest.raises(TokenizerError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError):
        tiny.decode([tiny.n_vocab])
    with pytest.raises(TokenizerError):
        tiny.token_to_piece(-1)
    with pytest.raises(TypeError):
        tiny.encode(12)
    no_bytes = Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a"],
                                        "tokenizer.ggml.add_space_prefix": False})
    with pytest.raises(TokenizerError, match="byte token"):
        no_bytes.encode("ab", add_bos=False)
