"""The text side of generation: token ids -> token bytes -> complete UTF-8 characters -> text that cannot be part
of a stop string, and why the generation ended.

Tokens are byte strings, and one character may be split over several of them (byte-fallback tokens, BPE pieces of
an emoji), so ``Utf8Holdback`` only lets whole characters through. A stop string may likewise arrive over several
tokens, so ``StopStringMatcher`` holds back any tail of the text that could still grow into a stop string and never
emits any part of a stop string. ``TextStreamer`` chains the two for text that arrives as bytes (a remote server's
pieces); ``TokenTextStream`` puts a tokenizer in front of it and is the one place where sampled tokens become text:
it also recognises end-of-generation tokens and a token budget, and records the ``StopReason``. The API (both for
``stream=True`` chunks and for the final text, so both always agree), continuous batching, the CLI's ``run`` and
the web UI all read generated tokens through it.
"""
from __future__ import annotations

import codecs
from typing import Iterable


class Utf8Holdback:
    """Decodes a stream of byte chunks, emitting only complete characters.

    An incomplete multi-byte sequence at the end of a chunk is held until the bytes that complete it arrive. Bytes
    that can never form a valid character (a stray continuation byte, an invalid lead byte, a sequence cut short
    by a new character) become U+FFFD as soon as that is certain, like ``bytes.decode("utf-8", errors="replace")``.
    ``finish()`` flushes a sequence still incomplete when generation ends as one U+FFFD.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Utf8Holdback.feed takes bytes, got {type(data).__name__}")
        return self._decoder.decode(bytes(data), final=False)

    @property
    def pending(self) -> bytes:
        """The bytes of an incomplete character held back so far."""
        return self._decoder.getstate()[0]

    def finish(self) -> str:
        """Flushes what is held (an incomplete character becomes U+FFFD) and starts afresh."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


def _normalize_stops(stops) -> tuple[str, ...]:
    if stops is None:
        return ()
    if isinstance(stops, str):
        stops = [stops]
    normalized: list[str] = []
    for stop in stops:
        if not isinstance(stop, str):
            raise ValueError(f"stop strings must be str, got {type(stop).__name__}: {stop!r}")
        # An empty stop string would match before the first character; like most servers we ignore it.
        if stop and stop not in normalized:
            normalized.append(stop)
    return tuple(normalized)


class StopStringMatcher:
    """Cuts generated text at the first stop string, never emitting any part of one.

    ``feed(text)`` returns the text that can no longer belong to a stop string; a tail that is a prefix of some
    stop string is held back. When a stop string completes, ``matched_stop`` is set, the stop string and
    everything after it are dropped, and later feeds return "". Among stop strings completing in the same text,
    the one that ends first wins (ties: the one that starts first, i.e. the longer), so the result never depends
    on how the text was split into increments. ``finish()`` releases the held tail when no stop string matched.
    Empty stop strings are ignored.
    """

    def __init__(self, stops: Iterable[str] | str | None = ()):
        self.stops = _normalize_stops(stops)
        self._longest = max((len(stop) for stop in self.stops), default=0)
        self._held = ""
        self.matched_stop: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched_stop is not None

    @property
    def held(self) -> str:
        """Text withheld because it might be the start of a stop string."""
        return self._held

    def feed(self, text: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"StopStringMatcher.feed takes str, got {type(text).__name__}")
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        match = self._first_complete_match(buffer)
        if match is not None:
            start, stop = match
            self.matched_stop = stop
            self._held = ""
            return buffer[:start]
        hold = self._partial_stop_suffix_length(buffer)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold]

    def finish(self) -> str:
        """The held tail (when no stop string matched); the matcher is then empty."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _first_complete_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = buffer.find(stop)
            if start < 0:
                continue
            end = start + len(stop)
            if best is None or (end, start) < (best[0], best[1]):
                best = (end, start, stop)
        return None if best is None else (best[1], best[2])

    def _partial_stop_suffix_length(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that is a proper prefix of some stop string."""
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[len(buffer) - length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0


class TextStreamer:
    """Token bytes in, safe text out: ``Utf8Holdback`` then ``StopStringMatcher``.

    ``feed(token_bytes)`` returns the text that may be shown now (possibly ""); ``stopped`` turns true when a stop
    string completed (generation should end); ``finish()`` flushes what is held (an incomplete UTF-8 sequence
    becomes U+FFFD, a held partial stop string is released since it never completed). ``text`` is everything
    emitted so far, the final completion text once finished.
    """

    def __init__(self, stops: Iterable[str] | str | None = ()):
        self._utf8 = Utf8Holdback()
        self._matcher = StopStringMatcher(stops)
        self._emitted: list[str] = []
        self.finished = False

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    @property
    def matched_stop(self) -> str | None:
        return self._matcher.matched_stop

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text

    def feed(self, token_bytes: bytes) -> str:
        if self.finished:
            raise ValueError("TextStreamer.feed called after finish()")
        if self.stopped:
            return ""
        return self._emit(self._matcher.feed(self._utf8.feed(token_bytes)))

    def finish(self) -> str:
        if self.finished:
            return ""
        self.finished = True
        if self.stopped:
            return ""
        tail = self._matcher.feed(self._utf8.finish())
        return self._emit(tail + self._matcher.finish())


class StopReason:
    """Why a generation ended, as ``TokenTextStream.stop_reason`` reports it (plain strings, so they compare and
    print as such). ``finish_reason(reason)`` is OpenAI's coarser name for it."""
    EOG = "eog"                        # an end-of-generation token was sampled
    STOP_STRING = "stop_string"        # a stop string completed
    LENGTH = "length"                  # the token budget or the context ran out
    GRAMMAR = "grammar"                # the grammar is complete: nothing more may follow
    CRITERION = "criterion"            # a stopping criterion (a caller's callable) said so
    INTERRUPTED = "interrupted"        # the consumer stopped reading (Ctrl-C, a Stop button, a client gone)
    ALL = (EOG, STOP_STRING, LENGTH, GRAMMAR, CRITERION, INTERRUPTED)


def finish_reason(reason: str | None) -> str | None:
    """OpenAI's ``finish_reason`` for a ``StopReason``: "length" for the budget, "stop" for every other end, None
    while running. An interrupted generation reports "stop", as the API did for an early end."""
    if reason is None:
        return None
    if reason not in StopReason.ALL:
        raise ValueError(f"unknown stop reason {reason!r}; expected one of {', '.join(StopReason.ALL)}")
    return "length" if reason == StopReason.LENGTH else "stop"


class TokenTextStream:
    """Sampled token ids in, text that may be shown out, and the reason the generation ended.

    ``feed(token)`` returns the text that token makes visible (possibly ""): the token's bytes go through
    ``Utf8Holdback`` and ``StopStringMatcher``. It ends the stream (``stop_reason`` set, ``done`` true) when the
    token is one of ``eog_ids`` (it shows nothing and is counted in ``n_tokens``, as the API's usage counts it),
    when a stop string completes (``matched_stop``), or when it is the ``max_tokens``-th token. The producer calls
    ``stop(reason)`` when the generation ended for a reason only it knows (a grammar complete, a stopping
    criterion, the context full) and ``finish(reason)`` at the end, which flushes what is held (an incomplete
    character becomes U+FFFD; a held partial stop string is released since it never completed) and records
    ``reason`` (default ``StopReason.LENGTH``: the token source ran dry) if nothing ended the stream before.
    ``text`` is everything shown so far; ``finish_reason`` is OpenAI's name for ``stop_reason``.

    ``eog_ids`` None means the tokenizer's end-of-generation tokens; pass ``()`` to treat them as text (a banned
    or ignored EOS). ``special``: whether control tokens show their text (as ``token_to_piece``'s).
    ``resume(max_tokens)`` lets an interactive loop go on after an end token or the budget (llama.cpp's main
    hands control to the user, then generation continues on the same output): held bytes stay held.
    """

    def __init__(self, tokenizer, stops: Iterable[str] | str | None = (), *, eog_ids: Iterable[int] | None = None,
                 special: bool = True, max_tokens: int | None = None):
        if not callable(getattr(tokenizer, "token_to_piece", None)):
            raise TypeError(f"TokenTextStream needs a tokenizer with token_to_piece, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.eog_ids = frozenset(int(t) for t in (tokenizer.eog_ids if eog_ids is None else eog_ids))
        self.special = bool(special)
        self._text = TextStreamer(stops)
        self.n_tokens = 0
        self.stop_reason: str | None = None
        self._limit = self._budget(max_tokens)
        self.finished = False

    @staticmethod
    def _budget(max_tokens) -> int | None:
        if max_tokens is None or max_tokens <= 0:
            return None       # no budget of its own (the token source or the context ends the generation)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise TypeError(f"max_tokens must be an int or None, got {type(max_tokens).__name__}")
        return max_tokens

    @property
    def done(self) -> bool:
        """Whether the generation has ended (no more tokens should be produced)."""
        return self.stop_reason is not None

    @property
    def finish_reason(self) -> str | None:
        return finish_reason(self.stop_reason)

    @property
    def matched_stop(self) -> str | None:
        return self._text.matched_stop

    @property
    def text(self) -> str:
        return self._text.text

    def feed(self, token: int) -> str:
        if self.finished:
            raise ValueError("TokenTextStream.feed called after finish()")
        if self.done:
            raise ValueError(f"TokenTextStream.feed called after the generation ended ({self.stop_reason}); "
                             "resume() first to go on")
        token = int(token)
        self.n_tokens += 1
        if token in self.eog_ids:
            self.stop_reason = StopReason.EOG
            return ""
        text = self._text.feed(self.tokenizer.token_to_piece(token, special=self.special))
        if self._text.stopped:
            self.stop_reason = StopReason.STOP_STRING
        elif self._limit is not None and self.n_tokens >= self._limit:
            self.stop_reason = StopReason.LENGTH
        return text

    def stop(self, reason: str) -> None:
        """Record why the generation ended, unless the stream already knows (the first reason stands)."""
        finish_reason(reason)   # validates
        if self.stop_reason is None:
            self.stop_reason = reason

    def finish(self, reason: str = StopReason.LENGTH) -> str:
        """The generation is over: the held tail (see the class), with ``reason`` recorded if none was."""
        if self.finished:
            return ""
        self.stop(reason)
        self.finished = True
        return self._text.finish()

    def resume(self, max_tokens: int | None = None) -> None:
        """Go on after an end-of-generation token or the budget; ``max_tokens`` more tokens at most (None: no
        budget). A stream that matched a stop string or was finished cannot go on."""
        if self.finished or self._text.stopped:
            raise ValueError("a finished TokenTextStream (or one that matched a stop string) cannot resume")
        limit = self._budget(max_tokens)
        self._limit = None if limit is None else self.n_tokens + limit
        self.stop_reason = None
