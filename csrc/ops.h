/* Operations the Python binding calls; the caller holds the pool lock (bn_pool_lock) around each. */
#ifndef PYBITNET_OPS_H
#define PYBITNET_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "bitnet_cpu.h"

/* Float activations [m][ldx] (k used), and the RMSNorm weight to apply first (NULL: none). */
typedef struct {
    const float *x;
    int64_t m, k, ldx;
    const float *norm_w;
    float eps;
} bn_input;

/* Quantize `in` into the shared scratch and describe it in `act`; -1 when memory runs out. */
int bn_quantize_input(const bn_isa_ops *ops, const bn_input *in, bn_act *act);
void bn_run_ternary(const bn_isa_ops *ops, const bn_act *x, const bn_tmat *mats, int nmats);
void bn_run_int8(const bn_isa_ops *ops, const bn_act *x, const bn_qmat *w);
/* Causal attention of `queries` new rows per sequence over its first keys (query (b, t) sees keys 0..positions
 * [b, t]). q [batch][heads][queries][dim], k and v [batch (stride kv_batch_stride)][kv_heads][keys][dim],
 * out [batch][queries][heads][dim]; float32. */
typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *positions;
    int64_t batch, heads, kv_heads, queries, keys, dim, kv_batch_stride;
    float scale;
    float *scratch; /* set by bn_attention */
} bn_attn;

int bn_attention(bn_attn *p);
/* Best read bandwidth (GB/s) of `reps` parallel passes over buf. */
double bn_read_bandwidth(const void *buf, size_t nbytes, int reps, uint64_t *checksum);

#endif
