/* Shared by the AVX2 and AVX-512 VNNI kernels (both compiled with AVX2): the tile epilogue of every ternary
 * product — a tile's BN_ROWS int32 sums stored as one vector, rounded exactly as bn_store rounds each — and
 * the inlining attributes their register allocation depends on. */
#ifndef PYBITNET_X86_TILE_H
#define PYBITNET_X86_TILE_H

#include <immintrin.h>

#include "bitnet_cpu.h"

/* Inlining choices the kernels' register allocation depends on (GCC and Clang; others decide alone) */
#if defined(__GNUC__)
#define BN_NOINLINE __attribute__((noinline))
#define BN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BN_NOINLINE
#define BN_ALWAYS_INLINE inline
#endif

_Static_assert(BN_ROWS == 4, "bn_hsum4_i32 and bn_store_tile handle a tile's rows four at a time");

/* The four int32 sums of acc[0..3] (vectors of partial sums), as [sum 0, sum 1, sum 2, sum 3]. */
static inline __m128i bn_hsum4_i32(const __m256i *acc) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* bn_store for the BN_ROWS outputs of tile t in row m at once: the same int32 difference, conversion, scale
 * quotient and product, each rounded as bn_store rounds it. */
static inline void bn_store_tile(const bn_act *x, const bn_tmat *w, int64_t m, int64_t t, __m128i sums) {
    int64_t n = t * BN_ROWS;
    if (n + BN_ROWS > w->n) { /* the matrix's last, partial tile */
        int32_t s[BN_ROWS];
        _mm_storeu_si128((__m128i *)s, sums);
        for (int r = 0; n + r < w->n; r++) bn_store(x, w, m, n + r, s[r]);
        return;
    }
    __m128 scale = w->scale_stride ? _mm_loadu_ps(w->scale + n) : _mm_set1_ps(w->scale[0]);
    __m128 v = _mm_cvtepi32_ps(_mm_sub_epi32(sums, _mm_set1_epi32(x->rowsum[m])));
    _mm_storeu_ps(w->y + m * w->ldy + n, _mm_mul_ps(v, _mm_div_ps(scale, _mm_set1_ps(x->a[m]))));
}

#endif
