"""Prompt embeddings on CUDA (`SamplingParams.pooling`): pooled from eager prefill steps and
from graph replays (a one-token prompt joins a decode step), with steps launched ahead,
beside generating requests; against transformers on the CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.llm import LLM, Completion
from server.engine.sampling_params import SamplingParams
from tests.test_embeddings import hf_embeddings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(("dtype", "least_cosine"), [("float32", 0.9999), ("bfloat16", 0.999)])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_on_cuda_match_transformers(tiny_model_dir, dtype, least_cosine, pooling):
    """Embedding requests arrive one every 3 steps while 4 greedy requests decode (graphs,
    steps launched ahead); their prompts (1 to 40 tokens) run in chunks of 16. The cosine
    to transformers' float32 vector on the CPU is at least `least_cosine` (float32: the
    Triton attention's TF32 dots), and in float32 the generated tokens are those generated
    alone."""
    path = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(5)
    embedded = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 7, 40, 1)]
    decoded = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (3, 9, 17, 2)]
    llm = LLM(str(path), dtype=dtype, device="cuda", num_kv_blocks=128, block_size=4,
              max_num_seqs=8, max_num_batched_tokens=16)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [c.token_ids for c in llm.generate(decoded, greedy)]
    engine, results = llm.engine, {}
    for i, prompt in enumerate(decoded):
        engine.add_request(f"d{i}", prompt, greedy)
        results[f"d{i}"] = Completion(f"d{i}", prompt)
    pending, step = list(enumerate(embedded)), 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 2:
            i, prompt = pending.pop(0)
            engine.add_request(f"e{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0,
                                                               pooling=pooling))
            results[f"e{i}"] = Completion(f"e{i}", prompt)
        for out in engine.step():
            LLM.absorb(results[out.request_id], out)
        step += 1
    if dtype == "float32":  # (bfloat16 near-ties may go either way in other batches)
        assert [results[f"d{i}"].token_ids for i in range(len(decoded))] == alone
    for i, expected in enumerate(hf_embeddings(hf, embedded, pooling)):
        got = torch.tensor(results[f"e{i}"].embedding)
        assert got.norm().item() == pytest.approx(1.0, abs=1e-4)
        assert torch.dot(got, expected).item() > least_cosine, (i, pooling)
    assert engine.runner.graphs is not None
    engine.blocks.check_integrity()
