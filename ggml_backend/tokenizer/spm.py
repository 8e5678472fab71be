"""SentencePiece-style tokenization as llama.cpp does it (``llm_tokenizer_spm_session``).

The text is cut into UTF-8 characters; adjacent pairs whose concatenation is a vocabulary piece are merged,
highest piece score first (ties: leftmost pair first), until no pair merges; each remaining symbol is emitted as
its token or, when it is not in the vocabulary, as byte tokens. The same routine serves GGUF vocabularies
(``str`` text with '▁' for spaces) and GGML-era ones (``bytes`` text with plain spaces and raw byte tokens).
"""
from __future__ import annotations

import heapq

from .vocab import TokenizerError


def _utf8_char_lengths(data: bytes) -> list:
    """Symbol lengths for a byte string, from each lead byte as llama.cpp's unicode_len_utf8 (clipped at the end)."""
    lengths = []
    offset, size = 0, len(data)
    while offset < size:
        lead = data[offset]
        n = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        n = min(n, size - offset)
        lengths.append(n)
        offset += n
    return lengths


def spm_tokenize(text, piece_to_id: dict, scores: list, byte_to_id: list, out: list) -> None:
    """Append the SPM tokens of ``text`` (str or bytes; keys of ``piece_to_id`` are of the same type) to ``out``.

    ``byte_to_id[b]`` is the token for byte ``b`` (None when the vocabulary has none).
    """
    if not text:
        return
    if isinstance(text, str):
        n_symbols = len(text)
        start = list(range(n_symbols))
        length = [1] * n_symbols
    else:
        length = _utf8_char_lengths(text)
        n_symbols = len(length)
        start = [0] * n_symbols
        offset = 0
        for i, n in enumerate(length):
            start[i] = offset
            offset += n
    prev = list(range(-1, n_symbols - 1))
    nxt = list(range(1, n_symbols + 1))
    nxt[-1] = -1

    # heap entries: (-score, left, right, combined length). Python's heap pops the smallest tuple, so the best
    # score comes first and equal scores go leftmost first, as llama.cpp's comparator.
    queue = []
    lookup = piece_to_id.get

    def push_bigram(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        size = length[left] + length[right]
        token_id = lookup(text[start[left]:start[left] + size])
        if token_id is not None:
            heapq.heappush(queue, (-scores[token_id], left, right, size))

    for i in range(1, n_symbols):
        push_bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        # stale when either side was merged away or the right side grew since this pair was queued
        if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
            continue
        length[left] = size
        length[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        push_bigram(prev[left], left)
        push_bigram(left, nxt[left])

    # Every merged symbol is a vocabulary piece, so llama.cpp's resegment() recursion through its rev_merge map
    # never triggers: a symbol is either a piece or a single character that falls back to bytes.
    i = 0
    while i != -1:
        piece = text[start[i]:start[i] + length[i]]
        token_id = lookup(piece)
        if token_id is not None:
            out.append(token_id)
        else:
            raw = piece.encode("utf-8", "surrogateescape") if isinstance(piece, str) else piece
            for byte in raw:
                byte_id = byte_to_id[byte]
                if byte_id is None:
                    raise TokenizerError(
                        f"the vocabulary has neither the piece {piece!r} nor a byte token for 0x{byte:02X}")
                out.append(byte_id)
        i = nxt[i]
