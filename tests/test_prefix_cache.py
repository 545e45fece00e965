"""Prefix caching: computed token blocks kept under a hash of every token up to their end,
taken by later requests that begin the same way; outputs as without it."""

from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager, BlockPool
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

BS = 4
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SYSTEM = [3 + (11 * j) % 120 for j in range(37)]  # a shared beginning of 9 full blocks + 1


def test_pool_caches_computed_blocks_and_hands_them_out() -> None:
    pool = BlockPool(8, BS, cache_prefixes=True)
    tokens = list(range(10, 24))  # 14 tokens: 3 full blocks
    pool.allocate("a", 14)
    pool.commit("a", 9, lambda: tokens)  # 2 blocks full of computed tokens
    assert pool.reuse_prefix("b", tokens) == 8  # the third is not computed yet
    assert pool.block_table("b") == pool.block_table("a")[:2]
    pool.commit("a", 14, lambda: tokens)
    pool.check_integrity()
    pool.free("a")
    pool.free("b")
    assert pool.num_free_blocks == 8
    # all 3 cached; a request of exactly those 12 tokens leaves its last to compute
    assert pool.reuse_prefix("c", tokens[:12]) == 8
    assert pool.reuse_prefix("d", tokens[:13]) == 12
    assert pool.reuse_prefix("e", [99] + tokens[1:]) == 0  # the chain differs from token 0
    assert pool.reuse_prefix("d", tokens) == 0  # (already holds blocks)
    pool.check_integrity()
    pool.free("c")
    pool.free("d")
    pool.allocate("f", 32)  # every block handed out again: nothing stays cached
    assert pool.reuse_prefix("g", tokens) == 0
    pool.check_integrity()


def test_freed_blocks_are_evicted_oldest_first_and_last_of_a_table_first() -> None:
    pool = BlockPool(4, BS, cache_prefixes=True)
    tokens = list(range(100, 116))
    pool.allocate("a", 12)
    pool.commit("a", 12, lambda: tokens)
    pool.free("a")  # 3 cached blocks: the free list holds the unused block, then a's from its end
    pool.allocate("x", 8)  # the unused block and a's last
    assert pool.reuse_prefix("b", tokens) == 8  # blocks 0 and 1 of a remain
    pool.check_integrity()


def test_prefix_caching_needs_full_attention() -> None:
    from server.engine.block_manager import SinkWindow

    with pytest.raises(ValueError, match="full attention"):
        BlockPool(8, BS, SinkWindow(8), cache_prefixes=True)
    with pytest.raises(ValueError, match="sink \\+ window"):
        BlockManager(8, BS, BlockPool(8, BS, SinkWindow(8)), cache_prefixes=True)


def _llms(tiny_model_dir, **config: object) -> tuple[LLM, LLM]:
    path = str(tiny_model_dir("llama"))
    common = {"dtype": "float32", "num_kv_blocks": 64, "block_size": BS,
              "max_num_batched_tokens": 32, "debug_check_integrity": True, **config}
    return (LLM(path, **common, enable_prefix_caching=False),
            LLM(path, **common, enable_prefix_caching=True))


def _prompts() -> list[list[int]]:
    return [SYSTEM + [5 + i, 6 + i, 7 + i] * (i + 1) for i in range(5)]


def test_outputs_match_and_the_shared_beginning_is_computed_once(tiny_model_dir) -> None:
    """Requests sharing a 37-token beginning, one after another and then together, and a
    second turn that repeats a first turn and its answer: the tokens of the engine
    without caching, with the cached tokens not computed again."""
    plain, cached = _llms(tiny_model_dir)
    want = [c.token_ids for c in plain.generate(_prompts(), GREEDY)]
    computed = []
    schedule = cached.engine.scheduler.schedule

    def counting():
        out = schedule()
        computed.append(out.num_batched_tokens)
        return out

    cached.engine.scheduler.schedule = counting
    first = cached.generate(_prompts()[:1], GREEDY)[0].token_ids
    alone = first_steps = sum(computed)
    assert first == want[0] and alone == len(_prompts()[0]) + GREEDY.max_tokens - 1
    got = [cached.generate([p], GREEDY)[0].token_ids for p in _prompts()[1:]]
    assert got == want[1:]
    # each later request computed its own tokens and the block the shared one ends in
    saved = sum(len(p) + GREEDY.max_tokens - 1 for p in _prompts()[1:]) - (sum(computed) - first_steps)
    assert saved == 4 * (len(SYSTEM) // BS * BS)
    assert [c.token_ids for c in cached.generate(_prompts(), GREEDY)] == want
    turn = _prompts()[0] + want[0] + [9, 9, 9]
    assert cached.generate([turn], GREEDY)[0].token_ids == plain.generate([turn], GREEDY)[0].token_ids
    m = cached.engine.metrics
    assert m.prefix_cache_hits._value.get() > 0
    assert m.prefix_cache_queries._value.get() > m.prefix_cache_hits._value.get()
    assert cached.engine.blocks.num_free_blocks == 64


@pytest.mark.parametrize("config", [
    {"speculative": "ngram", "num_speculative_tokens": 3},  # drafts rolled back past blocks
    {"num_kv_blocks": 24},  # preempted and recomputed requests take their own blocks back
])
def test_outputs_match_under_speculation_and_preemption(tiny_model_dir, config) -> None:
    plain, cached = _llms(tiny_model_dir, **config)
    want = [c.token_ids for c in plain.generate(_prompts(), GREEDY)]
    for _ in range(2):  # cold, then with every prompt cached
        assert [c.token_ids for c in cached.generate(_prompts(), GREEDY)] == want
    if "num_kv_blocks" in config:
        assert cached.engine.scheduler.num_preemptions > 0
    assert cached.engine.metrics.prefix_cache_hits._value.get() > 0


def test_on_by_default_where_it_applies(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, prefix caching serves full attention and stays off beside sink + window
    layers; asked for there, it is an error; the serve flag and its variable set it."""
    import argparse

    from server.api.cli_args import add_arguments, configs_from_args

    path = str(tiny_model_dir("llama"))
    common = dict(dtype="float32", num_kv_blocks=64, block_size=BS)
    assert LLM(path, **common).engine.blocks.pools[0].cache_prefixes
    assert not LLM(path, **common, sliding_window=8).engine.blocks.pools[0].cache_prefixes
    with pytest.raises(ValueError, match="prefix caching"):
        LLM(path, **common, enable_prefix_caching=True, sliding_window=8)

    def parsed(*flags: str) -> bool | None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return configs_from_args(parser.parse_args(list(flags)))[0].enable_prefix_caching

    assert parsed() is None and parsed("--no-enable-prefix-caching") is False
    monkeypatch.setenv("LEAPFROG_ENABLE_PREFIX_CACHING", "false")
    assert parsed() is False and parsed("--enable-prefix-caching") is True


def test_prefix_bench(tiny_model_dir, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`leapfrog bench prefix` on a tiny model (its prompts stand in for the chat ones):
    both runs timed per request, the outputs compared, the JSON written."""
    import argparse
    import json

    from server.benchmarks import prefix

    monkeypatch.setattr(prefix, "_prompts", lambda llm, args: _prompts()[: args.requests])
    parser = argparse.ArgumentParser()
    prefix.add_arguments(parser)
    out = tmp_path / "prefix.json"
    args = parser.parse_args([str(tiny_model_dir("llama")), "--requests", "3", "--tokens", "5",
                              "--result-json", str(out)])
    assert prefix.run(args) == 0
    results = json.loads(out.read_text())["results"]
    for mode in ("off", "on"):
        assert results[mode]["same_output"] is True
        assert len(results[mode]["ttft_s"]) == len(results[mode]["total_s"]) == 3
        assert all(0 < a <= b for a, b in zip(results[mode]["ttft_s"], results[mode]["total_s"], strict=True))
