"""The shared life of a generation request (chat, completions, responses): admit, fan out,
then either collect into one JSON body or stream SSE chunks (chat and completions end with
`data: [DONE]`; the Responses API names each event instead); log one line.

Endpoint modules supply a `Formatter` (the OpenAI response shape) and the engine jobs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.errors import ApiError, bad_request
from server.api.generation import (
    ChoiceJob,
    ChoiceResult,
    ClientDisconnected,
    RequestTiming,
    collect,
    merged_outputs,
    queue_full_error,
    unless_disconnected,
)
from server.api.state import EngineClient, ServerState
from server.engine.async_engine import EngineDeadError, QueueFullError
from server.engine.outputs import RequestOutput

logger = logging.getLogger("leapfrog.api")
_CLIENT_CLOSED = 499  # nginx's "client closed request"; nobody receives it
Outputs = AsyncIterator[tuple[int, RequestOutput]]
"""A request's outputs: (choice index, delta), as `merged_outputs` yields them."""


class Responder(Protocol):
    """Builds one endpoint's response body from its choices' results."""

    request_id: str
    num_choices: int

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]: ...


class Formatter(Responder, Protocol):
    """A `Responder` whose endpoint also streams: it builds the stream's chunks."""

    named_events: bool
    """Stream chunks go out as `event: <its type>` + `data:` (the Responses API); else as
    `data:` alone."""
    done_marker: bool
    """The stream ends with `data: [DONE]` (chat, completions; not llama.cpp's /infill)."""

    def prelude(self) -> list[dict[str, Any]]: ...
    def delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None: ...
    def closing(self, results: list[ChoiceResult], usage: dict[str, Any],
                include_usage: bool) -> list[dict[str, Any]]: ...


def usage(results: list[ChoiceResult], prompt_lengths: list[int]) -> dict[str, Any]:
    """OpenAI usage (prompt tokens counted once per prompt, and of them those found in the
    prefix cache: for each prompt, its best-served choice's), plus speculation counts if
    any."""
    prompt = sum(prompt_lengths)
    completion = sum(r.num_output_tokens for r in results)
    n = len(results) // len(prompt_lengths)  # (choice index = prompt index * n + i)
    cached = sum(max(r.num_cached_tokens for r in results[p * n:(p + 1) * n])
                 for p in range(len(prompt_lengths)))
    body: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion,
                            "prompt_tokens_details": {"cached_tokens": cached}}
    drafts = sum(r.num_draft_tokens for r in results)
    if drafts:
        body["speculative"] = {"draft_tokens": drafts,
                               "accepted_tokens": sum(r.num_accepted_tokens for r in results)}
    return body


def _sse(chunk: dict[str, Any] | str, named: bool = False) -> str:
    event = f"event: {chunk['type']}\n" if named and isinstance(chunk, dict) else ""
    return f"{event}data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its body iterator, so a client that disconnects
    while the iterator is parked at a `yield` still cancels its engine requests at once."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class Generation:
    """One admitted request: its jobs, formatter and bookkeeping."""

    def __init__(self, state: ServerState, engine: EngineClient, jobs: list[ChoiceJob],
                 prompt_lengths: list[int], formatter: Responder, user: str | None,
                 window: int | None = None, timing: RequestTiming | None = None,
                 until: Callable[[Outputs], Outputs] | None = None) -> None:
        """`formatter`: a `Formatter` where the request may stream; `window`: at most this
        many jobs in the engine at once (`merged_outputs`); `timing`: the request's marks
        (where its formatter reads them too); `until`: wraps the jobs' outputs, and may end
        them early (closing what it wraps ends the jobs in the engine)."""
        self.state, self.engine, self.jobs, self.window = state, engine, jobs, window
        self.prompt_lengths, self.formatter, self.user = prompt_lengths, formatter, user
        self.timing = timing or RequestTiming()
        self.until = until

    async def respond(self, request: Request, stream: bool, include_usage: bool,
                      continuous_usage: bool = False) -> Response:
        release = self.state.acquire()
        outputs = merged_outputs(self.engine, self.jobs, self.window)
        if self.until is not None:
            outputs = self.until(outputs)
        handed_off = False  # once the stream response owns `release` and `outputs`
        try:
            if not stream:
                results = await unless_disconnected(
                    collect(outputs, self.formatter.num_choices, self.timing), request)
                self._log(results, None)
                return JSONResponse(self.formatter.response(results, usage(results, self.prompt_lengths)))
            first = await unless_disconnected(anext(outputs, None), request)
            body = self._events(cast(Formatter, self.formatter), outputs, first, include_usage,
                                continuous_usage, release)
            handed_off = True
            return EventStreamResponse(body, media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        except QueueFullError as exc:
            self._log([], "rejected_queue_full")
            raise queue_full_error(self.state.retry_after_s) from exc
        except EngineDeadError as exc:
            self._log([], "engine_dead")
            raise ApiError(503, "The engine has stopped.", code="engine_dead") from exc
        except ValueError as exc:  # the engine refused the request (it never fits, ...)
            self._log([], "rejected_by_engine")
            raise bad_request(str(exc), param=getattr(exc, "param", None)) from exc
        except ClientDisconnected:
            self._log([], "client_disconnected")
            return Response(status_code=_CLIENT_CLOSED)
        finally:
            if not handed_off:
                release()
                await outputs.aclose()

    async def _events(self, formatter: Formatter,
                      outputs: AsyncIterator[tuple[int, RequestOutput]],
                      first: tuple[int, RequestOutput] | None, include_usage: bool,
                      continuous_usage: bool, release: Callable[[], None]
                      ) -> AsyncIterator[str]:
        results = [ChoiceResult() for _ in range(formatter.num_choices)]
        outcome = "client_disconnected"
        named = formatter.named_events

        def so_far(chunk: dict[str, Any]) -> dict[str, Any]:
            return {**chunk, "usage": usage(results, self.prompt_lengths)} \
                if continuous_usage else chunk

        try:
            for chunk in formatter.prelude():
                yield _sse(so_far(chunk), named)
            item = first
            while item is not None:
                index, out = item
                self.timing.on_output()
                results[index].add(out)
                chunk = formatter.delta(index, out)
                if chunk is not None:
                    yield _sse(so_far(chunk), named)
                item = await anext(outputs, None)
            for chunk in formatter.closing(results, usage(results, self.prompt_lengths),
                                                include_usage):
                yield _sse(chunk, named)
            outcome = ""
        except Exception as exc:  # headers are sent: report in-band, as OpenAI does
            outcome = type(exc).__name__
            logger.exception("request %s failed mid-stream", formatter.request_id)
            err = queue_full_error(self.state.retry_after_s) if isinstance(exc, QueueFullError) \
                else None
            message = err.message if err else "Internal error while generating."
            # (an "error" key: the official client raises it, whatever the endpoint)
            yield _sse({"error": {"message": message, "type": "server_error",
                                  "param": None, "code": err.code if err else "internal_error"}})
        finally:
            release()
            self._log(results, outcome or None)
            await outputs.aclose()
        if formatter.done_marker:
            yield _sse("[DONE]")

    def _log(self, results: list[ChoiceResult], outcome: str | None) -> None:
        ttft = self.timing.ttft()
        reasons = outcome or ",".join(str(r.finish_reason) for r in results)
        logger.info(
            "request %s prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs finish=%s%s",
            self.formatter.request_id, sum(self.prompt_lengths),
            sum(r.num_output_tokens for r in results),
            "-" if ttft is None else f"{ttft:.3f}s", self.timing.elapsed(), reasons,
            f" user={self.user}" if self.user else "",
        )
