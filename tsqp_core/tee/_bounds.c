/* The value check's inner loop in C (tsqp_core.tee.validate): whether every element of a
 * small float32 or bfloat16 tensor is finite and within [-limit, limit] -- the same answer
 * as torch.aminmax and two comparisons in Python, without the three dispatches those cost
 * on every reply of every call.
 *
 *   within(address, count, kind, limit) -> bool
 *       address: the data of a live, contiguous CPU tensor of `count` elements (validate.py
 *       checks all of that before it calls); kind: 0 float32, 1 bfloat16; limit: a finite
 *       double > 0. NaN fails every comparison, so it is never within.
 *
 * Each element is compared with the largest float not above `limit` (a float is <= limit
 * exactly when it is <= that float), so the answer is the one the double comparisons in
 * Python give. The loop has no branch and no early exit: it vectorises, and its time does
 * not depend on where a bad value sits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

static float float_at_most(double limit) {
    float f = (float)limit;
    if ((double)f > limit) f = nextafterf(f, 0.0f);
    return f;
}

static int within_f32(const float *p, Py_ssize_t n, float lim) {
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = p[i];
        bad |= !(v >= -lim) | !(v <= lim);
    }
    return !bad;
}

static int within_bf16(const uint16_t *p, Py_ssize_t n, float lim) {
    int bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)p[i] << 16;
        float v;
        memcpy(&v, &bits, sizeof v);
        bad |= !(v >= -lim) | !(v <= lim);
    }
    return !bad;
}

static PyObject *within(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "within(address, count, kind, limit)");
        return NULL;
    }
    void *address = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    long kind = PyLong_AsLong(args[2]);
    double limit = PyFloat_AsDouble(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (count < 0 || !(limit > 0) || isinf(limit) || (kind != 0 && kind != 1)) {
        PyErr_SetString(PyExc_ValueError, "within: bad count, kind or limit");
        return NULL;
    }
    if (count > 0 && address == NULL) {
        PyErr_SetString(PyExc_ValueError, "within: no data");
        return NULL;
    }
    float lim = float_at_most(limit);
    int ok = kind == 0 ? within_f32((const float *)address, count, lim)
                       : within_bf16((const uint16_t *)address, count, lim);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"within", (PyCFunction)(void (*)(void))within, METH_FASTCALL,
     "within(address, count, kind, limit) -> bool: every element finite and in [-limit, limit]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bounds",
                                    "The value check's inner loop in C.", -1, methods};

PyMODINIT_FUNC PyInit__bounds(void) { return PyModule_Create(&module); }
