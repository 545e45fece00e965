"""The hybrid KV cache: sink + sliding-window layers whose blocks outside the window leave
the cache, beside full-attention layers; the engine's tokens against a teacher-forced
forward with the same attention, speculation, memory and flags."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.engine.block_manager import BlockManager, BlockPool, OutOfBlocksError, SinkWindow
from server.engine.config import EngineConfig, default_full_attention_layers
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.models.config import ModelConfig
from tests.test_scheduler import fake_run, req

BS = 4
WINDOW = SinkWindow(window=8, num_sinks=2)
HYBRID = dict(dtype="float32", block_size=BS, sliding_window=WINDOW.window,
              num_sink_tokens=WINDOW.num_sinks, full_attention_layers=(1,), num_kv_blocks=200,
              max_num_batched_tokens=16, max_num_seqs=4, debug_check_integrity=True)
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + 5 * j) % 125 for j in range(20 + 9 * i)] for i in range(n)]


def test_slide_leaves_holes_outside_the_window_and_frees_them() -> None:
    pool = BlockPool(16, BS, WINDOW)
    pool.allocate("a", 30)  # 8 blocks
    table = list(pool.block_table("a"))
    pool.slide("a", 20)  # queries from position 20 see 13..20 and the sinks 0, 1
    # block 0 holds the sinks, block 3 (12..15) position 13: blocks 1 and 2 go
    assert pool.block_table("a") == [table[0], pool.hole, pool.hole, *table[3:]]
    assert pool.num_free_blocks == 16 - 8 + 2
    pool.check_integrity()
    pool.slide("a", 20)  # again: nothing more
    assert pool.num_free_blocks == 10
    pool.truncate("a", 21)  # a rollback keeps the holes
    assert pool.block_table("a")[:3] == [table[0], pool.hole, pool.hole]
    assert len(pool.block_table("a")) == 6
    pool.slide("a", 29)  # 22..29 visible: blocks 3 and 4 go too
    assert pool.block_table("a")[1:5] == [pool.hole] * 4
    pool.check_integrity()
    pool.free("a")
    assert pool.num_free_blocks == 16
    pool.check_integrity()
    full = BlockPool(16, BS)  # no window: sliding changes nothing
    full.allocate("a", 30)
    full.slide("a", 30)
    assert pool.hole not in full.block_table("a")


def test_manager_allocates_all_pools_or_none() -> None:
    bm = BlockManager(4, BS, BlockPool(3, BS, WINDOW))
    bm.allocate("a", 12)  # 3 blocks in each
    assert [len(t) for t in bm.block_tables("a")] == [3, 3]
    with pytest.raises(OutOfBlocksError):
        bm.allocate("b", 8)  # the full pool has 1 left, the window pool 0
    assert bm.block_tables("b") == [[], []] and bm.num_free_blocks == 1
    assert bm.usage == 1.0  # the fuller pool
    assert not bm.can_allocate_all([("c", 1)])  # the window pool has none
    assert bm.can_allocate_all([("a", 12)])
    bm.slide("a", 11)  # 4..11 visible: block 0 holds the sinks, nothing to drop yet
    bm.slide("a", 13)  # 6..13: block 1 still visible
    assert bm.pools[1].num_free_blocks == 0
    bm.free("a")
    assert bm.usage == 0.0
    bm.check_integrity()


def test_scheduler_keeps_window_pool_bounded_through_long_decodes() -> None:
    """Requests far longer than the window, with drafts rolled back, never hold more
    window blocks than `SinkWindow.most_blocks` says, all of them together no more than
    `pool_blocks` (no request is preempted), and give them all back."""
    budget, seqs = 16, 3
    per_request = WINDOW.most_blocks(budget, BS)
    blocks = BlockManager(200, BS, BlockPool(WINDOW.pool_blocks(seqs, budget, BS), BS, WINDOW))
    s = Scheduler(SchedulerConfig(seqs, budget, 256), blocks)
    for i in range(5):
        s.add_request(req(f"r{i}", 30 + 7 * i, max_tokens=60))
    steps = 0
    while s.has_work():
        out = s.schedule()
        for item in out.scheduled:  # a draft of 3 on every decode, all rejected
            if item.reaches_end and not item.spec_token_ids:
                item.request.spec_token_ids = [5, 6, 7]
        s.update(out, fake_run(out))
        blocks.check_integrity()
        for r in s.running:
            held = [b for b in blocks.pools[1].block_table(r.request_id) if b != blocks.pools[1].hole]
            assert len(held) <= per_request
        steps += 1
    assert steps > 60 and s.num_preemptions == 0
    assert blocks.pools[1].num_free_blocks == blocks.pools[1].num_blocks
    assert blocks.num_free_blocks == 200


def _teacher_forced(llm: LLM, ids: list[int]) -> list[int]:
    """Greedy next tokens of every position of `ids` from one forward through the engine's
    model with fresh contiguous caches and `kernels.attention`'s reference attention (the
    window from `visible_mask`, no block freed)."""
    from server.benchmarks.hybrid import teacher_forced_hidden

    with torch.inference_mode():
        return llm.engine.model.compute_logits(teacher_forced_hidden(llm, ids)).argmax(-1).tolist()


@pytest.fixture(scope="module")
def hybrid_llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), **HYBRID)


def test_engine_matches_a_teacher_forced_forward(tiny_model_dir, hybrid_llm: LLM) -> None:
    """Five requests of 60-116 tokens through a window of 8 (blocks freed and handed to
    other requests all along, prefill chunked, the batch over max_num_seqs) give the
    greedy tokens of one forward over the whole text; the window changes them."""
    # (the reference forward attends as the runner set the layers: check that setting)
    assert hybrid_llm.engine.runner.windows == [None, WINDOW]
    assert [layer.windowed for layer in hybrid_llm.engine.model.layers] == [True, False, True]
    got = hybrid_llm.generate(prompts(5), GREEDY)
    for prompt, c in zip(prompts(5), got, strict=True):
        text = prompt + c.token_ids
        assert _teacher_forced(hybrid_llm, text[:-1])[len(prompt) - 1:] == c.token_ids
    full = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=BS, num_kv_blocks=200)
    assert [c.token_ids for c in full.generate(prompts(5), GREEDY)] != [c.token_ids for c in got]
    blocks = hybrid_llm.engine.blocks
    assert blocks.usage == 0.0
    assert blocks.pools[1].num_blocks == WINDOW.pool_blocks(4, 16, BS)


def test_speculation_keeps_the_hybrid_output(tiny_model_dir, hybrid_llm: LLM) -> None:
    """n-gram drafts verified through the window layers (rolled back when rejected) leave
    the tokens as they are without speculation."""
    texts = [[5, 6, 7, 8] * 3, [9, 10] * 5, [3, 4, 5, 3, 4, 5, 3], [11, 12, 13], prompts(1)[0]]
    want = hybrid_llm.generate(texts, GREEDY)
    spec = LLM(str(tiny_model_dir("llama")), **HYBRID, speculative="ngram", num_speculative_tokens=4)
    got = spec.generate(texts, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert sum(c.num_accepted_tokens for c in got) > 0
    assert spec.engine.blocks.usage == 0.0


def test_every_layer_windowed(tiny_model_dir) -> None:
    """No full-attention layer: one window pool, which bounds no context, of the blocks
    max_num_seqs requests hold at most, or fewer where the KV budget (here num_kv_blocks)
    allows fewer: then requests wait or are preempted for blocks, with the same tokens."""
    llm = LLM(str(tiny_model_dir("llama")), **{**HYBRID, "full_attention_layers": ()})
    assert len(llm.engine.blocks.pools) == 1 and llm.engine.blocks.num_blocks == WINDOW.pool_blocks(4, 16, BS)
    want = llm.generate(prompts(4), GREEDY)
    assert all(len(c.token_ids) == GREEDY.max_tokens for c in want)
    assert llm.engine.blocks.usage == 0.0
    small = LLM(str(tiny_model_dir("llama")),
                **{**HYBRID, "full_attention_layers": (), "num_kv_blocks": 8})
    assert small.engine.blocks.num_blocks == 8 < WINDOW.pool_blocks(4, 16, BS)
    assert [c.token_ids for c in small.generate(prompts(4), GREEDY)] == [
        c.token_ids for c in want]
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.blocks.usage == 0.0


def test_memory_goes_to_the_full_attention_layers(tiny_model_dir) -> None:
    """For the same memory, a hybrid cache holds more tokens of context: the window pool
    takes max_num_seqs windows, the full-attention layers (1 of 3) all the rest. Where
    max_num_seqs windows would leave the full layers less than one whole context, the
    window pool takes the window layers' share of the memory instead (fewer requests at
    once); a memory below one request's window is refused."""
    common = dict(dtype="float32", block_size=BS, kv_cache_memory_gb=2**-10, max_num_seqs=4)
    path = str(tiny_model_dir("llama"))
    full = LLM(path, **common).engine.blocks
    hybrid = LLM(path, **common, sliding_window=8, full_attention_layers=(1,)).engine.blocks
    per_layer = 2 * BS * 2 * 16 * 4  # bytes of a block of one layer: K and V, 2 heads of 16
    assert full.num_blocks == 2**20 // (3 * per_layer)
    # the window pool's blocks for its 2 layers first, the rest for the 1 full layer
    assert hybrid.num_blocks == (2**20 - hybrid.pools[1].num_blocks * 2 * per_layer) // per_layer
    assert hybrid.num_blocks > 2 * full.num_blocks
    many = LLM(path, **{**common, "max_num_seqs": 4096}, sliding_window=8,
               full_attention_layers=(1,))
    window = many.engine.blocks.pools[1].window
    assert many.engine.blocks.pools[1].num_blocks < window.pool_blocks(4096, 512, BS) // 10
    assert many.engine.blocks.num_blocks >= many.engine.max_model_len // BS + 1
    (c,) = many.generate([prompts(1)[0]], GREEDY)
    assert len(c.token_ids) == GREEDY.max_tokens
    with pytest.raises(ValueError, match="leaves no room"):
        LLM(path, **{**common, "kv_cache_memory_gb": 2**-14}, sliding_window=8,
            full_attention_layers=(1,))


def test_config_errors_and_default_layers() -> None:
    model = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
    assert default_full_attention_layers(30) == (2, 5, 8, 11, 14, 17, 20, 23, 26, 29)
    assert default_full_attention_layers(4) == (0, 3)
    assert EngineConfig().attention_layout(model) == (frozenset(), None)
    assert EngineConfig(sliding_window=64).attention_layout(model) == ({0, 1}, SinkWindow(64, 4))
    every = EngineConfig(sliding_window=64, full_attention_layers=(0, 1, 2))
    assert every.attention_layout(model) == (frozenset(), None)  # nothing windowed
    with pytest.raises(ValueError, match="out of range"):
        EngineConfig(sliding_window=64, full_attention_layers=(3,)).attention_layout(model)
    with pytest.raises(ValueError, match="needs sliding_window"):
        EngineConfig(full_attention_layers=(0,)).attention_layout(model)
    with pytest.raises(ValueError, match="window >= 1"):
        EngineConfig(sliding_window=0).attention_layout(model)
    # the model's own window, where the served context fits in it: none (unless the window
    # layers have a RoPE of their own, which their window picks)
    own = dataclasses.replace(model, sliding_window=4096, window_layers=(0, 1, 2))
    assert EngineConfig().attention_layout(own, 4097) == ({0, 1, 2}, SinkWindow(4096))
    assert EngineConfig().attention_layout(own, 4096) == (frozenset(), None)
    hybrid = EngineConfig(sliding_window=64)
    assert hybrid.attention_layout(own, 4096) == ({0, 1}, SinkWindow(64, 4))
    with pytest.raises(ValueError, match="its own sliding window of 4096"):
        hybrid.attention_layout(own, 4097)
    local = dataclasses.replace(own, local_rope_theta=10000.0)
    assert EngineConfig().attention_layout(local, 4096) == ({0, 1, 2}, SinkWindow(4096))


def test_serve_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from server.api.cli_args import add_arguments, configs_from_args

    monkeypatch.setenv("LEAPFROG_FULL_ATTENTION_LAYERS", "")  # (read by add_arguments)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    engine, _ = configs_from_args(parser.parse_args(["--sliding-window", "512"]))
    assert engine.sliding_window == 512 and engine.full_attention_layers == ()
    engine, _ = configs_from_args(parser.parse_args(
        ["--sliding-window", "256", "--num-sink-tokens", "8", "--full-attention-layers", "0, 4"]))
    assert (engine.num_sink_tokens, engine.full_attention_layers) == (8, (0, 4))
    with pytest.raises(SystemExit):
        parser.parse_args(["--full-attention-layers", "first"])


def test_hybrid_bench(tiny_model_dir, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`leapfrog bench hybrid` on a tiny model: configurations parsed, a window as long as
    the text scores it as full attention does, a short one does not, and the memory and
    speed figures are written."""
    import argparse
    import json

    from server.benchmarks import hybrid

    monkeypatch.setattr(hybrid, "pydoc_text", lambda: " ".join(f"w{3 + i * 7 % 120}" for i in range(80)))
    parser = argparse.ArgumentParser()
    hybrid.add_arguments(parser)
    out = tmp_path / "hybrid.json"
    args = parser.parse_args([str(tiny_model_dir("llama")), "--configs", "128/2/default;8/2/;8/0/1",
                              "--text-tokens", "64", "--decode-context", "24", "--decode-tokens",
                              "4", "--repeats", "1", "--max-num-seqs", "2", "--kv-cache-memory-gb",
                              "0.001", "--result-json", str(out)])
    assert hybrid.run(args) == 0
    full, long, short, no_sinks = json.loads(out.read_text())["results"]
    assert [r["config"] for r in (long, short, no_sinks)] == ["w128 s2 default", "w8 s2 none", "w8 s0 1"]
    assert long["settings"] == {"sliding_window": 128, "num_sink_tokens": 2}
    assert (long["full_attention_layers"], short["full_attention_layers"], no_sinks["full_attention_layers"]) == (1, 0, 1)
    assert long["nll"] == pytest.approx(full["nll"], rel=1e-5)
    assert short["nll"] != pytest.approx(full["nll"], rel=1e-3)
    assert short["context_tokens"] is None and long["context_tokens"] > full["context_tokens"]
    assert long["kv_bytes_per_token"] * 3 == full["kv_bytes_per_token"]
    assert all(r["decode_tok_s"] > 0 for r in (full, long, short, no_sinks))


def test_same_memory_runs_more_long_requests_at_once(tiny_model_dir) -> None:
    """In a cache where full attention fits 3 of 6 requests of 64 tokens at once (60 blocks
    of 3 layers), so that requests are preempted and recomputed, the hybrid cache (one
    full-attention layer; the window pool's 34 blocks of 2 layers first) runs all 6
    together, none preempted."""
    memory = 60 * 3 * 1024 / 2**30  # 1,024 bytes: a block of one layer (2 x 4 x 2 x 16 x 4)
    common = dict(dtype="float32", block_size=BS, max_num_seqs=6, max_num_batched_tokens=16,
                  kv_cache_memory_gb=memory)
    path = str(tiny_model_dir("llama"))
    most, preempted = {}, {}
    for name, extra in (("full", {}), ("hybrid", dict(sliding_window=WINDOW.window,
                                                     num_sink_tokens=WINDOW.num_sinks,
                                                     full_attention_layers=(1,)))):
        engine = LLM(path, **common, **extra).engine
        for i, prompt in enumerate(prompts(6)):
            engine.add_request(str(i), prompt[:40], SamplingParams(max_tokens=24, ignore_eos=True))
        most[name] = 0
        while engine.has_unfinished():
            engine.step()
            most[name] = max(most[name], len(engine.scheduler.running))
        preempted[name] = engine.scheduler.num_preemptions
        assert engine.blocks.usage == 0.0
    assert most["hybrid"] == 6 and preempted["hybrid"] == 0 and preempted["full"] > 0


def test_hybrid_bench_decode_rate_leaves_the_prefill_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake engine whose first step (the prefill, with the first token) takes 100 s of a
    fake clock and every later step 0.5 s: 2 tokens/s, whatever the prefill took."""
    import argparse
    from types import SimpleNamespace

    from server.benchmarks import hybrid

    clock = [0.0]

    class Engine:
        def add_request(self, name, ids, params) -> None:
            self.left, self.first = params.max_tokens, True

        def has_unfinished(self) -> bool:
            return self.left > 0

        def step(self) -> list:
            clock[0] += 100.0 if self.first else 0.5
            self.first, self.left = False, self.left - 1
            return [SimpleNamespace(new_token_ids=[7])]

    monkeypatch.setattr(hybrid.time, "perf_counter", lambda: clock[0])
    args = argparse.Namespace(decode_tokens=9, device="cpu", repeats=2)
    llms = [SimpleNamespace(engine=Engine()) for _ in range(2)]
    assert hybrid._decode_rates(llms, [1, 2, 3], args) == [2.0, 2.0]
