"""Per-step batch metadata: how the flat batch of tokens maps onto sequences and KV slots.

Built once per step by the model runner and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention import paged_attention_padded, paged_attention_reference, write_kv


@dataclass
class PaddedGroup:
    """Sequences whose attention runs as one padded batch (the CPU path)."""

    token_index: torch.Tensor | None
    """[T_g] rows of the flat batch this group's queries come from; None = all rows, in order."""
    q_index: torch.Tensor
    """[S_g, max_q] long: rows of the group's queries, padded."""
    out_index: torch.Tensor
    """[T_g] long: real rows of the flattened [S_g * max_q] output."""
    block_tables: torch.Tensor
    """[S_g, max_blocks] long."""
    mask: torch.Tensor
    """[S_g, 1, max_q, max_blocks * block_size] bool."""
    first_block: int | None = None
    """One sequence whose blocks are consecutive from this one: its keys and values are read
    in place (a view of the cache), not gathered."""


@dataclass
class BatchMeta:
    """Everything attention needs besides q/k/v."""

    slot_mapping: torch.Tensor
    """[num_tokens] long: flat KV slot (block * block_size + offset) of each new token."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks] int32."""
    seq_lens: torch.Tensor
    """[num_seqs] int32: context length including this step's tokens."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32."""
    groups: list[PaddedGroup] | None = None
    """CPU path groups; None selects the kernel path (`kernels.attention` on CUDA)."""
    sliding_window: int | None = None
    """The layers reading this cache attend to sinks + a window (`kernels.attention`)."""
    num_sink_tokens: int = 0
    sparse: BatchMeta | None = None
    """In a hybrid cache: the sink + window layers' own slots and block tables (their
    pool's); None: every layer uses these."""


def attention(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: BatchMeta, scale: float,
) -> torch.Tensor:
    """Write this step's k/v ([T, kv_heads, dim]) into the paged cache, then attend (with
    `meta`'s window, if any; the CPU path's groups hold it in their masks).

    q: [T, heads, dim] -> same. k, v None: the caller has already written them.
    """
    if k is not None:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    if meta.groups is None:
        window = meta.sliding_window, meta.num_sink_tokens
        if q.is_cuda:
            from kernels.triton_attention import paged_attention_triton

            return paged_attention_triton(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                *window)
        return paged_attention_reference(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
            *window)
    if len(meta.groups) == 1 and meta.groups[0].token_index is None:
        g = meta.groups[0]
        out = paged_attention_padded(q, k_cache, v_cache, g.block_tables, g.q_index, g.mask, scale,
                                     g.first_block)
        return out.reshape(-1, *q.shape[1:])[g.out_index]
    out = torch.empty_like(q)
    for g in meta.groups:
        res = paged_attention_padded(q, k_cache, v_cache, g.block_tables, g.q_index, g.mask, scale,
                                     g.first_block)
        out[g.token_index] = res.reshape(-1, *q.shape[1:])[g.out_index]
    return out
