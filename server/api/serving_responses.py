"""POST /v1/responses: OpenAI's Responses API for text, on the chat path (the messages
rendered by the chat template, one reply). The reply is one `message` output item with one
`output_text` part; streamed, it goes out as the API's named events, from
`response.created` to `response.completed` (or `response.incomplete` when
`max_output_tokens` cut it short). Nothing is stored."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.api.admission import check_model, resolve_max_tokens
from server.api.body import parse_body
from server.api.config import ApiConfig
from server.api.errors import bad_request
from server.api.generation import ChoiceResult, check_context_length, make_jobs
from server.api.protocol import ResponsesRequest
from server.api.serving import Generation
from server.api.serving_chat import render_chat
from server.api.state import ServerState
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger("leapfrog.api")


def _status(finish_reason: str | None) -> str:
    """A finished reply's status: cut by max_output_tokens, ended by the server (a drain
    that timed out), or complete."""
    return {"length": "incomplete", "abort": "cancelled"}.get(finish_reason or "", "completed")


def response_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The chat usage object in the Responses API's names."""
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": usage["prompt_tokens_details"],
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


class ResponsesFormatter:
    """The Responses API's response object and stream events for one request."""

    named_events = True
    num_choices = 1

    def __init__(self, req: ResponsesRequest, model: str, params: SamplingParams) -> None:
        self.request_id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.req, self.model, self.params = req, model, params
        self.created = int(time.time())
        self.sequence = 0
        self.text = ""

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str, text: str | None) -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [] if text is None else [self._part(text)]}

    def _response(self, status: str, text: str | None, usage: dict[str, Any] | None,
                  finish_reason: str | None = None) -> dict[str, Any]:
        req, fmt = self.req, self.req.text.format if self.req.text else None
        return {
            "id": self.request_id, "object": "response", "created_at": self.created,
            "status": status, "error": None,
            "incomplete_details": ({"reason": "max_output_tokens"}
                                   if finish_reason == "length" else None),
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": [] if text is None else [self._item("completed", text)],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": self.params.temperature, "top_p": self.params.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt is not None else {"type": "text"}},
            "tool_choice": req.tool_choice or "auto", "tools": [], "truncation": "disabled",
            "usage": None if usage is None else response_usage(usage),
            "user": req.user, "metadata": req.metadata or {},
        }

    def prelude(self) -> list[dict[str, Any]]:
        started = self._response("in_progress", None, None)
        return [self._event("response.created", response=started),
                self._event("response.in_progress", response=started),
                self._event("response.output_item.added", output_index=0,
                            item=self._item("in_progress", None)),
                self._event("response.content_part.added", **self._where(),
                            part=self._part(""))]

    def delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        if not out.new_text:
            return None
        self.text += out.new_text
        return self._event("response.output_text.delta", **self._where(), delta=out.new_text,
                           logprobs=[])

    def closing(self, results: list[ChoiceResult], usage: dict[str, Any],
                include_usage: bool) -> list[dict[str, Any]]:
        reason = results[0].finish_reason
        done = self._response(_status(reason), self.text, usage, reason)
        return [self._event("response.output_text.done", **self._where(), text=self.text,
                            logprobs=[]),
                self._event("response.content_part.done", **self._where(),
                            part=self._part(self.text)),
                self._event("response.output_item.done", output_index=0,
                            item=self._item("completed", self.text)),
                self._event("response.incomplete" if reason == "length" else
                            "response.completed", response=done)]

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        r = results[0]
        return self._response(_status(r.finish_reason), "".join(r.text), usage, r.finish_reason)


async def create_response(request: Request, state: ServerState, api: ApiConfig) -> Response:
    engine = state.require_engine()
    req = await parse_body(request, ResponsesRequest, api.max_body_bytes)
    check_model(req.model, engine)
    text, prompt_ids = render_chat(engine.tokenizer, req.messages(), None,
                                   {"add_generation_prompt": True})
    max_tokens = resolve_max_tokens(req.max_output_tokens, len(prompt_ids),
                                    engine.max_model_len)
    values: dict[str, Any] = {"max_tokens": max_tokens, "seed": req.seed,
                              "json_schema": req.json_schema()}
    for name in ("temperature", "top_p"):
        if getattr(req, name) is not None:
            values[name] = getattr(req, name)
    try:
        params = SamplingParams(**values)
    except SamplingParamsError as exc:
        param = "max_output_tokens" if exc.param == "max_tokens" else exc.param
        raise bad_request(str(exc).replace("max_tokens", "max_output_tokens"), param=param,
                          code="invalid_value") from exc
    check_context_length(len(prompt_ids), max_tokens, engine.max_model_len)
    formatter = ResponsesFormatter(req, engine.model_name, params)
    if api.log_prompts:
        logger.debug("request %s prompt: %r", formatter.request_id, text)
    jobs = make_jobs(formatter.request_id, [prompt_ids], 1, params)
    generation = Generation(state, engine, jobs, [len(prompt_ids)], formatter, req.user)
    return await generation.respond(request, req.stream, False)
