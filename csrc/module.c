/* CPython binding of the CPU kernels: pybitnet.kernels._cpu.
 *
 * Buffers arrive as addresses (Python ints) with their sizes; the Python layer (pybitnet.kernels.cpu) checks
 * dtype, shape and contiguity before calling. Every call releases the GIL while the kernels run. Nothing here
 * links to torch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "decoder.h"
#include "ops.h"
#include "threadpool.h"

#define MAX_MATS 16

static const bn_isa_ops *isa_or_raise(int isa) {
    const bn_isa_ops *ops = (isa >= 0 && isa < BN_ISA_COUNT) ? bn_isa_get(isa) : NULL;
    if (!ops) PyErr_Format(PyExc_ValueError, "kernel ISA %d is not compiled in or not supported by this CPU", isa);
    return ops;
}

static int parse_mats(PyObject *seq, bn_tmat *mats) {
    PyObject *fast = PySequence_Fast(seq, "mats must be a sequence of tuples");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 1 || n > MAX_MATS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "between 1 and %d matrices per call, got %zd", MAX_MATS, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long w, scale, y;
        Py_ssize_t rows, stride, ldy;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KnKnKn", &w, &rows, &scale, &stride, &y, &ldy)) {
            Py_DECREF(fast);
            return -1;
        }
        if (rows < 1 || ldy < rows || (stride != 0 && stride != 1)) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "bad matrix descriptor (rows, scale stride or output stride)");
            return -1;
        }
        mats[i] = (bn_tmat){(const uint8_t *)(uintptr_t)w, rows, (const float *)(uintptr_t)scale, stride,
                            (float *)(uintptr_t)y, ldy};
    }
    Py_DECREF(fast);
    return (int)n;
}

static int check_input(Py_ssize_t m, Py_ssize_t k, Py_ssize_t ldx) {
    if (m < 1 || k < 1 || ldx < k) {
        PyErr_SetString(PyExc_ValueError, "need m >= 1, k >= 1 and a row stride >= k");
        return -1;
    }
    return 0;
}

static PyObject *py_ternary(PyObject *self, PyObject *args) {
    (void)self;
    int isa;
    unsigned long long x, norm;
    Py_ssize_t m, k, ldx;
    float eps;
    PyObject *seq;
    bn_tmat mats[MAX_MATS];
    if (!PyArg_ParseTuple(args, "iKnnnKfO", &isa, &x, &m, &k, &ldx, &norm, &eps, &seq)) return NULL;
    const bn_isa_ops *ops = isa_or_raise(isa);
    int nmats = ops ? parse_mats(seq, mats) : -1;
    if (nmats < 0 || check_input(m, k, ldx)) return NULL;
    bn_input in = {(const float *)(uintptr_t)x, m, k, ldx, (const float *)(uintptr_t)norm, eps};
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    bn_pool_lock();
    bn_act act;
    rc = bn_quantize_input(ops, &in, &act);
    if (rc == 0) bn_run_ternary(ops, &act, mats, nmats);
    bn_pool_unlock();
    Py_END_ALLOW_THREADS;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_ternary_q(PyObject *self, PyObject *args) {
    (void)self;
    int isa;
    unsigned long long xq, a, rowsum;
    Py_ssize_t ldq, m, k_pad;
    PyObject *seq;
    bn_tmat mats[MAX_MATS];
    if (!PyArg_ParseTuple(args, "iKnKKnnO", &isa, &xq, &ldq, &a, &rowsum, &m, &k_pad, &seq)) return NULL;
    const bn_isa_ops *ops = isa_or_raise(isa);
    int nmats = ops ? parse_mats(seq, mats) : -1;
    if (nmats < 0 || check_input(m, k_pad, ldq)) return NULL;
    if (k_pad % BN_KBLOCK) return PyErr_Format(PyExc_ValueError, "k_pad must be a multiple of %d", BN_KBLOCK);
    bn_act act = {(const int8_t *)(uintptr_t)xq, ldq, (const float *)(uintptr_t)a,
                  (const int32_t *)(uintptr_t)rowsum, m, k_pad};
    Py_BEGIN_ALLOW_THREADS;
    bn_pool_lock();
    bn_run_ternary(ops, &act, mats, nmats);
    bn_pool_unlock();
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_head(PyObject *self, PyObject *args) {
    (void)self;
    int isa, bits;
    unsigned long long x, norm, w, scale, y;
    Py_ssize_t m, k, ldx, n, ldy;
    float eps;
    if (!PyArg_ParseTuple(args, "iiKnnnKfKnKKn", &isa, &bits, &x, &m, &k, &ldx, &norm, &eps, &w, &n, &scale, &y,
                          &ldy))
        return NULL;
    const bn_isa_ops *ops = isa_or_raise(isa);
    if (!ops || check_input(m, k, ldx)) return NULL;
    if (n < 1 || ldy < n) return PyErr_Format(PyExc_ValueError, "need n >= 1 and y rows of at least n values");
    if (bits != 8 && bits != 4) return PyErr_Format(PyExc_ValueError, "head weights have 8 or 4 bits, got %d", bits);
    bn_input in = {(const float *)(uintptr_t)x, m, k, ldx, (const float *)(uintptr_t)norm, eps};
    bn_qmat q = {(const int8_t *)(uintptr_t)w, n, (const float *)(uintptr_t)scale, (float *)(uintptr_t)y, ldy};
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    bn_pool_lock();
    bn_act act;
    rc = bn_quantize_input(ops, &in, &act);
    if (rc == 0) bn_run_head(ops, &act, &q, bits);
    bn_pool_unlock();
    Py_END_ALLOW_THREADS;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    (void)self;
    int isa;
    unsigned long long x, xq, a, rowsum;
    Py_ssize_t m, k, ldx, ldq, k_pad;
    if (!PyArg_ParseTuple(args, "iKnnnKnnKK", &isa, &x, &m, &k, &ldx, &xq, &ldq, &k_pad, &a, &rowsum)) return NULL;
    const bn_isa_ops *ops = isa_or_raise(isa);
    if (!ops || check_input(m, k, ldx)) return NULL;
    if (k_pad < k || ldq < k_pad) return PyErr_Format(PyExc_ValueError, "need k <= k_pad <= ldq");
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t i = 0; i < m; i++)
        ops->quantize((const float *)(uintptr_t)x + i * ldx, k, k_pad, (int8_t *)(uintptr_t)xq + i * ldq,
                      (float *)(uintptr_t)a + i, (int32_t *)(uintptr_t)rowsum + i);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_argmax(PyObject *self, PyObject *args) {
    (void)self;
    int isa;
    unsigned long long x, out;
    Py_ssize_t m, n, ldx;
    if (!PyArg_ParseTuple(args, "iKnnnK", &isa, &x, &m, &n, &ldx, &out)) return NULL;
    const bn_isa_ops *ops = isa_or_raise(isa);
    if (!ops || check_input(m, n, ldx)) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t i = 0; i < m; i++)
        ((int64_t *)(uintptr_t)out)[i] = ops->argmax((const float *)(uintptr_t)x + i * ldx, n);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_read_bandwidth(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long p;
    Py_ssize_t nbytes;
    int reps;
    if (!PyArg_ParseTuple(args, "Kni", &p, &nbytes, &reps)) return NULL;
    if (nbytes < 8 || reps < 1) return PyErr_Format(PyExc_ValueError, "need nbytes >= 8 and reps >= 1");
    double gbps;
    uint64_t checksum;
    Py_BEGIN_ALLOW_THREADS;
    bn_pool_lock();
    gbps = bn_read_bandwidth((const void *)(uintptr_t)p, (size_t)nbytes, reps, &checksum);
    bn_pool_unlock();
    Py_END_ALLOW_THREADS;
    return Py_BuildValue("dK", gbps, (unsigned long long)checksum);
}

static PyObject *py_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long qkv, cos, sin, kc, vc, pos, out;
    Py_ssize_t ld_qkv, kv_stride, head_stride, batch, heads, kv_heads, queries, keys, dim;
    float scale;
    int kv_type;
    if (!PyArg_ParseTuple(args, "KnKKKKnnKKnnnnnnfi", &qkv, &ld_qkv, &cos, &sin, &kc, &vc, &kv_stride, &head_stride,
                          &pos, &out, &batch, &heads, &kv_heads, &queries, &keys, &dim, &scale, &kv_type))
        return NULL;
    if (batch < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || queries < 1 || keys < 1 || dim < 2 ||
        dim % 2 || ld_qkv < (heads + 2 * kv_heads) * dim || head_stride < keys * dim ||
        (batch > 1 && kv_stride < kv_heads * head_stride) || (kv_type != BN_KV_F32 && kv_type != BN_KV_BF16))
        return PyErr_Format(PyExc_ValueError, "bad attention sizes or cache type");
    bn_attn p = {(const float *)(uintptr_t)qkv, ld_qkv, (const float *)(uintptr_t)cos, (const float *)(uintptr_t)sin,
                 (void *)(uintptr_t)kc, (void *)(uintptr_t)vc, kv_stride, head_stride,
                 (const int64_t *)(uintptr_t)pos,
                 (float *)(uintptr_t)out, batch, heads, kv_heads, queries, keys, dim, scale, kv_type, NULL};
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    bn_pool_lock();
    rc = bn_attention(&p);
    bn_pool_unlock();
    Py_END_ALLOW_THREADS;
    if (rc == -2) return PyErr_Format(PyExc_ValueError, "a position is outside the KV cache (0..%zd)", keys - 1);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#define DECODER_CAPSULE "pybitnet.kernels._cpu.decoder"

static void decoder_free(PyObject *capsule) {
    bn_decoder *d = PyCapsule_GetPointer(capsule, DECODER_CAPSULE);
    if (d) {
        PyMem_Free(d->layer);
        PyMem_Free(d);
    }
}

/* (w, n, scale, scale_stride) of one matrix of a layer, whose row count must be `rows` */
static int parse_layer_mat(PyObject *item, int64_t rows, bn_tmat *mat) {
    unsigned long long w, scale;
    Py_ssize_t n, stride;
    if (!PyArg_ParseTuple(item, "KnKn", &w, &n, &scale, &stride)) return -1;
    if (n != rows || (stride != 0 && stride != 1)) {
        PyErr_Format(PyExc_ValueError, "a layer matrix has %zd rows (scale stride %zd), expected %lld", n, stride,
                     (long long)rows);
        return -1;
    }
    *mat = (bn_tmat){(const uint8_t *)(uintptr_t)w, n, (const float *)(uintptr_t)scale, stride, NULL, 0};
    return 0;
}

/* (attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm, q, k, v, o, gate, up, down): norms as addresses (0: none
 * for the sub-norms), matrices as (w, n, scale, scale_stride) */
static int parse_layer(PyObject *item, const bn_decoder *d, bn_layer *L) {
    PyObject *mats[7];
    unsigned long long norms[4];
    if (!PyArg_ParseTuple(item, "KKKKOOOOOOO", &norms[0], &norms[1], &norms[2], &norms[3], &mats[0], &mats[1],
                          &mats[2], &mats[3], &mats[4], &mats[5], &mats[6]))
        return -1;
    if (!norms[0] || !norms[2]) {
        PyErr_SetString(PyExc_ValueError, "a layer needs its input and post-attention norms");
        return -1;
    }
    L->attn_norm = (const float *)(uintptr_t)norms[0];
    L->attn_sub_norm = (const float *)(uintptr_t)norms[1];
    L->ffn_norm = (const float *)(uintptr_t)norms[2];
    L->ffn_sub_norm = (const float *)(uintptr_t)norms[3];
    int64_t q_dim = d->heads * d->head_dim, kv_dim = d->kv_heads * d->head_dim;
    bn_tmat *dst[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    int64_t rows[7] = {q_dim, kv_dim, kv_dim, d->hidden, d->inter, d->inter, d->hidden};
    for (int i = 0; i < 7; i++)
        if (parse_layer_mat(mats[i], rows[i], dst[i])) return -1;
    return 0;
}

static PyObject *py_decoder_new(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t hidden, inter, heads, kv_heads, head_dim;
    float eps, attn_scale;
    int act;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "nnnnnffiO", &hidden, &inter, &heads, &kv_heads, &head_dim, &eps, &attn_scale, &act,
                          &seq))
        return NULL;
    if (hidden < 1 || inter < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || head_dim < 2 || head_dim % 2 ||
        (act != BN_ACT_RELU2 && act != BN_ACT_SILU))
        return PyErr_Format(PyExc_ValueError, "bad decoder sizes or activation");
    PyObject *fast = PySequence_Fast(seq, "layers must be a sequence of tuples");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    bn_decoder *d = PyMem_Calloc(1, sizeof *d);
    bn_layer *layers = n > 0 ? PyMem_Calloc((size_t)n, sizeof *layers) : NULL;
    if (!d || (n > 0 && !layers)) {
        PyMem_Free(d), PyMem_Free(layers), Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    *d = (bn_decoder){n, hidden, inter, heads, kv_heads, head_dim, eps, attn_scale, act, layers};
    for (Py_ssize_t i = 0; i < n; i++)
        if (parse_layer(PySequence_Fast_GET_ITEM(fast, i), d, &layers[i])) {
            PyMem_Free(d), PyMem_Free(layers), Py_DECREF(fast);
            return NULL;
        }
    Py_DECREF(fast);
    PyObject *capsule = PyCapsule_New(d, DECODER_CAPSULE, decoder_free);
    if (!capsule) PyMem_Free(d), PyMem_Free(layers);
    return capsule;
}

static PyObject *py_decoder_run(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule;
    int isa;
    unsigned long long x, pos, cos, sin, kc, vc;
    Py_ssize_t batch, queries, layer_stride, batch_stride, head_stride, keys;
    int kv_type;
    if (!PyArg_ParseTuple(args, "OiKnnKKKKKnnnni", &capsule, &isa, &x, &batch, &queries, &pos, &cos, &sin, &kc, &vc,
                          &layer_stride, &batch_stride, &head_stride, &keys, &kv_type))
        return NULL;
    const bn_decoder *d = PyCapsule_GetPointer(capsule, DECODER_CAPSULE);
    if (!d) return NULL;
    const bn_isa_ops *ops = isa_or_raise(isa);
    if (!ops) return NULL;
    if (batch < 1 || queries < 1 || keys < 1 || head_stride < keys * d->head_dim ||
        (batch > 1 && batch_stride < d->kv_heads * head_stride) ||
        (d->layers > 1 && layer_stride < (batch > 1 ? batch * batch_stride : d->kv_heads * head_stride)) ||
        (kv_type != BN_KV_F32 && kv_type != BN_KV_BF16))
        return PyErr_Format(PyExc_ValueError, "bad decoder run sizes, cache strides or cache type");
    bn_step s = {(float *)(uintptr_t)x, batch, queries, (const int64_t *)(uintptr_t)pos,
                 (const float *)(uintptr_t)cos, (const float *)(uintptr_t)sin, (void *)(uintptr_t)kc,
                 (void *)(uintptr_t)vc, layer_stride, batch_stride, head_stride, keys, kv_type};
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    bn_pool_lock();
    rc = bn_decoder_run(ops, d, &s);
    bn_pool_unlock();
    Py_END_ALLOW_THREADS;
    if (rc == -2) return PyErr_Format(PyExc_ValueError, "a position is outside the KV cache (0..%zd)", keys - 1);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_isa_available(PyObject *self, PyObject *arg) {
    (void)self;
    long isa = PyLong_AsLong(arg);
    if (isa == -1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(isa >= 0 && isa < BN_ISA_COUNT && bn_isa_get((int)isa) != NULL);
}

static PyObject *py_best_isa(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyLong_FromLong(bn_isa_best());
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    int got;
    Py_BEGIN_ALLOW_THREADS;
    got = bn_pool_set_threads((int)n);
    Py_END_ALLOW_THREADS;
    return PyLong_FromLong(got);
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyLong_FromLong(bn_pool_threads());
}

static PyMethodDef methods[] = {
    {"ternary", py_ternary, METH_VARARGS,
     "ternary(isa, x, m, k, ldx, norm_w, eps, mats): y = quant(rmsnorm?(x)) @ W.T for each (w, n, scale, "
     "scale_stride, y, ldy) in mats, sharing one activation quantization"},
    {"ternary_q", py_ternary_q, METH_VARARGS,
     "ternary_q(isa, xq, ldq, a, rowsum, m, k_pad, mats): the same from already quantized activations"},
    {"head", py_head, METH_VARARGS,
     "head(isa, bits, x, m, k, ldx, norm_w, eps, w, n, scale, y, ldy): the output head, tiled int8 or 4-bit "
     "weights with per-row scales"},
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(isa, x, m, k, ldx, xq, ldq, k_pad, a, rowsum): per-row absmax int8 quantization"},
    {"attention", py_attention, METH_VARARGS,
     "attention(qkv, ld_qkv, cos, sin, k_cache, v_cache, kv_batch_stride, kv_head_stride, positions, out, batch, "
     "heads, kv_heads, "
     "queries, keys, dim, scale, kv_type): RoPE, KV cache write and causal attention for new tokens"},
    {"decoder_new", py_decoder_new, METH_VARARGS,
     "decoder_new(hidden, inter, heads, kv_heads, head_dim, eps, attn_scale, act, layers) -> decoder: the layers' "
     "weights as addresses (see decoder.h); the caller keeps the tensors alive"},
    {"decoder_run", py_decoder_run, METH_VARARGS,
     "decoder_run(decoder, isa, x, batch, queries, positions, cos, sin, k_cache, v_cache, layer_stride, "
     "batch_stride, head_stride, keys, kv_type): every layer over new tokens, x updated in place"},
    {"argmax", py_argmax, METH_VARARGS,
     "argmax(isa, x, m, n, ldx, out): out[i] (int64) = torch.argmax of float32 row i of x"},
    {"read_bandwidth", py_read_bandwidth, METH_VARARGS,
     "read_bandwidth(ptr, nbytes, reps) -> (best GB/s, checksum) of parallel reads"},
    {"isa_available", py_isa_available, METH_O, "isa_available(isa) -> bool"},
    {"best_isa", py_best_isa, METH_NOARGS, "best_isa() -> int"},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n) -> threads in use"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "pybitnet CPU kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cpu(void) {
    bn_isa_init();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "ISA_SCALAR", BN_ISA_SCALAR) || PyModule_AddIntConstant(m, "ISA_AVX2", BN_ISA_AVX2) ||
        PyModule_AddIntConstant(m, "ISA_AVX512VNNI", BN_ISA_AVX512VNNI) ||
        PyModule_AddIntConstant(m, "ISA_NEONDOT", BN_ISA_NEONDOT) ||
        PyModule_AddIntConstant(m, "ACT_RELU2", BN_ACT_RELU2) ||
        PyModule_AddIntConstant(m, "ACT_SILU", BN_ACT_SILU) ||
        PyModule_AddIntConstant(m, "KV_F32", BN_KV_F32) || PyModule_AddIntConstant(m, "KV_BF16", BN_KV_BF16) ||
        PyModule_AddIntConstant(m, "KBLOCK", BN_KBLOCK) || PyModule_AddIntConstant(m, "ROWS", BN_ROWS)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
