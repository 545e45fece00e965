/* What the float32 kernels of cpu_ops.c and cpu_attention.c share (kernels/cpu_native.py
 * builds them into one library per instruction set): sums over 16 fixed lanes, GCC's vector
 * extension for 8 floats (one AVX register, operations lane-wise), an exponential, and the
 * KV cache's element types (float32, float16, bfloat16) read and written.
 *
 * Every sum has a fixed order: over a row's elements in 16 lanes (element k in lane k mod 16)
 * added pairwise at the end, over keys one key after another; so a row's result takes the
 * same float operations in the same order whatever else is batched and on either
 * instruction set (AVX-512 and AVX2 agree bit for bit).
 */
#ifndef LF_CPU_VEC_H
#define LF_CPU_VEC_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define LANES 16

static inline float lanes_sum(float *part)
{
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) part[l] += part[l + w];
    return part[0];
}

/* 8 floats (or int32s): GCC's vector extension, one AVX register, operations lane-wise. */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8_unaligned __attribute__((vector_size(32), aligned(4)));
#define SHUFFLE __builtin_shufflevector

static inline v8 load8(const float *p) { return *(const v8_unaligned *)p; }
static inline void store8(float *p, v8 v) { *(v8_unaligned *)p = v; }
static inline v8 splat8(float x) { return (v8){0} + x; }
static inline v8 select8(v8i mask, v8 a, v8 b) { return (v8)((mask & (v8i)a) | (~mask & (v8i)b)); }

/* e^x for x in [-87, 88] (outside it, the end's), to ~2 ulp: x = n ln 2 + r with |r| <=
 * ln 2 / 2, e^r by a degree-7 polynomial (Cephes' expf coefficients), 2^n put into the
 * exponent bits (n rounded to nearest with the 1.5 * 2^23 trick). */
static inline v8 exp8(v8 x)
{
    x = select8(x > -87.0f, x, splat8(-87.0f));
    x = select8(x < 88.0f, x, splat8(88.0f));
    const v8 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const v8 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    v8 p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v8)((__builtin_convertvector(n, v8i) + 127) << 23);
}

/* tanh(x) as 1 - 2 / (e^(2x) + 1) (exp8's clamp keeps the ends at -1 and 1), to ~1e-7
 * absolute. */
static inline v8 tanh8(v8 x) { return 1.0f - 2.0f / (exp8(x + x) + 1.0f); }

/* A KV cache's element type: float32, or a 16-bit one (float16, bfloat16) read as float32
 * (exactly) and written rounded to nearest even, as torch converts. */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

/* 8 floats from element `i` of a KV cache of type `kv` (a constant where it is inlined:
 * the branches fold away). */
static inline __attribute__((always_inline)) v8 load_kv8(const void *base, int64_t i, int kv)
{
    if (kv == KV_F32) return load8((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (kv == KV_F16) return (v8)_mm256_cvtph_ps(h);
    return (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
}

/* n floats (a multiple of 8) into a KV cache of type `kv` from element `i`. */
static inline void store_kv(void *base, int64_t i, const float *x, int64_t n, int kv)
{
    if (kv == KV_F32) {
        for (int64_t j = 0; j < n; j++) ((float *)base)[i + j] = x[j];
        return;
    }
    uint16_t *out = (uint16_t *)base + i;
    for (int64_t j = 0; j < n; j += 8) {
        if (kv == KV_F16) {
            _mm_storeu_si128((__m128i *)(out + j),
                             _mm256_cvtps_ph((__m256)load8(x + j), _MM_FROUND_TO_NEAREST_INT));
            continue;
        }
        for (int l = 0; l < 8; l++) {  /* bfloat16: NaN as torch writes it, else to even */
            uint32_t bits;
            memcpy(&bits, x + j + l, 4);
            out[j + l] = x[j + l] != x[j + l] ? 0xffff
                       : (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
        }
    }
}

#endif
