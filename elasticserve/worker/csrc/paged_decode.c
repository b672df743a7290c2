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
    int64_t block_stride;  /* floats per block (all layers) */
    int64_t layer_offset;  /* floats from a block's start to this layer's K */
    int64_t v_offset;      /* floats from this layer's K to its V */
    int64_t row;           /* floats per token row: num_kv_heads * head_dim */
    int64_t block_size, hq, d, group;
} layout_t;

static void qk_scores(const layout_t *L, const float *q, const int64_t *table, int64_t len,
                      float scale, float *scores, int64_t stride) {
    for (int64_t t0 = 0; t0 < len; t0 += L->block_size) {
        const float *kb = L->cache + table[t0 / L->block_size] * L->block_stride + L->layer_offset;
        int64_t nt = len - t0 < L->block_size ? len - t0 : L->block_size;
        for (int64_t o = 0; o < nt; ++o) {
            const float *krow = kb + o * L->row;
            for (int64_t h = 0; h < L->hq; ++h) {
                const float *k = krow + (h / L->group) * L->d;
                const float *qh = q + h * L->d;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t j = 0; j < L->d; ++j) s += qh[j] * k[j];
                scores[h * stride + t0 + o] = s * scale;
            }
        }
    }
}

/* In place: scores[h] -> exp(scores[h] - max); returns nothing, writes 1 / sum per head. */
static void softmax_rows(const layout_t *L, float *scores, int64_t len, int64_t stride,
                         float *inv_sum) {
    for (int64_t h = 0; h < L->hq; ++h) {
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

static void pv_accumulate(const layout_t *L, const int64_t *table, int64_t len,
                          const float *probs, int64_t stride, float *acc) {
    memset(acc, 0, sizeof(float) * L->hq * L->d);
    for (int64_t t0 = 0; t0 < len; t0 += L->block_size) {
        const float *vb = L->cache + table[t0 / L->block_size] * L->block_stride
                          + L->layer_offset + L->v_offset;
        int64_t nt = len - t0 < L->block_size ? len - t0 : L->block_size;
        for (int64_t o = 0; o < nt; ++o) {
            const float *vrow = vb + o * L->row;
            for (int64_t h = 0; h < L->hq; ++h) {
                const float *v = vrow + (h / L->group) * L->d;
                const float p = probs[h * stride + t0 + o];
                float *a = acc + h * L->d;
#pragma omp simd
                for (int64_t j = 0; j < L->d; ++j) a[j] += p * v[j];
            }
        }
    }
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
    layout_t L = {
        .cache = cache,
        .block_stride = num_layers * 2 * block_size * num_kv_heads * head_dim,
        .layer_offset = layer * 2 * block_size * num_kv_heads * head_dim,
        .v_offset = block_size * num_kv_heads * head_dim,
        .row = num_kv_heads * head_dim,
        .block_size = block_size, .hq = num_q_heads, .d = head_dim,
        .group = num_q_heads / num_kv_heads,
    };
    int64_t longest = 1;
    for (int64_t i = first; i < num_seqs; i += step)
        longest = seq_lens[i] > longest ? seq_lens[i] : longest;
    float *scores = malloc(sizeof(float) * num_q_heads * longest);
    float *acc = malloc(sizeof(float) * num_q_heads * head_dim);
    float *inv_sum = malloc(sizeof(float) * num_q_heads);
    if (!scores || !acc || !inv_sum) {
        free(scores); free(acc); free(inv_sum);
        return -1;
    }
    for (int64_t i = first; i < num_seqs; i += step) {
        const int64_t *table = tables + i * table_stride;
        int64_t len = seq_lens[i];
        if (len <= 0) continue;
        qk_scores(&L, q + tokens[i] * q_token_stride, table, len, scale, scores, longest);
        softmax_rows(&L, scores, len, longest, inv_sum);
        pv_accumulate(&L, table, len, scores, longest, acc);
        float *o = out + tokens[i] * out_token_stride;
        for (int64_t h = 0; h < num_q_heads; ++h)
            for (int64_t j = 0; j < head_dim; ++j)
                o[h * head_dim + j] = acc[h * head_dim + j] * inv_sum[h];
    }
    free(scores); free(acc); free(inv_sum);
    return 0;
}
