"""CUDA graphs for decode and verification steps, one per (batch-size bucket, query bucket).

A step is graphable when every scheduled request computes exactly its newest token plus its
draft tokens (1 + drafts tokens; Q = 1 for all is plain decode) and the batch fits a bucket
(1, 2, 4, ..., 64). Q is the step's largest count rounded up to a query bucket (1, 2, 3, 5,
9, 17, ... up to 1 + the most drafts): a request with fewer tokens is padded
at the end to Q with tokens whose KV goes to a scratch block the block manager never hands
out (causal attention keeps its real tokens from seeing them; the padding rows' outputs
are not read), and the batch is padded to the bucket with dummy sequences of Q tokens, all
in the scratch block. So a replay has static shapes: B * Q tokens, B sequences, a block
table as wide as the longest allowed sequence, and a verification step whose requests
drafted different numbers of tokens (n-gram lookups find 0 to k) is still graphed. The
forward, the LM head (logits of every token; in such a step every token's logits are
sampled) and the greedy token of every row (`kernels.triton_argmax`, so
plain greedy steps need no launch after the replay) are captured together. Inputs travel in
one flat int64 buffer filled on the host and copied with one non-blocking copy
(`server.engine.graph_inputs`); a decode step launched before the step it follows has
ended takes its token ids from that step's tokens, on the device. Nothing in a step syncs with the device except
reading its results back (the tokens for plain greedy steps, else the logits).

With a drafter that drafts on the device alone (`Drafter.device_drafts`: the draft head),
a verification graph (Q > 1) also verifies its drafts greedily and drafts each sequence's
next step from the row after its accepted drafts (`_advance`): the next step's token ids,
positions and lengths, on the device. The next verification step can then be launched
before this one ends (`advance`): its block tables come from the host, as always, and its
KV slots are computed from them on the device (`_take_next`).

A step that takes in prompts (prefill chunks, alone or beside decoding and verifying
requests) replays a prompt graph where it fits one (`run_prompts`): the model's forward
alone over T tokens of the largest batch + 1 sequences, T one of `prompt_buckets`. Its
sequences' tokens lie back to back; padding sequences of one token (in the scratch
block) fill the batch, the last of them taking every padding token left, so the
attention's grid (one row of programs a sequence, as many query tiles as the longest
sequence could have: `kernels.triton_attention`) is the same in every such step. The LM
head and sampling then run as in an eager step, on the rows that sample. Run eagerly, a
step of the default model costs the host ~16-22 ms whatever its size (~1,500 kernel
launches: docs/benchmarks/gpu.md, session 44), a graphed decode step ~1.3 ms.

Every graph is captured at start (`capture_all`; a capture while serving stalls every
request for the capture, and for Triton's autotuning of a new row count, seconds with
packed weights) and replayed once there, which uploads it to the device. All graphs share
one memory pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from typing import TypeVar

import torch

from server.engine.block_manager import SinkWindow, window_kwargs
from server.engine.contracts import SchedulerOutput
from server.engine.graph_inputs import GraphInputs
from server.engine.request import Request
from server.models.batch import BatchMeta

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_Out = TypeVar("_Out")


def prompt_buckets(max_tokens: int, seqs: int, max_model_len: int) -> tuple[int, ...]:
    """Token counts of prompt graphs for steps of up to `max_tokens` real tokens padded to
    `seqs` sequences: powers of two below 1,024 that hold the padding sequences, then
    multiples of 512, the last just enough for `max_tokens` and one padding sequence
    beside one real one (seqs - 1 padding tokens); none past `max_model_len` (the
    padding's positions). (), with `max_tokens` 0."""
    if max_tokens <= 0:
        return ()
    top = max_tokens + seqs - 1
    small = (2 ** i for i in range(seqs.bit_length(), 10))
    large = range(1024, top, 512)
    return tuple(t for t in (*small, *large, top) if seqs <= t <= top and t <= max_model_len)


def query_buckets(max_query_len: int) -> tuple[int, ...]:
    """1, 2, 3, 5, 9, 17, ... (2^i + 1: verification of 2^i drafts), up to max_query_len,
    which is one too."""
    qs = {1, max_query_len}
    qs.update(q for q in (2 ** i + 1 for i in range(max_query_len.bit_length()))
              if q < max_query_len)
    return tuple(sorted(qs))


@dataclass
class Replay:
    """A replayed step's results: views of the graph's static buffers, valid until the next
    replay, holding the real sequences' Q rows each."""

    key: tuple[int, int]
    """(bucket, Q): the step computed bucket * Q tokens."""
    ends: list[int]
    """The end of each request's rows (row i * Q + its token count)."""
    hidden: torch.Tensor  # [T, hidden]
    logits: torch.Tensor  # [T, vocab] float32
    tokens: torch.Tensor  # [T] int64, the argmax of each row
    next_ids: torch.Tensor | None = None
    """[T] with `draft`, in a step that verified Q - 1 drafts of every sequence: each
    sequence's next input tokens (its greedy token after the drafts it accepted, then the
    Q - 1 drafts that follow it), as the successor launched with `advance` takes them."""


@dataclass
class _Next:
    """A verification step's successor's inputs, computed on the device (`_advance`): each
    sequence's Q token ids and positions, and its length after them."""

    ids: torch.Tensor  # [B * Q] int64
    positions: torch.Tensor  # [B * Q] int64
    seq_lens: torch.Tensor  # [B] int32


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [B * Q, hidden]
    logits: torch.Tensor  # [B * Q, vocab] float32
    tokens: torch.Tensor  # [B * Q] int64, the argmax of each row of logits
    next: _Next | None  # (with `draft`, Q > 1)


class CudaGraphRunner:
    """Captures and replays the model for graphable steps (see module docs)."""

    def __init__(self, model: torch.nn.Module, block_size: int, scratch_block: int,
                 max_model_len: int, max_batch: int, max_query_len: int,
                 window: SinkWindow | None = None,
                 sparse: tuple[int, SinkWindow] | None = None,
                 draft: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
                 prompt_tokens: int = 0) -> None:
        """`scratch_block` and `window`: the KV pool's (`BlockManager.pools[0]`); `sparse`:
        in a hybrid cache, the sink + window layers' pool's scratch block and window
        (`BatchMeta.sparse`), whose slots and block tables a step's inputs hold too.
        `draft`: a drafter's device loop (`Drafter.device_drafts`); graphs of Q > 1 then
        also verify the step's drafts greedily and draft the next step (`_advance`).
        `prompt_tokens`: steps that take in prompts replay prompt graphs up to this many
        tokens (0: none; `prompt_buckets`)."""
        self.model = model
        self.draft = draft
        self.next: _Next | None = None
        """The last step's successor's inputs (`_advance`), for a step with `advance`."""
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.window = window
        self.sparse = sparse
        self.buckets = [b for b in BUCKETS if b < max_batch] + [
            next((b for b in BUCKETS if b >= max_batch), BUCKETS[-1])]
        self.query_buckets = query_buckets(max_query_len)
        self.max_model_len = max_model_len
        self.width = -(-max_model_len // block_size)
        self.prompt_seqs = max_batch + 1  # (at least one padding sequence)
        self.prompt_buckets = prompt_buckets(prompt_tokens, self.prompt_seqs, max_model_len)
        b, t = self.buckets[-1], self.buckets[-1] * self.query_buckets[-1]
        self.inputs = GraphInputs(
            block_size, scratch_block, None if sparse is None else sparse[0], self.width,
            (max(b, self.prompt_seqs), max(t, *self.prompt_buckets, 0)),
            next(iter(model.kv_caches))[0].device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.prompt_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: tuple | None = None

    def capture_all(self) -> None:
        """Capture every prompt graph and every (bucket, Q), largest first (so smaller ones
        reuse its pool)."""
        for t in reversed(self.prompt_buckets):
            self.inputs.fill_prompts(self.prompt_seqs, t, [], [], [])
            self._capture_prompts(t)
        for q in reversed(self.query_buckets):
            for b in reversed(self.buckets):
                self.inputs.fill(b, q, [], [], [])
                self._capture(b, q)

    def key(self, out: SchedulerOutput) -> tuple[int, int] | None:
        """(bucket, Q) when the step is graphable, else None."""
        scheduled = out.scheduled
        if not scheduled or len(scheduled) > self.buckets[-1] or not all(
                s.reaches_end and s.num_new_tokens == len(s.spec_token_ids) + 1
                for s in scheduled):
            return None
        most = max(s.num_new_tokens for s in scheduled)
        q = next((q for q in self.query_buckets if q >= most), None)
        # (padding tokens take the positions after a request's own: within the RoPE tables)
        if q is None or any(s.request.num_computed_tokens + s.ahead + q > self.max_model_len
                            for s in scheduled):
            return None
        return next(b for b in self.buckets if b >= len(scheduled)), q

    def prompt_key(self, out: SchedulerOutput) -> int | None:
        """The token count of the prompt graph a step fits (its tokens, and one padding
        token for each sequence it lacks of `prompt_seqs`), else None; for steps that
        `key` does not graph (with prompts, or past its query buckets), and not for steps
        launched ahead (their token ids are on the device)."""
        scheduled = out.scheduled
        if not self.prompt_buckets or len(scheduled) >= self.prompt_seqs or any(
                s.ahead for s in scheduled):
            return None
        need = sum(s.num_new_tokens for s in scheduled) + self.prompt_seqs - len(scheduled)
        return next((t for t in self.prompt_buckets if t >= need), None)

    def run_prompts(self, out: SchedulerOutput, tables: list[list[int]],
                    sparse_tables: list[list[int]] | None = None, graphed: bool = True
                    ) -> tuple[torch.Tensor, list[int]] | None:
        """The model's forward over a step through a prompt graph (captured first if new):
        the hidden states of its tokens (a view of the graph's buffer, valid until its
        next replay) and where each request's rows end; None where it fits none
        (`prompt_key`). `graphed=False` runs the same padded step eagerly (for
        comparisons). `tables`, `sparse_tables`: as `run`'s."""
        t = self.prompt_key(out)
        if t is None:
            return None
        starts = [s.request.num_computed_tokens for s in out.scheduled]
        ids = [(s.request.all_token_ids + s.spec_token_ids)[start:start + s.num_new_tokens]
               for s, start in zip(out.scheduled, starts, strict=True)]
        self.inputs.fill_prompts(self.prompt_seqs, t, starts, ids, tables, sparse_tables)
        if graphed:
            graph, hidden = self.prompt_graphs.get(t) or self._capture_prompts(t)
            graph.replay()
        else:
            hidden = self._model(self.prompt_seqs, t)
        ends = list(accumulate(len(row) for row in ids))
        return hidden[:ends[-1]], ends

    def run(self, out: SchedulerOutput, tables: list[list[int]],
            ahead_ids: torch.Tensor | None = None,
            sparse_tables: list[list[int]] | None = None, advance: bool = False
            ) -> Replay | None:
        """Replay (capturing first if new) a graphable step; None for any other step.
        `ahead_ids`: a decode step's token ids on the device, from the step before, which
        still runs (`ScheduledRequest.ahead`). `advance`: a verification step whose inputs
        the step before, still running, computed on the device (`Replay.next_ids`): same
        requests, same Q. `sparse_tables`: the requests' blocks in the sink + window
        layers' pool (with `sparse`)."""
        key = self.key(out)
        if key is None:
            if advance:  # (its inputs exist only on the device: no eager step can take them)
                raise ValueError("a verification step launched ahead must be graphable")
            return None
        b, q = key
        # (a graphable step computes each request's newest token and its drafts)
        starts = [s.request.num_computed_tokens + s.ahead for s in out.scheduled]
        if ahead_ids is None and not advance:
            ids = [[_newest(s.request), *s.spec_token_ids] for s in out.scheduled]
        else:  # (written on the device: `step`)
            ids = [[0] * (1 + len(s.spec_token_ids)) for s in out.scheduled]
        hidden, logits, tokens = self.step(b, q, starts, ids, tables, ahead_ids=ahead_ids,
                                           sparse_tables=sparse_tables, advance=advance)
        t = len(out.scheduled) * q
        verified = self.next is not None and all(len(row) == q for row in ids)
        return Replay(key, [i * q + len(row) for i, row in enumerate(ids)], hidden[:t],
                      logits[:t], tokens[:t], self.next.ids[:t] if verified else None)

    def step(self, b: int, q: int, starts: list[int], ids: list[list[int]],
             tables: list[list[int]], graphed: bool = True,
             ahead_ids: torch.Tensor | None = None,
             sparse_tables: list[list[int]] | None = None, advance: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of len(starts) <= b sequences, each computing 1..q tokens from position
        starts[i] (ids[i] its token ids; padded to q); hidden [b * q, h], logits [b * q,
        vocab] and the greedy tokens [b * q], sequence i's rows from i * q; with `draft`
        and q > 1, `next` holds the successor's inputs. `graphed=False` runs the same
        padded step eagerly (for comparisons). `ahead_ids` (q = 1): the sequences' token
        ids on the device instead of ids'. `advance`: the real sequences' ids, positions,
        slots and lengths are the last step's `next` (the host's `starts` then only bound
        them: blocks are read up to starts[i] + q). `sparse_tables`: as `run`'s."""
        self.inputs.fill(b, q, starts, ids, tables, sparse_tables)
        if ahead_ids is not None:
            self.inputs.dev[: len(starts)].copy_(ahead_ids)
        if advance:
            self._take_next(b, q, len(starts))
        if not graphed:
            hidden, logits, tokens, self.next = self._forward(b, q)
            return hidden, logits, tokens
        graph = self.graphs.get((b, q)) or self._capture(b, q)
        graph.graph.replay()
        self.next = graph.next
        return graph.hidden, graph.logits, graph.tokens

    def _take_next(self, b: int, q: int, n: int) -> None:
        """Write the last step's `next` of the first n sequences into a (b, q) step's inputs,
        and their KV slots from the step's block tables (filled now: the blocks of the new
        positions may be younger than the step that computed them), on the device, queued
        behind that step."""
        nxt = self.next
        if nxt is None or nxt.ids.numel() != b * q:
            raise ValueError(f"no successor inputs of a ({b}, {q}) verification step to take")
        ids, positions, slots, tables, seq_lens, _ = self.inputs.views(b, b * q)
        t, bs = n * q, self.block_size
        ids[:t].copy_(nxt.ids[:t])
        positions[:t].copy_(nxt.positions[:t])
        seq_lens[:n].copy_(nxt.seq_lens[:n])
        pos = nxt.positions[:t].view(n, q)
        block, offset = pos // bs, (pos % bs).flatten()
        slots[:t].copy_(tables[:n].gather(1, block).flatten() * bs + offset)
        if self.sparse is not None:
            sparse_slots, sparse_tables = self.inputs.sparse_views(b, b * q)
            sparse_slots[:t].copy_(sparse_tables[:n].gather(1, block).flatten() * bs + offset)

    def _model(self, b: int, t: int) -> torch.Tensor:
        """The model's forward over the (B, T) inputs: hidden [T, hidden]."""
        ids, positions, slots, tables, lens, qsl = self.inputs.views(b, t)
        meta = BatchMeta(slots, tables, lens, qsl, **window_kwargs(self.window))
        if self.sparse is not None:
            meta.sparse = BatchMeta(*self.inputs.sparse_views(b, t), lens, qsl,
                                    **window_kwargs(self.sparse[1]))
        return self.model(ids, positions, meta)

    def _forward(self, b: int, q: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Next | None]:
        from kernels.triton_argmax import greedy_tokens  # CUDA only: triton is optional

        hidden = self._model(b, b * q)
        logits = self.model.compute_logits(hidden)
        tokens = greedy_tokens(logits)
        nxt = None
        if self.draft is not None and q > 1:
            nxt = self._advance(b, q, hidden, tokens)
        return hidden, logits, tokens, nxt

    def _advance(self, b: int, q: int, hidden: torch.Tensor, tokens: torch.Tensor) -> _Next:
        """Verify each sequence's q - 1 drafts greedily on the device and draft its next
        step: it accepts the drafts its greedy tokens repeat, up to the first that differs;
        its next step computes the greedy token after them and q - 1 drafts from that row
        (`draft`), at the positions that follow. The host makes the same choice from the
        same tokens (`drafters.verify.verify_greedy`). A sequence that drafted fewer has
        padding in their place: its `next` is not used (`Replay.next_ids` is None)."""
        ids, positions = self.inputs.views(b, b * q)[:2]
        greedy, drafted = tokens.view(b, q), ids.view(b, q)
        accepted = (greedy[:, :-1] == drafted[:, 1:]).long().cumprod(1).sum(1)  # [b]
        rows = torch.arange(b, device=tokens.device) * q + accepted
        first = tokens[rows]
        drafts = self.draft(hidden[rows], first, q - 1)  # [b, q - 1]
        start = positions.view(b, q)[:, 0] + accepted + 1
        pos = start[:, None] + torch.arange(q, device=tokens.device)  # [b, q]
        return _Next(torch.cat([first[:, None], drafts], 1).flatten(), pos.flatten(),
                     (start + q).int())

    def _capture(self, b: int, q: int) -> _Graph:
        """A (bucket, Q) graph; inputs are already filled."""
        graph, (hidden, logits, tokens, nxt) = self._captured(partial(self._forward, b, q))
        self.graphs[(b, q)] = _Graph(graph, hidden, logits, tokens, nxt)
        return self.graphs[(b, q)]

    def _capture_prompts(self, t: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The prompt graph of `t` tokens; inputs are already filled."""
        self.prompt_graphs[t] = self._captured(partial(self._model, self.prompt_seqs, t))
        return self.prompt_graphs[t]

    def _captured(self, forward: Callable[[], _Out]) -> tuple[torch.cuda.CUDAGraph, _Out]:
        """Warm up (compiles and autotunes kernels), then capture `forward` into a graph of
        the shared pool: the graph, and its outputs."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = forward()
        # a graph's first replay also uploads it to the device (docs/benchmarks/gpu.md, run
        # 105: the launch of graphs replayed once or twice in a run took 0.27-0.30 ms, of
        # the others 0.01-0.02): paid here, not by the first step that needs the graph and
        # the speculation policy's first cost of it. (The inputs are the ones the capture
        # ran on: this replay writes the same KV again.)
        graph.replay()
        self.pool = graph.pool()
        return graph, outputs


def _newest(request: Request) -> int:
    """The request's last token (its prompt's, before any output), without copying both."""
    return (request.output_token_ids or request.prompt_token_ids)[-1]
