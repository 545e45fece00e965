"""Model runner: one forward over the flat batch, then sampling / verification and drafting."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate

import torch

from drafters.base import DraftBatch, Drafter, DraftRequest, History
from drafters.verify import verify_greedy, verify_sampled
from server.engine.batch_builder import batch_meta, build_inputs
from server.engine.block_manager import BlockManager
from server.engine.contracts import RunnerOutput, SampledTokens, ScheduledRequest, SchedulerOutput
from server.engine.cuda_graphs import CudaGraphRunner
from server.engine.kv_cache import allocate_kv_caches, dummy_step
from server.engine.outputs import TokenLogprob
from server.engine.sampler import (
    filter_probs,
    processed_logits,
    token_logprobs,
)
from server.engine.step_rows import (
    Pooled,
    PromptRows,
    device_sampling,
    greedy_tokens,
    on_device,
    plain_greedy,
    plain_sampled,
    pool_step,
    prompt_rows,
    sample_on_device,
)
from server.engine.structured import mask_rows
from server.models.batch import BatchMeta

log = logging.getLogger("leapfrog.engine")


PROMPT_LOGPROB_ROWS = 256
"""Prompt positions whose logits are computed at a time (a row of float32 logits is
vocab * 4 bytes: 0.5 MB for a 128k vocabulary)."""


@dataclass
class Launched:
    """A step whose device work is queued (`ModelRunner.launch`), for `ModelRunner.finish`."""

    hidden: torch.Tensor
    """[T, hidden] (a replay's: views of its graph's buffers, valid until the next replay)."""
    query_len: int | None
    """As `RunnerOutput.query_len`."""
    rows: list[int]
    """The rows of `hidden` whose logits are sampled, request by request."""
    owners: list[tuple[ScheduledRequest, int]]
    """Each request that samples, with the index in `rows` of its first row."""
    tokens: bool
    """Whether the device computed every such row's token: the argmax of its raw logits
    (greedy requests), or a draw from them (`plain_sampled` requests)."""
    result: torch.Tensor | None
    """On the device: those rows' tokens when `tokens`, else their logits; None when no
    row is sampled."""
    by_row: bool
    """`result` has an entry for every row of `hidden` (a replay's, padding rows included),
    of which `rows` are taken; else one for each of `rows`."""
    next_ids: torch.Tensor | None = None
    """When `tokens`, in a replay whose graph drafted on the device (`Replay.next_ids`):
    by row, each request's next step's input tokens (its last token, then its next
    drafts), which a step launched ahead takes on the device."""
    copied: tuple[torch.Tensor, torch.cuda.Event] | None = None
    """When `tokens` on CUDA: `result` (then `next_ids`) copied to pinned host memory, and
    the event after the copy: `finish` waits for that, not for later steps queued behind
    (`launch`'s `after`)."""
    prompt: list[PromptRows] = field(default_factory=list)
    """The rows whose logits give prompt logprobs (eager steps only: `hidden` stays
    valid until `finish`)."""
    pooled: Pooled | None = None
    """The sums of the positions that requests pool in this step, if any."""

    def token_indices(self, scheduled: list[ScheduledRequest]) -> list[int]:
        """Where in `result` each of these decoding requests' one token is (`tokens`
        only)."""
        where = {owner.request.request_id: self.rows[first] if self.by_row else first
                 for owner, first in self.owners}
        return [where[s.request.request_id] for s in scheduled]


class ModelRunner:
    """Owns the model and its KV cache tensors; executes scheduled steps."""

    def __init__(
        self, model: torch.nn.Module, blocks: BlockManager, device: torch.device,
        drafter: Drafter | None = None, windowed: frozenset[int] = frozenset(),
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """`windowed`: the layers that attend to sinks + a window, whose KV lives in the
        last of `blocks.pools` (the others' in the first); `kv_dtype`: the caches' element
        type (None: the model's dtype)."""
        self.model = model
        self.blocks = blocks
        self.device = device
        self.drafter = drafter
        self.graphs: CudaGraphRunner | None = None
        # pinned host copies of steps' tokens, taking turns (`_copy_tokens`)
        self._host_tokens = [torch.empty(0, dtype=torch.long) for _ in range(2)]
        self._turn = 0
        allocate_kv_caches(model, blocks, device, windowed, kv_dtype or model.dtype)
        self.windows = [p.window for p in blocks.pools]
        # the native attention takes float32 queries of a multiple of 16 features
        self._native_prefill = (device.type == "cpu" and model.dtype == torch.float32
                                and model.config.head_dim % 16 == 0)

    @torch.inference_mode()
    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, max_query_len: int,
                           prompt_tokens: int = 0) -> None:
        """Replay captured graphs for decode/verify steps (`server.engine.cuda_graphs`) of up
        to `max_query_len` tokens a sequence, and for steps that take in prompts of up to
        `prompt_tokens` tokens (0: those run eagerly)."""
        start = time.perf_counter()
        pools = self.blocks.pools
        sparse = (pools[1].hole, pools[1].window) if len(pools) > 1 else None
        draft = self.drafter.device_drafts() if self.drafter is not None else None
        self.graphs = CudaGraphRunner(self.model, self.blocks.block_size, pools[0].hole,
                                      max_model_len, max_batch, max_query_len,
                                      window=pools[0].window, sparse=sparse, draft=draft,
                                      prompt_tokens=prompt_tokens)
        self.graphs.capture_all()
        log.info("captured %d CUDA graphs (batch buckets %s, query buckets %s; prompt "
                 "graphs of %s tokens) in %.1f s",
                 len(self.graphs.graphs) + len(self.graphs.prompt_graphs), self.graphs.buckets,
                 self.graphs.query_buckets, list(self.graphs.prompt_buckets),
                 time.perf_counter() - start)

    @torch.inference_mode()
    def warm_up(self, max_tokens: int) -> None:
        """Run the model eagerly over one dummy sequence of 1, 2, 4, ... up to `max_tokens`
        tokens (`dummy_step`): the Triton kernels' variants that steps of other sizes than
        the graphs' need (attention by query rows, the packed GEMM by row bucket) compile
        and tune now, not in the first requests of those sizes (on an H200 each new
        attention variant stalled its step by 0.8-1.4 s: docs/benchmarks/gpu.md, run
        132)."""
        n = 1
        while n <= max_tokens:
            dummy_step(self.model, self.blocks, self.device, n)
            n *= 2

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, after: Launched | None = None) -> Launched:
        """Queue a step's device work (the replay, or the forward and its LM head and greedy
        tokens) without waiting for it: on CUDA the host is free until `finish`. `after`:
        the step before, still running, whose tokens (on the device) are this decode step's
        input (`Scheduler.schedule_ahead`), or whose graph drafted this verification step's
        inputs (`Scheduler.schedule_verify_ahead`)."""
        tables = [self.blocks.block_tables(s.request.request_id) for s in out.scheduled]
        by_pool = [list(pool) for pool in zip(*tables, strict=True)]
        ids = None
        advance = after is not None and after.next_ids is not None
        if after is not None and not advance:  # each request's token of the step before
            index = after.token_indices(out.scheduled)
            ids = (after.result[: len(index)] if index == list(range(len(index))) else
                   after.result[on_device(index, torch.long, self.device)])
        replay = prompts = None
        sparse_tables = by_pool[1] if len(by_pool) > 1 else None
        if self.graphs is not None:
            replay = self.graphs.run(out, by_pool[0], ids, sparse_tables, advance=advance)
        query_len = None
        if replay is None and self._prompt_graph(out, ids):
            prompts = self.graphs.run_prompts(out, by_pool[0], sparse_tables)
        if prompts is not None:  # a prompt graph's forward, then the rest as an eager step's
            hidden, ends = prompts
            all_logits, tokens, prompt = None, None, []
        elif replay is None:
            inputs = build_inputs(out, by_pool, self.blocks.block_size, self.device,
                                  padded_groups=self.device.type == "cpu", ahead_ids=ids,
                                  windows=self.windows, native_prefill=self._native_prefill)
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)  # [T, hidden]
            ends, all_logits, tokens = inputs.query_start[1:], None, None
            prompt = prompt_rows(out.scheduled, ends)
        else:  # every row's logits and greedy token, in row order
            ends, hidden, all_logits, tokens = replay.ends, replay.hidden, replay.logits, replay.tokens
            query_len = replay.key[1]
            prompt = []  # (a graphed step computes only each request's newest token and drafts)
        pooled = pool_step(out.scheduled, ends, hidden)
        rows: list[int] = []
        owners: list[tuple[ScheduledRequest, int]] = []
        for s, end in zip(out.scheduled, ends, strict=True):
            if s.reaches_end:
                n = len(s.spec_token_ids) + 1
                owners.append((s, len(rows)))
                rows.extend(range(end - n, end))
        if not rows:
            return Launched(hidden, query_len, rows, owners, False, None, False, prompt=prompt,
                            pooled=pooled)

        def row_index() -> torch.Tensor:
            return on_device(rows, torch.long, hidden.device)

        if all_logits is None:
            all_logits = self.model.compute_logits(hidden[row_index()])  # [R, vocab]
        # a replay's logits and greedy tokens cover every row, padding included
        by_row = replay is not None and len(rows) < hidden.shape[0]
        # plain greedy steps need only each row's argmax (a replay computed it in its graph),
        # plain sampled ones a draw on the device: no logits travel to the host
        if all(plain_greedy(s) for s, _ in owners):
            result = tokens if tokens is not None else greedy_tokens(all_logits)
            next_ids = replay.next_ids if replay is not None else None
            return Launched(hidden, query_len, rows, owners, True, result, by_row, next_ids,
                            self._copy_tokens(result, next_ids), prompt, pooled)
        if (all(plain_greedy(s) or plain_sampled(s) for s, _ in owners)
                and device_sampling(all_logits)):
            logits = all_logits[row_index()] if by_row else all_logits
            result = sample_on_device(owners, logits)
            return Launched(hidden, query_len, rows, owners, True, result, False,
                            copied=self._copy_tokens(result), prompt=prompt, pooled=pooled)
        if after is not None:
            raise ValueError("a step launched ahead must compute its tokens on the device")
        return Launched(hidden, query_len, rows, owners, False, all_logits, by_row,
                        prompt=prompt, pooled=pooled)

    def _prompt_graph(self, out: SchedulerOutput, ahead_ids: torch.Tensor | None) -> bool:
        """Whether a step no decode graph takes may replay a prompt graph: not one launched
        ahead, nor one whose hidden states are read after a later step may have replayed
        the same graph (`finish`: prompt logprobs, a drafter's hidden-state inputs)."""
        return (self.graphs is not None and bool(self.graphs.prompt_buckets) and ahead_ids is None
                and not (self.drafter is not None and self.drafter.needs_hidden_states)
                and not any(s.request.needs_prompt_logprobs for s in out.scheduled))

    def _copy_tokens(self, tokens: torch.Tensor, next_ids: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.cuda.Event] | None:
        """On CUDA: a copy of a step's tokens (then its `next_ids`, if any) queued into
        pinned host memory, and an event after it; two buffers take turns, so that one
        step's tokens are read while the next step's copy is queued."""
        if not tokens.is_cuda:
            return None
        n = tokens.numel()
        m = n + (next_ids.numel() if next_ids is not None else 0)
        self._turn ^= 1
        host = self._host_tokens[self._turn]
        if host.numel() < m:
            host = self._host_tokens[self._turn] = torch.empty(
                max(m, 2 * host.numel()), dtype=tokens.dtype, pin_memory=True)
        host[:n].copy_(tokens, non_blocking=True)
        if next_ids is not None:
            host[n:m].copy_(next_ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host[:m], event

    @torch.inference_mode()
    def finish(self, step: Launched) -> RunnerOutput:
        """Wait for a launched step's results; verify or sample each request's tokens and
        draft its next ones."""
        rows, owners, on_device = step.rows, step.owners, step.tokens
        prompt = {p.request_id: self._prompt_logprobs(step.hidden, p) for p in step.prompt}
        pooled = step.pooled.by_request() if step.pooled is not None else {}
        if not rows:
            return RunnerOutput({}, step.query_len, prompt_logprobs=prompt, pooled=pooled)
        next_ids = None
        if step.copied is not None:
            host, event = step.copied
            event.synchronize()
            logits = host.tolist()
            if step.next_ids is not None:
                logits, next_ids = logits[:step.result.numel()], logits[step.result.numel():]
        else:
            logits = step.result.tolist() if on_device else step.result.cpu()
            if step.next_ids is not None:
                next_ids = step.next_ids.tolist()
        if step.by_row:  # (the padding tokens of requests that drafted fewer)
            logits = [logits[r] for r in rows] if on_device else logits[rows]
        sampled: dict[str, SampledTokens] = {}
        last_rows: list[int] = []
        for s, first in owners:
            n = len(s.spec_token_ids) + 1
            if on_device:  # (a sampled request has no drafts: its one token)
                result = SampledTokens(verify_greedy(s.spec_token_ids, logits[first:first + n]),
                                       len(s.spec_token_ids))
            else:
                result = self._sample_request(s, logits[first : first + n])
            sampled[s.request.request_id] = result
            last_rows.append(rows[first + len(result.token_ids) - 1])
        if next_ids is not None:  # the drafts the graph made after each request's last token
            q = step.query_len
            for s, first in owners:
                if 0 < s.num_draft_tokens_next < q:
                    row = rows[first] + 1
                    sampled[s.request.request_id].next_draft = next_ids[
                        row:row + s.num_draft_tokens_next]
        drafting = 0.0
        if self.drafter is not None:
            start = time.perf_counter()
            self._draft(owners, sampled, step.hidden, last_rows)
            drafting = time.perf_counter() - start
        return RunnerOutput(sampled, step.query_len, drafting, prompt, pooled)

    def _prompt_logprobs(self, hidden: torch.Tensor, p: PromptRows) -> list[TokenLogprob]:
        """The logprobs of `p`'s prompt tokens from its rows of `hidden`, a slice of rows
        at a time."""
        found = []
        for i in range(0, len(p.rows), PROMPT_LOGPROB_ROWS):
            rows = on_device(p.rows[i:i + PROMPT_LOGPROB_ROWS], torch.long, hidden.device)
            logits = self.model.compute_logits(hidden[rows])
            found += token_logprobs(logits, p.targets[i:i + PROMPT_LOGPROB_ROWS], p.top_n)
        return found

    def _sample_request(self, s: ScheduledRequest, logits: torch.Tensor) -> SampledTokens:
        """logits: [k+1, vocab] for the request's newest token and its k drafts."""
        r, p = s.request, s.request.params
        drafts = s.spec_token_ids
        stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
        scores = logits
        if p.adjusts_logits or len(r.output_token_ids) < p.min_tokens:
            # row j predicts the token after draft j-1: drafts count as history for penalties
            scores = torch.stack([
                processed_logits(logits[j], p, r.prompt_token_ids, r.output_token_ids + drafts[:j], stop_ids)
                for j in range(len(drafts) + 1)
            ])
        if r.grammar is not None:  # row j: what the JSON grammar allows after drafts[:j]
            scores = mask_rows(r.grammar, scores, drafts)
        if p.greedy:
            tokens = verify_greedy(drafts, scores.argmax(dim=-1).tolist())
        else:
            # (no drafts: one draw from p by inverse CDF, 85 us a row of the default model's
            # 49,152 where torch.multinomial's exponential per entry took 1.25 ms)
            probs = torch.stack([filter_probs(row, p) for row in scores])
            tokens = verify_sampled(drafts, probs, r.draft_probs if drafts else None,
                                    r.generator)
        logprobs = None
        if p.logprobs is not None:
            logprobs = token_logprobs(logits[: len(tokens)], tokens, p.logprobs,
                                      p.logprob_token_ids)
        return SampledTokens(tokens, len(drafts), logprobs)

    def _shallow_forward(self, request_ids: list[str], newest: list[int]
                         ) -> Callable[[list[int], torch.Tensor, int], torch.Tensor]:
        """`DraftBatch.forward` for these requests, whose newest tokens are at positions
        `newest`: their drafts' KV goes into the slots the scheduler reserved after them
        (`Scheduler`'s draft_slots)."""
        tables = [self.blocks.block_tables(rid) for rid in request_ids]
        layers = self.drafter.num_draft_layers

        def forward(rows: list[int], tokens: torch.Tensor, offset: int) -> torch.Tensor:
            positions = [newest[i] + offset for i in rows]
            by_pool = [list(pool) for pool in zip(*(tables[i] for i in rows), strict=True)]
            meta = batch_meta(by_pool, positions, [p + 1 for p in positions],
                              list(range(len(rows) + 1)), self.blocks.block_size, self.device,
                              self.device.type == "cpu", self.windows)
            return self.model(tokens, torch.tensor(positions, device=self.device), meta,
                              num_layers=layers)

        return forward

    def _own_meta(self, tables: list[list[int]], positions: list[int], query_lens: list[int]
                  ) -> BatchMeta:
        """`DraftBatch.meta`: attention metadata for a drafter's own cache (its catch-up
        chunks through the native attention as the target's prefill chunks)."""
        starts = list(accumulate(query_lens, initial=0))
        return batch_meta([tables], positions, [positions[end - 1] + 1 for end in starts[1:]],
                          starts, self.blocks.block_size, self.device, self.device.type == "cpu",
                          native_prefill=self._native_prefill)

    def _draft(self, owners: list[tuple[ScheduledRequest, int]], sampled: dict[str, SampledTokens],
               hidden: torch.Tensor, last_rows: list[int]) -> None:
        # (a request a stop string ended while this step ran has no next step)
        # (nor one whose drafts the graph made: `finish`)
        wanted = [(s, row) for (s, _), row in zip(owners, last_rows, strict=True)
                  if s.num_draft_tokens_next > 0 and not s.request.is_finished
                  and not sampled[s.request.request_id].next_draft]
        if not wanted:
            return
        requests = [
            DraftRequest(s.request.request_id,
                         History(s.request.prompt_token_ids, s.request.output_token_ids,
                                 sampled[s.request.request_id].token_ids),
                         s.num_draft_tokens_next,
                         None if s.request.params.greedy else partial(
                             filter_probs, params=s.request.params), s.request.generator,
                         s.request.params.prediction)
            for s, _ in wanted
        ]
        states = forward = None
        if self.drafter.needs_hidden_states:
            states = hidden[torch.tensor([row for _, row in wanted], device=hidden.device)]
        if self.drafter.num_draft_layers:
            forward = self._shallow_forward([r.request_id for r in requests],
                                            [len(r.token_ids) - 1 for r in requests])
        proposals = self.drafter.propose(DraftBatch(requests, states, forward, self._own_meta))
        for (s, _), proposal in zip(wanted, proposals, strict=True):
            result = sampled[s.request.request_id]
            k = s.num_draft_tokens_next
            result.next_draft = proposal.token_ids[:k]
            if proposal.probs is not None:
                result.next_draft_probs = proposal.probs[:k]
