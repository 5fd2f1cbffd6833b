/* Portable C kernels: the fallback on any CPU, and the model the vector kernels are tested against. */
#include <math.h>
#include <string.h>

#include "bitnet_cpu.h"

void bn_quantize_row_scalar(const float *x, int64_t k, int64_t k_pad, int8_t *xq, float *a, int32_t *rowsum) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        float v = fabsf(x[i]);
        amax = v > amax ? v : amax;
    }
    float s = bn_act_scale(amax);
    int32_t sum = 0;
    for (int64_t i = 0; i < k; i++) {
        float v = nearbyintf(x[i] * s); /* default rounding mode: half to even, as torch.round */
        int32_t q = v >= 127.0f ? 127 : v <= -128.0f ? -128 : (v == v ? (int32_t)v : 0);
        xq[i] = (int8_t)q;
        sum += q;
    }
    memset(xq + k, 0, (size_t)(k_pad - k));
    *a = s;
    *rowsum = sum;
}

static int32_t dot_run(const uint8_t *run, const int8_t *x) {
    int32_t acc = 0;
    for (int i = 0; i < BN_RUN; i++) {
        unsigned v = run[i];
        acc += (int32_t)(v & 3) * x[i] + (int32_t)((v >> 2) & 3) * x[i + 32] + (int32_t)((v >> 4) & 3) * x[i + 64] +
               (int32_t)(v >> 6) * x[i + 96];
    }
    return acc;
}

static void ternary_scalar(const bn_act *x, const bn_tmat *w, int64_t t0, int64_t t1) {
    int64_t nkb = x->k_pad / BN_KBLOCK;
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = w->w + t * nkb * BN_TILE_KBLOCK_BYTES;
        for (int r = 0; r < BN_ROWS && t * BN_ROWS + r < w->n; r++) {
            for (int64_t m = 0; m < x->m; m++) {
                const int8_t *xr = x->xq + m * x->ldx;
                int32_t acc = 0;
                for (int64_t kb = 0; kb < nkb; kb++)
                    acc += dot_run(tile + (kb * BN_ROWS + r) * BN_RUN, xr + kb * BN_KBLOCK);
                bn_store(x, w, m, t * BN_ROWS + r, acc);
            }
        }
    }
}

static void int8_scalar(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1) {
    int64_t chunks = x->k_pad / 32;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *tile = w->w + n / BN_ROWS * chunks * BN_ROWS * 32 + n % BN_ROWS * 32;
        for (int64_t m = 0; m < x->m; m++) {
            const int8_t *xr = x->xq + m * x->ldx;
            int32_t acc = 0;
            for (int64_t c = 0; c < chunks; c++)
                for (int i = 0; i < 32; i++) acc += (int32_t)tile[c * BN_ROWS * 32 + i] * xr[c * 32 + i];
            w->y[m * w->ldy + n] = (float)acc * (w->scale[n] / x->a[m]);
        }
    }
}

void bn_int4_scalar(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1) {
    int64_t chunks = x->k_pad / BN_INT4_CHUNK;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = (const uint8_t *)w->w + n / BN_ROWS * chunks * BN_ROWS * 32 + n % BN_ROWS * 32;
        for (int64_t m = 0; m < x->m; m++) {
            const int8_t *xr = x->xq + m * x->ldx;
            int32_t acc = 0;
            for (int64_t c = 0; c < chunks; c++)
                for (int i = 0; i < 32; i++) {
                    unsigned b = row[c * BN_ROWS * 32 + i];
                    acc += (int32_t)(b & 15) * xr[c * 64 + i] + (int32_t)(b >> 4) * xr[c * 64 + 32 + i];
                }
            bn_store_head(x, w, m, n, acc - 8 * x->rowsum[m]);
        }
    }
}

int64_t bn_argmax_f32_scalar(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n && x[best] == x[best]; i++) /* stops at the first NaN: nothing ranks above it */
        if (x[i] > x[best] || x[i] != x[i]) best = i;
    return best;
}

const bn_isa_ops bn_ops_scalar = {"scalar", ternary_scalar, int8_scalar, bn_int4_scalar, bn_quantize_row_scalar,
                                  bn_argmax_f32_scalar};
