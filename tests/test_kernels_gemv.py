"""The M = 1 GEMV kernel (interpreted on CPU): exact decoding of extreme codes, split-K, tails.

Weights are built from integer codes with power-of-two scales and activations are small
integers, so every product and partial sum is exact in float32 and the kernel must match
the reference exactly (up to the final float16 rounding).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.gemm import quantized_linear_reference  # noqa: E402
from kernels.quant import PackedWeight, pack_int4, to_words  # noqa: E402

triton_gemv = pytest.importorskip("kernels.triton_gemv")
triton_dense_gemv = pytest.importorskip("kernels.triton_dense_gemv")


def _packed(scheme: str, n: int, k: int, group: int) -> PackedWeight:
    g = torch.Generator().manual_seed(0)
    scales = (2.0 ** torch.randint(-3, 1, (n, k // group), generator=g)).half()
    if scheme == "int4":
        q = torch.randint(0, 16, (n, k), generator=g)
        q[0, :] = 15  # extremes of the code range, every nibble position
        q[1, :] = 0
        offsets = torch.randint(-8, 1, (n, k // group), generator=g).half()
        return PackedWeight("int4", n, k, group, pack_int4(q.to(torch.uint8)), scales, offsets)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    q[0, :] = 127
    q[1, :] = -128
    return PackedWeight("int8", n, k, group, q, scales)


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 128), ("int8", 32), ("int8", 352)])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "split_k": 1},
                                    {"BLOCK_N": 64, "split_k": 3}])
def test_gemv_exact_on_integer_data(scheme, group, config):
    n, k = 40, 352 if group in (32, 352) else 384  # ragged N; split-K with uneven shares
    packed = to_words(_packed(scheme, n, k, group))
    x = torch.randint(-3, 4, (1, k)).to(torch.float16)
    counters = torch.zeros(64, dtype=torch.int32)
    for _ in range(2):  # the second call checks the split-K counters were reset
        out = torch.full((1, n), float("nan"), dtype=torch.float16)
        triton_gemv.triton_gemv(x, packed, out, counters, config)
        ref = quantized_linear_reference(x.float(), packed).half()
        assert torch.equal(out, ref)
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("scheme,n,k,group", [
    ("int4", 40, 256, 128), ("int4", 64, 192, 64), ("int4", 48, 96, 32), ("int4", 40, 256, 64),
    ("int8", 40, 256, 256), ("int8", 64, 192, 192), ("int8", 48, 320, 320),
    ("int8", 40, 96, 32), ("int8", 64, 256, 64)])
@pytest.mark.parametrize("config", [{"BLOCK_N": 32, "split_k": 1, "num_warps": 1},
                                    {"BLOCK_N": 64, "split_k": 3, "num_warps": 1},
                                    {"BLOCK_N": 64, "split_k": 2, "num_warps": 2},
                                    {"BLOCK_N": 32, "split_k": 1, "num_warps": 4, "WARPS_K": 4},
                                    {"BLOCK_N": 64, "split_k": 2, "num_warps": 2, "WARPS_K": 2},
                                    {"BLOCK_N": 64, "split_k": 3, "num_warps": 2, "ROWS": 8},
                                    {"BLOCK_N": 32, "split_k": 1, "num_warps": 2, "WARPS_K": 2,
                                     "ROWS": 8},
                                    {"BLOCK_N": 64, "split_k": 3, "num_warps": 2, "ROWS": 16},
                                    {"BLOCK_N": 32, "split_k": 1, "num_warps": 2, "WARPS_K": 2,
                                     "ROWS": 16}])
def test_mma_gemv_exact_on_integer_data(scheme, n, k, group, config):
    """The tensor-core int4/int8 GEMV, M = 1..16 rows (groups of 4 or, int4 only, of 8 or
    16; the last one partial), with its mma steps emulated in tensor ops (no inline PTX under
    the interpreter; tests/gpu runs the PTX): int4 chunks of 4, 2 and 1 steps (K = 256,
    192, 96; groups of 64 always in chunks of 2); int8 per channel (chunks of 4 steps of 16
    features: 4, 3 and 5 of them), in groups of 32 (GGUF Q8_0: chunks of 2 steps, 3 of
    them) and of 64; ragged N, uneven K splits, two reps a warp, warp rows along K (some
    with no chunk);
    exact in float32."""
    from kernels.triton_mma_gemv import mma_gemv

    packed = to_words(_packed(scheme, n, k, group))
    gen = torch.Generator().manual_seed(1)
    if config.get("ROWS", 4) > 4 and scheme == "int8":
        with pytest.raises(ValueError, match="ROWS"):
            mma_gemv(torch.zeros(6, k, dtype=torch.bfloat16), packed, torch.empty(6, n), config)
        return
    rows = config.get("ROWS", 4)
    for m in (1, 2, 3, 4, 6, 16) if rows == 4 else (3, 5, 8, 11, 16) if rows == 8 else (
            3, 9, 13, 16):
        x = torch.randint(-4, 5, (m, k), generator=gen).to(torch.bfloat16)
        out = torch.full((m, n), float("nan"))
        mma_gemv(x, packed, out, config)
        assert torch.equal(out, quantized_linear_reference(x.float(), packed)), m


@pytest.mark.parametrize("config", [{"BLOCK_N": 32, "split_k": 1, "num_warps": 1},
                                    {"BLOCK_N": 64, "split_k": 3, "num_warps": 2},
                                    {"BLOCK_N": 32, "split_k": 2, "num_warps": 4, "WARPS_K": 4}])
def test_mma_gemv_sums_add_up_and_the_next_kernel_clears_them(config):
    """`mma_gemv_sums` (no split-K merge): every program adds its sums into the device's
    int64 buffer in fixed point, whose value is the product exactly; the fused kernel that
    takes them (here the SwiGLU) reads them and leaves the buffer zero for the next GEMV.
    Rows 1..4 (one group)."""
    from kernels.gemv_sums import _sums, mma_gemv_sums
    from kernels.triton_fused import FIXED_ONE, silu_mul

    for scheme, group in (("int4", 128), ("int8", 32)):
        packed = to_words(_packed(scheme, 64, 256, group))  # N = 2 x 32: a gate and an up
        gen = torch.Generator().manual_seed(2)
        for m in (1, 3, 4):
            x = torch.randint(-4, 5, (m, 256), generator=gen).to(torch.bfloat16)
            ref = quantized_linear_reference(x.float(), packed)
            sums = mma_gemv_sums(x, packed, config)
            assert sums.dtype == torch.bfloat16 and sums.shape == (m, 64)
            assert torch.equal(sums.sums.double() / FIXED_ONE, ref.double()), (scheme, m)
            # (an ulp of gate and up: the interpreter truncates, torch rounds to nearest)
            torch.testing.assert_close(silu_mul(sums), silu_mul(ref.to(torch.bfloat16)),
                                       rtol=2**-5, atol=1e-6)
            assert int(_sums[x.device].abs().sum()) == 0
    with pytest.raises(ValueError, match="up to 4 rows"):
        mma_gemv_sums(torch.zeros(5, 256, dtype=torch.bfloat16), packed, config)


def test_mma_gemv_sums_buffer_is_a_normal_tensor(monkeypatch):
    """Made under the engine's inference mode, the sums buffer is still a normal tensor: the
    autotuner restores it with copy_, which an inference tensor refuses outside inference
    mode (run 67: a kernel test after the engine tests failed so on the device)."""
    from kernels import gemv_sums

    monkeypatch.setattr(gemv_sums, "_sums", {})
    packed = to_words(_packed("int4", 64, 256, 128))
    with torch.inference_mode():
        gemv_sums.mma_gemv_sums(torch.zeros(1, 256, dtype=torch.bfloat16), packed,
                                {"BLOCK_N": 32, "split_k": 1, "num_warps": 1})
    assert not gemv_sums._sums[torch.device("cpu")].is_inference()


@pytest.mark.parametrize("m_key", [4, 8, 9, 16])
@pytest.mark.parametrize("int8", [False, True])
def test_mma_gemv_tuning_candidates(m_key, int8):
    """The tuner's candidates (8B shapes): 4 rows a program only, one warp row, for one
    group of rows; int4 beyond 4 rows adds 8 rows a program, and beyond 8 rows 16 (with one
    rep a warp, for registers); int8 keeps 4."""
    from kernels.triton_mma_gemv import _configs, _prune

    for n, k in ((6144, 4096), (4096, 14336), (28672, 4096)):
        kept = _prune(_configs(), {"N": n, "K": k}, GROUP=128, INT8=int8, CHUNK=4,
                      GROUPED=m_key > 4, M_KEY=m_key)
        rows = {c.kwargs["ROWS"] for c in kept}
        if int8 or m_key == 4:
            assert rows == {4}
        else:
            assert rows == ({4, 8} if m_key <= 8 else {4, 8, 16})
        if m_key == 4:
            assert all(c.kwargs["WARPS_K"] == 1 for c in kept)
        for c in kept:
            if c.kwargs["ROWS"] == 16:
                assert c.kwargs["BLOCK_N"] == 32 * c.num_warps // c.kwargs["WARPS_K"], c


def test_mma_gemv_int8_routing():
    """int8 reaches the mma GEMV per channel and in groups of 32 (GGUF Q8_0) or a multiple
    of 64, with K in whole chunks (any N, an odd number of chunks); other groupings are
    refused with a clear error."""
    from kernels.triton_mma_gemv import _int8_chunk, mma_gemv

    assert _int8_chunk(256, 256) == 4
    assert _int8_chunk(192, 192) == 4  # an odd chunk count
    assert _int8_chunk(96, 32) == 2  # Q8_0: a group a chunk
    assert _int8_chunk(256, 128) == 4
    assert _int8_chunk(96, 96) is None  # K not in whole chunks of 64
    assert _int8_chunk(96, 48) is None  # groups that would end inside a chunk
    packed = to_words(_packed("int8", 32, 96, 48))
    with pytest.raises(ValueError, match="groups of 48"):
        mma_gemv(torch.zeros(1, 96, dtype=torch.bfloat16), packed, torch.empty(1, 32))


@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "BLOCK_K": 64, "split_k": 1},
                                    {"BLOCK_N": 8, "BLOCK_K": 32, "split_k": 5}])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_gemv_exact_on_integer_data(config, dtype):
    """Ragged N and K (tails in both), uneven split-K shares, float32 output option."""
    g = torch.Generator().manual_seed(1)
    n, k = 37, 333
    w = torch.randint(-4, 5, (n, k), generator=g).to(dtype)
    x = torch.randint(-3, 4, (1, k), generator=g).to(dtype)
    ref = x.double() @ w.double().t()
    for _ in range(2):  # the second call checks the split-K counters were reset
        out = triton_dense_gemv.dense_gemv(x, w, torch.float32, config)
        assert out.shape == (1, n) and out.dtype == torch.float32
        assert torch.equal(out.double(), ref)
    assert int(triton_gemv._counters[torch.device("cpu")].abs().sum()) == 0
    assert torch.equal(triton_dense_gemv.dense_gemv(x, w, config=config), ref.to(dtype))


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("m", [1, 5])
def test_dense_gemv_fused_norm_and_silu_prologues(residual, m):
    """The fused input steps equal the separate kernels' references followed by the GEMV,
    at one row and at 5 (the row kernel; each row its own norm) (float16: the interpreter
    rounds float16 to nearest; its bfloat16 casts truncate)."""
    from kernels.triton_fused import add_rms_norm_reference, silu_mul_reference

    g = torch.Generator().manual_seed(2)
    n, k, dt = 24, 200, torch.float16
    w = (torch.randn(n, k, generator=g) * 0.1).to(dt)
    x = torch.randn(m, k, generator=g).to(dt) * torch.arange(1, m + 1).to(dt)[:, None]
    res = torch.randn(m, k, generator=g).to(dt) if residual else None
    nw = (torch.rand(k, generator=g) + 0.5).to(dt)
    for config in (None, {"BLOCK_N": 8 if m == 1 else 16, "BLOCK_K": 64, "split_k": 3}):
        out, res_out = triton_dense_gemv.dense_gemv(x, w, config=config, norm=(res, nw, 1e-5))
        h, ref_res = add_rms_norm_reference(x, res, nw, 1e-5)
        assert torch.equal(res_out, ref_res)
        ref = h.float() @ w.float().t()
        assert float((out.float() - ref).abs().max() / ref.abs().max()) < 2e-3
    gate_up = (torch.randn(m, 2 * k, generator=g) * 3).to(dt)
    out = triton_dense_gemv.dense_gemv(gate_up, w, torch.float32, silu=True)
    ref = silu_mul_reference(gate_up).float() @ w.float().t()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-3
    with pytest.raises(ValueError, match="shape"):
        triton_dense_gemv.dense_gemv(x, w, silu=True)


@pytest.mark.parametrize("config", [None, {"BLOCK_N": 16, "BLOCK_K": 64, "split_k": 1},
                                    {"BLOCK_N": 32, "BLOCK_K": 32, "split_k": 5}])
@pytest.mark.parametrize("m", [2, 9, 16])
def test_dense_gemv_rows_exact_on_integer_data(config, m):
    """2-16 rows (one dot a tile, rows padded to 16): ragged N and K, uneven split-K
    shares, every row exact."""
    g = torch.Generator().manual_seed(m)
    n, k, dtype = 37, 333, torch.float16
    w = torch.randint(-4, 5, (n, k), generator=g).to(dtype)
    x = torch.randint(-3, 4, (m, k), generator=g).to(dtype)
    ref = x.double() @ w.double().t()
    for _ in range(2):  # the second call checks the split-K counters were reset
        out = triton_dense_gemv.dense_gemv(x, w, torch.float32, config)
        assert out.shape == (m, n) and out.dtype == torch.float32
        assert torch.equal(out.double(), ref)
    assert int(triton_gemv._counters[torch.device("cpu")].abs().sum()) == 0
    assert torch.equal(triton_dense_gemv.dense_gemv(x, w, config=config), ref.to(dtype))
    with pytest.raises(ValueError, match="at most 16 rows"):
        triton_dense_gemv.dense_gemv(torch.zeros(17, k, dtype=dtype), w)


def test_outgrown_counters_stay_alive():
    """Graphs captured with the old counter buffer keep using it after the pool grows."""
    old = triton_gemv._tile_counters(torch.device("cpu"), 8)
    new = triton_gemv._tile_counters(torch.device("cpu"), old.numel() + 1)
    assert new.numel() > old.numel() and int(new.abs().sum()) == 0
    assert any(t is old for t in triton_gemv._outgrown)
