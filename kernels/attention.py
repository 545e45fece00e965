"""Paged attention: one seam, a torch reference, and a batched CPU path.

Layout shared by every implementation:
- `q`: [num_tokens, num_heads, head_dim], the flat batch of all scheduled query tokens.
- `k_cache`, `v_cache`: [num_blocks, block_size, num_kv_heads, head_dim] for one layer.
- `block_tables`: [num_seqs, max_blocks] int32; row i maps sequence i's logical blocks to
  physical ones (entries past the sequence's last block are ignored).
- `seq_lens`: [num_seqs] int32, context length of each sequence *including* its new tokens.
- `query_start_loc`: [num_seqs + 1] int32, cumulative offsets of each sequence's query tokens
  in `q`. Sequence i's queries are its last q_len_i positions: query j sits at position
  seq_len_i - q_len_i + j, and attends causally to keys at positions <= its own.
- `sliding_window` / `num_sink_tokens`: a key at position t is visible from position s when
  t <= s and (window is None or t > s - window or t < num_sink_tokens).
- `softcap` (Gemma 2's): each score q.k * scale is replaced by softcap * tanh(score /
  softcap) before the softmax; None or 0: not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible_mask(
    query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None, num_sink_tokens: int
) -> torch.Tensor:
    """[len(query_pos), len(key_pos)] bool: which keys each query may attend to."""
    s = query_pos[:, None]
    t = key_pos[None, :]
    mask = t <= s
    if sliding_window is not None:
        mask &= (t > s - sliding_window) | (t < num_sink_tokens)
    return mask


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain per-sequence attention in float32; the ground truth for every kernel."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        seq_len = int(seq_lens[i])
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[i, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)  # [seq_len, heads, dim]
        v = v.repeat_interleave(group, dim=1)
        qi = q[start:end].float()  # [q_len, heads, dim]
        q_pos = torch.arange(seq_len - (end - start), seq_len)
        mask = visible_mask(q_pos, torch.arange(seq_len), sliding_window, num_sink_tokens)
        scores = soft_cap(torch.einsum("qhd,khd->hqk", qi, k) * scale, softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(scores / cap) (Gemma 2's soft-capping); scores as they are without a cap."""
    return scores if not cap else torch.tanh(scores / cap) * cap


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values ([num_tokens, kv_heads, dim]) at flat slots block*bs + offset."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_padded(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_index: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    first_block: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Batched CPU path: every sequence padded to the longest query and context.

    `q_index`: [num_seqs, max_q] long, indices into `q` (padding points at any valid row);
    `mask`: [num_seqs, 1, max_q, max_blocks * block_size] bool, true where a query may attend.
    `first_block`: one sequence whose table is the consecutive blocks from this one: keys and
    values are read in place instead of gathered (at 1k tokens of context the gather cost
    as much again as the attention's own read).
    Returns [num_seqs, max_q, num_heads, head_dim]; callers gather the real rows back.
    Both index tensors are built once per step and shared by all layers. With `softcap`
    the scores are computed here (SDPA takes no cap), the kv heads repeated for GQA.
    """
    num_seqs, num_blocks = block_tables.shape
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if first_block is not None:
        k, v = (c[first_block:first_block + num_blocks] for c in (k_cache, v_cache))
    else:
        flat = block_tables.reshape(-1)
        k, v = k_cache.index_select(0, flat), v_cache.index_select(0, flat)
    k = k.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    qp = q[q_index].transpose(1, 2)  # [num_seqs, heads, max_q, dim]
    if softcap:
        group = qp.shape[1] // num_kv_heads
        k, v = (c.to(qp.dtype).repeat_interleave(group, dim=1) for c in (k, v))
        scores = soft_cap(qp @ k.transpose(-1, -2) * scale, softcap)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return (weights.nan_to_num(0.0) @ v).transpose(1, 2)  # (padding rows see no key)
    out = F.scaled_dot_product_attention(
        qp, k.to(qp.dtype), v.to(qp.dtype), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)
