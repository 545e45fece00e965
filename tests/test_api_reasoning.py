"""Reasoning output (`--reasoning-parser`): splitting finished and streamed text, and the chat
and Responses replies of a fake engine scripted to think in `<think>` tags, which come out as
`reasoning` apart from the content, for both parsers; without the flag nothing changes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from server.api.config import ApiConfig
from server.api.reasoning import REASONING_PARSERS
from server.api.serving_chat import ChatFormatter
from server.engine.outputs import RequestOutput
from tests.api_server import app_in_thread
from tests.test_api_tools import WEATHER, ToolEngine, ToolTokenizer

QWEN3, R1 = REASONING_PARSERS["qwen3"], REASONING_PARSERS["deepseek_r1"]
THINK = "<think>\nAdd 2 and 2.\n</think>\n\nIt is 4."
SCRIPTS = {
    "think": THINK,
    "prefixed": "Add 2 and 2.\n</think>\n\nIt is 4.",  # (R1: the prompt opened <think>)
    "plain": "It is 4.",
    "weather": '<think>\nAsk the tool.\n</think>\n\n<tool_call>{"name": "get_weather", '
               '"arguments": {"city": "Paris"}}</tool_call>',
    "ponder": '<think>\nMaybe <tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
              '?\n</think>\n\nNo call needed.',
    "json": '{"answer": 4}',
}
NO_THINKING = "<think>\n\n</think>\n\n"  # (what Qwen3's template adds for enable_thinking false)


class ThinkingTokenizer(ToolTokenizer):
    """ToolTokenizer's template, which also renders an assistant message's reasoning (as
    `reasoning_content`, Qwen3's name) and, for `enable_thinking: false`, an empty thought
    after the generation prompt."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, tools=None,
                            enable_thinking=True):
        messages = [{**m, "content": f"<think>{m['reasoning_content']}</think>{m['content']}"}
                    if "reasoning_content" in m else m for m in messages]
        text = super().apply_chat_template(messages, tokenize, add_generation_prompt, tools)
        return text + ("" if enable_thinking else NO_THINKING)


class ThinkingEngine(ToolEngine):
    """Answers with the SCRIPTS entry the last user message names (after an empty thought
    in the prompt, "plain"; "mixed": "think" for even seeds, "plain" for odd), then "|",
    where every request stops (Responses requests send no stop strings)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = ThinkingTokenizer()

    async def generate(self, request_id, prompt_token_ids, params):
        params = dataclasses.replace(params, stop=[*params.stop, "|"])
        async for out in super().generate(request_id, prompt_token_ids, params):
            yield out

    def script(self, prompt, params) -> str:
        text = self.tokenizer.decode(prompt)
        self.prompts.append(text)
        key = text.rsplit("<user>", 1)[-1].split("\n")[0]
        if key == "mixed":
            key = "plain" if (params.seed or 0) % 2 else "think"
        return SCRIPTS["plain" if text.endswith(NO_THINKING) else key] + "|"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str | None, tuple[str, ThinkingEngine]]]:
    """A server on the fake engine for each parser, and one without (key None)."""
    engines = {name: ThinkingEngine() for name in ("qwen3", "deepseek_r1", None)}
    with app_in_thread(lambda: engines["qwen3"], ApiConfig(reasoning_parser="qwen3")) as (q, _), \
            app_in_thread(lambda: engines["deepseek_r1"],
                          ApiConfig(reasoning_parser="deepseek_r1")) as (r, _), \
            app_in_thread(lambda: engines[None]) as (off, _):
        yield {"qwen3": (q, engines["qwen3"]), "deepseek_r1": (r, engines["deepseek_r1"]),
               None: (off, engines[None])}


def _user(key: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": key}]


def _chat(url: str, key: str, **body) -> dict:
    resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"messages": _user(key), "max_tokens": 300, "stop": "|", **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _stream(url: str, key: str, **body) -> list[dict]:
    """Each choice's streamed reasoning, content, tool calls, finish reason and the number
    of chunks that carried reasoning, put back together."""
    body = {"messages": _user(key), "max_tokens": 300, "stop": "|", "stream": True, **body}
    got: dict[int, dict] = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line or line == "data: [DONE]":
                continue
            (choice,) = json.loads(line[6:])["choices"]
            whole = got.setdefault(choice["index"], {"reasoning": "", "content": "", "calls": [],
                                                     "reason": None, "thinking_chunks": 0})
            delta = choice["delta"]
            whole["reasoning"] += delta.get("reasoning", "")
            whole["content"] += delta.get("content", "")
            whole["calls"] += delta.get("tool_calls", [])
            whole["thinking_chunks"] += "reasoning" in delta
            whole["reason"] = choice["finish_reason"] or whole["reason"]
    return [got[i] for i in sorted(got)]


@pytest.mark.parametrize("parser,text,reasoning,content", [
    (QWEN3, THINK, "\nAdd 2 and 2.\n", "It is 4."),
    (R1, THINK, "\nAdd 2 and 2.\n", "It is 4."),
    (QWEN3, "Add 2.</think>It is 4.", "Add 2.", "It is 4."),
    (R1, "Add 2.</think>\n\nIt is 4.\n", "Add 2.", "It is 4.\n"),
    (QWEN3, "It is 4.", None, "It is 4."),  # no </think>: qwen3's content...
    (R1, "It is 4.", "It is 4.", None),  # ...deepseek_r1's reasoning
    (QWEN3, "\n<think>Add 2 and", "Add 2 and", None),  # cut short while thinking
    (R1, "<think>Add 2 and", "Add 2 and", None),
    (QWEN3, "<think>Add.</think>\n\n", "Add.", None),  # nothing after: null content
    (R1, "<think></think>It is 4. <think>x</think>", "", "It is 4. <think>x</think>"),
])
def test_finished_text_is_split(parser, text, reasoning, content) -> None:
    assert parser.split(text) == (reasoning, content)


@pytest.mark.parametrize("text", [THINK, "Add 2.</think>\n\nIt is 4.", "It is 4.", "<think>A",
                                  " <think>A</think>B", "<thin", "", "<thinking>x"])
@pytest.mark.parametrize("parser", [QWEN3, R1])
def test_streamed_text_adds_up_to_the_split_however_it_is_cut(parser, text) -> None:
    """Cut into three pieces at every two points, the streamed pieces add up to the finished
    text's split (qwen3's unopened text before a </think> aside, which streams as content),
    no piece holding a tag or part of one."""
    reasoning, content = parser.split(text)
    if parser is QWEN3 and not text.lstrip().startswith("<think>") and "</think>" in text:
        reasoning, content = None, text.replace("</think>\n\n", "")
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            stream, thought, answer = parser.stream(), "", ""
            for piece, last in ((text[:i], False), (text[i:j], False), (text[j:], True)):
                t, a = stream.feed(piece, last)
                assert "think>" not in t + a and not (t + a).endswith("<")
                thought, answer = thought + t, answer + a
            assert (thought, answer) == (reasoning or "", content or ""), (i, j)


def test_a_close_tag_split_across_chunks() -> None:
    """Formatter-level: `</think>` (and `<think>`) cut across chunks never shows, and the
    reasoning streams before the tag closes."""
    formatter = ChatFormatter("chatcmpl-x", "m", 1, None, reasoning=QWEN3)
    pieces = ["<thi", "nk>\nAdd 2", " and 2.\n</th", "ink>\n", "\nIt is 4."]
    deltas = []
    for i, piece in enumerate(pieces):
        done = i == len(pieces) - 1
        chunk = formatter.delta(0, RequestOutput("r", [1], piece, 3, i + 1, None, done,
                                                 "stop" if done else None))
        deltas.append(chunk["choices"][0]["delta"] if chunk else None)
    assert deltas == [None, {"reasoning": "\nAdd 2"}, {"reasoning": " and 2.\n"}, None,
                      {"content": "It is 4."}]


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_reasoning_and_content_plain_and_streamed(servers, parser) -> None:
    url, engine = servers[parser]
    (choice,) = _chat(url, "think")["choices"]
    assert choice["message"] == {"role": "assistant", "content": "It is 4.",
                                 "reasoning": "\nAdd 2 and 2.\n"}
    assert choice["finish_reason"] == "stop"
    assert not list(engine.params.values())[-1].skip_special_tokens  # the tags may be special
    (streamed,) = _stream(url, "think")
    assert (streamed["reasoning"], streamed["content"], streamed["reason"]) == \
        ("\nAdd 2 and 2.\n", "It is 4.", "stop")
    assert streamed["thinking_chunks"] == len("\nAdd 2 and 2.\n")  # (one a token, as they come)


def test_deepseek_r1_without_close_tag_is_all_reasoning(servers) -> None:
    url, _ = servers["deepseek_r1"]
    assert _chat(url, "prefixed")["choices"][0]["message"] == {
        "role": "assistant", "content": "It is 4.", "reasoning": "Add 2 and 2.\n"}
    assert _chat(url, "plain")["choices"][0]["message"] == {
        "role": "assistant", "content": None, "reasoning": "It is 4."}
    (streamed,) = _stream(url, "plain")
    assert (streamed["reasoning"], streamed["content"]) == ("It is 4.", "")
    (streamed,) = _stream(url, "prefixed")
    assert (streamed["reasoning"], streamed["content"]) == ("Add 2 and 2.\n", "It is 4.")


def test_qwen3_without_close_tag_is_all_content(servers) -> None:
    """With `enable_thinking: false` the template closes the thought in the prompt and the
    reply is content; cut short while thinking, what there is is reasoning."""
    url, engine = servers["qwen3"]
    reply = _chat(url, "think", chat_template_kwargs={"enable_thinking": False})
    assert engine.prompts[-1].endswith(NO_THINKING)
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "It is 4.",
                                              "reasoning": None}
    (streamed,) = _stream(url, "think", chat_template_kwargs={"enable_thinking": False})
    assert (streamed["reasoning"], streamed["content"]) == ("", "It is 4.")
    (choice,) = _chat(url, "think", max_tokens=12)["choices"]
    assert (choice["message"], choice["finish_reason"]) == (
        {"role": "assistant", "content": None, "reasoning": "\nAdd "}, "length")
    (streamed,) = _stream(url, "think", max_tokens=12)
    assert (streamed["reasoning"], streamed["content"], streamed["reason"]) == \
        ("\nAdd ", "", "length")
    # unopened text before a </think>: reasoning whole, content streamed (as vLLM's qwen3)
    assert _chat(url, "prefixed")["choices"][0]["message"]["reasoning"] == "Add 2 and 2.\n"
    (streamed,) = _stream(url, "prefixed")
    assert (streamed["reasoning"], streamed["content"]) == ("", "Add 2 and 2.\nIt is 4.")


def test_tool_calls_are_read_from_the_content_only(servers) -> None:
    url, _ = servers["qwen3"]
    (choice,) = _chat(url, "weather", tools=[WEATHER])["choices"]
    message = choice["message"]
    assert (message["reasoning"], message["content"], choice["finish_reason"]) == \
        ("\nAsk the tool.\n", None, "tool_calls")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message["tool_calls"]] == [("get_weather", {"city": "Paris"})]
    (streamed,) = _stream(url, "weather", tools=[WEATHER])
    assert (streamed["reasoning"], streamed["content"], streamed["reason"]) == \
        ("\nAsk the tool.\n", "", "tool_calls")
    assert [json.loads(c["function"]["arguments"]) for c in streamed["calls"]] == \
        [{"city": "Paris"}]
    # a call written while thinking is not made
    (choice,) = _chat(url, "ponder", tools=[WEATHER])["choices"]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "No call needed."
    assert choice["message"]["reasoning"].startswith("\nMaybe <tool_call>")
    (streamed,) = _stream(url, "ponder", tools=[WEATHER])
    assert (streamed["content"], streamed["calls"]) == ("No call needed.", [])


def test_each_choice_is_split_on_its_own(servers) -> None:
    url, _ = servers["qwen3"]
    reply = _chat(url, "mixed", n=2, seed=0, logprobs=True)
    assert [c["message"] for c in reply["choices"]] == [
        {"role": "assistant", "content": "It is 4.", "reasoning": "\nAdd 2 and 2.\n"},
        {"role": "assistant", "content": "It is 4.", "reasoning": None}]
    # logprobs cover every token, the tags' too
    assert [len(c["logprobs"]["content"]) for c in reply["choices"]] == \
        [len(THINK) + 1, len("It is 4.") + 1]
    assert [(s["reasoning"], s["content"]) for s in _stream(url, "mixed", n=2, seed=0)] == \
        [("\nAdd 2 and 2.\n", "It is 4."), ("", "It is 4.")]


def test_constrained_output_is_not_split(servers) -> None:
    """JSON output (or a forced call) is constrained from its first token: no reasoning, and
    deepseek_r1 does not take the unclosed JSON for it."""
    url, engine = servers["deepseek_r1"]
    message = _chat(url, "json", response_format={"type": "json_object"})["choices"][0]["message"]
    assert message == {"role": "assistant", "content": '{"answer": 4}'}
    assert list(engine.params.values())[-1].skip_special_tokens


def test_without_the_flag_nothing_changes(servers) -> None:
    url, engine = servers[None]
    assert _chat(url, "think")["choices"][0]["message"] == {"role": "assistant",
                                                            "content": THINK}
    assert list(engine.params.values())[-1].skip_special_tokens
    (streamed,) = _stream(url, "think")
    assert (streamed["content"], streamed["thinking_chunks"]) == (THINK, 0)


def test_reasoning_sent_back_reaches_the_template(servers) -> None:
    """An assistant message may carry the `reasoning` its reply had (the official client
    sends a message back as it came); the template gets it as `reasoning_content`. Only
    assistant messages carry it."""
    url, engine = servers["qwen3"]
    first = _chat(url, "think")["choices"][0]["message"]
    _chat(url, "plain", messages=[*_user("think"), first, *_user("plain")])
    assert "<assistant><think>\nAdd 2 and 2.\n</think>It is 4.\n<user>plain" in engine.prompts[-1]
    resp = httpx.post(url + "/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "x", "reasoning": "y"}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages.0"
    assert "only assistant messages" in resp.json()["error"]["message"]


def test_responses_put_the_reasoning_in_its_own_item(servers) -> None:
    url, engine = servers["qwen3"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.responses.create(model="fake-model", input="think")
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    thought = reply.output[0]
    assert thought.id.startswith("rs_") and thought.summary == []
    assert [(c.type, c.text) for c in thought.content] == [("reasoning_text", "\nAdd 2 and 2.\n")]
    assert reply.output_text == "It is 4." and reply.status == "completed"
    assert client.responses.create(model="fake-model", input="think", max_output_tokens=12
                                   ).output[0].content[0].text == "\nAdd "
    # continued, the reasoning goes to the template with its message
    client.responses.create(model="fake-model", previous_response_id=reply.id, input="plain")
    assert "<assistant><think>\nAdd 2 and 2.\n</think>It is 4.\n<user>plain" in engine.prompts[-1]
    fed_back = [{"role": "user", "content": "think"},
                *[item.model_dump(exclude_none=True) for item in reply.output],
                {"role": "user", "content": "plain"}]
    assert client.responses.create(model="fake-model", input=fed_back).output_text == "It is 4."
    assert "<assistant><think>\nAdd 2 and 2.\n</think>It is 4.\n<user>plain" in engine.prompts[-1]
    plain = client.responses.create(model="fake-model", input="plain")
    assert [item.type for item in plain.output] == ["message"]


def test_responses_stream_the_reasoning_item(servers) -> None:
    url, _ = servers["qwen3"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    events = list(client.responses.create(model="fake-model", input="think", stream=True))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert (events[4].delta, events[4].output_index, events[10].output_index) == \
        ("\nAdd 2 and 2.\n", 0, 1)
    assert events[10].delta == "It is 4."
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "\nAdd 2 and 2.\n"


@pytest.mark.parametrize("parser,pieces,steps,expected", [
    (QWEN3, ["<think>", "Add", ".</th", "ink>", "\n\nIt", " is 4."], [1, 1, 2, 1, 2, 3], 5),
    (QWEN3, ["<think>Add.", "</think>It", " is"], [3, 3, 1], 6),  # (the closing step whole)
    (QWEN3, ["It is ", "4."], [2, 1], 0),  # no thinking: qwen3's content
    (R1, ["It is ", "4."], [2, 1], 3),  # ...deepseek_r1's reasoning
    (QWEN3, ["<think>Add 2", " and"], [2, 1], 3),  # cut short while thinking
    (R1, ["Add.", "</think>", "It is 4."], [1, 1, 3], 2),
])
def test_reasoning_tokens_count_the_steps_up_to_the_close(parser, pieces, steps,
                                                          expected) -> None:
    assert parser.reasoning_tokens(pieces, steps) == expected


def test_usage_counts_the_reasoning_tokens(servers) -> None:
    """`completion_tokens_details.reasoning_tokens`: the fake engine's tokens are one
    character each, so the thought with its tags is 29 tokens; none without the parser."""
    thought = len("<think>\nAdd 2 and 2.\n</think>")
    url, _ = servers["qwen3"]
    usage = _chat(url, "think")["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": thought}
    assert usage["completion_tokens"] > thought
    assert _chat(url, "plain")["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    two = _chat(url, "think", n=2)["usage"]
    assert two["completion_tokens_details"] == {"reasoning_tokens": 2 * thought}
    body = {"messages": _user("think"), "max_tokens": 300, "stop": "|", "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": thought}
    r1_url, _ = servers["deepseek_r1"]
    r1 = _chat(r1_url, "plain")["usage"]  # (all reasoning)
    assert r1["completion_tokens_details"] == {"reasoning_tokens": r1["completion_tokens"]}
    assert "completion_tokens_details" not in _chat(servers[None][0], "think")["usage"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.responses.create(model="fake-model", input="think")
    assert reply.usage.output_tokens_details.reasoning_tokens == thought
    events = list(client.responses.create(model="fake-model", input="think", stream=True))
    assert events[-1].response.usage.output_tokens_details.reasoning_tokens == thought
