"""`CudaGraphRunner`'s step inputs, filled on the host (runs on CPU: no graph is captured)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from server.engine.cuda_graphs import CudaGraphRunner, query_buckets

BS = 4  # block size
SCRATCH = 50  # the scratch block


def runner(max_query_len: int = 3) -> CudaGraphRunner:
    cache = torch.zeros(SCRATCH + 1, BS, 1, 8)
    model = types.SimpleNamespace(kv_caches=[(cache, cache)])
    return CudaGraphRunner(model, BS, SCRATCH, max_model_len=40, max_batch=8,
                           max_query_len=max_query_len)


def expected(b: int, q: int, starts: list[int], ids: list[list[int]],
             tables: list[list[int]]) -> dict[str, list]:
    """Each row's inputs, written out one token at a time (a sequence's tokens past its own
    ids are padding: id 0, KV in the scratch block)."""
    rows: dict[str, list] = {"ids": [], "positions": [], "slots": [], "lens": []}
    for i in range(b):
        for j in range(q):
            real = i < len(starts) and j < len(ids[i])
            pos = starts[i] + j if i < len(starts) else j
            block = tables[i][pos // BS] if real else SCRATCH
            rows["ids"].append(ids[i][j] if real else 0)
            rows["positions"].append(pos)
            rows["slots"].append(block * BS + pos % BS)
        rows["lens"].append((starts[i] if i < len(starts) else 0) + q)
    rows["qsl"] = [i * q for i in range(b + 1)]
    return rows


@pytest.mark.parametrize(("b", "q", "n", "mixed"), [
    (1, 1, 1, False), (4, 1, 3, False), (8, 3, 5, False), (2, 2, 0, False), (4, 3, 3, True),
    (8, 3, 6, True)])
def test_fill_writes_every_input(b: int, q: int, n: int, mixed: bool) -> None:
    """Every input of a (B, Q) step, with `mixed` sequences of 1..Q tokens (verification of
    different draft counts), padded to Q; the block entries a padding token's position
    reads past the sequence's own blocks are the scratch block's."""
    rng = np.random.default_rng(b * 10 + q)
    r = runner()
    r.inputs.dev.fill_(-7)  # poison: every value a step reads must be written
    for host in r.inputs.hosts:
        host.fill_(-7)
    tables = [[int(x) for x in rng.permutation(SCRATCH)[: int(rng.integers(3, 10))]]
              for _ in range(n)]
    lengths = [int(rng.integers(1, q + 1)) if mixed else q for _ in range(n)]
    if mixed:
        lengths[0] = q - 1  # at least one sequence padded
    starts = [int(rng.integers(0, len(t) * BS - m + 1)) for t, m in zip(tables, lengths, strict=True)]
    if mixed:  # the first sequence fills its last block: its padding reads past its blocks
        starts[0] = len(tables[0]) * BS - lengths[0]
    ids = [[int(x) for x in rng.integers(1, 1000, m)] for m in lengths]
    r.inputs.fill(b, q, starts, ids, tables)
    views = r.inputs.views(b, b * q)
    assert all((v.data_ptr() - r.inputs.dev.data_ptr()) % 16 == 0 for v in views)  # kernels' loads
    got_ids, pos, slots, bt, lens, qsl = views
    want = expected(b, q, starts, ids, tables)
    assert got_ids.tolist() == want["ids"]
    assert pos.tolist() == want["positions"]
    assert slots.tolist() == want["slots"]
    assert lens.tolist() == want["lens"]
    assert qsl.tolist() == want["qsl"]
    for i in range(b):  # the block entries a row's positions read
        need = -(-int(want["lens"][i]) // BS)
        row = tables[i] + [SCRATCH] * need if i < n else [SCRATCH] * need
        assert bt[i, :need].tolist() == row[:need]


def test_fill_of_another_shape_keeps_each_graph_layout() -> None:
    """Graphs of different (B, Q) read different views of one buffer: a fill of one shape
    gives the same views as a fill of that shape alone, whatever was filled before."""
    r = runner()
    r.inputs.fill(8, 3, [0, 4], [[1, 2, 3], [4, 5, 6]], [[3, 4], [5, 6, 7]])
    r.inputs.fill(2, 1, [5], [[9]], [[10, 11, 12]])
    ids, pos, slots, bt, lens, qsl = r.inputs.views(2, 2)
    assert ids.tolist() == [9, 0]
    assert pos.tolist() == [5, 0]
    assert slots.tolist() == [11 * BS + 1, SCRATCH * BS]
    assert bt[0, :3].tolist() == [10, 11, 12] and bt[1, 0].item() == SCRATCH
    assert lens.tolist() == [6, 1]
    assert qsl.tolist() == [0, 1, 2]


def _scheduled(*requests: tuple[int, int, bool], ahead: int = 0) -> types.SimpleNamespace:
    """A SchedulerOutput stand-in: (computed tokens, draft tokens, reaches the end) each."""
    return types.SimpleNamespace(scheduled=[
        types.SimpleNamespace(request=types.SimpleNamespace(num_computed_tokens=done),
                              spec_token_ids=[7] * drafts, num_new_tokens=1 + drafts,
                              reaches_end=end, ahead=ahead)
        for done, drafts, end in requests])


def test_graph_key_pads_verification_to_the_longest():
    """A step is graphed at (bucket, the largest token count), whatever each request drafted;
    not past the longest query the graphs allow, not where padding would pass the model's
    positions, and not for prefill chunks."""
    r = runner()  # max_model_len 40, max_batch 8, max_query_len 3
    assert r.key(_scheduled((5, 0, True))) == (1, 1)
    assert r.key(_scheduled((5, 2, True), (9, 0, True), (3, 1, True))) == (4, 3)
    assert r.key(_scheduled((5, 3, True))) is None  # 4 tokens > 3
    assert r.key(_scheduled((37, 2, True))) == (1, 3)  # positions 37..39
    assert r.key(_scheduled((38, 0, True), (5, 2, True))) is None  # padding to 40
    assert r.key(_scheduled((38, 0, True))) == (1, 1)  # position 38
    assert r.key(_scheduled((38, 0, True), ahead=1)) == (1, 1)  # launched ahead: 39
    assert r.key(_scheduled((39, 0, True), ahead=1)) is None  # 40
    assert r.key(_scheduled((5, 0, False))) is None
    assert r.key(_scheduled(*[(5, 0, True)] * 9)) is None  # past the largest bucket


def test_query_buckets_round_verification_up():
    """Verification of 2^i drafts (2^i + 1 tokens) and the longest allowed count have graphs;
    other counts pad up to the next."""
    assert query_buckets(1) == (1,)
    assert query_buckets(4) == (1, 2, 3, 4)
    assert query_buckets(9) == (1, 2, 3, 5, 9)
    assert query_buckets(12) == (1, 2, 3, 5, 9, 12)
    r = runner(max_query_len=9)
    assert r.key(_scheduled((5, 3, True), (6, 0, True))) == (2, 5)  # 4 tokens -> 5
    assert r.key(_scheduled((5, 5, True))) == (1, 9)
    assert r.key(_scheduled((5, 8, True))) == (1, 9)
    assert r.key(_scheduled((5, 9, True))) is None


def test_padding_tokens_leave_real_rows_and_the_cache_alone(tiny_model_dir):
    """The model over a padded step (sequences of 3 and 1 new tokens, padded to 3, and a
    padding sequence) gives each real token the hidden state it gets in a step of its own
    sequence alone, and the padding tokens write no KV outside the scratch block."""
    from server.engine.llm import LLM
    from server.models.batch import BatchMeta

    llm = LLM(str(tiny_model_dir("llama")), device="cpu", dtype="float32", num_kv_blocks=16,
              block_size=BS)
    model = llm.engine.model
    r = CudaGraphRunner(model, BS, 16, max_model_len=64, max_batch=4, max_query_len=3)

    def forward(b: int, q: int, starts: list[int], ids: list[list[int]],
                tables: list[list[int]]) -> torch.Tensor:
        r.inputs.fill(b, q, starts, ids, tables)
        tokens, positions, slots, bt, lens, qsl = r.inputs.views(b, b * q)
        with torch.inference_mode():
            return model(tokens, positions, BatchMeta(slots, bt, lens, qsl))

    tables = [[0, 1, 2], [3, 4, 5]]
    gen = torch.Generator().manual_seed(0)
    context = [torch.randint(3, 100, (6,), generator=gen).tolist() for _ in tables]
    new = [torch.randint(3, 100, (m,), generator=gen).tolist() for m in (3, 1)]
    for ids, table in zip(context, tables, strict=True):  # KV of 6 tokens each, one at a time
        for pos, token in enumerate(ids):
            forward(1, 1, [pos], [[token]], [table])
    alone = [forward(1, len(ids), [6], [ids], [table])
             for ids, table in zip(new, tables, strict=True)]
    k_cache = model.kv_caches[0][0]
    before = k_cache[:16].clone()
    padded = forward(4, 3, [6, 6], new, tables)  # rows 0-2, 3 (+ 4-5 padding), 6-11
    torch.testing.assert_close(padded[0:3], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[3:4], alone[1], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()
    # the real tokens rewrote their own slots with the same values; nothing else moved
    torch.testing.assert_close(k_cache[:16], before, rtol=1e-5, atol=1e-6)


def test_engine_reads_the_real_rows_of_padded_steps(tiny_model_dir):
    """The runner over `CudaGraphRunner.run` (stepped eagerly on CPU: the graphs' inputs and
    row layout without a capture): n-gram speculation over prompts whose requests draft
    different numbers of tokens, so that steps are padded, gives the tokens and logprobs of
    the engine without graphs, for greedy steps (the argmax of each row) and for steps
    that read the logits (logprobs)."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    path = str(tiny_model_dir("llama"))
    common = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS,
                  speculative="ngram", num_speculative_tokens=3)
    plain, padded = LLM(path, **common), LLM(path, **common)
    runner = padded.engine.runner
    graphs = CudaGraphRunner(runner.model, BS, runner.blocks.num_blocks,
                             padded.engine.max_model_len, max_batch=8, max_query_len=4)
    lengths = []
    eager_step = graphs.step

    def step(b, q, starts, ids, tables, graphed=True, ahead_ids=None, sparse_tables=None,
             advance=False):
        lengths.append([len(row) for row in ids])
        return eager_step(b, q, starts, ids, tables, graphed=False, ahead_ids=ahead_ids,
                          sparse_tables=sparse_tables, advance=advance)

    graphs.step = step
    runner.graphs = graphs
    prompts = [[5, 6, 7, 8] * 3, [9, 10] * 5, [3, 4, 5, 3, 4, 5, 3], [11, 12, 13]]
    for logprobs in (None, 1):
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                logprobs=logprobs)
        want, got = plain.generate(prompts, params), padded.generate(prompts, params)
        assert [c.token_ids for c in got] == [c.token_ids for c in want], logprobs
        for a, b in zip(got, want, strict=True):
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert abs(x.logprob - y.logprob) < 1e-4
    assert any(len(set(step)) > 1 for step in lengths)  # some steps were padded
    assert sum(c.num_accepted_tokens for c in got) > 0


def test_fill_writes_the_sparse_pool_inputs() -> None:
    """With a hybrid cache's second pool, a step's inputs hold that pool's slots and block
    tables too (its own scratch block for padding), and the first pool's stay as they are."""
    from server.engine.block_manager import SinkWindow

    sparse_scratch = 30
    cache = torch.zeros(SCRATCH + 1, BS, 1, 8)
    r = CudaGraphRunner(types.SimpleNamespace(kv_caches=[(cache, cache)]), BS, SCRATCH,
                        max_model_len=40, max_batch=8, max_query_len=3,
                        sparse=(sparse_scratch, SinkWindow(8, 2)))
    r.inputs.dev.fill_(-7)
    for host in r.inputs.hosts:
        host.fill_(-7)
    tables, sparse_tables = [[3, 4], [5, 6, 7]], [[20, 21], [22, SCRATCH, 23]]
    for b, q, ids in ((4, 3, [[1, 2, 3], [4, 5]]), (2, 1, [[9], [8]])):
        starts = [4, 8]
        r.inputs.fill(b, q, starts, ids, tables, sparse_tables)
        views = r.inputs.views(b, b * q)
        sparse_views = r.inputs.sparse_views(b, b * q)
        assert all((v.data_ptr() - r.inputs.dev.data_ptr()) % 16 == 0 for v in views + sparse_views)
        want = expected(b, q, starts, ids, tables)
        assert views[2].tolist() == want["slots"]
        want = expected(b, q, starts, ids, sparse_tables)
        assert sparse_views[0].tolist() == [
            s if s // BS != SCRATCH else sparse_scratch * BS + s % BS for s in want["slots"]]
        for i, table in enumerate(sparse_tables):
            assert sparse_views[1][i, :len(table)].tolist() == table
        assert (sparse_views[1][len(starts):, 0] == sparse_scratch).all()


def test_engine_replays_hybrid_steps(tiny_model_dir):
    """A hybrid KV cache (sink + window layers, their own pool) through `CudaGraphRunner`
    (stepped eagerly on CPU) with n-gram speculation gives the tokens of the hybrid engine
    without graphs."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    path = str(tiny_model_dir("llama"))
    common = dict(device="cpu", dtype="float32", num_kv_blocks=64, block_size=BS,
                  speculative="ngram", num_speculative_tokens=3, sliding_window=6,
                  num_sink_tokens=1, full_attention_layers=(0,), max_num_seqs=8)
    plain, replayed = LLM(path, **common), LLM(path, **common)
    runner = replayed.engine.runner
    runner.enable_cuda_graphs = None  # (nothing is captured: see step below)
    pools = runner.blocks.pools
    graphs = CudaGraphRunner(runner.model, BS, pools[0].hole, replayed.engine.max_model_len,
                             max_batch=8, max_query_len=4, sparse=(pools[1].hole, pools[1].window))
    eager_step = graphs.step
    steps = []

    def step(b, q, starts, ids, tables, graphed=True, ahead_ids=None, sparse_tables=None,
             advance=False):
        steps.append(sparse_tables)
        return eager_step(b, q, starts, ids, tables, graphed=False, ahead_ids=ahead_ids,
                          sparse_tables=sparse_tables, advance=advance)

    graphs.step = step
    runner.graphs = graphs
    prompts = [[5, 6, 7, 8] * 3, [9, 10] * 5, [3, 4, 5, 3, 4, 5, 3], [11, 12, 13]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want, got = plain.generate(prompts, params), replayed.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    # the sparse pool's tables reached the graphs, holes (past the window) included
    assert any(pools[1].hole in t for tables in steps for t in tables)
    assert replayed.engine.blocks.usage == 0.0
