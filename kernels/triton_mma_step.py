"""One mma step of the tensor-core GEMV (`kernels.triton_mma_gemv`): the inline PTX that
multiplies a lane's packed int4 or int8 words by its activations, the flush that scales a
quantization group into the float32 accumulator, and the same two in plain tensor ops for
TRITON_INTERPRET, which has no inline PTX (`_emulated_step`), so that the CPU tests check
all of the GEMV but the PTX itself.

Fragment plan (PTX ISA, m16n8k16 .bf16: lane = 4 * g + q). Triton lays the GEMV's tensors
out 4 consecutive elements a thread (a lane's 4 words below) because its 16-byte loads fix
that layout (`tests/test_kernels_mma_layout.py` checks the compiled kernel). A 16-byte load
gives lane (g, q) the words of 4 neighbouring output features ``4g + j`` (j = 0..3) in word
row ``r = 4c + q`` (features 8r..8r+7). Per word, ``(w >> 4i) & 0x000F000F | 0x43004300``
is the bfloat16 pair ``(128 + u_i, 128 + u_{i+4})``; the four pairs are the word's A
fragment, so A row g holds codes 0, 4, 2, 6 of each of the 4 lanes' words (one output
feature, 32 input features) and row g + 8 holds codes 1, 5, 3, 7 (the same feature). B
column 2m carries activation row m's features in row g's order, column 2m + 1 in row g +
8's; lane (g, q) supplies column g (``prmt`` of its 16-byte activation load). Then lane (g,
m) ends with ``c0 + c3 = sum (128 + u) x_m`` for feature 4g + j over the 32 features. A
second mma with A = 128 everywhere gives ``128 * sum x_m`` over the same features (c0 + c3
again). Accumulated over a quantization group G of the weight (G / 32 steps), the group
adds ``s * (D - B) + o * B / 128`` to a float32 accumulator: exact apart from float32
rounding (the +128 bias costs ~4 of float32's 24 bits). Rows past M repeat row M - 1 and
their sums are dropped.

int8 (``INT8``) runs the same steps over words of 4 codes u = q + 128 (16 input features
a step): a word's nibbles are the low and high halves of its bytes, so codes 0, 4, 2, 6
(row g) are the low nibbles of features 4r, 4r+2, 4r+1, 4r+3 and codes 1, 5, 3, 7 (row
g + 8) their high nibbles, built with ``0x45004500`` into ``2048 + 16 u_hi``. Lane (g,
q) loads the 4 activation words of word rows 2 (q // 2) and 2 (q // 2) + 1 (16 aligned
bytes, as int4 does: the loads that fix the kernel's layout) and takes the 2 of row q.
Both B columns then carry those 4 features (``prmt`` of the 2 words), D's c0 + c3 is
``sum (2176 + u) x`` and the bias mma's ``256 sum x``, and a flush adds ``s (D - 9 B) = s
sum (u - 128) x`` (the bias costs ~5 of float32's bits).

Eight rows (int4, `mma_step8`): rows g and g + 8 of A hold two different output features
instead of two halves of one, so no D element is wasted. Lane (g, q) loads activation row
g (word row 4c + q) and supplies column g of two B operands: B with the features of codes
0, 4, 2, 6 of its word row and B' with those of codes 1, 5, 3, 7. For each pair of the
lane's words (features 4g, 4g + 1, then 4g + 2, 4g + 3), A = codes 0, 4, 2, 6 of both times
B plus A' = codes 1, 5, 3, 7 of both times B' is one 16 x 8 tile D: c0, c1 feature 4g + 2p
(rows 2q, 2q + 1), c2, c3 feature 4g + 2p + 1. The bias is two mma (A = 128 times B, then
B'), c0 and c1 its rows' ``128 sum x``; a step is 6 mma for 8 rows (5 for 4 above), and the
flush scales each feature's two rows as above.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _step_asm(chain: bool, int8: bool) -> str:
    """One mma step: outputs D_0..D_3 and the bias D_b (4 float32 each: $0..$19); inputs the
    4 words ($20..$23), the lane's 4 activation words ($24..$27: int4, bf16 pairs of
    features 8r..8r+7; int8, those of 8 (r // 2)..8 (r // 2) + 7, of which features
    4r..4r+3 are the lane's) and, when chaining, the previous D_0..D_3, D_b ($28..$47)."""
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
        lines += [  # the lane's 4 words are features 8 (q // 2) .. + 7: odd q's are the last 4
            "mov.u32 lane, %laneid;",
            "and.b32 lane, lane, 1;",
            "setp.ne.u32 odd, lane, 0;",
            "selp.b32 t, $26, $24, odd;",
            "selp.b32 sel, $27, $25, odd;",
            "prmt.b32 b0, t, sel, 0x5410;",
            "prmt.b32 b1, t, sel, 0x7632;",
            "mov.b32 hi, 0x45004500;",
        ]
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


def _step8_asm(chain: bool) -> str:
    """One int4 step over 8 activation rows: outputs D_01, D_23 and D_b (4 float32 each:
    $0..$11); inputs the 4 words ($12..$15), the lane's activation words ($16..$19: row g,
    features 8r..8r+7) and, when chaining, the previous D_01, D_23, D_b ($20..$31)."""
    lines = [
        "{",
        ".reg .b32 a0, a1, a2, a3, t, b0, b1, c0, c1, nib, one28;",
        ".reg .f32 z;",
        "mov.b32 nib, 0x000F000F;",
        "mov.b32 one28, 0x43004300;",
        "mov.f32 z, 0f00000000;",
        "prmt.b32 b0, $16, $18, 0x5410;",  # B: features 0, 4 | 2, 6 (codes 0, 4, 2, 6)
        "prmt.b32 b1, $17, $19, 0x5410;",
        "prmt.b32 c0, $16, $18, 0x7632;",  # B': features 1, 5 | 3, 7
        "prmt.b32 c1, $17, $19, 0x7632;",
    ]

    def mma(out: int, a: str, b: str, acc: str) -> str:
        d = ", ".join(f"${out + p}" for p in range(4))
        return (f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d}}}, {{{a}}}, "
                f"{{{b}}}, {{{acc}}};")

    def prior(out: int) -> str:
        return ", ".join(f"${out + 20 + p}" for p in range(4)) if chain else "z, z, z, z"

    for pair in range(2):  # rows g / g + 8 of A: words 2 pair / 2 pair + 1
        wa, wb, out = f"${12 + 2 * pair}", f"${13 + 2 * pair}", 4 * pair
        mine = ", ".join(f"${out + p}" for p in range(4))
        for shifts, b, acc in (((0, 8), "b0, b1", prior(out)), ((4, 12), "c0, c1", mine)):
            for i, (w, shift) in enumerate(((wa, shifts[0]), (wb, shifts[0]),
                                            (wa, shifts[1]), (wb, shifts[1]))):
                if shift:
                    lines.append(f"shr.u32 t, {w}, {shift};")
                lines.append(f"lop3.b32 a{i}, {'t' if shift else w}, nib, one28, 0xEA;")
            lines.append(mma(out, "a0, a1, a2, a3", b, acc))
    lines.append(mma(8, "one28, one28, one28, one28", "b0, b1", prior(8)))
    lines.append(mma(8, "one28, one28, one28, one28", "c0, c1", "$8, $9, $10, $11"))
    lines.append("}")
    return "\n".join(lines)


# Group end, 8 rows: acc_e_j += s_j D_(j // 2) (row 2q) + m_j D_b's c0, acc_o_j the same for
# row 2q + 1 (c1). Outputs acc_e, acc_o ($0..$7); inputs D_01, D_23, D_b ($8..$19), acc_e,
# acc_o, s, m ($20..$35).
_FLUSH8_ASM = tl.constexpr("\n".join(
    ["{"]
    + [line for j in range(4) for half in range(2) for line in (
        f"fma.rn.f32 ${4 * half + j}, ${28 + j}, ${8 + 2 * j + half}, ${20 + 4 * half + j};",
        f"fma.rn.f32 ${4 * half + j}, ${32 + j}, ${16 + half}, ${4 * half + j};")]
    + ["}"]))

_STEP_FIRST = tl.constexpr(_step_asm(chain=False, int8=False))
_STEP_CHAIN = tl.constexpr(_step_asm(chain=True, int8=False))
_STEP_FIRST8 = tl.constexpr(_step_asm(chain=False, int8=True))
_STEP_CHAIN8 = tl.constexpr(_step_asm(chain=True, int8=True))
_STEP_FIRST_IO = tl.constexpr(",".join(["=f"] * 20 + ["r"] * 8))
_STEP_CHAIN_IO = tl.constexpr(",".join(["=f"] * 20 + ["r"] * 8 + ["f"] * 20))
_FLUSH_IO = tl.constexpr(",".join(["=f"] * 4 + ["f"] * 32))
_STEP8_FIRST = tl.constexpr(_step8_asm(chain=False))
_STEP8_CHAIN = tl.constexpr(_step8_asm(chain=True))
_STEP8_FIRST_IO = tl.constexpr(",".join(["=f"] * 12 + ["r"] * 8))
_STEP8_CHAIN_IO = tl.constexpr(",".join(["=f"] * 12 + ["r"] * 8 + ["f"] * 12))
_FLUSH8_IO = tl.constexpr(",".join(["=f"] * 8 + ["f"] * 28))


@triton.jit
def mma_step(w, xw, d0, d1, d2, d3, db, FIRST: tl.constexpr, INT8: tl.constexpr,
             EMULATE: tl.constexpr):
    """D_0..D_3 and D_b after one step over the lane's words `w` and activation words `xw`
    (FIRST: a group's first step, d0..db unread; else added to them)."""
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
def flush(d0, d1, d2, d3, db, acc, s, m, EMULATE: tl.constexpr):
    """acc + s (c0 + c3 of D_j) + m (c0 + c3 of D_b) for each of the lane's 4 features."""
    if EMULATE:  # every element of a lane holds its D's c0 + c3 (see _emulated_step)
        j = tl.arange(0, acc.shape[0]) % 4
        d = tl.where(j == 0, d0, tl.where(j == 1, d1, tl.where(j == 2, d2, d3)))
        return acc + s * d + m * db
    return tl.inline_asm_elementwise(
        _FLUSH_ASM, _FLUSH_IO, [d0, d1, d2, d3, db, acc, s, m],
        dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def mma_step8(w, xw, d01, d23, db, FIRST: tl.constexpr, EMULATE: tl.constexpr):
    """D_01, D_23 and D_b after one int4 step over 8 activation rows (module docs)."""
    if EMULATE:
        return _emulated_step8(w, xw, d01, d23, db, FIRST)
    if FIRST:
        return tl.inline_asm_elementwise(_STEP8_FIRST, _STEP8_FIRST_IO, [w, xw],
                                         dtype=(tl.float32,) * 3, is_pure=True, pack=4)
    return tl.inline_asm_elementwise(_STEP8_CHAIN, _STEP8_CHAIN_IO, [w, xw, d01, d23, db],
                                     dtype=(tl.float32,) * 3, is_pure=True, pack=4)


@triton.jit
def flush8(d01, d23, db, acc_e, acc_o, s, m, EMULATE: tl.constexpr):
    """acc_e, acc_o (rows 2q and 2q + 1 of 8) + s D + m D_b for the lane's 4 features."""
    if EMULATE:
        return (acc_e + _emulated_flush8(d01, d23, db, s, m, 0),
                acc_o + _emulated_flush8(d01, d23, db, s, m, 1))
    return tl.inline_asm_elementwise(_FLUSH8_ASM, _FLUSH8_IO, [d01, d23, db, acc_e, acc_o, s, m],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def _lane_value(t, i: tl.constexpr):
    """Every element of a lane set to the lane's element i (elements 4 a lane)."""
    lanes = tl.reshape(t, (t.shape[0] // 4, 4))
    v = tl.sum(tl.where(tl.arange(0, 4)[None, :] == i, lanes, 0.0), axis=1)
    return tl.reshape(tl.broadcast_to(v[:, None], lanes.shape), t.shape)


@triton.jit
def _emulated_flush8(d01, d23, db, s, m, half: tl.constexpr):
    """What `_FLUSH8_ASM` adds to acc_e (half 0) or acc_o (half 1): feature j's sum is
    element 2 (j % 2) + half of D_(j // 2), D_b's element `half` its bias."""
    j = tl.arange(0, d01.shape[0]) % 4
    d = tl.where(j == 0, _lane_value(d01, half),
                 tl.where(j == 1, _lane_value(d01, 2 + half),
                          tl.where(j == 2, _lane_value(d23, half), _lane_value(d23, 2 + half))))
    return s * d + m * _lane_value(db, half)


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
    # of word rows 2 (q // 2) and 2 (q // 2) + 1, 4 features each) of row g // 2
    halves = tl.reshape(xw, (B, 8, 4, 4, 1)) >> (tl.arange(0, 2) * 16)
    x = (((halves & 0xFFFF) << 16).to(tl.float32, bitcast=True))  # [B, g, q, j, 2]
    x = tl.reshape(x, (B, 4, 2, 4, 8))  # [B, row m, g % 2, q, feature p of the word row]
    x = tl.sum(tl.where(tl.arange(0, 2)[None, None, :, None, None] == 0, x, 0.0), axis=2)
    if INT8:  # the lane's features 4r..4r+3 are p = 0..3 (even q) or 4..7 (odd q): to p < 4
        x = tl.reshape(x, (B, 4, 4, 2, 4))  # [B, m, q, half, p % 4]
        odd = (tl.arange(0, 4) % 2)[None, None, :, None, None]
        x = tl.sum(tl.where(tl.arange(0, 2)[None, None, None, :, None] == odd, x, 0.0), axis=3)
        x = tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (0, 1, 2, 4, 3)), (B, 4, 4, 8))
    bias = tl.sum(tl.sum(x, axis=3), axis=2) * (256.0 if INT8 else 128.0)  # [B, m]
    db_new = tl.reshape(tl.broadcast_to(bias[:, None, :, None], (B, 8, 4, 4)), w.shape)
    words = tl.reshape(w, (B, 8, 4, 4))  # [B, g, q (word row 4c + q), j (feature 4g + j)]
    n0, n1 = _emulated_dot(words, x, 0, INT8), _emulated_dot(words, x, 1, INT8)
    n2, n3 = _emulated_dot(words, x, 2, INT8), _emulated_dot(words, x, 3, INT8)
    if FIRST:
        return n0, n1, n2, n3, db_new
    return d0 + n0, d1 + n1, d2 + n2, d3 + n3, db + db_new


@triton.jit
def _emulated_step8(w, xw, d01, d23, db, FIRST: tl.constexpr):
    """What `_step8_asm` leaves in the lanes, in tensor ops: lane (g, q) of D_01 holds the
    sums of features 4g and 4g + 1 (elements 0-1 and 2-3) with rows 2q and 2q + 1 (even and
    odd elements), D_23 those of features 4g + 2 and 4g + 3, and D_b 128 sum x of rows 2q
    and 2q + 1 (twice). Elements are [block, g, q, j], as the kernel lays them out."""
    B: tl.constexpr = w.shape[0] // 128
    # lane (g, q) word j = bfloat16 features 2j, 2j + 1 of word row q of activation row g
    halves = tl.reshape(xw, (B, 8, 4, 4, 1)) >> (tl.arange(0, 2) * 16)
    x = tl.reshape(((halves & 0xFFFF) << 16).to(tl.float32, bitcast=True), (B, 8, 4, 8))
    p = tl.arange(0, 8)[None, None, None, :]
    u = ((tl.reshape(w, (B * 8, 4, 4, 1)) >> p * 4) & 0xF).to(tl.float32) + 128.0  # [Bg, q, j, p]
    xg = tl.reshape(tl.broadcast_to(x[:, None], (B, 8, 8, 4, 8)), (B * 8, 8, 4, 1, 8))
    dot = tl.sum(tl.sum(u[:, None] * xg, axis=4), axis=2)  # [Bg, row r, j]
    dot = tl.reshape(dot, (B * 8, 4, 2, 2, 2))  # [Bg, q, r % 2, j // 2, j % 2]
    pair = tl.arange(0, 2)[None, None, None, :, None]
    n01 = tl.reshape(tl.permute(tl.sum(tl.where(pair == 0, dot, 0.0), axis=3), (0, 1, 3, 2)),
                     w.shape)
    n23 = tl.reshape(tl.permute(tl.sum(tl.where(pair == 1, dot, 0.0), axis=3), (0, 1, 3, 2)),
                     w.shape)
    bias = tl.reshape(tl.sum(tl.sum(x, axis=3), axis=2) * 128.0, (B, 1, 4, 1, 2))
    db_new = tl.reshape(tl.broadcast_to(bias, (B, 8, 4, 2, 2)), w.shape)
    if FIRST:
        return n01, n23, db_new
    return d01 + n01, d23 + n23, db + db_new


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
