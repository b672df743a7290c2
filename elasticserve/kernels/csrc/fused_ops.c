/* Fused fp32 element-wise ops for the CPU decoder: RMSNorm, rotate-half RoPE, SiLU-and-mul.
 *
 * Each replaces several torch ops (RMSNorm: pow, mean, add, rsqrt, mul, mul; RoPE: two slices,
 * neg, cat, mul, mul, add), and each torch op is an OpenMP region whose thread wake-up costs
 * ~0.2 ms under OMP_WAIT_POLICY=PASSIVE on a small batch, more than the arithmetic. Rows are
 * split between threads by the caller: a call handles rows first, first + step, ...
 */
#include <stdint.h>
#include <math.h>

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; x and out have rows `stride` floats apart. */
void es_rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *out,
                     int64_t out_stride, int64_t rows, int64_t dim, float eps, int64_t first,
                     int64_t step) {
    for (int64_t r = first; r < rows; r += step) {
        const float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < dim; ++j) ss += xr[j] * xr[j];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) o[j] = w[j] * (xr[j] * inv);
    }
}

/* In place, for every token t and head h of x ([tokens, heads, head_dim], token rows
 * `token_stride` floats apart, heads contiguous): rotate-half RoPE with cos/sin
 * [tokens, head_dim] (both halves of each row equal, as the model builds them). */
void es_rope_f32(float *x, int64_t token_stride, int64_t heads, int64_t head_dim,
                 const float *cos, const float *sin, int64_t tokens, int64_t first,
                 int64_t step) {
    const int64_t half = head_dim / 2;
    for (int64_t t = first; t < tokens; t += step) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
            float *v = x + t * token_stride + h * head_dim;
#pragma omp simd
            for (int64_t j = 0; j < half; ++j) {
                const float lo = v[j], hi = v[j + half];
                v[j] = lo * c[j] - hi * s[j];
                v[j + half] = hi * c[j + half] + lo * s[j + half];
            }
        }
    }
}

/* out[r] = silu(gate_up[r, :inter]) * gate_up[r, inter:]; gate_up rows are 2 * inter wide. */
void es_silu_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t inter,
                     int64_t first, int64_t step) {
    for (int64_t r = first; r < rows; r += step) {
        const float *g = gate_up + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
#pragma omp simd
        for (int64_t j = 0; j < inter; ++j) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}
