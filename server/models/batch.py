"""Per-step batch metadata: how the flat batch of tokens maps onto sequences and KV slots.

Built once per step by the model runner and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from kernels import cpu_attention
from kernels.attention import paged_attention_padded, paged_attention_reference, write_kv


@dataclass
class PaddedGroup:
    """Sequences whose attention runs as one padded batch through torch (the CPU path)."""

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
class CpuGroup:
    """Sequences whose attention the CPU path runs together: through the native kernel
    where it takes them, else as a `PaddedGroup`, built on first use (most steps never
    need it)."""

    build_padded: Callable[[], PaddedGroup]
    native: cpu_attention.AttentionStep | None = None
    """Where the group's queries are short (decode and verification steps) and the native
    CPU kernels run: its sequences for `kernels.cpu_attention.paged_attention`, which reads
    their keys and values straight from the paged cache."""

    @cached_property
    def padded(self) -> PaddedGroup:
        return self.build_padded()


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
    groups: list[CpuGroup] | None = None
    """CPU path groups; None selects the kernel path (`kernels.attention` on CUDA)."""
    sliding_window: int | None = None
    """The layers reading this cache attend to sinks + a window (`kernels.attention`)."""
    num_sink_tokens: int = 0
    sparse: BatchMeta | None = None
    """In a hybrid cache: the sink + window layers' own slots and block tables (their
    pool's); None: every layer uses these."""

    def native_step(self, rows: int) -> cpu_attention.AttentionStep | None:
        """The native attention's sequences where they are the whole step's `rows` queries
        (every query short: the whole layer can run natively, `kernels.cpu_layers`)."""
        if self.groups is None or len(self.groups) != 1:
            return None
        step = self.groups[0].native
        return step if step is not None and step.rows == rows else None


def attention(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: BatchMeta, scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write this step's k/v ([T, kv_heads, dim]) into the paged cache, then attend (with
    `meta`'s window, if any; the CPU path's groups hold it in their masks; scores
    soft-capped at `softcap`, Gemma 2's, where given).

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
                *window, softcap=softcap)
        return paged_attention_reference(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
            *window, softcap=softcap)
    out = torch.empty_like(q)
    for g in meta.groups:
        if g.native is not None and cpu_attention.paged_attention(
                q, k_cache, v_cache, g.native, scale, out, softcap=softcap):
            continue
        p = g.padded
        res = paged_attention_padded(q, k_cache, v_cache, p.block_tables, p.q_index, p.mask, scale,
                                     p.first_block, softcap).reshape(-1, *q.shape[1:])[p.out_index]
        if p.token_index is None:  # the only group: every row, in order
            return res
        out[p.token_index] = res
    return out
