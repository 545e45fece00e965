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
@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3",
                                  "gemma2", "gemma3", "granite", "smollm3", "olmo2"])
def test_tiny_models_match_transformers(arch: str, native: bool, tiny_model_dir) -> None:
    """With the native CPU kernels (norms, RoPE, decode attention) where they run, and
    with torch's ops alone."""
    path = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 5, 13, 90)]
    with contextlib.nullcontext() if native else cpu_native.turned_off():
        check_against_hf(llm, hf, prompts, 32)
    llm.engine.blocks.check_integrity()
    assert llm.engine.blocks.num_free_blocks == 64


@pytest.mark.parametrize(("arch", "window"), [
    ("mistral", {"sliding_window": 8}), ("phi3", {"sliding_window": 8}),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1})])
def test_models_with_a_sliding_window_match_transformers(arch: str, window: dict, tmp_path) -> None:
    """A model trained with a sliding window (Mistral's and Phi-3's on every layer; Qwen2's
    from max_window_layers on) is served with it, in its own KV pool, past the window."""
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model(arch, tmp_path, **window)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    layers = [layer.windowed for layer in llm.engine.model.layers]
    assert layers == ([False, True, True] if arch == "qwen2" else [True] * 3)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 13, 30)]
    check_against_hf(llm, hf, prompts, 32)
    assert llm.engine.blocks.usage == 0.0
    with pytest.raises(ValueError, match="its own sliding window"):
        LLM(str(path), dtype="float32", sliding_window=16)


def test_a_window_holding_the_whole_context_is_full_attention(tmp_path) -> None:
    """Phi-3.5-mini's and Phi-4-mini's window of 262,144 positions holds every position
    they serve: their layers attend from the one full-attention pool, as transformers runs
    them (a window pool would be sized for every request's whole context)."""
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model("phi3", tmp_path, sliding_window=262144)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert [pool.window for pool in llm.engine.blocks.pools] == [None]
    assert all(not layer.windowed for layer in llm.engine.model.layers)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 30)]
    check_against_hf(llm, hf, prompts, 16)


def test_a_gemma3_gguf_matches_transformers(tmp_path) -> None:
    """Gemma 3 as llama.cpp's converter writes it (norms as 1 + w) and runs it (every sixth
    layer global, the others a window with RoPE base 10,000; the attention scaled by
    1/sqrt(head_dim)): dequantized, transformers' greedy tokens and top-5 past the window;
    packed, the dense engine's logprobs within the native kernel's rounding."""
    from tests.tiny_models import save_tiny_gguf, save_tiny_model

    path = save_tiny_model("gemma3", tmp_path / "hf", num_hidden_layers=6,
                           query_pre_attn_scalar=32, layer_types=None)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gguf = save_tiny_gguf(hf, tmp_path / "gemma3.gguf")
    llm = LLM(str(gguf), dtype="float32", num_kv_blocks=64, block_size=4,
              quantization="none")
    c = llm.engine.model.config
    assert (c.window_layers, c.sliding_window, c.local_rope_theta) == ((0, 1, 2, 3, 4), 8,
                                                                       10000.0)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 30)]
    check_against_hf(llm, hf, prompts, 32)
    packed_scores_like_dense(gguf, llm, prompts)


def test_a_granite_gguf_matches_transformers(tmp_path) -> None:
    """Granite as llama.cpp's converter writes it (q and k permuted as Llama's, its
    embedding, residual, attention and logit scales as metadata): dequantized,
    transformers' greedy tokens and top-5; packed, the residual scale in the output
    projections' packed scales, the dense engine's logprobs within the native kernel's
    rounding."""
    from tests.tiny_models import save_tiny_gguf, save_tiny_model

    hf = AutoModelForCausalLM.from_pretrained(save_tiny_model("granite", tmp_path / "hf"),
                                              dtype=torch.float32).eval()
    gguf = save_tiny_gguf(hf, tmp_path / "granite.gguf")
    llm = LLM(str(gguf), dtype="float32", num_kv_blocks=64, block_size=4,
              quantization="none")
    c = llm.engine.model.config
    assert (c.architecture, c.embedding_multiplier, c.residual_multiplier, c.logits_scaling,
            c.attention_scale) == ("granite", 3.0, 0.5, 2.5, pytest.approx(0.3))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 30)]
    check_against_hf(llm, hf, prompts, 32)
    packed_scores_like_dense(gguf, llm, prompts)


def test_a_smollm3_gguf_matches_transformers(tmp_path) -> None:
    """SmolLM3 as llama.cpp's converter writes it (q and k permuted as Llama's) and runs it
    (no RoPE in every fourth layer, which no key names): dequantized, transformers' greedy
    tokens and top-5; packed, the dense engine's logprobs within the native kernel's
    rounding."""
    from tests.tiny_models import save_tiny_gguf, save_tiny_model

    hf = AutoModelForCausalLM.from_pretrained(
        save_tiny_model("smollm3", tmp_path / "hf", num_hidden_layers=8), dtype=torch.float32
    ).eval()
    gguf = save_tiny_gguf(hf, tmp_path / "smollm3.gguf")
    llm = LLM(str(gguf), dtype="float32", num_kv_blocks=64, block_size=4,
              quantization="none")
    assert llm.engine.model.config.nope_layers == (3, 7)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 30)]
    check_against_hf(llm, hf, prompts, 32)
    packed_scores_like_dense(gguf, llm, prompts)


def test_a_gemma2_gguf_matches_transformers(tmp_path) -> None:
    """Gemma 2 as llama.cpp's converter writes it (norms as 1 + w, the soft-caps as
    metadata) and runs it (every other layer a window, from the first; the attention scaled
    by 1/sqrt(head_dim)): dequantized, transformers' greedy tokens and top-5 past the
    window, both soft-caps applied; packed, the dense engine's logprobs within the native
    kernel's rounding."""
    from tests.tiny_models import save_tiny_gguf, save_tiny_model

    path = save_tiny_model("gemma2", tmp_path / "hf", num_hidden_layers=4,
                           query_pre_attn_scalar=32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gguf = save_tiny_gguf(hf, tmp_path / "gemma2.gguf")
    llm = LLM(str(gguf), dtype="float32", num_kv_blocks=64, block_size=4,
              quantization="none")
    c = llm.engine.model.config
    assert (c.architecture, c.window_layers, c.sliding_window, c.attn_softcap,
            c.final_softcap, c.attention_scale) == ("gemma2", (0, 2), 8, 1.5, 4.0, 32 ** -0.5)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 30)]
    check_against_hf(llm, hf, prompts, 32)
    packed_scores_like_dense(gguf, llm, prompts)


def test_gemma3_image_text_checkpoint_serves_its_language_model(tmp_path) -> None:
    """A Gemma3ForConditionalGeneration checkpoint (a tiny vision tower beside the language
    model, whose weights are stored as `language_model.model.*`, its config as `text_config`
    with omitted fields): text in, transformers' greedy tokens and top-5."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    from tests.tiny_models import tiny_tokenizer

    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, sliding_window=8, query_pre_attn_scalar=24)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    hf = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            else:
                p.uniform_(-0.5, 0.5)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer(300).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=4)
    c = llm.engine.model.config
    assert (c.architecture, c.attention_scale, c.window_layers) == ("gemma3", 24 ** -0.5, (0, 1))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 290, (n,), generator=gen).tolist() for n in (1, 13, 30)]
    check_against_hf(llm, hf, prompts, 24)


@pytest.mark.parametrize("arch", ["qwen3", "llama3", "llama", "phi3", "olmo2"])
def test_a_gguf_matches_transformers(arch: str, tiny_model_dir, tmp_path) -> None:
    """GGUFs of Q8_0 projections as llama.cpp's converter writes them: Qwen3's (q and k
    head norms, a head_dim other than hidden / heads), Llama 3's (RoPE scaling as a
    `rope_freqs` tensor, q and k rows permuted), Llama 2's (untied head), Phi-3's (q, k,
    v in one tensor, gate and up in another) and OLMo 2's (norms after the attention and the
    MLP only, q and k normed across their heads). Dequantized
    (`quantization="none"`): the same greedy tokens and top-5 as transformers on the file's
    values. Served packed from the file (through the native kernel where it runs): every
    token's logprob of those sequences within the kernel's activation rounding of the dense
    engine's (greedy choices between near-ties may differ)."""
    from tests.tiny_models import save_tiny_gguf

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32)
    path = save_tiny_gguf(hf, tmp_path / f"tiny-{arch}.gguf")
    dense = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4,
                quantization="none")
    c = dense.engine.model.config
    assert (c.qk_norm, c.rope_freq_factors is not None) == (arch == "qwen3", arch == "llama3")
    if arch == "qwen3":
        assert c.head_dim == 32
        for layer, ours in zip(hf.model.layers, dense.engine.model.layers, strict=True):
            attn = layer.self_attn
            assert torch.equal(ours.head_norm, torch.cat([attn.q_norm.weight,
                                                          attn.k_norm.weight]))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 5, 13, 90)]
    check_against_hf(dense, hf.eval(), prompts, 32)
    packed_scores_like_dense(path, dense, prompts)


def packed_scores_like_dense(path, dense: LLM, prompts: list[list[int]],
                             max_tokens: int = 32) -> LLM:
    """The GGUF served packed (its default) gives every token of the dense engine's greedy
    sequences the dense engine's logprob, within the native kernel's activation rounding;
    returns the packed engine."""
    packed = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert all(layer.qkv_proj.packed is not None for layer in packed.engine.model.layers)
    texts = [p + c.token_ids for p, c in zip(prompts, dense.generate(prompts, SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True)), strict=True)]
    scored = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for ours, ref in zip(packed.generate(texts, scored), dense.generate(texts, scored),
                         strict=True):
        diff = [abs(a.logprob - b.logprob)
                for a, b in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True)]
        assert max(diff) < NATIVE_LOGPROB_ATOL
    return packed


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
