"""Random request bodies against the real server: mixes of valid and odd fields on the three
OpenAI generating endpoints and llama.cpp's /completion, streamed or not, and on
/v1/embeddings, /v1/score and /v1/rerank. Each answer is a 200 of the endpoint's shape or a
400 with an OpenAI error body, never a 5xx or a broken stream, and afterwards the server
holds no request and no KV block. The bodies come from a seeded generator: a failing seed
replays."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.api_server import ExternalServer, shared_server

pytestmark = pytest.mark.slow

ODD = [None, True, False, 0, -1, 2, 0.5, -0.5, 1e30, 2**64, "", "x", "\u0000", "\U0001F600",
       [], {}, [1], ["a"], {"a": 1}, [[1]], [None], "<|im_end|>"]
"""Values any field may get instead of a sensible one."""

TEXTS = ["Hello", "", "Repeat: the cat sat on the mat. the cat sat on the mat.", "a " * 120,
         "\u00e9\u4e2d\U0001F600", "<|im_start|>system", "1, 2, 3, 4, 5, 6, 7"]

TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}

SAMPLING: dict[str, Callable[[random.Random], object]] = {
    "temperature": lambda r: r.choice([0, 0.7, 1.0, 2.0, 1e-6]),
    "top_p": lambda r: r.choice([0.1, 0.9, 1.0]),
    "top_k": lambda r: r.choice([-1, 1, 5, 10**6]),
    "min_p": lambda r: r.choice([0.0, 0.1, 1.0]),
    "min_tokens": lambda r: r.choice([0, 2, 50]),
    "n": lambda r: r.choice([1, 2, 3]),
    "stop": lambda r: r.choice(["\n", ["a", "the"], [" ", "."], "", [""]]),
    "stop_token_ids": lambda r: r.choice([[0], [1, 2], [49151], []]),
    "seed": lambda r: r.choice([0, -1, 2**63 - 1, -(2**63)]),
    "presence_penalty": lambda r: r.choice([-2, 0, 1.5]),
    "frequency_penalty": lambda r: r.choice([-2, 0, 2]),
    "repetition_penalty": lambda r: r.choice([0.5, 1.0, 1.3]),
    "logit_bias": lambda r: r.choice([{"13": 100}, {"0": -100, "2": 5}, {}, {"49151": 50}]),
    "logprobs": lambda r: r.choice([True, False, 0, 5]),
    "top_logprobs": lambda r: r.choice([0, 1, 20]),
    "ignore_eos": lambda r: r.choice([True, False]),
    "skip_special_tokens": lambda r: r.choice([True, False]),
    "include_stop_str_in_output": lambda r: r.choice([True, False]),
    "stream": lambda r: r.choice([True, False]),
    "stream_options": lambda r: r.choice([{"include_usage": True}, {}, {
        "include_usage": True, "continuous_usage_stats": True}]),
    "structured_outputs": lambda r: r.choice([{"choice": ["yes", "no"]}, {"regex": "[a-c]{3}"},
                                              {"json_object": True}]),
    "echo": lambda r: r.choice([True, False]),
    "response_format": lambda r: r.choice([{"type": "json_object"}, {"type": "text"}, {
        "type": "json_schema", "json_schema": {"name": "a", "schema": TOOL["function"][
            "parameters"]}}]),
    "tools": lambda r: [TOOL],
    "tool_choice": lambda r: r.choice(["auto", "none", "required",
                                       {"type": "function", "function": {"name": "f"}}]),
    "add_generation_prompt": lambda r: r.choice([True, False]),
    "continue_final_message": lambda r: r.choice([True, False]),
}


def _value(r: random.Random, make: Callable[[random.Random], object]) -> object:
    return r.choice(ODD) if r.random() < 0.1 else make(r)


def _messages(r: random.Random) -> list[dict]:
    out = []
    for _ in range(r.choice([1, 1, 2, 3])):
        role = r.choice(["user"] * 4 + ["system", "assistant", "tool", "bogus"])
        content = r.choice([r.choice(TEXTS)] * 4 + [
            [{"type": "text", "text": r.choice(TEXTS)}] * r.randint(1, 2), None, 5])
        message = {"role": role, "content": content}
        if role == "tool" and r.random() < 0.7:
            message["tool_call_id"] = "call_1"
        out.append(message)
    return out


LLAMA_CPP: dict[str, Callable[[random.Random], object]] = {
    "n_predict": lambda r: r.choice([0, 1, 4, 8, -1]),
    "repeat_penalty": lambda r: r.choice([1.0, 1.1]),
    "t_max_predict_ms": lambda r: r.choice([0, 1, 500]),
    "n_indent": lambda r: r.choice([0, 2, 4]),
    "cache_prompt": lambda r: r.choice([True, False]),
    "samplers": lambda r: ["top_k", "top_p", "infill"],
    "id_slot": lambda r: r.choice([-1, 0]),
    "n_probs": lambda r: r.choice([0, 3, 20, 21]),
    "post_sampling_probs": lambda r: r.choice([True, False]),
}
"""llama.cpp's own fields (/completion; its unknown ones are ignored, as llama.cpp's)."""


def _body(r: random.Random, endpoint: str) -> dict:
    if endpoint == "/v1/responses":
        body = {"input": r.choice([r.choice(TEXTS), _messages(r)]),
                "max_output_tokens": r.choice([1, 4, 8])}
        for key, make in [("temperature", SAMPLING["temperature"]),
                          ("stream", SAMPLING["stream"]),
                          ("top_logprobs", lambda r: r.choice([0, 2, 20, 21])),
                          ("truncation", lambda r: r.choice(["auto", "disabled", "x"])),
                          ("instructions", lambda r: r.choice(TEXTS)),
                          ("tools", lambda r: [{"type": "function", **TOOL["function"]}]),
                          ("text", lambda r: {"format": r.choice([{"type": "json_object"},
                                                                  {"type": "text"}])})]:
            if r.random() < 0.3:
                body[key] = _value(r, make)
        return body
    if endpoint == "/v1/embeddings":
        body = {"input": r.choice([r.choice(TEXTS), [r.choice(TEXTS)] * 2, [1, 2, 3],
                                   [[1, 2], [3]], [], [[]], [-1], [10**9], [1] * 9000])}
        for key, make in [("encoding_format", lambda r: r.choice(["float", "base64", "int8"])),
                          ("dimensions", lambda r: r.choice([1, 64, 576, 577, 0])),
                          ("user", lambda r: r.choice(TEXTS))]:
            if r.random() < 0.3:
                body[key] = _value(r, make)
        return body
    if endpoint == "/v1/score":
        texts = lambda r: r.choice([r.choice(TEXTS), [r.choice(TEXTS)] * r.randint(0, 3)])  # noqa: E731
        return {"text_1": _value(r, texts), "text_2": _value(r, texts)}
    if endpoint == "/v1/rerank":
        body = {"query": _value(r, lambda r: r.choice(TEXTS)),
                "documents": _value(r, lambda r: [r.choice(TEXTS)] * r.randint(0, 3))}
        if r.random() < 0.3:
            body["top_n"] = _value(r, lambda r: r.choice([0, 1, 5, -1]))
        return body
    if endpoint == "/completion":  # (n_predict -1 or odd: max_tokens bounds the answer)
        body = {"prompt": r.choice([r.choice(TEXTS), [1, 2, 3], [], [-1], [10**9]]),
                "max_tokens": 8}
        for key in r.sample(sorted(LLAMA_CPP), r.randint(0, 4)):
            body[key] = _value(r, LLAMA_CPP[key])
        for key in r.sample(sorted(SAMPLING), r.randint(0, 4)):
            body[key] = _value(r, SAMPLING[key])
        return body
    if endpoint == "/v1/chat/completions":
        body = {"messages": _messages(r)}
    else:
        body = {"prompt": r.choice([r.choice(TEXTS), [r.choice(TEXTS)] * 2, [1, 2, 3],
                                    [[1, 2], [3]], [], [[]], [-1], [10**9]])}
    body["max_tokens"] = r.choice([1, 4, 8])
    for key in r.sample(sorted(SAMPLING), r.randint(0, 6)):
        body[key] = _value(r, SAMPLING[key])
    return body


def _check_error(status: int, text: str) -> None:
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["message"] and error["type"] == "invalid_request_error", error


def _check_reply(endpoint: str, reply: dict) -> None:
    if endpoint == "/v1/responses":
        assert reply["object"] == "response" and reply["status"] in ("completed", "incomplete")
        return
    if endpoint == "/v1/rerank":
        assert reply["results"] and reply["usage"]["total_tokens"] > 0
        return
    if endpoint == "/completion":
        assert reply["stop"] is True and isinstance(reply["content"], str), reply
        assert reply["stop_type"] in ("eos", "word", "limit") and reply["timings"], reply
        return
    if endpoint in ("/v1/embeddings", "/v1/score"):
        assert reply["object"] == "list" and reply["data"]
        assert reply["usage"]["prompt_tokens"] == reply["usage"]["total_tokens"] > 0
        return
    kind = "chat.completion" if endpoint == "/v1/chat/completions" else "text_completion"
    assert reply["object"] == kind
    assert reply["choices"] and reply["usage"]["completion_tokens"] >= 0


def _check_stream(endpoint: str, text: str) -> None:
    """SSE: every data line JSON (but the closing [DONE]), no error event, and the end the
    endpoint promises: [DONE], the Responses API's final event, or llama.cpp's chunk with
    `stop` true."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events, text
    if endpoint == "/completion":
        chunks = [json.loads(e) for e in events]
        assert all("error" not in c for c in chunks), chunks[-3:]
        assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
        return
    if endpoint == "/v1/responses":
        last = json.loads(events[-1])
        assert last["type"] in ("response.completed", "response.incomplete"), last
        assert all(json.loads(e)["type"] != "error" for e in events)
        return
    assert events[-1] == "[DONE]", events[-3:]
    assert all("error" not in json.loads(e) for e in events[:-1])


GENERATING = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/completion"]
EMBEDDING = ["/v1/embeddings", "/v1/score", "/v1/rerank"]


@pytest.mark.parametrize("seed", range(3))
def test_random_requests_get_a_reply_or_a_400(seed: int) -> None:
    """70 requests to the generating endpoints, then 45 to the embedding ones (each group
    from its own generator)."""
    server = shared_server()
    seen: Counter = Counter()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for endpoints, count, r in ((GENERATING, 70, random.Random(seed)),
                                    (EMBEDDING, 45, random.Random(seed + 1000))):
            for _ in range(count):
                endpoint = r.choice(endpoints)
                seen[endpoint, _send(client, endpoint, _body(r, endpoint), seed)] += 1
        health = client.get("/health").json()
    # the mix reaches the engine on every endpoint, not only the validators
    assert all(seen[e, 200] > 0 for e in GENERATING + EMBEDDING), seen
    assert health["in_flight"] == 0
    if not isinstance(server, ExternalServer):
        assert health["num_free_blocks"] == health["num_total_blocks"]


def _send(client: httpx.Client, endpoint: str, body: dict, seed: int) -> int:
    """Post `body`; check the reply (a 200 of the endpoint's shape, or a 400); its status."""
    where = f"seed {seed}: {endpoint} {json.dumps(body)[:400]}"
    if body.get("stream") is True:
        with client.stream("POST", endpoint, json=body) as resp:
            text = resp.read().decode()
            if resp.status_code == 200:
                _check_stream(endpoint, text)
    else:
        resp = client.post(endpoint, json=body)
        text = resp.text
        if resp.status_code == 200:
            _check_reply(endpoint, resp.json())
    if resp.status_code != 200:
        try:
            _check_error(resp.status_code, text)
        except AssertionError as e:
            raise AssertionError(f"{where} -> {text[:400]}") from e
    return resp.status_code
