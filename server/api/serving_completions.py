"""POST /v1/completions: one or more prompts (text or token ids), n choices each, optional
echo of the prompt; formatted as `text_completion` bodies or stream chunks."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.api.admission import (
    admit_generation,
    check_n,
    check_token_ids,
    keep_last,
    new_request_id,
    resolve_max_tokens,
    sampling_params,
    tokenize_prompts,
)
from server.api.config import ApiConfig
from server.api.errors import bad_request
from server.api.generation import (
    JOB_WINDOW,
    ChoiceResult,
    check_context_length,
    make_jobs,
)
from server.api.infill import infill_tokens
from server.api.logprobs import TokenTexts, completion_logprobs
from server.api.protocol import CompletionRequest
from server.api.serving import Generation
from server.api.state import ServerState
from server.engine.outputs import RequestOutput, TokenLogprob

logger = logging.getLogger("leapfrog.api")


class CompletionFormatter:
    """OpenAI completions response bodies and stream chunks for one request."""

    named_events = False

    done_marker = True

    def __init__(self, request_id: str, model: str, n: int, prompt_ids: list[list[int]],
                 echo_texts: list[str] | None, texts: TokenTexts | None,
                 score_only: bool = False) -> None:
        """`echo_texts`: each prompt's text, to echo (None: no echo); `texts`: token texts,
        with logprobs (None: none); echo with logprobs lists the prompt's tokens first.
        `score_only`: max_tokens 0 with echo (not streamed): the choices are the echoed
        prompts alone, the one token generated to get there left out."""
        self.score_only = score_only
        self.request_id, self.model, self.n = request_id, model, n
        self.num_choices = len(prompt_ids) * n
        self.prompt_ids = prompt_ids
        self.echo_texts, self.texts = echo_texts, texts
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}
        self._echoed: set[int] = set()

    def _echo(self, index: int) -> str:
        return self.echo_texts[index // self.n] if self.echo_texts else ""

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices}

    def prelude(self) -> list[dict[str, Any]]:
        return []

    def _logprobs(self, index: int, entries: list[TokenLogprob],
                  prompt: list[TokenLogprob | None] | None, offset: int
                  ) -> tuple[dict[str, Any], int]:
        """A choice's logprobs body for these generated tokens, after the prompt's when
        `prompt` (its logprobs, the first None) is given."""
        if prompt is None:
            return completion_logprobs(entries, self.texts, offset)
        return completion_logprobs([*prompt[1:], *entries], self.texts, offset,
                                   first_token=self.prompt_ids[index // self.n][0])

    def delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        text = out.new_text
        prompt = None
        if index not in self._echoed:
            self._echoed.add(index)
            text = self._echo(index) + text
            prompt = out.prompt_logprobs
        wants_logprobs = self.texts is not None and bool(out.logprobs or prompt)
        if not (text or out.finished or wants_logprobs):
            return None
        logprobs = None
        if self.texts is not None:
            logprobs, self._offsets[index] = self._logprobs(
                index, out.logprobs or [], prompt, self._offsets.get(index, 0))
        return self._envelope([{"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": out.finish_reason if out.finished else None,
                                "stop_reason": out.stop_reason}])

    def closing(self, results: list[ChoiceResult], usage: dict[str, Any],
                include_usage: bool) -> list[dict[str, Any]]:
        """After the last delta: the usage chunk, when asked for."""
        return [{**self._envelope([]), "usage": usage}] if include_usage else []

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            generated = [] if self.score_only else r.logprobs
            logprobs = None
            if self.texts is not None:
                logprobs = self._logprobs(i, generated, r.prompt_logprobs, 0)[0]
            text = "" if self.score_only else "".join(r.text)
            choices.append({"index": i, "text": self._echo(i) + text, "logprobs": logprobs,
                            "finish_reason": "length" if self.score_only else r.finish_reason,
                            "stop_reason": None if self.score_only else r.stop_reason})
        if self.score_only:
            usage = {**usage, "completion_tokens": 0, "total_tokens": usage["prompt_tokens"]}
        return {**self._envelope(choices), "usage": usage}


async def create_completion(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine, req = await admit_generation(request, state, api, CompletionRequest)
    check_n(req.n, api.max_n)
    request_id = new_request_id("cmpl")
    prompts = req.prompts()
    if api.log_prompts:
        logger.debug("request %s prompt: %r", request_id, prompts)
    infill = None
    if req.suffix is not None and req.truncate_prompt_tokens:
        raise bad_request("truncate_prompt_tokens does not combine with suffix (it would cut "
                          "the fill-in-the-middle prompt's markers).",
                          param="truncate_prompt_tokens")
    if req.suffix is not None:  # (fill in the middle: the text between prompt and suffix)
        infill = infill_tokens(engine.tokenizer)
        if infill is None:
            raise bad_request("This model's tokenizer has no fill-in-the-middle tokens (such as "
                              "<|fim_prefix|>, <fim_prefix> or <PRE>): a suffix cannot be "
                              "filled in.", param="suffix", code="suffix_not_supported")
        for p in prompts:
            if isinstance(p, list):
                check_token_ids(p, engine.tokenizer, "prompt")
        prompt_ids = [infill.prompt(engine.tokenizer, p, req.suffix) for p in prompts]
    else:
        prompt_ids = keep_last(tokenize_prompts(engine.tokenizer, prompts),
                               req.truncate_prompt_tokens,
                               engine.max_model_len - (req.max_tokens or 1))
    longest = max(len(p) for p in prompt_ids)
    # max_tokens 0 with echo scores the prompt (OpenAI's legacy completions, older
    # evaluation harnesses): one token is generated, and left out of the reply
    score_only = req.echo and req.max_tokens == 0
    if score_only and req.stream:
        raise bad_request("max_tokens 0 (echo: the prompt scored, nothing generated) is not "
                          "streamed; send stream: false", param="stream")
    max_tokens = 1 if score_only else resolve_max_tokens(req.max_tokens, longest,
                                                         engine.max_model_len)
    params = sampling_params(req, max_tokens, req.logprobs, engine.tokenizer,
                             prompt_logprobs=req.logprobs if req.echo else None)
    if infill is not None:
        params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids,
                                                             *infill.ends])
    check_context_length(longest, max_tokens, engine.max_model_len)
    jobs = make_jobs(request_id, prompt_ids, req.n, params)
    echo_texts = None
    if req.echo:  # (a truncated prompt is echoed as it was computed)
        echo_texts = [p if isinstance(p, str) and not req.truncate_prompt_tokens
                      else engine.tokenizer.decode(ids)
                      for p, ids in zip(prompts, prompt_ids, strict=True)]
    texts = TokenTexts(engine.tokenizer) if req.logprobs is not None else None
    formatter = CompletionFormatter(request_id, engine.model_name, req.n, prompt_ids,
                                    echo_texts, texts, score_only)
    generation = Generation(state, engine, jobs, [len(p) for p in prompt_ids], formatter,
                            req.user, JOB_WINDOW)
    return await generation.respond(request, req.stream, req.include_usage, req.continuous_usage)
