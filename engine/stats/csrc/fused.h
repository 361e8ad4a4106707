/* The C extension `engine.stats._fused`, one file per part (setup.py builds them as one module):
 *   pool.c     one pool of threads per process (`split`)
 *   buffers.c  Python buffers as typed streams (float32, bfloat16 bits, float16)
 *   sums.c     the statistics' fixed-order sums (`group_sums`)
 *   combine.c  every elementwise merge as a program of float32 steps (`combine`)
 *   hist.c     the top-k radix select's histograms (`key_histograms`, `key_ties`)
 *   finite.c   NaN/Inf counts (`count_nonfinite`)
 *   magprune.c DELLA's per-row ranks, keep probabilities and keyed keep test (`magprune`)
 *   module.c   the module's table
 * Every file is compiled with -ffp-contract=off: no FMA fuses a product and a sum that torch's
 * eager ops round apart. */
#ifndef LEANMERGE_FUSED_H
#define LEANMERGE_FUSED_H

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

/* ------------------------------------------------------------------ widening to float32 */

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

/* ------------------------------------------------------------------ float32 ops as torch's */

/* Elements per tile of the merge and histogram loops: a tile's registers stay in L1, and each
 * stream is read from RAM in bursts of 1 KiB of bfloat16 (2 KiB bursts streamed ~1.5x slower). */
#define COMBINE 512

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

/* a + b and a - b as torch's tensor ops on the CPU give them: where both are NaNs, b's NaN
 * (quieted, its sign kept), as its vectorised fused multiply-add b * ±1 + a does. */
static inline float add_t(float a, float b) { return pick_nan(a + b, b); }

static inline float sub_t(float a, float b) { return pick_nan(a - b, b); }

/* ------------------------------------------------------------------ keyed randomness (engine/rng.py) */

/* engine/rng.py's round keys of the 2**32 indices from hi * 2**32 (`_block_keys`). */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#define GOLDEN64 0x9E3779B97F4A7C15ULL

static inline void block_keys(uint64_t key, uint64_t hi, uint32_t *k) {
    uint64_t s = mix64(mix64(key) + (hi + 1) * GOLDEN64), t = mix64(s + GOLDEN64);
    k[0] = (uint32_t)s;
    k[1] = (uint32_t)(s >> 32);
    k[2] = (uint32_t)t;
}

/* How many of `left` elements from flat index i lie in i's 2**32 segment, which shares one set of
 * round keys (`block_keys(key, i >> 32, k)`). */
static inline Py_ssize_t in_segment(uint64_t i, Py_ssize_t left) {
    uint64_t room = ((uint64_t)1 << 32) - (uint32_t)i;
    return (uint64_t)left < room ? left : (Py_ssize_t)room;
}

/* The word of the element j after a segment's first (base = the first's low half plus k[0]), as
 * engine/rng.py hashes it: uniform over 0 .. 2**32 - 1. */
static inline uint32_t keyed_word(uint32_t base, int j, uint32_t k1, uint32_t k2) {
    uint32_t x = (base + (uint32_t)j) * 0x9E3779B9u;
    x ^= x >> 16;
    x = x * 0x7FEB352Du + k1;
    x ^= x >> 16;
    x = x * 0x846CA68Bu + k2;
    x ^= x >> 16;
    return x ^ 0x80000000u;
}

/* The multiplier of keyed_word's first product. */
#define KEY_MUL 0x9E3779B9u

/* keyed_word(base, j, k1, k2) < thr for 0 < thr < 2**32, the same test in fewer vector ops: the
 * first product (base + j) * KEY_MUL given as `h` (the loops step it by KEY_MUL per element, an
 * add per vector instead of a multiply), and the word's unsigned compare, word = x ^ 2**31 < thr,
 * made the signed compare x < thr ^ 2**31 (`thr_s`), one instruction. */
static inline int keyed_below(uint32_t h, uint32_t k1, uint32_t k2, int32_t thr_s) {
    uint32_t x = h;
    x ^= x >> 16;
    x = x * 0x7FEB352Du + k1;
    x ^= x >> 16;
    x = x * 0x846CA68Bu + k2;
    x ^= x >> 16;
    return (int32_t)x < thr_s;
}

/* ------------------------------------------------------------------ pool.c */

#define MAX_THREADS 64

typedef void (*PartFn)(void *ctx, int slot, Py_ssize_t lo, Py_ssize_t hi);

/* fn over [0, n) in pieces of `piece`, on up to `threads` threads; slots < threads. */
void split(PartFn fn, void *ctx, Py_ssize_t n, Py_ssize_t piece, int threads);
/* Pieces of `piece` units: ~64K elements each, a few tens of microseconds. */
Py_ssize_t piece_for(Py_ssize_t unit);
/* After fork() the child has none of the parent's workers: start afresh. */
void pool_after_fork(void);

/* ------------------------------------------------------------------ buffers.c */

int get_buffer(PyObject *obj, Py_buffer *view, const char *formats, int writable, const char *what);
int kind_of(const Py_buffer *v);
Py_ssize_t get_streams(PyObject *obj, Py_buffer *views, Stream *streams, Py_ssize_t *got, const char *fn);
void release_streams(Py_buffer *views, Stream *streams, Py_ssize_t got);

/* ------------------------------------------------------------------ the module's functions */

PyObject *group_sums(PyObject *self, PyObject *args);
PyObject *combine(PyObject *self, PyObject *args);
PyObject *key_histograms(PyObject *self, PyObject *args);
PyObject *key_ties(PyObject *self, PyObject *args);
PyObject *count_nonfinite(PyObject *self, PyObject *args);
PyObject *magprune(PyObject *self, PyObject *args);
extern const char group_sums_doc[], combine_doc[], key_histograms_doc[], key_ties_doc[],
    count_nonfinite_doc[], magprune_doc[];

#endif
