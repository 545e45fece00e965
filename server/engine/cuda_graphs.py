"""CUDA graphs for decode and verification steps, one per (batch-size bucket, query length).

A step is graphable when every scheduled request computes exactly its newest token plus its
draft tokens (q_len = 1 + drafts, the same Q for all; Q = 1 is plain decode) and the batch
fits a bucket (1, 2, 4, ..., 64). The batch is padded to the bucket with dummy sequences of
Q tokens that write their KV into a scratch block the block manager never hands out, so a
replay has static shapes: B * Q tokens, B sequences, a block table as wide as the longest
allowed sequence. The forward, the LM head (logits of every token; in such a step every
token's logits are sampled) and the greedy token of every row (`kernels.triton_argmax`, so
plain greedy steps need no launch after the replay) are captured together. Inputs travel in
two flat buffers (int64: ids, positions, slots; int32: block tables, seq_lens,
query_start_loc) filled on the host in pinned memory and copied with one non-blocking copy
each; nothing in a step syncs with the device except reading its results back (the tokens
for plain greedy steps, else the logits).

Decode graphs (Q = 1) are captured for every bucket at start; verification graphs on first
use (capturing replays the step's own inputs, whose KV writes are idempotent). All graphs
share one memory pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.engine.contracts import SchedulerOutput
from server.models.batch import BatchMeta

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [B * Q, hidden]
    logits: torch.Tensor  # [B * Q, vocab] float32
    tokens: torch.Tensor  # [B * Q] int64, the argmax of each row of logits


class CudaGraphRunner:
    """Captures and replays the model for graphable steps (see module docs)."""

    def __init__(self, model: torch.nn.Module, block_size: int, scratch_block: int,
                 max_model_len: int, max_batch: int, max_query_len: int = 8) -> None:
        self.model = model
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.buckets = [b for b in BUCKETS if b < max_batch] + [
            next((b for b in BUCKETS if b >= max_batch), BUCKETS[-1])]
        self.max_query_len = max_query_len
        self.width = -(-max_model_len // block_size)
        b, t = self.buckets[-1], self.buckets[-1] * max_query_len
        device = next(iter(model.kv_caches))[0].device
        self.dev64 = torch.zeros(3 * t, dtype=torch.long, device=device)
        self.dev32 = torch.zeros(b * self.width + 2 * b + 1, dtype=torch.int32, device=device)
        self.host64 = torch.zeros(3 * t, dtype=torch.long).pin_memory()
        self.host32 = torch.zeros_like(self.dev32, device="cpu").pin_memory()
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool: tuple | None = None

    def capture_decode(self) -> None:
        """Capture every Q = 1 bucket, largest first (so smaller ones reuse its pool)."""
        for b in reversed(self.buckets):
            self._fill(b, 1, [], [], [])
            self._capture(b, 1)

    def key(self, out: SchedulerOutput) -> tuple[int, int] | None:
        """(bucket, Q) when the step is graphable, else None."""
        scheduled = out.scheduled
        if not scheduled or len(scheduled) > self.buckets[-1]:
            return None
        q = scheduled[0].num_new_tokens
        if q > self.max_query_len or not all(
            s.reaches_end and s.num_new_tokens == q == len(s.spec_token_ids) + 1
            for s in scheduled
        ):
            return None
        return next(b for b in self.buckets if b >= len(scheduled)), q

    def run(self, out: SchedulerOutput, tables: list[list[int]]
            ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Replay for a graphable step: (query_start, hidden [T, h], logits [T, vocab],
        greedy tokens [T]) of its real tokens (views of static buffers, valid until the next
        replay); else None."""
        key = self.key(out)
        if key is None:
            return None
        b, q = key
        starts: list[int] = []
        ids: list[list[int]] = []
        for s in out.scheduled:
            begin = s.request.num_computed_tokens
            ids.append((s.request.all_token_ids + s.spec_token_ids)[begin:begin + q])
            starts.append(begin)
        hidden, logits, tokens = self.step(b, q, starts, ids, tables)
        t = len(out.scheduled) * q
        return list(range(0, t + 1, q)), hidden[:t], logits[:t], tokens[:t]

    def step(self, b: int, q: int, starts: list[int], ids: list[list[int]],
             tables: list[list[int]], graphed: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of len(starts) <= b sequences, each computing q tokens from position
        starts[i] (ids[i] its q token ids); hidden [b * q, h], logits [b * q, vocab] and the
        greedy tokens [b * q]. `graphed=False` runs the same padded step eagerly (for
        comparisons)."""
        self._fill(b, q, starts, ids, tables)
        if not graphed:
            return self._forward(b, q)
        graph = self.graphs.get((b, q)) or self._capture(b, q)
        graph.graph.replay()
        return graph.hidden, graph.logits, graph.tokens

    def _views(self, b: int, q: int) -> tuple[torch.Tensor, ...]:
        """ids, positions, slots, block_tables, seq_lens, query_start_loc of a (B, Q) graph."""
        t, w = b * q, self.width
        d64, d32 = self.dev64, self.dev32
        return (d64[:t], d64[t:2 * t], d64[2 * t:3 * t], d32[:b * w].view(b, w),
                d32[b * w:b * w + b], d32[b * w + b:b * w + 2 * b + 1])

    def _fill(self, b: int, q: int, starts: list[int], ids: list[list[int]],
              tables: list[list[int]]) -> None:
        """Write a step's inputs (real sequences, then padding) and copy them to the device."""
        t, w, bs = b * q, self.width, self.block_size
        h64, h32 = self.host64.numpy(), self.host32.numpy()
        offs = np.arange(q)
        for i in range(b):
            rows = slice(i * q, (i + 1) * q)
            if i < len(starts):
                pos = starts[i] + offs
                table = np.asarray(tables[i])
                h64[rows] = ids[i]
                h32[i * w:i * w + len(table)] = table
                h64[2 * t + i * q:2 * t + (i + 1) * q] = table[pos // bs] * bs + pos % bs
            else:
                pos = offs
                h64[rows] = 0
                h32[i * w:i * w + -(-q // bs)] = self.scratch_block
                h64[2 * t + i * q:2 * t + (i + 1) * q] = self.scratch_slot + pos % bs
            h64[t + i * q:t + (i + 1) * q] = pos
            h32[b * w + i] = pos[-1] + 1
        h32[b * w + b:b * w + 2 * b + 1] = np.arange(b + 1) * q
        self.dev64[:3 * t].copy_(self.host64[:3 * t], non_blocking=True)
        n32 = b * w + 2 * b + 1
        self.dev32[:n32].copy_(self.host32[:n32], non_blocking=True)

    def _forward(self, b: int, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from kernels.triton_argmax import greedy_tokens  # CUDA only: triton is optional

        ids, positions, slots, tables, lens, qsl = self._views(b, q)
        hidden = self.model(ids, positions, BatchMeta(slots, tables, lens, qsl))
        logits = self.model.compute_logits(hidden)
        return hidden, logits, greedy_tokens(logits)

    def _capture(self, b: int, q: int) -> _Graph:
        """Warm up (compiles and autotunes kernels), then capture; inputs are already filled."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b, q)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden, logits, tokens = self._forward(b, q)
        self.pool = graph.pool()
        self.graphs[(b, q)] = _Graph(graph, hidden, logits, tokens)
        return self.graphs[(b, q)]
