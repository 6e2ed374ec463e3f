/* The shm transport's per-message work in C: the same layout and the same checks as the
 * Python in __init__.py (_Region.write/read, _acquire), without the interpreter on the path
 * that runs for every call.
 *
 *   write(view, reserved, seq, frames) -> bytes copied, or -end when the message needs the
 *       arena reserved up to `end` first (nothing written then)
 *   read(view, seq, outs=None) -> [frame 0, frames 1..n]: read-only views of `view`, or --
 *       when `outs` (writable buffers) match frames 1..n in number and size -- bytes of
 *       frame 0 followed by `outs` themselves, the frames copied into them
 *   Sem(name): a POSIX named semaphore; take(spin_s, wait_s) -> bool, post(), close()
 *
 * `view` is one direction's whole segment: a 4096-byte control block, then the arena
 * (frame table of n x (offset u64, length u64), then the frames, 64-byte aligned; offsets
 * relative to the arena). Everything read from a segment is the peer's and is checked
 * against the segment's real length before anything is read through it; the frame table is
 * copied out first, so the peer rewriting it during the checks changes nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <semaphore.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>

#define CTRL_BYTES 4096u
#define ALIGN 64u
#define MAX_FRAMES 4096u
/* read(outs=...) copies frame 0 only up to this size; a larger one comes back as a view */
#define MAX_HEAD 4096u
static const char MAGIC[8] = {'T', 'S', 'Q', 'P', 'S', 'H', 'M', '1'};

static PyObject *Malformed;

static inline uint64_t align_up(uint64_t n) { return (n + ALIGN - 1) & ~(uint64_t)(ALIGN - 1); }

static inline double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

typedef struct {
    uint64_t at, size;
} Span;

/* --- write ---------------------------------------------------------------------------- */

static PyObject *native_write(PyObject *self, PyObject *args) {
    Py_buffer seg;
    unsigned long long reserved, seq;
    PyObject *frames_obj;
    if (!PyArg_ParseTuple(args, "w*KKO", &seg, &reserved, &seq, &frames_obj)) return NULL;
    PyObject *result = NULL, *frames = NULL;
    Py_buffer *bufs = NULL;
    Span *spans = NULL;
    Py_ssize_t n = 0, got = 0;

    frames = PySequence_Fast(frames_obj, "frames must be a sequence");
    if (frames == NULL) goto done;
    n = PySequence_Fast_GET_SIZE(frames);
    if ((uint64_t)n > MAX_FRAMES) {
        PyErr_Format(PyExc_ValueError, "%zd frames; a message has at most %u", n, MAX_FRAMES);
        goto done;
    }
    if ((uint64_t)seg.len < CTRL_BYTES) {
        PyErr_SetString(PyExc_ValueError, "segment smaller than its control block");
        goto done;
    }
    uint64_t arena = (uint64_t)seg.len - CTRL_BYTES;
    bufs = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    spans = PyMem_Calloc((size_t)n + 1, sizeof(Span));
    if (bufs == NULL || spans == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (got = 0; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(frames, got), &bufs[got],
                               PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "frames must be C-contiguous buffers");
            goto done;
        }
    }
    /* tensor frames first, from the end of the table (where reserve() put them), then the
     * header: the layout _Region.reserve hands out. Sizes add up saturating: a message too
     * large for any arena says so instead of wrapping around. */
    const uint64_t huge = (uint64_t)INT64_MAX;
    uint64_t at = align_up(16u * (uint64_t)n);
    for (Py_ssize_t i = 1; i <= n && n > 0; i++) {
        Py_ssize_t k = i % n; /* 1, 2, ..., n-1, then 0 */
        uint64_t size = (uint64_t)bufs[k].len;
        spans[k].at = at;
        spans[k].size = size;
        at = (at >= huge - ALIGN || size >= huge - ALIGN - at) ? huge : align_up(at + size);
    }
    uint64_t end = at;
    if (end > reserved || end > arena) { /* the caller reserves, or refuses it as too large */
        result = PyLong_FromLongLong(-(long long)end);
        goto done;
    }
    uint8_t *base = (uint8_t *)seg.buf, *dst = base + CTRL_BYTES;
    uint64_t copied = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        uint8_t *to = dst + spans[k].at;
        if (spans[k].size && bufs[k].buf != (void *)to) { /* a reserved view is in place */
            memmove(to, bufs[k].buf, spans[k].size);
            copied += spans[k].size;
        }
    }
    uint64_t *table = (uint64_t *)dst;
    for (Py_ssize_t k = 0; k < n; k++) {
        table[2 * k] = spans[k].at;
        table[2 * k + 1] = spans[k].size;
    }
    memcpy(base, MAGIC, 8);
    memcpy(base + 8, &seq, 8);
    uint32_t nframes = (uint32_t)n, pad = 0;
    memcpy(base + 16, &nframes, 4);
    memcpy(base + 20, &pad, 4);
    memcpy(base + 24, &end, 8);
    result = PyLong_FromUnsignedLongLong(copied);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    PyMem_Free(spans);
    Py_XDECREF(frames);
    PyBuffer_Release(&seg);
    return result;
}

/* --- read ----------------------------------------------------------------------------- */

static PyObject *native_read(PyObject *self, PyObject *args) {
    PyObject *view_obj, *outs_obj = Py_None;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "OK|O", &view_obj, &seq, &outs_obj)) return NULL;
    Py_buffer seg;
    if (PyObject_GetBuffer(view_obj, &seg, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = NULL, *outs = NULL;
    Span *spans = NULL;
    if ((uint64_t)seg.len < CTRL_BYTES) {
        PyErr_SetString(PyExc_ValueError, "segment smaller than its control block");
        goto done;
    }
    uint64_t arena = (uint64_t)seg.len - CTRL_BYTES;
    const uint8_t *base = (const uint8_t *)seg.buf, *src = base + CTRL_BYTES;
    uint8_t ctrl[32];
    memcpy(ctrl, base, sizeof ctrl); /* once: the peer may be rewriting it */
    uint64_t got_seq, used;
    uint32_t n;
    memcpy(&got_seq, ctrl + 8, 8);
    memcpy(&n, ctrl + 16, 4);
    memcpy(&used, ctrl + 24, 8);
    if (memcmp(ctrl, MAGIC, 8) != 0) {
        PyErr_SetString(Malformed, "control block has no magic");
        goto done;
    }
    if (got_seq != seq) {
        PyErr_Format(Malformed, "message is numbered %llu, expected %llu",
                     (unsigned long long)got_seq, seq);
        goto done;
    }
    if (n > MAX_FRAMES || used > arena || 16u * (uint64_t)n > used) {
        PyErr_Format(Malformed, "control block claims %u frames in %llu bytes", n,
                     (unsigned long long)used);
        goto done;
    }
    spans = PyMem_Malloc(sizeof(Span) * (n ? n : 1));
    if (spans == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(spans, src, 16u * (size_t)n);
    uint64_t low = 16u * (uint64_t)n;
    for (uint32_t i = 0; i < n; i++) {
        if (spans[i].at < low || spans[i].size > used || spans[i].at > used - spans[i].size) {
            PyErr_Format(Malformed, "frame %u at %llu+%llu lies outside the message", i,
                         (unsigned long long)spans[i].at, (unsigned long long)spans[i].size);
            goto done;
        }
    }
    if (outs_obj != Py_None) {
        outs = PySequence_Fast(outs_obj, "outs must be a sequence");
        if (outs == NULL) goto done;
    }
    Py_ssize_t nouts = outs ? PySequence_Fast_GET_SIZE(outs) : -1;
    if (outs != NULL && n >= 1 && (Py_ssize_t)n == nouts + 1 && spans[0].size <= MAX_HEAD) {
        /* every size checked before anything is copied: a mismatch hands back views */
        Py_buffer *obs = PyMem_Calloc((size_t)nouts + 1, sizeof(Py_buffer));
        if (obs == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        Py_ssize_t held = 0;
        int match = 1;
        for (; held < nouts; held++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(outs, held), &obs[held],
                                   PyBUF_SIMPLE) < 0) {
                PyErr_Clear(); /* not a flat buffer: no match */
                match = 0;
                break;
            }
            if ((uint64_t)obs[held].len != spans[held + 1].size) {
                held++;
                match = 0;
                break;
            }
        }
        for (Py_ssize_t i = 0; match && i < nouts; i++) {
            if (obs[i].readonly && obs[i].len) {
                PyErr_SetString(PyExc_BufferError, "read(outs=...): an output is read-only");
                match = -1;
            }
        }
        if (match == 1) {
            result = PyList_New(n);
            PyObject *head = result ? PyBytes_FromStringAndSize(
                                          (const char *)src + spans[0].at, (Py_ssize_t)spans[0].size)
                                    : NULL;
            if (head == NULL) {
                Py_CLEAR(result);
            } else {
                PyList_SET_ITEM(result, 0, head);
                for (Py_ssize_t i = 0; i < nouts; i++) {
                    if (obs[i].len) memcpy(obs[i].buf, src + spans[i + 1].at, spans[i + 1].size);
                    PyObject *out = PySequence_Fast_GET_ITEM(outs, i);
                    Py_INCREF(out);
                    PyList_SET_ITEM(result, i + 1, out);
                }
            }
        }
        for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&obs[i]);
        PyMem_Free(obs);
        if (match != 0) goto done; /* copied (or failed: read-only, no memory) */
    }
    /* views: slices of the caller's memoryview, read-only where it is */
    result = PyList_New(n);
    if (result == NULL) goto done;
    for (uint32_t i = 0; i < n; i++) {
        Py_ssize_t start = (Py_ssize_t)(CTRL_BYTES + spans[i].at);
        PyObject *item = PySequence_GetSlice(view_obj, start, start + (Py_ssize_t)spans[i].size);
        if (item == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, item);
    }
done:
    Py_XDECREF(outs);
    PyMem_Free(spans);
    PyBuffer_Release(&seg);
    return result;
}

/* --- semaphores ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD sem_t *sem;
} SemObject;

static int Sem_init(SemObject *self, PyObject *args, PyObject *kwds) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return -1;
    sem_t *sem;
    Py_BEGIN_ALLOW_THREADS
    sem = sem_open(name, 0);
    Py_END_ALLOW_THREADS
    if (sem == SEM_FAILED) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
        return -1;
    }
    if (self->sem != NULL) sem_close(self->sem);
    self->sem = sem;
    return 0;
}

static void Sem_dealloc(SemObject *self) {
    if (self->sem != NULL) sem_close(self->sem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Sem_close(SemObject *self, PyObject *unused) {
    if (self->sem != NULL) {
        sem_close(self->sem);
        self->sem = NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Sem_post(SemObject *self, PyObject *unused) {
    if (self->sem == NULL) {
        PyErr_SetString(PyExc_ValueError, "semaphore is closed");
        return NULL;
    }
    if (sem_post(self->sem) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* take(spin_s, wait_s): poll for spin_s, then sleep at most wait_s; False if still
 * unavailable (or a signal arrived: its Python handler runs before this returns). */
static PyObject *Sem_take(SemObject *self, PyObject *args) {
    double spin_s, wait_s;
    if (!PyArg_ParseTuple(args, "dd", &spin_s, &wait_s)) return NULL;
    if (self->sem == NULL) {
        PyErr_SetString(PyExc_ValueError, "semaphore is closed");
        return NULL;
    }
    sem_t *sem = self->sem;
    if (sem_trywait(sem) == 0) Py_RETURN_TRUE;
    int got = 0, interrupted = 0, failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (spin_s > 0) {
        double end = now_s() + spin_s;
        unsigned k = 0;
        while (!got) {
            if (sem_trywait(sem) == 0) {
                got = 1;
                break;
            }
            cpu_relax();
            if ((++k & 63u) == 0 && now_s() >= end) break;
        }
    }
    if (!got && wait_s > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts); /* sem_timedwait's clock */
        double whole = (double)(long long)wait_s;
        ts.tv_sec += (time_t)whole;
        ts.tv_nsec += (long)((wait_s - whole) * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec += 1;
            ts.tv_nsec -= 1000000000L;
        }
        if (sem_timedwait(sem, &ts) == 0)
            got = 1;
        else if (errno == EINTR)
            interrupted = 1;
        else if (errno != ETIMEDOUT)
            failed = errno;
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (interrupted && PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(got);
}

static PyMethodDef Sem_methods[] = {
    {"take", (PyCFunction)Sem_take, METH_VARARGS,
     "take(spin_s, wait_s) -> bool: poll, then sleep at most wait_s"},
    {"post", (PyCFunction)Sem_post, METH_NOARGS, "post()"},
    {"close", (PyCFunction)Sem_close, METH_NOARGS, "close(); idempotent"},
    {NULL}};

static PyTypeObject SemType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tsqp_transport_shm._native.Sem",
    .tp_basicsize = sizeof(SemObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Sem(name): an existing POSIX named semaphore, opened",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Sem_init,
    .tp_dealloc = (destructor)Sem_dealloc,
    .tp_methods = Sem_methods,
};

/* --- module ---------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"write", native_write, METH_VARARGS,
     "write(view, reserved, seq, frames) -> bytes copied, or -end (reserve first)"},
    {"read", native_read, METH_VARARGS,
     "read(view, seq, outs=None) -> frames: views, or [header bytes, *outs] copied"},
    {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "The shm transport's per-message work in C.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&SemType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Malformed = PyErr_NewException("tsqp_transport_shm._native.Malformed", PyExc_ValueError, NULL);
    if (Malformed == NULL || PyModule_AddObject(m, "Malformed", Malformed) < 0) goto fail;
    Py_INCREF(&SemType);
    if (PyModule_AddObject(m, "Sem", (PyObject *)&SemType) < 0) {
        Py_DECREF(&SemType);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
