/* What correctly rounded ("exact") dot products would cost beside the fixed-order sums the
 * statistics use now, per term, on this CPU: the evidence behind the choice recorded in the README
 * ("Exactness was more than the promise needed").
 *
 *     cc -O3 -o /tmp/exact_sums_cost bench/exact_sums_cost.c -lm && /tmp/exact_sums_cost
 *
 * Two kernels over the same float32 vectors, groups of 4096 terms held in the L2 cache (no I/O):
 * - pairwise: engine/stats/_fused.c's group_dot (products widened to float64, each group summed
 *   by halving), the statistics' first level as merged today;
 * - exact: every product x*y of two float32 values is M * 2^k with M = mx * my < 2^48 (the
 *   24-bit significands) and k = kx + ky (the biased exponents), so it is added without rounding
 *   to int64 bin k (4 copies of the bins, so runs of one exponent are not a chain of dependent
 *   adds); a bin takes 2^15 terms before it must be folded into a wider one (done every 8 groups,
 *   timed), and the sum of bins * 2^(k - 300) rounds once at the end. The significands and exponents are extracted 8 at a
 *   time with AVX2; the bin adds cannot be vectorised (AVX2 has no scatter). This is the fastest
 *   exact scheme tried here; an error-free-transformation cascade (Rump, Ogita, Oishi's
 *   ExtractScalar) came out slower.
 * Data: "weights" are bfloat16 values (products of 16 significant bits, a SLERP's), "deltas" are
 * float32 differences of two bfloat16 weights 1% apart (a model stock's). Prints ns per term, the
 * median of 9 timings, and checks the exact kernel's bins against a plain scalar loop. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define GROUP 4096
#define HALF (GROUP / 2)
#define BINS 512
#define COPIES 4
#define N (1 << 16) /* floats per vector: 256 KiB each, in the L2 cache */
#define REPEATS 2000

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx2"))) static double group_dot(const float *x, const float *y) {
    double w[HALF];
    for (int k = 0; k < HALF; k++) w[k] = (double)x[k] * (double)y[k] + (double)x[k + HALF] * (double)y[k + HALF];
    for (int half = HALF / 2; half; half /= 2)
        for (int k = 0; k < half; k++) w[k] += w[k + half];
    return w[0];
}

/* Bin indices and signed significand products of a group, 8 terms per step. */
__attribute__((target("avx2"))) static void split_terms(const float *x, const float *y, uint32_t *bin, int64_t *val) {
    const __m256i frac = _mm256_set1_epi32(0x7fffff), one = _mm256_set1_epi32(1), ff = _mm256_set1_epi32(0xff);
    for (int k = 0; k < GROUP; k += 8) {
        __m256i ux = _mm256_loadu_si256((const __m256i *)(x + k)), uy = _mm256_loadu_si256((const __m256i *)(y + k));
        __m256i ex = _mm256_and_si256(_mm256_srli_epi32(ux, 23), ff), ey = _mm256_and_si256(_mm256_srli_epi32(uy, 23), ff);
        __m256i mx = _mm256_or_si256(_mm256_and_si256(ux, frac), _mm256_slli_epi32(_mm256_min_epu32(ex, one), 23));
        __m256i my = _mm256_or_si256(_mm256_and_si256(uy, frac), _mm256_slli_epi32(_mm256_min_epu32(ey, one), 23));
        _mm256_storeu_si256((__m256i *)(bin + k), _mm256_add_epi32(_mm256_max_epu32(ex, one), _mm256_max_epu32(ey, one)));
        __m256i s = _mm256_srai_epi32(_mm256_xor_si256(ux, uy), 31);
        __m256i pe = _mm256_mul_epu32(mx, my), po = _mm256_mul_epu32(_mm256_srli_epi64(mx, 32), _mm256_srli_epi64(my, 32));
        __m256i se = _mm256_shuffle_epi32(s, 0xA0), so = _mm256_shuffle_epi32(s, 0xF5);
        pe = _mm256_sub_epi64(_mm256_xor_si256(pe, se), se);
        po = _mm256_sub_epi64(_mm256_xor_si256(po, so), so);
        __m256i lo = _mm256_unpacklo_epi64(pe, po), hi = _mm256_unpackhi_epi64(pe, po);
        _mm256_storeu_si256((__m256i *)(val + k), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256((__m256i *)(val + k + 4), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
}

static void group_exact(const float *x, const float *y, int64_t bins[COPIES][BINS]) {
    uint32_t bin[GROUP];
    int64_t val[GROUP];
    split_terms(x, y, bin, val);
    for (int k = 0; k < GROUP; k += COPIES)
        for (int c = 0; c < COPIES; c++) bins[c][bin[k + c]] += val[k + c];
}

/* Every 8 groups (8192 terms per copy, < 2^15): the int64 bins into 128-bit ones. */
static void fold(int64_t bins[COPIES][BINS], __int128 *wide) {
    for (int c = 0; c < COPIES; c++)
        for (int b = 0; b < BINS; b++) {
            wide[b] += bins[c][b];
            bins[c][b] = 0;
        }
}

static void group_exact_scalar(const float *x, const float *y, int64_t *bins) {
    for (int k = 0; k < GROUP; k++) {
        uint32_t ux, uy;
        memcpy(&ux, x + k, 4);
        memcpy(&uy, y + k, 4);
        uint32_t ex = (ux >> 23) & 0xff, ey = (uy >> 23) & 0xff;
        int64_t m = (int64_t)(((ux & 0x7fffff) | (ex ? 0x800000u : 0)) * (uint64_t)((uy & 0x7fffff) | (ey ? 0x800000u : 0)));
        bins[(ex ? ex : 1) + (ey ? ey : 1)] += (ux ^ uy) >> 31 ? -m : m;
    }
}

static float bf16(double v) {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static double gauss(void) {
    double u = (rand() + 1.0) / ((double)RAND_MAX + 2.0), v = rand() / (double)RAND_MAX;
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

static int cmp(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

static void run(const char *what, const float *x, const float *y) {
    static int64_t bins[COPIES][BINS], check[BINS];
    static __int128 wide[BINS];
    double t[2][9], sink = 0;
    memset(bins, 0, sizeof bins);
    memset(check, 0, sizeof check);
    for (int g = 0; g < N; g += GROUP) {
        group_exact(x + g, y + g, bins);
        group_exact_scalar(x + g, y + g, check);
    }
    for (int b = 0; b < BINS; b++) {
        int64_t s = 0;
        for (int c = 0; c < COPIES; c++) s += bins[c][b];
        if (s != check[b]) {
            printf("%s: bin %d differs\n", what, b);
            exit(1);
        }
    }
    for (int r = 0; r < 9; r++) {
        double t0 = now();
        for (int i = 0; i < REPEATS; i++)
            for (int g = 0; g < N; g += GROUP) sink += group_dot(x + g, y + g);
        double t1 = now();
        for (int i = 0; i < REPEATS; i++)
            for (int g = 0; g < N; g += GROUP) {
                group_exact(x + g, y + g, bins);
                if ((g / GROUP) % 8 == 7) fold(bins, wide);
            }
        t[0][r] = (t1 - t0) / ((double)N * REPEATS) * 1e9;
        t[1][r] = (now() - t1) / ((double)N * REPEATS) * 1e9;
    }
    qsort(t[0], 9, sizeof(double), cmp);
    qsort(t[1], 9, sizeof(double), cmp);
    printf("%-8s pairwise %.3f ns/term   exact %.3f ns/term   exact / pairwise %.2fx%s\n", what, t[0][4], t[1][4],
           t[1][4] / t[0][4], sink == 12345.0 && wide[0] ? " " : "");
}

int main(void) {
    float *w0 = malloc(N * 4), *w1 = malloc(N * 4), *d1 = malloc(N * 4), *d2 = malloc(N * 4);
    srand(1);
    for (int i = 0; i < N; i++) {
        w0[i] = bf16(0.02 * gauss());
        w1[i] = bf16(w0[i] + 0.0002 * gauss());
        d1[i] = w1[i] - w0[i];
        d2[i] = bf16(w0[i] + 0.0002 * gauss()) - w0[i];
    }
    run("weights", w0, w1);
    run("deltas", d1, d2);
    return 0;
}
