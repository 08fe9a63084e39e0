/* C unit tests for qt_gptq_rows: the worked example of tests/test_gptq_kernel.py, every
 * vector path held byte for byte to the scalar path on shapes that leave partial tiles,
 * panels and blocks (static and dynamic parameters), and the argument checks. Under ASan
 * (make test) this also checks that the kernel stays inside w, work, codes and scales. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "qtool.h"

static void test_worked_example(void) {
    const float u[4] = {2.0f, 4.0f, 0.0f, 1.0f}, w[2] = {0.625f, 0.2f};
    const int64_t ident[2] = {0, 1}, swap[2] = {1, 0};
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        float s = 0.25f, work[2];
        uint8_t codes[2];
        CHECK(qt_gptq_rows(w, 1, 2, u, ident, 2, 4, 1, 0, &s, NULL, codes, work) == QT_OK, "%s status", isa_name(l));
        CHECK(codes[0] == 10 && codes[1] == 8, "%s codes %d %d", isa_name(l), codes[0], codes[1]);
        CHECK(qt_gptq_rows(w, 1, 2, u, swap, 2, 4, 1, 0, &s, NULL, codes, work) == QT_OK, "%s swap", isa_name(l));
        CHECK(codes[0] == 11 && codes[1] == 9, "%s swapped codes %d %d", isa_name(l), codes[0], codes[1]);
        s = 0.0f;
        CHECK(qt_gptq_rows(w, 1, 2, u, ident, 2, 4, 1, 1, &s, NULL, codes, work) == QT_OK && codes[0] == 0 &&
                  s == (float)(-0.625 / 8),
              "%s dynamic scale %g", isa_name(l), s);
    }
}

/* U: an upper triangular matrix with a positive diagonal (any such U is a valid factor). */
static void fill_case(float *w, float *u, int64_t rows, int64_t k) {
    for (int64_t i = 0; i < rows * k; i++) w[i] = frand(-0.1f, 0.1f);
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j < k; j++) u[i * k + j] = j < i ? 0.0f : (j == i ? frand(0.5f, 2.0f) : frand(-0.3f, 0.3f));
}

static void test_paths_agree(int64_t rows, int64_t k, int64_t block, int bits, int sym, int dynamic) {
    const int64_t nb = (k + block - 1) / block, tile = rows < QT_GPTQ_TILE ? rows : QT_GPTQ_TILE;
    float *w = malloc(sizeof(float) * rows * k), *u = malloc(sizeof(float) * k * k);
    float *work = malloc(sizeof(float) * tile * k), *s0 = malloc(sizeof(float) * rows * nb);
    float *s = malloc(sizeof(float) * rows * nb), *s_ref = malloc(sizeof(float) * rows * nb);
    uint8_t *z = malloc(rows * nb), *z_ref = malloc(rows * nb), *z0 = malloc(rows * nb);
    uint8_t *codes = malloc(rows * k), *ref = malloc(rows * k);
    int64_t *cols = malloc(sizeof(int64_t) * k);
    fill_case(w, u, rows, k);
    for (int64_t i = 0; i < k; i++) cols[i] = i;
    for (int64_t i = k - 1; i > 0 && !dynamic; i--) { /* a permutation (Fisher-Yates) */
        int64_t j = rnd() % (i + 1), t = cols[i];
        cols[i] = cols[j];
        cols[j] = t;
    }
    for (int64_t i = 0; i < rows * nb; i++) {
        s0[i] = frand(0.005f, 0.02f) * (rnd() & 1 ? 1.0f : -1.0f);
        z0[i] = (uint8_t)(rnd() % (1u << bits));
    }
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        float *so = l ? s : s_ref;
        uint8_t *zo = l ? z : z_ref, *co = l ? codes : ref;
        memcpy(so, s0, sizeof(float) * rows * nb);
        memcpy(zo, z0, rows * nb);
        int st = qt_gptq_rows(w, rows, k, u, cols, block, bits, sym, dynamic, so, sym ? NULL : zo, co, work);
        CHECK(st == QT_OK, "%s status %d", isa_name(l), st);
        if (l == 0) continue;
        CHECK(memcmp(codes, ref, rows * k) == 0, "%s codes differ from scalar (%lld x %lld)", isa_name(l),
              (long long)rows, (long long)k);
        CHECK(memcmp(s, s_ref, sizeof(float) * rows * nb) == 0, "%s scales differ from scalar", isa_name(l));
        CHECK(sym || memcmp(z, z_ref, rows * nb) == 0, "%s zero points differ from scalar", isa_name(l));
    }
    for (int64_t i = 0; i < rows * k; i++) CHECK(ref[i] < (1u << bits), "code %d out of range", ref[i]);
    free(w), free(u), free(work), free(s0), free(s), free(s_ref), free(z), free(z_ref), free(z0);
    free(codes), free(ref), free(cols);
}

static void test_arguments(void) {
    float w[8] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f}, u[16] = {0}, s[4] = {0.1f, 0.1f, 0.1f, 0.1f}, work[8];
    for (int i = 0; i < 4; i++) u[i * 5] = 1.0f;
    int64_t cols[4] = {0, 1, 2, 3}, perm[4] = {1, 0, 2, 3}, out[4] = {0, 1, 2, 4};
    uint8_t codes[8], z[4] = {8, 8, 8, 8};
    CHECK(qt_gptq_rows(w, 2, 4, u, cols, 2, 4, 1, 0, s, NULL, codes, work) == QT_OK, "valid call");
    CHECK(qt_gptq_rows(w, 2, 4, u, out, 2, 4, 1, 0, s, NULL, codes, work) == QT_ERR_ARG, "col out of range");
    CHECK(qt_gptq_rows(w, 2, 4, u, perm, 2, 4, 1, 1, s, NULL, codes, work) == QT_ERR_ARG, "dynamic permuted");
    CHECK(qt_gptq_rows(w, 2, 4, u, cols, 2, 4, 0, 0, s, NULL, codes, work) == QT_ERR_ARG, "asym without zp");
    CHECK(qt_gptq_rows(w, 2, 4, u, cols, 2, 4, 1, 0, s, z, codes, work) == QT_ERR_ARG, "sym with zp");
    CHECK(qt_gptq_rows(w, 2, 4, u, cols, 2, 9, 1, 0, s, NULL, codes, work) == QT_ERR_ARG, "bits 9");
    CHECK(qt_gptq_rows(w, 2, 4, u, cols, 2, 4, 1, 0, s, NULL, codes, NULL) == QT_ERR_ARG, "no work");
    s[1] = 0.0f;
    CHECK(qt_gptq_rows(w, 2, 4, u, cols, 2, 4, 1, 0, s, NULL, codes, work) == QT_ERR_ARG, "zero scale");
    s[1] = 0.1f;
    u[5] = 0.0f;
    CHECK(qt_gptq_rows(w, 2, 4, u, cols, 2, 4, 1, 0, s, NULL, codes, work) == QT_ERR_ARG, "zero diagonal");
    u[5] = 1.0f;
    w[6] = NAN;
    CHECK(qt_gptq_rows(w, 2, 4, u, cols, 2, 4, 1, 0, s, NULL, codes, work) == QT_ERR_NONFINITE, "NaN");
}

int main(void) {
    check_seed(0x67707471);
    test_worked_example();
    test_paths_agree(37, 100, 16, 4, 1, 0);
    test_paths_agree(33, 129, 32, 4, 0, 0);
    test_paths_agree(70, 150, 64, 3, 0, 0);
    test_paths_agree(9, 300, 128, 8, 1, 0);
    test_paths_agree(64, 256, 128, 4, 1, 1);
    test_paths_agree(11, 90, 24, 2, 0, 1);
    test_arguments();
    qt_set_isa(QT_ISA_VNNI);
    if (g_fail) {
        fprintf(stderr, "test_gptq: %d failure(s)\n", g_fail);
        return 1;
    }
    printf("test_gptq: ok\n");
    return 0;
}
