/* Standalone test of every compiled-in, CPU-supported kernel table against a naive C model, through the
 * thread pool as the Python module calls them. Meant for sanitizer builds and for foreign architectures under
 * emulation (see benchmarks/RESULTS.md for the commands). Exit status 0 when every case matches exactly. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_cpu.h"
#include "decoder.h"
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

/* row-major w [n][k_pad] in [-7, 7] -> the 4-bit head's nibble tiles (w + 8) */
static uint8_t *tile_int4(const int8_t *w, int64_t n, int64_t k_pad) {
    int64_t tiles = (n + BN_ROWS - 1) / BN_ROWS, chunks = k_pad / BN_INT4_CHUNK;
    uint8_t *p = malloc((size_t)(tiles * chunks * BN_ROWS * 32));
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t c = 0; c < chunks; c++)
            for (int r = 0; r < BN_ROWS; r++)
                for (int i = 0; i < 32; i++) {
                    int64_t row = t * BN_ROWS + r;
                    const int8_t *src = w + row * k_pad + c * 64 + i;
                    int lo = row < n ? src[0] : 0, hi = row < n ? src[32] : 0;
                    p[((t * chunks + c) * BN_ROWS + r) * 32 + i] = (uint8_t)((lo + 8) | (hi + 8) << 4);
                }
    return p;
}

static int check_head(int isa, int bits, int64_t m, int64_t n, int64_t k) {
    const bn_isa_ops *ops = bn_isa_get(isa);
    int64_t k_pad = (k + BN_KBLOCK - 1) / BN_KBLOCK * BN_KBLOCK;
    int64_t tiles = (n + BN_ROWS - 1) / BN_ROWS;
    int8_t *w = calloc((size_t)(tiles * BN_ROWS * k_pad), 1), *tiled = calloc((size_t)(tiles * BN_ROWS * k_pad), 1);
    float *x = malloc(sizeof(float) * (size_t)(m * k)), *scale = malloc(sizeof(float) * (size_t)n);
    float *y = malloc(sizeof(float) * (size_t)(m * n));
    for (int64_t j = 0; j < n; j++) {
        scale[j] = 0.001f * (float)(j % 7 + 1);
        for (int64_t c = 0; c < k; c++)
            w[j * k_pad + c] = (int8_t)(bits == 8 ? (int)(next_u32() % 255) - 127 : (int)(next_u32() % 15) - 7);
    }
    for (int64_t i = 0; i < m * k; i++) x[i] = ((float)(next_u32() % 2001) - 1000.0f) / 99.0f;
    for (int64_t j = 0; j < tiles * BN_ROWS; j++) /* row-major -> tiles of 4 rows x 32-value chunks */
        for (int64_t c = 0; c < k_pad; c++)
            tiled[((j / BN_ROWS * (k_pad / 32) + c / 32) * BN_ROWS + j % BN_ROWS) * 32 + c % 32] = w[j * k_pad + c];
    uint8_t *nibbles = bits == 4 ? tile_int4(w, n, k_pad) : NULL;
    bn_input in = {x, m, k, k, NULL, 0.0f};
    bn_act act;
    bn_qmat q = {bits == 8 ? tiled : (const int8_t *)nibbles, n, scale, y, n};
    bn_pool_lock();
    int bad = bn_quantize_input(ops, &in, &act) != 0;
    if (!bad) bn_run_head(ops, &act, &q, bits);
    for (int64_t i = 0; i < m && !bad; i++)
        for (int64_t j = 0; j < n && !bad; j++) {
            int32_t acc = 0;
            for (int64_t c = 0; c < k; c++) acc += w[j * k_pad + c] * act.xq[i * act.ldx + c];
            if ((float)acc * (scale[j] / act.a[i]) != y[i * n + j]) bad = 1;
        }
    bn_pool_unlock();
    printf("%-11s int%-4d m=%-4lld n=%-5lld k=%-5lld %s\n", ops->name, bits, (long long)m, (long long)n, (long long)k,
           bad ? "FAIL" : "ok");
    free(w), free(tiled), free(nibbles), free(x), free(scale), free(y);
    return bad;
}

/* Two layers of odd sizes (K not a multiple of 128, rows not of 4, GQA), 2 sequences at different positions:
 * this ISA's decoder gives the same bytes as the portable one (the kernels are integer-exact and the float
 * code around them is shared), and under the sanitizers no access strays. */
enum { D_LAYERS = 2, D_HIDDEN = 200, D_INTER = 333, D_HEADS = 6, D_KV = 2, D_DIM = 18, D_BATCH = 2, D_KEYS = 9 };

static void decoder_pass(int isa, const bn_decoder *d, float *x, void *kc, void *vc, int kv_type, int64_t queries,
                         const int64_t *pos, const float *cs, const float *sn) {
    bn_step s = {x, D_BATCH, queries, pos, cs, sn, kc, vc, (int64_t)D_BATCH * D_KV * D_KEYS * D_DIM,
                 (int64_t)D_KV * D_KEYS * D_DIM, (int64_t)D_KEYS * D_DIM, D_KEYS, kv_type};
    bn_pool_lock();
    if (bn_decoder_run(bn_isa_get(isa), d, &s)) printf("  decoder run failed\n");
    bn_pool_unlock();
}

static int check_decoder(int isa, int kv_type) {
    static const int64_t rows[7] = {D_HEADS * D_DIM, D_KV * D_DIM, D_KV * D_DIM, D_HIDDEN, D_INTER, D_INTER, D_HIDDEN};
    static const int64_t cols[7] = {D_HIDDEN, D_HIDDEN, D_HIDDEN, D_HEADS * D_DIM, D_HIDDEN, D_HIDDEN, D_INTER};
    bn_layer layers[D_LAYERS];
    uint8_t *packed[D_LAYERS][7];
    float norms[D_LAYERS][4][D_INTER], scale = 0.05f;
    for (int l = 0; l < D_LAYERS; l++) {
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < D_INTER; j++) norms[l][i][j] = 0.5f + (float)(next_u32() % 1000) / 1000.0f;
        bn_layer *L = &layers[l];
        bn_tmat *mats[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (int i = 0; i < 7; i++) {
            int8_t *codes = malloc((size_t)(rows[i] * cols[i]));
            for (int64_t j = 0; j < rows[i] * cols[i]; j++) codes[j] = (int8_t)((int)(next_u32() % 3) - 1);
            packed[l][i] = pack(codes, rows[i], cols[i], (cols[i] + BN_KBLOCK - 1) / BN_KBLOCK * BN_KBLOCK);
            *mats[i] = (bn_tmat){packed[l][i], rows[i], &scale, 0, NULL, 0};
            free(codes);
        }
        layers[l].attn_norm = norms[l][0], layers[l].attn_sub_norm = norms[l][1];
        layers[l].ffn_norm = norms[l][2], layers[l].ffn_sub_norm = norms[l][3];
    }
    bn_decoder d = {D_LAYERS, D_HIDDEN, D_INTER, D_HEADS, D_KV, D_DIM, 1e-5f, 0.25f, BN_ACT_RELU2, layers};
    size_t cache = (size_t)D_LAYERS * D_BATCH * D_KV * D_KEYS * D_DIM * (kv_type == BN_KV_BF16 ? 2 : 4);
    float *x[2];
    void *kc[2], *vc[2];
    float cs[D_BATCH * 3 * D_DIM], sn[D_BATCH * 3 * D_DIM], x0[D_BATCH * 3 * D_HIDDEN];
    for (int i = 0; i < D_BATCH * 3 * D_DIM; i++)
        cs[i] = (float)(next_u32() % 2001) / 1000.0f - 1.0f, sn[i] = cs[i] * 0.5f;
    for (int i = 0; i < D_BATCH * 3 * D_HIDDEN; i++) x0[i] = (float)(next_u32() % 2001) / 100.0f - 10.0f;
    int64_t prompt_pos[D_BATCH * 3] = {0, 1, 2, 4, 5, 6}, step_pos[D_BATCH] = {3, 7};
    for (int pass = 0; pass < 2; pass++) {
        x[pass] = malloc(sizeof x0), kc[pass] = calloc(cache, 1), vc[pass] = calloc(cache, 1);
        memcpy(x[pass], x0, sizeof x0);
        int which = pass ? isa : BN_ISA_SCALAR;
        decoder_pass(which, &d, x[pass], kc[pass], vc[pass], kv_type, 3, prompt_pos, cs, sn);
        /* x rows 0, 1 as new tokens */
        decoder_pass(which, &d, x[pass], kc[pass], vc[pass], kv_type, 1, step_pos, cs, sn);
    }
    int bad = memcmp(x[0], x[1], sizeof x0) || memcmp(kc[0], kc[1], cache) || memcmp(vc[0], vc[1], cache);
    for (int i = 0; i < D_BATCH * 3 * D_HIDDEN; i++) bad |= !isfinite(x[1][i]);
    printf("%-11s decoder 2 layers, hidden %d, inter %d, %s cache %s\n", bn_isa_get(isa)->name, D_HIDDEN, D_INTER,
           kv_type == BN_KV_BF16 ? "bf16" : "f32", bad ? "FAIL" : "ok");
    for (int pass = 0; pass < 2; pass++) free(x[pass]), free(kc[pass]), free(vc[pass]);
    for (int l = 0; l < D_LAYERS; l++)
        for (int i = 0; i < 7; i++) free(packed[l][i]);
    return bad;
}

/* The vector float loops of attention give the same bits as the portable ones, for odd lengths too, over float32
 * and bfloat16 rows. */
static int check_float_loops(void) {
    int bad = 0;
#ifdef BN_HAVE_AVX2
    if (!bn_isa_get(BN_ISA_AVX2)) return 0;
    float a[131], b[131], y0[131], y1[131];
    uint16_t h[131];
    for (int n = 1; n <= 131; n += 13) {
        for (int i = 0; i < n; i++)
            a[i] = (float)(next_u32() % 20001) / 777.0f - 12.0f, b[i] = (float)(next_u32() % 20001) / 333.0f - 30.0f,
            y0[i] = y1[i] = b[i] * 0.37f, h[i] = bn_bf16_from_f32(a[i] * 1.7f);
        float d0 = bn_dot_f32_scalar(a, b, n), d1 = bn_dot_f32_avx2(a, b, n);
        bn_axpy_f32_scalar(0.731f, a, y0, n);
        bn_axpy_f32_avx2(0.731f, a, y1, n);
        bad |= memcmp(&d0, &d1, sizeof d0) != 0 || memcmp(y0, y1, sizeof(float) * (size_t)n) != 0;
        d0 = bn_dot_bf16_scalar(b, h, n), d1 = bn_dot_bf16_avx2(b, h, n);
        bn_axpy_bf16_scalar(-1.37f, h, y0, n);
        bn_axpy_bf16_avx2(-1.37f, h, y1, n);
        bad |= memcmp(&d0, &d1, sizeof d0) != 0 || memcmp(y0, y1, sizeof(float) * (size_t)n) != 0;
    }
    printf("avx2        attention float loops vs portable %s\n", bad ? "FAIL" : "ok");
#endif
    return bad;
}

/* Each table's argmax against a plain loop (the first NaN, else the first maximum): random rows of every length
 * up to 70, with repeated maxima, a NaN or infinities planted. */
static int check_argmax(int isa) {
    const bn_isa_ops *ops = bn_isa_get(isa);
    float x[70];
    int bad = 0;
    for (int n = 1; n <= 70; n++)
        for (int variant = 0; variant < 5; variant++) {
            for (int i = 0; i < n; i++) x[i] = (float)(next_u32() % 9) - 4.0f; /* few values: ties */
            int at = (int)(next_u32() % (unsigned)n);
            if (variant == 1) x[at] = NAN;
            if (variant == 2) x[at] = -INFINITY, x[(at + 1) % n] = NAN;
            if (variant == 3)
                for (int i = 0; i < n; i++) x[i] = -INFINITY;
            if (variant == 4) x[at] = INFINITY, x[n - 1] = INFINITY;
            int64_t want = 0;
            for (int64_t i = 0; i < n; i++) {
                if (x[i] != x[i]) {
                    want = i;
                    break;
                }
                if (x[i] > x[want]) want = i;
            }
            bad |= ops->argmax(x, n) != want;
        }
    printf("%-11s argmax %s\n", ops->name, bad ? "FAIL" : "ok");
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
        fails += check_head(isa, 8, 1, 1003, 2560);
        fails += check_head(isa, 8, 3, 17, 300);
        fails += check_head(isa, 4, 1, 1003, 2560);
        fails += check_head(isa, 4, 3, 17, 300);
        fails += check_decoder(isa, BN_KV_F32);
        fails += check_decoder(isa, BN_KV_BF16);
        fails += check_argmax(isa);
    }
    fails += check_float_loops();
    printf("%d kernel tables tested\n%d passed, %d failed\n", ran, ran * 20 + 1 - fails, fails);
    return fails != 0;
}
