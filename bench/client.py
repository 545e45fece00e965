"""One request to an OpenAI-compatible server: streamed and timed chunk by chunk, or (an
embeddings request) whole.

Timing follows `vllm bench serve`: the clock starts just before the request is sent; TTFT is
the arrival of the first chunk that carries generated text (or the finish chunk of a stream
that ends at once, e.g. on end-of-sequence); each later text chunk adds one inter-chunk
latency (ITL); E2E latency runs to the last `data:` event (the usage event when
the server sends one). Token counts come from the final `usage` event, which the request asks
for with `stream_options.include_usage`. Any failure (connection, HTTP status, an error
event, a stream that ends without any token) is returned as a failed result with its
reason, never raised. An embeddings request's one reply is its first and last chunk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.datasets import BenchRequest


@dataclass(frozen=True)
class Target:
    """The server under test and the request options shared by every request."""

    base_url: str
    model: str
    endpoint: str = "chat"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False

    @property
    def url(self) -> str:
        """Full URL of the endpoint."""
        return root_url(self.base_url) + _PATHS[self.endpoint]

    def headers(self) -> dict[str, str]:
        """HTTP headers, with the bearer token when an API key is set."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def payload(self, req: BenchRequest) -> dict[str, Any]:
        """The JSON body for one request."""
        if self.endpoint == "embeddings":
            return {"model": self.model, "input": req.prompt_text()}
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            body["messages"] = req.messages
        else:
            body["prompt"] = req.prompt_text()
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
          "embeddings": "/v1/embeddings"}
"""Each `Target.endpoint`'s path."""


def root_url(base_url: str) -> str:
    """The server root: `http://h:p`, `http://h:p/` and `http://h:p/v1` all give `http://h:p`."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class RequestResult:
    """What one request measured. Times are in seconds; `start` is `time.perf_counter()`."""

    request_id: str
    success: bool = False
    error: str = ""
    start: float = 0.0
    end: float = 0.0
    ttft: float = 0.0
    e2el: float = 0.0
    itls: list[float] = field(default_factory=list)
    num_chunks: int = 0
    text: str = ""
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    token_source: str = "none"


def _chunk_text(event: dict[str, Any], endpoint: str) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _error_text(err: Any) -> str:
    """The message of an OpenAI-style `error` value (a dict with `message`, or anything)."""
    if isinstance(err, dict):
        err = err.get("message", err)
    return str(err)[:200]


def _error_message(body: str) -> str:
    """The error message in an HTTP error body, or the body's start when it is not JSON."""
    try:
        return _error_text(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200]


def _apply_event(result: RequestResult, event: dict[str, Any], now: float,
                 last_text: float, endpoint: str) -> bool:
    """Fold one parsed `data:` event into the result; True when it carried text."""
    if "error" in event and not event.get("choices"):
        raise _StreamError(f"error event: {_error_text(event['error'])}")
    text = _chunk_text(event, endpoint)
    choices = event.get("choices") or [{}]
    # A stream whose only token is the end of sequence carries no text: its finish chunk is
    # its first (and only) token, as vLLM's benchmark counts it.
    eos_only = result.num_chunks == 0 and choices[0].get("finish_reason") is not None
    if text or eos_only:
        if result.num_chunks == 0:
            result.ttft = now - result.start
        else:
            result.itls.append(now - last_text)
        result.num_chunks += 1
        result.text += text
    usage = event.get("usage")
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.output_tokens = usage.get("completion_tokens")
        if result.output_tokens is not None:
            result.token_source = "usage"
    return bool(text or eos_only)


class _StreamError(Exception):
    """The server reported an error inside the stream."""


async def _read_stream(response: httpx.Response, result: RequestResult, endpoint: str) -> None:
    last = last_text = result.start
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        now = time.perf_counter()
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise _StreamError(f"bad JSON in stream: {data[:80]!r}") from exc
        if _apply_event(result, event, now, last_text, endpoint):
            last_text = now
        last = now
    result.e2el = last - result.start


async def send_request(client: httpx.AsyncClient, target: Target, req: BenchRequest) -> RequestResult:
    """Send one request and time it; failures come back in the result."""
    result = RequestResult(request_id=req.id, start=time.perf_counter())
    try:
        await _send(client, target, req, result)
    finally:
        result.end = time.perf_counter()
    return result


async def _send(client: httpx.AsyncClient, target: Target, req: BenchRequest,
                result: RequestResult) -> None:
    if target.endpoint == "embeddings":
        await _send_embedding(client, target, req, result)
        return
    try:
        async with client.stream("POST", target.url, json=target.payload(req),
                                 headers=target.headers()) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return
            await _read_stream(response, result, target.endpoint)
    except _StreamError as exc:
        result.error = str(exc)
        return
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return
    if result.num_chunks == 0:
        result.error = "stream ended without any generated token"
        return
    result.success = True


async def _send_embedding(client: httpx.AsyncClient, target: Target, req: BenchRequest,
                          result: RequestResult) -> None:
    """One /v1/embeddings request (not streamed): its reply is its only chunk, so its TTFT
    is its E2E latency; its input tokens come from the usage, it has no output tokens."""
    try:
        response = await client.post(target.url, json=target.payload(req),
                                     headers=target.headers())
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return
    result.e2el = result.ttft = time.perf_counter() - result.start
    if response.status_code != 200:
        result.error = f"HTTP {response.status_code}: {_error_message(response.text)}"
        return
    try:
        body = response.json()
        vectors = [d["embedding"] for d in body["data"]]
    except (ValueError, KeyError, TypeError):
        result.error = f"not an embeddings reply: {response.text[:80]!r}"
        return
    if len(vectors) != 1 or not vectors[0]:
        result.error = f"expected one embedding, got {len(vectors)}"
        return
    result.num_chunks = 1
    result.prompt_tokens = (body.get("usage") or {}).get("prompt_tokens")
    result.output_tokens, result.token_source = 0, "usage"
    result.success = True
