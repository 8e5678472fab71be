"""What SPM and BPE tokenizers share: token types, special-token ids, end-of-generation detection, and the
splitting of a text around special tokens (llama.cpp's ``tokenizer_st_partition``).

Token attributes are bit flags as in llama.cpp (a token can gain CONTROL on top of its file type, e.g. an
``<|im_end|>`` that the converter wrongly marked normal), converted from the GGUF ``tokenizer.ggml.token_type``
values (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class TokenizerError(ValueError):
    """The vocabulary metadata is unusable, or a text cannot be tokenized with it."""


# GGUF token types (tokenizer.ggml.token_type)
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp token attribute bits
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

_TYPE_TO_ATTR = np.zeros(8, dtype=np.int32)
_TYPE_TO_ATTR[[TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE]] = [
    ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE]

# Token texts llama.cpp recognises by name (llama-vocab.cpp, "auto-detect special tokens by text").
EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
             "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
EOM_NAMES = ("<|eom_id|>",)
FIM_PAD_NAMES = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
FIM_REP_NAMES = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
FIM_SEP_NAMES = ("<|file_sep|>",)
EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")


def token_attributes(token_types, n_tokens: int) -> np.ndarray:
    """Attribute bits per token from the GGUF token types (all NORMAL when the file has none)."""
    if token_types is None:
        return np.full(n_tokens, ATTR_NORMAL, dtype=np.int32)
    types = np.asarray(token_types, dtype=np.int64)
    if types.ndim != 1 or len(types) < n_tokens:
        raise TokenizerError(f"tokenizer.ggml.token_type has {types.size} entries for {n_tokens} tokens")
    types = types[:n_tokens]
    attrs = np.full(n_tokens, ATTR_UNDEFINED, dtype=np.int32)
    known = (types >= 0) & (types < len(_TYPE_TO_ATTR))
    attrs[known] = _TYPE_TO_ATTR[types[known]]
    return attrs


def meta_int(metadata: dict, key: str):
    """An integer metadata value (GGUF readers may hand back numpy scalars or 1-element arrays), or None."""
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != 1:
            raise TokenizerError(f"metadata {key} should be one integer, got {len(value)} values")
        value = value[0]
    return int(value)


def meta_bool(metadata: dict, key: str, default: bool) -> bool:
    value = metadata.get(key)
    if value is None:
        return default
    if isinstance(value, (list, tuple, np.ndarray)):
        value = value[0]
    return bool(value)


@dataclass
class SpecialTokens:
    """Ids of the special tokens, resolved as llama.cpp does (file keys first, then names), and the EOG set."""
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None = None
    eom_id: int | None = None
    eog_ids: set = field(default_factory=set)


def resolve_special_tokens(metadata: dict, token_to_id: dict, attrs: np.ndarray, n_tokens: int,
                           defaults: dict) -> SpecialTokens:
    """Read the special token ids and derive the end-of-generation set; may add CONTROL to named tokens."""

    def pick(key: str, default):
        if default is not None and not 0 <= default < n_tokens:
            default = None
        value = meta_int(metadata, f"tokenizer.ggml.{key}")
        if value is None or not 0 <= value < n_tokens:
            return default
        return value

    def by_name(current, names):
        # llama.cpp walks an unordered map here; we take the first name in list order, which is deterministic
        # and gives llama.cpp's logged choice on the models we check (Qwen: <|im_end|>, Gemma: <end_of_turn>).
        if current is not None:
            return current
        for name in names:
            token_id = token_to_id.get(name)
            if token_id is not None:
                attrs[token_id] |= ATTR_CONTROL
                return token_id
        return None

    special = SpecialTokens(
        bos_id=pick("bos_token_id", defaults.get("bos")),
        eos_id=pick("eos_token_id", defaults.get("eos")),
        unk_id=pick("unknown_token_id", defaults.get("unk")),
        pad_id=pick("padding_token_id", None),
    )
    special.eot_id = by_name(pick("eot_token_id", None), EOT_NAMES)
    special.eom_id = by_name(pick("eom_token_id", None), EOM_NAMES)
    fim_ids = [by_name(pick("fim_pad_token_id", None), FIM_PAD_NAMES),
               by_name(pick("fim_rep_token_id", None), FIM_REP_NAMES),
               by_name(pick("fim_sep_token_id", None), FIM_SEP_NAMES)]
    eog = {token_id for token_id in fim_ids if token_id is not None}
    for name in EOG_NAMES:
        token_id = token_to_id.get(name)
        if token_id is not None:
            eog.add(token_id)
            attrs[token_id] |= ATTR_CONTROL
    eog.update(t for t in (special.eos_id, special.eot_id, special.eom_id) if t is not None)
    # llama.cpp's workarounds: harmony / solar-open vocabularies end a message, not the generation, with <|end|>;
    # Gemma 4 uses </s> as ordinary text.
    def in_eog(name):
        return token_to_id.get(name) in eog

    has_call = in_eog("<|call|>") or in_eog("<|calls|>")
    end_id, s_id = token_to_id.get("<|end|>"), token_to_id.get("</s>")
    if end_id in eog and has_call and (in_eog("<|return|>") or in_eog("<|flush|>")):
        eog.discard(end_id)
        attrs[end_id] = ATTR_USER_DEFINED
    if s_id in eog and in_eog("<|tool_response>"):
        eog.discard(s_id)
        attrs[s_id] = ATTR_NORMAL
    special.eog_ids = eog
    return special


class SpecialTokenSplitter:
    """Cuts a text into raw-text spans and special-token ids, exactly as llama.cpp's tokenizer_st_partition:
    special tokens are taken longest first (by UTF-8 length), each one splitting every raw span that is left.
    CONTROL and UNKNOWN tokens are recognised only when parsing specials; USER_DEFINED tokens always are.
    """

    def __init__(self, texts: list, attrs: np.ndarray):
        candidates = np.nonzero(attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0].tolist()
        entries = []
        for token_id in candidates:
            text = texts[token_id]
            if not text:
                continue
            attr = int(attrs[token_id])
            entries.append((len(text.encode("utf-8", "surrogateescape")), token_id, text, attr))
        # llama.cpp sorts by byte length only (unstable sort); ties are broken by id here, deterministically.
        entries.sort(key=lambda e: (-e[0], e[1]))
        self._all = [(token_id, text, attr) for _, token_id, text, attr in entries]
        self._user_defined = [e for e in self._all if not e[2] & (ATTR_CONTROL | ATTR_UNKNOWN)]

    def split(self, text: str, parse_special: bool) -> list:
        """Fragments in order: ``(start, end)`` spans of raw text, or int token ids."""
        if not text:
            return []
        fragments = [(0, len(text))]
        for token_id, token_text, attr in (self._all if parse_special else self._user_defined):
            if token_text not in text:
                continue
            split_fragments = []
            for fragment in fragments:
                if isinstance(fragment, int):
                    split_fragments.append(fragment)
                else:
                    _split_span(text, fragment[0], fragment[1], token_text, token_id, attr, split_fragments)
            fragments = split_fragments
        return fragments


_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale, which llama.cpp uses for LSTRIP / RSTRIP


def _split_span(text: str, start: int, end: int, token_text: str, token_id: int, attr: int, out: list) -> None:
    pos = start
    while True:
        match = text.find(token_text, pos, end)
        if match < 0:
            break
        left_end = match
        if attr & ATTR_LSTRIP:
            while left_end > pos and text[left_end - 1] in _C_SPACE:
                left_end -= 1
        if left_end > pos:
            out.append((pos, left_end))
        out.append(token_id)
        pos = match + len(token_text)
        if attr & ATTR_RSTRIP:
            while pos < end and text[pos] in _C_SPACE:
                pos += 1
    if pos < end:
        out.append((pos, end))
