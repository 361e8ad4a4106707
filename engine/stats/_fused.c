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
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
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
/* Inlined into each clone, so that the clone's instruction set reaches them. */
#define ALWAYS_INLINE __attribute__((always_inline))

enum { F32 = 0, BF16 = 1, F16 = 2 }; /* a buffer's element type: formats 'f', 'h'/'H', 'e' */

typedef struct {
    const void *buf;
    int kind; /* F32, BF16 or F16 */
} Stream;

/* Two indices: a vector's streams (a - b, or a alone where b < 0), or a term's vectors (i * j, or
 * i alone where j < 0). */
typedef struct {
    Py_ssize_t x, y;
} Indices;

/* ------------------------------------------------------------------ one pool of threads
 *
 * One pool per process, its workers started on first use (up to the `threads` a call asks for,
 * at most MAX_THREADS) and kept: an idle worker blocks on a condition variable, never spins, so
 * it costs nothing beside busy neighbours. A call cuts its work into pieces of `piece` units,
 * handed out from a shared counter: the calling thread takes pieces too, so a worker that the
 * scheduler has taken away holds up at most the one piece it took, never the call (a late worker
 * finds the call closed and goes back to sleep). Results never depend on which thread ran a
 * piece: every element, and every group of a sum, is computed alone. A second call made while the
 * pool is busy (another Python thread) runs on its own thread. Called without the GIL. */

#define MAX_THREADS 64

typedef void (*PartFn)(void *ctx, int slot, Py_ssize_t lo, Py_ssize_t hi);

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    int nworkers, open, busy, want;
    unsigned long gen;
    PartFn fn;
    void *ctx;
    Py_ssize_t n, piece, npieces, next;
} Pool;

static Pool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0,
                    NULL, NULL, 0, 0, 0, 0};
static pthread_mutex_t submitting = PTHREAD_MUTEX_INITIALIZER;

/* Take pieces until none is left; `slot` names the taker's scratch. */
static void take_pieces(PartFn fn, void *ctx, int slot, Py_ssize_t n, Py_ssize_t piece, Py_ssize_t npieces) {
    for (;;) {
        Py_ssize_t i = __atomic_fetch_add(&pool.next, 1, __ATOMIC_RELAXED);
        if (i >= npieces) return;
        Py_ssize_t lo = i * piece, hi = lo + piece < n ? lo + piece : n;
        fn(ctx, slot, lo, hi);
    }
}

static void *worker(void *arg) {
    int slot = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.gen == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.gen;
        if (!pool.open || slot >= pool.want) continue;
        PartFn fn = pool.fn;
        void *ctx = pool.ctx;
        Py_ssize_t n = pool.n, piece = pool.piece, npieces = pool.npieces;
        pool.busy++;
        pthread_mutex_unlock(&pool.mu);
        take_pieces(fn, ctx, slot, n, piece, npieces);
        pthread_mutex_lock(&pool.mu);
        if (--pool.busy == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* After fork() the child has none of the parent's workers: start afresh. */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_mutex_init(&submitting, NULL);
    pool.nworkers = pool.open = pool.busy = pool.want = 0;
}

/* Workers for `threads` threads in all (the caller is one); fewer where a thread cannot start. */
static int pool_grow(int threads) {
    while (pool.nworkers + 1 < threads) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int ok = pthread_create(&id, &attr, worker, (void *)(intptr_t)(pool.nworkers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.nworkers++;
    }
    return pool.nworkers + 1 < threads ? pool.nworkers + 1 : threads;
}

/* Pieces of `piece` units: ~64K elements each, a few tens of microseconds. */
static Py_ssize_t piece_for(Py_ssize_t unit) { return (1 << 16) / unit > 0 ? (1 << 16) / unit : 1; }

/* fn over [0, n) in pieces of `piece`, on up to `threads` threads; slots < threads. */
static void split(PartFn fn, void *ctx, Py_ssize_t n, Py_ssize_t piece, int threads) {
    Py_ssize_t npieces = (n + piece - 1) / piece;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > npieces) threads = (int)npieces;
    if (threads <= 1 || pthread_mutex_trylock(&submitting) != 0) {
        if (n > 0) fn(ctx, 0, 0, n);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    threads = pool_grow(threads);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.piece = piece;
    pool.npieces = npieces;
    pool.want = threads;
    __atomic_store_n(&pool.next, 0, __ATOMIC_RELAXED);
    pool.open = 1;
    pool.gen++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    take_pieces(fn, ctx, 0, n, piece, npieces);
    pthread_mutex_lock(&pool.mu);
    pool.open = 0; /* a worker not yet awake stays out: the ctx is about to go */
    while (pool.busy > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&submitting);
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

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* A bfloat16 is the upper half of a float32: widening is exact, as torch's cast. */
static inline void widen_bf16(const uint16_t *h, float *out, int len) {
    for (int k = 0; k < len; k++) out[k] = from_bits((uint32_t)h[k] << 16);
}

/* A float16 widened exactly, as torch's cast (the F16C instruction): the exponent rebiased by a
 * float32 multiplication, subnormals by a subtraction, a NaN's payload kept (quieted). Branch
 * free, so the loop vectorises. */
static inline float half_to_float(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float subnormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    uint32_t mask = -(uint32_t)(two_w < (1u << 27));
    return from_bits(sign | (to_bits(subnormal) & mask) | (to_bits(normal) & ~mask));
}

static inline void widen_f16(const uint16_t *h, float *out, int len) {
    for (int k = 0; k < len; k++) out[k] = half_to_float(h[k]);
}

/* Stream `s`'s elements [at, at + len) as float32: the buffer itself, or widened into `tmp`. */
static inline const float *widened(const Stream *s, Py_ssize_t at, int len, float *tmp) {
    if (s->kind == F32) return (const float *)s->buf + at;
    if (s->kind == BF16)
        widen_bf16((const uint16_t *)s->buf + at, tmp, len);
    else
        widen_f16((const uint16_t *)s->buf + at, tmp, len);
    return tmp;
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

/* The element type of a buffer of format 'f', 'h'/'H' (bfloat16 bits) or 'e'. */
static int kind_of(const Py_buffer *v) { return v->format[0] == 'f' ? F32 : v->format[0] == 'e' ? F16 : BF16; }

/* The float32, bfloat16 or float16 buffers of the tuple `obj` into views[] and streams[], counting the
 * views taken in *got (to release); their common length, or -1 with a Python error set. */
static Py_ssize_t get_streams(PyObject *obj, Py_buffer *views, Stream *streams, Py_ssize_t *got, const char *fn) {
    Py_ssize_t n = -1;
    for (; *got < PyTuple_GET_SIZE(obj); (*got)++) {
        Py_buffer *v = &views[*got];
        if (get_buffer(PyTuple_GET_ITEM(obj, *got), v, "fhHe", 0, "streams") < 0) return -1;
        streams[*got].buf = v->buf;
        streams[*got].kind = kind_of(v);
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
             "(the process's pool, pieces of 2**16 elements); the sums are the same for any number.");

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

/* ---------------------------------------------------------------- merges, fused
 *
 * A merge written as a program of steps over its inputs (`engine.methods.steps`), run over tiles
 * of COMBINE elements that stay in the L1/L2 cache: the bfloat16 and float16 inputs widened (exactly,
 * as torch's casts; a float16 NaN keeps its payload as torch's vectorised cast does), each step one
 * float32 IEEE op per element into one of a few registers, in the order torch's eager ops take (a
 * scaled term is multiplied, rounded, then added: the file is compiled with -ffp-contract=off so
 * no FMA fuses the two), and the result rounded to the output dtype as torch's cast does. So the
 * bytes are those of the eager path, without its float32 copies of every input and its pass over
 * memory per op. Besides the scaled adds of SLERP, model stock and linear, the steps cover the
 * delta methods: deltas (SUB), DARE's keyed keep test (KEEP: the hash of engine/rng.py, 64-bit
 * flat indices included), top-k cuts (TOP: TIES, breadcrumbs), sums of registers (ACC) and TIES
 * sign election with the disjoint mean (ELECT). */

#define COMBINE 1024
#define MAX_REGS 33 /* the accumulator and one register per model: 32 models */
enum { SET = 0, ADD = 1, DIV = 2, MUL = 3, SUB = 4, KEEP = 5, TOP = 6, ACC = 7, ELECT = 8 };

typedef struct {
    int op, scaled, reg, mode;
    Py_ssize_t stream;
    float scale;      /* a Python float rounded to float32, as torch takes a scalar for a float32 tensor */
    uint64_t thr;     /* KEEP: kept iff word < thr (0 .. 2**32) */
    int32_t t_in, t_out; /* TOP: kept iff in the inner cut and not in the outer one */
    int64_t last_in, last_out;
    float w[MAX_REGS]; /* ELECT: the models' weights */
} Step;

/* Round to nearest, ties to even, as torch's float -> bfloat16; a NaN becomes `nan` (torch's). */
static inline uint16_t round_bf16(float f, uint16_t nan) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return f != f ? nan : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Round to nearest, ties to even, as torch's float -> float16 (the F16C instruction): overflow
 * to infinity, subnormals rounded by a float32 addition; a NaN keeps its sign and the top of its
 * payload, quieted (`payload`), or becomes the sign and 0x7E00 (torch's scalar cast). */
static inline uint16_t round_f16(float f, int payload) {
    uint32_t w = to_bits(f), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    uint32_t bits = to_bits(from_bits((bias >> 1) + 0x07800000u) + base);
    uint32_t finite = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    uint32_t nan = 0x7E00u | (payload ? (w >> 13) & 0x03FFu : 0u);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? nan : finite));
}

/* a + b and a - b as torch's tensor ops on the CPU give them: where both are NaNs, b's NaN
 * (quieted, its sign kept), as its vectorised fused multiply-add b * ±1 + a does. */
/* cond ? a : b without a branch, so the loops vectorise (GCC will not if-convert float selects). */
static inline float select_f(int cond, float a, float b) {
    uint32_t ua, ub, mask = -(uint32_t)(cond != 0);
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    ua = (ua & mask) | (ub & ~mask);
    memcpy(&a, &ua, sizeof a);
    return a;
}

static inline float pick_nan(float r, float b) {
    uint32_t ur, ub, nan = -(uint32_t)(b != b); /* all ones where b is a NaN */
    memcpy(&ur, &r, sizeof ur);
    memcpy(&ub, &b, sizeof ub);
    ur = (ur & ~nan) | ((ub | 0x00400000u) & nan);
    memcpy(&r, &ur, sizeof r);
    return r;
}

static inline float add_t(float a, float b) { return pick_nan(a + b, b); }

static inline float sub_t(float a, float b) { return pick_nan(a - b, b); }

/* engine/rng.py's round keys of the 2**32 indices from hi * 2**32 (`_block_keys`). */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#define GOLDEN64 0x9E3779B97F4A7C15ULL

static void block_keys(uint64_t key, uint64_t hi, uint32_t *k) {
    uint64_t s = mix64(mix64(key) + (hi + 1) * GOLDEN64), t = mix64(s + GOLDEN64);
    k[0] = (uint32_t)s;
    k[1] = (uint32_t)(s >> 32);
    k[2] = (uint32_t)t;
}

/* DARE's keep mask, 1.0 or 0.0, of the element j after the segment's first (base = its low half
 * plus k0): word < thr, the word as engine/rng.py hashes it. */
static inline float keep_mask(uint32_t base, int j, uint32_t k1, uint32_t k2, uint32_t thr) {
    uint32_t x = (base + (uint32_t)j) * 0x9E3779B9u;
    x ^= x >> 16;
    x = x * 0x7FEB352Du + k1;
    x ^= x >> 16;
    x = x * 0x846CA68Bu + k2;
    x ^= x >> 16;
    return select_f((x ^ 0x80000000u) < thr, 1.0f, 0.0f);
}

/* r[j] *= (word(first + j) < thr) for j < m, inside one 2**32 segment (lo: first's low half). */
static inline ALWAYS_INLINE void keep_segment(float *r, int m, uint32_t lo, const uint32_t *k, uint32_t thr) {
    uint32_t base = lo + k[0], k1 = k[1], k2 = k[2];
    for (int j = 0; j < m; j++) r[j] = r[j] * keep_mask(base, j, k1, k2, thr);
}

/* DARE's keep test on len elements from flat index `first` (KeyedRng.keep's mask, multiplied in). */
static inline ALWAYS_INLINE void keep_tile(float *r, int len, uint64_t first, uint64_t key, uint64_t thr) {
    if (thr == 0 || thr >= ((uint64_t)1 << 32)) {
        float f = thr ? 1.0f : 0.0f;
        for (int j = 0; j < len; j++) r[j] = r[j] * f;
        return;
    }
    for (int j = 0; j < len;) {
        uint64_t i = first + (uint64_t)j;
        uint64_t room = ((uint64_t)1 << 32) - (uint32_t)i;
        int m = (uint64_t)(len - j) < room ? len - j : (int)room;
        uint32_t k[3];
        block_keys(key, i >> 32, k);
        keep_segment(r + j, m, (uint32_t)i, k, (uint32_t)thr);
        j += m;
    }
}

/* The last tie kept, relative to a tile's first element, clamped to [-1, len]. */
static inline int tie_limit(int64_t last, int64_t first, int len) {
    int64_t d = last - first;
    return d < -1 ? -1 : d > len ? len : (int)d;
}

/* engine.stats.topk's `in_top` of the inner cut and not of the outer one, multiplied in. */
static inline ALWAYS_INLINE void top_tile(float *r, int len, int64_t first, const Step *st) {
    int li = tie_limit(st->last_in, first, len), lo = tie_limit(st->last_out, first, len);
    int32_t ti = st->t_in, to = st->t_out;
    for (int j = 0; j < len; j++) {
        uint32_t u;
        memcpy(&u, &r[j], sizeof u);
        int32_t key = (int32_t)(u & 0x7FFFFFFFu);
        int in = (key > ti) | ((key == ti) & (j <= li));
        int out = (key > to) | ((key == to) & (j <= lo));
        r[j] = r[j] * select_f(in & !out, 1.0f, 0.0f);
    }
}

/* TIES: engine.methods.consensus's `disjoint_merge_` of registers 1..k into `acc`, its torch ops
 * per element in their order (the zeroed sums start each model's pass; the sign's product, the
 * + 0 and the division share the last). */
static inline ALWAYS_INLINE void elect_tile(float (*R)[COMBINE], float *acc, int len, const Step *st) {
    float sign[COMBINE], div[COMBINE];
    Py_ssize_t k = st->stream;
    if (k == 1) {
        for (int j = 0; j < len; j++) sign[j] = copysignf(1.0f, R[1][j]);
    } else if (k == 2) {
        for (int j = 0; j < len; j++) sign[j] = copysignf(1.0f, add_t(R[1][j], R[2][j]));
    } else {
        for (int j = 0; j < len; j++) sign[j] = add_t(R[1][j], R[2][j]);
        for (Py_ssize_t m = 3; m < k; m++)
            for (int j = 0; j < len; j++) sign[j] = add_t(sign[j], R[m][j]);
        for (int j = 0; j < len; j++) sign[j] = copysignf(1.0f, add_t(sign[j], R[k][j]));
    }
    for (Py_ssize_t m = 1; m <= k; m++) {
        float w = st->w[m];
        for (int j = 0; j < len; j++) {
            float a = R[m][j] * sign[j];
            a = select_f(a < 0.0f, 0.0f, a); /* torch's clamp_(min=0): a NaN stays */
            float was = m == 1 ? 0.0f : acc[j], count = m == 1 ? 0.0f : div[j];
            acc[j] = add_t(was, a);
            div[j] = count + w * select_f(a > 0.0f, 1.0f, 0.0f);
        }
    }
    if (st->mode == 1) {
        float c = st->scale;
        for (int j = 0; j < len; j++) acc[j] = (acc[j] * sign[j] + 0.0f) / select_f(div[j] < c, c, div[j]);
    } else if (st->mode == 2) {
        for (int j = 0; j < len; j++) acc[j] = (acc[j] * sign[j] + 0.0f) / select_f(div[j] == 0.0f, 1.0f, div[j]);
    } else {
        for (int j = 0; j < len; j++) acc[j] = acc[j] * sign[j] + 0.0f;
    }
}

typedef struct {
    const Stream *streams;
    const Step *steps;
    Py_ssize_t nsteps;
    void *out;
    int out_kind;         /* F32, BF16 or F16 */
    uint16_t nan;         /* a NaN's bfloat16 bits */
    int f16_payload;      /* a NaN's float16: its payload kept (1) or 0x7E00 (0) */
    int64_t start;        /* flat index of element 0 */
    const uint64_t *keys; /* KEEP: the models' rng keys */
    struct Tile *tiles;   /* one per thread slot */
} CombineJob;

/* A tile's registers and its inputs widened to float32, each stream at most once per tile. */
typedef struct Tile {
    float R[MAX_REGS][COMBINE];
    float W[MAX_REGS][COMBINE];
    const float *wide[MAX_REGS]; /* NULL: not widened yet in this tile */
} Tile;

static inline const float *input(const CombineJob *j, Tile *t, Py_ssize_t s, Py_ssize_t at, int len) {
    if (t->wide[s] == NULL) {
        const Stream *in = &j->streams[s];
        t->wide[s] = widened(in, at, len, t->W[s]);
    }
    return t->wide[s];
}

/* A model's delta and what DARE does to it, as one loop: r = x - b, then (each where asked) the
 * keep test (inside one 2**32 segment, keys k), a division and a multiplication: the ops of the
 * steps SET, SUB, KEEP, DIV, MUL in their order, per element. */
static inline ALWAYS_INLINE void delta_chain(float *r, const float *x, const float *b, int len, int keep,
                                             uint32_t lo, const uint32_t *k, uint32_t thr, int div, float dv,
                                             int mul, float mv) {
    uint32_t base = lo + k[0], k1 = k[1], k2 = k[2];
    for (int j = 0; j < len; j++) {
        float d = sub_t(x[j], b[j]);
        if (keep) d = d * keep_mask(base, j, k1, k2, thr);
        if (div) d = d / dv;
        if (mul) d = d * mv;
        r[j] = d;
    }
}

/* Steps i.. as one delta_chain where they are SET, SUB [, KEEP][, DIV][, MUL] of one register and
 * the keep test needs no second segment's keys nor a constant mask: the steps run, else 0. */
static inline ALWAYS_INLINE int run_chain(const CombineJob *j, Py_ssize_t i, Tile *t, Py_ssize_t at, int len) {
    const Step *st = &j->steps[i], *end = j->steps + j->nsteps, *s = st + 2;
    if (st->op != SET || st->scaled || s > end || st[1].op != SUB || st[1].reg != st->reg) return 0;
    const Step *keep = s < end && s->op == KEEP && s->reg == st->reg ? s++ : NULL;
    const Step *div = s < end && s->op == DIV && s->reg == st->reg ? s++ : NULL;
    const Step *mul = s < end && s->op == MUL && s->reg == st->reg ? s++ : NULL;
    uint64_t first = (uint64_t)(j->start + at);
    uint32_t k[3] = {0, 0, 0};
    if (keep) {
        if (keep->thr == 0 || keep->thr >= ((uint64_t)1 << 32) || (first >> 32) != ((first + len - 1) >> 32))
            return 0;
        block_keys(j->keys[keep->stream], first >> 32, k);
    }
    const float *x = input(j, t, st->stream, at, len), *b = input(j, t, st[1].stream, at, len);
    float dv = div ? div->scale : 1.0f, mv = mul ? mul->scale : 1.0f;
    uint32_t thr = keep ? (uint32_t)keep->thr : 0;
    float *r = t->R[st->reg];
    if (keep && div && mul)
        delta_chain(r, x, b, len, 1, (uint32_t)first, k, thr, 1, dv, 1, mv);
    else if (keep && div)
        delta_chain(r, x, b, len, 1, (uint32_t)first, k, thr, 1, dv, 0, mv);
    else if (keep && mul)
        delta_chain(r, x, b, len, 1, (uint32_t)first, k, thr, 0, dv, 1, mv);
    else if (keep)
        delta_chain(r, x, b, len, 1, (uint32_t)first, k, thr, 0, dv, 0, mv);
    else if (div && mul)
        delta_chain(r, x, b, len, 0, (uint32_t)first, k, thr, 1, dv, 1, mv);
    else if (div)
        delta_chain(r, x, b, len, 0, (uint32_t)first, k, thr, 1, dv, 0, mv);
    else if (mul)
        delta_chain(r, x, b, len, 0, (uint32_t)first, k, thr, 0, dv, 1, mv);
    else
        delta_chain(r, x, b, len, 0, (uint32_t)first, k, thr, 0, dv, 0, mv);
    return (int)(s - st);
}

/* Step i over the tile [at, at + len); returns the steps it ran (a SET then a SUB of the same
 * register, a model's delta, run as one loop: the same ops in the same order). */
static inline ALWAYS_INLINE int run_step(const CombineJob *j, Py_ssize_t i, Tile *t, Py_ssize_t at, int len) {
    const Step *st = &j->steps[i];
    float *r = t->R[st->reg], s = st->scale;
    switch (st->op) {
    case DIV:
        for (int k = 0; k < len; k++) r[k] = r[k] / s;
        break;
    case MUL:
        for (int k = 0; k < len; k++) r[k] = r[k] * s;
        break;
    case KEEP:
        keep_tile(r, len, (uint64_t)(j->start + at), j->keys[st->stream], st->thr);
        break;
    case TOP:
        top_tile(r, len, j->start + at, st);
        break;
    case ACC: {
        const float *x = t->R[st->stream];
        for (int k = 0; k < len; k++) r[k] = add_t(r[k], x[k]);
        break;
    }
    case ELECT:
        elect_tile(t->R, r, len, st);
        break;
    default: {
        const float *x = input(j, t, st->stream, at, len);
        const Step *next = i + 1 < j->nsteps ? &j->steps[i + 1] : NULL;
        if (st->op == SET && !st->scaled && next && next->op == SUB && next->reg == st->reg) {
            const float *y = input(j, t, next->stream, at, len);
            for (int k = 0; k < len; k++) r[k] = sub_t(x[k], y[k]);
            return 2;
        }
        if (st->op == SET && !st->scaled)
            memcpy(r, x, (size_t)len * sizeof(float));
        else if (st->op == SET)
            for (int k = 0; k < len; k++) r[k] = x[k] * s;
        else if (st->op == SUB)
            for (int k = 0; k < len; k++) r[k] = sub_t(r[k], x[k]);
        else if (st->scaled)
            for (int k = 0; k < len; k++) r[k] = add_t(r[k], x[k] * s);
        else
            for (int k = 0; k < len; k++) r[k] = add_t(r[k], x[k]);
    }
    }
    return 1;
}

/* Elements [lo, hi). */
CLONES static void combine_blocks(const CombineJob *j, Tile *t, Py_ssize_t lo, Py_ssize_t hi) {
    const float *result = t->R[j->steps[j->nsteps - 1].reg];
    for (Py_ssize_t at = lo; at < hi; at += COMBINE) {
        int len = hi - at < COMBINE ? (int)(hi - at) : COMBINE;
        memset(t->wide, 0, sizeof t->wide);
        for (Py_ssize_t i = 0; i < j->nsteps;) {
            int ran = run_chain(j, i, t, at, len);
            i += ran ? ran : run_step(j, i, t, at, len);
        }
        if (j->out_kind == BF16) {
            uint16_t *o = (uint16_t *)j->out + at;
            for (int k = 0; k < len; k++) o[k] = round_bf16(result[k], j->nan);
        } else if (j->out_kind == F16) {
            uint16_t *o = (uint16_t *)j->out + at;
            if (j->f16_payload)
                for (int k = 0; k < len; k++) o[k] = round_f16(result[k], 1);
            else
                for (int k = 0; k < len; k++) o[k] = round_f16(result[k], 0);
        } else {
            memcpy((float *)j->out + at, result, (size_t)len * sizeof(float));
        }
    }
}

static void combine_part(void *ctx, int slot, Py_ssize_t lo, Py_ssize_t hi) {
    const CombineJob *j = ctx;
    combine_blocks(j, &j->tiles[slot], lo, hi);
}

/* One step from its tuple (op, stream, scale[, reg[, ints[, weights]]]) into *st, checked against
 * what earlier steps wrote (`written`, a bit per register); -1 with a Python error set. */
static int parse_step(PyObject *tuple, Py_ssize_t i, Step *st, Py_ssize_t nstreams, Py_ssize_t nkeys,
                      uint64_t *written) {
    PyObject *scale, *ints = NULL, *weights = NULL;
    st->reg = 0;
    if (!PyArg_ParseTuple(tuple, "inO|iO!O!:combine step", &st->op, &st->stream, &scale, &st->reg, &PyTuple_Type,
                          &ints, &PyTuple_Type, &weights))
        return -1;
    st->scaled = scale != Py_None;
    double d = st->scaled ? PyFloat_AsDouble(scale) : 1.0;
    if (d == -1.0 && PyErr_Occurred()) return -1;
    st->scale = (float)d;
    long long a[4] = {0, 0, 0, 0};
    Py_ssize_t nints = ints ? PyTuple_GET_SIZE(ints) : 0;
    for (Py_ssize_t k = 0; k < nints && k < 4; k++) {
        a[k] = PyLong_AsLongLong(PyTuple_GET_ITEM(ints, k));
        if (a[k] == -1 && PyErr_Occurred()) return -1;
    }
    int op = st->op, reg_ok = st->reg >= 0 && st->reg < MAX_REGS;
    int reads = op == SET || op == ADD || op == SUB, has = reg_ok && (*written >> st->reg) & 1;
    int ok = op >= SET && op <= ELECT && reg_ok && (op == SET || op == ELECT || has);
    if (reads) ok = ok && st->stream >= 0 && st->stream < nstreams;
    if (op == DIV || op == MUL) ok = ok && st->scaled;
    if (op == KEEP) {
        st->thr = (uint64_t)a[0];
        ok = ok && st->stream >= 0 && st->stream < nkeys && nints == 1 && a[0] >= 0 && a[0] <= (1LL << 32);
    }
    if (op == TOP) {
        ok = ok && nints == 4 && a[0] >= -1 && a[0] <= 0x7FFFFFFF && a[2] >= -1 && a[2] <= 0x7FFFFFFF;
        st->t_in = (int32_t)a[0], st->last_in = a[1], st->t_out = (int32_t)a[2], st->last_out = a[3];
    }
    if (op == ACC) ok = ok && st->stream >= 0 && st->stream < MAX_REGS && (*written >> st->stream) & 1;
    if (op == ELECT) {
        Py_ssize_t k = st->stream;
        st->mode = (int)a[0];
        ok = ok && k >= 1 && k < MAX_REGS && weights && PyTuple_GET_SIZE(weights) == k && nints == 1 && a[0] >= 0 &&
             a[0] <= 2 && (st->mode != 1 || st->scaled);
        for (Py_ssize_t m = 1; ok && m <= k; m++) {
            ok = (*written >> m) & 1;
            double w = PyFloat_AsDouble(PyTuple_GET_ITEM(weights, m - 1));
            if (w == -1.0 && PyErr_Occurred()) return -1;
            st->w[m] = (float)w;
        }
    }
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "combine: step %zd (op %d, stream %zd, register %d) is not valid here", i, op,
                     st->stream, st->reg);
        return -1;
    }
    if (op == SET || op == ELECT) *written |= (uint64_t)1 << st->reg;
    return 0;
}

PyDoc_STRVAR(combine_doc,
             "combine(streams, steps, out, nan, threads=1, start=0, keys=(), f16_payload=True)\n\n"
             "Run `steps`, each (op, stream, scale[, register[, ints[, weights]]]) on a float32 register\n"
             "(default 0) per element: SET 0 (r = x[stream], times scale unless it is None), ADD 1 (r +=\n"
             "x[stream], times scale unless None), DIV 2 (r /= scale), MUL 3 (r *= scale), SUB 4 (r -=\n"
             "x[stream]), KEEP 5 (r *= word(keys[stream], start + i) < ints[0], DARE's keep test), TOP 6\n"
             "(r *= in the top-k cut (ints[0], ints[1]) and not in the cut (ints[2], ints[3])), ACC 7 (r +=\n"
             "register[stream]), ELECT 8 (r = TIES disjoint merge of registers 1..stream with `weights`;\n"
             "ints[0]: 0 no normalizing, 1 divide by the agreeing weights clamped to scale, 2 by them\n"
             "with 0 as 1), over every element of `streams` (float32 'f', bfloat16-bit 'h'/'H' or float16\n"
             "'e' buffers of one length), and write the last step's register to `out` (float32, or bfloat16\n"
             "bits rounded to nearest even, a NaN as the bits `nan`, or float16 rounded to nearest even, a\n"
             "NaN's payload kept if `f16_payload` else 0x7E00). A register is read only after a SET or\n"
             "ELECT wrote it. Up to `threads` threads of the process's pool share the elements; the bytes\n"
             "are the same.");

static PyObject *combine(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *streams_obj, *steps_obj, *out_obj, *keys_obj = NULL;
    unsigned short nan;
    int threads = 1, f16_payload = 1;
    long long start = 0;
    if (!PyArg_ParseTuple(args, "O!O!OH|iLO!p:combine", &PyTuple_Type, &streams_obj, &PyTuple_Type, &steps_obj,
                          &out_obj, &nan, &threads, &start, &PyTuple_Type, &keys_obj, &f16_payload))
        return NULL;
    Py_ssize_t nstreams = PyTuple_GET_SIZE(streams_obj), nsteps = PyTuple_GET_SIZE(steps_obj);
    Py_ssize_t nkeys = keys_obj ? PyTuple_GET_SIZE(keys_obj) : 0;
    if (nstreams == 0 || nsteps == 0 || nstreams > MAX_REGS) {
        PyErr_Format(PyExc_ValueError, "combine: %zd streams and %zd steps (want 1 to %d streams)", nstreams, nsteps,
                     MAX_REGS);
        return NULL;
    }
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "combine: start must be >= 0");
        return NULL;
    }
    Py_buffer *views = PyMem_Calloc(nstreams, sizeof(Py_buffer));
    Stream *streams = PyMem_Calloc(nstreams, sizeof(Stream));
    Step *steps = PyMem_Calloc(nsteps, sizeof(Step));
    uint64_t *keys = PyMem_Calloc(nkeys + 1, sizeof(uint64_t));
    Py_buffer out = {0};
    Py_ssize_t got = 0, n;
    PyObject *result = NULL;
    uint64_t written = 0;
    if (views == NULL || streams == NULL || steps == NULL || keys == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < nkeys; k++) {
        keys[k] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(keys_obj, k));
        if (PyErr_Occurred()) goto done;
    }
    if ((n = get_streams(streams_obj, views, streams, &got, "combine")) < 0) goto done;
    for (Py_ssize_t i = 0; i < nsteps; i++)
        if (parse_step(PyTuple_GET_ITEM(steps_obj, i), i, &steps[i], nstreams, nkeys, &written) < 0) goto done;
    if (get_buffer(out_obj, &out, "fhHe", 1, "out") < 0) goto done;
    if (out.len / out.itemsize != n) {
        PyErr_Format(PyExc_ValueError, "combine: out holds %zd items, want %zd", out.len / out.itemsize, n);
        PyBuffer_Release(&out);
        goto done;
    }
    int slots = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    Tile *tiles = PyMem_Malloc((size_t)slots * sizeof(Tile)); /* ~270 KB each: not on a stack */
    if (tiles == NULL) {
        PyErr_NoMemory();
        PyBuffer_Release(&out);
        goto done;
    }
    CombineJob job = {streams, steps, nsteps, out.buf, kind_of(&out), (uint16_t)nan, f16_payload, start, keys, tiles};
    Py_BEGIN_ALLOW_THREADS
    split(combine_part, &job, n, piece_for(1), slots);
    Py_END_ALLOW_THREADS
    PyMem_Free(tiles);
    PyBuffer_Release(&out);
    result = Py_NewRef(Py_None);
done:
    release_streams(views, streams, got);
    PyMem_Free(steps);
    PyMem_Free(keys);
    return result;
}

/* ---------------------------------------------------------------- top-k histograms
 *
 * The first two passes of engine.stats.topk's radix select, from the read buffers: the key of an
 * element is the bits of |x_model - x_base| (torch's float32 sub_, its NaN included) as an int32,
 * and a pass counts the keys' high 16 bits (HIGH) or, for the keys whose high bits are `bucket`,
 * their low 16 bits (LOW). Each thread slot counts into its own histogram; the counts are summed
 * at the end, so they are the same for any number of threads. */

#define HIGH_BINS (1 << 15)
#define LOW_BINS (1 << 16)

typedef struct {
    Stream base, model;
    int low;
    uint32_t bucket;
    int64_t *hists; /* per slot: LOW_BINS or HIGH_BINS counts */
    Py_ssize_t bins;
} HistJob;

CLONES static void hist_blocks(const HistJob *j, int64_t *h, Py_ssize_t lo, Py_ssize_t hi) {
    float xb[COMBINE], xm[COMBINE];
    uint32_t key[COMBINE];
    for (Py_ssize_t at = lo; at < hi; at += COMBINE) {
        int len = hi - at < COMBINE ? (int)(hi - at) : COMBINE;
        const float *b = widened(&j->base, at, len, xb), *m = widened(&j->model, at, len, xm);
        for (int k = 0; k < len; k++) {
            float d = sub_t(m[k], b[k]);
            memcpy(&key[k], &d, sizeof d);
            key[k] &= 0x7FFFFFFFu;
        }
        if (j->low) {
            for (int k = 0; k < len; k++)
                if (key[k] >> 16 == j->bucket) h[key[k] & 0xFFFF]++;
        } else {
            for (int k = 0; k < len; k++) h[key[k] >> 16]++;
        }
    }
}

static void hist_part(void *ctx, int slot, Py_ssize_t lo, Py_ssize_t hi) {
    const HistJob *j = ctx;
    hist_blocks(j, j->hists + slot * j->bins, lo, hi);
}

PyDoc_STRVAR(key_histogram_doc,
             "key_histogram(base, model, out, bucket=-1, threads=1)\n\n"
             "Add to `out` (int64) the counts of the keys |model - base| (float32 bits, as an int32): of\n"
             "their high 16 bits (2**15 bins) where `bucket` is -1, else of the low 16 bits of the keys\n"
             "whose high bits equal `bucket` (2**16 bins). `base`, `model`: float32 'f' or bfloat16-bit\n"
             "'h'/'H' buffers of one length. Up to `threads` threads of the pool count.");

static PyObject *key_histogram(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *base_obj, *model_obj, *out_obj;
    long bucket = -1;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOO|li:key_histogram", &base_obj, &model_obj, &out_obj, &bucket, &threads))
        return NULL;
    PyObject *pair = PyTuple_Pack(2, base_obj, model_obj);
    if (pair == NULL) return NULL;
    Py_buffer views[2], out = {0};
    Stream streams[2];
    Py_ssize_t got = 0, n;
    PyObject *result = NULL;
    int64_t *hists = NULL;
    if ((n = get_streams(pair, views, streams, &got, "key_histogram")) < 0) goto done;
    if (get_buffer(out_obj, &out, "lq", 1, "out") < 0) goto done;
    Py_ssize_t bins = bucket < 0 ? HIGH_BINS : LOW_BINS;
    if (out.itemsize != 8 || out.len / 8 != bins || bucket >= HIGH_BINS) {
        PyErr_Format(PyExc_ValueError, "key_histogram: out holds %zd items, want %zd (bucket %ld)", out.len / 8, bins,
                     bucket);
        goto done;
    }
    int slots = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    hists = PyMem_Calloc((size_t)slots * bins, sizeof(int64_t));
    if (hists == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    HistJob job = {streams[0], streams[1], bucket >= 0, (uint32_t)(bucket < 0 ? 0 : bucket), hists, bins};
    int64_t *o = out.buf;
    Py_BEGIN_ALLOW_THREADS
    split(hist_part, &job, n, piece_for(1), slots);
    for (int s = 0; s < slots; s++)
        for (Py_ssize_t b = 0; b < bins; b++) o[b] += hists[s * bins + b];
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    if (out.obj) PyBuffer_Release(&out);
    for (Py_ssize_t v = 0; v < got; v++) PyBuffer_Release(&views[v]);
    PyMem_Free(hists);
    Py_DECREF(pair);
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
    {"key_histogram", key_histogram, METH_VARARGS, key_histogram_doc},
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
    static int forked = 0;
    if (!forked++) pthread_atfork(NULL, NULL, pool_after_fork);
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "GROUP", GROUP) < 0) Py_CLEAR(m);
    return m;
}
