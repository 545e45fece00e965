"""Architecture hyper-parameters, read from an HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ModelConfig:
    """What the Llama-family forward needs; one instance per loaded model."""

    architecture: str
    """Registry name of the model class (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3,
    granite, smollm3, mixtral, qwen2_moe, qwen3_moe, granitemoe, olmo2, olmoe)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, float | str] | None = None
    """HF rope_scaling dict: types llama3, linear, yarn, longrope (its short or long
    factors) and dynamic (within max_position_embeddings) are applied
    (`rope.rope_frequencies`), others are rejected at load."""
    rotary_dim: int | None = None
    """The dims of each q and k head RoPE turns, the first ones (a partial rotary embedding:
    head_dim * partial_rotary_factor, Phi-4-mini's 96 of 128); None: all."""
    rope_freq_factors: tuple[float, ...] | None = None
    """llama.cpp's `rope_freqs` tensor, how a Llama 3.x GGUF carries its RoPE scaling: each
    of the head_dim / 2 frequencies divided by its factor."""
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    pooling: str | None = None
    """The pooling the model's files name for its embeddings (sentence-transformers'
    `1_Pooling/config.json`, a GGUF's `{arch}.pooling_type`): last, mean, or one this server
    does not compute (cls, max, ...); None: none named."""
    generates: bool = True
    """Whether the checkpoint has a language-model head. A base model's (`Qwen3Model`,
    `MistralModel`: how embedding models built on decoders are saved) has none: it serves
    embeddings only, its logits taken from the tied embedding to pick the one token an
    embedding request generates."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    qk_norm: bool = False
    """Each head of q and of k is RMS-normed (one weight vector of head_dim for q's heads,
    one for k's) before RoPE (Qwen3, Gemma 3)."""
    attention_scale: float | None = None
    """The attention's score scale; None: head_dim ** -0.5 (Gemma 3's is
    query_pre_attn_scalar ** -0.5)."""
    local_rope_theta: float | None = None
    """The RoPE base of the sliding-window layers, where it differs (Gemma 3's 10,000)."""
    attn_softcap: float | None = None
    """Attention scores soft-capped: cap * tanh(score / cap) before the softmax (Gemma 2's
    attn_logit_softcapping); None: not."""
    final_softcap: float | None = None
    """The logits soft-capped the same way (Gemma 2's final_logit_softcapping)."""
    embedding_multiplier: float = 1.0
    """The token embeddings scaled by this (Granite's)."""
    residual_multiplier: float = 1.0
    """Each attention's and MLP's output scaled by this before its residual add (Granite's;
    folded into o_proj's and down_proj's weights at load)."""
    logits_scaling: float = 1.0
    """The logits divided by this (Granite's)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    sliding_window: int | None = None
    """The window of the layers the model was trained to attend with a sliding window
    (`window_layers`; Mistral's sliding_window, Qwen2's use_sliding_window): a query at s
    sees the keys at t > s - sliding_window."""
    window_layers: tuple[int, ...] = ()
    nope_layers: tuple[int, ...] = ()
    """Layers that apply no RoPE to q and k (SmolLM3's every fourth)."""
    num_experts: int = 0
    """Routed experts of each mixture-of-experts layer (Mixtral, Qwen2-MoE, Qwen3-MoE, Granite
    MoE, OLMoE); 0: every layer's MLP is dense."""
    experts_per_token: int = 0
    """The experts each token is routed to (the router's top k)."""
    expert_intermediate_size: int = 0
    """Each expert's SwiGLU width (Qwen's moe_intermediate_size; Mixtral's and Granite
    MoE's intermediate_size)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE's shared expert (every token through it, scaled by a sigmoid gate); 0: none."""
    normalize_expert_weights: bool = True
    """The top k routing probabilities divided by their sum (Mixtral's, Granite MoE's: a
    softmax over the top k logits; Qwen's norm_topk_prob); else the softmax's own."""
    dense_layers: tuple[int, ...] = ()
    """With experts: the layers whose MLP is dense nonetheless, of `intermediate_size`
    (Qwen-MoE's mlp_only_layers and decoder_sparse_step)."""

    def kv_block_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one layer's keys and values for `block_size` tokens of `dtype`."""
        return 2 * block_size * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8

    def moe_layer(self, index: int) -> bool:
        """Whether layer `index`'s MLP is a mixture of experts."""
        return self.num_experts > 0 and index not in self.dense_layers

    @property
    def rope_dim(self) -> int:
        """The dims RoPE turns in each q and k head (`rotary_dim`, else head_dim)."""
        return self.rotary_dim or self.head_dim

    @property
    def gemma(self) -> bool:
        """Gemma 2's and 3's layer: RMSNorm weights w applied as 1 + w (held so once loaded),
        the attention's and the MLP's outputs normed before their residual adds (four norms
        a layer), GELU (tanh) gating instead of SiLU, embeddings scaled by sqrt(hidden)."""
        return self.architecture in ("gemma2", "gemma3")

    @property
    def qk_norm_full(self) -> bool:
        """q and k are each RMS-normed across all their heads (one weight of heads * head_dim
        for q, one of kv_heads * head_dim for k) before RoPE (OLMo 2, OLMoE)."""
        return self.architecture in ("olmo2", "olmoe")

    @property
    def post_norms_only(self) -> bool:
        """OLMo 2's layer: no norm before the attention or the MLP; their outputs normed
        before their residual adds."""
        return self.architecture == "olmo2"

    @property
    def gguf_permuted_qk(self) -> bool:
        """Whether llama.cpp's converter stores q's and k's rows permuted to its interleaved
        RoPE pairs (Llama's, and Granite's and SmolLM3's after it), which loading undoes."""
        return self.architecture in ("llama", "granite", "smollm3", "granitemoe")

    @property
    def context_limit(self) -> int:
        """The positions the model serves: max_position_embeddings, or with YaRN or linear
        RoPE scaling `factor` times the context it was trained at where that is more: the
        scaling's original_max_position_embeddings, else (YaRN only, as vLLM derives it)
        max_position_embeddings; a linear scaling that names no trained context is taken to
        be counted in max_position_embeddings already (Gemma 3's 131,072: its global layers'
        factor of 8 over 16,384). With LongRoPE (Phi-3's) max_position_embeddings where it
        has long factors, else the context it was trained at (`rope.rope_frequencies`)."""
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        trained = scaling.get("original_max_position_embeddings")
        if kind == "longrope":
            if isinstance(scaling.get("long_factor"), list):
                return self.max_position_embeddings
            return trained or self.max_position_embeddings
        if kind == "yarn":
            trained = trained or self.max_position_embeddings
        if kind not in ("linear", "yarn") or not trained or not float(
                scaling.get("factor") or 0) > 1:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(trained * float(scaling["factor"])))

    @property
    def default_context(self) -> int:
        """The context served when none is asked for: `context_limit` up to 8,192, and with
        LongRoPE at most the context it was trained at, so that its short factors serve (as
        transformers runs it there): the long ones apply at every position of a longer
        context, and only when one is asked for (`rope.rope_frequencies`)."""
        scaling = self.rope_scaling or {}
        limit = min(self.context_limit, 8192)
        if scaling.get("rope_type", scaling.get("type")) == "longrope":
            return min(limit, scaling.get("original_max_position_embeddings") or limit)
        return limit


_BASE_MODELS = {"LlamaModel": "llama", "MistralModel": "mistral", "Qwen2Model": "qwen2",
                "Qwen3Model": "qwen3"}
"""Decoders saved without their language-model head (`ModelConfig.generates`)."""

_ARCH_ALIASES = _BASE_MODELS | {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "GraniteForCausalLM": "granite",
    "SmolLM3ForCausalLM": "smollm3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GraniteMoeForCausalLM": "granitemoe",
    "Olmo2ForCausalLM": "olmo2",
    "OlmoeForCausalLM": "olmoe",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "granite": "granite",
    "smollm3": "smollm3",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "granitemoe": "granitemoe",
    "olmo2": "olmo2",
    "olmoe": "olmoe",
}


def architecture_name(name: str) -> str:
    """Map an HF architecture or GGUF `general.architecture` to our registry name."""
    if name not in _ARCH_ALIASES:
        raise ValueError(
            f"unsupported architecture {name!r}; supported: {sorted(set(_ARCH_ALIASES.values()))}"
        )
    return _ARCH_ALIASES[name]


def _eos_tuple(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


_QWEN_WINDOWS = ("qwen2", "qwen3", "smollm3", "qwen2_moe", "qwen3_moe")
"""Architectures whose window is off unless use_sliding_window, on the layers from
max_window_layers on."""


def _window_layers(hf: dict, arch: str) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, the layers that use it) as transformers reads the config: its
    `layer_types` when given, else Mistral's and Phi-3's window on every layer and Qwen2's
    (only with use_sliding_window) on the layers from max_window_layers on (Qwen3's as
    Qwen2's)."""
    window = hf.get("sliding_window")
    layers = hf["num_hidden_layers"]
    if arch in _QWEN_WINDOWS and not hf.get("use_sliding_window", False):
        window = None
    if window is None or arch == "llama":
        return None, ()
    types = hf.get("layer_types")
    if types is None and arch in ("gemma2", "gemma3"):  # (older configs: every n-th layer
        # global: Gemma 2's every other one)
        pattern = 2 if arch == "gemma2" else hf.get("sliding_window_pattern") or 6
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(layers)]
    if types is not None:
        chosen = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    elif arch in _QWEN_WINDOWS:
        chosen = tuple(range(hf.get("max_window_layers", layers), layers))
    else:
        chosen = tuple(range(layers))
    return (int(window), chosen) if chosen else (None, ())


def config_from_hf(hf: dict) -> ModelConfig:
    """Build from a parsed HF config.json (of Gemma 3's image-text model, its language
    model's: `text_config`, whose omitted fields take transformers' defaults)."""
    if (hf.get("architectures") or [""])[0] == "Gemma3ForConditionalGeneration":
        from transformers import Gemma3TextConfig

        text = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings")
                if k in hf} | hf.get("text_config", {})
        hf = Gemma3TextConfig(**text).to_dict() | {"architectures": ["Gemma3ForCausalLM"]}
    archs = hf.get("architectures") or [hf.get("model_type", "")]
    arch = architecture_name(archs[0])
    heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    local_theta = hf.get("rope_local_base_freq")
    if isinstance(params.get("full_attention"), dict):  # (per layer type: Gemma 3's)
        local_theta = (params.get("sliding_attention") or {}).get("rope_theta", local_theta)
        params = params["full_attention"]
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling and hf.get("original_max_position_embeddings"):  # (Phi-3 keeps it outside)
        scaling = {"original_max_position_embeddings": hf["original_max_position_embeddings"],
                   **scaling}
    rotary = hf.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if int(head_dim * rotary) % 2 or not 0 < rotary <= 1:
        raise ValueError(f"partial_rotary_factor {rotary} of head_dim {head_dim}: RoPE needs "
                         "an even number of dims, at most head_dim")
    window, window_layers = _window_layers(hf, arch)
    experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    step = int(hf.get("decoder_sparse_step") or 1)
    return ModelConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * rotary) if rotary != 1.0 else None,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta") or params.get("rope_theta", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=hf.get("tie_word_embeddings", False) or archs[0] in _BASE_MODELS,
        generates=archs[0] not in _BASE_MODELS,
        attention_bias=bool(hf.get("attention_bias", hf.get("qkv_bias",
                                                            arch in ("qwen2", "qwen2_moe")))),
        qk_norm=arch in ("qwen3", "gemma3", "qwen3_moe"),
        attention_scale=(hf["query_pre_attn_scalar"] ** -0.5
                         if hf.get("query_pre_attn_scalar") else hf.get("attention_multiplier")),
        local_rope_theta=local_theta if arch == "gemma3" else None,
        attn_softcap=hf.get("attn_logit_softcapping") or None,
        final_softcap=hf.get("final_logit_softcapping") or None,
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
        sliding_window=window,
        window_layers=window_layers,
        nope_layers=tuple(i for i, rotates in enumerate(hf.get("no_rope_layers") or ())
                          if not rotates),
        num_experts=experts,
        experts_per_token=int(hf.get("num_experts_per_tok") or 0) if experts else 0,
        expert_intermediate_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"])
        if experts else 0,
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0)
        if experts else 0,
        normalize_expert_weights=arch in ("mixtral", "granitemoe")
        or bool(hf.get("norm_topk_prob", False)),
        dense_layers=tuple(i for i in range(hf["num_hidden_layers"])
                           if i in (hf.get("mlp_only_layers") or ()) or (i + 1) % step)
        if experts else (),
    )
