"""The draft-model drafter on CUDA: its one-token steps replayed from CUDA graphs draft what
its eager steps draft, and the output is the target's (float32, as test_gpu_engine)."""

from __future__ import annotations

import pytest
import torch

from drafters.base import DraftBatch, DraftRequest
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from tests.test_speculative import AlwaysDraft
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_draft_model_graphs_draft_as_eager_steps(tiny_model_dir, tmp_path):
    target = tiny_model_dir("qwen2")
    draft = save_tiny_model("qwen2", tmp_path / "draft", seed=1, num_hidden_layers=1,
                            hidden_size=32, intermediate_size=64)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 5, 13)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", device="cuda", num_kv_blocks=64, block_size=4,
                  max_num_seqs=8)
    plain = [c.token_ids for c in LLM(str(target), **common).generate(prompts, params)]
    llm = LLM(str(target), speculative="draft-model", speculative_model=str(draft),
              num_speculative_tokens=3, **common)
    llm.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=3)
    drafter, runner = llm.engine.drafter, llm.engine.runner
    replays = []
    run = drafter.graphs.run
    drafter.graphs.run = lambda *args: replays.append(len(args[1])) or run(*args)
    got = llm.generate(prompts, params)
    assert [c.token_ids for c in got] == plain
    assert replays and sum(c.num_draft_tokens for c in got) > 30
    # the same histories drafted from graphs (3 requests: the bucket of 4) and eagerly;
    # then every draft accepted and a bonus token: a catch-up of 2 tokens, graphed too
    histories = {f"r{i}": p + plain[i][:7] for i, p in enumerate(prompts)}

    def propose(found: dict[str, list[int]]) -> list[list[int]]:
        batch = DraftBatch([DraftRequest(rid, h, 3) for rid, h in found.items()],
                           meta=runner._own_meta)
        return [p.token_ids for p in drafter.propose(batch)]

    drafted = {}
    for graphs in (drafter.graphs, None):
        drafter.graphs = graphs
        first = propose(histories)
        second = propose({rid: h + d + [9] for (rid, h), d in zip(histories.items(), first,
                                                                  strict=True)})
        drafted[graphs is None] = first, second
        for rid in histories:
            drafter.release(rid)
    assert drafted[False] == drafted[True]
    assert all(len(d) == 3 for step in drafted[True] for d in step)
