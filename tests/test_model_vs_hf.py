"""Our forward against transformers on the same weights: greedy tokens and top-5 logprobs."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels import cpu_native
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

LOGPROB_ATOL = 2e-3  # float32 on both sides; differences are summation order only
# The default model served packed through the native CPU kernel, whose activations are
# quantized to 16 bits per block of 32: measured up to 2.4e-3 over these prompts.
NATIVE_LOGPROB_ATOL = 1e-2


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-softmax at every step ([n, vocab]) from transformers."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_scores=False,
        output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def check_against_hf(llm: LLM, hf: torch.nn.Module, prompts: list[list[int]], n: int,
                     atol: float = LOGPROB_ATOL) -> None:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=5)
    ours = llm.generate(prompts, params)
    for prompt, result in zip(prompts, ours, strict=True):
        tokens, logp = hf_greedy(hf, prompt, n)
        assert result.token_ids == tokens
        for step, lp in enumerate(result.logprobs):
            ref_top = logp[step].topk(5)
            assert [t for t, _ in lp.top] == ref_top.indices.tolist()
            ours_vals = torch.tensor([v for _, v in lp.top])
            torch.testing.assert_close(ours_vals, ref_top.values, atol=atol, rtol=0)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3"])
def test_tiny_models_match_transformers(arch: str, native: bool, tiny_model_dir) -> None:
    """With the native CPU kernels (norms, RoPE, decode attention) where they run, and
    with torch's ops alone."""
    path = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 5, 13, 30)]
    with contextlib.nullcontext() if native else cpu_native.turned_off():
        check_against_hf(llm, hf, prompts, 32)
    llm.engine.blocks.check_integrity()
    assert llm.engine.blocks.num_free_blocks == 64


@pytest.mark.parametrize(("arch", "window"), [
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1})])
def test_models_with_a_sliding_window_match_transformers(arch: str, window: dict, tmp_path) -> None:
    """A model trained with a sliding window (Mistral's on every layer; Qwen2's from
    max_window_layers on) is served with it, in its own KV pool, past the window."""
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model(arch, tmp_path, **window)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    layers = [layer.windowed for layer in llm.engine.model.layers]
    assert layers == ([True] * 3 if arch == "mistral" else [False, True, True])
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 13, 30)]
    check_against_hf(llm, hf, prompts, 32)
    assert llm.engine.blocks.usage == 0.0
    with pytest.raises(ValueError, match="its own sliding window"):
        LLM(str(path), dtype="float32", sliding_window=16)


def test_a_qwen3_gguf_served_packed_matches_transformers(tiny_model_dir, tmp_path) -> None:
    """A Qwen3 GGUF (q and k head norms, a head_dim other than hidden / heads) of Q8_0
    projections, served packed from the file (through the native kernel where it runs):
    the same greedy tokens and top-5 as transformers on the file's values, logprobs within
    the native kernel's activation rounding."""
    from tests.tiny_models import save_tiny_gguf

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3"), dtype=torch.float32)
    path = save_tiny_gguf(hf, tmp_path / "tiny-qwen3.gguf")
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    model = llm.engine.model
    assert (model.config.architecture, model.config.qk_norm, model.config.head_dim) == (
        "qwen3", True, 32)
    assert all(layer.qkv_proj.packed is not None for layer in model.layers)
    for layer, ours in zip(hf.model.layers, model.layers, strict=True):
        attn = layer.self_attn
        assert torch.equal(ours.head_norm, torch.cat([attn.q_norm.weight, attn.k_norm.weight]))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 5, 13, 30)]
    check_against_hf(llm, hf.eval(), prompts, 32, atol=NATIVE_LOGPROB_ATOL)


@pytest.mark.slow
def test_default_model_matches_transformers(default_llm: LLM) -> None:
    """Dense float32 as transformers computes it; and as served by default, where the native
    CPU kernel takes the GGUF's packed tensors: the same greedy tokens and top-5, logprobs
    within its activation rounding."""
    from kernels.gemm import takes_every_row_count
    from server.models.loader import default_model_path

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = default_llm.tokenizer
    prompts = [
        default_llm.encode("What is the capital of France?", chat=True),
        default_llm.encode("def fibonacci(n):"),
        default_llm.encode("Write a short poem about autumn leaves.", chat=True),
    ]
    assert all(len(p) > 3 for p in prompts) and tok is not None
    dense = LLM(dtype="float32", quantization="none", kv_cache_memory_gb=0.1)
    check_against_hf(dense, hf, prompts, 32)
    head = default_llm.engine.model.lm_head
    if head is not None and head.packed is not None and takes_every_row_count(head.packed):
        check_against_hf(default_llm, hf, prompts, 32, atol=NATIVE_LOGPROB_ATOL)


def test_prompt_logprobs_match_transformers(tiny_model_dir) -> None:
    """Every prompt token's logprob and top alternatives against transformers' forward over
    the prompt: prompts longer than a step's token budget (their logprobs come from several
    chunks), batched with others, and a second pass over the same prompts, whose prefixes
    are cached but which compute them again for their logprobs."""
    path = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=16, enable_prefix_caching=True)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 2, 9, 40)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=1,
                            prompt_logprobs=3)
    for _ in range(2):
        results = llm.generate(prompts, params)
        for prompt, result in zip(prompts, results, strict=True):
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
            entries = result.prompt_logprobs
            assert entries is not None and len(entries) == len(prompt) and entries[0] is None
            for i, e in enumerate(entries[1:], start=1):
                assert e.token_id == prompt[i]
                torch.testing.assert_close(e.logprob, logp[i - 1, prompt[i]].item(),
                                           atol=LOGPROB_ATOL, rtol=0)
                ref = logp[i - 1].topk(3)
                assert [t for t, _ in e.top] == ref.indices.tolist()
                torch.testing.assert_close(torch.tensor([v for _, v in e.top]), ref.values,
                                           atol=LOGPROB_ATOL, rtol=0)
            # the first output token's logprob continues where the prompt's end
            torch.testing.assert_close(result.logprobs[0].logprob,
                                       logp[-1, result.token_ids[0]].item(),
                                       atol=LOGPROB_ATOL, rtol=0)
    assert llm.engine.scheduler.blocks.pools[0].cache_prefixes
    llm.engine.blocks.check_integrity()
