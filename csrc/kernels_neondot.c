/* ARM NEON kernels with the dot-product extension (compiled with -march=armv8.2-a+dotprod; only called after
 * the CPU reports it). sdot adds four signed byte products into each int32 lane: a lane grows by at most
 * 4 * 2 * 128 = 1024 per instruction for ternary codes (0..2 are valid signed bytes), so nothing saturates.
 */
#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "bitnet_cpu.h"

#define GEMM_MC 64
#define GEMM_KC 2048

static void gemv_tile(const uint8_t *tile, int64_t nkb, const int8_t *x, int32_t out[BN_ROWS]) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t acc[BN_ROWS][2];
    for (int r = 0; r < BN_ROWS; r++) acc[r][0] = acc[r][1] = vdupq_n_s32(0);
    for (int64_t kb = 0; kb < nkb; kb++) {
        const int8_t *xb = x + kb * BN_KBLOCK;
        const uint8_t *b = tile + kb * BN_TILE_KBLOCK_BYTES;
        for (int h = 0; h < 2; h++) {
            int8x16_t x0 = vld1q_s8(xb + 16 * h), x1 = vld1q_s8(xb + 32 + 16 * h);
            int8x16_t x2 = vld1q_s8(xb + 64 + 16 * h), x3 = vld1q_s8(xb + 96 + 16 * h);
            for (int r = 0; r < BN_ROWS; r++) {
                uint8x16_t v = vld1q_u8(b + r * BN_RUN + 16 * h);
                int32x4_t s = acc[r][h];
                s = vdotq_s32(s, vreinterpretq_s8_u8(vandq_u8(v, m3)), x0);
                s = vdotq_s32(s, vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m3)), x1);
                s = vdotq_s32(s, vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m3)), x2);
                s = vdotq_s32(s, vreinterpretq_s8_u8(vshrq_n_u8(v, 6)), x3);
                acc[r][h] = s;
            }
        }
    }
    for (int r = 0; r < BN_ROWS; r++) out[r] = vaddvq_s32(vaddq_s32(acc[r][0], acc[r][1]));
}

static void unpack_tile(const uint8_t *tile, int64_t kb0, int64_t kc, uint8_t *dst) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    for (int64_t kb = 0; kb < kc / BN_KBLOCK; kb++) {
        const uint8_t *b = tile + (kb0 + kb) * BN_TILE_KBLOCK_BYTES;
        for (int r = 0; r < BN_ROWS; r++) {
            uint8_t *d = dst + r * GEMM_KC + kb * BN_KBLOCK;
            for (int h = 0; h < 2; h++) {
                uint8x16_t v = vld1q_u8(b + r * BN_RUN + 16 * h);
                vst1q_u8(d + 16 * h, vandq_u8(v, m3));
                vst1q_u8(d + 32 + 16 * h, vandq_u8(vshrq_n_u8(v, 2), m3));
                vst1q_u8(d + 64 + 16 * h, vandq_u8(vshrq_n_u8(v, 4), m3));
                vst1q_u8(d + 96 + 16 * h, vshrq_n_u8(v, 6));
            }
        }
    }
}

#define MICRO(NC)                                                                                            \
    static inline void micro_##NC(const uint8_t *wb, const int8_t *x, int64_t ldx, int64_t kc, int32x4_t *acc) { \
        int32x4_t a[NC][BN_ROWS];                                                                            \
        for (int c = 0; c < NC; c++)                                                                         \
            for (int r = 0; r < BN_ROWS; r++) a[c][r] = acc[c * BN_ROWS + r];                                \
        for (int64_t k = 0; k < kc; k += 16) {                                                               \
            int8x16_t w0 = vld1q_s8((const int8_t *)wb + k);                                                 \
            int8x16_t w1 = vld1q_s8((const int8_t *)wb + GEMM_KC + k);                                       \
            int8x16_t w2 = vld1q_s8((const int8_t *)wb + 2 * GEMM_KC + k);                                   \
            int8x16_t w3 = vld1q_s8((const int8_t *)wb + 3 * GEMM_KC + k);                                   \
            for (int c = 0; c < NC; c++) {                                                                   \
                int8x16_t xv = vld1q_s8(x + c * ldx + k);                                                    \
                a[c][0] = vdotq_s32(a[c][0], w0, xv);                                                        \
                a[c][1] = vdotq_s32(a[c][1], w1, xv);                                                        \
                a[c][2] = vdotq_s32(a[c][2], w2, xv);                                                        \
                a[c][3] = vdotq_s32(a[c][3], w3, xv);                                                        \
            }                                                                                                \
        }                                                                                                    \
        for (int c = 0; c < NC; c++)                                                                         \
            for (int r = 0; r < BN_ROWS; r++) acc[c * BN_ROWS + r] = a[c][r];                                \
    }
MICRO(1)
MICRO(4)

static void gemm_tiles(const bn_act *x, const bn_tmat *w, int64_t t0, int64_t t1) {
    _Alignas(BN_ALIGN) uint8_t wbuf[BN_ROWS * GEMM_KC];
    int32x4_t acc[GEMM_MC * BN_ROWS];
    int64_t nkb = x->k_pad / BN_KBLOCK;
    for (int64_t m0 = 0; m0 < x->m; m0 += GEMM_MC) {
        int64_t mc = x->m - m0 < GEMM_MC ? x->m - m0 : GEMM_MC;
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *tile = w->w + t * nkb * BN_TILE_KBLOCK_BYTES;
            for (int64_t i = 0; i < mc * BN_ROWS; i++) acc[i] = vdupq_n_s32(0);
            for (int64_t k0 = 0; k0 < x->k_pad; k0 += GEMM_KC) {
                int64_t kc = x->k_pad - k0 < GEMM_KC ? x->k_pad - k0 : GEMM_KC;
                unpack_tile(tile, k0 / BN_KBLOCK, kc, wbuf);
                const int8_t *xk = x->xq + m0 * x->ldx + k0;
                int64_t m = 0;
                for (; m + 4 <= mc; m += 4) micro_4(wbuf, xk + m * x->ldx, x->ldx, kc, acc + m * BN_ROWS);
                for (; m < mc; m++) micro_1(wbuf, xk + m * x->ldx, x->ldx, kc, acc + m * BN_ROWS);
            }
            for (int64_t m = 0; m < mc; m++)
                for (int r = 0; r < BN_ROWS && t * BN_ROWS + r < w->n; r++)
                    bn_store(x, w, m0 + m, t * BN_ROWS + r, vaddvq_s32(acc[m * BN_ROWS + r]));
        }
    }
}

static void ternary_neondot(const bn_act *x, const bn_tmat *w, int64_t t0, int64_t t1) {
    if (x->m >= BN_GEMM_MIN_ROWS) {
        gemm_tiles(x, w, t0, t1);
        return;
    }
    int64_t nkb = x->k_pad / BN_KBLOCK;
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = w->w + t * nkb * BN_TILE_KBLOCK_BYTES;
        for (int64_t m = 0; m < x->m; m++) {
            int32_t out[BN_ROWS];
            gemv_tile(tile, nkb, x->xq + m * x->ldx, out);
            for (int r = 0; r < BN_ROWS && t * BN_ROWS + r < w->n; r++) bn_store(x, w, m, t * BN_ROWS + r, out[r]);
        }
    }
}

static void int8_neondot(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1) {
    int64_t chunks = x->k_pad / 32;
    for (int64_t n = n0; n < n1; n += BN_ROWS) { /* tiles outside: a tile is read once for all rows of x */
        const int8_t *tile = w->w + n / BN_ROWS * chunks * BN_ROWS * 32;
        for (int64_t m = 0; m < x->m; m++) {
            const int8_t *xr = x->xq + m * x->ldx;
            int32x4_t acc[BN_ROWS] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
            for (int64_t c = 0; c < chunks; c++) {
                int8x16_t x0 = vld1q_s8(xr + c * 32), x1 = vld1q_s8(xr + c * 32 + 16);
                const int8_t *b = tile + c * BN_ROWS * 32;
                for (int r = 0; r < BN_ROWS; r++)
                    acc[r] = vdotq_s32(vdotq_s32(acc[r], vld1q_s8(b + r * 32), x0), vld1q_s8(b + r * 32 + 16), x1);
            }
            for (int r = 0; r < BN_ROWS && n + r < n1; r++)
                w->y[m * w->ldy + n + r] = (float)vaddvq_s32(acc[r]) * (w->scale[n + r] / x->a[m]);
        }
    }
}

static void quantize_neon(const float *x, int64_t k, int64_t k_pad, int8_t *xq, float *a, int32_t *rowsum) {
    float32x4_t vmax = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 4 <= k; i += 4) vmax = vmaxq_f32(vmax, vabsq_f32(vld1q_f32(x + i)));
    float amax = vmaxvq_f32(vmax);
    for (; i < k; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    if (!(amax < INFINITY)) {
        bn_quantize_row_scalar(x, k, k_pad, xq, a, rowsum);
        return;
    }
    float s = bn_act_scale(amax);
    float32x4_t vs = vdupq_n_f32(s), lo = vdupq_n_f32(-128.0f), hi = vdupq_n_f32(127.0f);
    int32x4_t sum = vdupq_n_s32(0);
    for (i = 0; i + 8 <= k; i += 8) {
        /* vrndnq: round to nearest, ties to even, as torch.round */
        int32x4_t q0 = vcvtq_s32_f32(vminq_f32(vmaxq_f32(vrndnq_f32(vmulq_f32(vld1q_f32(x + i), vs)), lo), hi));
        int32x4_t q1 = vcvtq_s32_f32(vminq_f32(vmaxq_f32(vrndnq_f32(vmulq_f32(vld1q_f32(x + i + 4), vs)), lo), hi));
        sum = vaddq_s32(sum, vaddq_s32(q0, q1));
        int16x8_t q16 = vcombine_s16(vmovn_s32(q0), vmovn_s32(q1));
        vst1_s8(xq + i, vmovn_s16(q16));
    }
    int32_t total = vaddvq_s32(sum);
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

const bn_isa_ops bn_ops_neondot = {"neondot", ternary_neondot, int8_neondot, bn_int4_scalar, quantize_neon,
                                   bn_argmax_f32_scalar};
