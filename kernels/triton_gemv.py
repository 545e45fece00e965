"""Triton GEMVs (one activation row, M = 1): W4A16 / W8A16 over the ``words`` layout (the
16-bit dense GEMV is `kernels.triton_dense_gemv`), and what the GEMVs share: split-K
merging, tile counters, autotuning. On CUDA, int4 and int8 with bfloat16 rows go to the
tensor-core kernel of `kernels.triton_mma_gemv` instead (`mma_gemv_supported`); the packed
GEMV here serves the groupings it does not take, other input dtypes, and the interpreter.

Decode at batch 1 is a matrix-vector product that must stream the packed weight at HBM
speed, so the inner loop spends as few instructions per weight as it can:

- A program owns BLOCK_N output features and a share of K. It loads a tile of ROWS word
  rows, ``int32 [ROWS, BLOCK_N]``: every thread reads whole 16-byte vectors of neighbouring
  output features, and the activations a tile needs are the same for all threads (loaded
  once per thread, reused across its output features).
- No int-to-float conversion: a code is moved (one shift, shared by two int4 fields) into
  a window of the float32 mantissa and OR-ed with the bits of 1.0, which gives
  ``f = 1 + u * 2**(p - 23)`` exactly (p: the window's low bit; 12 or 16 for int4, 15 for
  int8). With the activation pre-scaled, ``x' = x * 2**(23 - p)``, ``f * x' = x' + u * x``,
  so ``sum(u * x) = sum(f * x') - sum(x')``: per weight one logic op, one multiply-add and
  half a shift. The windows keep the bias ``x'`` within 2**11 of the signal, so float32
  keeps ~13 bits of the sum (the output is 16-bit).
- Scales and offsets leave the inner product (a tile lies inside one quantization group):
  ``out += s * sum(u * x) + o * sum(x)``; int8 codes are stored as ``u = q + 128``, so its
  offset is ``-128 * s``.

- The next tile's words, scale and offset are loaded before the current tile's arithmetic.

Split-K (this GEMV and the dense one): each program stores its partial, bumps a counter of
its output columns, and the last to arrive sums the partials in a fixed order (16 per load,
deterministic) and resets the counter, so a GEMV is one launch, also inside CUDA graphs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.pdl import await_inputs, pdl_args
from kernels.quant import PackedWeight


@triton.jit
def _field(w, FIELD: tl.constexpr, BITS: tl.constexpr):
    """Code FIELD of each word as the float32 ``1 + u * 2**(P - 23)`` (see module docs)."""
    if BITS == 4:
        LEFT: tl.constexpr = 12 - 8 * (FIELD // 2)  # fields 2j, 2j+1 share one shift
        P: tl.constexpr = 12 + 4 * (FIELD % 2)
    else:
        LEFT: tl.constexpr = 15 - 8 * FIELD
        P: tl.constexpr = 15
    if LEFT > 0:
        w = w << LEFT
    elif LEFT < 0:
        w = w >> (-LEFT)  # arithmetic; the sign copies land above the window
    FMASK: tl.constexpr = ((1 << BITS) - 1) << P
    return ((w & FMASK) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _x_scale(FIELD: tl.constexpr, BITS: tl.constexpr):
    """2**(23 - P) for code FIELD's window."""
    if BITS == 4:
        return 2048.0 if FIELD % 2 == 0 else 128.0
    return 256.0


@triton.jit
def _finish(acc, out_ptr, part_ptr, cnt_ptr, offs_n, mask_n, N, pid_n, pid_k, split_k,
            REDUCE: tl.constexpr):
    """Store a program's [BLOCK_N] result, or with split-K its partial (see
    `_reduce_partials`)."""
    if not REDUCE:
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(part_ptr + pid_k * N + offs_n, acc, mask=mask_n)
        _reduce_partials(out_ptr, part_ptr, cnt_ptr, offs_n, mask_n, N, 1, 0, pid_n, split_k)


@triton.jit
def _reduce_partials(out_ptr, part_ptr, cnt_ptr, offs_n, mask_n, N, M, stride_om, pid_n,
                     split_k):
    """Split-K merge, called once a program has stored its float32 partial rows at
    ``part_ptr + (pid_k * M + row) * N``: the last of the split_k programs of output
    features offs_n to arrive sums the partials (16 per load, fixed order), stores the M
    rows and resets the counter."""
    tl.debug_barrier()
    counter = cnt_ptr + pid_n
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    if arrived == split_k - 1:
        for r in range(0, M):
            total = tl.zeros(offs_n.shape, dtype=tl.float32)
            for j in range(0, split_k, 16):
                js = j + tl.arange(0, 16)
                chunk = tl.load(part_ptr + (js[:, None] * M + r) * N + offs_n[None, :],
                                mask=(js < split_k)[:, None] & mask_n[None, :], other=0.0,
                                cache_modifier=".cg")
                total += tl.sum(chunk, axis=0)
            tl.store(out_ptr + r * stride_om + offs_n, total.to(out_ptr.dtype.element_ty),
                     mask=mask_n)
        tl.atomic_xchg(counter, 0)


@triton.jit
def _load_tile(w_ptr, s_ptr, o_ptr, t, end, rows, offs_n, mask_n, N, GROUP: tl.constexpr,
               BITS: tl.constexpr, ROWS: tl.constexpr):
    """Tile t's words [ROWS, BLOCK_N] and its group's float32 scale and offset [BLOCK_N]
    (zeros when t >= end, the split's end)."""
    live = mask_n & (offs_n * 0 + t < end)
    w = tl.load(w_ptr + (t * ROWS + rows)[:, None] * N + offs_n[None, :], mask=live[None, :],
                other=0)
    meta = (t * ROWS * (32 // BITS)) // GROUP * N + offs_n
    s = tl.load(s_ptr + meta, mask=live, other=0.0).to(tl.float32)
    if BITS == 4:
        o = tl.load(o_ptr + meta, mask=live, other=0.0).to(tl.float32)
    else:
        o = s * -128.0  # int8 codes are stored as q + 128
    return w, s, o


@triton.jit(do_not_specialize=["split_k"])
def _gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, part_ptr, cnt_ptr, N, K, split_k,
                 GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 ROWS: tl.constexpr, REDUCE: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, ROWS)
    num_tiles = K // (ROWS * PER)
    per_split = tl.cdiv(num_tiles, split_k)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, num_tiles)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w, s, o = _load_tile(w_ptr, s_ptr, o_ptr, begin, end, rows, offs_n, mask_n, N, GROUP, BITS,
                         ROWS)
    await_inputs(PDL)  # the first tile may load while the previous kernel finishes
    for t in range(begin, end):
        # the next tile's loads go out before this tile's arithmetic
        w_next, s_next, o_next = _load_tile(w_ptr, s_ptr, o_ptr, t + 1, end, rows, offs_n,
                                            mask_n, N, GROUP, BITS, ROWS)
        r = t * ROWS + rows
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        x_sum = 0.0
        xp_sum = 0.0
        for i in tl.static_range(PER):
            xv = tl.load(x_ptr + r * PER + i).to(tl.float32)  # [ROWS], same for all threads
            part += _field(w, i, BITS) * (xv * _x_scale(i, BITS))[:, None]
            field_sum = tl.sum(xv, axis=0)
            x_sum += field_sum
            xp_sum += field_sum * _x_scale(i, BITS)
        dot = tl.sum(part, axis=0) - xp_sum  # sum(u * x) per output feature
        acc += s * dot + o * x_sum
        w, s, o = w_next, s_next, o_next
    _finish(acc, out_ptr, part_ptr, cnt_ptr, offs_n, mask_n, N, pid_n, pid_k, split_k, REDUCE)


def autotuned(kernel, configs: list[triton.Config], key: list[str], prune,
              **options: object) -> triton.runtime.Autotuner:
    """`kernel` autotuned over `configs` (pruned by `prune`, cached per `key`; `options`
    to `triton.autotune`), each candidate timed briefly (5 ms warm-up, 20 ms of runs): the
    tuning of every GEMV/GEMM."""
    return triton.autotune(
        configs, key=key, prune_configs_by={"early_config_prune": prune}, **options,
        do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20,
                                                               quantiles=quantiles),
    )(kernel)


def fills_waves(n: int, block_n: int, split: int, most: int) -> bool:
    """Whether cdiv(n, block_n) * split programs launch between one wave on a 132-SM
    device and `most`, or K is not split (small latency-bound shapes may prefer that)."""
    return 132 <= -(-n // block_n) * split <= most or split == 1


def _configs() -> list[triton.Config]:
    out = []
    for block_n, warps in ((128, 1), (256, 1), (256, 2), (512, 4)):
        for rows in (4, 8, 16):
            for split in (1, 2, 4, 8, 16, 32, 64):
                out.append(triton.Config({"BLOCK_N": block_n, "ROWS": rows, "split_k": split,
                                          "REDUCE": split > 1}, num_warps=warps, num_stages=1))
    return out


def _prune(configs, named_args, **kwargs):
    """Keep configs whose tile fits the group and that launch ~1 to ~16 waves on 132 SMs
    (or do not split K)."""
    n, k = named_args["N"], named_args["K"]
    per_group = kwargs["GROUP"] * kwargs["BITS"] // 32  # word rows per group
    keep = []
    for c in configs:
        rows, split = c.kwargs["ROWS"], c.kwargs["split_k"]
        if per_group % rows or split > k * kwargs["BITS"] // 32 // rows:
            continue
        block_n = c.kwargs["BLOCK_N"]
        if block_n <= max(128, n) and fills_waves(n, block_n, split, 4096):
            keep.append(c)
    return keep or [triton.Config({"BLOCK_N": 128, "ROWS": tile_rows_for(per_group),
                                   "split_k": 1, "REDUCE": False}, num_warps=1, num_stages=1)]


_gemv_tuned = autotuned(_gemv_kernel, _configs(), ["N", "K", "GROUP", "BITS"], _prune)


_counters: dict[torch.device, torch.Tensor] = {}
_outgrown: list[torch.Tensor] = []  # kept alive: captured CUDA graphs still point at them


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 split-K counters, one per output tile; the kernels leave them zero.
    Shared by every kernel on the device (they run one after another on one stream)."""
    cnt = _counters.get(device)
    if cnt is None or cnt.numel() < tiles:
        if cnt is not None:
            _outgrown.append(cnt)
        cnt = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _counters[device] = cnt
    return cnt


def tile_rows_for(per_group: int) -> int:
    """Word rows per tile for a group of `per_group` word rows: 16 or fewer, dividing it."""
    return next(r for r in (16, 8, 4, 2, 1) if per_group % r == 0)


def triton_gemv(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor, counters: torch.Tensor,
                config: dict | None = None) -> torch.Tensor:
    """x [1, K] @ W.T -> out [1, N] for a ``words``-layout weight. `counters`: int32
    split-K counters, all zero, one per program column (N / BLOCK_N) at least.

    `config` ({"BLOCK_N", "split_k", "num_warps", optional "ROWS"}) skips autotuning; under
    TRITON_INTERPRET a small fixed config is used.
    """
    n, k = packed.out_features, packed.in_features
    x = x.contiguous()
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = {"BLOCK_N": 32, "split_k": 2, "num_warps": 1}
    max_split = 64 if config is None else config["split_k"]
    part = torch.empty(max_split * n, dtype=torch.float32, device=x.device)
    offsets = packed.offsets if packed.offsets is not None else packed.scales
    args = (x, packed.qweight, packed.scales, offsets, out, part, counters, n, k)
    consts = dict(GROUP=packed.group_size, BITS=packed.bits, **pdl_args(x.device))
    if config is None:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["split_k"])](
            *args, **consts)
    else:
        split = config["split_k"]
        grid = (triton.cdiv(n, config["BLOCK_N"]), split)
        rows = config.get("ROWS") or tile_rows_for(packed.group_size // packed.per_word)
        _gemv_kernel[grid](*args, split, **consts, BLOCK_N=config["BLOCK_N"], ROWS=rows,
                           REDUCE=split > 1, num_warps=config.get("num_warps", 4), num_stages=1)
    return out
