/* Packed int4 / int8 weights x float32 activations on x86 CPUs: AVX-512 VNNI, or AVX2.
 *
 * y[M, N] = x[M, K] @ W^T.  Each activation row is quantized to int16 per block of 32
 * input features (d = max|x| / 32767, a = round(x / d): each value off by at most 1.5e-5
 * of the block's largest one, where bfloat16 rounds each value by up to 2e-3 of itself).
 * A block's product with the weight codes q is then exact integer arithmetic (16-bit pairs
 * multiplied and added into 32-bit sums: vpdpwssd, or vpmaddwd + vpaddd), and the block's
 * sum D is scaled in float32 by the weight's scale s and the block's d:
 *   int4, w = q s + o, q in 0..15:   acc = fma(D, s d, acc); acc = fma(o, d sum(a), acc)
 *   int8, w = q s, q in -128..127:   acc = fma(D, s d, acc)
 * block after block.  One vector lane is one output feature, so every (row, feature) takes
 * exactly these float operations in this order, whatever M, the tiling and the instruction
 * set: a row's result depends neither on the batch nor on the build (AVX-512 and AVX2 agree
 * bit for bit).
 *
 * Weights come in panels of 16 output features (kernels/cpu_native.py builds them once
 * from kernels.quant's rows layout; the last panel is padded with zero features):
 * - int4: int32 words [P, K / 8, 16]: word (p, r, f) holds the codes of feature 16 p + f
 *   for inputs 8 r .. 8 r + 7, input 8 r + 2 i at bits 4 i and 8 r + 2 i + 1 at bits
 *   16 + 4 i, so (word >> 4 i) & 0x000F000F is the 16-bit pair of inputs (2 i, 2 i + 1);
 * - int8: int8 pairs [P, K / 2, 16, 2]: (q[f, 2 j], q[f, 2 j + 1]);
 * - scales (and int4 offsets): float16 [P, K / 32, 16].
 * Against a pair of weight codes in every lane goes one pair of activations (one int32),
 * broadcast.  A tile is MT rows x one panel (AVX2: its two halves), its 32-bit sums and float
 * accumulators in registers; a thread takes whole panels (OpenMP: torch's runtime, as
 * libgomp.so.1 is loaded once per process).
 *
 * kernels/cpu_native.py compiles it once per instruction set (its VARIANTS: the AVX-512 VNNI
 * flags, or -mavx2 -mfma -mf16c) and loads the best one the CPU has.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32
#define PANEL 16
#define PF_BLOCKS 4  /* prefetch distance (measured: 2-4 blocks; 8 slower) */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define ISA 1
#define LANES 16
#define ROWS_WIDE 8  /* rows of the wide tile: 2 x 8 accumulators of 32 registers */
typedef __m512i vint;
typedef __m512 vfloat;
#define I_ZERO _mm512_setzero_si512
#define F_ZERO _mm512_setzero_ps
#define I_SET1 _mm512_set1_epi32
#define F_SET1 _mm512_set1_ps
#define I_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define I_AND _mm512_and_si512
#define I_SRLI _mm512_srli_epi32
#define I8_PAIRS(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define DOT(acc, w, x) _mm512_dpwssd_epi32(acc, w, x)
#define F_HALF(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define F_CVT _mm512_cvtepi32_ps
#define F_MUL _mm512_mul_ps
#define F_FMA _mm512_fmadd_ps

static inline void store_lanes(float *y, vfloat v, int lanes)
{
    _mm512_mask_storeu_ps(y, (__mmask16)((1u << lanes) - 1), v);
}

/* x [M, K] -> a int16 [M, K] (natural order), d[m, b] the block's scale, t[m, b] = d sum(a) */
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *a, float *d, float *t)
{
    const int64_t nb = K / BLOCK;
    #pragma omp parallel for schedule(static) if (M >= 8)  /* rows are independent */
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + m * K + b * BLOCK;
            __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            float scale = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            __m512 vinv = _mm512_set1_ps(inv);
            __m512i qlo = _mm512_cvtps_epi32(_mm512_roundscale_ps(
                _mm512_mul_ps(lo, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            __m512i qhi = _mm512_cvtps_epi32(_mm512_roundscale_ps(
                _mm512_mul_ps(hi, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
            int16_t *dst = a + m * K + b * BLOCK;
            _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(qlo));
            _mm256_storeu_si256((__m256i *)(dst + 16), _mm512_cvtepi32_epi16(qhi));
            d[m * nb + b] = scale;
            t[m * nb + b] = scale * (float)sum;
        }
    }
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ISA 2
#define LANES 8  /* half a panel */
#define ROWS_WIDE 4  /* 2 x 4 integer sums in registers (the float sums spill) */
typedef __m256i vint;
typedef __m256 vfloat;
#define I_ZERO _mm256_setzero_si256
#define F_ZERO _mm256_setzero_ps
#define I_SET1 _mm256_set1_epi32
#define F_SET1 _mm256_set1_ps
#define I_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define I_AND _mm256_and_si256
#define I_SRLI _mm256_srli_epi32
#define I8_PAIRS(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define DOT(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
#define F_HALF(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define F_CVT _mm256_cvtepi32_ps
#define F_MUL _mm256_mul_ps
#define F_FMA _mm256_fmadd_ps

static inline void store_lanes(float *y, vfloat v, int lanes)
{
    if (lanes >= LANES) { _mm256_storeu_ps(y, v); return; }
    float tmp[LANES];
    _mm256_storeu_ps(tmp, v);
    for (int i = 0; i < lanes; i++) y[i] = tmp[i];
}

/* as the AVX-512 quantize_rows, 8 lanes at a time; the same codes and scales */
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *a, float *d, float *t)
{
    const int64_t nb = K / BLOCK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    #pragma omp parallel for schedule(static) if (M >= 8)  /* rows are independent */
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + m * K + b * BLOCK;
            __m256 v[4], mx = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(xb + 8 * i);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            float amax = _mm_cvtss_f32(h);
            float scale = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            __m256 vinv = _mm256_set1_ps(inv);
            __m256i q[4], sum = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                q[i] = _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(v[i], vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                sum = _mm256_add_epi32(sum, q[i]);
            }
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            int16_t *dst = a + m * K + b * BLOCK;
            /* packs interleave 128-bit lanes; permute4x64 puts the 16 values back in order */
            _mm256_storeu_si256((__m256i *)dst,
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
            _mm256_storeu_si256((__m256i *)(dst + 16),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
            d[m * nb + b] = scale;
            t[m * nb + b] = scale * (float)_mm_cvtsi128_si32(s4);
        }
    }
}

#else
#error "cpu_gemm.c needs AVX-512 VNNI or AVX2 + FMA + F16C"
#endif

/* Vectors across a panel: 1 with AVX-512, 2 with AVX2, whose tile takes both halves so that
 * each broadcast activation pair goes into two products: against a tile of one half, the
 * int8 head 1.18-1.28x as fast on a Zen 3 EPYC, int4 1.03-1.07x at one row and the same
 * from 4 rows on (bound there by vpmaddwd, one a cycle). */
#define HALVES (PANEL / LANES)

/* MT rows x one panel: `w`, `sc`, `of` point at the panel's first lane (rows of PANEL
 * lanes), `a`, `d`, `t` at the tile's first row, `y` at its first output, `lanes` of which
 * are stored a row.  The float operations per (row, feature) are those of the header. */
#define TILE(MT)                                                                             \
static void tile_##MT(const int16_t *a, const float *d, const float *t, int64_t K, int int4, \
                      const void *w, const uint16_t *sc, const uint16_t *of, float *y,       \
                      int64_t N, int lanes)                                                  \
{                                                                                            \
    const int64_t nb = K / BLOCK;                                                            \
    const vint nibbles = I_SET1(0x000F000F);                                                 \
    vfloat acc[MT][HALVES];                                                                  \
    for (int m = 0; m < MT; m++)                                                             \
        for (int h = 0; h < HALVES; h++) acc[m][h] = F_ZERO();                               \
    for (int64_t b = 0; b < nb; b++) {                                                       \
        vint dot[MT][HALVES];                                                                \
        for (int m = 0; m < MT; m++)                                                         \
            for (int h = 0; h < HALVES; h++) dot[m][h] = I_ZERO();                           \
        if (b + PF_BLOCKS < nb) { /* the same rows' codes PF_BLOCKS blocks on */            \
            const char *pf = (const char *)w + (b + PF_BLOCKS) * BLOCK / (int4 ? 2 : 1) * PANEL; \
            for (int l = 0; l < (int4 ? 4 : 8); l++) _mm_prefetch(pf + 64 * l, _MM_HINT_T0); \
        }                                                                                    \
        if (int4) {                                                                          \
            const int32_t *wb = (const int32_t *)w + b * (BLOCK / 8) * PANEL;                \
            for (int r = 0; r < BLOCK / 8; r++) {                                            \
                vint v[HALVES];                                                              \
                for (int h = 0; h < HALVES; h++) v[h] = I_LOAD(wb + r * PANEL + h * LANES);  \
                for (int i = 0; i < 4; i++) {                                                \
                    vint q[HALVES];                                                          \
                    for (int h = 0; h < HALVES; h++)                                         \
                        q[h] = I_AND(i ? I_SRLI(v[h], 4 * i) : v[h], nibbles);               \
                    for (int m = 0; m < MT; m++) {                                           \
                        const int32_t *x2 = (const int32_t *)(a + m * K + b * BLOCK + 8 * r); \
                        const vint x = I_SET1(x2[i]);                                        \
                        for (int h = 0; h < HALVES; h++) dot[m][h] = DOT(dot[m][h], q[h], x); \
                    }                                                                        \
                }                                                                            \
            }                                                                                \
        } else {                                                                             \
            const int8_t *wb = (const int8_t *)w + b * (BLOCK / 2) * PANEL * 2;              \
            for (int j = 0; j < BLOCK / 2; j++) {                                            \
                vint q[HALVES];                                                              \
                for (int h = 0; h < HALVES; h++)                                             \
                    q[h] = I8_PAIRS(wb + j * PANEL * 2 + h * LANES * 2);                     \
                for (int m = 0; m < MT; m++) {                                               \
                    const int32_t *x2 = (const int32_t *)(a + m * K + b * BLOCK);            \
                    const vint x = I_SET1(x2[j]);                                            \
                    for (int h = 0; h < HALVES; h++) dot[m][h] = DOT(dot[m][h], q[h], x);    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (int h = 0; h < HALVES; h++) {                                                   \
            const vfloat s = F_HALF(sc + b * PANEL + h * LANES);                             \
            for (int m = 0; m < MT; m++)                                                     \
                acc[m][h] = F_FMA(F_CVT(dot[m][h]), F_MUL(s, F_SET1(d[m * nb + b])), acc[m][h]); \
            if (int4) {                                                                      \
                const vfloat o = F_HALF(of + b * PANEL + h * LANES);                         \
                for (int m = 0; m < MT; m++)                                                 \
                    acc[m][h] = F_FMA(o, F_SET1(t[m * nb + b]), acc[m][h]);                  \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (int m = 0; m < MT; m++)                                                             \
        for (int h = 0; h < HALVES && lanes > h * LANES; h++)                                \
            store_lanes(y + m * N + h * LANES, acc[m][h], lanes - h * LANES);                \
}

/* a tile for every row count up to ROWS_WIDE: the rows of x left after the wide tiles are
 * one tile, so that each panel's codes are decoded once per ROWS_WIDE rows */
TILE(1)
TILE(2)
TILE(3)
TILE(4)
#if ROWS_WIDE == 8
TILE(5)
TILE(6)
TILE(7)
TILE(8)
#endif

typedef void (*tile_fn)(const int16_t *, const float *, const float *, int64_t, int,
                        const void *, const uint16_t *, const uint16_t *, float *, int64_t, int);
static const tile_fn tiles[ROWS_WIDE + 1] = {
    NULL, tile_1, tile_2, tile_3, tile_4,
#if ROWS_WIDE == 8
    tile_5, tile_6, tile_7, tile_8,
#endif
};

/* The instruction set this library was compiled for (the loader checks it): 1 = AVX-512
 * VNNI, 2 = AVX2. */
int lf_cpu_gemm_isa(void) { return ISA; }

/* y [M, N] float32 = x [M, K] float32 @ W^T, the weight in panels (header): int4 with
 * int32 words, float16 scales and offsets; int8 with int8 pairs and float16 scales (of
 * unused).  K must be a multiple of 32.  Returns 0, or -1 when scratch memory could not be
 * allocated. */
int lf_cpu_gemm(int int4, const float *x, int64_t M, int64_t K, const void *w,
                const uint16_t *sc, const uint16_t *of, int64_t N, float *y)
{
    const int64_t nb = K / BLOCK, panels = (N + PANEL - 1) / PANEL;
    const int64_t panel_bytes = int4 ? K / 2 * PANEL : K * PANEL;
    int16_t *a = aligned_alloc(64, sizeof(int16_t) * (size_t)(M * K));
    float *d = malloc(sizeof(float) * (size_t)(2 * M * nb));
    if (!a || !d) { free(a); free(d); return -1; }
    float *t = d + M * nb;
    quantize_rows(x, M, K, a, d, t);
    #pragma omp parallel for schedule(static) if (M * N * K >= 65536)
    for (int64_t p = 0; p < panels; p++) {
        const int lanes = N - p * PANEL < PANEL ? (int)(N - p * PANEL) : PANEL;
        const char *wp = (const char *)w + p * panel_bytes;
        const uint16_t *sp = sc + p * nb * PANEL;
        const uint16_t *op = int4 ? of + p * nb * PANEL : NULL;
        for (int64_t m = 0; m < M; m += ROWS_WIDE) {
            const int64_t rows = M - m < ROWS_WIDE ? M - m : ROWS_WIDE;
            tiles[rows](a + m * K, d + m * nb, t + m * nb, K, int4, wp, sp, op,
                        y + m * N + p * PANEL, N, lanes);
        }
    }
    free(a);
    free(d);
    return 0;
}
