"""The KV cache on CUDA sized from the share of the device's memory that
`gpu_memory_utilization` leaves (`server.engine.kv_cache.kv_budget`)."""

from __future__ import annotations

import gc

import pytest
import torch

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_kv_cache_takes_what_gpu_memory_utilization_leaves(tiny_model_dir, capsys):
    """With no KV size given, the engine on CUDA sizes its cache from gpu_memory_utilization
    (`kv_budget`): a share of the device set to leave 1 GiB beyond what this process and
    others already use gets a cache of a little under 1 GiB (the tiny model's weights and
    its largest step take some MB), serves, and the device's whole use after start-up (the
    graphs captured) stays within the share but for the graphs' pools (< 256 MiB here). A
    share below what is already used is refused at start-up, saying why."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    share = (total - free + 2**30) / total
    llm = LLM(str(tiny_model_dir("llama")), dtype="bfloat16", device="cuda", max_num_seqs=8,
              gpu_memory_utilization=share)
    engine = llm.engine
    kv = sum(t.numel() * t.element_size() for kv in engine.model.kv_caches for t in kv)
    used = total - torch.cuda.mem_get_info()[0]
    with capsys.disabled():
        print(f"\nshare {share:.4f} of {total / 2**30:.2f} GiB: KV {kv / 2**30:.3f} GiB "
              f"({engine.blocks.num_blocks} blocks); device use after start-up "
              f"{used / 2**30:.3f} GiB against {share * total / 2**30:.3f}")
    assert 0.75 * 2**30 < kv <= 2**30
    assert used <= share * total + 2**28
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    assert [len(c.token_ids) for c in llm.generate([[5] * 40, [6] * 7], params)] == [8, 8]
    with pytest.raises(ValueError, match="gpu_memory_utilization .* leaves"):
        LLM(str(tiny_model_dir("llama")), dtype="bfloat16", device="cuda",
            gpu_memory_utilization=share / 2)
