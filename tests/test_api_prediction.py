"""OpenAI's predicted outputs on /v1/chat/completions: `prediction` reaches the engine as
the text's tokens (`SamplingParams.prediction`, which n-gram drafting reads first:
tests/test_ngram.py, tests/test_speculative.py); a malformed one is a 400 naming it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api_fakes import FakeEngine
from tests.api_server import app_in_thread

USER = [{"role": "user", "content": "Rename x to y: x = 1"}]


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(step_s=0.001)
    with app_in_thread(lambda: engine) as (url, _):
        yield url, engine


def _chat(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"messages": USER, "max_tokens": 4, **body})


def test_the_prediction_reaches_the_engine_as_tokens(served) -> None:
    url, engine = served
    for content in ("y = 1", [{"type": "text", "text": "y ="}, {"type": "text", "text": " 1"}]):
        reply = _chat(url, prediction={"type": "content", "content": content})
        assert reply.status_code == 200, reply.text
        assert list(engine.params.values())[-1].prediction == tuple(map(ord, "y = 1"))
    assert _chat(url).status_code == 200
    assert list(engine.params.values())[-1].prediction == ()


def test_the_usage_counts_the_prediction_tokens_the_reply_holds(served) -> None:
    """OpenAI's `completion_tokens_details`: the prediction's tokens found in the reply (each
    reply token matching one), and the rest; over every choice; streamed, in the usage
    chunk."""
    url, _ = served
    content = _chat(url).json()["choices"][0]["message"]["content"]
    guess = content[:2] + "XY" + content[2:4] + "Z"  # (4 of 7 tokens in the reply)
    body = {"prediction": {"type": "content", "content": guess}}
    reply = _chat(url, **body).json()
    assert reply["choices"][0]["message"]["content"] == content
    assert reply["usage"]["completion_tokens_details"] == {
        "accepted_prediction_tokens": 4, "rejected_prediction_tokens": 3}
    two = _chat(url, n=2, **body).json()["usage"]["completion_tokens_details"]
    assert two == {"accepted_prediction_tokens": 8, "rejected_prediction_tokens": 6}
    lines = httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "messages": USER, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}, **body}).text.splitlines()
    (usage,) = [json.loads(line[len("data: "):])["usage"] for line in lines
                if line.startswith("data: {") and '"usage"' in line]
    assert usage["completion_tokens_details"]["accepted_prediction_tokens"] == 4
    assert "completion_tokens_details" not in _chat(url).json()["usage"]


@pytest.mark.parametrize(("prediction", "param"), [
    ({"type": "text", "content": "y"}, "prediction.type"),
    ({"type": "content"}, "prediction.content"),
    ({"type": "content", "content": [{"type": "image_url", "image_url": "u"}]},
     "prediction.content"),
    ("y = 1", "prediction"),
    ({"type": "content", "content": "y" * 300}, "prediction"),  # (past the fake's 256)
])
def test_a_malformed_prediction_is_refused(served, prediction, param) -> None:
    reply = _chat(served[0], prediction=prediction)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"].startswith(param), reply.json()
