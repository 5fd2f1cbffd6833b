/* Timing of the ternary kernels through the thread pool, wall and CPU time:
 * bench_kernels [isa] [m] [n] [k] [reps] [threads]. Also the program to run under callgrind or perf. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bitnet_cpu.h"
#include "ops.h"
#include "threadpool.h"

int main(int argc, char **argv) {
    int isa = argc > 1 ? atoi(argv[1]) : bn_isa_best();
    int64_t m = argc > 2 ? atoll(argv[2]) : 1, n = argc > 3 ? atoll(argv[3]) : 6912, k = argc > 4 ? atoll(argv[4]) : 2560;
    int reps = argc > 5 ? atoi(argv[5]) : 20;
    int threads = argc > 6 ? atoi(argv[6]) : 1;
    bn_pool_set_threads(threads);
    const bn_isa_ops *ops = bn_isa_get(isa);
    if (!ops) {
        fprintf(stderr, "ISA %d not available\n", isa);
        return 1;
    }
    int64_t k_pad = (k + BN_KBLOCK - 1) / BN_KBLOCK * BN_KBLOCK, tiles = (n + BN_ROWS - 1) / BN_ROWS;
    size_t wbytes = (size_t)(tiles * (k_pad / BN_KBLOCK) * BN_TILE_KBLOCK_BYTES);
    uint8_t *w = malloc(wbytes);
    float *x = malloc(sizeof(float) * (size_t)(m * k)), *y = malloc(sizeof(float) * (size_t)(m * n));
    for (size_t i = 0; i < wbytes; i++) w[i] = (uint8_t)(rand() & 0xff) & 0xaa; /* codes 0 or 2 */
    for (int64_t i = 0; i < m * k; i++) x[i] = (float)(rand() % 2001 - 1000);
    float scale = 1.0f;
    bn_tmat mat = {w, n, &scale, 0, y, n};
    bn_input in = {x, m, k, k, NULL, 0.0f};
    bn_act act;
    bn_pool_lock();
    bn_quantize_input(ops, &in, &act);
    bn_run_ternary(ops, &act, &mat, 1);
    struct timespec t0, t1;
    timespec_get(&t0, TIME_UTC);
    clock_t t = clock();
    for (int r = 0; r < reps; r++) bn_run_ternary(ops, &act, &mat, 1);
    double cpu_s = (double)(clock() - t) / CLOCKS_PER_SEC / reps;
    timespec_get(&t1, TIME_UTC);
    double s = ((double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec)) / reps;
    printf("%d threads: wall %.3f ms, cpu %.3f ms\n", threads, s * 1e3, cpu_s * 1e3);
    bn_pool_unlock();
    printf("%s ternary m=%lld n=%lld k=%lld: %.3f ms, %.1f GMAC/s, %.1f GB/s of weights\n", ops->name, (long long)m,
           (long long)n, (long long)k, s * 1e3, (double)(m * n * k) / s / 1e9, (double)wbytes / s / 1e9);
    /* the int8 head shape: 128256 x k */
    int64_t vocab = 128256;
    int8_t *hw = malloc((size_t)(vocab * k_pad));
    float *hs = malloc(sizeof(float) * (size_t)vocab), *hy = malloc(sizeof(float) * (size_t)(m * vocab));
    for (int64_t i = 0; i < vocab * k_pad; i++) hw[i] = (int8_t)(rand() % 255 - 127);
    for (int64_t i = 0; i < vocab; i++) hs[i] = 1.0f;
    bn_qmat q = {hw, vocab, hs, hy, vocab};
    bn_pool_lock();
    ops->int8(&act, &q, 0, vocab);
    t = clock();
    ops->int8(&act, &q, 0, vocab);
    s = (double)(clock() - t) / CLOCKS_PER_SEC;
    bn_pool_unlock();
    printf("%s int8 head m=%lld n=%lld k=%lld: %.3f ms, %.1f GB/s of weights\n", ops->name, (long long)m,
           (long long)vocab, (long long)k, s * 1e3, (double)(vocab * k_pad) / s / 1e9);
    free(hw), free(hs), free(hy);
    free(w), free(x), free(y);
    return 0;
}
