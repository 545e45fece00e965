"""/v1/responses on the real server (`python -m server.cli serve`, default model) through the
official `openai` client: replies as chat's, streamed or not, forced function calls, and
conversations continued from stored responses. The server is the one `test_api_live` uses."""

from __future__ import annotations

import json

import openai
import pytest

from tests.live.test_api_live import MSG

pytestmark = pytest.mark.slow


def test_responses_api_replies_as_chat_does(client, model) -> None:
    """/v1/responses through the official client: the greedy reply to instructions + input
    is the chat reply to the same messages, streamed or not, with the same token counts."""
    chat = client.chat.completions.create(
        model=model, max_tokens=16, temperature=0,
        messages=[{"role": "system", "content": "Answer briefly."}, *MSG])
    reply = client.responses.create(model=model, instructions="Answer briefly.", input=MSG,
                                    max_output_tokens=16, temperature=0)
    assert reply.output_text == chat.choices[0].message.content
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens
    assert reply.status == ("incomplete" if chat.choices[0].finish_reason == "length"
                            else "completed")
    events = list(client.responses.create(model=model, instructions="Answer briefly.",
                                          input=MSG, max_output_tokens=16, temperature=0,
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        reply.output_text)
    assert events[-1].response.output_text == reply.output_text
    weather = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    forced = client.responses.create(
        model=model, input="What is the weather in Paris?", tools=[weather], temperature=0,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40)
    (call,) = forced.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city"}


def test_a_stored_reply_continues_as_the_whole_chat_would(client, model) -> None:
    """previous_response_id: the reply is the chat reply to the whole conversation (the
    earlier turn's input and output, then the new input), with the same token counts; once
    the first turn is deleted, continuing the second is a 404."""
    first = client.responses.create(model=model, input="My name is Ada. Say hi.",
                                    max_output_tokens=20, temperature=0)
    second = client.responses.create(model=model, previous_response_id=first.id,
                                     input="What is my name?", max_output_tokens=20,
                                     temperature=0)
    chat = client.chat.completions.create(model=model, max_tokens=20, temperature=0, messages=[
        {"role": "user", "content": "My name is Ada. Say hi."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert client.responses.retrieve(second.id).output_text == second.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model, previous_response_id=second.id, input="And?",
                                max_output_tokens=2)


def test_logprobs_are_chats(client, model) -> None:
    """include message.output_text.logprobs with top_logprobs: one entry per output token
    (the end-of-text token too, as chat counts it), the greedy token the top alternative,
    the entries chat's for the same messages, bit for bit (the repeated prompt's first
    blocks come from the prefix cache: `tests/test_native_prefill.py`); streamed, the
    deltas' add up to them."""
    chat = client.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=MSG,
                                          logprobs=True, top_logprobs=3)
    reply = client.responses.create(model=model, input=MSG, max_output_tokens=12, temperature=0,
                                    include=["message.output_text.logprobs"], top_logprobs=3)
    logprobs = [e.model_dump() for e in reply.output[0].content[0].logprobs]
    assert len(logprobs) == reply.usage.output_tokens
    for entry in logprobs:
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] <= 0
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=1e-4)
    assert logprobs == chat.choices[0].logprobs.model_dump()["content"]
    events = list(client.responses.create(model=model, input=MSG, max_output_tokens=12,
                                          temperature=0, top_logprobs=3, stream=True))
    streamed = [e.model_dump() for ev in events if ev.type == "response.output_text.delta"
                for e in ev.logprobs]
    (done,) = [ev for ev in events if ev.type == "response.output_text.done"]
    assert [e.model_dump() for e in done.logprobs] == logprobs
    assert streamed == logprobs[:len(streamed)]
    assert len(streamed) >= len(logprobs) - 1  # (the end-of-text token has no text)
