"""Triton paged attention (interpreted on CPU) against `paged_attention_reference`.

Threshold: relative Frobenius error < 3e-3 for float16 and < 2e-2 for bfloat16 (the
probabilities are rounded to the input dtype before the P @ V dot); outputs are poisoned
with NaN beforehand so any unwritten element fails.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.attention import paged_attention_reference  # noqa: E402
from tests.paged import random_paged_batch as _batch  # noqa: E402

triton_attention = pytest.importorskip("kernels.triton_attention")
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


CASES = [  # seq_lens, q_lens, heads, kv_heads, dim, block_size, window, sinks
    ([37, 5, 130], [1, 1, 1], 4, 4, 32, 16, None, 0),  # decode, MHA
    ([37, 70, 130], [5, 1, 4], 9, 3, 64, 16, None, 0),  # verification, GQA 3 (padded to 4)
    ([100, 200], [3, 5], 8, 2, 32, 8, 48, 4),  # sliding window + sinks, page 8 < tile
    ([90, 33], [20, 33], 4, 1, 16, 32, 16, 0),  # long queries (several chunks), window only
    ([600, 64], [1, 2], 4, 2, 32, 16, None, 0),  # 10 and 1 tiles: uneven split-KV shares
    ([66, 129], [5, 9], 4, 2, 32, 16, None, 0),  # a step's new tokens across a tile edge
    # a prompt graph's step: a prompt chunk, a decode, padding sequences of 1 and 12 tokens
    ([50, 7, 1, 1, 1, 12], [20, 1, 1, 1, 1, 12], 9, 3, 64, 16, None, 0),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,splits", [(torch.float16, 1), (torch.bfloat16, 1),
                                          (torch.float16, 4), (torch.float16, 8)])
@pytest.mark.parametrize("block_kv", [32, 64, 128])
def test_paged_attention_matches_reference(case, dtype, splits, block_kv):
    """splits = 4 and 8: split-KV, including splits with no tile (37 tokens are one tile,
    merged by no one), a merge of fewer splits than launched (130 tokens: 3 of 4 64-tiles),
    and uneven shares (600 tokens: 10 64-tiles as 3 + 3 + 3 + 1, or 2 x 5 of 8 splits; 5
    128-tiles as 2 + 2 + 1)."""
    seq_lens, q_lens, heads, kv_heads, dim, block_size, window, sinks = case
    q, k_cache, v_cache, tables, lens, qsl = _batch(seq_lens, q_lens, heads, kv_heads, dim,
                                                    block_size, dtype)
    scale = dim ** -0.5
    out = torch.full_like(q, float("nan"))
    for _ in range(2):  # the second call checks the split-KV counters were reset
        triton_attention.paged_attention_triton(q, k_cache, v_cache, tables, lens, qsl, scale,
                                                window, sinks, out=out, splits=splits,
                                                block_kv=block_kv)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens,
                                    qsl, scale, window, sinks)
    assert not torch.isnan(out).any()
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < TOL[dtype], err


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
@pytest.mark.parametrize("splits", [1, 4])
def test_soft_capped_scores_match_reference(case, splits):
    """Gemma 2's soft-capping (cap * tanh(score / cap)) at a cap the scores reach (scale 1:
    scores of a few units, cap 2), decode, verification, a window, split-KV; and the torch
    padded path (SDPA takes no cap) against the same reference."""
    from kernels.attention import paged_attention_padded, visible_mask

    seq_lens, q_lens, heads, kv_heads, dim, block_size, window, sinks = case
    q, k_cache, v_cache, tables, lens, qsl = _batch(seq_lens, q_lens, heads, kv_heads, dim,
                                                    block_size, torch.float16)
    out = torch.full_like(q, float("nan"))
    triton_attention.paged_attention_triton(q, k_cache, v_cache, tables, lens, qsl, 1.0,
                                            window, sinks, out=out, splits=splits, softcap=2.0)
    args = (q.float(), k_cache.float(), v_cache.float(), tables, lens, qsl, 1.0, window, sinks)
    ref = paged_attention_reference(*args, softcap=2.0)
    assert float((out.float() - ref).norm() / ref.norm()) < TOL[torch.float16]
    assert float((paged_attention_reference(*args) - ref).norm() / ref.norm()) > 0.05
    if splits == 1:  # the padded path: each sequence alone, its queries' visibility as mask
        for i in range(len(seq_lens)):
            start, end, n = int(qsl[i]), int(qsl[i + 1]), int(lens[i])
            width = tables.shape[1] * block_size
            mask = visible_mask(torch.arange(n - (end - start), n), torch.arange(width),
                                window, sinks) & (torch.arange(width) < n)
            got = paged_attention_padded(q.float(), k_cache.float(), v_cache.float(),
                                         tables[i:i + 1], torch.arange(start, end)[None],
                                         mask[None, None], 1.0, softcap=2.0)[0]
            want = ref[start:end]
            assert float((got - want).norm() / want.norm()) < 1e-5


def test_window_changes_the_result():
    """The window mask is applied: with a short window the output differs from full attention."""
    q, k_cache, v_cache, tables, lens, qsl = _batch([120], [2], 2, 2, 16, 16, torch.float16)
    full = triton_attention.paged_attention_triton(q, k_cache, v_cache, tables, lens, qsl, 0.25)
    windowed = triton_attention.paged_attention_triton(q, k_cache, v_cache, tables, lens, qsl,
                                                       0.25, sliding_window=8)
    assert float((full.float() - windowed.float()).abs().max()) > 1e-2


def test_padded_path_reads_consecutive_blocks_in_place():
    """A lone sequence on consecutive blocks reads its keys and values as a view of the
    cache: the same result, bit for bit, as the gather; other tables keep the gather."""
    from kernels.attention import paged_attention_padded
    from server.engine.batch_builder import _consecutive_from

    k_cache, v_cache = torch.randn(12, 4, 2, 8), torch.randn(12, 4, 2, 8)
    q = torch.randn(3, 4, 8)
    tables = torch.tensor([[5, 6, 7]])
    q_index = torch.tensor([[0, 1, 2]])
    mask = (torch.arange(12)[None, :] <= torch.arange(7, 10)[:, None])[None, None]
    assert _consecutive_from(tables) == 5
    assert _consecutive_from(torch.tensor([[5, 7, 8]])) is None
    assert _consecutive_from(torch.tensor([[5, 6, 7], [8, 9, 10]])) is None
    gathered = paged_attention_padded(q, k_cache, v_cache, tables, q_index, mask, 0.3)
    in_place = paged_attention_padded(q, k_cache, v_cache, tables, q_index, mask, 0.3, 5)
    assert torch.equal(gathered, in_place)
    moved = paged_attention_padded(q, k_cache, v_cache, tables, q_index, mask, 0.3, 4)
    assert not torch.equal(gathered, moved)  # the in-place read follows first_block


@pytest.mark.parametrize("heads,kv_heads,dim,context", [(9, 3, 64, 100), (8, 2, 32, 37)])
def test_attention_floor_stand_ins_do_what_they_time(heads, kv_heads, dim, context):
    """`kernels.bench_attention --floor`'s stand-ins: the one-tile kernel (level 2) is decode
    attention over the whole context (so its time is that of real work), level 1 copies q,
    level 0 writes nothing."""
    from kernels.bench_attention import floor_attention

    q, k_cache, v_cache, tables, lens, qsl = _batch([context, 11], [1, 1], heads, kv_heads,
                                                    dim, 16, torch.float16)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens,
                                    qsl, dim ** -0.5)
    tile = triton_attention.triton.next_power_of_2(context)
    out = floor_attention(q, k_cache, v_cache, tables, lens, torch.full_like(q, float("nan")),
                          tile, 2)
    assert float((out.float() - ref).norm() / ref.norm()) < TOL[torch.float16]
    assert torch.equal(floor_attention(q, k_cache, v_cache, tables, lens, torch.zeros_like(q),
                                       tile, 1), q)
    assert torch.isnan(floor_attention(q, k_cache, v_cache, tables, lens,
                                       torch.full_like(q, float("nan")), tile, 0)).all()
