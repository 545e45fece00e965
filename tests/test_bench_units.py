"""Unit tests of the bench pieces that need no server: arrivals, statistics, goodput,
Prometheus parsing, datasets."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.arrivals import arrival_offsets
from bench.client import RequestResult, Target, root_url
from bench.datasets import (
    BenchRequest,
    load_builtin_prompts,
    load_jsonl_prompts,
    load_requests,
    sharegpt_requests,
)
from bench.metrics import Stats, compute_metrics, parse_goodput, peak_concurrency
from bench.metrics_scrape import kv_usage, parse_samples, summarize
from bench.progress import Progress


@pytest.mark.parametrize("rate,burstiness", [(5.0, 1.0), (50.0, 0.5), (2.0, 4.0)])
def test_arrival_gaps_have_the_right_mean_rate_and_spread(rate: float, burstiness: float) -> None:
    offsets = arrival_offsets(20001, rate, burstiness, seed=3)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert 1 / gaps.mean() == pytest.approx(rate, rel=0.03)
    # Gamma(shape=B) gaps: coefficient of variation 1/sqrt(B); 1 for Poisson.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrivals_inf_rate_seeding_and_bad_values() -> None:
    assert arrival_offsets(4, float("inf")) == [0.0] * 4
    assert arrival_offsets(10, 3.0, seed=1) == arrival_offsets(10, 3.0, seed=1)
    assert arrival_offsets(10, 3.0, seed=1) != arrival_offsets(10, 3.0, seed=2)
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, burstiness=0.0)


def test_stats_match_numpy_and_are_in_ms() -> None:
    samples = [0.010, 0.020, 0.030, 0.040, 0.100]
    s = Stats.of(samples)
    assert s.count == 5 and s.mean == pytest.approx(40.0) and s.median == pytest.approx(30.0)
    assert s.p90 == pytest.approx(np.percentile(samples, 90) * 1000)
    assert s.p99 == pytest.approx(np.percentile(samples, 99) * 1000)
    assert Stats.of([]) == Stats(0, None, None, None, None)


def _result(i: int, ttft: float, e2el: float, out: int, ok: bool = True) -> RequestResult:
    return RequestResult(f"r{i}", success=ok, error="" if ok else "boom", start=float(i),
                         end=i + e2el, ttft=ttft, e2el=e2el, itls=[0.01] * max(out - 1, 0),
                         num_chunks=out, prompt_tokens=10, output_tokens=out,
                         token_source="usage")


def test_tpot_goodput_and_throughput_definitions() -> None:
    results = [
        _result(0, ttft=0.1, e2el=0.5, out=5),   # TPOT 100 ms
        _result(1, ttft=0.3, e2el=0.4, out=3),   # TPOT 50 ms, TTFT over the SLO
        _result(2, ttft=0.1, e2el=0.2, out=1),   # one token: no TPOT, counts as 0 for goodput
        _result(3, ttft=0.0, e2el=0.0, out=0, ok=False),
    ]
    m = compute_metrics(results, duration_s=2.0, slos=parse_goodput("ttft:200,tpot:120"))
    assert (m.completed, m.failed, m.failure_reasons) == (3, 1, {"boom": 1})
    assert m.tpot.count == 2 and m.tpot.mean == pytest.approx(75.0)
    assert m.request_goodput == pytest.approx(2 / 2.0)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(9 / 2.0)
    assert m.total_token_throughput == pytest.approx((30 + 9) / 2.0)
    assert m.itl.count == 4 + 2
    assert compute_metrics(results, 2.0).request_goodput is None


def test_goodput_spec_errors_name_the_problem() -> None:
    assert parse_goodput("e2el:1500") == {"e2el": 1.5}
    with pytest.raises(ValueError, match="KEY:MS"):
        parse_goodput("latency:5")
    with pytest.raises(ValueError, match="milliseconds"):
        parse_goodput("ttft:fast")


def test_peak_concurrency_from_intervals() -> None:
    rs = [RequestResult("a", start=0.0, end=1.0), RequestResult("b", start=0.5, end=2.0),
          RequestResult("c", start=1.0, end=3.0), RequestResult("d", start=1.5, end=1.6)]
    assert peak_concurrency(rs) == 3  # b, c, d at t=1.5 (a ended at 1.0 as c began)


PROM = """# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{model_name="m",engine="0"} 10
vllm:spec_decode_num_drafts_total{model_name="m",engine="1"} 6
vllm:spec_decode_num_drafts_created{model_name="m",engine="0"} 1.7e9
# TYPE vllm:spec_decode_num_accepted_tokens counter
vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 24
# TYPE vllm:spec_decode_num_draft_tokens counter
vllm:spec_decode_num_draft_tokens_total{model_name="m"} 64
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.42
"""


def test_prometheus_parsing_and_deltas_with_vllm_names() -> None:
    after = parse_samples(PROM)
    assert after["vllm:spec_decode_num_drafts_total"] == 16
    assert kv_usage(after) == pytest.approx(0.42)
    before = parse_samples(PROM.replace(" 10\n", " 2\n").replace(" 24\n", " 0\n"))
    s = summarize(before, after, kv_peak=0.5)
    assert (s.spec_decode_num_drafts, s.spec_decode_num_accepted_tokens) == (8, 24)
    assert s.spec_decode_num_draft_tokens == 0 and s.acceptance_rate is None
    assert s.mean_acceptance_length == pytest.approx(1 + 24 / 8)
    assert s.num_preemptions is None and s.kv_cache_usage_peak == 0.5


def test_builtin_prompt_set_shape() -> None:
    prompts = load_builtin_prompts()
    assert 36 <= len(prompts) <= 48 and len({p.id for p in prompts}) == len(prompts)
    categories = {p.category for p in prompts}
    assert categories == {"multi_turn_chat", "summarization", "rewriting", "qa_with_context",
                          "math", "translation"}
    for p in prompts:
        assert p.max_tokens > 0 and p.messages[-1]["role"] == "user"
        if p.category in ("summarization", "qa_with_context"):
            longest = max(len(part.split()) for m in p.messages
                          for part in m["content"].split("\n\n"))
            assert 100 <= longest <= 300, p.id
    assert sum(len(p.messages) > 2 for p in prompts if p.category == "multi_turn_chat") >= 5


def test_builtin_requests_use_every_prompt_before_repeating() -> None:
    n = len(load_builtin_prompts())
    reqs = load_requests("builtin", n + 3, seed=1, output_len=None)
    ids = [r.id.split("#")[0] for r in reqs]
    assert len(set(ids[:n])) == n and len(ids) == n + 3
    assert {r.max_tokens for r in load_requests("builtin", 5, 1, output_len=7)} == {7}


def test_random_lengths_stay_in_the_spread() -> None:
    reqs = load_requests("random", 200, seed=0, output_len=None)
    words = [len(r.messages[0]["content"].split()) for r in reqs]
    assert min(words) >= 192 and max(words) <= 320 and max(words) - min(words) > 64
    assert all(96 <= r.max_tokens <= 160 for r in reqs)
    with pytest.raises(ValueError, match="--dataset"):
        load_requests("nonsense", 3, 0, None)


def test_sharegpt_and_jsonl_loaders(tmp_path: Path) -> None:
    convs = [{"conversations": [{"from": "human", "value": "word " * 20},
                                {"from": "gpt", "value": "reply " * 30}]},
             {"conversations": [{"from": "human", "value": "too short"}]},
             {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x " * 9}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    reqs = sharegpt_requests(path, 1, seed=0, output_len=None)
    assert reqs[0].max_tokens == 40 and reqs[0].messages[0]["content"].startswith("word")
    with pytest.raises(ValueError, match="only 1 usable"):
        sharegpt_requests(path, 2, seed=0, output_len=None)

    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "hello", "max_tokens": 9}\n\n{"messages": [{"role": "user", '
                  '"content": "x"}], "id": "b"}\n')
    prompts = load_jsonl_prompts(jl)
    assert [(p.id, p.max_tokens) for p in prompts] == [("p-0", 9), ("b", 128)]
    jl.write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_jsonl_prompts(jl)


def test_target_urls_and_payload() -> None:
    assert root_url("http://h:1/v1/") == root_url("http://h:1") == "http://h:1"
    req = BenchRequest("a", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], 5)
    chat = Target("http://h:1/v1", "m", api_key="k", ignore_eos=True)
    body = chat.payload(req)
    assert chat.url == "http://h:1/v1/chat/completions"
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert chat.headers()["Authorization"] == "Bearer k"
    comp = Target("http://h:1", "m", endpoint="completions")
    assert comp.url == "http://h:1/v1/completions"
    assert comp.payload(req)["prompt"] == "system: s\nuser: u\nassistant:"
    assert "ignore_eos" not in comp.payload(req)


def test_progress_on_a_pipe_prints_one_line_per_tenth() -> None:
    stream = io.StringIO()
    bar = Progress(20, "x ", stream=stream)
    for i in range(20):
        bar.update(success=i != 3)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("x [" + "#" * 30 + "] 20/20 failed 1")
    silent = io.StringIO()
    Progress(3, enabled=False, stream=silent).update(True)
    assert silent.getvalue() == ""
