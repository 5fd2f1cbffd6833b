/* Ternary (W1.58 A8) CPU kernels: shared types and the per-ISA function table.
 *
 * Weight layout "cpu_i2" (see src/pybitnet/quant/layouts/cpu_i2.py): rows are grouped in tiles of
 * BN_ROWS rows; K is padded with zero weights to a multiple of BN_KBLOCK. A tile stores, for every
 * k-block kb, BN_ROWS runs of 32 bytes (row r at byte offset (kb * BN_ROWS + r) * 32). Byte m of a run
 * holds the codes (w + 1, in {0, 1, 2}) of elements m, m + 32, m + 64, m + 96 of the block at bit pairs
 * 0-1, 2-3, 4-5, 6-7. Shifting a whole run right by 2j and masking with 3 gives the codes of elements
 * 32j .. 32j + 31 in natural order, so unpacking never shuffles and the activations stay in natural order.
 *
 * Codes are unsigned (w + 1), which is what the unsigned x signed byte products of vpmaddubsw / vpdpbusd
 * take. The kernels compute sum(code * x) and subtract the activation row sum: sum((code - 1) * x).
 */
#ifndef PYBITNET_BITNET_CPU_H
#define PYBITNET_BITNET_CPU_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define BN_KBLOCK 128
#define BN_ROWS 4
#define BN_RUN 32 /* bytes of one row in one k-block */
#define BN_TILE_KBLOCK_BYTES (BN_ROWS * BN_RUN)
#define BN_ALIGN 64
/* Bytes ahead of the decode GEMVs' weight reads (ternary and int8 head) to prefetch: their loops are busy enough
 * that the hardware prefetcher alone keeps too few lines in flight (measured: a 2-core Zen 4's decode GEMVs ~15%
 * faster). Past a tile's end it prefetches the next tile, which the same thread usually reads next; prefetches
 * never fault, so running past the matrix is harmless. A build may set it (-DBN_GEMV_PREFETCH=...) to tune. */
#ifndef BN_GEMV_PREFETCH
#define BN_GEMV_PREFETCH 2048
#endif
/* Chunks a thread's share of a GEMV's rows is cut into, claimed one at a time: a thread that is descheduled
 * leaves the other its second chunk, and each chunk is one long stream (a 2-core AMD EPYC VM decoded the
 * bitnet-2b-4t shape ~10 % faster with 2 than with 16: tg64 39.3-40.5 against 36.0-36.1 t/s, pp128 the same).
 * A build may set it (-DBN_CHUNKS_PER_THREAD=..., e.g. through CMAKE_ARGS="-DCMAKE_C_FLAGS=..."). */
#ifndef BN_CHUNKS_PER_THREAD
#define BN_CHUNKS_PER_THREAD 2
#endif
/* From this many activation rows a ternary product runs as the tiled GEMM (prefill) on every ISA. Its chunks
 * need not be long streams (it is compute-bound, its weights reused from cache), and finer ones let a thread
 * whose core is shared with other work leave more of them to the others: on the 2-core VM with a busy process
 * on one core, pp128 55 -> 62-64 t/s with 16 chunks a thread instead of 2 (quiet: 99-102 -> 104-106), decode
 * unchanged; decode's GEMVs keep BN_CHUNKS_PER_THREAD (16 there cost it 7 %). A build may set it
 * (-DBN_GEMM_CHUNKS_PER_THREAD=...). */
#define BN_GEMM_MIN_ROWS 4
#ifndef BN_GEMM_CHUNKS_PER_THREAD
#define BN_GEMM_CHUNKS_PER_THREAD 16
#endif
/* The cache level those prefetches fill: into L1 by default; a build may set -DBN_GEMV_PREFETCH_HINT=_MM_HINT_T1
 * (L2), whose requests do not hold the core's few L1 miss buffers, to compare. */
#ifndef BN_GEMV_PREFETCH_HINT
#define BN_GEMV_PREFETCH_HINT _MM_HINT_T0
#endif
/* The x86 decode GEMVs' prefetch of the 128-byte block BN_GEMV_PREFETCH bytes past p (two cache lines); for the
 * files that include immintrin.h. */
#define BN_PREFETCH_AHEAD(p)                                                                                 \
    (_mm_prefetch((const char *)(p) + BN_GEMV_PREFETCH, BN_GEMV_PREFETCH_HINT),                              \
     _mm_prefetch((const char *)(p) + BN_GEMV_PREFETCH + 64, BN_GEMV_PREFETCH_HINT))

/* Quantized activations: M rows of k_pad int8 values (zero past the true K), their dequantization
 * factors a (x ~= xq / a) and integer row sums. */
typedef struct {
    const int8_t *xq;
    int64_t ldx; /* bytes between rows, a multiple of 64 */
    const float *a;
    const int32_t *rowsum;
    int64_t m;
    int64_t k_pad; /* a multiple of BN_KBLOCK */
} bn_act;

/* One ternary matrix in the cpu_i2 layout and where its output goes: y[m * ldy + n]. */
typedef struct {
    const uint8_t *w;
    int64_t n;
    const float *scale;
    int64_t scale_stride; /* 0: one scale per tensor, 1: one per row */
    float *y;
    int64_t ldy;
} bn_tmat;

/* One int8 matrix with per-row scales (the output head), in tiles like the ternary layout: rows padded with
 * zeros to a multiple of BN_ROWS and K to k_pad; for tile t and 32-value chunk c, the 4 rows' 32 bytes lie side
 * by side at ((t * (k_pad / 32) + c) * 4 + r) * 32, so a GEMV reads one sequential stream (a row-major matrix
 * read 4 rows at a time gets about half the bandwidth). */
typedef struct {
    const int8_t *w;
    int64_t n;
    const float *scale;
    float *y;
    int64_t ldy;
} bn_qmat;

/* The 4-bit head: int4 weights w in [-7, 7] with per-row scales, stored as w + 8 in nibbles. Tiles as the int8
 * head's, in 64-value chunks: for tile t and chunk c the 4 rows' 32 bytes lie side by side at
 * ((t * (k_pad / 64) + c) * 4 + r) * 32; byte i holds element 64c + i in its low nibble and 64c + 32 + i in its
 * high nibble, so a mask and a shift give 32 elements each in natural order. Kernels compute
 * sum((w + 8) * x) - 8 * rowsum(x). Rows past n and columns past k hold w = 0. */
#define BN_INT4_CHUNK 64

typedef struct {
    const char *name;
    /* y for rows of tiles [t0, t1) of w, for all M activation rows */
    void (*ternary)(const bn_act *x, const bn_tmat *w, int64_t t0, int64_t t1);
    /* y for rows [n0, n1) of w (n0 a multiple of BN_ROWS), for all M activation rows */
    void (*int8)(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1);
    /* the same for the 4-bit head (w->w holds the nibble tiles) */
    void (*int4)(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1);
    /* One row: xq = round_half_even(x * a) with a = (1 / max(max|x|, 1e-5)) * 127, zero padding to k_pad. */
    void (*quantize)(const float *x, int64_t k, int64_t k_pad, int8_t *xq, float *a, int32_t *rowsum);
    /* torch.argmax of x[0..n): the first NaN if there is one, else the first maximum (n >= 1) */
    int64_t (*argmax)(const float *x, int64_t n);
} bn_isa_ops;

enum { BN_ISA_SCALAR = 0, BN_ISA_AVX2 = 1, BN_ISA_AVX512VNNI = 2, BN_ISA_NEONDOT = 3, BN_ISA_COUNT = 4 };

extern const bn_isa_ops bn_ops_scalar;
#ifdef BN_HAVE_AVX2
extern const bn_isa_ops bn_ops_avx2;
#endif
#ifdef BN_HAVE_AVX512VNNI
extern const bn_isa_ops bn_ops_avx512vnni;
#endif
#ifdef BN_HAVE_NEONDOT
extern const bn_isa_ops bn_ops_neondot;
#endif

/* The table for `isa` if it was compiled in and this CPU runs it, else NULL. The first call (or bn_isa_init,
 * which the Python module runs at import, before any thread exists) probes the CPU. */
void bn_isa_init(void);
const bn_isa_ops *bn_isa_get(int isa);
int bn_isa_best(void);

/* Exactly the reference's float math: activation scale, and y = acc * (s / a). */
static inline float bn_act_scale(float amax) {
    float m = amax > 1e-5f ? amax : 1e-5f;
    return (1.0f / m) * 127.0f; /* torch evaluates 127 / t as reciprocal(t) * 127 */
}

static inline void bn_store(const bn_act *x, const bn_tmat *w, int64_t m, int64_t n, int32_t acc) {
    float s = w->scale[n * w->scale_stride];
    w->y[m * w->ldy + n] = (float)(acc - x->rowsum[m]) * (s / x->a[m]);
}

/* The 4-bit head's dot products of rows [n0, n1) (n0 a multiple of BN_ROWS): portable, and AVX2 (which the
 * AVX-512 table shares, as NEON shares the portable one: 4-bit reads are half the int8 head's, so the vector
 * width matters less than the bandwidth). */
void bn_int4_scalar(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1);
void bn_int4_avx2(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1);

static inline void bn_store_head(const bn_act *x, const bn_qmat *w, int64_t m, int64_t n, int32_t dot) {
    w->y[m * w->ldy + n] = (float)dot * (w->scale[n] / x->a[m]);
}

/* Attention's float loops: a dot product as 8 partial sums combined ((0+1)+(2+3))+((4+5)+(6+7)), and
 * y += a * x. Both versions give the same bits (the build turns floating-point contraction off, so no fused
 * multiply-add changes a rounding), so which one runs never changes a result. */
float bn_dot_f32_scalar(const float *a, const float *b, int64_t n);
void bn_axpy_f32_scalar(float a, const float *x, float *y, int64_t n);
float bn_dot_f32_avx2(const float *a, const float *b, int64_t n);
void bn_axpy_f32_avx2(float a, const float *x, float *y, int64_t n);
/* The same loops over bfloat16 keys / values (b, x), widened exactly to float32 first. */
float bn_dot_bf16_scalar(const float *a, const uint16_t *b, int64_t n);
void bn_axpy_bf16_scalar(float a, const uint16_t *x, float *y, int64_t n);
float bn_dot_bf16_avx2(const float *a, const uint16_t *b, int64_t n);
void bn_axpy_bf16_avx2(float a, const uint16_t *x, float *y, int64_t n);

/* bfloat16 <-> float32 as torch converts: round to nearest even (NaN stays a quiet NaN); widening is exact. */
static inline uint16_t bn_bf16_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bn_f32_from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One element of a float32 or bfloat16 row as float32: the loads the dot/axpy bodies for both row types take */
static inline float bn_load_f32(const float *p) { return *p; }
static inline float bn_load_bf16(const uint16_t *p) { return bn_f32_from_bf16(*p); }

/* argmax: portable, and AVX2 (which the AVX-512 table shares, as NEON shares the portable one) */
int64_t bn_argmax_f32_scalar(const float *x, int64_t n);
int64_t bn_argmax_f32_avx2(const float *x, int64_t n);

/* Portable quantization of one row; every ISA's vector version must give the same bytes. */
void bn_quantize_row_scalar(const float *x, int64_t k, int64_t k_pad, int8_t *xq, float *a, int32_t *rowsum);
void bn_quantize_row_avx2(const float *x, int64_t k, int64_t k_pad, int8_t *xq, float *a, int32_t *rowsum);

#endif
