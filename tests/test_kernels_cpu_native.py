"""The native CPU kernel (kernels/cpu_gemm.c through kernels.cpu_native) against the float32
reference: exact where int16 activations lose nothing, within 1e-4 relative Frobenius error
on random data (activations quantized to int16 per block of 32: measured ~2e-5, float32
rounding of the sums included), rows independent of the batch and of the variant bit for
bit; the native add + RMSNorm, RoPE + KV write and SwiGLU; and the build, cache and
fallback around them. The kernel tests run every variant this CPU has (AVX-512 VNNI, AVX2); all is skipped
where none can run (another CPU, or no C compiler)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from kernels import cpu_native, gemm
from kernels.gemm import quantized_linear, quantized_linear_reference
from kernels.quant import PackedWeight, quantize_int4, quantize_int8, to_words

pytestmark = pytest.mark.skipif(not cpu_native.available(),
                                reason="the native CPU kernel cannot run here")


# K: one block, 3, 18, 34. N: one feature, a part of a panel of 16 (AVX2: of its first half
# of 8), a panel and a part, two panels and the first half of a third.
SHAPES = [(1, 32), (5, 576), (18, 1088), (40, 96)]
TORCH_TOL = 1e-2  # where torch's kernels take the product: activations rounded to bfloat16
WEIGHTS = [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32), ("int8", None)]


def _weight(scheme: str, group: int | None, n: int, k: int) -> PackedWeight:
    w = torch.randn(n, k) * 0.05
    if scheme == "int4":
        return quantize_int4(w, group if k % group == 0 else 32)
    return quantize_int8(w, group)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("scheme,group", WEIGHTS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_exact_when_activation_blocks_quantize_exactly(scheme, group, n, k, native_lib):
    """Activations k * 2^-10 (k integer) whose every block of 32 holds +-32767 * 2^-10
    quantize to int16 with scale 2^-10 and lose nothing; with power-of-two weight scales and
    offsets (and small int8 codes) every product and partial sum is exact in float32, so the
    kernel must give the reference bit for bit: a misplaced nibble, block, scale or output
    element cannot pass."""
    packed = _weight(scheme, group, n, k)
    g = packed.scales.shape[1]
    packed.scales = (2.0 ** -torch.randint(4, 6, (n, g))).to(torch.float16)
    if packed.offsets is not None:
        packed.offsets = (-(2.0 ** -torch.randint(1, 4, (n, g)))).to(torch.float16)
    else:
        packed.qweight = torch.randint(-8, 9, packed.qweight.shape, dtype=torch.int8)
    x = torch.randint(-127, 128, (7, k)).float()
    x[:, ::32] = 32767.0 * torch.sign(torch.randn(7, k // 32))
    x = x * 2.0 ** -10
    out = cpu_native.linear(x, packed, native_lib)
    assert torch.equal(out, quantized_linear_reference(x, packed))


@pytest.mark.parametrize("scheme,group", WEIGHTS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 13])  # tiles of 8 rows (AVX2: 4) and what is left
def test_random_inputs_match_reference(scheme, group, n, k, m, native_lib):
    packed = _weight(scheme, group, n, k)
    x = torch.randn(m, k)
    out = cpu_native.linear(x, packed, native_lib)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert _rel(out, quantized_linear_reference(x, packed)) < 1e-4


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", 32)])
def test_a_row_does_not_depend_on_the_batch(scheme, group, native_lib):
    """Each row of a 21-row product (tiles of 8 or 4 rows, then what is left) equals the row
    alone, bit for bit: a request's tokens do not change with what is batched beside it."""
    packed = _weight(scheme, group, 37, 576)
    x = torch.randn(21, 576)
    out = cpu_native.linear(x, packed, native_lib)
    for i in range(21):
        assert torch.equal(cpu_native.linear(x[i:i + 1], packed, native_lib)[0], out[i]), i
    for a, b in ((2, 7), (3, 21), (0, 12)):
        assert torch.equal(cpu_native.linear(x[a:b], packed, native_lib), out[a:b])


@pytest.mark.parametrize("scheme,group", WEIGHTS)
def test_the_variants_agree_bit_for_bit(scheme, group):
    """Every variant does the same float operations per (row, feature), so AVX-512 and AVX2
    give the same bits: a served model's outputs do not depend on the CPU's instruction set."""
    libs = [cpu_native.load(v) for v in cpu_native.runnable()]
    if len(libs) < 2:
        pytest.skip("one variant runs here")
    packed = _weight(scheme, group, 40, 576)
    x = torch.randn(13, 576)
    first = cpu_native.linear(x, packed, libs[0])
    assert all(torch.equal(cpu_native.linear(x, packed, lib), first) for lib in libs[1:])


def test_bfloat16_activations_come_back_in_bfloat16(native_lib):
    packed = _weight("int4", 32, 8, 128)
    x = torch.randn(2, 128).to(torch.bfloat16)
    out = cpu_native.linear(x, packed, native_lib)
    assert out.dtype == torch.bfloat16
    assert _rel(out.float(), quantized_linear_reference(x.float(), packed)) < 1.5e-2


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_linear_takes_it_at_every_row_count(scheme, monkeypatch):
    """Decode rows and prefill chunks alike, so a row's result through the seam does not
    depend on how many rows share its product."""
    calls = []
    real = cpu_native.linear
    monkeypatch.setattr(cpu_native, "linear", lambda x, p: calls.append(x.shape[0]) or real(x, p))
    packed = _weight(scheme, 32, 16, 128)
    assert gemm.takes_every_row_count(packed)
    x = torch.randn(300, 128)
    out = quantized_linear(x, packed)
    assert _rel(out, quantized_linear_reference(x, packed)) < 1e-4
    for m in (1, 64, 200):
        assert torch.equal(quantized_linear(x[:m], packed), out[:m]), m
    assert calls == [300, 1, 64, 200]


def test_weights_it_cannot_take_go_to_torch(monkeypatch):
    """K not a multiple of 32, the words layout, or tensors off the CPU are not the native
    kernel's."""
    assert not cpu_native.supports(_weight("int8", None, 16, 80))
    assert not gemm.takes_every_row_count(_weight("int8", None, 16, 80))
    assert not cpu_native.supports(to_words(_weight("int4", 32, 16, 128)))
    meta = _weight("int4", 32, 16, 128).to("meta")  # not in CPU memory: never its addresses
    assert not cpu_native.supports(meta)
    with pytest.raises(ValueError, match="CPU activations"):
        cpu_native.linear(torch.randn(1, 128, device="meta"), _weight("int4", 32, 16, 128))
    with pytest.raises(RuntimeError, match="cannot take"):
        cpu_native.linear(torch.randn(1, 80), _weight("int8", None, 16, 80))
    packed = _weight("int8", None, 16, 80)
    x = torch.randn(3, 80)
    assert _rel(quantized_linear(x, packed), quantized_linear_reference(x, packed)) < TORCH_TOL


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_torch_and_rows_stand_alone(with_residual, native_lib):
    """The residual sum exact, the norm within float32 rounding of torch's, every row's
    bits those of the row alone."""
    x, w = torch.randn(9, 576), torch.randn(576)
    residual = torch.randn(9, 576) if with_residual else None
    out, summed = cpu_native.add_rms_norm(x, residual, w, 1e-5, native_lib)
    expect = x if residual is None else x + residual
    assert torch.equal(summed, expect)
    torch.testing.assert_close(out, torch.rms_norm(expect, (576,), w, 1e-5), rtol=1e-5, atol=1e-6)
    for i in (0, 4, 8):
        alone = cpu_native.add_rms_norm(x[i:i + 1].clone(), None if residual is None
                                        else residual[i:i + 1].clone(), w, 1e-5, native_lib)
        assert torch.equal(alone[0][0], out[i]), i


def test_add_rms_norm_variants_agree_and_declines_what_it_cannot_take():
    libs = [cpu_native.load(v) for v in cpu_native.runnable()]
    x, r, w = torch.randn(5, 576), torch.randn(5, 576), torch.randn(576)
    first = cpu_native.add_rms_norm(x, r, w, 1e-6, libs[0])[0]
    assert all(torch.equal(cpu_native.add_rms_norm(x, r, w, 1e-6, lib)[0], first)
               for lib in libs[1:])
    small = torch.randn(2, 64) * 1e-3  # mean square 1e-6: eps counts
    torch.testing.assert_close(cpu_native.add_rms_norm(small, None, w[:64], 1e-5, libs[0])[0],
                               torch.rms_norm(small, (64,), w[:64], 1e-5), rtol=1e-5, atol=1e-6)
    assert cpu_native.add_rms_norm(x[:, :40], None, w[:40], 1e-6) is None  # not 16k columns
    assert cpu_native.add_rms_norm(x.bfloat16(), None, w, 1e-6) is None
    assert cpu_native.add_rms_norm(x.t().contiguous().t(), None, w, 1e-6) is None
    assert cpu_native.add_rms_norm(x, r[:2], w, 1e-6) is None
    with cpu_native.turned_off():
        assert cpu_native.add_rms_norm(x, r, w, 1e-6) is None


def _rope_case(t: int = 5, heads: int = 9, kv_heads: int = 3, dim: int = 64, rot: int = 64):
    qkv = torch.randn(t, heads + 2 * kv_heads, dim)
    cos, sin = torch.randn(t, 1, rot // 2), torch.randn(t, 1, rot // 2)
    caches = torch.randn(4, 16, kv_heads, dim), torch.randn(4, 16, kv_heads, dim)
    return qkv, cos, sin, caches, torch.tensor([3, 17, 40, 2, 63][:t])


@pytest.mark.parametrize("rot", [64, 48], ids=["whole", "partial"])
def test_rope_kv_write_matches_torch_and_rows_stand_alone(native_lib, rot):
    """q and k rotated as `apply_rope` does (within float32 rounding: the kernel may fuse a
    multiply-add; partial: the first 48 of 64 dims turn, the rest pass), k and v at their
    slots and nowhere else, a token's bits the same alone."""
    from kernels.attention import write_kv
    from server.models.rope import apply_rope

    qkv, cos, sin, (kc, vc), slots = _rope_case(rot=rot)
    k_ref, v_ref = kc.clone(), vc.clone()
    qk = apply_rope(qkv[:, :12], cos, sin)
    write_kv(qk[:, 9:], qkv[:, 12:], k_ref, v_ref, slots)
    k_out, v_out = kc.clone(), vc.clone()
    q = cpu_native.rope_kv_write(qkv, cos, sin, k_out, v_out, slots, 9, 3, native_lib)
    torch.testing.assert_close(q, qk[:, :9], rtol=0, atol=2e-6)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=2e-6)
    assert torch.equal(v_out, v_ref)
    for i in (0, 3):
        k1, v1 = kc.clone(), vc.clone()
        q1 = cpu_native.rope_kv_write(qkv[i:i + 1].clone(), cos[i:i + 1].clone(),
                                      sin[i:i + 1].clone(), k1, v1, slots[i:i + 1].clone(), 9,
                                      3, native_lib)
        assert torch.equal(q1[0], q[i])
        assert torch.equal(k1.view(-1, 3, 64)[slots[i]], k_out.view(-1, 3, 64)[slots[i]])


def test_rope_kv_write_norms_heads_first_as_torch_does(native_lib):
    """Qwen3's head norms: each q head normed with the weight's first half and each k head
    with its second before turning (as `head_rms_norm`, then `apply_rope`, within float32
    rounding), v as it was; a token's bits the same alone; a weight or head size the
    kernel does not take declines."""
    from kernels.attention import write_kv
    from server.models.layers import head_rms_norm
    from server.models.rope import apply_rope

    qkv, cos, sin, (kc, vc), slots = _rope_case()
    qkv[:, :12] *= torch.rand(5, 12, 1) * 4  # heads of other scales
    weight = torch.rand(128) + 0.5
    k_ref, v_ref = kc.clone(), vc.clone()
    qk = apply_rope(head_rms_norm(qkv[:, :12], weight, 1e-6, 9), cos, sin)
    write_kv(qk[:, 9:], qkv[:, 12:], k_ref, v_ref, slots)
    k_out, v_out = kc.clone(), vc.clone()
    q = cpu_native.rope_kv_write(qkv, cos, sin, k_out, v_out, slots, 9, 3, native_lib,
                                 head_norm=(weight, 1e-6))
    torch.testing.assert_close(q, qk[:, :9], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_out, v_ref)
    k1, v1 = kc.clone(), vc.clone()
    q1 = cpu_native.rope_kv_write(qkv[3:4].clone(), cos[3:4].clone(), sin[3:4].clone(), k1,
                                  v1, slots[3:4].clone(), 9, 3, native_lib,
                                  head_norm=(weight, 1e-6))
    assert torch.equal(q1[0], q[3])
    plain = cpu_native.rope_kv_write(qkv, cos, sin, kc.clone(), vc.clone(), slots, 9, 3,
                                     native_lib)
    assert not torch.allclose(plain, q)
    assert cpu_native.rope_kv_write(qkv, cos, sin, kc, vc, slots, 9, 3, native_lib,
                                    head_norm=(weight[:64], 1e-6)) is None
    odd, c8, s8, (k8, v8), _ = _rope_case(dim=8)
    assert cpu_native.rope_kv_write(odd, c8, s8, k8, v8, slots, 9, 3, native_lib,
                                    head_norm=(torch.ones(16), 1e-6)) is None  # 8 not 16k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_kv_write_rounds_into_16_bit_caches_as_torch_does(dtype, native_lib):
    """Into float16 or bfloat16 caches k and v go rounded as torch's conversion rounds the
    float32 values the kernel writes into a float32 cache (to nearest even; overflow to
    infinity in float16, NaN kept), at their slots and nowhere else."""
    qkv, cos, sin, (kc, vc), slots = _rope_case()
    qkv[0, 12, :4] = torch.tensor([70000.0, -1e-8, float("nan"), 1 + 2**-9])
    k32, v32 = kc.clone(), vc.clone()
    q32 = cpu_native.rope_kv_write(qkv, cos, sin, k32, v32, slots, 9, 3, native_lib)
    k16, v16 = kc.to(dtype), vc.to(dtype)
    q16 = cpu_native.rope_kv_write(qkv, cos, sin, k16, v16, slots, 9, 3, native_lib)
    assert torch.equal(q16, q32)
    for mine, wide in ((k16, k32), (v16, v32)):
        assert torch.equal(mine.view(torch.int16), wide.to(dtype).view(torch.int16))


def test_rope_kv_write_variants_agree_and_refuses_bad_slots_and_declines():
    libs = [cpu_native.load(v) for v in cpu_native.runnable()]
    qkv, cos, sin, (kc, vc), slots = _rope_case()
    for head_norm in (None, (torch.rand(128) + 0.5, 1e-6)):
        outs = []
        for lib in libs:
            k, v = kc.clone(), vc.clone()
            outs.append((cpu_native.rope_kv_write(qkv, cos, sin, k, v, slots, 9, 3, lib,
                                                  head_norm), k))
        assert all(torch.equal(q, outs[0][0]) and torch.equal(k, outs[0][1]) for q, k in outs)
    k, v = kc.clone(), vc.clone()
    with pytest.raises(IndexError, match="slot"):
        cpu_native.rope_kv_write(qkv, cos, sin, k, v, torch.tensor([0, 1, 2, 3, 64]), 9, 3)
    assert torch.equal(k, kc) and torch.equal(v, vc)  # nothing written
    assert cpu_native.rope_kv_write(qkv, cos, sin, kc, vc, slots, 8, 3) is None  # heads
    assert cpu_native.rope_kv_write(qkv, cos, sin, kc, vc, slots.int(), 9, 3) is None
    assert cpu_native.rope_kv_write(qkv, cos, sin, kc.double(), vc.double(), slots, 9,
                                    3) is None
    assert cpu_native.rope_kv_write(qkv, cos, sin, kc.half(), vc.bfloat16(), slots, 9,
                                    3) is None  # one type for both
    with cpu_native.turned_off():
        assert cpu_native.rope_kv_write(qkv, cos, sin, kc, vc, slots, 9, 3) is None


GLUS = {"silu": (cpu_native.silu_mul, torch.nn.functional.silu, 2e-6),
        "gelu": (cpu_native.gelu_mul,
                 lambda g: torch.nn.functional.gelu(g, approximate="tanh"), 1e-5)}
"""Each native gated activation, torch's activation, and the relative tolerance (GeGLU's
0.5 g (1 + tanh(u)) is computed as g times the logistic of 2u: other roundings)."""


@pytest.mark.parametrize("kind", GLUS)
def test_glu_matches_torch_and_rows_stand_alone(native_lib, kind):
    """Within float32 rounding of torch's SiLU or GELU (tanh) (the kernel's exponential is
    good to ~2 ulp), down to gates of +-100 (e^100 beyond float32's range: clamped, the
    product still ~0 or the gate), each row the same bits alone as in the batch."""
    native, reference, rtol = GLUS[kind]
    x = torch.randn(7, 2 * 1536) * 4
    x[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])
    out = native(x, native_lib)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(out, reference(gate) * up, rtol=rtol, atol=1e-6)
    for i in range(7):
        assert torch.equal(native(x[i:i + 1].clone(), native_lib)[0], out[i]), i


@pytest.mark.parametrize("kind", GLUS)
def test_glu_variants_agree_and_declines_what_it_cannot_take(kind):
    native = GLUS[kind][0]
    libs = [cpu_native.load(v) for v in cpu_native.runnable()]
    x = torch.randn(3, 2 * 576) * 4
    first = native(x, libs[0])
    assert all(torch.equal(native(x, lib), first) for lib in libs[1:])
    assert not torch.equal(first, GLUS["gelu" if kind == "silu" else "silu"][0](x, libs[0]))
    assert native(x[:, :24].contiguous()) is None  # halves not 8k columns
    assert native(x.bfloat16()) is None
    assert native(x.t().contiguous().t()) is None
    assert native(x[0]) is None
    with cpu_native.turned_off():
        assert native(x) is None


def test_build_names_the_library_by_source_and_loads(tmp_path, monkeypatch):
    """A build lands under the hash of sources and flags (an edited source gets a new name),
    readable by every user, and each library reports the instruction set it was compiled
    for."""
    for variant in cpu_native.VARIANTS:
        path = cpu_native.build(tmp_path, variant)
        assert path == tmp_path / cpu_native.library_name(variant)
        assert path.stat().st_mode & 0o777 == 0o755  # readable by others: an image's user
        if variant.cpu_flags <= cpu_native.cpu_flags():
            assert ctypes.CDLL(str(path)).lf_cpu_gemm_isa() == variant.isa
    names = {cpu_native.library_name(v) for v in cpu_native.VARIANTS}
    assert {p.name for p in tmp_path.iterdir()} == names  # no temporary left behind
    monkeypatch.setattr(cpu_native, "FLAGS", (*cpu_native.FLAGS, "-DUNUSED"))
    assert not names & {cpu_native.library_name(v) for v in cpu_native.VARIANTS}
    monkeypatch.undo()
    header = tmp_path / "cpu_vec.h"  # an edited header (the sources include it): a new name
    header.write_text(cpu_native.HEADERS[0].read_text() + "/* edited */\n")
    monkeypatch.setattr(cpu_native, "HEADERS", (header,))
    assert not names & {cpu_native.library_name(v) for v in cpu_native.VARIANTS}


def test_load_builds_the_best_variant_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPFROG_CACHE_DIR", str(tmp_path))
    variant, lib = cpu_native._load()
    assert variant == cpu_native.runnable()[0] and lib is not None
    assert [p.name for p in tmp_path.iterdir()] == [cpu_native.library_name(variant)]


def test_the_environment_picks_a_variant_or_none(monkeypatch):
    have = [v for v in cpu_native.VARIANTS if v.cpu_flags <= cpu_native.cpu_flags()]
    assert cpu_native.runnable() == have
    monkeypatch.setenv("LEAPFROG_NATIVE_KERNELS", "avx2")
    assert [v.name for v in cpu_native.runnable()] == ["avx2"]
    monkeypatch.setenv("LEAPFROG_NATIVE_KERNELS", "0")
    assert cpu_native.runnable() == [] and cpu_native._load() is None


def test_a_failed_build_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LEAPFROG_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    bogus = tmp_path / "cpu_gemm.c"
    bogus.write_text("this is not C")
    monkeypatch.setattr(cpu_native, "SOURCES", (bogus,))
    with caplog.at_level("WARNING", logger="kernels.cpu_native"):
        assert cpu_native._load() is None
    assert "unavailable" in caplog.text
    assert list(tmp_path.iterdir()) == [bogus]


def test_turned_off_hands_every_weight_to_torch():
    packed = _weight("int4", 32, 16, 128)
    assert cpu_native.supports(packed)
    with cpu_native.turned_off():
        assert not cpu_native.supports(packed)
        x = torch.randn(2, 128)
        out = quantized_linear(x, packed)
        assert "native" not in packed.cache and packed.cache  # torch's packing instead
        assert _rel(out, quantized_linear_reference(x, packed)) < TORCH_TOL
    assert cpu_native.supports(packed)


def test_the_benchmark_times_every_variant_and_torch(monkeypatch):
    from kernels import bench_cpu

    monkeypatch.setattr(bench_cpu, "SHAPES", [("tiny", 32, 128, "int4"), ("head", 48, 64, "int8")])
    rows = bench_cpu.run([1, 3], copies=2, repeats=1)
    assert [(r["shape"], r["rows"]) for r in rows] == [("tiny", 1), ("tiny", 3), ("head", 1),
                                                       ("head", 3)]
    names = [v.name for v in cpu_native.runnable()]
    assert all(r[c] > 0 for r in rows for c in [*names, "torch", "dense_f32"])
