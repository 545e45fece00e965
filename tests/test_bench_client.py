"""Load-testing client against the scripted fake server: timings, counts, pacing, failures.

The fake server and its tolerance are described in test_bench_fake_server.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.arrivals import arrival_offsets
from bench.client import Target
from bench.datasets import BenchRequest
from bench.metrics import compute_metrics
from bench.report import format_table
from bench.runner import RunConfig, RunOutcome, run_benchmark
from bench.serve import main
from bench.tokens import fill_token_counts
from tests.test_bench_fake_server import MAX_S, REL, TOL_S, FakeServer, running_fake_server


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with running_fake_server() as server:
        yield server


def _requests(n: int, words: int = 5, marker: str = "") -> list[BenchRequest]:
    text = " ".join(["hello"] * words)
    return [BenchRequest(f"r{i}", [{"role": "user", "content": f"{text} {marker}".strip()}], 16)
            for i in range(n)]


def _run(fake: FakeServer, reqs: list[BenchRequest], endpoint: str = "chat",
         **cfg: object) -> RunOutcome:
    target = Target(fake.url, "fake-model", endpoint)
    config = RunConfig(progress=False, metrics_url=fake.url + "/metrics",
                       metrics_interval=0.05, **cfg)  # type: ignore[arg-type]
    outcome = asyncio.run(run_benchmark(target, reqs, config))
    fill_token_counts(outcome.results, reqs, None, endpoint)
    return outcome


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_latencies_tokens_and_throughput_match_script(fake: FakeServer, endpoint: str) -> None:
    ttft, itl, chunks = 0.1, 0.04, (1, 3, 2, 2)
    fake.script(ttft=ttft, itl=itl, chunks=chunks)
    reqs = _requests(8, words=5)
    outcome = _run(fake, reqs, endpoint, max_concurrency=2)
    m = compute_metrics(outcome.results, outcome.duration_s)

    e2el = ttft + (len(chunks) - 1) * itl
    assert m.completed == 8 and m.failed == 0
    for r in outcome.results:
        assert len(r.itls) == len(chunks) - 1
        assert (r.output_tokens, r.prompt_tokens, r.token_source) == (8, 5, "usage")
        assert r.ttft == pytest.approx(ttft, abs=MAX_S) and r.e2el == pytest.approx(e2el, abs=MAX_S)
    assert m.ttft.median == pytest.approx(1000 * ttft, abs=1000 * TOL_S)
    assert m.e2el.median == pytest.approx(1000 * e2el, abs=1000 * TOL_S)
    assert m.itl.median == pytest.approx(1000 * itl, abs=1000 * TOL_S)
    assert m.tpot.median == pytest.approx(1000 * (e2el - ttft) / 7, abs=1000 * TOL_S / 7)
    assert m.itl.count == 8 * 3 and m.ttft.count == 8
    assert m.tokens_per_chunk == 2.0
    assert (m.total_output_tokens, m.total_input_tokens) == (64, 40)
    # Two slots, eight requests: four back-to-back waves of one request's latency.
    assert m.duration_s == pytest.approx(4 * e2el, rel=REL)
    assert m.request_throughput == pytest.approx(8 / m.duration_s)
    assert m.output_throughput == pytest.approx(64 / m.duration_s)
    assert m.total_token_throughput == pytest.approx(104 / m.duration_s)
    assert m.output_throughput == pytest.approx(64 / (4 * e2el), rel=REL)
    assert m.peak_concurrency == 2 and fake.stats()["max_in_flight"] == 2


def test_chunks_without_text_are_neither_tokens_nor_itl_boundaries(fake: FakeServer) -> None:
    fake.script(ttft=0.01, itl=0.1, chunks=(1, 1, 1), empty_between=True)
    outcome = _run(fake, _requests(2))
    m = compute_metrics(outcome.results, outcome.duration_s)
    assert [r.num_chunks for r in outcome.results] == [3, 3] and m.tokens_per_chunk == 1.0
    assert m.itl.count == 4 and m.itl.median == pytest.approx(100, abs=1000 * TOL_S)


def test_a_stream_that_only_finishes_is_a_success(fake: FakeServer) -> None:
    fake.script(ttft=0.01, itl=0.01, chunks=())
    outcome = _run(fake, _requests(2))
    assert all(r.success and r.num_chunks == 1 and not r.itls for r in outcome.results)


def test_server_side_metrics_are_scraped(fake: FakeServer) -> None:
    fake.script(ttft=0.1, itl=0.04, chunks=(1, 3, 2, 2))
    outcome = _run(fake, _requests(6), max_concurrency=2)
    s = outcome.server
    assert s is not None
    assert (s.spec_decode_num_drafts, s.spec_decode_num_draft_tokens) == (12, 48)
    assert s.acceptance_rate == pytest.approx(30 / 48)
    assert s.mean_acceptance_length == pytest.approx(1 + 30 / 12)
    assert s.generation_tokens == 6 * 8 and s.num_preemptions == 0
    assert s.kv_cache_usage_peak == pytest.approx(0.5)  # 0.25 per request in flight, 2 slots


def test_max_concurrency_is_never_exceeded(fake: FakeServer) -> None:
    fake.script(ttft=0.02, itl=0.01, chunks=(2, 2))
    outcome = _run(fake, _requests(15), max_concurrency=3)
    assert all(r.success for r in outcome.results)
    assert fake.stats()["max_in_flight"] == 3
    assert compute_metrics(outcome.results, outcome.duration_s).peak_concurrency == 3


def test_poisson_arrivals_follow_the_schedule(fake: FakeServer) -> None:
    fake.script(ttft=0.005, itl=0.005, chunks=(1,))
    rate, n, seed = 40.0, 30, 7
    outcome = _run(fake, _requests(n), request_rate=rate, seed=seed)
    assert all(r.success for r in outcome.results)
    arrivals = sorted(fake.stats()["arrivals"])
    expected = arrival_offsets(n, rate, 1.0, seed)
    for times in ([t - arrivals[0] for t in arrivals],
                  sorted(r.start - outcome.start for r in outcome.results)):
        errors = np.abs(np.asarray(times) - np.asarray(expected))
        assert np.median(errors) < TOL_S and errors.max() < MAX_S


def test_failures_are_counted_with_reasons(fake: FakeServer) -> None:
    fake.script(ttft=0.01, itl=0.01, chunks=(1, 1, 1))
    reqs = _requests(4) + _requests(2, marker="FAIL500") + _requests(1, marker="BREAK")
    reqs = [BenchRequest(f"q{i}", r.messages, r.max_tokens) for i, r in enumerate(reqs)]
    outcome = _run(fake, reqs)
    m = compute_metrics(outcome.results, outcome.duration_s)
    assert (m.completed, m.failed) == (4, 3)
    assert m.failure_reasons == {"HTTP 500: scripted failure": 2,
                                 "error event: scripted stream error": 1}
    assert "failed x2: HTTP 500: scripted failure" in format_table(m, 1.0, None, None)


def test_unreachable_server_fails_every_request_without_raising() -> None:
    target = Target("http://127.0.0.1:9", "m")
    reqs = _requests(3)
    outcome = asyncio.run(run_benchmark(target, reqs, RunConfig(progress=False)))
    m = compute_metrics(outcome.results, outcome.duration_s)
    assert (m.completed, m.failed) == (0, 3)
    assert list(m.failure_reasons) == ["ConnectError: All connection attempts failed"]
    assert outcome.server is None


class _WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(range(len(text.split())))

    def decode(self, ids: list[int]) -> str:
        return " ".join("w" for _ in ids)


def test_without_usage_counts_come_from_tokenizer_or_chunks(fake: FakeServer) -> None:
    fake.script(ttft=0.01, itl=0.01, chunks=(1, 3, 2, 2), usage=False)
    reqs = _requests(2, words=5)
    outcome = _run(fake, reqs)  # no tokenizer: counts are chunks
    assert [(r.output_tokens, r.prompt_tokens, r.token_source) for r in outcome.results] == \
        [(4, None, "chunks")] * 2
    m = compute_metrics(outcome.results, outcome.duration_s)
    assert m.total_input_tokens is None and m.total_token_throughput is None
    assert "streamed chunks (no usage, no --tokenizer: lower bound) (2)" in \
        format_table(m, 1.0, None, None)

    target = Target(fake.url, "fake-model")
    outcome = asyncio.run(run_benchmark(target, reqs, RunConfig(progress=False)))
    fill_token_counts(outcome.results, reqs, _WordTokenizer(), "chat")
    assert [(r.output_tokens, r.prompt_tokens, r.token_source) for r in outcome.results] == \
        [(8, 5, "tokenizer")] * 2


def test_cli_sweep_writes_table_json_and_plots(fake: FakeServer, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    fake.script(ttft=0.01, itl=0.01, chunks=(2, 2))
    caplog.set_level(logging.INFO)  # (as `leapfrog`'s command line logs)
    out, png = tmp_path / "res.json", tmp_path / "lat.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    rc = main(["--base-url", fake.url + "/v1", "--num-prompts", "4", "--sweep", "50,inf",
               "--output-len", "4", "--goodput", "ttft:1000", "--no-progress",
               "--result-json", str(out), *plot])
    assert rc == 0
    assert not [r for r in caplog.records if r.name == "httpx"]  # no line per request
    table = capsys.readouterr().out
    assert table.count("Serving Benchmark Result") == 2 and "Request goodput" in table
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["config"]["model"] == "fake-model"
    assert [r["request_rate"] for r in doc["runs"]] == [50.0, "inf"]
    run = doc["runs"][1]
    assert (run["completed"], run["failed"], run["total_output_tokens"]) == (4, 0, 16)
    assert run["ttft_ms"]["count"] == 4 and run["server"]["spec_decode_num_drafts"] == 8
    assert run["request_goodput"] == pytest.approx(run["request_throughput"])
    assert {"id", "ttft_s", "itls_s", "output_tokens", "token_source"} <= set(run["requests"][0])
    readme = (Path(__file__).resolve().parents[1] / "bench" / "README.md").read_text()
    documented = [doc, doc["config"], run, run["server"], run["requests"][0], run["ttft_ms"]]
    undocumented = {k for part in documented for k in part if f'"{k}"' not in readme}
    assert not undocumented, f"result keys missing from bench/README.md: {undocumented}"
    if plot:
        assert png.stat().st_size > 0 and (tmp_path / "lat_sweep.png").stat().st_size > 0


def test_cli_reports_bad_input_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", "http://127.0.0.1:9", "--model", "m", "--dataset", "jsonl"]) == 2
    assert "--dataset must be" in capsys.readouterr().err
