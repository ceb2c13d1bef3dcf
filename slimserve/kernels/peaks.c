/* This CPU's arithmetic peaks, for `slimserve bench roofline`: one instruction in independent
   chains (enough to cover its latency), on every thread. Returns the multiply-adds done, or -1
   where the build has no such instruction.

   kind 0: fp32 FMA, 256-bit    (8 multiply-adds an instruction)
        1: fp32 FMA, 512-bit    (16)
        2: int8 vpdpbusd, 256-bit (32), VNNI
        3: int8 vpdpbusd, 512-bit (64), AVX-512 VNNI
        4: bf16 vdpbf16ps, 512-bit (32), AVX-512 BF16
        5: int8 vpmaddubsw, 256-bit (32, 16-bit sums), the AVX2 path's multiply */
#include <stdint.h>

#include "kernels.h"

#define CHAINS 12

#define RUN(T, ZERO, SET, OP, MACS)                                              \
    do {                                                                         \
        T acc[CHAINS];                                                           \
        T a = SET(0x01010101 + omp_salt), b = SET(0x02020202);                   \
        for (int c = 0; c < CHAINS; c++) acc[c] = ZERO();                        \
        for (int64_t i = 0; i < iters; i++)                                      \
            UNROLL(12) for (int c = 0; c < CHAINS; c++) acc[c] = OP(acc[c], a, b); \
        T s = acc[0];                                                            \
        for (int c = 1; c < CHAINS; c++) s = OP(s, acc[c], b);                   \
        sink = s;                                                                \
        done = (MACS) * CHAINS * iters;                                          \
    } while (0)

#ifdef HAVE_AVX2
static inline __m256 fma8(__m256 c, __m256 a, __m256 b) { return _mm256_fmadd_ps(a, b, c); }
static inline __m256 set8f(int v) { return _mm256_set1_ps((float)(v & 0xff) * 1e-9f); }
static inline __m256i set8i(int v) { return _mm256_set1_epi32(v); }
static inline __m256i madd8(__m256i c, __m256i a, __m256i b) {
    return _mm256_add_epi16(c, _mm256_maddubs_epi16(a, b));
}
#ifdef DPBUSD
static inline __m256i dp8(__m256i c, __m256i a, __m256i b) { return DPBUSD(c, a, b); }
#endif
#endif
#ifdef __AVX512F__
static inline __m512 fma16(__m512 c, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, c); }
static inline __m512 set16f(int v) { return _mm512_set1_ps((float)(v & 0xff) * 1e-9f); }
static inline __m512i set16i(int v) { return _mm512_set1_epi32(v); }
#endif
#ifdef HAVE_ZMM
static inline __m512i dp16(__m512i c, __m512i a, __m512i b) { return _mm512_dpbusd_epi32(c, a, b); }
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
static inline __m512 bf16x32(__m512 c, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(c, (__m512bh)a, (__m512bh)b);
}
#endif

static int64_t one_thread(int64_t kind, int64_t iters, int omp_salt) {
    int64_t done = -1;
    switch (kind) {
#ifdef HAVE_AVX2
    case 0: { volatile __m256 sink; RUN(__m256, _mm256_setzero_ps, set8f, fma8, 8); (void)sink; break; }
    case 5: { volatile __m256i sink; RUN(__m256i, _mm256_setzero_si256, set8i, madd8, 32); (void)sink; break; }
#ifdef DPBUSD
    case 2: { volatile __m256i sink; RUN(__m256i, _mm256_setzero_si256, set8i, dp8, 32); (void)sink; break; }
#endif
#endif
#ifdef __AVX512F__
    case 1: { volatile __m512 sink; RUN(__m512, _mm512_setzero_ps, set16f, fma16, 16); (void)sink; break; }
#endif
#ifdef HAVE_ZMM
    case 3: { volatile __m512i sink; RUN(__m512i, _mm512_setzero_si512, set16i, dp16, 64); (void)sink; break; }
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    case 4: { volatile __m512 sink; RUN(__m512, _mm512_setzero_ps, set16f, bf16x32, 32); (void)sink; break; }
#endif
    default: break;
    }
    return done;
}

int64_t peak_macs(int64_t kind, int64_t iters, int64_t num_threads) {
    int64_t total = 0;
#pragma omp parallel num_threads(num_threads) reduction(+ : total)
    total += one_thread(kind, iters, (int)(iters & 7));
    return total < 0 ? -1 : total;
}

/* Which matmul path this build runs: 3 512-bit VNNI tiles, 2 256-bit VNNI, 1 AVX2, 0 none. */
int64_t matmul_path(void) {
#if defined(HAVE_ZMM)
    return 3;
#elif defined(DPBUSD)
    return 2;
#elif defined(HAVE_AVX2)
    return 1;
#else
    return 0;
#endif
}
