"""The text side of generation: token bytes -> complete UTF-8 characters -> text that cannot be part of a stop string.

Tokens are byte strings, and one character may be split over several of them (byte-fallback tokens, BPE pieces of
an emoji), so ``Utf8Holdback`` only lets whole characters through. A stop string may likewise arrive over several
tokens, so ``StopStringMatcher`` holds back any tail of the text that could still grow into a stop string and never
emits any part of a stop string. ``TextStreamer`` chains the two; the API uses it both for ``stream=True`` chunks
and for the final text, so both always agree.
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
