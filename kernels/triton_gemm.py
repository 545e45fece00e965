"""Triton W4A16 / W8A16 GEMM for `kernels.quant.PackedWeight` (CUDA; CPU under TRITON_INTERPRET=1).

One kernel for both schemes. A program owns BLOCK_M rows of x and BLOCK_N output features,
and walks a contiguous share of K in sub-tiles of SUB input features that lie inside one
quantization group: it loads the packed bytes ([BLOCK_N, SUB // 2] for int4, [BLOCK_N, SUB]
for int8), dequantizes them in registers with the group's scale (and offset) as one
broadcast row, and feeds tensor-core dots with float32 accumulation. int4 bytes hold
features j and j + 16 of a 32-feature chunk, so a sub-tile is two dots (low nibbles against
x's low halves, high nibbles against the high halves) and no nibble interleaving.

int8 at M = 1 goes to the GEMV kernel of `kernels.triton_gemv` (no tensor cores, no
int-to-float conversions).
Verification and small batches (M = 2..16) have too few output tiles to keep every SM streaming
weights, so K is split over SPLIT_K programs. Each writes its float32 partial tile to a
workspace and bumps a per-tile counter; the last to arrive sums the partials in a fixed
order (deterministic) and writes the output, then resets the counter to zero, so a GEMM is
one launch with no memset (also inside CUDA graphs). Counters live per device; concurrent
GEMMs on different streams of one device are not supported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.quant import PackedWeight, dequantize
from kernels.triton_gemv import gemv_supported, triton_gemv

_SUB_MAX = 128  # features per sub-tile when the group is larger


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters; None in `triton_quantized_linear` means autotune (or a default)."""

    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    unroll: int = 2


@triton.jit
def _dot(a, b_t, acc, UPCAST: tl.constexpr):
    """acc + a @ b_t.T; UPCAST (interpreter only, whose bfloat16 dot is wrong) in float32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), tl.trans(b_t).to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b_t), acc)


@triton.jit
def _subtile(acc, x_ptr, qw_ptr, s_ptr, o_ptr, offs_m, offs_n, mask_m, mask_n, live_n, sub, M, N, K,
             stride_xm, GROUP: tl.constexpr, SUB: tl.constexpr, INT4: tl.constexpr,
             EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x[:, sub tile] @ dequant(w[:, sub tile]).T.

    Scales and offsets load as zero outside `live_n`, which zeroes the whole contribution.
    """
    k0 = sub * SUB
    g = k0 // GROUP
    num_groups = K // GROUP
    scale = tl.load(s_ptr + offs_n * num_groups + g, mask=live_n, other=0.0).to(tl.float32)
    if INT4:
        HALF: tl.constexpr = SUB // 2
        b = tl.arange(0, HALF)
        k_lo = k0 + (b // 16) * 32 + (b % 16)
        if EVEN_K:
            mask_k = b < HALF
        else:
            mask_k = k_lo < K
        wmask = mask_n[:, None] & mask_k[None, :]
        p = tl.load(qw_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + b)[None, :], mask=wmask,
                    other=0)
        offset = tl.load(o_ptr + offs_n * num_groups + g, mask=live_n, other=0.0).to(tl.float32)
        xmask = mask_m[:, None] & mask_k[None, :]
        x_row = x_ptr + offs_m[:, None] * stride_xm
        x_lo = tl.load(x_row + k_lo[None, :], mask=xmask, other=0.0)
        x_hi = tl.load(x_row + (k_lo + 16)[None, :], mask=xmask, other=0.0)
        w_lo = (p & 15).to(tl.float32) * scale[:, None] + offset[:, None]
        w_hi = (p >> 4).to(tl.float32) * scale[:, None] + offset[:, None]
        acc = _dot(x_lo, w_lo.to(x_lo.dtype), acc, UPCAST)
        acc = _dot(x_hi, w_hi.to(x_lo.dtype), acc, UPCAST)
    else:
        k = k0 + tl.arange(0, SUB)
        mask_k = k < K
        p = tl.load(qw_ptr + offs_n[:, None] * K + k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = p.to(tl.float32) * scale[:, None]
        acc = _dot(xv, w.to(xv.dtype), acc, UPCAST)
    return acc


@triton.jit
def _qgemm_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm,
                  stride_om, M_BUCKET, GROUP: tl.constexpr, SUB: tl.constexpr,
                  INT4: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, UNROLL: tl.constexpr,
                  UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    num_sub = tl.cdiv(K, SUB)
    per_split = tl.cdiv(num_sub, SPLIT_K)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, num_sub)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(begin, end, UNROLL):  # UNROLL independent sub-tiles: loads in flight
        for u in tl.static_range(UNROLL):
            # past `end` (the split's tail): re-read the last sub-tile with zero scales
            live_n = mask_n & (offs_n * 0 + first + u < end)
            acc = _subtile(acc, x_ptr, qw_ptr, s_ptr, o_ptr, offs_m, offs_n, mask_m, mask_n,
                           live_n, tl.minimum(first + u, end - 1), M, N, K, stride_xm, GROUP,
                           SUB, INT4, EVEN_K, UPCAST)
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + tile_off, acc, mask=out_mask)
        tl.debug_barrier()
        counter = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + j * M * N + tile_off, mask=out_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0)


_TUNE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "SPLIT_K": sk, "UNROLL": u}, num_warps=w, num_stages=3)
    for bn, w, splits in ((32, 4, (1, 2, 4, 8)), (64, 4, (1, 4)),
                          (128, 4, (1, 2)), (128, 8, (1,)), (256, 8, (1,)))
    for sk in splits for u in (2, 4)
]


def _prune(configs, named_args, **kwargs):
    n, num_sub = named_args["N"], -(-named_args["K"] // kwargs["SUB"])
    keep = [c for c in configs
            if c.kwargs["SPLIT_K"] <= num_sub and c.kwargs["BLOCK_N"] <= max(32, n)
            and c.kwargs["BLOCK_N"] >= 32]
    if kwargs["BLOCK_M"] >= 64:  # enough tiles along M: split-K only adds traffic
        keep = [c for c in keep if c.kwargs["SPLIT_K"] <= 2] or keep
    return keep


_qgemm_tuned = triton.autotune(
    _TUNE_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "INT4"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20,
                                                           quantiles=quantiles),
)(_qgemm_kernel)

_counters: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters, one per output tile; the kernel leaves them zero."""
    cnt = _counters.get(device)
    if cnt is None or cnt.numel() < tiles:
        cnt = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _counters[device] = cnt
    return cnt


def sub_tile(packed: PackedWeight) -> int | None:
    """Features per sub-tile, or None when the group size has no Triton tiling."""
    gs, k = packed.group_size, packed.in_features
    if gs <= _SUB_MAX:
        return gs if gs in (32, 64, 128) else None
    return _SUB_MAX if gs % _SUB_MAX == 0 or gs == k else None


def triton_quantized_linear(
    x: torch.Tensor, packed: PackedWeight, config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (float16/bfloat16/float32) @ W.T -> [M, N] in x's dtype (into `out` if given)."""
    m, k = x.shape
    n = packed.out_features
    x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    sub = sub_tile(packed)
    if sub is None and not (m == 1 and gemv_supported(packed)):
        return out.copy_(x @ dequantize(packed, x.dtype).t())
    if m == 1 and gemv_supported(packed):
        gemv_config = None if config is None else {
            "BLOCK_N": config.block_n, "WORDS": 32, "SPLIT_K": config.split_k,
            "num_warps": config.num_warps}
        return triton_gemv(x, packed, out, _tile_counters(x.device, triton.cdiv(n, 8)),
                           gemv_config)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    m_bucket = min(triton.next_power_of_2(m), 128)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if config is None and interpret:
        config = GemmConfig()
    max_split = 8 if config is None else config.split_k
    part = torch.empty(max_split * m * n if max_split > 1 else 1, dtype=torch.float32,
                       device=x.device)
    cnt = _tile_counters(x.device, triton.cdiv(m, block_m) * triton.cdiv(n, 16))
    offsets = packed.offsets if packed.offsets is not None else packed.scales
    args = (x, packed.qweight, packed.scales, offsets, out, part, cnt, m, n, k, x.stride(0),
            out.stride(0), m_bucket)
    consts = dict(GROUP=packed.group_size, SUB=sub, INT4=packed.scheme == "int4",
                  EVEN_K=k % sub == 0, BLOCK_M=block_m,
                  UPCAST=interpret and x.dtype == torch.bfloat16)
    if config is None:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m), meta["SPLIT_K"])

        _qgemm_tuned[grid](*args, **consts)
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m), config.split_k)
        _qgemm_kernel[grid](*args, **consts, BLOCK_N=config.block_n, SPLIT_K=config.split_k,
                            UNROLL=config.unroll, num_warps=config.num_warps,
                            num_stages=config.num_stages)
    return out
