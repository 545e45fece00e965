"""The thread-backed engine client on a tiny random model: concurrent streams, one wake-up of
the event loop per step, a failing step that fails its in-flight requests but not the
engine; and vLLM's request fields that reach the engine (priority, allowed_token_ids)
through the API."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.sampling_params import SamplingParams

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]


@pytest.fixture
def engine(tiny_model_dir):
    e = AsyncEngine(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32",
                                 num_kv_blocks=64, block_size=4, max_model_len=64))
    yield e
    e.shutdown()


async def _collect(engine: AsyncEngine, rid: str, prompt: list[int], max_tokens: int) -> list[int]:
    tokens: list[int] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for out in engine.generate(rid, prompt, params):
        tokens += out.new_token_ids
    return tokens


def test_concurrent_streams_get_their_tokens_with_one_wake_up_a_step(engine) -> None:
    steps = 0
    inner = engine.engine.step

    def counted_step():
        nonlocal steps
        outputs = inner()
        steps += bool(outputs)
        return outputs

    engine.engine.step = counted_step

    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        wake_ups = 0
        threadsafe = loop.call_soon_threadsafe

        def counted(callback, *args):
            nonlocal wake_ups
            wake_ups += 1
            return threadsafe(callback, *args)

        loop.call_soon_threadsafe = counted
        got = await asyncio.gather(*(_collect(engine, f"r{i}", p, 8)
                                     for i, p in enumerate(PROMPTS)))
        return got, wake_ups

    got, wake_ups = asyncio.run(main())
    assert 0 < wake_ups <= steps  # (not one a request a step: 4 requests, >= 8 steps each)
    assert [len(t) for t in got] == [8] * len(PROMPTS)
    alone = [asyncio.run(_collect(engine, f"a{i}", p, 8)) for i, p in enumerate(PROMPTS)]
    assert got == alone  # greedy: each stream got its own request's tokens


def test_a_failing_step_fails_in_flight_requests_and_serving_goes_on(engine) -> None:
    inner = engine.engine.step
    calls = 0

    def failing_once():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return inner()

    engine.engine.step = failing_once

    async def both() -> list[object]:
        return await asyncio.gather(*(_collect(engine, f"f{i}", p, 16)
                                      for i, p in enumerate(PROMPTS[:2])),
                                    return_exceptions=True)

    results = asyncio.run(both())
    assert all(isinstance(r, RuntimeError) and "engine error: boom" in str(r) for r in results)
    assert engine.is_alive()
    assert len(asyncio.run(_collect(engine, "after", PROMPTS[0], 4))) == 4
    assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0


def test_priority_through_the_api(tiny_model_dir) -> None:
    """`priority` (on chat, completions and responses): a 400 naming it unless the server
    runs --scheduling-policy priority, which serves it."""
    import httpx

    from server.api.protocol_responses import ResponsesRequest
    from tests.api_server import app_in_thread

    def config(policy: str) -> EngineConfig:
        return EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32",
                            num_kv_blocks=64, block_size=4, max_model_len=64,
                            scheduling_policy=policy)

    body = {"prompt": "w3 w4", "max_tokens": 2, "priority": -5}
    with app_in_thread(lambda: AsyncEngine(config("fcfs"))) as (url, _):
        reply = httpx.post(url + "/v1/completions", json=body)
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "priority"
        assert httpx.post(url + "/v1/completions", json=body | {"priority": 0}).status_code == 200
    with app_in_thread(lambda: AsyncEngine(config("priority"))) as (url, _):
        reply = httpx.post(url + "/v1/completions", json=body)
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] == 2
    # /v1/responses is served as the chat request it amounts to, priority included
    responses = ResponsesRequest.model_validate({"input": "hi", "priority": 3})
    assert responses.to_chat(responses.input).priority == 3


def test_allowed_token_ids_through_the_api(tiny_model_dir) -> None:
    import httpx

    from tests.api_server import app_in_thread

    config = EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64,
                          block_size=4, max_model_len=64)
    with app_in_thread(lambda: AsyncEngine(config)) as (url, _):
        body = {"prompt": "w3 w4", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(url + "/v1/completions", json=body | {"allowed_token_ids": [5, 9]})
        assert reply.status_code == 200, reply.text
        assert set(reply.json()["choices"][0]["text"].split()) <= {"w5", "w9"}
        bad = httpx.post(url + "/v1/completions", json=body | {"allowed_token_ids": [128]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "allowed_token_ids"
