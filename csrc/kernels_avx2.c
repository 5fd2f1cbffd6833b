/* AVX2 kernels (compiled with -mavx2 -mfma; only called after the CPU reports AVX2).
 *
 * Products are vpmaddubsw(code, x): code in {0, 1, 2} unsigned, x in [-128, 127] signed, so each int16 lane
 * holds a pair sum in [-512, 508] and never saturates. Lanes then accumulate in int16: after at most 64 such
 * pair sums a lane lies in [-32768, 32512], inside int16, so the accumulators are widened to int32 (vpmaddwd
 * with ones) at least every 64 products per lane, i.e. every 2048 values of k: BN_WIDEN_K below.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "bitnet_cpu.h"
#include "x86_tile.h"

#define BN_WIDEN_K 2048 /* 64 vpmaddubsw results of 32 k each per int16 lane */
#define GEMV_WIDEN_KB 8  /* blocks per int16 accumulation in the GEMV (see gemv_tile) */
_Static_assert(BN_WIDEN_K == 2048, "the GEMM micro-kernel's assembly puts unpacked rows 2048 bytes apart");
#define GEMM_MC 64      /* activation rows per GEMM block */

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* GEMV: the BN_ROWS rows of one tile against one activation row.
 *
 * Planes 1 and 3 (bits 2-3 and 6-7 of a byte) are masked in place rather than shifted down, so one shift (by 4)
 * per run replaces three: their codes enter the products times 4. Per block, an int16 lane of a1 (planes 0
 * and 2) takes two pair sums in [-512, 508]; a lane of a4 (planes 1 and 3, codes 0, 4, 8) two in
 * [-2048, 2032]. After GEMV_WIDEN_KB = 8 blocks a4's lanes lie in [-32768, 32512], inside int16, and both are
 * widened into int32 as 4 * a1 + a4 (vpmaddwd by 4 and by 1): four times the dot product, divided at the end. */
static void gemv_tile(const uint8_t *tile, int64_t nkb, const int8_t *x, int32_t out[BN_ROWS]) {
    const __m256i m03 = _mm256_set1_epi8(0x03), m0c = _mm256_set1_epi8(0x0c);
    const __m256i ones = _mm256_set1_epi16(1), fours = _mm256_set1_epi16(4);
    __m256i acc[BN_ROWS];
    for (int r = 0; r < BN_ROWS; r++) acc[r] = _mm256_setzero_si256();
    for (int64_t kb0 = 0; kb0 < nkb; kb0 += GEMV_WIDEN_KB) {
        int64_t kb1 = kb0 + GEMV_WIDEN_KB < nkb ? kb0 + GEMV_WIDEN_KB : nkb;
        __m256i a1[BN_ROWS], a4[BN_ROWS];
        for (int r = 0; r < BN_ROWS; r++) a1[r] = a4[r] = _mm256_setzero_si256();
        for (int64_t kb = kb0; kb < kb1; kb++) {
            const int8_t *xb = x + kb * BN_KBLOCK;
            __m256i x0 = _mm256_loadu_si256((const __m256i *)xb);
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xb + 32));
            __m256i x2 = _mm256_loadu_si256((const __m256i *)(xb + 64));
            __m256i x3 = _mm256_loadu_si256((const __m256i *)(xb + 96));
            const uint8_t *b = tile + kb * BN_TILE_KBLOCK_BYTES;
            BN_PREFETCH_AHEAD(b);
            for (int r = 0; r < BN_ROWS; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(b + r * BN_RUN));
                __m256i t = _mm256_srli_epi16(v, 4);
                a1[r] = _mm256_add_epi16(a1[r], _mm256_maddubs_epi16(_mm256_and_si256(v, m03), x0));
                a4[r] = _mm256_add_epi16(a4[r], _mm256_maddubs_epi16(_mm256_and_si256(v, m0c), x1));
                a1[r] = _mm256_add_epi16(a1[r], _mm256_maddubs_epi16(_mm256_and_si256(t, m03), x2));
                a4[r] = _mm256_add_epi16(a4[r], _mm256_maddubs_epi16(_mm256_and_si256(t, m0c), x3));
            }
        }
        for (int r = 0; r < BN_ROWS; r++)
            acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(a1[r], fours),
                                                               _mm256_madd_epi16(a4[r], ones)));
    }
    for (int r = 0; r < BN_ROWS; r++) out[r] = hsum_i32(acc[r]) / 4; /* exact: a multiple of 4 */
}

/* GEMV for `rows` (2 or 3) activation rows: each 32-byte run is decoded once, as in gemv_tile, and multiplied by
 * every activation row (the decode is 5 of gemv_tile's 13 operations a run). The tile's rows are taken one at
 * a time, so only a1 and a4 per activation row are live in the inner loop (gemv_tile's bounds, widened every
 * GEMV_WIDEN_KB blocks); passes after the first read the tile from L1. */
_Static_assert(BN_GEMM_MIN_ROWS <= 4, "the GEMV below takes at most three activation rows");
static BN_ALWAYS_INLINE void gemv_tile_rows(const uint8_t *tile, int64_t nkb, const int8_t *x, int64_t ldx,
                                            const int rows, int32_t out[][BN_ROWS]) {
    const __m256i m03 = _mm256_set1_epi8(0x03), m0c = _mm256_set1_epi8(0x0c);
    const __m256i ones = _mm256_set1_epi16(1), fours = _mm256_set1_epi16(4);
    for (int r = 0; r < BN_ROWS; r++) {
        __m256i acc[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t kb0 = 0; kb0 < nkb; kb0 += GEMV_WIDEN_KB) {
            int64_t kb1 = kb0 + GEMV_WIDEN_KB < nkb ? kb0 + GEMV_WIDEN_KB : nkb;
            __m256i a1[3], a4[3];
            for (int m = 0; m < rows; m++) a1[m] = a4[m] = _mm256_setzero_si256();
            for (int64_t kb = kb0; kb < kb1; kb++) {
                const uint8_t *b = tile + kb * BN_TILE_KBLOCK_BYTES;
                if (r == 0) BN_PREFETCH_AHEAD(b);
                __m256i v = _mm256_loadu_si256((const __m256i *)(b + r * BN_RUN)), t = _mm256_srli_epi16(v, 4);
                __m256i c0 = _mm256_and_si256(v, m03), c1 = _mm256_and_si256(v, m0c);
                __m256i c2 = _mm256_and_si256(t, m03), c3 = _mm256_and_si256(t, m0c);
                for (int m = 0; m < rows; m++) {
                    const int8_t *xb = x + m * ldx + kb * BN_KBLOCK;
                    a1[m] = _mm256_add_epi16(a1[m], _mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)xb)));
                    a4[m] = _mm256_add_epi16(a4[m], _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(xb + 32))));
                    a1[m] = _mm256_add_epi16(a1[m], _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i *)(xb + 64))));
                    a4[m] = _mm256_add_epi16(a4[m], _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i *)(xb + 96))));
                }
            }
            for (int m = 0; m < rows; m++)
                acc[m] = _mm256_add_epi32(acc[m], _mm256_add_epi32(_mm256_madd_epi16(a1[m], fours),
                                                                   _mm256_madd_epi16(a4[m], ones)));
        }
        for (int m = 0; m < rows; m++) out[m][r] = hsum_i32(acc[m]) / 4; /* exact: a multiple of 4 */
    }
}

/* Codes of the tile's rows for k in [kb0 * 128, kb0 * 128 + kc) into dst[r * BN_WIDEN_K + k], natural order. */
static void unpack_tile(const uint8_t *tile, int64_t kb0, int64_t kc, uint8_t *dst) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int64_t kb = 0; kb < kc / BN_KBLOCK; kb++) {
        const uint8_t *b = tile + (kb0 + kb) * BN_TILE_KBLOCK_BYTES;
        for (int r = 0; r < BN_ROWS; r++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(b + r * BN_RUN));
            uint8_t *d = dst + r * BN_WIDEN_K + kb * BN_KBLOCK;
            _mm256_store_si256((__m256i *)d, _mm256_and_si256(v, m3));
            _mm256_store_si256((__m256i *)(d + 32), _mm256_and_si256(_mm256_srli_epi16(v, 2), m3));
            _mm256_store_si256((__m256i *)(d + 64), _mm256_and_si256(_mm256_srli_epi16(v, 4), m3));
            _mm256_store_si256((__m256i *)(d + 96), _mm256_and_si256(_mm256_srli_epi16(v, 6), m3));
        }
    }
}

/* GEMM micro-kernels: the 4 unpacked rows against 2 (or 1) activation rows over kc <= BN_WIDEN_K values of k,
 * widened and added into acc32[c * 4 + r]: 8 accumulators, one weight vector, 2 activation vectors and 2
 * temporaries, 13 of the 16 ymm registers. Kept out of line so its register allocation is its own. */
#define MADD(acc, w, x) acc = _mm256_add_epi16(_mm256_maddubs_epi16(w, x), acc)
static BN_NOINLINE void micro_2(const uint8_t *wb, const int8_t *x0p, const int8_t *x1p, int64_t kc,
                                __m256i *acc32) {
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00;
    __m256i a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (int64_t k = 0; k < kc; k += 32) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x0p + k));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x1p + k));
#if defined(__GNUC__) && defined(__x86_64__)
        /* The same as the intrinsics below; GCC compiles those with a register copy per accumulation and a
         * spill, ~35 instead of ~26 instructions per iteration, which costs about a quarter of the speed. */
        __m256i w, t0, t1;
#define STEP(OFF, A0, A1)                                                                                    \
    "vmovdqa " #OFF "(%[wb]), %[w]\n\t"                                                                      \
    "vpmaddubsw %[x0], %[w], %[t0]\n\t"                                                                      \
    "vpmaddubsw %[x1], %[w], %[t1]\n\t"                                                                      \
    "vpaddw %[t0], %[" #A0 "], %[" #A0 "]\n\t"                                                              \
    "vpaddw %[t1], %[" #A1 "], %[" #A1 "]\n\t"
        __asm__(STEP(0, a00, a10) STEP(2048, a01, a11) STEP(4096, a02, a12) STEP(6144, a03, a13)
                : [a00] "+x"(a00), [a01] "+x"(a01), [a02] "+x"(a02), [a03] "+x"(a03), [a10] "+x"(a10),
                  [a11] "+x"(a11), [a12] "+x"(a12), [a13] "+x"(a13), [w] "=&x"(w), [t0] "=&x"(t0), [t1] "=&x"(t1)
                : [wb] "r"(wb + k), [x0] "x"(x0), [x1] "x"(x1));
#undef STEP
#else
        const __m256i w0 = _mm256_load_si256((const __m256i *)(wb + k));
        MADD(a00, w0, x0);
        MADD(a10, w0, x1);
        const __m256i w1 = _mm256_load_si256((const __m256i *)(wb + BN_WIDEN_K + k));
        MADD(a01, w1, x0);
        MADD(a11, w1, x1);
        const __m256i w2 = _mm256_load_si256((const __m256i *)(wb + 2 * BN_WIDEN_K + k));
        MADD(a02, w2, x0);
        MADD(a12, w2, x1);
        const __m256i w3 = _mm256_load_si256((const __m256i *)(wb + 3 * BN_WIDEN_K + k));
        MADD(a03, w3, x0);
        MADD(a13, w3, x1);
#endif
    }
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[8] = {a00, a01, a02, a03, a10, a11, a12, a13};
    for (int i = 0; i < 8; i++) acc32[i] = _mm256_add_epi32(acc32[i], _mm256_madd_epi16(a[i], ones));
}

static inline void micro_1(const uint8_t *wb, const int8_t *x0p, int64_t kc, __m256i *acc32) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < kc; k += 32) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x0p + k));
        MADD(a0, _mm256_load_si256((const __m256i *)(wb + k)), x0);
        MADD(a1, _mm256_load_si256((const __m256i *)(wb + BN_WIDEN_K + k)), x0);
        MADD(a2, _mm256_load_si256((const __m256i *)(wb + 2 * BN_WIDEN_K + k)), x0);
        MADD(a3, _mm256_load_si256((const __m256i *)(wb + 3 * BN_WIDEN_K + k)), x0);
    }
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[4] = {a0, a1, a2, a3};
    for (int i = 0; i < 4; i++) acc32[i] = _mm256_add_epi32(acc32[i], _mm256_madd_epi16(a[i], ones));
}

static void gemm_tiles(const bn_act *x, const bn_tmat *w, int64_t t0, int64_t t1) {
    _Alignas(BN_ALIGN) uint8_t wbuf[BN_ROWS * BN_WIDEN_K];
    _Alignas(BN_ALIGN) __m256i acc[GEMM_MC * BN_ROWS];
    int64_t nkb = x->k_pad / BN_KBLOCK;
    for (int64_t m0 = 0; m0 < x->m; m0 += GEMM_MC) {
        int64_t mc = x->m - m0 < GEMM_MC ? x->m - m0 : GEMM_MC;
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *tile = w->w + t * nkb * BN_TILE_KBLOCK_BYTES;
            for (int64_t i = 0; i < mc * BN_ROWS; i++) acc[i] = _mm256_setzero_si256();
            for (int64_t k0 = 0; k0 < x->k_pad; k0 += BN_WIDEN_K) {
                int64_t kc = x->k_pad - k0 < BN_WIDEN_K ? x->k_pad - k0 : BN_WIDEN_K;
                unpack_tile(tile, k0 / BN_KBLOCK, kc, wbuf);
                const int8_t *xk = x->xq + m0 * x->ldx + k0;
                int64_t m = 0;
                for (; m + 2 <= mc; m += 2)
                    micro_2(wbuf, xk + m * x->ldx, xk + (m + 1) * x->ldx, kc, acc + m * BN_ROWS);
                if (m < mc) micro_1(wbuf, xk + m * x->ldx, kc, acc + m * BN_ROWS);
            }
            for (int64_t m = 0; m < mc; m++) bn_store_tile(x, w, m0 + m, t, bn_hsum4_i32(acc + m * BN_ROWS));
        }
    }
}

static void ternary_avx2(const bn_act *x, const bn_tmat *w, int64_t t0, int64_t t1) {
    if (x->m >= BN_GEMM_MIN_ROWS) {
        gemm_tiles(x, w, t0, t1);
        return;
    }
    int64_t nkb = x->k_pad / BN_KBLOCK;
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = w->w + t * nkb * BN_TILE_KBLOCK_BYTES;
        if (t + 1 < t1) _mm_prefetch((const char *)(tile + nkb * BN_TILE_KBLOCK_BYTES), _MM_HINT_T0);
        int32_t out[3][BN_ROWS]; /* x->m < BN_GEMM_MIN_ROWS here */
        if (x->m == 1)
            gemv_tile(tile, nkb, x->xq, out[0]);
        else if (x->m == 2)
            gemv_tile_rows(tile, nkb, x->xq, x->ldx, 2, out);
        else if (x->m == 3)
            gemv_tile_rows(tile, nkb, x->xq, x->ldx, 3, out);
        for (int64_t m = 0; m < x->m; m++) bn_store_tile(x, w, m, t, _mm_loadu_si128((const __m128i *)out[m]));
    }
}

/* int8 x int8 rows: vpmaddubsw(|x|, sign(w, x)) = pairwise w * x; |x| <= 128 and |w| <= 127 keep each pair
 * sum <= 32512, inside int16; vpmaddwd then widens every product pair to int32 at once. */
static inline __m256i dot8(__m256i acc, __m256i ax, __m256i xv, const int8_t *w) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), xv));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
}

static void int8_avx2(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1) {
    int64_t chunks = x->k_pad / 32;
    for (int64_t n = n0; n < n1; n += BN_ROWS) { /* tiles outside: a tile is read once for all rows of x */
        const int8_t *tile = w->w + n / BN_ROWS * chunks * BN_ROWS * 32;
        for (int64_t m = 0; m < x->m; m++) {
            const int8_t *xr = x->xq + m * x->ldx;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < chunks; c++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + c * 32));
                __m256i ax = _mm256_abs_epi8(xv);
                const int8_t *b = tile + c * BN_ROWS * 32;
                BN_PREFETCH_AHEAD(b);
                a0 = dot8(a0, ax, xv, b);
                a1 = dot8(a1, ax, xv, b + 32);
                a2 = dot8(a2, ax, xv, b + 64);
                a3 = dot8(a3, ax, xv, b + 96);
            }
            int32_t acc[BN_ROWS] = {hsum_i32(a0), hsum_i32(a1), hsum_i32(a2), hsum_i32(a3)};
            for (int r = 0; r < BN_ROWS && n + r < n1; r++)
                w->y[m * w->ldy + n + r] = (float)acc[r] * (w->scale[n + r] / x->a[m]);
        }
    }
}

/* 4-bit rows: vpmaddubsw(w + 8, x) pair sums lie in [-3840, 3810]; two of them (one per nibble) added in int16
 * stay inside it, then vpmaddwd widens. */
void bn_int4_avx2(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1) {
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    int64_t chunks = x->k_pad / BN_INT4_CHUNK;
    for (int64_t n = n0; n < n1; n += BN_ROWS) { /* tiles outside: a tile is read once for all rows of x */
        const uint8_t *tile = (const uint8_t *)w->w + n / BN_ROWS * chunks * BN_ROWS * 32;
        for (int64_t m = 0; m < x->m; m++) {
            const int8_t *xr = x->xq + m * x->ldx;
            __m256i acc[BN_ROWS];
            for (int r = 0; r < BN_ROWS; r++) acc[r] = _mm256_setzero_si256();
            for (int64_t c = 0; c < chunks; c++) {
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(xr + c * 64));
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(xr + c * 64 + 32));
                const uint8_t *b = tile + c * BN_ROWS * 32;
                for (int r = 0; r < BN_ROWS; r++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(b + r * 32));
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, low), x0),
                                                 _mm256_maddubs_epi16(hi, x1));
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
                }
            }
            for (int r = 0; r < BN_ROWS && n + r < n1; r++)
                bn_store_head(x, w, m, n + r, hsum_i32(acc[r]) - 8 * x->rowsum[m]);
        }
    }
}

/* 8 bfloat16 values widened to float32: the 16 bits become the high half of each lane (exact) */
static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* dot(a, x) and y += a·x for x in float32 or bfloat16 (KV-cache rows): one body, the loads differ; the tail
   goes into the lane it would have used, so every lane sums in the same order whatever n is */
#define BN_DOT_AXPY(SUFFIX, T, LOAD8, LOAD1)                                                              \
    float bn_dot_##SUFFIX##_avx2(const float *a, const T *b, int64_t n) {                                 \
        __m256 acc = _mm256_setzero_ps();                                                                  \
        int64_t i = 0;                                                                                     \
        for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), LOAD8(b + i))); \
        float s[8];                                                                                        \
        _mm256_storeu_ps(s, acc);                                                                          \
        for (; i < n; i++) s[i % 8] += a[i] * LOAD1(b + i);                                                \
        return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));                         \
    }                                                                                                      \
    void bn_axpy_##SUFFIX##_avx2(float a, const T *x, float *y, int64_t n) {                               \
        const __m256 va = _mm256_set1_ps(a);                                                               \
        int64_t i = 0;                                                                                     \
        for (; i + 8 <= n; i += 8)                                                                         \
            _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(va, LOAD8(x + i)))); \
        for (; i < n; i++) y[i] += a * LOAD1(x + i);                                                       \
    }

BN_DOT_AXPY(f32, float, _mm256_loadu_ps, bn_load_f32)
BN_DOT_AXPY(bf16, uint16_t, load_bf16x8, bn_load_bf16)

void bn_quantize_row_avx2(const float *x, int64_t k, int64_t k_pad, int8_t *xq, float *a, int32_t *rowsum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    float amax = _mm_cvtss_f32(m4);
    for (; i < k; i++) {
        float v = x[i] < 0 ? -x[i] : x[i];
        amax = v > amax ? v : amax;
    }
    if (!(amax < INFINITY)) { /* NaN or inf input: the portable path defines the bytes */
        bn_quantize_row_scalar(x, k, k_pad, xq, a, rowsum);
        return;
    }
    float s = bn_act_scale(amax);
    const __m256 vs = _mm256_set1_ps(s);
    const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    __m256i sum = _mm256_setzero_si256();
    for (i = 0; i + 32 <= k; i += 32) {
        __m256i q[4];
        for (int j = 0; j < 4; j++) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vs);
            v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
            sum = _mm256_add_epi32(sum, q[j]);
        }
        __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
        __m256i b = _mm256_packs_epi16(p01, p23); /* lanes interleaved by the 128-bit packs: fix the order */
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + i), b);
    }
    int32_t total = hsum_i32(sum);
    for (; i < k; i++) {
        float v = nearbyintf(x[i] * s);
        int32_t qv = v >= 127.0f ? 127 : v <= -128.0f ? -128 : (int32_t)v;
        xq[i] = (int8_t)qv;
        total += qv;
    }
    memset(xq + k, 0, (size_t)(k_pad - k));
    *a = s;
    *rowsum = total;
}

/* Two passes over the row (it stays in cache): the maximum and whether a NaN occurs (vmaxps skips NaNs, an
 * unordered compare flags them), then the first element equal to that maximum. A row with a NaN goes to the
 * portable loop, which stops at the first one. */
int64_t bn_argmax_f32_avx2(const float *x, int64_t n) {
    int64_t n8 = n & ~(int64_t)7;
    if (n8 == 0) return bn_argmax_f32_scalar(x, n);
    __m256 mx = _mm256_loadu_ps(x), nan = _mm256_cmp_ps(mx, mx, _CMP_UNORD_Q);
    for (int64_t i = 8; i < n8; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        mx = _mm256_max_ps(v, mx);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8], best;
    _mm256_storeu_ps(lanes, mx);
    best = lanes[0];
    for (int i = 1; i < 8; i++) best = lanes[i] > best ? lanes[i] : best;
    int has_nan = _mm256_movemask_ps(nan) != 0;
    for (int64_t i = n8; i < n; i++) {
        has_nan |= x[i] != x[i];
        best = x[i] > best ? x[i] : best;
    }
    if (has_nan) return bn_argmax_f32_scalar(x, n);
    const __m256 b = _mm256_set1_ps(best);
    for (int64_t i = 0; i < n8; i += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), b, _CMP_EQ_OQ));
        for (int j = 0; hit; j++, hit >>= 1) /* the lowest set bit: the first match */
            if (hit & 1) return i + j;
    }
    for (int64_t i = n8;; i++)
        if (x[i] == best) return i;
}

const bn_isa_ops bn_ops_avx2 = {"avx2", ternary_avx2, int8_avx2, bn_int4_avx2, bn_quantize_row_avx2,
                                bn_argmax_f32_avx2};
