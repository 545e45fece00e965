"""Prompt graphs on CUDA (`CudaGraphRunner.run_prompts`, `--prompt-graph-tokens`): steps that
take in prompts, replayed from graphs, give the tokens of eager steps and of the CPU
(tests/test_prompt_graphs.py steps their padded layout eagerly on the CPU)."""

from __future__ import annotations

import pytest
import torch

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("spec", [None, "ngram"])
def test_prompt_graphs_take_prompts_in_beside_decoding_requests(tiny_model_dir, spec):
    """Requests of different lengths taking turns in a batch of 3 (prompts chunked by a
    16-token step budget and taken in while others decode or verify) give the same greedy
    tokens with prompt graphs as without them (eager prompt steps), and as the CPU; the
    prompt graphs replayed (each step recorded through `run_prompts`)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (5, 23, 2, 11, 9)]
    prompts[2] = [5, 6, 7, 5, 6, 7, 5, 6]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in (9, 4, 14, 6, 8)]
    config = dict(dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=3,
                  max_num_batched_tokens=16)
    if spec:
        config.update(speculative=spec, num_speculative_tokens=3)
    path = str(tiny_model_dir("llama"))
    graphed = LLM(path, device="cuda", prompt_graph_tokens=16, **config)
    graphs = graphed.engine.runner.graphs
    assert set(graphs.prompt_graphs) == {8, 16, 19}  # (4 sequences, up to 16 + 3 tokens)
    run_prompts, replayed = graphs.run_prompts, []

    def recording(out, *args, **kwargs):
        found = run_prompts(out, *args, **kwargs)
        replayed.append(found is not None)
        return found

    graphs.run_prompts = recording
    runs = [[c.token_ids for c in llm.generate(prompts, params)] for llm in (
        graphed, LLM(path, device="cuda", **config), LLM(path, device="cpu", **config))]
    assert sum(replayed) >= 5 and all(replayed)
    assert runs[0] == runs[1] == runs[2]
    graphed.engine.blocks.check_integrity()
