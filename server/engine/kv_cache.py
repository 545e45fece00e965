"""The paged KV cache: its budget (on CUDA, measured at start-up by running the largest step
over a scratch cache: `step_peak_memory`), its pools' sizes within it (`kv_pools`), and its
tensors, one key and one value tensor a layer, in the block pool its attention policy draws
on (`BlockManager.pools`), allocated on the model."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from itertools import accumulate

import torch

from server.engine.block_manager import BlockManager, BlockPool, SinkWindow, window_kwargs
from server.engine.config import EngineConfig
from server.models.batch import BatchMeta
from server.models.config import ModelConfig

log = logging.getLogger("leapfrog.engine")


def allocate_kv_caches(model: torch.nn.Module, blocks: BlockManager, device: torch.device,
                       windowed: frozenset[int], kv_dtype: torch.dtype, quiet: bool = False
                       ) -> None:
    """Set `model.kv_caches` ([num_blocks + 1, block_size, kv_heads, head_dim] keys and
    values a layer, of `kv_dtype`) and each layer's `windowed`: the `windowed` layers' KV
    lives in the last of `blocks.pools`, the others' in the first. Logs what it holds
    unless `quiet`."""
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
    if quiet:
        return
    size = model.kv_cache_bytes()
    shares = ([(pools[0], c.num_layers)] if len(pools) == 1 else
              [(pools[0], c.num_layers - len(windowed)), (pools[1], len(windowed))])
    log.info("KV cache: %s; %.2f GiB of %s on %s", "; ".join(
        f"{n} layers x {pool.num_blocks} blocks of {blocks.block_size} tokens"
        + (f" (window {pool.window.window})" if pool.window is not None else "")
        for pool, n in shares), size / 2**30, kv_dtype, device)


def dummy_step(model: torch.nn.Module, blocks: BlockManager, device: torch.device, n: int,
               logit_rows: int = 1, max_len: int | None = None) -> None:
    """One eager forward of `n` zero tokens, in sequences of at most `max_len` (None: one
    sequence), whose KV goes to each pool's scratch block (`BlockPool.hole`), and the
    logits of the last `logit_rows` rows."""
    bs = blocks.block_size
    longest = min(n, max_len or n)
    lengths = [longest] * (n // longest) + ([n % longest] if n % longest else [])
    positions = torch.cat([torch.arange(length, device=device) for length in lengths])
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    starts = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)
    metas = []
    for pool in blocks.pools:
        table = torch.full((len(lengths), -(-longest // bs)), pool.hole, dtype=torch.int32,
                           device=device)
        metas.append(BatchMeta(pool.hole * bs + positions % bs, table, seq_lens, starts,
                               **window_kwargs(pool.window)))
    metas[0].sparse = metas[1] if len(metas) > 1 else None
    hidden = model(torch.zeros(n, dtype=torch.long, device=device), positions, metas[0])
    model.compute_logits(hidden[-logit_rows:])


@torch.inference_mode()
def step_peak_memory(model: torch.nn.Module, device: torch.device, tokens: int,
                     logit_rows: int, max_len: int, block_size: int, windowed: frozenset[int],
                     window: SinkWindow | None, kv_dtype: torch.dtype) -> int:
    """Bytes the largest step allocates on CUDA `device` at its peak beyond what stays
    allocated: one forward of `tokens` tokens (in sequences of at most `max_len`) and the
    logits of `logit_rows` of them, over a KV cache of one block a pool. Returns with the
    step's memory released to the device and `model.kv_caches` empty."""
    scratch = BlockManager(0 if len(windowed) == model.config.num_layers else 1, block_size,
                           BlockPool(1, block_size, window) if window is not None else None)
    gc.collect()  # (engines dropped but held in reference cycles)
    torch.cuda.reset_peak_memory_stats(device)
    allocate_kv_caches(model, scratch, device, windowed, kv_dtype, quiet=True)
    dummy_step(model, scratch, device, tokens, logit_rows, max_len)
    torch.cuda.synchronize(device)
    model.kv_caches = []
    torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)


def kv_budget(cfg: EngineConfig, device: torch.device, step_peak: Callable[[], int]) -> float:
    """Bytes for the KV cache: kv_cache_memory_gb; unset, 1 GiB off CUDA or with
    num_kv_blocks (which sizes the cache itself), and on CUDA gpu_memory_utilization of the
    device's memory less what the device holds already (the weights, the CUDA context and
    libraries' workspaces, other processes) and `step_peak()`, what the largest step takes
    beyond it (measured by running it). Raises ValueError for a utilization that leaves
    nothing."""
    if cfg.kv_cache_memory_gb is not None:
        return cfg.kv_cache_memory_gb * 2**30
    if device.type != "cuda" or cfg.num_kv_blocks:
        return float(2**30)
    share = cfg.gpu_memory_utilization
    step = step_peak()
    free, total = torch.cuda.mem_get_info(device)
    held = total - free
    budget = share * total - held - step
    gib = 2**30
    if budget < gib / 64:
        raise ValueError(
            f"gpu_memory_utilization {share} ({share * total / gib:.2f} of {total / gib:.2f} "
            f"GiB) leaves {max(budget, 0) / gib:.2f} GiB for the KV cache: the device holds "
            f"{held / gib:.2f} GiB already (the weights, the CUDA context, other processes) and "
            f"the largest step takes {step / gib:.2f} more. Raise gpu_memory_utilization, "
            "lower max_num_batched_tokens, or give kv_cache_memory_gb")
    log.info("KV budget: %.2f GiB (gpu_memory_utilization %.2f of %.2f GiB, less %.2f GiB "
             "held and %.2f GiB for the largest step)", budget / gib, share, total / gib,
             held / gib, step / gib)
    return budget


def kv_pools(model: ModelConfig, cfg: EngineConfig, max_model_len: int, kv_dtype: torch.dtype,
             windowed: frozenset[int], window: SinkWindow | None, budget: float,
             extra_per_block: int = 0) -> BlockManager:
    """The KV pools within `budget` bytes (`kv_budget`): with sink + window layers, theirs
    first, sized for the most blocks max_num_seqs requests hold at once
    (`SinkWindow.pool_blocks`), or where that would leave the full layers less than one
    request's whole context of the budget, the window layers' share of it
    (`_window_share`); the rest of the budget (or num_kv_blocks) goes to the
    full-attention layers' pool, each of its blocks costing `extra_per_block` bytes more
    (a draft model's cache, `Drafter.kv_bytes_per_block`). Where every layer attends to a
    window, its pool is the only one, and as a full-attention pool it takes at most the
    budget (or num_kv_blocks). The scheduler admits and preempts by the free blocks of
    every pool."""
    bs = cfg.block_size
    per_layer = model.kv_block_bytes(bs, kv_dtype)
    window_pool = None
    if window is not None and cfg.enable_prefix_caching is True:
        raise ValueError("prefix caching does not serve sink + window layers (a hybrid "
                         "cache, or the model's own sliding window)")
    full_layers = model.num_layers - len(windowed)
    context = -(-max_model_len // bs) + 1  # (blocks of a whole context)
    if window is not None:
        most = min(window.pool_blocks(cfg.max_num_seqs, cfg.max_num_batched_tokens, bs),
                   cfg.max_num_seqs * context)
        if not full_layers:
            allowed = cfg.num_kv_blocks or int(
                budget // (per_layer * len(windowed) + extra_per_block))
            return BlockManager(0, bs, BlockPool(max(1, min(most, allowed)), bs, window))
        layer_blocks = budget / per_layer
        full_cost = full_layers + extra_per_block / per_layer  # (a full block, in layers')
        if not cfg.num_kv_blocks and layer_blocks - most * len(windowed) < full_cost * context:
            most = min(most, _window_share(window, len(windowed), full_cost, layer_blocks,
                                           context, cfg))
        window_pool = BlockPool(most, bs, window)
    rest = budget - (window_pool.num_blocks * per_layer * len(windowed) if window_pool else 0)
    num_blocks = cfg.num_kv_blocks or int(rest // (per_layer * full_layers + extra_per_block))
    if window_pool is None:
        return BlockManager(max(1, num_blocks), bs,
                            cache_prefixes=cfg.enable_prefix_caching is not False)
    if num_blocks < 1:
        raise ValueError(
            f"the KV budget of {budget / 2**30:.4g} GiB leaves no room for the full-"
            f"attention layers' KV after the window layers' "
            f"{window_pool.num_blocks * per_layer * len(windowed) / 2**30:.2f} GiB "
            "(at least one request's window)")
    return BlockManager(num_blocks, bs, window_pool)


def _window_share(window: SinkWindow, windowed: int, full: float, layer_blocks: float,
                  context: int, cfg: EngineConfig) -> int:
    """Window-pool blocks within a budget of `layer_blocks` blocks of one layer: the
    `windowed` layers' share of what requests of the whole context (`context` blocks) hold
    (a window each in theirs, the context in the `full` layers', which count a draft
    model's cache as layers' worth of it), so that a budget too
    small for max_num_seqs windows serves fewer requests at once rather than none (Gemma 2
    9B's window of 4,096 on 21 layers: 42 GiB of bfloat16 for 64 requests, against the
    default budget of 1 GiB); at least the blocks one request's largest step holds."""
    bs = cfg.block_size
    each = windowed * (window.most_blocks(1, bs) + 1)
    share = each / (each + full * context)
    return max(int(layer_blocks * share / windowed),
               window.most_blocks(cfg.max_num_batched_tokens, bs))
