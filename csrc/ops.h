/* Operations the Python binding calls; the caller holds the pool lock (bn_pool_lock) around each. */
#ifndef PYBITNET_OPS_H
#define PYBITNET_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "bitnet_cpu.h"

/* 64-byte aligned heap blocks (NULL when memory runs out). */
void *bn_aligned_alloc(size_t n);
void bn_aligned_free(void *p);

/* A buffer that grows to the largest size asked for and never shrinks (callers hold the pool lock). */
typedef struct {
    void *buf;
    size_t size;
} bn_growbuf;
/* At least n bytes of `b` (its old contents are not kept); NULL when memory runs out. */
void *bn_grow(bn_growbuf *b, size_t n);

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
/* The output head: int8 (bits 8) or 4-bit (bits 4) tiles with per-row scales. */
void bn_run_head(const bn_isa_ops *ops, const bn_act *x, const bn_qmat *w, int bits);
/* Attention for `queries` new tokens per sequence. qkv rows (b * queries + t, stride ld_qkv) hold the token's
 * projections [heads + 2 kv_heads][dim] before RoPE; cos, sin [batch * queries][dim]. The caches, [batch (stride
 * kv_batch_stride)][kv_heads (stride kv_head_stride)][keys][dim], receive the rotated keys and the values at each
 * token's position; token (b, t) attends to keys 0..positions[b * queries + t]. out [batch * queries][heads][dim].
 * The caches hold float32 or bfloat16 elements (kv_type; strides count elements); keys and values are rounded to
 * the cache's type when written and attention reads them back from it, so a step sees what later steps see. All
 * arithmetic is float32. Returns -2 when a position is outside the cache, -1 when memory runs out. */
enum { BN_KV_F32 = 0, BN_KV_BF16 = 1 };

typedef struct {
    const float *qkv;
    int64_t ld_qkv;
    const float *cos, *sin;
    void *k_cache, *v_cache;
    int64_t kv_batch_stride, kv_head_stride;
    const int64_t *positions;
    float *out;
    int64_t batch, heads, kv_heads, queries, keys, dim;
    float scale;
    int kv_type;    /* BN_KV_F32 or BN_KV_BF16 */
    float *scratch; /* set by bn_attention */
} bn_attn;

int bn_attention(bn_attn *p);
/* Best read bandwidth (GB/s) of `reps` parallel passes over buf. */
double bn_read_bandwidth(const void *buf, size_t nbytes, int reps, uint64_t *checksum);

#endif
