"""Turn logits into tokens: penalties and logit bias, temperature, top-k/top-p/min-p,
seeded sampling.

`processed_logits` and `filter_probs` give the distribution a request samples from on the
host (also what speculative verification compares drafts against); `drafters.verify`
draws from it with the request's own generator, so a seeded request reproduces whatever
else is batched. `sample_rows` draws the plain sampled rows of a CUDA step where the
logits are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.sampling import race_tokens
from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import SamplingParams


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """logits: [V] float32 for one row; returns a penalized, biased and masked copy (or the
    input if none applies)."""
    if not params.adjusts_logits:
        return logits
    logits = logits.clone()
    out = torch.tensor(list(output_ids), dtype=torch.long)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(list(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if out.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = torch.zeros_like(logits).index_add_(0, out, torch.ones(out.numel()))
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if params.allowed_token_ids:
        allowed = torch.tensor(params.allowed_token_ids, dtype=torch.long)
        logits = torch.full_like(logits, float("-inf")).index_copy_(0, allowed, logits[allowed])
    return logits


def suppress_stops(logits: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """Make stop tokens impossible (min_tokens not reached yet)."""
    logits = logits.clone()
    logits[list(stop_ids)] = float("-inf")
    return logits


def filter_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] penalized logits -> [V] probabilities after temperature, top-k, top-p, min-p."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[V] probs with all but the most likely tokens up to `top_p` of the total mass zeroed
    (the token that crosses it kept). Only the head of the vocabulary is sorted (`topk`),
    widened until it holds that mass: a full sort of 49,152 probabilities took 3.1 ms on
    this repo's CPU, the 256 likeliest 0.18 ms."""
    vocab, limit = probs.shape[-1], top_p * probs.sum()
    k = min(vocab, 256)
    while True:
        head, order = probs.topk(k)
        cumulative = head.cumsum(0)
        if k == vocab or cumulative[-1] > limit:
            break
        k = min(vocab, 8 * k)
    kept = head.masked_fill(cumulative - head > limit, 0.0)
    return torch.zeros_like(probs).scatter(0, order, kept)


def processed_logits(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int],
    stop_ids: Sequence[int],
) -> torch.Tensor:
    """Penalties plus min_tokens suppression for one row."""
    logits = apply_penalties(logits, params, prompt_ids, output_ids)
    if len(output_ids) < params.min_tokens and stop_ids:
        logits = suppress_stops(logits, stop_ids)
    return logits


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
                positions: torch.Tensor, filtered: bool = True) -> torch.Tensor:
    """[R, V] float32 logits -> [R] int64 tokens, one row a request with its own sampling
    parameters ([R] each; temperature 0: the argmax; top_k 0: off): `filter_probs` for all
    rows at once, then the Gumbel race of `kernels.sampling` (seeded by each request's seed
    and output position), which picks each token with its filtered probability. Where the
    host path samples one request at a time (a softmax and, for top-p, a sort over the
    vocabulary each, ~1-4 ms a row on this repo's CPU), this runs where the logits are: no
    logits leave the GPU. `filtered` False (no row asks for top-k, top-p or min-p) races
    logits / temperature directly, without the softmax and the filters' sort."""
    greedy = temperature == 0
    temperature = torch.where(greedy, 1.0, temperature)
    x = logits
    if filtered:
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        x, temperature = _filter_rows(probs, top_k, top_p, min_p).log(), torch.ones_like(temperature)
    return torch.where(greedy, logits.argmax(dim=-1), race_tokens(x, temperature, seeds, positions))


def _filter_rows(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """`filter_probs`'s top-k, top-p and min-p of each row [R, V], not renormalised."""
    ordered = probs.sort(dim=-1, descending=True).values
    rank = torch.arange(probs.shape[1], device=probs.device)
    ordered = torch.where((top_k[:, None] == 0) | (rank[None, :] < top_k[:, None]), ordered, 0.0)
    cumulative = ordered.cumsum(dim=-1)
    kept = ((cumulative - ordered <= top_p[:, None] * cumulative[:, -1:])
            | (top_p[:, None] >= 1.0)) & (ordered > 0)
    # the smallest probability kept by top-k and top-p, then min-p's floor
    floor = torch.where(kept, ordered, float("inf")).amin(dim=-1)
    floor = torch.maximum(floor, min_p * ordered[:, 0])
    return torch.where(probs >= floor[:, None], probs, 0.0)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top_n: int,
                   also: Sequence[int] = ()) -> list[TokenLogprob]:
    """Logprobs of the chosen tokens under the model's raw distribution, with the `top_n`
    most likely at each position, then those of `also` not among them (in its order).
    logits: [len(tokens), V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(tokens), device=logp.device).unsqueeze(1)
    chosen = logp.gather(1, index).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in tokens]
    if top_n > 0:
        values, ids = logp.topk(top_n, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    if also:
        asked = logp[:, list(also)].tolist()
        for top, row in zip(tops, asked, strict=True):
            listed = {t for t, _ in top}
            top += [(t, v) for t, v in zip(also, row, strict=True) if t not in listed]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops, strict=True)]
