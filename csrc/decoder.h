/* The decoder layers of a ternary transformer in one call: for each layer, RMSNorm + quantization, the fused
 * QKV GEMV, RoPE + KV-cache write + attention, sub-norm + o-proj + residual, RMSNorm + quantization, fused
 * gate/up, relu² (or SiLU) gating, sub-norm + down-proj + residual. Python calls this once per forward, so no
 * interpreter work (and no thread-pool wake-up from sleep) sits between the dozens of kernels of a decode step.
 * The caller holds the pool lock. */
#ifndef PYBITNET_DECODER_H
#define PYBITNET_DECODER_H

#include <stdint.h>

#include "bitnet_cpu.h"

enum { BN_ACT_RELU2 = 0, BN_ACT_SILU = 1 };

/* One layer's weights; the matrices' y and ldy are set per run. Sub-norm weights are NULL for families
 * without sub-norms. */
typedef struct {
    const float *attn_norm, *attn_sub_norm, *ffn_norm, *ffn_sub_norm;
    bn_tmat q, k, v, o, gate, up, down;
} bn_layer;

typedef struct {
    int64_t layers, hidden, inter, heads, kv_heads, head_dim;
    float eps, attn_scale;
    int act;
    bn_layer *layer;
} bn_decoder;

/* One forward over new tokens: x [batch * queries][hidden] float32, updated in place to the last layer's
 * output; token (b, t) has position positions[b * queries + t] and rope factors cos, sin [batch * queries]
 * [head_dim]. The caches are [layers (layer_stride)][batch (batch_stride)][kv_heads (head_stride)][keys]
 * [head_dim] of float32 or bfloat16 (kv_type, see bn_attn; strides count elements). */
typedef struct {
    float *x;
    int64_t batch, queries;
    const int64_t *positions;
    const float *cos, *sin;
    void *k_cache, *v_cache;
    int64_t layer_stride, batch_stride, head_stride, keys;
    int kv_type; /* BN_KV_F32 (0) or BN_KV_BF16 */
} bn_step;

/* 0, or -1 when memory runs out, -2 when a position is outside the cache. */
int bn_decoder_run(const bn_isa_ops *ops, const bn_decoder *d, const bn_step *s);

#endif
