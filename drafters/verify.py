"""Lossless verification of draft tokens against the target model.

Greedy requests accept the longest draft prefix equal to the target's argmax, then take the
target's own token (at the first mismatch, or the bonus token after the last draft).

Sampled requests use exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023),
which makes every emitted token distributed exactly as if the target had sampled it alone:

- draft token i, x, is accepted with probability min(1, p_i(x) / q_i(x));
- at the first rejection the replacement is drawn from norm(max(0, p_i - q_i)) and
  verification stops there;
- when all k draft tokens are accepted, a bonus token is drawn from p_k.

p is the target's fully processed distribution (temperature, top-k/p, min-p and penalties
already applied by the sampler), so every sampling parameter stays supported. A drafter that
gives no probabilities is verified with one-hot q on the proposed token. That rule is exact
however the token was chosen: P(emit y) = r(y) p(y) + sum_{x != y} r(x) (1 - p(x)) p(y) /
(1 - p(x)) = p(y) for any proposal distribution r. It is therefore also the guard for a
drafted token whose reported q(x) is 0, which a correct drafter never produces.

All randomness is drawn from the request's `torch.Generator` as uniforms (k + 1 per
request, whatever the outcome) and samples are taken by inverse CDF, so a seeded request
reproduces, the generator may live on another device than the probabilities, and the batched
variant gives exactly the tokens of the per-request one with two device-to-host transfers
per batch.
"""

from __future__ import annotations

import torch

_MIN_RESIDUAL_MASS = 1e-6
"""Below this total mass the residual max(0, p - q) is float rounding of p == q, not a
distribution: sample from p instead. A rejection there has probability < 1e-6, so this
moves the output distribution by less than 1e-6 in total variation."""


def verify_greedy(draft_token_ids: list[int], target_token_ids: list[int]) -> list[int]:
    """Accept the longest draft prefix equal to the target's choices, plus one target token.

    `target_token_ids[i]` is the target's argmax at draft position i; the last entry is its
    choice after the final draft token. Returns 1..len(draft_token_ids) + 1 tokens.
    """
    assert len(target_token_ids) == len(draft_token_ids) + 1, (
        f"need {len(draft_token_ids) + 1} target tokens, got {len(target_token_ids)}"
    )
    accepted = 0
    for draft, target in zip(draft_token_ids, target_token_ids[:-1], strict=True):
        if draft != target:
            break
        accepted += 1
    return list(target_token_ids[: accepted + 1])


def verify_sampled(
    draft_token_ids: list[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """Exact speculative sampling of one request's draft.

    target_probs: [k + 1, vocab] processed target distributions p (rows sum to 1); row i is
    the distribution at draft position i, row k the one after the last draft token.
    draft_probs: [k, vocab] the distributions q the draft tokens were drawn from, or None
    for a deterministic drafter (one-hot q). Returns the accepted draft prefix followed by
    one token drawn from the residual (first rejection) or from p_k (bonus): 1..k + 1 tokens.
    """
    k = len(draft_token_ids)
    assert target_probs.dim() == 2 and target_probs.shape[0] == k + 1, (
        f"target_probs must be [{k + 1}, vocab], got {list(target_probs.shape)}"
    )
    return verify_sampled_batch([draft_token_ids], target_probs, [draft_probs], [generator])[0]


def verify_sampled_batch(
    draft_token_ids: list[list[int]],
    target_probs: torch.Tensor,
    draft_probs: list[torch.Tensor | None],
    generators: list[torch.Generator | None],
) -> list[list[int]]:
    """`verify_sampled` for several requests at once, with identical results.

    target_probs: [sum(k_i + 1), vocab], each request's k_i + 1 rows one after the other.
    draft_probs[i]: [k_i, vocab] or None; generators[i]: request i's generator or None.
    """
    num_rows = [len(draft) + 1 for draft in draft_token_ids]
    assert target_probs.dim() == 2 and target_probs.shape[0] == sum(num_rows), (
        f"target_probs must have {sum(num_rows)} rows, got {list(target_probs.shape)}"
    )
    for draft, q in zip(draft_token_ids, draft_probs, strict=True):
        assert q is None or q.shape == (len(draft), target_probs.shape[1]), (
            f"draft_probs must be [{len(draft)}, {target_probs.shape[1]}], got {list(q.shape)}"
        )
    drawn = [uniforms(rows, gen) for rows, gen in zip(num_rows, generators, strict=True)]
    p_drafted, q_drafted = _drafted_probs(draft_token_ids, target_probs, draft_probs)
    accepted, weights, fallbacks = [], [], []
    first_row = 0
    for r, draft in enumerate(draft_token_ids):
        n = _num_accepted(drawn[r], p_drafted[r], q_drafted[r])
        p_row = target_probs[first_row + n]  # [vocab]
        if n < len(draft):  # rejected at n: residual; q <= 0 from a faulty drafter -> one-hot
            q = draft_probs[r]
            q_row = q[n] if q is not None and q_drafted[r][n] > 0 else None
            weights.append(residual_weights(p_row, q_row, draft[n]))
        else:  # all accepted: bonus token from p_k
            weights.append(p_row)
        fallbacks.append(p_row)
        accepted.append(list(draft[:n]))
        first_row += num_rows[r]
    last_uniforms = [u[-1] for u in drawn]
    tokens = sample_inverse_cdf(torch.stack(weights), last_uniforms, fallbacks)
    return [prefix + [token] for prefix, token in zip(accepted, tokens, strict=True)]


def uniforms(count: int, generator: torch.Generator | None) -> list[float]:
    """`count` float64 uniforms in [0, 1) from `generator` (the global CPU RNG if None)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(count, generator=generator, device=device, dtype=torch.float64).tolist()


def _num_accepted(uniforms: list[float], p_drafted: list[float], q_drafted: list[float]) -> int:
    """Length of the accepted prefix: draft i passes when u_i < p_i(x_i) / q_i(x_i)."""
    for i, (p, q) in enumerate(zip(p_drafted, q_drafted, strict=True)):
        # q <= 0 only from a faulty drafter; one-hot q is exact for any chosen token.
        if not uniforms[i] * (q if q > 0 else 1.0) < p:
            return i
    return len(p_drafted)


def _drafted_probs(
    draft_token_ids: list[list[int]],
    target_probs: torch.Tensor,
    draft_probs: list[torch.Tensor | None],
) -> tuple[list[list[float]], list[list[float]]]:
    """p_i(x_i) and q_i(x_i) (1.0 for one-hot q) of every draft, with one transfer."""
    rows: list[int] = []
    first_row = 0
    for draft in draft_token_ids:
        rows.extend(range(first_row, first_row + len(draft)))
        first_row += len(draft) + 1
    ids_flat = [token for draft in draft_token_ids for token in draft]
    index = torch.tensor([rows, ids_flat], dtype=torch.long, device=target_probs.device)
    picked = [target_probs[index[0], index[1]]]  # [sum(k_i)]
    start = 0
    for draft, q in zip(draft_token_ids, draft_probs, strict=True):
        if q is not None:
            ids = index[1, start : start + len(draft), None]  # [k_i, 1]
            picked.append(q.gather(1, ids)[:, 0].to(target_probs.dtype))
        start += len(draft)
    flat = torch.cat(picked).tolist()
    p_out, q_out, p_start, q_start = [], [], 0, len(ids_flat)
    for draft, q in zip(draft_token_ids, draft_probs, strict=True):
        p_out.append(flat[p_start : p_start + len(draft)])
        p_start += len(draft)
        if q is None:
            q_out.append([1.0] * len(draft))
        else:
            q_out.append(flat[q_start : q_start + len(draft)])
            q_start += len(draft)
    return p_out, q_out


def residual_weights(
    target_row: torch.Tensor, draft_row: torch.Tensor | None, token_id: int
) -> torch.Tensor:
    """max(0, p - q), unnormalized ([vocab]); `draft_row` None means q is one-hot on token_id."""
    if draft_row is None:
        weights = target_row.clone()
        weights[token_id] = 0.0  # max(0, p(x) - 1) with p(x) <= 1
        return weights
    return (target_row - draft_row.to(target_row.dtype)).clamp_(min=0.0)


def sample_inverse_cdf(
    weights: torch.Tensor, uniforms: list[float], fallback: list[torch.Tensor] | None = None
) -> list[int]:
    """Draw index j of row b with probability weights[b, j] / sum(weights[b]) ([rows, vocab]),
    using one uniform in [0, 1) per row, with one transfer.

    A row whose total is below `_MIN_RESIDUAL_MASS` is drawn from its `fallback` row ([vocab])
    instead (the residual of p == q is p itself); that rare case costs one more transfer.
    """
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)  # [rows, vocab]
    u = torch.tensor(uniforms, dtype=torch.float64, device=cdf.device)
    # First index whose cumulative mass exceeds u * total, so zero-weight entries never win.
    # In float64, u <= 1 - 2**-53 makes u * total < total, so such an index always exists.
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # [rows]
    picked, totals = torch.stack([index.double(), cdf[:, -1]]).tolist()
    result = [int(i) for i in picked]
    for row, total in enumerate(totals):
        if fallback is not None and total < _MIN_RESIDUAL_MASS:
            result[row] = sample_inverse_cdf(fallback[row][None], [uniforms[row]])[0]
    assert all(i < cdf.shape[-1] for i in result), "cannot sample from an all-zero row"
    return result
