"""POST /v1/embeddings: each input's final hidden states pooled into one vector of unit
length (`--pooling`: its last token's or the mean), as OpenAI's embeddings endpoint returns
them: lists of floats, or base64 of little-endian float32. Inputs run as engine requests
beside generation (one token each, left out of the reply)."""

from __future__ import annotations

import base64
import logging
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, field_validator, model_validator

from server.api.admission import admit, keep_last, new_request_id, tokenize_prompts
from server.api.config import ApiConfig
from server.api.errors import bad_request
from server.api.generation import JOB_WINDOW, ChoiceResult, make_jobs
from server.api.protocol import ChatTemplateOptions, prompt_list
from server.api.protocol_base import conflict
from server.api.protocol_messages import ChatMessage
from server.api.serving import Generation, Responder
from server.api.serving_chat import render_chat
from server.api.state import EngineClient, ServerState
from server.engine.sampling_params import POOLING, SamplingParams

logger = logging.getLogger("leapfrog.api")

MAX_INPUTS = 2048
"""Inputs one request may embed (OpenAI's limit)."""


class EmbeddingRequest(ChatTemplateOptions):
    """POST /v1/embeddings. `input` is a string, strings, token ids, or lists of token ids;
    or (vLLM's extension) `messages`, one conversation rendered by the chat template (with
    `ChatTemplateOptions`; no assistant prompt after it unless `add_generation_prompt`)."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = False
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    """Keep the first this many components, then scale to unit length again (for models
    trained for it, Matryoshka-style, as OpenAI's text-embedding-3)."""
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    """(vLLM's extension) Embed only each input's last this many tokens; -1: as many as the
    context takes (`max_model_len - 1`); unset: a longer input is a 400."""
    user: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> EmbeddingRequest:
        if (self.input is None) == (self.messages is None):
            raise conflict("input", "send exactly one of input or messages")
        return self

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if value is None:
            return value
        items = [value] if isinstance(value, str) else value
        if not items or any(isinstance(v, str | list) and not v for v in items):
            raise ValueError("input must not be empty, nor hold an empty string or list")
        if len(items) > MAX_INPUTS and not all(isinstance(v, int) for v in items):
            raise ValueError(f"input holds at most {MAX_INPUTS} inputs, got {len(items)}")
        return value


class EmbeddingFormatter:
    """The `list` of `embedding` objects, in input order, and the usage."""

    def __init__(self, request_id: str, model: str, num_inputs: int,
                 encoding_format: str, dimensions: int | None) -> None:
        self.request_id, self.model, self.num_choices = request_id, model, num_inputs
        self.encoding_format, self.dimensions = encoding_format, dimensions

    def _vector(self, embedding: list[float]) -> list[float] | str:
        vector = np.asarray(embedding, dtype=np.float32)
        if self.dimensions is not None:
            vector = vector[:self.dimensions]
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        if self.encoding_format == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        return vector.tolist()

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        data = [{"object": "embedding", "index": i, "embedding": self._vector(vector)}
                for i, vector in enumerate(embeddings(results, self.request_id))]
        prompt = usage["prompt_tokens"]
        return {"object": "list", "data": data, "model": self.model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def embeddings(results: list[ChoiceResult], request_id: str) -> list[list[float]]:
    """Each job's embedding (an internal error where the engine ended one before its
    prompt's step, which it does not)."""
    for i, r in enumerate(results):
        if r.embedding is None:
            raise RuntimeError(f"request {request_id}: input {i} got no embedding (finish "
                               f"reason {r.finish_reason})")
    return [r.embedding for r in results]  # type: ignore[misc]


def pooling(api: ApiConfig, engine: EngineClient) -> str:
    """`--pooling`, else the model's own where this server computes it, else last; a 400
    where the model's files name one it does not compute (cls, max, ...)."""
    if api.pooling is not None:
        return api.pooling
    if engine.pooling is not None and engine.pooling not in POOLING:
        raise bad_request(f"The model's files name {engine.pooling} pooling for its "
                          f"embeddings, which this server does not compute; start it with "
                          f"--pooling {' or '.join(POOLING)} to embed with one of those.",
                          param="input", code="unsupported_pooling")
    return engine.pooling or "last"


async def create_embeddings(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine, req = await admit(request, state, api, EmbeddingRequest)
    if req.dimensions is not None and not 1 <= req.dimensions <= engine.hidden_size:
        raise bad_request(f"dimensions must be in [1, {engine.hidden_size}] (this model's "
                          f"embeddings), got {req.dimensions}", param="dimensions",
                          code="invalid_value")
    request_id = new_request_id("embd")
    if req.messages is not None:
        inputs: list[str | list[int]] = [render_chat(engine.tokenizer, req.messages, None,
                                                     req.template_options())[1]]
    else:
        inputs = prompt_list(req.input)  # type: ignore[arg-type]
    formatter = EmbeddingFormatter(request_id, engine.model_name, len(inputs),
                                   req.encoding_format, req.dimensions)
    return await respond_with_embeddings(request, state, engine, api, inputs, formatter,
                                         req.user, keep=req.truncate_prompt_tokens)


async def respond_with_embeddings(request: Request, state: ServerState, engine: EngineClient,
                                  api: ApiConfig, inputs: list[str | list[int]],
                                  formatter: Responder, user: str | None,
                                  param: str = "input", keep: int | None = None) -> Response:
    """Embed `inputs` (one engine job each: its prompt pooled, one token generated and left
    out) and answer with `formatter`'s body of the results; 400s naming `param` for an
    input without tokens or longer than the context allows. `keep`: each input's last this
    many tokens only (-1: as many as the context allows; `truncate_prompt_tokens`)."""
    chosen = pooling(api, engine)
    if api.log_prompts:
        logger.debug("request %s input: %r", formatter.request_id, inputs)
    prompt_ids = keep_last(tokenize_prompts(engine.tokenizer, inputs, param), keep,
                           engine.max_model_len - 1)
    params = SamplingParams(max_tokens=1, temperature=0.0, pooling=chosen)
    return await respond_one_token(request, state, engine, prompt_ids, params, formatter, user,
                                   param, ("an input to embed", "an input"))


async def respond_one_token(request: Request, state: ServerState, engine: EngineClient,
                            prompts: list[list[int]], params: SamplingParams,
                            formatter: Responder, user: str | None, param: str,
                            what: tuple[str, str]) -> Response:
    """Run each prompt as an engine request of one token (`params`: the prompt's embedding,
    or a judge's logprobs; the token is left out of the reply), at most `JOB_WINDOW` at a
    time, and answer with `formatter`'s body; a 400 naming `param` for a prompt the context
    cannot take with that token. `what`: the prompt in that message, e.g. ("an input to
    embed", "an input")."""
    longest = max(len(p) for p in prompts)
    if longest >= engine.max_model_len:
        raise bad_request(f"This model's maximum context length is {engine.max_model_len} "
                          f"tokens, of which {what[0]} may take {engine.max_model_len - 1}; "
                          f"{what[1]} holds {longest}. Please shorten it.", param=param,
                          code="context_length_exceeded")
    jobs = make_jobs(formatter.request_id, prompts, 1, params)
    generation = Generation(state, engine, jobs, [len(p) for p in prompts], formatter, user,
                            JOB_WINDOW)
    return await generation.respond(request, stream=False, include_usage=False)
