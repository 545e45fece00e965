"""The scheduler's admission and speculation bounds on fabricated runner outputs (no model):
`admit_batch` (a backlog taken in several slots at a time), the priority policy, and
`SpecPolicy.disable_by_batch_size`."""

from __future__ import annotations

from server.engine.block_manager import BlockManager
from server.engine.contracts import SchedulerOutput
from server.engine.scheduler import Scheduler, SchedulerConfig
from tests.test_scheduler import AlwaysDraftPolicy, fake_run, req


def _decoding(s: Scheduler, max_tokens: list[int]) -> None:
    """Requests r0, r1, ... of 4-token prompts, prefilled: each now decodes a token a step."""
    for i, m in enumerate(max_tokens):
        s.add_request(req(f"r{i}", 4, max_tokens=m))
    s.update(out := s.schedule(), fake_run(out))
    assert all(len(s.requests[f"r{i}"].output_token_ids) == 1 for i in range(len(max_tokens)))


def _backlog(waiting: int, admit_batch: int = 3) -> Scheduler:
    """Four requests decoding in a batch of four, `waiting` requests w0, w1, ... queued;
    then r0 ends: one slot is free."""
    s = Scheduler(SchedulerConfig(4, 64, 256, admit_batch=admit_batch), BlockManager(64, 4))
    _decoding(s, [2, 30, 30, 30])
    for i in range(waiting):
        s.add_request(req(f"w{i}", 4))
    s.update(out := s.schedule(), fake_run(out))
    assert len(s.running) == 3
    return s


def _admitted(out: SchedulerOutput) -> list[str]:
    return [x.request.request_id for x in out.scheduled if x.request.request_id.startswith("w")]


def _until_preempted(s: Scheduler) -> list[str]:
    """Steps until one preempts; the ids it preempted."""
    preempted: list[str] = []
    while not preempted:
        out = s.schedule()
        preempted = out.preempted
        s.update(out, fake_run(out))
    return preempted


def test_admit_batch_holds_a_backlog_until_enough_slots_are_free() -> None:
    """With more requests waiting than the batch has room for, none is taken in (a step
    that would run eagerly, not as a graph) until admit_batch slots are free."""
    s = Scheduler(SchedulerConfig(4, 64, 256, admit_batch=3), BlockManager(64, 4))
    _decoding(s, [3, 4, 5, 30])
    for i in range(5):
        s.add_request(req(f"w{i}", 4))
    held = []
    while len(s.running) > 1:
        out = s.schedule()
        held.append((4 - len(s.running), _admitted(out)))
        s.update(out, fake_run(out))
    # r0 ends after step 2, r1 after 3, r2 after 4: 1 and 2 slots free are held back
    assert held == [(0, []), (0, []), (1, []), (2, [])]
    out = s.schedule()
    assert _admitted(out) == ["w0", "w1", "w2"]
    s.update(out, fake_run(out))
    s.blocks.check_integrity()


def test_admit_batch_takes_in_at_once_without_a_backlog_or_in_an_eager_step(monkeypatch) -> None:
    # room for everyone waiting: no hold
    assert _admitted(_backlog(1).schedule()) == ["w0"]
    # a running request still computes its prompt (in chunks): the step is eager anyway
    s = Scheduler(SchedulerConfig(4, 8, 256, admit_batch=3), BlockManager(64, 4))
    _decoding(s, [2])
    s.add_request(req("long", 20))
    s.update(out := s.schedule(), fake_run(out))  # r0's last token; long's first 7 tokens
    for i in range(4):
        s.add_request(req(f"w{i}", 2))
    out = s.schedule()  # long's next chunk (8 tokens), then room for 3 with 5 waiting
    assert _admitted(out) == []  # (the step's budget went to long's chunk)
    s.update(out, fake_run(out))
    out = s.schedule()  # long's last 5 tokens: eager, so w0 and w1 share the 3 tokens left
    assert _admitted(out) == ["w0", "w1"]
    # held no longer than max_admission_hold_s
    clock = [100.0]
    monkeypatch.setattr("server.engine.scheduler.time.monotonic", lambda: clock[0])
    s = _backlog(3)
    for _ in range(2):  # held since the first of these
        out = s.schedule()
        assert _admitted(out) == []
        s.update(out, fake_run(out))
        clock[0] += 0.0625
    assert _admitted(s.schedule()) == ["w0"]  # 0.125 s after


def test_admit_batch_lets_steps_launch_ahead_while_it_holds() -> None:
    s = _backlog(5)  # one slot free, five waiting
    decode = s.schedule()
    assert _admitted(decode) == []
    assert s.schedule_ahead(decode) is not None
    plain = _backlog(5, admit_batch=1)
    decode = plain.schedule()
    assert _admitted(decode) == ["w0"]
    assert plain.schedule_ahead(decode) is None  # (w0's first token comes from this step)


def test_a_hold_that_ends_while_steps_launch_ahead_takes_in_the_next_step(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("server.engine.scheduler.time.monotonic", lambda: clock[0])
    s = _backlog(5)
    decode = s.schedule()  # held from here
    ahead = s.schedule_ahead(decode)
    assert _admitted(decode) == [] and ahead is not None
    s.update(decode, fake_run(decode))
    clock[0] += 0.125
    assert s.schedule_ahead(ahead) is None  # the hold is over: w0 is taken in next
    s.update(ahead, fake_run(ahead))
    assert _admitted(s.schedule()) == ["w0"]


def test_priority_policy_orders_waiting_and_running_and_preempts_the_highest_value() -> None:
    s = Scheduler(SchedulerConfig(2, 64, 256, policy="priority"), BlockManager(6, 4))
    for rid, priority in (("a", 5), ("b", 0), ("c", 5), ("d", -1), ("e", 0)):
        s.add_request(req(rid, 4, max_tokens=40, priority=priority))
    assert [r.request_id for r in s.waiting] == ["d", "b", "e", "a", "c"]
    out = s.schedule()  # d and b: 2 blocks each of 6
    assert [x.request.request_id for x in out.scheduled] == ["d", "b"]
    s.update(out, fake_run(out))
    # both grow; when the cache runs out, b (priority 0) goes before d (-1)
    assert _until_preempted(s) == ["b"] and [r.request_id for r in s.running] == ["d"]
    assert [r.request_id for r in s.waiting] == ["b", "e", "a", "c"]  # b first of its 0s
    s.blocks.check_integrity()
    # fcfs: the latest admitted is preempted, whatever the priority field says
    f = Scheduler(SchedulerConfig(2, 64, 256), BlockManager(6, 4))
    for rid, priority in (("x", 0), ("y", -1)):
        f.add_request(req(rid, 4, max_tokens=40, priority=priority))
    assert _until_preempted(f) == ["y"]


def test_priority_policy_runs_the_batch_in_priority_order() -> None:
    """A request admitted later with a lower value is scheduled (and given budget) first."""
    s = Scheduler(SchedulerConfig(4, 64, 256, policy="priority"), BlockManager(64, 4))
    s.add_request(req("late", 4, priority=3))
    s.update(out := s.schedule(), fake_run(out))
    s.add_request(req("urgent", 4, priority=-3))
    s.update(out := s.schedule(), fake_run(out))
    assert [x.request.request_id for x in s.schedule().scheduled] == ["urgent", "late"]


def test_speculation_disabled_by_batch_size() -> None:
    """vLLM's disable_by_batch_size: a step of that many requests asks none for drafts,
    whatever the policy would hand out; a smaller one gets the policy's."""
    def drafts_asked(num_requests: int) -> list[int]:
        s = Scheduler(SchedulerConfig(8, 64, 256), BlockManager(64, 4),
                      AlwaysDraftPolicy(max_draft_tokens=3, disable_by_batch_size=3))
        for i in range(num_requests):
            s.add_request(req(f"r{i}", 4, max_tokens=20))
        s.update(out := s.schedule(), fake_run(out))
        return [x.num_draft_tokens_next for x in s.schedule().scheduled]

    assert drafts_asked(2) == [3, 3]
    assert drafts_asked(3) == [0, 0, 0]
