"""Typed contracts between the scheduler and the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.outputs import TokenLogprob
from server.engine.request import Request


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int
    """Tokens to run, starting at request.num_computed_tokens; drafts come last."""
    spec_token_ids: list[int]
    """Draft tokens included at the end of this step's tokens (maybe trimmed by budget)."""
    num_draft_tokens_next: int = 0
    """How many tokens the drafter may propose for this request's next step (0 = none)."""
    ahead: int = 0
    """Tokens the step before this one produces for the request that its state does not
    hold yet when this step is launched: 1 in a decode step launched before its
    predecessor finished (`Scheduler.schedule_ahead`), whose token comes from the device;
    Q, their most, in a verification step of Q tokens launched so
    (`Scheduler.schedule_verify_ahead`), whose tokens and positions come from the device."""

    @property
    def reaches_end(self) -> bool:
        """True when this step computes through the newest token, so a token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens + len(self.spec_token_ids)


@dataclass
class SchedulerOutput:
    """What to run this step."""

    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted: list[str] = field(default_factory=list)
    ended: list[Request] = field(default_factory=list)
    """Requests the scheduler finished itself (the KV cache can never hold them)."""
    prefix_queries: int = 0
    """Tokens of the requests admitted this step, looked up in the prefix cache."""
    prefix_hits: int = 0
    """Of those, the tokens found cached (not computed again)."""


@dataclass
class SampledTokens:
    """What the runner produced for one request that reached its end."""

    token_ids: list[int]
    """1..k+1 tokens: the accepted drafts then one token from the target."""
    num_draft_tokens: int
    """Drafts that were verified this step."""
    logprobs: list[TokenLogprob] | None = None
    next_draft: list[int] = field(default_factory=list)
    """Proposed drafts for the next step (already capped by num_draft_tokens_next)."""
    next_draft_probs: torch.Tensor | None = None


@dataclass
class RunnerOutput:
    """Per-request results of one step, keyed by request id."""

    sampled: dict[str, SampledTokens]
    query_len: int | None = None
    """Tokens a sequence of a CUDA-graph replay computed (Q, padding included); None if
    eager."""
    draft_seconds: float = 0.0
    """Time this step spent drafting the next step's tokens."""
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    """By request: the logprobs of the prompt tokens this step's positions predict, for
    requests that asked for them (`SamplingParams.prompt_logprobs`)."""
    pooled: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    """By request, for those that pool their prompt (`SamplingParams.pooling`): the
    float32 sum of this step's prompt positions' final hidden states ("last": the last
    position's alone), on the host, and the prompt positions pooled once it is added."""
