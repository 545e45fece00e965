"""Prompt graphs (`CudaGraphRunner.run_prompts`): steps that take in prompts, padded to one
batch size and a token bucket. Runs on CPU: the inputs and the padded steps stepped
eagerly, no graph captured (tests/gpu/test_gpu_engine.py replays them on CUDA)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from server.engine.block_manager import SinkWindow
from server.engine.cuda_graphs import CudaGraphRunner, prompt_buckets

BS = 4  # block size
SCRATCH = 50  # the scratch block


def runner(prompt_tokens: int = 24, sparse: tuple[int, SinkWindow] | None = None
           ) -> CudaGraphRunner:
    cache = torch.zeros(SCRATCH + 1, BS, 1, 8)
    model = types.SimpleNamespace(kv_caches=[(cache, cache)])
    return CudaGraphRunner(model, BS, SCRATCH, max_model_len=40, max_batch=4, max_query_len=1,
                           sparse=sparse, prompt_tokens=prompt_tokens)


def test_prompt_buckets():
    """Powers of two that hold the padding sequences, multiples of 512 from 1,024, and the
    most a step can need; none past the model's positions."""
    assert prompt_buckets(2048, 65, 8192) == (128, 256, 512, 1024, 1536, 2048, 2112)
    assert prompt_buckets(100, 9, 4096) == (16, 32, 64, 108)
    assert prompt_buckets(2048, 9, 300) == (16, 32, 64, 128, 256)
    assert prompt_buckets(24, 5, 40) == (8, 16, 28)
    assert prompt_buckets(0, 65, 8192) == ()


def _step(*requests: tuple[int, int], ahead: int = 0) -> types.SimpleNamespace:
    """A SchedulerOutput stand-in: (computed tokens, new tokens) each."""
    return types.SimpleNamespace(scheduled=[
        types.SimpleNamespace(request=types.SimpleNamespace(num_computed_tokens=done),
                              num_new_tokens=new, ahead=ahead)
        for done, new in requests])


def test_prompt_key_is_the_smallest_bucket_with_the_padding():
    """A step's bucket holds its tokens and a padding token for each sequence it lacks of
    max_batch + 1 (5 here); none for steps launched ahead or past the largest bucket."""
    r = runner()  # buckets (8, 16, 28)
    assert r.prompt_key(_step((0, 3))) == 8  # 3 + 4
    assert r.prompt_key(_step((0, 4))) == 8  # 4 + 4
    assert r.prompt_key(_step((0, 5))) == 16  # 5 + 4 > 8
    assert r.prompt_key(_step((9, 1), (0, 10), (5, 1), (7, 1))) == 16  # 13 + 1
    assert r.prompt_key(_step((0, 24))) == 28
    assert r.prompt_key(_step((0, 24), (3, 1))) == 28  # 25 + 3
    assert r.prompt_key(_step((0, 24), (3, 2))) is None  # 26 + 3 > 28
    assert r.prompt_key(_step((0, 5), ahead=1)) is None
    assert runner(prompt_tokens=0).prompt_key(_step((0, 3))) is None


@pytest.mark.parametrize("lengths", [[3], [1, 10, 1, 2], [24], []])
def test_fill_prompts_writes_every_input(lengths: list[int]) -> None:
    """Every input of a padded prompt step, in both pools of a hybrid cache: the real
    sequences' tokens back to back, then padding sequences of one token and a last one of
    what is left, all in their pool's scratch block from position 0; the buffer was
    poisoned, so every value read was written."""
    sparse_scratch = 30
    r = runner(sparse=(sparse_scratch, SinkWindow(8, 2)))
    b = r.prompt_seqs
    r.inputs.dev.fill_(-7)
    for host in r.inputs.hosts:
        host.fill_(-7)
    rng = np.random.default_rng(len(lengths))
    n, real = len(lengths), sum(lengths)
    t = 28 if lengths else 8
    starts = [int(rng.integers(0, 12)) for _ in lengths]
    tables = [[int(x) for x in rng.permutation(SCRATCH)[:-(-(s + m) // BS)]]
              for s, m in zip(starts, lengths, strict=True)]
    sparse_tables = [[x % sparse_scratch for x in table] for table in tables]
    ids = [[int(x) for x in rng.integers(1, 1000, m)] for m in lengths]
    r.inputs.fill_prompts(b, t, starts, ids, tables, sparse_tables)
    got_ids, pos, slots, bt, lens, qsl = r.inputs.views(b, t)
    sparse_slots, sparse_bt = r.inputs.sparse_views(b, t)
    rest = t - real - (b - n - 1)
    pad_pos = [0] * (b - n - 1) + list(range(rest))
    assert got_ids.tolist() == [x for row in ids for x in row] + [0] * (t - real)
    assert pos.tolist() == [p for s, m in zip(starts, lengths, strict=True)
                            for p in range(s, s + m)] + pad_pos
    assert lens.tolist() == [s + m for s, m in zip(starts, lengths, strict=True)] + [1] * (
        b - n - 1) + [rest]
    assert qsl.tolist() == np.cumsum([0, *lengths, *[1] * (b - n - 1), rest]).tolist()
    for pool_tables, scratch, pool_slots, pool_bt in (
            (tables, SCRATCH, slots, bt), (sparse_tables, sparse_scratch, sparse_slots, sparse_bt)):
        assert pool_slots.tolist() == [
            table[p // BS] * BS + p % BS
            for table, s, m in zip(pool_tables, starts, lengths, strict=True)
            for p in range(s, s + m)] + [scratch * BS + p % BS for p in pad_pos]
        for i, table in enumerate(pool_tables):
            assert pool_bt[i, :len(table)].tolist() == table
        assert (pool_bt[n:, 0] == scratch).all()
        assert (pool_bt[b - 1, :-(-rest // BS)] == scratch).all()
    with pytest.raises(ValueError, match="do not fit"):
        r.inputs.fill_prompts(b, 8, [0], [[1] * 5], [[1, 2]])


def test_padded_prompt_step_leaves_real_rows_and_the_cache_alone(tiny_model_dir):
    """The model over a padded prompt step (a 7-token prompt chunk beside a decoding
    sequence) gives each real token the hidden state of an unpadded step of the same
    sequences, and the padding tokens write no KV outside the scratch block."""
    from server.engine.batch_builder import batch_meta
    from server.engine.llm import LLM

    llm = LLM(str(tiny_model_dir("llama")), device="cpu", dtype="float32", num_kv_blocks=16,
              block_size=BS, max_num_seqs=4)
    model = llm.engine.model
    r = CudaGraphRunner(model, BS, 16, max_model_len=64, max_batch=4, max_query_len=1,
                        prompt_tokens=32)
    gen = torch.Generator().manual_seed(0)
    tables = [[0, 1, 2], [3, 4, 5]]
    context = torch.randint(3, 100, (6,), generator=gen).tolist()
    new = [torch.randint(3, 100, (7,), generator=gen).tolist(), [17]]
    starts = [0, 6]
    with torch.inference_mode():  # the decoding sequence's 6 tokens of context
        cpu = torch.device("cpu")
        model(torch.tensor(context), torch.arange(6),
              batch_meta([[tables[1]]], list(range(6)), [6], [0, 6], BS, cpu, False))
        positions = [*range(7), 6]
        unpadded = model(torch.tensor(new[0] + new[1]), torch.tensor(positions),
                         batch_meta([tables], positions, [7, 7], [0, 7, 8], BS, cpu, False))
        before = model.kv_caches[0][0][:16].clone()
        step = types.SimpleNamespace(scheduled=[
            types.SimpleNamespace(request=types.SimpleNamespace(
                num_computed_tokens=s, all_token_ids=[0] * s + row), spec_token_ids=[],
                num_new_tokens=len(row), ahead=0) for s, row in zip(starts, new, strict=True)])
        hidden, ends = r.run_prompts(step, tables, graphed=False)
    assert ends == [7, 8] and hidden.shape[0] == 8
    torch.testing.assert_close(hidden, unpadded, rtol=1e-5, atol=1e-5)
    # the real tokens rewrote their own slots with the same values; nothing else moved
    torch.testing.assert_close(model.kv_caches[0][0][:16], before, rtol=1e-5, atol=1e-6)


def _replayed(llm, prompt_tokens: int, sparse: bool = False) -> list[int]:
    """Give `llm`'s runner graphs stepped eagerly (decode graphs and prompt graphs padded as
    on CUDA, nothing captured); returns a list that grows by each prompt step's token
    count."""
    runner = llm.engine.runner
    pools = runner.blocks.pools
    graphs = CudaGraphRunner(runner.model, runner.blocks.block_size, pools[0].hole,
                             llm.engine.max_model_len, llm.engine.config.max_num_seqs,
                             max_query_len=1 + llm.engine.config.num_speculative_tokens,
                             window=pools[0].window,
                             sparse=(pools[1].hole, pools[1].window) if sparse else None,
                             prompt_tokens=prompt_tokens)
    step, run_prompts = graphs.step, graphs.run_prompts
    prompt_steps = []

    def eager_step(*args, graphed=True, **kwargs):
        return step(*args, graphed=False, **kwargs)

    def eager_prompts(out, *args, graphed=True):
        prompt_steps.append(graphs.prompt_key(out))
        return run_prompts(out, *args, graphed=False)

    graphs.step, graphs.run_prompts = eager_step, eager_prompts
    runner.graphs = graphs
    return prompt_steps


@pytest.mark.parametrize("config", [
    {}, {"speculative": "ngram", "num_speculative_tokens": 3},
    {"sliding_window": 6, "num_sink_tokens": 1, "full_attention_layers": (0,)}])
def test_engine_through_prompt_graphs(tiny_model_dir, config):
    """Requests of different lengths taking turns in a small batch (prompts chunked by a
    16-token step budget and taken in while others decode) through prompt graphs give the
    engine's tokens and logprobs without graphs: plain, with n-gram speculation (steps
    that verify drafts beside prompt chunks), and with a hybrid cache."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    path = str(tiny_model_dir("llama"))
    common = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS,
                  max_num_seqs=3, max_num_batched_tokens=16, **config)
    plain, replayed = LLM(path, **common), LLM(path, **common)
    prompt_steps = _replayed(replayed, 16, sparse="sliding_window" in config)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (5, 23, 2, 11, 9)]
    prompts[2] = [5, 6, 7, 5, 6, 7, 5, 6]  # (n-gram drafts)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=1)
              for m in (9, 4, 14, 6, 8)]
    want, got = plain.generate(prompts, params), replayed.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4
    assert len(prompt_steps) >= 5 and None not in prompt_steps
    assert replayed.engine.blocks.usage == 0.0
    replayed.engine.blocks.check_integrity()


def test_prompt_logprobs_and_embeddings_beside_prompt_graphs(tiny_model_dir):
    """Steps whose requests want prompt logprobs run eagerly (their hidden states are read
    after the step); pooled embeddings come from prompt graphs and match the engine's
    without graphs."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    path = str(tiny_model_dir("llama"))
    common = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS,
                  max_num_seqs=3, max_num_batched_tokens=16)
    plain, replayed = LLM(path, **common), LLM(path, **common)
    prompt_steps = _replayed(replayed, 16)
    texts = [[5, 9, 13, 2, 8, 40, 3], [7] * 20]
    for pooling in ("mean", "last"):
        assert np.allclose(replayed.embed(texts, pooling), plain.embed(texts, pooling),
                           atol=1e-5)
    assert prompt_steps
    prompt_steps.clear()
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1)
    want, got = plain.generate(texts, params), replayed.generate(texts, params)
    assert prompt_steps == []
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [len(c.prompt_logprobs) for c in got] == [len(t) for t in texts]
