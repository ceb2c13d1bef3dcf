/* Decode attention read straight from the paged KV cache.

   One query token per sequence. The G query heads that share a KV head are handled together,
   so each cached key and value row is read once per sequence and KV head, in place: nothing is
   gathered or copied. Softmax is computed online, one block at a time (running max and sum), so
   memory use does not grow with the context.

   Layouts (all contiguous, row-major):
     q        (B, Hkv, G, D) float32
     k, v     (Hkv, slots, row) cache of one layer; a row is D float32, or, with int8 rows,
              D int8 codes followed by the 4 bytes of the row's float32 scale
     tables   (B, max_blocks) int64 block ids; sequence b's token t sits in slot
              tables[b][t / block_size] * block_size + t % block_size
     lens     (B,) int64 tokens to attend to per sequence
     out      (B, Hkv, G, D) float32
     lse      (B, Hkv, G) float32 log-sum-exp of each query row's scores, or NULL
*/
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_G 32
#define MAX_D 256
#define CHUNK 32

static inline float dot_f32(const float *a, const float *b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline float dot_i8(const float *a, const int8_t *b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * (float)b[i];
    return s;
}

static inline float row_scale(const int8_t *row, int D) {
    float s;
    const unsigned char *src = (const unsigned char *)(row + D);
    unsigned char *dst = (unsigned char *)&s;
    for (int i = 0; i < 4; i++) dst[i] = src[i];
    return s;
}

static void one_head(const float *q, const char *k, const char *v, const int64_t *table,
                     int64_t len, int block_size, int G, int D,
                     int int8_rows, float scale, float *out, float *lse) {
    const int64_t row_bytes = int8_rows ? (int64_t)D + 4 : (int64_t)D * 4;
    float acc[MAX_G][MAX_D];
    float m[MAX_G], l[MAX_G], s[MAX_G][CHUNK];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
        for (int d = 0; d < D; d++) acc[g][d] = 0.f;
    }
    for (int64_t t0 = 0; t0 < len; t0 += CHUNK) {
        int n = (int)(len - t0 < CHUNK ? len - t0 : CHUNK);
        /* scores for this chunk of tokens */
        for (int i = 0; i < n; i++) {
            int64_t t = t0 + i;
            int64_t slot = table[t / block_size] * block_size + t % block_size;
            const char *row = k + slot * row_bytes;
            if (int8_rows) {
                float ks = row_scale((const int8_t *)row, D) * scale;
                for (int g = 0; g < G; g++) s[g][i] = dot_i8(q + g * D, (const int8_t *)row, D) * ks;
            } else {
                for (int g = 0; g < G; g++)
                    s[g][i] = dot_f32(q + g * D, (const float *)row, D) * scale;
            }
        }
        /* rescale the running sums to the new maxima, then turn scores into weights */
        for (int g = 0; g < G; g++) {
            float mx = m[g];
            for (int i = 0; i < n; i++) mx = s[g][i] > mx ? s[g][i] : mx;
            if (mx > m[g]) {
                float c = expf(m[g] - mx); /* exp(-inf) = 0 on the first chunk */
                l[g] *= c;
                for (int d = 0; d < D; d++) acc[g][d] *= c;
                m[g] = mx;
            }
            for (int i = 0; i < n; i++) {
                s[g][i] = expf(s[g][i] - mx);
                l[g] += s[g][i];
            }
        }
        /* accumulate the weighted values */
        for (int i = 0; i < n; i++) {
            int64_t t = t0 + i;
            int64_t slot = table[t / block_size] * block_size + t % block_size;
            const char *row = v + slot * row_bytes;
            if (int8_rows) {
                const int8_t *c = (const int8_t *)row;
                float vs = row_scale(c, D);
                for (int g = 0; g < G; g++) {
                    float p = s[g][i] * vs;
                    float *a = acc[g];
#pragma omp simd
                    for (int d = 0; d < D; d++) a[d] += p * (float)c[d];
                }
            } else {
                const float *r = (const float *)row;
                for (int g = 0; g < G; g++) {
                    float p = s[g][i];
                    float *a = acc[g];
#pragma omp simd
                    for (int d = 0; d < D; d++) a[d] += p * r[d];
                }
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.f / l[g];
        for (int d = 0; d < D; d++) out[g * D + d] = acc[g][d] * inv;
        if (lse) lse[g] = m[g] + logf(l[g]);
    }
}

/* Returns 0, or -1 when G or D exceed what the kernel's stack buffers hold. */
int paged_decode_attention(const float *q, const char *k_cache, const char *v_cache,
                           const int64_t *tables, const int64_t *lens, float *out, float *lse,
                           int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t slots,
                           int64_t max_blocks, int64_t block_size, int64_t int8_rows,
                           float scale, int64_t num_threads) {
    if (G > MAX_G || D > MAX_D) return -1;
    const int64_t row_bytes = int8_rows ? D + 4 : D * 4;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t w = 0; w < B * Hkv; w++) {
        int64_t b = w / Hkv, h = w % Hkv;
        one_head(q + w * G * D, k_cache + h * slots * row_bytes, v_cache + h * slots * row_bytes,
                 tables + b * max_blocks, lens[b], (int)block_size, (int)G, (int)D,
                 (int)int8_rows, scale, out + w * G * D, lse ? lse + w * G : NULL);
    }
    return 0;
}
