"""The Triton GEMV of 16-bit dense weights (1 to 16 activation rows): decode at small batches
and verification of draft tokens on CUDA, where cuBLAS reads the smaller decode weights well
below memory bandwidth.

`dense_gemv` reads a row-major 16-bit weight in 16-byte runs along K, and can fuse the step
that produces its input (residual add + RMS norm, or SwiGLU), so a decode step runs one
kernel for both. One row accumulates [BLOCK_N, BLOCK_K] products on the CUDA cores; 2 to 16
rows (`ROWS_MAX`) take one tensor-core dot a tile, the rows padded to 16, so a verification
step reads each weight once, as decoding does, with the same fused steps. The padded rows
cost the same at 2 rows as at 16, so against cuBLAS this wins only at a few rows: the
model routes up to `server.models.layers.GEMV_ROWS` rows here (docs/benchmarks/gpu.md, run
97). Split-K merges as the packed GEMV's does (`kernels.triton_gemv`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import gemv_table
from kernels.pdl import await_inputs, pdl_args
from kernels.triton_gemv import _finish, _reduce_partials, _tile_counters, autotuned, fills_waves


@triton.jit
def _x_tile(x_ptr, res_ptr, nw_ptr, k, live, rstd, K, PROLOGUE: tl.constexpr,
            HAS_RES: tl.constexpr):
    """The GEMV input at features k, as float32 values of x's dtype: x itself (PROLOGUE 0),
    rms_norm(x + res) * nw (1), or silu(gate) * up of a [2K] gate/up row (2); rounded to
    x's dtype where the separate kernels of `kernels.triton_fused` store their outputs."""
    dtype = x_ptr.dtype.element_ty
    if PROLOGUE == 2:
        gate = tl.load(x_ptr + k, mask=live, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + k, mask=live, other=0.0).to(tl.float32)
        return (gate / (1.0 + tl.exp(-gate)) * up).to(dtype).to(tl.float32)
    v = tl.load(x_ptr + k, mask=live, other=0.0)
    if PROLOGUE == 1:
        if HAS_RES:
            v = (v.to(tl.float32) + tl.load(res_ptr + k, mask=live, other=0.0).to(tl.float32))
            v = v.to(dtype)
        nw = tl.load(nw_ptr + k, mask=live, other=0.0).to(tl.float32)
        v = (v.to(tl.float32) * rstd * nw).to(dtype)
    return v.to(tl.float32)


@triton.jit
def _walk_start(w_ptr, pid_n, pid_k, N, K, stride_w, split_k, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """A program's share of the K walk (both kernels): its BLOCK_N output features, its
    split's tiles [begin, end) and where its features end (limit), the weight rows, and the
    first tile's features k and weights w [BLOCK_N, BLOCK_K], loaded (before the PDL wait:
    no kernel writes weights)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    kk = tl.arange(0, BLOCK_K)
    num_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_tiles, split_k)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, num_tiles)
    rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    limit = tl.minimum(K, end * BLOCK_K)
    k = begin * BLOCK_K + kk
    live = k < limit
    w = tl.load(rows + k[None, :], mask=mask_n[:, None] & live[None, :], other=0.0)
    return offs_n, mask_n, kk, begin, end, rows, limit, k, live, w


@triton.jit
def _next_tile(rows, k, limit, mask_n, BLOCK_K: tl.constexpr):
    """The next tile's weights, features and mask, loaded while the current one is used."""
    k_next = k + BLOCK_K
    live_next = k_next < limit
    w_next = tl.load(rows + k_next[None, :], mask=mask_n[:, None] & live_next[None, :],
                     other=0.0)
    return w_next, k_next, live_next


@triton.jit(do_not_specialize=["split_k"])
def _dense_gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, res_ptr, nw_ptr, res_out_ptr,
                       N, K, stride_w, eps, split_k, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, REDUCE: tl.constexpr, PROLOGUE: tl.constexpr,
                       HAS_RES: tl.constexpr, BLOCK_ROW: tl.constexpr, PDL: tl.constexpr):
    """out[n] = sum_k w[n, k] x[k] for a row-major 16-bit weight: threads own 16-byte runs of
    K in BLOCK_N rows and accumulate [BLOCK_N, BLOCK_K] float32 partials, reduced once.

    PROLOGUE 1 (residual add + RMS norm of x, see `_x_tile`): every program computes the
    row's rstd itself from the whole row; program (0, 0) also stores x + res."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n, mask_n, _, begin, end, rows, limit, k, live, w = _walk_start(
        w_ptr, pid_n, pid_k, N, K, stride_w, split_k, BLOCK_N, BLOCK_K)
    await_inputs(PDL)  # the first tile may load while the previous kernel finishes
    rstd = 0.0
    if PROLOGUE == 1:
        cols = tl.arange(0, BLOCK_ROW)
        row = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        if HAS_RES:
            row = (row.to(tl.float32) + tl.load(res_ptr + cols, mask=cols < K, other=0.0)
                   .to(tl.float32)).to(x_ptr.dtype.element_ty)
            if (pid_n == 0) & (pid_k == 0):
                tl.store(res_out_ptr + cols, row, mask=cols < K)
        row = row.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(row * row, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(begin, end):
        w_next, k_next, live_next = _next_tile(rows, k, limit, mask_n, BLOCK_K)
        xv = _x_tile(x_ptr, res_ptr, nw_ptr, k, live, rstd, K, PROLOGUE, HAS_RES)
        acc += w.to(tl.float32) * xv[None, :]
        w, k, live = w_next, k_next, live_next
    _finish(tl.sum(acc, axis=1), out_ptr, part_ptr, cnt_ptr, offs_n, mask_n, N, pid_n, pid_k,
            split_k, REDUCE)


ROWS_MAX = 16
"""Most activation rows `dense_gemv` serves (one tensor-core tile of rows)."""


@triton.jit
def _rows_tile(x_ptr, res_ptr, nw_ptr, offs_m, mask_m, k, live, rstd, stride_x, K,
               PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    """`_x_tile` of 16 rows: the [16, BLOCK_K] input tile in x's dtype (rows past M zero);
    rstd [16] for the norm."""
    dtype = x_ptr.dtype.element_ty
    mask = mask_m[:, None] & live[None, :]
    at = offs_m[:, None] * stride_x + k[None, :]
    if PROLOGUE == 2:
        gate = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + at + K, mask=mask, other=0.0).to(tl.float32)
        return (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
    v = tl.load(x_ptr + at, mask=mask, other=0.0)
    if PROLOGUE == 1:
        if HAS_RES:
            res = tl.load(res_ptr + offs_m[:, None] * K + k[None, :], mask=mask, other=0.0)
            v = (v.to(tl.float32) + res.to(tl.float32)).to(dtype)
        nw = tl.load(nw_ptr + k, mask=live, other=0.0).to(tl.float32)
        v = (v.to(tl.float32) * rstd[:, None] * nw[None, :]).to(dtype)
    return v


@triton.jit(do_not_specialize=["split_k", "M"])
def _dense_rows_kernel(x_ptr, w_ptr, out_ptr, part_ptr, cnt_ptr, res_ptr, nw_ptr, res_out_ptr,
                       M, N, K, stride_x, stride_w, eps, split_k, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, REDUCE: tl.constexpr, PROLOGUE: tl.constexpr,
                       HAS_RES: tl.constexpr, PDL: tl.constexpr):
    """out[m, n] = sum_k w[n, k] x[m, k] for M <= 16 rows: `_dense_gemv_kernel`'s walk over
    K, each tile one dot of the 16 (padded) rows by the weight tile. PROLOGUE 1: every
    program computes the rows' rstd from the whole rows first; program (0, 0) also stores
    x + res."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n, mask_n, kk, begin, end, rows, limit, k, live, w = _walk_start(
        w_ptr, pid_n, pid_k, N, K, stride_w, split_k, BLOCK_N, BLOCK_K)
    await_inputs(PDL)  # the first tile may load while the previous kernel finishes
    offs_m = tl.arange(0, 16)
    mask_m = offs_m < M
    rstd = tl.zeros((16,), dtype=tl.float32)
    if PROLOGUE == 1:
        first = (pid_n == 0) & (pid_k == 0)
        for start in range(0, K, BLOCK_K):
            kc = start + kk
            mask = mask_m[:, None] & (kc < K)[None, :]
            v = tl.load(x_ptr + offs_m[:, None] * stride_x + kc[None, :], mask=mask, other=0.0)
            if HAS_RES:
                at = offs_m[:, None] * K + kc[None, :]
                v = (v.to(tl.float32) + tl.load(res_ptr + at, mask=mask, other=0.0)
                     .to(tl.float32)).to(x_ptr.dtype.element_ty)
                if first:
                    tl.store(res_out_ptr + at, v, mask=mask)
            v = v.to(tl.float32)
            rstd += tl.sum(v * v, axis=1)
        rstd = 1.0 / tl.sqrt(rstd / K + eps)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for _ in range(begin, end):
        w_next, k_next, live_next = _next_tile(rows, k, limit, mask_n, BLOCK_K)
        xt = _rows_tile(x_ptr, res_ptr, nw_ptr, offs_m, mask_m, k, live, rstd, stride_x, K,
                        PROLOGUE, HAS_RES)
        acc = tl.dot(xt, tl.trans(w), acc)
        w, k, live = w_next, k_next, live_next
    mask = mask_m[:, None] & mask_n[None, :]
    if not REDUCE:
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc,
                 mask=mask)
        _reduce_partials(out_ptr, part_ptr, cnt_ptr, offs_n, mask_n, N, M, N, pid_n, split_k)


def _dense_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "split_k": split, "REDUCE": split > 1},
                          num_warps=4, num_stages=1)
            for bn in (8, 16, 32) for bk in (128, 256) for split in (1, 2, 4, 8, 16, 32)]


def _dense_prune(configs, named_args, **kwargs):
    """Keep configs that launch ~1 to ~32 waves of programs on a 132-SM device (or do not
    split K)."""
    n, k = named_args["N"], named_args["K"]
    keep = []
    for c in configs:
        split = c.kwargs["split_k"]
        if split <= -(-k // c.kwargs["BLOCK_K"]) and fills_waves(n, c.kwargs["BLOCK_N"], split,
                                                                  8192):
            keep.append(c)
    return keep or configs[:1]


def dense_candidates(n: int, k: int) -> list[dict]:
    """The configurations the autotuner tries for `dense_gemv` of an [n, k] weight (as its
    config argument), for tuning scripts (`kernels.tune_gpu`)."""
    return [{"BLOCK_N": c.kwargs["BLOCK_N"], "BLOCK_K": c.kwargs["BLOCK_K"],
             "split_k": c.kwargs["split_k"]}
            for c in _dense_prune(_dense_configs(), {"N": n, "K": k})]


_dense_tuned = autotuned(_dense_gemv_kernel, _dense_configs(), ["N", "K", "PROLOGUE"],
                         _dense_prune)


def _rows_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "split_k": split, "REDUCE": split > 1},
                          num_warps=4, num_stages=1)
            for bn in (16, 32, 64) for bk in (64, 128, 256) for split in (1, 2, 4, 8, 16, 32)]


# (tuned once for every row count: the rows are padded to 16, so 2 or 16 do the same work)
_rows_tuned = autotuned(_dense_rows_kernel, _rows_configs(), ["N", "K", "PROLOGUE"],
                        _dense_prune)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None,
               config: dict | None = None, *, norm: tuple | None = None,
               silu: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] @ weight[N, K].T -> [M, N] (in `out_dtype`, default x's), float32
    accumulation, for 1 <= M <= ROWS_MAX.

    For decode at small batches and verification on CUDA, where cuBLAS reads small weights
    well below bandwidth. Fused input steps (each what `kernels.triton_fused` would compute
    and store first): ``norm=(residual | None, norm_weight, eps)`` multiplies by
    ``rms_norm(x + residual) * norm_weight`` and returns ``(out, x + residual)`` (x itself
    without a residual); ``silu=True`` takes x = [M, 2K] gate/up and multiplies by
    ``silu(gate) * up``. `config` ({"BLOCK_N", "BLOCK_K", "split_k"}) is launched as given
    (also under TRITON_INTERPRET, where a small default is used otherwise); without it, the
    device's table (`kernels.gemv_table`, one row) or the autotuner picks.
    """
    n, k = weight.shape
    if weight.stride(1) != 1:
        raise ValueError("dense_gemv needs a weight with contiguous rows")
    x = x.contiguous()
    m = x.shape[0]
    if x.dim() != 2 or not 1 <= m <= ROWS_MAX or x.shape[1] != (2 * k if silu else k):
        raise ValueError(f"x has shape {tuple(x.shape)} for a {n}x{k} weight (silu={silu}, "
                         f"at most {ROWS_MAX} rows)")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    prologue = 2 if silu else 1 if norm is not None else 0
    if config is None and m == 1:  # the device's table, if it has this key
        config = gemv_table.lookup("dense_gemv", x.device, N=n, K=k, PROLOGUE=prologue)
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = {"BLOCK_N": 8 if m == 1 else 16, "BLOCK_K": 32, "split_k": 2}
    max_split = 32 if config is None else config["split_k"]
    part = torch.empty(max_split * m * n, dtype=torch.float32, device=x.device)
    residual, norm_weight, eps = norm if norm is not None else (None, None, 0.0)
    res_out = x if residual is None else torch.empty_like(x)
    args = (x, weight, out, part, _tile_counters(x.device, triton.cdiv(n, 8)),
            x if residual is None else residual.contiguous(),
            x if norm_weight is None else norm_weight, res_out)
    shape = (n, k, weight.stride(0), eps) if m == 1 else (m, n, k, x.stride(0), weight.stride(0),
                                                           eps)
    consts = dict(PROLOGUE=prologue, HAS_RES=residual is not None, **pdl_args(x.device))
    if m == 1:
        consts["BLOCK_ROW"] = triton.next_power_of_2(k)
    kernel, tuned = (_dense_gemv_kernel, _dense_tuned) if m == 1 else (_dense_rows_kernel,
                                                                       _rows_tuned)
    if config is None:
        tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["split_k"])](
            *args, *shape, **consts)
    else:
        split = config["split_k"]
        kernel[(triton.cdiv(n, config["BLOCK_N"]), split)](
            *args, *shape, split, **consts, BLOCK_N=config["BLOCK_N"],
            BLOCK_K=config["BLOCK_K"], REDUCE=split > 1, num_warps=4, num_stages=1)
    return (out, res_out) if norm is not None else out
