"""A scripted fake OpenAI SSE server for the `bench` tests (test_bench_client.py).

The fake server runs in its own process (this file run as a script), so its timers do not
share a GIL with the client. Each test posts a script: delay to the first chunk (TTFT),
delay between chunks (ITL), tokens per chunk, whether usage is sent, whether a text-less
chunk is sent halfway between text chunks. Prompts containing
FAIL500 get an HTTP 500; prompts containing BREAK get an error event after the first chunk.

Tolerance (stated for the issue's "equal within a tolerance"): medians of measured latencies
and of send-time errors are within TOL_S (30 ms) of the script, every single sample within
MAX_S (150 ms: a shared, loaded CPU can stall one wake-up), run durations and throughputs
within REL (25%). Token counts, tokens per chunk and concurrency are exact, and throughputs
are exactly tokens / measured duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

TOL_S = 0.03
MAX_S = 0.15
REL = 0.25


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _text_chunk(n: int, chat: bool) -> dict:
    piece = "tok " * n
    delta = {"delta": {"content": piece}} if chat else {"text": piece}
    return {"choices": [{"index": 0, **delta, "finish_reason": None}], "usage": None}


class FakeOpenAI:
    """The fake server's state and routes (runs in the child process)."""

    def __init__(self) -> None:
        self.script: dict = {}
        self.arrivals: list[float] = []
        self.in_flight = self.max_in_flight = self.requests = self.gen_tokens = 0

    async def complete(self, request: Request) -> Response:
        t0 = time.perf_counter()
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        text = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        if "FAIL500" in text:
            return JSONResponse({"error": {"message": "scripted failure", "type": "server_error"}},
                                status_code=500)
        self.arrivals.append(t0)
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return StreamingResponse(self._stream(t0, text, chat), media_type="text/event-stream")

    async def _stream(self, t0: float, text: str, chat: bool) -> AsyncIterator[str]:
        s = self.script
        try:
            if chat:
                yield _event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            for i, n in enumerate(s["chunks"]):
                due = t0 + s["ttft"] + i * s["itl"]
                if i and s["empty_between"]:  # a text-less chunk halfway through the gap
                    await asyncio.sleep(max(0.0, due - s["itl"] / 2 - time.perf_counter()))
                    yield _event({"choices": [{"index": 0, "delta": {"content": ""}}]})
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if "BREAK" in text and i == 1:
                    yield _event({"error": {"message": "scripted stream error"}})
                    return
                yield _event(_text_chunk(n, chat))
                self.gen_tokens += n
            yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            if s["usage"]:
                usage = {"prompt_tokens": len(text.split()), "completion_tokens": sum(s["chunks"])}
                yield _event({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    async def metrics(self, request: Request) -> Response:
        n, lines = self.requests, []
        for name, value in (("spec_decode_num_drafts", 2 * n),
                            ("spec_decode_num_draft_tokens", 8 * n),
                            ("spec_decode_num_accepted_tokens", 5 * n),
                            ("num_preemptions", 0), ("generation_tokens", self.gen_tokens)):
            lines += [f"# TYPE leapfrog:{name} counter",
                      f'leapfrog:{name}_total{{model_name="fake"}} {value}']
        lines += ["# TYPE leapfrog:kv_cache_usage_perc gauge",
                  f'leapfrog:kv_cache_usage_perc{{model_name="fake"}} {0.25 * self.in_flight}']
        return PlainTextResponse("\n".join(lines) + "\n")

    async def set_script(self, request: Request) -> Response:
        self.script = await request.json()
        self.arrivals, self.max_in_flight = [], 0
        return JSONResponse({"ok": True})

    async def stats(self, request: Request) -> Response:
        return JSONResponse({"arrivals": self.arrivals, "max_in_flight": self.max_in_flight,
                             "in_flight": self.in_flight})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.complete, methods=["POST"]),
            Route("/v1/completions", self.complete, methods=["POST"]),
            Route("/v1/models", self.models), Route("/metrics", self.metrics),
            Route("/script", self.set_script, methods=["POST"]), Route("/stats", self.stats),
        ])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeServer:
    """Handle on the fake server process."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def script(self, ttft: float = 0.1, itl: float = 0.04, chunks: tuple[int, ...] = (1, 3, 2, 2),
               usage: bool = True, empty_between: bool = False) -> None:
        httpx.post(self.url + "/script", json={"ttft": ttft, "itl": itl, "chunks": list(chunks),
                                               "usage": usage, "empty_between": empty_between})

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats").json()


@contextlib.contextmanager
def running_fake_server() -> Iterator[FakeServer]:
    """Start the fake server in a child process; stop it on exit."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, str(port)], env={**os.environ})
    server = FakeServer(port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(server.url + "/stats").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("fake server did not start") from None
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(FakeOpenAI().app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
