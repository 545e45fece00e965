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
unsure, at 0.4, did no better on Qwen2.5-Coder, docs/benchmarks). Proposals are greedy and deterministic (verified as one-hot q, so sampled requests stay
exact); a worse draft model only lowers acceptance, never changes an output.

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

from drafters.base import DraftBatch, Drafter, DraftRequest, Proposal, register_drafter
from server.models.batch import BatchMeta
from server.models.loader import build_model, open_checkpoint

log = logging.getLogger("leapfrog.engine")

CATCH_UP_TOKENS = 512
"""Most tokens of one catch-up forward (a long prompt takes several)."""
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
    """Catch-up tokens, at positions state.cached, state.cached + 1, ..."""
    newest: int
    """Position of the request's newest token (the last catch-up token)."""
    max_drafts: int


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
        self._states: dict[str, _State] = {}
        self._free: list[int] = []
        self._block_size = 0
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
        target's: its drafts would be other tokens than it means."""
        if self._vocab is None:
            return
        theirs = tokenizer.get_vocab()
        differ = sum(theirs.get(token) != i for token, i in self._vocab.items())
        if differ * 100 > len(self._vocab):
            raise ValueError(f"the draft model's tokenizer is not the target's: {differ} of "
                             f"its {len(self._vocab)} tokens have another id or none there")
        if differ:
            log.warning("%d of the draft model's %d tokens have another id or none in the "
                        "target's tokenizer", differ, len(self._vocab))

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
        if not self.model.kv_caches:
            self.prepare()
        self._step += 1
        for r in batch.requests:  # (first, so that none of them is evicted for another)
            self._states.setdefault(r.request_id, _State()).last_step = self._step
        plans = [p for i, r in enumerate(batch.requests) if (p := self._plan(i, r)) is not None]
        drafts: list[list[int]] = [[] for _ in batch.requests]
        if not plans:
            return [Proposal(d) for d in drafts]
        logits = self.model.compute_logits(self._catch_up(plans, batch.meta))
        going = plans
        while True:
            tokens = logits.argmax(-1)
            for plan, token in zip(going, tokens.tolist(), strict=True):
                drafts[plan.index].append(token)
            more = [i for i, plan in enumerate(going) if len(drafts[plan.index]) < plan.max_drafts]
            if not more:
                break
            going = [going[i] for i in more]
            tokens = tokens[torch.tensor(more, dtype=torch.long, device=tokens.device)]
            positions = []
            for plan in going:
                positions.append(plan.newest + len(plan.state.fed) + 1)
                plan.state.fed.append(drafts[plan.index][-1])
            meta = batch.meta([p.state.blocks for p in going], positions, [1] * len(going))
            logits = self.model.compute_logits(self.model(
                tokens, torch.tensor(positions, device=tokens.device), meta))
        return [Proposal(d) for d in drafts]

    def prepare(self) -> None:
        """The draft cache: as many tokens as the target's (the pool of its full-attention
        layers, the largest) plus spare blocks, of the target's block size and KV type."""
        target_k = max((k for k, _ in self._target.kv_caches), key=lambda k: k.shape[0])
        self._block_size = target_k.shape[1]
        num_blocks = target_k.shape[0] - 1 + SPARE_BLOCKS
        c = self.model.config
        shape = (num_blocks, self._block_size, c.num_kv_heads, c.head_dim)
        self.model.kv_caches = [
            tuple(torch.zeros(shape, dtype=target_k.dtype, device=target_k.device) for _ in "kv")
            for _ in self.model.layers]
        self._free = list(range(num_blocks - 1, -1, -1))
        size = sum(t.numel() * t.element_size() for kv in self.model.kv_caches for t in kv)
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
        return _Plan(index, state, list(history[start:]), newest, request.max_draft_tokens)

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
