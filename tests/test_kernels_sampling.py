"""The Gumbel race's score kernel (interpreted on CPU) against its torch reference,
exactly: ragged last slices, -inf scores (filtered tokens), seeds and positions at the
ends of the int64 range; and the reference's law (softmax of the scores' x / t)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.sampling import race_scores_reference, race_tokens  # noqa: E402

triton_sample = pytest.importorskip("kernels.triton_sample")


@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 1000), (5, 3000), (2, 49152)])
def test_kernel_equals_reference(rows: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g) * 3
    x[0, : vocab // 2] = float("-inf")
    t = torch.rand(rows, generator=g) + 0.3
    seeds = torch.tensor([1, -5, 2**62, -(2**63), 2**63 - 1])[:rows]
    positions = torch.tensor([0, 3, 7, 100, 2**40])[:rows]
    ref = race_scores_reference(x, t, seeds, positions)
    out = triton_sample.race_scores(x, t, seeds, positions)
    assert torch.equal(out, ref)
    assert torch.isinf(out[0, : vocab // 2]).all() and torch.isfinite(out[0, vocab // 2:]).all()
    bad = torch.zeros(1, vocab, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        triton_sample.race_scores(bad, t[:1], seeds[:1], positions[:1])


def test_race_draws_softmax() -> None:
    """40,000 races of one row (a seed each): each token's share within 4.5 standard errors
    of softmax(x / t)."""
    n, x = 40_000, torch.tensor([[2.0, 1.0, 0.5, -1.0, float("-inf"), 0.0]])
    tokens = race_tokens(x.expand(n, -1), torch.full((n,), 1.5), torch.arange(n) + 11,
                         torch.zeros(n, dtype=torch.int64))
    share = torch.bincount(tokens, minlength=6).double() / n
    expected = torch.softmax(x[0].double() / 1.5, dim=0)
    assert ((share - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt()).all()
    assert share[4] == 0
