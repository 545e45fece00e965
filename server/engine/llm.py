"""Offline batch API: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import POOLING, SamplingParams


@dataclass
class Completion:
    """The finished result of one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended it (`RequestOutput.stop_reason`)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `SamplingParams.prompt_logprobs`: one entry a prompt token (the first None)."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_steps: int = 0
    """Engine steps that produced tokens for this request (tokens / steps = mean accepted length)."""
    embedding: list[float] | None = None
    """With `SamplingParams.pooling`: the prompt's embedding, of unit length."""


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Chat messages as the model is prompted with them: through its chat template, or for a
    model without one (a base model) their texts as plain text to continue, each its own
    paragraph (for offline use: benchmarks, `train-drafter`; the HTTP chat endpoint refuses
    such a model instead)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    return tokenizer("\n\n".join(m["content"] for m in messages) + "\n\n").input_ids


class LLM:
    """Runs an engine to completion over a list of prompts."""

    def __init__(self, model: str | None = None, **config: object) -> None:
        self.engine = LLMEngine(EngineConfig.from_dict({"model": model, **config}))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if chat:
            return chat_prompt_ids(self.tokenizer, [{"role": "user", "content": prompt}])
        return self.tokenizer(prompt).input_ids

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
        chat: bool = False,
    ) -> list[Completion]:
        """Generate for every prompt (all batched together); results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if not self.engine.model.config.generates and any(p.pooling is None for p in params_list):
            raise ValueError("this model has no language-model head: it embeds only (LLM.embed)")
        results: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(prompts, params_list, strict=True):
            request_id = f"offline-{self._counter}"
            self._counter += 1
            ids = self.encode(prompt, chat)
            self.engine.add_request(request_id, ids, p)
            results[request_id] = Completion(request_id, ids)
            order.append(request_id)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                self.absorb(results[out.request_id], out)
        return [results[i] for i in order]

    def embed(self, prompts: list[str | list[int]], pooling: str | None = None
              ) -> list[list[float]]:
        """Each prompt's embedding, of unit length: its final hidden states pooled
        (`SamplingParams.pooling`; None: the one the model's files name, else "last"), all
        prompts batched together; in prompt order."""
        if pooling is None:
            named = self.engine.model.config.pooling
            if named is not None and named not in POOLING:
                raise ValueError(f"the model's files name {named} pooling, which is not "
                                 f"computed here: pass pooling, one of {', '.join(POOLING)}")
            pooling = named or "last"
        params = SamplingParams(max_tokens=1, temperature=0.0, pooling=pooling)
        return [c.embedding for c in self.generate(prompts, params)]  # type: ignore[misc]

    @staticmethod
    def absorb(c: Completion, out: object) -> None:
        c.token_ids.extend(out.new_token_ids)
        c.num_steps += bool(out.new_token_ids)
        c.text += out.new_text
        c.logprobs.extend(out.logprobs or [])
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if out.embedding is not None:
            c.embedding = out.embedding
        c.num_draft_tokens, c.num_accepted_tokens = out.num_draft_tokens, out.num_accepted_tokens
        if out.finished:
            c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
