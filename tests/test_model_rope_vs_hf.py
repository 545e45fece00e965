"""RoPE as transformers runs it: scalings (YaRN, linear, dynamic NTK, LongRoPE within and
past the trained context), partial rotary embeddings, and the refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels import cpu_native
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from tests.test_model_vs_hf import check_against_hf


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


def _longrope_phi3(directory: Path, seed: int, **extra: object,
                   ) -> tuple[Path, torch.Generator]:
    """A tiny Phi-3 trained at 64 of its 256 positions, with LongRoPE short and long factors
    drawn from a generator of `seed`; that generator, to draw prompts after them."""
    from tests.tiny_models import save_tiny_model

    gen = torch.Generator().manual_seed(seed)
    short, long = (torch.rand(8, generator=gen) * 3 + 1 for _ in range(2))
    path = save_tiny_model("phi3", directory, max_position_embeddings=256,
                           original_max_position_embeddings=64, rope_scaling={
                               "rope_type": "longrope", "short_factor": short.tolist(),
                               "long_factor": long.tolist()}, **extra)
    return path, gen


def test_longrope_within_the_trained_context_matches_transformers(tmp_path) -> None:
    """Phi-3's LongRoPE: its short factors and attention factor, which transformers applies
    up to the context the model was trained at, where the default context stops; and from a
    GGUF, with a sliding window."""
    from tests.tiny_models import save_tiny_gguf

    path, gen = _longrope_phi3(tmp_path, 6)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert llm.engine.max_model_len == 64
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 30)]
    check_against_hf(llm, hf, prompts, 32)
    # the same model with a sliding window as a GGUF: its factors and window read from the file
    path, _ = _longrope_phi3(tmp_path / "windowed", 6, sliding_window=8)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gguf = LLM(str(save_tiny_gguf(hf, tmp_path / "phi3.gguf")), dtype="float32",
               num_kv_blocks=64, block_size=4, quantization="none")
    c = gguf.engine.model.config
    assert (c.sliding_window, c.window_layers, gguf.engine.max_model_len) == (8, (0, 1, 2), 64)
    check_against_hf(gguf, hf, prompts, 32)


def test_longrope_past_the_trained_context_matches_transformers(tmp_path, caplog) -> None:
    """Asked for a context past the one it was trained at, a LongRoPE model serves it with
    its long factors at every position: what transformers applies to a sequence whose
    prompt is already past it (from the checkpoint and from a GGUF). A context past
    max_position_embeddings is cut to it, with a warning."""
    from tests.tiny_models import save_tiny_gguf

    path, gen = _longrope_phi3(tmp_path, 8)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (70, 130)]
    for source in ("checkpoint", "gguf"):  # (the GGUF's weights, Q8_0, become hf's)
        model = path if source == "checkpoint" else save_tiny_gguf(hf, tmp_path / "phi3.gguf")
        with caplog.at_level(logging.WARNING, logger="leapfrog.engine"):
            llm = LLM(str(model), dtype="float32", num_kv_blocks=128, block_size=4,
                      max_model_len=1000, quantization="none")
        assert llm.engine.max_model_len == 256  # (max_position_embeddings: the limit)
        assert "max_model_len 1000 is past the model's limit of 256" in caplog.text
        check_against_hf(llm, hf, prompts, 32)
    short_only = LLM(str(path), dtype="float32", num_kv_blocks=128, block_size=4,
                     max_model_len=64)
    assert not torch.allclose(short_only.engine.model.rope.cos, llm.engine.model.rope.cos[:64])


def test_unsupported_rope_scaling_is_named(tiny_model_dir, tmp_path) -> None:
    from tests.tiny_models import save_tiny_model

    with pytest.raises(ValueError, match="unsupported rope_scaling type 'mrope'"):
        LLM(str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=8,
            rope_scaling={"rope_type": "mrope", "factor": 2.0})
    path = save_tiny_model("phi3", tmp_path, partial_rotary_factor=0.3125)  # (5 of 16 dims)
    with pytest.raises(ValueError, match="partial_rotary_factor 0.3125 .*even number"):
        LLM(str(path), dtype="float32", num_kv_blocks=8)
