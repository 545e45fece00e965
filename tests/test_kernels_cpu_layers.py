"""The decoder layers in one native call (`kernels.cpu_layers`) against the model's per-op
path, which calls the same kernels one by one from Python: equal bit for bit."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kernels import cpu_layers, cpu_native
from server.engine import batch_builder
from server.engine.batch_builder import batch_meta
from server.engine.block_manager import SinkWindow
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from server.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(not cpu_native.available(),
                                reason="the native CPU kernels do not run here")

BLOCK = 16


def _model(tiny_model_dir, arch: str) -> LlamaForCausalLM:
    llm = LLM(str(tiny_model_dir(arch)), quantization="int4", dtype="float32",
              kv_cache_memory_gb=0.01)
    model = llm.engine.runner.model
    for layer in model.layers:  # the checkpoint's biases are zeros
        if layer.qkv_proj.bias is not None:
            layer.qkv_proj.bias.normal_()
    return model


def _caches(model: LlamaForCausalLM, num_blocks: int, dtype: torch.dtype = torch.float32
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    c = model.config
    return [tuple(torch.randn(num_blocks, BLOCK, c.num_kv_heads, c.head_dim).to(dtype)
                  for _ in "kv") for _ in model.layers]


def _step(model, seq_lens, q_lens, window=None):
    """Random token ids and a decode/verification step's metadata over shuffled blocks:
    the full pool's tables, and with `window` a second pool's for the windowed layers."""
    num_blocks = sum(-(-s // BLOCK) for s in seq_lens) + 2
    pools, windows = [], [None] + ([window] if window else [])
    for _ in windows:
        perm, tables, at = torch.randperm(num_blocks).tolist(), [], 0
        for s in seq_lens:
            n = -(-s // BLOCK)
            tables.append(perm[at:at + n])
            at += n
        pools.append(tables)
    positions = [p for s, q in zip(seq_lens, q_lens, strict=True) for p in range(s - q, s)]
    starts = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    meta = batch_meta(pools, positions, seq_lens, starts, BLOCK, torch.device("cpu"), True,
                      windows)
    ids = torch.randint(0, model.config.vocab_size, (len(positions),))
    return ids, torch.tensor(positions), meta, num_blocks


def _both_paths(model, ids, positions, meta, num_layers=None):
    """(hidden, caches) through the native stack, then through the per-op loop from the
    same caches."""
    saved = [tuple(t.clone() for t in kv) for kv in model.kv_caches]
    calls = []
    forward = type(model.layers[0]).forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    results = []
    for native in (True, False):
        model.kv_caches = [tuple(t.clone() for t in kv) for kv in saved]
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(model.layers[0]), "forward", counted)
            with contextlib.nullcontext() if native else cpu_layers.turned_off():
                hidden = model(ids, positions, meta, num_layers)
        assert bool(calls) != native  # the native stack ran instead of every layer's forward
        results.append((hidden, model.kv_caches))
    return results


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3", "qwen3", "phi4", "gemma2",
                                  "gemma3", "granite", "smollm3"])
@pytest.mark.parametrize("q_lens", [[1, 1, 1], [4, 1, 16]], ids=["decode", "verification"])
def test_native_layers_equal_the_per_op_path(tiny_model_dir, arch, q_lens):
    """Decode and verification steps (qwen2: qkv bias; llama3: tied head; qwen3: q and k
    head norms; phi4: a partial rotary embedding; gemma2: four norms a layer, GeGLU,
    soft-capped attention scores; gemma3: q and k head norms, four norms, GeGLU, its
    window layers' own RoPE; granite: its attention scale; smollm3: a layer without
    RoPE), random caches:
    the final hidden states and every layer's cache equal bit for bit."""
    torch.manual_seed(0)
    model = _model(tiny_model_dir, arch)
    ids, positions, meta, num_blocks = _step(model, [40, 17, 70], q_lens)
    model.kv_caches = _caches(model, num_blocks)
    (native, native_kv), (per_op, per_op_kv) = _both_paths(model, ids, positions, meta)
    assert torch.equal(native, per_op)
    assert all(torch.equal(a, b) for kv, kv2 in zip(native_kv, per_op_kv, strict=True)
               for a, b in zip(kv, kv2, strict=True))
    # an early exit's first layers too (the self-speculation drafter's)
    (native, _), (per_op, _) = _both_paths(model, ids, positions, meta, num_layers=2)
    assert torch.equal(native, per_op)


@pytest.mark.parametrize("sinks", [0, 4])
def test_windowed_layers_read_their_own_pool(tiny_model_dir, sinks):
    """A hybrid cache: the windowed layers attend through the second pool's tables and
    slots with sinks + a window, as in the per-op path."""
    torch.manual_seed(1)
    model = _model(tiny_model_dir, "llama")
    ids, positions, meta, num_blocks = _step(model, [60, 35], [3, 1], SinkWindow(20, sinks))
    assert meta.sparse is not None and meta.sparse.native_step(len(ids)) is not None
    model.kv_caches = _caches(model, num_blocks)
    try:
        model.layers[1].windowed = True
        (native, native_kv), (per_op, per_op_kv) = _both_paths(model, ids, positions, meta)
    finally:
        model.layers[1].windowed = False
    assert torch.equal(native, per_op)
    assert all(torch.equal(a, b) for kv, kv2 in zip(native_kv, per_op_kv, strict=True)
               for a, b in zip(kv, kv2, strict=True))


def test_prefill_dense_weights_and_turned_off_take_the_per_op_path(tiny_model_dir):
    """A long query (a prefill chunk), dense weights, or the native kernels turned off:
    no native stack."""
    torch.manual_seed(2)
    model = _model(tiny_model_dir, "llama")
    ids, positions, meta, num_blocks = _step(model, [40], [17])
    model.kv_caches = _caches(model, num_blocks)
    x = torch.randn(17, model.config.hidden_size)
    rope = model.rope.inputs(positions, x.dtype, False)
    assert model._native_forward(x, rope, rope, meta, 3) is None
    ids, positions, meta, _ = _step(model, [40], [1])
    rope = model.rope.inputs(positions, x.dtype, False)
    assert model._native_forward(x[:1], rope, rope, meta, 3) is not None
    for off in (cpu_native.turned_off, cpu_layers.turned_off):
        with off():
            assert model._native_forward(x[:1], rope, rope, meta, 3) is None
    dense = LLM(str(tiny_model_dir("llama")), dtype="float32",
                kv_cache_memory_gb=0.01).engine.runner.model
    dense.kv_caches = model.kv_caches
    assert dense._native_forward(x[:1], rope, rope, meta, 3) is None


def test_bad_slots_and_tables_raise(tiny_model_dir):
    """A slot outside the cache raises before any layer writes; so does a block outside it
    (its pool's first layer has written this step's keys and values, as the per-op path's
    has)."""
    torch.manual_seed(3)
    model = _model(tiny_model_dir, "llama")
    ids, positions, meta, num_blocks = _step(model, [40, 9], [1, 1])
    model.kv_caches = _caches(model, num_blocks)
    before = [tuple(t.clone() for t in kv) for kv in model.kv_caches]
    good = meta.slot_mapping.clone()
    meta.slot_mapping[1] = num_blocks * BLOCK
    with pytest.raises(IndexError, match="slot"):
        model(ids, positions, meta)
    assert all(torch.equal(a, b) for kv, kv2 in zip(model.kv_caches, before, strict=True)
               for a, b in zip(kv, kv2, strict=True))
    meta.slot_mapping.copy_(good)
    meta.groups[0].native.tensors[0][0, 0] = num_blocks
    with pytest.raises(IndexError, match="block"):
        model(ids, positions, meta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_lens", [[1, 1, 1], [4, 1, 16]], ids=["decode", "verification"])
def test_16_bit_caches(tiny_model_dir, dtype, q_lens):
    """Float16 and bfloat16 KV caches: the native stack equals the per-op path bit for bit
    (hidden states and caches), and torch's ops (every native kernel off) agree as closely
    as with float32 caches (~1.5% relative: the native GEMM's int16 activations)."""
    torch.manual_seed(0)
    model = _model(tiny_model_dir, "llama")
    ids, positions, meta, num_blocks = _step(model, [40, 17, 70], q_lens)
    model.kv_caches = _caches(model, num_blocks, dtype)
    saved = [tuple(t.clone() for t in kv) for kv in model.kv_caches]
    (native, native_kv), (per_op, per_op_kv) = _both_paths(model, ids, positions, meta)
    assert torch.equal(native, per_op)
    assert all(a.dtype == dtype and torch.equal(a, b) for kv, kv2 in
               zip(native_kv, per_op_kv, strict=True) for a, b in zip(kv, kv2, strict=True))
    model.kv_caches = saved
    with cpu_native.turned_off():  # torch's products, rotation, write_kv and attention
        hidden = model(ids, positions, meta)
    assert float((hidden - native).norm() / native.norm()) < 0.03
    for kv, kv2 in zip(model.kv_caches, native_kv, strict=True):
        for a, b in zip(kv, kv2, strict=True):
            assert a.dtype == dtype and float((a.float() - b.float()).norm() / b.float().norm()) < 0.03


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16"])
def test_engine_outputs_equal_with_and_without_the_stack(tiny_model_dir, kv_cache_dtype):
    """Greedy requests with n-gram speculation (decode and verification steps) through the
    engine, with a float32 and a float16 KV cache: the same tokens and log-probabilities
    either way. (The speculation policy's timings can change which steps verify drafts;
    with an untied head, packed, every row's logits are independent of the step's other
    rows, so that changes no bit.)"""
    prompts = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 9, 3, 9, 3, 9], [1, 40, 41]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    llm = LLM(str(tiny_model_dir("llama")), quantization="int4", dtype="float32",
              kv_cache_memory_gb=0.01, speculative="ngram", enable_prefix_caching=False,
              kv_cache_dtype=kv_cache_dtype)
    outs = [llm.generate(prompts, params)]
    with cpu_layers.turned_off():
        outs.append(llm.generate(prompts, params))
    for a, b in zip(*outs, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert sum(c.num_draft_tokens for c in outs[0]) > 0  # verification steps ran


def test_the_benchmark_compares_both_paths(tmp_path, monkeypatch):
    """`leapfrog bench layers` times the default model's decode both ways, the per-op side
    really calling every layer's forward, and gets the same tokens; and its prefill with
    the prompt's chunk through the native attention and through torch's."""
    import json
    import math

    from server.cli import main

    seen = set()  # (switched off, ran natively) of the decode steps
    forward = LlamaForCausalLM._native_forward

    def counted(self, x, rope, local, meta, count, identity=None):
        out = forward(self, x, rope, local, meta, count, identity)
        if meta.native_step(x.shape[0]) is not None:
            seen.add((not cpu_layers._enabled, out is not None))
        return out

    monkeypatch.setattr(LlamaForCausalLM, "_native_forward", counted)
    chunks = set()  # whether a 48-token prefill chunk went to the native attention
    groups = batch_builder._groups

    def grouped(lens, start_loc, *rest):
        out = groups(lens, start_loc, *rest)
        if int(start_loc[-1]) == 48:
            chunks.add(tuple(g.native is not None for g in out))
        return out

    monkeypatch.setattr(batch_builder, "_groups", grouped)
    out = tmp_path / "layers.json"
    assert main(["bench", "layers", "--batch-sizes", "2", "--tokens", "8", "--repeats", "1",
                 "--prefill-lengths", "48", "--result-json", str(out)]) == 0
    (prefill,) = json.loads(out.read_text())["prefill"]
    assert prefill["prompt_tokens"] == 48 and chunks == {(True,), (False,)}
    assert all(math.isfinite(prefill[k]) and prefill[k] > 0 for k in ("native", "torch", "ratio"))
    (row,) = json.loads(out.read_text())["decode"]
    assert row["batch"] == 2 and row["same_tokens"] is True
    # (rates of so few tokens on a loaded machine can be anything, even negative: t(8) - t(1))
    assert all(math.isfinite(row[k]) for k in ("one_call", "per_op", "ratio"))
    assert seen == {(False, True), (True, False)}  # decode steps both ways
    assert cpu_layers._enabled.on  # switched back on
