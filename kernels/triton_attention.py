"""Triton paged attention for decode and verification (layout: `kernels.attention` docstring).

A program owns one sequence, one KV head and a chunk of BLOCK_Q of that sequence's query
tokens, with all GROUP query heads that share the KV head stacked into one [BLOCK_Q * GROUP]
row tile, so each key/value tile is loaded once for the whole group (GQA). It walks the
context in tiles of BLOCK_KV token positions, gathering each token's physical slot through
the block table (any page size works), and keeps an online softmax in float32. Masks:
causal among the new tokens, the sequence length, and sink + sliding window; with a window,
whole tiles before the window (other than the sink tiles) are skipped, not just masked.

Decode at small batch has few (sequence, KV head) tiles, each a serial walk over the
context, so the context is split over `splits` programs (split-KV, as in flash-decoding;
a launch argument, so one compiled kernel serves every split count):
each stores its unnormalized output and softmax max/sum, and the last to arrive (a
per-tile counter, left at zero) merges them in split order. Splits get whole tiles, so at
short contexts only the first few have work: the others exit at once, the merge waits
for (and reads) the splits with work, and a lone split writes its output directly.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.pdl import await_inputs, pdl_args
from kernels.triton_gemv import _tile_counters

_LOG2E = 1 / math.log(2)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, t0, q_pos, head_ok, seq_len,
                 block_size, stride_kb, stride_ks, stride_vb, stride_vs, offs_d, mask_d,
                 window, num_sinks, qk_scale, cap, BLOCK_KV: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    """Fold key/value positions t0 .. t0 + BLOCK_KV into the online softmax state (scores in
    log2 units; SOFTCAP: capped at `cap`, Gemma 2's cap times log2(e))."""
    t = t0 + tl.arange(0, BLOCK_KV)
    t_ok = t < seq_len
    page = tl.load(bt_row + t // block_size, mask=t_ok, other=0).to(tl.int64)
    slot = t % block_size
    kv_mask = t_ok[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + page[:, None] * stride_kb + slot[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if UPCAST:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    visible = (t[None, :] <= q_pos[:, None]) & t_ok[None, :] & head_ok[:, None]
    if HAS_WINDOW:
        visible &= (t[None, :] > q_pos[:, None] - window) | (t[None, :] < num_sinks)
    s = s * qk_scale
    if SOFTCAP:  # cap * tanh(s / cap), tanh(x) as 1 - 2 / (e^2x + 1)
        s = cap - 2.0 * cap / (tl.exp(2.0 * s / cap) + 1.0)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if UPCAST:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit
def _merge_splits(acc, m_i, l_i, ws_acc_ptr, ws_ml_ptr, cnt_ptr, tile, split, active,
                  splits, MAX_SPLITS: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Split-KV: store this split's softmax state; the last of the tile's `active` splits
    (those with positions to attend) to arrive merges them in split order (deterministic)
    and reports `last`. Each split's weight comes from all maxima at once, so the partial
    outputs load independently of each other."""
    r = tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    base = tile * splits
    tl.store(ws_acc_ptr + ((base + split) * ROWS + r)[:, None] * BLOCK_D + d[None, :], acc)
    tl.store(ws_ml_ptr + ((base + split) * 2 * ROWS) + r, m_i)
    tl.store(ws_ml_ptr + ((base + split) * 2 * ROWS) + ROWS + r, l_i)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    last = arrived == active - 1
    if last:
        j = tl.arange(0, MAX_SPLITS)
        ml = ws_ml_ptr + (base + j)[:, None] * 2 * ROWS + r[None, :]
        here = (j < active)[:, None]
        m_j = tl.load(ml, mask=here, other=float("-inf"), cache_modifier=".cg")  # [MAX_SPLITS, ROWS]
        l_j = tl.load(ml + ROWS, mask=here, other=0.0, cache_modifier=".cg")
        m_i = tl.max(m_j, axis=0)
        w_j = tl.exp2(m_j - tl.where(m_i == float("-inf"), 0.0, m_i)[None, :])
        l_i = tl.sum(w_j * l_j, axis=0)
        acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        for k in range(0, active):
            a_k = tl.load(ws_acc_ptr + ((base + k) * ROWS + r)[:, None] * BLOCK_D + d[None, :],
                          cache_modifier=".cg")
            w_k = tl.sum(tl.where(j[:, None] == k, w_j, 0.0), axis=0)
            acc += a_k * w_k[:, None]
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return acc, m_i, l_i, last


@triton.jit
def _merge_decode(acc, m_i, l_i, ws_acc_ptr, ws_ml_ptr, cnt_ptr, tile, split, active, splits,
                  out_ptr, q_row, kv_head, stride_ot, stride_oh, head_dim,
                  MAX_SPLITS: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP: tl.constexpr,
                  GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Split-KV for one query token a sequence: only the GROUP_PAD rows of that token
    (the program's other rows hold zeros) are stored, and the last of the tile's `active`
    splits to arrive loads every split's rows at once, merges them and stores the output."""
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    acc = tl.sum(tl.reshape(acc, (BLOCK_Q, GROUP_PAD, BLOCK_D)), axis=0)
    m_i = tl.max(tl.reshape(m_i, (BLOCK_Q, GROUP_PAD)), axis=0)
    l_i = tl.sum(tl.reshape(l_i, (BLOCK_Q, GROUP_PAD)), axis=0)
    base = tile * splits
    tl.store(ws_acc_ptr + ((base + split) * GROUP_PAD + g)[:, None] * BLOCK_D + d[None, :], acc)
    tl.store(ws_ml_ptr + (base + split) * 2 * GROUP_PAD + g, m_i)
    tl.store(ws_ml_ptr + (base + split) * 2 * GROUP_PAD + GROUP_PAD + g, l_i)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    if arrived == active - 1:
        j = tl.arange(0, MAX_SPLITS)
        here = j < active
        ml = ws_ml_ptr + (base + j)[:, None] * 2 * GROUP_PAD + g[None, :]
        m_j = tl.load(ml, mask=here[:, None], other=float("-inf"), cache_modifier=".cg")
        l_j = tl.load(ml + GROUP_PAD, mask=here[:, None], other=0.0, cache_modifier=".cg")
        m_all = tl.max(m_j, axis=0)
        w_j = tl.exp2(m_j - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
        l_all = tl.sum(w_j * l_j, axis=0)
        a_j = tl.load(ws_acc_ptr + ((base + j)[:, None, None] * GROUP_PAD + g[None, :, None])
                      * BLOCK_D + d[None, None, :], mask=here[:, None, None], other=0.0,
                      cache_modifier=".cg")
        out = tl.sum(a_j * w_j[:, :, None], axis=0) / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
        tl.store(out_ptr + q_row * stride_ot + (kv_head * GROUP + g)[:, None] * stride_oh
                 + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g < GROUP)[:, None] & (d < head_dim)[None, :])
        tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit(do_not_specialize=["splits", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_bt, block_size, head_dim, window, num_sinks,
    qk_scale, cap, ws_acc_ptr, ws_ml_ptr, cnt_ptr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr,
    splits, HAS_WINDOW: tl.constexpr, MAX_SPLITS: tl.constexpr, UPCAST: tl.constexpr,
    DECODE: tl.constexpr, PDL: tl.constexpr, SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    # the step's metadata is written before its first kernel (not by the previous one)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    await_inputs(PDL)
    chunk_id = tl.program_id(2) // splits
    split = tl.program_id(2) % splits
    chunk = chunk_id * BLOCK_Q
    if chunk < q_len:
        r = tl.arange(0, BLOCK_Q * GROUP_PAD)
        qi = chunk + r // GROUP_PAD
        h = r % GROUP_PAD
        head_ok = (qi < q_len) & (h < GROUP)
        q_pos = seq_len - q_len + qi
        head = kv_head * GROUP + h
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < head_dim
        row_mask = head_ok[:, None] & mask_d[None, :]
        q_rows = (q_start + qi).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh
                    + offs_d[None, :], mask=row_mask, other=0.0)
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        acc = tl.zeros((BLOCK_Q * GROUP_PAD, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_Q * GROUP_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
        last_pos = tl.minimum(seq_len - q_len + chunk + BLOCK_Q, seq_len)  # exclusive
        start = 0
        if HAS_WINDOW:
            sink_end = tl.cdiv(num_sinks, BLOCK_KV) * BLOCK_KV
            for t0 in range(0, tl.where(split == 0, sink_end, 0), BLOCK_KV):  # sinks: split 0
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, k_base, v_base, bt_row, t0, q_pos, head_ok, seq_len,
                    block_size, stride_kb, stride_ks, stride_vb, stride_vs, offs_d, mask_d,
                    window, num_sinks, qk_scale, cap, BLOCK_KV, HAS_WINDOW, UPCAST, SOFTCAP)
            first_visible = tl.maximum(seq_len - q_len + chunk - window + 1, 0)
            start = tl.maximum(first_visible // BLOCK_KV * BLOCK_KV, sink_end)
        # this split's share of the remaining tiles; splits past the last share (short
        # contexts) have nothing to attend and take no part in the merge
        tiles = tl.cdiv(tl.maximum(last_pos - start, 0), BLOCK_KV)
        per_split = tl.cdiv(tiles, splits) * BLOCK_KV
        active = tl.maximum(tl.cdiv(tiles * BLOCK_KV, tl.maximum(per_split, 1)), 1)
        lo = start + split * per_split
        for t0 in range(lo, tl.minimum(lo + per_split, last_pos), BLOCK_KV):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, bt_row, t0, q_pos, head_ok, seq_len,
                block_size, stride_kb, stride_ks, stride_vb, stride_vs, offs_d, mask_d,
                window, num_sinks, qk_scale, cap, BLOCK_KV, HAS_WINDOW, UPCAST, SOFTCAP)
        last = split < active
        if splits > 1 and last and active > 1:
            tile = (seq * tl.num_programs(1) + kv_head) * (tl.num_programs(2) // splits) + chunk_id
            if DECODE:  # (the merging program stores the output)
                _merge_decode(acc, m_i, l_i, ws_acc_ptr, ws_ml_ptr, cnt_ptr, tile, split, active,
                              splits, out_ptr, q_start.to(tl.int64), kv_head, stride_ot,
                              stride_oh, head_dim, MAX_SPLITS, BLOCK_Q, GROUP, GROUP_PAD,
                              BLOCK_D)
                last = split < 0
            else:
                acc, m_i, l_i, last = _merge_splits(
                    acc, m_i, l_i, ws_acc_ptr, ws_ml_ptr, cnt_ptr, tile, split, active,
                    splits, MAX_SPLITS, BLOCK_Q * GROUP_PAD, BLOCK_D)
        if last:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh
                     + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    splits: int | None = None,
    block_kv: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.attention.paged_attention_reference`; returns [tokens, heads, dim].

    `max_query_len` (at least the longest q_len in the batch) sizes the grid; when None the
    bound ``num_tokens - num_seqs + 1`` is used, which needs no device-to-host sync (and so
    works inside CUDA graphs) and holds when every sequence has at least one query token;
    programs past a sequence's queries exit at once. `out`: optional destination shaped
    like `q`. `splits` (a power of two) divides each context over that many programs
    (split-KV, merged by the last to finish); None picks it from the grid size.
    `block_kv`: key/value positions a tile (a power of two, at least 16); None: 128 for
    tiles of at most 16 query rows (decode, short verification) and head dims up to 64,
    else 64. (On an H200, docs/benchmarks/gpu.md runs 129-130: alone, 128 took 0.83-1.05x
    the time of 64 for both the default model's heads and the 8B's; in whole graphed
    decode steps 0.95-1.01x for the default model's, 0.94-1.07x for the 8B's, slower at
    batch 1.) `softcap`: Gemma 2's soft-cap of the scores (None: none).
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in head_dim")
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if max_query_len is None:
        max_query_len = num_tokens - num_seqs + 1 if num_seqs else 0
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0 or max_query_len == 0:
        return out
    group_pad = triton.next_power_of_2(group)
    block_q = max(triton.next_power_of_2(min(max_query_len, 16)), max(1, 16 // group_pad))
    block_d = max(16, triton.next_power_of_2(head_dim))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    chunks = triton.cdiv(max_query_len, block_q)
    tiles = num_seqs * num_kv_heads * chunks
    if splits is None:  # fill ~2 waves of a 132-SM device when there are few (seq, head) tiles
        splits = 1 if interpret else min(16, triton.next_power_of_2(triton.cdiv(264, tiles)))
    rows = block_q * group_pad
    if block_kv is None:
        block_kv = 128 if rows <= 16 and block_d <= 64 else 64
    decode = max_query_len == 1
    max_splits = max(16, triton.next_power_of_2(splits))
    # (a decode merge holds every split's rows of a program at once)
    warps = 8 if rows >= 64 or decode and max_splits * group_pad * block_d > 8192 else 4
    ws_acc = q.new_empty(tiles * splits * rows * block_d if splits > 1 else 1, dtype=torch.float32)
    ws_ml = q.new_empty(tiles * splits * 2 * rows if splits > 1 else 1, dtype=torch.float32)
    _paged_attention_kernel[(num_seqs, num_kv_heads, chunks * splits)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        block_size, head_dim, sliding_window or 0, num_sink_tokens, scale * _LOG2E,
        (softcap or 1.0) * _LOG2E, ws_acc, ws_ml, _tile_counters(q.device, tiles),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d,
        splits=splits, HAS_WINDOW=sliding_window is not None,
        MAX_SPLITS=max_splits, UPCAST=interpret and q.dtype == torch.bfloat16, DECODE=decode,
        num_warps=warps, SOFTCAP=bool(softcap), **pdl_args(q.device),
    )
    return out

