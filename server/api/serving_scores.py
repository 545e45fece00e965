"""POST /v1/score and /v1/rerank (also /v2/rerank, Cohere's path), as vLLM serves them for
embedding models: a pair's score is the cosine similarity of the two texts' embeddings
(`serving_embeddings`), each text embedded once. A rerank orders documents by their score
against the query (Jina's and Cohere's shape)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, field_validator, model_validator

from server.api.admission import admit, new_request_id
from server.api.config import ApiConfig
from server.api.generation import ChoiceResult
from server.api.protocol_base import StrictModel, conflict
from server.api.serving_embeddings import MAX_INPUTS, embeddings, respond_with_embeddings
from server.api.state import ServerState


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

    def pairs(self) -> tuple[list[str], list[tuple[int, int]]]:
        """The distinct texts to embed, in order, and each pair's indexes into them."""
        firsts, seconds = _texts(self.text_1, "text_1"), _texts(self.text_2, "text_2")
        texts = list(dict.fromkeys([*firsts, *seconds]))
        where = {text: i for i, text in enumerate(texts)}
        firsts = firsts * len(seconds) if len(firsts) == 1 else firsts
        return texts, [(where[a], where[b]) for a, b in zip(firsts, seconds, strict=True)]


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


def _cosines(results: list[ChoiceResult], request_id: str,
             pairs: list[tuple[int, int]]) -> list[float]:
    """The pairs' dot products (the embeddings are of unit length)."""
    vectors = embeddings(results, request_id)
    return [sum(x * y for x, y in zip(vectors[a], vectors[b], strict=True)) for a, b in pairs]


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    prompt = usage["prompt_tokens"]
    return {"prompt_tokens": prompt, "total_tokens": prompt}


class ScoreFormatter:
    """The `list` of `score` objects, in pair order."""

    def __init__(self, request_id: str, model: str, num_texts: int,
                 pairs: list[tuple[int, int]]) -> None:
        self.request_id, self.model, self.num_choices = request_id, model, num_texts
        self.pairs = pairs

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        scores = _cosines(results, self.request_id, self.pairs)
        return {"id": self.request_id, "object": "list", "model": self.model,
                "data": [{"index": i, "object": "score", "score": score}
                         for i, score in enumerate(scores)],
                "usage": _usage(usage)}


class RerankFormatter:
    """The results, best first."""

    def __init__(self, request_id: str, model: str, req: RerankRequest,
                 texts: list[str], pairs: list[tuple[int, int]]) -> None:
        self.request_id, self.model, self.num_choices = request_id, model, len(texts)
        self.req, self.pairs = req, pairs

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        scores = _cosines(results, self.request_id, self.pairs)
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


async def create_score(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine, req = await admit(request, state, api, ScoreRequest)
    texts, pairs = req.pairs()
    formatter = ScoreFormatter(new_request_id("score"), engine.model_name, len(texts), pairs)
    return await respond_with_embeddings(request, state, engine, api, list(texts), formatter,
                                         req.user, param="text_2")


async def create_rerank(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine, req = await admit(request, state, api, RerankRequest)
    texts = list(dict.fromkeys([req.query, *req.documents]))
    where = {text: i for i, text in enumerate(texts)}
    pairs = [(0, where[document]) for document in req.documents]
    formatter = RerankFormatter(new_request_id("rerank"), engine.model_name, req, texts, pairs)
    return await respond_with_embeddings(request, state, engine, api, list(texts), formatter,
                                         req.user, param="documents")
