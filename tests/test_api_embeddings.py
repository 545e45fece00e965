"""POST /v1/embeddings on a tiny random model through the real engine: transformers' pooled
hidden states, as floats or base64 (the official client's default), `dimensions`, the usage,
and a 400 naming the field for each bad input."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM

from server.api.config import ApiConfig
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from tests.api_server import app_in_thread
from tests.test_embeddings import ATOL, hf_embeddings

PROMPTS = [[5], [7, 8, 9, 10, 11], [3 + (5 * j) % 120 for j in range(40)]]


@pytest.fixture(scope="module", params=["last", "mean"])
def served(request, tiny_model_dir):
    path = tiny_model_dir("llama")
    config = EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=4,
                          max_num_batched_tokens=16, max_model_len=64)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with app_in_thread(lambda: AsyncEngine(config), ApiConfig(pooling=request.param)) as (url, _):
        yield url, hf_embeddings(hf, PROMPTS, request.param)


def _embed(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json=body, timeout=60)


def test_embeddings_are_transformers_pooled_hidden_states(served) -> None:
    url, expected = served
    reply = _embed(url, input=PROMPTS)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    for d, e in zip(body["data"], expected, strict=True):
        torch.testing.assert_close(torch.tensor(d["embedding"]), e, atol=ATOL, rtol=0)
    n = sum(map(len, PROMPTS))
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    # one input: a string (the tokenizer's words), or its ids
    text = _embed(url, input="w7 w8 w9").json()["data"]
    ids = _embed(url, input=[7, 8, 9]).json()["data"]
    assert len(text) == len(ids) == 1
    assert text[0]["embedding"] == ids[0]["embedding"]
    assert ids[0]["embedding"] != body["data"][1]["embedding"]


def test_base64_dimensions_and_the_official_client(served) -> None:
    """base64 holds the float32 vector's little-endian bytes; `dimensions` keeps the first
    components, scaled to unit length; the `openai` client (which asks for base64) gets the
    float reply's vectors."""
    url, expected = served
    floats = _embed(url, input=PROMPTS)
    packed = _embed(url, input=PROMPTS, encoding_format="base64")
    for f, p in zip(floats.json()["data"], packed.json()["data"], strict=True):
        raw = base64.b64decode(p["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(
            f["embedding"], abs=1e-6)
    short = _embed(url, input=PROMPTS[2], dimensions=5).json()["data"][0]["embedding"]
    first = expected[2][:5]
    torch.testing.assert_close(torch.tensor(short), first / first.norm(), atol=ATOL, rtol=0)
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    got = client.embeddings.create(model=client.models.list().data[0].id, input=PROMPTS)
    for d, f in zip(got.data, floats.json()["data"], strict=True):
        assert d.embedding == pytest.approx(f["embedding"], abs=1e-6)
    assert got.usage.prompt_tokens == sum(map(len, PROMPTS))


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[1, 2], []]}, "input"),
    ({"input": ["w3", ""]}, "input"),
    ({"input": [1, 100000]}, "input"),
    ({"input": list(range(3, 67))}, "input"),  # (64 tokens: the context, less the one generated)
    ({"input": "w3", "dimensions": 0}, "dimensions"),
    ({"input": "w3", "dimensions": 65}, "dimensions"),
    ({"input": "w3", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "w3", "suffix": "x"}, "suffix"),
])
def test_bad_input_is_a_400_naming_the_field(served, body, param) -> None:
    url, _ = served
    reply = _embed(url, **body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert _embed(url, input="w3 w4").status_code == 200  # (and the server serves on)


def test_other_models_are_a_404(served) -> None:
    url, _ = served
    reply = _embed(url, input="w3", model="text-embedding-3-small")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


def test_a_model_without_a_head_embeds_and_refuses_to_generate(tmp_path) -> None:
    """A base model's checkpoint (no language-model head): /v1/embeddings serves it; the
    generating endpoints answer a 400 naming the model; tokenizing still works."""
    from transformers import AutoModel

    from tests.tiny_models import tiny_config, tiny_tokenizer

    AutoModel.from_config(tiny_config("mistral")).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    config = EngineConfig(model=str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=4,
                          max_model_len=64)
    with app_in_thread(lambda: AsyncEngine(config)) as (url, _):
        assert _embed(url, input="w3 w4").status_code == 200
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user",
                                                                    "content": "w3"}]}),
                           ("/v1/completions", {"prompt": "w3"}),
                           ("/v1/responses", {"input": "w3"})]:
            reply = httpx.post(url + path, json=body, timeout=30)
            assert reply.status_code == 400, (path, reply.text)
            error = reply.json()["error"]
            assert error["code"] == "model_not_generative" and error["param"] == "model"
            assert "embeddings only" in error["message"]
        assert httpx.post(url + "/tokenize", json={"prompt": "w3 w4"}).json()["count"] == 2


def test_a_request_of_many_inputs_runs_them_in_a_window() -> None:
    """2,000 inputs with room for 100 waiting requests: at most `JOB_WINDOW` are in the engine
    at once, so the request neither fills the queue (a 429) nor waits on it; each
    embedding comes back at its input's index."""
    from server.api.generation import JOB_WINDOW
    from tests.api_fakes import FakeEngine

    engine = FakeEngine(step_s=0.0, max_waiting=100)
    inputs = [[3 + i % 100] for i in range(2000)]
    with app_in_thread(lambda: engine) as (url, _):
        reply = _embed(url, input=inputs)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [d["index"] for d in data] == list(range(2000))
    assert all(d["embedding"].index(1.0) == (3 + i % 100) % 8 for i, d in enumerate(data))
    assert 1 < engine.peak_active <= JOB_WINDOW < 100
    assert len(engine.finished) == 2000 and not engine.active


@pytest.mark.parametrize(("named", "flag", "used"), [
    ("mean", None, "mean"), ("mean", "last", "last"), (None, None, "last"), ("cls", None, None),
    ("cls", "mean", "mean")])
def test_the_pooling_is_the_flag_else_the_model_s_else_last(named, flag, used) -> None:
    """`--pooling`, else what the model's files name, else last; a pooling the files name
    that this server does not compute is a 400 until the flag names one."""
    from tests.api_fakes import FakeEngine

    engine = FakeEngine(step_s=0.0)
    engine.pooling = named
    with app_in_thread(lambda: engine, ApiConfig(pooling=flag)) as (url, _):
        reply = _embed(url, input="w3")
    if used is None:
        assert reply.status_code == 400
        assert reply.json()["error"]["code"] == "unsupported_pooling"
        assert "--pooling last or mean" in reply.json()["error"]["message"]
        assert not engine.params
    else:
        assert reply.status_code == 200, reply.text
        assert [p.pooling for p in engine.params.values()] == [used]


def test_truncate_prompt_tokens_embeds_an_input_s_last_tokens(served) -> None:
    """vLLM's `truncate_prompt_tokens`: the last k tokens (-1: the context less one), so an
    input longer than the context is embedded, not refused; 0 or unset: as given."""
    url, _ = served
    long = list(range(3, 103))  # (100 tokens; the context is 64)
    assert _embed(url, input=long).status_code == 400
    cut = _embed(url, input=long, truncate_prompt_tokens=-1).json()
    assert cut["usage"]["prompt_tokens"] == 63
    assert cut["data"][0]["embedding"] == pytest.approx(
        _embed(url, input=long[-63:]).json()["data"][0]["embedding"], abs=ATOL)
    five = _embed(url, input=[long, [7, 8]], truncate_prompt_tokens=5).json()
    assert five["usage"]["prompt_tokens"] == 5 + 2
    assert five["data"][0]["embedding"] == pytest.approx(
        _embed(url, input=long[-5:]).json()["data"][0]["embedding"], abs=ATOL)
    assert _embed(url, input=long, truncate_prompt_tokens=-2).status_code == 400


def test_messages_are_embedded_as_the_chat_template_renders_them(tiny_model_dir) -> None:
    """vLLM's chat embeddings: one conversation, rendered by the chat template (no assistant
    prompt unless asked), embedded as that text is; `input` and `messages` exclusive."""
    template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}w2{% endif %}")
    config = EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64,
                          block_size=4, max_model_len=64, chat_template=template)
    messages = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w5"}]
    with app_in_thread(lambda: AsyncEngine(config)) as (url, _):
        chat = _embed(url, messages=messages)
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["prompt_tokens"] == 3
        text = _embed(url, input="w3 w4 w5")
        assert chat.json()["data"][0]["embedding"] == pytest.approx(
            text.json()["data"][0]["embedding"], abs=ATOL)
        prompted = _embed(url, messages=messages, add_generation_prompt=True).json()
        assert prompted["usage"]["prompt_tokens"] == 4
        both = _embed(url, input="w3", messages=messages)
        assert both.status_code == 400 and both.json()["error"]["param"] == "input"
        assert _embed(url).status_code == 400
