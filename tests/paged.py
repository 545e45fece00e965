"""Random paged KV caches for the attention tests."""

from __future__ import annotations

import torch

from kernels.attention import write_kv


def random_paged_batch(seq_lens: list[int], q_lens: list[int], heads: int, kv_heads: int,
                       dim: int, block_size: int, dtype: torch.dtype,
                       spare_blocks: int = 3) -> tuple[torch.Tensor, ...]:
    """A random cache with shuffled physical blocks (the context written through write_kv,
    so the slot layout is the engine's) and random queries: (q, k_cache, v_cache, tables,
    seq_lens, query_start_loc), the int tensors int32."""
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + spare_blocks
    perm = torch.randperm(num_blocks)
    tables = perm[: len(seq_lens) * max_blocks].reshape(len(seq_lens), max_blocks).int()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    for i, s in enumerate(seq_lens):
        pos = torch.arange(s)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        write_kv(torch.randn(s, kv_heads, dim), torch.randn(s, kv_heads, dim), k_cache, v_cache,
                 slots)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), heads, dim).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), qsl
