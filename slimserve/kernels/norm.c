/* RMSNorm with the residual add fused in.

   h = x + residual (or x alone), written to h_out; y = h / sqrt(mean(h^2) + eps) * weight.
   One pass per row instead of PyTorch's add, pow, mean, add, rsqrt and two muls, each a
   separate op with its own dispatch and output allocation: at batch 1 those dominate.
*/
#include <math.h>
#include <stdint.h>

void add_rms_norm(const float *x, const float *residual, const float *weight, float *h_out,
                  float *y_out, int64_t T, int64_t H, float eps, int64_t num_threads) {
#pragma omp parallel for num_threads(num_threads) if (T >= 8)
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
