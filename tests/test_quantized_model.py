"""Packed serving on CPU: RTN int8/int4 of a dense checkpoint, GGUF repacking of the default model.

Two measures on random tiny models (weights N(0, 0.2): large logits that amplify any error
through the layers), relative Frobenius error of the logits, thresholds ~2x the measured:
- kernel/layout: packed model vs the dense model carrying the dequantized weights; only the
  CPU kernels' rounding of activations differs: the native kernel's int16 blocks (measured
  1.1-1.5e-4) -> < 1e-3, torch's bfloat16 (1.7-2.1e-2) -> < 4e-2 where the native kernel
  cannot run. A wrong row order, nibble order or scale would be O(1).
- quantization error: packed vs the original dense model (measured int8 0.04-0.05, int4 ~0.5
  on these chaotic models) -> int8 < 0.1 with >= 90% argmax agreement, int4 < 1.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels import cpu_native
from kernels.gemm import takes_every_row_count
from kernels.quant import dequantize, to_rows
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from server.models.batch import BatchMeta
from server.models.quantize import linear_modules

LAYOUT_TOL = 1e-3 if cpu_native.available() else 4e-2
QUANT_TOL = {"int8": 0.1, "int4": 1.0}


def _prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] logits of one prefill through the engine's model (its free KV blocks)."""
    model, bs = llm.engine.model, llm.engine.blocks.block_size
    t = len(ids)
    nb = -(-t // bs)
    meta = BatchMeta(torch.arange(t), torch.arange(nb, dtype=torch.int32)[None],
                     torch.tensor([t], dtype=torch.int32), torch.tensor([0, t], dtype=torch.int32))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(t), meta))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_rtn_quantized_tiny_models(tiny_model_dir) -> None:
    ids = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    for arch in ("llama", "qwen2"):  # untied LM head (packed too); q/k/v bias
        path = str(tiny_model_dir(arch))
        dense_llm = LLM(path, dtype="float32", num_kv_blocks=16, block_size=4)
        dense = _prefill_logits(dense_llm, ids)
        for scheme, tol in QUANT_TOL.items():
            llm = LLM(path, dtype="float32", num_kv_blocks=16, block_size=4, quantization=scheme)
            model = llm.engine.model
            tied_head = model.lm_head if arch == "qwen2" else None
            if tied_head is not None:  # (where the native kernel runs: int8 groups)
                assert (tied_head.packed.scheme, tied_head.packed.group_size) == ("int8", 32)
            pairs = list(zip(linear_modules(dense_llm.engine.model),
                             [m for m in linear_modules(model) if m[1] is not tied_head],
                             strict=True))
            assert len(pairs) == 3 * 4 + (arch == "llama")
            assert all(q.packed is not None and q.packed.scheme == scheme for _, (_, q) in pairs)
            logits = _prefill_logits(llm, ids)
            quant_err = _rel(logits, dense)
            assert 0 < quant_err < tol, (arch, scheme, quant_err)
            if scheme == "int8":
                assert (logits.argmax(-1) == dense.argmax(-1)).float().mean() >= 0.9
            ref_llm = LLM(path, dtype="float32", num_kv_blocks=16, block_size=4)
            for (_, dense_lin), (_, (_, q)) in zip(linear_modules(ref_llm.engine.model), pairs,
                                                  strict=True):
                dense_lin.weight.data.copy_(dequantize(q.packed))
            if tied_head is not None:  # its lookups and its head: the head's values
                ref_llm.engine.model.embed.weight.data.copy_(dequantize(tied_head.packed))
            assert _rel(logits, _prefill_logits(ref_llm, ids)) < LAYOUT_TOL, (arch, scheme)


def test_default_gguf_served_packed_from_file_bytes() -> None:
    """Q4_1 tensors repacked exactly (q/k rows un-permuted, q/k/v fused); sensible greedy text."""
    from gguf import GGUFReader

    from server.models.gguf_loader import tensor_array, unpermute
    from server.models.loader import default_model_path

    llm = LLM(dtype="float32", quantization="int4", kv_cache_memory_gb=0.1)
    model = llm.engine.model
    packed = [getattr(layer, m).packed for layer in model.layers
              for m in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
    assert all(p is not None and p.scheme == "int4" and p.group_size == 32 for p in packed)
    c = model.config
    tensors = {t.name: t for t in GGUFReader(str(default_model_path())).tensors}
    parts = [unpermute(tensor_array(tensors["blk.0.attn_q.weight"]), c.num_heads),
             unpermute(tensor_array(tensors["blk.0.attn_k.weight"]), c.num_kv_heads),
             tensor_array(tensors["blk.0.attn_v.weight"])]
    expect = torch.from_numpy(np.concatenate(parts))
    torch.testing.assert_close(dequantize(model.layers[0].qkv_proj.packed), expect,
                               atol=1e-6, rtol=1e-6)
    # the tied LM head multiplies by the embedding as stored (Q8_0), the lookup's values;
    # where the native kernel runs the lookup gathers rows of the head's panels (one table)
    assert c.tie_word_embeddings
    head = model.lm_head.packed
    assert head is not None and head.scheme == "int8" and head.group_size == 32
    embed = torch.from_numpy(tensor_array(tensors["token_embd.weight"]))
    assert torch.equal(dequantize(head), embed)
    assert (model.embed.packed is head) == takes_every_row_count(head)
    ids = torch.tensor([[0, 49151, 7], [7, 300, 1]])
    assert torch.equal(model.embed(ids), embed[ids]) and torch.equal(model.embed.dense(), embed)
    hidden = torch.randn(3, c.hidden_size)
    dense_logits = hidden @ embed.t()
    assert _rel(model.compute_logits(hidden), dense_logits) < 1e-2  # bfloat16 activations
    from server.models.llama import TIED_DENSE_ROWS

    hidden = torch.randn(TIED_DENSE_ROWS, c.hidden_size)
    logits, dense_logits = model.compute_logits(hidden), hidden @ embed.t()
    if takes_every_row_count(head):  # the native kernel at every row count, rows independent
        assert _rel(logits, dense_logits) < 1e-4
        assert torch.equal(model.compute_logits(hidden[:3]), logits[:3])
    else:  # from TIED_DENSE_ROWS rows the dense embedding serves (float32: the same logits)
        torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-4)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    text = llm.generate(["What is the capital of France?"], params, chat=True)[0].text
    assert "Paris" in text, text


def test_gguf_tensors_served_packed_are_never_dequantized(monkeypatch) -> None:
    """A GGUF's Q4/Q8 projections are packed before the other weights load, so only the
    norms are dequantized, and the embedding where the native CPU kernel does not run (it
    is the packed head's table otherwise): no float32 copy of a projection is made."""
    from server.models import gguf_loader

    read: list[str] = []
    real = gguf_loader.tensor_array
    monkeypatch.setattr(gguf_loader, "tensor_array", lambda t: read.append(t.name) or real(t))
    model = LLM(dtype="float32", quantization="int4", kv_cache_memory_gb=0.05).engine.model
    assert all(lin.packed is not None and lin.weight is None for _, lin in linear_modules(model))
    assert ("token_embd.weight" in read) != cpu_native.available() and "output_norm.weight" in read
    assert (model.embed.weight is None) == cpu_native.available()
    assert all(n == "token_embd.weight" or n.endswith("_norm.weight") for n in read), read


def test_packed_gguf_serves_its_other_projections_as_int8_groups(tiny_model_dir) -> None:
    """`pack_model(..., gguf_rest=True)` without a scheme (a GGUF some of whose projections
    were packed from the file): the others become int8 in groups of 32, each weight within
    half a step (its group's largest / 127) of the dense one; on the CPU a tied head gets a
    packed copy of the embedding; what was packed already stays as it was."""
    from kernels.quant import quantize
    from server.models.quantize import pack_model

    llm = LLM(str(tiny_model_dir("qwen2")), dtype="float32", quantization="none",
              num_kv_blocks=8)
    model = llm.engine.model
    assert model.config.tie_word_embeddings and model.lm_head is None
    dense = {name: lin.weight.clone() for name, lin in linear_modules(model)}
    dense["lm_head"] = model.embed.weight.detach().clone()
    ids = torch.randint(3, 128, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    before = _prefill_logits(llm, ids)
    kept = quantize(model.layers[0].o_proj.weight, "int8")  # per channel
    model.layers[0].o_proj.set_packed(kept)
    assert pack_model(model, None, torch.device("cpu"), gguf_rest=True) == 3 * 4 + 1
    # (where the native kernel runs, every weight is held in its panels layout only)
    assert torch.equal(dequantize(model.layers[0].o_proj.packed), dequantize(kept))
    for name, lin in linear_modules(model):
        assert lin.packed.layout == ("panels" if cpu_native.available() else "rows"), name
        if name == "layers.0.o_proj":
            continue
        packed = to_rows(lin.packed)
        assert (packed.scheme, packed.group_size) == ("int8", 32), name
        step = packed.scales.float().repeat_interleave(32, 1)
        assert ((dequantize(packed) - dense[name]).abs() <= step / 2 + 1e-6).all(), name
    after = _prefill_logits(llm, ids)
    assert 0 < _rel(after, before) < QUANT_TOL["int8"]


def test_quantization_none_keeps_every_weight_dense(tiny_model_dir) -> None:
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", quantization="none",
              num_kv_blocks=8)
    assert all(lin.packed is None and lin.weight is not None
               for _, lin in linear_modules(llm.engine.model))


def test_permute_rows_takes_a_permutation_or_a_selection() -> None:
    """A draft head's vocabulary selects rows of a packed LM head (`target_head_rows`),
    which the model may hold in any layout (CUDA's words, the CPU kernel's panels)."""
    from kernels.quant import quantize_int4, quantize_int8, to_panels, to_words
    from server.models.quantize import permute_rows

    w = torch.randn(21, 64)  # 21: the last panel of 16 padded
    for packed in (quantize_int4(w, 32), quantize_int8(w, 32), quantize_int8(w)):
        for layout in (packed, to_words(packed), to_panels(packed)):
            for order in (torch.randperm(21), torch.tensor([20, 7, 0, 3])):
                rows = permute_rows(layout, order)
                assert rows.out_features == len(order) and rows.layout == "rows"
                assert torch.equal(dequantize(rows), dequantize(packed)[order])


def _write_gguf(path, tensors: dict) -> None:
    """A GGUF of raw tensors: name -> (float32 [N, K] values, ggml type), or (block bytes
    [N, bytes a row], K-quant type) for types gguf-py cannot quantize to."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "qwen2")
    for name, (data, kind) in tensors.items():
        kind = gguf.GGMLQuantizationType(kind)
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=kind)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _q6_k_bytes(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // 256 * 210), dtype=np.uint8)
    d = rng.uniform(1e-4, 1e-3, (n, k // 256, 1)).astype(np.float16).view(np.uint8)
    raw.reshape(n, k // 256, 210)[:, :, 208:] = d
    return raw


def test_packed_gguf_takes_its_other_projections_from_the_file_as_int8_groups(tmp_path,
                                                                                monkeypatch):
    """`gguf_packed_linears(..., rest=True)`: projections of types `repack_gguf` does not take
    (Q6_K, F16) and an untied head become int8 in groups of 32, dequantized from the file a
    chunk of rows at a time, each weight within half a step of its float value; a fused
    projection whose parts differ (Q4_0 q/k, Q6_K v) is quantized from their float values.
    Without `rest`, or in a file with no projection `repack_gguf` takes, they stay unpacked."""
    from server.models import gguf_loader
    from server.models import quantize as quantize_module
    from server.models.config import ModelConfig
    from server.models.gguf_file import GGUFFile
    from server.models.quantize import gguf_packed_linears

    Q4_0, Q6_K, F16 = 2, 14, 1
    h, inter, kv = 256, 512, 64
    rng = np.random.default_rng(0)

    def rand(n, k):
        return (rng.standard_normal((n, k)) * 0.05).astype(np.float32)

    tensors = {
        "blk.0.attn_q.weight": (rand(h, h), Q4_0), "blk.0.attn_k.weight": (rand(kv, h), Q4_0),
        "blk.0.attn_v.weight": (_q6_k_bytes(kv, h, 1), Q6_K),
        "blk.0.attn_output.weight": (_q6_k_bytes(h, h, 2), Q6_K),
        "blk.0.ffn_gate.weight": (rand(inter, h), Q4_0), "blk.0.ffn_up.weight": (rand(inter, h), Q4_0),
        "blk.0.ffn_down.weight": (rand(h, inter), F16),
        "output.weight": (_q6_k_bytes(300, h, 3), Q6_K),
        "token_embd.weight": (rand(300, h), Q4_0),
    }
    path = tmp_path / "mixed.gguf"
    _write_gguf(path, tensors)
    config = ModelConfig("qwen2", 300, h, inter, 1, 4, 1, 64)
    floats = {t.name: torch.from_numpy(gguf_loader.tensor_array(t)) for t in GGUFFile(path).tensors}

    def within_half_step(packed, w):
        assert (packed.scheme, packed.group_size) == ("int8", 32)
        step = packed.scales.float().repeat_interleave(32, 1)
        return ((dequantize(packed) - w).abs() <= step / 2 + 1e-7).all()

    exact = gguf_packed_linears(path, config)
    assert set(exact) == {"layers.0.gate_up_proj"}
    monkeypatch.setattr(quantize_module, "_REQUANT_CHUNK", 100 * h)  # the head in 3 chunks
    packed = gguf_packed_linears(path, config, rest=True)
    assert set(packed) == {"layers.0.qkv_proj", "layers.0.o_proj", "layers.0.gate_up_proj",
                           "layers.0.down_proj", "lm_head"}
    assert torch.equal(dequantize(packed["layers.0.gate_up_proj"]),
                       dequantize(exact["layers.0.gate_up_proj"]))
    qkv = torch.cat([floats[f"blk.0.attn_{p}.weight"] for p in "qkv"])
    assert within_half_step(packed["layers.0.qkv_proj"], qkv)
    for name, source in (("layers.0.o_proj", "blk.0.attn_output.weight"),
                         ("layers.0.down_proj", "blk.0.ffn_down.weight"),
                         ("lm_head", "output.weight")):
        assert within_half_step(packed[name], floats[source]), name
    # an untied embedding, for lookups on the CPU: as the file gives it
    with_table = gguf_packed_linears(path, config, rest=True, embed=True)
    assert set(with_table) == set(packed) | {"embed"}
    assert torch.equal(dequantize(with_table["embed"]), floats["token_embd.weight"])
    no_exact = tmp_path / "no_exact.gguf"
    _write_gguf(no_exact, {k: v for k, v in tensors.items() if v[1] != Q4_0})
    assert gguf_packed_linears(no_exact, config, rest=True) == {}


def test_embedding_looks_up_rows_of_a_packed_table_in_its_dtype() -> None:
    """`layers.Embedding`: dense lookups are F.embedding's; packed (panels or rows layout)
    ones are the dequantized table's rows, in the dense weight's dtype, any ids shape."""
    from kernels.quant import quantize_int4, to_panels
    from server.models.layers import Embedding

    w = torch.randn(37, 64, dtype=torch.bfloat16)
    ids = torch.tensor([[36, 0, 5], [5, 16, 31]])
    for packed in (to_panels(quantize_int4(w.float(), 32)), quantize_int4(w.float(), 64)):
        table = Embedding(w.clone())
        assert torch.equal(table(ids), w[ids]) and table.dense() is table.weight
        table.set_packed(packed)
        assert table.weight is None and table.dtype == torch.bfloat16
        expect = dequantize(packed, torch.bfloat16)
        out = table(ids)
        assert out.shape == (2, 3, 64) and out.dtype == torch.bfloat16
        assert torch.equal(out, expect[ids]) and torch.equal(table.dense(), expect)
        table.set_packed(packed)  # again (a tied table re-pointed at its head's panels)
        assert table.dtype == torch.bfloat16
