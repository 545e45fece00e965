"""Prompt-lookup drafter: hand-made sequences, edge cases, and the incremental index
checked against a brute-force search on every prefix of random histories."""

from __future__ import annotations

import random

import pytest

from drafters.base import DraftBatch, DraftRequest, History, Proposal, create_drafter
from drafters.ngram import NgramDrafter


def _propose(
    drafter: NgramDrafter, tokens: list[int], k: int = 8, request_id: str = "r"
) -> list[int]:
    (proposal,) = drafter.propose(DraftBatch([DraftRequest(request_id, tokens, k)]))
    assert proposal.probs is None
    assert len(proposal.token_ids) <= k
    return proposal.token_ids


def _brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Reference: longest n first, scan earlier starts from the most recent backwards."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_registered_with_kwargs() -> None:
    drafter = create_drafter("ngram", min_n=2, max_n=3)
    assert isinstance(drafter, NgramDrafter)
    assert (drafter.min_n, drafter.max_n) == (2, 3)
    assert not drafter.needs_hidden_states
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(min_n=0)
    with pytest.raises(ValueError, match="max_n"):
        NgramDrafter(min_n=3, max_n=2)


def test_history_shorter_than_n_or_without_match() -> None:
    drafter = NgramDrafter(min_n=1, max_n=4)
    assert _propose(drafter, [], request_id="empty") == []
    assert _propose(drafter, [5], request_id="one") == []
    assert _propose(drafter, [1, 2, 3], request_id="distinct") == []
    assert _propose(NgramDrafter(min_n=3, max_n=4), [1, 2, 1, 2]) == []


def test_proposes_continuation_capped_by_k_and_history_end() -> None:
    tokens = [1, 2, 3, 4, 1, 2]
    assert _propose(NgramDrafter(max_n=2), tokens, k=3) == [3, 4, 1]
    assert _propose(NgramDrafter(max_n=2), tokens, k=10) == [3, 4, 1, 2]
    assert _propose(NgramDrafter(max_n=2), tokens, k=1) == [3]


def test_match_at_the_end_does_not_propose_past_it() -> None:
    # The suffix itself never counts; the latest earlier [7, 7] starts at 1 and only
    # the final 7 follows it.
    assert _propose(NgramDrafter(min_n=2, max_n=2), [7, 7, 7, 7], k=5) == [7]
    assert _propose(NgramDrafter(min_n=1, max_n=1), [3, 9, 3], k=5) == [9, 3]


def test_most_recent_match_wins() -> None:
    tokens = [1, 2, 9, 1, 2, 8, 1, 2]
    assert _propose(NgramDrafter(max_n=2), tokens, k=2) == [8, 1]


def test_longest_n_wins_over_more_recent_shorter_match() -> None:
    tokens = [3, 1, 4, 7, 2, 1, 4, 8, 3, 1, 4]
    assert _propose(NgramDrafter(min_n=1, max_n=3), tokens, k=1) == [7]
    assert _propose(NgramDrafter(min_n=1, max_n=2), tokens, k=1) == [8]


def test_one_proposal_per_request_in_order() -> None:
    drafter = NgramDrafter()
    batch = DraftBatch(
        [
            DraftRequest("a", [1, 2, 3, 1], 2),
            DraftRequest("b", [4, 5], 2),
            DraftRequest("c", [6, 6, 6], 1),
        ]
    )
    proposals = drafter.propose(batch)
    assert proposals == [Proposal([2, 3]), Proposal([]), Proposal([6])]


def test_incremental_index_matches_brute_force_on_every_prefix() -> None:
    rng = random.Random(0)
    drafter = NgramDrafter(min_n=2, max_n=4)
    histories = {f"r{i}": [rng.randrange(4) for _ in range(rng.randrange(0, 6))] for i in range(4)}
    for _ in range(60):
        for tokens in histories.values():
            # (1-4 new starts are stored one by one, more through dict.update)
            tokens.extend(rng.randrange(4) for _ in range(rng.randrange(1, 10)))
        requests = [DraftRequest(rid, list(t), 5) for rid, t in histories.items()]
        proposals = drafter.propose(DraftBatch(requests))
        for request, proposal in zip(requests, proposals, strict=True):
            expected = _brute_force(list(request.token_ids), 5, 2, 4)
            assert proposal.token_ids == expected, request.token_ids


def test_history_that_is_not_an_extension_rebuilds_the_index() -> None:
    drafter = NgramDrafter(min_n=1, max_n=2)
    assert _propose(drafter, [1, 2, 3, 1], k=2) == [2, 3]
    # Same id, shorter history, then a diverging one of the same length.
    assert _propose(drafter, [5, 6, 5], k=2) == [6, 5]
    assert _propose(drafter, [9, 6, 9], k=2) == [6, 9]
    assert _propose(drafter, [9, 6, 9, 4], k=2) == []


def test_release_forgets_the_request() -> None:
    drafter = NgramDrafter()
    _propose(drafter, [1, 2, 1], request_id="x")
    assert "x" in drafter._indexes
    drafter.release("x")
    drafter.release("never-seen")
    assert "x" not in drafter._indexes
    assert _propose(drafter, [4, 4], request_id="x") == [4]


def test_history_reads_as_the_joined_lists() -> None:
    """`History` (prompt, output, a step's new tokens: what the engine hands drafters)
    indexes, slices and iterates as their concatenation, and drafts from it match drafts
    from the copied list."""
    rng = random.Random(1)
    for _ in range(200):
        parts = [[rng.randrange(5) for _ in range(rng.randrange(0, 6))] for _ in range(3)]
        history, joined = History(*parts), parts[0] + parts[1] + parts[2]
        assert len(history) == len(joined) and list(history) == joined
        for start in range(-7, 8):
            for stop in (*range(-7, 8), None):
                assert history[start:stop] == joined[start:stop]
            assert history[start::2] == joined[start::2]
            if -len(joined) <= start < len(joined):
                assert history[start] == joined[start]
            else:
                with pytest.raises(IndexError):
                    history[start]
    drafter, copied = NgramDrafter(), NgramDrafter()
    prompt, output = [1, 2, 3, 4, 1, 2], []
    for new in ([3], [5, 1], [2, 3, 4], [1]):
        got = _propose(drafter, History(prompt, output, new), request_id="h")
        assert got == _propose(copied, prompt + output + new, request_id="c")
        output.extend(new)


def test_a_prediction_is_walked_forward_before_the_history() -> None:
    """A request's predicted output is looked in first: what follows the history's last n
    tokens there, at their first occurrence after where the previous draft from it began,
    so that a prediction whose lines repeat is followed in order; where it has no match,
    the history's own lookup drafts."""
    prediction = [10, 1, 2, 30, 1, 2, 40, 50]
    drafter = NgramDrafter(min_n=1, max_n=2)

    def propose(history: list[int], k: int = 3) -> list[int]:
        (proposal,) = drafter.propose(DraftBatch([DraftRequest("p", history, k,
                                                               prediction=prediction)]))
        return proposal.token_ids

    assert propose([7, 8, 10]) == [1, 2, 30]  # (the prompt 7, 8; 10 generated)
    assert propose([7, 8, 10, 1, 2]) == [30, 1, 2]  # the first "1, 2", where it left off
    assert propose([7, 8, 10, 1, 2, 30, 1, 2]) == [40, 50]  # then the second
    # the history's lookup where the prediction has nothing: "7, 8" occurred before
    assert propose([7, 8, 10, 1, 2, 30, 1, 2, 99, 7]) == [8, 10, 1]
    drafter.release("p")
    assert "p" not in drafter._predictions
