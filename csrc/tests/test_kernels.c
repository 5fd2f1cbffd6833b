/* Standalone test of every compiled-in, CPU-supported kernel table against a naive C model, through the
 * thread pool as the Python module calls them. Meant for sanitizer builds and for foreign architectures under
 * emulation (see benchmarks/RESULTS.md for the commands). Exit status 0 when every case matches exactly. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_cpu.h"
#include "ops.h"
#include "threadpool.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

/* codes [n][k] in {-1,0,1} -> cpu_i2 tiles */
static uint8_t *pack(const int8_t *codes, int64_t n, int64_t k, int64_t k_pad) {
    int64_t tiles = (n + BN_ROWS - 1) / BN_ROWS, nkb = k_pad / BN_KBLOCK;
    uint8_t *p = malloc((size_t)(tiles * nkb * BN_TILE_KBLOCK_BYTES));
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t kb = 0; kb < nkb; kb++)
            for (int r = 0; r < BN_ROWS; r++)
                for (int m = 0; m < BN_RUN; m++) {
                    unsigned byte = 0;
                    for (int j = 0; j < 4; j++) {
                        int64_t row = t * BN_ROWS + r, col = kb * BN_KBLOCK + 32 * j + m;
                        int code = (row < n && col < k) ? codes[row * k + col] + 1 : 1;
                        byte |= (unsigned)code << (2 * j);
                    }
                    p[((t * nkb + kb) * BN_ROWS + r) * BN_RUN + m] = (uint8_t)byte;
                }
    return p;
}

static int check_case(int isa, int64_t m, int64_t n, int64_t k, int extreme) {
    const bn_isa_ops *ops = bn_isa_get(isa);
    int64_t k_pad = (k + BN_KBLOCK - 1) / BN_KBLOCK * BN_KBLOCK;
    int8_t *codes = malloc((size_t)(n * k));
    float *x = malloc(sizeof(float) * (size_t)(m * k));
    for (int64_t i = 0; i < n * k; i++) codes[i] = (int8_t)(extreme ? ((i / k) % 2 ? 1 : -1) : (int)(next_u32() % 3) - 1);
    for (int64_t i = 0; i < m * k; i++)
        /* extreme: every row all +1 or all -1, quantizing to +-127: the largest sums the int16 stages see */
        x[i] = extreme ? ((i / k) % 2 ? 1.0f : -1.0f) : ((float)(next_u32() % 20001) - 10000.0f) / 997.0f;
    uint8_t *w = pack(codes, n, k, k_pad);
    float scale = 0.0123f;
    float *y = malloc(sizeof(float) * (size_t)(m * n));
    bn_input in = {x, m, k, k, NULL, 0.0f};
    bn_act act;
    bn_tmat mat = {w, n, &scale, 0, y, n};
    bn_pool_lock();
    int rc = bn_quantize_input(ops, &in, &act);
    if (rc == 0) bn_run_ternary(ops, &act, &mat, 1);
    int bad = rc != 0;
    for (int64_t i = 0; i < m && !bad; i++) {
        float a_ref;
        int32_t sum_ref;
        int8_t *q = malloc((size_t)k_pad);
        bn_quantize_row_scalar(x + i * k, k, k_pad, q, &a_ref, &sum_ref);
        if (memcmp(q, act.xq + i * act.ldx, (size_t)k_pad) || a_ref != act.a[i] || sum_ref != act.rowsum[i]) {
            printf("  quantize mismatch row %lld\n", (long long)i);
            bad = 1;
        }
        for (int64_t j = 0; j < n && !bad; j++) {
            int32_t acc = 0;
            for (int64_t c = 0; c < k; c++) acc += codes[j * k + c] * q[c];
            float ref = (float)acc * (scale / a_ref);
            if (ref != y[i * n + j]) {
                printf("  mismatch m=%lld n=%lld: %g vs %g\n", (long long)i, (long long)j, y[i * n + j], ref);
                bad = 1;
            }
        }
        free(q);
    }
    bn_pool_unlock();
    printf("%-11s ternary m=%-4lld n=%-5lld k=%-5lld%s %s\n", ops->name, (long long)m, (long long)n, (long long)k,
           extreme ? " (+-127)" : "", bad ? "FAIL" : "ok");
    free(codes), free(x), free(w), free(y);
    return bad;
}

static int check_int8(int isa, int64_t m, int64_t n, int64_t k) {
    const bn_isa_ops *ops = bn_isa_get(isa);
    int64_t k_pad = (k + BN_KBLOCK - 1) / BN_KBLOCK * BN_KBLOCK;
    int64_t tiles = (n + BN_ROWS - 1) / BN_ROWS;
    int8_t *w = calloc((size_t)(tiles * BN_ROWS * k_pad), 1), *tiled = calloc((size_t)(tiles * BN_ROWS * k_pad), 1);
    float *x = malloc(sizeof(float) * (size_t)(m * k)), *scale = malloc(sizeof(float) * (size_t)n);
    float *y = malloc(sizeof(float) * (size_t)(m * n));
    for (int64_t j = 0; j < n; j++) {
        scale[j] = 0.001f * (float)(j % 7 + 1);
        for (int64_t c = 0; c < k; c++) w[j * k_pad + c] = (int8_t)((int)(next_u32() % 255) - 127);
    }
    for (int64_t i = 0; i < m * k; i++) x[i] = ((float)(next_u32() % 2001) - 1000.0f) / 99.0f;
    for (int64_t j = 0; j < tiles * BN_ROWS; j++) /* row-major -> tiles of 4 rows x 32-value chunks */
        for (int64_t c = 0; c < k_pad; c++)
            tiled[((j / BN_ROWS * (k_pad / 32) + c / 32) * BN_ROWS + j % BN_ROWS) * 32 + c % 32] = w[j * k_pad + c];
    bn_input in = {x, m, k, k, NULL, 0.0f};
    bn_act act;
    bn_qmat q = {tiled, n, scale, y, n};
    bn_pool_lock();
    int bad = bn_quantize_input(ops, &in, &act) != 0;
    if (!bad) bn_run_int8(ops, &act, &q);
    for (int64_t i = 0; i < m && !bad; i++)
        for (int64_t j = 0; j < n && !bad; j++) {
            int32_t acc = 0;
            for (int64_t c = 0; c < k; c++) acc += w[j * k_pad + c] * act.xq[i * act.ldx + c];
            if ((float)acc * (scale[j] / act.a[i]) != y[i * n + j]) bad = 1;
        }
    bn_pool_unlock();
    printf("%-11s int8    m=%-4lld n=%-5lld k=%-5lld %s\n", ops->name, (long long)m, (long long)n, (long long)k,
           bad ? "FAIL" : "ok");
    free(w), free(tiled), free(x), free(scale), free(y);
    return bad;
}

int main(void) {
    static const int64_t shapes[][3] = {{1, 2560, 2560}, {1, 6912, 2560}, {1, 2560, 6912}, {3, 3200, 8640},
                                        {5, 8640, 3200}, {1, 7, 130},     {2, 37, 1000},    {9, 41, 3200},
                                        {67, 29, 2560},  {1, 1, 1},       {4, 5, 129}};
    int fails = 0, ran = 0;
    bn_pool_set_threads(2);
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        if (!bn_isa_get(isa)) continue;
        ran++;
        for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            fails += check_case(isa, shapes[s][0], shapes[s][1], shapes[s][2], 0);
        fails += check_case(isa, 2, 8, 8640, 1);
        fails += check_case(isa, 6, 12, 8640, 1);
        fails += check_int8(isa, 1, 1003, 2560);
        fails += check_int8(isa, 3, 17, 300);
    }
    printf("%d kernel tables tested\n%d passed, %d failed\n", ran, ran * 15 - fails, fails);
    return fails != 0;
}
