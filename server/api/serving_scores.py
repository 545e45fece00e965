"""POST /v1/score and /v1/rerank (also /v2/rerank, Cohere's path), as vLLM serves them for
embedding models: a pair's score is the cosine similarity of the two texts' embeddings
(`serving_embeddings`), each text embedded once. A rerank orders documents by their score
against the query (Jina's and Cohere's shape)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, field_validator, model_validator

from server.api.admission import admit, new_request_id
from server.api.config import ApiConfig
from server.api.generation import ChoiceResult
from server.api.protocol_base import StrictModel, conflict
from server.api.serving import Responder
from server.api.serving_embeddings import (
    MAX_INPUTS,
    embeddings,
    respond_one_token,
    respond_with_embeddings,
)
from server.api.state import EngineClient, ServerState
from server.engine.sampling_params import SamplingParams

logger = logging.getLogger("leapfrog.api")


def _texts(value: str | list[str], field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not items or any(not text for text in items):
        raise ValueError(f"{field} must not be empty, nor hold an empty text")
    if len(items) > MAX_INPUTS:
        raise ValueError(f"{field} holds at most {MAX_INPUTS} texts, got {len(items)}")
    return items


class ScoreRequest(StrictModel):
    """POST /v1/score: `text_1` against `text_2`: one against one, one against each of many,
    or pairwise (lists of the same length)."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    user: str | None = None

    @field_validator("text_1", "text_2")
    @classmethod
    def _non_empty(cls, value: Any, info: Any) -> Any:
        _texts(value, info.field_name)
        return value

    @model_validator(mode="after")
    def _pairs_match(self) -> ScoreRequest:
        firsts, seconds = _texts(self.text_1, "text_1"), _texts(self.text_2, "text_2")
        if len(firsts) not in (1, len(seconds)):
            raise conflict("text_2", f"text_1 holds {len(firsts)} texts: one, or as many as "
                                     f"text_2's {len(seconds)}")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """The (text_1, text_2) pairs, in order."""
        firsts, seconds = _texts(self.text_1, "text_1"), _texts(self.text_2, "text_2")
        return list(zip(firsts * len(seconds) if len(firsts) == 1 else firsts, seconds,
                        strict=True))


class RerankRequest(StrictModel):
    """POST /v1/rerank: `documents` ordered by their score against `query`; the `top_n` best
    (0 or unset: all)."""

    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str]
    top_n: int | None = Field(default=None, ge=0)
    return_documents: bool = True
    """Each result carries its document's text (`document.text`)."""
    user: str | None = None

    @field_validator("documents")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        _texts(value, "documents")
        return value


Scores = Callable[[list[ChoiceResult]], list[float]]
"""The pairs' scores from the engine jobs' results."""


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    prompt = usage["prompt_tokens"]
    return {"prompt_tokens": prompt, "total_tokens": prompt}


class ScoreFormatter:
    """The `list` of `score` objects, in pair order."""

    def __init__(self, request_id: str, model: str, num_jobs: int, scores: Scores) -> None:
        self.request_id, self.model, self.num_choices = request_id, model, num_jobs
        self.scores = scores

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.request_id, "object": "list", "model": self.model,
                "data": [{"index": i, "object": "score", "score": score}
                         for i, score in enumerate(self.scores(results))],
                "usage": _usage(usage)}


class RerankFormatter:
    """The results, best first."""

    def __init__(self, request_id: str, model: str, num_jobs: int, scores: Scores,
                 req: RerankRequest) -> None:
        self.request_id, self.model, self.num_choices = request_id, model, num_jobs
        self.scores, self.req = scores, req

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        scores = self.scores(results)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        if self.req.top_n:
            order = order[:self.req.top_n]
        found = []
        for i in order:
            result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if self.req.return_documents:
                result["document"] = {"text": self.req.documents[i]}
            found.append(result)
        return {"id": self.request_id, "model": self.model, "results": found,
                "usage": _usage(usage)}


def _cosines(pairs: list[tuple[str, str]], texts: list[str], request_id: str) -> Scores:
    """The pairs' cosine similarities from the embeddings of `texts` (jobs in that order):
    dot products, the embeddings being of unit length."""
    where = {text: i for i, text in enumerate(texts)}

    def scores(results: list[ChoiceResult]) -> list[float]:
        vectors = embeddings(results, request_id)
        return [sum(x * y for x, y in zip(vectors[where[a]], vectors[where[b]], strict=True))
                for a, b in pairs]

    return scores


def _judged(no: int, yes: int) -> Scores:
    """Each job's next token's P(yes) / (P(no) + P(yes)): sigmoid(logit yes - logit no)."""

    def scores(results: list[ChoiceResult]) -> list[float]:
        found = []
        for r in results:
            top = dict(r.logprobs[0].top)
            found.append(1.0 / (1.0 + math.exp(top[no] - top[yes])))
        return found

    return scores


@functools.lru_cache(maxsize=4)
def judge_tokens(tokenizer: Any, names: tuple[str, str]) -> tuple[int, int]:
    """`--score-tokens`' (no, yes) as token ids: each must be one token of the vocabulary
    (a ValueError otherwise). Kept once found (at start-up, `check_score_tokens`):
    `get_vocab` builds the whole vocabulary's dict, 28 ms for SmolLM2's 49,152 tokens,
    which every score request would otherwise pay on the event loop."""
    vocab = tokenizer.get_vocab()
    ids = []
    for name in names:
        encoded = [vocab[name]] if name in vocab else tokenizer.encode(
            name, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"--score-tokens: {name!r} is not one token of this model's "
                             f"vocabulary (it is {len(encoded)})")
        ids.append(encoded[0])
    return ids[0], ids[1]


def check_score_tokens(engine: EngineClient, api: ApiConfig) -> None:
    """At start-up (`ServerState.check`): `--score-tokens` needs a model with a
    language-model head (a base model's tied embedding cannot judge) and two tokens of
    its vocabulary; a ValueError otherwise, which fails the load."""
    if api.score_tokens is None:
        return
    if not engine.generates:
        raise ValueError(f"--score-tokens: the model '{engine.model_name}' has no "
                         f"language-model head to judge with; leave the flag out to score "
                         f"by embeddings")
    judge_tokens(engine.tokenizer, api.score_tokens)


async def _respond(request: Request, state: ServerState, engine: EngineClient, api: ApiConfig,
                   pairs: list[tuple[str, str]], request_id: str,
                   formatter: Callable[[int, Scores], Responder], user: str | None,
                   param: str) -> Response:
    """Score `pairs` and answer with the body `formatter(jobs, scores)` builds: by the
    cosine of the texts' embeddings (each distinct text embedded once), or with
    `--score-tokens` by the model as a judge: the prompt is a pair's first text then its
    second, the score its next token's P(yes) / (P(no) + P(yes))."""
    if api.score_tokens is None:
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        return await respond_with_embeddings(
            request, state, engine, api, list(texts),
            formatter(len(texts), _cosines(pairs, texts, request_id)), user, param=param)
    tok = engine.tokenizer
    no, yes = judge_tokens(tok, api.score_tokens)
    prompts = [tok.encode(a) + tok.encode(b, add_special_tokens=False) for a, b in pairs]
    if api.log_prompts:
        logger.debug("request %s pairs: %r", request_id, pairs)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0,
                            logprob_token_ids=(no, yes))
    return await respond_one_token(request, state, engine, prompts, params,
                                   formatter(len(prompts), _judged(no, yes)), user, param,
                                   ("a pair to score", "a pair"))


async def create_score(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine, req = await admit(request, state, api, ScoreRequest)
    request_id = new_request_id("score")

    def formatter(num_jobs: int, scores: Scores) -> Responder:
        return ScoreFormatter(request_id, engine.model_name, num_jobs, scores)

    return await _respond(request, state, engine, api, req.pairs(), request_id, formatter,
                          req.user, "text_2")


async def create_rerank(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine, req = await admit(request, state, api, RerankRequest)
    request_id = new_request_id("rerank")

    def formatter(num_jobs: int, scores: Scores) -> Responder:
        return RerankFormatter(request_id, engine.model_name, num_jobs, scores, req)

    return await _respond(request, state, engine, api, [(req.query, d) for d in req.documents],
                          request_id, formatter, req.user, "documents")
