/* Top-k histograms and ties.
 *
 * The passes of engine.stats.topk's radix select, from the read buffers: the key of an element of
 * model m is the bits of |x_m - x_base| (torch's float32 sub_, its NaN included) as an int32. One
 * call serves every selection of a pass in one sweep, so the base is read and widened once for all
 * models. `key_histograms` counts, per selection, the keys' high 16 bits (pass 1) or the low 16
 * bits of the keys whose high bits lie in a range of buckets (pass 2: one bucket; pass 1's window:
 * the few buckets around its guess, which spare pass 2 where the guess is right); the two kinds
 * may mix in one sweep. Each thread slot counts into its own int32 histograms, summed at the end,
 * so the counts are the same for any number of threads. `key_ties` counts the keys equal to each
 * selection's threshold piece by piece, so the r-th one is found in flat order whichever thread
 * counted its piece. */

#include "fused.h"

#define HIGH_BINS (1 << 15)
#define LOW_BINS (1 << 16)
#define MAX_SELECT 64
#define FOLD_PIECE 2048 /* bins per piece of the fold */

typedef struct {
    Py_ssize_t stream;
    long long value; /* first bucket of the range (-1: the high bits), or the threshold (ties) */
    long long need;  /* ties: which one (1-based) to find */
} Select;

typedef struct {
    const Stream *streams;
    const Select *sel;
    int nsel, width;          /* width: buckets per range */
    Py_ssize_t bins, piece;   /* bins: all selections' histograms, end to end */
    const Py_ssize_t *offset; /* selection s's bins are [offset[s], offset[s + 1]) */
    int32_t *hists;           /* per slot: `bins` counts, cleared by the slot's first piece */
    char *started;            /* per slot: its histograms are cleared and in use */
    int64_t *counts;          /* ties: per piece, nsel tie counts */
    int64_t *const *out;      /* the fold's targets: selection s's counts */
    int slots;
} KeyJob;

/* The keys of `model`'s elements [at, at + len), len <= COMBINE, against the widened base `b`. */
static inline ALWAYS_INLINE void keys_at(const Stream *model, const float *b, Py_ssize_t at, int len,
                                         uint32_t *key) {
    float xm[COMBINE];
    const float *m = widened(model, at, len, xm);
    for (int k = 0; k < len; k++) key[k] = to_bits(sub_t(m[k], b[k])) & 0x7FFFFFFFu;
}

/* Selection s's keys of the tile at `at` (base widened in `b`) into `key`: made again unless the
 * previous selection's were of the same stream and still there (`fresh` false). */
static inline ALWAYS_INLINE void selection_keys(const KeyJob *j, int s, int fresh, const float *b, Py_ssize_t at,
                                                int len, uint32_t *key) {
    if (fresh || s == 0 || j->sel[s].stream != j->sel[s - 1].stream)
        keys_at(&j->streams[j->sel[s].stream], b, at, len, key);
}

/* h[key & 0xFFFF] += 1 for the keys whose high bits are `bucket` (pass 2). Such keys are rare (a
 * bucket is 1/128 of a binade), so groups of 16 with none are passed over after one vectorised
 * test; or, where bfloat16 deltas crowd into a few values, mostly equal, so a run of one low value
 * is counted in a register and added once (one counter incremented for each element would wait on
 * its own last increment every time). */
static inline ALWAYS_INLINE void count_low(int32_t *h, const uint32_t *key, int len, uint32_t bucket) {
    uint32_t cur = 0;
    int32_t run = 0;
    for (int k = 0; k < len; k += 16) {
        int end = k + 16 < len ? k + 16 : len;
        uint32_t any = 0;
        for (int i = k; i < end; i++) any |= key[i] >> 16 == bucket;
        if (!any) continue;
        for (int i = k; i < end; i++) { /* branches only where the value changes: predictable both ways */
            uint32_t hit = key[i] >> 16 == bucket, low = key[i] & 0xFFFF;
            if (hit & (low != cur)) {
                h[cur] += run;
                cur = low, run = 0;
            }
            run += hit;
        }
    }
    h[cur] += run;
}

/* h[key - lo] += 1 for the keys in [lo, lo + span) (pass 1's windows), as `count_low` does. Apart
 * from it because GCC 12 compiles the two forms unlike: here a single crowded bucket counts 1.5x
 * slower than in `count_low`, and `count_low` once per bucket of a window 1.5x slower than this
 * (measured on the bench's bf16 deltas). */
static inline ALWAYS_INLINE void count_range(int32_t *h, const uint32_t *key, int len, uint32_t lo, uint32_t span) {
    uint32_t cur = 0;
    int32_t run = 0;
    for (int k = 0; k < len; k += 16) {
        int end = k + 16 < len ? k + 16 : len;
        uint32_t any = 0;
        if (end - k == 16) /* a fixed count: one vector test */
            for (int i = 0; i < 16; i++) any |= key[k + i] - lo < span;
        else
            for (int i = k; i < end; i++) any |= key[i] - lo < span;
        if (!any) continue;
        for (int i = k; i < end; i++) {
            uint32_t at = key[i] - lo, hit = at < span;
            if (hit & (at != cur)) {
                h[cur] += run;
                cur = at, run = 0;
            }
            run += hit;
        }
    }
    h[cur] += run;
}

CLONES static void hist_blocks(const KeyJob *j, int32_t *h, Py_ssize_t lo, Py_ssize_t hi) {
    float xb[COMBINE];
    uint32_t key[COMBINE];
    for (Py_ssize_t at = lo; at < hi; at += COMBINE) {
        int len = hi - at < COMBINE ? (int)(hi - at) : COMBINE;
        const float *b = widened(&j->streams[0], at, len, xb);
        for (int s = 0; s < j->nsel; s++) {
            selection_keys(j, s, 0, b, at, len, key);
            int32_t *hs = h + j->offset[s];
            if (j->sel[s].value >= 0 && j->width == 1)
                count_low(hs, key, len, (uint32_t)j->sel[s].value);
            else if (j->sel[s].value >= 0)
                count_range(hs, key, len, (uint32_t)j->sel[s].value << 16, (uint32_t)j->width << 16);
            else
                for (int k = 0; k < len; k++) hs[key[k] >> 16]++;
        }
    }
}

static void hist_part(void *ctx, int slot, Py_ssize_t lo, Py_ssize_t hi) {
    const KeyJob *j = ctx;
    int32_t *h = j->hists + (Py_ssize_t)slot * j->bins;
    if (!j->started[slot]) { /* cleared here, on the slot's thread, not all slots by the caller */
        memset(h, 0, (size_t)j->bins * sizeof(int32_t));
        j->started[slot] = 1;
    }
    hist_blocks(j, h, lo, hi);
}

/* The targets' bins lo..hi (all selections' end to end) += the started slots' counts. */
static void fold_part(void *ctx, int slot, Py_ssize_t lo, Py_ssize_t hi) {
    (void)slot;
    const KeyJob *j = ctx;
    for (int s = 0; s < j->nsel; s++) {
        Py_ssize_t a = lo > j->offset[s] ? lo : j->offset[s], b = hi < j->offset[s + 1] ? hi : j->offset[s + 1];
        int64_t *out = j->out[s] - j->offset[s];
        for (int t = 0; t < j->slots; t++)
            if (j->started[t])
                for (Py_ssize_t i = a; i < b; i++) out[i] += j->hists[t * j->bins + i];
    }
}

/* The selections `obj` ((stream, value[, need]), ...) into sel[]: their count, or -1 with a Python
 * error set. A stream's keys are made once for a run of its selections next to each other. */
static int get_selections(PyObject *obj, Select *sel, Py_ssize_t nstreams, int with_need, const char *fn) {
    Py_ssize_t n = PyTuple_GET_SIZE(obj);
    if (n < 1 || n > MAX_SELECT) {
        PyErr_Format(PyExc_ValueError, "%s: %zd selections (want 1 to %d)", fn, n, MAX_SELECT);
        return -1;
    }
    for (Py_ssize_t s = 0; s < n; s++) {
        PyObject *t = PyTuple_GET_ITEM(obj, s);
        Select *x = &sel[s];
        x->need = 0;
        int ok = with_need ? PyArg_ParseTuple(t, "nLL", &x->stream, &x->value, &x->need)
                           : PyArg_ParseTuple(t, "nL", &x->stream, &x->value);
        if (!ok) return -1;
        if (x->stream < 1 || x->stream >= nstreams) {
            PyErr_Format(PyExc_ValueError, "%s: selection %zd: stream %zd is not a model's (1 to %zd)", fn, s,
                         x->stream, nstreams - 1);
            return -1;
        }
    }
    return (int)n;
}

const char key_histograms_doc[] = PyDoc_STR(
             "key_histograms(streams, selections, outs, threads=1, width=1)\n\n"
             "Add to outs[s] (int64) the counts of the keys |streams[m] - streams[0]| (float32 bits, as an\n"
             "int32) for each selection s = (m, bucket): of the keys' high 16 bits (2**15 bins) where bucket\n"
             "is -1, else of key - bucket * 2**16 for the keys whose high bits lie in [bucket, bucket +\n"
             "width) (width * 2**16 bins: the low 16 bits, bucket by bucket).\n"
             "`streams`: float32 'f', bfloat16-bit 'h'/'H' or float16 'e' buffers of one length, under\n"
             "2**31, the base first. Up to `threads` threads of the pool count.");

PyObject *key_histograms(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *streams_obj, *sel_obj, *outs_obj;
    int threads = 1, width = 1;
    if (!PyArg_ParseTuple(args, "O!O!O!|ii:key_histograms", &PyTuple_Type, &streams_obj, &PyTuple_Type, &sel_obj,
                          &PyTuple_Type, &outs_obj, &threads, &width))
        return NULL;
    Py_ssize_t nstreams = PyTuple_GET_SIZE(streams_obj);
    Select sel[MAX_SELECT];
    Py_ssize_t offset[MAX_SELECT + 1], bins = 0;
    int nsel = get_selections(sel_obj, sel, nstreams, 0, "key_histograms");
    if (nsel < 0) return NULL;
    if (width < 1 || width > HIGH_BINS) {
        PyErr_Format(PyExc_ValueError, "key_histograms: width %d (want 1 to %d)", width, HIGH_BINS);
        return NULL;
    }
    for (int s = 0; s < nsel; s++) {
        if (sel[s].value < -1 || sel[s].value > HIGH_BINS - width) {
            PyErr_Format(PyExc_ValueError, "key_histograms: bucket %lld: want -1, or 0 to %d for width %d",
                         sel[s].value, HIGH_BINS - width, width);
            return NULL;
        }
        offset[s] = bins;
        bins += sel[s].value < 0 ? HIGH_BINS : (Py_ssize_t)width * LOW_BINS;
    }
    offset[nsel] = bins;
    if (PyTuple_GET_SIZE(outs_obj) != nsel) {
        PyErr_Format(PyExc_ValueError, "key_histograms: %zd outs for %d selections", PyTuple_GET_SIZE(outs_obj), nsel);
        return NULL;
    }
    Py_buffer outs[MAX_SELECT] = {{0}};
    int64_t *out[MAX_SELECT];
    Py_buffer *views = PyMem_Calloc(nstreams, sizeof(Py_buffer));
    Stream *streams = PyMem_Calloc(nstreams, sizeof(Stream));
    Py_ssize_t got = 0, n;
    PyObject *result = NULL;
    int slots = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    int32_t *hists = PyMem_Malloc((size_t)slots * bins * sizeof(int32_t));
    char *started = PyMem_Calloc(slots, 1);
    if (views == NULL || streams == NULL || hists == NULL || started == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((n = get_streams(streams_obj, views, streams, &got, "key_histograms")) < 0) goto done;
    if (n > INT32_MAX) { /* a slot's counts are int32 */
        PyErr_Format(PyExc_ValueError, "key_histograms: %zd elements (want under 2**31 per call)", n);
        goto done;
    }
    for (int s = 0; s < nsel; s++) {
        if (get_buffer(PyTuple_GET_ITEM(outs_obj, s), &outs[s], "lq", 1, "outs") < 0) goto done;
        if (outs[s].itemsize != 8 || outs[s].len / 8 != offset[s + 1] - offset[s]) {
            PyErr_Format(PyExc_ValueError, "key_histograms: outs[%d] holds %zd items, want %zd", s, outs[s].len / 8,
                         offset[s + 1] - offset[s]);
            goto done;
        }
        out[s] = outs[s].buf;
    }
    KeyJob job = {streams, sel, nsel, width, bins, 0, offset, hists, started, NULL, out, slots};
    Py_BEGIN_ALLOW_THREADS
    split(hist_part, &job, n, piece_for(1), slots);
    split(fold_part, &job, bins, FOLD_PIECE, slots);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    for (int s = 0; s < nsel; s++)
        if (outs[s].obj) PyBuffer_Release(&outs[s]);
    if (views != NULL) release_streams(views, streams, got);
    else PyMem_Free(streams);
    PyMem_Free(hists);
    PyMem_Free(started);
    return result;
}

/* ------------------------------------------------------------------ pass 3: ties */

/* counts[s] += the keys of [lo, hi) equal to selection s's threshold; with `only` >= 0, instead the
 * position of the `need`-th of them for that one selection (-1 where it is not there). */
CLONES static Py_ssize_t count_ties(const KeyJob *j, Py_ssize_t lo, Py_ssize_t hi, int64_t *counts, int only,
                                    int64_t need) {
    float xb[COMBINE];
    uint32_t key[COMBINE];
    for (Py_ssize_t at = lo; at < hi; at += COMBINE) {
        int len = hi - at < COMBINE ? (int)(hi - at) : COMBINE;
        const float *b = widened(&j->streams[0], at, len, xb);
        for (int s = 0; s < j->nsel; s++) {
            if (only >= 0 && s != only) continue;
            selection_keys(j, s, only >= 0, b, at, len, key);
            uint32_t t = (uint32_t)j->sel[s].value;
            if (only >= 0) {
                for (int k = 0; k < len; k++)
                    if (key[k] == t && --need == 0) return at + k;
            } else {
                int64_t c = 0;
                for (int k = 0; k < len; k++) c += key[k] == t;
                counts[s] += c;
            }
        }
    }
    return -1;
}

static void tie_part(void *ctx, int slot, Py_ssize_t lo, Py_ssize_t hi) {
    (void)slot;
    const KeyJob *j = ctx;
    for (Py_ssize_t at = lo; at < hi; at += j->piece) /* one count per piece, whatever `split` hands out */
        count_ties(j, at, at + j->piece < hi ? at + j->piece : hi, j->counts + (at / j->piece) * j->nsel, -1, 0);
}

const char key_ties_doc[] = PyDoc_STR(
             "key_ties(streams, selections, threads=1) -> ((count, position), ...)\n\n"
             "For each selection (m, threshold, need): how many keys |streams[m] - streams[0]| (as in\n"
             "key_histograms) equal `threshold`, and the position of the `need`-th of them (1-based, in\n"
             "flat order), or -1 where there are fewer than `need` or `need` < 1. Up to `threads` threads\n"
             "of the pool count.");

PyObject *key_ties(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *streams_obj, *sel_obj;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O!O!|i:key_ties", &PyTuple_Type, &streams_obj, &PyTuple_Type, &sel_obj, &threads))
        return NULL;
    Py_ssize_t nstreams = PyTuple_GET_SIZE(streams_obj);
    Select sel[MAX_SELECT];
    int nsel = get_selections(sel_obj, sel, nstreams, 1, "key_ties");
    if (nsel < 0) return NULL;
    for (int s = 0; s < nsel; s++)
        if (sel[s].value < 0 || sel[s].value > 0x7FFFFFFF) {
            PyErr_Format(PyExc_ValueError, "key_ties: threshold %lld is not a key (0 to 2**31 - 1)", sel[s].value);
            return NULL;
        }
    Py_buffer *views = PyMem_Calloc(nstreams, sizeof(Py_buffer));
    Stream *streams = PyMem_Calloc(nstreams, sizeof(Stream));
    Py_ssize_t got = 0, n;
    PyObject *result = NULL;
    int64_t *counts = NULL;
    if (views == NULL || streams == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((n = get_streams(streams_obj, views, streams, &got, "key_ties")) < 0) goto done;
    Py_ssize_t piece = piece_for(1), npieces = (n + piece - 1) / piece;
    counts = PyMem_Calloc((npieces > 0 ? (size_t)npieces : 1) * nsel, sizeof(int64_t));
    if (counts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    KeyJob job = {streams, sel, nsel, 0, 0, piece, NULL, NULL, NULL, counts, NULL, 1};
    int64_t total[MAX_SELECT] = {0};
    Py_ssize_t position[MAX_SELECT];
    Py_BEGIN_ALLOW_THREADS
    split(tie_part, &job, n, piece, threads < 1 ? 1 : threads);
    for (int s = 0; s < nsel; s++) {
        position[s] = -1;
        for (Py_ssize_t i = 0; i < npieces; i++) {
            int64_t c = counts[i * nsel + s], need = sel[s].need - total[s];
            if (position[s] < 0 && need >= 1 && c >= need)
                position[s] = count_ties(&job, i * piece, (i + 1) * piece < n ? (i + 1) * piece : n, NULL, s, need);
            total[s] += c;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyTuple_New(nsel);
    for (int s = 0; result != NULL && s < nsel; s++) {
        PyObject *pair = Py_BuildValue("Ln", (long long)total[s], position[s]);
        if (pair == NULL) Py_CLEAR(result);
        else PyTuple_SET_ITEM(result, s, pair);
    }
done:
    if (views != NULL) release_streams(views, streams, got);
    else PyMem_Free(streams);
    PyMem_Free(counts);
    return result;
}
