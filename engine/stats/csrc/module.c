/* The module `engine.stats._fused`: its functions (each in its own file) and the pool's fork hook. */

#include "fused.h"

/* The functions' interface version: engine.stats.pairwise.C_ABI must equal it, or the module is
 * set aside as a stale build. Raise both with every change to a function's arguments or results. */
#define ABI 2

static PyMethodDef methods[] = {
    {"key_histograms", key_histograms, METH_VARARGS, key_histograms_doc},
    {"key_ties", key_ties, METH_VARARGS, key_ties_doc},
    {"group_sums", group_sums, METH_VARARGS, group_sums_doc},
    {"combine", combine, METH_VARARGS, combine_doc},
    {"count_nonfinite", count_nonfinite, METH_VARARGS, count_nonfinite_doc},
    {"magprune", magprune, METH_VARARGS, magprune_doc},
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
    if (m != NULL && (PyModule_AddIntConstant(m, "GROUP", GROUP) < 0 || PyModule_AddIntConstant(m, "ABI", ABI) < 0))
        Py_CLEAR(m);
    return m;
}
