/* DELLA's MagPrune on whole rows of float32 deltas, in place (`engine.methods.della.magprune_`).
 *
 * Per row of w elements: rank the magnitudes |δ| from smallest to largest, equal ones by position
 * (a stable LSD radix sort of the 31-bit keys |δ|'s bits, which order as the values, a NaN above
 * infinity), give rank r the probability ((r / (w − 1)) · 2 · ε) + (d − ε) as torch's float32 ops
 * compute it, keep element i iff its keyed word < round(pᵢ · 2³²) (engine/rng.py's `keep_where`,
 * exact in float64), and with `rescale` divide a survivor by pᵢ. Rows are shared among the
 * process's pool (`split`): each row is computed alone, so the bytes do not depend on the threads.
 * One row's sort scratch is 5 · w · 4 bytes per thread. */

#include "fused.h"

#define DIGIT 8
#define BINS (1 << DIGIT)
#define SHORT_ROW 32 /* rows up to this many elements are sorted by insertion */

typedef struct {
    float *delta;
    Py_ssize_t w;
    const float *by_rank; /* w probabilities, in rank order */
    const uint64_t *thr_by_rank; /* w keep thresholds round(p * 2**32), in rank order */
    int rescale;
    uint64_t key;
    int64_t start; /* flat index of delta[0] */
    uint32_t *scratch; /* per slot: 4 * w uint32 (keys and positions, twice) */
    float *prob;       /* per slot: w floats */
    uint64_t *thr;     /* per slot: w thresholds */
} MagJob;

/* Positions 0 .. w - 1 in the order of their keys, equal keys by position. A short row: a stable
 * insertion sort. Else four stable passes of 8 bits over the 31-bit keys, their four histograms
 * counted in one read, a pass skipped where every key has the same digit. */
static const uint32_t *rank_order(const float *d, Py_ssize_t w, uint32_t *s) {
    uint32_t *key = s, *pos = s + w, *key2 = s + 2 * w, *pos2 = s + 3 * w;
    for (Py_ssize_t k = 0; k < w; k++) {
        key[k] = to_bits(d[k]) & 0x7FFFFFFFu;
        pos[k] = (uint32_t)k;
    }
    if (w <= SHORT_ROW) {
        for (Py_ssize_t k = 1; k < w; k++) {
            uint32_t kk = key[k], pk = pos[k];
            Py_ssize_t i = k;
            for (; i > 0 && key[i - 1] > kk; i--) key[i] = key[i - 1], pos[i] = pos[i - 1];
            key[i] = kk, pos[i] = pk;
        }
        return pos;
    }
    uint32_t count[4][BINS];
    memset(count, 0, sizeof count);
    for (Py_ssize_t k = 0; k < w; k++)
        for (int p = 0; p < 4; p++) count[p][(key[k] >> (p * DIGIT)) & (BINS - 1)]++;
    for (int p = 0; p < 4; p++) {
        int shift = p * DIGIT;
        uint32_t *c = count[p];
        if (c[(key[0] >> shift) & (BINS - 1)] == (uint32_t)w) continue;
        uint32_t at = 0;
        for (int b = 0; b < BINS; b++) {
            uint32_t n = c[b];
            c[b] = at;
            at += n;
        }
        for (Py_ssize_t k = 0; k < w; k++) {
            uint32_t to = c[(key[k] >> shift) & (BINS - 1)]++;
            key2[to] = key[k];
            pos2[to] = pos[k];
        }
        uint32_t *t = key;
        key = key2, key2 = t;
        t = pos, pos = pos2, pos2 = t;
    }
    return pos;
}

/* Keep element k of the row iff word(first + k) < thr[k] = round(p[k] · 2**32); with `rescale`
 * divide a survivor by p[k]. The keys change at each 2**32 boundary of the flat index. */
static inline ALWAYS_INLINE void keep_row(float *d, const float *p, const uint64_t *thr, Py_ssize_t w, uint64_t first,
                                          uint64_t key, int rescale) {
    for (Py_ssize_t k = 0; k < w;) {
        uint64_t i = first + (uint64_t)k;
        uint64_t room = ((uint64_t)1 << 32) - (uint32_t)i;
        Py_ssize_t m = (uint64_t)(w - k) < room ? w - k : (Py_ssize_t)room;
        uint32_t keys[3];
        block_keys(key, i >> 32, keys);
        uint32_t base = (uint32_t)i + keys[0];
        for (Py_ssize_t j = 0; j < m; j++) {
            float x = d[k + j] * select_f(keyed_word(base, (int)j, keys[1], keys[2]) < thr[k + j], 1.0f, 0.0f);
            d[k + j] = rescale ? x / p[k + j] : x;
        }
        k += m;
    }
}

CLONES static void magprune_rows(const MagJob *j, int slot, Py_ssize_t r0, Py_ssize_t r1) {
    Py_ssize_t w = j->w;
    float *p = j->prob + slot * w;
    uint64_t *thr = j->thr + slot * w;
    for (Py_ssize_t r = r0; r < r1; r++) {
        float *d = j->delta + r * w;
        const uint32_t *order = rank_order(d, w, j->scratch + slot * 4 * w);
        for (Py_ssize_t k = 0; k < w; k++) {
            p[order[k]] = j->by_rank[k];
            thr[order[k]] = j->thr_by_rank[k];
        }
        if (j->rescale)
            keep_row(d, p, thr, w, (uint64_t)(j->start + r * w), j->key, 1);
        else
            keep_row(d, p, thr, w, (uint64_t)(j->start + r * w), j->key, 0);
    }
}

static void magprune_part(void *ctx, int slot, Py_ssize_t r0, Py_ssize_t r1) { magprune_rows(ctx, slot, r0, r1); }

const char magprune_doc[] = PyDoc_STR(
    "magprune(delta, row_numel, density, epsilon, rescale, key, start, threads=1)\n\n"
    "DELLA's MagPrune in place on `delta` (a float32 'f' buffer of whole rows of `row_numel` elements,\n"
    "`row_numel` >= 2, its first element at flat index `start`): per row, the keep probability of\n"
    "rank r of |delta| (stable) is ((r / (row_numel - 1)) * 2 * epsilon) + (density - epsilon) in\n"
    "float32, an element is kept iff its word under `key` < round(p * 2**32), and with `rescale` a\n"
    "survivor is divided by its p. Up to `threads` threads of the process's pool share the rows.");

PyObject *magprune(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *obj;
    Py_ssize_t w;
    double density, epsilon;
    int rescale, threads = 1;
    unsigned long long key;
    long long start;
    if (!PyArg_ParseTuple(args, "OnddpKL|i:magprune", &obj, &w, &density, &epsilon, &rescale, &key, &start, &threads))
        return NULL;
    Py_buffer v;
    if (get_buffer(obj, &v, "f", 1, "delta") < 0) return NULL;
    Py_ssize_t n = v.len / v.itemsize;
    if (w < 2 || n % w != 0 || start < 0) {
        PyErr_Format(PyExc_ValueError, "magprune: %zd elements are no whole rows of %zd (want row_numel >= 2)", n, w);
        PyBuffer_Release(&v);
        return NULL;
    }
    int slots = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    float *by_rank = PyMem_Malloc((size_t)w * sizeof(float) * (size_t)(1 + slots));
    uint64_t *thr = PyMem_Malloc((size_t)w * sizeof(uint64_t) * (size_t)(1 + slots));
    uint32_t *scratch = PyMem_Malloc((size_t)w * 4 * sizeof(uint32_t) * (size_t)slots);
    if (by_rank == NULL || thr == NULL || scratch == NULL) {
        PyMem_Free(by_rank);
        PyMem_Free(thr);
        PyMem_Free(scratch);
        PyBuffer_Release(&v);
        return PyErr_NoMemory();
    }
    /* torch's arange(w).div_(w - 1).mul_(2).mul_(epsilon).add_(density - epsilon), in float32 */
    float last = (float)(w - 1), eps = (float)epsilon, low = (float)(density - epsilon);
    for (Py_ssize_t r = 0; r < w; r++) {
        by_rank[r] = (((float)r / last) * 2.0f) * eps + low;
        /* engine/rng.py's keep_where: round half to even in float64, exact for a float32 times 2**32;
         * a NaN or p <= 0 keeps nothing, p >= 1 everything */
        double t = rint((double)by_rank[r] * 4294967296.0);
        thr[r] = by_rank[r] == by_rank[r] && t > 0.0 ? (uint64_t)(t < 4294967296.0 ? t : 4294967296.0) : 0;
    }
    MagJob job = {v.buf, w, by_rank, thr, rescale, (uint64_t)key, start, scratch, by_rank + w, thr + w};
    Py_BEGIN_ALLOW_THREADS
    split(magprune_part, &job, n / w, w < (1 << 16) ? (1 << 16) / w : 1, slots);
    Py_END_ALLOW_THREADS
    PyMem_Free(by_rank);
    PyMem_Free(thr);
    PyMem_Free(scratch);
    PyBuffer_Release(&v);
    return Py_NewRef(Py_None);
}
