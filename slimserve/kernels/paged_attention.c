/* Decode attention read straight from the paged KV cache.

   One query token per sequence. The G query heads that share a KV head are handled together,
   so each cached key and value row is read once per sequence and KV head, in place: nothing is
   gathered or copied. Softmax is computed online, a chunk of tokens at a time (running max and
   sum), so memory use does not grow with the context.

   Layouts (all contiguous, row-major):
     q        (B, Hkv, G, D) float32
     k, v     (Hkv, slots, row) cache of one layer; a row (`kind`) is D float32 (0), D int8
              codes followed by the 4 bytes of the row's float32 scale (1), or D bfloat16 (2)
     tables   (B, max_blocks) int64 block ids; sequence b's token t sits in slot
              tables[b][t / block_size] * block_size + t % block_size
     lens     (B,) int64 tokens to attend to per sequence
     out      (B, Hkv, G, D) float32
     lse      (B, Hkv, G) float32 log-sum-exp of each query row's scores, or NULL

   With AVX2 and FMA (and D a multiple of 8), each key row is loaded once for up to four query
   rows held in registers, values are accumulated in registers across the chunk, and exp is a
   vectorized polynomial; otherwise plain loops do the same arithmetic.
*/
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define MAX_G 32
#define MAX_D 256
#define CHUNK 32

static inline int64_t row_bytes_of(int kind, int64_t D) {
    return kind == I8 ? D + 4 : kind == BF16 ? 2 * D : 4 * D;
}

/* The float32 scale an int8 row carries after its codes; 1 for the other kinds. */
static inline float row_scale(const char *row, int D, int kind) {
    float s = 1.f;
    if (kind == I8) memcpy(&s, row + D, sizeof s);
    return s;
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element d of a row, unscaled (int8 codes come back as their integer value). */
static inline float elem(const char *row, int d, int kind) {
    if (kind == I8) return (float)((const int8_t *)row)[d];
    if (kind == BF16) return bf16_to_f32(((const uint16_t *)row)[d]);
    return ((const float *)row)[d];
}

/* ---- portable pieces ------------------------------------------------------------------- */

static void scores_plain(const float *q, const char *const *rows, int n, int G, int D,
                         int kind, float scale, float s[][CHUNK]) {
    for (int i = 0; i < n; i++) {
        float ks = row_scale(rows[i], D, kind) * scale;
        for (int g = 0; g < G; g++) {
            float acc = 0.f;
            for (int d = 0; d < D; d++) acc += q[g * D + d] * elem(rows[i], d, kind);
            s[g][i] = acc * ks;
        }
    }
}

static void accumulate_plain(const char *const *rows, int n, int G, int D, int kind,
                             float p[][CHUNK], float acc[][MAX_D]) {
    for (int i = 0; i < n; i++) {
        float vs = row_scale(rows[i], D, kind);
        for (int g = 0; g < G; g++) {
            float w = p[g][i] * vs;
            for (int d = 0; d < D; d++) acc[g][d] += w * elem(rows[i], d, kind);
        }
    }
}

static void exp_inplace_plain(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = expf(x[i]);
}

/* ---- AVX2 + FMA pieces ------------------------------------------------------------------ */

#ifdef HAVE_AVX2
static inline __m256 load8(const char *row, int d, int kind) {
    if (kind == I8) {
        __m128i c = _mm_loadl_epi64((const __m128i *)(row + d));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
    }
    if (kind == BF16) {
        __m128i b = _mm_loadu_si128((const __m128i *)(row + 2 * d));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
    }
    return _mm256_loadu_ps((const float *)row + d);
}

static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

static void exp_inplace_avx2(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8_nonpositive(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) x[i] = expf(x[i]);
}

/* Scores of up to four query rows (q + g0 * D ...) against every row of the chunk. */
static void scores_avx2(const float *q, const char *const *rows, int n, int G, int D,
                        int kind, float scale, float s[][CHUNK]) {
    for (int g0 = 0; g0 < G; g0 += 4) {
        int gn = G - g0 < 4 ? G - g0 : 4;
        const float *q0 = q + g0 * D;
        for (int i = 0; i < n; i++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int d = 0; d < D; d += 8) {
                __m256 kv = load8(rows[i], d, kind);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), kv, a0);
                if (gn > 1) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + d), kv, a1);
                if (gn > 2) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + d), kv, a2);
                if (gn > 3) a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + d), kv, a3);
            }
            float ks = scale * row_scale(rows[i], D, kind);
            s[g0][i] = hsum8(a0) * ks;
            if (gn > 1) s[g0 + 1][i] = hsum8(a1) * ks;
            if (gn > 2) s[g0 + 2][i] = hsum8(a2) * ks;
            if (gn > 3) s[g0 + 3][i] = hsum8(a3) * ks;
        }
    }
}

/* acc[g][d:d+8] += sum_i p[g][i] * v_i[d:d+8], four query rows' accumulators in registers. */
static void accumulate_avx2(const char *const *rows, int n, int G, int D, int kind,
                            float p[][CHUNK], float acc[][MAX_D]) {
    float w[MAX_G][CHUNK];
    for (int g = 0; g < G; g++)
        for (int i = 0; i < n; i++) w[g][i] = p[g][i] * row_scale(rows[i], D, kind);
    for (int g0 = 0; g0 < G; g0 += 4) {
        int gn = G - g0 < 4 ? G - g0 : 4;
        for (int d = 0; d < D; d += 8) {
            __m256 a0 = _mm256_loadu_ps(acc[g0] + d);
            __m256 a1 = gn > 1 ? _mm256_loadu_ps(acc[g0 + 1] + d) : a0;
            __m256 a2 = gn > 2 ? _mm256_loadu_ps(acc[g0 + 2] + d) : a0;
            __m256 a3 = gn > 3 ? _mm256_loadu_ps(acc[g0 + 3] + d) : a0;
            for (int i = 0; i < n; i++) {
                __m256 vv = load8(rows[i], d, kind);
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(w[g0][i]), vv, a0);
                if (gn > 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(w[g0 + 1][i]), vv, a1);
                if (gn > 2) a2 = _mm256_fmadd_ps(_mm256_set1_ps(w[g0 + 2][i]), vv, a2);
                if (gn > 3) a3 = _mm256_fmadd_ps(_mm256_set1_ps(w[g0 + 3][i]), vv, a3);
            }
            _mm256_storeu_ps(acc[g0] + d, a0);
            if (gn > 1) _mm256_storeu_ps(acc[g0 + 1] + d, a1);
            if (gn > 2) _mm256_storeu_ps(acc[g0 + 2] + d, a2);
            if (gn > 3) _mm256_storeu_ps(acc[g0 + 3] + d, a3);
        }
    }
}
#endif

/* ---- one (sequence, KV head) ------------------------------------------------------------ */

/* Tokens [begin, end) of one (sequence, KV head). */
static void one_head(const float *q, const char *k, const char *v, const int64_t *table,
                     int64_t begin, int64_t len, int block_size, int G, int D, int kind,
                     float scale, float *out, float *lse) {
    const int64_t row_bytes = row_bytes_of(kind, D);
    const int shift = __builtin_ctz((unsigned)block_size);
#ifdef HAVE_AVX2
    const int fast = D % 8 == 0;
#else
    const int fast = 0;
#endif
    float acc[MAX_G][MAX_D];
    float m[MAX_G], l[MAX_G], s[MAX_G][CHUNK];
    const char *krows[CHUNK], *vrows[CHUNK];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
        for (int d = 0; d < D; d++) acc[g][d] = 0.f;
    }
    for (int64_t t0 = begin; t0 < len; t0 += CHUNK) {
        int n = (int)(len - t0 < CHUNK ? len - t0 : CHUNK);
        for (int i = 0; i < n; i++) { /* block_size is a power of two: no division */
            int64_t t = t0 + i;
            int64_t slot = (table[t >> shift] << shift) | (t & (block_size - 1));
            krows[i] = k + slot * row_bytes;
            vrows[i] = v + slot * row_bytes;
        }
#ifdef HAVE_AVX2
        if (fast)
            scores_avx2(q, krows, n, G, D, kind, scale, s);
        else
#endif
            scores_plain(q, krows, n, G, D, kind, scale, s);
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
            for (int i = 0; i < n; i++) s[g][i] -= mx;
#ifdef HAVE_AVX2
            if (fast)
                exp_inplace_avx2(s[g], n);
            else
#endif
                exp_inplace_plain(s[g], n);
            for (int i = 0; i < n; i++) l[g] += s[g][i];
        }
#ifdef HAVE_AVX2
        if (fast)
            accumulate_avx2(vrows, n, G, D, kind, s, acc);
        else
#endif
            accumulate_plain(vrows, n, G, D, kind, s, acc);
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.f / l[g];
        for (int d = 0; d < D; d++) out[g * D + d] = acc[g][d] * inv;
        if (lse) lse[g] = m[g] + logf(l[g]);
    }
}

/* A sequence longer than PARTITION tokens is cut into partitions of that many, attended
   separately and merged by their log-sum-exps (as flash-decoding splits a context): at batch 1
   the work is then more than one piece per KV head, so both threads have some. The cut depends
   on the sequence's length alone, so a sequence's result does not depend on its batch. */
#ifndef PARTITION
#define PARTITION 256
#endif

static inline int64_t parts_of(int64_t len) {
    return len > PARTITION ? (len + PARTITION - 1) / PARTITION : 1;
}

int64_t paged_attention_scratch_floats(const PagedKV *kv, int64_t B, int64_t Hkv, int64_t G,
                                       int64_t D) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; b++) n += parts_of(kv->lens[b]) > 1 ? parts_of(kv->lens[b]) : 0;
    return n * Hkv * G * (D + 1);
}

/* Weights exp(lse_p - max) of each partition's output, summed in partition order. */
static void merge_parts(const float *parts, int64_t np, int64_t Hkv, int64_t G, int64_t D,
                        float *out, float *lse) {
    const int64_t stride = Hkv * G * (D + 1); /* from one partition's slot to the next's */
    for (int64_t g = 0; g < G; g++) {
        float mx = -INFINITY, sum = 0.f;
        for (int64_t p = 0; p < np; p++) {
            float l = parts[p * stride + G * D + g];
            mx = l > mx ? l : mx;
        }
        for (int64_t d = 0; d < D; d++) out[g * D + d] = 0.f;
        for (int64_t p = 0; p < np; p++) {
            const float *o = parts + p * stride;
            float w = expf(o[G * D + g] - mx);
            sum += w;
            for (int64_t d = 0; d < D; d++) out[g * D + d] += w * o[g * D + d];
        }
        for (int64_t d = 0; d < D; d++) out[g * D + d] /= sum;
        if (lse) lse[g] = mx + logf(sum);
    }
}

void paged_attention_part(const float *q, int64_t ldq, const PagedKV *kv, int64_t B, int64_t Hkv,
                          int64_t G, int64_t D, float scale, float *out, int64_t ldo, float *lse) {
    const int64_t row_bytes = row_bytes_of((int)kv->kind, D), slot = G * (D + 1);
    /* sequence b's pieces are units first[b] .. first[b + 1] - 1; a cut one's partials start at
       partition slot base[b] of kv->partials (slot p, head h: (p * Hkv + h) * slot floats) */
    int64_t first[B + 1], base[B + 1];
    first[0] = base[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t np = parts_of(kv->lens[b]);
        first[b + 1] = first[b] + np;
        base[b + 1] = base[b] + (np > 1 ? np : 0);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < first[B] * Hkv; w++) {
        int64_t u = w / Hkv, h = w % Hkv, b = 0;
        while (first[b + 1] <= u) b++;
        int64_t part = u - first[b], np = first[b + 1] - first[b], len = kv->lens[b];
        float *o = out + b * ldo + h * G * D, *l = lse ? lse + (b * Hkv + h) * G : NULL;
        if (np > 1) {
            o = kv->partials + ((base[b] + part) * Hkv + h) * slot;
            l = o + G * D;
            len = (part + 1) * PARTITION < len ? (part + 1) * PARTITION : len;
        }
        one_head(q + b * ldq + h * G * D, kv->k + h * kv->slots * row_bytes,
                 kv->v + h * kv->slots * row_bytes, kv->tables + b * kv->max_blocks,
                 part * PARTITION, len, (int)kv->block_size, (int)G, (int)D, (int)kv->kind, scale,
                 o, l);
    }
    if (base[B] == 0) return; /* no sequence was cut */
#pragma omp for
    for (int64_t w = 0; w < B * Hkv; w++) {
        int64_t b = w / Hkv, h = w % Hkv, np = first[b + 1] - first[b];
        if (np > 1)
            merge_parts(kv->partials + (base[b] * Hkv + h) * slot, np, Hkv, G, D,
                        out + b * ldo + h * G * D, lse ? lse + w * G : NULL);
    }
}

int paged_attention_supports(int64_t G, int64_t D) { return G <= MAX_G && D <= MAX_D; }

/* Returns 0, or -1 when G or D exceed what the kernel's stack buffers hold (or no memory). */
int paged_decode_attention(const float *q, const char *k_cache, const char *v_cache,
                           const int64_t *tables, const int64_t *lens, float *out, float *lse,
                           int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t slots,
                           int64_t max_blocks, int64_t block_size, int64_t kind,
                           float scale, int64_t num_threads) {
    if (!paged_attention_supports(G, D)) return -1;
    PagedKV kv = {k_cache, v_cache, slots, kind, block_size, tables, lens, max_blocks, NULL};
    int64_t n = paged_attention_scratch_floats(&kv, B, Hkv, G, D);
    if (n && !(kv.partials = malloc(sizeof(float) * (size_t)n))) return -1;
#pragma omp parallel num_threads(num_threads)
    paged_attention_part(q, Hkv * G * D, &kv, B, Hkv, G, D, scale, out, Hkv * G * D, lse);
    free(kv.partials);
    return 0;
}

/* Writes new keys and values to their cache slots in the cache's row format: k/v rows of token t
   start at k + t * k_stride (heads contiguous, D apart); int8 rows get the per-row symmetric
   scale max|x| / 127 (at least 1e-8 / 127) and codes rounded half to even, as PyTorch rounds. */
void write_kv_part(const float *k, const float *v, int64_t k_stride, int64_t v_stride,
                   char *k_cache, char *v_cache, const int64_t *slot_mapping, int64_t T,
                   int64_t Hkv, int64_t D, int64_t slots, int64_t kind) {
    const int64_t rb = row_bytes_of((int)kind, D);
#pragma omp for
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < Hkv; h++) {
            for (int which = 0; which < 2; which++) {
                const float *src = (which ? v + t * v_stride : k + t * k_stride) + h * D;
                char *dst = (which ? v_cache : k_cache) + (h * slots + slot_mapping[t]) * rb;
                if (kind == F32) {
                    memcpy(dst, src, (size_t)D * sizeof(float));
                } else if (kind == BF16) {
                    for (int64_t d = 0; d < D; d++) ((uint16_t *)dst)[d] = f32_to_bf16(src[d]);
                } else {
                    float amax = 0.f;
                    for (int64_t d = 0; d < D; d++) amax = fmaxf(amax, fabsf(src[d]));
                    float scale = fmaxf(amax, 1e-8f) / 127.f;
                    for (int64_t d = 0; d < D; d++)
                        ((int8_t *)dst)[d] = (int8_t)nearbyintf(src[d] / scale);
                    memcpy(dst + D, &scale, sizeof scale);
                }
            }
        }
    }
}

void write_kv(const float *k, const float *v, int64_t k_stride, int64_t v_stride, char *k_cache,
              char *v_cache, const int64_t *slot_mapping, int64_t T, int64_t Hkv, int64_t D,
              int64_t slots, int64_t kind, int64_t num_threads) {
#pragma omp parallel num_threads(num_threads) if (T >= 64)
    write_kv_part(k, v, k_stride, v_stride, k_cache, v_cache, slot_mapping, T, Hkv, D, slots,
                  kind);
}
