/* The pieces the kernels share, and that the fused decode step (decode_step.c) composes.

   A function named *_part is called by every thread of an enclosing `omp parallel` region: it
   splits its loop with an orphaned `omp for`, which ends in a barrier, so the next part sees all
   of its output. Called outside a parallel region, one thread does all of it. The exported
   kernels are each one parallel region around their parts; the decode step is one region around
   a whole model's.
*/
#ifndef SLIMSERVE_KERNELS_H
#define SLIMSERVE_KERNELS_H

#include <stdint.h>

#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

#define QB 32   /* the matmuls round activations to int8 per block of this many inputs */
#define TILE 64 /* ... and take output rows in tiles of this many */

/* Full unrolling lets the compiler keep per-row sums in registers instead of on the stack, where
   every add waited on a store (1.1x with AVX2, 1.4x with VNNI in the int4 matmul). */
#define UNROLL(n) _Pragma(UNROLL_STR(GCC unroll n))
#define UNROLL_STR(x) #x

/* VNNI: four byte products (unsigned a, signed b) added to each 32-bit lane in one instruction. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#endif

/* 512-bit VNNI tiles (int4_matmul.c, int8_matmul.c): 16 output rows x 4 inputs per register, and
   `vpermt2b` (AVX-512 VBMI) to gather a tile's nibbles into that order in one instruction. The
   library is compiled for the CPU it runs on (-march=native, build.py), so which path runs follows
   the CPU's features; -DNO_ZMM builds the 256-bit paths on such a CPU (tests, A/B benchmarks).
   Both paths give the same bits: integer sums are exact and the float steps per output match. */
#if defined(DPBUSD) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && \
    defined(__AVX512BW__) && !defined(NO_ZMM)
#define HAVE_ZMM 1
#endif

/* Cache row formats (layers/attention.py): D float32, D int8 codes + float32 scale, D bfloat16. */
enum { F32 = 0, I8 = 1, BF16 = 2 };

/* A weight in PyTorch's packed int4 layout (int4_matmul.c describes it); bias may be NULL. */
typedef struct {
    const uint8_t *packed;
    const uint16_t *sz;
    const float *bias;
    int64_t K, doubled, n_pad, group, n_out, eight_bit;
} Int4Weight;

/* Activation rows rounded to int8 per block of 32, as the int4 matmul reads them: buffers for
   M rows of int4_inputs(w) codes, and a scale and a code sum per block. */
typedef struct {
    int8_t *q;
    float *d;
    int32_t *s;
} QuantRows;

/* 0 when the int4 matmul takes w, else -1 (no AVX2, or K not in blocks of 32). */
int int4_supported(const Int4Weight *w);
/* Inputs per activation row the matmul multiplies: K' = 2K for doubled 4-bit halves, K for
   8-bit weights read as one byte per weight (VNNI), K otherwise. */
int64_t int4_inputs(const Int4Weight *w);
void int4_quantize_part(const Int4Weight *w, const float *x, int64_t ldx, int64_t M,
                        const QuantRows *a);
void int4_tiles_part(const Int4Weight *w, int64_t M, const QuantRows *a, float *y, int64_t ldy);

void add_rms_norm_part(const float *x, const float *residual, const float *weight, float *h_out,
                       float *y_out, int64_t T, int64_t H, float eps);

/* In place over `heads` heads of D (contiguous) at the start of each of T rows ldx apart. */
void rope_part(float *x, int64_t ldx, int64_t T, int64_t heads, int64_t D, const float *cos,
               const float *sin, const int64_t *positions);
/* y (T, I) = silu(x[:, :I]) * x[:, I:], x rows ldx apart. */
void silu_mul_part(const float *x, int64_t ldx, int64_t T, int64_t I, float *y);

void write_kv_part(const float *k, const float *v, int64_t k_stride, int64_t v_stride,
                   char *k_cache, char *v_cache, const int64_t *slot_mapping, int64_t T,
                   int64_t Hkv, int64_t D, int64_t slots, int64_t kind);

/* One layer's paged cache, where a decode batch's tokens sit in it, and scratch for the partial
   results of long sequences (paged_attention_scratch_floats of them; NULL when that is 0).
   Row b attends to tokens [begins[b], lens[b]) (begins NULL: from 0; a sliding window). */
typedef struct {
    const char *k, *v;
    int64_t slots, kind, block_size;
    const int64_t *tables, *lens;
    int64_t max_blocks;
    float *partials;
    const int64_t *begins;
} PagedKV;

/* Whether the decode attention's stack buffers hold G query heads per KV head of D. */
int paged_attention_supports(int64_t G, int64_t D);
int64_t paged_attention_scratch_floats(const PagedKV *kv, int64_t B, int64_t Hkv, int64_t G,
                                       int64_t D);
/* q rows (B, Hkv, G, D) ldq apart -> out rows ldo apart; lse (B, Hkv, G) or NULL. */
void paged_attention_part(const float *q, int64_t ldq, const PagedKV *kv, int64_t B, int64_t Hkv,
                          int64_t G, int64_t D, float scale, float *out, int64_t ldo, float *lse);

#ifdef HAVE_AVX2
/* e^x for x <= 0: 2^k e^r with a degree-7 polynomial for e^r (relative error ~1e-8 before
   rounding); inputs below -87 give ~1e-38 instead of 0. */
static inline __m256 exp8_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 y = _mm256_set1_ps(1.f / 5040);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 720));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 120));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 24));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 6));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
    __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* One block of 32 float inputs -> 32 int8 codes with scale d (x ~ d q); returns sum of codes. */
static inline int32_t quantize_block(const float *x, int8_t *q, float *d_out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h), d = amax / 127.f;
    __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i c[4];
    for (int i = 0; i < 4; i++) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    /* packs work within 128-bit lanes; the permute puts the 32 codes back in input order */
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, b);
    *d_out = d;
    return _mm_cvtsi128_si32(s4);
}

#ifdef HAVE_ZMM
#define ZR 4 /* rows a step of zrows: four independent chains of `vpdpbusd` */

/* At most this many groups of 16 outputs a step of zrows (NG): each broadcast activation word
   then feeds NG products, so a pair of groups loads the activations, d and c once instead of
   twice. */
#define ZGROUPS 2

/* R rows' sums over one block of 32 inputs for NG 16-output groups (W[h]: 8 registers of 4
   inputs; group h's sums GS floats on from the previous group's), scaled into
   their accumulators (rows TILE floats apart): acc += sc d (S - o c) + z d c, with o = 128 for
   one-byte weights u = q + 128 (EIGHT, and z unused) and 8 for 4-bit codes. The float steps per
   output are those of the 256-bit paths, so both give the same bits. pf (or NULL): pfl lines
   from pf on are fetched (`hint`) at each of the 8 steps, so a stream's fetch-ahead is spread
   over the products instead of issued in one burst (1.05-1.06x on the 8-bit head's tiles at
   8-16 rows, Zen 4). */
static inline __attribute__((always_inline)) void zrows(
    const __m512i W[][8], const __m512 *sc, const __m512 *z, const int NG, const int GS,
    const int8_t *xq, int64_t Kx, const float *xd, const int32_t *xs, int64_t nb, const int R,
    const int EIGHT, float *acc, const char *pf, const int pfl, const int hint) {
    /* ZR / R chains a row and group (integer sums: their order does not change the bits) */
    const int P = ZR / R;
    __m512i s[ZGROUPS][ZR];
    /* a row's first chain starts at -o c, so that it ends at S - o c (integers: exact) */
    UNROLL(4) for (int i = 0; i < ZR; i++) {
        const __m512i init =
            i % P ? _mm512_setzero_si512() : _mm512_set1_epi32(-(EIGHT ? 128 : 8) * xs[i / P * nb]);
        UNROLL(2) for (int h = 0; h < NG; h++) s[h][i] = init;
    }
    UNROLL(8) for (int qd = 0; qd < 8; qd++) {
        if (pf) /* the stream's next lines, spread over the products (`hint`: _MM_HINT_*) */
            UNROLL(2) for (int l = 0; l < pfl; l++) _mm_prefetch(pf + 64 * (pfl * qd + l), hint);
        UNROLL(4) for (int m = 0; m < R; m++) {
            int32_t xx;
            memcpy(&xx, xq + m * Kx + 4 * qd, 4);
            const __m512i X = _mm512_set1_epi32(xx);
            UNROLL(2) for (int h = 0; h < NG; h++)
                s[h][m * P + qd % P] = _mm512_dpbusd_epi32(s[h][m * P + qd % P], W[h][qd], X);
        }
    }
    UNROLL(2) for (int h = 0; h < NG; h++)
        UNROLL(4) for (int m = 0; m < R; m++) {
            s[h][m] = s[h][m * P];
            UNROLL(4) for (int i = 1; i < P; i++) s[h][m] = _mm512_add_epi32(s[h][m], s[h][m * P + i]);
        }
    UNROLL(4) for (int m = 0; m < R; m++) {
        const float d = xd[m * nb];
        const int32_t c = xs[m * nb];
        const __m512 vd = _mm512_set1_ps(d), vdc = _mm512_set1_ps(d * (float)c);
        UNROLL(2) for (int h = 0; h < NG; h++) {
            float *am = acc + m * TILE + GS * h;
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s[h][m]), vd);
            __m512 a = _mm512_load_ps(am);
            if (!EIGHT) a = _mm512_fmadd_ps(z[h], vdc, a);
            _mm512_store_ps(am, _mm512_fmadd_ps(sc[h], f, a));
        }
    }
}

/* Every row of a pass (mr rows, their sums TILE floats apart at acc) over one block of NG
   groups: ZR rows a step, then the rest one at a time. */
static inline __attribute__((always_inline)) void zpass(
    const __m512i W[][8], const __m512 *sc, const __m512 *z, const int NG, const int GS,
    const int8_t *xq, int64_t Kx, const float *xd, const int32_t *xs, int64_t nb, int64_t mr,
    const int EIGHT, float *acc, const char *pf, const int pfl, const int hint) {
    int64_t m = 0;
    for (; m + ZR <= mr; m += ZR)
        zrows(W, sc, z, NG, GS, xq + m * Kx, Kx, xd + m * nb, xs + m * nb, nb, ZR, EIGHT,
              acc + m * TILE, m ? NULL : pf, pfl, hint);
    for (; m < mr; m++)
        zrows(W, sc, z, NG, GS, xq + m * Kx, Kx, xd + m * nb, xs + m * nb, nb, 1, EIGHT,
              acc + m * TILE, m ? NULL : pf, pfl, hint);
}

/* A pass's sums (mr rows of TILE at acc, + bias) to rows m0 .. of y at columns n0 ..,
   skipping columns past n_out (the padding). */
static inline void zstore(const float *acc, int64_t mr, float *y, int64_t ldy, int64_t n0,
                          int64_t n_out, const float *bias) {
    const int64_t n = n_out - n0 < TILE ? n_out - n0 : TILE;
    for (int64_t m = 0; m < mr; m++)
        for (int64_t i = 0; i < n; i++)
            y[m * ldy + n0 + i] = acc[m * TILE + i] + (bias ? bias[n0 + i] : 0.f);
}
#endif

/* A tile's 64 sums (+ bias) to y[n0 ..], skipping rows past n_out (the padding). */
static inline void store_rows(const __m256 acc[8], float *y, int64_t n0, int64_t n_out,
                              const float *bias) {
    float tmp[TILE];
    UNROLL(8) for (int i = 0; i < 8; i++) _mm256_storeu_ps(tmp + 8 * i, acc[i]);
    int64_t n = n_out - n0 < TILE ? n_out - n0 : TILE;
    for (int64_t j = 0; j < n; j++) y[n0 + j] = tmp[j] + (bias ? bias[n0 + j] : 0.f);
}
#endif

#endif
