/* y = x W^T with W in PyTorch's packed CPU int4 layout, read in place.

   PyTorch's `_weight_int4pack_mm_for_cpu` expands every code to float and multiplies in float.
   This kernel rounds the activation rows to int8 (symmetric, per block of 32 inputs, as
   llama.cpp's Q8 activations) and multiplies 4-bit codes by 8-bit activations with integer
   instructions: `vpmaddubsw` (32 multiply-adds, then 16-bit sums widened every 16 inputs) with
   AVX2, or `vpdpbusd` (32 multiply-adds into 32-bit sums) where the CPU has VNNI. A batch-1
   matrix-vector product then has arithmetic to spare while the weight bytes stream in, and
   batches of 8 and more run at 1.2-1.4x (AVX2) and 1.6-1.9x (VNNI) PyTorch's kernel
   (docs/benchmarks.md).
   Each output row's arithmetic does not depend on the other rows of x, so a sequence's result is
   the same whatever it is batched with.

   Layouts (PyTorch's, see quant/int4.py):
     packed  (N / 64, K', 32) bytes: in tile t, byte [k][j] holds the code of output row 64t + j
             at input k in its low nibble and that of row 64t + 32 + j in its high nibble
     sz      (K' / group, N, 2) bfloat16: per group of `group` inputs, each row's (scale, zero);
             the weight is (code - 8) * scale + zero
     x       (M, K) float32, rows `ldx` apart. When `doubled`, K' = 2K and the codes multiply
             (x, x): an 8-bit weight stored as two 4-bit halves (quant/int4.py)
     y       (M, n_out) float32, rows `ldy` apart; rows of W past n_out (padding) are skipped
     bias    (n_out,) float32 or NULL
   `eight_bit` says a doubled W is pure 8-bit (every row's hi half has scale 16 d and zero 0, its
   lo half scale d and zero 8 d: quant/int4.py `int8_as_int4`), which the VNNI path then reads
   as one byte per weight.

   Sum over one group: sum_k ((q_k - 8) s + z) x_k = s (sum_k q_k x_k - 8 sum_k x_k) + z sum_k x_k,
   so per block of 32 inputs only the integer dot sum_k q_k xq_k and sum_k xq_k are needed.
   Returns 0, or -1 when the shape is outside what the kernel takes (the caller falls back).
*/
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#ifdef HAVE_AVX2

/* Tuning knobs (-D to try others): how far ahead to prefetch weight bytes (0: not at all), and
   (scale, zero) rows, a strided stream, in blocks; how many activation rows share one pass over a
   tile's codes. The codes are one sequential stream per thread, which the hardware prefetcher
   follows: inside the fused decode step, no longer prefetching them 1 KB ahead made decode 1.39x
   faster at batch 1 (1.16x at 8, 1.06x at 32, prefill even). The scales' strided stream still
   gains from its prefetch (1.2x at batch 1). */
#ifndef PREFETCH
#define PREFETCH 0
#endif
#ifndef SZ_AHEAD
#define SZ_AHEAD 2
#endif
#ifndef ROWS_PER_PASS
#define ROWS_PER_PASS 4
#endif

/* Codes of 64 output rows at inputs k and k + 1, as four vectors of 16 rows holding the byte pair
   (q_k, q_k+1) per row: rows 0-7 and 16-23, 8-15 and 24-31, 32-39 and 48-55, 40-47 and 56-63. */
static inline void unpack_pair(const uint8_t *w, __m256i p[4]) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    __m256i a = _mm256_loadu_si256((const __m256i *)w);
    __m256i b = _mm256_loadu_si256((const __m256i *)(w + 32));
    __m256i la = _mm256_and_si256(a, lo4), lb = _mm256_and_si256(b, lo4);
    __m256i ha = _mm256_and_si256(_mm256_srli_epi16(a, 4), lo4);
    __m256i hb = _mm256_and_si256(_mm256_srli_epi16(b, 4), lo4);
    p[0] = _mm256_unpacklo_epi8(la, lb);
    p[1] = _mm256_unpackhi_epi8(la, lb);
    p[2] = _mm256_unpacklo_epi8(ha, hb);
    p[3] = _mm256_unpackhi_epi8(ha, hb);
}

/* Adds the 16-bit per-row sums of four unpacked vectors to 32-bit sums of rows 8i..8i+7. */
static inline void widen(const __m256i a[4], __m256i s[8]) {
    UNROLL(4) for (int v = 0; v < 4; v++) {
        int r = (v & 1) + 4 * (v >> 1); /* 8-row group of the vector's low lane; +2 for high */
        s[r] = _mm256_add_epi32(s[r], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a[v])));
        s[r + 2] =
            _mm256_add_epi32(s[r + 2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a[v], 1)));
    }
}

/* A block's (scale, zero) of 64 rows, from bf16 pairs: shared by every activation row. */
static inline void load_scales(const uint16_t *szp, __m256 sc[8], __m256 z[8]) {
    const __m256i hi16 = _mm256_set1_epi32((int)0xffff0000u);
    UNROLL(8) for (int i = 0; i < 8; i++) {
        __m256i pr = _mm256_loadu_si256((const __m256i *)(szp + 16 * i));
        sc[i] = _mm256_castsi256_ps(_mm256_slli_epi32(pr, 16));
        z[i] = _mm256_castsi256_ps(_mm256_and_si256(pr, hi16));
    }
}

/* acc (64 rows) += sc d (S - 8 c) + z d c: one activation row's block sums, scaled. */
static inline void scale_block(const __m256i s[8], const __m256 sc[8], const __m256 z[8],
                               float d, int32_t c, __m256 acc[8]) {
    __m256i c8 = _mm256_set1_epi32(8 * c);
    __m256 vd = _mm256_set1_ps(d), vdc = _mm256_set1_ps(d * (float)c);
    UNROLL(8) for (int i = 0; i < 8; i++) {
        __m256 sf = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s[i], c8)), vd);
        acc[i] = _mm256_fmadd_ps(sc[i], sf, _mm256_fmadd_ps(z[i], vdc, acc[i]));
    }
}

/* Rows m0 .. m0 + MR - 1 of x against one tile of 64 output rows, over all of K'. MR is a
   compile-time constant at each call, so the 16-bit sums of each row stay in registers. */
static inline __attribute__((always_inline)) void tile_rows(
    const uint8_t *wt, const uint16_t *sz_t, int64_t n_pad, int64_t group, int64_t Kp,
    const int8_t *xq, const float *xd, const int32_t *xs, const int MR, __m256 acc[][8]) {
    int64_t nb = Kp / QB;
    UNROLL(4) for (int m = 0; m < MR; m++)
        UNROLL(8) for (int i = 0; i < 8; i++) acc[m][i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
        if (SZ_AHEAD && j + SZ_AHEAD < nb) { /* the scales are a strided stream: fetch ahead */
            const char *next = (const char *)(sz_t + ((j + SZ_AHEAD) * QB / group) * n_pad * 2);
            for (int l = 0; l < 4; l++) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
        }
        __m256i s[MR][8];
        UNROLL(4) for (int m = 0; m < MR; m++)
            UNROLL(8) for (int i = 0; i < 8; i++) s[m][i] = _mm256_setzero_si256();
        /* int16 sums of 8 pairs stay below 8 * 2 * 15 * 127 = 30480: widen twice a block */
        UNROLL(2) for (int half = 0; half < 2; half++) {
            __m256i a[MR][4];
            UNROLL(4) for (int m = 0; m < MR; m++)
                UNROLL(4) for (int v = 0; v < 4; v++) a[m][v] = _mm256_setzero_si256();
            UNROLL(8) for (int pr = 0; pr < 8; pr++) {
                int64_t k = j * QB + half * 16 + 2 * pr;
                __m256i p[4];
                if (PREFETCH) _mm_prefetch((const char *)(wt + k * (TILE / 2) + PREFETCH), _MM_HINT_T0);
                unpack_pair(wt + k * (TILE / 2), p);
                UNROLL(4) for (int m = 0; m < MR; m++) {
                    int16_t xx;
                    memcpy(&xx, xq + m * Kp + k, 2);
                    __m256i X = _mm256_set1_epi16(xx);
                    UNROLL(4) for (int v = 0; v < 4; v++)
                        a[m][v] = _mm256_add_epi16(a[m][v], _mm256_maddubs_epi16(p[v], X));
                }
            }
            UNROLL(4) for (int m = 0; m < MR; m++) widen(a[m], s[m]);
        }
        __m256 sc[8], z[8];
        load_scales(sz_t + (j * QB / group) * n_pad * 2, sc, z);
        UNROLL(4) for (int m = 0; m < MR; m++) scale_block(s[m], sc, z, xd[m * nb + j], xs[m * nb + j], acc[m]);
    }
}

#ifdef DPBUSD
/* With VNNI one instruction adds four byte products to each 32-bit lane: no 16-bit sums to widen.
   Codes of 64 rows at inputs k .. k + 3, as eight vectors of 8 rows holding 4 bytes per row:
   rows 0-3 and 16-19, 4-7 and 20-23, 8-11 and 24-27, 12-15 and 28-31, then the same + 32. */
static inline void interleave4(const __m256i r[4], __m256i p[4]) {
    /* 32 rows' bytes at inputs k .. k + 3 (one vector per input) -> 4 bytes per row */
    __m256i ab_lo = _mm256_unpacklo_epi8(r[0], r[1]), ab_hi = _mm256_unpackhi_epi8(r[0], r[1]);
    __m256i cd_lo = _mm256_unpacklo_epi8(r[2], r[3]), cd_hi = _mm256_unpackhi_epi8(r[2], r[3]);
    p[0] = _mm256_unpacklo_epi16(ab_lo, cd_lo);
    p[1] = _mm256_unpackhi_epi16(ab_lo, cd_lo);
    p[2] = _mm256_unpacklo_epi16(ab_hi, cd_hi);
    p[3] = _mm256_unpackhi_epi16(ab_hi, cd_hi);
}

static inline void unpack_quad(const uint8_t *w, __m256i p[8]) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    for (int h = 0; h < 2; h++) { /* low nibbles (rows 0-31), then high ones (rows 32-63) */
        __m256i r[4];
        for (int i = 0; i < 4; i++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * i));
            r[i] = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, lo4);
        }
        interleave4(r, p + 4 * h);
    }
}

/* unpack_quad's row order -> rows 8i .. 8i + 7 in s[i]. */
static inline void rows_in_order(const __m256i u[8], __m256i s[8]) {
    for (int h = 0; h < 2; h++) {
        const __m256i *v = u + 4 * h;
        s[4 * h + 0] = _mm256_permute2x128_si256(v[0], v[1], 0x20);
        s[4 * h + 2] = _mm256_permute2x128_si256(v[0], v[1], 0x31);
        s[4 * h + 1] = _mm256_permute2x128_si256(v[2], v[3], 0x20);
        s[4 * h + 3] = _mm256_permute2x128_si256(v[2], v[3], 0x31);
    }
}

/* 8-bit weights held as two 4-bit halves (quant/int4.py: q = 16 (hi - 8) + lo, hi at input k and
   lo at K + k) are one byte again as u = 16 hi + lo = q + 128: the unsigned operand VNNI takes.
   Same output order as unpack_quad, from the hi codes at `whi` and the lo codes at `wlo`. */
static inline void unpack_quad8(const uint8_t *whi, const uint8_t *wlo, __m256i p[8]) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f), hi4 = _mm256_set1_epi8((char)0xf0);
    for (int h = 0; h < 2; h++) {
        __m256i r[4];
        for (int i = 0; i < 4; i++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(whi + 32 * i));
            __m256i b = _mm256_loadu_si256((const __m256i *)(wlo + 32 * i));
            r[i] = h ? _mm256_or_si256(_mm256_and_si256(a, hi4),
                                       _mm256_and_si256(_mm256_srli_epi16(b, 4), lo4))
                     : _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(a, 4), hi4),
                                       _mm256_and_si256(b, lo4));
        }
        interleave4(r, p + 4 * h);
    }
}

/* acc += d_w d (U - 128 c): U = sum u xq, with d_w the lo half's scale (its zero is 8 d_w). */
static inline void scale_block8(const __m256i s[8], const __m256 sc[8], float d, int32_t c,
                                __m256 acc[8]) {
    __m256i c128 = _mm256_set1_epi32(128 * c);
    __m256 vd = _mm256_set1_ps(d);
    for (int i = 0; i < 8; i++) {
        __m256 sf = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s[i], c128)), vd);
        acc[i] = _mm256_fmadd_ps(sc[i], sf, acc[i]);
    }
}

/* Kx inputs per activation row: K' for 4-bit codes, K for EIGHT (8-bit weights, as one byte). */
static inline __attribute__((always_inline)) void tile_rows_vnni(
    const uint8_t *wt, const uint16_t *sz_t, int64_t n_pad, int64_t group, int64_t Kx,
    const int8_t *xq, const float *xd, const int32_t *xs, const int MR, const int EIGHT,
    __m256 acc[][8]) {
    int64_t nb = Kx / QB, g0 = EIGHT ? Kx : 0; /* the scales read: the lo half's for EIGHT */
    UNROLL(4) for (int m = 0; m < MR; m++)
        UNROLL(8) for (int i = 0; i < 8; i++) acc[m][i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
        if (SZ_AHEAD && j + SZ_AHEAD < nb) {
            const char *next =
                (const char *)(sz_t + ((g0 + (j + SZ_AHEAD) * QB) / group) * n_pad * 2);
            for (int l = 0; l < 4; l++) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
        }
        __m256i u[MR][8];
        UNROLL(4) for (int m = 0; m < MR; m++)
            UNROLL(8) for (int i = 0; i < 8; i++) u[m][i] = _mm256_setzero_si256();
        UNROLL(8) for (int qd = 0; qd < QB / 4; qd++) {
            int64_t k = j * QB + 4 * qd;
            if (PREFETCH) _mm_prefetch((const char *)(wt + k * (TILE / 2) + PREFETCH), _MM_HINT_T0);
            __m256i p[8];
            if (EIGHT)
                unpack_quad8(wt + k * (TILE / 2), wt + (Kx + k) * (TILE / 2), p);
            else
                unpack_quad(wt + k * (TILE / 2), p);
            UNROLL(4) for (int m = 0; m < MR; m++) {
                int32_t xx;
                memcpy(&xx, xq + m * Kx + k, 4);
                __m256i X = _mm256_set1_epi32(xx);
                UNROLL(8) for (int v = 0; v < 8; v++) u[m][v] = DPBUSD(u[m][v], p[v], X);
            }
        }
        __m256 sc[8], z[8];
        load_scales(sz_t + ((g0 + j * QB) / group) * n_pad * 2, sc, z);
        UNROLL(4) for (int m = 0; m < MR; m++) {
            __m256i s[8];
            rows_in_order(u[m], s);
            if (EIGHT)
                scale_block8(s, sc, xd[m * nb + j], xs[m * nb + j], acc[m]);
            else
                scale_block(s, sc, z, xd[m * nb + j], xs[m * nb + j], acc[m]);
        }
    }
}
#define HAVE_EIGHT_BIT 1
#define TILE_ROWS(wt, sz_t, n_pad, group, Kx, q, d, c, R, E, acc) \
    tile_rows_vnni(wt, sz_t, n_pad, group, Kx, q, d, c, R, E, acc)
#ifndef VNNI_ROWS_PER_PASS
#define VNNI_ROWS_PER_PASS 2
#endif
#undef ROWS_PER_PASS
#define ROWS_PER_PASS VNNI_ROWS_PER_PASS
#else
#define HAVE_EIGHT_BIT 0
#define TILE_ROWS(wt, sz_t, n_pad, group, Kx, q, d, c, R, E, acc) \
    tile_rows(wt, sz_t, n_pad, group, Kx, q, d, c, R, acc)
#endif

/* 8-bit weights (every row's halves are 16 d and (d, 8 d)) go as one byte per weight where VNNI
   is there: half the multiply-adds of the two 4-bit halves. */
static inline int reads_eight_bit(const Int4Weight *w) {
    return w->eight_bit && w->doubled && HAVE_EIGHT_BIT;
}

#ifdef HAVE_ZMM
/* The 512-bit path. One register holds 16 output rows x 4 inputs. Rows 0-15 of a tile are the
   low nibbles of its bytes 0-15, rows 16-31 those of bytes 16-31, rows 32-47 and 48-63 the high
   nibbles: one `vpermt2b` over the 128 bytes of inputs k .. k + 3 puts a 16-row group's bytes in
   VNNI order, and a mask (and a shift) leaves its codes. A block of 32 inputs of one group is
   then 8 registers, unpacked once and multiplied by every activation row of the pass, whose sums
   wait in a stack buffer between blocks. */
#ifndef ZROWS
#define ZROWS 64 /* activation rows per pass over a tile */
#endif
/* Below this many rows the 256-bit path runs: with few rows the product is bound by streaming
   the weights from memory, and there it measured faster (1.2x at 4 rows, even at 6; the 512-bit
   tiles 1.05-1.2x at 8 and 1.25-1.35x at 12, weights streamed from memory, 2 threads, Intel;
   AMD's Zen 4 takes the tiles from 3 rows: build.py's tuning_flags). */
#ifndef ZMIN
#define ZMIN 8
#endif
#ifndef ZHINT /* where that fetch lands: L1 (T0), or L2 (T1) for a longer distance */
#define ZHINT _MM_HINT_T0
#endif
#ifndef SPLIT_TAIL
#define SPLIT_TAIL 1
#endif
#ifndef ZFETCH
#define ZFETCH 2048 /* bytes ahead: the first pass over a tile streams its codes */
#endif

/* vpermt2b's index for rows 16 h .. 16 h + 15 of the low (or high) nibbles: lane r's byte i is
   input k + i of row 16 h + r, at byte 32 i + 16 h + r of the two loaded registers. */
static inline __m512i zindex(int h) {
    uint8_t b[64];
    for (int r = 0; r < 16; r++)
        for (int i = 0; i < 4; i++) b[4 * r + i] = (uint8_t)(32 * i + 16 * h + r);
    return _mm512_loadu_si512(b);
}

/* Codes of 16-row group g (0-3) at inputs k .. k + 3 from the tile's bytes at w (input k). */
static inline __m512i zcodes(const uint8_t *w, int g, __m512i idx) {
    __m512i p = _mm512_permutex2var_epi8(_mm512_loadu_si512(w), idx, _mm512_loadu_si512(w + 64));
    if (g >= 2) p = _mm512_srli_epi16(p, 4);
    return _mm512_and_si512(p, _mm512_set1_epi8(0x0f));
}

/* Codes of groups g and g + 2 (g = 0, 1) at inputs k .. k + 3: one gather, both nibbles. */
static inline void zcodes2(const uint8_t *w, __m512i idx, __m512i *lo, __m512i *hi) {
    __m512i p = _mm512_permutex2var_epi8(_mm512_loadu_si512(w), idx, _mm512_loadu_si512(w + 64));
    *lo = _mm512_and_si512(p, _mm512_set1_epi8(0x0f));
    *hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), _mm512_set1_epi8(0x0f));
}

/* 8-bit weights as one byte u = 16 hi + lo (unpack_quad8), from the hi and lo halves' bytes. */
static inline __m512i zcodes8(const uint8_t *whi, const uint8_t *wlo, int g, __m512i idx) {
    __m512i h = _mm512_permutex2var_epi8(_mm512_loadu_si512(whi), idx, _mm512_loadu_si512(whi + 64));
    __m512i l = _mm512_permutex2var_epi8(_mm512_loadu_si512(wlo), idx, _mm512_loadu_si512(wlo + 64));
    if (g < 2)
        h = _mm512_slli_epi16(h, 4);
    else
        l = _mm512_srli_epi16(l, 4);
    return _mm512_ternarylogic_epi32(_mm512_set1_epi8((char)0xf0), h, l, 0xca); /* mask ? h : l */
}

static void tiles_part_zmm(const Int4Weight *w, int64_t M, const QuantRows *a, float *y,
                           int64_t ldy, const int eight) {
    int64_t Kp = w->doubled ? 2 * w->K : w->K, Kx = int4_inputs(w), nb = Kx / QB;
    int64_t n_pad = w->n_pad, group = w->group, g0 = eight ? Kx : 0;
    /* Passes of fewer rows where the (tile, pass) items would split unevenly over the threads
       (the 9 tiles of a 576-row output at 64 rows: 5 against 4): rows are independent, so the
       split changes no bit. */
    const int64_t tiles = n_pad / TILE, nt = omp_get_num_threads();
    int64_t passes = (M + ZROWS - 1) / ZROWS;
    while ((tiles * passes) % nt && tiles * passes < 8 * nt && M / (passes + 1) >= 16) passes++;
    const int64_t per = ((M + passes - 1) / passes + ZR - 1) / ZR * ZR; /* <= ZROWS */
    passes = (M + per - 1) / per;
    /* Too few rows for shorter passes (8-31), and tiles that do not divide over the threads:
       the last tiles % nt tiles are cut by rows instead, a part for each thread. Thread c's
       items are then its whole tiles, then its part of each cut tile (static scheduling gives
       each thread `mine` consecutive items). */
    const int64_t rem = tiles % nt, whole = (tiles - rem) / nt, mine = whole + rem;
    const int cut = SPLIT_TAIL && passes == 1 && rem && M >= nt * ZR;
    const int64_t part = ((M + nt - 1) / nt + ZR - 1) / ZR * ZR; /* rows of a cut tile's part */
    const int64_t items = cut ? nt * mine : tiles * passes;
    const __m512i idx[2] = {zindex(0), zindex(1)};
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
    /* (tile, pass) items, so that a few tiles of many rows still split evenly over threads */
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
        int64_t t = it / passes, m0 = it % passes * per, mr = M - m0 < per ? M - m0 : per;
        if (cut) {
            const int64_t c = it / mine, k = it % mine;
            t = k < whole ? c * whole + k : nt * whole + (k - whole);
            m0 = k < whole ? 0 : c * part;
            mr = k < whole ? M : (M - m0 < part ? M - m0 : part);
            if (mr <= 0) continue;
        }
        const int stream = m0 == 0 || cut; /* this item's first pass streams the tile */
        const uint8_t *wt = w->packed + t * Kp * (TILE / 2);
        const uint16_t *sz_t = w->sz + t * TILE * 2;
        float acc[ZROWS * TILE] __attribute__((aligned(64)));
        memset(acc, 0, sizeof(float) * (size_t)(mr * TILE));
        for (int64_t j = 0; j < nb; j++) {
            const int8_t *q = a->q + m0 * Kx + j * QB;
            const float *d = a->d + m0 * nb + j;
            const int32_t *c = a->s + m0 * nb + j;
            const uint16_t *szj = sz_t + ((g0 + j * QB) / group) * n_pad * 2;
            if (stream) { /* the first pass streams the tile: scales and codes fetched ahead */
                if (SZ_AHEAD && j + SZ_AHEAD < nb) {
                    const char *next =
                        (const char *)(sz_t + ((g0 + (j + SZ_AHEAD) * QB) / group) * n_pad * 2);
                    for (int l = 0; l < 4; l++) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
                }
            }
            /* groups g and g + 2: the low and the high nibbles of one vpermt2b's bytes */
            for (int g = 0; g < 2; g++) {
                if (stream) /* the first pass streams the tile: half its codes' fetch per g */
                    for (int l = 8 * g; ZFETCH && l < 8 * g + 8; l++) {
                        _mm_prefetch((const char *)(wt + j * QB * (TILE / 2) + ZFETCH + 64 * l),
                                     ZHINT);
                        if (eight) /* the lo halves, K' / 2 inputs on */
                            _mm_prefetch(
                                (const char *)(wt + (Kx + j * QB) * (TILE / 2) + ZFETCH + 64 * l),
                                ZHINT);
                    }
                __m512i W[2][8];
                __m512 sc[2], z[2];
                UNROLL(8) for (int qd = 0; qd < 8; qd++) {
                    const int64_t k = j * QB + 4 * qd;
                    if (eight) {
                        W[0][qd] = zcodes8(wt + k * (TILE / 2), wt + (Kx + k) * (TILE / 2), g, idx[g]);
                        W[1][qd] = zcodes8(wt + k * (TILE / 2), wt + (Kx + k) * (TILE / 2), g + 2,
                                           idx[g]);
                    } else {
                        zcodes2(wt + k * (TILE / 2), idx[g], &W[0][qd], &W[1][qd]);
                    }
                }
                UNROLL(2) for (int h = 0; h < 2; h++) {
                    __m512i pr = _mm512_loadu_si512(szj + 32 * (g + 2 * h));
                    sc[h] = _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16));
                    z[h] = _mm512_castsi512_ps(_mm512_and_si512(pr, hi16));
                }
                if (eight) /* a constant at each call: the row sums stay in registers */
                    zpass(W, sc, z, 2, 32, q, Kx, d, c, nb, mr, 1, acc + 16 * g, NULL, 0, 0);
                else
                    zpass(W, sc, z, 2, 32, q, Kx, d, c, nb, mr, 0, acc + 16 * g, NULL, 0, 0);
            }
        }
        zstore(acc, mr, y + m0 * ldy, ldy, t * TILE, w->n_out, w->bias);
    }
}
#endif

int int4_supported(const Int4Weight *w) {
    int64_t Kp = w->doubled ? 2 * w->K : w->K;
    return w->K % QB || w->group % QB || Kp % w->group || w->n_pad % TILE ? -1 : 0;
}

int64_t int4_inputs(const Int4Weight *w) {
    return w->doubled && !reads_eight_bit(w) ? 2 * w->K : w->K;
}

void int4_quantize_part(const Int4Weight *w, const float *x, int64_t ldx, int64_t M,
                        const QuantRows *a) {
    int64_t Kx = int4_inputs(w), nb = Kx / QB;
#pragma omp for
    for (int64_t i = 0; i < M * nb; i++) {
        int64_t m = i / nb, j = i % nb;
        a->s[i] = quantize_block(x + m * ldx + (j * QB) % w->K, a->q + m * Kx + j * QB, a->d + i);
    }
}

void int4_tiles_part(const Int4Weight *w, int64_t M, const QuantRows *a, float *y, int64_t ldy) {
    const int eight = reads_eight_bit(w);
#ifdef HAVE_ZMM
    if (M >= ZMIN) { /* same bits either way */
        tiles_part_zmm(w, M, a, y, ldy, eight);
        return;
    }
#endif
    int64_t Kp = w->doubled ? 2 * w->K : w->K, Kx = int4_inputs(w), nb = Kx / QB;
    int64_t n_pad = w->n_pad, group = w->group, tiles = n_pad / TILE;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *wt = w->packed + t * Kp * (TILE / 2);
        const uint16_t *sz_t = w->sz + t * TILE * 2;
        for (int64_t m0 = 0; m0 < M;) {
            __m256 acc[ROWS_PER_PASS][8];
            int64_t mr = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
            const int8_t *q = a->q + m0 * Kx;
            const float *d = a->d + m0 * nb;
            const int32_t *c = a->s + m0 * nb;
            switch (mr * 2 + eight) {
#define CASE(R)                                                                  \
    case 2 * R: TILE_ROWS(wt, sz_t, n_pad, group, Kx, q, d, c, R, 0, acc); break; \
    case 2 * R + 1: TILE_ROWS(wt, sz_t, n_pad, group, Kx, q, d, c, R, 1, acc); break;
            CASE(1)
#if ROWS_PER_PASS >= 2
            CASE(2)
#endif
#if ROWS_PER_PASS >= 3
            CASE(3)
#endif
#if ROWS_PER_PASS >= 4
            CASE(4)
#endif
#if ROWS_PER_PASS >= 5
#error "ROWS_PER_PASS above 4: add cases"
#endif
#undef CASE
            }
            for (int64_t m = 0; m < mr; m++)
                store_rows(acc[m], y + (m0 + m) * ldy, t * TILE, w->n_out, w->bias);
            m0 += mr;
        }
    }
}

#else /* no AVX2: int4_supported says no, and the callers keep PyTorch's kernel */
int int4_supported(const Int4Weight *w) { return -1; }
int64_t int4_inputs(const Int4Weight *w) { return w->K; }
void int4_quantize_part(const Int4Weight *w, const float *x, int64_t ldx, int64_t M,
                        const QuantRows *a) {}
void int4_tiles_part(const Int4Weight *w, int64_t M, const QuantRows *a, float *y, int64_t ldy) {}
#endif

int int4_matmul(const float *x, int64_t ldx, int64_t M, int64_t K, int64_t doubled,
                const uint8_t *packed, const uint16_t *sz, int64_t n_pad, int64_t group,
                const float *bias, float *y, int64_t ldy, int64_t n_out, int64_t eight_bit,
                int64_t num_threads) {
    Int4Weight w = {packed, sz, bias, K, doubled, n_pad, group, n_out, eight_bit};
    if (M < 1 || int4_supported(&w)) return -1;
    int64_t Kx = int4_inputs(&w), nb = Kx / QB;
    QuantRows a = {malloc((size_t)(M * Kx)), malloc(sizeof(float) * (size_t)(M * nb)),
                   malloc(sizeof(int32_t) * (size_t)(M * nb))};
    int rc = a.q && a.d && a.s ? 0 : -1;
    if (!rc) {
#pragma omp parallel num_threads(num_threads)
        {
            int4_quantize_part(&w, x, ldx, M, &a);
            int4_tiles_part(&w, M, &a, y, ldy);
        }
    }
    free(a.q), free(a.d), free(a.s);
    return rc;
}

/* Dequantized output rows ids[0 .. T - 1] of a packed weight, out (T, K) float32: a tied
   embedding's lookup. Per input k' the weight is (code - 8) * scale + zero, each step rounded as
   quant/int4.py's `rows` rounds it; a doubled weight's two halves are then added (hi + lo). */
void int4_rows(const uint8_t *packed, const uint16_t *sz, int64_t n_pad, int64_t K,
               int64_t doubled, int64_t group, const int64_t *ids, int64_t T, float *out,
               int64_t num_threads) {
    const int64_t Kp = doubled ? 2 * K : K;
#pragma omp parallel for num_threads(num_threads) if (T >= 16)
    for (int64_t t = 0; t < T; t++) {
        const int64_t n = ids[t], j = n % 64, shift = j < 32 ? 0 : 4;
        const uint8_t *col = packed + (n / 64) * Kp * 32 + j % 32;
        float *o = out + t * K;
        for (int64_t k = 0; k < Kp; k++) {
            const uint16_t *pair = sz + ((k / group) * n_pad + n) * 2;
            uint32_t sb = (uint32_t)pair[0] << 16, zb = (uint32_t)pair[1] << 16;
            float s, z;
            memcpy(&s, &sb, sizeof s);
            memcpy(&z, &zb, sizeof z);
            float v = (float)((col[k * 32] >> shift) & 15) - 8.f;
            v = v * s;
            v = v + z;
            if (k < K)
                o[k] = v;
            else
                o[k - K] = o[k - K] + v;
        }
    }
}
