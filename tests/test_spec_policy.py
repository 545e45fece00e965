"""The speculation policy (`SpecPolicy`, `StepCosts`) on fabricated costs and steps, and
the scheduler and engine feeding it (no model)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from server.engine.contracts import RunnerOutput
from server.engine.spec_policy import SpecPolicy, StepCosts
from tests.test_scheduler import fake_run, make, req


def measure(observe: Callable[[int, float], None],
            sizes_and_times: Iterable[tuple[int, float]]) -> None:
    """Observe each (size, seconds) three times: trusted (`StepCosts.trusted`)."""
    for size, seconds in sizes_and_times:
        for _ in range(3):
            observe(size, seconds)


def test_spec_policy_follows_acceptance_and_measured_costs() -> None:
    p = SpecPolicy(max_draft_tokens=6)
    p.costs.observe(1, 0.050)
    p.costs.observe(7, 0.052)  # verification nearly free: draft long
    assert p.draft_length("x", step_tokens=1, producing=1, limit=6) >= 4
    for _ in range(20):
        p.observe("x", 4, 0)
    assert p.draft_length("x", step_tokens=1, producing=1, limit=6) == 0
    for _ in range(200):  # idle steps slowly restore the estimate, so it tries again
        p.observe("x", 0, 0)
    assert p.draft_length("x", step_tokens=1, producing=1, limit=6) > 0
    busy = SpecPolicy(max_draft_tokens=6)
    for n in range(16, 120):
        busy.costs.observe(n, 0.01 * n)  # compute bound: time grows with every token
    assert busy.draft_length("y", step_tokens=64, producing=64, limit=6) == 0
    assert busy.draft_length("y", step_tokens=64, producing=64, limit=0) == 0


def test_drafts_asked_for_count_only_as_often_as_found() -> None:
    """A request whose drafter finds nothing to propose (an n-gram lookup without a match)
    expects drafts only as often as they are found, so that it stops being asked (and
    paying for the asking) while its lookups keep failing."""
    policy = SpecPolicy(max_draft_tokens=4)
    measure(policy.costs.observe, ((1, 0.050), (6, 0.060)))  # verification costs 4% a token
    s = make(budget=64, policy=policy)
    s.add_request(req("a", 4, max_tokens=40))
    s.add_request(req("b", 4, max_tokens=40))
    out = s.schedule()
    assert all(x.num_draft_tokens_next > 0 for x in out.scheduled)
    result = fake_run(out)
    result.sampled["b"].next_draft = [5, 5]  # b's drafter found two, a's none
    s.update(out, result)
    assert policy.found("a") == pytest.approx(0.7) and policy.found("b") == 1.0
    assert policy.acceptance("a") == policy.acceptance("b") == pytest.approx(0.6)
    for _ in range(6):  # a's drafter never finds any; b's drafts are all accepted
        out = s.schedule()
        result = fake_run(out, accept_all=True)
        result.sampled["b"].next_draft = [5] * out.scheduled[1].num_draft_tokens_next
        s.update(out, result)
    a, b = s.schedule().scheduled
    assert a.num_draft_tokens_next == 0 and b.num_draft_tokens_next > 0
    for _ in range(200):  # steps without asking slowly restore it, so it tries again
        policy.observe("a", 0, 0)
    assert policy.found("a") == 1.0
    policy.forget("a")
    assert policy.found("a") == 1.0


def test_new_requests_start_from_finished_requests_estimates() -> None:
    p = SpecPolicy(max_draft_tokens=4, prior=0.6, start_weight=0.5)
    p.observe("a", 4, 0)  # a verified: 0.6 -> 0.42
    p.observe("b", 0, 0)  # b never verified: its end moves nothing
    p.forget("b")
    assert p.acceptance("new") == pytest.approx(0.6)
    p.forget("a")
    assert p.acceptance("new") == pytest.approx(0.51)
    assert p.acceptance("a") == pytest.approx(0.51)  # forgotten: starts again
    for _ in range(10):
        p.observe("c", 4, 4)
    high = p.acceptance("c")
    p.observe("c", 0, 0)  # an idle step restores low estimates, never lowers high ones
    assert high > 0.9 and p.acceptance("c") == high


def test_padded_steps_choose_one_draft_length_for_all() -> None:
    """CUDA-graph steps cost bucket * Q tokens whoever drafts: the step as a whole drafts
    when verification is nearly free, up to each request's limit."""
    p = SpecPolicy(max_draft_tokens=4, buckets=(1, 2, 4, 8))
    assert p.pads(3) and p.pads(8) and not p.pads(9)
    for q in range(1, 6):
        p.observe_padded(3, q, 0.010)  # bandwidth bound: flat
    requests = [("a", 4), ("b", 2), ("c", 0)]
    assert p.padded_draft_lengths(requests, spare=64) == [4, 2, 0]
    assert p.padded_draft_lengths(requests, spare=3) == [1, 1, 0]  # 2 + 2 > 3
    steep = SpecPolicy(max_draft_tokens=4, buckets=(1, 2, 4, 8))
    for q in range(1, 6):
        steep.observe_padded(3, q, 0.01 * q)  # compute bound
    assert steep.padded_draft_lengths(requests, spare=64) == [0, 0, 0]
    with pytest.raises(ValueError, match="bucket"):
        p.padded_draft_lengths([("x", 1)] * 9, spare=64)
    p.query_buckets = (1, 2, 3)  # the graphs' counts: Q = 4, 5 are not among them
    assert p.padded_draft_lengths(requests, spare=64) == [2, 2, 0]


def test_padded_costs_are_kept_per_request_count() -> None:
    """A step of 16 requests is priced by steps of 16: steps of fewer requests (less host
    work) with more tokens each must not make drafting look free."""
    p = SpecPolicy(max_draft_tokens=8, buckets=(16,), query_buckets=(1, 2, 3, 5, 9))
    measure(lambda q, t: p.observe_padded(16, q, t),
            ((1, 0.0020), (2, 0.0032), (3, 0.0036), (5, 0.0040), (9, 0.0050)))
    # 9 requests padded to 16: less host work, so cheaper at the same padded size
    measure(lambda q, t: p.observe_padded(9, q, t), ((5, 0.0015),))
    requests = [(f"r{i}", 8) for i in range(16)]
    for r, _ in requests:
        p.observe(r, 4, 1)  # acceptance 0.6 -> 0.495
    assert p.padded_draft_lengths(requests, spare=256) == [0] * 16
    assert sorted(p.padded_costs) == [9, 16] and p.padded_costs[16].time(5) == 0.0040


def test_padded_step_keeps_only_drafts_that_pay_for_their_padding() -> None:
    """Asked for drafts, most requests' drafters found none: one request's long draft would
    pad all four to 9 tokens, so the step verifies only what pays (and frees its blocks)."""
    policy = SpecPolicy(max_draft_tokens=8, buckets=(4,), query_buckets=(1, 2, 3, 5, 9))
    measure(lambda q, t: policy.observe_padded(4, q, t),
            ((1, 0.0020), (2, 0.0022), (3, 0.0024), (5, 0.0028), (9, 0.0040)))
    s = make(budget=256, block_size=4, policy=policy)
    for rid in "abcd":
        s.add_request(req(rid, 3, max_tokens=40))
    s.update(out := s.schedule(), fake_run(out))  # the prompts (not padded)
    s.requests["a"].spec_token_ids = [5] * 8  # 3 prompt + 1 token + 8 drafts: 3 blocks
    s.requests["b"].spec_token_ids = [6]
    out = s.schedule()
    kept = {x.request.request_id: x.spec_token_ids for x in out.scheduled}
    # acceptance 0.6: Q = 2 yields 5.2 tokens in 2.2 ms, Q = 3 5.56 in 2.4, Q = 9 6.08 in 4
    assert kept == {"a": [5], "b": [6], "c": [], "d": []}
    a = out.scheduled[0]
    assert a.num_new_tokens == 2 and s.requests["a"].spec_token_ids == [5]
    assert out.num_batched_tokens == 2 + 2 + 1 + 1
    assert len(s.blocks.block_table("a")) == 2  # 4 computed + 2 new = 6 slots
    s.blocks.check_integrity()
    for rid in "abcd":  # the drafts of these requests are rarely accepted: none pay
        for _ in range(10):
            policy.observe(rid, 4, 0)
    s.update(out, fake_run(out))
    s.requests["a"].spec_token_ids = [5] * 8
    out = s.schedule()
    assert all(x.spec_token_ids == [] for x in out.scheduled)
    assert out.num_batched_tokens == 4 and len(s.blocks.block_table("a")) == 2


def test_scheduler_pads_drafts_of_decoding_steps_only() -> None:
    policy = SpecPolicy(max_draft_tokens=3, buckets=(1, 2, 4))
    for n in (4, 8, 12, 16):
        policy.costs.observe(n, 0.010)
    for q in (1, 2, 3, 4):
        policy.observe_padded(2, q, 0.010)
    s = make(budget=64, policy=policy)
    s.add_request(req("a", 4, max_tokens=20))
    s.add_request(req("b", 4, max_tokens=3))
    out = s.schedule()  # prompts: the per-request rule (sum of tokens, flat prior: drafts)
    s.update(out, fake_run(out))
    s.add_request(req("c", 4, max_tokens=20))
    out = s.schedule()  # a and b decode, c's prompt: not padded
    assert [x.request.request_id for x in out.scheduled] == ["a", "b", "c"]
    s.update(out, fake_run(out))
    out = s.schedule()  # decoding only: one Q, b capped by its max_tokens
    assert [x.num_draft_tokens_next for x in out.scheduled] == [3, 0, 3]


def test_step_costs_interpolate_and_fall_back_to_prior() -> None:
    c = StepCosts(prior_knee=10)
    assert c.time(11) == pytest.approx(2.0)  # no data: relative prior
    c.observe(1, 1.0)
    assert c.time(11) == pytest.approx(2.0)
    c.observe(5, 3.0)
    assert c.time(3) == pytest.approx(2.0) and c.time(9) == pytest.approx(5.0)
    c.observe(5, 5.0)  # 2 observations: no more than size 1 predicts (the prior's 1.4)
    assert c.times[5] == pytest.approx(4.0) and c.time(5) == pytest.approx(1.4)
    c.observe(5, 4.5)
    assert c.time(5) == pytest.approx(4.5)  # trusted: the median
    c.observe(5, 100.0)  # a stall moves the median, not the estimate with it
    assert c.time(5) == pytest.approx(4.75)


def test_step_costs_retry_a_size_whose_first_step_stalled() -> None:
    """A size measured once, slowly, is estimated from the others until measured again."""
    c = StepCosts()
    for _ in range(3):
        c.observe(1, 1.0)
    c.observe(3, 50.0)  # e.g. a collection during the step
    assert c.time(3) == pytest.approx(1.125)  # the prior from size 1
    c.observe(3, 1.2)
    c.observe(3, 1.2)
    assert c.time(3) == pytest.approx(1.2)


def test_step_costs_replace_a_size_unobserved_for_long() -> None:
    """Observations of a size that went unobserved for `refresh` observations replace its
    old ones; until then new ones join them."""
    c = StepCosts(refresh=8)
    measure(c.observe, ((1, 4.0),))  # slow first steps (say, the graphs' first replays)
    c.observe(1, 1.0)
    assert c.time(1) == pytest.approx(4.0) and c.age(1) == 0
    for _ in range(8):
        c.observe(2, 2.0)
    assert c.age(1) == 8 and c.age(3) == c.ticks == 12
    c.observe(1, 1.5)  # expired: this one alone, estimated from the others until trusted
    assert c.times[1] == pytest.approx(1.5) and c.time(1) == pytest.approx(1.5)


def test_step_costs_retry_a_stale_size_priced_by_slow_first_steps() -> None:
    """A size measured slow early on (a GPU's clocks rising from idle) and never chosen
    since is estimated, once stale, at most as the sizes measured since predict; the
    policy tries it again, and that one new measurement is trusted."""
    p = SpecPolicy(max_draft_tokens=8, buckets=(1,), query_buckets=(1, 2))
    p.padded_costs[1] = c = StepCosts(refresh=8)
    measure(lambda q, t: p.observe_padded(1, q, t), ((1, 0.0006), (2, 0.0022)))
    p.observe("r", 4, 3)  # acceptance 0.6 -> 0.645
    requests = [("r", 8)]
    assert p.padded_draft_lengths(requests, 256) == [0]  # 1.65 tokens in 2.2 ms: no
    for _ in range(7):
        p.observe_padded(1, 1, 0.0006)
    assert p.padded_draft_lengths(requests, 256) == [0] and c.age(2) == 7
    p.observe_padded(1, 1, 0.0006)  # stale: at most the prior from size 1's 0.6 ms
    assert c.time(2) == pytest.approx(0.0006 * (1 + 1 / 16))
    assert p.padded_draft_lengths(requests, 256) == [1]
    p.observe_padded(1, 2, 0.0009)  # the size as it is now: trusted at once
    assert c.time(2) == pytest.approx(0.0009)
    assert p.padded_draft_lengths(requests, 256) == [1]  # 1.65 tokens in 0.9 ms: yes
    p.observe_padded(1, 2, 0.0025)  # (later measurements join it)
    assert c.time(2) == pytest.approx(0.0017)


def test_padded_policy_remeasures_the_plain_step() -> None:
    """Plain 16-request steps priced too high (slow first steps) keep drafting chosen; every
    `explore_every` steps without a plain one, asking before drafting takes one, and the
    new measurement replaces the old."""
    p = SpecPolicy(max_draft_tokens=8, buckets=(16,), query_buckets=(1, 2, 3, 5, 9),
                   explore_every=10)
    p.padded_costs[16] = StepCosts(refresh=10)
    measure(lambda q, t: p.observe_padded(16, q, t),
            ((2, 0.0022), (3, 0.0024), (5, 0.0027), (9, 0.0030), (1, 0.0040)))
    requests = [(f"r{i}", 8) for i in range(16)]
    for r, _ in requests:
        p.observe(r, 4, 1)  # acceptance 0.6 -> 0.495
    cost = {2: 0.0022, 3: 0.0024, 5: 0.0027, 9: 0.0030}
    # Q = 3: 1.74 tokens a request in 2.4 ms, against 1 in 4 (later Q = 5, once stale, is
    # tried again: 1.92 in the 2.6 ms that Q = 3 and 9 predict)
    assert p.padded_draft_lengths(requests, 256, explore=True) == [2] * 16
    for _ in range(10):
        lengths = p.padded_draft_lengths(requests, 256, explore=True)
        assert lengths != [0] * 16
        p.observe_padded(16, lengths[0] + 1, cost[lengths[0] + 1])
    # the tenth step since the last plain one
    assert p.padded_draft_lengths(requests, 256, explore=True) == [0] * 16
    assert p.padded_draft_lengths(requests, 256) != [0] * 16  # (only when asked to)
    p.observe_padded(16, 1, 0.0012)  # the plain step as it is now
    assert p.padded_costs[16].time(1) == pytest.approx(0.0012)
    assert p.padded_draft_lengths(requests, 256, explore=True) == [0] * 16  # not worth it


def test_engine_prices_steps_by_computed_tokens() -> None:
    from types import SimpleNamespace

    from server.engine.engine import LLMEngine

    policy = SpecPolicy(max_draft_tokens=4)
    engine = SimpleNamespace(scheduler=SimpleNamespace(spec_policy=policy))
    s = make(budget=64, policy=policy)
    s.add_request(req("a", 4, max_tokens=20))
    s.update(out := s.schedule(), fake_run(out))
    decode = s.schedule()  # 1 token + its drafts
    assert decode.num_batched_tokens == 1 + len(decode.scheduled[0].spec_token_ids)
    LLMEngine._record_step_cost(engine, decode, RunnerOutput({}, query_len=8), 0.5)
    LLMEngine._record_step_cost(engine, decode, RunnerOutput({}), 0.25)
    assert policy.costs.times == {decode.num_batched_tokens: 0.25}
    assert policy.padded_costs[1].times == {8: 0.5}
