"""The real server (`python -m server.cli serve`, default model, the process every live
test shares: conftest.py): concurrent streams, disconnects, metrics through
prometheus_client's parser, the prefix cache, and llama.cpp's endpoints on real weights."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def test_32_concurrent_streams_match_solo_greedy(url, model) -> None:
    prompts = [f"Write the number {i} in words:" for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=6,
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def run() -> tuple[list[str], list[str]]:
        solo = [await one(p) for p in prompts]
        together = await asyncio.gather(*(one(p) for p in prompts))
        return solo, list(together)

    solo, together = asyncio.run(run())
    assert all(solo)
    assert together == solo


def _health(url: str) -> dict:
    return httpx.get(url + "/health").json()


def test_disconnect_frees_blocks_within_a_second(url, model) -> None:
    idle = _health(url)
    assert idle["num_running"] == 0
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 400,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        for _ in range(4):
            next(lines)
        busy = _health(url)
        assert busy["num_running"] == 1
        assert busy["num_free_blocks"] < idle["num_free_blocks"]
    closed = time.monotonic()
    while time.monotonic() - closed < 1.0:
        now = _health(url)
        if now["num_running"] == 0 and now["num_free_blocks"] == idle["num_free_blocks"]:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"blocks not back within 1s: {now} vs idle {idle}")


def _samples(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items())
                                        if k != "model_name")
            values[key] = values.get(key, 0.0) + sample.value
    return values


def test_metrics_parse_and_move(url, client, model) -> None:
    before = _samples(url)
    assert "leapfrog:kv_cache_usage_perc" in before
    reply = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 5
    after = _samples(url)
    assert after["leapfrog:generation_tokens_total"] - before.get(
        "leapfrog:generation_tokens_total", 0) == 5
    assert after["leapfrog:prompt_tokens_total"] - before.get(
        "leapfrog:prompt_tokens_total", 0) == reply.usage.prompt_tokens
    key = "leapfrog:request_success_total,finished_reason=length"
    assert after[key] - before.get(key, 0) == 1
    assert after["leapfrog:e2e_request_latency_seconds_count"] > before.get(
        "leapfrog:e2e_request_latency_seconds_count", 0)


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(url, client, model) -> None:
    """The second of two chats sharing a system prompt reports, in its usage and in the
    metrics, the prompt tokens found cached (whole 16-token blocks, never its last)."""
    system = "You are a terse assistant for a lighthouse museum. " * 6
    before = _samples(url)
    replies = [client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": system},
                               {"role": "user", "content": question}],
        max_tokens=4, temperature=0) for question in ("Opening hours?", "Where is it?")]
    first, second = (r.usage for r in replies)
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert 48 <= cached < second.prompt_tokens and cached % 16 == 0
    after = _samples(url)
    assert after["leapfrog:prefix_cache_hits_total"] - before.get(
        "leapfrog:prefix_cache_hits_total", 0) == cached


def test_llama_cpp_completion_and_infill_on_the_default_model(url, client, model) -> None:
    """llama.cpp's /completion gives the greedy text and logprobs /v1/completions gives
    (`n_probs`: each greedy token its most likely), and follows a GBNF grammar; /infill is a
    400 on a model without fill-in-the-middle tokens (the default one)."""
    reply = httpx.post(url + "/completion", json={"prompt": "The capital of France is",
                                                  "n_predict": 6, "temperature": 0,
                                                  "n_probs": 3}, timeout=60).json()
    want = client.completions.create(model=model, prompt="The capital of France is",
                                     max_tokens=6, temperature=0, logprobs=3).choices[0]
    assert reply["content"] == want.text and reply["stop"] is True
    assert reply["tokens_predicted"] == 6 and reply["stop_type"] == "limit"
    probs = reply["completion_probabilities"]
    assert [p["logprob"] for p in probs] == pytest.approx(want.logprobs.token_logprobs, abs=1e-5)
    assert all(p["id"] == p["top_logprobs"][0]["id"] and len(p["top_logprobs"]) == 3
               for p in probs)
    chosen = httpx.post(url + "/completion", timeout=60, json={
        "prompt": "Is the sky blue? Answer:", "n_predict": 8, "temperature": 0,
        "grammar": 'root ::= " yes" | " no"'}).json()
    assert chosen["content"] in (" yes", " no") and chosen["stop_type"] == "eos"
    infill = httpx.post(url + "/infill", json={"input_prefix": "def f(", "input_suffix": ")"},
                        timeout=60)
    assert infill.status_code == 400
    assert infill.json()["error"]["code"] == "infill_not_supported"
