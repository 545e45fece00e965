"""Client-side metrics with `vllm bench serve`'s definitions.

Per successful request: TTFT; TPOT = (E2E - TTFT) / (output tokens - 1), only for requests
with more than one output token; ITL, one value per gap between streamed text chunks (with
speculation a chunk can carry several tokens, hence also tokens per chunk); E2E latency.
Throughputs divide by the whole run's wall time. A request counts toward goodput when it
meets every given SLO (its TPOT counts as 0 when it has at most one output token, as vLLM).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from bench.client import RequestResult

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class Stats:
    """Summary of one latency, in milliseconds; None when there were no samples."""

    count: int
    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        """Summarize samples given in seconds (percentiles interpolate linearly, as numpy)."""
        if not seconds:
            return cls(0, None, None, None, None)
        ms = np.asarray(seconds) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist()
        return cls(len(seconds), float(ms.mean()), p50, p90, p99)


def parse_goodput(spec: str | None) -> dict[str, float]:
    """`ttft:MS,tpot:MS,e2el:MS` (any subset) -> {"ttft": seconds, ...}."""
    if not spec:
        return {}
    slos: dict[str, float] = {}
    for part in spec.split(","):
        key, sep, value = part.strip().partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput: expected KEY:MS with KEY in {SLO_KEYS}, got {part!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {key} needs a number of milliseconds, got {value!r}") from None
        if ms <= 0:
            raise ValueError(f"--goodput: {key} must be > 0 ms, got {value}")
        slos[key] = ms / 1000.0
    return slos


def request_tpot(r: RequestResult) -> float | None:
    """(E2E - TTFT) / (output tokens - 1), or None with fewer than two output tokens."""
    if r.output_tokens is None or r.output_tokens < 2:
        return None
    return (r.e2el - r.ttft) / (r.output_tokens - 1)


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO given."""
    values = {"ttft": r.ttft, "tpot": request_tpot(r) or 0.0, "e2el": r.e2el}
    return all(values[k] <= limit for k, limit in slos.items())


def peak_concurrency(results: list[RequestResult]) -> int:
    """Most requests in flight at once, from the client's start and end times."""
    events = sorted(
        [(r.start, 1) for r in results] + [(r.end, -1) for r in results],
        key=lambda e: (e[0], e[1]),
    )
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


@dataclass(frozen=True)
class BenchmarkMetrics:
    """One run's figures. Throughputs per second of the run's wall time."""

    completed: int
    failed: int
    failure_reasons: dict[str, int]
    duration_s: float
    total_input_tokens: int | None
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float | None
    request_goodput: float | None
    tokens_per_chunk: float | None
    token_sources: dict[str, int]
    peak_concurrency: int
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats


def compute_metrics(
    results: list[RequestResult], duration_s: float, slos: dict[str, float] | None = None
) -> BenchmarkMetrics:
    """Aggregate per-request results; token counts must already be filled in."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    total_out = sum(r.output_tokens or 0 for r in ok)
    prompt_counts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    total_in = sum(prompt_counts) if ok and len(prompt_counts) == len(ok) else None
    chunks = sum(r.num_chunks for r in ok)
    dur = max(duration_s, 1e-9)
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(failed),
        failure_reasons=dict(Counter(r.error for r in failed).most_common()),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / dur,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur if total_in is not None else None,
        request_goodput=sum(meets_slos(r, slos) for r in ok) / dur if slos else None,
        tokens_per_chunk=total_out / chunks if chunks else None,
        token_sources=dict(Counter(r.token_source for r in ok)),
        peak_concurrency=peak_concurrency(results),
        ttft=Stats.of([r.ttft for r in ok]),
        tpot=Stats.of([t for r in ok if (t := request_tpot(r)) is not None]),
        itl=Stats.of([gap for r in ok for gap in r.itls]),
        e2el=Stats.of([r.e2el for r in ok]),
    )
