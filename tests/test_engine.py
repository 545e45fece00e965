"""Engine behaviour: batch invariance, staggered arrivals, preemption, seeds, stops, abort."""

from __future__ import annotations

import pytest

from server.engine.llm import LLM, Completion
from server.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def run_staggered(llm: LLM, prompts: list[list[int]], params: SamplingParams, every: int) -> list[Completion]:
    """Submit one prompt, then another every `every` steps, while the engine keeps running."""
    engine = llm.engine
    results: dict[str, Completion] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"s{i}", prompt, params)
            results[f"s{i}"] = Completion(f"s{i}", prompt)
        for out in engine.step():
            LLM.absorb(results[out.request_id], out)
        step += 1
    return [results[f"s{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=256, block_size=4,
               max_num_batched_tokens=64, debug_check_integrity=True)


def mixed_prompts(n: int, vocab: int = 128) -> list[list[int]]:
    return [[3 + (7 * i + 5 * j) % (vocab - 3) for j in range(2 + 9 * i % 37)] for i in range(n)]


def test_batch_invariance_tiny(tiny_llm: LLM) -> None:
    prompts = mixed_prompts(8)
    alone = [tiny_llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    together = [c.token_ids for c in tiny_llm.generate(prompts, GREEDY)]
    staggered = [c.token_ids for c in run_staggered(tiny_llm, prompts, GREEDY, every=3)]
    assert together == alone and staggered == alone
    assert tiny_llm.engine.blocks.num_free_blocks == 256
    tiny_llm.engine.blocks.check_integrity()


def test_preemption_under_tiny_pool_keeps_output(tiny_model_dir, tiny_llm: LLM) -> None:
    prompts = mixed_prompts(6)
    expected = [c.token_ids for c in tiny_llm.generate(prompts, GREEDY)]
    small = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=24, block_size=4,
                max_num_batched_tokens=64, debug_check_integrity=True)
    got = [c.token_ids for c in small.generate(prompts, GREEDY)]
    assert got == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.blocks.num_free_blocks == 24


def test_seeded_sampling_reproduces_and_differs(tiny_llm: LLM) -> None:
    prompt = mixed_prompts(3)[2]
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=s) for s in (1, 1, 2)]
    a, b, c = tiny_llm.generate([prompt] * 3, params)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    # the same seed alone, next to other traffic, gives the same tokens
    busy = tiny_llm.generate([prompt, *mixed_prompts(4)], [params[0]] + [GREEDY] * 4)
    assert busy[0].token_ids == a.token_ids


def test_penalties_and_min_tokens(tiny_llm: LLM) -> None:
    prompt = mixed_prompts(2)[1]
    plain = tiny_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
    penalized = tiny_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.8,
                                                           frequency_penalty=1.0))[0]
    assert plain.token_ids != penalized.token_ids
    assert len(set(penalized.token_ids)) >= len(set(plain.token_ids))
    eos_first = tiny_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                           stop_token_ids=[plain.token_ids[0]]))[0]
    assert eos_first.token_ids == plain.token_ids[:1] and eos_first.finish_reason == "stop"
    held = tiny_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, min_tokens=4,
                                                      stop_token_ids=[plain.token_ids[0]]))[0]
    assert len(held.token_ids) >= 4 and plain.token_ids[0] not in held.token_ids[:4]


def test_abort_frees_blocks(tiny_llm: LLM) -> None:
    engine = tiny_llm.engine
    engine.add_request("x", mixed_prompts(5)[4], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.blocks.num_free_blocks < 256
    out = engine.abort_request("x")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert engine.blocks.num_free_blocks == 256 and not engine.has_unfinished()


def test_bad_prompts_rejected(tiny_llm: LLM) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        tiny_llm.engine.add_request("e1", [], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        tiny_llm.engine.add_request("e2", [1, 100000], GREEDY)


@pytest.mark.slow
def test_default_model_batch_invariance_and_stop_strings(default_llm: LLM) -> None:
    texts = ["The quick brown fox", "Once upon a time", "def add(a, b):", "1, 2, 3, 4,",
             "The capital of Italy is", "import numpy as np\n", "Dear Sir,", "Water boils at"]
    prompts = [default_llm.encode(t) for t in texts]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = [default_llm.generate([p], params)[0].token_ids for p in prompts]
    together = [c.token_ids for c in default_llm.generate(prompts, params)]
    staggered = [c.token_ids for c in run_staggered(default_llm, prompts, params, every=2)]
    assert together == alone and staggered == alone
    full = default_llm.generate([prompts[3]], params)[0].text
    stop = full.strip().split(",")[2].strip() or ","
    cut = default_llm.generate([prompts[3]], SamplingParams(max_tokens=20, temperature=0.0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    default_llm.engine.blocks.check_integrity()
    assert default_llm.engine.blocks.usage == 0.0
