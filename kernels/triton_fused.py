"""Fused Triton kernels for the pointwise parts of the Llama forward, each beside its torch
reference (same signature, suffix `_reference`), which the tests compare against.

- `add_rms_norm`: residual add + RMS norm (one program per row).
- `rope_kv_write`: RoPE on the q and k heads of the qkv projection, in place, plus the store
  of k and v into the paged KV cache (one program per (token, head)).
- `silu_mul`: the SwiGLU activation silu(gate) * up.

Math is float32, results are stored in the activation dtype. The number of tokens T is only
a grid dimension, never a kernel argument, so one compiled kernel serves every batch size;
row widths are constexpr powers of two with masks. Nothing reads tensor data on the host, so
all three can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import await_inputs, pdl_args


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 math for low-precision inputs; float64 inputs give a float64 ground truth."""
    return torch.promote_types(dtype, torch.float32)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         stride_x, stride_res, stride_out, stride_res_out,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (x * rstd * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden] -> (normed, residual_out), both [T, hidden] in x.dtype.

    residual_out = x + residual rounded to x.dtype (x itself when residual is None), and
    normed = residual_out * rsqrt(mean(residual_out^2) + eps) * weight in float32.
    """
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.shape == x.shape[-1:]
    has_residual = residual is not None
    if has_residual:
        assert residual.shape == x.shape and residual.stride(-1) == 1
    else:
        residual = x  # a placeholder pointer: without HAS_RESIDUAL nothing reads or stores it
    normed = torch.empty_like(x)
    residual_out = torch.empty_like(x) if has_residual else x
    block = triton.next_power_of_2(x.shape[1])
    _add_rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, normed, residual_out, x.shape[1], eps,
        x.stride(0), residual.stride(0), normed.stride(0), residual_out.stride(0),
        HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
        **pdl_args(x.device),
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
def _rope_kv_write_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          stride_qkv, stride_table, block_size, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, half,
                          NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                          BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < half
    src = qkv_ptr + t * stride_qkv + head * 2 * half + offs
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + half, mask=mask, other=0.0)
    if head < NUM_HEADS + NUM_KV_HEADS:  # q or k: rotate in place
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cos_ptr + pos * stride_table + offs, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + pos * stride_table + offs, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        x1 = (a * cos - b * sin).to(x1.dtype)
        x2 = (b * cos + a * sin).to(x2.dtype)
        tl.store(src, x1, mask=mask)
        tl.store(src + half, x2, mask=mask)
    if head >= NUM_HEADS:  # k or v: store at the token's flat slot block * block_size + offset
        slot = tl.load(slot_ptr + t)
        block, offset = slot // block_size, slot % block_size
        if head < NUM_HEADS + NUM_KV_HEADS:
            dst = (k_cache_ptr + block * stride_kb + offset * stride_ks
                   + (head - NUM_HEADS) * stride_kh + offs)
        else:
            dst = (v_cache_ptr + block * stride_vb + offset * stride_vs
                   + (head - NUM_HEADS - NUM_KV_HEADS) * stride_vh + offs)
        tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + half, x2.to(dst.dtype.element_ty), mask=mask)


def rope_kv_write(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                  sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """Rotate-half RoPE on the q and k heads of qkv in place, and store k, v in the cache.

    qkv: [T, (num_heads + 2 * num_kv_heads) * head_dim], heads in q, k, v order;
    positions, slot_mapping: [T] int64; cos_table, sin_table: [max_pos, head_dim / 2] float32;
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], slot = block *
    block_size + offset. Rotation math is float32, stored back in qkv.dtype.
    """
    num_all = num_heads + 2 * num_kv_heads
    head_dim = k_cache.shape[-1]
    assert qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.shape[1] == num_all * head_dim
    assert k_cache.shape == v_cache.shape and k_cache.shape[2] == num_kv_heads
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert cos_table.stride() == sin_table.stride() and cos_table.shape[1] * 2 == head_dim
    assert cos_table.stride(1) == 1 and cos_table.dtype == sin_table.dtype == torch.float32
    _rope_kv_write_kernel[(qkv.shape[0], num_all)](
        qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos_table.stride(0), k_cache.shape[1],
        *k_cache.stride()[:3], *v_cache.stride()[:3], head_dim // 2,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), num_warps=1, **pdl_args(qkv.device),
    )


def rope_kv_write_reference(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                            sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """Torch version of `rope_kv_write`."""
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, -1)
    qk = heads[:, : num_heads + num_kv_heads].to(_acc_dtype(qkv.dtype))
    cos = cos_table[positions].unsqueeze(1).to(qk.dtype)  # [T, 1, head_dim / 2]
    sin = sin_table[positions].unsqueeze(1).to(qk.dtype)
    x1, x2 = qk.chunk(2, dim=-1)
    heads[:, : num_heads + num_kv_heads] = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    k, v = heads[:, num_heads : num_heads + num_kv_heads], heads[:, num_heads + num_kv_heads :]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, stride_in, stride_out, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    src = gate_up_ptr + row * stride_in + cols
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + n_cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * I] (gate, then up) -> silu(gate) * up [T, I] in gate_up.dtype."""
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0
    n = gate_up.shape[1] // 2
    out = gate_up.new_empty(gate_up.shape[0], n)
    block = min(triton.next_power_of_2(n), 1024)
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(n, block))](
        gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4,
        **pdl_args(gate_up.device),
    )
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch version of `silu_mul`."""
    gate, up = gate_up.to(_acc_dtype(gate_up.dtype)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
