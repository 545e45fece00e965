"""Fused Triton kernels for the pointwise parts of the Llama forward, each beside its torch
reference (same signature, suffix `_reference`), which the tests compare against.

- `add_rms_norm`: residual add + RMS norm (one program per row).
- `add_norm_deferred`: the same for a packed GEMV's row at batch-1 decode, over many
  programs, leaving the norm's scale (rsqrt of the mean square) for the kernel after the
  GEMV: see `RowNorm`.
- `silu_mul`: the SwiGLU activation silu(gate) * up.

(`kernels.triton_rope.rope_kv_write`, RoPE + the KV cache write, takes its inputs by the
helpers here too.)

Math is float32, results are stored in the activation dtype. The number of tokens T is only
a grid dimension, never a kernel argument, so one compiled kernel serves every batch size;
row widths are constexpr powers of two with masks. Nothing reads tensor data on the host, so
all three can be captured in CUDA graphs.

Each also takes its input as `GemvSums`: a split-K GEMV's sums, added by its programs into
a zeroed int64 buffer in fixed point, which the kernel rounds to the activation dtype (as
the GEMV's own store would have), then zeroes for the next GEMV. The GEMV then needs no
merge of its own (`kernels.gemv_sums.mma_gemv_sums`). Integer addition does not
depend on the order of the programs' adds, so the result is deterministic. Sums with a
`RowNorm` are scaled by it as they are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.pdl import await_inputs, pdl_args

FIXED_ONE = 2.0**32
"""A GEMV's float32 sums count in units of 2^-32 in a `GemvSums` buffer: exact for |sum| <
2^31 down to 2^-32 (split-K adds one rounding of at most 2^-32 a program)."""


@dataclass
class RowNorm:
    """An RMS norm's scale still owed to each row of a GEMV's output: rsqrt(sum of the row's
    `partials` / `width` + `eps`), where `partials` [M, P] float32 are the sums of squares
    of P slices of the norm's input row (`add_norm_deferred`). The norm's weight was
    applied before the GEMV; the row's scale, a scalar, commutes with it."""

    partials: torch.Tensor
    width: int
    eps: float


@dataclass
class GemvSums:
    """A GEMV's output [M, N] as int64 fixed-point sums (`FIXED_ONE`) not yet rounded to
    `dtype` (nor scaled by `norm`, if any); the next kernel here reads and zeroes them,
    exactly once."""

    sums: torch.Tensor
    dtype: torch.dtype
    norm: RowNorm | None = None

    @property
    def shape(self) -> torch.Size:
        return self.sums.shape


@triton.jit
def _row_scale(ss_ptr, row, n_ss, inv_width, eps, SS_BLOCK: tl.constexpr):
    """A `RowNorm`'s scale of `row` from its n_ss partial sums of squares (summed in one
    fixed order); 1 when SS_BLOCK is 0 (no RowNorm)."""
    scale = 1.0
    if SS_BLOCK > 0:
        i = tl.arange(0, SS_BLOCK)
        ss = tl.load(ss_ptr + row * n_ss + i, mask=i < n_ss, other=0.0)
        scale = 1.0 / tl.sqrt(tl.sum(ss, axis=0) * inv_width + eps)
    return scale


@triton.jit
def _load_input(ptr, offs, mask, DTYPE: tl.constexpr, scale):
    """Values at ptr + offs in DTYPE: int64 `GemvSums` are scaled by `scale` (`_row_scale`),
    rounded to DTYPE and zeroed behind; other inputs load as they are. (Triton may lay the
    zeros' store out over other threads than the load, so a barrier keeps any thread from
    zeroing a value before the thread that loads it has read it: without it the sums came
    out wrong on an H200.)"""
    if ptr.dtype.element_ty == tl.int64:
        v = tl.load(ptr + offs, mask=mask, other=0)
        tl.debug_barrier()
        tl.store(ptr + offs, tl.zeros_like(v), mask=mask)
        v = (v.to(tl.float32) * (1.0 / 4294967296.0) * scale).to(DTYPE)
    else:
        v = tl.load(ptr + offs, mask=mask, other=0)
    return v


def _input(x: torch.Tensor | GemvSums) -> tuple[torch.Tensor, torch.dtype]:
    """(the tensor a kernel reads, the activation dtype) of an input."""
    return (x.sums, x.dtype) if isinstance(x, GemvSums) else (x, x.dtype)


def _norm_args(x: torch.Tensor | GemvSums) -> tuple[tuple, dict[str, int]]:
    """The kernels' `_row_scale` arguments for an input: (ss_ptr, n_ss, inv_width, eps)
    and SS_BLOCK (0 without a `RowNorm`; then ss_ptr is any tensor, never read)."""
    norm = x.norm if isinstance(x, GemvSums) else None
    if norm is None:
        return (_input(x)[0], 0, 1.0, 0.0), {"SS_BLOCK": 0}
    p = norm.partials
    assert p.dim() == 2 and p.stride(1) == 1 and p.stride(0) == p.shape[1]
    return ((p, p.shape[1], 1.0 / norm.width, norm.eps),
            {"SS_BLOCK": triton.next_power_of_2(p.shape[1])})


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 math for low-precision inputs; float64 inputs give a float64 ground truth."""
    return torch.promote_types(dtype, torch.float32)


@triton.jit
def _add_residual(x_ptr, res_ptr, res_out_ptr, row, cols, mask, stride_x, stride_res,
                  stride_res_out, scale, HAS_RESIDUAL: tl.constexpr):
    """A norm's input row in float32: x (`_load_input`, scaled by `scale`) plus the residual,
    rounded to the activation dtype, and stored as the new residual wherever it is not x
    itself."""
    dtype = res_out_ptr.dtype.element_ty
    x = _load_input(x_ptr, row * stride_x + cols, mask, dtype, scale)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
    if HAS_RESIDUAL or x_ptr.dtype.element_ty == tl.int64:
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    return x.to(tl.float32)


def _norm_inputs(x: torch.Tensor | GemvSums, residual: torch.Tensor | None,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """A norm kernel's (x, residual, residual_out, HAS_RESIDUAL) for its inputs: residual is
    a placeholder pointer (x) when there is none, and residual_out is x itself when x is
    already the new residual (a tensor in the activation dtype, no residual)."""
    x, dtype = _input(x)
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.shape == x.shape[-1:]
    has_residual = residual is not None
    if has_residual:
        assert residual.shape == x.shape and residual.stride(-1) == 1
    else:
        residual = x  # without HAS_RESIDUAL nothing reads it
    residual_out = (x if not has_residual and x.dtype == dtype
                    else torch.empty(x.shape, dtype=dtype, device=x.device))
    return x, residual, residual_out, has_residual


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         stride_x, stride_res, stride_out, stride_res_out, ss_ptr, n_ss,
                         inv_width, ss_eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                         SS_BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # before the wait: a weight
    await_inputs(PDL)
    scale = _row_scale(ss_ptr, row, n_ss, inv_width, ss_eps, SS_BLOCK)
    x = _add_residual(x_ptr, res_ptr, res_out_ptr, row, cols, mask, stride_x, stride_res,
                      stride_res_out, scale, HAS_RESIDUAL)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(out_ptr + row * stride_out + cols, (x * rstd * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm(x: torch.Tensor | GemvSums, residual: torch.Tensor | None,
                 weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden] -> (normed, residual_out), both [T, hidden] in x.dtype.

    residual_out = x + residual rounded to x.dtype (x itself when residual is None; x
    rounded when it is `GemvSums`), and normed = residual_out * rsqrt(mean(residual_out^2) +
    eps) * weight in float32.
    """
    norm_args, norm_consts = _norm_args(x)
    x, residual, residual_out, has_residual = _norm_inputs(x, residual, weight)
    normed = torch.empty(x.shape, dtype=residual_out.dtype, device=x.device)
    block = triton.next_power_of_2(x.shape[1])
    _add_rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, normed, residual_out, x.shape[1], eps,
        x.stride(0), residual.stride(0), normed.stride(0), residual_out.stride(0), *norm_args,
        HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
        **norm_consts, **pdl_args(x.device),
    )
    return normed, residual_out


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch version of `add_rms_norm`."""
    residual_out = x if residual is None else x + residual
    r = residual_out.to(_acc_dtype(x.dtype))
    normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight.to(r.dtype)
    return normed.to(x.dtype), residual_out


@triton.jit
def _add_norm_deferred_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, ss_ptr, n_cols,
                              stride_x, stride_res, stride_out, stride_res_out,
                              HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                              PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # before the wait: a weight
    await_inputs(PDL)
    x = _add_residual(x_ptr, res_ptr, res_out_ptr, row, cols, mask, stride_x, stride_res,
                      stride_res_out, 1.0, HAS_RESIDUAL)
    tl.store(ss_ptr + row * tl.num_programs(1) + part, tl.sum(x * x, axis=0))
    tl.store(out_ptr + row * stride_out + cols, (x * w).to(out_ptr.dtype.element_ty), mask=mask)


DEFERRED_BLOCK = 256
"""Columns a program of `add_norm_deferred` (16 programs for a row of 4096)."""


def add_norm_deferred(x: torch.Tensor | GemvSums, residual: torch.Tensor | None,
                      weight: torch.Tensor, eps: float,
                      ) -> tuple[torch.Tensor, torch.Tensor, RowNorm]:
    """`add_rms_norm` less its scale: (residual_out * weight, residual_out, the RowNorm that
    scales a GEMV's output of the first by rsqrt(mean(residual_out^2) + eps)), where
    residual_out = x + residual as in `add_rms_norm`. Its programs each take DEFERRED_BLOCK
    columns of a row and store their sum of squares, so no program waits on a whole row's
    reduction; the GEMV's next kernel sums the partials (`_row_scale`)."""
    if isinstance(x, GemvSums) and x.norm is not None:
        raise ValueError("add_norm_deferred takes sums without a RowNorm of their own")
    x, residual, residual_out, has_residual = _norm_inputs(x, residual, weight)
    rows, width = x.shape
    parts = triton.cdiv(width, DEFERRED_BLOCK)
    weighted = torch.empty(x.shape, dtype=residual_out.dtype, device=x.device)
    partials = torch.empty(rows, parts, dtype=torch.float32, device=x.device)
    _add_norm_deferred_kernel[(rows, parts)](
        x, residual, weight, weighted, residual_out, partials, width, x.stride(0),
        residual.stride(0), weighted.stride(0), residual_out.stride(0),
        HAS_RESIDUAL=has_residual, BLOCK=DEFERRED_BLOCK, num_warps=2, **pdl_args(x.device),
    )
    return weighted, residual_out, RowNorm(partials, width, eps)


def add_norm_deferred_reference(x: torch.Tensor, residual: torch.Tensor | None,
                                weight: torch.Tensor, eps: float,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch version of `add_norm_deferred`, with the rows' scales [T, 1] in place of the
    RowNorm."""
    residual_out = x if residual is None else x + residual
    r = residual_out.to(_acc_dtype(x.dtype))
    scale = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    return (r * weight.to(r.dtype)).to(x.dtype), residual_out, scale


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, stride_in, stride_out, ss_ptr, n_ss,
                     inv_width, ss_eps, BLOCK: tl.constexpr, SS_BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    at = row * stride_in + cols
    scale = _row_scale(ss_ptr, row, n_ss, inv_width, ss_eps, SS_BLOCK)
    dtype = out_ptr.dtype.element_ty
    gate = _load_input(gate_up_ptr, at, mask, dtype, scale).to(tl.float32)
    up = _load_input(gate_up_ptr, at + n_cols, mask, dtype, scale).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


SILU_BLOCK = 256
"""Columns a program of `silu_mul`. In the 8B shape's graphed int4 decode steps on an H200
(docs/benchmarks/gpu.md, run 140) programs of 256 (2 warps) against 1024 (4 warps) took
0.97x the time of a step at batch 16 and 0.996-0.999x at batch 1; other steps the same."""


def silu_mul(gate_up: torch.Tensor | GemvSums) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate, then up) -> silu(gate) * up [T, I] in gate_up.dtype."""
    norm_args, norm_consts = _norm_args(gate_up)
    gate_up, dtype = _input(gate_up)
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0
    n = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], n, dtype=dtype, device=gate_up.device)
    block = min(triton.next_power_of_2(n), SILU_BLOCK)
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(n, block))](
        gate_up, out, n, gate_up.stride(0), out.stride(0), *norm_args, BLOCK=block,
        num_warps=2, **norm_consts, **pdl_args(gate_up.device),
    )
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch version of `silu_mul`."""
    gate, up = gate_up.to(_acc_dtype(gate_up.dtype)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
