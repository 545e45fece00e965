"""Prompt-lookup drafting: propose what followed the latest earlier occurrence of the
request's last n tokens in its own prompt and output (prompt lookup decoding, as in vLLM's
ngram proposer). No model, no training, deterministic proposals (one-hot q). A request's
predicted output (OpenAI's `prediction`) is looked in first, walked forward: the first
occurrence of the last n tokens after where the previous draft from it began.

Each request keeps an incremental index from every n-gram of its history (min_n <= n <=
max_n) to the most recent position where it occurred with at least one token after it.
A step therefore costs O(new tokens * number of n) index updates plus one dictionary lookup
per n, whatever the history length; building the index for a new prompt is one pass done
by dict.update over zipped slices (a few milliseconds for a few thousand tokens).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from drafters.base import DraftBatch, Drafter, Proposal, register_drafter

_FEW = 4
"""New starts up to which `sync` stores n-grams one by one (2 new tokens: 4.3 us a sync
against 9.2 through zipped slices, on this repo's CPU); more go through dict.update."""


class _NgramIndex:
    """The n-gram index of one request's append-only history.

    Invariant: `last_start[n][g]` is the largest i with tokens[i:i + n] == g and
    i + n < len(tokens) (the n-gram is followed by at least one token).
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.tokens: list[int] = []
        # Ordered longest n first, the order in which `lookup` tries them.
        self.last_start: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(max_n, min_n - 1, -1)
        }

    def sync(self, token_ids: Sequence[int]) -> None:
        """Extend the index to `token_ids`; rebuild it if they do not extend the history."""
        seen = len(self.tokens)
        if len(token_ids) < seen or (seen and int(token_ids[seen - 1]) != self.tokens[-1]):
            self.tokens = []
            for table in self.last_start.values():
                table.clear()
            seen = 0
        self.tokens.extend(map(int, token_ids[seen:]))
        tokens = self.tokens
        for n, table in self.last_start.items():
            # Already indexed: starts i with i + n <= seen - 1. New: up to len - n - 1.
            lo, hi = max(0, seen - n), len(tokens) - n
            # Later starts overwrite earlier ones: the most recent occurrence wins.
            if hi - lo <= _FEW:  # a decode step's few tokens: plain stores are cheaper
                for i in range(lo, hi):
                    table[tuple(tokens[i : i + n])] = i
            elif lo < hi:
                grams = zip(*(tokens[lo + j : hi + j] for j in range(n)), strict=True)
                table.update(zip(grams, range(lo, hi), strict=True))

    def lookup(self, max_tokens: int) -> list[int]:
        """The tokens after the most recent earlier match of the longest matching suffix."""
        tokens = self.tokens
        for n, table in self.last_start.items():
            if len(tokens) <= n:
                continue
            start = table.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start + n : start + n + max_tokens]
        return []


class _Prediction:
    """A request's predicted output: every start of each n-gram (min_n <= n <= max_n) in
    it, and where the last draft taken from it began."""

    def __init__(self, tokens: Sequence[int], min_n: int, max_n: int) -> None:
        self.tokens = list(map(int, tokens))
        self.starts: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for n in range(max_n, min_n - 1, -1):
            table: dict[tuple[int, ...], list[int]] = {}
            for i in range(len(self.tokens) - n):  # (followed by at least one token)
                table.setdefault(tuple(self.tokens[i:i + n]), []).append(i)
            self.starts[n] = table
        self.cursor = -1  # (no draft taken yet)

    def lookup(self, history: list[int], max_tokens: int) -> list[int]:
        """What follows the longest suffix of `history` (ints: `_NgramIndex.tokens`) found
        in the prediction, at its first occurrence after the cursor (the history has grown
        since: a match that follows the last one starts later), else its last at or before
        it."""
        for n, table in self.starts.items():
            if len(history) < n:
                continue
            starts = table.get(tuple(history[-n:]))
            if starts:
                at = bisect_right(starts, self.cursor)
                start = starts[at] if at < len(starts) else starts[-1]
                self.cursor = start
                return self.tokens[start + n : start + n + max_tokens]
        return []


@register_drafter
class NgramDrafter(Drafter):
    """Prompt-lookup drafter: tries n = max_n down to min_n, the most recent match wins, and
    proposes up to `max_draft_tokens` of the tokens that followed it (never past the end of
    the history); no match gives an empty proposal.

    Keeps one index per request id until `release`.
    """

    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if min_n < 1:
            raise ValueError(f"min_n must be >= 1, got {min_n}")
        if max_n < min_n:
            raise ValueError(f"max_n must be >= min_n ({min_n}), got {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self._indexes: dict[str, _NgramIndex] = {}
        self._predictions: dict[str, _Prediction] = {}

    def propose(self, batch: DraftBatch) -> list[Proposal]:
        proposals = []
        for request in batch.requests:
            index = self._indexes.get(request.request_id)
            if index is None:
                index = self._indexes[request.request_id] = _NgramIndex(self.min_n, self.max_n)
                if request.prediction:
                    self._predictions[request.request_id] = _Prediction(
                        request.prediction, self.min_n, self.max_n)
            index.sync(request.token_ids)
            predicted = self._predictions.get(request.request_id)
            drafts = (predicted.lookup(index.tokens, request.max_draft_tokens)
                      if predicted is not None else [])
            proposals.append(Proposal(token_ids=drafts or index.lookup(request.max_draft_tokens)))
        return proposals

    def release(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
        self._predictions.pop(request_id, None)
