"""Flatten a SchedulerOutput into model inputs: token ids, positions, slots, attention groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.contracts import SchedulerOutput
from server.models.batch import BatchMeta, PaddedGroup

# Sequences with at most this many query tokens share one padded attention batch on CPU;
# longer ones (prefill chunks) get a group each so padding never multiplies their cost.
SHORT_QUERY = 16


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: BatchMeta
    query_start: list[int]
    """Row of each scheduled request's first token in the flat batch (plus the total)."""


def build_inputs(out: SchedulerOutput, block_tables: list[list[int]], block_size: int,
                 device: torch.device, padded_groups: bool,
                 ahead_ids: torch.Tensor | None = None) -> ModelInputs:
    """`ahead_ids`: a decode step's token ids on the device, one a request, from the step
    before, which still runs (`ScheduledRequest.ahead`)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    for s, table in zip(out.scheduled, block_tables, strict=True):
        r = s.request
        begin = r.num_computed_tokens + s.ahead
        if ahead_ids is None:
            ids.extend((r.all_token_ids + s.spec_token_ids)[begin : begin + s.num_new_tokens])
        pos = range(begin, begin + s.num_new_tokens)
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        starts.append(starts[-1] + s.num_new_tokens)
        seq_lens.append(begin + s.num_new_tokens)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    start_loc = torch.tensor(starts, dtype=torch.int32)
    groups = _groups(lens, start_loc, tables, block_size) if padded_groups else None
    meta = BatchMeta(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=tables.to(device),
        seq_lens=lens.to(device),
        query_start_loc=start_loc.to(device),
        groups=groups,
    )
    return ModelInputs(
        ahead_ids if ahead_ids is not None else torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(positions, dtype=torch.long, device=device),
        meta,
        starts,
    )


def _groups(lens: torch.Tensor, start_loc: torch.Tensor, tables: torch.Tensor, block_size: int) -> list[PaddedGroup]:
    q_lens = start_loc[1:] - start_loc[:-1]
    short = (q_lens <= SHORT_QUERY).nonzero().squeeze(1).tolist()
    long = (q_lens > SHORT_QUERY).nonzero().squeeze(1).tolist()
    members = ([short] if short else []) + [[i] for i in long]
    everything = len(members) == 1
    return [_group(idx, lens, start_loc, q_lens, tables, block_size, everything) for idx in members]


def _group(idx: list[int], lens: torch.Tensor, start_loc: torch.Tensor, q_lens: torch.Tensor,
           tables: torch.Tensor, block_size: int, everything: bool) -> PaddedGroup:
    sel = torch.tensor(idx)
    ql, sl, st = q_lens[sel].long(), lens[sel].long(), start_loc[:-1][sel].long()
    max_q = int(ql.max())
    num_blocks = -(-int(sl.max()) // block_size)
    j = torch.arange(max_q)
    valid = j[None, :] < ql[:, None]  # [S, max_q]
    q_pos = torch.where(valid, sl[:, None] - ql[:, None] + j[None, :], 0)
    key_pos = torch.arange(num_blocks * block_size)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]
    q_index = torch.where(valid, st[:, None] + j[None, :], st[:, None])
    token_index = None if everything else q_index[valid]
    group_tables = tables[sel, :num_blocks].long()
    return PaddedGroup(
        token_index=token_index,
        q_index=q_index,
        out_index=valid.flatten().nonzero().squeeze(1),
        block_tables=group_tables,
        mask=mask.unsqueeze(1),
        first_block=_consecutive_from(group_tables),
    )


def _consecutive_from(tables: torch.Tensor) -> int | None:
    """The first block of a lone sequence whose blocks are consecutive (the block manager's
    FIFO free list hands out runs), else None."""
    if tables.shape[0] != 1:
        return None
    row = tables[0]
    first = int(row[0])
    return first if torch.equal(row, torch.arange(first, first + row.numel())) else None
