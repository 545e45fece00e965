"""Response shapes, SSE streaming, fan-out and cancellation, against the fake engine (fast)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from tests.api_fakes import FakeEngine
from tests.api_server import app_in_thread


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(step_s=0.005)
    with app_in_thread(lambda: engine) as (url, state):
        yield url, engine, state


def _events(resp: httpx.Response) -> list[dict]:
    lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats(served, endpoint: str) -> None:
    """vLLM's stream_options.continuous_usage_stats: with include_usage, every chunk carries
    the usage so far (completion tokens growing to the final usage chunk's); without
    include_usage, no chunk does."""
    url, _, _ = served
    body = ({"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat"
            else {"prompt": "hi"}) | {"max_tokens": 6, "stream": True, "n": 2}
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    options = {"include_usage": True, "continuous_usage_stats": True}
    with httpx.stream("POST", url + path, json=body | {"stream_options": options}) as resp:
        events = _events(resp)
    final = events[-1]["usage"]
    assert events[-1]["choices"] == [] and final["completion_tokens"] == 12
    counts = [ev["usage"]["completion_tokens"] for ev in events]
    assert all(ev["usage"]["prompt_tokens"] == final["prompt_tokens"] for ev in events)
    assert counts == sorted(counts) and counts[-2] == 12 and counts[0] < 12
    plain = body | {"stream_options": {"continuous_usage_stats": True}}
    with httpx.stream("POST", url + path, json=plain) as resp:
        assert not any("usage" in ev for ev in _events(resp))

def test_chat_stream_chunks_and_usage(served) -> None:
    url, engine, _ = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "n": 2, "seed": 3, "stream_options": {"include_usage": True},
            "logit_bias": {"5": -2.5}, "response_format": {"type": "json_object"}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _events(resp)
    texts, reasons = {0: "", 1: ""}, {}
    for ev in events[:-1]:
        assert ev["object"] == "chat.completion.chunk" and ev["id"].startswith("chatcmpl-")
        (choice,) = ev["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            reasons[choice["index"]] = choice["finish_reason"]
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True))
    rids = sorted(r for r in engine.params if engine.params[r].seed in (3, 4))[-2:]
    assert [engine.params[r].seed for r in rids] == [3, 4]  # seed + i per choice
    assert [engine.params[r].logit_bias for r in rids] == [{5: -2.5}] * 2
    assert [engine.params[r].json_schema for r in rids] == ['{"type": "object"}'] * 2
    for i in (0, 1):
        seeded = engine.script(prompt, engine.params[rids[i]])[:5]
        assert texts[i] == seeded
    assert reasons == {0: "length", 1: "length"}
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 10,
                                   "total_tokens": len(prompt) + 10,
                                   "prompt_tokens_details": {"cached_tokens": 0}}


def test_completions_multi_prompt_echo_and_stop(served) -> None:
    url, engine, _ = served
    body = {"prompt": [[97, 98], [97, 98, 99]], "max_tokens": 6, "echo": True, "n": 2}
    resp = httpx.post(url + "/v1/completions", json=body).json()
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2, 3]
    assert resp["choices"][0]["text"].startswith("ab")
    assert resp["choices"][2]["text"].startswith("abc")
    assert resp["usage"]["prompt_tokens"] == 5  # each prompt counted once, not per choice
    assert resp["usage"]["completion_tokens"] == 24
    script = engine.script([97, 98], engine.params[max(engine.params)])
    stop = script[3]
    stopped = httpx.post(url + "/v1/completions", json={
        "prompt": "ab", "max_tokens": 10, "stop": stop, "temperature": 0}).json()["choices"][0]
    assert stopped["text"] == script[:3] and stopped["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_of_more_prompts_than_the_queue_holds(stream: bool) -> None:
    """300 prompts where 100 requests may wait: they run `JOB_WINDOW` at a time, every
    choice at its index, streamed or not (all at once, the request would be a 429)."""
    from server.api.generation import JOB_WINDOW

    engine = FakeEngine(step_s=0.0, max_waiting=100)
    body = {"prompt": [[97 + i % 20] for i in range(300)], "max_tokens": 2, "stream": stream}
    with app_in_thread(lambda: engine) as (url, _):
        resp = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        choices = ([c for e in _events(resp) for c in e["choices"] if c["finish_reason"]]
                   if stream else resp.json()["choices"])
    assert sorted(c["index"] for c in choices) == list(range(300))
    assert 1 < engine.peak_active <= JOB_WINDOW < 100


def test_logprob_shapes(served) -> None:
    url, _, _ = served
    chat = httpx.post(url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": True,
        "top_logprobs": 2}).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert len(content) == 3
    assert "".join(c["token"] for c in content) == chat["message"]["content"]
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode())
               for c in content)
    comp = httpx.post(url + "/v1/completions", json={"prompt": "ab", "max_tokens": 4,
                                                     "logprobs": 1}).json()["choices"][0]
    lp = comp["logprobs"]
    assert "".join(lp["tokens"]) == comp["text"]
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert len(lp["token_logprobs"]) == 4 and all(len(t) == 1 for t in lp["top_logprobs"])


def test_models_tokenize_detokenize(served) -> None:
    url, _, _ = served
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "fake-model"
    tok = httpx.post(url + "/tokenize", json={"prompt": "hey"}).json()
    assert tok["tokens"] == [104, 101, 121] and tok["count"] == 3
    assert httpx.post(url + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "hey"
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "a"}]})
    assert chat.json()["count"] == len("<user>a\n<assistant>")


def _wait_idle(engine: FakeEngine, state, timeout: float = 1.0) -> float:
    start = time.monotonic()
    while engine.active or state.in_flight:
        assert time.monotonic() - start < timeout, (engine.active, state.in_flight)
        time.sleep(0.01)
    return time.monotonic() - start


def _post_then_hang_up(url: str, path: str, body: dict, read_bytes: int, wait_s: float,
                       before_close: Callable[[], None]) -> bytes:
    """POST over a raw socket, read a little (or nothing), wait, check, close the connection."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        got = sock.recv(read_bytes) if read_bytes else b""
        time.sleep(wait_s)
        before_close()
    return got


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_engine_requests(served, stream) -> None:
    url, engine, state = served
    engine.step_s = 0.05
    try:
        body = {"prompt": "zz", "max_tokens": 200, "n": 2, "stream": stream}
        before = len(engine.aborted)

        def both_running() -> None:
            assert len(engine.active) == 2

        got = _post_then_hang_up(url, "/v1/completions", body, 64 if stream else 0, 0.3,
                                 both_running)
        if stream:
            assert got.startswith(b"HTTP/1.1 200")
        _wait_idle(engine, state)
        assert len(engine.aborted) == before + 2
    finally:
        engine.step_s = 0.005


def test_openai_bookkeeping_fields_are_served_and_change_nothing(served) -> None:
    """OpenAI's service, caching, monitoring and storage fields (which SDKs and agent
    frameworks send) are accepted on chat, completions and responses; the reply is the one
    without them."""
    url, _, _ = served
    extra = {"service_tier": "auto", "prompt_cache_key": "k1", "safety_identifier": "u1"}
    stored = {"store": False, "metadata": {"run": "7"}}
    for path, body, text in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
             lambda j: j["choices"][0]["message"]["content"]),
            ("/v1/completions", {"prompt": "hi"}, lambda j: j["choices"][0]["text"]),
            ("/v1/responses", {"input": "hi"}, lambda j: j["output"][0]["content"][0]["text"])]:
        limit = {"max_output_tokens": 4} if path == "/v1/responses" else {"max_tokens": 4}
        plain = httpx.post(url + path, json=body | limit)
        fields = extra | (stored if path != "/v1/responses" else {"metadata": {"run": "7"}})
        given = httpx.post(url + path, json=body | limit | fields)
        assert plain.status_code == given.status_code == 200, given.text
        assert text(given.json()) == text(plain.json())


def test_truncate_prompt_tokens(served) -> None:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens only (the echo shows them);
    -1: as many as the context (256) leaves beside max_tokens; with suffix a 400."""
    url, _, _ = served
    prompt = "abcdefghij" * 40  # 400 character tokens
    body = {"prompt": prompt, "max_tokens": 6, "echo": True}
    reply = httpx.post(url + "/v1/completions", json=body | {"truncate_prompt_tokens": 7})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == 7
    assert reply.json()["choices"][0]["text"].startswith("defghij")
    whole = httpx.post(url + "/v1/completions", json=body | {"truncate_prompt_tokens": -1})
    assert whole.json()["usage"]["prompt_tokens"] == 256 - 6
    for too_long in (body, body | {"max_tokens": 300, "truncate_prompt_tokens": -1}):
        reply = httpx.post(url + "/v1/completions", json=too_long)
        assert reply.status_code == 400
        assert reply.json()["error"]["code"] == "context_length_exceeded"
    chat = httpx.post(url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
        "truncate_prompt_tokens": 9})
    assert chat.json()["usage"]["prompt_tokens"] == 9
    fim = httpx.post(url + "/v1/completions", json={"prompt": "a", "suffix": "b",
                                                   "truncate_prompt_tokens": 3})
    assert fim.status_code == 400
    assert fim.json()["error"]["param"] == "truncate_prompt_tokens"
