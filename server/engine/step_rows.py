"""How a step's rows become tokens: which requests take the plain argmax or a draw on the
device (and how those run), which rows of an eager step give prompt logprobs, and which
rows of a step a prompt's embedding pools. The model runner's helpers (`server.engine.runner`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.contracts import ScheduledRequest
from server.engine.sampler import sample_rows


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row of logits [R, vocab] -> [R]: one Triton launch on CUDA
    (`kernels.triton_argmax`, imported only then: triton is optional), torch's on CPU."""
    if logits.is_cuda:
        from kernels.triton_argmax import greedy_tokens

        return greedy_tokens(logits)
    return logits.argmax(dim=-1)


def on_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`; on CUDA through pinned memory, so that the
    copy queues behind the stream's work: a copy from pageable memory may first wait for
    the stream, which would hold a step launched ahead until the step before ends."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def num_outputs(s: ScheduledRequest) -> int:
    """Output tokens the request has when this step's tokens come (the step before's
    included, when this step was launched ahead of it)."""
    return len(s.request.output_token_ids) + s.ahead


def plain_greedy(s: ScheduledRequest) -> bool:
    """Whether a request's tokens are the argmax of its raw logits (nothing else needed)."""
    p = s.request.params
    return (p.greedy and not p.adjusts_logits and p.logprobs is None
            and num_outputs(s) >= p.min_tokens)


def plain_sampled(s: ScheduledRequest) -> bool:
    """Whether a request's token is a draw from its raw logits under temperature, top-k,
    top-p and min-p alone, with no drafts to verify (what `sample_rows` serves)."""
    p = s.request.params
    return (not p.greedy and not p.adjusts_logits and p.logprobs is None
            and num_outputs(s) >= p.min_tokens and not s.spec_token_ids)


def device_sampling(logits: torch.Tensor) -> bool:
    """Whether sampled rows are drawn where the logits are (CUDA) rather than on the host,
    one request at a time (tests switch it on for the CPU)."""
    return logits.is_cuda


def sample_on_device(owners: list[tuple[ScheduledRequest, int]], logits: torch.Tensor
                      ) -> torch.Tensor:
    """`sample_rows` of the sampled rows' logits [R, vocab], each request's parameters and
    its seed at its output position; greedy requests' rows take the argmax."""
    rows = [(s.request.params, s.request.seed, num_outputs(s) + j)
            for s, _ in owners for j in range(len(s.spec_token_ids) + 1)]
    floats = on_device([(0.0 if p.greedy else p.temperature, p.top_k, p.top_p, p.min_p)
                         for p, _, _ in rows], torch.float32, logits.device)
    ints = on_device([(seed, position) for _, seed, position in rows], torch.int64,
                      logits.device)
    filtered = any(p.top_k or p.top_p < 1.0 or p.min_p > 0.0 for p, _, _ in rows)
    return sample_rows(logits, floats[:, 0], floats[:, 1].long(), floats[:, 2], floats[:, 3],
                       ints[:, 0], ints[:, 1], filtered)


@dataclass
class PromptRows:
    """A request's prompt positions in a step whose logits give prompt logprobs."""

    request_id: str
    rows: list[int]
    """Rows of the step's hidden states, one a position."""
    targets: list[int]
    """The prompt token each row predicts (the one after its position)."""
    top_n: int


def prompt_rows(scheduled: list[ScheduledRequest], ends: list[int]) -> list[PromptRows]:
    """The prompt positions of an eager step (each request's tokens end at its `ends`
    row) that predict prompt tokens whose logprobs a request still needs."""
    found = []
    for s, end in zip(scheduled, ends, strict=True):
        r = s.request
        if not r.needs_prompt_logprobs:
            continue
        first = r.num_computed_tokens
        # positions lo..hi-1 predict tokens lo+1..hi, of which those computed before (an
        # earlier pass, when a preempted request computes its prompt again) are skipped
        lo = max(first, len(r.prompt_logprobs) - 1)
        hi = min(first + s.num_new_tokens, r.num_prompt_tokens - 1)
        if lo < hi:
            row = end - s.num_new_tokens - first
            found.append(PromptRows(r.request_id, list(range(row + lo, row + hi)),
                                    r.prompt_token_ids[lo + 1:hi + 1], r.params.prompt_logprobs))
    return found


@dataclass
class PoolRows:
    """A request's prompt positions in a step whose final hidden states it pools
    (`SamplingParams.pooling`)."""

    request_id: str
    rows: list[int]
    """Rows of the step's hidden states (for "last" pooling, the last position's alone)."""
    upto: int
    """The prompt positions pooled once these are (`Request.num_pooled`)."""


def pool_rows(scheduled: list[ScheduledRequest], ends: list[int]) -> list[PoolRows]:
    """The prompt positions of a step (each request's tokens end at its `ends` row) that
    requests pooling their prompt have not pooled yet (an earlier pass, when a preempted
    request computes its prompt again, pooled some)."""
    found = []
    for s, end in zip(scheduled, ends, strict=True):
        r = s.request
        if not r.needs_pooling:
            continue
        first = r.num_computed_tokens + s.ahead
        lo = max(first, r.num_pooled)
        hi = min(first + s.num_new_tokens, r.num_prompt_tokens)
        if r.params.pooling == "last":
            lo = max(lo, r.num_prompt_tokens - 1)
        if lo < hi:
            row = end - s.num_new_tokens - first
            found.append(PoolRows(r.request_id, list(range(row + lo, row + hi)), hi))
    return found


@dataclass
class Pooled:
    """A step's pooled prompt positions (`pool_rows`), summed at launch (a
    replay's `hidden` may be overwritten before `finish`) and copied to the host."""

    owners: list[tuple[str, int]]
    """(request id, `PoolRows.upto`) for each row of `sums`."""
    sums: torch.Tensor
    """[len(owners), hidden] float32 on the host (on CUDA: pinned, copied behind the step)."""
    copied: torch.cuda.Event | None
    """On CUDA: recorded after the copy, which `finish` waits for."""

    def by_request(self) -> dict[str, tuple[torch.Tensor, int]]:
        """`RunnerOutput.pooled`, once the copy is done."""
        if self.copied is not None:
            self.copied.synchronize()
        return {rid: (self.sums[i], upto) for i, (rid, upto) in enumerate(self.owners)}


def pool_step(scheduled: list[ScheduledRequest], ends: list[int], hidden: torch.Tensor
              ) -> Pooled | None:
    """Sum the rows of `hidden` that requests pool in this step (`pool_rows`) and queue
    the sums' copy to the host; None if no request pools here."""
    found = pool_rows(scheduled, ends)
    if not found:
        return None
    sums = torch.stack([hidden[on_device(p.rows, torch.long, hidden.device)].float().sum(0)
                        for p in found])
    event = None
    if sums.is_cuda:
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        sums = host.copy_(sums, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    return Pooled([(p.request_id, p.upto) for p in found], sums, event)

