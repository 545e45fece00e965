"""Tool calling in chat completions: reading calls out of text, the request checks, and the
replies (plain and streamed) against the fake engine scripted to answer with calls. The
real model, forced to call through the JSON-schema constraint, is in tests/live/test_api_live.py."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import ValidationError

from server.api.errors import from_validation_error
from server.api.protocol import ChatCompletionRequest
from server.api.serving_chat import ChatFormatter
from server.api.tools import (
    CALL_OPEN,
    ToolMode,
    call_schema,
    held_back,
    read_calls,
    template_reads_calls,
)
from server.engine.outputs import RequestOutput
from tests.api_fakes import FakeEngine, FakeTokenizer
from tests.api_server import app_in_thread

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "Weather in Paris and Rome?"}]
ANSWER = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
          '</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
          '</tool_call>')


AUTO = ToolMode("auto", names=("get_weather", "get_time"))


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=USER, **fields)


def test_read_calls_in_each_mode() -> None:
    content, calls = read_calls(ANSWER, AUTO)
    assert content == "Let me look."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("function", "get_weather", {"city": "Paris"}),
                                ("function", "get_weather", {"city": "Rome"})]
    assert len({c["id"] for c in calls}) == 2 and calls[0]["id"].startswith("call_")
    broken = "<tool_call>{not json}</tool_call> <tool_call>[1]</tool_call>"
    assert read_calls(broken, AUTO) == (broken, [])  # nothing readable: content
    assert read_calls("plain text", AUTO) == ("plain text", [])
    assert read_calls(ANSWER, ToolMode("none")) == (ANSWER, [])
    content, calls = read_calls('{"city": "Oslo"}', ToolMode("named", "get_weather"))
    assert content is None and calls[0]["function"] == {"name": "get_weather",
                                                        "arguments": '{"city": "Oslo"}'}
    content, calls = read_calls('[{"name": "get_time", "arguments": {}}]', ToolMode("required"))
    assert content is None and calls[0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert read_calls('[{"name": "get_ti', ToolMode("required")) == ('[{"name": "get_ti', [])


def test_bare_calls_naming_the_tools() -> None:
    """Without tags, a reply that is only a call object (or a list of them) naming a tool."""
    content, calls = read_calls(' {"name": "get_weather", "arguments": {"city": "Oslo"}}\n', AUTO)
    assert content is None and calls[0]["function"] == {"name": "get_weather",
                                                        "arguments": '{"city": "Oslo"}'}
    both = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "arguments": {}}]'
    assert [c["function"]["name"] for c in read_calls(both, AUTO)[1]] == ["get_time",
                                                                        "get_weather"]
    # Llama 3.2 may name the type; Mistral's [TOOL_CALLS], where the text keeps it
    llama = '{"type": "function", "name": "get_time", "parameters": {"zone": "UTC"}}'
    assert read_calls(llama, AUTO)[1][0]["function"] == {"name": "get_time",
                                                         "arguments": '{"zone": "UTC"}'}
    mistral = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    assert read_calls(mistral, AUTO)[1][0]["function"]["arguments"] == '{"city": "Rome"}'
    tagged = '<|python_tag|>{"name": "get_time", "parameters": {}}'
    assert read_calls(tagged, AUTO)[1][0]["function"] == {"name": "get_time", "arguments": "{}"}
    granite = ('<|tool_call|>[{"arguments": {"city": "Rome"}, "name": "get_weather"}, '
               '{"arguments": {}, "name": "get_time"}]')
    assert [(c["function"]["name"], c["function"]["arguments"])
            for c in read_calls(granite, AUTO)[1]] == [("get_weather", '{"city": "Rome"}'),
                                                       ("get_time", "{}")]
    for text in ('{"name": "send_mail", "arguments": {}}',  # not a tool of the request
                 '{"name": "get_time", "arguments": {}, "why": 1}', '{"name": "get_time"',
                 '{"type": "tool", "name": "get_time", "parameters": {}}',
                 '[]', '{"city": "Oslo"}', 'get_time()', '[TOOL_CALLS] get_time()',
                 '<|tool_call|>get_time()'):
        assert read_calls(text, AUTO) == (text, []), text


def test_held_back_is_a_prefix_of_the_tag() -> None:
    assert [held_back(t) for t in ("abc", "abc<", "abc<tool_c", "x<tool_call", "<tool_x")] == \
        [0, 1, 7, 10, 0]


def test_schemas_of_forced_calls() -> None:
    named = _request(tools=[WEATHER, TIME],
                     tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(call_schema(named, ToolMode("named", "get_time"))) == {"type": "object"}
    required = json.loads(call_schema(_request(tools=[WEATHER, TIME], parallel_tool_calls=False),
                                      ToolMode("required")))
    assert required["maxItems"] == 1 and required["minItems"] == 1
    first = required["items"]["anyOf"][0]
    assert first["properties"]["name"] == {"const": "get_weather"}
    assert first["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert call_schema(_request(tools=[WEATHER]), AUTO) is None


@pytest.mark.parametrize("fields,param,says", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope'"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "drop response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools.0.function.name", "pattern"),
    ({"messages": [{"role": "tool", "content": "12C"}]}, "messages.0", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0",
     "only assistant messages"),
])
def test_bad_tool_requests_are_refused(fields, param, says) -> None:
    """Each a 400 naming the field at fault (as `server.api.errors` reports it)."""
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest(**{"messages": USER, **fields})
    error = from_validation_error(caught.value)
    assert (error.status, error.param) == (400, param) and says in error.message, error.message


def test_template_reads_calls() -> None:
    tok = FakeTokenizer()
    assert not template_reads_calls(tok)
    tok.chat_template = "{% for t in tools %}...<tool_call>{% endfor %}"
    assert template_reads_calls(tok)
    tok.chat_template = {"default": "plain", "tool_use": "<tool_call>"}
    assert template_reads_calls(tok)
    # Llama 3.1's asks for a JSON object with "parameters"; Mistral's writes [TOOL_CALLS]
    tok.chat_template = ('{% if tools %}Answer with {"name": a function\'s name, '
                         '"parameters": its arguments}{% endif %}')
    assert template_reads_calls(tok)
    tok.chat_template = "{% if message.tool_calls %}[TOOL_CALLS]{{ ... }}{% endif %}"
    assert template_reads_calls(tok)
    tok.chat_template = "{% if message.tool_calls %}<|tool_call|>{{ ... }}{% endif %}"
    assert template_reads_calls(tok)  # (Granite 3's)
    tok.chat_template = '{% for t in tools %}{{ t | tojson }}{% endfor %} "arguments"'
    assert not template_reads_calls(tok)  # (tools shown, no form of call taught)


class ToolTokenizer(FakeTokenizer):
    """A template that shows the tools and past calls, and writes calls in tags."""

    chat_template = "... <tool_call> ..."

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, tools=None):
        text = "".join(f"<tools>{json.dumps(tools)}\n" for _ in [0] if tools)
        for m in messages:
            calls = "".join(f"<tool_call>{json.dumps(c['function'])}</tool_call>"
                            for c in m.get("tool_calls", []))
            text += f"<{m['role']}>{m['content']}{calls}{m.get('tool_call_id', '')}\n"
        return text + ("<assistant>" if add_generation_prompt else "")


class ToolEngine(FakeEngine):
    """Answers every prompt with `ANSWER` (or plain text where the prompt says so), then
    "|", the requests' stop string (the fake's end of text)."""

    def __init__(self) -> None:
        super().__init__(step_s=0.001, max_model_len=2048)
        self.tokenizer = ToolTokenizer()
        self.prompts: list[str] = []

    def script(self, prompt, params) -> str:
        text = self.tokenizer.decode(prompt)
        self.prompts.append(text)
        return ("No tools needed <tool" if "plain" in text else ANSWER) + "|"


@pytest.fixture(scope="module")
def served():
    engine = ToolEngine()
    with app_in_thread(lambda: engine) as (url, _):
        yield url, engine


def _chat(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"max_tokens": 300, "stop": "|", **body})


def _stream(url: str, **body) -> tuple[str, list[dict], str | None]:
    """Content, tool calls and finish reason put back together from a stream's chunks."""
    content, calls, reason = "", {}, None
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json={"max_tokens": 300, "stop": "|", "stream": True, **body}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line or line == "data: [DONE]":
                continue
            (choice,) = json.loads(line[6:])["choices"]
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls", []):
                whole = calls.setdefault(call["index"], {"function": {"arguments": ""}})
                whole.update({k: v for k, v in call.items() if k not in ("index", "function")})
                whole["function"]["name"] = call["function"].get(
                    "name", whole["function"].get("name"))
                whole["function"]["arguments"] += call["function"].get("arguments", "")
            reason = choice["finish_reason"] or reason
    return content, [calls[i] for i in sorted(calls)], reason


def test_auto_calls_read_out_plain_and_streamed(served) -> None:
    url, engine = served
    reply = _chat(url, messages=USER, tools=[WEATHER, TIME]).json()
    (choice,) = reply["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me look."
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == \
        [{"city": "Paris"}, {"city": "Rome"}]
    assert json.loads(engine.prompts[-1].split("\n")[0][len("<tools>"):]) == [WEATHER, TIME]
    assert not list(engine.params.values())[-1].skip_special_tokens  # tags may be special
    content, calls, reason = _stream(url, messages=USER, tools=[WEATHER])
    assert (content, reason) == ("Let me look. ", "tool_calls")  # no tag leaked into content
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(c["type"], c["function"]["name"], c["function"]["arguments"])
         for c in message["tool_calls"]]
    assert all(c["id"].startswith("call_") for c in calls)


class LlamaToolEngine(ToolEngine):
    """A Llama 3.1-style template (a JSON object with "parameters", no tags), answered with
    `<|python_tag|>` and such an object, then "#" (the requests' stop string here: the tag
    holds "|")."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer.chat_template = '{% if tools %}{"name": ..., "parameters": ...}{% endif %}'

    def script(self, prompt, params) -> str:
        return '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}#'


def test_auto_calls_of_a_llama_template_read_out_plain_and_streamed() -> None:
    with app_in_thread(LlamaToolEngine) as (url, _):
        (choice,) = _chat(url, messages=USER, tools=[WEATHER], stop="#").json()["choices"]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        content, calls, reason = _stream(url, messages=USER, tools=[WEATHER], stop="#")
        assert (content, reason) == ("", "tool_calls")
        assert [c["function"] for c in calls] == [call["function"]]


def test_auto_without_calls_keeps_the_text(served) -> None:
    url, _ = served
    plain = [{"role": "user", "content": "plain please"}]
    reply = _chat(url, messages=plain, tools=[WEATHER]).json()["choices"][0]
    assert reply["message"] == {"role": "assistant", "content": "No tools needed <tool"}
    assert reply["finish_reason"] == "stop"
    content, calls, _ = _stream(url, messages=plain, tools=[WEATHER])
    assert (content, calls) == ("No tools needed <tool", [])  # held back, then sent


def test_tool_choice_none_hides_the_tools_and_reads_nothing(served) -> None:
    url, engine = served
    reply = _chat(url, messages=USER, tools=[WEATHER], tool_choice="none").json()
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert list(engine.params.values())[-1].skip_special_tokens
    _chat(url, messages=USER, skip_special_tokens=False)
    assert not list(engine.params.values())[-1].skip_special_tokens
    assert not engine.prompts[-1].startswith("<tools>")


def test_a_conversation_with_calls_and_results(served) -> None:
    url, engine = served
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12C"}]
    assert _chat(url, messages=messages, tools=[WEATHER]).status_code == 200
    assert ('<assistant><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '</tool_call>\n<tool>12Ccall_1\n') in engine.prompts[-1]


def test_tokenize_counts_the_tools_as_chat_does(served) -> None:
    """/tokenize with messages and tools gives the prompt a chat completion renders."""
    url, engine = served
    counted = httpx.post(url + "/tokenize", json={"messages": USER, "tools": [WEATHER]}).json()
    reply = _chat(url, messages=USER, tools=[WEATHER]).json()
    assert counted["count"] == reply["usage"]["prompt_tokens"]
    assert engine.tokenizer.decode(counted["tokens"]) == engine.prompts[-1]
    alone = httpx.post(url + "/tokenize", json={"messages": USER}).json()["count"]
    assert alone < counted["count"]
    resp = httpx.post(url + "/tokenize", json={"prompt": "x", "tools": [WEATHER]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools"


def test_auto_needs_a_template_that_writes_calls() -> None:
    with app_in_thread(lambda: FakeEngine()) as (url, _):
        resp = _chat(url, messages=USER, tools=[WEATHER])
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["param"] == "tool_choice" and "<tool_call>" in error["message"]
        assert _chat(url, messages=USER, tools=[WEATHER], tool_choice="none",
                     max_tokens=5).status_code == 200


@pytest.mark.parametrize("pieces", [[ANSWER], ["Let me ", "look. <tool", "_call>", ANSWER[24:]],
                                    ["Let", " me look. <tool_call>\n{", ANSWER[26:]]])
def test_streamed_pieces_add_up_however_the_text_is_cut(pieces) -> None:
    """Content before the first tag streams as it comes (a possible tag's start held back),
    even where the last piece brings text and calls together; the calls come whole."""
    formatter = ChatFormatter("chatcmpl-x", "m", 1, None, AUTO)
    content, calls, reason = "", [], None
    for i, piece in enumerate(pieces):
        done = i == len(pieces) - 1
        chunk = formatter.delta(0, RequestOutput("r", [1], piece, 3, i + 1, None, done,
                                                 "stop" if done else None))
        if chunk is None:
            continue
        delta = chunk["choices"][0]["delta"]
        assert CALL_OPEN not in delta.get("content", "")
        content += delta.get("content", "")
        calls += delta.get("tool_calls", [])
        reason = chunk["choices"][0]["finish_reason"]
    assert (content, reason) == ("Let me look. ", "tool_calls")
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]


@pytest.mark.parametrize("pieces,content,calls", [
    (["  ", '{"name": "get_time",', ' "arguments": {}}'], "", ["get_time"]),
    (["{", '"a": 1}'], '{"a": 1}', []),  # held back, then sent as content
    (["Sure: ", '{"name": "get_time"}'], 'Sure: {"name": "get_time"}', []),
    (["[TOOL_", 'CALLS][{"name": "get_time",', ' "arguments": {}}]'], "", ["get_time"]),
    (["<|python", '_tag|>{"name": "get_time",', ' "parameters": {}}'], "", ["get_time"]),
    (["<", "b>bold</b>", " text"], "<b>bold</b> text", []),  # held, then sent as it comes
])
def test_streamed_bare_calls_are_held_to_the_end(pieces, content, calls) -> None:
    formatter = ChatFormatter("chatcmpl-x", "m", 1, None, AUTO)
    got, names = "", []
    for i, piece in enumerate(pieces):
        done = i == len(pieces) - 1
        chunk = formatter.delta(0, RequestOutput("r", [1], piece, 3, i + 1, None, done,
                                                 "stop" if done else None))
        delta = chunk["choices"][0]["delta"] if chunk else {}
        assert done or not calls or not delta.get("content")  # a call's text never streams
        got += delta.get("content", "")
        names += [c["function"]["name"] for c in delta.get("tool_calls", [])]
    assert (got, names) == (content, calls)
