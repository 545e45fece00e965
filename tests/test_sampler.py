"""Sampling on the device (`sample_rows`): its uniforms, its law against `filter_probs`
(the host path's distribution), and the runner serving sampled requests with it (run on
the CPU here; on CUDA it is the default)."""

from __future__ import annotations

import pytest
import torch

from kernels.sampling import uniforms
from server.engine import runner as runner_module
from server.engine.llm import LLM
from server.engine.sampler import filter_probs, sample_rows
from server.engine.sampling_params import SamplingParams


def test_uniforms_are_uniform_and_depend_on_their_row_alone() -> None:
    u = uniforms(torch.tensor([1, -5, 2**62]), torch.tensor([0, 0, 7]), 200_000)
    assert u.dtype == torch.float64 and 0.0 < u.min() and u.max() < 1.0
    assert u.mean(dim=1).sub(0.5).abs().max() < 3e-3  # (std 0.289 / sqrt(200k) = 6.5e-4)
    assert u.std(dim=1).sub(12 ** -0.5).abs().max() < 3e-3
    assert torch.equal(uniforms(torch.tensor([-5]), torch.tensor([0]), 200_000)[0], u[1])
    other = uniforms(torch.tensor([1, 1]), torch.tensor([1, 0]), 1000)
    assert not torch.equal(other[0], other[1]) and torch.equal(other[1], u[0, :1000])
    # neighbouring tokens, positions and seeds are uncorrelated
    assert abs(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1]) < 0.01


PARAMS = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_k=3),
          SamplingParams(temperature=1.3, top_p=0.7), SamplingParams(temperature=1.0, min_p=0.2),
          SamplingParams(temperature=1.5, top_k=5, top_p=0.8, min_p=0.05)]


@pytest.mark.parametrize("params", PARAMS)
def test_sample_rows_draws_from_filter_probs(params: SamplingParams) -> None:
    """20,000 draws (one seed each) of one row's logits: each token's share within 4.5
    standard errors of its probability under `filter_probs`, none of the filtered out."""
    torch.manual_seed(0)
    vocab, n = 12, 20_000
    logits = torch.randn(vocab) * 2
    expected = filter_probs(logits, params).double()
    tokens = sample_rows(logits.expand(n, vocab), torch.full((n,), params.temperature),
                         torch.full((n,), params.top_k), torch.full((n,), params.top_p),
                         torch.full((n,), params.min_p), torch.arange(n) * 7919 + 3,
                         torch.full((n,), 5))
    if not (params.top_k or params.top_p < 1.0 or params.min_p):  # the filters' pass: a no-op
        unfiltered = sample_rows(logits.expand(n, vocab), torch.full((n,), params.temperature),
                                 torch.zeros(n, dtype=torch.long), torch.ones(n), torch.zeros(n),
                                 torch.arange(n) * 7919 + 3, torch.full((n,), 5), filtered=False)
        assert torch.equal(unfiltered, tokens)
    share = torch.bincount(tokens, minlength=vocab).double() / n
    error = (expected * (1 - expected) / n).sqrt()
    assert ((share - expected).abs() <= 4.5 * error + 1e-12).all()
    assert (share[expected == 0] == 0).all() and (expected > 0).sum() > 1


def test_sample_rows_is_per_row() -> None:
    """Temperature 0 is the argmax; a row's draw does not depend on the rows beside it."""
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    t = torch.tensor([0.0, 1.0, 0.7, 1.0])
    k, p, m = torch.tensor([0, 0, 10, 1]), torch.tensor([1.0, 0.9, 1.0, 1.0]), torch.zeros(4)
    seeds, positions = torch.tensor([3, 4, 5, 6]), torch.tensor([0, 1, 2, 3])
    together = sample_rows(logits, t, k, p, m, seeds, positions)
    alone = [int(sample_rows(logits[i:i + 1], t[i:i + 1], k[i:i + 1], p[i:i + 1], m[i:i + 1],
                             seeds[i:i + 1], positions[i:i + 1])) for i in range(4)]
    assert together.tolist() == alone
    assert alone[0] == int(logits[0].argmax()) and alone[3] == int(logits[3].argmax())  # top_k 1


def test_engine_samples_on_the_device_path(tiny_model_dir, monkeypatch) -> None:
    """The runner with device sampling switched on (as on CUDA): seeded requests reproduce
    alone or batched with others, top_k = 1 is greedy, and a request that needs the host
    (penalties) in the same batch is served too."""
    monkeypatch.setattr(runner_module, "device_sampling", lambda logits: True)
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=128, block_size=4)
    calls = []
    sample = runner_module.sample_on_device
    monkeypatch.setattr(runner_module, "sample_on_device",
                        lambda owners, logits: calls.append(len(owners)) or sample(owners, logits))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18]]
    seeded = [SamplingParams(max_tokens=10, temperature=1.0, seed=s, ignore_eos=True)
              for s in (1, 2, 3)]
    alone = [llm.generate([p], [s])[0].token_ids for p, s in zip(prompts, seeded, strict=True)]
    together = [c.token_ids for c in llm.generate(prompts, seeded)]
    assert together == alone and calls and max(calls) == 3
    assert len({tuple(t) for t in alone}) == 3
    greedy = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    top1 = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.9, top_k=1,
                                                ignore_eos=True))
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]
    calls.clear()
    mixed = llm.generate(prompts[:2], [seeded[0], SamplingParams(max_tokens=10, seed=9,
                                                                repetition_penalty=1.3)])
    assert calls == [] and mixed[0].token_ids != [] and len(mixed[1].token_ids) == 10


@pytest.mark.parametrize("device_path", [False, True])
def test_temperatures_near_zero_are_greedy(tiny_model_dir, monkeypatch, device_path) -> None:
    """Below GREEDY_BELOW a temperature is greedy on either path: logits / 1e-40 overflow
    float32, and sampling from the NaN softmax failed the step (and with it every request
    in it)."""
    monkeypatch.setattr(runner_module, "device_sampling", lambda logits: device_path)
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64, block_size=4)
    prompts = [[5, 6, 7, 8], [9, 10]]
    greedy = [c.token_ids for c in llm.generate(prompts, SamplingParams(max_tokens=6,
                                                                       temperature=0.0))]
    for t in (1e-40, 1e-8, 9e-6):
        params = [SamplingParams(max_tokens=6, temperature=t),
                  SamplingParams(max_tokens=6, temperature=0.8, seed=1)]  # (one sampled)
        got = llm.generate(prompts, params)
        assert got[0].token_ids == greedy[0] and len(got[1].token_ids) == 6


def test_host_draws_follow_the_models_distribution(tmp_path) -> None:
    """The host path (the CPU's: one inverse-CDF draw a row from the request's generator):
    the first tokens of 4,000 seeded requests to a tiny model, each token's share within
    4.5 standard errors of its probability (the model's logprobs), none drawn outside it,
    and a seed gives its tokens again."""
    from tests.tiny_models import save_tiny_model

    vocab, n = 16, 4000
    llm = LLM(str(save_tiny_model("llama", tmp_path / "m", seed=5, vocab=vocab)),
              dtype="float32", num_kv_blocks=512, block_size=4, max_num_seqs=256)
    prompt = [3, 7, 1, 9]
    scored = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                   logprobs=vocab))[0].logprobs[0]
    expected = torch.zeros(vocab, dtype=torch.float64)
    for token, logprob in scored.top:
        expected[token] = logprob
    expected = expected.exp()
    assert abs(float(expected.sum()) - 1.0) < 1e-4 and float(expected.max()) < 0.9
    params = [SamplingParams(max_tokens=1, temperature=1.0, seed=s, ignore_eos=True)
              for s in range(n)]
    tokens = torch.tensor([c.token_ids[0] for c in llm.generate([prompt] * n, params)])
    share = torch.bincount(tokens, minlength=vocab).double() / n
    error = (expected * (1 - expected) / n).sqrt()
    assert ((share - expected).abs() <= 4.5 * error + 1e-12).all()
    again = llm.generate([prompt] * 3, [SamplingParams(max_tokens=8, temperature=1.0, seed=s,
                                                       ignore_eos=True) for s in (0, 1, 0)])
    assert again[0].token_ids == again[2].token_ids and again[0].token_ids[0] == tokens[0]

def test_nucleus_keeps_what_a_full_sort_keeps() -> None:
    """top-p over the head of the vocabulary (`_nucleus`, widened until it holds the mass)
    keeps the tokens the rule over a full sort keeps: rows of 10 to 49,152 tokens, flat and
    peaked, with zeros (top-k before it), any top_p."""
    from server.engine.sampler import _nucleus

    def full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
        ordered, order = probs.sort(descending=True)
        cumulative = ordered.cumsum(0)
        drop = cumulative - ordered > top_p * cumulative[-1]
        return probs.scatter(0, order, ordered.masked_fill(drop, 0.0))

    g = torch.Generator().manual_seed(0)
    for trial in range(150):
        vocab = (10, 300, 49152)[trial % 3]
        probs = torch.softmax(torch.randn(vocab, generator=g) * (0.5 + 6 * trial / 150), 0)
        if trial % 5 == 0:
            probs[: vocab // 3] = 0
        top_p = float(torch.rand(1, generator=g)) * 0.99 + 0.005
        kept, expected = _nucleus(probs, top_p), full_sort(probs, top_p)
        assert torch.equal(kept > 0, expected > 0) and torch.equal(kept[kept > 0], probs[kept > 0])
