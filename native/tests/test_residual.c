/* C unit tests for qt_awq_residual: a known block by hand (ties to even, the clamp), the
 * NaN/Inf policy and argument checks, and every vector path held bit for bit to the scalar
 * path on random shapes with a short last block (the numpy twin holds the scalar path in
 * tests/test_awq.py). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "qtool.h"

static void test_known_block(void) {
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        /* s = 1: symmetric 4-bit, m = 8 -> scale -1, zp 8; x / -1 rounded half to even */
        float w[4] = {8.0f, 0.5f, 1.5f, -2.25f}, s[4] = {1, 1, 1, 1}, out[4];
        CHECK(qt_awq_residual(w, 1, 4, s, 4, 4, 1, out) == QT_OK, "%s status", isa_name(l));
        /* 8 -> code 0 -> 8; 0.5 -> 0 (tie to even); 1.5 -> 2; -2.25 -> -2 */
        CHECK(out[0] == 0.0f && out[1] == 0.5f && out[2] == -0.5f && out[3] == -0.25f,
              "%s residual %g %g %g %g", isa_name(l), out[0], out[1], out[2], out[3]);
        /* s = 2 on the last column: x = -4.5 -> -4 (even) -> back to -2: residual -0.25 */
        s[3] = 2.0f;
        CHECK(qt_awq_residual(w, 1, 4, s, 4, 4, 1, out) == QT_OK && out[3] == -0.25f, "%s scaled %g",
              isa_name(l), out[3]);
    }
}

static void test_errors(void) {
    float w[4] = {1, 2, 3, 4}, s[4] = {1, 1, 1, 1}, out[4];
    CHECK(qt_awq_residual(NULL, 1, 4, s, 4, 4, 1, out) == QT_ERR_ARG, "null w");
    CHECK(qt_awq_residual(w, 1, 4, s, 0, 4, 1, out) == QT_ERR_ARG, "block 0");
    CHECK(qt_awq_residual(w, 1, 4, s, 4, 9, 1, out) == QT_ERR_ARG, "bits 9");
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        w[2] = NAN;
        CHECK(qt_awq_residual(w, 1, 4, s, 4, 4, 0, out) == QT_ERR_NONFINITE, "%s NaN", isa_name(l));
        w[2] = 3e38f;
        s[2] = 10.0f; /* finite w, w * s overflows */
        CHECK(qt_awq_residual(w, 1, 4, s, 4, 4, 0, out) == QT_ERR_NONFINITE, "%s overflow", isa_name(l));
        w[2] = 3.0f;
        s[2] = 1.0f;
    }
}

static void test_paths_agree(void) {
    check_seed(7);
    const int64_t rows = 5, cols = 83; /* blocks of 32: a short last block of 19 */
    float *w = malloc(sizeof(float) * rows * cols), *s = malloc(sizeof(float) * cols);
    float *ref = malloc(sizeof(float) * rows * cols), *out = malloc(sizeof(float) * rows * cols);
    for (int64_t i = 0; i < rows * cols; i++) w[i] = frand(-1.0f, 1.0f);
    for (int64_t i = 0; i < cols; i++) s[i] = frand(0.1f, 4.0f);
    for (int bits = 2; bits <= 8; bits += 2) {
        for (int sym = 0; sym <= 1; sym++) {
            qt_set_isa(0);
            CHECK(qt_awq_residual(w, rows, cols, s, 32, bits, sym, ref) == QT_OK, "scalar status");
            for (int l = 1; l <= qt_isa_supported(); l++) {
                qt_set_isa(l);
                CHECK(qt_awq_residual(w, rows, cols, s, 32, bits, sym, out) == QT_OK, "%s status", isa_name(l));
                CHECK(memcmp(ref, out, sizeof(float) * rows * cols) == 0, "%s bits %d sym %d differs from scalar",
                      isa_name(l), bits, sym);
            }
        }
    }
    qt_set_isa(qt_isa_supported());
    free(w);
    free(s);
    free(ref);
    free(out);
}

int main(void) {
    test_known_block();
    test_errors();
    test_paths_agree();
    if (g_fail) {
        fprintf(stderr, "test_residual: %d failure(s)\n", g_fail);
        return 1;
    }
    printf("test_residual: ok\n");
    return 0;
}
