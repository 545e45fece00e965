"""Tiny random Llama-family checkpoints built from a transformers config, saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
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
    raise ValueError(arch)


def tiny_tokenizer(vocab: int = VOCAB, prefix: str = "w") -> PreTrainedTokenizerFast:
    """Word-level: token i is `{prefix}{i}` (ids 0-2 are also unk, bos and eos: w0-w2)."""
    words = {f"{prefix}{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")


def save_tiny_model(arch: str, directory: Path, seed: int = 0, vocab: int = VOCAB,
                    **overrides: object) -> Path:
    """Write a random model (safetensors + config + tokenizer) and return the directory;
    `overrides` as `tiny_config`'s."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger weights make the random model's distributions peaked
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer(vocab).save_pretrained(directory)
    return directory
