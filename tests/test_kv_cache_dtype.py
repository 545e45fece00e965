"""`kv_cache_dtype` (`--kv-cache-dtype`): a 16-bit KV cache under float32 compute on the CPU
holds twice the blocks in the same memory and serves the same requests close to a float32
cache's (the native decoder stack against the per-op path on one:
`test_kernels_cpu_layers.py`); a dtype the device cannot take is refused by name."""

from __future__ import annotations

import pytest
import torch

from server.engine.engine import resolve_kv_dtype
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

PROMPTS = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 9, 3, 9, 3, 9], [1, 40, 41]]


def _llm(tiny_model_dir, **kwargs) -> LLM:
    return LLM(str(tiny_model_dir("llama")), dtype="float32", kv_cache_memory_gb=0.01,
               enable_prefix_caching=False, **kwargs)


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_a_16_bit_cache_holds_twice_the_blocks_and_serves(tiny_model_dir, kv):
    wide = _llm(tiny_model_dir)
    narrow = _llm(tiny_model_dir, kv_cache_dtype=kv)
    caches = narrow.engine.runner.model.kv_caches
    assert all(t.dtype == getattr(torch, kv) for pair in caches for t in pair)
    assert narrow.engine.blocks.num_blocks // 2 == wide.engine.blocks.num_blocks  # floored
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    first = wide.generate(PROMPTS, params)
    for out, ref in zip(narrow.generate(PROMPTS, params), first, strict=True):
        assert len(out.token_ids) == 12
        # the first token's distribution: the prompt's keys and values rounded to 16 bits
        assert out.token_ids[0] == ref.token_ids[0]
        assert abs(out.logprobs[0].logprob - ref.logprobs[0].logprob) < 0.05


def test_dtypes_the_device_cannot_take_are_refused():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kv_dtype("auto", torch.float32, cpu) == torch.float32
    assert resolve_kv_dtype("float16", torch.float32, cpu) == torch.float16
    assert resolve_kv_dtype("bfloat16", torch.bfloat16, cuda) == torch.bfloat16
    with pytest.raises(ValueError, match="on CUDA the KV cache takes the compute dtype"):
        resolve_kv_dtype("float16", torch.bfloat16, cuda)
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int8'"):
        resolve_kv_dtype("int8", torch.float32, cpu)


def test_the_hybrid_bench_compares_kv_dtypes(tiny_model_dir, tmp_path, monkeypatch):
    """`leapfrog bench hybrid --configs '' --kv-cache-dtypes auto,float16`: full attention
    at both, the float16 cache half the bytes a token, about twice the context, about the
    same perplexity, both timed."""
    import argparse
    import json

    from server.benchmarks import hybrid

    monkeypatch.setattr(hybrid, "pydoc_text", lambda: " ".join(f"w{3 + i * 7 % 120}" for i in range(80)))
    parser = argparse.ArgumentParser()
    hybrid.add_arguments(parser)
    out = tmp_path / "kv.json"
    assert hybrid.run(parser.parse_args([
        str(tiny_model_dir("llama")), "--configs", "", "--kv-cache-dtypes", "auto,float16",
        "--text-tokens", "64", "--decode-context", "24", "--decode-tokens", "4", "--repeats",
        "1", "--kv-cache-memory-gb", "0.001", "--result-json", str(out)])) == 0
    wide, narrow = json.loads(out.read_text())["results"]
    assert (wide["config"], narrow["config"]) == ("full", "full kv float16")
    assert narrow["kv_bytes_per_token"] * 2 == wide["kv_bytes_per_token"]
    assert narrow["context_tokens"] // 32 == wide["context_tokens"] // 16  # whole blocks
    assert narrow["nll"] == pytest.approx(wide["nll"], rel=1e-2)
    assert narrow["nll"] != wide["nll"]  # the keys and values were rounded
    assert wide["decode_tok_s"] > 0 and narrow["decode_tok_s"] > 0


def test_the_engine_logs_what_its_kv_cache_holds(tiny_model_dir, caplog):
    with caplog.at_level("INFO", logger="leapfrog.engine"):
        llm = _llm(tiny_model_dir, kv_cache_dtype="bfloat16")
    blocks = llm.engine.blocks
    layers = llm.engine.model_config.num_layers
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache"))
    assert line.startswith(f"KV cache: {layers} layers x {blocks.num_blocks} blocks of "
                           f"{blocks.block_size} tokens; ")
    assert line.endswith("GiB of torch.bfloat16 on cpu")
