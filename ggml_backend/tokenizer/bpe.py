"""Byte-level BPE (GGUF ``tokenizer.ggml.model == "gpt2"``) as llama.cpp does it (``llm_tokenizer_bpe_session``).

A text is cut into words by the pre-tokenizer's regular expressions (chosen by ``tokenizer.ggml.pre``), each word's
UTF-8 bytes are mapped to printable characters (GPT-2's bytes_to_unicode), and adjacent symbols are merged by merge
rank (lowest first, ties leftmost) until none merges. Results are cached per word.
"""
from __future__ import annotations

import heapq
from functools import lru_cache

import regex

from .vocab import TokenizerError

# Contractions written case-insensitively without (?i:...), as llama.cpp adapts them.
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:" + _CONTRACTIONS
          + r")?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:" + _CONTRACTIONS
          + r")?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regular expressions applied in turn, ignore_merges, add_bos default)
_PRE_TOKENIZERS = {}


def _register(names, exprs, ignore_merges=False, add_bos=False):
    for name in names:
        _PRE_TOKENIZERS[name] = (tuple(exprs), ignore_merges, add_bos)


_register(["default", ""], [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"])
_register(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
           "dbrx", "smaug-bpe"], [_LLAMA3], ignore_merges=True, add_bos=True)
_register(["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"], [_QWEN2])
_register(["qwen35"], [_QWEN35])
_register(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "mpt", "olmo",
           "jais", "exaone4", "trillion", "granite-docling"], [_GPT2])
_register(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"], [r"\p{N}", _GPT2])
_register(["falcon"], [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"])
_register(["glm4", "chatglm-bpe"],
          [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"])
_register(["deepseek-coder"], [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"])
_register(["gpt-4o", "llama4"], [_GPT4O])
_register(["tekken"], [_TEKKEN], ignore_merges=True, add_bos=True)


def pre_tokenizer_names() -> list:
    return sorted(n for n in _PRE_TOKENIZERS if n)


def _bytes_to_unicode() -> list:
    """GPT-2's reversible map of the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping = [""] * 256
    extra = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in enumerate(BYTE_TO_CHAR)}
# latin-1 decoding turns each byte into the character of the same ordinal; this table then maps it
_LATIN1_TO_MAPPED = {byte: char for byte, char in enumerate(BYTE_TO_CHAR)}


def byte_encode(word: str) -> str:
    """The GPT-2 byte-mapped form of a word (invalid UTF-8 carried as surrogate escapes maps to its raw bytes)."""
    return word.encode("utf-8", "surrogateescape").decode("latin-1").translate(_LATIN1_TO_MAPPED)


class BpeModel:
    """Merge ranks, the pre-tokenizer and a per-word cache for one vocabulary."""

    def __init__(self, token_to_id: dict, merges, pre: str, cache_size: int = 1 << 16):
        if pre not in _PRE_TOKENIZERS:
            raise TokenizerError(f"unknown BPE pre-tokenizer {pre!r}; known: {', '.join(pre_tokenizer_names())}")
        exprs, self.ignore_merges, self.default_add_bos = _PRE_TOKENIZERS[pre]
        self.pre = pre
        self._patterns = [regex.compile(expr) for expr in exprs]
        self._token_to_id = token_to_id
        # "a b" -> rank. Byte-mapped pieces never contain a plain space, so the joined text is an unambiguous key
        # (llama.cpp splits each merge at the first space after position 0, which gives the same pairs).
        self._ranks = dict(zip(merges, range(len(merges))))
        self.encode_word = lru_cache(maxsize=cache_size)(self._encode_word)

    def split_words(self, text: str) -> list:
        """Pre-tokenize: each expression re-splits every piece; text between matches stays a piece of its own."""
        pieces = [text]
        for pattern in self._patterns:
            split = []
            for piece in pieces:
                pos = 0
                for match in pattern.finditer(piece):
                    if match.start() > pos:
                        split.append(piece[pos:match.start()])
                    if match.end() > match.start():
                        split.append(match.group())
                    pos = match.end()
                if pos < len(piece):
                    split.append(piece[pos:])
            pieces = split
        return pieces

    def tokenize(self, text: str, out: list) -> None:
        for word in self.split_words(text):
            out.extend(self.encode_word(word))

    def _encode_word(self, word: str) -> tuple:
        mapped = byte_encode(word)
        lookup = self._token_to_id.get
        if self.ignore_merges:
            token_id = lookup(mapped)
            if token_id is not None:
                return (token_id,)
        symbols = list(mapped)
        n = len(symbols)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        ranks = self._ranks
        queue = []

        def add_bigram(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            text = symbols[left] + symbols[right]
            rank = ranks.get(symbols[left] + " " + symbols[right])
            if rank is not None:
                heapq.heappush(queue, (rank, left, right, text))

        for i in range(1, n):
            add_bigram(i - 1, i)
        while queue:
            _, left, right, text = heapq.heappop(queue)
            if not symbols[left] or not symbols[right] or symbols[left] + symbols[right] != text:
                continue  # outdated pair
            symbols[left] = text
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add_bigram(prev[left], left)
            add_bigram(left, nxt[left])

        ids = []
        i = 0
        while i != -1:
            symbol = symbols[i]
            token_id = lookup(symbol)
            if token_id is not None:
                ids.append(token_id)
            else:
                # llama.cpp looks each UTF-8 byte of the mapped symbol up as a one-byte token and drops misses
                for byte in symbol.encode("utf-8"):
                    if byte < 0x80:
                        byte_id = lookup(chr(byte))
                        if byte_id is not None:
                            ids.append(byte_id)
            i = nxt[i]
        return tuple(ids)
