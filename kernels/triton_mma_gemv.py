"""W4A16 (and per-channel W8A16) for M = 1..16 activation rows (decode and verification)
on the tensor cores, over the ``words`` layout (CUDA, sm_80+: inline PTX; TRITON_INTERPRET,
which has no inline PTX, runs the same kernel with each mma step emulated in tensor ops,
`_emulated_step`, so the CPU tests check all of it but the PTX itself).

The CUDA-core GEMV (`kernels.triton_gemv`) spends ~4.5 instructions per weight and lane
(unpack, multiply-add, activation traffic: its SASS), which on an H200 takes longer than
streaming the 4-bit weight. Here one ``mma.sync.m16n8k16`` (bf16 in, float32 accumulate)
consumes one int32 word (8 codes) per lane after 3 shifts and 4 ``lop3``; with the loads,
the bias mma and the per-group scaling a weight costs ~1.7 instructions (SASS, group 128),
and the kernel is bound by load latency rather than issue (docs/benchmarks/gpu.md).

Fragment plan (PTX ISA, m16n8k16 .bf16: lane = 4 * g + q). A 16-byte load gives lane
(g, q) the words of 4 neighbouring output features ``4g + j`` (j = 0..3) in word row
``r = 4c + q`` (features 8r..8r+7). Per word, ``(w >> 4i) & 0x000F000F | 0x43004300`` is
the bfloat16 pair ``(128 + u_i, 128 + u_{i+4})``; the four pairs are the word's A fragment,
so A row g holds codes 0, 4, 2, 6 of each of the 4 lanes' words (one output feature, 32
input features) and row g + 8 holds codes 1, 5, 3, 7 (the same feature). B column 2m
carries activation row m's features in row g's order, column 2m + 1 in row g + 8's; lane
(g, q) supplies column g (``prmt`` of its 16-byte activation load). Then lane (g, m) ends
with ``c0 + c3 = sum (128 + u) x_m`` for feature 4g + j over the 32 features. A second
mma with A = 128 everywhere gives ``128 * sum x_m`` over the same features (c0 + c3 again).
Accumulated over a quantization group G of the weight (G / 32 steps), the group adds
``s * (D - B) + o * B / 128`` to a float32 accumulator: exact apart from float32 rounding
(the +128 bias costs ~4 of float32's 24 bits). Rows past M repeat row M - 1 and their
sums are dropped.

A program owns BLOCK_N features (32 a warp and rep) and a share of K, walked in chunks of
CHUNK steps two at a time: while one chunk is multiplied the other's words, activations,
scales and offsets are in flight, with no register copies between iterations. Split-K
partials are merged by the last program to arrive (`kernels.triton_gemv`). The first
chunk's words load before the kernel waits for its predecessor (`kernels.pdl`).

One mma serves 4 rows. More rows (verification of up to 15 draft tokens) run as groups
of 4, one program each, the groups of a weight tile next to each other in the grid, so
that they read it at about the same time. On an H200 two groups take 1.5-1.7x one
group's time, so they share the reads only in part; up to 12 rows this beats the
tensor-core GEMM of `kernels.triton_gemm`, at 16 they tie (docs/benchmarks/gpu.md).

int8 (``INT8``) runs the same steps over words of 4 codes u = q + 128 (16 input features
a step): a word's nibbles are the low and high halves of its bytes, so codes 0, 4, 2, 6
(row g) are the low nibbles of features 4r, 4r+2, 4r+1, 4r+3 and codes 1, 5, 3, 7 (row
g + 8) their high nibbles, built with ``0x45004500`` into ``2048 + 16 u_hi``. Both B
columns then carry those 4 features (``prmt`` of two activation words), D's c0 + c3 is
``sum (2176 + u) x`` and the bias mma's ``256 sum x``, and a flush adds ``s (D - 9 B) = s
sum (u - 128) x`` (the bias costs ~5 of float32's bits). Per-channel groups span chunks,
so int8 flushes at every chunk end.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.pdl import await_inputs, pdl_args
from kernels.quant import PackedWeight
from kernels.triton_gemv import _reduce_partials, _tile_counters, autotuned, fills_waves

GROUP_ROWS = 4  # activation rows one mma serves (B's 8 columns, two per row)
MAX_ROWS = 16  # rows served: up to 4 groups of GROUP_ROWS (grid axis 0)
INT8_MAX_ROWS = 8  # int8 rows routed here (`mma_gemv_supported`)


def _step_asm(chain: bool, int8: bool) -> str:
    """One mma step: outputs D_0..D_3 and the bias D_b (4 float32 each: $0..$19); inputs the
    4 words ($20..$23), the lane's 4 activation words ($24..$27: int4, bf16 pairs of
    features 8r..8r+7; int8, those of 4r..4r+3 twice) and, when chaining, the previous
    D_0..D_3, D_b ($28..$47)."""
    lines = [
        "{",
        ".reg .b32 a0, a1, a2, a3, t, b0, b1, sel, lane, nib, one28, hi;",
        ".reg .pred odd;",
        ".reg .f32 z;",
        "mov.b32 nib, 0x000F000F;",
        "mov.b32 one28, 0x43004300;",
        "mov.f32 z, 0f00000000;",
    ]
    if int8:  # both columns carry features (4r, 4r+2 | 4r+1, 4r+3); high nibbles x16
        lines += ["prmt.b32 b0, $24, $25, 0x5410;", "prmt.b32 b1, $24, $25, 0x7632;",
                  "mov.b32 hi, 0x45004500;"]
    else:
        lines += [
            "mov.u32 lane, %laneid;",
            "and.b32 lane, lane, 4;",
            "setp.ne.u32 odd, lane, 0;",
            "selp.b32 sel, 0x7632, 0x5410, odd;",  # odd g: codes 1,5,3,7's features
            "prmt.b32 b0, $24, $26, sel;",
            "prmt.b32 b1, $25, $27, sel;",
            "mov.b32 hi, one28;",
        ]

    def acc(i: int) -> str:
        return ", ".join(f"${28 + 4 * i + p}" for p in range(4)) if chain else "z, z, z, z"

    for j in range(4):
        w = f"${20 + j}"
        lines.append(f"lop3.b32 a0, {w}, nib, one28, 0xEA;")
        for i, shift in ((1, 4), (2, 8), (3, 12)):  # a1, a3: codes 1,5 and 3,7 (rows g + 8)
            lines.append(f"shr.u32 t, {w}, {shift};")
            lines.append(f"lop3.b32 a{i}, t, nib, {'hi' if i % 2 else 'one28'}, 0xEA;")
        out = ", ".join(f"${4 * j + p}" for p in range(4))
        lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     f"{{{out}}}, {{a0, a1, a2, a3}}, {{b0, b1}}, {{{acc(j)}}};")
    lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{$16, $17, $18, $19}, {one28, one28, one28, one28}, {b0, b1}, "
                 f"{{{acc(4)}}};")
    lines.append("}")
    return "\n".join(lines)


# Group end: acc_j += s_j * (c0 + c3 of D_j) + m_j * (c0 + c3 of D_b), m = o / 128 - s.
# Outputs acc ($0..$3); inputs D_0..D_3 ($4..$19), D_b ($20..$23), acc, s, m ($24..$35).
_FLUSH_ASM = tl.constexpr("\n".join(
    ["{", ".reg .f32 xb, t;", "add.f32 xb, $20, $23;"]
    + [line for j in range(4) for line in (
        f"add.f32 t, ${4 + 4 * j}, ${7 + 4 * j};",
        f"fma.rn.f32 ${j}, ${28 + j}, t, ${24 + j};",
        f"fma.rn.f32 ${j}, ${32 + j}, xb, ${j};")]
    + ["}"]))

_STEP_FIRST = tl.constexpr(_step_asm(chain=False, int8=False))
_STEP_CHAIN = tl.constexpr(_step_asm(chain=True, int8=False))
_STEP_FIRST8 = tl.constexpr(_step_asm(chain=False, int8=True))
_STEP_CHAIN8 = tl.constexpr(_step_asm(chain=True, int8=True))
_STEP_FIRST_IO = tl.constexpr(",".join(["=f"] * 20 + ["r"] * 8))
_STEP_CHAIN_IO = tl.constexpr(",".join(["=f"] * 20 + ["r"] * 8 + ["f"] * 20))
_FLUSH_IO = tl.constexpr(",".join(["=f"] * 4 + ["f"] * 32))


@triton.jit
def _mma_step(w, xw, d0, d1, d2, d3, db, FIRST: tl.constexpr, INT8: tl.constexpr,
              EMULATE: tl.constexpr):
    if EMULATE:
        return _emulated_step(w, xw, d0, d1, d2, d3, db, FIRST, INT8)
    if FIRST:
        return tl.inline_asm_elementwise(
            _STEP_FIRST8 if INT8 else _STEP_FIRST, _STEP_FIRST_IO, [w, xw],
            dtype=(tl.float32,) * 5, is_pure=True, pack=4)
    return tl.inline_asm_elementwise(
        _STEP_CHAIN8 if INT8 else _STEP_CHAIN, _STEP_CHAIN_IO, [w, xw, d0, d1, d2, d3, db],
        dtype=(tl.float32,) * 5, is_pure=True, pack=4)


@triton.jit
def _flush(d0, d1, d2, d3, db, acc, s, m, EMULATE: tl.constexpr):
    if EMULATE:  # every element of a lane holds its D's c0 + c3 (see _emulated_step)
        j = tl.arange(0, acc.shape[0]) % 4
        d = tl.where(j == 0, d0, tl.where(j == 1, d1, tl.where(j == 2, d2, d3)))
        return acc + s * d + m * db
    return tl.inline_asm_elementwise(
        _FLUSH_ASM, _FLUSH_IO, [d0, d1, d2, d3, db, acc, s, m],
        dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _emulated_step(w, xw, d0, d1, d2, d3, db, FIRST: tl.constexpr, INT8: tl.constexpr):
    """What `_step_asm` leaves in the lanes, in plain tensor ops for TRITON_INTERPRET (which
    has no inline PTX): for lane (g, q), D_i's c0 + c3 = sum over the step's features of
    (bias + u) x_q for output feature 4g + i (int4: 32 features, bias 128; int8: 16
    features, bias 128 + 2048 from the low and the x16 high nibble), and D_b's = 128 sum x_q
    (int8: 256 sum x_q, both columns carrying the same features), each in all four of the
    lane's elements (c1 and c2, the cross terms, are never read). Elements are [block of 32
    features, g, q, j] in row-major order, as the kernel lays them out."""
    B: tl.constexpr = w.shape[0] // 128
    # activations: lane (g, q) word j = bfloat16 features 2j, 2j + 1 of its word row (int8:
    # words j and j + 2 are the same) of row g // 2
    halves = tl.reshape(xw, (B, 8, 4, 4, 1)) >> (tl.arange(0, 2) * 16)
    x = (((halves & 0xFFFF) << 16).to(tl.float32, bitcast=True))  # [B, g, q, j, 2]
    x = tl.reshape(x, (B, 4, 2, 4, 8))  # [B, row m, g % 2, q, feature p of the word row]
    x = tl.sum(tl.where(tl.arange(0, 2)[None, None, :, None, None] == 0, x, 0.0), axis=2)
    if INT8:  # features 4r..4r+3: p = 4..7 repeat them
        x = tl.where(tl.arange(0, 8)[None, None, None, :] < 4, x, 0.0)
    bias = tl.sum(tl.sum(x, axis=3), axis=2) * (256.0 if INT8 else 128.0)  # [B, m]
    db_new = tl.reshape(tl.broadcast_to(bias[:, None, :, None], (B, 8, 4, 4)), w.shape)
    words = tl.reshape(w, (B, 8, 4, 4))  # [B, g, q (word row 4c + q), j (feature 4g + j)]
    n0, n1 = _emulated_dot(words, x, 0, INT8), _emulated_dot(words, x, 1, INT8)
    n2, n3 = _emulated_dot(words, x, 2, INT8), _emulated_dot(words, x, 3, INT8)
    if FIRST:
        return n0, n1, n2, n3, db_new
    return d0 + n0, d1 + n1, d2 + n2, d3 + n3, db + db_new


@triton.jit
def _emulated_dot(words, x, i: tl.constexpr, INT8: tl.constexpr):
    """Per element of lane (g, q): sum over the step of (bias + u) x_q for feature 4g + i."""
    B: tl.constexpr = words.shape[0]
    j = tl.arange(0, 4)[None, None, None, :]
    word = tl.sum(tl.where(j == i, words, 0), axis=3)[:, :, :, None]  # [B, g, q, 1]
    p = tl.arange(0, 8)[None, None, None, :]
    if INT8:  # byte p % 4 (x is zero for p >= 4)
        u = ((word >> (p % 4) * 8) & 0xFF).to(tl.float32) + 2176.0
    else:
        u = ((word >> p * 4) & 0xF).to(tl.float32) + 128.0  # [B, g, q, p]
    dot = tl.sum(tl.sum(u[:, :, None, :, :] * x[:, None, :, :, :], axis=4), axis=3)  # [B, g, m]
    return tl.reshape(tl.broadcast_to(dot[:, :, :, None], (B, 8, 4, 4)), (B * 128,))


@triton.jit
def _pick(i: tl.constexpr, v0, v1, v2, v3):
    return v0 if i == 0 else v1 if i == 1 else v2 if i == 2 else v3


@triton.jit
def _load_words(w_ptr, s_ptr, o_ptr, c, q, n, live, N, GROUP: tl.constexpr,
                CHUNK: tl.constexpr, INT8: tl.constexpr):
    """Chunk c's words (one tensor a step; word rows ``4 * (CHUNK * c + step) + q``) and
    the raw scales and offsets of its groups (one pair a group; unused slots repeat the
    first; int8 has no offsets, its slot repeats the scale). The caller clamps c; features
    past N (not `live`) are left unloaded, their sums unused."""
    FEATS: tl.constexpr = 16 if INT8 else 32  # input features a step
    words = w_ptr + (c * 4 * CHUNK + q) * N + n
    w0 = tl.load(words, mask=live)
    w1, w2, w3 = w0, w0, w0
    if CHUNK > 1:
        w1 = tl.load(words + 4 * N, mask=live)
    if CHUNK > 2:
        w2 = tl.load(words + 8 * N, mask=live)
        w3 = tl.load(words + 12 * N, mask=live)
    meta = (c * FEATS * CHUNK) // GROUP * N + n
    s0 = tl.load(s_ptr + meta, mask=live)
    o0 = s0 if INT8 else tl.load(o_ptr + meta, mask=live)
    s1, o1, s2, o2, s3, o3 = s0, o0, s0, o0, s0, o0
    if CHUNK * FEATS // GROUP > 1:  # (int4 only: int8 groups span whole chunks)
        s1 = tl.load(s_ptr + meta + N, mask=live)
        o1 = tl.load(o_ptr + meta + N, mask=live)
    if CHUNK * FEATS // GROUP > 2:
        s2 = tl.load(s_ptr + meta + 2 * N, mask=live)
        o2 = tl.load(o_ptr + meta + 2 * N, mask=live)
        s3 = tl.load(s_ptr + meta + 3 * N, mask=live)
        o3 = tl.load(o_ptr + meta + 3 * N, mask=live)
    return w0, w1, w2, w3, s0, o0, s1, o1, s2, o2, s3, o3


@triton.jit
def _load_acts(x_words, c, q, CHUNK: tl.constexpr, INT8: tl.constexpr):
    """Chunk c's activation words, one tensor a step (c clamped by the caller): a step's
    16 words (int8: 8), the 4 of word row 4c + q (int8: 2) for lane (g, q)."""
    STEP: tl.constexpr = 8 if INT8 else 16
    x = x_words + c * STEP * CHUNK + q * (STEP // 4)
    x0 = tl.load(x)
    x1, x2, x3 = x0, x0, x0
    if CHUNK > 1:
        x1 = tl.load(x + STEP)
    if CHUNK > 2:
        x2 = tl.load(x + 2 * STEP)
        x3 = tl.load(x + 3 * STEP)
    return x0, x1, x2, x3


@triton.jit
def _load_chunk(w_ptr, s_ptr, o_ptr, x_words, c, q, n, live, N, GROUP: tl.constexpr,
                CHUNK: tl.constexpr, INT8: tl.constexpr):
    """`_load_words` and `_load_acts` of chunk c, in `_chunk`'s argument order."""
    w0, w1, w2, w3, s0, o0, s1, o1, s2, o2, s3, o3 = _load_words(
        w_ptr, s_ptr, o_ptr, c, q, n, live, N, GROUP, CHUNK, INT8)
    x0, x1, x2, x3 = _load_acts(x_words, c, q, CHUNK, INT8)
    return w0, w1, w2, w3, x0, x1, x2, x3, s0, o0, s1, o1, s2, o2, s3, o3


@triton.jit
def _chunk(acc, w0, w1, w2, w3, x0, x1, x2, x3, s0, o0, s1, o1, s2, o2, s3, o3,
           GROUP: tl.constexpr, CHUNK: tl.constexpr, INT8: tl.constexpr,
           EMULATE: tl.constexpr):
    """acc after one chunk: CHUNK mma steps, a flush at the end of every group (and of the
    chunk, when a group spans chunks: int8 per channel). The flush adds s (D - 9 B) for
    int8, whose D carries a bias of 2176 a code and B one of 256: s sum (u - 128) x."""
    FEATS: tl.constexpr = 16 if INT8 else 32
    GSTEPS: tl.constexpr = GROUP // FEATS  # steps per quantization group
    FLUSH: tl.constexpr = GSTEPS if GSTEPS < CHUNK else CHUNK  # steps between flushes
    d0, d1, d2, d3, db = acc, acc, acc, acc, acc  # (unread by the first step of a group)
    for i in tl.static_range(CHUNK):
        d0, d1, d2, d3, db = _mma_step(_pick(i, w0, w1, w2, w3), _pick(i, x0, x1, x2, x3),
                                       d0, d1, d2, d3, db, i % FLUSH == 0, INT8, EMULATE)
        if (i + 1) % FLUSH == 0:
            gi = i // GSTEPS
            s = _pick(gi, s0, s1, s2, s3).to(tl.float32)
            o = _pick(gi, o0, o1, o2, o3).to(tl.float32)
            m = -9.0 * s if INT8 else o * 0.0078125 - s
            acc = _flush(d0, d1, d2, d3, db, acc, s, m, EMULATE)
    return acc


@triton.jit(do_not_specialize=["split_k", "M"])
def _mma_gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K,
                     stride_xm, stride_om, split_k, max_split, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, REDUCE: tl.constexpr,
                     GROUPED: tl.constexpr, INT8: tl.constexpr, EMULATE: tl.constexpr,
                     PDL: tl.constexpr):
    """See the module docs; CHUNK is 1, 2 or 4 steps of 32 input features (int8: 16). Grid
    axis 0 is the group of (up to 4) rows (GROUPED: more than one): the programs of all
    groups that read one weight tile launch next to each other."""
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    if GROUPED:  # the group's rows, outputs, split-K partials and counters
        pid_g = tl.program_id(0)
        x_ptr += pid_g * 4 * stride_xm
        out_ptr += pid_g * 4 * stride_om
        M = tl.minimum(M - pid_g * 4, 4)
        part_ptr += pid_g * max_split * 4 * N
        cnt_ptr += pid_g * tl.num_programs(1)
    e = tl.arange(0, BLOCK_N * 4)  # element e: lane (e // 4) % 32 of its warp, word j = e % 4
    j = e % 4
    q = (e // 4) % 4
    row_m = tl.minimum((e // 32) % 4, M - 1)  # lane group g supplies B column g (row g // 2)
    n = pid_n * BLOCK_N + (e // 16) * 4 + j
    x_words = (x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + row_m * (stride_xm // 2)
               + (j % 2 if INT8 else j))
    num_chunks = K // ((16 if INT8 else 32) * CHUNK)
    per_split = tl.cdiv(num_chunks, split_k)
    begin = pid_k * per_split
    end = tl.minimum(begin + per_split, num_chunks)
    acc = tl.zeros((BLOCK_N * 4,), dtype=tl.float32)

    # two chunks an iteration, each loaded while the other is multiplied (no register
    # copies between iterations); loads past the end reread the last chunk
    last = num_chunks - 1
    live = n < N
    first = tl.minimum(begin, last)
    a0, a1, a2, a3, as0, ao0, as1, ao1, as2, ao2, as3, ao3 = _load_words(
        w_ptr, s_ptr, o_ptr, first, q, n, live, N, GROUP, CHUNK, INT8)
    await_inputs(PDL)  # the weights above may load while the previous kernel finishes
    ax0, ax1, ax2, ax3 = _load_acts(x_words, first, q, CHUNK, INT8)
    for c in range(begin, end, 2):
        b0, b1, b2, b3, bx0, bx1, bx2, bx3, bs0, bo0, bs1, bo1, bs2, bo2, bs3, bo3 = (
            _load_chunk(w_ptr, s_ptr, o_ptr, x_words, tl.minimum(c + 1, last), q, n, live, N,
                        GROUP, CHUNK, INT8))
        acc = _chunk(acc, a0, a1, a2, a3, ax0, ax1, ax2, ax3, as0, ao0, as1, ao1, as2, ao2,
                     as3, ao3, GROUP, CHUNK, INT8, EMULATE)
        a0, a1, a2, a3, ax0, ax1, ax2, ax3, as0, ao0, as1, ao1, as2, ao2, as3, ao3 = (
            _load_chunk(w_ptr, s_ptr, o_ptr, x_words, tl.minimum(c + 2, last), q, n, live, N,
                        GROUP, CHUNK, INT8))
        if c + 1 < end:
            acc = _chunk(acc, b0, b1, b2, b3, bx0, bx1, bx2, bx3, bs0, bo0, bs1, bo1, bs2,
                         bo2, bs3, bo3, GROUP, CHUNK, INT8, EMULATE)

    # lane (g, q) holds row q's sums for features 4g + j
    keep = live & (q < M)
    if not REDUCE:
        tl.store(out_ptr + q * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=keep)
    else:
        tl.store(part_ptr + (pid_k * M + q) * N + n, acc, mask=keep)
        offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _reduce_partials(out_ptr, part_ptr, cnt_ptr, offs, offs < N, N, M, stride_om, pid_n,
                         split_k)


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": 32 * warps * reps, "split_k": split, "REDUCE": split > 1},
                          num_warps=warps, num_stages=1)
            for warps in (1, 2, 4) for reps in (1, 2) for split in (1, 2, 4, 8, 16, 32)]


def _prune(configs, named_args, **kwargs):
    """Keep configs whose programs fill ~1 to ~16 waves on 132 SMs (or do not split K);
    group 32 (a scale and offset pair a step, two chunks of them held) takes one rep a
    warp, which keeps it within the 255 registers of a thread."""
    n, k = named_args["N"], named_args["K"]
    chunks = k // ((16 if kwargs["INT8"] else 32) * kwargs["CHUNK"])
    keep = []
    for c in configs:
        split, block_n = c.kwargs["split_k"], c.kwargs["BLOCK_N"]
        if kwargs["GROUP"] == 32 and not kwargs["INT8"] and block_n > 32 * c.num_warps:
            continue
        if split <= chunks and fills_waves(n, block_n, split, 4096):
            keep.append(c)
    return keep or configs[:1]


_mma_tuned = autotuned(_mma_gemv_kernel, _configs(), ["N", "K", "GROUP", "GROUPED", "INT8"],
                       _prune)


@functools.cache
def _has_mma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _per_channel(packed: PackedWeight) -> bool:
    """An int8 weight the kernel serves: one scale a channel, K in whole chunks of 64."""
    return packed.group_size == packed.in_features and packed.in_features % 64 == 0


def _int8_verified(packed: PackedWeight) -> bool:
    """The int8 weights the device tests covered (run 41: per channel, an even number of
    chunks, N a multiple of 32); `tests/gpu` also holds K = 576 with a ragged N, not yet
    run on a device."""
    return _per_channel(packed) and packed.in_features % 128 == 0 and packed.out_features % 32 == 0


def mma_gemv_supported(x: torch.Tensor, packed: PackedWeight) -> bool:
    """Whether `mma_gemv` serves this product: bf16 rows on CUDA sm_80+ and a ``words``
    weight, int4 with 1..16 rows or int8 quantized per channel with 1..8 rows, in the
    shapes the device tests covered (`_int8_verified`). At 12 and 16 rows the tensor-core
    GEMM serves int8 faster; int8 in groups (GGUF Q8_0) failed a device test and is not
    taken (docs/benchmarks/gpu.md, run 41): the older kernels serve the rest."""
    if packed.scheme == "int4":
        most = MAX_ROWS
    elif packed.scheme == "int8" and _int8_verified(packed):
        most = INT8_MAX_ROWS
    else:
        return False
    return (x.is_cuda and packed.layout == "words" and x.dtype == torch.bfloat16
            and 1 <= x.shape[0] <= most and _has_mma(x.device))


def mma_gemv(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor,
             config: dict | None = None) -> torch.Tensor:
    """x [M <= 16, K] bf16 @ W.T -> out [M, N] (float32 accumulation) for an int4 or int8
    ``words`` weight, rows in groups of 4 (one program a group, tile and K share). `config`
    ({"BLOCK_N", "split_k", "num_warps"}; BLOCK_N a multiple of 32 per warp) skips
    autotuning."""
    m, k = x.shape
    n = packed.out_features
    x = x.contiguous()
    int8 = packed.scheme == "int8"
    if int8 and not _per_channel(packed):
        raise ValueError("the mma GEMV takes int8 weights quantized per channel with K a "
                         f"multiple of 64, got groups of {packed.group_size}, K = {k}")
    # groups of 64 take chunks of 2 steps, so that each group ends where a chunk ends:
    # groups of 2 steps in chunks of 4 failed a device test with int8
    # (docs/benchmarks/gpu.md, run 41) and were never run with int4
    group = packed.group_size
    chunk = 4 if int8 or (k % 128 == 0 and group != 64) else group // 32
    groups = triton.cdiv(m, GROUP_ROWS)
    max_split = 32 if config is None else config["split_k"]
    # split-K partials: a group's rows at stride N, groups (if several) max_split * 4 rows apart
    rows = m if groups == 1 else groups * GROUP_ROWS
    part = torch.empty(max_split * rows * n, dtype=torch.float32, device=x.device)
    counters = _tile_counters(x.device, groups * triton.cdiv(n, 32))
    offsets = packed.scales if int8 else packed.offsets  # (int8: never read)
    args = (x, packed.qweight, packed.scales, offsets, out, part, counters, m, n, k,
            x.stride(0), out.stride(0))
    consts = dict(GROUP=group, CHUNK=chunk, GROUPED=groups > 1, INT8=int8,
                  EMULATE=os.environ.get("TRITON_INTERPRET") == "1", **pdl_args(x.device))
    if config is None:
        _mma_tuned[lambda meta: (groups, triton.cdiv(n, meta["BLOCK_N"]), meta["split_k"])](
            *args, max_split=max_split, **consts)
    else:
        split, warps = config["split_k"], config.get("num_warps", 1)
        if config["BLOCK_N"] % (32 * warps):
            raise ValueError(f"BLOCK_N must be a multiple of 32 per warp, got {config}")
        _mma_gemv_kernel[(groups, triton.cdiv(n, config["BLOCK_N"]), split)](
            *args, split, max_split, **consts, BLOCK_N=config["BLOCK_N"], REDUCE=split > 1,
            num_warps=warps, num_stages=1)
    return out
