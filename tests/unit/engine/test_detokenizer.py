"""Incremental detokenization: split UTF-8 characters, stop strings with hold-back."""

from __future__ import annotations

from helpers import ByteTokenizer

from server.engine.detokenizer import IncrementalDetokenizer


def feed(detok, data: bytes, step: int = 1) -> list[str]:
    return [detok.add(list(data[i:i + step])) for i in range(0, len(data), step)]


def test_multibyte_characters_are_never_split():
    text = "héllo → 世界 🙂!"
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = feed(detok, text.encode())
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_truncates_and_is_not_emitted():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["STOP"])
    deltas = feed(detok, b"abc STO")
    assert "".join(deltas) == "abc "          # "STO" held back: might start a stop string
    assert not detok.stopped
    delta = detok.add(list(b"P and more"))
    assert detok.stopped and "".join(deltas) + delta + detok.flush() == "abc "


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["xyz"])
    out = "".join(feed(detok, b"axy"))
    out += detok.add(list(b"a"))
    assert not detok.stopped
    assert out + detok.flush() == "axya"


def test_stop_string_spanning_many_tokens_in_one_step():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["\n\n", "END"])
    delta = detok.add(list(b"first line\n\nsecond"))
    assert detok.stopped and delta == "first line"
