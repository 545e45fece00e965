/* Paged attention of short queries (decode and verification steps) on x86 CPUs, straight
 * from the paged KV cache (float32, float16 or bfloat16: cpu_vec.h's KV_*, read as
 * float32), with the hybrid cache's sinks + window mask; its sums in cpu_vec.h's fixed
 * order, so a query row's bits depend only on its own query and keys.
 * kernels/cpu_attention.py calls it; kernels/cpu_native.py builds it with the other sources.
 */
#include <math.h>  /* INFINITY */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_vec.h"

/* The visible keys of a query at position s: [0, *sink_end) and [*start, s] (window 0: all). */
static inline void visible(int64_t s, int64_t window, int64_t sinks, int64_t *sink_end,
                           int64_t *start)
{
    *start = window > 0 && s - window + 1 > 0 ? s - window + 1 : 0;
    *sink_end = sinks < *start ? sinks : *start;
}

/* Whether every block the listed queries read is inside the cache. */
static int tables_valid(const int32_t *tables, int64_t max_blocks, const int32_t *seq_lens,
                        const int32_t *query_start, const int32_t *seqs, int64_t num_listed,
                        int64_t block_size, int64_t num_blocks, int64_t window, int64_t sinks)
{
    for (int64_t i = 0; i < num_listed; i++) {
        const int64_t seq = seqs[i], len = seq_lens[seq];
        const int64_t first_q = len - (query_start[seq + 1] - query_start[seq]);
        int64_t sink_end, start;
        visible(first_q, window, sinks, &sink_end, &start);
        if (len > max_blocks * block_size) return 0;
        for (int64_t b = 0; b * block_size < len; b++) {
            const int64_t lo = b * block_size, hi = lo + block_size;
            if (lo >= sink_end && hi <= start) continue;  /* read by none of its queries */
            if (tables[seq * max_blocks + b] < 0 || tables[seq * max_blocks + b] >= num_blocks)
                return 0;
        }
    }
    return 1;
}

/* offs[t] = the cache offset (of element 0, kv head 0) of key t, for t in [t0, t1). */
static void key_offsets(const int32_t *table, int64_t block_size, int64_t row_stride,
                        int64_t t0, int64_t t1, int64_t *offs)
{
    int64_t b = t0 / block_size, o = t0 % block_size;
    for (int64_t t = t0; t < t1; t++) {
        offs[t] = (table[b] * block_size + o) * row_stride;
        if (++o == block_size) o = 0, b++;
    }
}

#define PAD 16  /* a row's keys and scores are padded to a multiple of this */

static inline int64_t pad(int64_t n) { return (n + PAD - 1) / PAD * PAD; }

/* q . k (key k's elements from element k of the cache) in 16 lanes (element d in lane
 * d mod 16), lanes l and l + 8 added. */
static inline __attribute__((always_inline)) v8 dot_halves(const float *q, const void *k_cache,
                                                           int64_t k, int64_t dim, int kv)
{
    v8 lo = load8(q) * load_kv8(k_cache, k, kv);
    v8 hi = load8(q + 8) * load_kv8(k_cache, k + 8, kv);
    for (int64_t d0 = 16; d0 < dim; d0 += 16) {
        lo += load8(q + d0) * load_kv8(k_cache, k + d0, kv);
        hi += load8(q + d0 + 8) * load_kv8(k_cache, k + d0 + 8, kv);
    }
    return lo + hi;
}

/* The dot products of q with 8 keys: `dot_halves`, then lanes l and l + 4, l + 2, l + 1
 * added (as `lanes_sum` adds them) by a transposing tree, after which lanes 0..7 hold keys
 * 0, 2, 4, 6, 1, 3, 5, 7, put back in order at the end. */
static inline __attribute__((always_inline)) v8 dot8(const float *q, const void *k_cache,
                                                     const int64_t *offs, int64_t dim, int kv)
{
    v8 p[8];
    for (int i = 0; i < 8; i++) p[i] = dot_halves(q, k_cache, offs[i], dim, kv);
    for (int i = 0; i < 4; i++)  /* [key 2i lanes 0..3, key 2i + 1 lanes 0..3] */
        p[i] = SHUFFLE(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11)
             + SHUFFLE(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++)  /* keys 4i, 4i + 2, 4i + 1, 4i + 3: two lanes each */
        p[i] = SHUFFLE(p[2 * i], p[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
             + SHUFFLE(p[2 * i], p[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    const v8 sums = SHUFFLE(p[0], p[1], 0, 2, 8, 10, 4, 6, 12, 14)
                  + SHUFFLE(p[0], p[1], 1, 3, 9, 11, 5, 7, 13, 15);
    return SHUFFLE(sums, sums, 0, 4, 1, 5, 2, 6, 3, 7);
}

/* Ask for the cache lines of elements [i, i + count) of a KV cache of type kv. */
static inline __attribute__((always_inline)) void prefetch_kv(const void *cache, int64_t i,
                                                              int64_t count, int kv)
{
    const int64_t size = kv == KV_F32 ? 4 : 2;
    const uintptr_t start = (uintptr_t)cache + (uintptr_t)(i * size);
    for (uintptr_t line = start & ~(uintptr_t)63; line < start + (uintptr_t)(count * size);
         line += 64)
        __builtin_prefetch((const void *)line);
}

/* Keys ahead of the dot products whose cache lines a 16-bit cache asks for: one KV head's
 * keys are dim elements of every kv_heads * dim, which the hardware's prefetchers followed
 * too late there (30 layers' calls, cold, 2 threads, AVX2: 1.09-1.20x from 512 keys at
 * batch 1 to 3,072 at batch 4).  A float32 cache's went from 1.14x faster to 8% slower as
 * the keys grew, and values ahead gained nothing. */
#define AHEAD 32
#define MAX_ROWS 16  /* query rows of a sequence (positions x heads of a group) together */
#define CHUNK 64  /* keys a row takes before the next row (their values stay in cache) */
/* A row's keys are attended in spans of this many (key t in span t / SPAN), each span a
 * task of its own, and the spans' softmax partials merged in order: a long context's few
 * rows (batch 1: one a KV head's group) then spread over every thread.  The spans depend
 * on the row's key count alone, so its bits still do not depend on the batch or threads. */
#define SPAN 256

/* Softmax over a row's n scores (padded to `padded` with -inf) in place: the exponentials,
 * key i's in lane i mod 16 of their sum; returns the sum, the largest score in *top. */
static inline float softmax_row(float *scores, int64_t n, int64_t padded, float *top_out)
{
    for (int64_t i = n; i < padded; i++) scores[i] = -INFINITY;
    v8 top8 = load8(scores);
    for (int64_t i = 8; i < padded; i += 8) {
        const v8 s = load8(scores + i);
        top8 = select8(s > top8, s, top8);
    }
    float top = top8[0];
    for (int l = 1; l < 8; l++) top = top8[l] > top ? top8[l] : top;
    v8 lo = {0}, hi = {0};
    for (int64_t i = 0; i < padded; i += 16) {
        const v8 e_lo = select8(load8(scores + i) > -INFINITY, exp8(load8(scores + i) - top),
                                splat8(0.0f));
        const v8 e_hi = select8(load8(scores + i + 8) > -INFINITY,
                                exp8(load8(scores + i + 8) - top), splat8(0.0f));
        store8(scores + i, e_lo);
        store8(scores + i + 8, e_hi);
        lo += e_lo;
        hi += e_hi;
    }
    float part[LANES];
    store8(part, lo);
    store8(part + 8, hi);
    *top_out = top;
    return lanes_sum(part);
}

/* `rows` (at most MAX_ROWS) query rows of one KV head's group, `per` heads a position: row
 * r is head r % per (q and out rows of adjacent heads `dim` floats apart) at position r / per
 * (positions `stride` floats apart), over keys [0, min(n + r / per, limit)) at cache offsets
 * offs[..] (readable up to the largest count rounded up to PAD: any keys' there; a row whose
 * count is 0 or less is skipped): a decode step's heads (rows per), or a verification
 * step's, each position seeing one key more than the one before.  scores: scratch of rows x
 * `width`.  With part NULL each row's output goes to out; otherwise its unnormalised sums,
 * the largest score and the exponentials' sum go to part's row r (dim + 2 floats) for
 * `merge_spans`.  Each row takes the operations it would alone (the dot products of
 * `dot8`, key i's exponential in lane i mod 16 of the sum, out[d] summed over keys in
 * order); the rows only share each block of keys while it is in cache. */
static inline __attribute__((always_inline)) void attend_rows(
    const float *q, int64_t stride, int64_t per, int64_t rows, const void *k_cache,
    const void *v_cache, int kv, const int64_t *offs, int64_t n, int64_t limit, int64_t dim,
    float scale, float cap, float *scores, int64_t width, float *out, float *part)
{
#define COUNT(r) (n + (r) / per < limit ? n + (r) / per : limit)  /* a row's keys */
    const int64_t keys = COUNT(rows - 1);
#define ROW(r) ((r) / per * stride + (r) % per * dim)  /* a row's offset in q and out */
    for (int64_t i = 0; i < pad(keys); i += 8) {
        for (int64_t j = i + AHEAD; kv != KV_F32 && j < i + AHEAD + 8 && j < keys; j++)
            prefetch_kv(k_cache, offs[j], dim, kv);
        for (int64_t r = 0; r < rows; r++)
            if (i < pad(COUNT(r)))
                store8(scores + r * width + i,
                       dot8(q + ROW(r), k_cache, offs + i, dim, kv) * scale);
    }
    for (int64_t r = 0; cap > 0.0f && r < rows; r++)  /* soft-capped (Gemma 2's) */
        for (int64_t i = 0; i < pad(COUNT(r)); i += 8)
            store8(scores + r * width + i,
                   cap * tanh8(load8(scores + r * width + i) * (1.0f / cap)));
    float inv[MAX_ROWS], sum[MAX_ROWS], top[MAX_ROWS];
    for (int64_t r = 0; r < rows; r++) {
        sum[r] = COUNT(r) > 0 ? softmax_row(scores + r * width, COUNT(r), pad(COUNT(r)), top + r)
                              : 0.0f;
        inv[r] = part ? 1.0f : 1.0f / sum[r];
    }
#define DEST(r) (part ? part + (r) * (dim + 2) : out + ROW(r))
    int64_t d0 = 0;
    for (; d0 + 64 <= dim; d0 += 64) {  /* 64 columns a pass over the values */
        v8 acc[MAX_ROWS][8];
        for (int64_t r = 0; r < rows; r++)
            for (int c = 0; c < 8; c++) acc[r][c] = splat8(0.0f);
        for (int64_t c0 = 0; c0 < keys; c0 += CHUNK)
            for (int64_t r = 0; r < rows; r++) {
                const float *p = scores + r * width;
                const int64_t end = c0 + CHUNK < COUNT(r) ? c0 + CHUNK : COUNT(r);
                v8 a[8];
                for (int c = 0; c < 8; c++) a[c] = acc[r][c];
                for (int64_t j = c0; j < end; j++)
                    for (int c = 0; c < 8; c++)
                        a[c] += p[j] * load_kv8(v_cache, offs[j] + d0 + 8 * c, kv);
                for (int c = 0; c < 8; c++) acc[r][c] = a[c];
            }
        for (int64_t r = 0; r < rows; r++)
            for (int c = 0; c < 8; c++) store8(DEST(r) + d0 + 8 * c, acc[r][c] * inv[r]);
    }
    for (; d0 < dim; d0 += 16)
        for (int64_t r = 0; r < rows; r++) {
            const float *p = scores + r * width;
            v8 a = {0}, b = {0};
            for (int64_t j = 0; j < COUNT(r); j++) {
                a += p[j] * load_kv8(v_cache, offs[j] + d0, kv);
                b += p[j] * load_kv8(v_cache, offs[j] + d0 + 8, kv);
            }
            store8(DEST(r) + d0, a * inv[r]);
            store8(DEST(r) + d0 + 8, b * inv[r]);
        }
    for (int64_t r = 0; part && r < rows; r++) {
        part[r * (dim + 2) + dim] = COUNT(r) > 0 ? top[r] : -INFINITY;
        part[r * (dim + 2) + dim + 1] = sum[r];
    }
#undef DEST
#undef ROW
#undef COUNT
}

/* `attend_rows`, compiled apart for each KV element type and the common head sizes. */
#define ATTEND(KV, DIM) attend_rows(q, stride, per, rows, k_cache, v_cache, KV, offs, n, limit, \
                                    DIM, scale, cap, scores, width, out, part)
#define ATTEND_KV(KV) (dim == 64 ? ATTEND(KV, 64) : dim == 128 ? ATTEND(KV, 128) \
                       : ATTEND(KV, dim))
static void attend(const float *q, int64_t stride, int64_t per, int64_t rows,
                   const void *k_cache, const void *v_cache, int kv, const int64_t *offs,
                   int64_t n, int64_t limit, int64_t dim, float scale, float cap,
                   float *scores, int64_t width, float *out, float *part)
{
    if (kv == KV_F16)
        ATTEND_KV(KV_F16);
    else if (kv == KV_BF16)
        ATTEND_KV(KV_BF16);
    else
        ATTEND_KV(KV_F32);
}
#undef ATTEND_KV
#undef ATTEND

/* A row's output from its first `spans` spans' partials (dim + 2 floats each, `step` floats
 * apart): each weighted by exp(its top - the largest top), in span order.  One span gives
 * what `attend_rows` writes straight to out (its weight is exactly 1). */
static void merge_spans(const float *part, int64_t spans, int64_t step, int64_t dim, float *out)
{
#define WEIGHT(c) exp8(splat8(part[(c) * step + dim] - top))
    float top = part[dim];
    for (int64_t c = 1; c < spans; c++)
        top = part[c * step + dim] > top ? part[c * step + dim] : top;
    float sum = part[dim + 1] * WEIGHT(0)[0];
    for (int64_t c = 1; c < spans; c++) sum += part[c * step + dim + 1] * WEIGHT(c)[0];
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < dim; d += 8) {
        v8 acc = load8(part + d) * WEIGHT(0);
        for (int64_t c = 1; c < spans; c++) acc += load8(part + c * step + d) * WEIGHT(c);
        store8(out + d, acc * inv);
    }
#undef WEIGHT
}

/* One step's sequences for lf_cpu_paged_attention, shared by every layer (built once a
 * step: kernels/cpu_attention.py's AttentionStep): block tables [num_seqs, max_blocks], each
 * sequence's context length and first query row (query_start [num_seqs + 1]), the
 * sequences to attend for, and the mask (window 0: none). */
struct lf_attention_step {
    const int32_t *tables;
    int64_t max_blocks;
    const int32_t *seq_lens, *query_start, *seqs;
    int64_t num_listed, window, sinks;
};

/* Block b's queries: the first (*j0) and how many, of its sequence's q_len (its blocks start
 * at block `first`, `positions` queries each). */
static inline int64_t block_queries(int64_t b, int64_t first, int64_t q_len, int64_t positions,
                                    int64_t *j0)
{
    *j0 = (b - first) * positions;
    return q_len - *j0 < positions ? q_len - *j0 : positions;
}

/* The keys query j (of q_len) of a sequence of len keys sees. */
static inline int64_t row_keys(int64_t len, int64_t q_len, int64_t j, int64_t window,
                               int64_t sinks)
{
    int64_t sink_end, start;
    const int64_t s = len - q_len + j;
    visible(s, window, sinks, &sink_end, &start);
    return sink_end + s + 1 - start;
}

/* Paged attention of the step's listed sequences' queries (kernels/attention.py's layout
 * and masks): q, out [T, heads, dim], caches [num_blocks, block_size, kv_heads, dim] of
 * element type kv_type (cpu_vec.h's KV_*); dim a multiple of 16.  A task is one span of
 * keys of (a block of a sequence's queries, heads of a KV head's group); where a block's
 * rows see more than one span, a second pass merges the spans' partials.  A score is the
 * dot product times `scale`, soft-capped (cap > 0: cap * tanh(score / cap), Gemma 2's).
 * Returns 0; -1 (writing nothing) when a table names a block outside the cache; -2 when
 * scratch memory cannot be had. */
int lf_cpu_paged_attention(const struct lf_attention_step *step, const float *q, int64_t heads,
                           int64_t kv_heads, int64_t dim, const void *k_cache,
                           const void *v_cache, int64_t kv_type, int64_t num_blocks,
                           int64_t block_size, float scale, float cap, float *out)
{
    const int kv = (int)kv_type;
    const size_t element = kv == KV_F32 ? sizeof(float) : sizeof(uint16_t);
    const int32_t *tables = step->tables, *seq_lens = step->seq_lens;
    const int32_t *query_start = step->query_start, *seqs = step->seqs;
    const int64_t max_blocks = step->max_blocks, num_listed = step->num_listed;
    const int64_t window = step->window, sinks = step->sinks;
    if (!tables_valid(tables, max_blocks, seq_lens, query_start, seqs, num_listed, block_size,
                      num_blocks, window, sinks))
        return -1;
    /* a block: up to MAX_ROWS / per of a sequence's queries, attended by `subgroups` tasks
     * of `per` heads of a KV head's group (the largest divisor of the group up to MAX_ROWS),
     * which read its keys together, for each of its spans */
    const int64_t group = heads / kv_heads, stride = kv_heads * dim, row = dim + 2;
    int64_t per = group < MAX_ROWS ? group : MAX_ROWS;
    while (group % per) per--;
    const int64_t subgroups = heads / per, positions = MAX_ROWS / per;
    /* every listed sequence's key offsets by position, then PAD more (padding lanes'; any
     * key's: their results are dropped); its blocks of queries */
    int64_t *base = malloc(sizeof(int64_t) * (size_t)(2 * num_listed + 1));
    if (!base) return -2;
    int64_t *first_block = base + num_listed + 1;
    int64_t longest = 0, work = 0, blocks = 0;
    base[0] = 0;
    for (int64_t i = 0; i < num_listed; i++) {
        const int64_t len = seq_lens[seqs[i]];
        const int64_t q_len = query_start[seqs[i] + 1] - query_start[seqs[i]];
        longest = len > longest ? len : longest;
        work += len * q_len;
        base[i + 1] = base[i] + len + PAD;
        first_block[i] = blocks;
        blocks += (q_len + positions - 1) / positions;
    }
    /* a block's sequence, spans, first task and partials (prefix sums: [blocks + 1]) */
    int64_t *block_seq = malloc(sizeof(int64_t) * (size_t)(4 * (blocks + 1)));
    int64_t *spans = block_seq + blocks + 1, *first_task = spans + blocks + 1;
    int64_t *first_part = first_task + blocks + 1;
    for (int64_t i = 0, b = 0; block_seq && i < num_listed; i++) {
        const int64_t seq = seqs[i], len = seq_lens[seq];
        const int64_t q_len = query_start[seq + 1] - query_start[seq];
        const int64_t end = i + 1 < num_listed ? first_block[i + 1] : blocks;
        for (; b < end; b++) {
            int64_t j0;
            const int64_t count = block_queries(b, first_block[i], q_len, positions, &j0);
            block_seq[b] = i;
            spans[b] = (row_keys(len, q_len, j0 + count - 1, window, sinks) + SPAN - 1) / SPAN;
            first_task[b + 1] = (b ? first_task[b] : 0) + subgroups * spans[b];
            first_part[b + 1] = (b ? first_part[b] : 0)
                              + (spans[b] > 1 ? subgroups * spans[b] * count * per * row : 0);
        }
    }
    if (block_seq) first_task[0] = first_part[0] = 0;
    const int64_t tasks = block_seq ? first_task[blocks] : 0;
    int64_t *offs = malloc(sizeof(int64_t) * (size_t)base[num_listed]);
    float *parts = block_seq && first_part[blocks]
                 ? malloc(sizeof(float) * (size_t)first_part[blocks]) : NULL;
    int failed = !offs || !block_seq || (!parts && first_part[blocks]);
    /* threads pay from ~200 keys a query at 9 heads of 64 (2 cores: 17 us against 19) */
    #pragma omp parallel if (!failed && work * heads * dim >= 131072)
    {
        /* MAX_ROWS rows' scores of a span, and a span's keys' offsets where a window splits
         * them */
        const int64_t most = longest < SPAN ? longest : SPAN;
        const int64_t width = (most + PAD + 1) & ~(int64_t)1;
        float *scores = failed ? NULL : malloc(sizeof(float) * (size_t)(MAX_ROWS * width)
                                               + sizeof(int64_t) * (size_t)(most + PAD));
        int64_t *split = scores ? (int64_t *)(scores + MAX_ROWS * width) : NULL;
        if (!scores) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier  /* `failed` is final from here on: read without a race below */
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < num_listed; i++) {
            if (failed) continue;
            const int64_t seq = seqs[i], len = seq_lens[seq];
            int64_t sink_end, start, *o = offs + base[i];
            visible(len - (query_start[seq + 1] - query_start[seq]), window, sinks, &sink_end,
                    &start);
            key_offsets(tables + seq * max_blocks, block_size, stride, 0, sink_end, o);
            key_offsets(tables + seq * max_blocks, block_size, stride, start, len, o);
            for (int64_t t = len; t < len + PAD; t++) o[t] = o[start];
        }
        #pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < tasks; task++) {
            if (failed) continue;
            int64_t lo = 0, hi = blocks - 1;  /* the task's block: the last starting by it */
            while (lo < hi) {
                const int64_t mid = (lo + hi + 1) / 2;
                if (first_task[mid] <= task) lo = mid; else hi = mid - 1;
            }
            const int64_t b = lo, i = block_seq[b], local = task - first_task[b];
            const int64_t c = local / subgroups, g = local % subgroups, h = g * per;
            const int64_t seq = seqs[i], len = seq_lens[seq], k0 = c * SPAN;
            const size_t head = (size_t)((h / group) * dim) * element;  /* its KV head's */
            const void *k = (const char *)k_cache + head, *v = (const char *)v_cache + head;
            const int64_t q0 = query_start[seq], q_len = query_start[seq + 1] - q0;
            int64_t j0;
            const int64_t count = block_queries(b, first_block[i], q_len, positions, &j0);
            const int64_t *o = offs + base[i];
            float *part = spans[b] > 1
                        ? parts + first_part[b] + (g * spans[b] + c) * count * per * row : NULL;
            int64_t sink_end, start;
            visible(len - 1, window, sinks, &sink_end, &start);
            if (start == 0) {  /* every query sees every key before it: positions together */
                attend(q + ((q0 + j0) * heads + h) * dim, heads * dim, per, count * per, k, v,
                       kv, o + k0, len - q_len + j0 + 1 - k0, SPAN, dim, scale, cap, scores,
                       width, out + ((q0 + j0) * heads + h) * dim, part);
                continue;
            }
            for (int64_t j = j0; j < j0 + count; j++) {  /* a position's heads: same keys */
                const int64_t s = len - q_len + j, at = ((q0 + j) * heads + h) * dim;
                visible(s, window, sinks, &sink_end, &start);
                const int64_t n = sink_end + s + 1 - start;
                if (k0 >= n) continue;  /* this position's keys end before the span */
                const int64_t *keys = o + start + k0;
                if (sink_end > 0) {  /* sinks, then the window: the span's part of the list */
                    const int64_t m = n - k0 < SPAN ? n - k0 : SPAN;
                    for (int64_t t = k0; t < k0 + pad(m); t++)
                        split[t - k0] = t < sink_end ? o[t] : o[start + t - sink_end];
                    keys = split;
                }
                attend(q + at, heads * dim, per, per, k, v, kv, keys, n - k0, SPAN, dim, scale,
                       cap, scores, width, out + at, part ? part + (j - j0) * per * row : NULL);
            }
        }
        free(scores);
        #pragma omp for schedule(dynamic)
        for (int64_t unit = 0; unit < blocks * subgroups; unit++) {  /* spans' partials */
            const int64_t b = unit / subgroups, g = unit % subgroups;
            if (failed || spans[b] < 2) continue;
            const int64_t i = block_seq[b], seq = seqs[i], len = seq_lens[seq];
            const int64_t q0 = query_start[seq], q_len = query_start[seq + 1] - q0;
            int64_t j0;
            const int64_t count = block_queries(b, first_block[i], q_len, positions, &j0);
            const float *part = parts + first_part[b] + g * spans[b] * count * per * row;
            for (int64_t r = 0; r < count * per; r++) {
                const int64_t j = j0 + r / per, h = g * per + r % per;
                const int64_t n = row_keys(len, q_len, j, window, sinks);
                merge_spans(part + r * row, (n + SPAN - 1) / SPAN, count * per * row, dim,
                            out + ((q0 + j) * heads + h) * dim);
            }
        }
    }
    free(parts);
    free(block_seq);
    free(offs);
    free(base);
    return failed ? -2 : 0;
}
