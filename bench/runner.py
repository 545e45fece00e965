"""One benchmark run at one request rate: pace the requests, cap concurrency, scrape.

Requests are launched at their arrival offsets (absolute times from the start, so delays do
not accumulate); with `max_concurrency` a request that arrives while C are in flight waits
for a slot, and its clock starts when it is sent (as in `vllm bench serve`). The run's
duration is from the first arrival to the last completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import httpx

from bench.arrivals import arrival_offsets
from bench.client import RequestResult, Target, send_request
from bench.datasets import BenchRequest
from bench.metrics_scrape import KvPeakPoller, ServerSide, scrape, summarize
from bench.progress import Progress


@dataclass(frozen=True)
class RunConfig:
    """How to pace one run."""

    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    metrics_url: str | None = None
    metrics_interval: float = 0.5
    timeout: float = 600.0
    progress: bool = True


@dataclass
class RunOutcome:
    """Raw results of one run, before token counts are filled in and metrics computed."""

    results: list[RequestResult]
    duration_s: float
    start: float
    server: ServerSide | None


async def _send_all(
    client: httpx.AsyncClient, target: Target, requests: list[BenchRequest],
    cfg: RunConfig, progress: Progress,
) -> tuple[list[RequestResult], float, float]:
    offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    start = time.perf_counter()

    async def one(req: BenchRequest, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        if slots is None:
            result = await send_request(client, target, req)
        else:
            async with slots:
                result = await send_request(client, target, req)
        progress.update(result.success)
        return result

    results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets, strict=True)))
    return list(results), start, time.perf_counter() - start


async def run_benchmark(target: Target, requests: list[BenchRequest], cfg: RunConfig,
                        label: str = "") -> RunOutcome:
    """Send every request, paced and capped as configured; scrape server metrics around it."""
    if cfg.max_concurrency is not None and cfg.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {cfg.max_concurrency}")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    progress = Progress(len(requests), label, cfg.progress)
    async with httpx.AsyncClient(timeout=cfg.timeout, limits=limits) as client, \
            httpx.AsyncClient(timeout=10.0) as scraper:
        before = await scrape(scraper, cfg.metrics_url) if cfg.metrics_url else None
        poller = KvPeakPoller(scraper, cfg.metrics_url or "", cfg.metrics_interval)
        poll_task = asyncio.create_task(poller.run()) if before is not None else None
        try:
            results, start, duration = await _send_all(client, target, requests, cfg, progress)
        finally:
            progress.close()
            if poll_task is not None:
                poll_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll_task
        after = await scrape(scraper, cfg.metrics_url) if before is not None else None
    server = None
    if before is not None and after is not None:
        poller.observe(before)
        poller.observe(after)
        server = summarize(before, after, poller.peak)
    return RunOutcome(results, duration, start, server)
