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
 * share its work among `threads` threads of the process's pool (`split`), in pieces: groups and
 * elements are computed one by one, each the same wherever a piece begins, so the bytes do not
 * depend on it.
 */
#include "fused.h"


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
        for (Py_ssize_t s = 0; s < nstreams; s++) at[s] = widened(&streams[s], first, GROUP, scratch + s * GROUP);
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

static void sums_part(void *ctx, int slot, Py_ssize_t g0, Py_ssize_t g1) {
    SumsJob *j = ctx;
    Py_ssize_t width = j->nstreams + j->nvec;
    sum_groups(j->streams, j->nstreams, j->vectors, j->nvec, j->terms, j->nterms, j->groups, g0, g1,
               j->scratch + slot * width * GROUP, j->at + slot * width, j->out);
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

const char group_sums_doc[] = PyDoc_STR(
             "group_sums(streams, vectors, pairs, out, threads=1)\n\n"
             "For each (i, j) of `pairs`, the float64 sums of the aligned groups of GROUP terms\n"
             "v[i][k] * v[j][k] (j >= 0) or v[i][k] (j == -1), each group summed by halving, written to\n"
             "out[p * groups + g]. Vector v[i] is, for (a, b) = vectors[i], the float32 difference\n"
             "streams[a] - streams[b] (b >= 0) or streams[a] (b == -1). `streams`: float32 ('f') or\n"
             "bfloat16-bit ('h', 'H') buffers of one length, a multiple of GROUP; `out`: a float64\n"
             "buffer of len(pairs) * length / GROUP items. Up to `threads` threads share the groups\n"
             "(the process's pool, pieces of 2**16 elements); the sums are the same for any number.");

PyObject *group_sums(PyObject *self, PyObject *args) {
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
    int parts = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads; /* scratch slots */
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
    split(sums_part, &job, n / GROUP, piece_for(GROUP), parts);
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
