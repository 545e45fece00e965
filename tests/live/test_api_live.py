"""The real server (`python -m server.cli serve`, default model) through the official `openai`
client and curl-like httpx calls: what requests get. One shared server process and client
(conftest.py); load, disconnects, metrics and the prefix cache: test_api_live_serving.py."""

from __future__ import annotations

import json

import httpx
import jinja2
import openai
import pytest

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "Name three colors."}]


def test_chat_usage_matches_tokenizer(url, client, model) -> None:
    reply = client.chat.completions.create(model=model, messages=MSG, max_tokens=12,
                                           temperature=0, logprobs=True)
    choice = reply.choices[0]
    prompt = httpx.post(url + "/tokenize", json={"messages": MSG}).json()
    assert reply.usage.prompt_tokens == prompt["count"] > 5
    assert reply.usage.completion_tokens == len(choice.logprobs.content)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    assert choice.message.content and choice.message.role == "assistant"


def test_streaming_equals_non_streaming(client, model) -> None:
    args = {"model": model, "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(messages=MSG, **args).choices[0].message.content
    chunks = client.chat.completions.create(messages=MSG, stream=True,
                                            stream_options={"include_usage": True}, **args)
    parts, usage = [], None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        parts.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(parts) == whole
    assert usage is not None and usage.completion_tokens >= 1
    prompt = "The capital of France is"
    text = client.completions.create(prompt=prompt, **args).choices[0].text
    streamed = client.completions.create(prompt=prompt, stream=True, **args)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_n2_and_seed_reproducibility(client, model) -> None:
    args = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0}
    pair = client.completions.create(n=2, seed=7, **args)
    assert sorted(c.index for c in pair.choices) == [0, 1]
    by_index = {c.index: c.text for c in pair.choices}
    alone7 = client.completions.create(seed=7, **args).choices[0].text
    alone8 = client.completions.create(seed=8, **args).choices[0].text
    assert by_index == {0: alone7, 1: alone8}  # choice i runs with seed + i
    assert client.completions.create(seed=7, **args).choices[0].text == alone7
    greedy = client.chat.completions.create(model=model, messages=MSG, n=2, max_tokens=8,
                                            temperature=0, logprobs=True)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == sum(len(c.logprobs.content) for c in greedy.choices)


def test_logprobs_greedy_token_is_the_top_one(client, model) -> None:
    chat = client.chat.completions.create(model=model, messages=MSG, max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    comp = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6,
                                     temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_echo_with_logprobs_scores_the_prompt(url, client, model) -> None:
    """echo + logprobs + max_tokens 1 (how lm-evaluation-harness scores a continuation):
    every prompt token's logprob, the first null; a greedy continuation echoed back is the
    top token at each of its positions, with the logprobs its generation reported (the
    prefill's rows and the decode steps' agree), streamed or not."""
    args = {"model": model, "temperature": 0, "logprobs": 1}
    # (" Paris" and "." tokenize back to themselves; the text of more tokens may not)
    context = httpx.post(url + "/tokenize", json={"prompt": "The capital of France is"}).json()
    generated = client.completions.create(prompt=context["tokens"], max_tokens=2, **args)
    gen_lp = generated.choices[0].logprobs
    whole = httpx.post(url + "/tokenize", json={
        "prompt": "The capital of France is" + generated.choices[0].text}).json()["tokens"]
    n = len(context["tokens"])
    assert whole[:n] == context["tokens"] and len(whole) == n + 2
    echoed = client.completions.create(prompt=whole, max_tokens=1, echo=True, **args)
    choice = echoed.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("The capital of France is" + generated.choices[0].text)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(whole) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.tokens[n:n + 2] == gen_lp.tokens
    assert lp.token_logprobs[n:n + 2] == pytest.approx(gen_lp.token_logprobs, abs=2e-2)
    for token, top in zip(lp.tokens[n:n + 2], lp.top_logprobs[n:n + 2], strict=True):
        assert max(top, key=top.get) == token  # lm-eval's is_greedy
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert echoed.usage.prompt_tokens == len(whole) and echoed.usage.completion_tokens == 1
    streamed = client.completions.create(prompt=whole, max_tokens=1, echo=True, stream=True,
                                         **args)
    parts = [c.choices[0] for c in streamed]
    assert "".join(p.text for p in parts) == choice.text
    assert [t for p in parts for t in p.logprobs.tokens] == lp.tokens
    assert [v for p in parts for v in p.logprobs.token_logprobs] == lp.token_logprobs


def test_echo_with_max_tokens_0_scores_the_prompt_alone(url, client, model) -> None:
    """max_tokens 0 with echo (OpenAI's legacy completions; older evaluation harnesses
    score prompts so): the prompt back, its tokens' logprobs as max_tokens 1 gives them,
    nothing generated (usage included); streamed, or without echo, it is a 400."""
    args = {"model": model, "temperature": 0, "logprobs": 2, "echo": True,
            "prompt": ["The capital of France is Paris.", "One, two, three"]}
    one = client.completions.create(max_tokens=1, **args)
    zero = client.completions.create(max_tokens=0, **args)
    assert zero.usage.completion_tokens == 0
    assert zero.usage.total_tokens == zero.usage.prompt_tokens == one.usage.prompt_tokens
    for a, b, prompt in zip(zero.choices, one.choices, args["prompt"], strict=True):
        assert a.text == prompt and b.text.startswith(prompt) and len(b.text) > len(prompt)
        assert a.finish_reason == "length"
        n = len(b.logprobs.tokens) - 1  # (the prompt's tokens; one token generated after)
        assert a.logprobs.tokens == b.logprobs.tokens[:n]
        assert a.logprobs.token_logprobs == b.logprobs.token_logprobs[:n]
        assert a.logprobs.top_logprobs == b.logprobs.top_logprobs[:n]
        assert a.logprobs.text_offset == b.logprobs.text_offset[:n]
    body = {k: v for k, v in args.items() if k != "model"} | {"max_tokens": 0}
    streamed = httpx.post(url + "/v1/completions", json=body | {"stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
    plain = httpx.post(url + "/v1/completions", json=body | {"echo": False})
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "max_tokens"


def test_tokenizer_info_serves_a_remote_tokenizer(url) -> None:
    """What lm-evaluation-harness's remote tokenizer does with /tokenizer_info: the EOS
    token's text tokenizes to the model's EOS id, and the chat template rendered on the
    client, then tokenized without special tokens added, gives the chat prompt's tokens."""
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] and info["chat_template"] and info["vocab_size"] > 1000
    assert info["model_max_length"] == 512  # (the shared server's --max-model-len)

    def tokenize(text: str) -> list[int]:
        body = {"prompt": text, "add_special_tokens": False}
        return httpx.post(url + "/tokenize", json=body).json()["tokens"]

    eos = tokenize(info["eos_token"])
    assert len(eos) == 1
    assert httpx.post(url + "/detokenize", json={"tokens": eos}).json()["prompt"] == (
        info["eos_token"])
    # (lm-eval renders the template with jinja2, as transformers does)
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(
        messages=MSG, add_generation_prompt=True, bos_token=info["bos_token"],
        eos_token=info["eos_token"])
    chat = httpx.post(url + "/tokenize", json={"messages": MSG}).json()["tokens"]
    assert tokenize(rendered) == chat


def test_a_reply_continues_the_final_assistant_message(url, client, model) -> None:
    """continue_final_message (with add_generation_prompt false) leaves the assistant's
    message open: the prompt ends with its text, with no end of turn after it, and the
    reply goes on from there; the two endings together are a 400."""
    start = [*MSG, {"role": "assistant", "content": "Red, green"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    tokens = httpx.post(url + "/tokenize", json={"messages": start, **options}).json()["tokens"]
    text = httpx.post(url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nRed, green")
    closed = httpx.post(url + "/tokenize", json={"messages": start}).json()["tokens"]
    assert closed[:len(tokens)] == tokens and len(closed) > len(tokens)
    reply = client.chat.completions.create(model=model, messages=start, max_tokens=6,
                                           temperature=0, extra_body=options)
    assert reply.usage.prompt_tokens == len(tokens)
    alone = client.completions.create(model=model, prompt=tokens, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == alone.choices[0].text
    with pytest.raises(openai.BadRequestError, match="add_generation_prompt"):
        client.chat.completions.create(model=model, messages=start,
                                       extra_body={"continue_final_message": True})
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
        client.chat.completions.create(model=model, messages=MSG,
                                       extra_body={"chat_template_kwargs": {"tokenize": True}})


def test_stop_string_is_not_returned(client, model) -> None:
    args = {"model": model, "prompt": "1, 2, 3, 4,", "max_tokens": 10, "temperature": 0}
    full = client.completions.create(**args).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    stopped = client.completions.create(stop=[stop], **args).choices[0]
    assert stopped.text == full[: full.index(stop)]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop  # (vLLM's)
    chat = client.chat.completions.create(model=model, messages=MSG, max_tokens=10,
                                          temperature=0).choices[0]
    assert chat.finish_reason in ("stop", "length") and chat.stop_reason is None
    kept = client.completions.create(stop=[stop], extra_body={"include_stop_str_in_output": True},
                                     **args).choices[0]  # (vLLM's extension)
    assert kept.text == full[: full.index(stop) + len(stop)] and kept.finish_reason == "stop"


def test_errors_then_keeps_serving(url, client, model) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=model, prompt="hi " * 200, max_tokens=400)
    body = exc.value.body
    assert body["code"] == "context_length_exceeded" and "512" in body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.chat.completions.create(model=model, messages=MSG, extra_body={"suffix": "x"})
    bad = httpx.post(url + "/v1/chat/completions", content=b"{oops",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert client.chat.completions.create(model=model, messages=MSG, max_tokens=2).choices


def test_json_schema_output_and_logit_bias(client, model) -> None:
    """response_format json_schema through the official client: the reply parses and
    follows the schema, and ends by itself; an impossible schema is a 400; logit_bias +100
    on one token makes it every token."""
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    reply = client.chat.completions.create(
        model=model, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Describe a cat as JSON with its name and age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}})
    choice = reply.choices[0]
    cat = json.loads(choice.message.content)
    assert set(cat) == {"name", "age"} and isinstance(cat["age"], int)
    assert choice.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="JSON schema"):
        client.chat.completions.create(model=model, messages=MSG, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    forced = client.chat.completions.create(model=model, messages=MSG, max_tokens=5,
                                            temperature=0, logit_bias={"33": 100})
    assert forced.choices[0].message.content == "1" * 5


def test_structured_outputs_regex_choice_and_grammar(client, model) -> None:
    """vLLM's structured_outputs (and its older guided_* fields) on both endpoints, streamed
    or not: replies match; a spec xgrammar cannot take and two structures at once are 400s."""
    import re

    ask = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    args = {"model": model, "max_tokens": 12, "temperature": 0}
    choice = client.chat.completions.create(
        messages=ask, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}, **args)
    assert choice.choices[0].message.content in ("yes", "no")
    assert choice.choices[0].finish_reason == "stop"
    legacy = client.chat.completions.create(messages=ask, stream=True,
                                            extra_body={"guided_choice": ["yes", "no"]}, **args)
    assert "".join(c.choices[0].delta.content or "" for c in legacy if c.choices) == (
        choice.choices[0].message.content)
    date = client.completions.create(prompt="The first moon landing was on", extra_body={
        "structured_outputs": {"regex": r" \d{4}-\d{2}-\d{2}"}}, **args)
    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", date.choices[0].text), date.choices[0].text
    grammar = 'root ::= "Colors: " color (", " color)*\ncolor ::= "red" | "green" | "blue"'
    listed = client.completions.create(prompt="Name some colors.", extra_body={
        "structured_outputs": {"grammar": grammar}}, **args)
    text = listed.choices[0].text
    assert re.fullmatch(r"Colors: (red|green|blue)(, (red|green|blue))*", text) or (
        listed.choices[0].finish_reason == "length" and text.startswith("Colors: ")), text
    with pytest.raises(openai.BadRequestError, match="unsupported regex"):
        client.completions.create(prompt="x", extra_body={"guided_regex": "(oops"}, **args)
    with pytest.raises(openai.BadRequestError, match="one structure"):
        client.completions.create(prompt="x", extra_body={
            "guided_regex": "a", "structured_outputs": {"choice": ["a"]}}, **args)
    with pytest.raises(openai.BadRequestError, match="exactly one"):
        client.completions.create(prompt="x", extra_body={
            "structured_outputs": {"regex": "a", "choice": ["a"]}}, **args)
    with pytest.raises(openai.BadRequestError, match="one structure"):
        client.chat.completions.create(messages=ask, response_format={"type": "json_object"},
                                       extra_body={"guided_choice": ["yes"]}, **args)


def test_forced_tool_calls(client, model) -> None:
    """The default model's template knows no tools, but a named or required tool_choice
    constrains its output to a call: the arguments parse and follow the function's schema,
    plain and streamed; the call and its result go back into the conversation; "auto" is a
    400 that says what to use instead."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    args = {"model": model, "messages": ask, "tools": [weather, clock], "max_tokens": 40,
            "temperature": 0}
    reply = client.chat.completions.create(tool_choice=named, **args).choices[0]
    (call,) = reply.message.tool_calls
    assert reply.message.content is None and reply.finish_reason == "stop"
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    streamed = [c.choices[0].delta.tool_calls for c in client.chat.completions.create(
        tool_choice=named, stream=True, **args) if c.choices and c.choices[0].delta.tool_calls]
    assert streamed[0][0].function.name == "get_weather"
    assert "".join(d[0].function.arguments for d in streamed) == call.function.arguments
    required = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False,
                                              **args).choices[0]
    (call,) = required.message.tool_calls
    assert required.finish_reason == "tool_calls"
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
    answer = client.chat.completions.create(model=model, max_tokens=5, messages=[
        *ask, required.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "12C, sunny"}])
    assert answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="tool_choice 'auto'"):
        client.chat.completions.create(model=model, messages=ask, tools=[weather], max_tokens=4)
