/* Whole operations over the thread pool: quantize (optionally RMS-normalize) activations once, then run
 * every matrix that reads them, with the rows of all matrices split across threads in one parallel region. */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* posix_memalign under a strict -std=c11 */
#endif
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "threadpool.h"

#if defined(_WIN32)
#include <malloc.h>
void *bn_aligned_alloc(size_t n) { return _aligned_malloc(n, BN_ALIGN); }
void bn_aligned_free(void *p) { _aligned_free(p); }
#else
void *bn_aligned_alloc(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, BN_ALIGN, n) == 0 ? p : NULL;
}
void bn_aligned_free(void *p) { free(p); }
#endif

void *bn_grow(bn_growbuf *b, size_t n) {
    if (n > b->size) {
        bn_aligned_free(b->buf);
        b->buf = bn_aligned_alloc(n);
        b->size = b->buf ? n : 0;
    }
    return b->buf;
}

/* Scratch shared by all operations (guarded by the pool lock). */
static bn_growbuf scratch;

static void *scratch_get(size_t n) { return bn_grow(&scratch, n); }

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

typedef struct {
    const bn_isa_ops *ops;
    const bn_input *in;
    bn_act *act;
    float *rowbuf; /* per thread: k_pad floats, for the normalized row */
} quant_job;

/* RMSNorm as the model's: x * (1 / sqrt(mean(x^2) + eps)) * weight, in float32. */
static void rms_norm_row(const float *x, const float *w, int64_t k, float eps, float *out) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += x[i + j] * x[i + j];
    float ss = 0.0f;
    for (int j = 0; j < 8; j++) ss += acc[j];
    for (; i < k; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)k + eps);
    for (i = 0; i < k; i++) out[i] = x[i] * r * w[i];
}

static void quant_task(void *p, int tid, int64_t m0, int64_t m1) {
    quant_job *j = p;
    const bn_input *in = j->in;
    for (int64_t m = m0; m < m1; m++) {
        const float *row = in->x + m * in->ldx;
        if (in->norm_w) {
            float *buf = j->rowbuf + (size_t)tid * (size_t)j->act->k_pad;
            rms_norm_row(row, in->norm_w, in->k, in->eps, buf);
            row = buf;
        }
        int8_t *xq = (int8_t *)j->act->xq + m * j->act->ldx;
        j->ops->quantize(row, in->k, j->act->k_pad, xq, (float *)j->act->a + m, (int32_t *)j->act->rowsum + m);
    }
}

int bn_quantize_input(const bn_isa_ops *ops, const bn_input *in, bn_act *act) {
    int64_t k_pad = (int64_t)round_up((size_t)in->k, BN_KBLOCK);
    size_t ldx = round_up((size_t)k_pad, BN_ALIGN);
    int threads = bn_pool_threads();
    size_t xq_bytes = ldx * (size_t)in->m;
    size_t a_off = round_up(xq_bytes, BN_ALIGN);
    size_t s_off = a_off + round_up((size_t)in->m * sizeof(float), BN_ALIGN);
    size_t r_off = s_off + round_up((size_t)in->m * sizeof(int32_t), BN_ALIGN);
    size_t total = r_off + (in->norm_w ? (size_t)threads * (size_t)k_pad * sizeof(float) : 0);
    char *base = scratch_get(total);
    if (!base) return -1;
    act->xq = (const int8_t *)base;
    act->ldx = (int64_t)ldx;
    act->a = (const float *)(base + a_off);
    act->rowsum = (const int32_t *)(base + s_off);
    act->m = in->m;
    act->k_pad = k_pad;
    quant_job job = {ops, in, act, (float *)(base + r_off)};
    bn_pool_run(quant_task, &job, in->m, 8);
    return 0;
}

typedef struct {
    const bn_isa_ops *ops;
    const bn_act *x;
    const bn_tmat *mats;
    int nmats;
    int64_t tiles;
} ternary_job;

static void ternary_task(void *p, int tid, int64_t t0, int64_t t1) {
    (void)tid;
    ternary_job *j = p;
    int64_t base = 0;
    for (int i = 0; i < j->nmats; i++) {
        int64_t n_tiles = (j->mats[i].n + BN_ROWS - 1) / BN_ROWS;
        int64_t lo = t0 > base ? t0 : base, hi = t1 < base + n_tiles ? t1 : base + n_tiles;
        if (lo < hi) j->ops->ternary(j->x, &j->mats[i], lo - base, hi - base);
        base += n_tiles;
    }
}

void bn_run_ternary(const bn_isa_ops *ops, const bn_act *x, const bn_tmat *mats, int nmats) {
    ternary_job job = {ops, x, mats, nmats, 0};
    for (int i = 0; i < nmats; i++) job.tiles += (mats[i].n + BN_ROWS - 1) / BN_ROWS;
    int64_t chunks = x->m >= BN_GEMM_MIN_ROWS ? BN_GEMM_CHUNKS_PER_THREAD : BN_CHUNKS_PER_THREAD;
    int64_t grain = job.tiles / (chunks * (int64_t)bn_pool_threads());
    bn_pool_run(ternary_task, &job, job.tiles, grain > 4 ? grain : 4);
}

typedef struct {
    void (*kernel)(const bn_act *x, const bn_qmat *w, int64_t n0, int64_t n1);
    const bn_act *x;
    const bn_qmat *w;
} head_job;

static void head_task(void *p, int tid, int64_t q0, int64_t q1) {
    (void)tid;
    head_job *j = p;
    int64_t n0 = q0 * BN_ROWS, n1 = q1 * BN_ROWS < j->w->n ? q1 * BN_ROWS : j->w->n;
    if (n0 < n1) j->kernel(j->x, j->w, n0, n1);
}

void bn_run_head(const bn_isa_ops *ops, const bn_act *x, const bn_qmat *w, int bits) {
    head_job job = {bits == 4 ? ops->int4 : ops->int8, x, w};
    int64_t quads = (w->n + BN_ROWS - 1) / BN_ROWS;
    int64_t grain = quads / (BN_CHUNKS_PER_THREAD * (int64_t)bn_pool_threads());
    bn_pool_run(head_task, &job, quads, grain > 4 ? grain : 4);
}

typedef struct {
    const uint64_t *p;
    size_t words;
    int prefetch; /* read BN_GEMV_PREFETCH bytes ahead, as the decode GEMVs do */
    uint64_t sums[256];
} read_job;

static void read_task(void *p, int tid, int64_t w0, int64_t w1) {
    read_job *j = p;
    uint64_t s[4] = {0, 0, 0, 0};
    int64_t i = w0;
    for (; i + 8 <= w1; i += 8) {
#if defined(__GNUC__)
        if (j->prefetch) __builtin_prefetch(j->p + i + BN_GEMV_PREFETCH / 8);
#endif
        for (int u = 0; u < 8; u++) s[u & 3] += j->p[i + u];
    }
    for (; i < w1; i++) s[0] += j->p[i];
    j->sums[tid & 255] += s[0] + s[1] + s[2] + s[3];
}

static double now_seconds(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The best rate of `reps` passes each with plain reads and with software prefetch: which reads faster depends
 * on the CPU (a Zen 4 reads faster without, an AMX-era Xeon with), and a bandwidth figure should be what
 * the machine can do. */
double bn_read_bandwidth(const void *buf, size_t nbytes, int reps, uint64_t *checksum) {
    read_job job = {(const uint64_t *)buf, nbytes / 8, 0, {0}};
    int threads = bn_pool_threads() < 256 ? bn_pool_threads() : 256;
    double best = 0.0;
    for (int r = 0; r < 2 * reps; r++) {
        job.prefetch = r & 1;
        double t = now_seconds();
        bn_pool_run(read_task, &job, (int64_t)job.words, (int64_t)job.words / (16 * threads) + 1);
        double gbps = (double)(job.words * 8) / (now_seconds() - t) / 1e9;
        best = gbps > best ? gbps : best;
    }
    uint64_t s = 0;
    for (int i = 0; i < threads; i++) s += job.sums[i];
    *checksum = s;
    return best;
}

/* A thread's float32 copy of the first `done` keys and values of one (batch, kv head) of a bfloat16 cache */
typedef struct {
    int64_t id, done;
} widened_kv;

/* Decode attention: a few new tokens per sequence. Rotates their keys (RoPE, rotate-half pairs (i, i + d/2)) and
 * writes keys and values into the cache at their positions, then each (batch, head, token) item, one task of
 * the pool, rotates its query and attends causally to the cached keys of its sequence. Dot products keep 8
 * partial sums so compilers vectorize them without reassociating float math. */
typedef struct {
    const bn_attn *p;
    int64_t items;
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*axpy)(float a, const float *x, float *y, int64_t n);
    float (*dot_bf16)(const float *a, const uint16_t *b, int64_t n);
    void (*axpy_bf16)(float a, const uint16_t *x, float *y, int64_t n);
    widened_kv *widened; /* per thread; NULL: read the cache as it is */
    size_t thread_floats; /* floats of each thread's scratch */
} attn_job;

/* dot(a, x) in 8 interleaved partial sums (the order the SIMD versions keep) and y += a·x, for float32 or
   bfloat16 rows x: one body, the element load differs */
#define BN_SCALAR_DOT_AXPY(SUFFIX, T, LOAD1)                                                       \
    float bn_dot_##SUFFIX##_scalar(const float *a, const T *b, int64_t n) {                        \
        float s[8] = {0};                                                                          \
        int64_t i = 0;                                                                             \
        for (; i + 8 <= n; i += 8)                                                                 \
            for (int j = 0; j < 8; j++) s[j] += a[i + j] * LOAD1(b + i + j);                       \
        for (; i < n; i++) s[i % 8] += a[i] * LOAD1(b + i);                                        \
        return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));                 \
    }                                                                                              \
    void bn_axpy_##SUFFIX##_scalar(float a, const T *x, float *y, int64_t n) {                     \
        for (int64_t i = 0; i < n; i++) y[i] += a * LOAD1(x + i);                                  \
    }

BN_SCALAR_DOT_AXPY(f32, float, bn_load_f32)
BN_SCALAR_DOT_AXPY(bf16, uint16_t, bn_load_bf16)

static size_t kv_size(const bn_attn *p) { return p->kv_type == BN_KV_BF16 ? sizeof(uint16_t) : sizeof(float); }

/* q . key s, and out += e * value s, of one kv head's rows k, v of element type kv_type */
static float key_dot(const attn_job *j, int kv_type, const float *q, const void *k, int64_t s) {
    int64_t d = j->p->dim;
    if (kv_type == BN_KV_BF16) return j->dot_bf16(q, (const uint16_t *)k + s * d, d);
    return j->dot(q, (const float *)k + s * d, d);
}

static void add_value(const attn_job *j, int kv_type, float e, const void *v, int64_t s, float *out) {
    int64_t d = j->p->dim;
    if (kv_type == BN_KV_BF16)
        j->axpy_bf16(e, (const uint16_t *)v + s * d, out, d);
    else
        j->axpy(e, (const float *)v + s * d, out, d);
}

/* out = x * cos + rotate_half(x) * sin, as the model's apply_rope */
static void rope(const float *x, const float *cos, const float *sin, int64_t d, float *out) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < d; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* Keys and values [0, n) of (batch, kv head) `id` as float32, widened into the thread's copy w (keys then
 * values, `keys` rows each) as far as it does not hold them yet: a thread's items run in order, so the rows one
 * kv head's queries read are widened about once per thread rather than once per query and head. */
static void widen_kv(const bn_attn *p, widened_kv *w, int64_t id, const uint16_t *k, const uint16_t *v, int64_t n,
                     float *kf, float *vf) {
    if (w->id != id) w->id = id, w->done = 0;
    for (int64_t e = w->done * p->dim; e < n * p->dim; e++) kf[e] = bn_f32_from_bf16(k[e]);
    for (int64_t e = w->done * p->dim; e < n * p->dim; e++) vf[e] = bn_f32_from_bf16(v[e]);
    if (n > w->done) w->done = n;
}

static void attn_task(void *arg, int tid, int64_t i0, int64_t i1) {
    attn_job *j = arg;
    const bn_attn *p = j->p;
    int64_t group = p->heads / p->kv_heads;
    float *q = p->scratch + (size_t)tid * j->thread_floats;
    float *scores = q + p->dim, *kf = scores + p->keys, *vf = kf + p->keys * p->dim;
    for (int64_t i = i0; i < i1; i++) {
        int64_t b = i / (p->heads * p->queries), h = (i / p->queries) % p->heads, t = i % p->queries;
        int64_t row = b * p->queries + t, n = p->positions[row] + 1; /* keys 0 .. n - 1 */
        rope(p->qkv + row * p->ld_qkv + h * p->dim, p->cos + row * p->dim, p->sin + row * p->dim, p->dim, q);
        size_t at = (size_t)(b * p->kv_batch_stride + (h / group) * p->kv_head_stride) * kv_size(p);
        const void *k = (const char *)p->k_cache + at, *v = (const char *)p->v_cache + at;
        int kv_type = p->kv_type;
        if (j->widened) {
            widen_kv(p, &j->widened[tid], b * p->kv_heads + h / group, k, v, n, kf, vf);
            k = kf, v = vf, kv_type = BN_KV_F32;
        }
        float *out = p->out + (row * p->heads + h) * p->dim;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t s = 0; s < n; s++) {
            scores[s] = key_dot(j, kv_type, q, k, s) * p->scale;
            mx = scores[s] > mx ? scores[s] : mx;
        }
        for (int64_t d = 0; d < p->dim; d++) out[d] = 0.0f;
        for (int64_t s = 0; s < n; s++) {
            float e = expf(scores[s] - mx);
            sum += e;
            add_value(j, kv_type, e, v, s, out);
        }
        float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int64_t d = 0; d < p->dim; d++) out[d] *= inv;
    }
}

/* One new token's rotated key and its value into one kv head's cache rows, as the cache's element type (rounded
 * to bfloat16 from the float32 row `tmp`) */
static void write_kv(const bn_attn *p, size_t at, const float *k, const float *v, const float *cos, const float *sin,
                     float *tmp) {
    if (p->kv_type == BN_KV_BF16) {
        uint16_t *kc = (uint16_t *)p->k_cache + at, *vc = (uint16_t *)p->v_cache + at;
        rope(k, cos, sin, p->dim, tmp);
        for (int64_t d = 0; d < p->dim; d++) kc[d] = bn_bf16_from_f32(tmp[d]), vc[d] = bn_bf16_from_f32(v[d]);
    } else {
        rope(k, cos, sin, p->dim, (float *)p->k_cache + at);
        memcpy((float *)p->v_cache + at, v, (size_t)p->dim * sizeof(float));
    }
}

int bn_attention(bn_attn *p) {
    int threads = bn_pool_threads();
    /* Several queries per sequence (a prompt) read a bfloat16 cache's rows many times: each thread widens them
     * once into float32 rows of its scratch. One query (a decode step) reads them about once: as they are. */
    int widen = p->kv_type == BN_KV_BF16 && p->queries > 1;
    size_t thread_floats = round_up((size_t)(p->dim + p->keys) + (widen ? 2 * (size_t)(p->keys * p->dim) : 0), 16);
    size_t widened_bytes = widen ? round_up((size_t)threads * sizeof(widened_kv), BN_ALIGN) : 0;
    char *base = scratch_get(widened_bytes + (size_t)threads * thread_floats * sizeof(float));
    if (!base) return -1;
    p->scratch = (float *)(base + widened_bytes);
    for (int64_t row = 0; row < p->batch * p->queries; row++) {
        int64_t b = row / p->queries, pos = p->positions[row];
        if (pos < 0 || pos >= p->keys) return -2;
        const float *src = p->qkv + row * p->ld_qkv + p->heads * p->dim;
        for (int64_t g = 0; g < p->kv_heads; g++) {
            size_t at = (size_t)(b * p->kv_batch_stride + g * p->kv_head_stride + pos * p->dim);
            write_kv(p, at, src + g * p->dim, src + (p->kv_heads + g) * p->dim, p->cos + row * p->dim,
                     p->sin + row * p->dim, p->scratch);
        }
    }
    attn_job job = {p,
                    p->batch * p->heads * p->queries,
                    bn_dot_f32_scalar,
                    bn_axpy_f32_scalar,
                    bn_dot_bf16_scalar,
                    bn_axpy_bf16_scalar,
                    widen ? (widened_kv *)base : NULL,
                    thread_floats};
    for (int t = 0; widen && t < threads; t++) job.widened[t] = (widened_kv){-1, 0};
#ifdef BN_HAVE_AVX2
    if (bn_isa_get(BN_ISA_AVX2))
        job.dot = bn_dot_f32_avx2, job.axpy = bn_axpy_f32_avx2, job.dot_bf16 = bn_dot_bf16_avx2,
        job.axpy_bf16 = bn_axpy_bf16_avx2;
#endif
    bn_pool_run(attn_task, &job, job.items, 1);
    return 0;
}
