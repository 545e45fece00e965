"""Triton W4A16 / W8A16 GEMV (one activation row, M = 1) for `kernels.quant.PackedWeight`.

Decode at batch 1 is a matrix-vector product that must stream the packed weight at HBM speed,
so the inner loop spends as few instructions per weight as it can (no int-to-float
conversions, which issue at a quarter of the FMA rate):

- The packed weight is read as int32 words (8 int4 or 4 int8 weights each).
- A weight becomes a float32 by OR-ing its bits, in place, into the mantissa of 2**23 and
  subtracting 2**23: ``(word & (15 << p)) | 0x4B000000`` is ``2**23 + q * 2**p``, exact for
  p <= 16 (nibbles higher in the word come from ``word >> 12``). The factor ``2**p`` is
  undone on the activation side (``x * 2**-p``, exact). Per weight: one logic op, one
  subtract, one multiply-add.
- Scales and offsets leave the inner product: per word, ``acc += s * sum_j q_j x_j + o * sum_j x_j``
  (int8 is symmetric, stored as ``q + 128`` after flipping each byte's sign bit, so its
  offset is ``-128 * s``), which is two multiply-adds per 8 (or 4) weights.

Word ``i`` of a 32-feature int4 chunk holds features ``4i + b`` (low nibble of byte b) and
``4i + b + 16`` (high nibble); an int8 word holds features ``4i .. 4i + 3``. A program owns
BLOCK_N output features and a contiguous share of K, loading the next tile's words, scales
and offsets before doing the current tile's arithmetic (split-K over SPLIT_K programs, reduced
as in `kernels.triton_gemm`: partials to a workspace, the last program to arrive sums them
in a fixed order and resets its counter).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.quant import PackedWeight

_MAX_SPLIT = 16


@triton.jit
def _slot(part, word, x_ptr, feat, ok, MASK: tl.constexpr, INV: tl.constexpr):
    """part [BN, W] += (word & MASK, as the integer q * 2**p) * x[feat] * 2**-p; also x[feat]."""
    q = ((word & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    xv = tl.load(x_ptr + feat, mask=ok, other=0.0).to(tl.float32)  # [W]
    return part + q * (xv * INV)[None, :], xv


@triton.jit
def _load_tile(w_ptr, s_ptr, o_ptr, row_w, row_s, t, limit, rel, wi, mask_n, K,
               GROUP: tl.constexpr, INT4: tl.constexpr, WORDS: tl.constexpr,
               TILE_K: tl.constexpr):
    """Tile t's words [BN, W] and each word's float32 scale and offset (zero from `limit` on)."""
    base = t * TILE_K + rel
    m2 = mask_n[:, None] & (base < limit)[None, :]
    word = tl.load(row_w + (t * WORDS + wi)[None, :], mask=m2, other=0)
    g = row_s + (base // GROUP)[None, :]
    s = tl.load(s_ptr + g, mask=m2, other=0.0).to(tl.float32)
    if INT4:
        o = tl.load(o_ptr + g, mask=m2, other=0.0).to(tl.float32)
    else:
        o = s * -128.0  # symmetric int8 stored as q + 128
    return word, s, o


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, part_ptr, cnt_ptr, N, K, stride_w,
                 GROUP: tl.constexpr, INT4: tl.constexpr, BLOCK_N: tl.constexpr,
                 WORDS: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    PER_WORD: tl.constexpr = 8 if INT4 else 4
    TILE_K: tl.constexpr = WORDS * PER_WORD
    wi = tl.arange(0, WORDS)
    if INT4:
        rel = (wi // 4) * 32 + (wi % 4) * 4  # first feature of each word
    else:
        rel = wi * 4
    num_tiles = tl.cdiv(K, TILE_K)
    per_split = tl.cdiv(num_tiles, SPLIT_K)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, num_tiles)
    row_w = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    row_s = offs_n[:, None] * (K // GROUP)
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    limit = tl.minimum(K, end * TILE_K)  # this split's features end here
    word, s, o = _load_tile(w_ptr, s_ptr, o_ptr, row_w, row_s, begin, limit, rel, wi,
                            mask_n, K, GROUP, INT4, WORDS, TILE_K)
    for t in range(begin, end):
        base = t * TILE_K + rel  # [W]
        ok = base < K
        # the next tile's loads go out before this tile's arithmetic (two tiles in flight)
        word_n, s_n, o_n = _load_tile(w_ptr, s_ptr, o_ptr, row_w, row_s, t + 1, limit,
                                      rel, wi, mask_n, K, GROUP, INT4, WORDS, TILE_K)
        part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        if INT4:
            high = word >> 12  # bits 20, 24, 28 -> 8, 12, 16
            part, x0 = _slot(part, word, x_ptr, base, ok, 0xF, 1.0)
            part, x1 = _slot(part, word, x_ptr, base + 16, ok, 0xF0, 0.0625)
            part, x2 = _slot(part, word, x_ptr, base + 1, ok, 0xF00, 0.00390625)
            part, x3 = _slot(part, word, x_ptr, base + 17, ok, 0xF000, 0.000244140625)
            part, x4 = _slot(part, word, x_ptr, base + 2, ok, 0xF0000, 0.0000152587890625)
            part, x5 = _slot(part, high, x_ptr, base + 18, ok, 0xF00, 0.00390625)
            part, x6 = _slot(part, high, x_ptr, base + 3, ok, 0xF000, 0.000244140625)
            part, x7 = _slot(part, high, x_ptr, base + 19, ok, 0xF0000, 0.0000152587890625)
            sx = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
        else:
            u = word ^ -2139062144  # 0x80808080: signed bytes -> q + 128
            high = u >> 16
            part, x0 = _slot(part, u, x_ptr, base, ok, 0xFF, 1.0)
            part, x1 = _slot(part, u, x_ptr, base + 1, ok, 0xFF00, 0.00390625)
            part, x2 = _slot(part, high, x_ptr, base + 2, ok, 0xFF, 1.0)
            part, x3 = _slot(part, high, x_ptr, base + 3, ok, 0xFF00, 0.00390625)
            sx = x0 + x1 + x2 + x3
        acc += s * part + o * sx[None, :]
        word, s, o = word_n, s_n, o_n
    total = tl.sum(acc, axis=1)  # [BLOCK_N]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(part_ptr + pid_k * N + offs_n, total, mask=mask_n)
        tl.debug_barrier()
        counter = cnt_ptr + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + j * N + offs_n, mask=mask_n, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)
            tl.atomic_xchg(counter, 0)


_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "WORDS": words, "SPLIT_K": sk}, num_warps=warps, num_stages=1)
    for bn, words, warps in ((8, 64, 2), (16, 32, 2), (16, 64, 4), (16, 128, 4), (32, 32, 4),
                             (32, 64, 4), (32, 128, 8), (64, 32, 4), (64, 64, 8), (128, 32, 8))
    for sk in (1, 2, 4, 8, 16)
]


def _prune(configs, named_args, **kwargs):
    per_word = 8 if kwargs["INT4"] else 4
    k, n = named_args["K"], named_args["N"]
    keep = [c for c in configs if c.kwargs["SPLIT_K"] <= -(-k // (c.kwargs["WORDS"] * per_word))
            and c.kwargs["BLOCK_N"] <= max(16, n)]
    return keep or configs[:1]


_gemv_tuned = triton.autotune(
    _CONFIGS, key=["N", "K", "GROUP", "INT4"], prune_configs_by={"early_config_prune": _prune},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20,
                                                           quantiles=quantiles),
)(_gemv_kernel)


def gemv_supported(packed: PackedWeight) -> bool:
    """Whether `triton_quantized_linear` sends M = 1 here: int8 weights readable as words.

    int4 is not dispatched here (it stays callable, and tested on CPU): on the H200 its
    branch failed one accuracy check (M = 1, 14336x4096, group 128; docs/benchmarks/gpu.md)
    and was no faster than the tensor-core kernel, so int4 M = 1 uses that kernel until the
    failure is understood.
    """
    q = packed.qweight
    return (packed.scheme == "int8" and q.is_contiguous() and q.data_ptr() % 4 == 0
            and packed.in_features % 4 == 0 and packed.group_size % 4 == 0)


def triton_gemv(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor, counters: torch.Tensor,
                config: dict | None = None) -> torch.Tensor:
    """x [1, K] @ W.T -> out [1, N]. `counters`: int32 split-K counters, all zero, >= N / 8.

    `config` ({"BLOCK_N", "WORDS", "SPLIT_K", "num_warps"}) skips autotuning; under
    TRITON_INTERPRET a small fixed config is used.
    """
    n, k = packed.out_features, packed.in_features
    words = packed.qweight.view(torch.int32)  # [N, K // 8] int4, [N, K // 4] int8
    x = x.contiguous()
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = {"BLOCK_N": 16, "WORDS": 16, "SPLIT_K": 2, "num_warps": 4}
    max_split = _MAX_SPLIT if config is None else config["SPLIT_K"]
    part = torch.empty(max_split * n, dtype=torch.float32, device=x.device)
    offsets = packed.offsets if packed.offsets is not None else packed.scales
    args = (x, words, packed.scales, offsets, out, part, counters, n, k, words.stride(0))
    consts = dict(GROUP=packed.group_size, INT4=packed.scheme == "int4")
    if config is None:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](*args, **consts)
    else:
        cfg = dict(config)
        warps = cfg.pop("num_warps", 4)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _gemv_kernel[grid](*args, **consts, **cfg, num_warps=warps, num_stages=1)
    return out
