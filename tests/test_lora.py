"""LoRA adapters merged at load (`--lora`, `--lora-scaled`; PEFT directories and llama.cpp's
GGUF adapters): against transformers with the same deltas merged by hand, on HF weights and
on GGUFs (packed or not), and the errors of adapters that cannot be merged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from server.api.cli_args import add_arguments, configs_from_args
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from server.models.lora import read_adapter
from tests.test_model_vs_hf import check_against_hf

TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "mlp": ("gate_proj", "up_proj", "down_proj")}


def save_adapter(hf: torch.nn.Module, directory: Path, rank: int = 4, alpha: float = 16.0,
                 layers: tuple[int, ...] = (0, 2), rslora: bool = False, seed: int = 0,
                 scale: float = 1.0, **config: object) -> Path:
    """Write a random PEFT LoRA adapter of every projection of `layers` of `hf`, and merge
    its deltas (times `scale`) into `hf`'s weights, as the reference."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    factor = scale * alpha / (math.sqrt(rank) if rslora else rank)
    with torch.no_grad():
        for i in layers:
            for block, names in TARGETS.items():
                for name in names:
                    linear = getattr(getattr(hf.model.layers[i], block), name)
                    out, inp = linear.weight.shape
                    a = torch.randn(rank, inp, generator=gen) * 0.2
                    b = torch.randn(out, rank, generator=gen) * 0.2
                    key = f"base_model.model.model.layers.{i}.{block}.{name}"
                    tensors[f"{key}.lora_A.weight"] = a
                    tensors[f"{key}.lora_B.weight"] = b
                    linear.weight += factor * (b @ a)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": [n for names in TARGETS.values() for n in names], **config}))
    return directory


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 6, 20, 70)]


@pytest.mark.parametrize(("arch", "rslora", "scale"), [
    ("llama", False, 1.0), ("qwen2", True, 0.5), ("granite", False, 2.0)])
def test_a_merged_adapter_matches_transformers_merged_by_hand(arch, rslora, scale,
                                                              tiny_model_dir, tmp_path) -> None:
    """Every projection of two layers adapted (q, k, v into the fused qkv, gate and up into
    gate_up), alpha / r or rsLoRA's alpha / sqrt(r), times the --lora-scaled scale;
    Granite's residual scale applies to the o and down deltas as to their weights."""
    path = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    adapter = save_adapter(hf, tmp_path / "adapter", rslora=rslora, scale=scale)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4,
              lora=((str(adapter), scale),))
    check_against_hf(llm, hf.eval(), _prompts(1), 24)
    base = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = [o.token_ids for o in llm.generate(_prompts(1), params)]
    assert outputs != [o.token_ids for o in base.generate(_prompts(1), params)]


def test_an_adapter_on_a_packed_gguf(tiny_model_dir, tmp_path) -> None:
    """The adapted projections of a GGUF served packed load dense, take their deltas and are
    packed after (int8 in groups of 32, as the file's other types: each weight within half
    of 1/127 of its group's largest of the merged value); the others stay as the file packs
    them. The dequantized GGUF with the same adapter matches transformers merged by hand."""
    from kernels.quant import dequantize
    from tests.tiny_models import save_tiny_gguf

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    gguf = save_tiny_gguf(hf, tmp_path / "tiny.gguf")  # (hf now holds the file's values)
    adapter = str(save_adapter(hf, tmp_path / "adapter", layers=(1,)))
    dense = LLM(str(gguf), dtype="float32", num_kv_blocks=64, block_size=4,
                quantization="none", lora=((adapter, 1.0),))
    check_against_hf(dense, hf.eval(), _prompts(2), 16)
    packed = LLM(str(gguf), dtype="float32", num_kv_blocks=64, block_size=4,
                 lora=((adapter, 1.0),))
    for i, (ours, ref) in enumerate(zip(packed.engine.model.layers, dense.engine.model.layers,
                                        strict=True)):
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            pw, weight = getattr(ours, name).packed, getattr(ref, name).weight
            error = (dequantize(pw).float() - weight).abs().max().item()
            if i == 1:  # (adapted: rounded again)
                assert (pw.scheme, pw.group_size) == ("int8", 32)
                step = weight.abs().reshape(weight.shape[0], -1, 32).amax(-1) / 127
                assert error <= step.max().item() / 2 + 1e-6
            else:  # (the file's Q8_0 blocks as they are)
                assert error < 1e-6
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in packed.generate(_prompts(2), params)] != [
        o.token_ids for o in LLM(str(gguf), dtype="float32", num_kv_blocks=64,
                                 block_size=4).generate(_prompts(2), params)]


def save_gguf_adapter(peft: Path, path: Path, heads: dict[str, int] | None = None,
                      alpha: float = 16.0) -> Path:
    """A PEFT adapter as llama.cpp's `convert_lora_to_gguf.py` writes it: `blk.N.attn_q.weight
    .lora_a`, ...; with `heads` (a Llama's q and k head counts) the B rows of q and k
    permuted as the converter permutes the base model's."""
    import gguf

    from tests.tiny_models import _GGUF_LAYER_NAMES

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for key, tensor in load_file(peft / "adapter_model.safetensors").items():
        parts = key.split(".")  # base_model.model.model.layers.{i}.{block}.{name}.lora_X.weight
        target = f"blk.{parts[4]}.{_GGUF_LAYER_NAMES['.'.join(parts[5:7])]}"
        values = tensor.numpy()
        kind = target.rsplit(".", 1)[-1]
        if parts[7] == "lora_B" and heads and kind in heads:
            n = heads[kind]
            values = values.reshape(n, 2, values.shape[0] // n // 2, -1).swapaxes(1, 2) \
                .reshape(values.shape)
        writer.add_tensor(f"{target}.weight.lora_{parts[7][-1].lower()}", values.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_adapter_on_a_gguf_matches_transformers(tiny_model_dir, tmp_path) -> None:
    """llama.cpp's GGUF adapter (its q and k B rows permuted as the base GGUF's q and k) on
    the GGUF it was converted for: transformers' tokens and top-5 with the PEFT adapter's
    deltas merged by hand; the same merge as from the PEFT directory."""
    from tests.tiny_models import save_tiny_gguf

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    base = save_tiny_gguf(hf, tmp_path / "tiny.gguf")
    peft = save_adapter(hf, tmp_path / "adapter", layers=(0, 1))
    adapter = save_gguf_adapter(peft, tmp_path / "adapter.gguf",
                                {"attn_q": 4, "attn_k": 2})
    llm = LLM(str(base), dtype="float32", num_kv_blocks=64, block_size=4,
              quantization="none", lora=((str(adapter), 1.0),))
    check_against_hf(llm, hf.eval(), _prompts(3), 16)
    config = llm.engine.model_config
    for name, (a, b, factor) in read_adapter(adapter, 1.0, config).deltas.items():
        ref = read_adapter(peft).deltas[name]
        assert torch.equal(a, ref[0]) and torch.equal(b, ref[1]) and factor == ref[2]
    with pytest.raises(ValueError, match="not a GGUF LoRA adapter"):
        read_adapter(base, 1.0, config)


def test_adapters_that_cannot_be_merged_are_refused(tiny_model_dir, tmp_path) -> None:
    path = tiny_model_dir("llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_adapter(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_adapter(tmp_path / "nothing.gguf")
    dora = save_adapter(hf, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        read_adapter(dora)
    # trained on another model: a layer it lacks, or other widths
    deep = save_adapter(hf, tmp_path / "deep", layers=(0,))
    weights = deep / "adapter_model.safetensors"
    save_file({k.replace(".layers.0.", ".layers.7."): v for k, v in load_file(weights).items()},
              str(weights))
    with pytest.raises(ValueError, match="names layer 7 of a model of 3"):
        LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, lora=((str(deep), 1.0),))
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3"), dtype=torch.float32)
    wide = save_adapter(other, tmp_path / "wide")
    with pytest.raises(ValueError, match="delta is"):
        LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=4, lora=((str(wide), 1.0),))
    embeds = tmp_path / "embeds"
    save_adapter(hf, embeds)
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)},
              str(embeds / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapts no projection"):
        read_adapter(embeds)


def test_lora_flags(tmp_path, monkeypatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--lora", "/a", "--lora-scaled", "/b", "0.5", "--lora", "/c"])
    assert configs_from_args(args)[0].lora == (("/a", 1.0), ("/c", 1.0), ("/b", 0.5))
    monkeypatch.setenv("LEAPFROG_LORA", "/x,/y")
    monkeypatch.setenv("LEAPFROG_LORA_SCALED", "/z=2")
    assert configs_from_args(parser.parse_args([]))[0].lora == (
        ("/x", 1.0), ("/y", 1.0), ("/z", 2.0))
    with pytest.raises(SystemExit, match="not a number"):
        configs_from_args(parser.parse_args(["--lora-scaled", "/b", "half"]))
