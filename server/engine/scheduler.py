"""Token-budget scheduler with continuous batching, chunked prefill and preemption.

Pure Python: it decides, each step, how many tokens of which requests to run, owns KV
block allocation, and folds the runner's sampled tokens back into request state. There are
no prefill/decode phases: a request wants `num_tokens + drafts` tokens computed and has
`num_computed_tokens`; every step moves it closer within the shared token budget.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from server.engine.block_manager import BlockManager
from server.engine.contracts import RunnerOutput, ScheduledRequest, SchedulerOutput
from server.engine.draft_plan import plan_drafts
from server.engine.request import Request, RequestStatus
from server.engine.spec_policy import SpecPolicy

log = logging.getLogger("leapfrog.engine")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits the scheduler enforces."""

    max_num_seqs: int
    """Most requests in the running batch."""
    max_num_batched_tokens: int
    """Token budget of one step."""
    max_model_len: int
    """Longest prompt + output of any request."""
    admit_batch: int = 1
    """With a backlog (more requests waiting than the running batch has room for), admit
    waiting requests only once this many slots are free, unless the step computes a prompt
    anyway or the first of them has been held `max_admission_hold_s`: where decode steps
    replay CUDA graphs, a step that takes in a prompt runs eagerly, 12-17 times a graphed
    64-request decode step's time for a SmolLM2-135M-shaped model on an H100 (session 44),
    so a batch that takes in each request as a slot frees stalls once for each. 1: admit
    as soon as there is room."""
    max_admission_hold_s: float = 0.1
    """Longest that `admit_batch` holds a request back while there is room for it."""
    policy: str = "fcfs"
    """"fcfs": requests wait and run in order of arrival, and the latest admitted is
    preempted first; "priority": in order of (`SamplingParams.priority`, arrival), the
    running batch too (a higher value is preempted first). A waiting request does not
    preempt a running one (as in vLLM): it goes first once there is room."""


class Scheduler:
    """Owns the waiting queue, the running batch and the block manager."""

    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, spec_policy: SpecPolicy | None = None,
        draft_slots: bool = False,
    ) -> None:
        """`draft_slots`: the drafter writes its drafts' KV (self-speculation through the
        target's first layers): a request that will draft gets the slots its drafts may
        take, after this step's tokens, when it is scheduled."""
        self.config = config
        self.blocks = block_manager
        self.spec_policy = spec_policy
        self.draft_slots = draft_slots
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # what `_computed` has to do after a step, decided once (it runs for every request
        # of every step)
        self._slides = any(p.window is not None for p in block_manager.pools)
        self._caches = block_manager.pools[0].cache_prefixes
        self._held_since: float | None = None  # when `admit_batch` first held a request back

    # -- admission and removal -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens + 1 > self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens; max_model_len is {self.config.max_model_len}"
            )
        if not self.blocks.fits(request.num_prompt_tokens + 1):
            raise ValueError(
                f"prompt needs more KV blocks than the whole cache holds ({self.blocks.num_blocks})"
            )
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        """Into the waiting queue: at its end (fcfs), or after every request that goes
        before it (priority)."""
        if self.config.policy == "fcfs":
            self.waiting.append(request)
            return
        key = _priority_key(request)
        at = len(self.waiting)
        while at and _priority_key(self.waiting[at - 1]) > key:
            at -= 1
        self.waiting.insert(at, request)

    def finish_request(self, request_id: str, reason: str) -> Request | None:
        """Finish (or abort) a request now and free its blocks; unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.blocks.free(request_id)
        if self.spec_policy is not None:
            self.spec_policy.forget(request_id)
        return request

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.config.policy == "priority":  # (those last are preempted first)
            self.running.sort(key=_priority_key)
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        ended: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            item = self._try_schedule(request, budget, preempted)
            if item is None:  # the request itself was preempted or ended
                if request.is_finished:
                    ended.append(request)
                continue
            scheduled.append(item)
            budget -= item.num_new_tokens
            i += 1
        queried = hits = 0
        admit = not self._holds_admission(eager=any(
            not s.reaches_end or s.num_new_tokens != 1 + len(s.spec_token_ids)
            for s in scheduled))
        while admit and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            request = self.waiting[0]
            # (prompt logprobs and mean embeddings come from the forward over every prompt
            # position)
            cached = (0 if request.computes_whole_prompt else
                      self.blocks.reuse_prefix(request.request_id, request.all_token_ids))
            request.num_computed_tokens = cached
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.blocks.can_allocate(request.request_id, request.num_computed_tokens + num_new):
                self.blocks.free(request.request_id)  # (the cached blocks, until it fits)
                request.num_computed_tokens = 0
                break
            queried += request.num_tokens
            hits += cached
            self.blocks.allocate(request.request_id, request.num_computed_tokens + num_new)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = cached
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new, []))
            budget -= num_new
        self._plan_drafts(scheduled)
        total = sum(s.num_new_tokens for s in scheduled)
        return SchedulerOutput(scheduled, total, preempted, ended, queried, hits)

    def _holds_admission(self, eager: bool) -> bool:
        """Whether this step takes in no waiting request although there is room (see
        `SchedulerConfig.admit_batch`); `eager`: the step computes a prompt anyway."""
        free = self.config.max_num_seqs - len(self.running)
        if (eager or not self.running or free <= 0 or free >= self.config.admit_batch
                or len(self.waiting) <= free):
            self._held_since = None
            return False
        now = time.monotonic()
        if self._held_since is None:
            self._held_since = now
        # (past the bound it stays past until the backlog is taken in, also when the step
        # that asks is one launched ahead, which takes no one in)
        return now - self._held_since < self.config.max_admission_hold_s

    def schedule_ahead(self, previous: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `previous` while `previous` still runs: each of its requests
        decodes the token `previous` is producing (`ScheduledRequest.ahead`), which only the
        device holds yet. None unless `previous` decoded every running request one token,
        without drafts and with none asked for after it (with speculation: the policy chose
        a plain step next, so nothing waits for `previous`'s hidden states), no waiting
        request could be admitted instead, and the KV cache has room for the next token of
        each without preempting. Requests that `previous` certainly finishes (max_tokens,
        max_model_len) are left out; one it finishes otherwise (a stop token) computes a
        token that `update` drops. With speculation the policy then sizes the drafts after
        the step ahead, as after any step."""
        running = self._continuing(previous)
        if running is None or not all(
                s.num_new_tokens == 1 and not s.spec_token_ids and not s.num_draft_tokens_next
                for s in previous.scheduled):
            return None
        going = [r for r in running if len(r.output_token_ids) + 1 < r.params.max_tokens
                 and r.num_tokens + 1 < self.config.max_model_len]
        # KV slots through the token each computes (position num_tokens)
        if not going or not self._allocate_all([(r.request_id, r.num_tokens + 1)
                                                for r in going]):
            return None
        scheduled = [ScheduledRequest(r, 1, [], ahead=1) for r in going]
        self._plan_drafts(scheduled)
        return SchedulerOutput(scheduled, len(going))

    def schedule_verify_ahead(self, previous: SchedulerOutput) -> SchedulerOutput | None:
        """The verification step after `previous` while `previous` still runs, when
        `previous` verified Q - 1 drafts of every request and drafted Q - 1 more on the
        device after each one's last token (`ModelRunner`'s graphs with a drafter's device
        loop): the same requests verify those drafts, Q tokens each, from positions only the
        device knows yet (`ScheduledRequest.ahead` is Q, their upper bound; the drafts are
        placeholders until `update` takes in `previous`). None unless every request is past
        its min_tokens (no stop token to hold back), the policy asked for Q - 1 drafts
        after `previous` from each, no waiting request could be admitted instead, no
        request can reach max_tokens or max_model_len in either step, and the KV cache has
        room for both steps' tokens without preempting. The policy sizes the drafts after
        this step, as after any step; `update(previous, ..., ahead=this)` keeps the blocks
        this step writes."""
        running = self._continuing(previous)
        # (the step's rows are previous's, in order: none may have left)
        if running is None or len(running) < len(previous.scheduled):
            return None
        q = previous.scheduled[0].num_new_tokens
        if q < 2 or not all(
                s.num_new_tokens == q and len(s.spec_token_ids) == q - 1
                and s.num_draft_tokens_next == q - 1 for s in previous.scheduled):
            return None
        if not all(len(r.output_token_ids) >= r.params.min_tokens
                   and len(r.output_token_ids) + 2 * q < r.params.max_tokens
                   and r.num_computed_tokens + 2 * q < self.config.max_model_len
                   for r in running):
            return None
        # KV slots through the step's last token: previous's first position + 2Q - 1
        if not self._allocate_all([(r.request_id, r.num_computed_tokens + 2 * q)
                                   for r in running]):
            return None
        scheduled = [ScheduledRequest(r, q, [0] * (q - 1), ahead=q) for r in running]
        self._plan_drafts(scheduled, trim=False)
        return SchedulerOutput(scheduled, q * len(running))

    def _allocate_all(self, wants: list[tuple[str, int]]) -> bool:
        """Allocate every (request id, token slots) when the cache holds them all together,
        without preempting; whether it did."""
        if not self.blocks.can_allocate_all(wants):
            return False
        for rid, num_tokens in wants:
            self.blocks.allocate(rid, num_tokens)
        return True

    def _continuing(self, previous: SchedulerOutput) -> list[Request] | None:
        """`previous`'s requests, when a step may be launched ahead of it: it ran every
        running request through its newest token, ended and preempted none, and no waiting
        request could be admitted instead; None otherwise."""
        running = [s.request for s in previous.scheduled if not s.request.is_finished]
        if (previous.preempted or previous.ended
                or len(running) != len(self.running)
                or not all(s.reaches_end for s in previous.scheduled)
                or self.waiting and len(self.running) < self.config.max_num_seqs
                and not self._holds_admission(eager=False)):
            return None
        return running

    def _try_schedule(self, request: Request, budget: int, preempted: list[str]) -> ScheduledRequest | None:
        """Schedule a running request, preempting from the back of the batch for blocks."""
        base = request.num_tokens - request.num_computed_tokens
        spec = request.spec_token_ids[: max(0, budget - base)]  # drafts only fill spare budget
        num_new = min(base + len(spec), budget)
        while not self.blocks.can_allocate(request.request_id, request.num_computed_tokens + num_new):
            if self.running == [request] and not self.waiting:
                # Alone and still out of room: the cache can never hold it; end it here.
                self.finish_request(request.request_id, "length")
                return None
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return None
        self.blocks.allocate(request.request_id, request.num_computed_tokens + num_new)
        if len(spec) < len(request.spec_token_ids):
            request.draft_probs = None if request.draft_probs is None else request.draft_probs[: len(spec)]
            request.spec_token_ids = spec
        return ScheduledRequest(request, num_new, list(spec))

    def _preempt(self, request: Request) -> None:
        """Recompute later: drop its KV and put it at the front of the queue (fcfs), or
        where its priority and arrival place it (priority)."""
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.draft_probs = None
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        if self.config.policy == "fcfs":
            self.waiting.appendleft(request)
        else:
            self._enqueue(request)

    def _plan_drafts(self, scheduled: list[ScheduledRequest], trim: bool = True) -> None:
        """With speculation: `draft_plan.plan_drafts` (`trim`: not for a step whose drafts
        only the device has)."""
        if self.spec_policy is not None:
            c = self.config
            plan_drafts(scheduled, self.spec_policy, self.blocks, c.max_num_batched_tokens,
                        c.max_model_len, self.draft_slots, trim)

    # -- results ----------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, result: RunnerOutput,
               ahead: SchedulerOutput | None = None) -> list[tuple[Request, list[int]]]:
        """Apply a step's results. Returns (request, new tokens) for requests that got tokens;
        requests that hit EOS, a stop token, max_tokens or max_model_len are finished and
        freed. `ahead`: the step launched after this one, still running: a request keeps
        the blocks of its tokens there, and a verification step's drafts (placeholders:
        `schedule_verify_ahead`) become the ones this step's results name."""
        following = {s.request.request_id: s for s in ahead.scheduled} if ahead else {}
        emitted: list[tuple[Request, list[int]]] = []
        for s in output.scheduled:
            r = s.request
            if r.is_finished:  # aborted while the step ran
                continue
            before = r.num_computed_tokens
            r.num_computed_tokens += s.num_new_tokens
            r.prompt_logprobs.extend(result.prompt_logprobs.get(r.request_id, ()))
            pooled = result.pooled.get(r.request_id)
            if pooled is not None:
                vector, r.num_pooled = pooled
                r.pooled = vector if r.pooled is None or r.params.pooling == "last" \
                    else r.pooled + vector
            sampled = result.sampled.get(r.request_id)
            if sampled is None:
                self._computed(r, before)
                continue
            rejected = len(s.spec_token_ids) - (len(sampled.token_ids) - 1)
            r.num_computed_tokens -= rejected
            r.num_draft_tokens += sampled.num_draft_tokens
            r.num_accepted_tokens += len(sampled.token_ids) - 1
            if self.spec_policy is not None:
                self.spec_policy.observe(r.request_id, sampled.num_draft_tokens, len(sampled.token_ids) - 1)
            new_tokens, reason = self._append_tokens(r, sampled.token_ids)
            if self.spec_policy is not None and s.num_draft_tokens_next and reason is None:
                self.spec_policy.observe_proposal(r.request_id, bool(sampled.next_draft))
            r.spec_token_ids = sampled.next_draft
            r.draft_probs = sampled.next_draft_probs
            after = following.get(r.request_id)
            if after is not None and after.spec_token_ids:
                after.spec_token_ids = list(r.spec_token_ids)
            if rejected:  # (not otherwise: a plain step launched ahead holds the next slot)
                held = after.num_new_tokens if after is not None else 0
                self.blocks.truncate(r.request_id, r.num_computed_tokens + held)
            self._computed(r, before)  # (after the rollback)
            emitted.append((r, new_tokens))
            if reason is not None:
                self.finish_request(r.request_id, reason)
        return emitted

    def _computed(self, r: Request, before: int) -> None:
        """After a step that took the request from `before` computed tokens to its
        `num_computed_tokens`: the blocks no later query of it sees leave a window pool (the
        positions computed again after a rollback see the window before them), and the
        blocks it filled are cached (prefix caching; a step fills one only when it crosses
        a block's end, 1 in 16 decode steps)."""
        if self._slides:
            self.blocks.slide(r.request_id, r.num_computed_tokens)
        bs = self.blocks.block_size
        if self._caches and before // bs < r.num_computed_tokens // bs:
            self.blocks.commit(r.request_id, r.num_computed_tokens, lambda: r.all_token_ids)

    def _append_tokens(self, r: Request, tokens: list[int]) -> tuple[list[int], str | None]:
        p = r.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
        new: list[int] = []
        for token in tokens:
            if r.grammar is not None and not r.grammar.accept_token(token):
                # (the token was chosen from the grammar's own mask: this is a bug; the
                # reply ends before the token rather than leave its JSON)
                log.error("request %s: the JSON grammar refused token %d; ending the reply",
                          r.request_id, token)
                return new, "stop"
            r.output_token_ids.append(token)
            new.append(token)
            n = len(r.output_token_ids)
            if token in stops and n > p.min_tokens:
                return new, "stop"
            if n >= p.max_tokens or r.num_tokens >= self.config.max_model_len:
                return new, "length"
        return new, None


def _priority_key(request: Request) -> tuple[int, float]:
    return request.params.priority, request.arrival_time
