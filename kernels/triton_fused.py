"""Fused Triton kernels for the pointwise parts of the Llama forward, each beside its torch
reference (same signature, suffix `_reference`), which the tests compare against.

- `add_rms_norm`: residual add + RMS norm (one program per row).
- `add_norm_deferred`: the same for a packed GEMV's row at batch-1 decode, over many
  programs, leaving the norm's scale (rsqrt of the mean square) for the kernel after the
  GEMV: see `RowNorm`.
- `rope_kv_write`: RoPE on the q and k heads of the qkv projection (after their RMS norms,
  for Qwen3), in place, plus the store of k and v into the paged KV cache (one program per
  (token, head)).
- `silu_mul`: the SwiGLU activation silu(gate) * up.

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
def _rope_kv_write_kernel(in_ptr, qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
                          slot_ptr, stride_qkv, stride_table, block_size, stride_kb, stride_ks,
                          stride_kh, stride_vb, stride_vs, stride_vh, half, ss_ptr, n_ss,
                          inv_width, ss_eps, hn_ptr, hn_eps, NUM_HEADS: tl.constexpr,
                          NUM_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          SS_BLOCK: tl.constexpr, HEAD_NORM: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < half
    # positions and slots are the step's inputs, written before its first kernel: they and
    # the rotation load while the previous kernel finishes
    rotate = head < NUM_HEADS + NUM_KV_HEADS  # q or k
    turns = offs < tl.where(rotate, half, 0)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_table + offs, mask=turns, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_table + offs, mask=turns, other=0.0)
    slot = tl.load(slot_ptr + t)
    await_inputs(PDL)
    at = t * stride_qkv + head * 2 * half + offs
    scale = _row_scale(ss_ptr, t, n_ss, inv_width, ss_eps, SS_BLOCK)
    x1 = _load_input(in_ptr, at, mask, qkv_ptr.dtype.element_ty, scale)
    x2 = _load_input(in_ptr, at + half, mask, qkv_ptr.dtype.element_ty, scale)
    if rotate:  # (in place unless from GemvSums)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        if HEAD_NORM:  # the head RMS-normed first, q's weight or k's, rounded as HF rounds
            inv = 1.0 / tl.sqrt((tl.sum(a * a, 0) + tl.sum(b * b, 0)) / (2 * half) + hn_eps)
            w_at = tl.where(head < NUM_HEADS, 0, 2 * half) + offs
            w1 = tl.load(hn_ptr + w_at, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(hn_ptr + w_at + half, mask=mask, other=0.0).to(tl.float32)
            a = ((a * inv).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
            b = ((b * inv).to(x2.dtype).to(tl.float32) * w2).to(x2.dtype).to(tl.float32)
        x1 = (a * cos - b * sin).to(x1.dtype)
        x2 = (b * cos + a * sin).to(x2.dtype)
        tl.store(qkv_ptr + at, x1, mask=mask)
        tl.store(qkv_ptr + at + half, x2, mask=mask)
    if head >= NUM_HEADS:  # k or v: store at the token's flat slot block * block_size + offset
        block, offset = slot // block_size, slot % block_size
        if head < NUM_HEADS + NUM_KV_HEADS:
            dst = (k_cache_ptr + block * stride_kb + offset * stride_ks
                   + (head - NUM_HEADS) * stride_kh + offs)
        else:
            dst = (v_cache_ptr + block * stride_vb + offset * stride_vs
                   + (head - NUM_HEADS - NUM_KV_HEADS) * stride_vh + offs)
        tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + half, x2.to(dst.dtype.element_ty), mask=mask)


def rope_kv_write(qkv: torch.Tensor | GemvSums, positions: torch.Tensor,
                  cos_table: torch.Tensor, sin_table: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                  num_kv_heads: int, head_norm: tuple[torch.Tensor, float] | None = None
                  ) -> torch.Tensor:
    """Rotate-half RoPE on the q and k heads of qkv, and store k, v in the cache; returns
    qkv with q and k rotated (the same tensor, rotated in place; for `GemvSums` a new one
    whose v heads are left unwritten). `head_norm`: (weight [2 * head_dim], eps): each q
    head is first RMS-normed with the weight's first half, each k head with its second
    (Qwen3's q and k norms).

    qkv: [T, (num_heads + 2 * num_kv_heads) * head_dim], heads in q, k, v order;
    positions, slot_mapping: [T] int64; cos_table, sin_table: [max_pos, head_dim / 2] float32;
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], slot = block *
    block_size + offset. Rotation math is float32, stored back in qkv.dtype.
    """
    num_all = num_heads + 2 * num_kv_heads
    head_dim = k_cache.shape[-1]
    norm_args, norm_consts = _norm_args(qkv)
    src, dtype = _input(qkv)
    qkv = src if src.dtype == dtype else torch.empty(src.shape, dtype=dtype, device=src.device)
    assert qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.shape[1] == num_all * head_dim
    assert k_cache.shape == v_cache.shape and k_cache.shape[2] == num_kv_heads
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert cos_table.stride() == sin_table.stride() and cos_table.shape[1] * 2 == head_dim
    assert cos_table.stride(1) == 1 and cos_table.dtype == sin_table.dtype == torch.float32
    weight, eps = head_norm or (qkv, 0.0)  # (without: any tensor, never read)
    assert head_norm is None or weight.shape == (2 * head_dim,) and weight.is_contiguous()
    _rope_kv_write_kernel[(qkv.shape[0], num_all)](
        src, qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos_table.stride(0), k_cache.shape[1],
        *k_cache.stride()[:3], *v_cache.stride()[:3], head_dim // 2, *norm_args, weight, eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), num_warps=1, **norm_consts,
        HEAD_NORM=head_norm is not None, **pdl_args(qkv.device),
    )
    return qkv


def rope_kv_write_reference(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                            sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                            head_norm: tuple[torch.Tensor, float] | None = None
                            ) -> torch.Tensor:
    """Torch version of `rope_kv_write` (plain tensors)."""
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, -1)
    qk = heads[:, : num_heads + num_kv_heads]
    if head_norm is not None:
        from server.models.layers import head_rms_norm

        qk = head_rms_norm(qk, *head_norm, num_heads)
    qk = qk.to(_acc_dtype(qkv.dtype))
    cos = cos_table[positions].unsqueeze(1).to(qk.dtype)  # [T, 1, head_dim / 2]
    sin = sin_table[positions].unsqueeze(1).to(qk.dtype)
    x1, x2 = qk.chunk(2, dim=-1)
    heads[:, : num_heads + num_kv_heads] = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    k, v = heads[:, num_heads : num_heads + num_kv_heads], heads[:, num_heads + num_kv_heads :]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return qkv


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
