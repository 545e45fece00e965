"""Every error case returns the right status and OpenAI error body, and the server keeps
serving afterwards (fake engine, no model: fast)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from server import server_version
from server.api.config import ApiConfig
from tests.api_fakes import FakeEngine
from tests.api_server import app_in_thread

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine(max_model_len=64)
    with app_in_thread(lambda: engine, ApiConfig(max_body_bytes=2000, max_n=4)) as (url, _):
        with httpx.Client(base_url=url, timeout=10) as client:
            yield client, engine


def _ok(client: httpx.Client) -> None:
    resp = client.post(CHAT, json={"messages": MSGS, "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": MSGS, "functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"messages": MSGS, "tools": [{"type": "function"}]}, "tools.0.function", "invalid_value"),
    ({"messages": MSGS, "suffix": "x"}, "suffix", "unsupported_parameter"),
    ({"messages": MSGS, "logit_bias": {"one": 2}}, "logit_bias.one", "invalid_value"),
    ({"messages": MSGS, "logit_bias": {"1": 101}}, "logit_bias", "invalid_value"),
    ({"messages": MSGS, "logit_bias": {"100000": 1}}, "logit_bias", "invalid_value"),
    ({"messages": MSGS, "response_format": {"type": "yaml"}}, "response_format",
     "invalid_value"),
    ({"messages": MSGS, "response_format": {"type": "json_object", "schema": {}}},
     "response_format", "invalid_value"),
    ({"messages": MSGS, "response_format": {"type": "json_schema"}}, "response_format",
     "invalid_value"),
    ({"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "schema": [1]}}}, "response_format", "invalid_value"),
    ({"messages": MSGS, "response_format": {"type": "json_object"}, "min_tokens": 2},
     "min_tokens", "invalid_value"),
    ({"messages": MSGS, "temperature": 3}, "temperature", "invalid_value"),
    ({"messages": MSGS, "top_p": 0}, "top_p", "invalid_value"),
    ({"messages": MSGS, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": MSGS, "stop": [f"s{i}" for i in range(33)]}, "stop", "invalid_value"),
    ({"messages": MSGS, "n": 5}, "n", "invalid_value"),
    ({"messages": MSGS, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"messages": MSGS, "stream_options": {"include_usage": True}}, "stream_options",
     "invalid_value"),
    ({"messages": MSGS, "max_tokens": 2, "max_completion_tokens": 3}, "max_completion_tokens",
     "invalid_value"),
    ({"messages": MSGS, "stop_token_ids": [100000]}, "stop_token_ids", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content", "invalid_value"),
    ({"messages": [{"role": "user", "content": []}]}, "messages.0.content", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({}, "messages", "invalid_value"),
    ({"messages": MSGS, "stop": 5}, "stop", "invalid_value"),
    ({"messages": MSGS, "seed": 2**70}, "seed", "invalid_value"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content",
     "invalid_value"),
    ({"messages": MSGS, "stop": ["ok", "\udfff"]}, "stop.1", "invalid_value"),
])
def test_validation_errors_name_the_field(server, body, param, code) -> None:
    client, _ = server
    # (json.dumps escapes the lone surrogates, which httpx's own encoder refuses)
    err = _error(client.post(CHAT, content=json.dumps(body),
                             headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == code
    if param:
        assert param.split(".")[0] in err["message"] or err["code"] == "invalid_value"
    _ok(client)


def test_checks_across_fields_name_a_field_in_plain_words(server) -> None:
    """A model-level check has no field location: its 400 takes the field from the error's
    context and keeps the check's own sentence (no "Invalid value for" with nothing after)."""
    client, _ = server
    err = _error(client.post("/tokenize", json={}), 400)
    assert (err["param"], err["message"]) == ("prompt", "send exactly one of prompt or messages")
    err = _error(client.post(CHAT, json={"messages": MSGS, "top_logprobs": 2}), 400)
    assert err["message"] == "top_logprobs requires logprobs to be true"
    _ok(client)


def test_seed_at_the_top_of_its_range_serves_every_choice(server) -> None:
    """Choice i of n takes seed + i, wrapped to 64 bits: the largest seed with n = 2 is
    served, not refused as out of range."""
    client, _ = server
    resp = client.post(CHAT, json={"messages": MSGS, "n": 2, "seed": 2**63 - 1,
                                   "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1]


def test_unsupported_field_is_named_in_message(server) -> None:
    client, _ = server
    err = _error(client.post("/v1/completions", json={"prompt": "x", "functions": []}), 400)
    assert "'functions'" in err["message"]


def test_malformed_json_is_400(server) -> None:
    client, _ = server
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        err = _error(client.post(CHAT, content=raw, headers={"content-type": "application/json"}),
                     400)
        assert err["code"] == "invalid_json"
    _ok(client)


def test_deeply_nested_json_is_400() -> None:
    """Nesting past Python's recursion limit (json.loads raises RecursionError) is a 400,
    and the server keeps serving."""
    engine = FakeEngine(max_model_len=64)
    with app_in_thread(lambda: engine, ApiConfig(max_body_bytes=100_000)) as (url, _):
        with httpx.Client(base_url=url, timeout=10) as client:
            raw = b'{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
            err = _error(client.post(CHAT, content=raw,
                                     headers={"content-type": "application/json"}), 400)
            assert err["code"] == "invalid_json" and "nested" in err["message"]
            _ok(client)


def test_context_length_exceeded_names_both_numbers(server) -> None:
    client, _ = server
    prompt = "x" * 50
    err = _error(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20}), 400)
    assert err["code"] == "context_length_exceeded"
    assert "64" in err["message"] and "70" in err["message"]
    assert "50" in err["message"] and "20" in err["message"]
    _ok(client)


def test_a_model_without_chat_template_refuses_chat_only(server) -> None:
    """A 400 that says what to do; completions still serve."""
    client, engine = server
    engine.tokenizer.chat_template = None
    try:
        err = _error(client.post(CHAT, json={"messages": MSGS}), 400)
        assert err["code"] == "no_chat_template" and "--chat-template" in err["message"]
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).is_success
    finally:
        del engine.tokenizer.chat_template  # (the class's again)
    _ok(client)


def test_unknown_model_is_404(server) -> None:
    client, _ = server
    err = _error(client.post(CHAT, json={"model": "gpt-17", "messages": MSGS}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    _error(client.get("/v1/models/gpt-17"), 404)
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    _error(client.get("/no/such/route"), 404)


def test_body_over_limit_is_413(server) -> None:
    client, _ = server
    err = _error(client.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 3000}]}),
                 413)
    assert "2000" in err["message"]
    _ok(client)


def test_queue_full_is_429_with_retry_after() -> None:
    engine = FakeEngine(max_waiting=0)
    with app_in_thread(lambda: engine) as (url, state):
        for stream in (False, True):
            resp = httpx.post(url + CHAT, json={"messages": MSGS, "stream": stream}, timeout=10)
            err = _error(resp, 429)
            assert err["type"] == "rate_limit_error"
            assert int(resp.headers["retry-after"]) >= 1
        assert state.in_flight == 0
        engine.max_waiting = 10
        assert httpx.post(url + CHAT, json={"messages": MSGS, "max_tokens": 2}).status_code == 200


def test_browser_origins_only_when_allowed(server) -> None:
    """CORS: with --allowed-origins a named page's preflight is answered without the API
    key and its requests carry the allow header; another origin's get none, and by
    default no origin is allowed."""
    ui, other = "https://ui.example", "https://elsewhere.example"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    api = ApiConfig(api_key="k", allowed_origins=(ui,))
    with app_in_thread(lambda: FakeEngine(), api) as (url, _):
        resp = httpx.options(url + CHAT, headers={"Origin": ui, **preflight})
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == ui
        assert "authorization" in resp.headers["access-control-allow-headers"].lower()
        body = {"messages": MSGS, "max_tokens": 2}
        ok = httpx.post(url + CHAT, json=body, headers={"Origin": ui, "Authorization": "Bearer k"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ui
        denied = httpx.options(url + CHAT, headers={"Origin": other, **preflight})
        assert "access-control-allow-origin" not in denied.headers
        _error(httpx.post(url + CHAT, json=body, headers={"Origin": ui}), 401)
    client, _ = server  # (no --allowed-origins)
    resp = client.post(CHAT, json={"messages": MSGS, "max_tokens": 2}, headers={"Origin": ui})
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers


def test_api_key_required_when_set() -> None:
    with app_in_thread(FakeEngine, ApiConfig(api_key="s3cret")) as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = httpx.post(url + CHAT, json={"messages": MSGS}, headers=headers)
            assert _error(resp, 401)["code"] == "invalid_api_key"
        _error(httpx.get(url + "/v1/models"), 401)
        assert httpx.get(url + "/health").status_code == 200  # probes stay open
        version = httpx.get(url + "/version")  # (vLLM's, open as theirs)
        assert version.status_code == 200 and version.json()["version"] == server_version()
        good = {"Authorization": "Bearer s3cret"}
        resp = httpx.post(url + CHAT, json={"messages": MSGS, "max_tokens": 2}, headers=good)
        assert resp.status_code == 200


def test_loading_then_ready() -> None:
    release = threading.Event()

    def slow_loader() -> FakeEngine:
        release.wait(10)
        return FakeEngine()

    with app_in_thread(slow_loader, wait_ready=False) as (url, state):
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/ready").status_code == 503
        resp = httpx.post(url + CHAT, json={"messages": MSGS})
        assert _error(resp, 503)["code"] == "loading" and "retry-after" in resp.headers
        release.set()
        assert state.loaded.wait(10)
        assert httpx.get(url + "/ready").status_code == 200
        assert httpx.post(url + CHAT, json={"messages": MSGS, "max_tokens": 2}).status_code == 200


def test_failed_load_reports_dead() -> None:
    def broken() -> FakeEngine:
        raise RuntimeError("no weights")

    with app_in_thread(broken) as (url, _):
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.get(url + "/ready").json()["status"] == "failed"
        _error(httpx.post(url + CHAT, json={"messages": MSGS}), 503)


def test_draining_rejects_new_requests() -> None:
    with app_in_thread(FakeEngine) as (url, state):
        state.draining = True
        assert httpx.get(url + "/ready").status_code == 503
        assert httpx.get(url + "/health").status_code == 200
        assert _error(httpx.post(url + CHAT, json={"messages": MSGS}), 503)["code"] == "draining"
