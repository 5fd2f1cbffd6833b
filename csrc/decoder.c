/* Whole decoder layers over the thread pool (see decoder.h). Every step is the same float32 math, in the same
 * order, as the model's torch code on the C kernels, so a float32 model gives the same numbers either way. */
#include "decoder.h"

#include <math.h>
#include <string.h>

#include "ops.h"
#include "threadpool.h"

#define ELEMENT_GRAIN 8192 /* floats per task of the elementwise passes: below that, waking a thread costs more */

/* Activation buffers of a run (guarded by the pool lock, as ops.c's scratch). */
static bn_growbuf work;

static float *work_get(size_t floats) { return bn_grow(&work, floats * sizeof(float)); }

static size_t padded(int64_t n) { return ((size_t)n + 15) / 16 * 16; } /* whole cache lines per buffer */

typedef struct {
    float *x;
    const float *y;
} add_job;

static void add_task(void *p, int tid, int64_t i0, int64_t i1) {
    (void)tid;
    add_job *j = p;
    for (int64_t i = i0; i < i1; i++) j->x[i] += j->y[i];
}

/* gu rows hold [gate | up]; the gate half becomes act(gate) * up, as the model's relu(g).square() * up or
 * silu(g) * up (in place: one buffer less for long prompts) */
typedef struct {
    float *gu;
    int64_t inter;
    int act;
} gate_job;

static void gate_task(void *p, int tid, int64_t i0, int64_t i1) {
    (void)tid;
    gate_job *j = p;
    for (int64_t row = i0 / j->inter; row * j->inter < i1; row++) { /* one division per row, not per value */
        int64_t c0 = i0 > row * j->inter ? i0 - row * j->inter : 0;
        int64_t c1 = i1 < (row + 1) * j->inter ? i1 - row * j->inter : j->inter;
        float *g = j->gu + row * 2 * j->inter;
        const float *u = g + j->inter;
        if (j->act == BN_ACT_RELU2) {
            for (int64_t c = c0; c < c1; c++) {
                float r = g[c] > 0.0f ? g[c] : 0.0f;
                g[c] = r * r * u[c];
            }
        } else {
            for (int64_t c = c0; c < c1; c++) g[c] = g[c] / (1.0f + expf(-g[c])) * u[c];
        }
    }
}

static void run_elementwise(bn_task_fn fn, void *job, int64_t n) { bn_pool_run(fn, job, n, ELEMENT_GRAIN); }

/* y = quant(norm?(x)) @ W.T for the given matrices, which share x (rows ldx floats apart) */
static int project(const bn_isa_ops *ops, const float *x, int64_t m, int64_t k, int64_t ldx, const float *norm,
                   float eps, bn_tmat *mats, int nmats) {
    bn_input in = {x, m, k, ldx, norm, eps};
    bn_act act;
    if (bn_quantize_input(ops, &in, &act)) return -1;
    bn_run_ternary(ops, &act, mats, nmats);
    return 0;
}

static bn_tmat output_to(bn_tmat w, float *y, int64_t ldy) {
    w.y = y;
    w.ldy = ldy;
    return w;
}

int bn_decoder_run(const bn_isa_ops *ops, const bn_decoder *d, const bn_step *s) {
    int64_t m = s->batch * s->queries, hidden = d->hidden, inter = d->inter;
    int64_t q_dim = d->heads * d->head_dim, kv_dim = d->kv_heads * d->head_dim, qkv_dim = q_dim + 2 * kv_dim;
    /* qkv is dead once attention has read it, so gate/up reuse its buffer */
    size_t n_qkv_gu = padded(m * (qkv_dim > 2 * inter ? qkv_dim : 2 * inter));
    size_t n_attn = padded(m * q_dim), n_tmp = padded(m * hidden);
    float *qkv = work_get(n_qkv_gu + n_attn + n_tmp);
    if (!qkv) return -1;
    float *gu = qkv, *attn = qkv + n_qkv_gu, *tmp = attn + n_attn;
    size_t layer_bytes = (size_t)s->layer_stride * (s->kv_type == BN_KV_BF16 ? sizeof(uint16_t) : sizeof(float));
    for (int64_t l = 0; l < d->layers; l++) {
        const bn_layer *L = &d->layer[l];
        bn_tmat qkv_mats[3] = {output_to(L->q, qkv, qkv_dim), output_to(L->k, qkv + q_dim, qkv_dim),
                               output_to(L->v, qkv + q_dim + kv_dim, qkv_dim)};
        if (project(ops, s->x, m, hidden, hidden, L->attn_norm, d->eps, qkv_mats, 3)) return -1;
        bn_attn p = {qkv,
                     qkv_dim,
                     s->cos,
                     s->sin,
                     (char *)s->k_cache + (size_t)l * layer_bytes,
                     (char *)s->v_cache + (size_t)l * layer_bytes,
                     s->batch_stride,
                     s->head_stride,
                     s->positions,
                     attn,
                     s->batch,
                     d->heads,
                     d->kv_heads,
                     s->queries,
                     s->keys,
                     d->head_dim,
                     d->attn_scale,
                     s->kv_type,
                     NULL};
        int rc = bn_attention(&p);
        if (rc) return rc;
        bn_tmat o = output_to(L->o, tmp, hidden);
        if (project(ops, attn, m, q_dim, q_dim, L->attn_sub_norm, d->eps, &o, 1)) return -1;
        add_job add = {s->x, tmp};
        run_elementwise(add_task, &add, m * hidden);

        bn_tmat gate_up[2] = {output_to(L->gate, gu, 2 * inter), output_to(L->up, gu + inter, 2 * inter)};
        if (project(ops, s->x, m, hidden, hidden, L->ffn_norm, d->eps, gate_up, 2)) return -1;
        gate_job gate = {gu, inter, d->act};
        run_elementwise(gate_task, &gate, m * inter);
        bn_tmat down = output_to(L->down, tmp, hidden);
        if (project(ops, gu, m, inter, 2 * inter, L->ffn_sub_norm, d->eps, &down, 1)) return -1;
        run_elementwise(add_task, &add, m * hidden);
    }
    return 0;
}
