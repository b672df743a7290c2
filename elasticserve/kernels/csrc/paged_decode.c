/* Paged decode attention over the engine's block-major KV cache, fp32, CPU.
 *
 * Cache layout: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], K at index 0
 * and V at index 1 of the "2" axis. One query token per sequence. Unlike the torch path, no
 * context is gathered into a buffer: K and V are read once, straight from their blocks, and
 * positions past a sequence's length are never read (whatever the slots hold; the AVX-512
 * path's prefetches may pull their cache lines, which reads no values).
 *
 * Two paths: one pass with an online softmax on AVX-512 CPUs (head_dim <= 256), and portable
 * loops elsewhere (scores, softmax, then P.V: three passes over the context).
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
#ifndef PF_BLOCKS
#define PF_BLOCKS 1 /* prefetch distance, blocks: 1/4 to 2 blocks measured alike */
#endif
/* One pass over the context, a chunk of up to 16 tokens of one block at a time, with an online
 * softmax (Flash-decoding style): per q head, the 16 scores of a chunk come out of one
 * transpose-add tree (lane o = token o) instead of 16 horizontal reductions, are exponentiated
 * in registers, and weight the chunk's V rows into accumulators held in registers for the
 * chunk. K and V of one block sit next to each other and are read while hot; the next block is
 * prefetched (the hardware prefetchers do not cross to it: it is a whole cache stride away). */

/* 2^x for x <= 0 (lanes below -126 give ~0): degree-7 Taylor on [-0.5, 0.5], error ~5e-9. */
static inline __m512 exp2_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    static const float c[8] = {1.0f, 0.6931471806f, 0.2402265070f, 0.0555041087f,
                               0.0096181291f, 0.0013333558f, 0.0001540353f, 0.0000152527f};
    __m512 p = _mm512_set1_ps(c[7]);
    for (int i = 6; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

/* r[4q + j] = sum of the lanes of d[q + 4j]: four levels of shuffle-and-add (45 ops for 16
 * dot products). The caller stores token o's products at d[o / 4 + 4 * (o % 4)]. */
static inline __m512 sum16(const __m512 *d) {
    __m512 e[8], f[4], g[2];
    for (int i = 0; i < 8; ++i)
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(d[2 * i], d[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(d[2 * i], d[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)
        f[i] = _mm512_add_ps(_mm512_shuffle_f32x4(e[2 * i], e[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(e[2 * i], e[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)
        g[i] = _mm512_add_ps(_mm512_shuffle_ps(f[2 * i], f[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(f[2 * i], f[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xDD));
}

typedef struct {
    const float *q;  /* [W]: the query, pre-scaled by scale * log2(e), zero past head_dim */
    float *acc;      /* [W]: unnormalised output */
    float *lsum;     /* [16]: per-lane sums of the probabilities */
    float *m;        /* running max score (log2 units) */
} head_state_t;

/* Row vector c of nv: the last one masked unless head_dim is a multiple of 16 (`full`). */
static inline __attribute__((always_inline)) __m512 row_vec(const float *p, int c, int nv,
                                                            int full, __mmask16 tail) {
    return full || c < nv - 1 ? _mm512_loadu_ps(p + 16 * c) : _mm512_maskz_loadu_ps(tail, p + 16 * c);
}

/* Scores may pass the running max by this much (log2 units: p <= 256) before the accumulators
 * are rescaled, so a chunk needs only a vector compare, no horizontal max, in the common case. */
#define MAX_SLACK 8.0f

/* n (1..16) tokens, rows `row` floats apart, of one kv head for one q head. nv = vectors per
 * row (a constant after inlining, so q and the accumulators stay in registers). */
static inline __attribute__((always_inline)) void chunk_head(const float *k, const float *v,
        int64_t row, int n, head_state_t st, const int nv, const int full, const __mmask16 tail) {
    __m512 r[16], r2[16], d[16];
    for (int c = 0; c < nv; ++c) r[c] = _mm512_loadu_ps(st.q + 16 * c);
    for (int o = 0; o < 16; ++o) {
        __m512 a = _mm512_setzero_ps();
        for (int c = 0; c < nv && o < n; ++c)
            a = _mm512_fmadd_ps(r[c], row_vec(k + o * row, c, nv, full, tail), a);
        d[(o >> 2) + 4 * (o & 3)] = a;
    }
    const __m512 s = sum16(d);
    const __mmask16 valid = (__mmask16)((1u << n) - 1);
    __m512 lsum = _mm512_loadu_ps(st.lsum), m = _mm512_set1_ps(*st.m);
    for (int c = 0; c < nv; ++c) r[c] = _mm512_loadu_ps(st.acc + 16 * c);
    if (_mm512_mask_cmp_ps_mask(valid, s, _mm512_add_ps(m, _mm512_set1_ps(MAX_SLACK)), _CMP_GT_OQ)) {
        const float top = _mm512_mask_reduce_max_ps(valid, s);
        const __m512 alpha = exp2_neg(_mm512_set1_ps(*st.m - top)); /* no libm call: no spills */
        lsum = _mm512_mul_ps(lsum, alpha);
        for (int c = 0; c < nv; ++c) r[c] = _mm512_mul_ps(r[c], alpha);
        *st.m = top;
        m = _mm512_set1_ps(top);
    }
    const __m512 p = _mm512_maskz_mov_ps(valid, exp2_neg(_mm512_sub_ps(s, m)));
    _mm512_storeu_ps(st.lsum, _mm512_add_ps(lsum, p));
    float pb[16] __attribute__((aligned(64)));
    _mm512_store_ps(pb, p);
    /* even and odd tokens into separate accumulators: twice the independent FMA chains */
    for (int c = 0; c < nv; ++c) r2[c] = _mm512_setzero_ps();
    int o = 0;
    for (; o + 1 < n; o += 2) {
        const __m512 w = _mm512_set1_ps(pb[o]), w2 = _mm512_set1_ps(pb[o + 1]);
        for (int c = 0; c < nv; ++c) {
            r[c] = _mm512_fmadd_ps(w, row_vec(v + o * row, c, nv, full, tail), r[c]);
            r2[c] = _mm512_fmadd_ps(w2, row_vec(v + (o + 1) * row, c, nv, full, tail), r2[c]);
        }
    }
    for (int c = 0; c < nv; ++c) {
        if (o < n) r[c] = _mm512_fmadd_ps(_mm512_set1_ps(pb[o]), row_vec(v + o * row, c, nv, full, tail), r[c]);
        _mm512_storeu_ps(st.acc + 16 * c, _mm512_add_ps(r[c], r2[c]));
    }
}

/* Software prefetch runs a fixed distance ahead of the compute along the call's whole stream of
 * blocks (across sequences too): blocks are a cache stride apart, in table order, so the
 * hardware prefetchers never see the next one coming. Each chunk-head advances it by about the
 * bytes it consumes; all at once would overflow the miss queue. */
typedef struct {
    const layout_t *L;
    const int64_t *tables, *seq_lens;
    int64_t table_stride, num_seqs, step;
    int64_t seq, blk, line; /* the next line to prefetch */
} prefetch_t;

static void prefetch_ahead(prefetch_t *p, int64_t lines) {
    const int64_t per_block = 2 * p->L->v_offset / 16; /* K and V of one layer: 64-byte lines */
    while (lines > 0 && p->seq < p->num_seqs) {
        if (p->blk * p->L->block_size >= p->seq_lens[p->seq]) {
            p->seq += p->step;
            p->blk = p->line = 0;
            continue;
        }
        const int64_t id = p->tables[p->seq * p->table_stride + p->blk];
        const char *b = (const char *)(p->L->cache + id * p->L->block_stride + p->L->layer_offset);
        const int64_t end = p->line + lines < per_block ? p->line + lines : per_block;
        lines -= end - p->line;
        for (; p->line < end; ++p->line) _mm_prefetch(b + 64 * p->line, _MM_HINT_T0);
        if (p->line == per_block) {
            ++p->blk;
            p->line = 0;
        }
    }
}

/* Every block of one sequence; the head states in `hs` (hq of them) start zeroed. */
static inline __attribute__((always_inline)) void blocks_avx512(const layout_t *L, int64_t D,
        const int64_t *table, int64_t len, const head_state_t *hs, prefetch_t *pf, const int nv,
        const int full) {
    const int64_t G = L->group, row = L->hkv * D, hq = L->hkv * G;
    const __mmask16 tail = (__mmask16)(0xFFFFu >> (16 * nv - D));
    const int64_t chunks = (L->block_size + 15) / 16, lines = 2 * L->v_offset / 16;
    const int64_t slice = (lines + hq * chunks - 1) / (hq * chunks);
    for (int64_t t0 = 0; t0 < len; t0 += L->block_size) {
        const float *kb = block_at(L, table, t0, 0), *vb = kb + L->v_offset;
        const int64_t nt = len - t0 < L->block_size ? len - t0 : L->block_size;
        for (int64_t c0 = 0; c0 < nt; c0 += 16) {
            const int n = nt - c0 < 16 ? (int)(nt - c0) : 16;
            for (int64_t kh = 0; kh < L->hkv; ++kh)
                for (int64_t g = 0; g < G; ++g) {
                    prefetch_ahead(pf, slice);
                    const int64_t off = c0 * row + kh * D;
                    chunk_head(kb + off, vb + off, row, n, hs[kh * G + g], nv, full, tail);
                }
        }
    }
}

#define BLOCKS_NV(nv)                                                                        \
    static __attribute__((noinline)) void blocks_nv##nv(const layout_t *L, int64_t D,              \
            const int64_t *table, int64_t len, const head_state_t *hs, prefetch_t *pf) {           \
        blocks_avx512(L, D, table, len, hs, pf, nv, 1);                                            \
    }
BLOCKS_NV(1)
BLOCKS_NV(2)
BLOCKS_NV(4)
BLOCKS_NV(8)

/* head_dim <= 256 (any, not only multiples of 16). `scratch`: hq * (2 * W + 17) floats. */
static void attend_avx512(const layout_t *L, int64_t D, const float *q, const int64_t *table,
                          int64_t len, float scale, float *scratch, prefetch_t *pf, float *out) {
    const int64_t hq = L->hkv * L->group, nv = (D + 15) / 16, W = 16 * nv;
    const __mmask16 tail = (__mmask16)(0xFFFFu >> (W - D));
    const __m512 qscale = _mm512_set1_ps(scale * 1.4426950408889634f); /* exp -> exp2 */
    head_state_t hs[hq];
    for (int64_t h = 0; h < hq; ++h) {
        float *base = scratch + h * (2 * W + 17);
        hs[h] = (head_state_t){base, base + W, base + 2 * W, base + 2 * W + 16};
        for (int64_t c = 0; c < nv; ++c) {
            const __mmask16 mk = c == nv - 1 ? tail : 0xFFFF;
            _mm512_storeu_ps(base + 16 * c,
                             _mm512_mul_ps(qscale, _mm512_maskz_loadu_ps(mk, q + h * D + 16 * c)));
        }
        memset(base + W, 0, sizeof(float) * (W + 16));
        *hs[h].m = -1e30f;
    }
    switch (D == W ? nv : 0) { /* constant nv: fully unrolled, q and accumulators in registers */
    case 1: blocks_nv1(L, D, table, len, hs, pf); break;
    case 2: blocks_nv2(L, D, table, len, hs, pf); break;
    case 4: blocks_nv4(L, D, table, len, hs, pf); break;
    case 8: blocks_nv8(L, D, table, len, hs, pf); break;
    default: blocks_avx512(L, D, table, len, hs, pf, (int)nv, 0); break;
    }
    for (int64_t h = 0; h < hq; ++h) {
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(hs[h].lsum)));
        for (int64_t c = 0; c < nv; ++c)
            _mm512_mask_storeu_ps(out + h * D + 16 * c, c == nv - 1 ? tail : 0xFFFF,
                                  _mm512_mul_ps(inv, _mm512_loadu_ps(hs[h].acc + 16 * c)));
    }
}
#endif

static void attend_portable(const layout_t *L, const int64_t D, const float *q, const int64_t *table,
                            int64_t len, float scale, float *scores, int64_t stride, float *out) {
    const int64_t hq = L->hkv * L->group;
    float *acc = scores + hq * stride, *inv_sum = acc + hq * D;
    qk_scores(L, D, q, table, len, scale, scores, stride);
    softmax_rows(hq, scores, len, stride, inv_sum);
    pv_accumulate(L, D, table, len, scores, stride, acc);
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
#ifdef HAVE_AVX512
    const int vector = head_dim <= 256;
#else
    const int vector = 0;
#endif
    int64_t longest = 1;
    for (int64_t i = first; i < num_seqs && !vector; i += step)
        longest = seq_lens[i] > longest ? seq_lens[i] : longest;
    /* portable: scores, accumulators, 1 / sums; vector: per head q, accumulators, sums, max */
    const int64_t floats = vector ? num_q_heads * (2 * ((head_dim + 15) / 16 * 16) + 17)
                                  : num_q_heads * (longest + head_dim + 1);
    float *scratch = malloc(sizeof(float) * floats);
    if (!scratch) return -1;
#ifdef HAVE_AVX512
    prefetch_t pf = {&L, tables, seq_lens, table_stride, num_seqs, step, first, 0, 0};
    if (vector) prefetch_ahead(&pf, PF_BLOCKS * 2 * L.v_offset / 16);
#endif
    for (int64_t i = first; i < num_seqs; i += step) {
        const int64_t *table = tables + i * table_stride;
        const int64_t len = seq_lens[i];
        if (len <= 0) continue;
        const float *qs = q + tokens[i] * q_token_stride;
        float *o = out + tokens[i] * out_token_stride;
        if (vector) {
#ifdef HAVE_AVX512
            attend_avx512(&L, head_dim, qs, table, len, scale, scratch, &pf, o);
#endif
        } else {
            attend_portable(&L, head_dim, qs, table, len, scale, scratch, longest, o);
        }
    }
    free(scratch);
    return 0;
}
