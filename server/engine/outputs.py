"""What the engine streams back for each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Logprob of one chosen token, with the top alternatives when asked for."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """(token_id, logprob) pairs, most likely first."""


@dataclass
class RequestOutput:
    """A delta for one request: the tokens and text accepted since the previous output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    """Detokenized delta; text after a stop string is never sent."""
    num_prompt_tokens: int
    num_output_tokens: int
    """Tokens generated so far (cumulative)."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per new token when the request asked for logprobs."""
    finished: bool = False
    finish_reason: str | None = None
    """'stop' (EOS, stop token or stop string), 'length', or 'abort'."""
    stop_reason: str | int | None = None
    """In a request's last output (vLLM's): the stop string or the stop token id
    (`stop_token_ids`) that ended it; None when the model's end of sequence or a length
    limit did."""
    num_draft_tokens: int = 0
    """Cumulative draft tokens proposed for this request (speculation)."""
    num_accepted_tokens: int = 0
    """Cumulative draft tokens accepted."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache (not computed) when first scheduled."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `SamplingParams.prompt_logprobs`, in the request's first output with tokens:
    one entry a prompt token (the first None)."""
    embedding: list[float] | None = None
    """With `SamplingParams.pooling`, in the request's last output: the prompt's embedding,
    of unit length (None if the request ended before its prompt was computed)."""
