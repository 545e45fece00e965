/* The float32 pointwise steps of a decoder layer around its products, on x86 CPUs:
 * residual add + RMSNorm, (head norms and) RoPE + KV cache write, and the SwiGLU (GeGLU);
 * plain C that the compiler vectorizes (cpu_vec.h's vector extension where it would not),
 * each sum in cpu_vec.h's fixed order.  kernels/cpu_native.py builds it with cpu_gemm.c,
 * cpu_attention.c and cpu_layers.c into one library per instruction set.
 */
#include <math.h>  /* sqrtf, inlined: -fno-math-errno */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_vec.h"

/* out = rms_norm(x + residual) * weight and res_out = x + residual, row by row (residual
 * NULL: x alone, and res_out is not written).  K must be a multiple of 16. */
void lf_cpu_add_rms_norm(const float *x, const float *residual, const float *weight, float eps,
                         int64_t M, int64_t K, float *out, float *res_out)
{
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        const float *h = residual ? res_out + m * K : xr;
        float part[LANES] = {0};
        for (int64_t k0 = 0; k0 < K; k0 += LANES) {
            for (int l = 0; l < LANES; l++) {
                const float v = residual ? xr[k0 + l] + residual[m * K + k0 + l] : xr[k0 + l];
                if (residual) res_out[m * K + k0 + l] = v;
                part[l] += v * v;
            }
        }
        const float inv = 1.0f / sqrtf(lanes_sum(part) / (float)K + eps);
        for (int64_t k = 0; k < K; k++) out[m * K + k] = h[k] * inv * weight[k];
    }
}

/* A head of `dim`: its first 2 half dims turned (pairs i, i + half), the rest copied. */
static inline void rotate(const float *x, const float *c, const float *s, int64_t half,
                          int64_t dim, float *out)
{
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        out[i] = x1 * c[i] - x2 * s[i];
        out[i + half] = x2 * c[i] + x1 * s[i];
    }
    for (int64_t i = 2 * half; i < dim; i++) out[i] = x[i];
}

/* One head's rotation input: the head itself, or with a norm weight (non-NULL) the head
 * RMS-normed into out by lf_cpu_add_rms_norm (dim a multiple of 16). */
static inline const float *head_input(const float *x, const float *weight, float eps,
                                      int64_t dim, float *out)
{
    if (!weight) return x;
    lf_cpu_add_rms_norm(x, NULL, weight, eps, 1, dim, out, NULL);
    return out;
}

/* Rotate-half RoPE of q and k in qkv [T, heads + 2 kv_heads, dim] (cos, sin [T, rot / 2]:
 * each head's first rot dims turn, the rest pass; rot = dim but for a partial rotary
 * embedding), q into q_out [T, heads, dim], k and v into the caches' flat slots [slots,
 * kv_heads, dim]
 * at slots[t], their elements of type kv_type (cpu_vec.h's KV_*; a 16-bit one needs
 * kv_heads * dim a multiple of 8).  head_norm (NULL: none) is [2, dim]: q's heads are
 * RMS-normed with its first row and k's with its second before they turn (Qwen3's q and
 * k norms; dim then a multiple of 16).  Returns 0, or -1 (writing nothing) when a slot is
 * outside 0..num_slots-1. */
int lf_cpu_rope_kv_write(const float *qkv, int64_t T, int64_t heads, int64_t kv_heads,
                         int64_t dim, int64_t rot, const float *cos, const float *sin,
                         const int64_t *slots, int64_t num_slots, void *k_cache, void *v_cache,
                         int64_t kv_type, const float *head_norm, float eps, float *q_out)
{
    const int64_t half = rot / 2, row = (heads + 2 * kv_heads) * dim, kv = kv_heads * dim;
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    float k[kv];  /* a token's rotated keys, then stored */
    float normed[dim];
    const float *q_norm = head_norm, *k_norm = head_norm ? head_norm + dim : NULL;
    for (int64_t t = 0; t < T; t++) {
        const float *x = qkv + t * row, *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < heads; h++)
            rotate(head_input(x + h * dim, q_norm, eps, dim, normed), c, s, half, dim,
                   q_out + (t * heads + h) * dim);
        for (int64_t h = 0; h < kv_heads; h++)
            rotate(head_input(x + (heads + h) * dim, k_norm, eps, dim, normed), c, s, half,
                   dim, k + h * dim);
        store_kv(k_cache, slots[t] * kv, k, kv, (int)kv_type);
        store_kv(v_cache, slots[t] * kv, x + (heads + kv_heads) * dim, kv, (int)kv_type);
    }
    return 0;
}

/* The gated activation between the MLP's two products, for x [M, 2 I] (gate, then up), I a
 * multiple of 8: out[m, i] = silu(g) * up = g / (1 + e^-g) * up (SwiGLU), or with `gelu`
 * gelu_tanh(g) * up = g / (1 + e^(-2 sqrt(2/pi) (g + 0.044715 g^3))) * up (Gemma's GeGLU:
 * 0.5 g (1 + tanh(u)) is g times the logistic of 2u). */
void lf_cpu_glu(const float *x, int64_t M, int64_t I, int64_t gelu, float *out)
{
    #pragma omp parallel for schedule(static) if (M * I >= 65536)
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i += 8) {
            const v8 gate = load8(x + 2 * I * m + i), up = load8(x + 2 * I * m + I + i);
            const v8 z = gelu ? (gate + 0.044715f * gate * gate * gate) * -1.5957691216057308f
                              : -gate;
            store8(out + I * m + i, gate / (1.0f + exp8(z)) * up);
        }
}
