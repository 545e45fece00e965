"""POST /v1/responses (OpenAI's Responses API, text) through the official client and raw
HTTP on the fake engine: the response object, the stream's named events in order, the
request's mapping onto the chat path, and what it refuses."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.api_fakes import FakeEngine
from tests.api_server import app_in_thread
from tests.test_api_tools import ANSWER, USER, WEATHER, ToolEngine


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(max_model_len=128)
    with app_in_thread(lambda: engine) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        yield url, client, engine


def _prompt(engine: FakeEngine, *messages: tuple[str, str]) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False,
        add_generation_prompt=True)


def test_a_response_is_the_chat_reply(served) -> None:
    """instructions + input render as a system message before the input's messages, as a
    chat request's would; the reply is one message with one output_text part; a stop ends
    it `completed`, max_output_tokens `incomplete`."""
    url, client, engine = served
    reply = client.responses.create(model="fake-model", instructions="be brief", input="hello",
                                    max_output_tokens=40, temperature=0.5, top_p=0.9,
                                    metadata={"k": "v"})
    chat = client.chat.completions.create(
        model="fake-model", max_tokens=40, messages=[{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hello"}])
    assert reply.output_text == chat.choices[0].message.content
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.id.startswith("resp_") and reply.object == "response"
    [item] = reply.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [part.type for part in item.content] == ["output_text"]
    assert reply.usage.input_tokens == len(_prompt(engine, ("system", "be brief"),
                                                   ("user", "hello")))
    assert reply.usage.output_tokens == 40 == reply.usage.total_tokens - reply.usage.input_tokens
    assert (reply.temperature, reply.top_p, reply.metadata) == (0.5, 0.9, {"k": "v"})
    assert reply.store is True and reply.previous_response_id is None
    params = engine.params[reply.id]
    assert (params.max_tokens, params.temperature, params.top_p) == (40, 0.5, 0.9)
    listed = client.responses.create(model="fake-model", input=[
        {"role": "developer", "content": "terse"},
        {"role": "user", "content": [{"type": "input_text", "text": "hel"},
                                     {"type": "input_text", "text": "lo"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "hi", "annotations": []}]},
        {"role": "user", "content": "again"}], max_output_tokens=3)
    expected = engine.script(engine.tokenizer.encode(_prompt(
        engine, ("developer", "terse"), ("user", "hello"), ("assistant", "hi"),
        ("user", "again"))), engine.params[listed.id])[:3]
    assert listed.output_text == expected


def test_the_stream_sends_the_named_events_in_order(served) -> None:
    """Raw SSE: each event named by an `event:` line matching its type, sequence numbers
    0, 1, ...; the deltas add up to the text of the done events and the final response;
    no `[DONE]`. The official client reads the same stream."""
    url, client, _ = served
    body = {"model": "fake-model", "input": "hi", "max_output_tokens": 6, "stream": True}
    with httpx.stream("POST", url + "/v1/responses", json=body, timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in resp.read().decode().split("\n\n") if f]
    events = []
    for frame in frames:
        name, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 6,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.incomplete"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(deltas)
    assert events[-4]["text"] == events[-3]["part"]["text"] == text
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] == 6 and final["status"] == "incomplete"
    assert events[0]["response"]["status"] == "in_progress"
    streamed = client.responses.create(model="fake-model", input="hi", max_output_tokens=6,
                                       stream=True)
    assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == text


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {
        "type": "function", "name": "g"}}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.function_call_output"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.message.content"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
])
def test_refusals_name_the_field(served, fields, param) -> None:
    url, _, _ = served
    resp = httpx.post(url + "/v1/responses", json={"input": "hi", **fields})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith(param), resp.json()


def test_stored_responses_continue_a_conversation(served) -> None:
    """A response continued by `previous_response_id` puts the whole chain before its
    input (each turn's input and output; instructions are not carried over); GET returns a
    stored response, DELETE drops it, and a chain with a dropped link is a 404."""
    url, client, engine = served
    first = client.responses.create(model="fake-model", instructions="be brief",
                                    input="hello", max_output_tokens=4)
    second = client.responses.create(model="fake-model", previous_response_id=first.id,
                                     input="again", max_output_tokens=4)
    turns = [("user", "hello"), ("assistant", first.output_text), ("user", "again")]
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == len(_prompt(engine, *turns))
    assert second.output_text == engine.script(engine.tokenizer.encode(_prompt(
        engine, *turns)), engine.params[second.id])[:4]
    events = list(client.responses.create(model="fake-model", previous_response_id=second.id,
                                          input="more", max_output_tokens=4, stream=True))
    third = events[-1].response
    turns += [("assistant", second.output_text), ("user", "more")]
    assert third.usage.input_tokens == len(_prompt(engine, *turns)) and third.store
    got = client.responses.retrieve(first.id)
    assert (got.id, got.output_text, got.instructions) == (first.id, first.output_text,
                                                           "be brief")
    assert client.responses.retrieve(third.id).output_text == third.output_text
    assert client.responses.delete(second.id) is None  # (the client returns nothing)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    resp = httpx.post(url + "/v1/responses", json={
        "input": "x", "previous_response_id": third.id})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "previous_response_id"
    assert httpx.delete(url + "/v1/responses/" + second.id).status_code == 404
    unkept = client.responses.create(model="fake-model", input="x", max_output_tokens=2,
                                      store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_truncation_auto_leaves_out_the_earliest_items(served) -> None:
    """A conversation longer than the context (128 tokens here): a 400 naming the context
    length, unless `truncation: auto`, which leaves out its earliest items (and a function
    call output whose call went with them) until the rest fits; the input's last item alone
    too long is still a 400."""
    url, client, engine = served
    turns = [{"role": "user", "content": "a" * 40}, {"role": "assistant", "content": "b" * 40},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "d" * 10},
             {"role": "user", "content": "e" * 30}]
    body = {"model": "fake-model", "input": turns, "max_output_tokens": 8}
    refused = httpx.post(url + "/v1/responses", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    def input_tokens(**fields: object) -> int:
        reply = httpx.post(url + "/v1/responses", json={**body, **fields})
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["input_tokens"]

    reply = httpx.post(url + "/v1/responses", json={**body, "truncation": "auto"}).json()
    assert reply["truncation"] == "auto"
    assert reply["usage"]["input_tokens"] == input_tokens(input=turns[1:])  # the first out
    assert input_tokens(truncation="auto", max_output_tokens=60) == input_tokens(
        input=turns[4:], max_output_tokens=60)  # the call went, so its output did too
    too_long = httpx.post(url + "/v1/responses", json={
        "input": "x" * 200, "truncation": "auto", "max_output_tokens": 8})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_a_stored_responses_input_items_are_listed(served) -> None:
    url, client, _ = served
    reply = client.responses.create(model="fake-model", max_output_tokens=2, input=[
        {"role": "user", "content": "one", "id": "msg_mine"},
        {"type": "message", "role": "assistant", "content": "two"},
        {"role": "user", "content": [{"type": "input_text", "text": "th"},
                                     {"type": "input_text", "text": "ree"}]}])
    newest_first = client.responses.input_items.list(reply.id)
    assert [(i.role, i.content[0].type, i.content[0].text) for i in newest_first.data] == [
        ("user", "input_text", "three"), ("assistant", "output_text", "two"),
        ("user", "input_text", "one")]
    assert newest_first.data[-1].id == "msg_mine" and not newest_first.has_more
    page = httpx.get(f"{url}/v1/responses/{reply.id}/input_items",
                     params={"order": "asc", "limit": 2}).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["one", "two"]
    assert page["has_more"] and page["first_id"] == "msg_mine"
    rest = httpx.get(f"{url}/v1/responses/{reply.id}/input_items",
                     params={"order": "asc", "after": page["last_id"]}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["three"] and not rest["has_more"]
    for params, param in (({"order": "up"}, "order"), ({"limit": 0}, "limit"),
                          ({"after": "nope"}, "after")):
        resp = httpx.get(f"{url}/v1/responses/{reply.id}/input_items", params=params)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    assert httpx.get(f"{url}/v1/responses/resp_nope/input_items").status_code == 404
    assert httpx.get(f"{url}/v1/responses/{reply.id}/input_items",
                     params={"limit": "x"}).status_code == 400


def test_the_store_keeps_the_most_recently_used() -> None:
    from server.api.protocol_responses import ResponseInputMessage
    from server.api.response_store import ResponseStore

    store = ResponseStore(2)

    def put(rid: str, previous: str | None = None) -> None:
        store.put({"id": rid, "output": [{"type": "message", "content": [
            {"type": "output_text", "text": rid.upper()}]}]},
            [ResponseInputMessage(type="message", role="user", content=rid)], previous)

    put("a")
    put("b", previous="a")
    assert [(m.role, m.content) for m in store.conversation("b")] == [
        ("user", "a"), ("assistant", "A"), ("user", "b"), ("assistant", "B")]
    put("c")  # "b" was used before "a" (its chain ends with "a")
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert store.conversation("c") is not None
    put("d", previous="b")
    assert store.conversation("d") is None  # (a link is gone)


def test_json_formats_reach_the_engine(served) -> None:
    url, client, engine = served
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    reply = client.responses.create(model="fake-model", input="x", max_output_tokens=2, text={
        "format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    assert json.loads(engine.params[reply.id].json_schema) == schema
    assert reply.text.format.type == "json_schema" and reply.text.format.name == "thing"
    reply = client.responses.create(model="fake-model", input="x", max_output_tokens=2,
                                    text={"format": {"type": "json_object"}})
    assert engine.params[reply.id].json_schema == '{"type": "object"}'


def test_logprobs_as_chat_gives_them(served) -> None:
    """include message.output_text.logprobs (or top_logprobs alone): the output text's
    tokens' logprobs and alternatives, as chat's logprobs.content for the same request;
    streamed, the deltas' logprobs add up to the done event's and each delta's tokens spell
    its text; without either, none are asked of the engine."""
    url, client, engine = served
    chat = client.chat.completions.create(model="fake-model", max_tokens=5, logprobs=True,
                                          top_logprobs=2, messages=[{"role": "user",
                                                                     "content": "hi"}])
    expected = chat.choices[0].logprobs.model_dump()["content"]
    assert len(expected) == 5 and all(len(e["top_logprobs"]) == 2 for e in expected)
    body = {"model": "fake-model", "input": "hi", "max_output_tokens": 5}
    for asks in ({"include": ["message.output_text.logprobs"], "top_logprobs": 2},
                 {"top_logprobs": 2}):
        reply = httpx.post(url + "/v1/responses", json={**body, **asks}).json()
        assert reply["output"][0]["content"][0]["logprobs"] == expected
        assert reply["top_logprobs"] == 2
        assert engine.params[reply["id"]].logprobs == 2
    reply = client.responses.create(**body, include=["message.output_text.logprobs"])
    assert [e.token for e in reply.output[0].content[0].logprobs] == list(reply.output_text)
    assert all(e.top_logprobs == [] for e in reply.output[0].content[0].logprobs)
    plain = client.responses.create(**body)
    assert plain.output[0].content[0].logprobs == [] and engine.params[plain.id].logprobs is None
    with httpx.stream("POST", url + "/v1/responses", timeout=10, json={
            **body, "stream": True, "include": ["message.output_text.logprobs"],
            "top_logprobs": 2}) as resp:
        events = [json.loads(f.split("\n")[1].removeprefix("data: "))
                  for f in resp.read().decode().split("\n\n") if f]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all("".join(t["token"] for t in d["logprobs"]) == d["delta"] for d in deltas)
    (done,) = [e for e in events if e["type"] == "response.output_text.done"]
    assert [t for d in deltas for t in d["logprobs"]] == done["logprobs"] == expected
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == expected


@pytest.mark.parametrize(("fields", "message"), [
    ({"include": ["file_search_call.results"]}, "'file_search_call.results' is not supported"),
    ({"top_logprobs": 21}, "top_logprobs must be in [0, 20], got 21"),
])
def test_logprob_refusals(served, fields, message) -> None:
    url, _, _ = served
    resp = httpx.post(url + "/v1/responses", json={"input": "hi", **fields})
    assert resp.status_code == 400 and message in resp.json()["error"]["message"], resp.text
    assert resp.json()["error"]["param"] == next(iter(fields))


def test_a_finish_reason_gives_the_status() -> None:
    from server.api.serving_responses import _status

    assert [_status(r) for r in ("stop", "length", "abort")] == [
        "completed", "incomplete", "cancelled"]


TOOLS = [{"type": "function", **WEATHER["function"]}]  # (the Responses API's flat shape)


@pytest.fixture(scope="module")
def tools_served():
    engine = ToolEngine()  # (its template writes <tool_call> tags; it answers ANSWER)
    with app_in_thread(lambda: engine) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        yield url, client, engine


def test_function_calls_are_output_items(tools_served) -> None:
    """tool_choice auto: the reply's text before its calls is a message item, each call a
    function_call item; streamed, the same items as events once the reply is whole."""
    url, client, engine = tools_served
    args = {"model": "fake-model", "input": USER, "tools": TOOLS,
            "max_output_tokens": len(ANSWER)}
    reply = client.responses.create(**args)
    message, *calls = reply.output
    assert message.type == "message" and message.content[0].text == "Let me look."
    assert [(c.type, c.name, json.loads(c.arguments)) for c in calls] == [
        ("function_call", "get_weather", {"city": "Paris"}),
        ("function_call", "get_weather", {"city": "Rome"})]
    assert all(c.call_id.startswith("call_") and c.id.startswith("fc_") for c in calls)
    assert engine.prompts[-1].startswith("<tools>")  # (the template was given the tools)
    assert reply.tools[0].name == "get_weather" and reply.tool_choice == "auto"
    events = list(client.responses.create(stream=True, **args))
    kinds = [e.type for e in events]
    call_events = ["response.output_item.added", "response.function_call_arguments.delta",
                   "response.function_call_arguments.done", "response.output_item.done"]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added",
                     "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done",
                     *call_events, *call_events, "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(i.type, getattr(i, "arguments", None)) for i in done] == [
        (i.type, getattr(i, "arguments", None)) for i in reply.output]
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1, 2]
    # the calls' results, sent after the stored reply: its calls are the assistant's
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "12C"}
               for c in calls]
    client.responses.create(model="fake-model", previous_response_id=reply.id, input=outputs,
                            tools=TOOLS, tool_choice="none", max_output_tokens=5)
    assert ('<assistant>Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": '
            '"Paris"}}</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": '
            '"Rome"}}</tool_call>\n<tool>12C' + calls[0].call_id) in engine.prompts[-1]


def test_earlier_calls_and_their_outputs_reach_the_template(tools_served) -> None:
    """function_call and function_call_output input items are the chat conversation's
    assistant tool_calls and tool messages; a named tool_choice forces one call."""
    url, client, engine = tools_served
    conversation = [*USER,
                    {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                     "arguments": '{"city": "Paris"}'},
                    {"type": "function_call_output", "call_id": "call_1", "output": "12C"}]
    reply = client.responses.create(model="fake-model", input=conversation, tools=TOOLS,
                                    tool_choice="none", max_output_tokens=5)
    assert ('<assistant><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '</tool_call>\n<tool>12Ccall_1\n') in engine.prompts[-1]
    assert [item.type for item in reply.output] == ["message"]
    named = client.responses.create(model="fake-model", input=USER, tools=TOOLS,
                                    max_output_tokens=5,
                                    tool_choice={"type": "function", "name": "get_weather"})
    (call,) = named.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == ANSWER[:5]  # (the fake ignores the schema the call is held to)
    assert engine.params[named.id].json_schema is not None
