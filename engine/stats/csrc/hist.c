/* Top-k histograms.
 *
 * The first two passes of engine.stats.topk's radix select, from the read buffers: the key of an
 * element is the bits of |x_model - x_base| (torch's float32 sub_, its NaN included) as an int32,
 * and a pass counts the keys' high 16 bits (HIGH) or, for the keys whose high bits are `bucket`,
 * their low 16 bits (LOW). Each thread slot counts into its own histogram; the counts are summed
 * at the end, so they are the same for any number of threads. */

#include "fused.h"

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

const char key_histogram_doc[] = PyDoc_STR(
             "key_histogram(base, model, out, bucket=-1, threads=1)\n\n"
             "Add to `out` (int64) the counts of the keys |model - base| (float32 bits, as an int32): of\n"
             "their high 16 bits (2**15 bins) where `bucket` is -1, else of the low 16 bits of the keys\n"
             "whose high bits equal `bucket` (2**16 bins). `base`, `model`: float32 'f' or bfloat16-bit\n"
             "'h'/'H' buffers of one length. Up to `threads` threads of the pool count.");

PyObject *key_histogram(PyObject *self, PyObject *args) {
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
