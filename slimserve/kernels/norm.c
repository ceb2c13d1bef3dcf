/* Elementwise pieces of a decoder layer: RMSNorm with the residual add fused in, rotary position
   embedding, and SiLU-and-multiply.

   Each is one pass over its rows instead of a chain of PyTorch ops, each with its own dispatch
   and output allocation: at batch 1 those dominate. The model's PyTorch path calls the same
   functions as the fused decode step (decode_step.c), so the two give the same bits.
*/
#include <math.h>
#include <stdint.h>

#include "kernels.h"

/* h = x + residual (or x alone), written to h_out; y = h / sqrt(mean(h^2) + eps) * weight.
   h_out may be residual, and y_out may be x. */
void add_rms_norm_part(const float *x, const float *residual, const float *weight, float *h_out,
                       float *y_out, int64_t T, int64_t H, float eps) {
#pragma omp for
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * H;
        const float *rr = residual ? residual + t * H : 0;
        float *hr = h_out + t * H, *yr = y_out + t * H;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; i++) {
            float h = rr ? xr[i] + rr[i] : xr[i];
            hr[i] = h;
            ss += h * h;
        }
        float inv = 1.f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t i = 0; i < H; i++) yr[i] = hr[i] * inv * weight[i];
    }
}

void add_rms_norm(const float *x, const float *residual, const float *weight, float *h_out,
                  float *y_out, int64_t T, int64_t H, float eps, int64_t num_threads) {
#pragma omp parallel num_threads(num_threads) if (T >= 8)
    add_rms_norm_part(x, residual, weight, h_out, y_out, T, H, eps);
}

/* NeoX / HF `rotate_half` layout: x * cos + (-x2, x1) * sin, with (cos, sin) the rows of
   (positions, D) tables. Each product is rounded before the add (the build does not contract
   to FMA), as PyTorch's elementwise ops round, so this matches layers/rotary.py bit for bit. */
void rope_part(float *x, int64_t ldx, int64_t T, int64_t heads, int64_t D, const float *cos,
               const float *sin, const int64_t *positions) {
    const int64_t half = D / 2;
#pragma omp for
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + positions[t] * D, *s = sin + positions[t] * D;
        for (int64_t h = 0; h < heads; h++) {
            float *r = x + t * ldx + h * D;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float x1 = r[i], x2 = r[i + half];
                float lo = x1 * c[i] + -x2 * s[i];
                float hi = x2 * c[i + half] + x1 * s[i + half];
                r[i] = lo;
                r[i + half] = hi;
            }
        }
    }
}

void rope(float *x, int64_t ldx, int64_t T, int64_t heads, int64_t D, const float *cos,
          const float *sin, const int64_t *positions, int64_t num_threads) {
#pragma omp parallel num_threads(num_threads) if (T >= 16)
    rope_part(x, ldx, T, heads, D, cos, sin, positions);
}

/* silu(g) = g sigmoid(g), with sigmoid from e = exp(-|g|) <= 1, which neither overflows nor
   loses the small values: 1 / (1 + e) for g >= 0, e / (1 + e) below. */
void silu_mul_part(const float *x, int64_t ldx, int64_t T, int64_t I, float *y) {
#pragma omp for
    for (int64_t t = 0; t < T; t++) {
        const float *g = x + t * ldx, *u = g + I;
        float *yr = y + t * I;
        int64_t i = 0;
#ifdef HAVE_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.f);
        for (; i + 8 <= I; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 e = exp8_nonpositive(_mm256_or_ps(gv, sign)); /* exp(-|g|) */
            __m256 num = _mm256_blendv_ps(one, e, gv);            /* e where g < 0 */
            __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) {
            float e = expf(-fabsf(g[i]));
            float sig = (g[i] < 0.f ? e : 1.f) / (1.f + e);
            yr[i] = g[i] * sig * u[i];
        }
    }
}

void silu_mul(const float *x, int64_t ldx, int64_t T, int64_t I, float *y, int64_t num_threads) {
#pragma omp parallel num_threads(num_threads) if (T >= 4)
    silu_mul_part(x, ldx, T, I, y);
}
