"""Scheduler and block manager on fabricated runner outputs (no model)."""

from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager, OutOfBlocksError
from server.engine.contracts import RunnerOutput, SampledTokens, SchedulerOutput
from server.engine.request import Request, RequestStatus
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.spec_policy import SpecPolicy


def make(num_blocks: int = 64, block_size: int = 4, max_seqs: int = 8, budget: int = 32,
         max_len: int = 256, policy: SpecPolicy | None = None) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), BlockManager(num_blocks, block_size), policy)


def req(rid: str, n_prompt: int, max_tokens: int = 8, **kw: object) -> Request:
    return Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw), (2,))


def fake_run(out: SchedulerOutput, token: int = 7, accept_all: bool = False) -> RunnerOutput:
    """Every request that reaches its end samples `token` (drafts all rejected unless accept_all)."""
    sampled = {}
    for s in out.scheduled:
        if s.reaches_end:
            toks = (list(s.spec_token_ids) if accept_all else []) + [token]
            sampled[s.request.request_id] = SampledTokens(toks, len(s.spec_token_ids))
    return RunnerOutput(sampled)


def test_block_manager_allocate_truncate_free() -> None:
    bm = BlockManager(8, 4)
    bm.allocate("a", 9)
    assert len(bm.block_table("a")) == 3 and bm.num_free_blocks == 5
    bm.allocate("a", 12)
    assert len(bm.block_table("a")) == 3
    bm.truncate("a", 4)
    assert len(bm.block_table("a")) == 1
    with pytest.raises(OutOfBlocksError):
        bm.allocate("b", 100)
    bm.check_integrity()
    assert bm.block_table("b") == []
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_integrity()


def test_integrity_check_catches_corruption() -> None:
    bm = BlockManager(4, 4)
    bm.allocate("a", 4)
    bm.pools[0]._free[bm.block_table("a")[0]] = None  # corrupt: a used block is also free
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_chunked_prefill_respects_budget_and_then_decodes() -> None:
    s = make(budget=16)
    s.add_request(req("a", 40))
    steps = []
    while not s.requests["a"].output_token_ids:
        out = s.schedule()
        steps.append(out.num_batched_tokens)
        s.update(out, fake_run(out))
    assert steps == [16, 16, 8]
    out = s.schedule()
    assert out.num_batched_tokens == 1 and out.scheduled[0].reaches_end
    s.blocks.check_integrity()


def test_continuous_batching_join_and_finish() -> None:
    s = make(budget=64)
    s.add_request(req("a", 5, max_tokens=3))
    out = s.schedule()
    s.update(out, fake_run(out))
    s.add_request(req("b", 6, max_tokens=2))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["a", "b"]
    assert [x.num_new_tokens for x in out.scheduled] == [1, 6]
    s.update(out, fake_run(out))
    out = s.schedule()
    finished = s.update(out, fake_run(out))
    assert {r.request_id for r, _ in finished} == {"a", "b"}
    assert not s.has_work() and s.blocks.num_free_blocks == 64
    s.blocks.check_integrity()


def test_max_num_seqs_limits_running_batch() -> None:
    s = make(max_seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", 3))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 2


def test_stop_conditions_eos_and_min_tokens() -> None:
    s = make()
    s.add_request(req("a", 3, max_tokens=10))
    s.add_request(req("b", 3, max_tokens=10, min_tokens=3))
    out = s.schedule()
    s.update(out, fake_run(out, token=2))  # EOS
    assert s.requests.get("a") is None
    assert "b" in s.requests  # EOS before min_tokens does not stop
    s.blocks.check_integrity()


def test_preemption_when_blocks_run_out_recomputes() -> None:
    s = make(num_blocks=10, block_size=4, budget=64)
    s.add_request(req("a", 8, max_tokens=20))
    s.add_request(req("b", 8, max_tokens=20))
    preempted = 0
    for _ in range(60):
        if not s.has_work():
            break
        out = s.schedule()
        preempted += len(out.preempted)
        s.update(out, fake_run(out))
        s.blocks.check_integrity()
    assert not s.has_work()
    assert preempted > 0 and s.num_preemptions == preempted
    assert s.blocks.num_free_blocks == 10


def test_request_larger_than_cache_ends_with_length() -> None:
    s = make(num_blocks=4, block_size=4, budget=64)
    s.add_request(req("a", 8, max_tokens=40))
    emitted, ended = [], []
    for _ in range(30):
        if not s.has_work():
            break
        out = s.schedule()
        emitted += s.update(out, fake_run(out))
        ended += out.ended
    assert not s.has_work() and s.blocks.num_free_blocks == 4
    assert len(emitted) == 9  # 16 KV slots: 8 prompt + 8 generated tokens, whose last samples a 9th
    assert [r.finish_reason for r in ended] == ["length"]


def test_abort_frees_blocks_anytime() -> None:
    s = make()
    s.add_request(req("a", 30))
    out = s.schedule()
    s.finish_request("a", "abort")
    s.update(out, fake_run(out))  # results for an aborted request are dropped
    assert s.blocks.num_free_blocks == 64 and not s.has_work()
    s.blocks.check_integrity()


def test_prompt_longer_than_max_model_len_rejected() -> None:
    s = make(max_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(req("a", 16))


def test_draft_tokens_budgeted_and_rolled_back() -> None:
    s = make(block_size=4, budget=64, policy=SpecPolicy(max_draft_tokens=4))
    r = req("a", 4, max_tokens=20)
    s.add_request(r)
    out = s.schedule()
    assert out.scheduled[0].num_draft_tokens_next > 0
    result = fake_run(out)
    result.sampled["a"].next_draft = [5, 6, 7]
    s.update(out, result)
    assert r.num_computed_tokens == 4 and r.spec_token_ids == [5, 6, 7]
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 4 and out.scheduled[0].spec_token_ids == [5, 6, 7]
    assert len(s.blocks.block_table("a")) == 2  # 8 slots for 4 + 1 + 3 tokens
    s.update(out, fake_run(out))  # all drafts rejected
    assert r.num_computed_tokens == 5 and r.output_token_ids == [7, 7]
    assert len(s.blocks.block_table("a")) == 2  # rollback keeps blocks still holding tokens
    s.blocks.check_integrity()
    r.spec_token_ids = [5, 6, 7, 8]
    out = s.schedule()
    s.update(out, fake_run(out, accept_all=True))
    assert r.num_computed_tokens == 10 and r.output_token_ids[-5:] == [5, 6, 7, 8, 7]
    s.blocks.check_integrity()


def test_rollback_frees_emptied_blocks() -> None:
    s = make(block_size=2, budget=64, policy=SpecPolicy(max_draft_tokens=4))
    r = req("a", 2, max_tokens=20)
    s.add_request(r)
    out = s.schedule()
    s.update(out, fake_run(out))
    r.spec_token_ids = [5, 6, 7, 8]
    out = s.schedule()  # 2 computed + 1 + 4 drafts = 7 slots -> 4 blocks
    assert len(s.blocks.block_table("a")) == 4
    s.update(out, fake_run(out))
    assert r.num_computed_tokens == 3 and len(s.blocks.block_table("a")) == 2
    assert s.blocks.num_free_blocks == 62
    s.blocks.check_integrity()


def test_finished_request_status() -> None:
    s = make()
    s.add_request(req("a", 3, max_tokens=1))
    out = s.schedule()
    (r, toks), = s.update(out, fake_run(out))
    assert r.status == RequestStatus.FINISHED and r.finish_reason == "length" and toks == [7]


def test_schedule_ahead_decodes_the_running_batch_one_token_further() -> None:
    """While a decode step runs, the next one: each request one token on (`ahead`), its
    KV slot allocated; requests the running step certainly finishes (max_tokens,
    max_model_len) left out; the step after that takes the tokens in order."""
    s = make(block_size=4, max_len=12)
    for r in (req("a", 3, max_tokens=8), req("b", 2, max_tokens=2), req("c", 10)):
        s.add_request(r)
    s.update(prefill := s.schedule(), fake_run(prefill))  # 1 token each: a 4, b 3, c 11
    decode = s.schedule()
    assert [x.num_new_tokens for x in decode.scheduled] == [1, 1, 1]
    ahead = s.schedule_ahead(decode)
    # b's second token ends it (max_tokens 2), c's twelfth max_model_len
    assert [(x.request.request_id, x.num_new_tokens, x.ahead) for x in ahead.scheduled] == [
        ("a", 1, 1)]
    assert ahead.scheduled[0].reaches_end
    assert len(s.blocks.block_table("a")) == 2  # position 5 of "a": a second block
    emitted = s.update(decode, fake_run(decode, token=5))
    assert [(r.request_id, t) for r, t in emitted] == [("a", [5]), ("b", [5]), ("c", [5])]
    assert s.requests.keys() == {"a"}
    assert len(s.blocks.block_table("a")) == 2  # kept for the step launched ahead
    s.update(ahead, fake_run(ahead, token=6))
    a = s.requests["a"]
    assert a.output_token_ids == [7, 5, 6] and a.num_computed_tokens == 5
    s.blocks.check_integrity()


def test_schedule_ahead_only_when_nothing_else_would_run() -> None:
    """No step ahead with a request waiting that the batch could admit, after a step that
    was not plain decode, or without free blocks for the next tokens."""
    s = make(max_seqs=2)
    s.add_request(req("a", 3))
    s.update(first := s.schedule(), fake_run(first))
    s.add_request(req("b", 3))
    decode = s.schedule()  # a decodes, b's prompt
    assert s.schedule_ahead(decode) is None
    s.update(decode, fake_run(decode))
    s.add_request(req("c", 3))  # waits: the batch is full
    both = s.schedule()
    assert s.schedule_ahead(both) is not None
    assert make(policy=SpecPolicy(3)).schedule_ahead(SchedulerOutput([], 0)) is None
    tight = make(num_blocks=2, block_size=4)
    tight.add_request(req("a", 4))
    tight.add_request(req("b", 4))
    tight.update(full := tight.schedule(), fake_run(full))
    decode = tight.schedule()  # position 4 of each needs a second block: preempts b
    assert decode.preempted and tight.schedule_ahead(decode) is None


class ChosenDraftsPolicy(SpecPolicy):
    """Every request drafts `next` tokens (as room allows) after the step being scheduled."""

    next = 0

    def draft_length(self, request_id: str, step_tokens: int, producing: int, limit: int) -> int:
        return min(limit, self.next)


def test_schedule_ahead_with_speculation_follows_steps_asking_no_drafts() -> None:
    """With speculation, a step ahead only follows a plain step after which no request
    drafts (nothing waits for its hidden states); the policy then sizes the drafts after
    the step ahead, and their KV slots (draft_slots) come after its token, not the
    running step's."""
    policy = ChosenDraftsPolicy(max_draft_tokens=4)
    s = Scheduler(SchedulerConfig(8, 64, 256), BlockManager(16, 4), policy, draft_slots=True)
    r = req("a", 6, max_tokens=40)
    s.add_request(r)
    s.update(prefill := s.schedule(), fake_run(prefill))  # newest token at position 6
    policy.next = 2
    decode = s.schedule()  # position 6; drafts asked after it
    assert decode.scheduled[0].num_draft_tokens_next == 2
    assert s.schedule_ahead(decode) is None
    s.update(decode, fake_run(decode))  # (no drafts proposed)
    policy.next = 0
    decode = s.schedule()  # position 7, no drafts after it
    policy.next = 4
    ahead = s.schedule_ahead(decode)
    assert [(x.num_new_tokens, x.ahead, x.num_draft_tokens_next) for x in ahead.scheduled] == [
        (1, 1, 4)]
    # the step ahead computes position 8; its newest token at 9, the drafts write 9..12
    assert len(s.blocks.block_table("a")) == 4
    s.update(decode, fake_run(decode))
    s.update(ahead, fake_run(ahead))
    assert r.num_computed_tokens == 9 and len(r.output_token_ids) == 4
    s.blocks.check_integrity()
    # max_model_len 13: drafts after the step ahead fit at positions 10..12 only
    policy.next = 0
    s = Scheduler(SchedulerConfig(8, 64, 13), BlockManager(16, 4), policy, draft_slots=True)
    s.add_request(req("b", 6, max_tokens=40))
    for _ in range(2):
        s.update(out := s.schedule(), fake_run(out))
    decode = s.schedule()  # position 7, no drafts after it
    policy.next = 4
    assert s.schedule_ahead(decode).scheduled[0].num_draft_tokens_next == 3


def test_draft_slots_reserved_for_drafts_that_write_kv() -> None:
    """With draft_slots (self-speculation), a request that will draft k tokens holds the KV
    slots they may write, after this step's tokens; a tight cache asks for fewer drafts and
    preempts nobody."""
    s = Scheduler(SchedulerConfig(8, 64, 256), BlockManager(4, 4),
                  AlwaysDraftPolicy(max_draft_tokens=4), draft_slots=True)
    r = req("a", 6, max_tokens=40)
    s.add_request(r)
    out = s.schedule()  # 6 prompt tokens; the newest token at position 6, drafts 6..9
    assert out.scheduled[0].num_draft_tokens_next == 4
    assert len(s.blocks.block_table("a")) == 3  # 6 + 4 = 10 slots
    s.update(out, fake_run(out))
    r.spec_token_ids = [5, 6, 7, 8]
    out = s.schedule()  # 6 computed + 5 tokens; the next drafts write from 11: 15 slots
    assert out.scheduled[0].num_draft_tokens_next == 4
    assert len(s.blocks.block_table("a")) == 4
    s.update(out, fake_run(out, accept_all=True))
    r.spec_token_ids = [5, 6, 7, 8]
    out = s.schedule()  # 11 computed + 5: 16 slots, all 4 blocks; no room for drafts
    assert out.scheduled[0].num_draft_tokens_next == 0 and not out.preempted
    s.blocks.check_integrity()


class AlwaysDraftPolicy(SpecPolicy):
    """Every request may draft as many tokens as it has room for."""

    def draft_length(self, request_id: str, step_tokens: int, producing: int, limit: int) -> int:
        return min(limit, self.max_draft_tokens)
