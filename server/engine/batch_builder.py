"""Flatten a SchedulerOutput into model inputs: token ids, positions, slots, attention groups."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import torch

from kernels import cpu_attention
from kernels.cpu_native import library_in_use
from kernels.switch import Switch
from server.engine.block_manager import SinkWindow, block_slots, window_kwargs
from server.engine.contracts import SchedulerOutput
from server.models.batch import BatchMeta, CpuGroup, PaddedGroup

# Sequences with at most this many query tokens share one padded attention batch on CPU
# (or go to the native kernel, `kernels.cpu_attention.paged_attention`); longer ones (prefill
# chunks) get a group each so padding never multiplies their cost.
SHORT_QUERY = 16
# Where the native kernel runs, a prefill chunk whose sequence has at most this many keys
# with it joins the short queries: the native attention costs more than torch's blocked one
# as the keys grow, but a step of such queries runs its layers in one native call, and each
# row's bits are then its own whatever the chunks (docs/benchmarks, "Prefill chunks through
# the native attention": the default model's prefill 1.13-1.54x from 32 to 512 tokens,
# 0.98-1.04x at 1,024, 0.99-1.01x at 2,048).
NATIVE_PREFILL_KEYS = 1024
_prefill_natively = Switch(True)  # off within `torch_prefill`


def torch_prefill() -> AbstractContextManager[None]:
    """Within it every prefill chunk of more than `SHORT_QUERY` tokens keeps torch's
    attention (side-by-side benchmarks, tests)."""
    return _prefill_natively.off()


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: BatchMeta
    query_start: list[int]
    """Row of each scheduled request's first token in the flat batch (plus the total)."""


def build_inputs(out: SchedulerOutput, block_tables: list[list[list[int]]], block_size: int,
                 device: torch.device, padded_groups: bool,
                 ahead_ids: torch.Tensor | None = None,
                 windows: Sequence[SinkWindow | None] = (None,),
                 native_prefill: bool = False) -> ModelInputs:
    """`block_tables[p][i]`: scheduled request i's blocks in KV pool p, whose layers attend
    with `windows[p]` (`BlockManager.pools`); the first pool's metadata holds the second's
    as `BatchMeta.sparse`. `ahead_ids`: a decode step's token ids on the device, one a
    request, from the step before, which still runs (`ScheduledRequest.ahead`).
    `native_prefill`: the model's attention can run natively (float32 on the CPU), so
    prefill chunks of up to `NATIVE_PREFILL_KEYS` keys go to the native kernel."""
    ids: list[int] = []
    positions: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    for s in out.scheduled:
        r = s.request
        begin = r.num_computed_tokens + s.ahead
        if ahead_ids is None:
            ids.extend((r.all_token_ids + s.spec_token_ids)[begin : begin + s.num_new_tokens])
        positions.extend(range(begin, begin + s.num_new_tokens))
        starts.append(starts[-1] + s.num_new_tokens)
        seq_lens.append(begin + s.num_new_tokens)
    return ModelInputs(
        ahead_ids if ahead_ids is not None else torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(positions, dtype=torch.long, device=device),
        batch_meta(block_tables, positions, seq_lens, starts, block_size, device, padded_groups,
                   windows, native_prefill),
        starts,
    )


def batch_meta(block_tables: list[list[list[int]]], positions: list[int], seq_lens: list[int],
               starts: list[int], block_size: int, device: torch.device, padded_groups: bool,
               windows: Sequence[SinkWindow | None] = (None,),
               native_prefill: bool = False) -> BatchMeta:
    """The attention metadata of a flat batch: sequence i's tokens are rows starts[i] to
    starts[i + 1] at `positions`, and it has seq_lens[i] tokens of context with them;
    `block_tables`, `windows` and `native_prefill` as `build_inputs`'."""
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    start_loc = torch.tensor(starts, dtype=torch.int32)
    metas = [_meta(pool, window, positions, lens, start_loc, block_size, device, padded_groups,
                   native_prefill) for pool, window in zip(block_tables, windows, strict=True)]
    if len(metas) > 1:
        metas[0].sparse = metas[1]
    return metas[0]


def _meta(block_tables: list[list[int]], window: SinkWindow | None, positions: list[int],
          lens: torch.Tensor, start_loc: torch.Tensor, block_size: int, device: torch.device,
          padded_groups: bool, native_prefill: bool) -> BatchMeta:
    """One KV pool's slots, block tables (and CPU groups) for a step."""
    slots: list[int] = []
    starts = start_loc.tolist()
    for i, table in enumerate(block_tables):
        slots += block_slots(table, positions[starts[i]:starts[i + 1]], block_size)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int32)
    groups = (_groups(lens, start_loc, tables, block_size, window, native_prefill)
              if padded_groups else None)
    return BatchMeta(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=tables.to(device),
        seq_lens=lens.to(device),
        query_start_loc=start_loc.to(device),
        groups=groups,
        **window_kwargs(window),
    )


def _groups(lens: torch.Tensor, start_loc: torch.Tensor, tables: torch.Tensor, block_size: int,
            window: SinkWindow | None, native_prefill: bool) -> list[CpuGroup]:
    q_lens = start_loc[1:] - start_loc[:-1]
    is_short = q_lens <= SHORT_QUERY
    if native_prefill and _prefill_natively and library_in_use() is not None:
        is_short |= lens <= NATIVE_PREFILL_KEYS
    short = is_short.nonzero().squeeze(1).tolist()
    long = (~is_short).nonzero().squeeze(1).tolist()
    members = ([short] if short else []) + [[i] for i in long]
    everything = len(members) == 1
    return [CpuGroup(partial(_padded, idx, lens, start_loc, q_lens, tables, block_size, everything,
                             window),
                     cpu_attention.attention_step(tables, lens, start_loc, idx,
                                                  **window_kwargs(window))
                     if idx is short else None)  # (short queries, short sequences' chunks)
            for idx in members]


def _padded(idx: list[int], lens: torch.Tensor, start_loc: torch.Tensor, q_lens: torch.Tensor,
            tables: torch.Tensor, block_size: int, everything: bool,
            window: SinkWindow | None) -> PaddedGroup:
    sel = torch.tensor(idx)
    ql, sl, st = q_lens[sel].long(), lens[sel].long(), start_loc[:-1][sel].long()
    max_q = int(ql.max())
    columns = _columns(sl, ql, block_size, window)
    j = torch.arange(max_q)
    valid = j[None, :] < ql[:, None]  # [S, max_q]
    q_pos = torch.where(valid, sl[:, None] - ql[:, None] + j[None, :], 0)[:, :, None]
    key_pos = (columns[:, None] * block_size + torch.arange(block_size)).reshape(-1)
    mask = key_pos <= q_pos
    if window is not None:
        mask &= (key_pos > q_pos - window.window) | (key_pos < window.num_sinks)
    q_index = torch.where(valid, st[:, None] + j[None, :], st[:, None])
    token_index = None if everything else q_index[valid]
    group_tables = tables[sel][:, columns].long()
    return PaddedGroup(
        token_index=token_index,
        q_index=q_index,
        out_index=valid.flatten().nonzero().squeeze(1),
        block_tables=group_tables,
        mask=mask.unsqueeze(1),
        first_block=_consecutive_from(group_tables),
    )


def _columns(seq_lens: torch.Tensor, q_lens: torch.Tensor, block_size: int,
             window: SinkWindow | None) -> torch.Tensor:
    """The logical blocks a group's queries read: all of them, or with a window the sinks'
    and those from the earliest block any of its queries' windows reaches (the blocks
    between hold nothing a query sees; in the pool they may be holes)."""
    num_blocks = -(-int(seq_lens.max()) // block_size)
    if window is None:
        return torch.arange(num_blocks)
    sinks = -(-window.num_sinks // block_size)
    first = max(0, int((seq_lens - q_lens).min()) - window.window + 1) // block_size
    if first <= sinks:
        return torch.arange(num_blocks)
    return torch.cat([torch.arange(sinks), torch.arange(first, num_blocks)])


def _consecutive_from(tables: torch.Tensor) -> int | None:
    """The first block of a lone sequence whose blocks are consecutive (the block manager's
    FIFO free list hands out runs), else None."""
    if tables.shape[0] != 1:
        return None
    row = tables[0]
    first = int(row[0])
    return first if torch.equal(row, torch.arange(first, first + row.numel())) else None
