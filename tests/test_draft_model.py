"""The draft-model drafter (`drafters.draft_model`): a separate small model proposes the
drafts from a paged KV cache of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import drafters.draft_model as draft_model
from drafters.base import DraftBatch, DraftRequest
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from tests.test_speculative import TINY_PROMPTS, AlwaysDraft
from tests.tiny_models import VOCAB, save_tiny_model, tiny_tokenizer

COMMON = dict(dtype="float32", num_kv_blocks=64, block_size=2, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different random model, one layer and half the width, with the tiny models'
    vocabulary."""
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("draft"), seed=1,
                           num_hidden_layers=1, hidden_size=32, intermediate_size=64)


def _drafting(target: Path, draft: Path, **config: object) -> LLM:
    llm = LLM(str(target), speculative="draft-model", speculative_model=str(draft),
              num_speculative_tokens=4, **COMMON, **config)
    llm.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=4)
    return llm


def test_greedy_output_is_the_targets_with_any_draft_model(tiny_model_dir, small_draft) -> None:
    target = tiny_model_dir("qwen2")
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = [c.token_ids for c in LLM(str(target), **COMMON).generate(TINY_PROMPTS, params)]
    # the target drafting for itself: every draft is accepted
    same = _drafting(target, target, debug_check_integrity=True)
    got = same.generate(TINY_PROMPTS, params)
    assert [c.token_ids for c in got] == ref
    drafted = sum(c.num_draft_tokens for c in got)
    assert drafted > 30 and sum(c.num_accepted_tokens for c in got) == drafted
    # a different model: most drafts are rejected, the output is still the target's
    other = _drafting(target, small_draft, debug_check_integrity=True)
    drafter = other.engine.drafter
    pool = other.engine.model.kv_caches[0][0].shape[0] - 1 + draft_model.SPARE_BLOCKS
    assert drafter.num_free_blocks == pool  # (allocated at start-up)
    got = other.generate(TINY_PROMPTS, params)
    assert [c.token_ids for c in got] == ref
    assert sum(c.num_draft_tokens for c in got) > sum(c.num_accepted_tokens for c in got)
    assert drafter.num_free_blocks == pool  # (finished requests gave their blocks back)


def _greedy_continuation(model: torch.nn.Module, history: list[int], n: int) -> list[int]:
    """The draft model's n greedy tokens after `history`, each from a fresh forward over
    everything before it (no cache kept between them)."""
    out: list[int] = []
    for _ in range(n):
        hidden = model.teacher_forced(history + out)
        out.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return out


def test_sampled_drafts_are_drawn_from_q_and_keep_the_targets_distribution(
        tiny_model_dir, tmp_path) -> None:
    """Sampled requests draw their drafts from their own sampling distribution over the
    draft model's logits, reported as q: the target drafting for itself then has every
    draft accepted (q = p), and a different draft model leaves the joint distribution of
    the first 2 tokens the target's (two-sample chi-square at 1e-3, 3000 samples a side,
    as test_speculative's)."""
    from collections import Counter

    from tests.test_speculative import chi_square_two_sample, first_tokens

    vocab = 16
    target = save_tiny_model("llama", tmp_path / "target", seed=3, vocab=vocab)
    draft = save_tiny_model("qwen2", tmp_path / "draft", seed=4, vocab=vocab,
                            num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    common = dict(dtype="float32", num_kv_blocks=2048, block_size=4, max_num_seqs=256,
                  max_num_batched_tokens=4096)
    params = dict(temperature=1.0, top_k=8)
    prompt = [3, 7, 1, 9]

    def drafting(path: Path) -> LLM:
        llm = LLM(str(target), speculative="draft-model", speculative_model=str(path),
                  num_speculative_tokens=2, **common)
        llm.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=2)
        return llm

    itself = drafting(target).generate([prompt] * 8, [SamplingParams(
        max_tokens=12, seed=s, ignore_eos=True, **params) for s in range(8)])
    drafted = sum(c.num_draft_tokens for c in itself)
    assert drafted > 20 and sum(c.num_accepted_tokens for c in itself) == drafted
    ref = first_tokens(LLM(str(target), **common), prompt, 2, range(3000), params)
    spec = drafting(draft)
    got = first_tokens(spec, prompt, 3, range(10_000, 13_000), params)
    assert spec.engine.metrics.spec_decode_num_draft_tokens._value.get() >= 2 * 3000
    first_two = Counter()
    for seq, count in got.items():
        first_two[seq[:2]] += count
    stat, critical = chi_square_two_sample(ref, first_two)
    assert stat < critical


def test_drafts_are_the_draft_models_greedy_continuation(tiny_model_dir, small_draft,
                                                         monkeypatch) -> None:
    """Across steps whose drafts the target accepts in part, and a new request beside
    them: the cache keeps the accepted drafts, recomputes what follows, and the drafts are
    what the draft model gives from scratch. Catch-up runs 5 tokens a forward, so prompts
    take several."""
    monkeypatch.setattr(draft_model, "CATCH_UP_TOKENS", 5)
    llm = _drafting(tiny_model_dir("qwen2"), small_draft)
    drafter, runner = llm.engine.drafter, llm.engine.runner
    model = drafter.model

    def propose(histories: dict[str, list[int]], k: int = 4) -> list[list[int]]:
        batch = DraftBatch([DraftRequest(rid, h, k) for rid, h in histories.items()],
                           meta=runner._own_meta)
        return [p.token_ids for p in drafter.propose(batch)]

    a, b = list(TINY_PROMPTS[0]), list(TINY_PROMPTS[1])
    [drafts] = propose({"a": a})
    assert drafts == _greedy_continuation(model, a, 4)
    a += drafts[:2] + [(drafts[2] + 1) % 100]  # two drafts accepted, then a correction
    got = propose({"a": a, "b": b})
    assert got == [_greedy_continuation(model, a, 4), _greedy_continuation(model, b, 4)]
    a += got[0] + [7]  # every draft accepted, then the bonus token
    b += [got[1][0] + 1]  # the first draft rejected
    assert propose({"b": b, "a": a}, k=3) == [_greedy_continuation(model, b, 3),
                                              _greedy_continuation(model, a, 3)]
    drafter.release("a")
    drafter.release("b")
    assert propose({"a": a}) == [_greedy_continuation(model, a, 4)]  # from the prompt again


def test_idle_requests_give_way_when_the_pool_runs_short(tiny_model_dir, small_draft) -> None:
    llm = _drafting(tiny_model_dir("qwen2"), small_draft)
    drafter, runner = llm.engine.drafter, llm.engine.runner

    def propose(histories: dict[str, list[int]]) -> list[list[int]]:
        batch = DraftBatch([DraftRequest(rid, h, 4) for rid, h in histories.items()],
                           meta=runner._own_meta)
        return [p.token_ids for p in drafter.propose(batch)]

    propose({"warm": [3]})
    drafter.release("warm")
    drafter._free = drafter._free[-8:]  # 8 blocks of 2 positions
    a, b = [5, 6, 7, 8, 9, 10], [9, 10, 11, 12, 13, 14]  # each needs 5 blocks
    assert len(propose({"a": a})[0]) == 4
    assert drafter.num_free_blocks == 3
    assert len(propose({"b": b})[0]) == 4  # "a" (idle this step) was evicted
    assert drafter.num_free_blocks == 3 and set(drafter._states) == {"b"}
    assert [len(d) for d in propose({"b": b + [1], "a": a})] == [4, 0]  # "a" does not fit
    # nor when it comes first: "b" is in the step too
    assert [len(d) for d in propose({"a": a, "b": b + [1, 2]})] == [0, 4]


def test_preemption_staggered_arrivals_and_a_short_draft_pool(tiny_model_dir, small_draft,
                                                              monkeypatch) -> None:
    """A target pool small enough to preempt, requests arriving while others run, and a
    draft cache no larger than the target's (so that some requests find no room for their
    drafts): the target's greedy tokens, and every block of both pools back at the end."""
    from tests.test_engine import GREEDY, mixed_prompts, run_staggered

    monkeypatch.setattr(draft_model, "SPARE_BLOCKS", 0)
    target = str(tiny_model_dir("llama"))  # (a Qwen2 model drafts for a Llama one)
    small = dict(dtype="float32", num_kv_blocks=24, block_size=4, max_num_batched_tokens=64,
                 debug_check_integrity=True)
    prompts = mixed_prompts(6)
    expected = [c.token_ids for c in LLM(target, **small).generate(prompts, GREEDY)]
    llm = LLM(target, speculative="draft-model", speculative_model=str(small_draft),
              num_speculative_tokens=4, **small)
    llm.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=4)
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in run_staggered(llm, prompts, GREEDY, every=2)] == expected
    drafter = llm.engine.drafter
    assert llm.engine.blocks.num_free_blocks == 24 and drafter.num_free_blocks == 24
    assert not drafter._states


def test_draft_models_the_target_cannot_use_are_refused(tiny_model_dir, tmp_path) -> None:
    target = tiny_model_dir("qwen2")
    with pytest.raises(ValueError, match="--speculative-model PATH"):
        LLM(str(target), speculative="draft-model", **COMMON)
    larger = save_tiny_model("qwen2", tmp_path / "big-vocab", vocab=256)
    with pytest.raises(ValueError, match="vocabulary .256 tokens. is larger"):
        LLM(str(target), speculative="draft-model", speculative_model=str(larger), **COMMON)
    other_words = save_tiny_model("qwen2", tmp_path / "other-tokenizer")
    tiny_tokenizer(VOCAB, prefix="x").save_pretrained(other_words)
    with pytest.raises(ValueError, match=r"tokenizer is not the target's: \d+ of its \d+ tokens"):
        LLM(str(target), speculative="draft-model", speculative_model=str(other_words), **COMMON)
    with pytest.raises(FileNotFoundError):
        LLM(str(target), speculative="draft-model", speculative_model=str(tmp_path / "none"),
            **COMMON)
