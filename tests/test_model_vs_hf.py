"""Our forward against transformers on the same weights: greedy tokens and top-5 logprobs."""

from __future__ import annotations

import contextlib
import dataclasses

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
                                  "gemma2", "gemma3"])
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


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_partial_rotary_matches_transformers(native: bool, tmp_path) -> None:
    """Phi-4-mini's partial rotary embedding (here 3/4 of each head's 16 dims turn), with a
    LongRoPE scaling whose short factors cover the turned dims only; and from a GGUF, whose
    `rope.dimension_count` gives the turned dims."""
    from tests.tiny_models import save_tiny_gguf, save_tiny_model

    gen = torch.Generator().manual_seed(7)
    short = (torch.rand(6, generator=gen) * 3 + 1).tolist()
    path = save_tiny_model("phi3", tmp_path / "hf", partial_rotary_factor=0.75,
                           max_position_embeddings=256, original_max_position_embeddings=64,
                           rope_scaling={"rope_type": "longrope", "short_factor": short,
                                         "long_factor": short})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert (llm.engine.model.config.rotary_dim, llm.engine.model.rope.cos.shape[1]) == (12, 6)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 5, 30)]
    with contextlib.nullcontext() if native else cpu_native.turned_off():
        check_against_hf(llm, hf, prompts, 32)
        gguf = LLM(str(save_tiny_gguf(hf, tmp_path / "phi4.gguf")), dtype="float32",
                   num_kv_blocks=64, block_size=4, quantization="none")
        assert gguf.engine.model.config.rotary_dim == 12
        check_against_hf(gguf, hf, prompts, 32)


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


@pytest.mark.parametrize(("arch", "scaling"), [
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("qwen3", {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16, "attention_factor": 1.2}),
    ("llama", {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 64})])
def test_rope_scaling_matches_transformers(arch: str, scaling: dict, tmp_path) -> None:
    """YaRN and linear RoPE scaling from the checkpoint's config, past the context it names
    as trained; the model limit is `factor` times that context where that exceeds
    max_position_embeddings (a linear scaling naming none: max_position_embeddings);
    `rope_scaling` given to the engine replaces the checkpoint's (here: with none, the plain
    model's tokens)."""
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model(arch, tmp_path, max_position_embeddings=64, rope_scaling=scaling)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=256)
    assert llm.engine.max_model_len == 128  # (qwen2: 32 x 4; the others 64 x 2)
    unnamed = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    limit = dataclasses.replace(llm.engine.model.config, rope_scaling=unnamed).context_limit
    assert limit == (64 if unnamed["rope_type"] == "linear" else 64 * unnamed["factor"])
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 70)]
    check_against_hf(llm, hf, prompts, 32)
    plain = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4,
                rope_scaling={"rope_type": "default"})
    assert plain.engine.max_model_len == 64
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert [c.token_ids for c in plain.generate(prompts[:1], params)] != [
        c.token_ids for c in llm.generate(prompts[:1], params)]


def test_dynamic_ntk_within_max_position_embeddings_matches_transformers(tmp_path) -> None:
    """Dynamic NTK scaling leaves RoPE's base as it is up to max_position_embeddings, where
    the model limit stops (transformers changes it for longer sequences only)."""
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model("llama", tmp_path, max_position_embeddings=64,
                           rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=256)
    assert llm.engine.max_model_len == 64
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 30)]
    check_against_hf(llm, hf, prompts, 32)


def test_longrope_within_the_trained_context_matches_transformers(tmp_path) -> None:
    """Phi-3's LongRoPE: its short factors and attention factor, which transformers applies
    up to the context the model was trained at, where the default context stops; and from a
    GGUF, with a sliding window."""
    from tests.tiny_models import save_tiny_model

    gen = torch.Generator().manual_seed(6)
    short, long = (torch.rand(8, generator=gen) * 3 + 1 for _ in range(2))
    path = save_tiny_model("phi3", tmp_path, max_position_embeddings=256,
                           original_max_position_embeddings=64, rope_scaling={
                               "rope_type": "longrope", "short_factor": short.tolist(),
                               "long_factor": long.tolist()})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert llm.engine.max_model_len == 64
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 30)]
    check_against_hf(llm, hf, prompts, 32)
    # the same model with a sliding window as a GGUF: its factors and window read from the file
    from tests.tiny_models import save_tiny_gguf

    path = save_tiny_model("phi3", tmp_path / "windowed", max_position_embeddings=256,
                           original_max_position_embeddings=64, sliding_window=8,
                           rope_scaling={"rope_type": "longrope", "short_factor":
                                         short.tolist(), "long_factor": long.tolist()})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gguf = LLM(str(save_tiny_gguf(hf, tmp_path / "phi3.gguf")), dtype="float32",
               num_kv_blocks=64, block_size=4, quantization="none")
    c = gguf.engine.model.config
    assert (c.sliding_window, c.window_layers, gguf.engine.max_model_len) == (8, (0, 1, 2), 64)
    check_against_hf(gguf, hf, prompts, 32)


def test_longrope_past_the_trained_context_matches_transformers(tmp_path) -> None:
    """Asked for a context past the one it was trained at, a LongRoPE model serves it with
    its long factors at every position: what transformers applies to a sequence whose
    prompt is already past it (from the checkpoint and from a GGUF)."""
    from tests.tiny_models import save_tiny_gguf, save_tiny_model

    gen = torch.Generator().manual_seed(8)
    short, long = (torch.rand(8, generator=gen) * 3 + 1 for _ in range(2))
    path = save_tiny_model("phi3", tmp_path, max_position_embeddings=256,
                           original_max_position_embeddings=64, rope_scaling={
                               "rope_type": "longrope", "short_factor": short.tolist(),
                               "long_factor": long.tolist()})
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (70, 130)]
    for source in ("checkpoint", "gguf"):  # (the GGUF's weights, Q8_0, become hf's)
        model = path if source == "checkpoint" else save_tiny_gguf(hf, tmp_path / "phi3.gguf")
        llm = LLM(str(model), dtype="float32", num_kv_blocks=128, block_size=4,
                  max_model_len=1000, quantization="none")
        assert llm.engine.max_model_len == 256  # (max_position_embeddings: the limit)
        check_against_hf(llm, hf, prompts, 32)
    short_only = LLM(str(path), dtype="float32", num_kv_blocks=128, block_size=4,
                     max_model_len=64)
    assert not torch.allclose(short_only.engine.model.rope.cos, llm.engine.model.rope.cos[:64])


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
    _packed_scores_like_dense(gguf, llm, prompts)


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
    _packed_scores_like_dense(gguf, llm, prompts)


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


def test_unsupported_rope_scaling_is_named(tiny_model_dir, tmp_path) -> None:
    from tests.tiny_models import save_tiny_model

    with pytest.raises(ValueError, match="unsupported rope_scaling type 'mrope'"):
        LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=8,
            rope_scaling={"rope_type": "mrope", "factor": 2.0})
    path = save_tiny_model("phi3", tmp_path, partial_rotary_factor=0.3125)  # (5 of 16 dims)
    with pytest.raises(ValueError, match="partial_rotary_factor 0.3125 .*even number"):
        LLM(str(path), dtype="float32", num_kv_blocks=8)


@pytest.mark.parametrize("arch", ["qwen3", "llama3", "llama", "phi3"])
def test_a_gguf_matches_transformers(arch: str, tiny_model_dir, tmp_path) -> None:
    """GGUFs of Q8_0 projections as llama.cpp's converter writes them: Qwen3's (q and k
    head norms, a head_dim other than hidden / heads), Llama 3's (RoPE scaling as a
    `rope_freqs` tensor, q and k rows permuted), Llama 2's (untied head) and Phi-3's (q, k,
    v in one tensor, gate and up in another). Dequantized
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
    _packed_scores_like_dense(path, dense, prompts)


def _packed_scores_like_dense(path, dense: LLM, prompts: list[list[int]]) -> None:
    """The GGUF served packed (its default) gives every token of the dense engine's greedy
    sequences the dense engine's logprob, within the native kernel's activation rounding."""
    packed = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert all(layer.qkv_proj.packed is not None for layer in packed.engine.model.layers)
    texts = [p + c.token_ids for p, c in zip(prompts, dense.generate(
        prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)), strict=True)]
    scored = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for ours, ref in zip(packed.generate(texts, scored), dense.generate(texts, scored),
                         strict=True):
        diff = [abs(a.logprob - b.logprob)
                for a, b in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True)]
        assert max(diff) < NATIVE_LOGPROB_ATOL


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
