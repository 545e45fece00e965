"""The paged KV cache's tensors: one key and one value tensor a layer, in the block pool its
attention policy draws on (`BlockManager.pools`), allocated on the model."""

from __future__ import annotations

import logging

import torch

from server.engine.block_manager import BlockManager, BlockPool

log = logging.getLogger("leapfrog.engine")


def allocate_kv_caches(model: torch.nn.Module, blocks: BlockManager, device: torch.device,
                       windowed: frozenset[int], kv_dtype: torch.dtype) -> None:
    """Set `model.kv_caches` ([num_blocks + 1, block_size, kv_heads, head_dim] keys and
    values a layer, of `kv_dtype`) and each layer's `windowed`: the `windowed` layers' KV
    lives in the last of `blocks.pools`, the others' in the first. Logs what it holds."""
    c, pools = model.config, blocks.pools
    if bool(windowed) != (pools[-1].window is not None) or (
            len(pools) == 1 and windowed and len(windowed) < c.num_layers):
        raise ValueError("the windowed layers and the block manager's pools disagree")

    def cache(pool: BlockPool) -> torch.Tensor:
        # one scratch block past the pool: padded CUDA-graph rows write their KV there,
        # and a window pool's holes point at it
        shape = (pool.num_blocks + 1, blocks.block_size, c.num_kv_heads, c.head_dim)
        return torch.zeros(shape, dtype=kv_dtype, device=device)

    model.kv_caches = []
    for i, layer in enumerate(model.layers):
        layer.windowed = i in windowed
        pool = pools[-1] if layer.windowed else pools[0]
        model.kv_caches.append((cache(pool), cache(pool)))
    size = sum(t.numel() * t.element_size() for kv in model.kv_caches for t in kv)
    shares = ([(pools[0], c.num_layers)] if len(pools) == 1 else
              [(pools[0], c.num_layers - len(windowed)), (pools[1], len(windowed))])
    log.info("KV cache: %s; %.2f GiB of %s on %s", "; ".join(
        f"{n} layers x {pool.num_blocks} blocks of {blocks.block_size} tokens"
        + (f" (window {pool.window.window})" if pool.window is not None else "")
        for pool, n in shares), size / 2**30, kv_dtype, device)
