"""The KV cache's budget (`server.engine.kv_cache.kv_budget`): a size given, 1 GiB off CUDA,
and on CUDA the share of the device's memory gpu_memory_utilization leaves (the device's
figures stand in here; tests/gpu runs it on one); a draft model's cache counted inside it."""

from __future__ import annotations

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.kv_cache import kv_budget
from server.engine.llm import LLM
from tests.tiny_models import save_tiny_model

GIB = 2**30
CUDA = torch.device("cuda")


def _unmeasured() -> int:
    raise AssertionError("the step's peak was measured where no share of a GPU applies")


def test_a_given_size_or_a_cpu_needs_no_measurement() -> None:
    assert kv_budget(EngineConfig(kv_cache_memory_gb=2.5), CUDA, _unmeasured) == 2.5 * GIB
    assert kv_budget(EngineConfig(), torch.device("cpu"), _unmeasured) == GIB
    # num_kv_blocks sizes the cache itself
    assert kv_budget(EngineConfig(num_kv_blocks=64), CUDA, _unmeasured) == GIB


def test_the_share_of_the_device_less_what_it_holds_and_the_step(monkeypatch) -> None:
    # an 80 GiB device holding 20 GiB (weights, the CUDA context, other processes)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * GIB, 80 * GIB))
    steps = []

    def step() -> int:  # (the largest step's peak beyond what stays allocated)
        steps.append(1)
        return 4 * GIB

    assert kv_budget(EngineConfig(), CUDA, step) == pytest.approx(0.9 * 80 * GIB - 24 * GIB)
    assert kv_budget(EngineConfig(gpu_memory_utilization=0.5), CUDA, step) == 16 * GIB
    assert len(steps) == 2
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0.3 \(24.00 of 80.00 GiB\) "
                       r"leaves 0.00 GiB .* holds 20.00 GiB already .* takes 4.00 more"):
        kv_budget(EngineConfig(gpu_memory_utilization=0.3), CUDA, step)


def test_a_draft_models_cache_is_counted_inside_the_budget(tmp_path, tiny_model_dir) -> None:
    """The draft model's cache has a block for each of the target's (and spare ones), so
    the two together fill --kv-cache-memory-gb: the target gets fewer blocks than alone."""
    from drafters.draft_model import SPARE_BLOCKS

    target = tiny_model_dir("qwen2")
    draft = save_tiny_model("qwen2", tmp_path / "draft", seed=1, num_hidden_layers=1,
                            hidden_size=32, intermediate_size=64)
    common = dict(dtype="float32", block_size=4, kv_cache_memory_gb=2**-8)
    alone = LLM(str(target), **common).engine
    llm = LLM(str(target), speculative="draft-model", speculative_model=str(draft), **common)
    engine = llm.engine

    def size(caches: list) -> int:
        return sum(t.numel() * t.element_size() for kv in caches for t in kv)

    blocks = engine.blocks.num_blocks
    # each cache holds one scratch block past its pool, the draft's also spare blocks
    target_block = size(engine.model.kv_caches) / (blocks + 1)
    draft_block = size(engine.drafter.model.kv_caches) / (blocks + SPARE_BLOCKS + 1)
    assert draft_block == engine.drafter.kv_bytes_per_block(4, torch.float32) > 0
    assert blocks * (target_block + draft_block) <= 2**-8 * GIB
    assert (blocks + 1) * (target_block + draft_block) > 2**-8 * GIB
    assert blocks < alone.blocks.num_blocks


@pytest.mark.parametrize("layout", ["full", "hybrid", "window only"])
def test_the_largest_step_runs_over_a_scratch_cache(tmp_path, monkeypatch, layout) -> None:
    """`step_peak_memory`'s forward (CUDA's memory counters stubbed: the forward runs on the
    CPU as on a device): every layer reads and writes a one-block scratch cache of its
    pool, full, sink + window or the model's own window on every layer, and the model is
    left without one for the engine's to be allocated."""
    from server.engine.kv_cache import step_peak_memory

    counters = {}
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: counters.update({name: 1}))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 123)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 23)
    overrides = {"sliding_window": 6} if layout == "window only" else {}
    path = save_tiny_model("mistral", tmp_path / "m", **overrides)
    cfg = EngineConfig(str(path), dtype="float32", block_size=4, num_kv_blocks=8,
                       **({"sliding_window": 8} if layout == "hybrid" else {}))
    engine = LLM(**vars(cfg)).engine  # (a model as the engine builds it)
    model = engine.model
    windowed, window = cfg.attention_layout(engine.model_config, engine.max_model_len)
    layers = len(model.layers)
    assert len(windowed) == {"full": 0, "hybrid": layers - 1, "window only": layers}[layout]
    cpu = torch.device("cpu")
    # (37 tokens in sequences of at most 16: 16, 16, 5)
    assert step_peak_memory(model, cpu, 37, 9, 16, 4, windowed, window, torch.float32) == 100
    assert model.kv_caches == [] and len(counters) == 3
    assert [layer.windowed for layer in model.layers] == [
        i in windowed for i in range(layers)]


def _cache_info(engine: object) -> dict[str, str]:
    """The labels of the engine's `leapfrog:cache_config_info` (its value checked: 1)."""
    from prometheus_client.parser import text_string_to_metric_families

    (info,) = [s for f in text_string_to_metric_families(engine.metrics.render().decode())
               for s in f.samples if s.name == "leapfrog:cache_config_info"]
    assert info.value == 1
    return {k: v for k, v in info.labels.items() if k != "model_name"}


@pytest.mark.slow
def test_the_metrics_label_the_cache(default_llm) -> None:
    """`leapfrog:cache_config_info` (vLLM's `cache_config_info`) labels the cache: 0.5 GiB
    of float32 blocks of 16 tokens for the default model's 30 layers of 3 KV heads of 64
    dims, prefix caching on."""
    per_block = 2 * 16 * 30 * 3 * 64 * 4
    blocks = int(0.5 * 2**30 // per_block)
    assert _cache_info(default_llm.engine) == {
        "block_size": "16", "num_blocks": str(blocks), "num_window_blocks": "0",
        "cache_dtype": "float32", "enable_prefix_caching": "True",
        # (a scratch block past the pool)
        "kv_cache_gib": f"{(blocks + 1) * per_block / 2**30:.3f}"}


def test_the_metrics_label_the_cache_and_its_window_pool(tiny_model_dir) -> None:
    """`leapfrog:cache_config_info` of a hybrid cache names both pools' blocks."""
    engine = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4,
                 kv_cache_memory_gb=2**-10, sliding_window=8, num_sink_tokens=2).engine
    info = _cache_info(engine)
    full, window = engine.blocks.pools
    assert window.window is not None and full.window is None
    assert info["num_blocks"] == str(full.num_blocks)
    assert info["num_window_blocks"] == str(window.num_blocks) != "0"
    assert info["enable_prefix_caching"] == "False"


def test_a_hybrid_cache_with_a_draft_model_keeps_to_the_budget(tmp_path, tiny_model_dir) -> None:
    """Sink + window layers beside full ones, and a draft model's cache for each full
    block: the window pool's share, the full pool and the draft's cache together fit a
    budget too small for max_num_seqs windows."""
    from drafters.draft_model import SPARE_BLOCKS

    draft = save_tiny_model("llama", tmp_path / "draft", seed=1, num_hidden_layers=1,
                            hidden_size=32, intermediate_size=64)
    budget = 2**-11
    engine = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4,
                 kv_cache_memory_gb=budget, sliding_window=8, num_sink_tokens=2,
                 max_num_seqs=64, max_num_batched_tokens=16, speculative="draft-model",
                 speculative_model=str(draft)).engine
    full, window = engine.blocks.pools
    assert window.num_blocks < window.window.pool_blocks(64, 16, 4)  # (a share of it)
    # the share holds as many requests' windows as the full pool (and the draft's cache
    # beside it) holds whole contexts
    context = -(-engine.max_model_len // 4) + 1
    windows = window.num_blocks / (window.window.most_blocks(1, 4) + 1)
    assert abs(windows - full.num_blocks / context) < 1

    def size(caches: list, scratch: int) -> float:  # (less the blocks past the budget)
        pools = [t for kv in caches for t in kv]
        return sum(t.numel() * t.element_size() * (1 - scratch / t.shape[0]) for t in pools)

    used = size(engine.model.kv_caches, 1) + size(engine.drafter.model.kv_caches,
                                                 SPARE_BLOCKS + 1)
    assert 0.8 * budget * 2**30 < used <= budget * 2**30
