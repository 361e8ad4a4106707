/* The first level of `engine.stats.pairwise`'s tree, fused: each aligned group of GROUP terms
 * (float32 values, or products of two float32 values, widened to float64) summed by halving, in
 * one pass over the float32 inputs.
 *
 * The torch path widens every input to a float64 array, writes every product to another, then
 * runs GROUP's 12 halving levels as whole-array ops: about ten passes over memory per term. Here a
 * group's terms go straight from the inputs into a 16 KiB buffer that stays in the L1 cache, so a
 * SLERP or model stock merge's statistics cost a fraction of a nanosecond per term instead of
 * several. The adds are the same IEEE float64 adds in the same order (pairwise.py's docstring):
 *
 *     w[k] = t[k] + t[k + GROUP/2]            for k < GROUP/2   (the products: exact in float64)
 *     w[k] = w[k] + w[k + half]                for k < half, half = GROUP/4, ..., 1
 *
 * so the sums are bit for bit those of the torch path; tests check both. Contracting a product
 * and an add into an FMA cannot change a result: the products are exact.
 *
 * The GIL is released while the loops run: the readers and the writer keep going.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define GROUP 4096 /* the kernel is used only while engine.stats.pairwise.GROUP equals it */
#define HALF (GROUP / 2)

/* An AVX2 copy of the loops beside the baseline one, picked at load time by the CPU (GCC's
 * function multi-versioning; ~1.5-2x on the loops here). Vector width cannot change a result:
 * every add is still one IEEE add of the same two operands. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

typedef struct {
    const float *x, *y; /* y is NULL for a plain sum of x */
} Terms;

/* The halving levels after the first, on w[0 .. HALF). */
static inline double halve(double *w) {
    for (int half = HALF / 2; half; half /= 2)
        for (int k = 0; k < half; k++) w[k] += w[k + half];
    return w[0];
}

static inline double group_dot(const float *x, const float *y, double *w) {
    for (int k = 0; k < HALF; k++) w[k] = (double)x[k] * (double)y[k] + (double)x[k + HALF] * (double)y[k + HALF];
    return halve(w);
}

static inline double group_sum(const float *x, double *w) {
    for (int k = 0; k < HALF; k++) w[k] = (double)x[k] + (double)x[k + HALF];
    return halve(w);
}

/* out[b * groups + g]: the sum of group g of terms[b], for every b < batch. Group-major, so a
 * group's inputs are read from memory once for the whole batch. Single-threaded: a second thread
 * lost to torch's OpenMP workers (which spin between ops) in a merge: 3.6 s vs 1.2 s for SLERP's
 * statistics on 2 cores. */
CLONES static void sum_groups(const Terms *terms, Py_ssize_t batch, Py_ssize_t groups, double *out) {
    double w[HALF];
    for (Py_ssize_t g = 0; g < groups; g++) {
        Py_ssize_t at = g * GROUP;
        for (Py_ssize_t b = 0; b < batch; b++) {
            const Terms *t = &terms[b];
            out[b * groups + g] = t->y ? group_dot(t->x + at, t->y + at, w) : group_sum(t->x + at, w);
        }
    }
}

/* Fills `view` with a C-contiguous buffer of items of `format` (one char); -1 with a Python error set. */
static int get_buffer(PyObject *obj, Py_buffer *view, char format, int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    if (view->format == NULL || view->format[0] != format || view->format[1] != '\0') {
        PyErr_Format(PyExc_TypeError, "%s: want a contiguous buffer of format '%c', got '%s'", what, format,
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(group_sums_doc,
             "group_sums(vectors, pairs, out)\n\n"
             "For each (i, j) of `pairs`, the float64 sums of the aligned groups of GROUP terms\n"
             "vectors[i][k] * vectors[j][k] (j >= 0) or vectors[i][k] (j == -1), each group summed\n"
             "by halving, written to out[b * groups + g]. `vectors`: float32 buffers of one length,\n"
             "a multiple of GROUP; `out`: a float64 buffer of len(pairs) * length / GROUP items.");

static PyObject *group_sums(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *vectors, *pairs, *out_obj;
    if (!PyArg_ParseTuple(args, "O!O!O:group_sums", &PyTuple_Type, &vectors, &PyTuple_Type, &pairs, &out_obj))
        return NULL;
    Py_ssize_t nvec = PyTuple_GET_SIZE(vectors), batch = PyTuple_GET_SIZE(pairs);
    if (nvec == 0 || batch == 0) {
        PyErr_SetString(PyExc_ValueError, "group_sums: no vectors or no pairs");
        return NULL;
    }
    Py_buffer *views = PyMem_Calloc(nvec, sizeof(Py_buffer));
    Terms *terms = PyMem_Calloc(batch, sizeof(Terms));
    Py_buffer out = {0};
    Py_ssize_t got = 0, n = -1;
    PyObject *result = NULL;
    if (views == NULL || terms == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < nvec; got++) {
        if (get_buffer(PyTuple_GET_ITEM(vectors, got), &views[got], 'f', 0, "vectors") < 0) goto done;
        Py_ssize_t len = views[got].len / (Py_ssize_t)sizeof(float);
        if (n >= 0 && len != n) {
            PyErr_Format(PyExc_ValueError, "group_sums: vectors of %zd and %zd items", n, len);
            got++;
            goto done;
        }
        n = len;
    }
    if (n % GROUP) {
        PyErr_Format(PyExc_ValueError, "group_sums: %zd items is not a multiple of %d", n, GROUP);
        goto done;
    }
    for (Py_ssize_t b = 0; b < batch; b++) {
        Py_ssize_t i, j;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(pairs, b), "nn:group_sums pair", &i, &j)) goto done;
        if (i < 0 || i >= nvec || j < -1 || j >= nvec) {
            PyErr_Format(PyExc_IndexError, "group_sums: pair (%zd, %zd) for %zd vectors", i, j, nvec);
            goto done;
        }
        terms[b].x = views[i].buf;
        terms[b].y = j < 0 ? NULL : views[j].buf;
    }
    if (get_buffer(out_obj, &out, 'd', 1, "out") < 0) goto done;
    if (out.len != batch * (n / GROUP) * (Py_ssize_t)sizeof(double)) {
        PyErr_Format(PyExc_ValueError, "group_sums: out holds %zd items, want %zd", out.len / 8, batch * (n / GROUP));
        PyBuffer_Release(&out);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    sum_groups(terms, batch, n / GROUP, out.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t v = 0; v < got; v++) PyBuffer_Release(&views[v]);
    PyMem_Free(views);
    PyMem_Free(terms);
    return result;
}

static PyMethodDef methods[] = {
    {"group_sums", group_sums, METH_VARARGS, group_sums_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "engine.stats._fused",
    .m_doc = "The first level of the fixed-order sums, fused in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fused(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "GROUP", GROUP) < 0) Py_CLEAR(m);
    return m;
}
