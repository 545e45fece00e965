"""A CUDA graph's step inputs (`server.engine.cuda_graphs`): their layout in one flat int64
buffer and its fill on the host, for B sequences of T tokens in all (a decode or
verification graph's B * Q, a prompt graph's T).

The buffer holds ids, positions, slots, then block tables, seq_lens and query_start_loc as
int32 pairs, each 16-byte aligned; a hybrid KV cache adds its sink + window pool's slots and
block tables, whose padding goes to that pool's scratch block. A step fills it on the host
in pinned memory (each input gathered from Python's integers and written with one
assignment: numpy index arrays cost more at these sizes; two buffers take turns) and copies
it to the device with one non-blocking copy, so a graph of (B, T) reads fixed views of it.
"""

from __future__ import annotations

import numpy as np
import torch

from server.engine.block_manager import block_slots


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class GraphInputs:
    """The device buffer of every graph's inputs and the two host buffers filled for it."""

    def __init__(self, block_size: int, scratch_block: int, sparse_scratch: int | None,
                 width: int, largest: tuple[int, int], device: torch.device) -> None:
        """`scratch_block`: the KV pool's; `sparse_scratch`: the sink + window pool's in a
        hybrid cache (its slots and block tables are inputs too), else None. `width`: block
        table entries a sequence; `largest`: the most sequences and tokens of any graph."""
        self.block_size, self.scratch_block = block_size, scratch_block
        self.sparse_scratch, self.width = sparse_scratch, width
        # one int64 buffer holds a step's inputs (`views`), so one copy moves them
        self.dev = torch.zeros(self.layout(*largest)[-1], dtype=torch.long, device=device)
        # two pinned host buffers take turns: a step is filled while the copy of the one
        # before (launched ahead of its predecessor's end) may still wait in the stream
        self.hosts = [torch.zeros_like(self.dev, device="cpu") for _ in range(2)]
        if device.type == "cuda":
            self.hosts = [h.pin_memory() for h in self.hosts]
        self._turn = 0
        self._host_views: dict[tuple[int, int, int], tuple[np.ndarray, ...]] = {}

    def layout(self, b: int, t: int) -> tuple[int, ...]:
        """Offsets in the input buffer (int64 elements) of a (B, T) graph's positions, slots,
        the sparse pool's slots and the int32 part, that part's offsets (int32 elements) of
        the sparse pool's block tables, seq_lens and query_start_loc, and the int64
        elements used: every input starts 16-byte aligned (the sparse pool's inputs take
        no room without one)."""
        sparse = self.sparse_scratch is not None
        pos, slots = _up(t, 2), 2 * _up(t, 2)
        sparse_slots = 3 * _up(t, 2)
        part = sparse_slots + sparse * _up(t, 2)
        sparse_tables = _up(b * self.width, 4)
        lens = sparse_tables + sparse * _up(b * self.width, 4)
        qsl = lens + _up(b, 4)
        return pos, slots, sparse_slots, part, sparse_tables, lens, qsl, part + (qsl + _up(b + 1, 4)) // 2

    def views(self, b: int, t: int, buffer: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, ...]:
        """ids, positions, slots, block_tables, seq_lens, query_start_loc of a (B, T) graph:
        views of `buffer` (default the device buffer) laid out by `layout`."""
        w = self.width
        pos, slots, _, part, _, lens, qsl, used = self.layout(b, t)
        d64 = self.dev if buffer is None else buffer
        d32 = d64[part:used].view(torch.int32)
        return (d64[:t], d64[pos:pos + t], d64[slots:slots + t], d32[:b * w].view(b, w),
                d32[lens:lens + b], d32[qsl:qsl + b + 1])

    def sparse_views(self, b: int, t: int, buffer: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sparse pool's slots and block tables of a (B, T) graph (as `views`)."""
        w = self.width
        _, _, slots, part, tables, _, _, used = self.layout(b, t)
        d64 = self.dev if buffer is None else buffer
        d32 = d64[part:used].view(torch.int32)
        return d64[slots:slots + t], d32[tables:tables + b * w].view(b, w)

    def fill(self, b: int, q: int, starts: list[int], ids: list[list[int]],
              tables: list[list[int]], sparse_tables: list[list[int]] | None = None) -> None:
        """Write a decode or verification step's inputs (real sequences, each padded to Q
        tokens with id 0 at the next positions and KV in the scratch block; then padding
        sequences: ids 0, positions 0..Q-1, KV in the scratch block) and copy them to the
        device in one copy."""
        views, pools = self._host(b, b * q, tables, sparse_tables)
        if q == 1:
            self._fill_decode(b, starts, ids, pools, views)
        else:
            self._fill_padded(b, q, starts, ids, pools, views)
        self._copy(b, b * q)

    def fill_prompts(self, b: int, t: int, starts: list[int], ids: list[list[int]],
                     tables: list[list[int]], sparse_tables: list[list[int]] | None = None
                     ) -> None:
        """Write the inputs of a step of any query lengths (a prompt graph's: sequence i
        computes ids[i] from position starts[i], the sequences' tokens back to back) and
        copy them to the device in one copy. The step is padded to B sequences and T
        tokens: padding sequences of one token (id 0, position 0, KV in the scratch block),
        the last of which takes every padding token left (positions 0, 1, ...), so there is
        at least one: B > len(starts)."""
        n, bs = len(starts), self.block_size
        real = sum(len(row) for row in ids)
        rest = t - real - (b - n - 1)  # the last padding sequence's tokens
        if n >= b or rest < 1:
            raise ValueError(f"{n} sequences of {real} tokens do not fit a ({b}, {t}) step")
        views, pools = self._host(b, t, tables, sparse_tables)
        h_ids, h_pos, _, _, h_lens, h_qsl = views[:6]
        flat_ids: list[int] = []
        flat_pos: list[int] = []
        for start, row in zip(starts, ids, strict=True):
            flat_ids += row
            flat_pos += range(start, start + len(row))
        h_ids[:real], h_pos[:real], h_ids[real:] = flat_ids, flat_pos, 0
        h_pos[real:t - rest], h_pos[t - rest:] = 0, np.arange(rest)
        h_lens[:n] = [start + len(row) for start, row in zip(starts, ids, strict=True)]
        h_lens[n:], h_lens[b - 1] = 1, rest
        h_qsl[:n + 1] = np.cumsum([0] + [len(row) for row in ids])
        h_qsl[n + 1:] = real + np.arange(1, b - n + 1)
        h_qsl[b] = t
        for tables_, scratch, h_slots, h_tables in pools:
            flat_slots: list[int] = []
            for i, (table, start, row) in enumerate(zip(tables_, starts, ids, strict=True)):
                h_tables[i, :len(table)] = table
                flat_slots += block_slots(table, range(start, start + len(row)), bs)
            h_tables[n:, 0] = scratch
            h_tables[b - 1, :-(-rest // bs)] = scratch
            h_slots[:real] = flat_slots
            h_slots[real:t - rest] = scratch * bs
            h_slots[t - rest:] = scratch * bs + np.arange(rest) % bs
        self._copy(b, t)

    def _host(self, b: int, t: int, tables: list[list[int]],
              sparse_tables: list[list[int]] | None
              ) -> tuple[tuple[np.ndarray, ...], list[tuple]]:
        """Take the next host buffer: numpy views of a (B, T) step's inputs in it (made once
        a shape), and each pool's tables, scratch block, and views of its slots and block
        tables."""
        self._turn ^= 1
        host = self.hosts[self._turn]
        views = self._host_views.get((self._turn, b, t))
        if views is None:
            views = tuple(v.numpy() for v in self.views(b, t, host))
            if self.sparse_scratch is not None:
                views += tuple(v.numpy() for v in self.sparse_views(b, t, host))
            self._host_views[(self._turn, b, t)] = views
        pools = [(tables, self.scratch_block, views[2], views[3])]
        if self.sparse_scratch is not None:
            pools.append((sparse_tables or [], self.sparse_scratch, views[6], views[7]))
        return views, pools

    def _copy(self, b: int, t: int) -> None:
        """The filled host buffer's (B, T) inputs to the device, in one non-blocking copy."""
        used = self.layout(b, t)[-1]
        self.dev[:used].copy_(self.hosts[self._turn][:used], non_blocking=True)

    def _fill_decode(self, b: int, starts: list[int], ids: list[list[int]],
                     pools: list[tuple], views: tuple[np.ndarray, ...]) -> None:
        """`_fill_padded` of a decode step (Q = 1) from Python's integers, without its
        index arrays: a token's slot is in its own blocks, so no block entry past them is
        read (on this repo's CPU: 8.8 against 21.8 us at batch 1, 25 against 46 at 16)."""
        n, bs = len(starts), self.block_size
        h_ids, h_pos, _, _, h_lens, h_qsl = views[:6]
        for tables, scratch, h_slots, h_tables in pools:
            for i, table in enumerate(tables):
                h_tables[i, :len(table)] = table
            h_tables[n:, 0] = scratch
            h_slots[:n] = [table[s // bs] * bs + s % bs
                           for table, s in zip(tables, starts, strict=True)]
            h_slots[n:] = scratch * bs
        h_ids[:n] = [row[0] for row in ids]
        h_pos[:n] = starts
        h_lens[:n] = [s + 1 for s in starts]
        h_ids[n:], h_pos[n:], h_lens[n:] = 0, 0, 1
        h_qsl[:] = np.arange(b + 1)

    def _fill_padded(self, b: int, q: int, starts: list[int], ids: list[list[int]],
                     pools: list[tuple], views: tuple[np.ndarray, ...]) -> None:
        """`fill`'s writes for any Q: each input gathered in a Python list, then written
        with one assignment (in a 16-request verification step through a stand-in for the
        replay, 160-194 us against 242-274 with numpy index arrays for each input)."""
        n, bs = len(starts), self.block_size
        h_ids, h_pos, _, _, h_lens, h_qsl = views[:6]
        flat_ids: list[int] = []
        flat_pos: list[int] = []
        for start, row in zip(starts, ids, strict=True):
            flat_ids += row
            flat_ids += [0] * (q - len(row))
            flat_pos += range(start, start + q)
        for tables, scratch, h_slots, h_tables in pools:
            flat_slots: list[int] = []
            for i, (table, start, row) in enumerate(zip(tables, starts, ids, strict=True)):
                h_tables[i, :len(table)] = table
                end = -(-(start + q) // bs)
                if end > len(table):  # padding tokens past the request's blocks read the
                    # scratch block (the rest of the row holds what other shapes left there)
                    h_tables[i, len(table):end] = scratch
                positions = range(start, start + q)
                flat_slots += block_slots(table, positions[:len(row)], bs)
                flat_slots += [scratch * bs + p % bs for p in positions[len(row):]]
            h_tables[n:, :-(-q // bs)] = scratch
            h_slots[:n * q] = flat_slots
            h_slots[n * q:].reshape(b - n, q)[:] = scratch * bs + np.arange(q) % bs
        t = n * q
        h_ids[:t], h_pos[:t] = flat_ids, flat_pos
        h_ids[t:] = 0
        h_pos[t:].reshape(b - n, q)[:] = np.arange(q)
        h_lens[:n] = [start + q for start in starts]
        h_lens[n:] = q
        h_qsl[:] = np.arange(b + 1) * q
