"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Token-budget view of a request: `num_computed_tokens` of `num_tokens` have KV."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    spec_token_ids: list[int] = field(default_factory=list)
    """Draft tokens to verify in the next step."""
    draft_probs: torch.Tensor | None = None
    """[len(spec_token_ids), vocab] draft distribution, or None (deterministic drafts)."""
    generator: torch.Generator | None = None
    """Per-request RNG so seeded sampling ignores what else is batched."""
    seed: int = 0
    """`generator`'s seed, which also seeds sampling on the device
    (`server.engine.sampler.sample_rows`)."""
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was first scheduled."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    grammar: Any = None
    """With `params.structured`: its matcher (`server.engine.structured`), advanced by each
    output token."""
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """With `params.prompt_logprobs`: the logprobs of the prompt's first tokens, in order,
    as far as steps computed them (the first token's is None: nothing predicts it)."""
    pooled: torch.Tensor | None = None
    """With `params.pooling`: the float32 sum of the final hidden states of the prompt
    positions pooled so far ("mean"), or the last position's ("last"); on the host."""
    num_pooled: int = 0
    """Prompt positions that `pooled` has taken (or passed over: "last" takes one)."""

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs.append(None)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs are asked for and some are not computed yet."""
        return (self.params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    @property
    def needs_pooling(self) -> bool:
        """Whether an embedding is asked for and some prompt positions are not pooled yet."""
        return self.params.pooling is not None and self.num_pooled < self.num_prompt_tokens

    @property
    def computes_whole_prompt(self) -> bool:
        """Whether every prompt position must be computed, none taken from the prefix
        cache: prompt logprobs, or a mean embedding, still to come."""
        return self.needs_prompt_logprobs or (self.needs_pooling
                                              and self.params.pooling == "mean")

    def embedding(self) -> list[float] | None:
        """The pooled prompt's embedding, of unit length, once every position is pooled."""
        if self.pooled is None or self.needs_pooling:
            return None
        return torch.nn.functional.normalize(self.pooled, dim=0).tolist()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
