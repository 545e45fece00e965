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


def test_logit_bias(tiny_llm: LLM) -> None:
    """A bias of +100 makes its token every token, greedy or sampled (logprobs stay the
    model's); -100 keeps the greedy token out; ids outside the vocabulary are refused."""
    prompt = mixed_prompts(3)[2]
    plain = tiny_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                       ignore_eos=True, logprobs=0))[0]
    forced = next(t for t in range(3, 128) if t not in plain.token_ids)
    for base in (dict(temperature=0.0), dict(temperature=1.0, seed=5)):
        out = tiny_llm.generate([prompt], SamplingParams(
            max_tokens=12, ignore_eos=True, logprobs=0, logit_bias={forced: 100.0}, **base))[0]
        assert out.token_ids == [forced] * 12
        assert all(lp.logprob < -1.0 for lp in out.logprobs)  # (the model's own: unlikely)
    banned = tiny_llm.generate([prompt], SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={plain.token_ids[0]: -100.0}))[0]
    assert banned.token_ids[0] != plain.token_ids[0]
    assert plain.token_ids[0] not in banned.token_ids
    with pytest.raises(ValueError, match="token ids"):
        tiny_llm.engine.add_request("b1", prompt, SamplingParams(logit_bias={100000: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 101.0})


def test_allowed_token_ids(tiny_llm: LLM) -> None:
    """vLLM's allowed_token_ids: every token is one of them, greedy or sampled, the greedy
    one the allowed token the model likes best (logprobs stay the model's); ids outside the
    vocabulary are refused."""
    prompt = mixed_prompts(3)[1]
    plain = tiny_llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                       logprobs=20))[0]
    ranked = [i for i, _ in sorted(plain.logprobs[0].top, key=lambda x: -x[1])]
    outside = next(t for t in range(3, 128) if t not in ranked)
    allowed = (ranked[7], ranked[3], outside)
    for base in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        out = tiny_llm.generate([prompt], SamplingParams(
            max_tokens=12, ignore_eos=True, logprobs=0, allowed_token_ids=allowed, **base))[0]
        assert set(out.token_ids) <= set(allowed)
        if base["temperature"] == 0.0:  # (the model's first choice among them)
            assert out.token_ids[0] == ranked[3]
            # the model's own logprob, not one renormalized over the allowed tokens
            assert out.logprobs[0].logprob == pytest.approx(dict(plain.logprobs[0].top)[ranked[3]])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        tiny_llm.engine.add_request("a1", prompt, SamplingParams(allowed_token_ids=(100000,)))


def test_prompt_logprobs_survive_preemption(tiny_model_dir, tiny_llm: LLM) -> None:
    """Requests preempted while computing their prompts (chunks of 8 tokens) compute it
    again without repeating or losing a prompt logprob."""
    prompts = mixed_prompts(6)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    expected = tiny_llm.generate(prompts, params)
    small = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=24, block_size=4,
                max_num_batched_tokens=8, debug_check_integrity=True)
    got = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    for prompt, g, e in zip(prompts, got, expected, strict=True):
        assert g.token_ids == e.token_ids
        assert len(g.prompt_logprobs) == len(prompt) and g.prompt_logprobs[0] is None
        assert [lp.token_id for lp in g.prompt_logprobs[1:]] == prompt[1:]
        assert [lp.top[0][0] for lp in g.prompt_logprobs[1:]] == [
            lp.top[0][0] for lp in e.prompt_logprobs[1:]]
        assert [lp.logprob for lp in g.prompt_logprobs[1:]] == pytest.approx(
            [lp.logprob for lp in e.prompt_logprobs[1:]], abs=1e-4)
    assert small.engine.blocks.num_free_blocks == 24


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


def test_overlapped_outputs_are_the_same_one_step_later(tiny_model_dir) -> None:
    """With `overlap_outputs` (on CUDA by default; forced here) a step's outputs come from
    the next step's call, made while the device runs it: the same tokens, greedy and
    seeded, with speculation, staggered arrivals and aborts, and nothing left behind."""
    path = str(tiny_model_dir("llama"))
    common = dict(dtype="float32", num_kv_blocks=256, block_size=4, max_num_batched_tokens=64)
    plain = LLM(path, **common)
    over = LLM(path, speculative="ngram", num_speculative_tokens=3, debug_check_integrity=True,
               **common)
    e = over.engine
    prompts = mixed_prompts(6)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)
    greedy = [c.token_ids for c in plain.generate(prompts, GREEDY)]
    sampled = [c.token_ids for c in plain.generate(prompts, seeded)]
    # (seeded sampling with drafts depends on the draft lengths, which depend on measured
    # step times: compared without speculation)
    e.overlap_outputs = plain.engine.overlap_outputs = True
    for llm, params, ref in ((over, GREEDY, greedy), (plain, seeded, sampled)):
        assert [c.token_ids for c in llm.generate(prompts, params)] == ref
        assert [c.token_ids for c in run_staggered(llm, prompts, params, every=2)] == ref
    e.add_request("a", prompts[1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert e.step() == [] and e.has_unfinished()  # the prompt's token: pending
    (first,) = e.step()  # the prompt's token, while the second is computed
    assert first.new_token_ids == ref_first(plain, prompts[1]) and not first.finished
    assert not e.scheduler.has_work() and e.has_unfinished()  # done, its outputs pending
    (last,) = e.step()
    assert last.finished and last.finish_reason == "length" and not e.has_unfinished()
    e.add_request("b", prompts[2], SamplingParams(max_tokens=50, ignore_eos=True))
    e.step()
    e.step()
    assert e.abort_request("b").finish_reason == "abort"
    assert e.step() == [] and not e.has_unfinished()  # its pending tokens: dropped
    assert e.blocks.usage == 0.0 and e.drafter._indexes == {} and not e.outputs._tracked


def ref_first(llm: LLM, prompt: list[int]) -> list[int]:
    return llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0].token_ids


@pytest.mark.slow
def test_default_model_stop_strings_with_overlapped_outputs(default_llm: LLM, monkeypatch) -> None:
    """A stop string found in a step's outputs while the next step runs: that step's token
    of the request is dropped, the text and tokens are those made without overlap."""
    prompt = default_llm.encode("1, 2, 3, 4,")
    full = default_llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0,
                                                         ignore_eos=True))[0]
    stop = full.text.strip().split(",")[2].strip() or ","
    params = SamplingParams(max_tokens=20, temperature=0.0, stop=[stop])
    ref = default_llm.generate([prompt], params)[0]
    assert ref.finish_reason == "stop" and len(ref.token_ids) < 20
    monkeypatch.setattr(default_llm.engine, "overlap_outputs", True)
    for got in default_llm.generate([prompt, prompt], params):
        assert (got.text, got.token_ids, got.finish_reason) == (ref.text, ref.token_ids, "stop")
    assert default_llm.engine.blocks.usage == 0.0 and not default_llm.engine.has_unfinished()


def test_warm_up_writes_only_the_scratch_block(tiny_model_dir) -> None:
    """`ModelRunner.warm_up` (run at start-up on CUDA) runs its dummy sequences of 1 to 64
    tokens through the model with their KV in the scratch block only: the pool's blocks
    keep their contents, and generation after it gives the tokens it gives without."""
    path = str(tiny_model_dir("llama"))
    warmed, plain = (LLM(path, dtype="float32", num_kv_blocks=32, block_size=4) for _ in "ab")
    runner = warmed.engine.runner
    for k, v in runner.model.kv_caches:
        k[:-1].fill_(3.0)
        v[:-1].fill_(3.0)
    calls = []
    forward = runner.model.forward
    runner.model.forward = lambda ids, *a, **kw: calls.append(len(ids)) or forward(ids, *a, **kw)
    runner.warm_up(64)
    assert calls == [1, 2, 4, 8, 16, 32, 64]
    for k, v in runner.model.kv_caches:
        assert bool((k[:-1] == 3.0).all() and (v[:-1] == 3.0).all())
        assert not bool((k[-1] == 0).all())  # the scratch block took the writes
    prompts = mixed_prompts(3)
    assert [c.token_ids for c in warmed.generate(prompts, GREEDY)] == [
        c.token_ids for c in plain.generate(prompts, GREEDY)]


def test_chat_template_replaces_the_models(tiny_model_dir, tmp_path) -> None:
    """`chat_template` as Jinja text or as a file renders chat prompts instead of the
    model's template; a template that does not parse, or a path that names no file, is an
    error at start."""
    path = str(tiny_model_dir("llama"))
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}w5"
    file = tmp_path / "chat.jinja"
    file.write_text(template)
    # (a real template is longer than a file name may be)
    long = "{# " + "a comment of a long template " * 40 + "#}" + template
    for value in (template, str(file), long):
        llm = LLM(path, dtype="float32", num_kv_blocks=16, chat_template=value)
        assert llm.tokenizer.chat_template.endswith(template)
        assert llm.encode("w3 w4", chat=True) == llm.tokenizer("w3 w4 w5").input_ids
    with pytest.raises(ValueError, match="does not parse"):
        LLM(path, dtype="float32", num_kv_blocks=16, chat_template="{% for m in messages %}")
    for value in (str(tmp_path / "none.jinja"), str(tmp_path), "x" * 300):
        with pytest.raises(ValueError, match="neither a readable file"):
            LLM(path, dtype="float32", num_kv_blocks=16, chat_template=value)


def test_logprob_token_ids_give_those_tokens_logprobs(tiny_llm: LLM) -> None:
    """`logprob_token_ids`: each output position's logprobs of those tokens (a judge's
    yes/no), after the top alternatives; the model's, as the full top list gives them."""
    prompt = mixed_prompts(3)[2]
    full = tiny_llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0,
                                                      ignore_eos=True, logprobs=20))[0]
    asked = tiny_llm.generate([prompt], SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=1,
        logprob_token_ids=(full.logprobs[0].top[5][0], 100, full.logprobs[0].top[0][0])))[0]
    assert asked.token_ids == full.token_ids
    for a, f in zip(asked.logprobs, full.logprobs, strict=True):
        everything = dict(f.top)
        assert a.top[0] == f.top[0]  # (the top one, then the asked ones not among the top)
        assert [t for t, _ in a.top[1:]] == [t for t in
                                             (full.logprobs[0].top[5][0], 100,
                                              full.logprobs[0].top[0][0]) if t != a.top[0][0]]
        for t, lp in a.top[1:]:
            if t in everything:
                assert lp == pytest.approx(everything[t], abs=1e-5)
            else:
                assert lp <= min(everything.values()) + 1e-6
    with pytest.raises(ValueError, match="logprob_token_ids"):
        SamplingParams(logprob_token_ids=(3,))
    with pytest.raises(ValueError, match="token ids"):
        tiny_llm.engine.add_request("lt", prompt, SamplingParams(logprobs=0,
                                                                 logprob_token_ids=(128,)))


def test_priority_scheduling_serves_lower_values_first(tiny_model_dir) -> None:
    """One request runs at a time: with --scheduling-policy priority the waiting requests
    are served by (priority, arrival), and each gets the tokens it gets alone; with fcfs a
    priority other than 0 is refused, naming the field."""
    from server.engine.engine import LLMEngine
    from server.engine.sampling_params import SamplingParamsError

    def engine(policy: str) -> LLMEngine:
        return LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64,
                   block_size=4, max_num_seqs=1, scheduling_policy=policy).engine

    e = engine("priority")
    prompts = mixed_prompts(4)
    for i, priority in enumerate((0, 2, 1, -1)):
        e.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=3, temperature=0.0,
                                                          ignore_eos=True, priority=priority))
    finished, tokens = [], {}
    while e.has_unfinished():
        for out in e.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished.append(out.request_id)
    assert finished == ["r3", "r0", "r2", "r1"]  # (all queued before the first step)
    alone = [c.token_ids for c in LLM(
        str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64, block_size=4
    ).generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))]
    assert [tokens[f"r{i}"] for i in range(4)] == alone
    with pytest.raises(SamplingParamsError) as refused:
        engine("fcfs").add_request("x", prompts[0], SamplingParams(priority=1))
    assert refused.value.param == "priority"


def test_stop_reason_names_the_stop_string_or_token(tiny_model_dir) -> None:
    """vLLM's stop_reason: the stop string that ended a reply, or the stop token id (from
    stop_token_ids); None for a length limit or the model's end of sequence."""
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64, block_size=4)
    prompt = [5, 9, 13, 2, 8]
    plain = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                  ignore_eos=True))[0]
    assert plain.finish_reason == "length" and plain.stop_reason is None
    token = plain.token_ids[3]
    by_token = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                     ignore_eos=True,
                                                     stop_token_ids=[token]))[0]
    assert by_token.stop_reason == token and by_token.finish_reason == "stop"
    stop = plain.text[len(plain.text) // 2:][:3]
    by_string = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                      ignore_eos=True, stop=[stop]))[0]
    assert by_string.stop_reason == stop and by_string.finish_reason == "stop"
    assert by_string.text == plain.text[:plain.text.index(stop)]
