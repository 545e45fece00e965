"""Verification: greedy and sampled rules on hand-built p and q, and a statistical test that
speculative sampling is lossless (the joint law of the first tokens equals the target's),
which a deliberately wrong acceptance rule fails."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from drafters.verify import (
    residual_weights,
    sample_inverse_cdf,
    verify_greedy,
    verify_sampled,
    verify_sampled_batch,
)

Rule = Callable[[list[int], torch.Tensor, "torch.Tensor | None", torch.Generator], list[int]]


def _probs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- greedy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draft", "target", "expected"),
    [
        ([5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8]),  # all accepted + bonus
        ([5, 6, 7], [5, 9, 7, 8], [5, 9]),  # first mismatch at 1
        ([5, 6, 7], [1, 6, 7, 8], [1]),  # mismatch at 0
        ([5, 6, 7], [5, 6, 3, 8], [5, 6, 3]),  # mismatch at the last draft
        ([], [4], [4]),  # nothing drafted: the target's token
    ],
)
def test_verify_greedy(draft: list[int], target: list[int], expected: list[int]) -> None:
    assert verify_greedy(draft, target) == expected


def test_verify_greedy_rejects_wrong_lengths() -> None:
    with pytest.raises(AssertionError):
        verify_greedy([1, 2], [1, 2])


# --- sampled, hand-built -------------------------------------------------------------


def test_residual_weights_hand_values() -> None:
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.5, 0.1, 0.2])
    torch.testing.assert_close(residual_weights(p, q, 1), torch.tensor([0.3, 0.0, 0.1, 0.0]))
    # one-hot q on token 0: p with that token removed
    torch.testing.assert_close(residual_weights(p, None, 0), torch.tensor([0.0, 0.3, 0.2, 0.0]))


def test_sample_inverse_cdf_skips_zero_weights() -> None:
    weights = torch.tensor([0.0, 0.25, 0.0, 0.75]).expand(4, 4)
    assert sample_inverse_cdf(weights, [0.0, 0.2499, 0.25, 1.0 - 2.0**-53]) == [1, 1, 3, 3]
    # A row of zero mass (the residual of p == q) is drawn from its fallback row (p).
    weights = torch.stack([torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 1e-3])])
    fallback = [torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])]
    assert sample_inverse_cdf(weights, [0.5, 0.5], fallback) == [2, 3]
    with pytest.raises(AssertionError, match="all-zero"):
        sample_inverse_cdf(torch.zeros(1, 4), [0.5])


def test_p_equal_q_accepts_everything_plus_bonus() -> None:
    q = _probs([0.5, 0.25, 0.25], [0.1, 0.6, 0.3])
    p = torch.cat([q, _probs([0.0, 0.0, 1.0])])
    for seed in range(50):
        out = verify_sampled([1, 0], p, q, torch.Generator().manual_seed(seed))
        assert out == [1, 0, 2]


def test_zero_target_probability_is_always_rejected() -> None:
    q = _probs([0.0, 1.0, 0.0], [0.5, 0.5, 0.0])
    p = _probs([0.0, 1.0, 0.0], [0.0, 0.3, 0.7], [1.0, 0.0, 0.0])
    seen = set()
    for seed in range(200):
        out = verify_sampled([1, 0], p, q, torch.Generator().manual_seed(seed))
        assert out[:1] == [1] and len(out) == 2
        seen.add(out[1])
    # residual max(0, p - q) = [0, 0, 0.7]: only token 2 can replace the rejected 0
    assert seen == {2}


def test_one_hot_draft_of_a_peaked_target_equals_greedy() -> None:
    p = _probs([0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    argmax = p.argmax(dim=-1).tolist()
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        assert verify_sampled(argmax[:3], p, None, gen) == verify_greedy(argmax[:3], argmax)
        assert verify_sampled([1, 2, 2], p, None, gen) == verify_greedy([1, 2, 2], argmax)


def test_same_seed_same_tokens() -> None:
    gen = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(5, 50, generator=gen), dim=-1)
    q = torch.softmax(torch.randn(4, 50, generator=gen), dim=-1)
    runs = [verify_sampled([3, 1, 4, 1], p, q, torch.Generator().manual_seed(1)) for _ in "ab"]
    assert runs[0] == runs[1]
    assert 1 <= len(runs[0]) <= 5


def test_batch_gives_the_per_request_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    vocab, drafts = 12, [[1, 2, 3], [], [4, 4], [5, 0, 7, 9], [2]]
    p = torch.softmax(2 * torch.randn(sum(len(d) + 1 for d in drafts), vocab, generator=gen), -1)
    qs = [torch.softmax(torch.randn(len(d), vocab, generator=gen), -1) for d in drafts]
    qs[2] = None  # a deterministic drafter's request
    for seed in range(30):
        gens = [torch.Generator().manual_seed(seed * 10 + r) for r in range(len(drafts))]
        batched = verify_sampled_batch(drafts, p, qs, gens)
        gens = [torch.Generator().manual_seed(seed * 10 + r) for r in range(len(drafts))]
        rows = torch.tensor([len(d) + 1 for d in drafts]).cumsum(0).tolist()
        alone = [
            verify_sampled(d, p[end - len(d) - 1 : end], q, g)
            for d, q, g, end in zip(drafts, qs, gens, rows, strict=True)
        ]
        assert batched == alone
        assert all(out[:-1] == d[: len(out) - 1] for out, d in zip(alone, drafts, strict=True))


# --- statistics ------------------------------------------------------------------------


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson statistic over cells with p > 0 and its 1e-3 critical value
    (Wilson-Hilferty); any count in a p == 0 cell makes the statistic infinite."""
    n = counts.sum().item()
    support = probs > 0
    if counts[~support].sum() > 0:
        return math.inf, 0.0
    expected = probs[support].double() * n
    stat = ((counts[support].double() - expected) ** 2 / expected).sum().item()
    df = int(support.sum()) - 1
    z = 3.0902  # upper 1e-3 quantile of N(0, 1)
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


def _first_token_counts(
    rule: Rule, draft: int, p: torch.Tensor, q: torch.Tensor | None, n: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(p.shape[-1])
    target = torch.stack([p, torch.full_like(p, 1 / p.numel())])
    draft_probs = None if q is None else q[None]
    for _ in range(n):
        counts[rule([draft], target, draft_probs, gen)[0]] += 1
    return counts


def test_one_hot_q_with_argmax_draft_emits_p() -> None:
    p = torch.tensor([0.05, 0.4, 0.15, 0.0, 0.1, 0.3])
    stat, critical = _chi_square(_first_token_counts(verify_sampled, 1, p, None, 3000), p)
    assert stat < critical


def test_reported_zero_q_for_the_drafted_token_stays_lossless() -> None:
    p = torch.tensor([0.05, 0.4, 0.15, 0.0, 0.1, 0.3])
    q = torch.tensor([0.5, 0.0, 0.1, 0.2, 0.1, 0.1])  # token 1 drafted although q(1) == 0
    stat, critical = _chi_square(_first_token_counts(verify_sampled, 1, p, q, 3000), p)
    assert stat < critical


# --- lossless speculation on a tiny Markov "model" -------------------------------------

VOCAB, START, SAMPLES = 8, 0, 3000


def _markov_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """[VOCAB, VOCAB] next-token tables: target p and a sharper, different draft q."""
    gen = torch.Generator().manual_seed(42)
    p = torch.rand(VOCAB, VOCAB, generator=gen) + 0.5
    q = torch.rand(VOCAB, VOCAB, generator=gen) ** 3
    rows = torch.arange(VOCAB)
    p[rows, (rows + 3) % VOCAB] = 0.0  # q drafts these, the target never emits them
    q[rows, (rows + 5) % VOCAB] = 0.0  # q never drafts these; only residuals emit them
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _speculate(rule: Rule, k: int, length: int = 2) -> torch.Tensor:
    """Counts of the first `length` tokens over SAMPLES seeded speculative generations."""
    p, q = _markov_tables()
    verify_gen = torch.Generator().manual_seed(1)
    draft_gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(VOCAB**length)
    for _ in range(SAMPLES):
        out: list[int] = []
        while len(out) < length:
            context = [out[-1] if out else START]
            for _ in range(k):
                context.append(int(torch.multinomial(q[context[-1]], 1, generator=draft_gen)))
            out += rule(context[1:], p[context], q[context[:-1]], verify_gen)
        counts[sum(t * VOCAB**i for i, t in enumerate(reversed(out[:length])))] += 1
    return counts


def _exact_first_two() -> torch.Tensor:
    p, _ = _markov_tables()
    return (p[START][:, None] * p).flatten()  # P(a, b) = p(a | START) p(b | a)


def _uniform(gen: torch.Generator) -> float:
    return torch.rand(1, generator=gen, dtype=torch.float64).item()


def _sample(row: torch.Tensor, gen: torch.Generator) -> list[int]:
    return sample_inverse_cdf(row[None], [_uniform(gen)])


def _wrong_always_accept(
    draft: list[int], p: torch.Tensor, q: torch.Tensor | None, gen: torch.Generator
) -> list[int]:
    return draft + _sample(p[len(draft)], gen)


def _wrong_resample_from_p(
    draft: list[int], p: torch.Tensor, q: torch.Tensor | None, gen: torch.Generator
) -> list[int]:
    assert q is not None
    for i, token in enumerate(draft):
        if _uniform(gen) * q[i, token].item() >= p[i, token].item():
            return draft[:i] + _sample(p[i], gen)
    return draft + _sample(p[len(draft)], gen)


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_is_lossless(k: int) -> None:
    stat, critical = _chi_square(_speculate(verify_sampled, k), _exact_first_two())
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}: output law changed"


@pytest.mark.parametrize("wrong_rule", [_wrong_always_accept, _wrong_resample_from_p])
def test_wrong_rules_fail_the_same_test(wrong_rule: Rule) -> None:
    stat, critical = _chi_square(_speculate(wrong_rule, 2), _exact_first_two())
    assert stat > critical
