"""Fused Triton kernel for RoPE and the KV cache write, beside its torch reference:
`rope_kv_write` turns the q and k heads of the qkv projection (after their RMS norms, for
Qwen3 and Gemma 3) in place and stores k and v into the paged KV cache, one program per
(token, head). It takes its input as `kernels.triton_fused` kernels do: a tensor or a GEMV's
`GemvSums`, read by that module's helpers; math in float32, one compiled kernel for every
batch size, nothing read on the host (CUDA graphs capture it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention import write_kv
from kernels.pdl import await_inputs, pdl_args
from kernels.triton_fused import (
    GemvSums,
    _acc_dtype,
    _input,
    _load_input,
    _norm_args,
    _row_scale,
)


@triton.jit
def _rope_kv_write_kernel(in_ptr, qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
                          slot_ptr, stride_qkv, stride_table, block_size, stride_kb, stride_ks,
                          stride_kh, stride_vb, stride_vs, stride_vh, half, rest, ss_ptr, n_ss,
                          inv_width, ss_eps, hn_ptr, hn_eps, NUM_HEADS: tl.constexpr,
                          NUM_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          BLOCK_REST: tl.constexpr, SS_BLOCK: tl.constexpr,
                          HEAD_NORM: tl.constexpr, PDL: tl.constexpr):
    """A head is its turned dims' two halves of `half` (x1, x2) and, with a partial rotary
    embedding (BLOCK_REST > 0), the `rest` dims after them, which pass unturned (x3)."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < half
    dim = 2 * half + rest
    # positions and slots are the step's inputs, written before its first kernel: they and
    # the rotation load while the previous kernel finishes
    rotate = head < NUM_HEADS + NUM_KV_HEADS  # q or k
    turns = offs < tl.where(rotate, half, 0)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_table + offs, mask=turns, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_table + offs, mask=turns, other=0.0)
    slot = tl.load(slot_ptr + t)
    await_inputs(PDL)
    base = t * stride_qkv + head * dim
    at = base + offs
    scale = _row_scale(ss_ptr, t, n_ss, inv_width, ss_eps, SS_BLOCK)
    x1 = _load_input(in_ptr, at, mask, qkv_ptr.dtype.element_ty, scale)
    x2 = _load_input(in_ptr, at + half, mask, qkv_ptr.dtype.element_ty, scale)
    if BLOCK_REST > 0:
        offs3 = 2 * half + tl.arange(0, BLOCK_REST)
        mask3 = offs3 < dim
        x3 = _load_input(in_ptr, base + offs3, mask3, qkv_ptr.dtype.element_ty, scale)
    if rotate:  # (in place unless from GemvSums)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        if HEAD_NORM:  # the head RMS-normed first, q's weight or k's, rounded as HF rounds
            ss = tl.sum(a * a, 0) + tl.sum(b * b, 0)
            if BLOCK_REST > 0:
                ss += tl.sum(x3.to(tl.float32) * x3.to(tl.float32), 0)
            inv = 1.0 / tl.sqrt(ss / dim + hn_eps)
            w_base = tl.where(head < NUM_HEADS, 0, dim)
            w1 = tl.load(hn_ptr + w_base + offs, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(hn_ptr + w_base + half + offs, mask=mask, other=0.0).to(tl.float32)
            a = ((a * inv).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
            b = ((b * inv).to(x2.dtype).to(tl.float32) * w2).to(x2.dtype).to(tl.float32)
            if BLOCK_REST > 0:
                w3 = tl.load(hn_ptr + w_base + offs3, mask=mask3, other=0.0).to(tl.float32)
                x3 = ((x3.to(tl.float32) * inv).to(x3.dtype).to(tl.float32) * w3).to(x3.dtype)
        x1 = (a * cos - b * sin).to(x1.dtype)
        x2 = (b * cos + a * sin).to(x2.dtype)
        tl.store(qkv_ptr + at, x1, mask=mask)
        tl.store(qkv_ptr + at + half, x2, mask=mask)
        if BLOCK_REST > 0:
            tl.store(qkv_ptr + base + offs3, x3, mask=mask3)
    if head >= NUM_HEADS:  # k or v: store at the token's flat slot block * block_size + offset
        block, offset = slot // block_size, slot % block_size
        if head < NUM_HEADS + NUM_KV_HEADS:
            dst = (k_cache_ptr + block * stride_kb + offset * stride_ks
                   + (head - NUM_HEADS) * stride_kh)
        else:
            dst = (v_cache_ptr + block * stride_vb + offset * stride_vs
                   + (head - NUM_HEADS - NUM_KV_HEADS) * stride_vh)
        tl.store(dst + offs, x1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + half + offs, x2.to(dst.dtype.element_ty), mask=mask)
        if BLOCK_REST > 0:
            tl.store(dst + offs3, x3.to(dst.dtype.element_ty), mask=mask3)


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
    positions, slot_mapping: [T] int64; cos_table, sin_table: [max_pos, rot / 2] float32
    (each head's first rot dims turn, rot = head_dim but for a partial rotary embedding);
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
    half = cos_table.shape[1]
    assert cos_table.stride() == sin_table.stride() and 0 < 2 * half <= head_dim
    assert cos_table.stride(1) == 1 and cos_table.dtype == sin_table.dtype == torch.float32
    weight, eps = head_norm or (qkv, 0.0)  # (without: any tensor, never read)
    assert head_norm is None or weight.shape == (2 * head_dim,) and weight.is_contiguous()
    _rope_kv_write_kernel[(qkv.shape[0], num_all)](
        src, qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos_table.stride(0), k_cache.shape[1],
        *k_cache.stride()[:3], *v_cache.stride()[:3], half, head_dim - 2 * half, *norm_args,
        weight, eps, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(head_dim - 2 * half) if head_dim > 2 * half else 0,
        num_warps=1, **norm_consts,
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
    from server.models.rope import apply_rope

    qk = qk.to(_acc_dtype(qkv.dtype))
    cos = cos_table[positions].unsqueeze(1).to(qk.dtype)  # [T, 1, rot / 2]
    heads[:, : num_heads + num_kv_heads] = apply_rope(
        qk, cos, sin_table[positions].unsqueeze(1).to(qk.dtype))
    write_kv(heads[:, num_heads : num_heads + num_kv_heads],
             heads[:, num_heads + num_kv_heads :], k_cache, v_cache, slot_mapping)
    return qkv
