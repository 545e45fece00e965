"""LoRA adapters merged into the model's weights at load (llama.cpp's `--lora` and
`--lora-scaled`): W += scale * s * B @ A for each adapted projection, s = alpha / r (rsLoRA:
alpha / sqrt(r)), then the model serves as usual (graphs, packed weights, speculation; no
cost a token). An adapted projection of a GGUF loads dense, takes its deltas and is packed
after (as int8 in groups of 32 where its file's tensors would have been served packed, or
to `--quantization`'s scheme).

Adapters are PEFT directories (`adapter_config.json` + `adapter_model.safetensors`, as
`peft`'s `save_pretrained` writes them) of LoRA on the attention's and the MLP's
projections (q, k, v, o, gate, up, down); adapters of embeddings, of other modules,
DoRA and per-module alphas are refused at load, naming what they hold.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

_TARGETS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
            "qkv_proj": "qkv_proj", "o_proj": "o_proj", "gate_proj": "gate_up_proj",
            "up_proj": "gate_up_proj", "gate_up_proj": "gate_up_proj", "down_proj": "down_proj"}
"""The projections an adapter may adapt, by the model's linear that holds each (fused)."""
_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))"
                  r"\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's factors by the HF name of the weight each adapts."""

    path: Path
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    """HF weight name (`model.layers.3.self_attn.q_proj.weight`) -> (A [r, in], B [out, r],
    the factor its product is scaled by: the user's scale times alpha / r)."""

    def linear_names(self) -> frozenset[str]:
        """The model's linears these deltas change (`layers.{i}.{module}`, as
        `server.models.quantize.linear_modules` names them)."""
        return frozenset(f"layers.{name.split('.')[2]}.{_TARGETS[name.split('.')[-2]]}"
                         for name in self.deltas)


def read_adapter(path: str | Path, scale: float = 1.0) -> LoraAdapter:
    """Read a PEFT LoRA directory; `scale` multiplies its alpha / r (llama.cpp's
    `--lora-scaled`). Raises FileNotFoundError or ValueError naming what is wrong."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"LoRA adapter {path}: no {f.name} (expected a PEFT "
                                    "adapter directory)")
    config = json.loads(config_file.read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"LoRA adapter {path}: peft_type {config['peft_type']!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"LoRA adapter {path}: DoRA adapters are not supported")
    if config.get("alpha_pattern"):
        raise ValueError(f"LoRA adapter {path}: per-module alphas (alpha_pattern) are not "
                         "supported")
    if config.get("modules_to_save"):
        raise ValueError(f"LoRA adapter {path}: it saves whole modules "
                         f"({config['modules_to_save']}), which are not supported")
    alpha = float(config.get("lora_alpha", 8))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in _TARGETS:
            raise ValueError(f"LoRA adapter {path}: tensor {key!r} adapts no projection of "
                             "the attention or the MLP (q, k, v, o, gate, up, down)")
        factors.setdefault(m.group(1) + ".weight", {})[m.group(4)] = tensor.float()
    deltas = {}
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path}: {name} has lora_{next(iter(pair))} alone")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA adapter {path}: {name}'s factors {tuple(a.shape)} and "
                             f"{tuple(b.shape)} are not [r, in] and [out, r]")
        rank = a.shape[0]
        deltas[name] = (a, b, scale * alpha / (math.sqrt(rank) if config.get("use_rslora")
                                               else rank))
    if not deltas:
        raise ValueError(f"LoRA adapter {path}: it holds no LoRA factors")
    return LoraAdapter(path, deltas)
