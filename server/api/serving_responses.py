"""POST /v1/responses: OpenAI's Responses API on the chat path. A request becomes a chat
request (`ResponsesRequest.to_chat`: instructions, messages, earlier function calls and
their outputs, function tools, `text.format`), served by the chat machinery with one choice;
the reply's output items are, with a reasoning parser, a `reasoning` item (its one
`reasoning_text` part the reasoning split off the text, `server.api.reasoning`), then a
`message` with one `output_text` part and, with tools, the `function_call`s read from its
text (`server.api.tools.read_calls`); asked for, the text part carries its tokens' logprobs
in chat's entry shape. Streamed, it goes out as the API's named events, from
`response.created` to `response.completed` (or `response.incomplete` when
`max_output_tokens` cut it short): text deltas as they come without tools or a reasoning
parser; with either, the items once the reply is whole (its text is split only then: a
chunk goes out as one event, and these items need several). Finished
responses are kept (`server.api.response_store`) unless the request says `store: false`: a
later request continues one with `previous_response_id`, and GET and DELETE
/v1/responses/{id} read and drop them."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from server.api.admission import admit_generation, new_request_id
from server.api.config import ApiConfig
from server.api.errors import ApiError, bad_request, from_validation_error
from server.api.generation import ChoiceResult, make_jobs
from server.api.logprobs import TokenTexts, chat_logprobs
from server.api.protocol_responses import (
    ResponseInputItem,
    ResponseNamedToolChoice,
    ResponsesRequest,
)
from server.api.reasoning import ReasoningParser, with_reasoning_tokens
from server.api.response_store import ResponseStore, input_item_body
from server.api.serving import Generation
from server.api.serving_chat import ChatJob, prepare_chat
from server.api.state import EngineClient, ServerState
from server.api.tools import ToolMode, read_calls
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams


def _status(finish_reason: str | None) -> str:
    """A finished reply's status: cut by max_output_tokens, ended by the server (a drain
    that timed out), or complete."""
    return {"length": "incomplete", "abort": "cancelled"}.get(finish_reason or "", "completed")


def response_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The chat usage object in the Responses API's names."""
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": usage["prompt_tokens_details"],
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": usage.get("completion_tokens_details",
                                               {"reasoning_tokens": 0}),
            "total_tokens": usage["total_tokens"]}


class ResponsesFormatter:
    """The Responses API's response object and stream events for one request."""

    named_events = True

    done_marker = False
    num_choices = 1

    def __init__(self, request_id: str, req: ResponsesRequest, model: str,
                 params: SamplingParams, mode: ToolMode, store: ResponseStore | None,
                 texts: TokenTexts | None, reasoning: ReasoningParser | None = None) -> None:
        """`store`: where the finished response is kept; None: nowhere. `texts`: the
        tokens' texts where the request asks for logprobs; None: it does not. `reasoning`:
        how the reasoning is split off the reply; None: it is not."""
        self.request_id = request_id
        self.store, self.texts, self.reasoning = store, texts, reasoning
        self._unsent: list[TokenLogprob] = []  # logprobs of tokens whose text is held back
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"
        self.streams_text = mode.kind == "none" and reasoning is None  # (text as it comes)
        self.req, self.model, self.params, self.mode = req, model, params, mode
        self.created = int(time.time())
        self.sequence = 0

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _logprobs(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        return chat_logprobs(entries, self.texts)["content"] if self.texts else []

    def _part(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def _message(self, status: str, text: str | None,
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [] if text is None else [self._part(text, logprobs)]}

    def _reasoning_item(self, text: str | None) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [],
                "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}

    def _items(self, result: ChoiceResult) -> list[dict[str, Any]]:
        """The finished reply's output items: its reasoning (with a parser, where it has
        some), its message (unless it is nothing but reasoning and calls), then its function
        calls. The message's text carries every token's logprobs where it is the whole reply
        (no reasoning split off, no calls read out of it)."""
        text = reply = "".join(result.text)
        reasoning = None
        if self.reasoning is not None:
            reasoning, reply = self.reasoning.split(text)
        content, calls = read_calls(reply, self.mode) if reply is not None else (None, [])
        logprobs = self._logprobs(result.logprobs) if content == text else []
        items = [] if reasoning is None else [self._reasoning_item(reasoning)]
        if content is not None or not (calls or items):
            items.append(self._message("completed", content or "", logprobs))
        return items + [{"type": "function_call", "id": f"fc_{call['id'].removeprefix('call_')}",
                         "call_id": call["id"], "name": call["function"]["name"],
                         "arguments": call["function"]["arguments"], "status": "completed"}
                        for call in calls]

    def _response(self, status: str, output: list[dict[str, Any]],
                  usage: dict[str, Any] | None, finish_reason: str | None = None
                  ) -> dict[str, Any]:
        req, fmt = self.req, self.req.text.format if self.req.text else None
        return {
            "id": self.request_id, "object": "response", "created_at": self.created,
            "status": status, "error": None,
            "incomplete_details": ({"reason": "max_output_tokens"}
                                   if finish_reason == "length" else None),
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "reasoning": None,
            "store": self.store is not None,
            "temperature": self.params.temperature, "top_p": self.params.top_p,
            "top_logprobs": req.top_logprobs,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt is not None else {"type": "text"}},
            "tool_choice": (req.tool_choice.model_dump()
                            if isinstance(req.tool_choice, ResponseNamedToolChoice)
                            else req.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": req.truncation or "disabled",
            "usage": None if usage is None else response_usage(usage),
            "user": req.user, "metadata": req.metadata or {},
        }

    def prelude(self) -> list[dict[str, Any]]:
        started = self._response("in_progress", [], None)
        events = [self._event("response.created", response=started),
                  self._event("response.in_progress", response=started)]
        if self.streams_text:
            events += self._message_opened(0)
        return events

    def _message_opened(self, index: int) -> list[dict[str, Any]]:
        return [self._event("response.output_item.added", output_index=index,
                            item=self._message("in_progress", None)),
                self._event("response.content_part.added", item_id=self.item_id,
                            output_index=index, content_index=0, part=self._part(""))]

    def _text_delta(self, index: int, delta: str, logprobs: list[dict[str, Any]]
                    ) -> dict[str, Any]:
        return self._event("response.output_text.delta", item_id=self.item_id,
                           output_index=index, content_index=0, delta=delta, logprobs=logprobs)

    def _message_closed(self, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        part = item["content"][0]
        where = {"item_id": self.item_id, "output_index": index, "content_index": 0}
        return [self._event("response.output_text.done", **where, text=part["text"],
                            logprobs=part["logprobs"]),
                self._event("response.content_part.done", **where, part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _reasoning_events(self, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        part = item["content"][0]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [self._event("response.output_item.added", output_index=index,
                            item=self._reasoning_item(None)),
                self._event("response.content_part.added", **where,
                            part={**part, "text": ""}),
                self._event("response.reasoning_text.delta", **where, delta=part["text"]),
                self._event("response.reasoning_text.done", **where, text=part["text"]),
                self._event("response.content_part.done", **where, part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _call_events(self, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        where = {"item_id": item["id"], "output_index": index}
        return [self._event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", **where,
                            delta=item["arguments"]),
                self._event("response.function_call_arguments.done", **where,
                            arguments=item["arguments"], name=item["name"]),
                self._event("response.output_item.done", output_index=index, item=item)]

    def delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        """A text delta with its tokens' logprobs (those of tokens whose text came out only
        now included), where text goes out as it comes."""
        if not self.streams_text:
            return None
        self._unsent += out.logprobs or []
        if not out.new_text:
            return None
        logprobs, self._unsent = self._logprobs(self._unsent), []
        return self._text_delta(0, out.new_text, logprobs)

    def closing(self, results: list[ChoiceResult], usage: dict[str, Any],
                include_usage: bool) -> list[dict[str, Any]]:
        reason = results[0].finish_reason
        items = self._items(results[0])
        events = []
        for index, item in enumerate(items):
            if item["type"] == "reasoning":
                events += self._reasoning_events(index, item)
                continue
            if item["type"] == "function_call":
                events += self._call_events(index, item)
                continue
            if not self.streams_text:  # (not opened by the prelude)
                events += self._message_opened(index)
                part = item["content"][0]
                events.append(self._text_delta(index, part["text"], part["logprobs"]))
            events += self._message_closed(index, item)
        usage = with_reasoning_tokens(usage, self.reasoning, results)
        done = self._finished(self._response(_status(reason), items, usage, reason))
        kind = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=done)]

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        r = results[0]
        usage = with_reasoning_tokens(usage, self.reasoning, results)
        return self._finished(self._response(_status(r.finish_reason), self._items(r), usage,
                                             r.finish_reason))

    def _finished(self, response: dict[str, Any]) -> dict[str, Any]:
        if self.store is not None:
            self.store.put(response, list(self.req.input), self.req.previous_response_id)
        return response


def _not_found(response_id: str, param: str) -> ApiError:
    return ApiError(404, f"No response with id '{response_id}' is stored here (it was not "
                    f"stored, was deleted, or is older than the stored ones).", param=param,
                    code="response_not_found")


def _prepare(req: ResponsesRequest, earlier: list[ResponseInputItem], engine: EngineClient,
             api: ApiConfig, request_id: str) -> ChatJob:
    """The chat job of the request's conversation; with `truncation: auto`, of the longest
    end of it that fits the context (earliest items left out first)."""
    drop, items = 0, req.conversation(earlier)
    while True:
        try:
            chat = req.to_chat(items)
        except ValidationError as exc:  # (what only the chat request checks: tool_choice's name)
            raise from_validation_error(exc) from exc
        try:
            return prepare_chat(chat, engine, api, request_id)
        except ApiError as exc:
            shorter = (req.conversation(earlier, drop + 1) if req.truncation == "auto"
                       and exc.code == "context_length_exceeded" else [])
            if not shorter:
                raise
            drop, items = drop + 1, shorter


async def create_response(request: Request, state: ServerState, api: ApiConfig,
                          store: ResponseStore) -> Response:
    engine, req = await admit_generation(request, state, api, ResponsesRequest)
    earlier: list[ResponseInputItem] = []
    if req.previous_response_id is not None:
        found = store.conversation(req.previous_response_id)
        if found is None:
            raise _not_found(req.previous_response_id, "previous_response_id")
        earlier = found
    request_id = new_request_id("resp").replace("-", "_")
    job = _prepare(req, earlier, engine, api, request_id)
    keep = store if req.store is not False and store.capacity > 0 else None
    texts = TokenTexts(engine.tokenizer) if req.wants_logprobs else None
    formatter = ResponsesFormatter(request_id, req, engine.model_name, job.params, job.mode,
                                   keep, texts, job.reasoning)
    jobs = make_jobs(request_id, [job.prompt_ids], 1, job.params)
    generation = Generation(state, engine, jobs, [len(job.prompt_ids)], formatter, req.user)
    return await generation.respond(request, req.stream, False)


def get_response(response_id: str, store: ResponseStore) -> dict[str, Any]:
    entry = store.get(response_id)
    if entry is None:
        raise _not_found(response_id, "response_id")
    return entry.response


def delete_response(response_id: str, store: ResponseStore) -> dict[str, Any]:
    if not store.delete(response_id):
        raise _not_found(response_id, "response_id")
    return {"id": response_id, "object": "response", "deleted": True}


def list_input_items(response_id: str, store: ResponseStore, order: str, limit: int,
                     after: str | None) -> dict[str, Any]:
    """GET /v1/responses/{id}/input_items: the request's own input items, newest first
    unless `order` is asc, `limit` (1-100) at a time after the item `after`."""
    entry = store.get(response_id)
    if entry is None:
        raise _not_found(response_id, "response_id")
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be 'asc' or 'desc', got {order!r}", "order")
    if not 1 <= limit <= 100:
        raise bad_request(f"limit must be between 1 and 100, got {limit}", "limit")
    items = [input_item_body(item, f"item_{response_id.removeprefix('resp_')}_{i}")
             for i, item in enumerate(entry.inputs)]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"no input item {after!r} in this response", "after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
