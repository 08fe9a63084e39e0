/* C unit tests for qt_quantize_kn (fused RTN W[K, N] -> MatMulNBits): known bytes with
 * ties and padding, the zero-point packing, the NaN/Inf policy and argument checks, and
 * every vector path held byte for byte to the scalar path (the numpy twin holds the
 * scalar path in tests/test_kernels.py). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "qtool.h"



static void test_known_bytes(void) {
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        /* one column, K = 20, blocks of 16: block 1 is padded with its zero point */
        float w[20] = {8.0f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -8.0f, 3.0f, 0, 0, 0, 0, 0, 0, 0, 0,
                       1.0f, 2.0f, 3.0f, 4.0f};
        uint8_t b[16], zp[1];
        float s[2];
        CHECK(qt_quantize_kn(w, 20, 1, 16, 4, 1, b, s, NULL) == QT_OK, "%s status", isa_name(l));
        /* symmetric: scale = -m/8 (m = 8 -> -1); rint(x / -1) + 8 with ties to even:
         * 8 -> 0, .5 -> 8, 1.5 -> 6, 2.5 -> 6, -.5 -> 8, -1.5 -> 10, -8 -> 16 -> 15, 3 -> 5 */
        CHECK(s[0] == -1.0f && s[1] == -0.5f, "%s scales %g %g", isa_name(l), s[0], s[1]);
        CHECK(b[0] == 0x80 && b[1] == 0x66 && b[2] == 0xa8 && b[3] == 0x5f && b[4] == 0x88 && b[7] == 0x88,
              "%s block 0 %02x %02x %02x %02x", isa_name(l), b[0], b[1], b[2], b[3]);
        CHECK(b[8] == 0x46 && b[9] == 0x02 && b[10] == 0x88 && b[15] == 0x88, "%s block 1 %02x %02x %02x",
              isa_name(l), b[8], b[9], b[10]);
        /* asymmetric: block 0 [-8, 8] -> scale 16/15, zp rint(7.4999996) = 7; block 1
         * [0, 4] -> zp 0, so padding codes are 0; zero points packed low nibble first */
        CHECK(qt_quantize_kn(w, 20, 1, 16, 4, 0, b, s, zp) == QT_OK, "%s asym status", isa_name(l));
        CHECK(s[0] == (float)(16.0 / 15.0) && s[1] == (float)(4.0 / 15.0), "%s asym scales", isa_name(l));
        CHECK(zp[0] == 0x07, "%s zero points %02x", isa_name(l), zp[0]);
        CHECK(b[10] == 0 && b[15] == 0, "%s asym padding %02x", isa_name(l), b[10]);
        /* an all-zero block: scale 1.0, every code the zero point */
        float zero[32] = {0};
        uint8_t bz[16];
        CHECK(qt_quantize_kn(zero, 32, 1, 32, 4, 1, bz, s, NULL) == QT_OK && s[0] == 1.0f && bz[0] == 0x88 &&
              bz[15] == 0x88, "%s zero block", isa_name(l));
    }
}

static void test_policy_and_args(void) {
    enum { K = 70, N = 150 };
    float *w = malloc(K * N * sizeof(float));
    uint8_t *b = malloc(N * 5 * 16), zp[N * 3];
    float s[N * 5];
    for (int i = 0; i < K * N; i++) w[i] = frand(-1, 1);
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    const int cols[3] = {0, 77, 149}; /* a vector strip, the 16-wide strip, the scalar tail */
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        for (int i = 0; i < 3; i++) {
            int at = 41 * N + cols[i];
            float keep = w[at];
            w[at] = bad[i];
            CHECK(qt_quantize_kn(w, K, N, 32, 4, i & 1, b, s, zp) == QT_ERR_NONFINITE, "%s nonfinite col %d",
                  isa_name(l), cols[i]);
            w[at] = keep;
        }
        CHECK(qt_quantize_kn(w, K, N, 32, 4, 1, b, s, NULL) == QT_OK, "%s ok", isa_name(l));
    }
    CHECK(qt_quantize_kn(w, K, N, 24, 4, 1, b, s, NULL) == QT_ERR_ARG, "block 24");
    CHECK(qt_quantize_kn(w, K, N, 512, 4, 1, b, s, NULL) == QT_ERR_ARG, "block 512");
    CHECK(qt_quantize_kn(w, K, N, 32, 3, 1, b, s, NULL) == QT_ERR_ARG, "bits 3");
    CHECK(qt_quantize_kn(w, K, N, 32, 4, 0, b, s, NULL) == QT_ERR_ARG, "asymmetric without zero points");
    CHECK(qt_quantize_kn(w, 0, N, 32, 4, 1, b, s, NULL) == QT_ERR_ARG, "K = 0");
    CHECK(qt_quantize_kn(NULL, K, N, 32, 4, 1, b, s, NULL) == QT_ERR_ARG, "NULL w");
    free(w);
    free(b);
}

static void test_paths_agree(void) {
    const int64_t shapes[][2] = {{1, 1}, {33, 1}, {100, 17}, {257, 70}, {512, 130}, {10, 64}, {300, 200}};
    const int top = qt_isa_supported();
    for (int si = 0; si < 7; si++) {
        const int64_t K = shapes[si][0], N = shapes[si][1];
        float *w = malloc(K * N * sizeof(float));
        for (int64_t i = 0; i < K * N; i++) w[i] = frand(-2, 2);
        w[(K / 2) * N] = 1e6f;                        /* a huge outlier */
        for (int64_t i = 0; i < K && i < 16; i++) w[i * N + N - 1] = 0.0f; /* an all-zero block */
        if (K > 40) w[40 * N] = 1e-41f;               /* a denormal */
        for (int bits = 2; bits <= 8; bits *= 2) {
            for (int64_t bs = 16; bs <= 256; bs *= 2) {
                const int64_t nb = (K + bs - 1) / bs, blob = bs * bits / 8, zrow = (nb * bits + 7) / 8;
                uint8_t *b0 = malloc(N * nb * blob), *b1 = malloc(N * nb * blob);
                uint8_t *z0 = malloc(N * zrow), *z1 = malloc(N * zrow);
                float *s0 = malloc(N * nb * 4), *s1 = malloc(N * nb * 4);
                for (int sym = 0; sym < 2; sym++) {
                    qt_set_isa(QT_ISA_SCALAR);
                    CHECK(qt_quantize_kn(w, K, N, bs, bits, sym, b0, s0, z0) == QT_OK, "scalar status");
                    for (int l = 1; l <= top; l++) {
                        qt_set_isa(l);
                        memset(b1, 0xaa, N * nb * blob);
                        memset(z1, 0xaa, N * zrow);
                        CHECK(qt_quantize_kn(w, K, N, bs, bits, sym, b1, s1, z1) == QT_OK, "%s status", isa_name(l));
                        for (int64_t i = 0; i < N * nb * blob; i++)
                            if (b0[i] != b1[i]) {
                                CHECK(0, "%s K=%lld N=%lld bits=%d bs=%lld sym=%d: byte %lld (column %lld block %lld)",
                                      isa_name(l), (long long)K, (long long)N, bits, (long long)bs, sym, (long long)i,
                                      (long long)(i / (nb * blob)), (long long)(i / blob % nb));
                                break;
                            }
                        CHECK(memcmp(s0, s1, N * nb * 4) == 0, "%s scales K=%lld N=%lld bits=%d bs=%lld sym=%d",
                              isa_name(l), (long long)K, (long long)N, bits, (long long)bs, sym);
                        CHECK(sym || memcmp(z0, z1, N * zrow) == 0, "%s zero points K=%lld N=%lld bits=%d bs=%lld",
                              isa_name(l), (long long)K, (long long)N, bits, (long long)bs);
                    }
                }
                free(b0); free(b1); free(z0); free(z1); free(s0); free(s1);
            }
        }
        free(w);
    }
}

/* A weight at every byte offset 1..3 (as a protobuf's raw data maps): the same bytes as
 * the aligned copy, on every path (the 64-wide, 16-wide and scalar-tail columns). */
static void test_misaligned(void) {
    enum { K = 96, N = 83 };
    float *w = malloc(K * N * sizeof(float));
    unsigned char *raw = malloc(K * N * sizeof(float) + 4);
    uint8_t b0[N * 3 * 16], b1[N * 3 * 16], z0[N * 2], z1[N * 2]; /* 3 blocks: 2 bytes of zero points per column */
    float s0[N * 3], s1[N * 3];
    for (int i = 0; i < K * N; i++) w[i] = frand(-3, 3);
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        for (int sym = 0; sym < 2; sym++) {
            CHECK(qt_quantize_kn(w, K, N, 32, 4, sym, b0, s0, z0) == QT_OK, "%s aligned", isa_name(l));
            for (int off = 1; off < 4; off++) {
                memcpy(raw + off, w, K * N * sizeof(float));
                memset(b1, 0xaa, sizeof b1);
                CHECK(qt_quantize_kn((const float *)(const void *)(raw + off), K, N, 32, 4, sym, b1, s1, z1) == QT_OK,
                      "%s offset %d status", isa_name(l), off);
                CHECK(memcmp(b0, b1, sizeof b0) == 0 && memcmp(s0, s1, sizeof s0) == 0 &&
                      (sym || memcmp(z0, z1, sizeof z0) == 0), "%s offset %d sym %d: bytes differ", isa_name(l), off, sym);
            }
        }
    }
    free(w);
    free(raw);
}

int main(void) {
    printf("qt_quantize_kn tests: supported ISA level %s\n", isa_name(qt_isa_supported()));
    test_known_bytes();
    test_policy_and_args();
    test_paths_agree();
    test_misaligned();
    if (g_fail) {
        fprintf(stderr, "%d check(s) failed\n", g_fail);
        return 1;
    }
    printf("all qt_quantize_kn tests passed\n");
    return 0;
}
