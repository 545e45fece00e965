"""A separate, smaller model as the drafter: the classic draft-model baseline (e.g.
Qwen2.5-Coder-0.5B drafting for 1.5B, which share a tokenizer).

The draft model is our own `LlamaForCausalLM`, loaded like the target (a GGUF file or a HF
directory) on the target's device and dtype, with a paged KV cache of its own: blocks of the
target's block size from a private pool, one block table a request. Each request's state
says which of its positions the draft cache holds: the history up to `cached`, then the
drafts it fed last step. A step's proposal first catches the cache up: the drafts the
target accepted are kept, and the tokens after them (the target's correction or bonus
token; the whole prompt, the first time) run through the draft model as one batched
forward (in slices of `CATCH_UP_TOKENS`). It then drafts greedily, one batched token a
request a step, until each request has its `max_draft_tokens` (the speculation policy
sets them from measured acceptance and step costs; stopping where the draft model was
unsure, at 0.4, did no better on Qwen2.5-Coder, docs/benchmarks). A greedy request's drafts are the draft model's argmax (verified as one-hot q). A sampled
request's are drawn (with its own generator) from its sampling distribution (temperature,
top-k, top-p, min-p) over the draft model's logits, and that distribution is reported as q,
so that verification accepts each with min(1, p/q): a draft model close to the target has
most sampled drafts accepted, where one-hot q would accept only as often as the target
samples the argmax. A worse draft model only lowers acceptance, never changes an output.

On CUDA with the engine's graphs, the one-token steps (drafts, and catch-ups of at most
`GRAPHED_CATCH_UP` tokens, one token a step) replay CUDA graphs of the draft model, one per
requests bucket (`_StepGraphs`); an eager forward costs the host about ten replays.

The pool holds as many tokens as the target's (a request's context is in both) plus
`SPARE_BLOCKS`. Where it runs short, the states of requests not drafted for this step
(finished without `release`, preempted, or no longer asking) give their blocks back,
least recently drafted first; a request that still does not fit gets no drafts this step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F

from drafters.base import DraftBatch, Drafter, DraftRequest, Proposal, register_drafter
from drafters.verify import sample_inverse_cdf, uniforms
from server.models.batch import BatchMeta
from server.models.loader import build_model, open_checkpoint

log = logging.getLogger("leapfrog.engine")

CATCH_UP_TOKENS = 512
"""Most tokens of one catch-up forward (a long prompt takes several)."""
GRAPHED_CATCH_UP = 4
"""With CUDA graphs, catch-ups of at most this many tokens a request run as graphed
one-token steps (an eager forward costs the host ~10x a replay)."""
SPARE_BLOCKS = 64
"""Draft cache blocks beyond the target's pool (room for the drafts themselves)."""


@dataclass
class _State:
    """What one request's draft cache holds."""

    blocks: list[int] = field(default_factory=list)
    cached: int = 0
    """Positions [0, cached) hold the request's history (prompt and output)."""
    fed: list[int] = field(default_factory=list)
    """Drafts whose KV follows at positions cached, cached + 1, ...: valid while the target
    accepts them."""
    last_step: int = 0
    """The step that last drafted for the request (eviction order)."""


@dataclass
class _Plan:
    """One request's work this step."""

    index: int
    """Its place in the batch."""
    state: _State
    tokens: list[int]
    """Catch-up tokens: the positions before `newest` the cache lacks, and `newest`."""
    newest: int
    """Position of the request's newest token (the last catch-up token)."""
    request: DraftRequest


@register_drafter
class DraftModelDrafter(Drafter):
    """Drafts with a separate small model that shares the target's tokenizer
    (`--speculative draft-model --speculative-model PATH`)."""

    name = "draft-model"

    def __init__(self, model: torch.nn.Module, target: torch.nn.Module,
                 vocab: dict[str, int] | None = None) -> None:
        """`vocab`: the draft model's tokenizer's token ids, for `check_tokenizer`."""
        if model.config.vocab_size > target.config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({model.config.vocab_size} tokens) is larger "
                f"than the target's ({target.config.vocab_size}): it must share the target's "
                f"tokenizer")
        self.model = model
        self._vocab = vocab
        self._target = target
        self.graphs: _StepGraphs | None = None
        self._states: dict[str, _State] = {}
        self._free: list[int] = []
        self._block_size = self._scratch = 0
        self._step = 0

    @classmethod
    def for_target(cls, model: torch.nn.Module, path: str | None) -> DraftModelDrafter:
        if path is None:
            raise ValueError("the draft-model drafter needs --speculative-model PATH: a "
                             "smaller model (GGUF file or HF directory) with the target's "
                             "tokenizer")
        checkpoint = open_checkpoint(path)
        draft = build_model(checkpoint, model.dtype, model.embed.device,
                            model.rope.cos.shape[0])
        return cls(draft, model, checkpoint.tokenizer.get_vocab())

    def check_tokenizer(self, tokenizer: Any) -> None:
        """More than 1% of the draft tokenizer's tokens with another id (or none) in the
        target's: its drafts would be other tokens than it means. (Only tokens the draft
        model can emit count: ids below its vocabulary size.)"""
        if self._vocab is None:
            return
        theirs, size = tokenizer.get_vocab(), self.model.config.vocab_size
        ours = {token: i for token, i in self._vocab.items() if i < size}
        differ = sum(theirs.get(token) != i for token, i in ours.items())
        if differ * 100 > len(ours):
            raise ValueError(f"the draft model's tokenizer is not the target's: {differ} of "
                             f"its {len(ours)} tokens have another id or none there")
        if differ:
            log.warning("%d of the draft model's %d tokens have another id or none in the "
                        "target's tokenizer", differ, len(ours))

    def release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self._free.extend(state.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @torch.inference_mode()
    def propose(self, batch: DraftBatch) -> list[Proposal]:
        if batch.meta is None:
            raise ValueError("the draft-model drafter needs the runner's attention metadata")
        self._step += 1
        for r in batch.requests:  # (first, so that none of them is evicted for another)
            self._states.setdefault(r.request_id, _State()).last_step = self._step
        plans = [p for i, r in enumerate(batch.requests) if (p := self._plan(i, r)) is not None]
        drafts: list[list[int]] = [[] for _ in batch.requests]
        if not plans:
            return [Proposal(d) for d in drafts]
        qs: list[list[torch.Tensor]] = [[] for _ in batch.requests]
        found = self._replayed_catch_up(plans)
        if found is None:
            logits = self.model.compute_logits(self._catch_up(plans, batch.meta))
            found = logits, logits.argmax(-1)
        going = plans
        while True:
            tokens = self._draw(going, *found, qs)
            for plan, token in zip(going, tokens.tolist(), strict=True):
                drafts[plan.index].append(token)
            more = [i for i, plan in enumerate(going)
                    if len(drafts[plan.index]) < plan.request.max_draft_tokens]
            if not more:
                break
            going = [going[i] for i in more]
            tokens = tokens[torch.tensor(more, dtype=torch.long, device=tokens.device)]
            positions = []
            for plan in going:
                positions.append(plan.newest + len(plan.state.fed) + 1)
                plan.state.fed.append(drafts[plan.index][-1])
            tables = [p.state.blocks for p in going]
            found = self.graphs.run(tokens, positions, tables) if self.graphs else None
            if found is None:
                meta = batch.meta(tables, positions, [1] * len(going))
                logits = self.model.compute_logits(self.model(
                    tokens, torch.tensor(positions, device=tokens.device), meta))
                found = logits, logits.argmax(-1)
        return [Proposal(d, torch.stack(q) if q else None) for d, q in zip(drafts, qs, strict=True)]

    def _draw(self, going: list[_Plan], logits: torch.Tensor, greedy: torch.Tensor,
              qs: list[list[torch.Tensor]]) -> torch.Tensor:
        """The next drafts [len(going)]: `greedy` (the argmax of `logits`, [len(going),
        draft vocab]) for greedy requests; for sampled ones a draw from their own sampling
        distribution over the draft model's logits, which is kept as q."""
        sampled = [i for i, p in enumerate(going) if p.request.distribution is not None]
        if not sampled:
            return greedy
        tokens, width = greedy.clone(), self._target.config.vocab_size
        for i in sampled:
            request = going[i].request
            row = F.pad(logits[i].float(), (0, width - logits.shape[1]), value=float("-inf"))
            q = request.distribution(row).cpu()  # (verification samples on the host)
            tokens[i] = sample_inverse_cdf(q[None], uniforms(1, request.generator))[0]
            qs[going[i].index].append(q)
        return tokens

    @torch.inference_mode()
    def capture_graphs(self, batch_sizes: Sequence[int], draft_lengths: Sequence[int]) -> None:
        self.graphs = _StepGraphs(self.model, self._block_size, self._scratch, batch_sizes)

    def kv_bytes_per_block(self, block_size: int, kv_dtype: torch.dtype) -> int:
        c = self.model.config
        return c.kv_block_bytes(block_size, kv_dtype) * c.num_layers

    def prepare(self) -> None:
        """The draft cache: as many tokens as the target's (the pool of its full-attention
        layers, the largest) plus spare blocks, of the target's block size and KV type."""
        target_k = max((k for k, _ in self._target.kv_caches), key=lambda k: k.shape[0])
        self._block_size = target_k.shape[1]
        num_blocks = target_k.shape[0] - 1 + SPARE_BLOCKS
        c = self.model.config
        # (one scratch block past the pool: padded rows of a graphed step write there)
        shape = (num_blocks + 1, self._block_size, c.num_kv_heads, c.head_dim)
        self.model.kv_caches = [
            tuple(torch.zeros(shape, dtype=target_k.dtype, device=target_k.device) for _ in "kv")
            for _ in self.model.layers]
        self._free = list(range(num_blocks - 1, -1, -1))
        self._scratch = num_blocks
        size = self.model.kv_cache_bytes()
        log.info("draft model KV cache: %d layers x %d blocks of %d tokens; %.2f GiB of %s",
                 c.num_layers, num_blocks, self._block_size, size / 2**30, target_k.dtype)

    def _plan(self, index: int, request: DraftRequest) -> _Plan | None:
        """What the request's cache lacks, its blocks reserved; None where they do not fit."""
        history: Sequence[int] = request.token_ids
        newest = len(history) - 1
        state = self._states[request.request_id]
        start = min(state.cached, newest)  # (a history only grows)
        if start == state.cached:  # the drafts the target accepted stay
            for token in state.fed:
                if start == newest or history[start] != token:
                    break
                start += 1
        # positions up to the newest token plus all but the last draft
        if not self._reserve(state, newest + request.max_draft_tokens):
            return None
        state.cached, state.fed = newest + 1, []
        return _Plan(index, state, list(history[start:]), newest, request)

    def _reserve(self, state: _State, positions: int) -> bool:
        """Give `state` blocks for `positions` positions, evicting idle requests' states
        (least recently drafted first) if the pool runs short."""
        missing = -(-positions // self._block_size) - len(state.blocks)
        if missing > len(self._free):
            idle = sorted((s.last_step, rid) for rid, s in self._states.items()
                          if s.last_step < self._step)
            for _, rid in idle:
                self.release(rid)
                if missing <= len(self._free):
                    break
        if missing > len(self._free):
            return False
        for _ in range(missing):
            state.blocks.append(self._free.pop())
        return True

    def _replayed_catch_up(self, plans: list[_Plan]
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """With graphs, where every plan's catch-up is short (the usual step: the target's
        correction or bonus token, and the last draft): the catch-up tokens one graphed
        step at a time, and the logits and greedy tokens after each plan's newest token
        ([len(plans), vocab], [len(plans)]); None otherwise."""
        longest = max(len(p.tokens) for p in plans)
        if self.graphs is None or longest > GRAPHED_CATCH_UP:
            return None
        device, vocab = self.model.embed.device, self.model.config.vocab_size
        first = torch.empty(len(plans), dtype=torch.long, device=device)
        last = torch.empty(len(plans), vocab, dtype=torch.float32, device=device)
        for j in range(longest):
            rows = [i for i, p in enumerate(plans) if len(p.tokens) > j]
            tokens = torch.tensor([min(plans[i].tokens[j], vocab - 1) for i in rows],
                                  device=device)
            positions = [plans[i].newest + 1 - len(plans[i].tokens) + j for i in rows]
            out = self.graphs.run(tokens, positions, [plans[i].state.blocks for i in rows])
            if out is None:  # (more requests than the largest graph: the eager path)
                return None
            ended = [k for k, i in enumerate(rows) if len(plans[i].tokens) == j + 1]
            if ended:
                where = torch.tensor(ended, device=device)
                into = torch.tensor([rows[k] for k in ended], device=device)
                last[into] = out[0][where]
                first[into] = out[1][where]
        return last, first

    def _catch_up(self, plans: list[_Plan], meta: Callable[..., BatchMeta]) -> torch.Tensor:
        """Run each plan's catch-up tokens through the draft model, at most
        CATCH_UP_TOKENS a forward; the hidden states at their newest tokens [len(plans),
        hidden], in order."""
        device, vocab = self.model.embed.device, self.model.config.vocab_size
        done = [0] * len(plans)
        last: list[torch.Tensor] = []
        while True:
            budget, rows = CATCH_UP_TOKENS, []
            for i, plan in enumerate(plans):
                if budget and done[i] < len(plan.tokens):
                    n = min(len(plan.tokens) - done[i], budget)
                    rows.append((i, done[i], n))
                    budget -= n
            if not rows:
                return torch.cat(last)
            ids, positions, lens = [], [], []
            for i, first, n in rows:
                plan = plans[i]
                ids += plan.tokens[first:first + n]
                begin = plan.newest + 1 - len(plan.tokens) + first
                positions += range(begin, begin + n)
                lens.append(n)
                done[i] += n
            hidden = self.model(
                torch.tensor(ids, device=device).clamp_(max=vocab - 1),
                torch.tensor(positions, device=device),
                meta([plans[i].state.blocks for i, _, _ in rows], positions, lens))
            ends = [end - 1 for end, (i, _, _) in zip(accumulate(lens), rows, strict=True)
                    if done[i] == len(plans[i].tokens)]
            if ends:
                last.append(hidden[torch.tensor(ends, device=device)])


class _StepGraphs:
    """The draft model's one-token steps as CUDA graphs, one per requests bucket (eager, a
    step is ~10 kernel launches a layer, which the host issues slower than the device runs
    them). A step's inputs are copied into fixed buffers; the rows past its requests in its
    bucket read and write the scratch block."""

    def __init__(self, model: torch.nn.Module, block_size: int, scratch: int,
                 batch_sizes: Sequence[int]) -> None:
        self.model, self.block_size, self.scratch = model, block_size, scratch
        self.batch_sizes = sorted(batch_sizes)
        rows, dev = self.batch_sizes[-1], model.embed.device
        width = -(-model.rope.cos.shape[0] // block_size)
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.slots = torch.full((rows,), scratch * block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((rows, width), scratch, dtype=torch.int32, device=dev)
        self.lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]]
        self.graphs = {}
        pool = None
        for b in reversed(self.batch_sizes):  # largest first: the smaller reuse its pool
            side = torch.cuda.Stream()  # (kernels compile and tune outside the capture)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(b)
            graph.replay()  # (a graph's first replay uploads it: paid here)
            pool = graph.pool()
            self.graphs[b] = graph, out

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        from kernels.triton_argmax import greedy_tokens  # CUDA only: triton is optional

        meta = BatchMeta(self.slots[:b], self.tables[:b], self.lens[:b], self.query_start[:b + 1])
        logits = self.model.compute_logits(self.model(self.ids[:b], self.positions[:b], meta))
        return logits, greedy_tokens(logits)

    def run(self, tokens: torch.Tensor, positions: list[int], tables: list[list[int]]
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The logits [n, vocab] and greedy tokens [n] after `tokens` [n] (on the device) at
        `positions`, the requests' blocks `tables`; None when no graph is that large."""
        n, bs = len(positions), self.block_size
        b = next((b for b in self.batch_sizes if b >= n), None)
        if b is None:
            return None
        pad = b - n
        rows = [t + [self.scratch] * (self.tables.shape[1] - len(t)) for t in tables]
        rows += [[self.scratch] * self.tables.shape[1]] * pad
        self.tables[:b].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        self.slots[:b].copy_(torch.tensor(slots + [self.scratch * bs] * pad),
                             non_blocking=True)
        self.positions[:b].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.lens[:b].copy_(torch.tensor([p + 1 for p in positions] + [1] * pad,
                                         dtype=torch.int32), non_blocking=True)
        self.ids[:n].copy_(tokens)
        graph, (logits, greedy) = self.graphs[b]
        graph.replay()
        return logits[:n], greedy[:n]
