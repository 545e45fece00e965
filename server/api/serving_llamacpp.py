"""llama.cpp's own endpoints, for clients written against llama-server: POST /completion
(a prompt, as text or token ids) and POST /infill (code infill, as editor plugins call it:
llama.vim, llama.vscode): the text before the cursor (`input_prefix`), the current line so
far (`prompt`), the text after (`input_suffix`) and other files' text (`input_extra`), in
the model's fill-in-the-middle format (`server.api.infill`). Both reply with llama.cpp's
/completion body (`content`, `stop`, `timings`, ...) or, with `stream`, its `data:`
chunks, the last with `stop: true` (no `[DONE]`).

llama.cpp's sampling defaults apply (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05),
its names for OpenAI's fields (`n_predict`, `repeat_penalty`), and its ends of an answer:
`t_max_predict_ms` (once the answer has a new line, it ends when generating has taken that
long) and `n_indent` (a line indented less ends it); its `grammar` (GBNF) and `json_schema`
structure the answer as structured outputs do; `n_probs` gives each generated token's
logprob and its most likely alternatives (`completion_probabilities`, in each stream chunk
for its tokens, or for the whole answer); fields this server has no use for
(`cache_prompt`: the prefix cache is always on; `id_slot`, `samplers`, `t_max_prompt_ms`,
...) are accepted and ignored, as llama.cpp ignores fields it does not know. `n_predict` 0
computes the prompt alone, which plugins send to have other files' text cached before the
next request needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server import server_version
from server.api.admission import (
    admit_generation,
    new_request_id,
    sampling_params,
    tokenize_prompts,
)
from server.api.config import ApiConfig
from server.api.errors import bad_request
from server.api.generation import ChoiceResult, RequestTiming, check_context_length, make_jobs
from server.api.infill import InfillTokens, infill_tokens
from server.api.logprobs import TokenTexts
from server.api.protocol import SamplingRequest
from server.api.serving import Generation, Outputs
from server.api.state import ServerState
from server.engine.outputs import RequestOutput, TokenLogprob

logger = logging.getLogger("leapfrog.api")

WINDOW = 2048
"""Tokens of the prefix (3/4) and suffix (1/4) kept around the gap (llama.cpp's default
batch size, which it takes them from), at most half the context; the rest of the context,
less twice the tokens asked for (as in llama.cpp) but at least `ANSWER_ROOM`, goes to
`input_extra`."""
ANSWER_ROOM = 256
"""Tokens kept from `input_extra` for the answer at the least: plugins send their context
with `n_predict` 0 to have it cached, then ask for up to 128 tokens (llama.vim's default)
with the same context, which must then be cut at the same place for the cache to hold it."""


class InfillFile(BaseModel):
    filename: str = "tmp"
    text: str = ""


class LlamaCppRequest(SamplingRequest):
    """What /completion and /infill bodies share: llama.cpp's names and defaults
    (`SamplingRequest`'s OpenAI names are accepted too); unknown fields ignored."""

    model_config = ConfigDict(extra="ignore")
    n_predict: int | None = None
    """Most tokens generated (-1 or absent: `max_tokens`, else what the context leaves)."""
    repeat_penalty: float | None = None
    t_max_predict_ms: float | None = None
    """Once the answer has a new line, it ends (`stop_type` "limit") as soon as generating
    has taken this long since the first token (0 or absent: no limit)."""
    n_indent: int | None = None
    """A line of the answer that starts with fewer blanks (spaces, tabs) than this ends
    the answer before its text (`stop_type` "limit"): code completion that leaves the
    block it began in stops there."""
    temperature: float | None = 0.8
    top_k: int | None = 40
    top_p: float | None = 0.95
    min_p: float | None = 0.05
    n_probs: int = Field(0, ge=0, le=20)
    """Each generated token's `completion_probabilities`: its logprob and this many most
    likely alternatives (0: none)."""
    post_sampling_probs: bool = False
    """Probabilities (`prob`, `top_probs`) in place of logprobs. They are the model's, as
    logprobs are here, where llama.cpp's are taken after its samplers' filters."""

    @model_validator(mode="before")
    @classmethod
    def _structure(cls, data: Any) -> Any:
        """llama.cpp's `grammar` (GBNF, which xgrammar's EBNF reads) and `json_schema` are
        vLLM's guided_grammar and guided_json (one structure at most, as theirs)."""
        if isinstance(data, dict):
            data = dict(data)
            for ours, guided in (("grammar", "guided_grammar"), ("json_schema", "guided_json")):
                if data.get(ours) is not None and guided not in data:
                    data[guided] = data.pop(ours)
        return data

    @field_validator("seed")
    @classmethod
    def _random_seed(cls, value: int | None) -> int | None:
        return None if value is not None and value < 0 else value  # (llama.cpp's -1)

    @field_validator("model")
    @classmethod
    def _no_model(cls, value: str | None) -> str | None:
        return value or None  # (plugins send "" when no model is configured)


class InfillRequest(LlamaCppRequest):
    """POST /infill."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillFile] = Field(default_factory=list)
    prompt: str = ""
    """The current line up to the cursor: after the prefix, in the prefix's part."""


class CompletionBody(LlamaCppRequest):
    """POST /completion: `prompt` as text (tokenized with the model's special tokens, as
    llama.cpp's) or token ids."""

    prompt: str | list[int]


class LlamaCppFormatter:
    """llama.cpp's /completion bodies and stream chunks for one request."""

    named_events = False
    done_marker = False
    num_choices = 1

    def __init__(self, request_id: str, model: str, prompt_ids: list[int], truncated: bool,
                 timing: RequestTiming, score_only: bool, settings: dict[str, Any],
                 texts: TokenTexts | None = None, post_sampling_probs: bool = False) -> None:
        """`score_only`: n_predict 0, the prompt computed and nothing returned; `settings`:
        llama.cpp's `generation_settings` (the context size and the sampling used);
        `texts`: with `n_probs`, the tokens' texts for `completion_probabilities`."""
        self.request_id, self.model, self.prompt_ids = request_id, model, prompt_ids
        self.truncated, self.timing = truncated, timing
        self.score_only, self.settings = score_only, settings
        self.texts, self.post_sampling_probs = texts, post_sampling_probs

    def prelude(self) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        if self.score_only or not (out.new_text or (self.texts and out.logprobs)):
            return None
        chunk = {"index": 0, "content": out.new_text, "tokens": out.new_token_ids,
                 "stop": False, "id_slot": -1, "tokens_predicted": out.num_output_tokens,
                 "tokens_evaluated": len(self.prompt_ids)}
        if self.texts is not None:
            chunk["completion_probabilities"] = self._probabilities(out.logprobs or [])
        return chunk

    def closing(self, results: list[ChoiceResult], usage: dict[str, Any],
                include_usage: bool) -> list[dict[str, Any]]:
        final = {**self._final(results[0]), "content": "", "tokens": []}
        final.pop("completion_probabilities", None)  # (sent with the chunks, as llama.cpp)
        return [final]

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        return self._final(results[0])

    def _final(self, result: ChoiceResult) -> dict[str, Any]:
        """The last body: the whole content (a stream's last chunk leaves it out), why it
        stopped, timings."""
        content = "" if self.score_only else "".join(result.text)
        predicted = 0 if self.score_only else result.num_output_tokens
        word = "" if self.score_only or not isinstance(result.stop_reason, str) else \
            result.stop_reason
        if self.score_only or result.finish_reason == "length":
            stop_type = "limit"
        elif word:
            stop_type = "word"
        else:
            stop_type = "eos"
        body = {"index": 0, "content": content,
                "tokens": [] if self.score_only else result.token_ids, "id_slot": -1,
                "stop": True, "model": self.model, "tokens_predicted": predicted,
                "tokens_evaluated": len(self.prompt_ids), "prompt": "",
                "has_new_line": "\n" in content, "truncated": self.truncated,
                "stop_type": stop_type, "stopping_word": word,
                "tokens_cached": result.num_cached_tokens,
                "generation_settings": self.settings,
                "timings": self._timings(result, predicted)}
        if self.texts is not None and not self.score_only:
            body["completion_probabilities"] = self._probabilities(result.logprobs)
        return body

    def _probabilities(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        """llama.cpp's `completion_probabilities`: each token's id, text, bytes and logprob
        (or probability), with its alternatives likewise."""
        assert self.texts is not None
        prob, top = ("prob", "top_probs") if self.post_sampling_probs else \
            ("logprob", "top_logprobs")

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.texts(token_id)
            value = math.exp(logprob) if self.post_sampling_probs else logprob
            return {"id": token_id, "token": text, "bytes": list(text.encode()), prob: value}

        return [{**entry(e.token_id, e.logprob), top: [entry(t, lp) for t, lp in e.top]}
                for e in entries]

    def _timings(self, result: ChoiceResult, predicted: int) -> dict[str, float]:
        """llama.cpp's timings: the prompt's part (the tokens computed, not found in the
        prefix cache) up to the first token, generation's after it."""
        ttft = self.timing.ttft() or 0.0
        prompt_n = len(self.prompt_ids) - result.num_cached_tokens
        prompt_ms, predicted_ms = ttft * 1e3, (self.timing.elapsed() - ttft) * 1e3
        return {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
                "prompt_per_second": prompt_n / ttft if ttft else 0.0,
                "predicted_n": predicted, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / max(predicted, 1),
                "predicted_per_second": predicted / predicted_ms * 1e3 if predicted_ms else 0.0}


def _limits(limit_s: float | None, n_indent: int | None) -> Callable[[Outputs], Outputs]:
    """llama.cpp's ends of an answer, as a wrapper of its outputs: `t_max_predict_ms` (the
    first output that arrives with a new line in the answer so far and `limit_s` after the
    first output ends it) and `n_indent` (a line that starts with fewer blanks than that,
    something after them, ends the answer before that something)."""
    async def limited(outputs: Outputs) -> Outputs:
        start, text, line = None, "", 0  # line: where the first unchecked line starts
        try:
            async for index, out in outputs:
                start = start or time.monotonic()
                before, text = len(text), text + out.new_text
                cut = None
                while n_indent and (newline := text.find("\n", line)) >= 0:
                    body = len(text) - len(text[newline + 1:].lstrip(" \t"))
                    if body == len(text):  # (only blanks so far: wait for the rest)
                        break
                    if body - newline - 1 < n_indent:
                        cut = body
                        break
                    line = newline + 1
                if cut is not None:
                    text = text[:cut]
                    yield index, dataclasses.replace(out, new_text=text[before:], finished=True,
                                                     finish_reason="length")
                    return
                if (limit_s and not out.finished and "\n" in text
                        and time.monotonic() - start > limit_s):
                    yield index, dataclasses.replace(out, finished=True, finish_reason="length")
                    return
                yield index, out
        finally:  # (ends the request in the engine if it still runs)
            await outputs.aclose()
    return limited


def props(state: ServerState) -> dict[str, Any]:
    """llama.cpp's GET /props, as its clients read it: the context size and the sampling
    defaults of /completion and /infill, the model's name and chat template."""
    engine = state.require_engine()
    defaults = {name: LlamaCppRequest.model_fields[name].default
                for name in ("temperature", "top_k", "top_p", "min_p")}
    return {"default_generation_settings": {
                "n_ctx": engine.max_model_len,
                "params": {"n_predict": -1, "seed": -1, "stop": [], **defaults}},
            "model_path": engine.model_name,
            "chat_template": engine.tokenizer.chat_template or "",
            "modalities": {"vision": False, "audio": False},
            "build_info": f"leapfrog {server_version()}"}


def _infill_tokens(tokenizer: Any) -> InfillTokens:
    infill = infill_tokens(tokenizer)
    if infill is None:
        raise bad_request("This model's tokenizer has no fill-in-the-middle tokens (such as "
                          "<|fim_prefix|>, <fim_prefix> or <PRE>): /infill needs a code model "
                          "trained to fill in the middle.", code="infill_not_supported")
    return infill


async def create_infill(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine, req = await admit_generation(request, state, api, InfillRequest)
    infill = _infill_tokens(engine.tokenizer)
    wanted = _wanted(req)
    window = min(WINDOW, engine.max_model_len // 2)
    room = engine.max_model_len - window - max(2 * (wanted or 0), ANSWER_ROOM)
    prompt_ids, truncated = infill.with_context(
        engine.tokenizer, req.input_prefix, req.prompt, req.input_suffix,
        [(f.filename, f.text) for f in req.input_extra], window, room)
    return await _generate(request, state, api, engine, req, "infill", prompt_ids, truncated,
                           infill.ends)


async def create_completion_llamacpp(request: Request, state: ServerState, api: ApiConfig
                                     ) -> Response:
    engine, req = await admit_generation(request, state, api, CompletionBody)
    prompt_ids = tokenize_prompts(engine.tokenizer, [req.prompt])[0]
    return await _generate(request, state, api, engine, req, "cmpl", prompt_ids, False, ())


def _wanted(req: LlamaCppRequest) -> int | None:
    """The tokens asked for: `n_predict` (1 for 0: the prompt alone), else `max_tokens`."""
    if req.n_predict is not None and req.n_predict >= 0:
        return max(req.n_predict, 1)
    return req.max_tokens


async def _generate(request: Request, state: ServerState, api: ApiConfig, engine: Any,
                    req: LlamaCppRequest, kind: str, prompt_ids: list[int], truncated: bool,
                    stop_ids: tuple[int, ...]) -> Response:
    """Generate for one prompt and answer as llama.cpp (`truncated`: the prompt was cut;
    `stop_ids`: tokens that end the answer besides the request's own)."""
    request_id = new_request_id(kind)
    score_only = req.n_predict == 0
    wanted = _wanted(req)
    max_tokens = wanted if wanted is not None else max(engine.max_model_len - len(prompt_ids), 1)
    check_context_length(len(prompt_ids), max_tokens, engine.max_model_len)
    if req.repeat_penalty is not None and req.repetition_penalty is None:
        req.repetition_penalty = req.repeat_penalty
    params = sampling_params(req, max_tokens, req.n_probs or None, engine.tokenizer)
    params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *stop_ids])
    if api.log_prompts:
        logger.debug("request %s prompt ids: %r", request_id, prompt_ids)
    timing = RequestTiming()
    settings = {"n_ctx": engine.max_model_len, "n_predict": 0 if score_only else max_tokens,
                "temperature": params.temperature, "top_k": params.top_k,
                "top_p": params.top_p, "min_p": params.min_p,
                "repeat_penalty": params.repetition_penalty, "seed": params.seed,
                "stop": list(params.stop), "n_probs": req.n_probs,
                "post_sampling_probs": req.post_sampling_probs}
    texts = TokenTexts(engine.tokenizer) if req.n_probs else None
    formatter = LlamaCppFormatter(request_id, engine.model_name, prompt_ids, truncated,
                                  timing, score_only, settings, texts, req.post_sampling_probs)
    limit_s = req.t_max_predict_ms / 1e3 if (req.t_max_predict_ms or 0) > 0 else None
    n_indent = req.n_indent if (req.n_indent or 0) > 0 else None  # (as llama.cpp: > 0 only)
    limit = _limits(limit_s, n_indent) if limit_s or n_indent else None
    generation = Generation(state, engine, make_jobs(request_id, [prompt_ids], 1, params),
                            [len(prompt_ids)], formatter, req.user, timing=timing, until=limit)
    return await generation.respond(request, req.stream, False)
