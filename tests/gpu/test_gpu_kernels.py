"""The kernel checks at real sizes on a CUDA device (skipped without one).

Same thresholds as the CPU tests: relative Frobenius error against the float32 reference
< 1.5e-2 for bfloat16 GEMMs and < 2e-2 for bfloat16 attention; outputs poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LLAMA_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "unwritten (poisoned) or NaN outputs"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_gemm_llama_shapes(n, k, scheme, m):
    from kernels.gemm import quantized_linear_reference
    from kernels.quant import quantize_int4, quantize_int8
    from kernels.triton_gemm import triton_quantized_linear

    w = torch.randn(n, k, device="cuda") * 0.02
    packed = quantize_int4(w, 128) if scheme == "int4" else quantize_int8(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the second call runs the tuned config and reuses the counters
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        triton_quantized_linear(x, packed, out=out)
        assert _rel(out, quantized_linear_reference(x.float(), packed)) < 1.5e-2


@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_gemv_every_config(n, k, scheme):
    """Each configuration the M = 1 autotuner may pick gives the right answer."""
    from kernels.gemm import quantized_linear_reference
    from kernels.quant import quantize_int4, quantize_int8, to_words
    from kernels.triton_gemv import _configs, _tile_counters, triton_gemv

    w = torch.randn(n, k, device="cuda") * 0.02
    packed = to_words(quantize_int4(w, 128) if scheme == "int4" else quantize_int8(w))
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = quantized_linear_reference(x.float(), packed)
    for c in _configs():
        if c.kwargs["split_k"] not in (1, 4, 64):
            continue
        config = {"BLOCK_N": c.kwargs["BLOCK_N"], "split_k": c.kwargs["split_k"],
                  "num_warps": c.num_warps, "ROWS": c.kwargs["ROWS"]}
        out = torch.full((1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        triton_gemv(x, packed, out, _tile_counters(x.device, n // 32), config)
        assert _rel(out, ref) < 1e-2, config


@pytest.mark.parametrize("scheme,n,k,group", [
    ("int4", 14336, 4096, 128), ("int4", 4096, 14336, 128), ("int4", 1000, 576, 64),
    ("int4", 4096, 4096, 64), ("int4", 1536, 576, 32), ("int4", 576, 1536, 32),
    ("int8", 14336, 4096, None), ("int8", 4096, 14336, None), ("int8", 1000, 576, None),
    ("int8", 14336, 4096, 32), ("int8", 1000, 576, 32)])
def test_mma_gemv_every_config(scheme, n, k, group):
    """The tensor-core GEMV, M = 1..16 (groups of 4 rows, or of 8 or 16 for int4), every
    configuration its autotuner may pick (split-K 1/4/32, warp rows along K, 4, 8 or 16
    rows a program); int4 chunks of 4, 2 and 1 steps, int8 per channel and in groups of 32
    (GGUF Q8_0: chunks of 2 steps); N not a multiple of 32. Its float32 accumulation is
    exact but for rounding, so the bound is the bfloat16 output's."""
    from kernels.gemm import quantized_linear_reference
    from kernels.quant import quantize_int4, quantize_int8, to_words
    from kernels.triton_mma_gemv import _configs, mma_gemv, rows_fit

    w = torch.randn(n, k, device="cuda") * 0.02
    packed = to_words(quantize_int4(w, group) if scheme == "int4" else quantize_int8(w, group))
    for m in (1, 2, 3, 4, 7, 11, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 4
        ref = quantized_linear_reference(x.float(), packed)
        for c in _configs():
            if c.kwargs["split_k"] not in (1, 4, 32) or c.kwargs["split_k"] > k // 32:
                continue
            if c.kwargs["WARPS_K"] > 1 and m <= 4 or not rows_fit(c, m, scheme == "int8"):
                continue  # (as the tuner prunes them)
            config = {"BLOCK_N": c.kwargs["BLOCK_N"], "split_k": c.kwargs["split_k"],
                      "num_warps": c.num_warps, "WARPS_K": c.kwargs["WARPS_K"],
                      "ROWS": c.kwargs["ROWS"]}
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            mma_gemv(x, packed, out, config)
            assert _rel(out, ref) < 3e-3, (m, config)


@pytest.mark.parametrize("scheme,n,k,group", [
    ("int4", 6144, 4096, 128), ("int4", 4096, 4096, 128), ("int4", 28672, 4096, 128),
    ("int4", 4096, 14336, 128), ("int4", 960, 576, 32), ("int8", 4096, 4096, 32)])
def test_mma_gemv_sums_every_config(scheme, n, k, group):
    """The GEMV handing its sums on (`mma_gemv_sums`, int64 fixed point added by every
    program) at the 8B and default-model shapes, 1-4 rows, every configuration its tuner
    may pick and the tuned one: the sums are the merging GEMV's float32 result within its
    rounding, and the fused kernel that reads them (the SwiGLU, on gate/up halves) leaves
    the buffer zero."""
    from kernels.gemv_sums import _sums, mma_gemv_sums
    from kernels.quant import quantize_int4, quantize_int8, to_words
    from kernels.triton_fused import FIXED_ONE, silu_mul
    from kernels.triton_mma_gemv import _configs, mma_gemv

    w = torch.randn(n, k, device="cuda") * 0.02
    packed = to_words(quantize_int4(w, group) if scheme == "int4" else quantize_int8(w, group))
    for m in (1, 3, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = mma_gemv(x, packed, torch.empty(m, n, device="cuda", dtype=torch.float32))
        configs = [None] + [
            {"BLOCK_N": c.kwargs["BLOCK_N"], "split_k": c.kwargs["split_k"],
             "num_warps": c.num_warps} for c in _configs()
            if c.kwargs["WARPS_K"] == 1 and c.kwargs["ROWS"] == 4
            and c.kwargs["split_k"] in (1, 4, 32)
            and c.kwargs["split_k"] <= k // 32]
        for config in configs:
            sums = mma_gemv_sums(x, packed, config)
            got = sums.sums.double() / FIXED_ONE
            assert float((got - ref.double()).norm() / ref.double().norm()) < 1e-5, (m, config)
            silu_mul(sums)
            assert int(_sums[x.device].abs().sum()) == 0, (m, config)


def test_deferred_norm_through_the_gemv_real_sizes():
    """The 8B gate/up at batch 1 as the packed decoder layer runs it: the norm's scale
    deferred (`add_norm_deferred`), the GEMV's sums, the SwiGLU scaling them as it reads
    them; against the norm, the dense product of the packed weight and the SwiGLU in
    float32. The buffer is left zero."""
    from kernels.gemm import quantized_linear_reference
    from kernels.gemv_sums import _sums, mma_gemv_sums
    from kernels.quant import quantize_int4, to_words
    from kernels.triton_fused import (
        add_norm_deferred,
        add_rms_norm_reference,
        silu_mul,
        silu_mul_reference,
    )

    packed = to_words(quantize_int4(torch.randn(28672, 4096, device="cuda") * 0.02, 128))
    x, res = (torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16) * 4 for _ in range(2))
    weight = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    weighted, residual_out, norm = add_norm_deferred(x, res, weight, 1e-5)
    normed, ref_residual = add_rms_norm_reference(x.float(), res.float(), weight.float(), 1e-5)
    assert _rel(residual_out, ref_residual) < 1e-2
    sums = mma_gemv_sums(weighted, packed)
    sums.norm = norm
    got = silu_mul(sums)
    ref = silu_mul_reference(quantized_linear_reference(normed, packed).float())
    assert _rel(got, ref) < 1.5e-2
    assert int(_sums[x.device].abs().sum()) == 0


def test_mma_gemv_serves_the_model_path():
    """`quantized_linear` on CUDA sends int4 bf16 rows M <= 16 and per-channel int8 M <= 8
    to the mma GEMV (autotuned), more rows elsewhere; all match the reference."""
    from kernels.gemm import quantized_linear, quantized_linear_reference
    from kernels.quant import quantize_int4, quantize_int8, to_words
    from kernels.triton_mma_gemv import _mma_tuned, mma_gemv_supported

    w = torch.randn(2048, 1024, device="cuda") * 0.02
    for packed in (to_words(quantize_int4(w, 32)), to_words(quantize_int8(w, None))):
        for m in (1, 4, 9, 17):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            assert mma_gemv_supported(x, packed) == (m <= (16 if packed.scheme == "int4" else 8))
            out = quantized_linear(x, packed)
            assert _rel(out, quantized_linear_reference(x.float(), packed)) < (
                3e-3 if mma_gemv_supported(x, packed) else 1.5e-2)
    keys = [key for key in _mma_tuned.cache if key[:2] == (2048, 1024)]
    assert {key[4] for key in keys} == {False, True}  # the INT8 key: both schemes tuned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [17, 64, 100])
def test_gemm_int4_every_config(m, dtype):
    """Each configuration the M > 16 autotuner may pick launches (fits in shared memory) and
    gives the right answer for int4 in groups of 128 (N = 1000 ragged), in both
    half-precision activation types."""
    from kernels.gemm import quantized_linear_reference
    from kernels.quant import quantize_int4
    from kernels.triton_gemm import _TUNE_CONFIGS, GemmConfig, triton_quantized_linear

    packed = quantize_int4(torch.randn(1000, 4096, device="cuda") * 0.02, 128)
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    ref = quantized_linear_reference(x.float(), packed)
    for c in _TUNE_CONFIGS:
        config = GemmConfig(c.kwargs["BLOCK_N"], c.kwargs["split_k"], c.num_warps, c.num_stages)
        out = torch.full((m, 1000), float("nan"), device="cuda", dtype=dtype)
        triton_quantized_linear(x, packed, config, out=out)
        assert _rel(out, ref) < 3e-3, config


@pytest.mark.parametrize("scheme,group", [("int4", 128), ("int8", 32), ("int8", None)])
def test_prefill_rows_dequantize_for_cublas(scheme, group):
    """Prefill-sized products (DEQUANT_ROWS rows and more) multiply by the Triton expansion
    of the weight, which is the reference rounded once to bfloat16, bit for bit."""
    from kernels.gemm import quantized_linear, quantized_linear_reference
    from kernels.quant import dequantize, quantize_int4, quantize_int8
    from kernels.triton_gemm import DEQUANT_ROWS, dequantize_t, words_of

    w = torch.randn(1000, 4096, device="cuda") * 0.02
    packed = words_of(quantize_int4(w, group) if scheme == "int4" else quantize_int8(w, group))
    wt = dequantize_t(packed, torch.bfloat16)
    assert torch.equal(wt, dequantize(packed).t().to(torch.bfloat16))
    x = torch.randn(DEQUANT_ROWS + 88, 4096, device="cuda", dtype=torch.bfloat16)
    out = quantized_linear(x, packed)
    assert _rel(out, quantized_linear_reference(x.float(), packed)) < 3e-3


def test_tied_q8_0_head_of_the_default_model():
    """The default model's tied LM head served packed: its Q8_0 embedding (49152x576, groups
    of 32) in the words layout, through `quantized_linear` at the row counts decoding,
    verification and a short prefill give it (the mma GEMV, the CUDA-core GEMV or the
    tensor-core GEMM by rows)."""
    from kernels.gemm import quantized_linear, quantized_linear_reference
    from kernels.quant import quantize_int8, to_words

    packed = to_words(quantize_int8(torch.randn(49152, 576, device="cuda") * 0.05, 32))
    for m in (1, 3, 4, 8, 9, 16, 17, 63):
        x = torch.randn(m, 576, device="cuda", dtype=torch.bfloat16)
        out = quantized_linear(x, packed)
        assert out.shape == (m, 49152)
        assert _rel(out, quantized_linear_reference(x.float(), packed)) < 1.5e-2, m


@pytest.mark.parametrize("split_k", [1, 3, 8])
def test_gemm_gguf_group32_split_k(split_k):
    from kernels.gemm import quantized_linear_reference
    from kernels.quant import quantize_int4, quantize_int8
    from kernels.triton_gemm import GemmConfig, triton_quantized_linear

    w = torch.randn(1536, 576, device="cuda") * 0.05
    for packed in (quantize_int4(w, 32), quantize_int8(w, 32)):
        for m in (1, 5, 33):
            x = torch.randn(m, 576, device="cuda", dtype=torch.float16)
            out = torch.full((m, 1536), float("nan"), device="cuda", dtype=torch.float16)
            triton_quantized_linear(x, packed, GemmConfig(64, split_k), out=out)
            assert _rel(out, quantized_linear_reference(x.float(), packed)) < 3e-3


@pytest.mark.parametrize("window,sinks", [(None, 0), (256, 4)])
@pytest.mark.parametrize("q_len", [1, 5, 40])
def test_paged_attention_real_sizes(window, sinks, q_len):
    from kernels.attention import paged_attention_reference
    from kernels.triton_attention import paged_attention_triton

    # split-KV: one sequence short enough for a single split, one where 4 of the splits
    # have work, two where all do
    seq_lens = [q_len + 7, 256 + q_len, 1000 + q_len, 2047]
    heads, kv_heads, dim, bs = 32, 8, 128, 16
    max_blocks = -(-max(seq_lens) // bs)
    num_blocks = len(seq_lens) * max_blocks
    tables = torch.randperm(num_blocks, device="cuda").reshape(len(seq_lens), -1).int()
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q_lens = torch.tensor([q_len] * len(seq_lens))
    qsl = torch.cat([torch.zeros(1), q_lens.cumsum(0)]).int().cuda()
    q = torch.randn(int(qsl[-1]), heads, dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    paged_attention_triton(q, k_cache, v_cache, tables, lens, qsl, dim ** -0.5, window, sinks,
                           out=out)
    cpu = [t.cpu() for t in (q.float(), k_cache.float(), v_cache.float(), tables, lens, qsl)]
    ref = paged_attention_reference(*cpu, dim ** -0.5, window, sinks)  # the reference is CPU-only
    assert _rel(out.cpu(), ref) < 2e-2


@pytest.mark.parametrize("m", [1, 2, 9, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336), (49152, 576)])
def test_dense_gemv_real_sizes(n, k, m):
    from kernels.triton_dense_gemv import dense_gemv

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.float().t()
    for _ in range(2):  # autotuned, then the tuned config with the counters reused
        assert _rel(dense_gemv(x, w, torch.float32), ref) < 1e-5
        assert _rel(dense_gemv(x, w), ref) < 1e-2


@pytest.mark.parametrize("m", [1, 9])
def test_dense_gemv_fused_prologues_real_sizes(m):
    """The norm (with a residual) and the SwiGLU fused into 1 and 9 rows at the 8B shapes,
    against the separate kernels' references followed by the product."""
    from kernels.triton_dense_gemv import dense_gemv
    from kernels.triton_fused import add_rms_norm_reference, silu_mul_reference

    w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)
    x, res = (torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    nw = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    out, res_out = dense_gemv(x, w, torch.float32, norm=(res, nw, 1e-5))
    h, ref_res = add_rms_norm_reference(x, res, nw, 1e-5)
    assert torch.equal(res_out, ref_res)
    assert _rel(out, h.float() @ w.float().t()) < 1e-2
    down = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(m, 2 * 14336, device="cuda", dtype=torch.bfloat16) * 3
    out = dense_gemv(gate_up, down, torch.float32, silu=True)
    assert _rel(out, silu_mul_reference(gate_up).float() @ down.float().t()) < 1e-2


def test_fused_pointwise_kernels_compiled():
    """The fused kernels against their torch references at 8B sizes (the CPU tests run them
    interpreted); relative error < 1e-2 in bfloat16, the cache's unwritten slots untouched."""
    from kernels.triton_fused import (
        add_rms_norm,
        add_rms_norm_reference,
        silu_mul,
        silu_mul_reference,
    )
    from kernels.triton_rope import rope_kv_write, rope_kv_write_reference

    t, hidden, heads, kv_heads, dim = 37, 4096, 32, 8, 128
    x, res = (torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    for got, ref in zip(add_rms_norm(x, res, weight, 1e-5),
                        add_rms_norm_reference(x, res, weight, 1e-5), strict=True):
        assert _rel(got, ref) < 1e-2
    gate_up = torch.randn(t, 2 * 14336, device="cuda", dtype=torch.bfloat16) * 4
    assert _rel(silu_mul(gate_up), silu_mul_reference(gate_up)) < 1e-2
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 4000, (t,), device="cuda")
    freqs = torch.outer(torch.arange(4096.0), 1e4 ** -(torch.arange(0, dim, 2) / dim)).cuda()
    slots = torch.randperm(64 * 16, device="cuda")[:t]
    caches = []
    for fn in (rope_kv_write, rope_kv_write_reference):
        q = qkv.clone()
        k_cache, v_cache = (torch.full((64, 16, kv_heads, dim), float("nan"), device="cuda",
                                       dtype=torch.bfloat16) for _ in range(2))
        fn(q, positions, freqs.cos(), freqs.sin(), k_cache, v_cache, slots, heads, kv_heads)
        caches.append((q, k_cache, v_cache))
    for got, ref in zip(*caches, strict=True):
        assert torch.equal(got.isnan(), ref.isnan())  # the same slots written
        assert _rel(got.nan_to_num(), ref.nan_to_num()) < 1e-2
