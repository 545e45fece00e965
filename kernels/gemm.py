"""Quantized linear layer: the one seam `quantized_linear(x, packed, bias)`.

Dispatch (here and nowhere else):
- CUDA tensors -> the Triton W4A16 / W8A16 kernels in `kernels.triton_gemm` (``words`` layout;
  a ``rows`` weight is converted once and the copy cached).
- CPU tensors -> the native kernel `kernels.cpu_native` (AVX-512 VNNI or AVX2: activations
  quantized to int16 per block of 32, integer dot products) for every row count where it is
  built (a row's result then does not depend on the batch, `takes_every_row_count`); else
  torch's packed CPU kernels (bfloat16 activations, see `_cpu_linear`): int4 through
  `_weight_int4pack_mm_for_cpu` (its own nibble packing, built once per weight and kept in
  `PackedWeight.cache`), int8 per channel through `_weight_int8pack_mm`, group-wise int8 (GGUF
  Q8_0) as two int4 nibble weights side by side in one int4 matmul (`_cpu_int8`). From
  `_CPU_DENSE_ROWS` rows on (prefill), and where a torch build lacks these ops,
  dequantize-then-matmul.
- `quantized_linear_reference`: dequantize in float32 and matmul; the ground truth.
"""

from __future__ import annotations

import torch

from kernels import cpu_native
from kernels.quant import PackedWeight, dequantize, unpack_int4

_CPU_INT4_GROUPS = (32, 64, 128, 256)
# Rows from which the CPU path dequantizes to bfloat16 and runs the dense GEMM: on 2 cores
# (torch 2.13, SmolLM2-135M shapes) the packed kernels' time grows with M at ~2-4x the
# bfloat16 GEMM's rate, so at M = 128 int4 3072x576 takes 3.40 ms packed against 1.0
# (dequantize) + 1.5 (GEMM), and int8 576x1536 1.72 against 1.11; at M = 64 int4 ties
# (1.78 vs 1.89 ms) and Q8_0 3072x576 already gains (3.55 vs 1.94).
_CPU_DENSE_ROWS = {"int4": 128, "int8": 64}


def quantized_linear_reference(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [*, K] @ dequantize(packed).T (+ bias) in float32, returned in x's dtype."""
    out = x.float() @ dequantize(packed).to(x.device).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quantized_linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [*, K] -> [*, N] through the packed weight, on x's device, in x's dtype."""
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {packed.in_features}")
    # (cheap checks first: at one row on the CPU this seam's own cost counts, ~120 calls a token)
    if x.is_cpu != packed.qweight.is_cpu or not x.is_cpu and x.device != packed.device:
        raise ValueError(f"x is on {x.device} but the weight is on {packed.device}")
    x2 = x if x.dim() == 2 else x.reshape(-1, packed.in_features)
    if x.is_cuda:
        from kernels.triton_gemm import triton_quantized_linear

        out = triton_quantized_linear(x2, packed)
    elif packed.layout == "words":
        raise ValueError("the words layout is for the CUDA kernels; use the rows layout on CPU")
    else:
        out = _cpu_linear(x2, packed)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], packed.out_features)


def takes_every_row_count(packed: PackedWeight) -> bool:
    """Whether `quantized_linear` runs this weight through one kernel whatever the number of
    rows, each row's result independent of the others (the native CPU kernel), so that a
    dense copy of the weight is never needed for speed and results do not depend on the
    batch."""
    return cpu_native.supports(packed)  # (the rows and panels layouts only)


def _has_cpu_ops() -> bool:
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in (
        "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu",
        "_weight_int8pack_mm"))


def _cpu_linear(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """[M, K] -> [M, N] on the CPU: the native kernel where it runs (see the module docs).

    Otherwise float32 activations are rounded to bfloat16 for torch's packed kernels, whose
    float32 variants are 10-25x slower in torch 2.13 (measured: 49152x576 int4, M = 1: 24 ms vs
    1 ms); the kernels accumulate in float32 and the result is returned as float32.
    From `_CPU_DENSE_ROWS` rows on (prefill, big batches) the weight is dequantized to
    bfloat16 for the dense GEMM instead (a transient copy).
    """
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return x @ dequantize(packed, x.dtype).t()
    if cpu_native.supports(packed):
        return cpu_native.linear(x, packed)
    if not _has_cpu_ops() or packed.layout != "rows":  # (panels: the native kernel turned off)
        return x @ dequantize(packed, x.dtype).t()
    xc = x.to(torch.bfloat16) if x.dtype == torch.float32 else x
    if x.shape[0] >= _CPU_DENSE_ROWS[packed.scheme]:
        return (xc @ dequantize(packed, xc.dtype).t()).to(x.dtype)
    if packed.scheme == "int4" and packed.group_size in _CPU_INT4_GROUPS:
        return _cpu_int4(xc, packed).to(x.dtype)
    if packed.scheme == "int8":
        return _cpu_int8(xc, packed).to(x.dtype)
    return x @ dequantize(packed, x.dtype).t()


def _cpu_int4(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """tinygemm's CPU int4 kernel: w = (q - 8) * scale + zero, so zero = offset + 8 * scale."""
    key = ("cpu_int4", x.dtype)
    if key not in packed.cache:
        q = unpack_int4(packed.qweight).to(torch.int32)  # [N, K]
        scales = packed.scales.float()
        zeros = packed.offsets.float() + 8 * scales
        scale_zero = torch.stack([scales.t(), zeros.t()], dim=-1)  # [K // G, N, 2]
        packed.cache[key] = (
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2),
            scale_zero.to(x.dtype).contiguous(),
        )
    weight, scale_zero = packed.cache[key]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.contiguous(), weight, packed.group_size, scale_zero)


def _cpu_int8(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """Per channel: one int8 matmul. Group-wise (GGUF Q8_0): each code q = 16 h + l splits
    into a signed high nibble h in [-8, 7] and a low one l in [0, 15], so the weight is
    two int4 weights side by side along K, [16 d h | d l] (tinygemm's int4 form: scale 16 d,
    zero 0 for h + 8; scale d, zero 8 d for l), multiplied by [x | x] in one int4 matmul:
    2.1-2.3x faster than one int8 matmul a group (49152x576, M = 1 and 8) and exact up to
    the kernel's bfloat16 scales. Groups the int4 kernel cannot take: one int8 matmul a
    group, summed in float32."""
    n, k, gs = packed.out_features, packed.in_features, packed.group_size
    x = x.contiguous()
    if gs == k:
        return torch.ops.aten._weight_int8pack_mm(x, packed.qweight, packed.scales[:, 0].to(x.dtype))
    if gs in _CPU_INT4_GROUPS:
        key = ("cpu_int8_nibbles", x.dtype)
        if key not in packed.cache:
            q = packed.qweight.to(torch.int32)
            codes = torch.cat([(q >> 4) + 8, q & 15], dim=1)  # [N, 2K]
            d = packed.scales.float()  # [N, K // G]
            scales = torch.cat([16 * d, d], dim=1)
            zeros = torch.cat([torch.zeros_like(d), 8 * d], dim=1)
            packed.cache[key] = (
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2),
                torch.stack([scales.t(), zeros.t()], dim=-1).to(x.dtype).contiguous(),
            )
        weight, scale_zero = packed.cache[key]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            torch.cat([x, x], dim=1), weight, gs, scale_zero)
    key = ("cpu_int8", x.dtype)
    if key not in packed.cache:  # [groups, N, G] weight slices, [groups, N] scales
        slices = packed.qweight.reshape(n, k // gs, gs).transpose(0, 1).contiguous()
        packed.cache[key] = (slices, packed.scales.t().to(x.dtype).contiguous())
    slices, scales = packed.cache[key]
    out = torch.zeros(x.shape[0], n, dtype=torch.float32)
    for g in range(k // gs):
        xg = x[:, g * gs:(g + 1) * gs].contiguous()
        out += torch.ops.aten._weight_int8pack_mm(xg, slices[g], scales[g]).float()
    return out.to(x.dtype)

