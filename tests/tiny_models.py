"""Tiny random Llama-family checkpoints built from a transformers config, saved to disk (as
HF directories, or as a GGUF file of Q8_0 projections). (Nothing here may import
`transformers.PreTrainedModel` at import time: it imports triton, which the interpreted
kernel tests need imported only after they set TRITON_INTERPRET.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteMoeConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
)

VOCAB = 128


def tiny_config(arch: str, vocab: int = VOCAB, **overrides: object) -> PretrainedConfig:
    """`overrides`: more config fields (e.g. a sliding window) or other values of these."""
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    ) | overrides
    if arch == "llama":
        return LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "llama3":
        return LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        })
    if arch == "mistral":
        return MistralConfig(**{"sliding_window": None, **common}, rope_theta=10000.0)
    if arch == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
    if arch == "qwen3":  # (a head_dim other than hidden / heads, as Qwen3's own)
        return Qwen3Config(**{"head_dim": 32, **common}, rope_theta=1000000.0,
                           tie_word_embeddings=True)
    if arch == "phi3":  # (fused q/k/v and gate/up in its checkpoint)
        return Phi3Config(**{"sliding_window": None, **common}, pad_token_id=0,
                          rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "phi4":  # (Phi-4-mini's partial rotary embedding: 12 of each head's 16 dims)
        return Phi3Config(**{"sliding_window": None, **common}, pad_token_id=0,
                          rope_theta=10000.0, tie_word_embeddings=True,
                          partial_rotary_factor=0.75)
    if arch == "gemma3":  # (layer 2 global, the others a window of 8; other RoPE bases)
        return Gemma3TextConfig(**{"head_dim": 32, "sliding_window": 8, "pad_token_id": 0,
                                   "query_pre_attn_scalar": 24, "layer_types": [
                                       "sliding_attention", "sliding_attention",
                                       "full_attention"], **common})
    if arch == "gemma2":  # (layers 0 and 2 a window of 8; caps the random scores reach)
        return Gemma2Config(**{"head_dim": 32, "sliding_window": 8, "pad_token_id": 0,
                               "query_pre_attn_scalar": 24, "attn_logit_softcapping": 1.5,
                               "final_logit_softcapping": 4.0, **common})
    if arch == "granite":  # (its four multipliers, none of them 1)
        return GraniteConfig(**common, rope_theta=10000.0, tie_word_embeddings=True,
                             embedding_multiplier=3.0, residual_multiplier=0.5,
                             attention_multiplier=0.3, logits_scaling=2.5)
    if arch == "smollm3":  # (4 layers: the last applies no RoPE, as every fourth)
        layers = overrides.get("num_hidden_layers", 4)
        return SmolLM3Config(**common | {"num_hidden_layers": layers}, rope_theta=10000.0,
                             pad_token_id=0, tie_word_embeddings=True)
    if arch == "mixtral":  # (4 experts, 2 a token)
        return MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **common},
                             rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "qwen3_moe":  # (6 experts of 32, 2 a token, renormalized; layer 1 dense)
        return Qwen3MoeConfig(**{"head_dim": 32, "num_experts": 6, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 32, "mlp_only_layers": [1],
                                 **common},
                              rope_theta=1000000.0, norm_topk_prob=True,
                              tie_word_embeddings=True)
    if arch == "qwen2_moe":  # (a shared expert, probabilities not renormalized)
        return Qwen2MoeConfig(**{"num_experts": 4, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 32,
                                 "shared_expert_intermediate_size": 96, **common},
                              rope_theta=1000000.0, norm_topk_prob=False,
                              tie_word_embeddings=False)
    if arch == "granitemoe":  # (Granite's multipliers; 4 experts of 32 stacked, 2 a token)
        return GraniteMoeConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2,
                                   **common | {"intermediate_size": 32}},
                                rope_theta=10000.0, tie_word_embeddings=True,
                                embedding_multiplier=3.0, residual_multiplier=0.5,
                                attention_multiplier=0.3, logits_scaling=2.5)
    if arch == "olmo2":  # (norms after the attention and the MLP; q, k normed across heads)
        return Olmo2Config(**common, rope_theta=500000.0, pad_token_id=0,
                           tie_word_embeddings=False)
    if arch == "olmoe":  # (q, k normed across heads; 4 experts of 32, 2 a token, as given)
        return OlmoeConfig(**{"num_experts": 4, "num_experts_per_tok": 2,
                              **common | {"intermediate_size": 32}},
                           rope_theta=10000.0, pad_token_id=0, norm_topk_prob=False,
                           tie_word_embeddings=False)
    raise ValueError(arch)


def tiny_tokenizer(vocab: int = VOCAB, prefix: str = "w") -> PreTrainedTokenizerFast:
    """Word-level: token i is `{prefix}{i}` (ids 0-2 are also unk, bos and eos: w0-w2)."""
    words = {f"{prefix}{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_up_proj": "ffn_up", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.experts.gate_up_proj": "ffn_gate_up_exps", "mlp.experts.down_proj": "ffn_down_exps",
    "block_sparse_moe.router": "ffn_gate_inp",
    "block_sparse_moe.experts.gate_up_proj": "ffn_gate_up_exps",
    "block_sparse_moe.experts.down_proj": "ffn_down_exps"}
_GGUF_ARCHS = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
"""llama.cpp's names of architectures where they differ (Mixtral's is Llama's, with
experts)."""


_GGUF_GEMMA_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def save_tiny_gguf(model: torch.nn.Module, path: Path, pooling_type: int | None = None,
                   extra: Callable[[object], None] | None = None) -> Path:
    """Write a Llama, Qwen2, Qwen3, Phi-3, Gemma 2 or 3, Granite, SmolLM3, OLMo 2, Mixtral,
    Qwen2-MoE, Qwen3-MoE, Granite MoE or OLMoE model as
    llama.cpp's converter would (Llama's, Granite's and SmolLM3's q and k rows permuted to
    interleaved RoPE pairs,
    Granite's multipliers as metadata; Llama 3's RoPE scaling as a
    `rope_freqs` tensor of frequency divisors; Phi-3's fused projections as they are, its
    LongRoPE factors as tensors, its window as metadata; Gemma's norms as 1 + w, Gemma 2's
    soft-caps as metadata), its
    matrices as Q8_0 and its norms as F32, with a byte-level tokenizer of the vocabulary's
    first byte characters; the model's matrices are replaced by the values the file holds,
    so that it is the file's reference. `pooling_type`: the embeddings' pooling it names;
    `extra(writer)` adds more metadata."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c, arch = model.config, model.config.model_type.removesuffix("_text")
    assert arch in ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "granite",
                    "smollm3", "granitemoe", "olmo2", "olmoe", *_GGUF_ARCHS), arch
    gemma = arch in ("gemma2", "gemma3")
    layer_names = _GGUF_LAYER_NAMES | (_GGUF_GEMMA_NORMS if gemma or arch == "olmo2" else {})
    writer = gguf.GGUFWriter(str(path), _GGUF_ARCHS.get(arch, arch))
    writer.add_block_count(c.num_hidden_layers)
    if pooling_type is not None:  # (llama.cpp's: 1 mean, 2 cls, 3 last)
        writer.add_pooling_type(gguf.PoolingType(pooling_type))
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * getattr(c, "partial_rotary_factor", 1.0)))
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # (Gemma's: by layer)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    chars = bytes_to_unicode()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([chars[i] for i in range(c.vocab_size)])
    writer.add_token_types([1] * c.vocab_size)
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    if getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)
    if hasattr(c, "num_experts_per_tok"):
        writer.add_expert_count(getattr(c, "num_experts", None) or c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if arch in ("granite", "granitemoe"):
        writer.add_embedding_scale(c.embedding_multiplier)
        writer.add_residual_scale(c.residual_multiplier)
        writer.add_attention_scale(c.attention_multiplier)
        writer.add_logit_scale(c.logits_scaling)
    for kind in ("attn", "final"):
        if getattr(c, f"{kind}_logit_softcapping", None):
            writer.add_float32(f"{arch}.{kind}_logit_softcapping",
                               getattr(c, f"{kind}_logit_softcapping"))
    if rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for kind in ("short", "long"):
            writer.add_tensor(f"rope_factors_{kind}.weight",
                              torch.tensor(rope[f"{kind}_factor"]).float().numpy())
    if rope.get("rope_type") == "llama3":
        plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        writer.add_tensor("rope_freqs.weight",
                          (plain / ROPE_INIT_FUNCTIONS["llama3"](c)[0]).numpy())
    q8 = gguf.GGMLQuantizationType.Q8_0
    globals_ = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                "lm_head.weight": "output"}
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in globals_:
                target = globals_[name]
            else:
                parts = name.split(".")  # (the experts' are named without .weight)
                module = parts[3:] if parts[-2] == "experts" else parts[3:-1]
                target = f"blk.{parts[2]}.{layer_names['.'.join(module)]}"
            values = p.detach().float().numpy()
            if target.endswith("gate_up_exps"):  # ([experts, 2 * I, H]: gate's rows, up's)
                gate_up = []
                for half, kind in zip(np.split(values, 2, axis=1), ("gate", "up"), strict=True):
                    blocks = gguf.quants.quantize(np.ascontiguousarray(half), q8)
                    writer.add_tensor(target.replace("gate_up", kind) + ".weight", blocks,
                                      raw_dtype=q8)
                    gate_up.append(gguf.quants.dequantize(blocks, q8))
                p.copy_(torch.from_numpy(np.concatenate(gate_up, axis=1)))
            elif p.dim() >= 2 and not target.endswith("gate_inp_shexp"):
                blocks = gguf.quants.quantize(values, q8)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, q8)))
                kind = target.split(".")[-1]
                if arch in ("llama", "granite", "smollm3", "mixtral", "granitemoe") \
                        and kind in heads:  # (each head's halves
                    # interleaved)
                    n = heads[kind]
                    blocks = gguf.quants.quantize(
                        p.numpy().reshape(n, 2, head_dim // 2, -1).swapaxes(1, 2)
                        .reshape(values.shape), q8)
                writer.add_tensor(f"{target}.weight", blocks, raw_dtype=q8)
            else:  # (Gemma's norms as llama.cpp's converter stores them: 1 + w; Qwen2-MoE's
                # shared expert's gate as a vector)
                kind = "bias" if name.endswith(".bias") else "weight"  # (Qwen2's q, k, v)
                writer.add_tensor(f"{target}.{kind}", values.reshape(-1) + gemma)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def save_tiny_model(arch: str, directory: Path, seed: int = 0, vocab: int = VOCAB,
                    **overrides: object) -> Path:
    """Write a random model (safetensors + config + tokenizer) and return the directory;
    `overrides` as `tiny_config`'s."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger weights make the random model's distributions peaked
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # (a mixture's experts: [experts, out, in])
                p.normal_(0, 0.2)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's: not all ones
                p.uniform_(0.5, 1.5)
            elif arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):  # (1 + w)
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer(vocab).save_pretrained(directory)
    return directory
