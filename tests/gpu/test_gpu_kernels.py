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

    seq_lens = [q_len + 7, 1000 + q_len, 2047]
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
