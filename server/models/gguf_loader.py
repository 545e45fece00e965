"""Load a GGUF checkpoint: config from metadata, HF-named tensors, tokenizer.

Every tensor type `gguf` can dequantize (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, F16, F32,
...) loads; quantized ones are dequantized to float here (packed serving is `kernels.quant`),
Q4_K and Q6_K by `kernels.gguf_repack` (the same float32 values, 5-8x faster on a 151936 x
1536 embedding), the others by gguf-py.
llama.cpp stores Llama q/k projections row-permuted for its interleaved RoPE; we undo that so
one rotate-half RoPE serves every checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from kernels.gguf_repack import K_QUANTS, dequantize_k_quant
from server.models.config import ModelConfig, architecture_name
from server.models.gguf_file import GGUFFile, GGUFTensor

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
"""A mixture-of-experts layer's router, and Qwen2-MoE's shared expert and its gate."""
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                "ffn_down_exps": "down_proj"}
"""The experts' stacked tensors ([experts, out, in]), by the HF name of each expert's part
(`mlp.experts.{e}.*`)."""
_GEMMA_NORMS = {
    "post_attention_norm": "post_attention_layernorm",  # (on the attention's output)
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
"""Gemma 2's and 3's four norms a layer: `attn_norm` as Llama's, these three their own
(OLMo 2's two: the attention's and the MLP's outputs')."""
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """GGUF tensor name -> HF name, or None for tensors we do not use (rope_freqs, ...).
    (Phi-3's `ffn_up` holds gate and up, as its HF `gate_up_proj`; Gemma's norms differ.)"""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    names = _LAYER_NAMES | _GEMMA_NORMS if architecture in ("gemma2", "gemma3", "olmo2") \
        else _LAYER_NAMES | _MOE_NAMES
    if m is None or m.group(2) not in names:
        return None
    module = names[m.group(2)]
    if architecture == "phi3" and module == "mlp.up_proj":
        module = "mlp.gate_up_proj"
    return f"model.layers.{m.group(1)}.{module}.{m.group(3)}"


_POOLING_TYPES = {1: "mean", 2: "cls", 3: "last", 4: "rank"}
"""llama.cpp's `llama_pooling_type` values (0 is none), by name (`ModelConfig.pooling`)."""


def gguf_config(reader: GGUFFile) -> ModelConfig:
    """ModelConfig from GGUF metadata (`{arch}.block_count`, ...)."""
    gguf_arch = str(reader.get("general.architecture"))
    arch = architecture_name(gguf_arch)

    def meta(key: str, default: object = None) -> object:
        return reader.get(f"{gguf_arch}.{key}", default)

    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    eos = [reader.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    # Phi-3's window is on every layer; Gemma 3's on all but every sixth (as llama.cpp
    # sets it), whose RoPE base is 10,000 where the global layers' is the file's; Gemma 2's
    # on every other one, from the first
    window = meta("attention.sliding_window") if arch in ("phi3", "gemma2", "gemma3") else None
    layers = int(meta("block_count"))
    every = {"phi3": 1, "gemma2": 2, "gemma3": 6}.get(arch, 1)
    windowed = tuple(i for i in range(layers) if every == 1 or (i + 1) % every) if window \
        else ()
    head_dim = int(meta("attention.key_length", hidden // heads))
    # (llama.cpp's Gemma attention scale: 1/sqrt(head_dim), but hidden / heads for the 27Bs:
    # Gemma 2's 46 layers, Gemma 3's 62)
    scale_dim = hidden // heads if (arch, layers) in (("gemma2", 46), ("gemma3", 62)) \
        else head_dim
    caps = [meta(f"{kind}_logit_softcapping") for kind in ("attn", "final")]
    experts = int(meta("expert_count", 0) or 0)
    if experts and int(meta("expert_gating_func", 1) or 1) != 1:  # (llama.cpp's 1: softmax)
        raise ValueError(f"{gguf_arch}: expert gating function "
                         f"{meta('expert_gating_func')} (llama.cpp's enum) is not supported; "
                         "the router's softmax is")
    norm = meta("expert_weights_norm", None)
    rotary = int(meta("rope.dimension_count", head_dim))  # (Phi-4-mini's: 96 of 128)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(meta("vocab_size", int(embd.shape[1]))),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rotary_dim=rotary if rotary < head_dim else None,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, reader),
        rope_freq_factors=None if freqs is None else tuple(
            float(f) for f in tensor_array(freqs).reshape(-1)),
        max_position_embeddings=int(meta("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        # (OLMo's q and k norms span the heads: `ModelConfig.qk_norm_full`)
        qk_norm="blk.0.attn_q_norm.weight" in names and arch not in ("olmo2", "olmoe"),
        attention_scale=scale_dim ** -0.5 if arch in ("gemma2", "gemma3") else (
            float(meta("attention.scale")) if meta("attention.scale") else None),
        local_rope_theta=10000.0 if arch == "gemma3" else None,
        attn_softcap=float(caps[0]) if caps[0] else None,
        final_softcap=float(caps[1]) if caps[1] else None,
        embedding_multiplier=float(meta("embedding_scale", 1.0)),  # (Granite's three)
        residual_multiplier=float(meta("residual_scale", 1.0)),
        logits_scaling=float(meta("logit_scale", 1.0)),
        bos_token_id=reader.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(sorted({int(e) for e in eos if e is not None})),
        sliding_window=int(window) if window else None,
        window_layers=windowed,
        # (SmolLM3's: llama.cpp leaves RoPE out of every fourth layer, no key says so)
        nope_layers=tuple(range(3, layers, 4)) if arch == "smollm3" else (),
        pooling=_POOLING_TYPES.get(int(meta("pooling_type", 0))),
        num_experts=experts,
        experts_per_token=int(meta("expert_used_count", 0) or 0) if experts else 0,
        expert_intermediate_size=int(meta("expert_feed_forward_length", 0)
                                     or meta("feed_forward_length")) if experts else 0,
        shared_expert_intermediate_size=int(
            meta("expert_shared_feed_forward_length", 0) or 0) if experts else 0,
        # (the file's expert_weights_norm, else as llama.cpp weighs them: Qwen2-MoE's and
        # OLMoE's top k probabilities as the softmax gives them, Mixtral's, Qwen3-MoE's and
        # Granite MoE's renormalized)
        normalize_expert_weights=bool(norm) if norm is not None
        else arch not in ("qwen2_moe", "olmoe"),
        dense_layers=tuple(i for i in range(layers)
                           if f"blk.{i}.ffn_gate_inp.weight" not in names) if experts else (),
    )


def _rope_scaling(meta: Callable[[str, object], object], reader: GGUFFile
                  ) -> dict[str, object] | None:
    """HF's rope_scaling dict from a GGUF's `rope.scaling.*` keys (linear or YaRN; llama.cpp
    writes none for Llama 3.x, whose scaling is its `rope_freqs` tensor), or Phi-3's
    LongRoPE from its `rope_factors_short` and `rope_factors_long` tensors."""
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    if "rope_factors_short.weight" in factors:
        trained = meta("rope.scaling.original_context_length", None)
        scaling = {"rope_type": "longrope", **{
            f"{kind}_factor": [float(f) for f in tensor_array(factors[f"rope_factors_{kind}.weight"])
                               .reshape(-1)] for kind in ("short", "long")
            if f"rope_factors_{kind}.weight" in factors}}
        if trained:
            scaling["original_max_position_embeddings"] = int(trained)
        attention = meta("rope.scaling.attn_factor", None)
        if attention:
            scaling["attention_factor"] = float(attention)
        return scaling
    kind = meta("rope.scaling.type", None)
    factor = meta("rope.scaling.factor", None)
    if kind not in ("linear", "yarn") or not factor:
        return None
    scaling: dict[str, object] = {"rope_type": str(kind), "factor": float(factor)}
    trained = meta("rope.scaling.original_context_length", None)
    if kind == "yarn" and trained:
        scaling["original_max_position_embeddings"] = int(trained)
    return scaling


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE layout)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tensor_array(tensor: GGUFTensor) -> np.ndarray:
    """A reader tensor as float32 numpy in PyTorch's [out, in] order."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return dequantize_raw(tensor.data, tensor.tensor_type, shape)


def tensor_rows(tensor: GGUFTensor, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of a 2-D reader tensor ([out, in] order), float32."""
    n, k = int(tensor.shape[1]), int(tensor.shape[0])
    rows = min(stop, n) - start
    raw = np.asarray(tensor.data).reshape(n, -1)[start:stop]  # a row's blocks or elements
    return torch.from_numpy(dequantize_raw(raw, tensor.tensor_type, (rows, k)))


def dequantize_raw(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
                   ) -> np.ndarray:
    """A tensor's (or a slice of its rows') block bytes -> float32 numpy of `shape`."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):  # (copied: the map is read-only)
        return raw.astype(np.float32).reshape(shape)
    if int(qtype) in K_QUANTS:
        return dequantize_k_quant(raw, qtype, (shape[0], int(np.prod(shape[1:])))
                                  ).reshape(shape).numpy()
    return np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(shape)


def gguf_weights(reader: GGUFFile, config: ModelConfig, skip: frozenset[str] = frozenset()
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every tensor the model uses but those in `skip`
    (dequantized as they are yielded)."""
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m is not None and m.group(2) in _EXPERT_NAMES:  # ([experts, out, in]: one each)
            names = [f"model.layers.{m.group(1)}.mlp.experts.{e}.{_EXPERT_NAMES[m.group(2)]}"
                     f".{m.group(3)}" for e in range(int(t.shape[2]))]
            if not all(n in skip for n in names):
                arr = tensor_array(t)
                yield from ((n, torch.from_numpy(arr[e])) for e, n in enumerate(names)
                            if n not in skip)
            continue
        name = hf_name(t.name, config.architecture)
        if name is None or name in skip:
            continue
        arr = tensor_array(t)
        if name.endswith("shared_expert_gate.weight"):  # (llama.cpp's: a vector)
            arr = arr.reshape(1, -1)
        if config.gemma and name.endswith("norm.weight"):  # (llama.cpp stores 1 + w)
            arr = arr - 1
        if config.gguf_permuted_qk:
            if ".q_proj." in name:
                arr = unpermute(arr, config.num_heads)
            elif ".k_proj." in name:
                arr = unpermute(arr, config.num_kv_heads)
        yield name, torch.from_numpy(arr)


def open_gguf(path: Path) -> GGUFFile:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return GGUFFile(path)
