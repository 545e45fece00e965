"""W4A16 (and W8A16) for M = 1..16 activation rows (decode and verification)
on the tensor cores, over the ``words`` layout (CUDA, sm_80+). The mma step, its fragment
plan, the int8 variant and the step's emulation under TRITON_INTERPRET are in
`kernels.triton_mma_step`, a chunk's loads and steps in `kernels.triton_mma_chunk`; this
module walks K, merges split-K partials, tunes and routes.

The CUDA-core GEMV (`kernels.triton_gemv`) spends ~4.5 instructions per weight and lane
(unpack, multiply-add, activation traffic: its SASS), which on an H200 takes longer than
streaming the 4-bit weight. Here one ``mma.sync.m16n8k16`` (bf16 in, float32 accumulate)
consumes one int32 word (8 codes) per lane after 3 shifts and 4 ``lop3``; with the loads,
the bias mma and the per-group scaling a weight costs ~1.7 instructions (SASS, group 128),
and the kernel is bound by load latency rather than issue (docs/benchmarks/gpu.md).

A program owns BLOCK_N features (32 a warp and rep) and a share of K, walked in chunks of
CHUNK steps two at a time: while one chunk is multiplied the other's words, activations,
scales and offsets are in flight, with no register copies between iterations. Split-K
partials are merged by the last program to arrive (`kernels.triton_gemv`). The first
chunk's words load before the kernel waits for its predecessor (`kernels.pdl`).

One mma serves 4 rows. More rows (verification of up to 15 draft tokens) run as groups,
one program each, the groups of a weight tile next to each other in the grid, so that
they read it at about the same time (two groups of 4 take 1.5-1.7x one group's time on an
H200: they share the reads only in part). int4 groups may hold 8 rows instead
(`mma_step8`: the same words, 6 mma a step instead of 5 for twice the rows), which on the
8B shapes at 5-16 rows took 0.53-0.86x the time of groups of 4, but is slower on a
1024-feature projection, whose programs are then too few: the autotuner picks the group
size (ROWS) with the rest of the configuration (docs/benchmarks/gpu.md, run 70). A
program of 16 rows (9-16: verification of 8 or more draft tokens) runs the 8-row step
twice on each word, with the activations of rows 0-7 and of rows 8-15: ptxas unpacks the
word once for both (the same LOP3 count as 8 rows in the sm_90 SASS, twice the mma), so
the words are loaded and unpacked once for 16 rows. With
more than 4 rows a program may also put WARPS_K rows of warps along K, summed in shared
memory at the end: on 4096x4096 at 8 rows the fastest such configuration took 7.4 us
against 9.1 for the fastest with one row (run 44); at one group none won (run 43).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels import gemv_table
from kernels.pdl import await_inputs, pdl_args
from kernels.quant import PackedWeight
from kernels.triton_gemv import _reduce_partials, _tile_counters, autotuned, fills_waves
from kernels.triton_mma_chunk import load_acts, load_chunk, load_words, multiply_chunk

GROUP_ROWS = 4  # activation rows one mma serves (B's 8 columns, two per row)
INT4_GROUP_ROWS = (8, 16)  # int4 with more than 4 rows: 8 or 16 a program (`mma_step8`)
MAX_ROWS = 16  # rows served (groups of ROWS along grid axis 0)
INT8_MAX_ROWS = 8  # int8 rows routed here (`mma_gemv_supported`)


@triton.jit(do_not_specialize=["split_k", "M", "M_KEY"])
def _mma_gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K,
                     stride_xm, stride_om, split_k, max_split, M_KEY, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, WARPS_K: tl.constexpr, CHUNK: tl.constexpr,
                     REDUCE: tl.constexpr, GROUPED: tl.constexpr, INT8: tl.constexpr,
                     EMULATE: tl.constexpr, PDL: tl.constexpr, SUMS: tl.constexpr = False,
                     ROWS: tl.constexpr = 4):
    """See the module docs; CHUNK is 1, 2 or 4 steps of 32 input features (int8: 16). Grid
    axis 0 is the group of ROWS rows (4, or 8 or 16 for int4: `mma_step8`; GROUPED: more
    than 4 rows in all): the programs of all groups that read one weight tile launch next
    to each other. M_KEY (M, with 1-4 as one) only keys the autotuner. WARPS_K rows of warps
    share the program's K range (row r takes chunks r, r + WARPS_K, ...) and sum their
    accumulators at the end, so K splits without the split-K merge through memory. SUMS
    (one group of rows): every program adds its sums in fixed point to part_ptr, int64 [M,
    N] (`kernels.triton_fused.GemvSums`), instead of storing or merging them."""
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if GROUPED:  # the group's rows, outputs, split-K partials and counters
        pid_g = tl.program_id(0)
        x_ptr += pid_g * ROWS * stride_xm
        out_ptr += pid_g * ROWS * stride_om
        M = tl.minimum(M - pid_g * ROWS, ROWS)
        part_ptr += pid_g * max_split * ROWS * N
        cnt_ptr += pid_g * tl.num_programs(1)
    # element e: warp row e // (4 BLOCK_N), lane (e // 4) % 32 of its warp, word j = e % 4
    e = tl.arange(0, WARPS_K * BLOCK_N * 4)
    r = e // (BLOCK_N * 4) if WARPS_K > 1 else 0
    j = e % 4
    q = (e // 4) % 4
    # lane group g supplies B column g: activation row g // 2 (4 rows) or g (8 rows; 16
    # rows: g and g + 8, for two B operands)
    row_m = tl.minimum((e // 16) % 8 if ROWS > 4 else (e // 32) % 4, M - 1)
    n = pid_n * BLOCK_N + (e % (BLOCK_N * 4) // 16) * 4 + j
    x_base = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + j
    x_words = x_base + row_m * (stride_xm // 2)
    y_words = x_base + tl.minimum(row_m + 8, M - 1) * (stride_xm // 2)
    num_chunks = K // ((16 if INT8 else 32) * CHUNK)
    per_split = tl.cdiv(num_chunks, split_k)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, num_chunks)
    acc = tl.zeros((WARPS_K * BLOCK_N * 4,), dtype=tl.float32)
    acc2, acc3, acc4 = acc, acc, acc  # (8 and 16 rows: the odd rows; 16: rows 8-15)

    # two chunks an iteration, each loaded while the other is multiplied (no register
    # copies between iterations); loads past the end reread the last chunk
    last = num_chunks - 1
    live = n < N
    first = tl.minimum(begin + r, last)
    a0, a1, a2, a3, as0, ao0, as1, ao1, as2, ao2, as3, ao3 = load_words(
        w_ptr, s_ptr, o_ptr, first, q, n, live, N, GROUP, CHUNK, INT8)
    await_inputs(PDL)  # the weights above may load while the previous kernel finishes
    ax0, ax1, ax2, ax3 = load_acts(x_words, first, begin + r < end, q, CHUNK, INT8, WARPS_K)
    ay0, ay1, ay2, ay3 = ax0, ax1, ax2, ax3
    if ROWS == 16:
        ay0, ay1, ay2, ay3 = load_acts(y_words, first, begin + r < end, q, CHUNK, INT8,
                                       WARPS_K)
    for c in range(begin, end, 2 * WARPS_K):
        (b0, b1, b2, b3, bx0, bx1, bx2, bx3, by0, by1, by2, by3, bs0, bo0, bs1, bo1, bs2, bo2,
         bs3, bo3) = load_chunk(w_ptr, s_ptr, o_ptr, x_words, y_words, c + WARPS_K + r, end,
                                last, q, n, live, N, GROUP, CHUNK, INT8, WARPS_K, ROWS)
        acc, acc2, acc3, acc4 = multiply_chunk(
            acc, acc2, acc3, acc4, a0, a1, a2, a3, ax0, ax1, ax2, ax3, ay0, ay1, ay2, ay3,
            as0, ao0, as1, ao1, as2, ao2, as3, ao3, GROUP, CHUNK, INT8, ROWS, EMULATE)
        (a0, a1, a2, a3, ax0, ax1, ax2, ax3, ay0, ay1, ay2, ay3, as0, ao0, as1, ao1, as2, ao2,
         as3, ao3) = load_chunk(w_ptr, s_ptr, o_ptr, x_words, y_words, c + 2 * WARPS_K + r,
                                end, last, q, n, live, N, GROUP, CHUNK, INT8, WARPS_K, ROWS)
        if c + WARPS_K < end:  # (some warp row has a second chunk)
            acc, acc2, acc3, acc4 = multiply_chunk(
                acc, acc2, acc3, acc4, b0, b1, b2, b3, bx0, bx1, bx2, bx3, by0, by1, by2, by3,
                bs0, bo0, bs1, bo1, bs2, bo2, bs3, bo3, GROUP, CHUNK, INT8, ROWS, EMULATE)
    if WARPS_K > 1:  # the warp rows' sums, laid out as one row's
        acc = tl.sum(tl.reshape(acc, (WARPS_K, BLOCK_N * 4)), axis=0)
        if ROWS > 4:
            acc2 = tl.sum(tl.reshape(acc2, (WARPS_K, BLOCK_N * 4)), axis=0)
        if ROWS == 16:
            acc3 = tl.sum(tl.reshape(acc3, (WARPS_K, BLOCK_N * 4)), axis=0)
            acc4 = tl.sum(tl.reshape(acc4, (WARPS_K, BLOCK_N * 4)), axis=0)
        e = tl.arange(0, BLOCK_N * 4)
        q = (e // 4) % 4
        n = pid_n * BLOCK_N + (e // 16) * 4 + e % 4
        live = n < N

    # lane (g, q) holds row q's sums for features 4g + j (8 rows: rows 2q and 2q + 1; 16
    # rows: also 8 + 2q and 9 + 2q)
    if SUMS:
        tl.atomic_add(part_ptr + q * N + n, (acc * 4294967296.0).to(tl.int64),
                      mask=live & (q < M), sem="relaxed")
    else:
        if ROWS > 4:
            _store_rows(acc, 2 * q, live, M, out_ptr, part_ptr, pid_k, N, n, stride_om, REDUCE)
            _store_rows(acc2, 2 * q + 1, live, M, out_ptr, part_ptr, pid_k, N, n, stride_om,
                        REDUCE)
        if ROWS == 16:
            _store_rows(acc3, 2 * q + 8, live, M, out_ptr, part_ptr, pid_k, N, n, stride_om,
                        REDUCE)
            _store_rows(acc4, 2 * q + 9, live, M, out_ptr, part_ptr, pid_k, N, n, stride_om,
                        REDUCE)
        if ROWS == 4:
            _store_rows(acc, q, live, M, out_ptr, part_ptr, pid_k, N, n, stride_om, REDUCE)
        if REDUCE:
            offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _reduce_partials(out_ptr, part_ptr, cnt_ptr, offs, offs < N, N, M, stride_om,
                             pid_n, split_k)


@triton.jit
def _store_rows(acc, row, live, M, out_ptr, part_ptr, pid_k, N, n, stride_om,
                REDUCE: tl.constexpr):
    """Store the lane's sums of `row` into out, or (REDUCE) into this split's partials."""
    keep = live & (row < M)
    if REDUCE:
        tl.store(part_ptr + (pid_k * M + row) * N + n, acc, mask=keep)
    else:
        tl.store(out_ptr + row * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=keep)


def _configs() -> list[triton.Config]:
    """One row of 1, 2 or 4 warps along N with split-K 1..32 between programs, or (more
    than 4 rows only, `_prune`) 2, 4 or 8 rows of one warp along K in a program without
    split-K: the fastest warp-row configuration of every shape in runs 43-44 was one of
    these. Each with 4 rows a program, and with 8 or 16 (int4 with more than 4 rows only)."""
    def config(warps_n: int, warps_k: int, reps: int, split: int, rows: int) -> triton.Config:
        return triton.Config({"BLOCK_N": 32 * warps_n * reps, "WARPS_K": warps_k,
                              "split_k": split, "REDUCE": split > 1, "ROWS": rows},
                             num_warps=warps_n * warps_k, num_stages=1)

    return [c for rows in (GROUP_ROWS, *INT4_GROUP_ROWS) for c in
            [config(warps, 1, reps, split, rows) for warps in (1, 2, 4) for reps in (1, 2)
             for split in (1, 2, 4, 8, 16, 32)]
            + [config(1, warps_k, 1, 1, rows) for warps_k in (2, 4, 8)]]


def rows_fit(c: triton.Config, m: int, int8: bool) -> bool:
    """Whether configuration c's rows a program suit a product of m rows: 4 always; 8 (int4
    only) beyond 4 rows, and 16 beyond 8, with one rep a warp (two sets of activations and
    sums: more reps would pass the 255 registers of a thread)."""
    rows = c.kwargs["ROWS"]
    if rows == GROUP_ROWS:
        return True
    if int8 or m <= GROUP_ROWS:
        return False
    return rows == 8 or m > 8 and c.kwargs["BLOCK_N"] == 32 * c.num_warps // c.kwargs["WARPS_K"]


def _prune(configs, named_args, **kwargs):
    """Keep configs whose programs fill ~1 to ~16 waves on 132 SMs (or do not split K)
    and give every warp row a chunk; warp rows along K only for more than 4 rows (at one
    group of rows they never won: docs/benchmarks/gpu.md, run 43), and rows a program as
    `rows_fit` allows; group 32 (a scale and offset pair a step, two chunks of them held)
    takes one rep a warp, which keeps it within the 255 registers of a thread."""
    n, k = named_args["N"], named_args["K"]
    chunks = k // ((16 if kwargs["INT8"] else 32) * kwargs["CHUNK"])
    keep = []
    for c in configs:
        split, block_n, warps_k = c.kwargs["split_k"], c.kwargs["BLOCK_N"], c.kwargs["WARPS_K"]
        if (kwargs["GROUP"] == 32 and not kwargs["INT8"]
                and block_n > 32 * c.num_warps // warps_k):
            continue
        if warps_k > 1 and not kwargs["GROUPED"] or not rows_fit(c, kwargs["M_KEY"],
                                                                  kwargs["INT8"]):
            continue
        if split * warps_k <= chunks and fills_waves(n, block_n, split, 4096):
            keep.append(c)
    return keep or configs[:1]


_mma_tuned = autotuned(_mma_gemv_kernel, _configs(), ["N", "K", "GROUP", "M_KEY", "INT8"],
                       _prune)
# the same kernel adding into GemvSums: tuned apart (no merge changes which split wins), its
# sums buffer restored after every timed run so that only the real one adds
_sums_tuned = autotuned(_mma_gemv_kernel, _configs(), ["N", "K", "GROUP", "INT8"], _prune,
                        restore_value=["part_ptr"])


@functools.cache
def _has_mma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _int8_chunk(k: int, group: int) -> int | None:
    """Steps of 16 input features a chunk for an int8 weight of K = k the kernel serves,
    None for others: groups of 32 (GGUF Q8_0) take chunks of one group (2 steps), groups of
    a multiple of 64 (per channel among them) chunks of 4 steps, so that groups end where
    chunks end; K is a whole number of chunks."""
    chunk = 2 if group == 32 else 4 if group % 64 == 0 else None
    return chunk if chunk is not None and k % (16 * chunk) == 0 else None


def _chunk(k: int, group: int, int8: bool) -> int:
    """Steps a chunk of the kernel's K walk (`_mma_gemv_kernel`'s CHUNK) for a weight."""
    if int8:
        chunk = _int8_chunk(k, group)
        if chunk is None:
            raise ValueError("the mma GEMV takes int8 weights in groups of 32 or a multiple "
                             f"of 64 with K in whole chunks, got groups of {group}, K = {k}")
        return chunk
    # groups of 64 take chunks of 2 steps, so that each group ends where a chunk ends
    # (flushes inside a chunk never ran on a device)
    return 4 if k % 128 == 0 and group != 64 else group // 32


def candidates(n: int, k: int, group: int, int8: bool, m: int) -> list[dict]:
    """The configurations the autotuner tries for a product of m rows by an [n, k] weight
    in groups of `group` (as `mma_gemv`'s config argument), for tuning scripts
    (`kernels.tune_gpu`)."""
    kept = _prune(_configs(), {"N": n, "K": k}, GROUP=group, INT8=int8,
                  CHUNK=_chunk(k, group, int8), GROUPED=m > GROUP_ROWS,
                  M_KEY=max(m, GROUP_ROWS))
    return [{"BLOCK_N": c.kwargs["BLOCK_N"], "split_k": c.kwargs["split_k"],
             "num_warps": c.num_warps, "WARPS_K": c.kwargs["WARPS_K"], "ROWS": c.kwargs["ROWS"]}
            for c in kept]


def mma_gemv_supported(x: torch.Tensor, packed: PackedWeight) -> bool:
    """Whether `mma_gemv` serves this product: bf16 rows on CUDA sm_80+ and a ``words``
    weight, int4 with 1..16 rows or int8 (per channel, or in groups of 32 or a multiple
    of 64: `_int8_chunk`) with 1..8 rows. At 12 and 16 rows the tensor-core GEMM
    serves int8 faster; the older kernels serve the rest."""
    if packed.scheme == "int4":
        most = MAX_ROWS
    elif packed.scheme == "int8" and _int8_chunk(packed.in_features,
                                                  packed.group_size) is not None:
        most = INT8_MAX_ROWS
    else:
        return False
    return (x.is_cuda and packed.layout == "words" and x.dtype == torch.bfloat16
            and 1 <= x.shape[0] <= most and _has_mma(x.device))


def mma_gemv(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor,
             config: dict | None = None) -> torch.Tensor:
    """x [M <= 16, K] bf16 @ W.T -> out [M, N] (float32 accumulation) for an int4 or int8
    ``words`` weight, rows in groups of 4 or (int4) 8 or 16 (one program a group, tile and
    K share). `config` ({"BLOCK_N", "split_k", "num_warps", "WARPS_K", "ROWS"}; num_warps a
    multiple of WARPS_K, BLOCK_N of 32 per warp along N, ROWS 4 by default) is launched as
    given; without it, the device's table (`kernels.gemv_table`) or the autotuner picks."""
    m, n = x.shape[0], packed.out_features
    max_split = 32 if config is None else config["split_k"]
    # split-K partials: a group's rows at stride N, groups max_split * ROWS rows apart (M
    # rounded up to 8 covers groups of 4 and 8; one group of 16 stores only its M rows)
    rows = m if m <= GROUP_ROWS else triton.cdiv(m, 8) * 8
    part = torch.empty(max_split * rows * n, dtype=torch.float32, device=x.device)
    launch(x, packed, out, part, max_split, config, False)
    return out


def launch(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None,
            part: torch.Tensor, max_split: int, config: dict | None, sums: bool) -> None:
    """The kernel over x's rows: into `out` through the float32 split-K partials `part`,
    or (`sums`) added into the int64 GemvSums buffer `part` (`kernels.gemv_sums`)."""
    m, k = x.shape
    n = packed.out_features
    x = x.contiguous()
    if x.data_ptr() % 16:  # 16-byte activation loads fix the layout the PTX needs
        x = x.clone()
    int8 = packed.scheme == "int8"
    group = packed.group_size
    chunk = _chunk(k, group, int8)
    counters = _tile_counters(x.device, triton.cdiv(m, GROUP_ROWS) * triton.cdiv(n, 32))
    offsets = packed.scales if int8 else packed.offsets  # (int8: never read)
    args = (x, packed.qweight, packed.scales, offsets, part if sums else out, part, counters,
            m, n, k, x.stride(0), n if sums else out.stride(0))
    # a tuning for 1-4 rows, and one for each count above (the best group size and split
    # differ between 5 and 8 rows: docs/benchmarks/gpu.md, run 71)
    m_key = max(m, GROUP_ROWS)
    if config is None:  # the device's table, if it has this key (`kernels.gemv_table`)
        key = dict(N=n, K=k, GROUP=group, INT8=int8) | ({} if sums else dict(M_KEY=m_key))
        config = gemv_table.lookup("mma_gemv_sums" if sums else "mma_gemv", x.device, **key)
    consts = dict(GROUP=group, CHUNK=chunk, GROUPED=m > GROUP_ROWS, INT8=int8,
                  EMULATE=os.environ.get("TRITON_INTERPRET") == "1", SUMS=sums,
                  **pdl_args(x.device))
    if config is None:
        tuner = _sums_tuned if sums else _mma_tuned
        tuner[lambda meta: (triton.cdiv(m, meta["ROWS"]), triton.cdiv(n, meta["BLOCK_N"]),
                            meta["split_k"])](*args, max_split=max_split, M_KEY=m_key,
                                              **consts)
    else:
        split, warps = config["split_k"], config.get("num_warps", 1)
        warps_k, rows = config.get("WARPS_K", 1), config.get("ROWS", GROUP_ROWS)
        if warps % warps_k or config["BLOCK_N"] % (32 * warps // warps_k):
            raise ValueError("num_warps must be a multiple of WARPS_K and BLOCK_N of 32 per "
                             f"warp along N, got {config}")
        if rows not in (GROUP_ROWS, *INT4_GROUP_ROWS) or rows > GROUP_ROWS and (int8 or sums):
            raise ValueError(f"ROWS is 4, or 8 or 16 for int4 without sums, got {config}")
        _mma_gemv_kernel[(triton.cdiv(m, rows), triton.cdiv(n, config["BLOCK_N"]), split)](
            *args, split, max_split, m_key, **consts, BLOCK_N=config["BLOCK_N"],
            WARPS_K=warps_k, REDUCE=split > 1 and not sums, ROWS=rows, num_warps=warps,
            num_stages=1)
