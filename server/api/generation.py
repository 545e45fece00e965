"""Fan-out and collection: one API request becomes n engine requests, merged into one stream.

SamplingParams has no `n`, so choice i runs as engine request `<id>-<i>` (seed + i when a seed
is given, wrapped to 64 bits). Cancellation is structural: closing the merged stream cancels
the per-choice pump tasks, which closes each engine stream, and the engine aborts those
requests and frees their KV blocks. A non-streaming handler races its collection against the
client's disconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from server.api.errors import ApiError, bad_request
from server.api.state import EngineClient
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams

T = TypeVar("T")
_END = object()


class ClientDisconnected(Exception):
    """The client went away before the response was complete; the work was cancelled."""


@dataclass
class ChoiceJob:
    """One engine request: choice `index` of the API request."""

    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceResult:
    """Everything streamed back for one choice, accumulated."""

    num_prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_output_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """vLLM's: the stop string or stop token id that ended the choice (`RequestOutput`)."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_cached_tokens: int = 0
    step_tokens: list[int] = field(default_factory=list)
    """Each output step's tokens, beside its piece of `text`."""
    embedding: list[float] | None = None
    """With `SamplingParams.pooling`: the prompt's embedding."""

    def add(self, out: RequestOutput) -> None:
        self.num_prompt_tokens = out.num_prompt_tokens
        self.token_ids.extend(out.new_token_ids)
        self.text.append(out.new_text)
        self.step_tokens.append(len(out.new_token_ids))
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.embedding is not None:
            self.embedding = out.embedding
        self.num_output_tokens = out.num_output_tokens
        self.num_draft_tokens = out.num_draft_tokens
        self.num_accepted_tokens = out.num_accepted_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


def check_context_length(num_prompt: int, max_tokens: int, max_model_len: int) -> None:
    """400 `context_length_exceeded` when prompt + completion would not fit, naming both."""
    if num_prompt + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded",
        )


def make_jobs(request_id: str, prompts: list[list[int]], n: int,
              params: SamplingParams) -> list[ChoiceJob]:
    """n jobs per prompt; choice index = prompt_index * n + i, seeds seed + i."""
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            seed = None if params.seed is None else _wrap_int64(params.seed + i)
            job_params = params if n == 1 else _with_seed(params, seed)
            rid = request_id if len(prompts) * n == 1 else f"{request_id}-{index}"
            jobs.append(ChoiceJob(index, rid, prompt, job_params))
    return jobs


def _wrap_int64(value: int) -> int:
    """`value` wrapped into the 64-bit signed range seeds take (seed + i past the top)."""
    return (value + 2**63) % 2**64 - 2**63


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    values = dict(params.__dict__)
    values["seed"] = seed
    values["stop"] = list(params.stop)
    values["stop_token_ids"] = list(params.stop_token_ids)
    values["logit_bias"] = dict(params.logit_bias)
    return SamplingParams(**values)


JOB_WINDOW = 64
"""Jobs of one request in the engine at once where a request may hold many (completions'
prompts, embeddings' inputs), the next starting as one ends: a request of 2,048 inputs
neither fills the engine's waiting queue (256 by default: a 429 for it and for others) nor
holds every slot a step has."""


async def merged_outputs(engine: EngineClient, jobs: list[ChoiceJob], window: int | None = None
                         ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of all jobs as (choice index, delta), in arrival order; errors re-raised.
    `window`: at most this many jobs in the engine at once, the next starting as one ends
    (None: all at once)."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
    slots = asyncio.Semaphore(window or len(jobs))

    async def pump(job: ChoiceJob) -> None:
        try:
            async with slots:
                async for out in engine.generate(job.request_id, job.prompt_token_ids,
                                                 job.params):
                    queue.put_nowait((job.index, out))
            queue.put_nowait((job.index, _END))
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((job.index, exc))

    tasks = [asyncio.ensure_future(pump(job)) for job in jobs]
    try:
        remaining = len(jobs)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:  # synchronous, so it happens even inside a cancelled scope
            task.cancel()


def queue_full_error(retry_after_s: int) -> ApiError:
    return ApiError(429, "The server's waiting queue is full; retry later.",
                    code="queue_full", headers={"Retry-After": str(retry_after_s)})


async def wait_for_disconnect(request: Request) -> None:
    """Returns once the client has disconnected (the request body must already be read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


async def collect(stream: AsyncIterator[tuple[int, RequestOutput]], num_choices: int,
                  timing: RequestTiming) -> list[ChoiceResult]:
    """Drain the merged stream into one ChoiceResult per choice."""
    results = [ChoiceResult() for _ in range(num_choices)]
    async for index, out in stream:
        timing.on_output()
        results[index].add(out)
    return results


@dataclass
class RequestTiming:
    """Wall-clock marks for the per-request log line."""

    start: float = field(default_factory=time.monotonic)
    first_output: float | None = None

    def on_output(self) -> None:
        if self.first_output is None:
            self.first_output = time.monotonic()

    def ttft(self) -> float | None:
        return None if self.first_output is None else self.first_output - self.start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

