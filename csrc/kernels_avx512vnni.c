/* AVX-512 VNNI kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni; only called after the CPU
 * and OS report them). vpdpbusd adds four unsigned x signed byte products straight into int32 lanes, without
 * saturation: a lane grows by at most 4 * 2 * 128 = 1024 per instruction for unpacked ternary codes (the GEMM),
 * so no intermediate int16 sums exist and K up to 2**21 cannot overflow; the GEMV's bound is below.
 */
#include <immintrin.h>
#include <string.h>

#include "bitnet_cpu.h"
#include "x86_tile.h"

#define GEMM_MC 64
#define GEMM_KC 2048 /* k values unpacked per tile at a time */

static inline int32_t hsum256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* A tile's four dot products from its per-plane sums (rows 0-1: p0..p3, rows 2-3: q0..q3): plane j's lanes
 * are multiples of 4^j, so the shift divides exactly. */
static inline void gemv_finish(__m512i p0, __m512i p1, __m512i p2, __m512i p3, __m512i q0, __m512i q1, __m512i q2,
                               __m512i q3, int32_t out[BN_ROWS]) {
    __m512i s01 = _mm512_add_epi32(_mm512_add_epi32(p0, _mm512_srai_epi32(p1, 2)),
                                   _mm512_add_epi32(_mm512_srai_epi32(p2, 4), _mm512_srai_epi32(p3, 6)));
    __m512i s23 = _mm512_add_epi32(_mm512_add_epi32(q0, _mm512_srai_epi32(q1, 2)),
                                   _mm512_add_epi32(_mm512_srai_epi32(q2, 4), _mm512_srai_epi32(q3, 6)));
    out[0] = hsum256(_mm512_castsi512_si256(s01));
    out[1] = hsum256(_mm512_extracti64x4_epi64(s01, 1));
    out[2] = hsum256(_mm512_castsi512_si256(s23));
    out[3] = hsum256(_mm512_extracti64x4_epi64(s23, 1));
}

/* GEMV: a zmm holds two rows' 32-byte runs of one k-block; the activation block is broadcast to both halves.
 * The four bit-pair planes are masked in place (0x03, 0x0c, 0x30, 0xc0), never shifted down: plane j's codes
 * enter the products times 4^j, into accumulators of its own, and every lane of those is a multiple of 4^j, so an
 * arithmetic shift at the end divides exactly. Two loads, eight ands and eight vpdpbusd per block (the shifting
 * version had six more port-0 shifts, which made the loop too slow to keep DRAM busy). A lane of plane 3 grows by
 * at most 4 * 128 * 128 = 2^16 per block, so K below 2^22 cannot overflow. */
static void gemv_tile(const uint8_t *tile, int64_t nkb, const int8_t *x, int32_t out[BN_ROWS]) {
    const __m512i mask[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30),
                             _mm512_set1_epi8((char)0xc0)};
    __m512i r01[4], r23[4]; /* per plane: rows 0-1, rows 2-3 */
    for (int j = 0; j < 4; j++) r01[j] = r23[j] = _mm512_setzero_si512();
    for (int64_t kb = 0; kb < nkb; kb++) {
        const int8_t *xb = x + kb * BN_KBLOCK;
        const uint8_t *b = tile + kb * BN_TILE_KBLOCK_BYTES;
        BN_PREFETCH_AHEAD(b);
        __m512i v01 = _mm512_loadu_si512((const void *)b);
        __m512i v23 = _mm512_loadu_si512((const void *)(b + 64));
        for (int j = 0; j < 4; j++) {
            __m512i xj = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 32 * j)));
            r01[j] = _mm512_dpbusd_epi32(r01[j], _mm512_and_si512(v01, mask[j]), xj);
            r23[j] = _mm512_dpbusd_epi32(r23[j], _mm512_and_si512(v23, mask[j]), xj);
        }
    }
    gemv_finish(r01[0], r01[1], r01[2], r01[3], r23[0], r23[1], r23[2], r23[3], out);
}

/* gemv_tile for two activation rows (x and y, batched decode): each block's planes are masked once for both
 * (eight of the 22 operations a block). The accumulators are named, not arrays, and the function is kept out
 * of line: inlined into its caller, or with arrays, GCC spilled several of the 16 every block. */
static BN_NOINLINE void gemv_tile_2rows(const uint8_t *tile, int64_t nkb, const int8_t *x, const int8_t *y,
                                        int32_t out[2][BN_ROWS]) {
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c), m2 = _mm512_set1_epi8(0x30),
                  m3 = _mm512_set1_epi8((char)0xc0);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    __m512i c0 = a0, c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0;
    for (int64_t kb = 0; kb < nkb; kb++) {
        const int8_t *xb = x + kb * BN_KBLOCK, *yb = y + kb * BN_KBLOCK;
        const uint8_t *p = tile + kb * BN_TILE_KBLOCK_BYTES;
        BN_PREFETCH_AHEAD(p);
        __m512i v01 = _mm512_loadu_si512((const void *)p), v23 = _mm512_loadu_si512((const void *)(p + 64));
        __m512i w01, w23, xj, yj;
#define PLANE(J, M, A, B, C, D)                                                                              \
    w01 = _mm512_and_si512(v01, M), w23 = _mm512_and_si512(v23, M);                                           \
    xj = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 32 * J)));                          \
    yj = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(yb + 32 * J)));                          \
    A = _mm512_dpbusd_epi32(A, w01, xj), B = _mm512_dpbusd_epi32(B, w23, xj);                                 \
    C = _mm512_dpbusd_epi32(C, w01, yj), D = _mm512_dpbusd_epi32(D, w23, yj);
        PLANE(0, m0, a0, b0, c0, d0) PLANE(1, m1, a1, b1, c1, d1) PLANE(2, m2, a2, b2, c2, d2)
        PLANE(3, m3, a3, b3, c3, d3)
#undef PLANE
    }
    gemv_finish(a0, a1, a2, a3, b0, b1, b2, b3, out[0]);
    gemv_finish(c0, c1, c2, c3, d0, d1, d2, d3, out[1]);
}

static void unpack_tile(const uint8_t *tile, int64_t kb0, int64_t kc, uint8_t *dst) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int64_t kb = 0; kb < kc / BN_KBLOCK; kb++) {
        const uint8_t *b = tile + (kb0 + kb) * BN_TILE_KBLOCK_BYTES;
        for (int r = 0; r < BN_ROWS; r++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(b + r * BN_RUN));
            uint8_t *d = dst + r * GEMM_KC + kb * BN_KBLOCK;
            _mm256_store_si256((__m256i *)d, _mm256_and_si256(v, m3));
            _mm256_store_si256((__m256i *)(d + 32), _mm256_and_si256(_mm256_srli_epi16(v, 2), m3));
            _mm256_store_si256((__m256i *)(d + 64), _mm256_and_si256(_mm256_srli_epi16(v, 4), m3));
            _mm256_store_si256((__m256i *)(d + 96), _mm256_and_si256(_mm256_srli_epi16(v, 6), m3));
        }
    }
}

/* 4 unpacked rows x NC activation rows over kc values of k, added into acc[c * 4 + r] (16 int32 lanes). */
#define MICRO(NC)                                                                                            \
    static inline void micro_##NC(const uint8_t *wb, const int8_t *x, int64_t ldx, int64_t kc, __m512i *acc) { \
        __m512i a[NC][BN_ROWS];                                                                              \
        for (int c = 0; c < NC; c++)                                                                         \
            for (int r = 0; r < BN_ROWS; r++) a[c][r] = acc[c * BN_ROWS + r];                                \
        for (int64_t k = 0; k < kc; k += 64) {                                                               \
            __m512i w0 = _mm512_load_si512((const void *)(wb + k));                                          \
            __m512i w1 = _mm512_load_si512((const void *)(wb + GEMM_KC + k));                                \
            __m512i w2 = _mm512_load_si512((const void *)(wb + 2 * GEMM_KC + k));                            \
            __m512i w3 = _mm512_load_si512((const void *)(wb + 3 * GEMM_KC + k));                            \
            for (int c = 0; c < NC; c++) {                                                                   \
                __m512i xv = _mm512_loadu_si512((const void *)(x + c * ldx + k));                            \
                a[c][0] = _mm512_dpbusd_epi32(a[c][0], w0, xv);                                              \
                a[c][1] = _mm512_dpbusd_epi32(a[c][1], w1, xv);                                              \
                a[c][2] = _mm512_dpbusd_epi32(a[c][2], w2, xv);                                              \
                a[c][3] = _mm512_dpbusd_epi32(a[c][3], w3, xv);                                              \
            }                                                                                                \
        }                                                                                                    \
        for (int c = 0; c < NC; c++)                                                                         \
            for (int r = 0; r < BN_ROWS; r++) acc[c * BN_ROWS + r] = a[c][r];                                \
    }
MICRO(1)
MICRO(4)

static void gemm_tiles(const bn_act *x, const bn_tmat *w, int64_t t0, int64_t t1) {
    _Alignas(BN_ALIGN) uint8_t wbuf[BN_ROWS * GEMM_KC];
    _Alignas(BN_ALIGN) __m512i acc[GEMM_MC * BN_ROWS];
    int64_t nkb = x->k_pad / BN_KBLOCK;
    for (int64_t m0 = 0; m0 < x->m; m0 += GEMM_MC) {
        int64_t mc = x->m - m0 < GEMM_MC ? x->m - m0 : GEMM_MC;
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *tile = w->w + t * nkb * BN_TILE_KBLOCK_BYTES;
            for (int64_t i = 0; i < mc * BN_ROWS; i++) acc[i] = _mm512_setzero_si512();
            for (int64_t k0 = 0; k0 < x->k_pad; k0 += GEMM_KC) {
                int64_t kc = x->k_pad - k0 < GEMM_KC ? x->k_pad - k0 : GEMM_KC;
                unpack_tile(tile, k0 / BN_KBLOCK, kc, wbuf);
                const int8_t *xk = x->xq + m0 * x->ldx + k0;
                int64_t m = 0;
                for (; m + 4 <= mc; m += 4) micro_4(wbuf, xk + m * x->ldx, x->ldx, kc, acc + m * BN_ROWS);
                for (; m < mc; m++) micro_1(wbuf, xk + m * x->ldx, x->ldx, kc, acc + m * BN_ROWS);
            }
            for (int64_t m = 0; m < mc; m++) { /* each zmm's halves added, then the four reduced and stored together */
                __m256i h[BN_ROWS];
                for (int r = 0; r < BN_ROWS; r++) {
                    __m512i a = acc[m * BN_ROWS + r];
                    h[r] = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
                }
                bn_store_tile(x, w, m0 + m, t, bn_hsum4_i32(h));
            }
        }
    }
}

static void ternary_avx512vnni(const bn_act *x, const bn_tmat *w, int64_t t0, int64_t t1) {
    if (x->m >= BN_GEMM_MIN_ROWS) {
        gemm_tiles(x, w, t0, t1);
        return;
    }
    int64_t nkb = x->k_pad / BN_KBLOCK;
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = w->w + t * nkb * BN_TILE_KBLOCK_BYTES;
        int32_t out[2][BN_ROWS];
        for (int64_t m = 0; m < x->m; m += 2) { /* activation rows in pairs, the last one alone */
            int pair = m + 1 < x->m;
            if (pair)
                gemv_tile_2rows(tile, nkb, x->xq + m * x->ldx, x->xq + (m + 1) * x->ldx, out);
            else
                gemv_tile(tile, nkb, x->xq + m * x->ldx, out[0]);
            for (int i = 0; i <= pair; i++) bn_store_tile(x, w, m + i, t, _mm_loadu_si128((const __m128i *)out[i]));
        }
    }
}

/* int8 rows: vpdpbusd(w ^ 0x80, x) = sum((w + 128) * x); subtracting 128 * rowsum(x) leaves sum(w * x). A zmm
 * holds two rows' 32-byte chunks of a tile; the activation chunk is broadcast to both halves. */
static void int8_avx512vnni(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t chunks = x->k_pad / 32;
    for (int64_t n = n0; n < n1; n += BN_ROWS) { /* tiles outside: a tile is read once for all rows of x */
        const int8_t *tile = w->w + n / BN_ROWS * chunks * BN_ROWS * 32;
        for (int64_t m = 0; m < x->m; m++) {
            const int8_t *xr = x->xq + m * x->ldx;
            __m512i a01 = _mm512_setzero_si512(), a23 = a01;
            for (int64_t c = 0; c < chunks; c++) {
                __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xr + c * 32)));
                const int8_t *b = tile + c * BN_ROWS * 32;
                BN_PREFETCH_AHEAD(b);
                a01 = _mm512_dpbusd_epi32(a01, _mm512_xor_si512(_mm512_loadu_si512((const void *)b), flip), xv);
                a23 = _mm512_dpbusd_epi32(a23, _mm512_xor_si512(_mm512_loadu_si512((const void *)(b + 64)), flip), xv);
            }
            int32_t acc[BN_ROWS] = {hsum256(_mm512_castsi512_si256(a01)), hsum256(_mm512_extracti64x4_epi64(a01, 1)),
                                    hsum256(_mm512_castsi512_si256(a23)), hsum256(_mm512_extracti64x4_epi64(a23, 1))};
            for (int r = 0; r < BN_ROWS && n + r < n1; r++) {
                int32_t dot = acc[r] - 128 * x->rowsum[m];
                w->y[m * w->ldy + n + r] = (float)dot * (w->scale[n + r] / x->a[m]);
            }
        }
    }
}

/* AVX-512 machines run AVX2, whose quantization gives the same bytes as the portable one */
const bn_isa_ops bn_ops_avx512vnni = {"avx512vnni", ternary_avx512vnni, int8_avx512vnni, bn_int4_avx2,
                                      bn_quantize_row_avx2, bn_argmax_f32_avx2};
