"""The final table and the JSON result file (schema documented in bench/README.md)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.metrics import BenchmarkMetrics, Stats
from bench.metrics_scrape import ServerSide
from bench.runner import RunOutcome

SCHEMA_VERSION = 1
_W = 50
_SOURCE_NOTES = {
    "usage": "server usage",
    "tokenizer": "local tokenizer (server gave no usage)",
    "chunks": "streamed chunks (no usage, no --tokenizer: lower bound)",
}


def rate_label(rate: float) -> str:
    """`inf` or the rate as written, for tables and legends."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _row(name: str, value: str) -> str:
    return f"{name:<40}{value:>{_W - 40}}" if len(value) <= _W - 40 else f"{name:<40} {value}"


def _latency_rows(title: str, short: str, stats: Stats) -> list[str]:
    return [
        f"{title:-^{_W}}",
        _row(f"Mean {short} (ms):", _fmt(stats.mean)),
        _row(f"Median {short} (ms):", _fmt(stats.median)),
        _row(f"P90 {short} (ms):", _fmt(stats.p90)),
        _row(f"P99 {short} (ms):", _fmt(stats.p99)),
    ]


def _server_rows(server: ServerSide) -> list[str]:
    return [
        f"{'Server-side (/metrics)':-^{_W}}",
        _row("Draft acceptance rate:", _fmt(server.acceptance_rate, 3)),
        _row("Mean acceptance length:", _fmt(server.mean_acceptance_length)),
        _row("Drafts / draft tokens / accepted:", "/".join(
            _fmt(v, 0) for v in (server.spec_decode_num_drafts,
                                 server.spec_decode_num_draft_tokens,
                                 server.spec_decode_num_accepted_tokens))),
        _row("Preemptions:", _fmt(server.num_preemptions, 0)),
        _row("KV cache usage peak (%):", _fmt(
            None if server.kv_cache_usage_peak is None else 100 * server.kv_cache_usage_peak, 1)),
        _row("Server generation tokens:", _fmt(server.generation_tokens, 0)),
    ]


def format_table(m: BenchmarkMetrics, rate: float, max_concurrency: int | None,
                 server: ServerSide | None) -> str:
    """A vLLM-style result table for one run."""
    sources = ", ".join(f"{_SOURCE_NOTES.get(k, k)} ({n})" for k, n in m.token_sources.items())
    lines = [
        f"{' Serving Benchmark Result ':=^{_W}}",
        _row("Request rate (req/s):", rate_label(rate)),
        _row("Max concurrency:", str(max_concurrency) if max_concurrency else "none"),
        _row("Successful requests:", str(m.completed)),
        _row("Failed requests:", str(m.failed)),
        _row("Benchmark duration (s):", _fmt(m.duration_s)),
        _row("Total input tokens:", _fmt(m.total_input_tokens)),
        _row("Total generated tokens:", str(m.total_output_tokens)),
        _row("Token counts from:", sources or "n/a"),
        _row("Request throughput (req/s):", _fmt(m.request_throughput)),
        _row("Output token throughput (tok/s):", _fmt(m.output_throughput)),
        _row("Total token throughput (tok/s):", _fmt(m.total_token_throughput)),
    ]
    if m.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", _fmt(m.request_goodput)))
    lines += [
        _row("Peak concurrent requests:", str(m.peak_concurrency)),
        _row("Mean tokens per chunk:", _fmt(m.tokens_per_chunk)),
        *_latency_rows("Time to First Token", "TTFT", m.ttft),
        *_latency_rows("Time per Output Token (excl. 1st token)", "TPOT", m.tpot),
        *_latency_rows("Inter-chunk Latency", "ITL", m.itl),
        *_latency_rows("End-to-end Latency", "E2EL", m.e2el),
    ]
    if server is not None:
        lines += _server_rows(server)
    for reason, count in m.failure_reasons.items():
        lines.append(f"failed x{count}: {reason}")
    lines.append("=" * _W)
    return "\n".join(lines)


def _server_json(server: ServerSide | None) -> dict[str, Any] | None:
    if server is None:
        return None
    return {**dataclasses.asdict(server), "acceptance_rate": server.acceptance_rate,
            "mean_acceptance_length": server.mean_acceptance_length}


def run_json(rate: float, m: BenchmarkMetrics, outcome: RunOutcome) -> dict[str, Any]:
    """One entry of `runs` in the result file."""
    d = dataclasses.asdict(m)
    for key in ("ttft", "tpot", "itl", "e2el"):
        d[f"{key}_ms"] = d.pop(key)
    requests = [
        {"id": r.request_id, "success": r.success, "error": r.error,
         "start_s": r.start - outcome.start, "ttft_s": r.ttft, "e2el_s": r.e2el,
         "itls_s": r.itls, "num_chunks": r.num_chunks, "prompt_tokens": r.prompt_tokens,
         "output_tokens": r.output_tokens, "token_source": r.token_source}
        for r in outcome.results
    ]
    return {"request_rate": rate_label(rate) if math.isinf(rate) else rate, **d,
            "server": _server_json(outcome.server), "requests": requests}


def write_json(path: str | Path, config: dict[str, Any], runs: list[dict[str, Any]],
               date: str) -> None:
    """Write the result file: schema version, date, config and one entry per run."""
    doc = {"schema_version": SCHEMA_VERSION, "date": date, "config": config, "runs": runs}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
