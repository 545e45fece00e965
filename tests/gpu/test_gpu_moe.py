"""Mixture-of-experts models on CUDA: eager steps (no graphs: the experts' grouping reads
counts on the host), dense float32 and int4-packed experts, against the CPU engine."""

from __future__ import annotations

import pytest
import torch

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe", "granitemoe", "olmoe"])
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_moe_on_cuda_matches_cpu(tiny_model_dir, arch, quantization):
    """The same greedy tokens as the CPU engine on the same weights (int4: packed the same
    way on both), logprobs within 2e-2 (the Triton attention's float32 dots run in TF32),
    with n-gram speculation on CUDA too; no graphs were captured. The routers' weights are
    scaled up 8x in every engine, so that the TF32 rounding cannot turn a near tie between
    two experts into another choice (a discrete change, not a kernel's error)."""
    path = tiny_model_dir(arch)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 6, 30)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    runs = {}
    for device, spec in (("cuda", None), ("cuda", "ngram"), ("cpu", None)):
        llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=8,
                  device=device, quantization=quantization, speculative=spec,
                  num_speculative_tokens=3)
        for layer in llm.engine.model.layers:
            if layer.moe is not None:
                layer.moe.router.mul_(8)
        if device == "cuda":
            assert llm.engine.runner.graphs is None
        runs[device, spec] = llm.generate(prompts, params)
    tokens = {key: [r.token_ids for r in out] for key, out in runs.items()}
    assert tokens["cuda", None] == tokens["cuda", "ngram"] == tokens["cpu", None]
    for a, b in zip(runs["cuda", None], runs["cpu", None], strict=True):
        assert max(abs(x.logprob - y.logprob)
                   for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 2e-2
