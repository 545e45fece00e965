/* Packed int4 / int8 weights x float32 activations on x86 CPUs with AVX-512 VNNI.
 *
 * y[M, N] = x[M, K] @ W^T for a weight in kernels.quant's canonical "rows" layout, with
 * per-block scales (and int4 offsets) given for every block of 32 input features.
 * Each activation row is quantized to int16 per block of 32 (d = max|x| / 32767,
 * a = round(x / d): a relative error of at most 1.5e-5 of the block's largest value, below
 * float32 rounding of the sums that follow at these sizes... and far below bfloat16's 2e-3).
 * A block's product with the weight codes q is then integer multiply-adds (vpdpwssd, 16-bit
 * pairs into 32-bit sums), scaled by the weight's and the block's scales in float32:
 *   int4, w = q s + o, q in 0..15:   y = sum_b s_b d_b (q . a)_b + o_b d_b sum(a_b)
 *   int8, w = q s, q in -128..127:   y = sum_b s_b d_b (q . a)_b
 * Rows of x are independent and every row takes the same sequence of float operations
 * whatever M and the tiling are, so a row's result does not depend on the batch.
 * Output features are split over OpenMP threads (torch's runtime: libgomp.so.1 is loaded
 * once per process).
 *
 * Compiled by kernels/cpu_native.py with -mavx512f -mavx512bw -mavx512vl -mavx512vnni
 * -mfma -mf16c; it checks the CPU before loading it.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32
#define PAIR 64  /* input features of two blocks: one register of 16-bit codes per half */
#define SPAN 16  /* blocks whose scales one 512-bit register holds */
#define PREFETCH_ROWS 4

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
static inline __m512 load_half16(const uint16_t *p, int64_t left)
{
    __mmask16 k = left >= SPAN ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

static inline __m512 load_float16(const float *p, int64_t left)
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

/* NR output features x MT activation rows.  The per-(row, feature) operation sequence is
 * the same in every instantiation. */
#define TILE(NAME, NR, MT)                                                                   \
static void NAME(const int16_t *a, const float *d, const float *t, int64_t K, int int4,      \
                 const uint8_t *w, const uint16_t *sc, const uint16_t *of, int64_t n0,       \
                 float *y, int64_t N)                                                        \
{                                                                                            \
    const int64_t nb = K / BLOCK, npairs = K / PAIR;                                         \
    const int64_t row_bytes = int4 ? K / 2 : K;                                              \
    __m512 acc[NR][MT], sd[NR][MT];                                                          \
    for (int r = 0; r < NR; r++)                                                             \
        for (int m = 0; m < MT; m++) { acc[r][m] = _mm512_setzero_ps(); sd[r][m] = acc[r][m]; } \
    for (int r = 0; r < NR; r++) {                                                           \
        const char *p = (const char *)(w + (n0 + NR * PREFETCH_ROWS + r) * row_bytes);       \
        for (int64_t i = 0; i < row_bytes; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);         \
    }                                                                                        \
    for (int64_t j = 0; j < npairs; j++) {                                                   \
        const int64_t b = 2 * j;                                                             \
        if (b % SPAN == 0) {                                                                 \
            for (int r = 0; r < NR; r++) {                                                   \
                __m512 s = load_half16(sc + (n0 + r) * nb + b, nb - b);                      \
                __m512 o = int4 ? load_half16(of + (n0 + r) * nb + b, nb - b)                \
                                : _mm512_setzero_ps();                                       \
                for (int m = 0; m < MT; m++) {                                               \
                    sd[r][m] = _mm512_mul_ps(s, load_float16(d + m * nb + b, nb - b));       \
                    acc[r][m] = _mm512_fmadd_ps(o, load_float16(t + m * nb + b, nb - b),     \
                                                acc[r][m]);                                  \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
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
    }                                                                                        \
    for (int r = 0; r < NR; r++)                                                             \
        for (int m = 0; m < MT; m++) y[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);    \
}

TILE(tile_4x1, 4, 1)
TILE(tile_2x4, 2, 4)
TILE(tile_1x1, 1, 1)
TILE(tile_1x4, 1, 4)

/* The ISA this file was compiled for (the loader checks it): 1 = AVX-512 VNNI. */
int lf_cpu_gemm_isa(void) { return 1; }

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
            for (; m + 4 <= M; m += 4) {
                tile_2x4(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n0, y + m * N, N);
                tile_2x4(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n0 + 2, y + m * N, N);
            }
            for (; m < M; m++)
                tile_4x1(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n0, y + m * N, N);
        } else {
            const int64_t n = 4 * tiles + (i - tiles);
            for (; m + 4 <= M; m += 4)
                tile_1x4(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n, y + m * N, N);
            for (; m < M; m++)
                tile_1x1(a + m * K, d + m * nb, t + m * nb, K, int4, wb, sc, of, n, y + m * N, N);
        }
    }
    free(a);
    free(d);
    return 0;
}
