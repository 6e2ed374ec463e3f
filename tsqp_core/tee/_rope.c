/* RoPE for small float32 and bfloat16 tensors in one call (tsqp_core.tee_ops): the rotation
 * of a layer's queries and keys costs eight torch dispatches, each far more than its
 * arithmetic on a decode step's few hundred values.
 *
 *   rope(q, k, cos, sin, q_out, k_out, batch, tokens, heads, kv_heads, head_dim, kind)
 *       q, k: addresses of live, contiguous CPU tensors [batch, tokens, heads * head_dim]
 *       and [batch, tokens, kv_heads * head_dim]; cos, sin: [tokens, head_dim] tables (the
 *       halves equal, as transformers makes them); q_out, k_out: [batch, heads, tokens,
 *       head_dim] and [batch, kv_heads, tokens, head_dim], contiguous, written here.
 *       kind: 0 float32, 1 bfloat16. tee_ops.py checks all of that before it calls.
 *
 * The arithmetic is transformers' `x * cos + rotate_half(x) * sin`, rounded where torch
 * rounds it: each product, then the sum (no fused multiply-add: built with
 * -ffp-contract=off). In bfloat16 each product and the sum are computed in float32 and
 * rounded to bfloat16, to nearest even, as torch's kernels do; a product of two bfloat16
 * values is exact in float32. rotate_half's negation is exact. So the result is torch's,
 * bit for bit (tests/test_ops.py); a NaN, which a checked reply never holds, may differ in
 * its payload.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (f != f) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* One row of d values: out = x*cos + rotate_half(x)*sin. */
static void row_f32(const void *xv, const void *cv, const void *sv, void *ov, Py_ssize_t d) {
    const float *x = xv, *c = cv, *s = sv;
    float *o = ov;
    Py_ssize_t half = d / 2;
    for (Py_ssize_t j = 0; j < d; j++) {
        float rot = j < half ? -x[j + half] : x[j - half];
        float p1 = x[j] * c[j];
        float p2 = rot * s[j];
        o[j] = p1 + p2;
    }
}

static void row_bf16(const void *xv, const void *cv, const void *sv, void *ov, Py_ssize_t d) {
    const uint16_t *x = xv, *c = cv, *s = sv;
    uint16_t *o = ov;
    Py_ssize_t half = d / 2;
    for (Py_ssize_t j = 0; j < d; j++) {
        float rot = j < half ? -bf16_to_f32(x[j + half]) : bf16_to_f32(x[j - half]);
        float p1 = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[j]) * bf16_to_f32(c[j])));
        float p2 = bf16_to_f32(f32_to_bf16(rot * bf16_to_f32(s[j])));
        o[j] = f32_to_bf16(p1 + p2);
    }
}

typedef void (*row_fn)(const void *, const void *, const void *, void *, Py_ssize_t);

/* One tensor of `size`-byte elements: x [B, T, H*d] -> out [B, H, T, d], row by row. */
static void rotate(row_fn row, size_t size, const char *x, const char *cos, const char *sin,
                   char *out, Py_ssize_t b, Py_ssize_t t, Py_ssize_t h, Py_ssize_t d) {
    for (Py_ssize_t bi = 0; bi < b; bi++)
        for (Py_ssize_t hi = 0; hi < h; hi++)
            for (Py_ssize_t ti = 0; ti < t; ti++)
                row(x + (((bi * t + ti) * h + hi) * d) * size, cos + ti * d * size,
                    sin + ti * d * size, out + (((bi * h + hi) * t + ti) * d) * size, d);
}

static PyObject *rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "rope(q, k, cos, sin, q_out, k_out, batch, tokens, "
                                         "heads, kv_heads, head_dim, kind)");
        return NULL;
    }
    void *ptr[6];
    for (int i = 0; i < 6; i++) ptr[i] = PyLong_AsVoidPtr(args[i]);
    Py_ssize_t dims[5];
    for (int i = 0; i < 5; i++) dims[i] = PyLong_AsSsize_t(args[6 + i]);
    long kind = PyLong_AsLong(args[11]);
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t b = dims[0], t = dims[1], h = dims[2], hk = dims[3], d = dims[4];
    if (b < 0 || t < 0 || h < 0 || hk < 0 || d < 0 || d % 2 || (kind != 0 && kind != 1)) {
        PyErr_SetString(PyExc_ValueError, "rope: bad sizes or kind");
        return NULL;
    }
    for (int i = 0; i < 6; i++)
        if (ptr[i] == NULL && b * t * d > 0) {
            PyErr_SetString(PyExc_ValueError, "rope: no data");
            return NULL;
        }
    row_fn row = kind == 0 ? row_f32 : row_bf16;
    size_t size = kind == 0 ? sizeof(float) : sizeof(uint16_t);
    rotate(row, size, ptr[0], ptr[2], ptr[3], ptr[4], b, t, h, d);
    rotate(row, size, ptr[1], ptr[2], ptr[3], ptr[5], b, t, hk, d);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rope", (PyCFunction)(void (*)(void))rope, METH_FASTCALL,
     "rope(q, k, cos, sin, q_out, k_out, batch, tokens, heads, kv_heads, head_dim, kind): "
     "transformers' rotation of queries and keys, [B, T, H*d] -> [B, H, T, d]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rope",
                                    "RoPE for small tensors in C.", -1, methods};

PyMODINIT_FUNC PyInit__rope(void) { return PyModule_Create(&module); }
