"""Mixture-of-experts models on CUDA: eager steps (no graphs: the experts' grouping reads
counts on the host), dense float32 and int4-packed experts, against the CPU engine."""

from __future__ import annotations

import pytest
import torch

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe", "granitemoe", "olmoe"]


def _engine(path, device, **config):
    """The routers' weights scaled up 8x, so that TF32 rounding cannot turn a near tie
    between two experts into another choice (a discrete change, not a kernel's error)."""
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=8,
              device=device, **config)
    for layer in llm.engine.model.layers:
        if layer.moe is not None:
            layer.moe.router.mul_(8)
    return llm


def _prompts():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 6, 30)]


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_on_cuda_matches_cpu(tiny_model_dir, arch):
    """float32 experts: the same greedy tokens as the CPU engine on the same weights,
    logprobs within 2e-2 (the Triton attention's float32 dots run in TF32), with n-gram
    speculation on CUDA too; no graphs were captured."""
    path = tiny_model_dir(arch)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    runs = {}
    for device, spec in (("cuda", None), ("cuda", "ngram"), ("cpu", None)):
        llm = _engine(path, device, speculative=spec, num_speculative_tokens=3)
        if device == "cuda":
            assert llm.engine.runner.graphs is None
        runs[device, spec] = llm.generate(_prompts(), params)
    tokens = {key: [r.token_ids for r in out] for key, out in runs.items()}
    assert tokens["cuda", None] == tokens["cuda", "ngram"] == tokens["cpu", None]
    for a, b in zip(runs["cuda", None], runs["cpu", None], strict=True):
        assert max(abs(x.logprob - y.logprob)
                   for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 2e-2


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_int4_experts_on_cuda_score_like_the_cpus(tiny_model_dir, arch):
    """int4 experts packed on CUDA (words layout, every expert) score the CPU int4 engine's
    greedy sequences (the same packed values) within 0.05 nats a token on average: the
    CUDA products round their activations to 16 bits from 2 rows on (about 5e-4 of the
    output, measured on an H100), the CPU kernel to 16 bits a block, which can route a token
    to another expert now and then, so tokens are not compared."""
    path = tiny_model_dir(arch)
    cpu, cuda = (_engine(path, device, quantization="int4") for device in ("cpu", "cuda"))
    moe = cuda.engine.model.layers[0].moe
    assert all(e.gate_up_proj.packed is not None and e.gate_up_proj.packed.device.type == "cuda"
               for e in moe.experts)
    prompts = _prompts()
    texts = [p + r.token_ids for p, r in zip(prompts, cpu.generate(
        prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)), strict=True)]
    scored = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    diffs = [abs(a.logprob - b.logprob)
             for ours, ref in zip(cuda.generate(texts, scored), cpu.generate(texts, scored),
                                  strict=True)
             for a, b in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True)]
    print(f"{arch}: mean {sum(diffs) / len(diffs):.4f}, max {max(diffs):.4f} nats")
    assert sum(diffs) / len(diffs) < 0.05
