"""A step's tokens made into outputs: each request's detokenizer and stop strings, its
`RequestOutput` deltas, and the request and token metrics (TTFT, inter-token latency,
generated and speculated tokens). The engine (`engine.LLMEngine`) calls it once a step,
on CUDA while the device runs the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from drafters.base import Drafter
from server.engine.contracts import SampledTokens
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.outputs import RequestOutput
from server.engine.request import Request
from server.engine.scheduler import Scheduler
from server.metrics import Metrics


@dataclass
class _Tracked:
    """Per-request output-side state (detokenizer, timings)."""

    request: Request
    detok: IncrementalDetokenizer
    last_token_time: float | None = None


class OutputProcessor:
    """The output side of every request the engine holds, from `track` to its last output
    (or `abort`)."""

    def __init__(self, tokenizer: Any, eos_token_ids: tuple[int, ...], scheduler: Scheduler,
                 drafter: Drafter | None, metrics: Metrics) -> None:
        """`scheduler`: finishes a request whose text reached a stop string; `drafter`:
        forgets a finished request."""
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids
        self.scheduler, self.drafter, self.metrics = scheduler, drafter, metrics
        self._tracked: dict[str, _Tracked] = {}

    def track(self, request: Request) -> None:
        params = request.params
        self._tracked[request.request_id] = _Tracked(request, IncrementalDetokenizer(
            self.tokenizer, params.stop, params.skip_special_tokens,
            params.include_stop_str_in_output))

    def abort(self, request_id: str) -> RequestOutput | None:
        """The last output of a request finished early (None if not tracked)."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return None
        self._forget(request_id, "abort")
        r = tracked.request
        return RequestOutput(r.request_id, [], "", r.num_prompt_tokens, len(r.output_token_ids),
                             finished=True, finish_reason="abort")

    def step_outputs(self, emitted: list[tuple[Request, list[int]]],
                     sampled: dict[str, SampledTokens]) -> list[RequestOutput]:
        """The outputs of a step's new tokens by request (`Scheduler.update`) and the
        runner's results, and its metrics; requests aborted since get none."""
        emitted = [(r, tokens) for r, tokens in emitted if r.request_id in self._tracked]
        now = time.monotonic()
        outputs = [self._output(r, tokens, sampled[r.request_id], now) for r, tokens in emitted]
        self._record_step_tokens(emitted, sampled)
        return outputs

    def ended(self, requests: list[Request]) -> list[RequestOutput]:
        """The last outputs of requests the scheduler ended without a step (no tokens)."""
        now = time.monotonic()
        return [self._output(r, [], SampledTokens([], 0), now) for r in requests]

    def _output(self, r: Request, tokens: list[int], sampled: SampledTokens, now: float
                ) -> RequestOutput:
        tracked = self._tracked[r.request_id]
        text_tokens = tokens
        if r.finish_reason == "stop" and tokens and self._is_stop_token(r, tokens[-1]):
            text_tokens = tokens[:-1]  # the stop token itself is not part of the text
        text = tracked.detok.add(text_tokens, final=r.is_finished)
        if tracked.detok.stopped and not r.is_finished:
            self.scheduler.finish_request(r.request_id, "stop")
            text += tracked.detok.add([], final=True)
        # (with the request's first tokens: the prompt's last position predicted the first)
        prompt_logprobs = None
        if tokens and tracked.last_token_time is None and r.params.prompt_logprobs is not None:
            prompt_logprobs = list(r.prompt_logprobs)
        if tokens:
            self._record_latency(tracked, r, now)
        logprobs = sampled.logprobs[: len(tokens)] if sampled.logprobs is not None else None
        if r.is_finished:
            self._forget(r.request_id, r.finish_reason or "stop")
            self.metrics.e2e_request_latency.observe(now - r.arrival_time)
        stop_reason = None
        if r.finish_reason == "stop":
            stop_reason = tracked.detok.stop_string
            if stop_reason is None and tokens and tokens[-1] in r.params.stop_token_ids:
                stop_reason = tokens[-1]
        return RequestOutput(
            r.request_id, tokens, text, r.num_prompt_tokens, len(r.output_token_ids), logprobs,
            finished=r.is_finished, finish_reason=r.finish_reason, stop_reason=stop_reason,
            num_draft_tokens=r.num_draft_tokens, num_accepted_tokens=r.num_accepted_tokens,
            num_cached_tokens=r.num_cached_tokens, prompt_logprobs=prompt_logprobs,
            embedding=r.embedding() if r.is_finished else None,
        )

    def _forget(self, request_id: str, reason: str) -> None:
        """Drop a finished request's output state and drafter state; count it."""
        self._tracked.pop(request_id, None)
        if self.drafter is not None:
            self.drafter.release(request_id)
        self.metrics.request_success(reason)

    def _is_stop_token(self, r: Request, token: int) -> bool:
        return token in r.params.stop_token_ids or (
            not r.params.ignore_eos and token in self.eos_token_ids)

    def _record_latency(self, tracked: _Tracked, r: Request, now: float) -> None:
        m = self.metrics
        if tracked.last_token_time is None:
            m.time_to_first_token.observe(now - r.arrival_time)
            m.prompt_tokens.inc(r.num_prompt_tokens)
            if r.first_scheduled_time is not None:
                m.request_queue_time.observe(r.first_scheduled_time - r.arrival_time)
        else:
            m.inter_token_latency.observe(now - tracked.last_token_time)
        tracked.last_token_time = now

    def _record_step_tokens(self, emitted: list[tuple[Request, list[int]]],
                            sampled: dict[str, SampledTokens]) -> None:
        """A step's token and speculation counters, each added to once a step, not once a
        request: each update takes a lock (the outputs of a 16-request step with n-gram
        drafts took ~160 us against ~185 on this repo's CPU)."""
        m = self.metrics
        generated = drafts = drafted = accepted = 0
        at: list[int] = []  # requests that accepted at least i + 1 drafts, by position i
        for r, tokens in emitted:
            if r.params.pooling is None:  # (an embedding's one token is not returned)
                generated += len(tokens)
            result = sampled[r.request_id]
            if result.num_draft_tokens:
                n = len(result.token_ids) - 1
                drafts += 1
                drafted += result.num_draft_tokens
                accepted += n
                at.extend([0] * (n - len(at)))
                for position in range(n):
                    at[position] += 1
        if generated:
            m.generation_tokens.inc(generated)
        if drafts:
            m.spec_decode_num_drafts.inc(drafts)
            m.spec_decode_num_draft_tokens.inc(drafted)
            m.spec_decode_num_accepted_tokens.inc(accepted)
            for position, count in enumerate(at):
                m.accepted_at(position, count)
