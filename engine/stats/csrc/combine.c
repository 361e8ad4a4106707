/* Merges, fused.
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
 * sign election with the disjoint mean (ELECT). The usual runs of steps are one loop each, their
 * values in registers between ops (`delta_chain`: a model's delta with its KEEP or TOP, DIV, MUL,
 * the model read raw from bfloat16; `elect_fused`: ELECT of up to 4 models; `sum_run`: adds into
 * one register, the program's last straight into the output dtype; `run_elect_out`: ELECT, the
 * base's add and the bfloat16 rounding); other steps a loop each. */

#include "fused.h"

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

/* a + b and a - b: as torch gives them where `nanx` (add_t, sub_t: which NaN where both are NaNs),
 * else the plain IEEE op. The loops take nanx = 0 where the output is bfloat16: which NaN a value
 * is never changes whether a value is a NaN (every op here passes a NaN on, and where a NaN's sign
 * is read, by ELECT's sign or TOP's key, that NaN also flows into the same element's result), and
 * every bfloat16 NaN is written as the one `nan`; so the bytes are the same, for ~3 fewer vector
 * ops per add. */
static inline float add_x(float a, float b, int nanx) { return nanx ? add_t(a, b) : a + b; }

static inline float sub_x(float a, float b, int nanx) { return nanx ? sub_t(a, b) : a - b; }

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

/* DARE's keep mask, 1.0 or 0.0, of the element whose first product is h: word < thr
 * (`keyed_below`: thr_s = thr ^ 2**31). */
static inline float keep_mask(uint32_t h, uint32_t k1, uint32_t k2, int32_t thr_s) {
    return select_f(keyed_below(h, k1, k2, thr_s), 1.0f, 0.0f);
}

/* r[j] *= (word(first + j) < thr) for j < m, inside one 2**32 segment (lo: first's low half). */
static inline ALWAYS_INLINE void keep_segment(float *r, int m, uint32_t lo, const uint32_t *k, uint32_t thr) {
    uint32_t h = (lo + k[0]) * KEY_MUL, k1 = k[1], k2 = k[2];
    int32_t thr_s = (int32_t)(thr ^ 0x80000000u);
    for (int j = 0; j < m; j++, h += KEY_MUL) r[j] = r[j] * keep_mask(h, k1, k2, thr_s);
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
        int m = (int)in_segment(i, len - j);
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

/* TIES: engine.methods.consensus's `disjoint_merge_` of registers 1..k into `acc`, its torch ops
 * per element in their order (the zeroed sums start each model's pass; the sign's product, the
 * + 0 and the division share the last). */
static inline ALWAYS_INLINE void elect_tile(float (*R)[COMBINE], float *acc, int len, const Step *st, int nanx) {
    float sign[COMBINE], div[COMBINE];
    Py_ssize_t k = st->stream;
    if (k == 1) {
        for (int j = 0; j < len; j++) sign[j] = copysignf(1.0f, R[1][j]);
    } else if (k == 2) {
        for (int j = 0; j < len; j++) sign[j] = copysignf(1.0f, add_x(R[1][j], R[2][j], nanx));
    } else {
        for (int j = 0; j < len; j++) sign[j] = add_x(R[1][j], R[2][j], nanx);
        for (Py_ssize_t m = 3; m < k; m++)
            for (int j = 0; j < len; j++) sign[j] = add_x(sign[j], R[m][j], nanx);
        for (int j = 0; j < len; j++) sign[j] = copysignf(1.0f, add_x(sign[j], R[k][j], nanx));
    }
    for (Py_ssize_t m = 1; m <= k; m++) {
        float w = st->w[m];
        for (int j = 0; j < len; j++) {
            float a = R[m][j] * sign[j];
            a = select_f(a < 0.0f, 0.0f, a); /* torch's clamp_(min=0): a NaN stays */
            float was = m == 1 ? 0.0f : acc[j], count = m == 1 ? 0.0f : div[j];
            acc[j] = add_x(was, a, nanx);
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

/* elect_tile for k models (a constant, 1 to ELECT_FUSED) and divisor rule `mode` (a constant), as
 * one loop: each element's sign sum, clamped terms, sum and agreeing weight stay in registers
 * instead of passing through a tile-long array per op. The same ops in the same order; `acc` is
 * none of registers 1..k. */
#define ELECT_FUSED 4
static inline ALWAYS_INLINE void elect_fused(float (*R)[COMBINE], float *acc, int len, const Step *st, int k,
                                             int mode, int nanx, const float *base, uint16_t *o, uint16_t nan) {
    float w[ELECT_FUSED + 1], c = st->scale;
    for (int m = 1; m <= k; m++) w[m] = st->w[m];
    for (int j = 0; j < len; j++) {
        float s = R[1][j];
        for (int m = 2; m <= k; m++) s = add_x(s, R[m][j], nanx);
        float sign = copysignf(1.0f, s), sum = 0.0f, count = 0.0f;
        for (int m = 1; m <= k; m++) {
            float a = R[m][j] * sign;
            a = select_f(a < 0.0f, 0.0f, a); /* torch's clamp_(min=0): a NaN stays */
            sum = add_x(sum, a, nanx);
            count = count + w[m] * select_f(a > 0.0f, 1.0f, 0.0f);
        }
        float v;
        if (mode == 1)
            v = (sum * sign + 0.0f) / select_f(count < c, c, count);
        else if (mode == 2)
            v = (sum * sign + 0.0f) / select_f(count == 0.0f, 1.0f, count);
        else
            v = sum * sign + 0.0f;
        if (base)
            o[j] = round_bf16(add_x(v, base[j], nanx), nan);
        else
            acc[j] = v;
    }
}

/* elect_fused with k and the mode as constants where k <= ELECT_FUSED, else elect_tile. */
static inline ALWAYS_INLINE void elect(float (*R)[COMBINE], float *acc, int len, const Step *st, int nanx,
                                      const float *base, uint16_t *o, uint16_t nan) {
    Py_ssize_t k = st->stream;
    if (k > ELECT_FUSED || (st->reg >= 1 && st->reg <= k)) {
        elect_tile(R, acc, len, st, nanx);
        return;
    }
#define ELECT_MODE(K, M)                                                                                              \
    if (base)                                                                                                         \
        elect_fused(R, acc, len, st, K, M, nanx, base, o, nan);                                                       \
    else                                                                                                              \
        elect_fused(R, acc, len, st, K, M, nanx, NULL, NULL, nan);
#define ELECT_K(K)                                                                                                    \
    case K:                                                                                                           \
        if (st->mode == 1) {                                                                                          \
            ELECT_MODE(K, 1)                                                                                          \
        } else if (st->mode == 2) {                                                                                   \
            ELECT_MODE(K, 2)                                                                                          \
        } else {                                                                                                      \
            ELECT_MODE(K, 0)                                                                                          \
        }                                                                                                             \
        break;
    switch (k) {
        ELECT_K(1)
        ELECT_K(2)
        ELECT_K(3)
        ELECT_K(4)
    }
#undef ELECT_K
#undef ELECT_MODE
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
} __attribute__((aligned(64))) Tile; /* a whole number of cache lines */

static inline const float *input(const CombineJob *j, Tile *t, Py_ssize_t s, Py_ssize_t at, int len) {
    if (t->wide[s] == NULL) {
        const Stream *in = &j->streams[s];
        t->wide[s] = widened(in, at, len, t->W[s]);
    }
    return t->wide[s];
}

/* What a chain's sparsifying step needs in one tile: DARE's keep test (the first product h of the
 * tile's first element, the round keys, thr ^ 2**31) or a TOP step's cuts (tie limits in the tile). */
typedef struct {
    uint32_t h, k1, k2;
    int32_t thr_s, ti, to;
    int li, lo;
} Sparse;

/* engine.stats.topk's `in_top` of the inner cut and not of the outer one, for the value v of the
 * tile's element j: 1.0 or 0.0. */
static inline float top_mask(float v, int j, const Sparse *c) {
    int32_t key = (int32_t)(to_bits(v) & 0x7FFFFFFFu);
    int in = (key > c->ti) | ((key == c->ti) & (j <= c->li));
    int out = (key > c->to) | ((key == c->to) & (j <= c->lo));
    return select_f(in & !out, 1.0f, 0.0f);
}

/* top_mask where each cut's ties in the tile are all in it or all out (`whole_cuts`): two compares. */
static inline float top_mask_whole(float v, const Sparse *c) {
    int32_t key = (int32_t)(to_bits(v) & 0x7FFFFFFFu);
    return select_f((key > c->ti) & !(key > c->to), 1.0f, 0.0f);
}

/* Where neither cut's last tie falls inside the tile (the common case), its threshold lowered by
 * one if every tie in the tile is in the cut: then key > threshold is the whole test; else 0. */
static inline int whole_cuts(Sparse *c, int len) {
    if (!(c->li < 0 || c->li >= len - 1) || !(c->lo < 0 || c->lo >= len - 1)) return 0;
    c->ti -= c->li >= len - 1; /* thresholds >= -1: no overflow */
    c->to -= c->lo >= len - 1;
    return 1;
}

/* A TOP step on its own: r *= top_mask (the cuts' tie limits in the tile from flat index `first`). */
static inline ALWAYS_INLINE void top_tile(float *r, int len, int64_t first, const Step *st) {
    Sparse c = {0, 0, 0, 0, st->t_in, st->t_out, tie_limit(st->last_in, first, len), tie_limit(st->last_out, first, len)};
    for (int j = 0; j < len; j++) r[j] = r[j] * top_mask(r[j], j, &c);
}

/* A model's delta and what DARE, TIES or breadcrumbs do to it, as one loop: r = x - b, then (each
 * where asked) DARE's keep test (`sparse` 1: inside one 2**32 segment) or a TOP step's cuts
 * (`sparse` 2, or 3 for `whole_cuts`), a division and a multiplication: the ops of the steps SET, SUB, KEEP or TOP, DIV,
 * MUL in their order, per element. x is read as bfloat16 bits (`xh`) where `raw`. */
static inline ALWAYS_INLINE void delta_chain(float *r, const float *x, const uint16_t *xh, int raw, const float *b,
                                             int len, int sparse, const Sparse *c, int div, float dv, int mul,
                                             float mv, int nanx) {
    uint32_t h = c->h, k1 = c->k1, k2 = c->k2;
    int32_t thr_s = c->thr_s;
    Sparse cut = *c;
    for (int j = 0; j < len; j++, h += KEY_MUL) {
        float d = sub_x(raw ? from_bits((uint32_t)xh[j] << 16) : x[j], b[j], nanx);
        if (sparse == 1) d = d * keep_mask(h, k1, k2, thr_s);
        if (sparse == 2) d = d * top_mask(d, j, &cut);
        if (sparse == 3) d = d * top_mask_whole(d, &cut);
        if (div) d = d / dv;
        if (mul) d = d * mv;
        r[j] = d;
    }
}

/* The chain's sparsifying step `sp` in the tile of `len` from flat index `first` into *c: 1 (KEEP),
 * 2 (TOP), 3 (TOP, `whole_cuts`), 0 (none), or -1 where the chain cannot take it (a constant mask, two segments' keys). */
static inline int sparse_for(const CombineJob *j, const Step *sp, uint64_t first, int len, Sparse *c) {
    memset(c, 0, sizeof *c);
    if (sp == NULL) return 0;
    if (sp->op == TOP) {
        c->ti = sp->t_in, c->to = sp->t_out;
        c->li = tie_limit(sp->last_in, (int64_t)first, len), c->lo = tie_limit(sp->last_out, (int64_t)first, len);
        return whole_cuts(c, len) ? 3 : 2;
    }
    if (sp->thr == 0 || sp->thr >= ((uint64_t)1 << 32) || (first >> 32) != ((first + len - 1) >> 32)) return -1;
    uint32_t k[3];
    block_keys(j->keys[sp->stream], first >> 32, k);
    c->h = ((uint32_t)first + k[0]) * KEY_MUL, c->k1 = k[1], c->k2 = k[2];
    c->thr_s = (int32_t)((uint32_t)sp->thr ^ 0x80000000u);
    return 1;
}

/* Steps i.. as one delta_chain where they are SET, SUB [, KEEP or TOP][, DIV][, MUL] of one
 * register (a KEEP whose mask is not constant and needs one segment's keys): the steps run, else 0. */
static inline ALWAYS_INLINE int run_chain(const CombineJob *j, Py_ssize_t i, Tile *t, Py_ssize_t at, int len,
                                         int nanx) {
    const Step *st = &j->steps[i], *end = j->steps + j->nsteps, *s = st + 2;
    if (st->op != SET || st->scaled || s > end || st[1].op != SUB || st[1].reg != st->reg) return 0;
    const Step *sp = s < end && (s->op == KEEP || s->op == TOP) && s->reg == st->reg ? s++ : NULL;
    const Step *div = s < end && s->op == DIV && s->reg == st->reg ? s++ : NULL;
    const Step *mul = s < end && s->op == MUL && s->reg == st->reg ? s++ : NULL;
    Sparse c;
    int sparse = sparse_for(j, sp, (uint64_t)(j->start + at), len, &c);
    if (sparse < 0) return 0;
    /* A bfloat16 model stream not widened yet is read as it is (exact: a shift), saving a pass. */
    const Stream *in = &j->streams[st->stream];
    int raw = in->kind == BF16 && t->wide[st->stream] == NULL;
    const uint16_t *xh = raw ? (const uint16_t *)in->buf + at : NULL;
    const float *x = raw ? NULL : input(j, t, st->stream, at, len), *b = input(j, t, st[1].stream, at, len);
    float dv = div ? div->scale : 1.0f, mv = mul ? mul->scale : 1.0f, *r = t->R[st->reg];
#define CHAIN_DM(RAW, SP)                                                                                             \
    if (div && mul)                                                                                                   \
        delta_chain(r, x, xh, RAW, b, len, SP, &c, 1, dv, 1, mv, nanx);                                               \
    else if (div)                                                                                                     \
        delta_chain(r, x, xh, RAW, b, len, SP, &c, 1, dv, 0, mv, nanx);                                               \
    else if (mul)                                                                                                     \
        delta_chain(r, x, xh, RAW, b, len, SP, &c, 0, dv, 1, mv, nanx);                                               \
    else                                                                                                              \
        delta_chain(r, x, xh, RAW, b, len, SP, &c, 0, dv, 0, mv, nanx);
#define CHAIN(RAW)                                                                                                    \
    if (sparse == 1) {                                                                                                \
        CHAIN_DM(RAW, 1)                                                                                              \
    } else if (sparse == 2) {                                                                                         \
        CHAIN_DM(RAW, 2)                                                                                              \
    } else if (sparse == 3) {                                                                                         \
        CHAIN_DM(RAW, 3)                                                                                              \
    } else {                                                                                                          \
        CHAIN_DM(RAW, 0)                                                                                              \
    }
    if (raw) {
        CHAIN(1)
    } else {
        CHAIN(0)
    }
#undef CHAIN
#undef CHAIN_DM
    return (int)(s - st);
}

/* Step i over the tile [at, at + len); returns the steps it ran (a SET then a SUB of the same
 * register, a model's delta, run as one loop: the same ops in the same order). */
static inline ALWAYS_INLINE int run_step(const CombineJob *j, Py_ssize_t i, Tile *t, Py_ssize_t at, int len,
                                        int nanx) {
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
        for (int k = 0; k < len; k++) r[k] = add_x(r[k], x[k], nanx);
        break;
    }
    case ELECT:
        elect(t->R, r, len, st, nanx, NULL, NULL, 0);
        break;
    default: {
        const float *x = input(j, t, st->stream, at, len);
        const Step *next = i + 1 < j->nsteps ? &j->steps[i + 1] : NULL;
        if (st->op == SET && !st->scaled && next && next->op == SUB && next->reg == st->reg) {
            const float *y = input(j, t, next->stream, at, len);
            for (int k = 0; k < len; k++) r[k] = sub_x(x[k], y[k], nanx);
            return 2;
        }
        if (st->op == SET && !st->scaled)
            memcpy(r, x, (size_t)len * sizeof(float));
        else if (st->op == SET)
            for (int k = 0; k < len; k++) r[k] = x[k] * s;
        else if (st->op == SUB)
            for (int k = 0; k < len; k++) r[k] = sub_x(r[k], x[k], nanx);
        else if (st->scaled)
            for (int k = 0; k < len; k++) r[k] = add_x(r[k], x[k] * s, nanx);
        else
            for (int k = 0; k < len; k++) r[k] = add_x(r[k], x[k], nanx);
    }
    }
    return 1;
}

/* Where a loop puts its values: a register, or the output as float32, bfloat16 or float16 (its NaNs'
 * payload kept or not). Constants in each loop. */
enum { TO_REG = 0, TO_F32 = 1, TO_BF16 = 2, TO_F16 = 3, TO_F16_BARE = 4 };

/* Element k of the output, `v` rounded as torch's cast does. */
static inline ALWAYS_INLINE void put(void *out, int k, float v, int to, uint16_t nan) {
    if (to == TO_BF16)
        ((uint16_t *)out)[k] = round_bf16(v, nan);
    else if (to == TO_F16)
        ((uint16_t *)out)[k] = round_f16(v, 1);
    else if (to == TO_F16_BARE)
        ((uint16_t *)out)[k] = round_f16(v, 0);
    else
        ((float *)out)[k] = v;
}

/* The output's TO_ kind. */
static inline int out_to(const CombineJob *j) {
    return j->out_kind == BF16 ? TO_BF16 : j->out_kind == F16 ? (j->f16_payload ? TO_F16 : TO_F16_BARE) : TO_F32;
}

/* r += src[m] (times scale[m] where `scaled`, rounded before the add) for m < n (a constant), as
 * one loop, into r or (the program's last steps) straight into the output `o` (`to`): the steps'
 * ops in their order, without a pass over the tile per step. */
static inline ALWAYS_INLINE void sum_run(float *r, const float *const *src, const float *scale, int n, int scaled,
                                         int len, int to, void *o, uint16_t nan, int nanx) {
    const float *x0 = src[0], *x1 = n > 1 ? src[1] : NULL, *x2 = n > 2 ? src[2] : NULL;
    float s0 = scale[0], s1 = n > 1 ? scale[1] : 1.0f, s2 = n > 2 ? scale[2] : 1.0f;
    for (int k = 0; k < len; k++) {
        float v = add_x(r[k], scaled ? x0[k] * s0 : x0[k], nanx);
        if (n > 1) v = add_x(v, scaled ? x1[k] * s1 : x1[k], nanx);
        if (n > 2) v = add_x(v, scaled ? x2[k] * s2 : x2[k], nanx);
        if (to == TO_REG)
            r[k] = v;
        else
            put(o, k, v, to, nan);
    }
}

#define SUM_RUN 3 /* steps per sum_run at most */

/* Steps i.. as one sum_run where they are ADDs (all scaled or none) and ACCs of other registers,
 * into one register: the steps run (2 or more; 1 where it ends the program, into the output: then
 * *put_out is set), else 0. */
static inline ALWAYS_INLINE int run_sum(const CombineJob *j, Py_ssize_t i, Tile *t, Py_ssize_t at, int len,
                                        int *put_out, int nanx) {
    const Step *st = &j->steps[i];
    const float *src[SUM_RUN];
    float scale[SUM_RUN];
    int n = 0, scaled = -1;
    for (; n < SUM_RUN && i + n < j->nsteps; n++) {
        const Step *s = st + n;
        int sc = s->op == ADD && s->scaled;
        if (s->reg != st->reg || !(s->op == ADD || (s->op == ACC && s->stream != st->reg)) || (n && sc != scaled))
            break;
        scaled = sc;
        src[n] = s->op == ACC ? t->R[s->stream] : input(j, t, s->stream, at, len);
        scale[n] = s->scale;
    }
    int last = i + n == j->nsteps;
    if (n == 0 || (n == 1 && !last)) return 0;
    int to = last ? out_to(j) : TO_REG;
    void *o = (char *)j->out + at * (j->out_kind == F32 ? 4 : 2);
    float *r = t->R[st->reg];
#define SUM_CASE(N, S, T)                                                                                             \
    case T:                                                                                                           \
        sum_run(r, src, scale, N, S, len, T, o, j->nan, nanx);                                                        \
        break;
#define SUM_TO(N, S)                                                                                                  \
    switch (to) {                                                                                                     \
        SUM_CASE(N, S, TO_REG)                                                                                        \
        SUM_CASE(N, S, TO_F32)                                                                                        \
        SUM_CASE(N, S, TO_BF16)                                                                                       \
        SUM_CASE(N, S, TO_F16)                                                                                        \
        SUM_CASE(N, S, TO_F16_BARE)                                                                                   \
    }
#define SUM_N(N)                                                                                                      \
    if (scaled) {                                                                                                     \
        SUM_TO(N, 1)                                                                                                  \
    } else {                                                                                                          \
        SUM_TO(N, 0)                                                                                                  \
    }
    if (n == 1) {
        SUM_N(1)
    } else if (n == 2) {
        SUM_N(2)
    } else {
        SUM_N(3)
    }
#undef SUM_N
#undef SUM_TO
#undef SUM_CASE
    *put_out = last;
    return n;
}

/* An ELECT that elect_fused runs, then the program's last step, an unscaled add of a stream into
 * its register, into a bfloat16 output (TIES, DARE-TIES without lambda), as one loop: the elected
 * value, the add and the rounding without the register's store and reload. The steps run (2) or 0. */
static inline ALWAYS_INLINE int run_elect_out(const CombineJob *j, Py_ssize_t i, Tile *t, Py_ssize_t at, int len,
                                              int *put_out, int nanx) {
    const Step *st = &j->steps[i], *a = st + 1;
    if (st->op != ELECT || i + 2 != j->nsteps || out_to(j) != TO_BF16) return 0;
    if (a->op != ADD || a->scaled || a->reg != st->reg || st->stream > ELECT_FUSED ||
        (st->reg >= 1 && st->reg <= st->stream))
        return 0;
    const float *base = input(j, t, a->stream, at, len);
    elect(t->R, t->R[st->reg], len, st, nanx, base, (uint16_t *)j->out + at, j->nan);
    *put_out = 1;
    return 2;
}

/* Elements [lo, hi). */
static inline ALWAYS_INLINE void blocks(const CombineJob *j, Tile *t, Py_ssize_t lo, Py_ssize_t hi, int nanx) {
    const float *result = t->R[j->steps[j->nsteps - 1].reg];
    for (Py_ssize_t at = lo; at < hi; at += COMBINE) {
        int len = hi - at < COMBINE ? (int)(hi - at) : COMBINE, put_out = 0;
        memset(t->wide, 0, sizeof t->wide);
        for (Py_ssize_t i = 0; i < j->nsteps;) {
            int ran = run_elect_out(j, i, t, at, len, &put_out, nanx);
            if (!ran) ran = run_sum(j, i, t, at, len, &put_out, nanx);
            if (!ran) ran = run_chain(j, i, t, at, len, nanx);
            i += ran ? ran : run_step(j, i, t, at, len, nanx);
        }
        if (put_out) continue;
        void *o = (char *)j->out + at * (j->out_kind == F32 ? 4 : 2);
        switch (out_to(j)) {
        case TO_BF16:
            for (int k = 0; k < len; k++) put(o, k, result[k], TO_BF16, j->nan);
            break;
        case TO_F16:
            for (int k = 0; k < len; k++) put(o, k, result[k], TO_F16, j->nan);
            break;
        case TO_F16_BARE:
            for (int k = 0; k < len; k++) put(o, k, result[k], TO_F16_BARE, j->nan);
            break;
        default:
            memcpy(o, result, (size_t)len * sizeof(float));
        }
    }
}

/* blocks, with torch's NaN of an add unless the output is bfloat16 (add_x). */
CLONES static void combine_blocks(const CombineJob *j, Tile *t, Py_ssize_t lo, Py_ssize_t hi) {
    if (j->out_kind == BF16)
        blocks(j, t, lo, hi, 0);
    else
        blocks(j, t, lo, hi, 1);
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

const char combine_doc[] = PyDoc_STR(
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

PyObject *combine(PyObject *self, PyObject *args) {
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
    /* ~135 KB each: not on a stack; on cache-line bounds, so that two threads never write one line. */
    char *mem = PyMem_Malloc((size_t)slots * sizeof(Tile) + 64);
    Tile *tiles = (Tile *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
    if (mem == NULL) {
        PyErr_NoMemory();
        PyBuffer_Release(&out);
        goto done;
    }
    CombineJob job = {streams, steps, nsteps, out.buf, kind_of(&out), (uint16_t)nan, f16_payload, start, keys, tiles};
    Py_BEGIN_ALLOW_THREADS
    split(combine_part, &job, n, piece_for(1), slots);
    Py_END_ALLOW_THREADS
    PyMem_Free(mem);
    PyBuffer_Release(&out);
    result = Py_NewRef(Py_None);
done:
    release_streams(views, streams, got);
    PyMem_Free(steps);
    PyMem_Free(keys);
    return result;
}
