"""`leapfrog bench phases`' step timer over a tiny model on CPU with n-gram drafts."""

from __future__ import annotations

from server.benchmarks.phases import StepTimer


def test_step_timer_groups_steps_and_splits_their_time(tiny_model_dir) -> None:
    """Every step lands in one shape (prefill, or the eager decode/verify shape), each phase
    is within its step, the model's time is the forward's, and detaching restores the
    engine's own methods."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(str(tiny_model_dir("llama")), device="cpu", dtype="float32", num_kv_blocks=64,
              block_size=4, speculative="ngram", num_speculative_tokens=3)
    engine = llm.engine
    steps = []
    inner = engine.step
    engine.step = lambda: steps.append(1) or inner()
    timer = StepTimer(engine)
    timer.attach()
    prompts = [[5, 6, 7, 8] * 3, [9, 10] * 5]
    out = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert all(len(c.token_ids) == 12 for c in out)
    assert sum(len(s) for s in timer.steps.values()) == len(steps)
    assert "prefill" in timer.steps
    shapes = set(timer.steps) - {"prefill"}
    assert shapes and all(s.startswith("eager (") for s in shapes)
    assert any(not s.endswith(", 1)") for s in shapes)  # some step verified drafts
    for phases in (p for group in timer.steps.values() for p in group):
        assert phases["model"] > 0
        assert 0 <= phases["host"] <= phases["step"]
        inside = sum(phases.get(k, 0.0) for k in ("schedule", "model", "draft", "update",
                                                   "outputs"))
        assert inside <= phases["step"] * 1.001
    rows = timer.rows()
    assert [r["shape"] for r in rows] == sorted(timer.steps)
    assert all(r["steps"] > 0 and r["step_us"] >= r["host_us"] >= 0 for r in rows)
    timer.detach()
    assert "step" not in engine.__dict__ and "forward" not in engine.model.__dict__
    assert "schedule" not in engine.scheduler.__dict__
