"""Prefill chunks of short sequences (at most `NATIVE_PREFILL_KEYS` keys) through the native
attention on the CPU, so that such steps run their layers in one native call: the step's
groups, and a packed float32 model's tokens and log-probabilities bit for bit the same
however the prompt is split into chunks or found in the prefix cache (every row then takes
exactly its own native operations)."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_native
from server.engine import batch_builder
from server.engine.batch_builder import NATIVE_PREFILL_KEYS, batch_meta
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not cpu_native.available(),
                                reason="the native CPU kernels do not run here")

BLOCK = 16


def _groups(seq_lens: list[int], q_lens: list[int], native_prefill: bool
            ) -> list[tuple[list[int], bool]]:
    """The CPU attention groups of a step: (their sequences, whether the native kernel
    takes them)."""
    tables, at = [], 0
    for s in seq_lens:
        tables.append(list(range(at, at + -(-s // BLOCK))))
        at += len(tables[-1])
    positions = [p for s, q in zip(seq_lens, q_lens, strict=True) for p in range(s - q, s)]
    starts = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    meta = batch_meta([tables], positions, seq_lens, starts, BLOCK, torch.device("cpu"), True,
                      native_prefill=native_prefill)
    seqs = []
    for g in meta.groups:
        index = g.padded.token_index
        rows = range(starts[-1]) if index is None else index.tolist()
        seqs.append((sorted({next(i for i in range(len(q_lens)) if starts[i] <= r < starts[i + 1])
                             for r in rows}), g.native is not None))
    return seqs


def test_short_sequences_prefill_with_the_decode_rows() -> None:
    """A decode row, a chunk of a short sequence and one past the limit: the first two are
    one native group (the whole step can run natively), the long one a torch group of its
    own; without native prefill (the runner's flag, or `torch_prefill`), or with the native
    kernels turned off, each chunk is its own torch group."""
    lens, q = [50, 300, NATIVE_PREFILL_KEYS + 1], [1, 100, 100]
    assert _groups(lens, q, True) == [([0, 1], True), ([2], False)]
    assert _groups(lens[:2], q[:2], True) == [([0, 1], True)]
    assert _groups(lens, q, False) == [([0], True), ([1], False), ([2], False)]
    with batch_builder.torch_prefill():
        assert _groups(lens, q, True) == [([0], True), ([1], False), ([2], False)]
    with cpu_native.turned_off():
        assert _groups(lens, q, True) == [([0], False), ([1], False), ([2], False)]


def _generate(model: str, prompts: list[list[int]], **config: object) -> list:
    llm = LLM(model, quantization="int4", dtype="float32", kv_cache_memory_gb=0.01,
              **config)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    return [(c.token_ids, c.logprobs, c.prompt_logprobs) for c in llm.generate(prompts, params)]


def test_a_prompt_is_computed_the_same_in_any_chunks(tiny_model_dir) -> None:
    """Two prompts of 150 and 90 tokens (sharing their first 64) prefilled in one step, in
    chunks of 16 beside each other's, and the second after the first from the prefix
    cache (its last 26 tokens one chunk): the same tokens, log-probabilities and prompt
    log-probabilities, bit for bit."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 120, (64,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 120, (86,), generator=g).tolist(),
               shared + torch.randint(3, 120, (26,), generator=g).tolist()]
    path = str(tiny_model_dir("llama"))
    whole = _generate(path, prompts, max_num_batched_tokens=512, enable_prefix_caching=False)
    assert _generate(path, prompts, max_num_batched_tokens=16,
                     enable_prefix_caching=False) == whole
    llm = LLM(path, quantization="int4", dtype="float32", kv_cache_memory_gb=0.01)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    first, second = (llm.generate([p], params)[0] for p in prompts)
    assert llm.engine.metrics.prefix_cache_hits._value.get() == 64
    assert [(c.token_ids, c.logprobs) for c in (first, second)] == [w[:2] for w in whole]


def test_with_the_hybrid_cache_too(tiny_model_dir) -> None:
    """Sink + window layers beside a full one (a window of 24 and 4 sinks, shorter than the
    prompt's chunks, whose blocks outside the window are freed): a 150-token prompt
    prefilled in one chunk and in chunks of 16 gives the same bits."""
    prompt = torch.randint(3, 120, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    hybrid = dict(sliding_window=24, num_sink_tokens=4, full_attention_layers=(1,),
                  enable_prefix_caching=False)
    path = str(tiny_model_dir("llama"))
    whole = _generate(path, [prompt], max_num_batched_tokens=512, **hybrid)
    assert _generate(path, [prompt], max_num_batched_tokens=16, **hybrid) == whole


def test_without_it_chunks_of_a_prompt_differ(tiny_model_dir) -> None:
    """The check above can fail: with no prefill chunk through the native attention
    (`torch_prefill`), a prompt prefilled in one chunk (torch's attention) and in chunks of
    16 (short queries: the native kernel) differ in their log-probabilities' last bits."""
    prompt = torch.randint(3, 120, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    path = str(tiny_model_dir("llama"))
    with batch_builder.torch_prefill():
        whole = _generate(path, [prompt], max_num_batched_tokens=512,
                          enable_prefix_caching=False)
        split = _generate(path, [prompt], max_num_batched_tokens=16,
                          enable_prefix_caching=False)
    assert split != whole


def test_speculation_changes_no_bit_under_any_schedule(tiny_model_dir) -> None:
    """Prompts of 45-205 tokens, all at once without speculation, and with n-gram
    speculation drafting 4 tokens every step, arriving every 3 steps into chunks of 64
    beside each other's decode and verification rows, prefix-cached: the same tokens and
    log-probabilities, bit for bit. (Within `torch_prefill` it fails: a prompt's last chunk
    of 16 tokens or fewer went natively, longer ones through torch.)"""
    from tests.test_engine import run_staggered
    from tests.test_speculative import AlwaysDraft

    g = torch.Generator().manual_seed(2)
    motif = torch.randint(3, 120, (12,), generator=g).tolist()
    prompts = [(motif * 25)[:n] + torch.randint(3, 120, (5,), generator=g).tolist()
               for n in (40, 200, 90, 160, 40)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    path = str(tiny_model_dir("llama"))
    plain = LLM(path, quantization="int4", dtype="float32", kv_cache_memory_gb=0.01,
                enable_prefix_caching=False)
    want = [(c.token_ids, c.logprobs) for c in plain.generate(prompts, params)]
    spec = LLM(path, quantization="int4", dtype="float32", kv_cache_memory_gb=0.01,
               speculative="ngram", max_num_batched_tokens=64)
    spec.engine.scheduler.spec_policy = AlwaysDraft(max_draft_tokens=4)
    got = run_staggered(spec, prompts, params, every=3)
    assert [(c.token_ids, c.logprobs) for c in got] == want
    assert sum(c.num_accepted_tokens for c in got) > 0
