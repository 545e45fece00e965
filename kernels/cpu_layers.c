/* A Llama-family decoder stack's layers in one call, for the CPU's steps of short queries
 * (decode and verification): each layer's residual add + RMSNorm, qkv product, (head
 * norms and) RoPE + KV cache write, paged attention, o product, (Gemma 3's norm,) add +
 * norm, gate/up product, SwiGLU (GeGLU) and down product (and Gemma 3's norm), through
 * the same functions (cpu_gemm.c, cpu_ops.c, cpu_attention.c) and in the same order as
 * the model's per-op path calls them one by one from Python, so the results are the same
 * bit for bit; what goes is the ~9 calls a layer from Python and their tensors.
 * kernels/cpu_layers.py builds the structures below (its ctypes mirrors). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct lf_attention_step;  /* cpu_attention.c */
int lf_cpu_gemm(int int4, const float *x, int64_t M, int64_t K, const void *w,
                const uint16_t *sc, const uint16_t *of, int64_t N, float *y);
void lf_cpu_add_rms_norm(const float *x, const float *residual, const float *weight, float eps,
                         int64_t M, int64_t K, float *out, float *res_out);
int lf_cpu_rope_kv_write(const float *qkv, int64_t T, int64_t heads, int64_t kv_heads,
                         int64_t dim, int64_t rot, const float *cos, const float *sin,
                         const int64_t *slots, int64_t num_slots, void *k_cache, void *v_cache,
                         int64_t kv_type, const float *head_norm, float eps, float *q_out);
int lf_cpu_paged_attention(const struct lf_attention_step *step, const float *q, int64_t heads,
                           int64_t kv_heads, int64_t dim, const void *k_cache,
                           const void *v_cache, int64_t kv_type, int64_t num_blocks,
                           int64_t block_size, float scale, float cap, float *out);
void lf_cpu_glu(const float *x, int64_t M, int64_t I, int64_t gelu, float *out);

/* A packed weight in cpu_gemm.c's panels (offsets NULL for int8), and its bias or NULL. */
struct lf_linear {
    int64_t int4;
    const void *weight;
    const uint16_t *scales, *offsets;
    const float *bias;
};

struct lf_layer {
    struct lf_linear qkv, o, gate_up, down;
    const float *input_norm, *post_norm;
    const float *head_norm;  /* q's and k's head norms [2, dim] (Qwen3, Gemma 3), or NULL */
    /* Gemma 3: the attention's and the MLP's outputs normed before their residual adds
     * (NULL: not), and GeGLU instead of SwiGLU */
    const float *attn_out_norm, *mlp_out_norm;
    int64_t gelu;
    void *k_cache, *v_cache;  /* [num_blocks, block_size, kv_heads, dim] of lf_stack's kv_type */
    int64_t num_blocks;
    int64_t pool;  /* which of the step's KV pools the cache is in (1: sinks + window) */
    int64_t rope;  /* which of lf_stack's RoPE tables turns its q and k (2: identity, none) */
};

/* The model's shapes and its KV caches' element type (cpu_vec.h's KV_*), and one step's
 * inputs: per KV pool its sequences for the attention (cpu_attention.py's AttentionStep),
 * its tokens' flat slots, and RoPE's cos and sin [T, rot / 2] for the tokens' positions:
 * the model's, the window pool's layers' (Gemma 3's own base) and the layers' that apply no
 * RoPE (SmolLM3's: cos 1, sin 0). */
struct lf_stack {
    int64_t hidden, heads, kv_heads, dim, intermediate, block_size, kv_type;
    int64_t rot;  /* the dims RoPE turns in a head, the first ones (cos, sin: [T, rot / 2]) */
    float eps, scale, cap;  /* cap: the attention scores' soft-cap (Gemma 2's), 0: none */
    const struct lf_attention_step *attention[2];
    const int64_t *slots[2];
    const float *cos[3], *sin[3];
};

/* x [M, K] @ W^T (+ bias) into y [M, N]. */
static int product(const struct lf_linear *l, const float *x, int64_t M, int64_t K, int64_t N,
                   float *y)
{
    if (lf_cpu_gemm((int)l->int4, x, M, K, l->weight, l->scales, l->offsets, N, y) != 0)
        return -3;
    if (l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] = y[m * N + n] + l->bias[n];
    return 0;
}

/* Layers [0, count) over T tokens: x [T, hidden], the embedded tokens, becomes the last
 * layer's down product and residual [T, hidden] the residual stream, as the model's Python
 * loop leaves them.  Returns 0; -1 when a slot is outside its cache (found at the pool's
 * first layer, before it writes anything); -2 when a block table names a block outside it
 * (found at the pool's first layer after it wrote this step's keys and values, as in the
 * per-op path); -3 when scratch memory cannot be had. */
int lf_cpu_decoder_layers(const struct lf_stack *s, const struct lf_layer *layers,
                          int64_t count, int64_t T, float *x, float *residual)
{
    const int64_t H = s->hidden, q_width = s->heads * s->dim, I = s->intermediate;
    const int64_t qkv_width = (s->heads + 2 * s->kv_heads) * s->dim;
    const int64_t widest = qkv_width > 2 * I ? qkv_width : 2 * I;
    /* the normed rows, the widest product's, the rotated q, the attention's out, SwiGLU's */
    float *buf = malloc(sizeof(float) * (size_t)(T * (H + widest + 2 * q_width + I)));
    if (!buf) return -3;
    float *h = buf, *wide = h + T * H, *q = wide + T * widest, *att = q + T * q_width;
    float *act = att + T * q_width;
    int rc = 0;
    for (int64_t i = 0; i < count && rc == 0; i++) {
        const struct lf_layer *l = layers + i;
        const int first = i == 0;
        lf_cpu_add_rms_norm(x, first ? NULL : residual, l->input_norm, s->eps, T, H, h,
                            residual);
        if (first) memcpy(residual, x, sizeof(float) * (size_t)(T * H));
        if ((rc = product(&l->qkv, h, T, H, qkv_width, wide)) != 0) break;
        if (lf_cpu_rope_kv_write(wide, T, s->heads, s->kv_heads, s->dim, s->rot,
                                 s->cos[l->rope],
                                 s->sin[l->rope],
                                 s->slots[l->pool], l->num_blocks * s->block_size,
                                 l->k_cache, l->v_cache, s->kv_type, l->head_norm, s->eps,
                                 q) != 0) {
            rc = -1;
            break;
        }
        const int a = lf_cpu_paged_attention(s->attention[l->pool], q, s->heads, s->kv_heads,
                                             s->dim, l->k_cache, l->v_cache, s->kv_type,
                                             l->num_blocks, s->block_size, s->scale, s->cap,
                                             att);
        if (a != 0) {
            rc = a == -1 ? -2 : -3;
            break;
        }
        if ((rc = product(&l->o, att, T, q_width, H, x)) != 0) break;
        if (l->attn_out_norm)  /* (in place: a row's sum is taken before it is written) */
            lf_cpu_add_rms_norm(x, NULL, l->attn_out_norm, s->eps, T, H, x, NULL);
        lf_cpu_add_rms_norm(x, residual, l->post_norm, s->eps, T, H, h, residual);
        if ((rc = product(&l->gate_up, h, T, H, 2 * I, wide)) != 0) break;
        lf_cpu_glu(wide, T, I, l->gelu, act);
        if ((rc = product(&l->down, act, T, I, H, x)) != 0) break;
        if (l->mlp_out_norm)
            lf_cpu_add_rms_norm(x, NULL, l->mlp_out_norm, s->eps, T, H, x, NULL);
    }
    free(buf);
    return rc;
}
