/* Python buffers as the streams the loops read: float32, bfloat16 bits or float16, C-contiguous. */

#include "fused.h"

/* Fills `view` with a C-contiguous buffer of one of `formats` (one char each); -1 with a Python
 * error set. */
int get_buffer(PyObject *obj, Py_buffer *view, const char *formats, int writable, const char *what) {
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
int kind_of(const Py_buffer *v) { return v->format[0] == 'f' ? F32 : v->format[0] == 'e' ? F16 : BF16; }

/* The float32, bfloat16 or float16 buffers of the tuple `obj` into views[] and streams[], counting the
 * views taken in *got (to release); their common length, or -1 with a Python error set. */
Py_ssize_t get_streams(PyObject *obj, Py_buffer *views, Stream *streams, Py_ssize_t *got, const char *fn) {
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

void release_streams(Py_buffer *views, Stream *streams, Py_ssize_t got) {
    for (Py_ssize_t v = 0; v < got; v++) PyBuffer_Release(&views[v]);
    PyMem_Free(views);
    PyMem_Free(streams);
}
