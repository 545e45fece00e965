"""Serve a loaded model's linear layers from packed weights (`kernels.quant` layouts).

Two sources of packed weights:

- GGUF files: tensors stored as Q4_0, Q4_1, Q5_0, Q8_0 or Q4_K are repacked from the file's
  block bytes (`kernels.gguf_repack`), never through a float weight (exactly, but for Q4_K's
  scales and offsets, rounded to float16). llama.cpp stores Llama q/k
  rows permuted for its interleaved RoPE; packing is per row, so un-permuting the rows of
  the packed tensors (weights, scales, offsets alike) gives the same weight as the dense
  loader's. A fused projection (qkv, gate/up) is the concatenation of its parts along the
  output dimension when all parts share scheme and group size.
- Dense weights (HF checkpoints, GGUF tensors of other types): round-to-nearest quantization
  of the loaded weight to the `--quantization` scheme (int4 groups of 128, else 64 or 32;
  int8 per output channel).

Policy (`pack_from_gguf`, then `pack_model`): ``none`` packs nothing; a GGUF file is served
packed (the tensors `repack_gguf` takes as stored; other projections follow the scheme, or
without one become int8 in groups of 32: `pack_model`'s `gguf_rest`) when a scheme is given, on
CUDA when its projections would take more than `PACK_ON_CUDA_ABOVE` bytes dense, and on a
CPU where the native kernel runs (`kernels.cpu_native`: near-exact, every row independent of
the batch, and 2.1-2.6x dense float32 at batch-1 decode of the default model); dense
checkpoints are packed only when a scheme is given.
Norms stay dense; an untied LM head follows the same rules as the other linears. A tied LM
head stays the dense embedding, except in a GGUF file served packed whose embedding is
stored in a type `repack_gguf` takes: then the head multiplies by the packed tensor (the
dense embedding holds the same values, dequantized, for the lookup, and for products of
`llama.TIED_DENSE_ROWS` rows or more); on the CPU, for other packed GGUFs and for a scheme
where the native kernel runs, `pack_model` packs a tied head from the embedding as int8 in
groups of 32. On CPU this takes the default model's head from 11.2 ms to ~2 ms a
token (Q8_0, 49152x576). On CUDA the weights are held in the kernels' ``words`` layout only,
and embeddings dense. On a CPU where the native kernel runs the weights are held in its
``panels`` layout only, and a GGUF served packed holds its embedding packed too (lookups
dequantize the rows they gather, `layers.Embedding`): a tied one is its head's table (so
one stored in a type `repack_gguf` does not take is looked up at its int8 values), an
untied one is packed from the file by the head's rules (Qwen2.5-Coder-1.5B's: 0.93 GB
dense float32, 0.15 GB packed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kernels import cpu_native
from kernels.gguf_repack import repack_gguf, supported_gguf_types
from kernels.quant import SCHEMES, PackedWeight, dequantize, quantize, to_panels, to_rows, to_words
from server.models.config import ModelConfig
from server.models.layers import Linear

if TYPE_CHECKING:
    from server.models.gguf_file import GGUFTensor

# fused module -> GGUF tensor names of its parts, in concatenation order
_GGUF_PARTS = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "o_proj": ("attn_output",),
    "gate_up_proj": ("ffn_gate", "ffn_up"),
    "down_proj": ("ffn_down",),
}
_GGUF_FUSED_PARTS = _GGUF_PARTS | {"qkv_proj": ("attn_qkv",), "gate_up_proj": ("ffn_up",)}
"""Phi-3's GGUF tensors: q, k, v in one, gate and up in one (`ffn_up`)."""
_GGUF_EXPERT_PARTS = {"gate_up_proj": ("ffn_gate", "ffn_up"), "down_proj": ("ffn_down",)}
"""An expert's projections, by the GGUF names of its parts (stacked: `{name}_exps`; the
shared expert's: `{name}_shexp`)."""


def linear_modules(model: torch.nn.Module) -> Iterator[tuple[str, Linear]]:
    """(name, Linear) for every projection: `layers.{i}.{module}` (a mixture-of-experts
    layer's experts as `layers.{i}.moe.experts.{e}.{gate_up,down}_proj`, its shared one's
    as `layers.{i}.moe.shared.*`) and `lm_head`. (A router stays dense.)"""
    for i, layer in enumerate(model.layers):
        for module in _GGUF_PARTS:
            if getattr(layer, module) is not None:
                yield f"layers.{i}.{module}", getattr(layer, module)
        if layer.moe is not None:
            for name, linear in layer.moe.linears():
                yield f"layers.{i}.{name}", linear
    if model.lm_head is not None:
        yield "lm_head", model.lm_head


def permute_rows(packed: PackedWeight, order: torch.Tensor) -> PackedWeight:
    """The weight's output rows taken in `order`, a permutation or a selection (packing is
    per row), in the rows layout whatever the weight's."""
    packed = to_rows(packed)
    return PackedWeight(
        packed.scheme, len(order), packed.in_features, packed.group_size,
        packed.qweight[order].contiguous(), packed.scales[order].contiguous(),
        None if packed.offsets is None else packed.offsets[order].contiguous(),
    )


def scale_packed(packed: PackedWeight, factor: float) -> PackedWeight:
    """The weight times `factor`: its scales and offsets scaled (in their own dtype)."""
    def scaled(t: torch.Tensor) -> torch.Tensor:
        return (t.float() * factor).to(t.dtype)

    return dataclasses.replace(packed, scales=scaled(packed.scales), cache={},
                               offsets=None if packed.offsets is None else scaled(packed.offsets))


def concat_packed(parts: list[PackedWeight]) -> PackedWeight | None:
    """Stack weights along the output dimension; None when their formats differ."""
    first = parts[0]
    if any((p.scheme, p.group_size, p.in_features) != (first.scheme, first.group_size,
                                                        first.in_features) for p in parts):
        return None
    if len(parts) == 1:
        return first
    offsets = None if first.offsets is None else torch.cat([p.offsets for p in parts])
    return PackedWeight(
        first.scheme, sum(p.out_features for p in parts), first.in_features, first.group_size,
        torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), offsets,
    )


def _unpermute_order(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (see `gguf_loader.unpermute`)."""
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)


# Below this size (dense projection weights) a model decodes at batch 1 bound by kernel
# launches, not memory, and the dense 16-bit GEMV beats the packed one: the default model
# (135M) on an H200 does 1,066 tok/s dense vs 379 packed with CUDA graphs
# (docs/benchmarks/gpu.md); an 8B model is memory-bound and 1.5x faster packed int4.
PACK_ON_CUDA_ABOVE = 2 * 2**30


def gguf_packed_linears(path: Path, config: ModelConfig, rest: bool = False,
                        embed: bool = False) -> dict[str, PackedWeight]:
    """Packed weights (on CPU) for every projection whose GGUF tensors `repack_gguf` takes;
    with `rest`, if the file has any, every other projection (Q6_K, Q5_K, F16, ...) and an
    untied head as int8 in groups of 32 too (`pack_model`'s `gguf_rest`), each dequantized
    a chunk of rows at a time, and a fused projection whose parts differ in format from
    their float values. `embed`: an untied model's embedding too (as "embed"), by the same
    rules as its head."""
    from server.models.gguf_file import GGUFFile  # (gguf imports in ~0.15 s: only for GGUFs)

    tensors = {t.name: t for t in GGUFFile(path).tensors}
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    rest = rest and any(int(t.tensor_type) in supported_gguf_types()
                        for t in tensors.values() if t.name.startswith("blk."))

    def packed(name: str, requantize: bool = rest, expert: int | None = None
               ) -> PackedWeight | None:
        """The tensor's packed weight (of a stacked experts' tensor, expert `expert`'s)."""
        t = tensors.get(name)
        if t is None:
            return None
        n, k = int(t.shape[1]), int(t.shape[0])
        raw = t.data if expert is None else \
            np.asarray(t.data).reshape(int(t.shape[2]), -1)[expert]
        if int(t.tensor_type) in supported_gguf_types():
            pw = repack_gguf(raw, t.tensor_type, (n, k))
        elif requantize and k % 32 == 0:
            from server.models.gguf_loader import dequantize_raw

            pw = _int8_groups(t) if expert is None else quantize(
                torch.from_numpy(dequantize_raw(raw, t.tensor_type, (n, k))), "int8", 32)
        else:
            return None
        kind = name.split(".")[-2]
        if config.gguf_permuted_qk and kind in heads:
            pw = permute_rows(pw, _unpermute_order(pw.out_features, heads[kind]))
        if kind in ("attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp") \
                and config.residual_multiplier != 1.0:
            pw = scale_packed(pw, config.residual_multiplier)  # (as `load_weights` does)
        return pw

    def fuse(into: str, parts: list[PackedWeight | None]) -> None:
        if all(p is not None for p in parts):
            fused = concat_packed(parts)
            if fused is None and rest:
                fused = quantize(torch.cat([dequantize(p) for p in parts]), "int8", 32)
            if fused is not None:
                result[into] = fused

    result: dict[str, PackedWeight] = {}
    parts_of = _GGUF_FUSED_PARTS if config.architecture == "phi3" else _GGUF_PARTS
    for i in range(config.num_layers):
        for module, names in parts_of.items():
            fuse(f"layers.{i}.{module}", [packed(f"blk.{i}.{n}.weight") for n in names])
        if config.moe_layer(i):
            for e in range(config.num_experts):
                for module, names in _GGUF_EXPERT_PARTS.items():
                    fuse(f"layers.{i}.moe.experts.{e}.{module}",
                         [packed(f"blk.{i}.{n}_exps.weight", expert=e) for n in names])
            if config.shared_expert_intermediate_size:
                for module, names in _GGUF_EXPERT_PARTS.items():
                    fuse(f"layers.{i}.moe.shared.{module}",
                         [packed(f"blk.{i}.{n}_shexp.weight") for n in names])
    # a tied LM head is the embedding's tensor (llama.cpp multiplies by it as stored too;
    # requantized, it would differ from the dense embedding that serves large products)
    tied = config.tie_word_embeddings
    head = packed("token_embd.weight" if tied else "output.weight", rest and not tied)
    if head is not None:
        result["lm_head"] = head
    table = packed("token_embd.weight") if embed and not tied else None
    if table is not None:
        result["embed"] = table
    return result


_REQUANT_CHUNK = 1 << 22  # elements of a GGUF tensor dequantized at a time by `_int8_groups`


def _int8_groups(tensor: GGUFTensor) -> PackedWeight:
    """int8 in groups of 32 of a GGUF tensor, dequantized and quantized a chunk of rows at a
    time (no float32 copy of the whole: Qwen2.5-Coder-1.5B's Q6_K head is 0.9 GB of it)."""
    from server.models.gguf_loader import tensor_rows

    n, k = int(tensor.shape[1]), int(tensor.shape[0])
    rows = max(1, _REQUANT_CHUNK // k)
    parts = [quantize(tensor_rows(tensor, r, r + rows), "int8", 32) for r in range(0, n, rows)]
    return concat_packed(parts)


def quantize_dense(weight: torch.Tensor, scheme: str) -> PackedWeight | None:
    """Round-to-nearest packing of a dense [N, K] weight; None when no int4 group divides K."""
    if scheme == "int8":
        return quantize(weight, "int8")
    group = next((g for g in (128, 64, 32) if weight.shape[1] % g == 0), None)
    return None if group is None else quantize(weight, "int4", group)


def pack_from_gguf(model: torch.nn.Module, scheme: str | None, checkpoint_path: Path,
                   device: torch.device, keep_dense: frozenset[str] = frozenset()) -> int:
    """Serve the linears whose GGUF tensors `repack_gguf` takes from those tensors,
    repacked, where the module policy says so; returns how many (those in `keep_dense`,
    linears a LoRA delta will change, counted but left dense). It runs before the weights
    load, so that those linears' tensors are never dequantized (`load_weights` skips
    `packed_weight_names`): for the default model that saves ~1 s of a ~2 s start, and a
    float32 copy of every projection from memory."""
    _check_scheme(scheme)
    if scheme == "none" or checkpoint_path.suffix != ".gguf" or not checkpoint_path.is_file():
        return 0
    dense_bytes = sum(lin.weight.nbytes for _, lin in linear_modules(model)
                      if lin.weight is not None)
    if not (scheme is not None or device.type == "cuda" and dense_bytes > PACK_ON_CUDA_ABOVE
            or device.type == "cpu" and cpu_native.available()):
        return 0
    # on a CPU where the native kernel runs the embedding is held packed too: an untied
    # one as the file gives it, a tied one as its head (`pack_model` points it there)
    packed_table = device.type == "cpu" and cpu_native.available()
    from_file = gguf_packed_linears(checkpoint_path, model.config, rest=scheme is None,
                                    embed=packed_table)
    if model.lm_head is None and "lm_head" in from_file:  # tied: a head of its own
        model.lm_head = Linear(torch.empty(0, model.config.hidden_size))
        if packed_table:
            model.embed.set_packed(from_file["lm_head"])
    if "embed" in from_file:
        model.embed.set_packed(from_file["embed"])
    count = 0
    for name, linear in linear_modules(model):
        if name in from_file:
            if name not in keep_dense:
                _install(linear, from_file[name], device)
            count += 1
    return count


def pack_model(model: torch.nn.Module, scheme: str | None, device: torch.device,
               gguf_rest: bool = False) -> int:
    """After the weights have loaded: quantize the linears not yet packed (`pack_from_gguf`)
    to `scheme`, if one is given; returns how many linears are packed in all.

    `gguf_rest`: the model is a GGUF whose projections `pack_from_gguf` served packed,
    without a scheme those of other types (Q6_K, Q5_K, F16, ...) as int8 in groups of 32,
    as llama.cpp's Q8_0: each weight within half of 1/127 of its group's largest (from
    Q6_K, about an eighth of the step of the group's coarser sub-block), so that no
    projection of a packed GGUF runs dense (on the CPU, Qwen2.5-Coder-0.5B's Q4_K_M file
    decoded 37.0 tok/s against 25.0 with its 12 Q6_K projections dense, the same 64 greedy
    tokens). Any linear still dense, and on the CPU a tied head the file did not give (from
    the embedding), are quantized the same way here."""
    _check_scheme(scheme)
    rest = gguf_rest and scheme is None
    if model.lm_head is None and device.type == "cpu" and (
            rest or scheme in SCHEMES and cpu_native.available()):
        # tied: a head of its own from the embedding, int8 in groups of 32 whatever the
        # scheme (llama.cpp's Q8_0), which the native kernel serves at every row count and
        # the embedding then looks its rows up in (on CUDA the dense embedding serves large
        # products, so the two would round differently). A Gemma 3 270M shape's 262,144 x
        # 640 head took 26.7 ms a token dense float32, the whole step 34.
        model.lm_head = Linear(model.embed.weight.detach())
        _install(model.lm_head, quantize(model.lm_head.weight.float(), "int8", 32), device)
    count = 0
    for _, linear in linear_modules(model):
        if linear.packed is None and scheme not in (None, "none"):
            pw = quantize_dense(linear.weight, scheme)
            if pw is not None:
                _install(linear, pw, device)
        elif linear.packed is None and rest and linear.weight.shape[1] % 32 == 0:
            _install(linear, quantize(linear.weight.float(), "int8", 32), device)
        if linear.packed is None:
            continue
        count += 1
        if device.type == "cpu" and cpu_native.supports(linear.packed):
            # held in the native kernel's panels only (not twice), built now, not in the
            # first request (0.56 s against 0.05 for the default model's first prefill)
            linear.set_packed(to_panels(linear.packed))
            cpu_native.panel_arguments(linear.packed)
    head = model.lm_head.packed if model.lm_head is not None else None
    if model.config.tie_word_embeddings and head is not None and head.layout == "panels":
        model.embed.set_packed(head)  # one table: lookups gather rows of the head's panels
    return count


def _check_scheme(scheme: str | None) -> None:
    if scheme not in (None, "none", *SCHEMES):
        raise ValueError(f"quantization must be one of {SCHEMES}, none or None, got {scheme!r}")


def _install(linear: Linear, packed: PackedWeight, device: torch.device) -> None:
    linear.set_packed((to_words(packed) if device.type == "cuda" else packed).to(device))
