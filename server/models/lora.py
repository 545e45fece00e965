"""LoRA adapters merged into the model's weights at load (llama.cpp's `--lora` and
`--lora-scaled`): W += scale * s * B @ A for each adapted projection, s = alpha / r (rsLoRA:
alpha / sqrt(r)), then the model serves as usual (graphs, packed weights, speculation; no
cost a token). An adapted projection of a GGUF loads dense, takes its deltas and is packed
after (as int8 in groups of 32 where its file's tensors would have been served packed, or
to `--quantization`'s scheme).

Adapters are PEFT directories (`adapter_config.json` + `adapter_model.safetensors`, as
`peft`'s `save_pretrained` writes them) or llama.cpp's GGUF adapters (`convert_lora_to_gguf.py`'s:
`general.type` adapter, `adapter.lora.alpha`, `blk.N.attn_q.weight.lora_a` and `.lora_b`,
q's and k's B rows permuted as the base model's weights are), of LoRA on the attention's and
the MLP's projections (q, k, v, o, gate, up, down); adapters of embeddings, of other
modules, DoRA and per-module alphas are refused at load, naming what they hold.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.models.config import ModelConfig

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


def read_adapter(path: str | Path, scale: float = 1.0, model: ModelConfig | None = None
                 ) -> LoraAdapter:
    """Read a PEFT LoRA directory or a GGUF adapter (whose q and k rows are undone as the
    `model`'s are); `scale` multiplies its alpha / r (llama.cpp's `--lora-scaled`). Raises
    FileNotFoundError or ValueError naming what is wrong."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"LoRA adapter {path}: no such file")
        return _read_gguf_adapter(path, scale, model)
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
    return LoraAdapter(path, _deltas(path, factors, alpha, scale, bool(config.get("use_rslora"))))


def _read_gguf_adapter(path: Path, scale: float, model: ModelConfig | None) -> LoraAdapter:
    from server.models.gguf_loader import hf_name, open_gguf, tensor_array, unpermute

    reader = open_gguf(path)
    if reader.get("general.type") != "adapter" or reader.get("adapter.type") != "lora":
        raise ValueError(f"LoRA adapter {path}: not a GGUF LoRA adapter (general.type "
                         f"{reader.get('general.type')!r}, adapter.type "
                         f"{reader.get('adapter.type')!r})")
    heads = {"q_proj": model.num_heads, "k_proj": model.num_kv_heads} \
        if model is not None and model.gguf_permuted_qk else {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".lora_")
        name = hf_name(base, model.architecture if model is not None else "llama")
        if kind not in ("a", "b") or name is None or name.split(".")[-2] not in _TARGETS:
            raise ValueError(f"LoRA adapter {path}: tensor {t.name!r} adapts no projection "
                             "of the attention or the MLP (q, k, v, o, gate, up, down)")
        arr = tensor_array(t)
        module = name.split(".")[-2]
        if kind == "b" and module in heads:  # (its rows as the base model's are stored)
            arr = unpermute(arr, heads[module])
        factors.setdefault(name, {})[kind.upper()] = torch.from_numpy(arr)
    alpha = reader.get("adapter.lora.alpha")
    return LoraAdapter(path, _deltas(path, factors, None if alpha is None else float(alpha),
                                     scale, False))


def _deltas(path: Path, factors: dict[str, dict[str, torch.Tensor]], alpha: float | None,
            scale: float, rslora: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The (A, B, factor) of each adapted weight from its two factors; alpha None: the
    rank (a factor of 1, as llama.cpp takes an adapter without one)."""
    deltas = {}
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path}: {name} has lora_{next(iter(pair))} alone")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA adapter {path}: {name}'s factors {tuple(a.shape)} and "
                             f"{tuple(b.shape)} are not [r, in] and [out, r]")
        rank = a.shape[0]
        deltas[name] = (a, b, scale * (alpha or rank) / (math.sqrt(rank) if rslora else rank))
    if not deltas:
        raise ValueError(f"LoRA adapter {path}: it holds no LoRA factors")
    return deltas
