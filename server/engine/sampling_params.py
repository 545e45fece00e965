"""Per-request sampling parameters (what an OpenAI request may set), validated on creation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_STRUCTURED = ("json_schema", "regex", "choice", "grammar")
"""SamplingParams' fields that constrain the output's form (`structured`)."""

POOLING = ("last", "mean")
"""How a prompt's final hidden states become its embedding (`SamplingParams.pooling`)."""

GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy, as in vLLM: logits / 1e-40 overflow float32, and
the softmax of the result is NaN (a request at such a temperature failed its step)."""


@dataclass
class SamplingParams:
    """How one sequence is sampled and when it stops."""

    max_tokens: int = 16
    """Most tokens to generate."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens exist."""
    temperature: float = 1.0
    """0 (or below GREEDY_BELOW) means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top probability."""
    repetition_penalty: float = 1.0
    """CTRL-style multiplicative penalty on tokens seen in prompt or output (1 = off)."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty on tokens already generated."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty, proportional to each generated token's count."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is batched."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the text stops before the first match, which is not returned."""
    include_stop_str_in_output: bool = False
    """End the text after the stop string that matched instead of before it."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end the sequence (not returned in the text)."""
    ignore_eos: bool = False
    """Keep generating past the EOS token."""
    logprobs: int | None = None
    """Return the chosen token's logprob and this many top alternatives (0..20)."""
    logprob_token_ids: tuple[int, ...] = ()
    """With `logprobs`: these tokens' logprobs too at each output token, after the top
    alternatives where they are not among them (a yes/no judge's two answers)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob (the first's is None: nothing predicts it) and
    this many top alternatives (0..20): OpenAI completions' `echo` with `logprobs`. Such a
    request computes its whole prompt: it takes nothing from the prefix cache."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """OpenAI's logit_bias: added to these tokens' logits (each in [-100, 100]) before
    sampling, greedy or not; logprobs stay the model's."""
    allowed_token_ids: tuple[int, ...] = ()
    """vLLM's: only these tokens may be chosen (the others' logits set to -inf before
    sampling, greedy or not; logprobs stay the model's); empty: any."""
    prediction: tuple[int, ...] = ()
    """Tokens the output is expected to hold (OpenAI's predicted outputs: a file to be
    returned with small edits); with n-gram speculation they are drafted from first
    (`drafters.ngram`). The output is the same with or without them."""
    json_schema: str | None = None
    """A JSON schema (as JSON text) the output must follow (`server.engine.structured`;
    `{"type": "object"}` for OpenAI's json_object); None: free text."""
    regex: str | None = None
    """A regular expression the whole output must match (xgrammar's syntax, JavaScript's
    subset); None: free text."""
    choice: list[str] | None = None
    """Texts the output must be one of; None: free text."""
    grammar: str | None = None
    """An EBNF grammar the output must follow (xgrammar's syntax, GBNF's: rules `name ::=
    ...` from `root`); None: free text. At most one of json_schema, regex, choice and
    grammar is given."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text; False keeps them (a chat template's
    `<tool_call>` tags, where the tokenizer counts them special)."""
    pooling: str | None = None
    """Pool the prompt's final (normed) hidden states into an embedding, returned with the
    request's last output (`RequestOutput.embedding`, of unit length): "last", its last
    position's; "mean", the mean of every position's (such a request computes its whole
    prompt: it takes nothing from the prefix cache). None: no embedding."""
    priority: int = 0
    """Scheduling, not sampling (it travels with the request's parameters): with the engine's
    `scheduling_policy` "priority", requests wait and run in order of (priority, arrival),
    lower first, and a request of a higher value is preempted before one of a lower; with
    "fcfs" it must be 0."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingParamsError("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise SamplingParamsError("top_k", f"top_k must be -1, 0 or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0.0:
            raise SamplingParamsError(
                "repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise SamplingParamsError("seed", f"seed must be a 64-bit signed integer, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise SamplingParamsError("logprobs", f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.logprob_token_ids and (self.logprobs is None or min(self.logprob_token_ids) < 0):
            raise SamplingParamsError(
                "logprob_token_ids", "logprob_token_ids are token ids >= 0, with logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise SamplingParamsError(
                "prompt_logprobs", f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if self.pooling is not None and self.pooling not in POOLING:
            raise SamplingParamsError(
                "pooling", f"pooling must be one of {', '.join(POOLING)}, got {self.pooling!r}")
        given = [name for name in _STRUCTURED if getattr(self, name) is not None]
        if len(given) > 1:
            raise SamplingParamsError(given[1], f"the output follows one structure: "
                                      f"{' and '.join(given)} were given")
        if self.choice is not None and (not self.choice or "" in self.choice):
            raise SamplingParamsError("choice", "choice takes a list of non-empty texts")
        if given and (self.min_tokens or self.ignore_eos):
            raise SamplingParamsError(
                "min_tokens" if self.min_tokens else "ignore_eos",
                "structured output ends where its structure does: min_tokens and ignore_eos "
                "do not apply")
        if any(t < 0 for t in self.allowed_token_ids):
            raise SamplingParamsError("allowed_token_ids", "allowed_token_ids are token ids >= 0")
        for token, bias in self.logit_bias.items():
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias maps token ids >= 0 to biases in [-100, 100], "
                    f"got {token}: {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def structured(self) -> tuple[str, str] | None:
        """The structure the output follows, as `Grammars.matcher` takes it: (kind, spec)
        with kind one of json_schema, regex, choice (its texts as a JSON list) and grammar;
        None for free text."""
        for name in _STRUCTURED:
            value = getattr(self, name)
            if value is not None:
                return name, json.dumps(value) if name == "choice" else value
        return None

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties, a logit bias, allowed tokens or a structure (JSON, regex, ...)
        change the logits a token is chosen from."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
            or bool(self.allowed_token_ids)
            or self.structured is not None
        )
