"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, Granite MoE, OLMoE): config,
our forward against transformers' (HF files and GGUFs), packed experts, and outputs
independent of the batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from server.models.config import config_from_hf
from server.models.quantize import linear_modules
from tests.test_model_vs_hf import check_against_hf, packed_scores_like_dense

ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe", "granitemoe", "olmoe"]


def _prompts(seed: int, lengths: tuple[int, ...] = (1, 5, 13, 90)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]


def test_config_reads_the_experts_and_the_dense_layers() -> None:
    base = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 4, "num_attention_heads": 4}
    qwen = config_from_hf(base | {
        "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 60, "num_experts_per_tok": 4,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert (qwen.num_experts, qwen.experts_per_token, qwen.expert_intermediate_size,
            qwen.shared_expert_intermediate_size) == (60, 4, 32, 48)
    assert qwen.dense_layers == (0, 2, 3) and not qwen.normalize_expert_weights
    assert [qwen.moe_layer(i) for i in range(4)] == [False, True, False, False]
    assert qwen.attention_bias  # (Qwen2-MoE's q, k, v biases, named by no key)
    mixtral = config_from_hf(base | {"architectures": ["MixtralForCausalLM"],
                                     "num_local_experts": 8, "num_experts_per_tok": 2})
    assert (mixtral.num_experts, mixtral.expert_intermediate_size, mixtral.dense_layers,
            mixtral.normalize_expert_weights) == (8, 96, (), True)
    dense = config_from_hf(base | {"architectures": ["LlamaForCausalLM"]})
    assert dense.num_experts == 0 and not dense.moe_layer(0)


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_models_match_transformers(arch: str, tiny_model_dir) -> None:
    """Mixtral's (experts renormalized, `block_sparse_moe` names), Qwen3-MoE's (q and k head
    norms, a dense layer among the sparse ones), Qwen2-MoE's (a shared expert behind a
    sigmoid gate, top-k probabilities as the softmax gives them) and Granite MoE's (its
    experts stacked in one tensor each for gate/up and down, Granite's four multipliers,
    the residual one folded into every expert's down projection): the same greedy tokens
    and top-5 logprobs as transformers, prompts from 1 to 90 tokens batched together."""
    path = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    layers = llm.engine.model.layers
    assert [layer.moe is not None for layer in layers] == (
        [True, False, True] if arch == "qwen3_moe" else [True] * 3)
    assert (layers[0].moe.shared is not None) == (arch == "qwen2_moe")
    check_against_hf(llm, hf, _prompts(1), 32)
    assert llm.engine.blocks.num_free_blocks == 64


@pytest.mark.parametrize("arch", ARCHS)
def test_a_moe_gguf_matches_transformers(arch: str, tiny_model_dir, tmp_path) -> None:
    """A GGUF as llama.cpp's converter writes it (Mixtral as `llama` with an expert count,
    its q and k rows permuted; the experts stacked in `ffn_{gate,up,down}_exps`, Qwen2-MoE's
    shared expert in `*_shexp` and its gate as a vector): dequantized, transformers' greedy
    tokens and top-5; served packed (every expert too, each repacked from its slice of the
    stacked Q8_0 tensor), each token's logprob within the native kernel's rounding."""
    from tests.tiny_models import save_tiny_gguf

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32)
    path = save_tiny_gguf(hf, tmp_path / f"tiny-{arch}.gguf")
    dense = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4,
                quantization="none")
    c = dense.engine.model.config
    assert (c.num_experts, c.experts_per_token) == ((4, 2) if arch != "qwen3_moe" else (6, 2))
    assert c.residual_multiplier == (0.5 if arch == "granitemoe" else 1.0)
    assert c.dense_layers == ((1,) if arch == "qwen3_moe" else ())
    prompts = _prompts(2)
    check_against_hf(dense, hf.eval(), prompts, 24)
    packed = packed_scores_like_dense(path, dense, prompts, 24)
    linears = dict(linear_modules(packed.engine.model))
    assert all(lin.packed is not None for lin in linears.values())
    assert "layers.0.moe.experts.3.gate_up_proj" in linears
    assert ("layers.0.moe.shared.down_proj" in linears) == (arch == "qwen2_moe")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_packed_experts_give_the_same_output_alone_and_batched(quantization: str,
                                                               tiny_model_dir) -> None:
    """`--quantization` packs every expert (not the router); a request's greedy tokens and
    logprobs are the same alone, batched with others (other tokens routed to its experts in
    the same products) and with n-gram speculation verifying drafts."""
    path = tiny_model_dir("qwen2_moe")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3)
    prompts = _prompts(3, (7, 2, 40, 19))
    llm = LLM(str(path), dtype="float32", num_kv_blocks=96, block_size=4,
              quantization=quantization)
    moe = llm.engine.model.layers[0].moe
    assert all(e.gate_up_proj.packed is not None for e in moe.experts)
    assert moe.shared.down_proj.packed is not None and moe.router.dtype == torch.float32
    alone = [llm.generate([p], params)[0] for p in prompts]
    batched = llm.generate(prompts, params)
    spec = LLM(str(path), dtype="float32", num_kv_blocks=96, block_size=4,
               quantization=quantization, speculative="ngram", num_speculative_tokens=4)
    for a, b, s in zip(alone, batched, spec.generate(prompts, params), strict=True):
        assert a.token_ids == b.token_ids == s.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.top == y.top


def test_a_gguf_names_how_its_experts_are_weighed(tiny_model_dir, tmp_path) -> None:
    """`{arch}.expert_weights_norm` overrides the architecture's default (Qwen2-MoE's: not
    renormalized); a gating function other than llama.cpp's softmax (1) is refused."""
    from server.models.gguf_file import GGUFFile
    from server.models.gguf_loader import gguf_config
    from tests.tiny_models import save_tiny_gguf

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2_moe"), dtype=torch.float32)
    plain = save_tiny_gguf(hf, tmp_path / "plain.gguf")
    assert not gguf_config(GGUFFile(plain)).normalize_expert_weights
    for name, key, value, kind in (("norm", "expert_weights_norm", True, "bool"),
                                   ("sigmoid", "expert_gating_func", 2, "uint32")):
        path = save_tiny_gguf(hf, tmp_path / f"{name}.gguf", extra=lambda w, key=key, value=value,
                              kind=kind: getattr(w, f"add_{kind}")(f"qwen2moe.{key}", value))
        if name == "norm":
            assert gguf_config(GGUFFile(path)).normalize_expert_weights
        else:
            with pytest.raises(ValueError, match="gating function 2"):
                gguf_config(GGUFFile(path))
