"""Tokenizers that give llama.cpp's token ids: SentencePiece-style (``llama``) and byte-level BPE (``gpt2``).

    tok = Tokenizer.from_metadata(metadata)            # metadata: dict of GGUF keys (tokenizer.ggml.*)
    ids = tok.encode("Hello", add_bos=True, special=False)
    text = tok.decode(ids)                             # bytes

Choices (llama.cpp / llama-cpp-python behaviour in brackets):
- ``encode(add_bos=True)`` adds what llama.cpp's ``add_special`` adds: BOS only when the model's
  ``add_bos`` flag is set (Qwen: no), EOS when ``add_eos`` is set.
- ``special=True`` turns CONTROL/UNKNOWN token texts in the text into their tokens; USER_DEFINED tokens (Gemma's
  runs of spaces, tabs and newlines, Qwen's ``<tool_call>``) are split out in both modes, as llama.cpp does.
- ``decode(ids, skip_special=False)`` concatenates ``token_to_piece`` pieces: control tokens render as their text
  unless ``skip_special`` [llama-cpp-python's ``detokenize(special=False)`` skips them: pass
  ``skip_special=True`` for its default]; unused tokens render empty. With ``strip_space_prefix`` (default) and an
  SPM vocabulary that adds a space prefix, the one space that encode() put before the text is removed from the
  first text token (after a leading BOS), so ``decode(encode(x)) == x``. ``token_to_piece`` never strips:
  use it (or ``strip_space_prefix=False``) when decoding a stream token by token.
- ``ggml_legacy=True`` reproduces the GGML-era (mid-2023, ctransformers) tokenizer on a ggjt v3 vocabulary: no
  implicit leading space, no special-token parsing, byte fallback ``id = byte + 3``, empty text -> no tokens.
"""
from __future__ import annotations

import numpy as np

from .bpe import CHAR_TO_BYTE, BpeModel
from .spm import spm_tokenize
from .vocab import (ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_RSTRIP, ATTR_UNKNOWN, ATTR_USER_DEFINED,
                    SpecialTokenSplitter, SpecialTokens, TokenizerError, meta_bool,
                    resolve_special_tokens, token_attributes)

__all__ = ["LlamaTokenizer", "Tokenizer", "TokenizerError"]

_SPACE_MARK = "\u2581"  # '▁', SentencePiece's escaped space


class Tokenizer:
    def __init__(self, kind: str, texts: list, attrs: np.ndarray, scores, special: SpecialTokens,
                 add_bos: bool, add_eos: bool, add_space_prefix: bool, ggml_legacy: bool, bpe: BpeModel | None,
                 token_to_id: dict):
        self.kind = kind                      # "spm" or "bpe"
        self._texts = texts                   # str per token (bytes per token for GGML-era vocabularies)
        self._attrs = attrs
        self._scores = scores
        self._special = special
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.ggml_legacy = ggml_legacy
        self._bpe = bpe
        self._token_to_id = token_to_id
        self._splitter = None if ggml_legacy else SpecialTokenSplitter(texts, attrs)
        self._byte_to_id = self._byte_tokens() if kind == "spm" else None
        self._pieces = {}

    # ----- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, metadata: dict, ggml_legacy: bool = False) -> "Tokenizer":
        model = metadata.get("tokenizer.ggml.model", "llama")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens) == 0:
            raise TokenizerError("the metadata has no tokenizer.ggml.tokens")
        n_tokens = len(tokens)
        attrs = token_attributes(metadata.get("tokenizer.ggml.token_type"), n_tokens)
        if model == "llama":
            return cls._build_spm(metadata, tokens, attrs, ggml_legacy)
        if model == "gpt2":
            if ggml_legacy:
                raise TokenizerError("GGML-era (ggjt) vocabularies are SentencePiece-style only")
            return cls._build_bpe(metadata, tokens, attrs)
        raise TokenizerError(f"unsupported tokenizer model {model!r} (supported: 'llama', 'gpt2')")

    @classmethod
    def _build_spm(cls, metadata, tokens, attrs, ggml_legacy):
        n_tokens = len(tokens)
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            scores = [0.0] * n_tokens
        elif len(scores) < n_tokens:
            raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {n_tokens} tokens")
        else:
            scores = np.asarray(scores, dtype=np.float32)[:n_tokens].tolist()
        if ggml_legacy:
            if metadata.get("tokenizer.ggml.token_type") is None:
                attrs = _legacy_attributes(tokens)
            texts = _legacy_texts(tokens, attrs)
            # The GGML-era map held every entry, filled in id order, so a later duplicate (a normal "H" after the
            # byte token for 0x48) wins; its control entries were empty strings, which no text can produce.
            usable = (attrs & (ATTR_CONTROL | ATTR_UNKNOWN)) == 0
            token_to_id = {texts[i]: i for i in range(n_tokens) if usable[i]}
        else:
            texts = _gguf_texts(tokens)
            token_to_id = _first_wins(texts)
        special = resolve_special_tokens(metadata, token_to_id if not ggml_legacy else {}, attrs, n_tokens,
                                         {"bos": 1, "eos": 2, "unk": 0})
        add_bos = meta_bool(metadata, "tokenizer.ggml.add_bos_token", True)
        add_eos = meta_bool(metadata, "tokenizer.ggml.add_eos_token", False)
        add_space_prefix = False if ggml_legacy else meta_bool(metadata, "tokenizer.ggml.add_space_prefix", True)
        tok = cls("spm", texts, attrs, scores, special, add_bos, add_eos, add_space_prefix, ggml_legacy, None,
                  token_to_id)
        _apply_name_rules(tok, metadata)
        return tok

    @classmethod
    def _build_bpe(cls, metadata, tokens, attrs):
        n_tokens = len(tokens)
        texts = _gguf_texts(tokens)
        token_to_id = _first_wins(texts)
        merges = metadata.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges")
        pre = metadata.get("tokenizer.ggml.pre", "default") or "default"
        bpe = BpeModel(token_to_id, list(merges), pre)
        special = resolve_special_tokens(metadata, token_to_id, attrs, n_tokens, {"bos": 11, "eos": 11})
        add_bos = meta_bool(metadata, "tokenizer.ggml.add_bos_token", bpe.default_add_bos)
        add_eos = meta_bool(metadata, "tokenizer.ggml.add_eos_token", False)
        tok = cls("bpe", texts, attrs, None, special, add_bos, add_eos, False, False, bpe, token_to_id)
        _apply_name_rules(tok, metadata)
        return tok

    def _byte_tokens(self) -> list:
        if self.ggml_legacy:
            # GGML-era llama.cpp hard-coded the byte tokens at ids 3..258
            return [b + 3 if b + 3 < self.n_vocab else None for b in range(256)]
        lookup = self._token_to_id.get
        return [lookup(f"<0x{b:02X}>", lookup(chr(b)) if b < 0x80 else None) for b in range(256)]

    # ----- properties ---------------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return len(self._texts)

    @property
    def bos_id(self):
        return self._special.bos_id

    @property
    def eos_id(self):
        return self._special.eos_id

    @property
    def eot_id(self):
        return self._special.eot_id

    @property
    def unk_id(self):
        return self._special.unk_id

    @property
    def pad_id(self):
        return self._special.pad_id

    @property
    def eog_ids(self) -> set:
        return set(self._special.eog_ids)

    @property
    def pre(self):
        return self._bpe.pre if self._bpe is not None else None

    def is_eog(self, token_id: int) -> bool:
        return token_id in self._special.eog_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[self._check_id(token_id)] & ATTR_CONTROL)

    def token_text(self, token_id: int):
        """The vocabulary entry as stored (str; bytes for GGML-era vocabularies)."""
        return self._texts[self._check_id(token_id)]

    def token_id(self, text) -> int | None:
        """The id of a vocabulary entry given its stored text, or None."""
        return self._token_to_id.get(text)

    def _check_id(self, token_id) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < len(self._texts):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{len(self._texts) - 1})")
        return token_id

    # ----- encoding -----------------------------------------------------------------------------------------
    def __call__(self) -> "LlamaTokenizer":
        """``llm.tokenizer()``: llama-cpp-python's ``Llama.tokenizer()`` (``llm.tokenizer`` itself stays this
        engine's tokenizer, so both spellings work)."""
        return LlamaTokenizer(self)

    def encode(self, text, add_bos: bool = True, special: bool = False) -> list:
        """Token ids of ``text`` (str, or bytes: invalid UTF-8 falls back to byte tokens)."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "surrogateescape")
        elif not isinstance(text, str):
            raise TypeError(f"encode() takes str or bytes, not {type(text).__name__}")
        if self.ggml_legacy:
            return self._encode_legacy(text, add_bos)
        out = []
        if add_bos and self.add_bos:
            if self.bos_id is None:
                raise TokenizerError("the model asks for a BOS token but has none")
            out.append(self.bos_id)
        fragments = self._splitter.split(text, special)
        if self.kind == "spm":
            self._encode_spm_fragments(text, fragments, out)
        else:
            for fragment in fragments:
                if isinstance(fragment, int):
                    out.append(fragment)
                else:
                    self._bpe.tokenize(text[fragment[0]:fragment[1]], out)
        if add_bos and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _encode_spm_fragments(self, text: str, fragments: list, out: list) -> None:
        previous_was_special = True  # the text start counts as "after a special token": it gets the space prefix
        for fragment in fragments:
            if isinstance(fragment, int):
                out.append(fragment)
                previous_was_special = True
                continue
            piece = text[fragment[0]:fragment[1]]
            if self.add_space_prefix and previous_was_special:
                piece = " " + piece
            spm_tokenize(piece.replace(" ", _SPACE_MARK), self._token_to_id, self._scores, self._byte_to_id, out)
            previous_was_special = False

    def _encode_legacy(self, text: str, add_bos: bool) -> list:
        if not text:
            return []  # the GGML-era tokenizer returned nothing for an empty text, not even BOS
        out = [self.bos_id] if add_bos and self.add_bos and self.bos_id is not None else []
        spm_tokenize(text.encode("utf-8", "surrogateescape"), self._token_to_id, self._scores, self._byte_to_id,
                     out)
        return out

    # ----- decoding -----------------------------------------------------------------------------------------
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for; CONTROL/UNKNOWN tokens give b"" unless ``special``."""
        token_id = self._check_id(token_id)
        attr = int(self._attrs[token_id])
        if not special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._render(token_id, attr)
        return piece

    def _render(self, token_id: int, attr: int) -> bytes:
        text = self._texts[token_id]
        if self.ggml_legacy:
            # GGML-era pieces: raw bytes with plain spaces; control entries were empty and <unk> was " ⁇ "
            if attr & ATTR_CONTROL:
                return b""
            return " \u2047 ".encode("utf-8") if attr & ATTR_UNKNOWN else text
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if attr & ATTR_NORMAL:
            if self.kind == "spm":
                return text.replace(_SPACE_MARK, " ").encode("utf-8", "surrogateescape")
            # byte-level BPE: undo the byte mapping (a character outside it is kept as its UTF-8; llama.cpp
            # writes an [UNK_BYTE_...] marker there instead)
            return b"".join(bytes((CHAR_TO_BYTE[c],)) if c in CHAR_TO_BYTE else c.encode("utf-8") for c in text)
        if attr & ATTR_BYTE:
            if self.kind == "spm" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                return bytes((int(text[3:5], 16),))
            return text.encode("utf-8", "surrogateescape")
        return b""  # unused / undefined tokens render as nothing, as in llama.cpp

    def decode(self, ids, skip_special: bool = False, strip_space_prefix: bool = True) -> bytes:
        """The concatenated pieces of ``ids`` (see the module docstring for the space-prefix rule)."""
        ids = [int(t) for t in ids]
        pieces = [self.token_to_piece(t, special=not skip_special) for t in ids]
        if strip_space_prefix and self.add_space_prefix and self.kind == "spm" and ids:
            first = 1 if ids[0] == self.bos_id and len(ids) > 1 else 0
            if first < len(ids) and self._attrs[ids[first]] & ATTR_NORMAL and pieces[first].startswith(b" "):
                pieces[first] = pieces[first][1:]
        return b"".join(pieces)


def _gguf_texts(tokens) -> list:
    if set(map(type, tokens)) == {str}:     # as the GGUF reader gives them: a C-speed check, then one copy
        texts = list(tokens)
    else:
        texts = [t if isinstance(t, str) else
                 bytes(t).decode("utf-8", "surrogateescape") if isinstance(t, (bytes, bytearray)) else str(t)
                 for t in tokens]
    # llama.cpp renames empty entries so that they cannot collide
    if "" in texts:
        texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(texts)]
    return texts


def _first_wins(texts: list) -> dict:
    token_to_id = dict(zip(texts, range(len(texts))))
    if len(token_to_id) != len(texts):
        # duplicates (llama.cpp refuses such files): keep the first id of each text
        token_to_id = {}
        for i, t in enumerate(texts):
            token_to_id.setdefault(t, i)
    return token_to_id


def _legacy_texts(tokens, attrs: np.ndarray) -> list:
    """GGML-era entries as the raw bytes the old tokenizer matched: plain spaces, byte tokens as single bytes.

    Accepts raw entries (bytes; or str, with byte tokens decoded as latin-1 or surrogate escapes) and the GGUF
    spellings that convert-llama-ggml-to-gguf.py (and our GGML reader's metadata) use: '▁' and '<0xNN>'.
    """
    texts = []
    for i, t in enumerate(tokens):
        if isinstance(t, (bytes, bytearray)):
            texts.append(bytes(t))
        elif attrs[i] & ATTR_BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            texts.append(bytes((int(t[3:5], 16),)))
        elif attrs[i] & ATTR_BYTE and len(t) == 1 and ord(t) < 256:
            texts.append(bytes((ord(t),)))
        else:
            texts.append(t.encode("utf-8", "surrogateescape").replace(_SPACE_MARK.encode("utf-8"), b" "))
    return texts


def _legacy_attributes(tokens) -> np.ndarray:
    """Types for a ggjt vocabulary, which stores none: llama's layout is <unk>, <s>, </s>, then the 256 byte
    tokens; empty entries are control tokens (as convert-llama-ggml-to-gguf.py decides)."""
    attrs = np.full(len(tokens), ATTR_NORMAL, dtype=np.int32)
    for i, t in enumerate(tokens[:259]):
        if i == 0:
            attrs[i] = ATTR_UNKNOWN
        elif i <= 2 or len(t) == 0:
            attrs[i] = ATTR_CONTROL
        elif len(t) == 1:
            attrs[i] = ATTR_BYTE
    for i, t in enumerate(tokens[259:], start=259):
        if len(t) == 0:
            attrs[i] = ATTR_CONTROL
    return attrs


def _apply_name_rules(tok: Tokenizer, metadata: dict) -> None:
    """llama.cpp's per-model token attributes: Phi-3 strips spaces right of its special tokens."""
    name = str(metadata.get("general.name", "")).lower()
    if "phi-3" in name or "phi3" in name:
        for token_id in np.nonzero(tok._attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0]:
            tok._attrs[token_id] |= ATTR_RSTRIP
        for text, value in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
            token_id = tok.token_id(text)
            if token_id is not None:
                tok._attrs[token_id] = (tok._attrs[token_id] | ATTR_RSTRIP) if value \
                    else (tok._attrs[token_id] & ~ATTR_RSTRIP)
        tok._splitter = SpecialTokenSplitter(tok._texts, tok._attrs)


class LlamaTokenizer:
    """llama-cpp-python's ``LlamaTokenizer`` (what ``Llama.tokenizer()`` returns): ``encode``/``decode`` on str,
    ``tokenize``/``detokenize`` on bytes, with its defaults (``special=True`` when encoding)."""

    def __init__(self, llama):
        # a Llama (as llama-cpp-python's) or one of our Tokenizers
        self._tokenizer = llama if isinstance(llama, Tokenizer) else llama.tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list:
        return self._tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        return self._tokenizer.decode(list(tokens), skip_special=not special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")

    @classmethod
    def from_ggml_file(cls, path: str) -> "LlamaTokenizer":
        from ..formats import load
        from ..model.validate import build_tokenizer
        return cls(build_tokenizer(load(path)))

