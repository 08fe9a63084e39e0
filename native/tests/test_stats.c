/* C unit tests for the histogram kernels (qt_histogram, qt_histogram_pow2,
 * qt_minmax_histogram_pow2): every ISA
 * path against a per-element reference written here from the formulas in qtool.h, on
 * sizes that cross the sub-histogram spans, bins on both sides of the sub-histogram
 * limit, edge values (bin edges, -0.0, subnormals, FLT_MAX, out of range), the NaN/Inf
 * policy (counts unchanged, wherever the bad value is) and argument checks. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "qtool.h"



/* 600001 crosses two sub-histogram spans (4 * 65520 values each) and ends in a tail. */
static const int64_t SIZES[] = {0, 1, 7, 8, 15, 16, 17, 255, 256, 257, 8191, 8193, 600001};
#define NSIZES (int)(sizeof(SIZES) / sizeof(SIZES[0]))
/* 2048 is the largest count held in sub-histograms; 2049 and up count directly. */
static const int64_t BINS[] = {1, 7, 16, 100, 2048, 2049, 5000};
#define NBINS (int)(sizeof(BINS) / sizeof(BINS[0]))

static int64_t clamp_bin(float t, int64_t bins) {
    if (t < 0.0f) return 0;
    if (t > (float)(bins - 1)) return bins - 1;
    return (int64_t)t;
}

static void ref_affine(const float *x, int64_t n, float lo, float hi, int64_t *c, int64_t bins) {
    for (int64_t i = 0; i < n; i++) c[clamp_bin(floorf(((x[i] - lo) / (hi - lo)) * (float)bins), bins)]++;
}

static void ref_pow2(const float *x, int64_t n, int k, int64_t start, int64_t *c, int64_t bins) {
    float s = ldexpf(1.0f, -k);
    for (int64_t i = 0; i < n; i++) c[clamp_bin(floorf(x[i] * s) - (float)start, bins)]++;
}

/* kind 0: normal-ish, 1: all one value, 2: on bin edges of the grid, 3: subnormals,
 * 4: +-FLT_MAX mixed in, 5: -0.0 and 0.0 */
static void fill(float *x, int64_t n, int kind) {
    for (int64_t i = 0; i < n; i++) {
        float v = frand(-3.0f, 3.0f) + frand(-3.0f, 3.0f);
        switch (kind) {
        case 1: v = 0.75f; break;
        case 2: v = (float)((int)(rnd() % 200) - 100) * 0.0625f; break;
        case 3: v = v * 1e-39f; break;
        case 4: v = (rnd() % 4 == 0) ? ((rnd() & 1) ? FLT_MAX : -FLT_MAX) : v; break;
        case 5: v = (rnd() & 1) ? 0.0f : -0.0f; break;
        }
        x[i] = v;
    }
}

static int first_diff(const int64_t *a, const int64_t *b, int64_t bins) {
    for (int64_t i = 0; i < bins; i++)
        if (a[i] != b[i]) return (int)i;
    return -1;
}

static void test_paths_match_reference(void) {
    int64_t nmax = SIZES[NSIZES - 1];
    float *x = malloc(nmax * sizeof(float));
    int64_t *want = malloc(5000 * sizeof(int64_t)), *got = malloc(5000 * sizeof(int64_t));
    /* (k, start) grids; each is run with every bin count */
    const int grid_k[] = {-4, 0, 3, -126};
    const int64_t grid_start[] = {-64, -2, 0, 5};
    for (int si = 0; si < NSIZES; si++) {
        int64_t n = SIZES[si];
        for (int kind = 0; kind < 6; kind++) {
            fill(x, n, kind);
            for (int bi = 0; bi < NBINS; bi++) {
                int64_t bins = BINS[bi];
                for (int g = 0; g < 5; g++) {
                    /* g < 4: pow2 grid g; g == 4: affine over [-2, 2] */
                    for (int64_t b = 0; b < bins; b++) want[b] = got[b] = b; /* add to existing counts */
                    if (g < 4) ref_pow2(x, n, grid_k[g], grid_start[g], want, bins);
                    else ref_affine(x, n, -2.0f, 2.0f, want, bins);
                    for (int l = 0; l <= qt_isa_supported(); l++) {
                        qt_set_isa(l);
                        for (int64_t b = 0; b < bins; b++) got[b] = b;
                        int st = g < 4 ? qt_histogram_pow2(x, n, grid_k[g], grid_start[g], got, bins)
                                       : qt_histogram(x, n, -2.0f, 2.0f, got, bins);
                        int d = first_diff(got, want, bins);
                        CHECK(st == QT_OK && d < 0,
                              "%s %s n=%lld kind=%d bins=%lld: status %d, bin %d: %lld vs %lld",
                              isa_name(l), g < 4 ? "pow2" : "affine", (long long)n, kind,
                              (long long)bins, st, d, d < 0 ? 0LL : (long long)got[d],
                              d < 0 ? 0LL : (long long)want[d]);
                    }
                }
            }
        }
    }
    free(x);
    free(want);
    free(got);
}

static void test_known_values(void) {
    const float tiny = 1.40129846e-45f; /* 2^-149 */
    float x[] = {0.0f, -0.0f, 0.25f, 0.5f, 1.0f, -0.25f, -0.5f, 2.75f, 100.0f, -100.0f,
                 tiny, -tiny, FLT_MAX, -FLT_MAX};
    /* width 2^-2, first bin -2, 12 bins: an edge value lands in the bin it starts */
    int64_t want[12] = {3, 2, 3, 1, 1, 0, 1, 0, 0, 0, 0, 3};
    float y[] = {-tiny, tiny, -1.0f};
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        int64_t c[12] = {0}, d[2] = {0};
        CHECK(qt_histogram_pow2(x, 14, -2, -2, c, 12) == QT_OK && memcmp(c, want, sizeof(want)) == 0,
              "%s pow2 edges: %lld %lld %lld %lld %lld %lld %lld ... %lld", isa_name(l),
              (long long)c[0], (long long)c[1], (long long)c[2], (long long)c[3], (long long)c[4],
              (long long)c[5], (long long)c[6], (long long)c[11]);
        /* width 2: -tiny * 0.5 is a tie that rounds to -0.0, so it joins grid bin 0 */
        CHECK(qt_histogram_pow2(y, 3, 1, -1, d, 2) == QT_OK && d[0] == 1 && d[1] == 2,
              "%s pow2 subnormal rounding: %lld %lld", isa_name(l), (long long)d[0], (long long)d[1]);
        /* one bin takes 3 spans of values: no uint16 sub-histogram may wrap */
        int64_t n = 3 * 4 * 65520 + 5;
        float *z = calloc(n, sizeof(float));
        int64_t e[16] = {0};
        CHECK(qt_histogram_pow2(z, n, 0, -3, e, 16) == QT_OK && e[3] == n && e[2] == 0 && e[4] == 0,
              "%s one full bin: %lld of %lld", isa_name(l), (long long)e[3], (long long)n);
        memset(e, 0, sizeof(e));
        CHECK(qt_histogram(z, n, -1.0f, 1.0f, e, 16) == QT_OK && e[8] == n,
              "%s affine one full bin: %lld of %lld", isa_name(l), (long long)e[8], (long long)n);
        free(z);
    }
}

static void test_nonfinite_leaves_counts(void) {
    const int64_t n = 600001;
    float *x = malloc(n * sizeof(float));
    fill(x, n, 0);
    /* first value, first chunk, last of the first span, first of the second, the tail */
    const int64_t pos[] = {0, 5, 300, 262079, 262080, 400000, n - 1, 17, 524161};
    const float bad[] = {NAN, NAN, NAN, NAN, NAN, NAN, NAN, INFINITY, -INFINITY};
    const int64_t bins_[] = {7, 2048, 5000}; /* sub-histograms, and direct counting */
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        for (int p = 0; p < 9; p++) {
            float save = x[pos[p]];
            x[pos[p]] = bad[p];
            for (int bi = 0; bi < 3; bi++) {
                int64_t bins = bins_[bi], c[5000];
                for (int64_t j = 0; j < bins; j++) c[j] = 7 * j;
                CHECK(qt_histogram_pow2(x, n, -3, -20, c, bins) == QT_ERR_NONFINITE, "%s pow2 status", isa_name(l));
                CHECK(qt_histogram(x, n, -1.0f, 1.0f, c, bins) == QT_ERR_NONFINITE, "%s affine status", isa_name(l));
                int changed = 0;
                for (int64_t j = 0; j < bins; j++) changed |= c[j] != 7 * j;
                CHECK(!changed, "%s counts changed: bad value %g at %lld, bins %lld", isa_name(l),
                      bad[p], (long long)pos[p], (long long)bins);
            }
            x[pos[p]] = save;
        }
    }
    free(x);
}

static void test_arguments(void) {
    float x[4] = {0};
    int64_t c[4] = {0};
    CHECK(qt_histogram_pow2(x, 4, 127, 0, c, 4) == QT_ERR_ARG, "k 127");
    CHECK(qt_histogram_pow2(x, 4, -128, 0, c, 4) == QT_ERR_ARG, "k -128");
    CHECK(qt_histogram_pow2(x, 4, 126, 0, c, 4) == QT_OK && qt_histogram_pow2(x, 4, -127, 0, c, 4) == QT_OK, "k limits");
    CHECK(qt_histogram_pow2(x, 4, 0, (1 << 24) + 1, c, 4) == QT_ERR_ARG, "start not a float32");
    CHECK(qt_histogram_pow2(x, 4, 0, (int64_t)1 << 40, c, 4) == QT_OK, "start 2^40 is a float32");
    CHECK(qt_histogram_pow2(x, 4, 0, INT64_MAX, c, 4) == QT_ERR_ARG, "start huge");
    CHECK(qt_histogram_pow2(x, 4, 0, INT64_MIN, c, 4) == QT_ERR_ARG, "start -huge");
    CHECK(qt_histogram_pow2(x, 4, 0, 0, c, 0) == QT_ERR_ARG, "0 bins");
    CHECK(qt_histogram_pow2(x, 4, 0, 0, c, ((int64_t)1 << 24) + 1) == QT_ERR_ARG, "too many bins");
    CHECK(qt_histogram_pow2(NULL, 4, 0, 0, c, 4) == QT_ERR_ARG, "NULL x");
    CHECK(qt_histogram_pow2(x, 4, 0, 0, NULL, 4) == QT_ERR_ARG, "NULL counts");
    CHECK(qt_histogram_pow2(x, -1, 0, 0, c, 4) == QT_ERR_ARG, "n < 0");
    CHECK(qt_histogram(x, 4, 0.0f, -1.0f, c, 4) == QT_ERR_ARG, "hi < lo");
    CHECK(qt_histogram(x, 4, -FLT_MAX, FLT_MAX, c, 4) == QT_ERR_ARG, "hi - lo overflows");
}

/* qt_minmax_histogram_pow2 against qt_minmax and the per-element reference: min/max
 * bit for bit, counts added only when [min, max] lies in the bounds, untouched otherwise
 * and on NaN/Inf (wherever it sits), on every ISA, size, bin count and kind. */
static void test_minmax_histogram_pow2(void) {
    const int64_t n_max = SIZES[NSIZES - 1];
    float *x = malloc(n_max * sizeof(float));
    int64_t *want = malloc(5000 * sizeof(int64_t)), *got = malloc(5000 * sizeof(int64_t));
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        for (int si = 1; si < NSIZES; si++) {
            int64_t n = SIZES[si];
            for (int kind = 0; kind < 6; kind++) {
                fill(x, n, kind);
                float mn, mx, gmn, gmx;
                CHECK(qt_minmax(x, n, &mn, &mx) == QT_OK, "minmax");
                /* bounds holding [mn, mx] exactly, then missing it below and above */
                const float lo[3] = {mn, mn + 0.5f * fabsf(mn) + 1e-30f, mn};
                const float hi[3] = {mx, mx, mx - 0.5f * fabsf(mx) - 1e-30f};
                for (int b = 0; b < 3; b++) {
                    if (!(lo[b] <= hi[b])) continue;
                    int inside = lo[b] <= mn && mx <= hi[b];
                    for (int bi = 0; bi < NBINS; bi += 2) {
                        int64_t bins = BINS[bi];
                        for (int64_t j = 0; j < bins; j++) want[j] = got[j] = 3 * j;
                        if (inside) ref_pow2(x, n, -4, -50, want, bins);
                        CHECK(qt_minmax_histogram_pow2(x, n, -4, -50, got, bins, lo[b], hi[b], &gmn, &gmx) == QT_OK,
                              "%s status", isa_name(l));
                        CHECK(memcmp(&gmn, &mn, 4) == 0 && memcmp(&gmx, &mx, 4) == 0,
                              "%s n=%lld kind %d: min/max %g %g vs %g %g", isa_name(l), (long long)n, kind,
                              gmn, gmx, mn, mx);
                        CHECK(first_diff(got, want, bins) < 0, "%s n=%lld kind %d bins %lld bounds %d",
                              isa_name(l), (long long)n, kind, (long long)bins, b);
                    }
                }
            }
        }
        fill(x, n_max, 0);
        const int64_t pos[] = {0, 300, 262080, n_max - 1};
        for (int p = 0; p < 4; p++) {
            float save = x[pos[p]], mn, mx;
            x[pos[p]] = p & 1 ? INFINITY : NAN;
            for (int64_t j = 0; j < 2048; j++) got[j] = j;
            CHECK(qt_minmax_histogram_pow2(x, n_max, -4, -50, got, 2048, -1e30f, 1e30f, &mn, &mx) == QT_ERR_NONFINITE,
                  "%s nonfinite status", isa_name(l));
            int changed = 0;
            for (int64_t j = 0; j < 2048; j++) changed |= got[j] != j;
            CHECK(!changed, "%s counts changed on a bad value at %lld", isa_name(l), (long long)pos[p]);
            x[pos[p]] = save;
        }
    }
    float mn, mx;
    CHECK(qt_minmax_histogram_pow2(x, 4, 0, 0, got, 4, 1.0f, -1.0f, &mn, &mx) == QT_ERR_ARG, "lo > hi");
    CHECK(qt_minmax_histogram_pow2(x, 4, 0, 0, got, 4, NAN, 1.0f, &mn, &mx) == QT_ERR_ARG, "NaN bound");
    CHECK(qt_minmax_histogram_pow2(x, 0, 0, 0, got, 4, -1.0f, 1.0f, &mn, &mx) == QT_ERR_ARG, "empty");
    CHECK(qt_minmax_histogram_pow2(x, 4, 0, 0, got, 4, -1.0f, 1.0f, NULL, &mx) == QT_ERR_ARG, "NULL min");
    free(x);
    free(want);
    free(got);
}

int main(void) {
    printf("qtool histogram tests: supported ISA level %s\n", isa_name(qt_isa_supported()));
    test_minmax_histogram_pow2();
    test_known_values();
    test_arguments();
    test_nonfinite_leaves_counts();
    test_paths_match_reference();
    if (g_fail) {
        fprintf(stderr, "%d check(s) failed\n", g_fail);
        return 1;
    }
    printf("all histogram tests passed\n");
    return 0;
}
