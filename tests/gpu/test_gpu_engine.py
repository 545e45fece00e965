"""The engine on CUDA: CUDA-graph replay gives the same greedy tokens as eager execution.

float32 weights, so the only differences between the paths (padding a batch of 3 to the
bucket of 4 changes cuBLAS's M) are summation orders; greedy tokens must agree exactly, and
logprobs agree with the CPU engine within 2e-2 (the Triton attention runs its float32 dots
in TF32).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _generate(path, prompts, **config):
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=8, **config)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)
    return llm, llm.generate(prompts, params)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi4", "gemma2", "gemma3", "olmo2"])
@pytest.mark.parametrize("spec", [None, "ngram"])
def test_cuda_graphs_match_eager_and_cpu(tiny_model_dir, spec, arch):
    """(qwen3: q and k head norms in the fused RoPE kernel; gemma3: those, its window
    layers' own RoPE tables and pool, four norms a layer, GeGLU; gemma2: its soft-capped
    attention scores in the Triton kernel, and logits; phi4: a partial rotary embedding in
    the RoPE kernel; olmo2: q and k normed across their heads before the RoPE kernel, norms
    after the attention and the MLP only)"""
    path = tiny_model_dir(arch)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 5, 13)]
    spec_cfg = {"speculative": spec, "num_speculative_tokens": 3} if spec else {}
    graphed, with_graphs = _generate(path, prompts, device="cuda", prompt_graph_tokens=2048,
                                     **spec_cfg)
    _, eager = _generate(path, prompts, device="cuda", enforce_eager=True, **spec_cfg)
    _, cpu = _generate(path, prompts, device="cpu")
    assert [c.token_ids for c in with_graphs] == [c.token_ids for c in eager]
    assert [c.token_ids for c in with_graphs] == [c.token_ids for c in cpu]
    for a, b in zip(with_graphs, cpu, strict=True):
        diff = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        assert diff < 2e-2
    graphs = graphed.engine.runner.graphs  # every graph was captured at start-up
    assert set(graphs.graphs) == {(b, q) for b in (1, 2, 4, 8)
                                  for q in ((1, 2, 3, 4) if spec else (1,))}
    # and the prompt graphs (9 sequences; buckets up to the 256 positions), which the
    # prompts' steps replayed (the runner's choice: tests/test_prompt_graphs.py)
    assert set(graphs.prompt_graphs) == {16, 32, 64, 128, 256}
    graphed.engine.blocks.check_integrity()


def test_prompt_logprobs_on_cuda_match_cpu(tiny_model_dir):
    """Prompt logprobs (prompts in chunks of 16 tokens, graphs and steps launched ahead on)
    against the CPU engine's, and the first output token's against the CPU's."""
    path = tiny_model_dir("llama")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 7, 40)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1,
                            prompt_logprobs=2)
    results = []
    for device in ("cuda", "cpu"):
        llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=8,
                  max_num_batched_tokens=16, device=device)
        results.append(llm.generate(prompts, params))
    for prompt, a, b in zip(prompts, *results, strict=True):
        assert a.token_ids == b.token_ids
        assert len(a.prompt_logprobs) == len(prompt) and a.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 2e-2
            # (values, not ids: TF32 may swap near-tied alternatives)
            assert max(abs(u - v) for (_, u), (_, v) in zip(x.top, y.top, strict=True)) < 2e-2
        assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 2e-2


@pytest.mark.parametrize("spec", [None, "ngram"])
def test_hybrid_cache_on_cuda_matches_eager_and_cpu(tiny_model_dir, spec):
    """A hybrid KV cache (window 6 after 1 sink on layers 0 and 2; full attention on 1)
    over prompts and outputs far past the window: graphs (steps launched ahead without
    speculation; steps that take in prompts through prompt graphs), eager CUDA and the CPU
    give the same greedy tokens."""
    path = tiny_model_dir("llama")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    hybrid = {"sliding_window": 6, "num_sink_tokens": 1, "full_attention_layers": (1,)}
    if spec:
        hybrid.update(speculative=spec, num_speculative_tokens=3)
    graphed, with_graphs = _generate(path, prompts, device="cuda", prompt_graph_tokens=2048,
                                     **hybrid)
    _, eager = _generate(path, prompts, device="cuda", enforce_eager=True, **hybrid)
    _, cpu = _generate(path, prompts, device="cpu", **hybrid)
    assert [c.token_ids for c in with_graphs] == [c.token_ids for c in eager]
    assert [c.token_ids for c in with_graphs] == [c.token_ids for c in cpu]
    assert graphed.engine.runner.graphs is not None and graphed.engine.blocks.usage == 0.0
    graphed.engine.blocks.check_integrity()


@pytest.mark.parametrize("drafter", ["head", "early-exit", "ngram-head"])
def test_trained_drafters_on_cuda_match_cpu(tiny_model_dir, tmp_path, drafter):
    """A (random) draft head or early-exit adapter on CUDA, with graphs: the greedy tokens
    of the CPU engine without speculation; the adapter's drafts write the first layer's KV
    into reserved slots."""
    from drafters.head import DraftHead, config_for, target_head_rows

    path = tiny_model_dir("llama")
    model = LLM(str(path), dtype="float32", num_kv_blocks=64).engine.model
    torch.manual_seed(0)
    vocab = torch.arange(3, 67)
    config = config_for(model, threshold=0.0,
                        exit_layer=1 if drafter == "early-exit" else None)
    weights = tmp_path / "drafter.safetensors"
    DraftHead(config, vocab, target_head_rows(model, vocab)).save(weights)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (2, 9, 21)]
    spec = {"speculative": drafter, "speculative_model": str(weights),
            "num_speculative_tokens": 3}
    graphed, on_cuda = _generate(path, prompts, device="cuda", **spec)
    _, cpu = _generate(path, prompts, device="cpu")
    assert [c.token_ids for c in on_cuda] == [c.token_ids for c in cpu]
    assert sum(c.num_draft_tokens for c in on_cuda) > 0
    assert graphed.engine.blocks.usage == 0.0
    graphed.engine.blocks.check_integrity()


def test_head_drafts_replayed_from_graphs_are_the_eager_ones(tiny_model_dir, tmp_path):
    """A (random) draft head's loop captured per (requests bucket, draft length) proposes
    what the eager loop proposes, for batches between the buckets, at thresholds that cut
    the drafts at different places; the engine captured the graphs at start-up."""
    from drafters.base import DraftBatch, DraftRequest
    from drafters.head import DraftHead, HeadDrafter, config_for, target_head_rows

    path = tiny_model_dir("llama")
    model = LLM(str(path), dtype="float32", num_kv_blocks=64).engine.model
    torch.manual_seed(0)
    vocab = torch.arange(3, 67)
    weights = tmp_path / "head.safetensors"
    DraftHead(config_for(model), vocab, target_head_rows(model, vocab)).save(weights)
    llm = LLM(str(path), dtype="float32", device="cuda", speculative="head",
              speculative_model=str(weights), num_speculative_tokens=4, max_num_seqs=8,
              kv_cache_memory_gb=1.0)
    graphed = llm.engine.drafter
    assert set(graphed.graphs.graphs) == {(b, s) for b in (1, 2, 4, 8) for s in (1, 2, 4)}
    eager = HeadDrafter(graphed.head, graphed.embed)
    hidden_size = graphed.head.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3, 5, 8):
        hidden = torch.randn(n, hidden_size, generator=gen).cuda()
        requests = [DraftRequest(str(i), torch.randint(3, 128, (4,), generator=gen).tolist(),
                                 1 + i % 4) for i in range(n)]
        tokens = torch.tensor([r.token_ids[-1] for r in requests], device="cuda")
        probs = eager._draft(hidden, tokens, 4, False)[1][:, 1:].flatten().float().cpu()
        saved = graphed.head.config
        try:
            for threshold in (0.0, *probs.quantile(torch.tensor([0.25, 0.5, 0.75])), 1.01):
                graphed.head.config = replace(saved, threshold=float(threshold))
                batch = DraftBatch(requests, hidden)
                assert graphed.propose(batch) == eager.propose(batch)
        finally:
            graphed.head.config = saved


def _prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] logits of one prefill through the engine's model, on its device."""
    from server.models.batch import BatchMeta

    model, dev, t = llm.engine.model, llm.engine.device, len(ids)
    meta = BatchMeta(torch.arange(t, device=dev), torch.arange(t, dtype=torch.int32, device=dev)[None],
                     torch.tensor([t], dtype=torch.int32, device=dev),
                     torch.tensor([0, t], dtype=torch.int32, device=dev))
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=dev), torch.arange(t, device=dev), meta)
        return model.compute_logits(hidden).cpu()


def test_packed_model_on_cuda_matches_cpu(tiny_model_dir):
    """int4 / int8 packed serving on CUDA (Triton kernels) vs the packed CPU path, same weights.

    Differences: torch's CPU kernels round activations to bfloat16 (the native CPU kernel, where
    the host runs it, to int16 blocks: ~1e-4), the Triton dots use TF32; amplified through
    this random model that is ~2e-2 (as on CPU), so < 6e-2.
    """
    path = str(tiny_model_dir("qwen2"))
    ids = torch.randint(3, 128, (21,), generator=torch.Generator().manual_seed(4)).tolist()
    for scheme in ("int8", "int4"):
        config = dict(dtype="float32", num_kv_blocks=16, block_size=4, quantization=scheme)
        gpu = _prefill_logits(LLM(path, device="cuda", enforce_eager=True, **config), ids)
        cpu = _prefill_logits(LLM(path, device="cpu", **config), ids)
        assert float((gpu - cpu).norm() / cpu.norm()) < 6e-2, scheme


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batch1_fused_gemv_decode_matches_prefill(tiny_model_dir, arch):
    """bfloat16 decode at batch 1 runs the norms and SwiGLU inside the GEMVs; its logits at
    each position match a prefill of the same tokens (separate kernels, cuBLAS) within
    bfloat16 rounding (relative error < 3e-2)."""
    from server.models.batch import BatchMeta

    llm = LLM(str(tiny_model_dir(arch)), device="cuda", dtype="bfloat16", num_kv_blocks=16,
              block_size=4, enforce_eager=True)
    ids = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    full = _prefill_logits(llm, ids)
    model, i32 = llm.engine.model, dict(dtype=torch.int32, device="cuda")
    for pos in range(6, 12):  # rewrites the same KV slots with the decode path's values
        meta = BatchMeta(torch.tensor([pos], device="cuda"), torch.arange(12, **i32)[None],
                         torch.tensor([pos + 1], **i32), torch.tensor([0, 1], **i32))
        with torch.inference_mode():
            hidden = model(torch.tensor([ids[pos]], device="cuda"),
                           torch.tensor([pos], device="cuda"), meta)
            logits = model.compute_logits(hidden).cpu()[0]
        assert float((logits - full[pos]).norm() / full[pos].norm()) < 3e-2, pos


def test_int4_ngram_verification_graphed_matches_eager(tiny_model_dir):
    """n-gram speculation with 8 draft tokens over int4 weights in bfloat16: verification
    multiplies up to 9 rows a step, which the tensor-core GEMV serves (16 rows a program),
    graphed (the (1, 9) graph, captured at start-up) and eager; both give the same greedy
    tokens but for near-ties (below). The prompt holds tokens 3..98 twice, so a step whose last token is one of 3..90
    finds 8 tokens to draft after its most recent earlier occurrence (224 tokens in all,
    within the tiny model's 256 positions).

    Graphed steps are padded to 9 rows, while eager ones take as many rows as were drafted
    (a number the speculation policy picks from measured step times), and each row count
    has its own GEMV tiling and split-K, so a position's bfloat16 logits may differ in their
    last bits between the two; a greedy choice between two candidates that close can go
    either way (on an H100: 4.2188 against 4.1875 at the 24th token, swapped between a step
    of 9 rows and a decode step). So the runs agree, in tokens and within `NEAR_TIE` in
    logprobs, up to their first difference, if any, and that one is a choice between the
    same two candidates within `NEAR_TIE` of each other in both runs."""
    path = str(tiny_model_dir("llama"))
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=2)
    config = dict(device="cuda", dtype="bfloat16", num_kv_blocks=128, block_size=4,
                  quantization="int4", speculative="ngram", num_speculative_tokens=8)
    graphed, eager = LLM(path, **config), LLM(path, enforce_eager=True, **config)
    prompt = list(range(3, 99)) * 2
    a, b = graphed.generate([prompt], params)[0], eager.generate([prompt], params)[0]
    first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True))
                  if x != y), len(a.token_ids))
    diff = max((abs(x.logprob - y.logprob)
                for x, y in zip(a.logprobs[:first], b.logprobs[:first], strict=True)),
               default=0.0)
    assert diff < NEAR_TIE, [(i, x.logprob, y.logprob, x.top, y.top) for i, (x, y) in
                             enumerate(zip(a.logprobs[:first], b.logprobs[:first], strict=True))
                             if abs(x.logprob - y.logprob) > NEAR_TIE / 2]
    if first < len(a.token_ids):  # only a near-tie may go either way
        pair = {a.token_ids[first], b.token_ids[first]}
        for out in (a, b):
            (best, p0), (second, p1) = out.logprobs[first].top
            assert {best, second} == pair and p0 - p1 < NEAR_TIE, (first, out.logprobs[first])
    assert a.num_draft_tokens > 0
    assert (1, 9) in graphed.engine.runner.graphs.graphs


NEAR_TIE = 0.25
"""Logprobs closer than this count as equal between bfloat16 paths. Measured on an H100
(session 34), the largest difference before any differing token, logprobs near -2:
graphed against eager speculation 0.029-0.064 in 6 runs and 0.109 in one more, against
plain decoding 0-0.058 in 6; a wrong row, position or KV slot moves them by O(1)."""


def test_device_sampling_matches_cpu_and_reproduces(tiny_model_dir):
    """`sample_rows` on CUDA draws what it draws on the CPU from the same logits (the same
    uniforms; temperature only, where no filter's cut can fall between the two devices'
    roundings); through the engine with graphs, seeded requests reproduce alone or
    batched, and the host's logits never leave the device for them."""
    from server.engine import runner as runner_module
    from server.engine.sampler import sample_rows

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 49152, generator=gen) * 3
    t, zeros = torch.full((64,), 0.9), torch.zeros(64)
    args = (t, zeros.long(), torch.ones(64), zeros, torch.arange(64) * 31 + 1, torch.arange(64))
    cpu = sample_rows(logits, *args)
    cuda = sample_rows(logits.cuda(), *(a.cuda() for a in args))
    assert cuda.tolist() == cpu.tolist()
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64, block_size=4,
              max_num_seqs=8, device="cuda")
    assert runner_module.device_sampling(torch.zeros(1, device="cuda"))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True)
              for s in (1, 2, 3)]
    alone = [llm.generate([p], [s])[0].token_ids for p, s in zip(prompts, params, strict=True)]
    assert [c.token_ids for c in llm.generate(prompts, params)] == alone


def test_steps_launched_ahead_give_the_tokens_of_steps_in_turn(tiny_model_dir):
    """With graphs, decode steps are launched ahead of the step they follow (the engine's
    `launch_ahead`, on by default): greedy and seeded sampled requests of 2 to 24 tokens,
    some ended by a stop token, give the tokens of the same engine with it off; steps did
    go ahead, and every block returns to the pool. (Prompts of later requests are taken in
    by prompt graphs between steps launched ahead.)"""
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64, block_size=4,
              max_num_seqs=8, device="cuda", prompt_graph_tokens=2048)
    engine = llm.engine
    assert engine.launch_ahead
    ahead = []
    launch = engine.runner.launch

    def recording(out, after=None):
        ahead.append(after is not None)
        return launch(out, after)

    engine.runner.launch = recording
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15] * 4]
    first = llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0))[0]
    runs = {}
    for on in (True, False):
        engine.launch_ahead = on
        runs[on] = [[c.token_ids for c in llm.generate(prompts, params)] for params in (
            [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (24, 2, 9, 17)],
            SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[first.token_ids[4]]),
            [SamplingParams(max_tokens=m, temperature=1.0, top_p=0.9, seed=m, ignore_eos=True)
             for m in (24, 2, 9, 17)])]
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert runs[True] == runs[False]
    assert sum(ahead) > 20


def test_verification_steps_launched_ahead_on_cuda(tiny_model_dir, tmp_path):
    """A draft head's verification graphs verify and draft on the device, and the next
    verification step goes ahead of the one it follows (`LLMEngine.verify_ahead`): greedy
    requests of 1 to 30 tokens, some ended by a stop token, give the tokens of the CPU
    engine without speculation, with it on and off; steps did go ahead with their drafts
    taken on the device, and every block returns to the pool."""
    from collections import Counter

    from drafters.head import DraftHead, config_for, target_head_rows

    path = tiny_model_dir("llama")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15] * 4]
    params = [[SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
               for m in (30, 1, 9, 17)]]
    cpu = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    want = [[c.token_ids for c in cpu.generate(prompts, p)] for p in params]
    params.append(SamplingParams(max_tokens=30, temperature=0.0,
                                 stop_token_ids=[want[0][0][12]]))
    want.append([c.token_ids for c in cpu.generate(prompts, params[1])])
    # drafts from the target's commonest tokens, every one proposed: some are accepted
    torch.manual_seed(0)
    vocab = torch.tensor([t for t, _ in Counter(t for ids in want[0] for t in ids)
                          .most_common(3)])
    model = cpu.engine.model
    weights = tmp_path / "head.safetensors"
    DraftHead(config_for(model, threshold=0.0), vocab, target_head_rows(model, vocab)
              ).save(weights)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=8,
              device="cuda", speculative="head", speculative_model=str(weights),
              num_speculative_tokens=2)
    engine = llm.engine
    assert engine.verify_ahead
    engine.scheduler.spec_policy.padded_draft_lengths = (
        lambda wanted, spare, explore=False: [min(limit, 2) for _, limit in wanted])
    advanced = []
    launch = engine.runner.launch

    def recording(out, after=None):
        advanced.append(after is not None and after.next_ids is not None)
        return launch(out, after)

    engine.runner.launch = recording
    for on in (True, False):
        engine.verify_ahead = on
        got = [llm.generate(prompts, p) for p in params]
        assert [[c.token_ids for c in run] for run in got] == want
        assert sum(c.num_accepted_tokens for c in got[0]) > 0
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        assert (sum(advanced) > 10) == on
        advanced.clear()


def test_first_requests_of_new_shapes_compile_no_attention_kernel(tiny_model_dir):
    """After start-up (graphs captured, `ModelRunner.warm_up` run), prefills of 3 to 200
    tokens, alone and batched, and their decode, need no attention kernel compiled: each
    would stall its step for about a second (docs/benchmarks/gpu.md, run 132)."""
    from kernels import triton_attention

    def compiled() -> int:
        return sum(len(c[0]) for c in triton_attention._paged_attention_kernel
                   .device_caches.values())

    llm = LLM(str(tiny_model_dir("llama")), dtype="bfloat16", num_kv_blocks=256, block_size=16,
              max_num_seqs=8, device="cuda")
    before = compiled()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for prompts in ([[5] * 3], [[6] * 5], [[7] * 9], [[8] * 40], [[9] * 130],
                    [[10] * 3, [11] * 17, [12] * 70], [[13] * 200]):
        llm.generate(prompts, params)
    assert compiled() == before
