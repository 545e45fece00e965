"""Incremental detokenization with stop strings.

Text is produced by decoding a short window of recent tokens (so each step costs O(window),
not O(length)) and withheld while it ends in an incomplete UTF-8 sequence. When stop strings
are set, the last max(len(stop)) - 1 characters are held back until they can no longer
start a match, so no part of a stop string is ever sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Feeds on token ids, yields text deltas; `stopped` is set once a stop string matched."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip)

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Append tokens; return the text that may be sent now (everything left when final)."""
        for token in token_ids:
            if self.stopped:
                break
            self.tokens.append(token)
            prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
            full = self._decode(self.tokens[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix) :]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.tokens)
                self._check_stop()
        limit = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self._hold)
        delta = self.text[self.sent : limit]
        self.sent = limit
        return delta

    def _check_stop(self) -> None:
        if not self.stop:
            return
        window_start = max(0, self.sent - self._hold - 1)
        hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
