/* y = x W^T with 8-bit W (Q8_0 blocks, `--quantization int8`) held one byte per weight.

   Layouts:
     codes   (N / 64, K / 4, 64, 4) bytes: in tile t, the 4 bytes at [k / 4][j] are output row
             64t + j's weights at inputs k .. k + 3, each stored as u = q + 128
     scales  (K / 32, N) float16: the scale d of each row's block of 32 inputs; w = q d
     x, y, bias as in int4_matmul.c
   One 32-byte load is then 8 rows x 4 inputs, the operand order VNNI's `vpdpbusd` multiplies in:
   no unpacking and no shuffles. Without VNNI, the signed codes q = u ^ 0x80 go through
   `vpmaddubsw` with the sign trick (|x| times q carrying x's sign, so pairs of products stay
   under 2^15) and `vpmaddwd`. The same weights in the 4-bit layout cost two nibble halves, 1.25
   bytes a weight against 1.06 here, and twice the multiply-adds.
   Activations are rounded to int8 per block of 32 as in int4_matmul.c. Codes must lie in
   [-127, 127] (the sign trick cannot negate -128): quant/int4.py keeps a weight holding -128 in
   the 4-bit layout.
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(HAVE_AVX2) && defined(__F16C__)

int int8_built(void) { return 1; }

#ifndef PREFETCH8
#define PREFETCH8 1024
#endif
/* Rows of x per pass over a tile: with 32 vector registers (AVX-512VL) two rows' eight sums
   each fit beside the operands; with 16, one. */
#ifndef ROWS8
#ifdef __AVX512VL__
#define ROWS8 2
#else
#define ROWS8 1
#endif
#endif

#ifdef DPBUSD
#define U_OFFSET 128 /* the dot products hold sum (q + 128) xq */
static inline __m256i dot_bytes(__m256i acc, __m256i u, __m256i x) { return DPBUSD(acc, u, x); }
#else
#define U_OFFSET 0
static inline __m256i dot_bytes(__m256i acc, __m256i u, __m256i x) {
    __m256i q = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80));
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(q, x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#endif

/* `fetch`: prefetch the codes ahead (the first pass over a tile: later ones find them cached). */
static inline __attribute__((always_inline)) void tile_rows8(
    const uint8_t *wt, const uint16_t *sc_t, int64_t n_pad, int64_t K, const int8_t *xq,
    const float *xd, const int32_t *xs, const int MR, int fetch, __m256 acc[][8]) {
    const int64_t nb = K / QB;
    UNROLL(2) for (int m = 0; m < MR; m++)
        UNROLL(8) for (int i = 0; i < 8; i++) acc[m][i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
        __m256i s[MR][8];
        UNROLL(2) for (int m = 0; m < MR; m++)
            UNROLL(8) for (int i = 0; i < 8; i++) s[m][i] = _mm256_setzero_si256();
        UNROLL(8) for (int qd = 0; qd < QB / 4; qd++) {
            const uint8_t *w = wt + (j * (QB / 4) + qd) * (TILE * 4);
            if (PREFETCH8 && fetch)
                UNROLL(4) for (int l = 0; l < 4; l++)
                    _mm_prefetch((const char *)(w + PREFETCH8 + 64 * l), _MM_HINT_T0);
            __m256i X[MR];
            UNROLL(2) for (int m = 0; m < MR; m++) {
                int32_t xx;
                memcpy(&xx, xq + m * K + j * QB + 4 * qd, 4);
                X[m] = _mm256_set1_epi32(xx);
            }
            UNROLL(8) for (int v = 0; v < 8; v++) {
                __m256i p = _mm256_loadu_si256((const __m256i *)(w + 32 * v));
                UNROLL(2) for (int m = 0; m < MR; m++) s[m][v] = dot_bytes(s[m][v], p, X[m]);
            }
        }
        __m256 sc[8];
        UNROLL(8) for (int i = 0; i < 8; i++)
            sc[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc_t + j * n_pad + 8 * i)));
        UNROLL(2) for (int m = 0; m < MR; m++) {
            __m256i off = _mm256_set1_epi32(U_OFFSET * xs[m * nb + j]);
            __m256 vd = _mm256_set1_ps(xd[m * nb + j]);
            UNROLL(8) for (int i = 0; i < 8; i++) {
                __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s[m][i], off)), vd);
                acc[m][i] = _mm256_fmadd_ps(sc[i], f, acc[m][i]);
            }
        }
    }
}

#ifdef HAVE_ZMM
/* The 512-bit path: a quad's 256 bytes are four registers of 16 rows x 4 inputs as they lie, so a
   block of one 16-row group is 8 loads, multiplied by every activation row of a pass (zrows in
   kernels.h, as the int4 kernel's 512-bit path). */
#ifndef ZROWS8
#define ZROWS8 64
#endif
#ifndef ZFETCH8
#define ZFETCH8 PREFETCH8 /* bytes ahead the tiles' first pass fetches the codes */
#endif
#ifndef ZHINT8 /* and into which cache (int4_matmul.c's ZHINT) */
#define ZHINT8 _MM_HINT_T0
#endif
#ifndef ZMIN8
#define ZMIN8 8 /* below it the 256-bit path, which streams the head faster (build.py: AMD 6) */
#endif
static void tiles8_zmm(const uint8_t *codes, const uint16_t *scales, int64_t n_pad, int64_t K,
                       int64_t M, const int8_t *xq, const float *xd, const int32_t *xs,
                       const float *bias, float *y, int64_t ldy, int64_t n_out) {
    const int64_t nb = K / QB, passes = (M + ZROWS8 - 1) / ZROWS8, items = n_pad / TILE * passes;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
        const int64_t t = it / passes, m0 = it % passes * ZROWS8;
        const int64_t mr = M - m0 < ZROWS8 ? M - m0 : ZROWS8;
        const uint8_t *wt = codes + t * K * TILE;
        float acc[ZROWS8 * TILE] __attribute__((aligned(64)));
        memset(acc, 0, sizeof(float) * (size_t)(mr * TILE));
        for (int64_t j = 0; j < nb; j++) {
            const int8_t *q = xq + m0 * K + j * QB;
            const float *d = xd + m0 * nb + j;
            const int32_t *c = xs + m0 * nb + j;
            for (int g0 = 0; g0 < 4; g0 += ZGROUPS) {
                __m512i W[ZGROUPS][8];
                __m512 sc[ZGROUPS], z[ZGROUPS];
                UNROLL(2) for (int h = 0; h < ZGROUPS; h++) {
                    const int g = g0 + h;
                    UNROLL(8) for (int qd = 0; qd < 8; qd++)
                        W[h][qd] = _mm512_loadu_si512(wt + (j * (QB / 4) + qd) * (TILE * 4) + 64 * g);
                    sc[h] = _mm512_cvtph_ps(_mm256_loadu_si256(
                        (const __m256i *)(scales + j * n_pad + t * TILE + 16 * g)));
                    z[h] = _mm512_setzero_ps();
                }
                /* the first pass streams the codes: a block's 2 KB fetched ahead 2 lines per
                   step of the first rows' products, spread over the block's compute */
                const char *pf = ZFETCH8 && m0 == 0
                                     ? (const char *)(wt + j * QB * TILE + ZFETCH8 + 512 * g0)
                                     : NULL;
                zpass(W, sc, z, ZGROUPS, 16, q, K, d, c, nb, mr, 1, acc + 16 * g0, pf, ZGROUPS, ZHINT8);
            }
        }
        zstore(acc, mr, y + m0 * ldy, ldy, t * TILE, n_out, bias);
    }
}
#endif

int int8_matmul(const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *codes,
                const uint16_t *scales, int64_t n_pad, const float *bias, float *y, int64_t ldy,
                int64_t n_out, int64_t num_threads) {
    if (M < 1 || K % QB || n_pad % TILE) return -1;
    const int64_t nb = K / QB;
    int8_t *xq = malloc((size_t)(M * K));
    float *xd = malloc(sizeof(float) * (size_t)(M * nb));
    int32_t *xs = malloc(sizeof(int32_t) * (size_t)(M * nb));
    if (!xq || !xd || !xs) {
        free(xq), free(xd), free(xs);
        return -1;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for
        for (int64_t i = 0; i < M * nb; i++)
            xs[i] = quantize_block(x + (i / nb) * ldx + (i % nb) * QB, xq + i * QB, xd + i);
#ifdef HAVE_ZMM
        if (M >= ZMIN8) {
            tiles8_zmm(codes, scales, n_pad, K, M, xq, xd, xs, bias, y, ldy, n_out);
        } else
#endif
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_pad / TILE; t++) {
            const uint8_t *wt = codes + t * K * TILE;
            const uint16_t *sc_t = scales + t * TILE;
            for (int64_t m0 = 0; m0 < M;) {
                __m256 acc[ROWS8][8];
                int64_t mr = M - m0 >= ROWS8 ? ROWS8 : 1; /* the rest one at a time */
                if (mr == ROWS8)
                    tile_rows8(wt, sc_t, n_pad, K, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, ROWS8,
                               m0 == 0, acc);
                else
                    tile_rows8(wt, sc_t, n_pad, K, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, 1,
                               m0 == 0, acc);
                for (int64_t m = 0; m < mr; m++)
                    store_rows(acc[m], y + (m0 + m) * ldy, t * TILE, n_out, bias);
                m0 += mr;
            }
        }
    }
    free(xq), free(xd), free(xs);
    return 0;
}

/* Dequantized rows ids (T,) of the weight, out (T, K) float32: q d, a tied embedding's lookup. */
int int8_rows(const uint8_t *codes, const uint16_t *scales, int64_t n_pad, int64_t K,
              const int64_t *ids, int64_t T, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t n = ids[t];
        const uint8_t *row = codes + (n / TILE) * K * TILE + (n % TILE) * 4;
        for (int64_t k = 0; k < K; k++) {
            float d = _cvtsh_ss(scales[(k / QB) * n_pad + n]);
            out[t * K + k] = (float)((int)row[(k / 4) * TILE * 4 + k % 4] - 128) * d;
        }
    }
    return 0;
}

#else
int int8_built(void) { return 0; }
int int8_matmul(const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *codes,
                const uint16_t *scales, int64_t n_pad, const float *bias, float *y, int64_t ldy,
                int64_t n_out, int64_t num_threads) {
    return -1; /* no AVX2 + F16C: quant/int4.py keeps such weights in the 4-bit layout */
}
int int8_rows(const uint8_t *codes, const uint16_t *scales, int64_t n_pad, int64_t K,
              const int64_t *ids, int64_t T, float *out) {
    return -1;
}
#endif
