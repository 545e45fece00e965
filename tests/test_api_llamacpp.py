"""llama.cpp's POST /infill and /completion (`server.api.serving_llamacpp`): the infill
prompt with other files' text, llama.cpp's sampling defaults and field names, its response
body and stream, `n_predict` 0 (the prompt computed, nothing returned), its time limit."""

from __future__ import annotations

import json

import httpx
import pytest

from server.api.infill import infill_tokens
from tests.api_fakes import FakeEngine, FakeTokenizer
from tests.api_server import app_in_thread

# Qwen2.5-Coder's infill and repository tokens, ids 300-307
QWEN = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|endoftext|>", "<|fim_pad|>",
        "<|file_sep|>", "<|repo_name|>"]
PRE, SUF, MID, SEP, REPO = 300, 301, 302, 305, 306


class CoderTokenizer(FakeTokenizer):
    """The fake's characters, and `names` as ids from 300."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __len__(self) -> int:
        return 300 + len(self.names)

    def get_vocab(self) -> dict[str, int]:
        return super().get_vocab() | {name: 300 + i for i, name in enumerate(self.names)}


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_the_prompt_puts_other_files_before_the_gap() -> None:
    """With the repository tokens: the repository's name, each file's path and text after a
    file separator, then the current file's, then the gap (the current line's text after
    the prefix); without them each file's text after a plain-text separator."""
    infill = infill_tokens(CoderTokenizer(QWEN))
    prompt, cut = infill.with_context(CoderTokenizer(QWEN), "ab", "c", "d",
                                      [("x.py", "X"), ("y.py", "Y")], 64, 100)
    assert prompt == [REPO, *_ids("myproject\n"), SEP, *_ids("x.py\n"), *_ids("X"), SEP,
                      *_ids("y.py\n"), *_ids("Y"), SEP, *_ids("filename\n"), PRE, *_ids("abc"),
                      SUF, *_ids("d"), MID]
    assert not cut
    plain = CoderTokenizer(QWEN[:5])
    prompt, _ = infill_tokens(plain).with_context(plain, "ab", "", "d", [("x.py", "X")], 64, 100)
    assert prompt == [*_ids("\n\n--- snippet ---\n\nX"), PRE, *_ids("ab"), SUF, *_ids("d"), MID]


def test_the_prompt_keeps_the_text_nearest_the_gap() -> None:
    """The prefix's last 3/4 of the window, the suffix's first 1/4 less the current line and
    two markers; of the other files the last whole, the one before it its text's end after
    its path, within `room` with the repository's header and the current file's separator;
    anything cut is reported."""
    tok = CoderTokenizer(QWEN)
    infill = infill_tokens(tok)
    files = [("z", "Z" * 9), ("a", "A" * 10), ("b", "B" * 5)]
    # 11 + 10 for the header and separator, 3 + 5 for b, then 7: a's path and 4 of its text
    prompt, cut = infill.with_context(tok, "p" * 30 + "q" * 12, "t", "s" * 5 + "u" * 20,
                                      files, 16, 36)
    # window 16: 12 of the prefix; 16 / 4 - 2 - 1 = 1 of the suffix
    assert prompt == [REPO, *_ids("myproject\n"), SEP, *_ids("a\nAAAA"), SEP, *_ids("b\nBBBBB"),
                      SEP, *_ids("filename\n"), PRE, *_ids("q" * 12 + "t"), SUF, *_ids("s"), MID]
    assert cut
    prompt, cut = infill.with_context(tok, "pq", "", "s", files, 16, 19)  # (no room)
    assert prompt == [PRE, *_ids("pq"), SUF, *_ids("s"), MID] and cut
    assert not infill.with_context(tok, "pq", "", "s", files[2:], 16, 29)[1]  # (b fits)
    assert infill.with_context(tok, "pq", "", "s", files[2:], 16, 28)[1]


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(step_s=0.0, max_model_len=4096)
    engine.tokenizer = CoderTokenizer(QWEN)
    with app_in_thread(lambda: engine) as (url, _):
        yield url, engine


def _infill(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/infill", json={"input_prefix": "def f(", "input_suffix": ")\n",
                                             "n_predict": 6, **body}, timeout=30)


def test_infill_answers_as_llama_cpp(served) -> None:
    """llama.vim's request (its llama.cpp-only fields ignored, an empty model name) gets
    llama.cpp's body; the engine gets the prompt, llama.cpp's sampling defaults, the
    infill stop tokens and the asked length, which ends the answer ("limit")."""
    url, engine = served
    reply = _infill(url, prompt="x", input_extra=[{"filename": "a.py", "text": "A"}], model="",
                    cache_prompt=True, samplers=["top_k", "top_p", "infill"], id_slot=0,
                    t_max_prompt_ms=500, t_max_predict_ms=1000, n_indent=4, top_k=20)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    rid = list(engine.prompt_ids)[-1]
    prompt = engine.prompt_ids[rid]
    assert prompt == [REPO, *_ids("myproject\n"), SEP, *_ids("a.py\n"), *_ids("A"), SEP,
                      *_ids("filename\n"), PRE, *_ids("def f(x"), SUF, *_ids(")\n"), MID]
    params = engine.params[rid]
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p, params.min_p) == (
        6, 0.8, 20, 0.95, 0.05)
    assert params.stop_token_ids == [303, 304, 305, 306]
    assert len(body["content"]) == 6 and body["stop"] is True
    assert body["stop_type"] == "limit" and body["tokens_predicted"] == 6
    assert body["tokens_evaluated"] == len(prompt) and body["truncated"] is False
    assert body["model"] == "fake-model" and body["tokens"] == _ids(body["content"])
    assert body["timings"]["predicted_n"] == 6 and body["timings"]["prompt_n"] == len(prompt)
    settings = body["generation_settings"]  # (llama.vim shows n_ctx)
    assert (settings["n_ctx"], settings["n_predict"], settings["top_k"]) == (4096, 6, 20)


def test_infill_streams_llama_cpp_chunks(served) -> None:
    """Each piece a `data:` chunk with `stop` false, then a last chunk with `stop` true and
    the timings; no `[DONE]`; the pieces make the unstreamed content."""
    url, _ = served
    whole = _infill(url, seed=3).json()["content"]
    with httpx.stream("POST", url + "/infill", timeout=30, json={
            "input_prefix": "def f(", "input_suffix": ")\n", "n_predict": 6, "seed": 3,
            "stream": True}) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines]
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c["content"] for c in chunks) == whole
    assert chunks[-1]["tokens_predicted"] == 6 and "timings" in chunks[-1]


def test_a_stop_word_and_a_negative_seed(served) -> None:
    """A stop string ends the answer before it ("word"); seed -1 is llama.cpp's random
    seed; repeat_penalty is repetition_penalty."""
    url, engine = served
    first = _infill(url, seed=5).json()["content"]
    assert _infill(url, seed=-1, repeat_penalty=1.1).status_code == 200
    params = engine.params[list(engine.params)[-1]]
    assert params.seed is None and params.repetition_penalty == 1.1
    reply = _infill(url, seed=5, stop=[first[2]]).json()
    assert reply["content"] == first[:2] and reply["stop_type"] == "word"
    assert reply["stopping_word"] == first[2]


def test_the_context_is_cut_alike_for_the_cache_and_the_answer(served) -> None:
    """Files past the context's room are cut at the same place for a request of n_predict 0
    (which plugins send to have them cached) and for one of 128 (llama.vim's), so the
    second finds the first's prompt in the prefix cache."""
    url, engine = served
    files = [{"filename": f"f{i}.py", "text": chr(65 + i) * 900} for i in range(3)]
    prompts = []
    for n in (0, 128):
        body = _infill(url, n_predict=n, input_extra=files).json()
        assert body["truncated"] is True
        prompts.append(engine.prompt_ids[list(engine.prompt_ids)[-1]])
    assert prompts[0] == prompts[1] and len(prompts[0]) < 2700


def test_n_predict_0_computes_the_prompt_alone(served) -> None:
    """(llama.vim's way to have other files' text cached): the engine computes the prompt
    (one token), the reply has no content."""
    url, engine = served
    body = _infill(url, n_predict=0, input_extra=[{"filename": "b.py", "text": "B"}]).json()
    assert engine.params[list(engine.params)[-1]].max_tokens == 1
    assert body["content"] == "" and body["tokens_predicted"] == 0 and body["stop"] is True
    with httpx.stream("POST", url + "/infill", timeout=30, json={
            "input_prefix": "x", "n_predict": 0, "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert len(lines) == 1 and json.loads(lines[0][6:])["stop"] is True  # (the last chunk)


@pytest.mark.parametrize(("body", "param"), [({"n_predict": "many"}, "n_predict"),
                                             ({"input_extra": "text"}, "input_extra")])
def test_bad_infill_requests_are_400s(served, body, param) -> None:
    url, _ = served
    reply = _infill(url, **body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_a_model_without_infill_tokens_is_a_400() -> None:
    with app_in_thread(lambda: FakeEngine(step_s=0.0)) as (url, _):
        reply = _infill(url)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "infill_not_supported"


class SlowLines(FakeEngine):
    """A line of two letters, then letters, a token every 20 ms."""

    def script(self, prompt: list[int], params) -> str:
        return "ab\n" + "c" * 40


def test_t_max_predict_ms_ends_the_answer_after_a_new_line() -> None:
    """llama.cpp's time limit: once the answer has a new line and generating has taken
    longer, the answer ends ("limit") and the request leaves the engine; without it, the
    whole n_predict."""
    engine = SlowLines(step_s=0.02, max_model_len=4096)
    engine.tokenizer = CoderTokenizer(QWEN)
    with app_in_thread(lambda: engine) as (url, _):
        body = _infill(url, n_predict=30, t_max_predict_ms=100).json()
        whole = _infill(url, n_predict=30).json()
    assert body["content"].startswith("ab\nc") and 4 <= body["tokens_predicted"] < 30
    assert body["stop_type"] == "limit"
    assert engine.aborted == [list(engine.params)[0]]
    assert whole["tokens_predicted"] == 30


def test_completion_takes_text_or_token_ids(served) -> None:
    """llama.cpp's /completion: a text prompt tokenized as the model's, or token ids; the
    same reply body as /infill; a token id outside the vocabulary is a 400 naming prompt."""
    url, engine = served
    for prompt, ids in (("hi", _ids("hi")), ([104, 105], [104, 105])):
        reply = httpx.post(url + "/completion", json={"prompt": prompt, "n_predict": 3,
                                                      "cache_prompt": True}, timeout=30)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert engine.prompt_ids[list(engine.prompt_ids)[-1]] == ids
        assert len(body["content"]) == 3 and body["stop_type"] == "limit"
        assert body["tokens_evaluated"] == 2 and body["stop"] is True
    for prompt in ([1, 10**6], ""):
        reply = httpx.post(url + "/completion", json={"prompt": prompt}, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"


class Script(FakeEngine):
    """Answers `text`, then letters."""

    text = ""

    def script(self, prompt: list[int], params) -> str:
        return self.text + "q" * 40


@pytest.mark.parametrize(("text", "n_indent", "content"), [
    ("x\n  y\n  z\nw", 2, "x\n  y\n  z\n"),
    ("x\n\tz", 2, "x\n\t"),  # (a tab is one blank, as llama.cpp counts)
    ("x\n\n  y", 2, "x\n"),  # (an empty line ends it too, as in llama.cpp)
    ("x\n  y\n  z\n", 0, None),  # (no limit)
])
def test_n_indent_ends_the_answer_at_a_line_indented_less(text, n_indent, content) -> None:
    """llama.cpp's n_indent: the answer ends before the text of the first line that starts
    with fewer blanks ("limit"), and the request leaves the engine."""
    engine = Script(step_s=0.0, max_model_len=4096)
    engine.text = text
    engine.tokenizer = CoderTokenizer(QWEN)
    with app_in_thread(lambda: engine) as (url, _):
        body = _infill(url, n_predict=30, n_indent=n_indent).json()
    if content is None:
        assert body["tokens_predicted"] == 30 and engine.aborted == []
    else:
        assert body["content"] == content and body["stop_type"] == "limit"
        assert engine.aborted == list(engine.params)


def test_completion_takes_llama_cpp_grammar_and_json_schema(served) -> None:
    """llama.cpp's `grammar` (GBNF) and `json_schema` reach the engine as a grammar and a
    JSON schema; both at once is a 400."""
    url, engine = served
    for body, field, want in (({"grammar": 'root ::= "yes" | "no"'}, "grammar",
                               'root ::= "yes" | "no"'),
                              ({"json_schema": {"type": "object"}}, "json_schema",
                               '{"type": "object"}')):
        reply = httpx.post(url + "/completion", json={"prompt": "ok?", "n_predict": 2, **body},
                           timeout=30)
        assert reply.status_code == 200, reply.text
        assert getattr(engine.params[list(engine.params)[-1]], field) == want
    reply = httpx.post(url + "/completion", json={"prompt": "ok?", "grammar": "root ::= \"a\"",
                                                  "json_schema": {}}, timeout=30)
    assert reply.status_code == 400


def test_props_gives_the_context_and_the_defaults(served) -> None:
    """llama.cpp's GET /props: n_ctx, /completion's sampling defaults, the model's name and
    chat template."""
    url, engine = served
    body = httpx.get(url + "/props", timeout=30).json()
    settings = body["default_generation_settings"]
    assert settings["n_ctx"] == 4096 and settings["params"]["temperature"] == 0.8
    assert settings["params"]["top_k"] == 40 and settings["params"]["n_predict"] == -1
    assert body["model_path"] == "fake-model"
    assert body["chat_template"] == engine.tokenizer.chat_template
    assert body["build_info"].startswith("leapfrog")


def test_n_probs_gives_completion_probabilities(served) -> None:
    """llama.cpp's `n_probs`: each generated token's id, text, bytes and logprob with that
    many alternatives (the engine asked for them), in the body or in each stream chunk for
    its tokens (not the last chunk); `post_sampling_probs` gives probabilities; more than
    20 is a 400 naming n_probs."""
    url, engine = served
    body = httpx.post(url + "/completion", json={"prompt": "hi", "n_predict": 3, "n_probs": 2,
                                                 "seed": 1}, timeout=30).json()
    assert engine.params[list(engine.params)[-1]].logprobs == 2
    probs = body["completion_probabilities"]
    assert [p["id"] for p in probs] == body["tokens"] and len(probs) == 3
    first = probs[0]
    assert first["token"] == body["content"][0] and first["bytes"] == [ord(body["content"][0])]
    assert first["logprob"] == -0.5
    assert [(t["id"], t["logprob"]) for t in first["top_logprobs"]] == [
        (first["id"], -0.5), (first["id"] + 1, -1.5)]
    assert first["top_logprobs"][1]["token"] == chr(first["id"] + 1)
    with httpx.stream("POST", url + "/completion", timeout=30, json={
            "prompt": "hi", "n_predict": 3, "n_probs": 1, "seed": 1, "stream": True,
            "post_sampling_probs": True}) as reply:
        chunks = [json.loads(line[6:]) for line in reply.iter_lines() if line]
    streamed = [p for c in chunks[:-1] for p in c["completion_probabilities"]]
    assert [p["id"] for p in streamed] == body["tokens"]
    assert "completion_probabilities" not in chunks[-1]
    assert streamed[0]["prob"] == pytest.approx(0.6065, abs=1e-4)  # (e^-0.5)
    assert [t["id"] for t in streamed[0]["top_probs"]] == [streamed[0]["id"]]
    assert "completion_probabilities" not in httpx.post(url + "/completion", json={
        "prompt": "hi", "n_predict": 2}, timeout=30).json()
    reply = httpx.post(url + "/completion", json={"prompt": "hi", "n_probs": 21}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n_probs"
