"""Building blocks of the Llama-family forward: linear (dense or packed) and the
pointwise steps (residual add + RMS norm, SwiGLU) that run either as torch ops or, with
`fused`, as Triton kernels (`kernels.triton_fused`, imported only then: triton is optional).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kernels.triton_fused import GemvSums

Activations = Union[torch.Tensor, "GemvSums"]
"""A layer's activations: a tensor, or on the fused CUDA path a GEMV's unrounded sums."""

class Embedding(torch.nn.Module):
    """The token embedding table [vocab, hidden]: a dense weight, or a packed one
    (`set_packed`: the rows or panels layout of `kernels.quant`, e.g. a tied head's), of
    which a lookup dequantizes only the rows it gathers."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.packed = None
        self._dtype = weight.dtype  # a packed table's lookups (`set_packed`)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype if self.packed is None else self._dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device if self.packed is None else self.packed.device

    def set_packed(self, packed: object) -> None:
        """Look up rows of a `kernels.quant.PackedWeight` instead of the dense weight, in
        the dense weight's dtype."""
        self._dtype = self.dtype
        self.packed = packed
        self.weight = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[*] token ids -> [*, hidden] embeddings in the table's dtype."""
        if self.packed is None:
            return F.embedding(ids, self.weight)
        from kernels.quant import dequantize_rows

        rows = dequantize_rows(self.packed, ids.reshape(-1)).to(self.dtype)
        return rows.reshape(*ids.shape, rows.shape[-1])

    def dense(self) -> torch.Tensor:
        """The whole table, dense (dequantized into a new tensor when packed)."""
        if self.packed is None:
            return self.weight
        from kernels.quant import dequantize

        return dequantize(self.packed, self.dtype)


class Linear(torch.nn.Module):
    """y = x W^T (+ b) over a dense weight [out, in]; `quantize` swaps in a packed one."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.packed = None

    @property
    def out_features(self) -> int:
        return self.packed.out_features if self.packed is not None else self.weight.shape[0]

    def set_packed(self, packed: object) -> None:
        """Serve from a `kernels.quant.PackedWeight` instead of the dense weight."""
        self.packed = packed
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            from kernels.gemm import quantized_linear

            return quantized_linear(x, self.packed, self.bias)
        return dense_linear(x, self.weight, self.bias)

    def _fusable(self, x: Activations, fused: bool) -> bool:
        """A dense weight and one GEMV input row: the step producing x fuses into the GEMV.
        (At 2 to GEMV_ROWS rows the separate pointwise kernel and the plain row kernel took
        0.87-0.89x the device time of the fused row kernel in the default model's graphed
        steps on an H200, docs/benchmarks/gpu.md run 108.)"""
        return (fused and self.packed is None and isinstance(x, torch.Tensor)
                and x.shape[0] == 1 and _gemv_input(x, self.weight))

    def _hands_sums(self, x: torch.Tensor, fused: bool) -> bool:
        """Whether `project` leaves this product's sums unrounded (x: its input, or a tensor
        of the input's shape, dtype and device)."""
        if fused and self.packed is not None and self.bias is None and x.shape[0] == 1:
            from kernels.gemv_sums import mma_gemv_sums_supported

            return mma_gemv_sums_supported(x, self.packed)
        return False

    def project(self, x: torch.Tensor, fused: bool) -> Activations:
        """self(x), except that with `fused`, for a packed weight without bias at batch-1
        decode on CUDA (the mma GEMV), the sums are left unrounded for the next fused
        kernel (`kernels.triton_fused.GemvSums`): the GEMV then has no split-K merge."""
        if self._hands_sums(x, fused):
            from kernels.gemv_sums import mma_gemv_sums

            return mma_gemv_sums(x, self.packed)
        return self(x)

    def after_norm(self, x: Activations, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                   eps: float, fused: bool) -> tuple[Activations, torch.Tensor]:
        """(self(rms_norm(x + residual) * norm_weight), x + residual), the norm fused into
        the dense GEMV of one row on CUDA (one kernel instead of two); see `project`. Where
        `project` hands on sums, the norm's scale goes with them to the next kernel
        (`kernels.triton_fused.add_norm_deferred`): the norm's programs then each take a
        slice of the row, none waiting on the whole row's sum of squares."""
        if self._hands_sums(x if residual is None else residual, fused):
            from kernels.gemv_sums import mma_gemv_sums
            from kernels.triton_fused import add_norm_deferred

            weighted, residual, norm = add_norm_deferred(x, residual, norm_weight, eps)
            return replace(mma_gemv_sums(weighted, self.packed), norm=norm), residual
        if not self._fusable(x, fused):
            h, residual = add_rms_norm(x, residual, norm_weight, eps, fused)
            return self.project(h, fused), residual
        from kernels.triton_dense_gemv import dense_gemv

        out, residual = dense_gemv(x, self.weight, norm=(residual, norm_weight, eps))
        return (out if self.bias is None else out + self.bias), residual

    def after_silu(self, gate_up: Activations, fused: bool) -> Activations:
        """self(silu(gate) * up) of a [T, 2 * in_features] gate/up projection, the SwiGLU
        fused into the dense GEMV of one row on CUDA; see `project`."""
        if not self._fusable(gate_up, fused):
            return self.project(silu_mul(gate_up, fused), fused)
        from kernels.triton_dense_gemv import dense_gemv

        out = dense_gemv(gate_up, self.weight, silu=True)
        return out if self.bias is None else out + self.bias


GEMV_ROWS = 6
"""Rows up to which 16-bit dense products on CUDA go to `dense_gemv` (at one row with the
norm or the SwiGLU before them fused in). The default model's graphed steps on an H200
(docs/benchmarks/gpu.md): at 2-6 rows the fused row kernel took 0.89-0.99x the device time
of cuBLAS after separate pointwise kernels (run 97), and the plain row kernel after them
0.87-0.89x that of the fused one (run 108); at 8-16 rows the row kernel took 1.02-1.18x
cuBLAS's (run 97)."""


def _gemv_input(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """1 to GEMV_ROWS 16-bit rows on CUDA, in the weight's dtype: what `dense_gemv` serves
    (decode of small batches, verification of a few drafts)."""
    return (x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= GEMV_ROWS
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear (result in `out_dtype`, default x's), except that 1 to GEMV_ROWS 16-bit rows
    on CUDA go to the Triton GEMV (`kernels.triton_dense_gemv.dense_gemv`): at batch 1 cuBLAS
    reads the smaller decode weights well below memory bandwidth (57% on 4096x4096, H200)."""
    if _gemv_input(x, weight):
        from kernels.triton_dense_gemv import dense_gemv

        out = dense_gemv(x, weight, out_dtype)
        return out if bias is None else out + bias
    out = F.linear(x, weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def add_rms_norm(x: Activations, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden] -> (rms_norm(x + residual) * weight, x + residual); a None
    residual counts as zero. GemvSums come only with `fused`."""
    if fused:
        from kernels.triton_fused import add_rms_norm as kernel

        return kernel(x, residual, weight, eps)
    if x.is_cpu:  # float32 rows: the native kernel, where it runs
        from kernels import cpu_native

        native = cpu_native.add_rms_norm(x, residual, weight, eps)
        if native is not None:
            return native
    residual = x if residual is None else x + residual
    return F.rms_norm(residual, (residual.shape[-1],), weight, eps), residual


def head_rms_norm(qk: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int
                  ) -> torch.Tensor:
    """q's heads then k's [T, heads + kv_heads, head_dim], each RMS-normed and scaled by its
    half of `weight` [2 * head_dim] (Qwen3's q and k norms), in qk's dtype with float32
    math, rounded as transformers rounds them."""
    x = qk.to(torch.promote_types(qk.dtype, torch.float32))
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(qk.dtype)
    halves = weight.view(2, -1).to(qk.dtype)
    return normed * halves[(torch.arange(qk.shape[1], device=qk.device) >= num_heads).long()]


def gelu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate, then up) -> gelu_tanh(gate) * up [T, I] (Gemma's GeGLU:
    the native kernel for float32 rows on the CPU, where it runs; else torch's ops)."""
    if gate_up.is_cpu:
        from kernels import cpu_native

        native = cpu_native.gelu_mul(gate_up)
        if native is not None:
            return native
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_mul(gate_up: Activations, fused: bool) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate, then up) -> silu(gate) * up [T, I]. GemvSums come only
    with `fused`."""
    if fused:
        from kernels.triton_fused import silu_mul as kernel

        return kernel(gate_up)
    if gate_up.is_cpu:  # float32 rows: the native kernel, where it runs
        from kernels import cpu_native

        native = cpu_native.silu_mul(gate_up)
        if native is not None:
            return native
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
