"""Incremental detokenization: the token-at-a-time stream of fast tokenizers and the window
of other tokenizers give the same text as decoding everything at once, and hold back stop
strings and incomplete characters."""

from __future__ import annotations

import random

import pytest

from server.engine.detokenizer import IncrementalDetokenizer
from tests.tiny_models import tiny_tokenizer


class _Windowed:
    """A tokenizer seen without its Rust backend: the detokenizer's window path."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def default_tokenizer():
    from server.models.loader import open_checkpoint

    return open_checkpoint(None).tokenizer


def _stream_text(tokenizer: object, ids: list[int], rng: random.Random, skip: bool = True,
                 stop: tuple[str, ...] = ()) -> tuple[str, IncrementalDetokenizer]:
    """Feed `ids` 1-3 at a time, then finish; the text sent."""
    detok = IncrementalDetokenizer(tokenizer, stop, skip_special_tokens=skip)
    sent, i = "", 0
    while i < len(ids):
        n = rng.randrange(1, 4)
        sent += detok.add(ids[i : i + n])
        i += n
    return sent + detok.add([], final=True), detok


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_stream_and_window_equal_whole_decoding(which, default_tokenizer):
    """Random ids (special tokens and byte pieces among them), special tokens skipped or
    kept: both paths send what one decode of every id gives, less the replacement
    characters of bytes at the end that never made a character."""
    tok = tiny_tokenizer() if which == "tiny" else default_tokenizer
    assert IncrementalDetokenizer(tok)._stream is not None  # fast: the stream path
    assert IncrementalDetokenizer(_Windowed(tok))._stream is None
    rng = random.Random(0)
    for _ in range(60):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            whole = tok.decode(ids, skip_special_tokens=skip).rstrip("\ufffd")
            for view in (tok, _Windowed(tok)):
                text, _ = _stream_text(view, ids, random.Random(1), skip)
                assert text == whole, (which, skip, ids)


def test_incomplete_characters_and_stop_strings(default_tokenizer):
    """An emoji's bytes come as separate tokens: nothing is sent until it is whole. A stop
    string ends the text before it, and no part of it is ever sent."""
    tok = default_tokenizer
    ids = tok("ok 😀 done. The end STOP more text", add_special_tokens=False).input_ids
    emoji = tok("😀", add_special_tokens=False).input_ids
    assert len(emoji) > 1  # (byte-level BPE: the 4 bytes do not make one token)
    for view in (tok, _Windowed(tok)):
        detok = IncrementalDetokenizer(view)
        for t in emoji[:-1]:
            assert detok.add([t]) == ""
        assert detok.add(emoji[-1:]) == "😀"
        text, detok = _stream_text(view, ids, random.Random(2), stop=("STOP", "never"))
        assert text == "ok 😀 done. The end " and detok.stopped
        pieces = []
        detok = IncrementalDetokenizer(view, ("STOP",))
        for t in ids:
            pieces.append(detok.add([t]))
        # (sent text is never taken back: had a piece held "S", the join would too)
        assert "".join(pieces) + detok.add([], final=True) == "ok 😀 done. The end "
        # the text may end after the stop string instead; the earliest match wins
        detok = IncrementalDetokenizer(view, ("more", "STOP", "end"), include_stop=True)
        pieces = [detok.add([t]) for t in ids]
        assert "".join(pieces) + detok.add([], final=True) == "ok 😀 done. The end"
