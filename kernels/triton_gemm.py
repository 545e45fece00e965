"""Triton W4A16 / W8A16 GEMM over the ``words`` layout (CUDA; CPU under TRITON_INTERPRET=1).

One entry point, `triton_quantized_linear`; on CUDA, int4 with 1..16 bfloat16 rows and int8
(per channel or GGUF Q8_0) with 1..8 go to `kernels.triton_mma_gemv` (one mma per packed
word, `mma_gemv_supported`), other M = 1 products to the GEMV of `kernels.triton_gemv`
(CUDA cores, no conversions), prefill-sized ones (`DEQUANT_ROWS`) to torch's dense GEMM
over a transient dequantized copy (`dequantize_t`), the rest to the tensor-core kernel here. A program owns
BLOCK_M rows of x and BLOCK_N output features and walks a share of K in tiles of BLOCK_K
features inside one quantization group (`tile_k`): it loads the tile's words once
(BLOCK_K / per_word rows), shifts every field out, and dequantizes the codes with the
group's scale and offset (one row of BLOCK_N each) into a ``[BLOCK_K, BLOCK_N]`` operand,
field-major (all first fields, then all second ones), of one tensor-core dot with float32
accumulation; the activation tile's columns are shuffled into the same order in registers.
Against loading each word once per feature row (8 times for int4) this took 0.97-0.63x
the time on the 8B shapes at M = 17-128 (docs/benchmarks/gpu.md, run 56).

Verification and small batches have too few output tiles to keep every SM streaming
weights, so K is split over SPLIT_K programs. Each writes its float32 partial tile to a
workspace and bumps a per-tile counter; the last to arrive sums the partials in a fixed
order (deterministic) and writes the output, then resets the counter to zero, so a GEMM is
one launch with no memset (also inside CUDA graphs). Counters live per device; concurrent
GEMMs on different streams of one device are not supported.

A ``rows``-layout weight is converted once and the ``words`` copy kept in its `cache`
(tests, benchmarks); models packed for CUDA hold ``words`` weights only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.pdl import await_inputs, pdl_args
from kernels.quant import PackedWeight, dequantize, to_words
from kernels.triton_gemv import _tile_counters, autotuned, triton_gemv
from kernels.triton_mma_gemv import mma_gemv, mma_gemv_supported


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters; None in `triton_quantized_linear` means autotune (or a default).
    The GEMVs (M = 1, and M <= 16 on CUDA) use only block_n, split_k and num_warps."""

    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b; UPCAST (interpreter only, whose bfloat16 dot is wrong) in float32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["split_k"])
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm,
                  stride_om, M_BUCKET, split_k, GROUP: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  REDUCE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    FMASK: tl.constexpr = (1 << BITS) - 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    num_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_tiles, split_k)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, num_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    kk = tl.arange(0, BLOCK_K)
    ROWS: tl.constexpr = BLOCK_K // PER  # word rows of a tile
    rr = tl.arange(0, ROWS)
    fields = tl.arange(0, PER) * BITS
    for t in range(begin, end):
        k = t * BLOCK_K + kk
        mask_k = k < K
        rows = t * ROWS + rr
        w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows < tl.cdiv(K, PER))[:, None] & mask_n[None, :], other=0)
        # field j of word row r first: operand row j * ROWS + r is feature PER * r + j
        u = tl.reshape((w[None, :, :] >> fields[:, None, None]) & FMASK, (BLOCK_K, BLOCK_N))
        meta = (t * BLOCK_K) // GROUP * N + offs_n  # the tile lies inside one group
        s = tl.load(s_ptr + meta, mask=mask_n, other=0.0).to(tl.float32)
        if BITS == 4:
            o = tl.load(o_ptr + meta, mask=mask_n, other=0.0).to(tl.float32)
        else:
            o = s * -128.0  # int8 codes are stored as q + 128
        wd = u.to(tl.float32) * s[None, :] + o[None, :]
        xt = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # the activations' columns in the operand's order (a shuffle in registers)
        xt = tl.reshape(tl.permute(tl.reshape(xt, (BLOCK_M, ROWS, PER)), (0, 2, 1)),
                        (BLOCK_M, BLOCK_K))
        acc = _dot(xt, wd.to(xt.dtype), acc, UPCAST)
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if not REDUCE:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M * N + tile_off, acc, mask=out_mask)
        tl.debug_barrier()
        counter = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == split_k - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in range(split_k):
                total += tl.load(part_ptr + j * M * N + tile_off, mask=out_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0)


_TUNE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "split_k": sk, "REDUCE": sk > 1}, num_warps=wp, num_stages=st)
    for bn in (64, 128) for st in (3, 4) for sk in (1, 2, 4, 8) for wp in (4, 8)
]


def _prune(configs, named_args, **kwargs):
    """Keep configs that launch at least ~one wave (132 SMs) with the fewest K splits."""
    n, k, m = named_args["N"], named_args["K"], named_args["M"]
    m_tiles = -(-m // kwargs["BLOCK_M"])
    keep = [c for c in configs if c.kwargs["split_k"] <= -(-k // kwargs["BLOCK_K"])
            and c.kwargs["BLOCK_N"] <= max(64, n)]
    enough = [c for c in keep if c.kwargs["split_k"] == 1
              or -(-n // c.kwargs["BLOCK_N"]) * m_tiles * c.kwargs["split_k"] // 2 < 264]
    return enough or keep or configs[:1]


_qgemm_tuned = autotuned(_qgemm_kernel, _TUNE_CONFIGS, ["M_BUCKET", "N", "K", "GROUP", "BITS"],
                         _prune)


@triton.jit
def _dequant_t_kernel(w_ptr, s_ptr, o_ptr, out_ptr, N, K, GROUP: tl.constexpr,
                      BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """W.T [K, N] in out's dtype from the ``words`` layout: a program expands BLOCK_R word
    rows (PER features each) of BLOCK_N output features."""
    PER: tl.constexpr = 32 // BITS
    FMASK: tl.constexpr = (1 << BITS) - 1
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < K // PER)[:, None] & (n < N)[None, :]
    w = tl.load(w_ptr + r[:, None] * N + n[None, :], mask=mask, other=0)
    # a word's PER features lie in one group (groups are multiples of PER)
    meta = (PER * r // GROUP)[:, None] * N + n[None, :]
    s = tl.load(s_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    if BITS == 4:
        o = tl.load(o_ptr + meta, mask=mask, other=0.0).to(tl.float32)
    else:
        o = s * -128.0  # int8 codes are stored as q + 128
    for j in tl.static_range(PER):
        k = PER * r + j
        v = ((w >> (j * BITS)) & FMASK).to(tl.float32) * s + o
        tl.store(out_ptr + k[:, None] * N + n[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=mask)


def dequantize_t(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W.T [K, N] in `dtype` (a ``words`` weight on CUDA; CPU under TRITON_INTERPRET=1),
    rounded once from the float32 value `kernels.quant.dequantize` gives."""
    packed = words_of(packed)
    k, n = packed.in_features, packed.out_features
    out = torch.empty(k, n, dtype=dtype, device=packed.qweight.device)
    offsets = packed.offsets if packed.offsets is not None else packed.scales
    grid = (triton.cdiv(k // (32 // packed.bits), 16), triton.cdiv(n, 256))
    _dequant_t_kernel[grid](packed.qweight, packed.scales, offsets, out, n, k,
                            GROUP=packed.group_size, BITS=packed.bits, BLOCK_R=16, BLOCK_N=256)
    return out


def tile_k(packed: PackedWeight) -> int | None:
    """Features per tensor-core tile (inside one group), or None when no tile fits."""
    g = packed.group_size
    if g == packed.in_features or g % 128 == 0:
        return 128
    return next((b for b in (64, 32, 16) if g % b == 0), None)


def words_of(packed: PackedWeight) -> PackedWeight:
    """The ``words`` layout of `packed` (itself, or converted once and cached)."""
    if packed.layout == "words":
        return packed
    if "words" not in packed.cache:
        packed.cache["words"] = to_words(packed)
    return packed.cache["words"]


# From this many rows on, the weight is dequantized to x's dtype (a transient copy, W.T) for
# torch's dense GEMM: the kernel above redoes its dequantization for every BLOCK_M rows, so
# its time doubles from 64 rows to 128 and again to 256, while the copy costs one pass over
# the weight (int4: 2.5 bytes a weight written and read). On an H200 (run 59, the 8B shapes)
# the two tie at 128 rows, and at 256 the copy wins 1.6-2.0x (docs/benchmarks/gpu.md).
DEQUANT_ROWS = 128


def triton_quantized_linear(
    x: torch.Tensor, packed: PackedWeight, config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (float16/bfloat16/float32) @ W.T -> [M, N] in x's dtype (into `out` if given)."""
    m, k = x.shape
    n = packed.out_features
    packed = words_of(packed)
    x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    small_config = None if config is None else {
        "BLOCK_N": config.block_n, "split_k": config.split_k, "num_warps": config.num_warps}
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and mma_gemv_supported(x, packed):
        if small_config is not None:  # every warp owns 32 output features or more
            small_config["num_warps"] = max(1, min(config.num_warps, config.block_n // 32))
        return mma_gemv(x, packed, out, small_config)
    if m == 1:
        return triton_gemv(x, packed, out, _tile_counters(x.device, triton.cdiv(n, 32)),
                           small_config)
    if m >= DEQUANT_ROWS and config is None:  # prefill: compute-bound, cuBLAS's ground
        wt = dequantize_t(packed, x.dtype)
        return torch.mm(x, wt, out=out) if out.is_contiguous() else out.copy_(x @ wt)
    block_k = tile_k(packed)
    if block_k is None:
        return out.copy_(x @ dequantize(packed, x.dtype).t())
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    m_bucket = min(triton.next_power_of_2(m), 128)
    if config is None and interpret:
        config = GemmConfig()
    max_split = 8 if config is None else config.split_k
    part = torch.empty(max_split * m * n if max_split > 1 else 1, dtype=torch.float32,
                       device=x.device)
    cnt = _tile_counters(x.device, triton.cdiv(m, block_m) * triton.cdiv(n, 32))
    offsets = packed.offsets if packed.offsets is not None else packed.scales
    args = (x, packed.qweight, packed.scales, offsets, out, part, cnt, m, n, k, x.stride(0),
            out.stride(0), m_bucket)
    consts = dict(GROUP=packed.group_size, BITS=packed.bits, BLOCK_M=block_m, BLOCK_K=block_k,
                  UPCAST=interpret and x.dtype == torch.bfloat16, **pdl_args(x.device))
    if config is None:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m), meta["split_k"])

        _qgemm_tuned[grid](*args, **consts)
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m), config.split_k)
        _qgemm_kernel[grid](*args, config.split_k, **consts, BLOCK_N=config.block_n,
                            REDUCE=config.split_k > 1, num_warps=config.num_warps,
                            num_stages=config.num_stages)
    return out
