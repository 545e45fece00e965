"""SIGTERM during a stream: readiness and new requests turn 503, the stream completes, and
the process exits 0 (its own server process, since it ends it)."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from tests.api_server import LiveServer

pytestmark = pytest.mark.slow


def test_sigterm_drains_the_stream_then_exits_zero() -> None:
    server = LiveServer("--max-model-len", "256", "--kv-cache-memory-gb", "0.1").wait_ready()
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True,
                "stream": True, "temperature": 0}
        events: list[str] = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
            lines = (line for line in resp.iter_lines() if line)
            events.append(next(lines))
            server.proc.send_signal(signal.SIGTERM)
            probes: dict[str, int] = {}

            def probe() -> None:  # while the stream is still running
                probes["ready"] = httpx.get(server.url + "/ready").status_code
                probes["new"] = httpx.post(server.url + "/v1/completions",
                                           json={"prompt": "x", "max_tokens": 2}).status_code

            checker = threading.Timer(0.3, probe)
            checker.start()
            events.extend(lines)
            checker.join()
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 100
        assert probes == {"ready": 503, "new": 503}
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.stop()
