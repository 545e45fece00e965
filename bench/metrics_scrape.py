"""Server-side figures from a Prometheus `/metrics` endpoint, scraped around a run.

Counters are read before and after the run and differenced; the KV-cache usage gauge is
polled during the run for its peak. Names are vLLM's, with our `leapfrog:` prefix or vLLM's
`vllm:` (counters carry a `_total` suffix in the text format). Samples with labels are summed
over the labels. A server without `/metrics` simply yields no server-side section.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("leapfrog:", "vllm:")
KV_USAGE_NAMES = ("kv_cache_usage_perc", "gpu_cache_usage_perc")
COUNTERS = (
    "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
    "num_preemptions", "generation_tokens", "prompt_tokens",
)


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over label sets}, `_created` dropped."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def lookup(samples: dict[str, float], name: str) -> float | None:
    """A metric's value under any accepted prefix, counter suffix or not."""
    for prefix in PREFIXES:
        for full in (f"{prefix}{name}_total", f"{prefix}{name}"):
            if full in samples:
                return samples[full]
    return None


def kv_usage(samples: dict[str, float]) -> float | None:
    """KV-cache usage as a fraction 0..1, under vLLM's current or older name."""
    for name in KV_USAGE_NAMES:
        value = lookup(samples, name)
        if value is not None:
            return value
    return None


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float] | None:
    """One scrape, or None when the endpoint is missing or not Prometheus text."""
    try:
        response = await client.get(url)
        if response.status_code != 200:
            return None
        return parse_samples(response.text)
    except (httpx.HTTPError, ValueError):
        return None


@dataclass(frozen=True)
class ServerSide:
    """Server-side figures for one run; None where the server exports no such metric."""

    spec_decode_num_drafts: float | None
    spec_decode_num_draft_tokens: float | None
    spec_decode_num_accepted_tokens: float | None
    num_preemptions: float | None
    generation_tokens: float | None
    prompt_tokens: float | None
    kv_cache_usage_peak: float | None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens / proposed draft tokens."""
        if not self.spec_decode_num_draft_tokens or self.spec_decode_num_accepted_tokens is None:
            return None
        return self.spec_decode_num_accepted_tokens / self.spec_decode_num_draft_tokens

    @property
    def mean_acceptance_length(self) -> float | None:
        """1 + accepted tokens per draft: tokens a verify step yields on average (vLLM)."""
        if not self.spec_decode_num_drafts or self.spec_decode_num_accepted_tokens is None:
            return None
        return 1.0 + self.spec_decode_num_accepted_tokens / self.spec_decode_num_drafts


def summarize(before: dict[str, float], after: dict[str, float], kv_peak: float | None) -> ServerSide:
    """Counter deltas between two scrapes plus the polled KV peak."""
    deltas: dict[str, float | None] = {}
    for name in COUNTERS:
        a, b = lookup(before, name), lookup(after, name)
        deltas[name] = b - a if a is not None and b is not None and b >= a else None
    return ServerSide(**deltas, kv_cache_usage_peak=kv_peak)


class KvPeakPoller:
    """Polls the KV usage gauge every `interval` seconds while a run is in progress."""

    def __init__(self, client: httpx.AsyncClient, url: str, interval: float) -> None:
        self._client, self._url, self._interval = client, url, interval
        self.peak: float | None = None

    def observe(self, samples: dict[str, float] | None) -> None:
        """Fold one scrape into the peak."""
        value = kv_usage(samples) if samples else None
        if value is not None:
            self.peak = value if self.peak is None else max(self.peak, value)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            self.observe(await scrape(self._client, self._url))
            await asyncio.sleep(self._interval)
