/* Packed int4 / int8 weights x float32 activations on x86 CPUs: AVX-512 VNNI, or AVX2.
 *
 * y[M, N] = x[M, K] @ W^T for a weight in kernels.quant's canonical "rows" layout, with
 * per-block scales (and int4 offsets) given for every block of 32 input features.
 * Each activation row is quantized to int16 per block of 32 (d = max|x| / 32767,
 * a = round(x / d): each value off by at most 1.5e-5 of the block's largest one, where
 * bfloat16 rounds each value by up to 2e-3 of itself).
 * A block's product with the weight codes q is then integer multiply-adds (vpdpwssd, 16-bit
 * pairs into 32-bit sums), scaled by the weight's and the block's scales in float32:
 *   int4, w = q s + o, q in 0..15:   y = sum_b s_b d_b (q . a)_b + o_b d_b sum(a_b)
 *   int8, w = q s, q in -128..127:   y = sum_b s_b d_b (q . a)_b
 * Rows of x are independent and every row takes the same sequence of float operations
 * whatever M and the tiling are, so a row's result does not depend on the batch.
 * Output features are split over OpenMP threads (torch's runtime: libgomp.so.1 is loaded
 * once per process).
 *
 * kernels/cpu_native.py compiles it once per instruction set (its VARIANTS: the AVX-512 VNNI
 * flags, or -mavx2 -mfma -mf16c) and loads the best one the CPU has.  The AVX2 variant does
 * the same arithmetic 8 lanes wide (vpmaddwd), one block at a time.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32
#define PAIR 64  /* input features of two blocks: one register of 16-bit codes per half */
#define PREFETCH_ROWS 4

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define ISA 1
#define SPAN 16  /* blocks whose scales one 512-bit register holds */

/* Quantize x [M, K] to int16 per block of 32.  Each pair of blocks b0, b1 is stored as
 * b0[0:16] b1[0:16] b0[16:32] b1[16:32], the order `weight_pair` gives the weight codes,
 * so that 32-bit lanes 0-7 of a product hold block b0 and lanes 8-15 block b1.
 * d[m, b] is the block's scale and t[m, b] = d sum(a), the factor of the int4 offset. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *a, float *d, float *t)
{
    const int64_t nb = K / BLOCK;
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
            int16_t *dst = a + m * K + (b / 2) * PAIR + (b % 2) * 16;
            _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(qlo));
            _mm256_storeu_si256((__m256i *)(dst + 32), _mm512_cvtepi32_epi16(qhi));
            d[m * nb + b] = scale;
            t[m * nb + b] = scale * (float)sum;
        }
    }
}

/* 16 float16 values from p (fewer where `left` < 16: the rest are zero) as float32 */
static inline __m512 load_half(const uint16_t *p, int64_t left)
{
    __mmask16 k = left >= SPAN ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

static inline __m512 load_floats(const float *p, int64_t left)
{
    __mmask16 k = left >= SPAN ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    return _mm512_maskz_loadu_ps(k, p);
}

/* The weight codes of a pair of blocks as two registers of 16-bit values in the order of
 * `a`: first half features 0-15 of both blocks, second half 16-31. */
static inline void weight_pair(const uint8_t *row, int64_t j, int int4, __m512i *w0, __m512i *w1)
{
    if (int4) {  /* 16 bytes a block: feature i in the low nibble of byte i, i + 16 in the high */
        __m256i w = _mm256_loadu_si256((const __m256i *)(row + j * (PAIR / 2)));
        __m256i mask = _mm256_set1_epi8(15);
        *w0 = _mm512_cvtepu8_epi16(_mm256_and_si256(w, mask));
        *w1 = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), mask));
    } else {
        const uint8_t *p = row + j * PAIR;
        *w0 = _mm512_cvtepi8_epi16(_mm256_loadu2_m128i((const __m128i *)(p + 32), (const __m128i *)p));
        *w1 = _mm512_cvtepi8_epi16(_mm256_loadu2_m128i((const __m128i *)(p + 48),
                                                        (const __m128i *)(p + 16)));
    }
}

/* lanes[i]: spreads the scales of blocks 2i and 2i + 1 (of a register of SPAN) over the 16
 * lanes of a pair's product, block 2i in lanes 0-7. */
static int32_t lanes[SPAN / 2][16] __attribute__((aligned(64)));

__attribute__((constructor)) static void init_lanes(void)
{
    for (int i = 0; i < SPAN / 2; i++)
        for (int l = 0; l < 16; l++)
            lanes[i][l] = 2 * i + l / 8;
}

typedef __m512 vfloat;
#define VZERO _mm512_setzero_ps
#define VMUL _mm512_mul_ps
#define VFMA _mm512_fmadd_ps
#define VSUM _mm512_reduce_add_ps

/* The products of pair j (blocks b, b + 1) for a tile's NR features and MT rows: lanes 0-7
 * of a product hold block b, lanes 8-15 block b + 1, each scaled by its entry of sd. */
#define PAIR_STEP(NR, MT)                                                                    \
    {                                                                                        \
        const __m512i idx = _mm512_load_si512((const void *)lanes[(b % SPAN) / 2]);           \
        __m512i a0[MT], a1[MT];                                                              \
        for (int m = 0; m < MT; m++) {                                                       \
            a0[m] = _mm512_loadu_si512((const void *)(a + m * K + j * PAIR));                \
            a1[m] = _mm512_loadu_si512((const void *)(a + m * K + j * PAIR + 32));           \
        }                                                                                    \
        for (int r = 0; r < NR; r++) {                                                       \
            __m512i w0, w1;                                                                  \
            weight_pair(w + (n0 + r) * row_bytes, j, int4, &w0, &w1);                        \
            for (int m = 0; m < MT; m++) {                                                   \
                __m512i dot = _mm512_dpwssd_epi32(_mm512_madd_epi16(w0, a0[m]), w1, a1[m]);  \
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),                         \
                                            _mm512_permutexvar_ps(idx, sd[r][m]), acc[r][m]); \
            }                                                                                \
        }                                                                                    \
    }

#define FEATURES_1 4  /* features of the 1-row tile, and of the 4-row one */
#define FEATURES_4 2

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ISA 2
#define SPAN 8  /* blocks whose scales one 256-bit register holds */

/* as the AVX-512 quantize_rows, 8 lanes at a time; the same codes and scales */
static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *a, float *d, float *t)
{
    const int64_t nb = K / BLOCK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
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
            int16_t *dst = a + m * K + (b / 2) * PAIR + (b % 2) * 16;
            /* packs interleave 128-bit lanes; permute4x64 puts the 16 values back in order */
            __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
            __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
            _mm256_storeu_si256((__m256i *)dst, lo);
            _mm256_storeu_si256((__m256i *)(dst + 32), hi);
            d[m * nb + b] = scale;
            t[m * nb + b] = scale * (float)_mm_cvtsi128_si32(s4);
        }
    }
}

static inline __m256 load_half(const uint16_t *p, int64_t left)
{
    if (left >= SPAN) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t tmp[SPAN] = {0};
    for (int64_t i = 0; i < left; i++) tmp[i] = p[i];
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
}

static inline __m256 load_floats(const float *p, int64_t left)
{
    if (left >= SPAN) return _mm256_loadu_ps(p);
    float tmp[SPAN] = {0};
    for (int64_t i = 0; i < left; i++) tmp[i] = p[i];
    return _mm256_loadu_ps(tmp);
}

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The codes of blocks b0, b1 of a pair as 16-bit values: w[0] b0 features 0-15, w[1] b1
 * 0-15, w[2] b0 16-31, w[3] b1 16-31 (the order of `a`). */
static inline void weight_pair(const uint8_t *row, int64_t j, int int4, __m256i w[4])
{
    if (int4) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(row + j * (PAIR / 2)));
        __m256i mask = _mm256_set1_epi8(15);
        __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        w[0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo));
        w[1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1));
        w[2] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi));
        w[3] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1));
    } else {
        const uint8_t *p = row + j * PAIR;
        w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
        w[2] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
        w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 32)));
        w[3] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 48)));
    }
}

typedef __m256 vfloat;
#define VZERO _mm256_setzero_ps
#define VMUL _mm256_mul_ps
#define VFMA _mm256_fmadd_ps
#define VSUM hsum8

/* The products of pair j (blocks b, b + 1) for a tile's NR features and MT rows, 8 lanes:
 * a block's 32-bit sums in one register, scaled by its entry of sd. */
#define PAIR_STEP(NR, MT)                                                                    \
    {                                                                                        \
        const __m256i i0 = _mm256_set1_epi32((int)(b % SPAN));                               \
        const __m256i i1 = _mm256_set1_epi32((int)(b % SPAN) + 1);                           \
        for (int r = 0; r < NR; r++) {                                                       \
            __m256i wv[4];                                                                   \
            weight_pair(w + (n0 + r) * row_bytes, j, int4, wv);                              \
            for (int m = 0; m < MT; m++) {                                                   \
                const __m256i *av = (const __m256i *)(a + m * K + j * PAIR);                 \
                __m256i d0 = _mm256_add_epi32(_mm256_madd_epi16(wv[0], _mm256_loadu_si256(av)), \
                                              _mm256_madd_epi16(wv[2], _mm256_loadu_si256(av + 2))); \
                __m256i d1 = _mm256_add_epi32(_mm256_madd_epi16(wv[1], _mm256_loadu_si256(av + 1)), \
                                              _mm256_madd_epi16(wv[3], _mm256_loadu_si256(av + 3))); \
                acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0),                          \
                                            _mm256_permutevar8x32_ps(sd[r][m], i0), acc[r][m]); \
                acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1),                          \
                                            _mm256_permutevar8x32_ps(sd[r][m], i1), acc[r][m]); \
            }                                                                                \
        }                                                                                    \
    }

#define FEATURES_1 2  /* 16 registers */
#define FEATURES_4 1

#else
#error "cpu_gemm.c needs AVX-512 VNNI or AVX2 + FMA + F16C"
#endif

/* NR output features x MT activation rows.  The per-(row, feature) operation sequence is
 * the same in every instantiation, so a row's result does not depend on the tiling. */
#define TILE(NAME, NR, MT)                                                                   \
static void NAME(const int16_t *a, const float *d, const float *t, int64_t K, int int4,      \
                 const uint8_t *w, const uint16_t *sc, const uint16_t *of, int64_t n0,       \
                 float *y, int64_t N)                                                        \
{                                                                                            \
    const int64_t nb = K / BLOCK, npairs = K / PAIR;                                         \
    const int64_t row_bytes = int4 ? K / 2 : K;                                              \
    vfloat acc[NR][MT], sd[NR][MT];                                                          \
    for (int r = 0; r < NR; r++)                                                             \
        for (int m = 0; m < MT; m++) { acc[r][m] = VZERO(); sd[r][m] = acc[r][m]; }          \
    for (int r = 0; r < NR && n0 + NR * PREFETCH_ROWS + r < N; r++) { /* rows ahead */      \
        const char *p = (const char *)(w + (n0 + NR * PREFETCH_ROWS + r) * row_bytes);       \
        for (int64_t i = 0; i < row_bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);         \
    }                                                                                        \
    for (int64_t j = 0; j < npairs; j++) {                                                   \
        const int64_t b = 2 * j;                                                             \
        if (b % SPAN == 0) {  /* the scales and offsets of the next SPAN blocks */           \
            for (int r = 0; r < NR; r++) {                                                   \
                vfloat s = load_half(sc + (n0 + r) * nb + b, nb - b);                        \
                vfloat o = int4 ? load_half(of + (n0 + r) * nb + b, nb - b) : VZERO();       \
                for (int m = 0; m < MT; m++) {                                               \
                    sd[r][m] = VMUL(s, load_floats(d + m * nb + b, nb - b));                 \
                    acc[r][m] = VFMA(o, load_floats(t + m * nb + b, nb - b), acc[r][m]);     \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        PAIR_STEP(NR, MT)                                                                    \
    }                                                                                        \
    for (int r = 0; r < NR; r++)                                                             \
        for (int m = 0; m < MT; m++) y[m * N + n0 + r] = VSUM(acc[r][m]);                    \
}

/* the tiles the driver uses: FEATURES_1 features x 1 row, FEATURES_4 x 4 rows, and 1 x 1,
 * 1 x 4 for the last N % 4 features */
TILE(tile_wide_1, FEATURES_1, 1)
TILE(tile_wide_4, FEATURES_4, 4)
TILE(tile_one_1, 1, 1)
TILE(tile_one_4, 1, 4)

/* The instruction set this library was compiled for (the loader checks it): 1 = AVX-512
 * VNNI, 2 = AVX2. */
int lf_cpu_gemm_isa(void) { return ISA; }

/* y [M, N] float32 = x [M, K] float32 @ W^T.  int4: w = uint8 [N, K / 2] nibbles (chunk
 * order), sc and of float16 [N, K / 32]; int8: w = int8 [N, K], sc float16 [N, K / 32],
 * of unused.  K must be a multiple of 64.  Returns 0, or -1 when scratch memory could not
 * be allocated. */
int lf_cpu_gemm(int int4, const float *x, int64_t M, int64_t K, const void *w,
                const uint16_t *sc, const uint16_t *of, int64_t N, float *y)
{
    const int64_t nb = K / BLOCK;
    int16_t *a = aligned_alloc(64, sizeof(int16_t) * (size_t)(M * K));
    float *d = malloc(sizeof(float) * (size_t)(2 * M * nb));
    if (!a || !d) { free(a); free(d); return -1; }
    float *t = d + M * nb;
    quantize_rows(x, M, K, a, d, t);
    const uint8_t *wb = (const uint8_t *)w;
    const int64_t tiles = N / 4;
    #pragma omp parallel for schedule(static) if (N * K >= 65536)
    for (int64_t i = 0; i < tiles + (N % 4); i++) {
        int64_t m = 0;
        if (i < tiles) {
            const int64_t n0 = 4 * i;
            for (; m + 4 <= M; m += 4)
                for (int f = 0; f < 4; f += FEATURES_4)
                    tile_wide_4(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n0 + f,
                                y + m * N, N);
            for (; m < M; m++)
                for (int f = 0; f < 4; f += FEATURES_1)
                    tile_wide_1(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n0 + f,
                                y + m * N, N);
        } else {
            const int64_t n = 4 * tiles + (i - tiles);
            for (; m + 4 <= M; m += 4)
                tile_one_4(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n, y + m * N, N);
            for (; m < M; m++)
                tile_one_1(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n, y + m * N, N);
        }
    }
    free(a);
    free(d);
    return 0;
}
