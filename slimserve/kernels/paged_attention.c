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

   Every query row is one of these, a prompt chunk's as much as a decode's (backends/native_cpu.py):
   up to 8 consecutive rows of one sequence form a tile, whose key and value chunks are gathered
   (and converted to float32) once for all of them. A row's arithmetic depends on its own length
   alone, never on its tile or batch: that is what keeps greedy output batch-invariant.

   With AVX2 and FMA (and D a multiple of 8), scores take four keys per load of a query row and
   share one horizontal-sum shuffle, values are accumulated in registers across the chunk, and
   exp is a vectorized polynomial; otherwise plain loops do the same steps.
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

/* A chunk's rows as float32 (what load8 gives: int8 codes unscaled, bf16 widened) and each
   row's scale, so the loops below read plain floats and fold the load into the FMA: each key and
   value row is converted once per chunk instead of once per group of query rows and d-block. */
static void chunk_floats(const char *const *rows, int n, int D, int kind, float *buf,
                         float *row_scales, const float **ptrs) {
    for (int i = 0; i < n; i++) {
        row_scales[i] = row_scale(rows[i], D, kind);
        if (kind == F32) { /* already floats: read in place */
            ptrs[i] = (const float *)rows[i];
            continue;
        }
        float *dst = buf + (int64_t)i * D;
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(dst + d, load8(rows[i], d, kind));
        ptrs[i] = dst;
    }
}

/* Four horizontal sums at once, each with hsum8's pairing ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)),
   so every sum has the same bits as hsum8 gives it alone. */
static inline void hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d, float out[4]) {
    __m256 xab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    __m256 xcd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
    __m256 y = _mm256_add_ps(_mm256_shuffle_ps(xab, xcd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(xab, xcd, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 z = _mm256_add_ps(_mm256_shuffle_ps(y, y, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm256_shuffle_ps(y, y, _MM_SHUFFLE(3, 1, 3, 1)));
    float t[8];
    _mm256_storeu_ps(t, z); /* [a, c, a, c | b, d, b, d] */
    out[0] = t[0], out[1] = t[4], out[2] = t[1], out[3] = t[5];
}

/* Scores of every query row (q + g * D) against the chunk's n key rows: per score, eight
   lanes accumulate over d in order, then hsum8's pairing, then the row's scale. Four keys at a
   time share each load of q. */
static void scores_avx2(const float *q, const float *const *k, const float *kscale, int n,
                        int G, int D, float scale, float s[][CHUNK]) {
    for (int g = 0; g < G; g++) {
        const float *qg = q + g * D;
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int d = 0; d < D; d += 8) {
                __m256 qv = _mm256_loadu_ps(qg + d);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i] + d), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i + 1] + d), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i + 2] + d), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i + 3] + d), a3);
            }
            float h[4];
            hsum8x4(a0, a1, a2, a3, h);
            for (int j = 0; j < 4; j++) s[g][i + j] = h[j] * (scale * kscale[i + j]);
        }
        for (; i < n; i++) {
            __m256 a0 = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8)
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(k[i] + d), a0);
            s[g][i] = hsum8(a0) * (scale * kscale[i]);
        }
    }
}

/* acc[g][d] += sum_i p[g][i] * vscale_i * v_i[d], in order of i: one query row at a time, 64
   columns of its accumulator held in registers across the chunk's rows. */
static void accumulate_avx2(const float *const *v, const float *vscale, int n, int G, int D,
                            float p[][CHUNK], float acc[][MAX_D]) {
    for (int g = 0; g < G; g++) {
        float w[CHUNK];
        for (int i = 0; i < n; i++) w[i] = p[g][i] * vscale[i];
        int d0 = 0;
        for (; d0 + 64 <= D; d0 += 64) { /* a constant trip count: the eight stay in registers */
            __m256 a0 = _mm256_loadu_ps(acc[g] + d0), a1 = _mm256_loadu_ps(acc[g] + d0 + 8);
            __m256 a2 = _mm256_loadu_ps(acc[g] + d0 + 16), a3 = _mm256_loadu_ps(acc[g] + d0 + 24);
            __m256 a4 = _mm256_loadu_ps(acc[g] + d0 + 32), a5 = _mm256_loadu_ps(acc[g] + d0 + 40);
            __m256 a6 = _mm256_loadu_ps(acc[g] + d0 + 48), a7 = _mm256_loadu_ps(acc[g] + d0 + 56);
            for (int i = 0; i < n; i++) {
                const __m256 wi = _mm256_set1_ps(w[i]);
                const float *vi = v[i] + d0;
                a0 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi), a0);
                a1 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 8), a1);
                a2 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 16), a2);
                a3 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 24), a3);
                a4 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 32), a4);
                a5 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 40), a5);
                a6 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 48), a6);
                a7 = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 56), a7);
            }
            _mm256_storeu_ps(acc[g] + d0, a0), _mm256_storeu_ps(acc[g] + d0 + 8, a1);
            _mm256_storeu_ps(acc[g] + d0 + 16, a2), _mm256_storeu_ps(acc[g] + d0 + 24, a3);
            _mm256_storeu_ps(acc[g] + d0 + 32, a4), _mm256_storeu_ps(acc[g] + d0 + 40, a5);
            _mm256_storeu_ps(acc[g] + d0 + 48, a6), _mm256_storeu_ps(acc[g] + d0 + 56, a7);
        }
        for (; d0 < D; d0 += 64) { /* the last D % 64 columns */
            const int nb = (D - d0) / 8;
            __m256 a[8];
            for (int b = 0; b < nb; b++) a[b] = _mm256_loadu_ps(acc[g] + d0 + 8 * b);
            for (int i = 0; i < n; i++) {
                const __m256 wi = _mm256_set1_ps(w[i]);
                const float *vi = v[i] + d0;
                for (int b = 0; b < nb; b++)
                    a[b] = _mm256_fmadd_ps(wi, _mm256_loadu_ps(vi + 8 * b), a[b]);
            }
            for (int b = 0; b < nb; b++) _mm256_storeu_ps(acc[g] + d0 + 8 * b, a[b]);
        }
    }
}

/* l[c] += s[c][0] + s[c][1] + ... + s[c][n - 1], in that order, for C (a constant) rows at once:
   the C sums wait in registers, their dependency chains overlapping (a sum kept in l[] waited on
   its own store at every step: 61% of the softmax step's time at a 2,048-token prefill). */
static inline __attribute__((always_inline)) void row_sums(float s[][CHUNK], int n, float *l,
                                                           const int C) {
    float a[4];
    for (int c = 0; c < C; c++) a[c] = l[c];
    for (int i = 0; i < n; i++)
        for (int c = 0; c < C; c++) a[c] += s[c][i];
    for (int c = 0; c < C; c++) l[c] = a[c];
}

/* The online softmax step of one chunk, with the scalar loop's results: the maximum and the
   subtraction are exact in any order, so they run eight lanes wide; each row's sum stays in
   order of i, up to four rows' sums at a time in registers (row_sums). */
static void softmax_chunk_avx2(float s[][CHUNK], int n, int G, int D, float *m, float *l,
                               float acc[][MAX_D]) {
    for (int g = 0; g < G; g++) {
        float mx = m[g];
        int i = 0;
        if (n >= 8) {
            __m256 v = _mm256_loadu_ps(s[g]);
            for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(s[g] + i));
            float t[8];
            _mm256_storeu_ps(t, v);
            for (int j = 0; j < 8; j++) mx = t[j] > mx ? t[j] : mx;
        }
        for (; i < n; i++) mx = s[g][i] > mx ? s[g][i] : mx;
        if (mx > m[g]) {
            float c = expf(m[g] - mx); /* exp(-inf) = 0 on the first chunk */
            l[g] *= c;
            for (int d = 0; d < D; d++) acc[g][d] *= c;
            m[g] = mx;
        }
        const __m256 mv = _mm256_set1_ps(mx);
        for (i = 0; i + 8 <= n; i += 8)
            _mm256_storeu_ps(s[g] + i, _mm256_sub_ps(_mm256_loadu_ps(s[g] + i), mv));
        for (; i < n; i++) s[g][i] -= mx;
        exp_inplace_avx2(s[g], n);
    }
    for (int g = 0; g < G; g += 4) switch (G - g < 4 ? G - g : 4) {
        case 1: row_sums(s + g, n, l + g, 1); break;
        case 2: row_sums(s + g, n, l + g, 2); break;
        case 3: row_sums(s + g, n, l + g, 3); break;
        default: row_sums(s + g, n, l + g, 4);
        }
}
#endif

/* ---- one (sequence, KV head) ------------------------------------------------------------ */

#ifndef KV_LEAD
#define KV_LEAD 1
#endif
#ifndef KV_LOCALITY
#define KV_LOCALITY 2 /* into L2 (`prefetcht1`) */
#endif
/* Fetch the key and value rows of tokens [from, to) toward the core ahead of their use. */
static inline void fetch_rows(const char *k, const char *v, int64_t row_bytes,
                              const int64_t *table, int shift, int block_size, int64_t from,
                              int64_t to) {
    for (int64_t t = from; t < to; t++) {
        const int64_t slot = (table[t >> shift] << shift) | (t & (block_size - 1));
        for (int64_t o = 0; o < row_bytes; o += 64) {
            __builtin_prefetch(k + slot * row_bytes + o, 0, KV_LOCALITY);
            __builtin_prefetch(v + slot * row_bytes + o, 0, KV_LOCALITY);
        }
    }
}

/* R consecutive query positions of one sequence and KV head (a tile: R = 1 for a decode), row
   r attending to tokens [begin, ends[r]): each chunk's key and value rows are gathered (and
   converted) once for all R * G query rows. Row r's arithmetic is exactly what it would be alone
   (the chunk grid starts at `begin` for every row and each row stops at its own end), so tiling
   changes no bit. Query rows of position r: q + r * ldq; its output and log-sum-exp go to outs[r]
   and lses[r] (NULL: none). R * G <= MAX_G. */
static void tile_heads(const float *q, int64_t ldq, int R, const char *k, const char *v,
                       const int64_t *table, int64_t begin, const int64_t *ends, int block_size,
                       int G, int D, int kind, float scale, float *const *outs,
                       float *const *lses) {
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
#ifdef HAVE_AVX2
    float kbuf[CHUNK * MAX_D], vbuf[CHUNK * MAX_D], kscale[CHUNK], vscale[CHUNK];
    const float *kf[CHUNK], *vf[CHUNK];
#endif
    int64_t last = 0;
    for (int r = 0; r < R; r++) last = ends[r] > last ? ends[r] : last;
    for (int g = 0; g < R * G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
        for (int d = 0; d < D; d++) acc[g][d] = 0.f;
    }
    fetch_rows(k, v, row_bytes, table, shift, block_size, begin,
               last - begin < KV_LEAD * CHUNK ? last : begin + KV_LEAD * CHUNK);
    for (int64_t t0 = begin; t0 < last; t0 += CHUNK) {
        int n_all = (int)(last - t0 < CHUNK ? last - t0 : CHUNK);
        for (int i = 0; i < n_all; i++) { /* block_size is a power of two: no division */
            int64_t t = t0 + i;
            int64_t slot = (table[t >> shift] << shift) | (t & (block_size - 1));
            krows[i] = k + slot * row_bytes;
            vrows[i] = v + slot * row_bytes;
        }
        { /* the rows KV_LEAD chunks on: in flight while this chunk computes */
            const int64_t t1 = t0 + KV_LEAD * CHUNK;
            if (KV_LEAD && t1 < last)
                fetch_rows(k, v, row_bytes, table, shift, block_size, t1,
                           last - t1 < CHUNK ? last : t1 + CHUNK);
        }
#ifdef HAVE_AVX2
        if (fast) {
            chunk_floats(krows, n_all, D, kind, kbuf, kscale, kf);
            chunk_floats(vrows, n_all, D, kind, vbuf, vscale, vf);
        }
#endif
        for (int r = 0; r < R; r++) {
            if (ends[r] <= t0) continue;
            const int n = (int)(ends[r] - t0 < CHUNK ? ends[r] - t0 : CHUNK);
            const float *qr = q + r * ldq;
            float(*sr)[CHUNK] = s + r * G, (*ar)[MAX_D] = acc + r * G;
            float *mr = m + r * G, *lr = l + r * G;
#ifdef HAVE_AVX2
            if (fast) {
                scores_avx2(qr, kf, kscale, n, G, D, scale, sr);
                softmax_chunk_avx2(sr, n, G, D, mr, lr, ar);
                accumulate_avx2(vf, vscale, n, G, D, sr, ar);
                continue;
            }
#endif
            scores_plain(qr, krows, n, G, D, kind, scale, sr);
            /* rescale the running sums to the new maxima, then turn scores into weights */
            for (int g = 0; g < G; g++) {
                float mx = mr[g];
                for (int i = 0; i < n; i++) mx = sr[g][i] > mx ? sr[g][i] : mx;
                if (mx > mr[g]) {
                    float c = expf(mr[g] - mx); /* exp(-inf) = 0 on the first chunk */
                    lr[g] *= c;
                    for (int d = 0; d < D; d++) ar[g][d] *= c;
                    mr[g] = mx;
                }
                for (int i = 0; i < n; i++) sr[g][i] -= mx;
                exp_inplace_plain(sr[g], n);
                for (int i = 0; i < n; i++) lr[g] += sr[g][i];
            }
            accumulate_plain(vrows, n, G, D, kind, sr, ar);
        }
    }
    for (int r = 0; r < R; r++) {
        for (int g = 0; g < G; g++) {
            const int j = r * G + g;
            float inv = 1.f / l[j];
            for (int d = 0; d < D; d++) outs[r][g * D + d] = acc[j][d] * inv;
            if (lses[r]) lses[r][g] = m[j] + logf(l[j]);
        }
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

static inline int64_t begin_of(const PagedKV *kv, int64_t b) {
    return kv->begins ? kv->begins[b] : 0;
}

/* Partitions of row b: over the tokens it reads, [begin, len). */
static inline int64_t row_parts(const PagedKV *kv, int64_t b) {
    return parts_of(kv->lens[b] - begin_of(kv, b));
}

int64_t paged_attention_scratch_floats(const PagedKV *kv, int64_t B, int64_t Hkv, int64_t G,
                                       int64_t D) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; b++) n += row_parts(kv, b) > 1 ? row_parts(kv, b) : 0;
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

/* Up to this many consecutive rows of one sequence (a prompt chunk, a verify) share a tile. */
#define ROW_TILE 8

/* Whether row e continues row e - 1's tile: the next position of the same sequence (same table,
   one more token, the same first token) with the same partitions as the tile's first row b. */
static int continues(const PagedKV *kv, int64_t b, int64_t e) {
    const int64_t len = kv->lens[e];
    if (len != kv->lens[e - 1] + 1 || begin_of(kv, e) != begin_of(kv, b) ||
        row_parts(kv, e) != row_parts(kv, b))
        return 0;
    const int64_t nblk = (len + kv->block_size - 1) / kv->block_size;
    return !memcmp(kv->tables + b * kv->max_blocks, kv->tables + e * kv->max_blocks,
                   (size_t)nblk * sizeof(int64_t));
}

void paged_attention_part(const float *q, int64_t ldq, const PagedKV *kv, int64_t B, int64_t Hkv,
                          int64_t G, int64_t D, float scale, float *out, int64_t ldo, float *lse) {
    const int64_t row_bytes = row_bytes_of((int)kv->kind, D), slot = G * (D + 1);
    /* a cut sequence b's partials start at partition slot base[b] of kv->partials (slot p, head
       h: (p * Hkv + h) * slot floats) */
    int64_t base[B + 1];
    base[0] = 0;
    for (int64_t b = 0; b < B; b++)
        base[b + 1] = base[b] + (row_parts(kv, b) > 1 ? row_parts(kv, b) : 0);
    /* tiles: rows tile[t] .. tile[t + 1] - 1; tile t's pieces are units first[t] .. first[t + 1] - 1
       (its partitions) */
    const int64_t max_rows = MAX_G / G < ROW_TILE ? MAX_G / G : ROW_TILE;
    int64_t tile[B + 1], first[B + 1], nt = 0;
    first[0] = 0;
    for (int64_t b = 0; b < B; nt++) {
        int64_t e = b + 1;
        while (e < B && e - b < max_rows && continues(kv, b, e)) e++;
        tile[nt] = b;
        first[nt + 1] = first[nt] + row_parts(kv, b);
        b = e;
    }
    tile[nt] = B;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < first[nt] * Hkv; w++) {
        int64_t u = w / Hkv, h = w % Hkv, t = 0;
        while (first[t + 1] <= u) t++;
        const int64_t b0 = tile[t], R = tile[t + 1] - b0, part = u - first[t];
        const int64_t np = first[t + 1] - first[t], begin = begin_of(kv, b0);
        int64_t ends[ROW_TILE];
        float *outs[ROW_TILE], *lses[ROW_TILE];
        for (int64_t r = 0; r < R; r++) {
            const int64_t b = b0 + r, len = kv->lens[b];
            if (np > 1) {
                outs[r] = kv->partials + ((base[b] + part) * Hkv + h) * slot;
                lses[r] = outs[r] + G * D;
                const int64_t stop = begin + (part + 1) * PARTITION;
                ends[r] = stop < len ? stop : len;
            } else {
                outs[r] = out + b * ldo + h * G * D;
                lses[r] = lse ? lse + (b * Hkv + h) * G : NULL;
                ends[r] = len;
            }
        }
        tile_heads(q + b0 * ldq + h * G * D, ldq, (int)R, kv->k + h * kv->slots * row_bytes,
                   kv->v + h * kv->slots * row_bytes, kv->tables + b0 * kv->max_blocks,
                   begin + part * PARTITION, ends, (int)kv->block_size, (int)G, (int)D, (int)kv->kind,
                   scale, outs, lses);
    }
    if (base[B] == 0) return; /* no sequence was cut */
#pragma omp for
    for (int64_t w = 0; w < B * Hkv; w++) {
        int64_t b = w / Hkv, h = w % Hkv, np = row_parts(kv, b);
        if (np > 1)
            merge_parts(kv->partials + (base[b] * Hkv + h) * slot, np, Hkv, G, D,
                        out + b * ldo + h * G * D, lse ? lse + w * G : NULL);
    }
}

int paged_attention_supports(int64_t G, int64_t D) { return G <= MAX_G && D <= MAX_D; }

/* Returns 0, or -1 when G or D exceed what the kernel's stack buffers hold (or no memory). */
int paged_decode_attention(const float *q, const char *k_cache, const char *v_cache,
                           const int64_t *tables, const int64_t *lens, const int64_t *begins,
                           float *out, float *lse, int64_t B, int64_t Hkv, int64_t G, int64_t D,
                           int64_t slots, int64_t max_blocks, int64_t block_size, int64_t kind,
                           float scale, int64_t num_threads) {
    if (!paged_attention_supports(G, D)) return -1;
    PagedKV kv = {k_cache, v_cache, slots,      kind, block_size,
                  tables,  lens,    max_blocks, NULL, begins};
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
