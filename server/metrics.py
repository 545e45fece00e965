"""Prometheus collectors, named like vLLM's with a `leapfrog:` prefix.

Each engine owns one `Metrics` (with its own registry), so several engines in one process
(tests, benchmarks) never share counters. The HTTP server exposes `Metrics.render()`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_PREFIX = "leapfrog:"
_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


class Metrics:
    """All server metrics. Names match vLLM's so dashboards translate."""

    def __init__(self, model_name: str = "default") -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, _PREFIX
        label = ["model_name"]
        self.model_name = model_name
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds", "Time to first token.", label,
            buckets=_LATENCY_BUCKETS, registry=r,
        ).labels(model_name)
        self.inter_token_latency = Histogram(
            p + "inter_token_latency_seconds", "Time between successive output tokens.", label,
            buckets=_LATENCY_BUCKETS, registry=r,
        ).labels(model_name)
        self.e2e_request_latency = Histogram(
            p + "e2e_request_latency_seconds", "End-to-end request latency.", label,
            buckets=_REQUEST_BUCKETS, registry=r,
        ).labels(model_name)
        self.request_queue_time = Histogram(
            p + "request_queue_time_seconds", "Time a request waited before its first step.",
            label, buckets=_REQUEST_BUCKETS, registry=r,
        ).labels(model_name)
        self.num_requests_running = Gauge(
            p + "num_requests_running", "Requests in the running batch.", label, registry=r,
        ).labels(model_name)
        self.num_requests_waiting = Gauge(
            p + "num_requests_waiting", "Requests waiting to be scheduled.", label, registry=r,
        ).labels(model_name)
        self.kv_cache_usage_perc = Gauge(
            p + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1; in a hybrid cache, of "
            "its fuller pool).", label,
            registry=r,
        ).labels(model_name)
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Prompt tokens processed.", label, registry=r,
        ).labels(model_name)
        self.generation_tokens = Counter(
            p + "generation_tokens", "Tokens generated.", label, registry=r,
        ).labels(model_name)
        self._request_success = Counter(
            p + "request_success", "Finished requests by reason.",
            label + ["finished_reason"], registry=r,
        )
        self.prefix_cache_queries = Counter(
            p + "prefix_cache_queries", "Tokens of admitted requests looked up in the prefix "
            "cache.", label, registry=r,
        ).labels(model_name)
        self.prefix_cache_hits = Counter(
            p + "prefix_cache_hits", "Of those, tokens found cached (not computed again).",
            label, registry=r,
        ).labels(model_name)
        self.num_preemptions = Counter(
            p + "num_preemptions", "Requests preempted (recomputed later).", label, registry=r,
        ).labels(model_name)
        self.spec_decode_num_drafts = Counter(
            p + "spec_decode_num_drafts", "Draft proposals verified.", label, registry=r,
        ).labels(model_name)
        self.spec_decode_num_draft_tokens = Counter(
            p + "spec_decode_num_draft_tokens", "Draft tokens proposed.", label, registry=r,
        ).labels(model_name)
        self.spec_decode_num_accepted_tokens = Counter(
            p + "spec_decode_num_accepted_tokens", "Draft tokens accepted.", label, registry=r,
        ).labels(model_name)
        self._accepted_per_pos = Counter(
            p + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position.", label + ["position"], registry=r,
        )
        self._per_pos: dict[int, object] = {}
        steps_ahead = Counter(
            p + "steps_launched_ahead", "Steps queued before the step they follow had "
            "finished (CUDA graphs), by kind: decode, or verification (drafts made on the "
            "device).", label + ["kind"], registry=r,
        )
        self.steps_ahead = {kind: steps_ahead.labels(model_name, kind)
                            for kind in ("decode", "verification")}

    def cache_config(self, **labels: object) -> None:
        """`leapfrog:cache_config_info`, as vLLM's `cache_config_info`: a gauge of 1 whose
        labels describe the KV cache (its blocks, their size and type, its memory)."""
        names = ["model_name", *labels]
        Gauge(_PREFIX + "cache_config_info", "The KV cache's configuration (in labels).",
              names, registry=self.registry).labels(
            self.model_name, *(str(v) for v in labels.values())).set(1)

    def request_success(self, finished_reason: str) -> None:
        self._request_success.labels(self.model_name, finished_reason).inc()

    def accepted_at(self, position: int, count: int = 1) -> None:
        child = self._per_pos.get(position)
        if child is None:  # (labels() costs ~2 us a call: a step accepts up to k drafts a
            # request, so each position's child is looked up once)
            child = self._per_pos[position] = self._accepted_per_pos.labels(
                self.model_name, str(position))
        child.inc(count)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
