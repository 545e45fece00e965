"""SIGTERM during a stream: readiness and new requests turn 503, the stream completes, and
the process exits 0 (its own server process, since it ends it)."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.api_server import LiveServer

pytestmark = pytest.mark.slow


def test_sigterm_drains_the_stream_then_exits_zero() -> None:
    server = LiveServer("--max-model-len", "256", "--kv-cache-memory-gb", "0.1",
                        "--drain-timeout", "300").wait_ready()
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True,
                "stream": True, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as resp:
            lines = (line for line in resp.iter_lines() if line)
            events = [next(lines)]
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            # Probes while the stream is still being generated (tokens queue up in the socket).
            health = httpx.get(server.url + "/health").json()
            assert health["draining"] is True and health["in_flight"] == 1
            assert httpx.get(server.url + "/ready").status_code == 503
            new = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert new.status_code == 503 and new.json()["error"]["code"] == "draining"
            events.extend(lines)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 90
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.stop()
