"""quantized_linear: the Triton kernel (interpreted on CPU) and the CPU path vs the reference.

Thresholds (relative Frobenius error against the float32 reference on the same packed
weight): float32 CPU path 1e-2 (torch's kernels round activations to bfloat16, the native
kernel quantizes them to int16 per block of 32), float16 kernel 3e-3,
bfloat16 kernel 1.5e-2 (the dequantized weight is rounded to bfloat16 before the dot).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import cpu_native  # noqa: E402
from kernels.gemm import quantized_linear, quantized_linear_reference  # noqa: E402
from kernels.quant import dequantize, quantize_int4, quantize_int8  # noqa: E402

triton_gemm = pytest.importorskip("kernels.triton_gemm")
triton_gemv = pytest.importorskip("kernels.triton_gemv")
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "unwritten (poisoned) or NaN outputs"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(params=["native", "torch"])
def cpu_kernels(request) -> Iterator[str]:
    """Each CPU kernel family in turn: the native one (skipped where it cannot run here) and
    torch's packed kernels (the native one turned off)."""
    if request.param == "native" and not cpu_native.available():
        pytest.skip("the native CPU kernel cannot run here")
    if request.param == "torch":
        with cpu_native.turned_off():
            yield request.param
    else:
        yield request.param


@pytest.fixture
def torch_kernels() -> Iterator[None]:
    """torch's packed CPU kernels only (the native one turned off)."""
    with cpu_native.turned_off():
        yield


def _weight(scheme: str, group: int | None, n: int, k: int):
    w = torch.randn(n, k) * 0.05
    return quantize_int4(w, group) if scheme == "int4" else quantize_int8(w, group)


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 128), ("int8", 32),
                                          ("int8", None)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_triton_kernel_matches_reference(scheme, group, m):
    """m = 1 takes the GEMV kernel, m > 1 the tensor-core kernel."""
    packed = _weight(scheme, group, 128, 256)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(m, 256).to(dtype)
        out = torch.full((m, 128), float("nan"), dtype=dtype)
        triton_gemm.triton_quantized_linear(x, packed, out=out)
        assert _rel(out, quantized_linear_reference(x.float(), packed)) < TOL[dtype]


@pytest.mark.parametrize("config", [triton_gemm.GemmConfig(32, 1), triton_gemm.GemmConfig(64, 3),
                                    triton_gemm.GemmConfig(64, 2, num_stages=4)])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("m", [1, 20])
def test_triton_split_k_and_ragged_shapes(config, scheme, m):
    # K = 352 is not a multiple of 128 (masked tail); N = 96 not a multiple of 64; M = 20 > 16;
    # int4 group 32: tiles of one group each
    packed = _weight(scheme, 32 if scheme == "int4" else None, 96, 352)
    for _ in range(2):  # a second call checks the split-K counters were reset
        x = torch.randn(m, 352, dtype=torch.float16)
        out = torch.full((m, 96), float("nan"), dtype=torch.float16)
        triton_gemm.triton_quantized_linear(x, packed, config=config, out=out)
        assert _rel(out, quantized_linear_reference(x.float(), packed)) < TOL[torch.float16]
    assert int(triton_gemv._counters[torch.device("cpu")].abs().sum()) == 0


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4", 64), ("int8", 32),
                                          ("int8", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_reference_with_bias_and_batch_dims(scheme, group, dtype, cpu_kernels):
    packed = _weight(scheme, group, 80, 192)
    x = torch.randn(2, 3, 192).to(dtype)
    bias = torch.randn(80)
    out = quantized_linear(x, packed, bias)
    assert out.shape == (2, 3, 80) and out.dtype == dtype
    ref = quantized_linear_reference(x.float(), packed, bias)
    assert _rel(out, ref) < TOL[dtype]
    assert _rel(quantized_linear(x, packed, bias), ref) < TOL[dtype]  # cached CPU packing


def test_cpu_group_int8_as_two_nibble_weights_is_exact(torch_kernels):
    """Group-wise int8 (Q8_0) on CPU runs as int4 nibbles [16 d h | d l]: with power-of-two
    scales and integer activations (exact in bfloat16) every product and sum is exact, so
    the output equals the reference rounded to bfloat16, bit for bit, codes -127..127."""
    packed = _weight("int8", 32, 64, 256)
    packed.qweight[0, :255] = torch.arange(-127, 128, dtype=torch.int8)
    groups = packed.scales.shape[1]
    packed.scales = (2.0 ** -torch.randint(6, 10, (64, groups))).to(packed.scales.dtype)
    packed.cache.clear()
    x = torch.randint(-8, 9, (3, 256)).to(torch.bfloat16)
    out = quantized_linear(x, packed)
    assert ("cpu_int8_nibbles", torch.bfloat16) in packed.cache
    ref = quantized_linear_reference(x.float(), packed).to(torch.bfloat16)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", 32), ("int8", None)])
def test_cpu_many_rows_take_the_dense_bfloat16_gemm(scheme, group, monkeypatch, torch_kernels):
    """From `_CPU_DENSE_ROWS` rows on (prefill) the CPU path multiplies by the weight
    dequantized to bfloat16 instead of running the packed kernel; both match the reference
    within bfloat16 rounding, and one row fewer still takes the packed kernel."""
    from kernels import gemm

    calls = []
    real = gemm.dequantize
    monkeypatch.setattr(gemm, "dequantize",
                        lambda p, dtype=torch.float32: calls.append(dtype) or real(p, dtype))
    rows = gemm._CPU_DENSE_ROWS[scheme]
    for m, dense in ((rows - 1, False), (rows, True)):
        packed = _weight(scheme, group, 80, 256)
        x = torch.randn(m, 256)
        calls.clear()
        out = quantized_linear(x, packed)
        assert calls == ([torch.bfloat16] if dense else []), m
        assert _rel(out, quantized_linear_reference(x, packed)) < 5e-3


@pytest.mark.parametrize("scheme,group,n,k", [("int4", 32, 80, 96), ("int4", 128, 300, 256),
                                              ("int8", 32, 80, 96), ("int8", None, 300, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_t_matches_dequantize(scheme, group, n, k, dtype):
    """The Triton expansion of a ``words`` weight is W.T: float32 bit for bit the reference
    (N ragged against the 256-wide tiles); bfloat16 within one unit in the last place of it
    (the interpreter truncates the cast that the GPU rounds)."""
    packed = _weight(scheme, group, n, k)
    out = triton_gemm.dequantize_t(packed, dtype)
    ref = dequantize(packed).t()
    assert out.shape == (k, n) and out.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert bool(((out.float() - ref).abs() <= ref.abs() * 2.0 ** -7).all())


def test_prefill_rows_take_the_dense_gemm(monkeypatch):
    """From DEQUANT_ROWS rows on the product runs as x @ dequantize_t(W) (and matches the
    reference); one row fewer still runs the tensor-core kernel."""
    calls = []
    real = triton_gemm.dequantize_t
    monkeypatch.setattr(triton_gemm, "dequantize_t", lambda p, d: calls.append(d) or real(p, d))
    monkeypatch.setattr(triton_gemm, "DEQUANT_ROWS", 24)
    packed = _weight("int4", 32, 48, 64)
    for m, dense in ((23, False), (24, True)):
        calls.clear()
        x = torch.randn(m, 64)
        out = triton_gemm.triton_quantized_linear(x, packed)
        assert calls == ([torch.float32] if dense else []), m
        assert _rel(out, quantized_linear_reference(x, packed)) < TOL[torch.float32]


def test_quantized_linear_validates_inputs():
    packed = _weight("int4", 32, 16, 64)
    with pytest.raises(ValueError, match="features"):
        quantized_linear(torch.randn(2, 32), packed)

