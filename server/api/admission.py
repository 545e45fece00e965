"""Checks every generation request passes before it reaches the engine: model name, n,
token ids, and the mapping of request fields onto SamplingParams (whose errors become 400s)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request

from server.api.body import M, parse_body
from server.api.config import ApiConfig
from server.api.errors import ApiError, bad_request
from server.api.protocol import SamplingRequest
from server.api.state import EngineClient, ServerState
from server.engine.sampling_params import SamplingParams, SamplingParamsError

_OPTIONAL_FLOATS_AND_INTS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens",
)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def admit(request: Request, state: ServerState, api: ApiConfig, body: type[M]
                ) -> tuple[EngineClient, M]:
    """The loaded engine (503 while loading or draining) and the request's body parsed as
    `body`, whose `model` must be the one served (404)."""
    engine = state.require_engine()
    req = await parse_body(request, body, api.max_body_bytes)
    check_model(req.model, engine)
    return engine, req


async def admit_generation(request: Request, state: ServerState, api: ApiConfig,
                           body: type[M]) -> tuple[EngineClient, M]:
    """`admit`, for an endpoint that generates text: a model without a language-model head
    (an embedding model's checkpoint: `ModelConfig.generates`) is a 400."""
    engine, req = await admit(request, state, api, body)
    if not engine.generates:
        raise bad_request(f"The model '{engine.model_name}' has no language-model head: it "
                          f"serves /v1/embeddings only.", param="model",
                          code="model_not_generative")
    return engine, req


def check_model(requested: str | None, engine: EngineClient) -> None:
    """404 for any model name other than the one served (omitted means the served one)."""
    if requested is not None and requested != engine.model_name:
        raise ApiError(404, f"The model '{requested}' does not exist; this server serves "
                       f"'{engine.model_name}'.", param="model", code="model_not_found")


def check_n(n: int, max_n: int) -> None:
    if n > max_n:
        raise bad_request(f"n must be at most {max_n}, got {n}", param="n", code="invalid_value")


def vocab_size(tokenizer: Any) -> int:
    return len(tokenizer)


def check_token_ids(ids: list[int], tokenizer: Any, param: str) -> None:
    """400 unless every id is a token of the tokenizer's vocabulary."""
    size = vocab_size(tokenizer)
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise bad_request(f"token ids must be in [0, {size}), got {bad[0]}", param=param,
                          code="invalid_value")


def tokenize_prompts(tokenizer: Any, prompts: list[str | list[int]], param: str = "prompt"
                     ) -> list[list[int]]:
    """Token ids per prompt (text, or ids checked against the vocabulary); 400s name
    `param`."""
    result = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if isinstance(prompt, list):
            check_token_ids(ids, tokenizer, param)
        if not ids:
            raise bad_request(f"The {param} must contain at least one token.", param=param)
        result.append(ids)
    return result


def sampling_params(req: SamplingRequest, max_tokens: int, logprobs: int | None,
                    tokenizer: Any, json_schema: str | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """Map request fields onto SamplingParams; fields the client left out keep their defaults.
    `json_schema`: the JSON the output must be (chat's response_format); `prompt_logprobs`:
    alternatives for each prompt token's logprob (completions' echo), None for none."""
    stop_token_ids = list(req.stop_token_ids or [])
    check_token_ids(stop_token_ids, tokenizer, "stop_token_ids")
    logit_bias = dict(req.logit_bias or {})
    check_token_ids(list(logit_bias), tokenizer, "logit_bias")
    allowed = tuple(req.allowed_token_ids or ())
    check_token_ids(list(allowed), tokenizer, "allowed_token_ids")
    values: dict[str, Any] = {
        "max_tokens": max_tokens, "stop": req.stop_list(), "stop_token_ids": stop_token_ids,
        "ignore_eos": req.ignore_eos, "seed": req.seed, "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "logit_bias": logit_bias, "json_schema": json_schema,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "priority": req.priority, "allowed_token_ids": allowed,
    }
    values.update(req.structure())  # (never with a json_schema: the request's validators)
    for name in _OPTIONAL_FLOATS_AND_INTS:
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    try:
        return SamplingParams(**values)
    except SamplingParamsError as exc:
        raise bad_request(str(exc), param=exc.param, code="invalid_value") from exc


def keep_last(prompt_ids: list[list[int]], keep: int | None, room: int) -> list[list[int]]:
    """vLLM's `truncate_prompt_tokens`: each prompt's last `keep` tokens (-1: as many as
    `room`, what the context allows; never more than that, nor fewer than one: a request
    whose max_tokens leaves no room then fails its context check); None or 0: whole."""
    if not keep:
        return prompt_ids
    most = max(1, room if keep == -1 else min(keep, room))
    return [ids[-most:] for ids in prompt_ids]


def resolve_max_tokens(requested: int | None, longest_prompt: int, max_model_len: int) -> int:
    """The request's max_tokens, or (when omitted) what is left of the context, at least 1."""
    if requested is not None:
        return requested
    return max(max_model_len - longest_prompt, 1)
