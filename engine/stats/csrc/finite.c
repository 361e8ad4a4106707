/* NaN and infinity counts of the inputs' read buffers and the merged blocks. */

#include "fused.h"

const char count_nonfinite_doc[] = PyDoc_STR(
             "count_nonfinite(values, exponent) -> int\n\n"
             "How many of the floats in `values` (their bits: 16-bit 'h'/'H' or 32-bit 'i'/'I' items) have\n"
             "every bit of `exponent` set, that is, are NaN or an infinity: `exponent` is 0x7F80 for\n"
             "bfloat16, 0x7C00 for float16, 0x7F800000 for float32. One pass, no thread pool: it runs on\n"
             "the thread that read the block, beside the merge.");

PyObject *count_nonfinite(PyObject *self, PyObject *args) {
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
