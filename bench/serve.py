"""`leapfrog bench serve`: load-test any OpenAI-compatible server over HTTP.

`add_arguments` and `run` are mounted by `server/cli.py`; `python -m bench.serve` runs the
same command standalone. Metrics follow `vllm bench serve`'s definitions (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import math
import os
import sys
from typing import Any

import httpx

from bench.client import Target, root_url
from bench.datasets import RandomSpec, load_requests
from bench.metrics import compute_metrics, parse_goodput
from bench.plots import plot_cdfs, plot_sweep, pyplot, sweep_plot_path
from bench.report import format_table, run_json, write_json
from bench.runner import RunConfig, run_benchmark
from bench.tokens import fill_token_counts, load_tokenizer


def _rate(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {text}")
    return value


def _rates(text: str) -> list[float]:
    return [_rate(part) for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every `bench serve` flag to a parser."""
    a = parser.add_argument
    a("--base-url", default="http://127.0.0.1:8000",
      help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    a("--model", default=None, help="model name to send; default: the first of GET /v1/models")
    a("--endpoint", choices=("chat", "completions", "embeddings"), default="chat",
      help="/v1/chat/completions (messages), /v1/completions (prompt text) or /v1/embeddings "
           "(prompt text as the input; its latency is TTFT and E2E, no output tokens)")
    a("--api-key", default=os.environ.get("OPENAI_API_KEY"),
      help="bearer token (default: $OPENAI_API_KEY)")
    a("--dataset", default="builtin",
      help="builtin | random | sharegpt:PATH | jsonl:PATH (default builtin)")
    a("--num-prompts", type=int, default=100, help="requests per run (default 100)")
    a("--request-rate", type=_rate, default=float("inf"),
      help="mean arrivals per second (Poisson); inf sends all at once (default inf)")
    a("--burstiness", type=float, default=1.0,
      help="gamma shape of inter-arrival gaps: 1 Poisson, <1 burstier, >1 steadier")
    a("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    a("--sweep", type=_rates, default=None, metavar="R1,R2,...",
      help="run once per request rate (overrides --request-rate)")
    a("--goodput", default=None, metavar="ttft:MS,tpot:MS,e2el:MS",
      help="SLOs; report requests/s that meet all of them")
    a("--seed", type=int, default=0, help="seed for prompt order and arrivals")
    a("--output-len", type=int, default=None, help="max_tokens for every request")
    a("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/llama.cpp extension)")
    a("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    a("--tokenizer", default=None,
      help="local tokenizer dir or .gguf file, to count tokens when the server sends no usage")
    a("--random-input-len", type=int, default=256, help="random dataset: mean prompt tokens")
    a("--random-output-len", type=int, default=128, help="random dataset: mean output tokens")
    a("--random-range-ratio", type=float, default=0.25,
      help="random dataset: lengths uniform in [len*(1-r), len*(1+r)]")
    a("--result-json", default=None, metavar="PATH", help="write results as JSON")
    a("--plot", default=None, metavar="PATH",
      help="write latency CDFs as PNG (with --sweep also PATH_sweep.png); needs matplotlib")
    a("--metrics-url", default=None,
      help="Prometheus endpoint (default: <base-url>/metrics); 'none' disables scraping")
    a("--metrics-interval", type=float, default=0.5,
      help="seconds between scrapes for the KV-usage peak")
    a("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    a("--no-progress", action="store_true", help="no progress bar on stderr")


def discover_model(base_url: str, api_key: str | None) -> str:
    """The first model id the server lists at GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(root_url(base_url) + "/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"could not find a model at {base_url}/v1/models ({exc}); "
                         "pass --model") from exc


def _config(args: argparse.Namespace, model: str, rates: list[float]) -> dict[str, Any]:
    keys = ("base_url", "endpoint", "dataset", "num_prompts", "burstiness", "max_concurrency",
            "seed", "output_len", "ignore_eos", "temperature", "tokenizer", "goodput")
    cfg = {k: getattr(args, k) for k in keys}
    return {**cfg, "model": model, "request_rates": ["inf" if math.isinf(r) else r for r in rates]}


def _run_config(args: argparse.Namespace, rate: float) -> RunConfig:
    metrics_url = args.metrics_url or root_url(args.base_url) + "/metrics"
    return RunConfig(
        request_rate=rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        seed=args.seed, metrics_url=None if metrics_url == "none" else metrics_url,
        metrics_interval=args.metrics_interval, timeout=args.timeout,
        progress=not args.no_progress,
    )


def _benchmark(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    slos = parse_goodput(args.goodput)
    rates = args.sweep or [args.request_rate]
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    random_spec = RandomSpec(args.random_input_len, args.random_output_len,
                             args.random_range_ratio)
    requests = load_requests(args.dataset, args.num_prompts, args.seed, args.output_len,
                             random_spec, tokenizer)
    model = args.model or discover_model(args.base_url, args.api_key)
    target = Target(args.base_url, model, args.endpoint, args.api_key, args.temperature,
                    args.ignore_eos)
    runs = []
    for rate in rates:
        label = f"rate {rate:g} " if len(rates) > 1 else ""
        outcome = asyncio.run(run_benchmark(target, requests, _run_config(args, rate), label))
        fill_token_counts(outcome.results, requests, tokenizer, args.endpoint)
        metrics = compute_metrics(outcome.results, outcome.duration_s, slos)
        print(format_table(metrics, rate, args.max_concurrency, outcome.server), flush=True)
        runs.append(run_json(rate, metrics, outcome))
    return _config(args, model, rates), runs


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when some request succeeded, 1 when none did, 2 on bad input."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # (its INFO: a line per request)
    try:
        if args.plot:
            pyplot()  # fail before the run, not after it, when matplotlib is missing
        config, runs = _benchmark(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"leapfrog bench serve: error: {exc}", file=sys.stderr)
        return 2
    if args.result_json:
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(args.result_json, config, runs, date)
    if args.plot:
        plot_cdfs(runs, args.plot)
        if args.sweep:
            plot_sweep(runs, sweep_plot_path(args.plot))
    return 0 if any(r["completed"] for r in runs) else 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m bench.serve ...`."""
    parser = argparse.ArgumentParser(prog="leapfrog bench serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
