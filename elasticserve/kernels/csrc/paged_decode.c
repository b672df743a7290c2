/* Paged decode attention over the engine's block-major KV cache, fp32, CPU.
 *
 * Cache layout: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], K at index 0
 * and V at index 1 of the "2" axis. One query token per sequence. Unlike the torch path, no
 * context is gathered into a buffer: K and V are read once, straight from their blocks, and
 * positions past a sequence's length are never touched (whatever the slots hold).
 *
 * The caller splits the work between threads: this call handles sequences first, first + step,
 * first + 2 * step, ... and touches only their output rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef struct {
    const float *cache;
    int64_t block_stride; /* floats per block (all layers) */
    int64_t layer_offset; /* floats from a block's start to this layer's K */
    int64_t v_offset;     /* floats from this layer's K to its V */
    int64_t block_size, hkv, group;
} layout_t;

static inline const float *block_at(const layout_t *L, const int64_t *table, int64_t t0,
                                    int64_t kv) {
    return L->cache + table[t0 / L->block_size] * L->block_stride + L->layer_offset
           + kv * L->v_offset;
}

/* scores[h][t] = scale * q_h . k_t; the heads of one GQA group share each K row. The portable
 * path: any head_dim, any x86-64 or other CPU. */
static void qk_scores(const layout_t *L, const int64_t D, const float *q, const int64_t *table, int64_t len,
          float scale, float *scores, int64_t stride) {
    const int64_t G = L->group, row = L->hkv * D;
    for (int64_t t0 = 0; t0 < len; t0 += L->block_size) {
        const float *kb = block_at(L, table, t0, 0);
        const int64_t nt = len - t0 < L->block_size ? len - t0 : L->block_size;
        for (int64_t o = 0; o < nt; ++o)
            for (int64_t kh = 0; kh < L->hkv; ++kh) {
                const float *k = kb + o * row + kh * D;
                for (int64_t g = 0; g < G; ++g) {
                    const float *qh = q + (kh * G + g) * D;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t j = 0; j < D; ++j) s += qh[j] * k[j];
                    scores[(kh * G + g) * stride + t0 + o] = s * scale;
                }
            }
    }
}

/* In place: scores[h][t] -> exp(scores[h][t] - max_h); inv_sum[h] = 1 / sum_t. */
static void softmax_rows(int64_t hq, float *scores, int64_t len, int64_t stride, float *inv_sum) {
    for (int64_t h = 0; h < hq; ++h) {
        float *s = scores + h * stride;
        float m = s[0];
        for (int64_t t = 1; t < len; ++t) m = s[t] > m ? s[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        inv_sum[h] = 1.0f / sum;
    }
}

/* acc[h] = sum_t probs[h][t] * v_t (unnormalised); portable path. */
static void pv_accumulate(const layout_t *L, const int64_t D, const int64_t *table, int64_t len,
              const float *probs, int64_t stride, float *acc) {
    const int64_t G = L->group, row = L->hkv * D;
    memset(acc, 0, sizeof(float) * L->hkv * G * D);
    for (int64_t t0 = 0; t0 < len; t0 += L->block_size) {
        const float *vb = block_at(L, table, t0, 1);
        const int64_t nt = len - t0 < L->block_size ? len - t0 : L->block_size;
        for (int64_t o = 0; o < nt; ++o)
            for (int64_t kh = 0; kh < L->hkv; ++kh) {
                const float *v = vb + o * row + kh * D;
                for (int64_t g = 0; g < G; ++g) {
                    const float p = probs[(kh * G + g) * stride + t0 + o];
                    float *a = acc + (kh * G + g) * D;
#pragma omp simd
                    for (int64_t j = 0; j < D; ++j) a[j] += p * v[j];
                }
            }
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1
/* head_dim a multiple of 16, at most 256: each K/V row sits in registers while every head of
 * its GQA group uses it. For the portable loops GCC emits a scalar tail and a slow reduction
 * per dot product (~10% slower on the offline benchmark's decode batches). The kernel is bound
 * by memory bandwidth either way: ~9 GB/s per core here, which is what one core streams
 * (`perf` puts the time on the row loads; prefetching the next block in software gained nothing). */
static void qk_scores_avx512(const layout_t *L, int64_t D, const float *q, const int64_t *table,
                             int64_t len, float scale, float *scores, int64_t stride) {
    const int64_t G = L->group, row = L->hkv * D, nv = D / 16;
    __m512 k[16];
    for (int64_t t0 = 0; t0 < len; t0 += L->block_size) {
        const float *kb = block_at(L, table, t0, 0);
        const int64_t nt = len - t0 < L->block_size ? len - t0 : L->block_size;
        for (int64_t o = 0; o < nt; ++o)
            for (int64_t kh = 0; kh < L->hkv; ++kh) {
                const float *kr = kb + o * row + kh * D;
                for (int64_t c = 0; c < nv; ++c) k[c] = _mm512_loadu_ps(kr + 16 * c);
                for (int64_t g = 0; g < G; ++g) {
                    const float *qh = q + (kh * G + g) * D;
                    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), k[0]);
                    for (int64_t c = 1; c < nv; ++c)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), k[c], acc);
                    scores[(kh * G + g) * stride + t0 + o] = _mm512_reduce_add_ps(acc) * scale;
                }
            }
    }
}

static void pv_accumulate_avx512(const layout_t *L, int64_t D, const int64_t *table, int64_t len,
                                 const float *probs, int64_t stride, float *acc) {
    const int64_t G = L->group, row = L->hkv * D, nv = D / 16;
    memset(acc, 0, sizeof(float) * L->hkv * G * D);
    __m512 v[16];
    for (int64_t t0 = 0; t0 < len; t0 += L->block_size) {
        const float *vb = block_at(L, table, t0, 1);
        const int64_t nt = len - t0 < L->block_size ? len - t0 : L->block_size;
        for (int64_t o = 0; o < nt; ++o)
            for (int64_t kh = 0; kh < L->hkv; ++kh) {
                const float *vr = vb + o * row + kh * D;
                for (int64_t c = 0; c < nv; ++c) v[c] = _mm512_loadu_ps(vr + 16 * c);
                for (int64_t g = 0; g < G; ++g) {
                    const __m512 p = _mm512_set1_ps(probs[(kh * G + g) * stride + t0 + o]);
                    float *a = acc + (kh * G + g) * D;
                    for (int64_t c = 0; c < nv; ++c)
                        _mm512_storeu_ps(a + 16 * c,
                                         _mm512_fmadd_ps(p, v[c], _mm512_loadu_ps(a + 16 * c)));
                }
            }
    }
}
#endif

static void attend(const layout_t *L, const int64_t D, const float *q, const int64_t *table, int64_t len,
       float scale, float *scores, int64_t stride, float *acc, float *inv_sum, float *out) {
    const int64_t hq = L->hkv * L->group;
#ifdef HAVE_AVX512
    const int vector = D % 16 == 0 && D <= 256;
#else
    const int vector = 0;
#endif
    if (vector) {
#ifdef HAVE_AVX512
        qk_scores_avx512(L, D, q, table, len, scale, scores, stride);
#endif
    } else {
        qk_scores(L, D, q, table, len, scale, scores, stride);
    }
    softmax_rows(hq, scores, len, stride, inv_sum);
    if (vector) {
#ifdef HAVE_AVX512
        pv_accumulate_avx512(L, D, table, len, scores, stride, acc);
#endif
    } else {
        pv_accumulate(L, D, table, len, scores, stride, acc);
    }
    for (int64_t h = 0; h < hq; ++h)
        for (int64_t j = 0; j < D; ++j) out[h * D + j] = acc[h * D + j] * inv_sum[h];
}

/* Returns 0 on success, -1 if scratch memory could not be allocated, -2 on bad shapes. */
int es_paged_decode_f32(const float *q, int64_t q_token_stride, const float *cache,
                        int64_t num_layers, int64_t layer, int64_t block_size,
                        int64_t num_kv_heads, int64_t num_q_heads, int64_t head_dim,
                        const int64_t *tokens, const int64_t *seq_lens, const int64_t *tables,
                        int64_t table_stride, int64_t num_seqs, int64_t first, int64_t step,
                        float scale, float *out, int64_t out_token_stride) {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || step <= 0 || head_dim <= 0)
        return -2;
    const layout_t L = {
        .cache = cache,
        .block_stride = num_layers * 2 * block_size * num_kv_heads * head_dim,
        .layer_offset = layer * 2 * block_size * num_kv_heads * head_dim,
        .v_offset = block_size * num_kv_heads * head_dim,
        .block_size = block_size,
        .hkv = num_kv_heads,
        .group = num_q_heads / num_kv_heads,
    };
    int64_t longest = 1;
    for (int64_t i = first; i < num_seqs; i += step)
        longest = seq_lens[i] > longest ? seq_lens[i] : longest;
    float *scores = malloc(sizeof(float) * num_q_heads * longest);
    float *acc = malloc(sizeof(float) * num_q_heads * head_dim);
    float *inv_sum = malloc(sizeof(float) * num_q_heads);
    if (!scores || !acc || !inv_sum) {
        free(scores);
        free(acc);
        free(inv_sum);
        return -1;
    }
    for (int64_t i = first; i < num_seqs; i += step) {
        const int64_t *table = tables + i * table_stride;
        const int64_t len = seq_lens[i];
        if (len <= 0) continue;
        const float *qs = q + tokens[i] * q_token_stride;
        float *o = out + tokens[i] * out_token_stride;
        attend(&L, head_dim, qs, table, len, scale, scores, longest, acc, inv_sum, o);
    }
    free(scores);
    free(acc);
    free(inv_sum);
    return 0;
}
