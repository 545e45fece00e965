"""One chunk of the tensor-core GEMV's K walk (`kernels.triton_mma_gemv`): the loads of a
chunk's weight words, scales, offsets and activations, laid out as the mma step needs
them (4 consecutive elements a thread: `tests/test_kernels_mma_layout.py`), and its mma
steps and flushes (`kernels.triton_mma_step`) into the program's float32 accumulators.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_mma_step import flush, flush8, mma_step, mma_step8


@triton.jit
def _pick(i: tl.constexpr, v0, v1, v2, v3):
    return v0 if i == 0 else v1 if i == 1 else v2 if i == 2 else v3


@triton.jit
def load_words(w_ptr, s_ptr, o_ptr, c, q, n, live, N, GROUP: tl.constexpr,
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
def load_acts(x_words, c, ok, q, CHUNK: tl.constexpr, INT8: tl.constexpr,
              WARPS_K: tl.constexpr):
    """Chunk c's activation words, one tensor a step (c clamped by the caller): a step's
    16 words (int8: 8), the 4 of word row 4c + q for lane (g, q) (int8: those of word rows
    q and q + 1, q even, of which the step uses q's 2). Loads of 4 aligned words (16 bytes)
    for both schemes: besides the weights' they are what lays the tensors out 4 elements
    a thread, the mma step's layout (docs/benchmarks/gpu.md, run 44). With several warps
    along K, those whose chunk is past their end (not `ok`) get zeros, which add nothing
    (D and the bias D_b are both 0)."""
    STEP: tl.constexpr = 8 if INT8 else 16
    x = x_words + c * STEP * CHUNK + (q // 2 * 4 if INT8 else q * 4)
    x0 = _load_act(x, ok, WARPS_K)
    x1, x2, x3 = x0, x0, x0
    if CHUNK > 1:
        x1 = _load_act(x + STEP, ok, WARPS_K)
    if CHUNK > 2:
        x2 = _load_act(x + 2 * STEP, ok, WARPS_K)
        x3 = _load_act(x + 3 * STEP, ok, WARPS_K)
    return x0, x1, x2, x3


@triton.jit
def _load_act(x, ok, WARPS_K: tl.constexpr):
    """One step's activation words, zeros where not `ok` (several warp rows only)."""
    if WARPS_K == 1:  # (the one warp row's chunk is never past its end)
        return tl.load(x)
    return tl.load(x, mask=ok, other=0)


@triton.jit
def load_chunk(w_ptr, s_ptr, o_ptr, x_words, y_words, c, end, last, q, n, live, N,
               GROUP: tl.constexpr, CHUNK: tl.constexpr, INT8: tl.constexpr,
               WARPS_K: tl.constexpr, ROWS: tl.constexpr):
    """`load_words` and `load_acts` of chunk c (clamped to `last`; zero activations from
    `end` on; with 16 rows also those of rows 8-15, from `y_words`), in `multiply_chunk`'s
    argument order."""
    read = tl.minimum(c, last)
    w0, w1, w2, w3, s0, o0, s1, o1, s2, o2, s3, o3 = load_words(
        w_ptr, s_ptr, o_ptr, read, q, n, live, N, GROUP, CHUNK, INT8)
    x0, x1, x2, x3 = load_acts(x_words, read, c < end, q, CHUNK, INT8, WARPS_K)
    y0, y1, y2, y3 = x0, x1, x2, x3
    if ROWS == 16:
        y0, y1, y2, y3 = load_acts(y_words, read, c < end, q, CHUNK, INT8, WARPS_K)
    return w0, w1, w2, w3, x0, x1, x2, x3, y0, y1, y2, y3, s0, o0, s1, o1, s2, o2, s3, o3


@triton.jit
def multiply_chunk(acc, acc2, acc3, acc4, w0, w1, w2, w3, x0, x1, x2, x3, y0, y1, y2, y3,
                   s0, o0, s1, o1, s2, o2, s3, o3, GROUP: tl.constexpr, CHUNK: tl.constexpr,
                   INT8: tl.constexpr, ROWS: tl.constexpr, EMULATE: tl.constexpr):
    """acc (and with 8 or 16 rows acc2, the odd rows; with 16 acc3 and acc4, those of rows
    8-15, from the activations y) after one chunk: CHUNK mma steps, a flush at the end of
    every group (and of the chunk, when a group spans chunks: int8 per channel). The flush
    adds s (D - 9 B) for int8, whose D carries a bias of 2176 a code and B one of 256: s
    sum (u - 128) x."""
    FEATS: tl.constexpr = 16 if INT8 else 32
    GSTEPS: tl.constexpr = GROUP // FEATS  # steps per quantization group
    FLUSH: tl.constexpr = GSTEPS if GSTEPS < CHUNK else CHUNK  # steps between flushes
    d0, d1, d2, d3, db = acc, acc, acc, acc, acc  # (unread by the first step of a group)
    e0, e1, eb = acc, acc, acc  # (16 rows: rows 8-15's D_01, D_23, D_b)
    for i in tl.static_range(CHUNK):
        w, x = _pick(i, w0, w1, w2, w3), _pick(i, x0, x1, x2, x3)
        if ROWS > 4:  # (16 rows: the same words twice, which ptxas unpacks once)
            d0, d1, db = mma_step8(w, x, d0, d1, db, i % FLUSH == 0, EMULATE)
            if ROWS == 16:
                e0, e1, eb = mma_step8(w, _pick(i, y0, y1, y2, y3), e0, e1, eb,
                                       i % FLUSH == 0, EMULATE)
        else:
            d0, d1, d2, d3, db = mma_step(w, x, d0, d1, d2, d3, db, i % FLUSH == 0, INT8,
                                           EMULATE)
        if (i + 1) % FLUSH == 0:
            gi = i // GSTEPS
            s = _pick(gi, s0, s1, s2, s3).to(tl.float32)
            o = _pick(gi, o0, o1, o2, o3).to(tl.float32)
            m = -9.0 * s if INT8 else o * 0.0078125 - s
            if ROWS > 4:
                acc, acc2 = flush8(d0, d1, db, acc, acc2, s, m, EMULATE)
                if ROWS == 16:
                    acc3, acc4 = flush8(e0, e1, eb, acc3, acc4, s, m, EMULATE)
            else:
                acc = flush(d0, d1, d2, d3, db, acc, s, m, EMULATE)
    return acc, acc2, acc3, acc4
