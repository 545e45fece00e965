"""POST /v1/score and /v1/rerank (/v2/rerank) on a tiny random model through the real
engine: cosine similarities of /v1/embeddings' vectors, each distinct text embedded once."""

from __future__ import annotations

import httpx
import pytest

from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from tests.api_server import app_in_thread

TEXTS = ["w3 w4 w5", "w3 w4 w6", "w9 w10 w11 w12", "w20 w21"]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64,
                          block_size=4, max_model_len=64)
    with app_in_thread(lambda: AsyncEngine(config)) as (url, _):
        data = httpx.post(url + "/v1/embeddings", json={"input": TEXTS}).json()["data"]
        yield url, [d["embedding"] for d in data]


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_scores_one_to_one_one_to_many_and_pairwise(served) -> None:
    url, vectors = served
    cases = [(TEXTS[0], TEXTS[1], [(0, 1)]),
             (TEXTS[0], TEXTS[1:], [(0, 1), (0, 2), (0, 3)]),
             ([TEXTS[0]], TEXTS[1:3], [(0, 1), (0, 2)]),
             (TEXTS[:2], TEXTS[2:], [(0, 2), (1, 3)])]
    for first, second, pairs in cases:
        reply = httpx.post(url + "/v1/score", json={"text_1": first, "text_2": second})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "list" and body["id"].startswith("score-")
        assert [d["index"] for d in body["data"]] == list(range(len(pairs)))
        assert all(d["object"] == "score" for d in body["data"])
        assert [d["score"] for d in body["data"]] == pytest.approx(
            [_cosine(vectors[a], vectors[b]) for a, b in pairs], abs=1e-5)
    # each distinct text once: 3 + 3 tokens, though "w3 w4 w5" is in two pairs
    usage = httpx.post(url + "/v1/score", json={"text_1": TEXTS[0], "text_2": [
        TEXTS[1], TEXTS[0]]}).json()["usage"]
    assert usage == {"prompt_tokens": 6, "total_tokens": 6}


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rerank_orders_documents_by_their_score(served, path) -> None:
    url, vectors = served
    reply = httpx.post(url + path, json={"query": TEXTS[0], "documents": TEXTS[1:]})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    scores = {i: _cosine(vectors[0], vectors[i + 1]) for i in range(3)}
    assert [r["index"] for r in results] == sorted(scores, key=lambda i: -scores[i])
    for r in results:
        assert r["relevance_score"] == pytest.approx(scores[r["index"]], abs=1e-5)
        assert r["document"] == {"text": TEXTS[r["index"] + 1]}
    top = httpx.post(url + path, json={"query": TEXTS[0], "documents": TEXTS[1:], "top_n": 1,
                                       "return_documents": False}).json()["results"]
    assert top == [{"index": results[0]["index"],
                    "relevance_score": results[0]["relevance_score"]}]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/score", {"text_1": TEXTS[:2], "text_2": TEXTS[:3]}, "text_2"),
    ("/v1/score", {"text_1": "", "text_2": "w3"}, "text_1"),
    ("/v1/score", {"text_1": "w3", "text_2": []}, "text_2"),
    ("/v1/rerank", {"query": "", "documents": ["w3"]}, "query"),
    ("/v1/rerank", {"query": "w3", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "w3", "documents": ["w4"], "top_n": -1}, "top_n"),
    ("/v1/rerank", {"query": "w3", "documents": ["w4 " * 70]}, "documents"),
])
def test_bad_requests_are_400s_naming_the_field(served, path, body, param) -> None:
    url, _ = served
    reply = httpx.post(url + path, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_a_judge_model_scores_by_its_yes_and_no_logits(tiny_model_dir) -> None:
    """`--score-tokens no,yes`: a pair's score is sigmoid(logit yes - logit no) of the token
    after its first text then its second, as transformers computes the logits; a rerank
    orders by it; a token that is not one of the vocabulary's is a 500 naming the flag."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from server.api.config import ApiConfig

    path = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=4,
                          max_model_len=64)

    def expected(first: list[int], second: list[int]) -> float:
        with torch.no_grad():
            logits = hf(torch.tensor([first + second])).logits[0, -1]
        return 1 / (1 + math.exp(float(logits[5] - logits[6])))

    with app_in_thread(lambda: AsyncEngine(config), ApiConfig(score_tokens=("w5", "w6"))) as (
            url, _):
        scored = httpx.post(url + "/v1/score", json={"text_1": "w3 w4", "text_2": [
            "w7", "w8 w9", "w3"]}).json()
        want = [expected([3, 4], s) for s in ([7], [8, 9], [3])]
        assert [d["score"] for d in scored["data"]] == pytest.approx(want, abs=1e-5)
        assert scored["usage"]["prompt_tokens"] == 3 + 4 + 3
        ranked = httpx.post(url + "/v1/rerank", json={"query": "w3 w4", "documents": [
            "w7", "w8 w9", "w3"]}).json()["results"]
        assert [r["index"] for r in ranked] == sorted(range(3), key=lambda i: -want[i])
        assert [r["relevance_score"] for r in ranked] == pytest.approx(sorted(want)[::-1],
                                                                       abs=1e-5)
    # checked at start-up: the load fails (the server exits), no request is taken
    with app_in_thread(lambda: AsyncEngine(config),
                       ApiConfig(score_tokens=("w5", "w5 w6"))) as (url, state):
        assert "'w5 w6' is not one token" in str(state.load_error)
        reply = httpx.post(url + "/v1/score", json={"text_1": "w3", "text_2": "w4"})
        assert reply.status_code == 503 and httpx.get(url + "/health").status_code == 503


def test_a_model_without_a_head_cannot_judge(tmp_path) -> None:
    """`--score-tokens` needs the language-model head: with a base model's checkpoint the
    server does not start; without the flag it scores by embeddings."""
    from transformers import AutoModel

    from server.api.config import ApiConfig
    from tests.tiny_models import tiny_config, tiny_tokenizer

    AutoModel.from_config(tiny_config("mistral")).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    config = EngineConfig(model=str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=4,
                          max_model_len=64)
    body = {"text_1": "w3", "text_2": "w4"}
    with app_in_thread(lambda: AsyncEngine(config), ApiConfig(score_tokens=("w5", "w6"))) as (
            url, state):
        assert "has no language-model head" in str(state.load_error)
        assert httpx.post(url + "/v1/score", json=body).status_code == 503
    with app_in_thread(lambda: AsyncEngine(config)) as (url, _):
        assert httpx.post(url + "/v1/score", json=body).status_code == 200
