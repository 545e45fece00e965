"""Checkpoint tensors onto `LlamaForCausalLM`'s parameters: which HF names a model expects,
where each lands (a slice of a fused q/k/v or gate/up weight, a norm, an expert), loading
them, and adding LoRA deltas to them.

Every checkpoint loads under HF's names: a GGUF's are mapped to them as they are read
(`gguf_loader.hf_name`), and a mixture of experts' under Qwen's (`canonical_expert_names`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from server.models.config import ModelConfig

if TYPE_CHECKING:
    from server.models.lora import LoraAdapter
    from server.models.moe import SparseMoE

Slices = tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]
Target = tuple[torch.nn.Parameter | None, int | None, int]


def load_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Take HF-named tensors (model.layers.N.self_attn.q_proj.weight, ...); every parameter
    must be filled exactly once or loading fails."""
    c = model.config
    slices = _slices(c)
    filled: dict[str, int] = {}
    if c.num_experts:
        weights = canonical_expert_names(weights)
    for name, tensor in weights:
        dst = _destination(model, name, slices)
        if dst is None:
            continue
        if c.gemma and name.endswith("norm.weight"):  # held as 1 + w
            tensor = tensor.float() + 1
        src = _residual_scaled(c, name, tensor).to(model.dtype)
        if dst.shape != src.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != model {tuple(dst.shape)}")
        dst.copy_(src)
        filled[name] = 1
    expected = _expected_names(c) - packed_weight_names(model)
    missing = sorted(expected - set(filled))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def merge_lora(model: torch.nn.Module, adapter: LoraAdapter) -> None:
    """Add each of the adapter's deltas (factor * B @ A, in float32) to the dense weight it
    adapts (`build_model` keeps those linears dense until then). Granite's residual scale,
    folded into o_proj's and down_proj's weights, scales their deltas too."""
    slices = _slices(model.config)
    for name, (a, b, factor) in adapter.deltas.items():
        layer = int(name.split(".")[2])
        if layer >= len(model.layers):
            raise ValueError(f"LoRA adapter {adapter.path}: {name} names layer {layer} of "
                             f"a model of {len(model.layers)}")
        try:
            dst = _destination(model, name, slices)
        except ValueError:
            dst = None
        if dst is None:
            raise ValueError(f"LoRA adapter {adapter.path}: {name} is no dense weight of "
                             "this model (a mixture of experts' MLP is not adapted)")
        delta = _residual_scaled(model.config, name, (b @ a) * factor)
        if dst.shape != delta.shape:
            raise ValueError(f"LoRA adapter {adapter.path}: {name}'s delta is "
                             f"{tuple(delta.shape)}, the model's weight {tuple(dst.shape)}")
        dst.copy_((dst.float() + delta).to(dst.dtype))


def packed_weight_names(model: torch.nn.Module) -> frozenset[str]:
    """HF names of the weights whose linears are served packed already: their parameter is
    gone (`Linear.set_packed`), so their dense tensors are not loaded (biases are)."""
    slices = _slices(model.config)
    return frozenset(name for name in _expected_names(model.config)
                     if _target(model, name, *slices)[0] is None)


def _destination(model: torch.nn.Module, name: str, slices: Slices) -> torch.Tensor | None:
    """The tensor (or rows of it) that `name` fills; None for a tensor the model does not
    hold (a packed linear's weight, rotary buffers of old checkpoints)."""
    target, start, length = _target(model, name, *slices)
    if target is None:
        return None
    return target.data if start is None else target.data.narrow(0, start, length)


def _residual_scaled(config: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Granite's residual scale folded into the attention's and the MLP's output
    projections (float32 where it applies)."""
    residual = config.residual_multiplier
    if residual != 1.0 and name.endswith(("o_proj.weight", "down_proj.weight")):
        return tensor.float() * residual
    return tensor


def _slices(c: ModelConfig) -> Slices:
    """(start, length) of q/k/v in the fused qkv rows, and of gate/up in gate_up's."""
    q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    qkv = {"q_proj": (0, q_size), "k_proj": (q_size, kv_size),
           "v_proj": (q_size + kv_size, kv_size)}
    gate_up = {"gate_proj": (0, c.intermediate_size),
               "up_proj": (c.intermediate_size, c.intermediate_size)}
    return qkv, gate_up


def _expected_names(c: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not c.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        names.add(p + "post_attention_layernorm.weight")
        if c.post_norms_only:  # (OLMo 2: the norms after the attention and the MLP)
            names.add(p + "post_feedforward_layernorm.weight")
        else:
            names.add(p + "input_layernorm.weight")
        if c.architecture == "phi3":  # (its checkpoints hold q, k, v and gate, up fused)
            names |= {p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"}
        else:
            names |= {f"{p}self_attn.{n}_proj.weight" for n in "qkv"}
        if c.moe_layer(i):
            names |= _expert_names(c, p)
        else:
            names |= {f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down")
                      if c.architecture != "phi3" or n == "down"}
        names.add(p + "self_attn.o_proj.weight")
        if c.attention_bias:
            names |= {f"{p}self_attn.{n}_proj.bias" for n in "qkv"}
        if c.qk_norm or c.qk_norm_full:
            names |= {f"{p}self_attn.{n}_norm.weight" for n in "qk"}
        if c.gemma:
            names |= {f"{p}{n}_feedforward_layernorm.weight" for n in ("pre", "post")}
    return names


def _expert_names(c: ModelConfig, prefix: str) -> set[str]:
    """The names of a mixture-of-experts layer's MLP weights as `load_weights` takes them
    (`canonical_expert_names`): Qwen's `mlp.gate` (the router),
    `mlp.experts.{e}.{gate,up,down}_proj` and a shared expert's `mlp.shared_expert.*` and
    `mlp.shared_expert_gate`."""
    parts = ("gate", "up", "down")
    names = {f"{prefix}mlp.gate.weight"} | {
        f"{prefix}mlp.experts.{e}.{n}_proj.weight" for e in range(c.num_experts) for n in parts}
    if c.shared_expert_intermediate_size:
        names |= {f"{prefix}mlp.shared_expert.{n}_proj.weight" for n in parts}
        names.add(f"{prefix}mlp.shared_expert_gate.weight")
    return names


def _expert_target(c: ModelConfig, moe: SparseMoE, parts: list[str]) -> Target:
    """`_target` of a tensor of a mixture-of-experts MLP (`parts`: its name after
    `model.layers.{i}.mlp.`, `_expert_names`' form)."""
    if parts == ["gate", "weight"]:
        return moe.router, None, 0
    if parts == ["shared_expert_gate", "weight"] and moe.shared_gate is not None:
        return moe.shared_gate, None, 0
    if parts[0] == "experts" and len(parts) == 4 and parts[1].isdigit() \
            and int(parts[1]) < len(moe.experts):
        expert, width, module = moe.experts[int(parts[1])], c.expert_intermediate_size, parts[2]
    elif parts[0] == "shared_expert" and len(parts) == 3 and moe.shared is not None:
        expert, width, module = moe.shared, c.shared_expert_intermediate_size, parts[1]
    else:
        raise ValueError(f"unexpected mixture-of-experts tensor {'.'.join(parts)!r}")
    if module == "down_proj":
        return expert.down_proj.weight, None, 0
    halves = {"gate_proj": 0, "up_proj": width}
    if module not in halves:
        raise ValueError(f"unexpected mixture-of-experts tensor {'.'.join(parts)!r}")
    return expert.gate_up_proj.weight, halves[module], width


def _target(model: torch.nn.Module, name: str, qkv: dict[str, tuple[int, int]],
            gate_up: dict[str, tuple[int, int]]) -> Target:
    """(parameter, first row, rows) that the tensor `name` fills; (None, ...) for one the
    model does not hold; ValueError for a name no model tensor answers to."""
    c = model.config
    if name == "model.embed_tokens.weight":
        return model.embed.weight, None, 0
    if name == "model.norm.weight":
        return model.norm, None, 0
    if name == "lm_head.weight":
        return (model.lm_head.weight if model.lm_head is not None else None), None, 0
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        return None, None, 0  # e.g. rotary inv_freq buffers in old checkpoints
    layer = model.layers[int(parts[2])]
    if layer.moe is not None and parts[3] == "mlp":
        return _expert_target(c, layer.moe, parts[4:])
    module, kind = parts[-2], parts[-1]
    if module == "input_layernorm":
        return layer.input_norm, None, 0
    if layer.input_norm is None and module in ("post_attention_layernorm",
                                               "post_feedforward_layernorm"):  # (OLMo 2)
        return (layer.attn_out_norm if module == "post_attention_layernorm"
                else layer.mlp_out_norm), None, 0
    if layer.gemma:  # (its post-attention norm is on the attention's output)
        norms = {"post_attention_layernorm": layer.attn_out_norm,
                 "pre_feedforward_layernorm": layer.post_norm,
                 "post_feedforward_layernorm": layer.mlp_out_norm}
        if module in norms:
            return norms[module], None, 0
    if module == "post_attention_layernorm":
        return layer.post_norm, None, 0
    if module in ("q_norm", "k_norm") and layer.qk_full_norm is not None:
        nq = c.num_heads * c.head_dim
        return layer.qk_full_norm, *((0, nq) if module == "q_norm" else (
            nq, layer.qk_full_norm.shape[0] - nq))
    if module in ("q_norm", "k_norm") and layer.head_norm is not None:
        return layer.head_norm, (0 if module == "q_norm" else c.head_dim), c.head_dim
    if module in qkv:
        param = layer.qkv_proj.weight if kind == "weight" else layer.qkv_proj.bias
        return param, *qkv[module]
    if module == "qkv_proj":
        return layer.qkv_proj.weight, None, 0
    if module == "gate_up_proj":
        return layer.gate_up_proj.weight, None, 0
    if module == "o_proj":
        return layer.o_proj.weight, None, 0
    if module in gate_up:
        return layer.gate_up_proj.weight, *gate_up[module]
    if module == "down_proj":
        return layer.down_proj.weight, None, 0
    raise ValueError(f"unexpected checkpoint tensor {name!r}")


_MIXTRAL_EXPERT_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def canonical_expert_names(weights: Iterable[tuple[str, torch.Tensor]]
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Mixture-of-experts tensors under Qwen's names, which GGUFs load as too: Mixtral's
    `block_sparse_moe.gate` and `.experts.{e}.w1` (gate), `w3` (up), `w2` (down); Granite
    MoE's `block_sparse_moe.router.layer` and stacked `input_linear` ([experts, gate's rows
    then up's, hidden]) and `output_linear`, one tensor an expert. Others pass as they are."""
    for name, tensor in weights:
        prefix, moe, rest = name.partition(".block_sparse_moe.")
        if not moe:
            yield name, tensor
            continue
        parts = rest.split(".")
        if rest in ("gate.weight", "router.layer.weight"):
            yield f"{prefix}.mlp.gate.weight", tensor
        elif parts[0] == "experts" and len(parts) == 4 and parts[2] in _MIXTRAL_EXPERT_PARTS:
            yield f"{prefix}.mlp.experts.{parts[1]}.{_MIXTRAL_EXPERT_PARTS[parts[2]]}.weight", \
                tensor
        elif rest == "input_linear.weight":
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                yield f"{prefix}.mlp.experts.{e}.gate_proj.weight", gate
                yield f"{prefix}.mlp.experts.{e}.up_proj.weight", up
        elif rest == "output_linear.weight":
            for e, down in enumerate(tensor):
                yield f"{prefix}.mlp.experts.{e}.down_proj.weight", down
        else:
            raise ValueError(f"unexpected mixture-of-experts tensor {name!r}")
