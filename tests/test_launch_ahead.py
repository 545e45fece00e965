"""Decode steps launched ahead of the step they follow (`LLMEngine.launch_ahead`), on CPU:
the graph runner's steps run eagerly (its inputs and row layout without a capture), and
each ahead step's input tokens come from the step before as a tensor, as on CUDA. The
engine gives the same tokens, texts and finish reasons as without, and every block
returns to the pool."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch

from server.engine.cuda_graphs import CudaGraphRunner
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

BS = 4


def _launching_ahead(llm: LLM, max_query_len: int = 1) -> list[bool]:
    """Route llm's decode (and verification: `max_query_len`) steps through a
    CudaGraphRunner stepped eagerly, with the drafter's device loop if it has one, and turn
    launch_ahead on; returns a list that records, launch by launch, whether the step was
    launched ahead of the one before."""
    engine = llm.engine
    runner = engine.runner
    pools = runner.blocks.pools
    draft = engine.drafter.device_drafts() if engine.drafter is not None else None
    graphs = CudaGraphRunner(runner.model, BS, pools[0].hole, engine.max_model_len,
                             max_batch=8, max_query_len=max_query_len, window=pools[0].window,
                             sparse=(pools[1].hole, pools[1].window) if len(pools) > 1 else None,
                             draft=draft)
    eager_step = graphs.step

    def step(b, q, starts, ids, tables, graphed=True, ahead_ids=None, sparse_tables=None,
             advance=False):
        return eager_step(b, q, starts, ids, tables, graphed=False, ahead_ids=ahead_ids,
                          sparse_tables=sparse_tables, advance=advance)

    graphs.step = step
    runner.graphs = graphs
    engine.launch_ahead = engine.verify_ahead = True
    launched: list[bool] = []
    launch = runner.launch

    def recording(out, after=None):
        launched.append(after is not None)
        return launch(out, after)

    runner.launch = recording
    return launched


def _pair(tiny_model_dir, **config: object) -> tuple[LLM, LLM, list[bool]]:
    path = str(tiny_model_dir("llama"))
    common = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS,
                  debug_check_integrity=True, **config)
    plain, ahead = LLM(path, **common), LLM(path, **common)
    return plain, ahead, _launching_ahead(ahead)


PROMPTS = [[5, 6, 7, 8] * 3, [9, 10] * 5, [3, 4, 5, 3, 4, 5, 3], [11, 12, 13], [40]]


def _same(got, want) -> None:
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]


@pytest.mark.parametrize("sampled", [False, True])
def test_launching_ahead_changes_no_output(tiny_model_dir, monkeypatch, sampled):
    """Greedy, and seeded sampling drawn as on the device (`sample_rows`, whose draw
    depends on each request's seed and output position): requests of 1 to 19 tokens,
    ended by max_tokens, by stop tokens and by stop strings taken from the outputs, so
    that some end while a step launched ahead of theirs runs."""
    from server.engine import runner as runner_module

    monkeypatch.setattr(runner_module, "device_sampling", lambda logits: True)
    plain, ahead, launched = _pair(tiny_model_dir)
    base = dict(temperature=0.8, top_p=0.9, seed=3) if sampled else dict(temperature=0.0)
    free = [SamplingParams(max_tokens=m, ignore_eos=True, **base) for m in (19, 1, 7, 12, 2)]
    first = plain.generate(PROMPTS, free)
    assert [len(c.token_ids) for c in first] == [19, 1, 7, 12, 2]
    stopping = [SamplingParams(max_tokens=19, stop_token_ids=[first[0].token_ids[5]], **base),
                SamplingParams(max_tokens=19, stop=[first[3].text[-3:]], **base),
                *free[2:]]
    stopping[3] = SamplingParams(max_tokens=12, stop=[first[3].text[-3:]], **base)
    for params in (free, stopping):
        _same(ahead.generate(PROMPTS, params), plain.generate(PROMPTS, params))
    assert sum(launched) > 10  # most decode steps went ahead
    for llm in (plain, ahead):
        assert not llm.engine.has_unfinished()
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_requests_arriving_and_aborted_while_steps_run_ahead(tiny_model_dir):
    """A request added while decode steps go ahead is admitted (the next step is then
    scheduled as usual), one aborted mid-way returns its blocks, and the others' tokens
    are those of the engine without steps ahead."""
    plain, ahead, launched = _pair(tiny_model_dir)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = {c.prompt_token_ids[0]: c.token_ids for c in plain.generate(PROMPTS, params)}
    engine = ahead.engine
    got: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", prompt, params)
    steps = 0
    while engine.has_unfinished():
        steps += 1
        if steps == 6:
            engine.add_request("late", PROMPTS[3], params)
            engine.abort_request("r1")
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert got["r0"] == want[5] and got["r2"] == want[3] and got["late"] == want[11]
    assert len(got["r1"]) < 16
    assert any(launched)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("full_attention_layers", [(1,), ()])
def test_launching_ahead_through_a_hybrid_cache(tiny_model_dir, full_attention_layers):
    """Steps launched ahead while the window layers' blocks slide out of their window (and
    go to other requests): the tokens of the hybrid engine without steps ahead, with a
    full-attention layer and without."""
    plain, ahead, launched = _pair(tiny_model_dir, sliding_window=5, num_sink_tokens=2,
                                   full_attention_layers=full_attention_layers, max_num_seqs=5)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    _same(ahead.generate(PROMPTS, params), plain.generate(PROMPTS, params))
    assert sum(launched) > 10
    assert ahead.engine.blocks.usage == 0.0


@pytest.mark.parametrize("drafter", ["ngram", "head", "early-exit"])
def test_launching_ahead_with_speculation(tiny_model_dir, tmp_path, drafter):
    """With speculation, a step after which no request drafts has the next one launched
    ahead, and the policy sizes the drafts after that one (here: drafts after every third
    step scheduled): the greedy tokens of the engine without speculation, some steps
    launched ahead and some drafted, draft heads fed the right hidden states, and the
    self-speculation drafts' KV in slots reserved after the step ahead's token."""
    path = str(tiny_model_dir("llama"))
    common = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS,
                  debug_check_integrity=True)
    plain = LLM(path, **common)
    spec = {"speculative": drafter, "num_speculative_tokens": 3}
    if drafter != "ngram":
        spec["speculative_model"] = _head_file(plain, str(tmp_path / "drafter.safetensors"),
                                               1 if drafter == "early-exit" else None)
    ahead = LLM(path, **common, **spec)
    launched = _launching_ahead(ahead)
    scheduler, steps, drafting_ahead = ahead.engine.scheduler, [0], []

    def counting(schedule: Callable[..., object]) -> Callable[..., object]:
        def counted(*args: object) -> object:
            steps[0] += 1
            out = schedule(*args)
            if args and out is not None:  # a step ahead: do requests draft after it?
                drafting_ahead.append(any(s.num_draft_tokens_next for s in out.scheduled))
            return out
        return counted

    scheduler.schedule = counting(scheduler.schedule)
    scheduler.schedule_ahead = counting(scheduler.schedule_ahead)
    scheduler.spec_policy.draft_length = lambda rid, step_tokens, producing, limit: (
        min(limit, 3) if steps[0] % 3 == 0 else 0)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = ahead.generate(PROMPTS, params)
    _same(got, plain.generate(PROMPTS, params))
    assert sum(launched) > 5 and any(drafting_ahead)
    assert sum(c.num_draft_tokens for c in got) > 10
    assert ahead.engine.blocks.usage == 0.0


def _head_file(llm: LLM, path: str, exit_layer: int | None = None,
               vocab: list[int] | None = None) -> str:
    """A draft head (or adapter) with random weights for llm's model, sure of every draft
    (threshold 0: all are proposed), over `vocab` (default tokens 3-66), saved at `path`."""
    from drafters.head import DraftHead, config_for, target_head_rows

    torch.manual_seed(0)
    vocab = torch.tensor(vocab) if vocab is not None else torch.arange(3, 67)
    model = llm.engine.model
    config = config_for(model, threshold=0.0, exit_layer=exit_layer)
    DraftHead(config, vocab, target_head_rows(model, vocab)).save(path)
    return path


@pytest.mark.parametrize("hybrid", [False, True])
def test_verification_steps_launched_ahead(tiny_model_dir, tmp_path, hybrid):
    """With a draft head, verification graphs draft every request's next step on the
    device, and while the policy asks for as many drafts again the next verification step
    is launched ahead, its tokens, positions and KV slots (a hybrid cache's both pools')
    taken on the device: the greedy tokens, texts and finish reasons of the engine without
    speculation, with requests ended by max_tokens, stop tokens and stop strings while a
    step ahead of theirs runs; the drafts the host records are the ones the device
    verified; every block returns to the pool."""
    path = str(tiny_model_dir("llama"))
    common = dict(device="cpu", dtype="float32", num_kv_blocks=96, block_size=BS,
                  debug_check_integrity=True, max_num_seqs=5)
    if hybrid:
        common.update(sliding_window=5, num_sink_tokens=2, full_attention_layers=(1,))
    plain = LLM(path, **common)
    free = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
            for m in (30, 1, 9, 17, 4)]
    first = plain.generate(PROMPTS, free)
    # drafts from the target's commonest tokens: some are accepted
    common_tokens = Counter(t for c in first for t in c.token_ids).most_common(3)
    head = _head_file(plain, str(tmp_path / "head.safetensors"),
                      vocab=[t for t, _ in common_tokens])
    spec = LLM(path, **common, speculative="head", num_speculative_tokens=4,
               speculative_model=head)
    launched = _launching_ahead(spec, max_query_len=5)
    engine = spec.engine
    engine.scheduler.spec_policy.draft_length = lambda rid, step_tokens, producing, limit: (
        min(limit, 2))
    # the drafts of each verification step launched ahead: as the device took them, and as
    # the host has them when it takes in the step's results
    on_device: list[list[int]] = []
    on_host: list[list[int]] = []
    graphs = engine.runner.graphs
    take, update = graphs._take_next, engine.scheduler.update
    taken = [0]

    def taking(b, q, n):
        on_device.extend(graphs.next.ids[: n * q].view(n, q)[:, 1:].tolist())
        taken[0] += 1
        take(b, q, n)

    def recording(output, result, ahead=None):
        on_host.extend(s.spec_token_ids for s in output.scheduled if s.ahead > 1)
        return update(output, result, ahead)

    graphs._take_next, engine.scheduler.update = taking, recording
    stopping = [SamplingParams(max_tokens=30, temperature=0.0,
                               stop_token_ids=[first[0].token_ids[11]]),
                SamplingParams(max_tokens=30, temperature=0.0, stop=[first[3].text[-3:]]),
                *free[2:]]
    for params in (free, stopping):
        got = spec.generate(PROMPTS, params)
        _same(got, plain.generate(PROMPTS, params))
    assert sum(launched) > 5
    assert len(on_device) > 5 and on_host == on_device
    counted = {kind: engine.metrics.registry.get_sample_value(
        "leapfrog:steps_launched_ahead_total", {"model_name": engine.model_name, "kind": kind})
        for kind in ("decode", "verification")}
    assert counted == {"decode": sum(launched) - taken[0], "verification": taken[0]}
    assert sum(c.num_accepted_tokens for c in got) > 0
    assert not engine.has_unfinished()
    assert engine.blocks.usage == 0.0


def test_verify_ahead_off_launches_no_verification_ahead(tiny_model_dir, tmp_path):
    """`verify_ahead` off: verification steps wait for the step before (decode steps
    still go ahead), with the same tokens."""
    path = str(tiny_model_dir("llama"))
    common = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS)
    plain = LLM(path, **common)
    spec = LLM(path, **common, speculative="head", num_speculative_tokens=2,
               speculative_model=_head_file(plain, str(tmp_path / "head.safetensors")))
    launched = _launching_ahead(spec, max_query_len=3)
    spec.engine.verify_ahead = False
    spec.engine.scheduler.spec_policy.draft_length = lambda *args: min(args[-1], 2)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    _same(spec.generate(PROMPTS, params), plain.generate(PROMPTS, params))
    assert not any(launched)
