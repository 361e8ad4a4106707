/* The loops of a SLERP or model stock merge, fused in C: the statistics' sums (`group_sums`,
 * below) and the merge itself (`combine`, further down).
 *
 * The first level of `engine.stats.pairwise`'s tree, fused: each aligned group of GROUP terms
 * (float32 values, or products of two float32 values, widened to float64) summed by halving, in
 * one pass over the inputs, which may be the merge's bfloat16 read buffers themselves.
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
 * The terms' vectors are formed here too (a bfloat16 widened, a model stock delta subtracted in
 * float32, as torch's cast and `sub_` do), so the statistics pass of a bfloat16 merge never
 * writes the float32 copies of its chunks: on 2 cores those copies and deltas took about as long
 * as the sums.
 *
 * The GIL is released while the loops run: the readers and the writer keep going. Each call may
 * cut its work into `threads` contiguous parts run side by side (`split`): groups and elements are
 * computed one by one, each the same wherever a part begins, so the bytes do not depend on it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

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
    const void *buf;
    int bf16; /* 1: bfloat16 bits, 0: float32 */
} Stream;

/* Two indices: a vector's streams (a - b, or a alone where b < 0), or a term's vectors (i * j, or
 * i alone where j < 0). */
typedef struct {
    Py_ssize_t x, y;
} Indices;

/* ------------------------------------------------------------------ parts on threads */

#define MAX_THREADS 64
#define MIN_PART (1 << 20) /* elements: a part of ~0.3 ms or more pays for its thread's start */

typedef void (*PartFn)(void *ctx, int part, Py_ssize_t lo, Py_ssize_t hi);

typedef struct {
    PartFn fn;
    void *ctx;
    int part;
    Py_ssize_t lo, hi;
} Part;

static void *run_part(void *arg) {
    Part *p = arg;
    p->fn(p->ctx, p->part, p->lo, p->hi);
    return NULL;
}

/* How many parts `n` units of `unit` elements each make for `threads` threads: at least one, at
 * most MAX_THREADS, and none under MIN_PART elements. */
static int parts_for(Py_ssize_t n, Py_ssize_t unit, int threads) {
    Py_ssize_t most = n * unit / MIN_PART;
    int parts = threads < MAX_THREADS ? threads : MAX_THREADS;
    if (most < parts) parts = (int)most;
    return parts < 1 ? 1 : parts;
}

/* fn over [0, n) cut into `parts` contiguous ranges, part 0 on the calling thread and the others
 * on threads of their own; a thread that cannot start runs its part here. Called without the GIL. */
static void split(PartFn fn, void *ctx, Py_ssize_t n, int parts) {
    Part p[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 0; k < parts; k++) p[k] = (Part){fn, ctx, k, n * k / parts, n * (k + 1) / parts};
    for (int k = 1; k < parts; k++) started[k] = pthread_create(&ids[k], NULL, run_part, &p[k]) == 0;
    run_part(&p[0]);
    for (int k = 1; k < parts; k++) {
        if (started[k])
            pthread_join(ids[k], NULL);
        else
            run_part(&p[k]);
    }
}

/* ------------------------------------------------------------------ the statistics' sums */

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

/* A bfloat16 is the upper half of a float32: widening is exact, as torch's cast. */
static inline void widen_bf16(const uint16_t *h, float *out, int len) {
    for (int k = 0; k < len; k++) {
        uint32_t u = (uint32_t)h[k] << 16;
        memcpy(&out[k], &u, sizeof u);
    }
}

/* One float32 subtraction per element, as torch's `sub_` of the float32 workspace copies (a
 * model stock delta): IEEE, the same rounding on every path. */
static inline void difference(const float *x, const float *y, float *out) {
    for (int k = 0; k < GROUP; k++) out[k] = x[k] - y[k];
}

/* out[t * groups + g]: the sum of group g of terms[t], for every t < nterms and g0 <= g < g1.
 * Group-major, so a group's inputs are read from memory once for every term: each stream is
 * widened (bfloat16) and each vector formed (a difference) into `scratch`, GROUP floats per stream
 * and per vector, which stays in the L2 cache. */
CLONES static void sum_groups(const Stream *streams, Py_ssize_t nstreams, const Indices *vectors, Py_ssize_t nvec,
                              const Indices *terms, Py_ssize_t nterms, Py_ssize_t groups, Py_ssize_t g0,
                              Py_ssize_t g1, float *scratch, const float **at, double *out) {
    double w[HALF];
    for (Py_ssize_t g = g0; g < g1; g++) {
        Py_ssize_t first = g * GROUP;
        for (Py_ssize_t s = 0; s < nstreams; s++) {
            if (streams[s].bf16) {
                widen_bf16((const uint16_t *)streams[s].buf + first, scratch + s * GROUP, GROUP);
                at[s] = scratch + s * GROUP;
            } else {
                at[s] = (const float *)streams[s].buf + first;
            }
        }
        for (Py_ssize_t v = 0; v < nvec; v++) {
            const Indices *d = &vectors[v];
            float *mine = scratch + (nstreams + v) * GROUP;
            if (d->y >= 0) difference(at[d->x], at[d->y], mine);
            at[nstreams + v] = d->y >= 0 ? mine : at[d->x];
        }
        const float **vec = at + nstreams;
        for (Py_ssize_t t = 0; t < nterms; t++) {
            const Indices *term = &terms[t];
            out[t * groups + g] = term->y >= 0 ? group_dot(vec[term->x], vec[term->y], w) : group_sum(vec[term->x], w);
        }
    }
}

typedef struct {
    const Stream *streams;
    Py_ssize_t nstreams;
    const Indices *vectors;
    Py_ssize_t nvec;
    const Indices *terms;
    Py_ssize_t nterms, groups;
    float *scratch;   /* per part: (nstreams + nvec) * GROUP floats */
    const float **at; /* per part: nstreams + nvec pointers */
    double *out;
} SumsJob;

static void sums_part(void *ctx, int part, Py_ssize_t g0, Py_ssize_t g1) {
    SumsJob *j = ctx;
    Py_ssize_t width = j->nstreams + j->nvec;
    sum_groups(j->streams, j->nstreams, j->vectors, j->nvec, j->terms, j->nterms, j->groups, g0, g1,
               j->scratch + part * width * GROUP, j->at + part * width, j->out);
}

/* Fills `view` with a C-contiguous buffer of one of `formats` (one char each); -1 with a Python
 * error set. */
static int get_buffer(PyObject *obj, Py_buffer *view, const char *formats, int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (f[0] == '\0' || f[1] != '\0' || strchr(formats, f[0]) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: want a contiguous buffer of format '%s', got '%s'", what, formats, f);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The float32 or bfloat16 buffers of the tuple `obj` into views[] and streams[], counting the
 * views taken in *got (to release); their common length, or -1 with a Python error set. */
static Py_ssize_t get_streams(PyObject *obj, Py_buffer *views, Stream *streams, Py_ssize_t *got, const char *fn) {
    Py_ssize_t n = -1;
    for (; *got < PyTuple_GET_SIZE(obj); (*got)++) {
        Py_buffer *v = &views[*got];
        if (get_buffer(PyTuple_GET_ITEM(obj, *got), v, "fhH", 0, "streams") < 0) return -1;
        streams[*got].buf = v->buf;
        streams[*got].bf16 = v->format[0] != 'f';
        if (n >= 0 && v->len / v->itemsize != n) {
            PyErr_Format(PyExc_ValueError, "%s: streams of %zd and %zd items", fn, n, v->len / v->itemsize);
            (*got)++;
            return -1;
        }
        n = v->len / v->itemsize;
    }
    return n;
}

static void release_streams(Py_buffer *views, Stream *streams, Py_ssize_t got) {
    for (Py_ssize_t v = 0; v < got; v++) PyBuffer_Release(&views[v]);
    PyMem_Free(views);
    PyMem_Free(streams);
}

/* Reads `tuple` of (x, y) into out[k], each x in [0, n) and y in [-1, n). */
static int get_indices(PyObject *tuple, Indices *out, Py_ssize_t n, const char *what) {
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(tuple); k++) {
        Py_ssize_t x, y;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(tuple, k), "nn:group_sums", &x, &y)) return -1;
        if (x < 0 || x >= n || y < -1 || y >= n) {
            PyErr_Format(PyExc_IndexError, "group_sums: %s (%zd, %zd) for %zd", what, x, y, n);
            return -1;
        }
        out[k].x = x;
        out[k].y = y;
    }
    return 0;
}

PyDoc_STRVAR(group_sums_doc,
             "group_sums(streams, vectors, pairs, out, threads=1)\n\n"
             "For each (i, j) of `pairs`, the float64 sums of the aligned groups of GROUP terms\n"
             "v[i][k] * v[j][k] (j >= 0) or v[i][k] (j == -1), each group summed by halving, written to\n"
             "out[p * groups + g]. Vector v[i] is, for (a, b) = vectors[i], the float32 difference\n"
             "streams[a] - streams[b] (b >= 0) or streams[a] (b == -1). `streams`: float32 ('f') or\n"
             "bfloat16-bit ('h', 'H') buffers of one length, a multiple of GROUP; `out`: a float64\n"
             "buffer of len(pairs) * length / GROUP items. Up to `threads` threads share the groups\n"
             "(parts of at least 2**20 elements); the sums are the same for any number.");

static PyObject *group_sums(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *streams_obj, *vectors_obj, *pairs_obj, *out_obj;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O!O!O!O|i:group_sums", &PyTuple_Type, &streams_obj, &PyTuple_Type, &vectors_obj,
                          &PyTuple_Type, &pairs_obj, &out_obj, &threads))
        return NULL;
    Py_ssize_t nstreams = PyTuple_GET_SIZE(streams_obj), nvec = PyTuple_GET_SIZE(vectors_obj);
    Py_ssize_t nterms = PyTuple_GET_SIZE(pairs_obj);
    if (nstreams == 0 || nvec == 0 || nterms == 0) {
        PyErr_SetString(PyExc_ValueError, "group_sums: no streams, vectors or pairs");
        return NULL;
    }
    Py_buffer *views = PyMem_Calloc(nstreams, sizeof(Py_buffer));
    Stream *streams = PyMem_Calloc(nstreams, sizeof(Stream));
    Indices *vectors = PyMem_Calloc(nvec, sizeof(Indices));
    Indices *terms = PyMem_Calloc(nterms, sizeof(Indices));
    float *scratch = NULL;
    const float **at = NULL; /* a group's values: streams, vectors */
    Py_buffer out = {0};
    Py_ssize_t got = 0, n;
    PyObject *result = NULL;
    if (views == NULL || streams == NULL || vectors == NULL || terms == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((n = get_streams(streams_obj, views, streams, &got, "group_sums")) < 0) goto done;
    if (n % GROUP) {
        PyErr_Format(PyExc_ValueError, "group_sums: %zd items is not a multiple of %d", n, GROUP);
        goto done;
    }
    int parts = parts_for(n / GROUP, GROUP, threads);
    scratch = PyMem_Calloc((size_t)parts * (nstreams + nvec) * GROUP, sizeof(float));
    at = PyMem_Calloc((size_t)parts * (nstreams + nvec), sizeof(float *));
    if (scratch == NULL || at == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_indices(vectors_obj, vectors, nstreams, "vector") < 0) goto done;
    if (get_indices(pairs_obj, terms, nvec, "pair") < 0) goto done;
    if (get_buffer(out_obj, &out, "d", 1, "out") < 0) goto done;
    if (out.len != nterms * (n / GROUP) * (Py_ssize_t)sizeof(double)) {
        PyErr_Format(PyExc_ValueError, "group_sums: out holds %zd items, want %zd", out.len / 8, nterms * (n / GROUP));
        PyBuffer_Release(&out);
        goto done;
    }
    SumsJob job = {streams, nstreams, vectors, nvec, terms, nterms, n / GROUP, scratch, at, out.buf};
    Py_BEGIN_ALLOW_THREADS
    split(sums_part, &job, n / GROUP, parts);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    result = Py_NewRef(Py_None);
done:
    release_streams(views, streams, got);
    PyMem_Free(vectors);
    PyMem_Free(terms);
    PyMem_Free(scratch);
    PyMem_Free(at);
    return result;
}

/* ---------------------------------------------------------------- linear merges, fused
 *
 * A merge written as steps over its inputs (`engine.methods.steps`), run over blocks of COMBINE
 * elements that stay in the L1 cache: the bfloat16 inputs widened, each step one float32 IEEE op
 * per element in the order torch's eager ops take (a scaled term is multiplied, rounded, then
 * added: the file is compiled with -ffp-contract=off so no FMA fuses the two), and the result
 * rounded to the output dtype as torch's cast does. So the bytes are those of the eager path,
 * without its float32 copies of every input and its pass over memory per op. */

#define COMBINE 1024
enum { SET = 0, ADD = 1, DIV = 2, MUL = 3 };

typedef struct {
    int op, scaled;
    Py_ssize_t stream;
    float scale; /* a Python float rounded to float32, as torch takes a scalar for a float32 tensor */
} Step;

/* Round to nearest, ties to even, as torch's float -> bfloat16; a NaN becomes `nan` (torch's). */
static inline uint16_t round_bf16(float f, uint16_t nan) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return f != f ? nan : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline const float *widened(const Stream *s, Py_ssize_t at, int len, float *tmp) {
    if (!s->bf16) return (const float *)s->buf + at;
    widen_bf16((const uint16_t *)s->buf + at, tmp, len);
    return tmp;
}

/* Elements [lo, n). */
CLONES static void combine_blocks(const Stream *streams, const Step *steps, Py_ssize_t nsteps, Py_ssize_t lo,
                                  Py_ssize_t n, void *out, int out_bf16, uint16_t nan) {
    float acc[COMBINE], tmp[COMBINE];
    for (Py_ssize_t at = lo; at < n; at += COMBINE) {
        int len = n - at < COMBINE ? (int)(n - at) : COMBINE;
        for (Py_ssize_t i = 0; i < nsteps; i++) {
            const Step *st = &steps[i];
            float s = st->scale;
            if (st->op == DIV) {
                for (int k = 0; k < len; k++) acc[k] = acc[k] / s;
            } else if (st->op == MUL) {
                for (int k = 0; k < len; k++) acc[k] = acc[k] * s;
            } else {
                const float *x = widened(&streams[st->stream], at, len, tmp);
                if (st->op == SET && st->scaled)
                    for (int k = 0; k < len; k++) acc[k] = x[k] * s;
                else if (st->op == SET)
                    memcpy(acc, x, (size_t)len * sizeof(float));
                else if (st->scaled)
                    for (int k = 0; k < len; k++) acc[k] = acc[k] + x[k] * s;
                else
                    for (int k = 0; k < len; k++) acc[k] = acc[k] + x[k];
            }
        }
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + at;
            for (int k = 0; k < len; k++) o[k] = round_bf16(acc[k], nan);
        } else {
            memcpy((float *)out + at, acc, (size_t)len * sizeof(float));
        }
    }
}

typedef struct {
    const Stream *streams;
    const Step *steps;
    Py_ssize_t nsteps;
    void *out;
    int out_bf16;
    uint16_t nan;
} CombineJob;

static void combine_part(void *ctx, int part, Py_ssize_t lo, Py_ssize_t hi) {
    (void)part;
    CombineJob *j = ctx;
    combine_blocks(j->streams, j->steps, j->nsteps, lo, hi, j->out, j->out_bf16, j->nan);
}

PyDoc_STRVAR(combine_doc,
             "combine(streams, steps, out, nan, threads=1)\n\n"
             "Run `steps`, each (op, stream, scale): SET 0 (acc = x[stream], times scale unless it is\n"
             "None), ADD 1 (acc += x[stream], times scale unless None), DIV 2 (acc /= scale), MUL 3\n"
             "(acc *= scale; stream ignored), in float32 over every element of `streams` (float32 'f'\n"
             "or bfloat16-bit 'h'/'H' buffers of one length), the first step a SET, and write acc to\n"
             "`out` (float32, or bfloat16 bits rounded to nearest even, a NaN as the bits `nan`). Up to\n"
             "`threads` threads share the elements (parts of at least 2**20); the bytes are the same.");

static PyObject *combine(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *streams_obj, *steps_obj, *out_obj;
    unsigned short nan;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O!O!OH|i:combine", &PyTuple_Type, &streams_obj, &PyTuple_Type, &steps_obj, &out_obj,
                          &nan, &threads))
        return NULL;
    Py_ssize_t nstreams = PyTuple_GET_SIZE(streams_obj), nsteps = PyTuple_GET_SIZE(steps_obj);
    if (nstreams == 0 || nsteps == 0) {
        PyErr_SetString(PyExc_ValueError, "combine: no streams or no steps");
        return NULL;
    }
    Py_buffer *views = PyMem_Calloc(nstreams, sizeof(Py_buffer));
    Stream *streams = PyMem_Calloc(nstreams, sizeof(Stream));
    Step *steps = PyMem_Calloc(nsteps, sizeof(Step));
    Py_buffer out = {0};
    Py_ssize_t got = 0, n;
    PyObject *result = NULL;
    if (views == NULL || streams == NULL || steps == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((n = get_streams(streams_obj, views, streams, &got, "combine")) < 0) goto done;
    for (Py_ssize_t i = 0; i < nsteps; i++) {
        PyObject *scale;
        Step *st = &steps[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(steps_obj, i), "inO:combine step", &st->op, &st->stream, &scale))
            goto done;
        st->scaled = scale != Py_None;
        double d = st->scaled ? PyFloat_AsDouble(scale) : 1.0;
        if (d == -1.0 && PyErr_Occurred()) goto done;
        st->scale = (float)d;
        int reads = st->op == SET || st->op == ADD;
        if (st->op < SET || st->op > MUL || (i == 0) != (st->op == SET) || (reads && (st->stream < 0 || st->stream >= nstreams)) ||
            (!reads && !st->scaled)) {
            PyErr_Format(PyExc_ValueError, "combine: step %zd (op %d, stream %zd) is not valid here", i, st->op,
                         st->stream);
            goto done;
        }
    }
    if (get_buffer(out_obj, &out, "fhH", 1, "out") < 0) goto done;
    if (out.len / out.itemsize != n) {
        PyErr_Format(PyExc_ValueError, "combine: out holds %zd items, want %zd", out.len / out.itemsize, n);
        PyBuffer_Release(&out);
        goto done;
    }
    int out_bf16 = out.format[0] != 'f';
    CombineJob job = {streams, steps, nsteps, out.buf, out_bf16, (uint16_t)nan};
    Py_BEGIN_ALLOW_THREADS
    split(combine_part, &job, n, parts_for(n, 1, threads));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    result = Py_NewRef(Py_None);
done:
    release_streams(views, streams, got);
    PyMem_Free(steps);
    return result;
}

PyDoc_STRVAR(count_nonfinite_doc,
             "count_nonfinite(values, exponent) -> int\n\n"
             "How many of the floats in `values` (their bits: 16-bit 'h'/'H' or 32-bit 'i'/'I' items) have\n"
             "every bit of `exponent` set, that is, are NaN or an infinity: `exponent` is 0x7F80 for\n"
             "bfloat16, 0x7C00 for float16, 0x7F800000 for float32. One pass, no thread pool: it runs on\n"
             "the thread that read the block, beside the merge.");

static PyObject *count_nonfinite(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    unsigned long exponent;
    if (!PyArg_ParseTuple(args, "Ok:count_nonfinite", &obj, &exponent)) return NULL;
    Py_buffer v;
    if (get_buffer(obj, &v, "hHiI", 0, "values") < 0) return NULL;
    Py_ssize_t n = v.len / v.itemsize, count = 0;
    Py_BEGIN_ALLOW_THREADS
    if (v.itemsize == 2) {
        const uint16_t *x = v.buf, e = (uint16_t)exponent;
        for (Py_ssize_t i = 0; i < n; i++) count += (x[i] & e) == e;
    } else {
        const uint32_t *x = v.buf, e = (uint32_t)exponent;
        for (Py_ssize_t i = 0; i < n; i++) count += (x[i] & e) == e;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return PyLong_FromSsize_t(count);
}

static PyMethodDef methods[] = {
    {"group_sums", group_sums, METH_VARARGS, group_sums_doc},
    {"combine", combine, METH_VARARGS, combine_doc},
    {"count_nonfinite", count_nonfinite, METH_VARARGS, count_nonfinite_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "engine.stats._fused",
    .m_doc = "The first level of the fixed-order sums, and linear merges, fused in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fused(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "GROUP", GROUP) < 0) Py_CLEAR(m);
    return m;
}
