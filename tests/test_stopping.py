"""UTF-8 holdback and stop strings: nothing half-decoded and no part of a stop string ever leaks."""
import random

import pytest

from ggml_backend.generation.stopping import (StopReason, StopStringMatcher, TextStreamer, TokenTextStream,
                                             Utf8Holdback, finish_reason)

MIXED_TEXT = "héllo 世界 🦙🎉 ok ß€𝄞 end"


def feed_all(feeder, chunks):
    outputs = [feeder.feed(chunk) for chunk in chunks]
    return outputs, feeder.finish()


# ---------------------------------------------------------------------------------------------- UTF-8

@pytest.mark.parametrize("text", ["🦙", "世界", "€", "ß", "𝄞", MIXED_TEXT])
def test_utf8_split_at_every_byte_position(text):
    data = text.encode("utf-8")
    for cut in range(len(data) + 1):
        holdback = Utf8Holdback()
        first = holdback.feed(data[:cut])
        assert first == data[:cut].decode("utf-8", errors="ignore")   # only whole characters so far
        assert "\ufffd" not in first
        assert first + holdback.feed(data[cut:]) + holdback.finish() == text


def test_utf8_byte_by_byte_never_emits_partial_characters():
    data = MIXED_TEXT.encode("utf-8")
    holdback = Utf8Holdback()
    emitted = ""
    for i in range(len(data)):
        emitted += holdback.feed(data[i:i + 1])
        assert emitted == data[:i + 1].decode("utf-8", errors="ignore")
        assert (emitted.encode("utf-8") + holdback.pending) == data[:i + 1]
    assert holdback.finish() == "" and emitted == MIXED_TEXT


def test_utf8_incomplete_end_is_flushed_as_replacement_character():
    holdback = Utf8Holdback()
    assert holdback.feed(b"ab\xe2\x82") == "ab"
    assert holdback.pending == b"\xe2\x82"
    assert holdback.finish() == "\ufffd"
    assert holdback.feed(b"x") == "x"          # finish() starts afresh


def test_utf8_invalid_bytes_mid_stream_are_replaced():
    holdback = Utf8Holdback()
    assert holdback.feed(b"\xff") + holdback.feed(b"a") == "\ufffda"
    assert holdback.feed(b"\xf0\x9f") == ""     # start of an emoji ...
    assert holdback.feed(b"b") == "\ufffdb"     # ... cut short by a new character
    with pytest.raises(TypeError):
        holdback.feed("text")


# ---------------------------------------------------------------------------------------------- stop strings

def test_stop_string_split_across_many_feeds():
    matcher = StopStringMatcher(["</answer>"])
    outputs = [matcher.feed(piece) for piece in ["The ans", "wer is 4", "2.<", "/ans", "wer", "> trailing"]]
    assert outputs == ["The ans", "wer is 4", "2.", "", "", ""]
    assert matcher.matched_stop == "</answer>" and matcher.stopped
    assert matcher.finish() == ""
    assert matcher.feed("more") == ""


def test_partial_stop_that_never_completes_is_released():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.feed("a</") == "a"
    assert matcher.held == "</"
    assert matcher.feed("b") == "</b"
    assert matcher.feed("x<") == "x"
    assert matcher.finish() == "<"              # end of generation: the held text was never a stop
    assert not matcher.stopped


def test_stop_at_the_very_start_and_empty_stop_list():
    matcher = StopStringMatcher(["Q:"])
    assert matcher.feed("Q") == "" and matcher.feed(": next") == ""
    assert matcher.matched_stop == "Q:"
    plain = StopStringMatcher([])
    assert plain.feed("Q: <") == "Q: <" and plain.finish() == ""
    assert StopStringMatcher(None).feed("abc") == "abc"
    assert StopStringMatcher(["", ""]).feed("abc") == "abc"   # empty stop strings are ignored
    assert StopStringMatcher("\n").feed("line\nnext") == "line"
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", 3])


def test_overlapping_stops_first_to_complete_wins():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("xabcde") == "xa" and matcher.matched_stop == "bc"
    matcher = StopStringMatcher(["b", "ab"])      # both end at the same place: the one starting first
    assert matcher.feed("zab") == "z" and matcher.matched_stop == "ab"
    matcher = StopStringMatcher(["aab"])         # a self-overlapping stop
    assert matcher.feed("aa") == "" and matcher.feed("aab") == "aa" and matcher.matched_stop == "aab"


def test_multibyte_stop_strings():
    matcher = StopStringMatcher(["世界"])
    assert matcher.feed("你好世") == "你好" and matcher.feed("界!") == ""
    assert matcher.matched_stop == "世界"


def reference_cut(text, stops):
    """What the whole text becomes: cut before the stop occurrence that ends first (ties: starts first)."""
    best = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best):
            best = (start + len(stop), start)
    return text if best is None else text[:best[1]]


def random_splits(rng, sequence, max_pieces):
    cuts = sorted(rng.sample(range(1, len(sequence)), min(len(sequence) - 1, rng.randint(0, max_pieces))))
    bounds = [0] + cuts + [len(sequence)]
    return [sequence[a:b] for a, b in zip(bounds, bounds[1:])]


def test_property_stop_strings_never_leak_under_random_splits():
    rng = random.Random(1234)
    alphabet = "ab<>/世界 "
    for _ in range(600):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        expected = reference_cut(text, stops)
        for _ in range(5):
            matcher = StopStringMatcher(stops)
            emitted = ""
            for piece in random_splits(rng, text, 12):
                emitted += matcher.feed(piece)
                assert expected.startswith(emitted), (text, stops, emitted)   # nothing beyond the cut, ever
                if matcher.stopped:
                    break
            emitted += matcher.finish()
            assert emitted == expected, (text, stops)
            assert matcher.stopped == any(stop in text for stop in stops)


# ---------------------------------------------------------------------------------------------- streamer

def test_streamer_bytes_in_safe_text_out_property():
    rng = random.Random(99)
    pieces = ["🦙", "世界", "€", "<|im_end|>", "ab", " ", "\n", "é"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        stops = rng.choice([[], ["<|im_end|>"], ["世界"], ["🦙\n", "é "], ["<|im"]])
        expected = reference_cut(text, stops)
        streamer = TextStreamer(stops)
        streamed = ""
        for token_bytes in random_splits(rng, text.encode("utf-8"), 20):
            chunk = streamer.feed(token_bytes)
            assert "\ufffd" not in chunk
            streamed += chunk
            assert expected.startswith(streamed)
        streamed += streamer.finish()
        assert streamed == expected == streamer.text
        assert streamer.stopped == any(stop in text for stop in stops)


def test_streamer_flushes_held_text_at_the_end():
    streamer = TextStreamer(["<|im_end|>"])
    assert streamer.feed(b"Hi <|im") == "Hi "
    assert streamer.feed(b"\xe4\xb8") == ""          # half of a CJK character, after a held partial stop
    assert streamer.finish() == "<|im\ufffd"
    assert streamer.text == "Hi <|im\ufffd" and not streamer.stopped
    with pytest.raises(ValueError, match="after finish"):
        streamer.feed(b"x")


def test_streamer_stop_ends_the_text():
    streamer = TextStreamer(["\n\n"])
    outputs = [streamer.feed(b) for b in [b"one\n", b"\ntwo", b"three"]]
    assert outputs == ["one", "", ""]
    assert streamer.stopped and streamer.matched_stop == "\n\n"
    assert streamer.finish() == "" and streamer.text == "one"


# ---------------------------------------------------------------------------------------------- token stream

class ByteTokenizer:
    """Token i < 256 is byte i; 256 is an end-of-generation token, 257 a control token whose text is "<ctl>"."""
    eog_ids = {256}

    def token_to_piece(self, token, special=True):
        if token == 256:
            return b"</s>" if special else b""
        if token == 257:
            return b"<ctl>" if special else b""
        return bytes([token])


def byte_tokens(text):
    return list(text.encode("utf-8"))


def test_token_stream_ends_on_end_token_and_counts_it():
    out = TokenTextStream(ByteTokenizer())
    shown = "".join(out.feed(t) for t in byte_tokens("hé")[:2])   # "h" and the first byte of "é"
    assert shown == "h" and not out.done
    assert out.feed(256) == "" and out.stop_reason == StopReason.EOG and out.finish_reason == "stop"
    assert out.n_tokens == 3
    with pytest.raises(ValueError, match="ended"):
        out.feed(104)
    assert out.finish() == "\ufffd"              # the incomplete character, flushed at the end
    assert out.stop_reason == StopReason.EOG      # finish() keeps the reason the stream found
    with pytest.raises(ValueError, match="after finish"):
        out.feed(104)


def test_token_stream_stop_string_budget_and_outside_reasons():
    out = TokenTextStream(ByteTokenizer(), ["\n\n"], max_tokens=100)
    shown = "".join(out.feed(t) for t in byte_tokens("one\n\n"))
    assert shown == "one" and out.stop_reason == StopReason.STOP_STRING and out.matched_stop == "\n\n"
    assert out.finish(StopReason.LENGTH) == "" and out.stop_reason == StopReason.STOP_STRING
    budget = TokenTextStream(ByteTokenizer(), ["xyz"], max_tokens=3)
    shown = [budget.feed(t) for t in byte_tokens("abx")]
    assert shown == ["a", "b", ""] and budget.stop_reason == StopReason.LENGTH and budget.finish_reason == "length"
    assert budget.finish() == "x"                  # the held partial stop string never completed
    grammar = TokenTextStream(ByteTokenizer())
    grammar.feed(97)
    grammar.stop(StopReason.GRAMMAR)
    grammar.stop(StopReason.CRITERION)            # the first reason stands
    assert grammar.stop_reason == StopReason.GRAMMAR and grammar.finish_reason == "stop"
    with pytest.raises(ValueError, match="unknown stop reason"):
        TokenTextStream(ByteTokenizer()).stop("bored")
    assert finish_reason(None) is None and finish_reason(StopReason.INTERRUPTED) == "stop"
    with pytest.raises(TypeError):
        TokenTextStream(object())
    with pytest.raises(TypeError):
        TokenTextStream(ByteTokenizer(), max_tokens=2.5)


def test_token_stream_banned_end_token_special_text_and_resume():
    banned = TokenTextStream(ByteTokenizer(), eog_ids=(), special=True)
    assert banned.feed(256) == "</s>" and banned.feed(257) == "<ctl>" and not banned.done
    plain = TokenTextStream(ByteTokenizer(), eog_ids=(), special=False)
    assert plain.feed(257) == "" and plain.feed(97) == "a"
    # an interactive loop: a budget of 2, then the stretch resumes; a character split across stretches is whole
    session = TokenTextStream(ByteTokenizer(), max_tokens=2)
    emoji = byte_tokens("🦙")
    assert session.feed(104) + session.feed(emoji[0]) == "h" and session.stop_reason == StopReason.LENGTH
    session.resume()
    assert "".join(session.feed(t) for t in emoji[1:]) == "🦙" and not session.done
    assert session.feed(256) == "" and session.stop_reason == StopReason.EOG
    session.resume(max_tokens=1)
    assert session.feed(33) == "!" and session.stop_reason == StopReason.LENGTH
    assert session.finish() == "" and session.text == "h🦙!"
    with pytest.raises(ValueError, match="cannot resume"):
        session.resume()
    stopped = TokenTextStream(ByteTokenizer(), ["a"])
    stopped.feed(97)
    with pytest.raises(ValueError, match="cannot resume"):
        stopped.resume()


def test_token_stream_real_tokenizer_matches_detokenize(qwen_tokenizer):
    """With a real byte-level BPE vocabulary (emoji and CJK split over byte tokens) the streamed text is the text."""
    tokenizer = qwen_tokenizer
    text = "héllo 世界 🦙🎉 — ok\n<tag>"
    ids = tokenizer.encode(text, add_bos=False)
    out = TokenTextStream(tokenizer, ["<tag>"])
    streamed = "".join(out.feed(t) for t in ids) + out.finish()
    assert streamed == text[:text.index("<tag>")] and out.stop_reason == StopReason.STOP_STRING
