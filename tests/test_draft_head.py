"""The trained draft head: training fits, saving round-trips, drafting follows its rules,
and the engine's output with it is the target's own (greedy and sampled)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from drafters.base import DraftBatch, DraftRequest, drafter_for_target
from drafters.head import HeadDrafter, config_for, load_head
from drafters.train import TrainConfig, build_corpus, draft_vocabulary, evaluate, train_head
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from tests.test_speculative import AlwaysDraft


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> tuple[LLM, list[tuple[list[int], int]]]:
    """The tiny qwen2 model and 60 prompts with its greedy answers (self-distillation)."""
    llm = LLM(str(tiny_model_dir("qwen2")), dtype="float32", enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randrange(4, 12))] for _ in range(60)]
    done = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    return llm, [(r.prompt_token_ids + r.token_ids, len(r.prompt_token_ids) - 1) for r in done]


@pytest.fixture(scope="module")
def trained(tiny):
    llm, seqs = tiny
    model = llm.engine.model
    corpus = build_corpus(model, seqs, log=lambda _: None)
    cfg = TrainConfig(steps=600, batch_size=128, lr=1e-2, draft_vocab_size=64, holdout=0.2)
    head, report = train_head(model, corpus, config_for(model), cfg, log=lambda _: None)
    return head, report, corpus


def test_corpus_positions_follow_each_prompt(tiny) -> None:
    llm, seqs = tiny
    corpus = build_corpus(llm.engine.model, seqs[:3], log=lambda _: None)
    ids, first = seqs[0]
    assert corpus.tokens[: len(ids)].tolist() == ids
    # trained from the prompt's last token to the answer's second-to-last
    assert corpus.starts[0].tolist() == list(range(first, len(ids) - 1))
    assert corpus.last[: len(ids)].eq(len(ids) - 1).all()
    n1 = len(seqs[1][0])
    assert corpus.starts[1][0].item() == len(ids) + seqs[1][1]
    assert corpus.last[len(ids): len(ids) + n1].eq(len(ids) + n1 - 1).all()
    # the hidden states are the model's own at every position
    want = llm.engine.model.teacher_forced(ids)
    torch.testing.assert_close(corpus.hidden[: len(ids)], want, rtol=0, atol=0)
    vocab = draft_vocabulary(corpus.tokens, corpus.starts, 5, 128)
    assert len(vocab) == 5 and vocab.tolist() == sorted(vocab.tolist())


def test_training_fits_the_targets_predictions(tiny, trained) -> None:
    """The loss falls, and on the positions it trained on the head drafts the target's
    tokens far more often than an untrained head (the tiny random model's choices are
    barely predictable from context, so held-out acceptance is left to the real-model
    benchmark)."""
    llm, _ = tiny
    model = llm.engine.model
    head, report, corpus = trained
    curve = report["curve"]
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]
    train_positions = torch.cat(corpus.starts)
    fitted = evaluate(head, model, corpus, train_positions, 4)
    fresh, _ = train_head(model, corpus, config_for(model),
                          TrainConfig(steps=1, lr=0.0, draft_vocab_size=64), log=lambda _: None)
    untrained = evaluate(fresh, model, corpus, train_positions, 4)
    assert fitted["first_draft_accuracy"] > 0.15 > 2 * untrained["first_draft_accuracy"]
    assert fitted["mean_accepted_length"] > 1.15
    assert 0.5 < fitted["vocab_coverage"] <= 1.0
    assert set(report["held_out"]) == {"mean_accepted_length", "vocab_coverage",
                                       "first_draft_accuracy", "positions"}
    held = sum(len(corpus.starts[i]) for i in range(len(corpus.starts))) - report[
        "train_positions"]
    assert report["held_out"]["positions"] == min(held, 4096)


def test_save_and_load_round_trip(tiny, trained, tmp_path: Path) -> None:
    llm, _ = tiny
    model = llm.engine.model
    head = trained[0]
    path = tmp_path / "head.safetensors"
    head.save(path, model="tiny")
    loaded = load_head(path, model)
    assert loaded.config == head.config
    assert torch.equal(loaded.vocab, head.vocab) and torch.equal(loaded.lm_rows, head.lm_rows)
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    other = SimpleNamespace(config=replace(model.config, num_layers=4))
    with pytest.raises(ValueError, match="trained for a model"):
        load_head(path, other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_head(junk, model)
    with pytest.raises(ValueError, match="not found"):
        load_head(tmp_path / "missing.safetensors", model)
    with pytest.raises(ValueError, match="needs trained weights"):
        drafter_for_target("head", model, None)
    with pytest.raises(ValueError, match="takes no trained weights"):
        drafter_for_target("ngram", model, str(path))


def test_drafting_rules(tiny, trained) -> None:
    """At most max_draft_tokens each; the first draft always; drafting stops at the first
    draft the head is less sure of than its threshold; the drafts are the head's argmax
    chain from the given hidden state."""
    llm, seqs = tiny
    model = llm.engine.model
    head = trained[0]
    drafter = HeadDrafter(head, model.embed)
    hidden = model.teacher_forced(seqs[0][0])[[-2, 5]]
    requests = [DraftRequest("a", seqs[0][0], 4), DraftRequest("b", seqs[0][0][:7], 2)]
    saved = head.config
    try:
        head.config = replace(saved, threshold=0.0)
        full = drafter.propose(DraftBatch(requests, hidden))
        head.config = replace(saved, threshold=1.01)
        first_only = drafter.propose(DraftBatch(requests, hidden))
    finally:
        head.config = saved
    assert [len(p.token_ids) for p in full] == [4, 2]
    assert [p.token_ids for p in first_only] == [p.token_ids[:1] for p in full]
    # the chain by hand, for request a
    feature, token, chain = hidden[:1], torch.tensor([seqs[0][0][-1]]), []
    for _ in range(4):
        feature = head.step(feature, model.embed(token))
        token = head.vocab[head.logits(feature).argmax(-1)]
        chain.append(token.item())
    assert full[0].token_ids == chain
    assert all(p.probs is None for p in full)  # deterministic: verified as one-hot q


class _FullSteps:
    """`_DraftGraphs.run` without CUDA: every step of the next draft length up (1, 2, 4, 8),
    no early stop, as the graphs compute them."""

    def __init__(self, drafter: HeadDrafter) -> None:
        self.drafter = drafter

    def run(self, feature: torch.Tensor, tokens: torch.Tensor, steps: int):
        padded = next(s for s in (1, 2, 4, 8) if s >= steps)
        return self.drafter._draft(feature, tokens, padded, False)


def test_drafts_computed_to_a_padded_length_are_trimmed_like_the_eager_loop(tiny, trained
                                                                            ) -> None:
    """The graphed loop runs a padded number of steps for every row; the proposals equal the
    eager loop's, which stops once every row has an unsure draft after its first, at every
    threshold."""
    llm, seqs = tiny
    model = llm.engine.model
    head = trained[0]
    eager, graphed = HeadDrafter(head, model.embed), HeadDrafter(head, model.embed)
    graphed.graphs = _FullSteps(graphed)
    seq = seqs[1][0]
    hidden = model.teacher_forced(seq)[[-2, 3, 6, 9]]
    requests = [DraftRequest("a", seq, 5), DraftRequest("b", seq[:5], 3),
                DraftRequest("c", seq[:8], 1), DraftRequest("d", seq[:11], 7)]
    tokens = torch.tensor([r.token_ids[-1] for r in requests])
    probs = eager._draft(hidden, tokens, 7, False)[1][:, 1:].flatten()
    saved = head.config
    lengths = set()
    try:  # thresholds between the head's own probabilities, so that they cut somewhere
        for threshold in (0.0, *probs.quantile(torch.tensor([0.2, 0.4, 0.6, 0.8])), 1.01):
            head.config = replace(saved, threshold=float(threshold))
            want = eager.propose(DraftBatch(requests, hidden))
            assert graphed.propose(DraftBatch(requests, hidden)) == want
            lengths.add(tuple(len(p.token_ids) for p in want))
    finally:
        head.config = saved
    assert len(lengths) > 2  # the thresholds did cut the drafts at different places


@pytest.mark.parametrize("sampled", [False, True])
def test_engine_output_is_the_targets(tiny, trained, tmp_path: Path, tiny_model_dir,
                                      sampled: bool) -> None:
    path = tmp_path / "head.safetensors"
    trained[0].save(path)
    model_dir = str(tiny_model_dir("qwen2"))
    common = dict(dtype="float32", num_kv_blocks=64, block_size=2, max_num_batched_tokens=48,
                  debug_check_integrity=True, enable_prefix_caching=False)
    plain = LLM(model_dir, **common)
    spec = LLM(model_dir, speculative="head", speculative_model=str(path),
               num_speculative_tokens=4, **common)
    spec.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=4)
    _, seqs = tiny
    prompts = [ids[: first + 1] for ids, first in seqs[:4]]
    params = [SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.8 if sampled else 0.0,
                             seed=i) for i in range(len(prompts))]
    ref = [c.token_ids for c in plain.generate(prompts, params)]
    got = spec.generate(prompts, params)
    if not sampled:  # (sampled: the same seeds draw the same tokens only without drafts)
        assert [c.token_ids for c in got] == ref
    assert all(len(c.token_ids) == 30 for c in got)
    assert sum(c.num_draft_tokens for c in got) > sum(c.num_accepted_tokens for c in got) > 0
    assert spec.engine.blocks.num_free_blocks == 64


@pytest.mark.slow
def test_train_drafter_command(tmp_path: Path) -> None:
    """`leapfrog train-drafter` on the default model: it answers the prompts of `--data`
    itself, trains, and writes a head that the engine serves with."""
    from server.cli import main

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                            for q in ("Name three colours.", "What is 7 + 5?",
                                      "Say hello in French.", "Count to five.")))
    out, report = tmp_path / "h.safetensors", tmp_path / "report.json"
    assert main(["train-drafter", "--data", str(data), "-o", str(out), "--steps", "3",
                 "--batch-size", "16", "--max-tokens", "12", "--draft-vocab-size", "64",
                 "--holdout", "0.25", "--device", "cpu", "--result-json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["sequences"] == 4 and len(result["curve"]) == 3
    assert 0.0 <= result["held_out"]["first_draft_accuracy"] <= 1.0
    llm = LLM(dtype="float32", speculative="head", speculative_model=str(out),
              kv_cache_memory_gb=0.25)
    assert len(load_head(out, llm.engine.model).vocab) == 64
    done = llm.generate(["Count to five."], SamplingParams(max_tokens=8, temperature=0.0),
                        chat=True)
    assert len(done[0].token_ids) == 8
    with pytest.raises(ValueError, match="needs a drafter"):
        LLM(dtype="float32", speculative_model=str(out))
    with pytest.raises(SystemExit, match="--temperature above 0"):
        main(["train-drafter", "-o", str(out), "--answers-per-prompt", "2"])
    with pytest.raises(SystemExit, match="no directory"):
        main(["train-drafter", "-o", str(tmp_path / "missing" / "h.safetensors")])
    with pytest.raises(SystemExit, match="exit_layer must be 1 to 29"):
        main(["train-drafter", "-o", str(out), "--exit-layer", "30", "--data", str(data)])


# -- self-speculation: the target's first layers and an adapter ------------------------------
EXIT = 1  # of the tiny model's 3 layers


@pytest.fixture(scope="module")
def adapter_file(tiny, tmp_path_factory) -> Path:
    llm, seqs = tiny
    model = llm.engine.model
    corpus = build_corpus(model, seqs, log=lambda _: None, exit_layer=EXIT)
    assert corpus.inputs is not None and corpus.inputs.shape == corpus.hidden.shape
    with pytest.raises(ValueError, match="corpus built with"):
        train_head(model, corpus, config_for(model), TrainConfig(steps=1), log=lambda _: None)
    cfg = TrainConfig(steps=300, batch_size=128, lr=1e-2, draft_vocab_size=64, holdout=0.2)
    head, report = train_head(model, corpus, config_for(model, exit_layer=EXIT), cfg,
                              log=lambda _: None)
    assert report["curve"][-1]["loss"] < 0.8 * report["curve"][0]["loss"]
    fitted = evaluate(head, model, corpus, torch.cat(corpus.starts), 4)
    assert fitted["first_draft_accuracy"] > 0.15
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    head.save(path)
    return path


def test_adapter_and_head_files_are_not_interchangeable(tiny, adapter_file, trained,
                                                        tmp_path: Path) -> None:
    model = tiny[0].engine.model
    with pytest.raises(ValueError, match="--speculative early-exit"):
        drafter_for_target("head", model, str(adapter_file))
    head_file = tmp_path / "head.safetensors"
    trained[0].save(head_file)
    with pytest.raises(ValueError, match="--speculative head"):
        drafter_for_target("early-exit", model, str(head_file))
    assert drafter_for_target("early-exit", model, str(adapter_file)).num_draft_layers == EXIT
    with pytest.raises(ValueError, match="exit_layer must be 1 to 2"):
        config_for(model, exit_layer=3)


@pytest.mark.parametrize("settings", [
    {"temperature": 0.0},
    {"temperature": 0.0, "sliding_window": 6, "num_sink_tokens": 2,
     "full_attention_layers": (2,)},
    {"temperature": 0.8},
], ids=["greedy", "greedy-hybrid-cache", "sampled"])
def test_early_exit_output_is_the_targets(tiny, adapter_file, tiny_model_dir,
                                          settings: dict) -> None:
    """Drafts write the first layers' KV after each request's newest token, into slots the
    scheduler reserved; verification overwrites them. Greedy output equals the plain
    engine's, with block boundaries every 2 tokens, rollbacks, a hybrid cache whose window
    slides, and the shallow states the drafter sees are a fresh forward's."""
    settings = dict(settings)
    temperature = settings.pop("temperature")
    model_dir = str(tiny_model_dir("qwen2"))
    common = dict(dtype="float32", num_kv_blocks=96, block_size=2, max_num_batched_tokens=48,
                  debug_check_integrity=True, enable_prefix_caching=False, **settings)
    plain = LLM(model_dir, **common)
    spec = LLM(model_dir, speculative="early-exit", speculative_model=str(adapter_file),
               num_speculative_tokens=4, **common)
    spec.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=4)
    drafter = spec.engine.runner.drafter
    propose, seen = drafter.propose, []

    def spy(batch):
        forward = batch.forward

        def recorded(rows, tokens, offset):
            out = forward(rows, tokens, offset)
            seen.append(([list(batch.requests[i].token_ids) for i in rows], tokens.tolist(),
                         offset, out.clone()))
            return out

        batch.forward = recorded
        return propose(batch)

    drafter.propose = spy
    _, seqs = tiny
    prompts = [ids[: first + 1] for ids, first in seqs[:4]]
    params = [SamplingParams(max_tokens=30, ignore_eos=True, temperature=temperature, seed=i)
              for i in range(len(prompts))]
    got = spec.generate(prompts, params)
    if temperature == 0.0:
        assert [c.token_ids for c in got] == [c.token_ids for c in
                                              plain.generate(prompts, params)]
    assert all(len(c.token_ids) == 30 for c in got)
    assert sum(c.num_draft_tokens for c in got) > sum(c.num_accepted_tokens for c in got) > 0
    assert spec.engine.blocks.num_free_blocks == plain.engine.blocks.num_free_blocks
    # each shallow state: the last row of a forward of the first layers over the history
    # and the drafts before it (a windowed layer attending to its sinks + window)
    model = spec.engine.model
    windows = [{}]
    if "sliding_window" in settings:
        windows.append({"sliding_window": 6, "num_sink_tokens": 2})
    drafts: dict[int, list[int]] = {}
    checked = 0
    for histories, tokens, offset, out in seen[:40]:
        for i, history in enumerate(histories):
            key = hash(tuple(history))
            if offset == 0:
                drafts[key] = []
            sequence = history + drafts[key]
            if offset:
                sequence = [*sequence, tokens[i]]
                drafts[key].append(tokens[i])
            want = model.teacher_forced(sequence, 2, windows, num_layers=EXIT)[-1]
            torch.testing.assert_close(out[i], want, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked > 20


def test_ngram_head_asks_the_head_only_where_lookup_finds_nothing(tiny, trained,
                                                                  tmp_path: Path) -> None:
    from drafters.ngram import NgramDrafter

    llm, _ = tiny
    model = llm.engine.model
    path = tmp_path / "head.safetensors"
    trained[0].save(path)
    drafter = drafter_for_target("ngram-head", model, str(path))
    repeats, fresh = [5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 12, 13]
    hidden = torch.cat([model.teacher_forced(repeats)[-2:-1], model.teacher_forced(fresh)[-2:-1]])
    requests = [DraftRequest("r", repeats, 3), DraftRequest("f", fresh, 3)]
    got = drafter.propose(DraftBatch(requests, hidden))
    assert got[0].token_ids == NgramDrafter().propose(DraftBatch(requests[:1]))[0].token_ids
    assert got[0].token_ids == [8, 5, 6]
    alone = HeadDrafter(load_head(path, model), model.embed)
    assert got[1].token_ids == alone.propose(DraftBatch(requests[1:], hidden[1:]))[0].token_ids
    assert got[1].token_ids
    drafter.release("r")
    # in the engine: the target's own greedy output
    common = dict(dtype="float32", num_kv_blocks=64, block_size=2, enable_prefix_caching=False)
    model_dir = llm.engine.config.model
    prompts = [repeats, fresh]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    spec = LLM(model_dir, speculative="ngram-head", speculative_model=str(path), **common)
    spec.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=4)
    got = spec.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in
                                          LLM(model_dir, **common).generate(prompts, params)]
    assert sum(c.num_draft_tokens for c in got) > 0


def test_a_model_without_a_chat_template_is_prompted_with_plain_text() -> None:
    """A base model (no chat template) is asked the built-in prompts as text to continue
    (`chat_prompt_ids`: train-drafter, the offline benchmarks, `LLM.generate(chat=True)`),
    not refused with transformers' template error; a chat model through its template."""
    from server.engine.llm import chat_prompt_ids
    from tests.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    messages = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w7"}]
    assert chat_prompt_ids(tok, messages) == tok("w5 w6\n\nw7\n\n").input_ids
    tok.chat_template = "{% for m in messages %}w9 {{ m['content'] }} {% endfor %}w3"
    assert chat_prompt_ids(tok, messages) == tok("w9 w5 w6 w9 w7 w3").input_ids
