/* C unit tests for libqtool: known values (ties, packing bytes, MatMulNBits layout),
 * the NaN/Inf policy, argument checks, and every vector path held to the scalar path
 * (byte-exact for integer outputs, within a tolerance for float GEMM). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "qtool.h"



static const int64_t SIZES[] = {1, 31, 32, 33, 1023, 4097};
#define NSIZES (int)(sizeof(SIZES) / sizeof(SIZES[0]))

static void test_known_values(void) {
    qt_set_isa(QT_ISA_SCALAR);
    /* ties round half to even */
    float x[8] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.49f, 1000.f};
    float s = 1.0f;
    int8_t q[8];
    CHECK(qt_quantize(x, 1, 1, 8, 0, &s, NULL, QT_S8, q) == QT_OK, "quantize status");
    int8_t want[8] = {0, 2, 2, 0, -2, -2, 3, 127};
    CHECK(memcmp(q, want, 8) == 0, "ties: got %d %d %d %d %d %d %d %d", q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]);
    /* u4 packing: first element in the low nibble, odd count padded with 0 */
    uint8_t u[3] = {1, 2, 3}, p[2];
    CHECK(qt_pack(u, 3, QT_U4, p) == QT_OK && p[0] == 0x21 && p[1] == 0x03, "u4 pack %02x %02x", p[0], p[1]);
    int8_t s2[5] = {-1, 0, 1, -2, 1}, s2b[5];
    uint8_t p2[2];
    CHECK(qt_pack(s2, 5, QT_S2, p2) == QT_OK && p2[0] == 0x93 && p2[1] == 0x01, "s2 pack %02x %02x", p2[0], p2[1]);
    CHECK(qt_unpack(p2, 5, QT_S2, s2b) == QT_OK && memcmp(s2, s2b, 5) == 0, "s2 unpack");
    /* MatMulNBits: K=20, block 16 -> 2 blocks, the second padded with its zero point */
    uint8_t w[20], b[16], zp[2] = {3, 9}, back[20];
    for (int i = 0; i < 20; i++) w[i] = (uint8_t)(i % 16);
    CHECK(qt_pack_matmulnbits(w, 1, 20, 16, 4, zp, b) == QT_OK, "pack nbits");
    CHECK(b[0] == 0x10 && b[7] == 0xfe && b[8] == 0x10 && b[9] == 0x32 && b[10] == 0x99 && b[15] == 0x99,
          "nbits layout %02x %02x %02x %02x %02x", b[0], b[7], b[8], b[9], b[10]);
    CHECK(qt_unpack_matmulnbits(b, 1, 20, 16, 4, back) == QT_OK && memcmp(w, back, 20) == 0, "nbits roundtrip");
    uint8_t zpp;
    CHECK(qt_pack_zero_points(zp, 1, 2, 4, &zpp) == QT_OK && zpp == 0x93, "zp pack %02x", zpp);
    /* histogram: x == hi in the last bin, outside values clamped */
    float h[5] = {0.0f, 1.0f, -5.0f, 7.0f, 0.49f};
    int64_t counts[4] = {0};
    CHECK(qt_histogram(h, 5, 0.0f, 1.0f, counts, 4) == QT_OK, "hist status");
    CHECK(counts[0] == 2 && counts[1] == 1 && counts[2] == 0 && counts[3] == 2, "hist %lld %lld %lld %lld",
          (long long)counts[0], (long long)counts[1], (long long)counts[2], (long long)counts[3]);
    /* int8 gemm with zero points, 1x1 */
    uint8_t a[3] = {10, 0, 255};
    int8_t bt[3] = {-128, 127, 3};
    int8_t zb = 2;
    int32_t c;
    CHECK(qt_gemm_u8s8(a, bt, 1, 1, 3, 5, &zb, &c) == QT_OK, "gemm status");
    CHECK(c == (10 - 5) * (-130) + (0 - 5) * 125 + 250 * 1, "gemm value %d", c);
}

static void test_policy_and_args(void) {
    for (int l = 0; l <= qt_isa_supported(); l++) {
        qt_set_isa(l);
        float x[100];
        for (int i = 0; i < 100; i++) x[i] = (float)i;
        float mn, mx, s = 1.0f;
        int64_t counts[8] = {0};
        uint8_t q[100];
        for (int bad = 0; bad < 3; bad++) {
            float v = bad == 0 ? NAN : (bad == 1 ? INFINITY : -INFINITY);
            for (int pos = 0; pos < 100; pos += 37) {
                float save = x[pos];
                x[pos] = v;
                CHECK(qt_minmax(x, 100, &mn, &mx) == QT_ERR_NONFINITE, "%s minmax nonfinite at %d", isa_name(l), pos);
                CHECK(qt_histogram(x, 100, 0.0f, 100.0f, counts, 8) == QT_ERR_NONFINITE, "%s hist nonfinite", isa_name(l));
                CHECK(qt_quantize(x, 1, 1, 100, 0, &s, NULL, QT_U8, q) == QT_ERR_NONFINITE, "%s quant nonfinite", isa_name(l));
                x[pos] = save;
            }
        }
        for (int i = 0; i < 8; i++) CHECK(counts[i] == 0, "%s counts changed by a failed call", isa_name(l));
        /* counts must be restored even when the NaN is past the first chunk */
        float *big = calloc(10000, sizeof(float));
        big[9000] = NAN;
        CHECK(qt_histogram(big, 10000, 0.0f, 1.0f, counts, 8) == QT_ERR_NONFINITE, "big nan");
        for (int i = 0; i < 8; i++) CHECK(counts[i] == 0, "%s counts not restored (bin %d = %lld)", isa_name(l), i, (long long)counts[i]);
        free(big);
        float zero = 0.0f;
        CHECK(qt_quantize(x, 1, 1, 100, 0, &zero, NULL, QT_U8, q) == QT_ERR_ARG, "zero scale");
        {
            /* symmetric block RTN: the signed extreme lands on code 0 (scale -m/8, so
             * negative when m > 0), and qt_quantize takes that negative scale */
            float b[32] = {4.0f, 0.25f, 0.75f, -1.25f}, bs[2];
            int32_t bz[2];
            uint8_t bq[32];
            b[16] = -8.0f;
            b[17] = 2.5f;
            CHECK(qt_block_params_rtn(b, 1, 32, 16, QT_U4, 1, bs, bz) == QT_OK, "sym params");
            CHECK(bs[0] == -0.5f && bs[1] == 1.0f && bz[0] == 8 && bz[1] == 8,
                  "%s sym params %g %g %d", isa_name(l), bs[0], bs[1], bz[0]);
            CHECK(qt_quantize(b, 1, 32, 1, 16, bs, bz, QT_U4, bq) == QT_OK, "negative scale");
            /* 4/-.5 = -8 -> 0; .25 -> -0.5 -> 8; .75 -> -1.5 -> 6; -1.25 -> 2.5 -> 10 (ties to even) */
            CHECK(bq[0] == 0 && bq[1] == 8 && bq[2] == 6 && bq[3] == 10 && bq[16] == 0 && bq[17] == 10,
                  "%s sym codes %d %d %d %d %d %d", isa_name(l), bq[0], bq[1], bq[2], bq[3], bq[16], bq[17]);
        }
        CHECK(qt_histogram(x, 100, 1.0f, 1.0f, counts, 8) == QT_ERR_ARG, "lo == hi");
        CHECK(qt_minmax(x, 0, &mn, &mx) == QT_ERR_ARG, "empty minmax");
        CHECK(qt_minmax(NULL, 3, &mn, &mx) == QT_ERR_ARG, "null");
        CHECK(qt_pack_matmulnbits(q, 1, 10, 24, 4, NULL, q) == QT_ERR_ARG, "block 24");
    }
    CHECK(qt_set_isa(7) == -QT_ERR_ARG, "bad level");
    CHECK(strcmp(qt_strerror(QT_ERR_NONFINITE), "input contains NaN or Inf") == 0, "strerror");
}

/* Every path against the scalar one. */
static void test_paths_agree(void) {
    const int top = qt_isa_supported();
    for (int si = 0; si < NSIZES; si++) {
        int64_t n = SIZES[si];
        float *x = malloc(n * sizeof(float)), *y0 = malloc(n * 4), *y1 = malloc(n * 4);
        uint8_t *q0 = malloc(n), *q1 = malloc(n), *p0 = malloc(n), *p1 = malloc(n);
        for (int64_t i = 0; i < n; i++) x[i] = frand(-3.0f, 3.0f);
        x[n / 2] = 2.5f; /* an exact tie */
        for (qt_qtype t = QT_U8; t <= QT_S2; t++) {
            float s = 0.5f;
            int32_t z = (t & 1) ? 0 : (t == QT_U8 ? 128 : (t == QT_U4 ? 8 : 2));
            qt_set_isa(QT_ISA_SCALAR);
            qt_quantize(x, 1, 1, n, 0, &s, &z, t, q0);
            qt_dequantize(q0, 1, 1, n, 0, &s, &z, t, y0);
            qt_pack(q0, n, t, p0);
            for (int l = 1; l <= top; l++) {
                qt_set_isa(l);
                memset(q1, 0xaa, n);
                qt_quantize(x, 1, 1, n, 0, &s, &z, t, q1);
                for (int64_t i = 0; i < n; i++)
                    if (q0[i] != q1[i]) { CHECK(0, "%s quantize n=%lld type=%d index %lld: %d vs %d", isa_name(l), (long long)n, t, (long long)i, q0[i], q1[i]); break; }
                qt_dequantize(q0, 1, 1, n, 0, &s, &z, t, y1);
                CHECK(memcmp(y0, y1, n * 4) == 0, "%s dequantize n=%lld type=%d", isa_name(l), (long long)n, t);
                qt_pack(q0, n, t, p1);
                int64_t nbytes = (n * (t <= QT_S8 ? 8 : t <= QT_S4 ? 4 : 2) + 7) / 8;
                CHECK(memcmp(p0, p1, nbytes) == 0, "%s pack n=%lld type=%d", isa_name(l), (long long)n, t);
                qt_unpack(p0, n, t, q1);
                CHECK(memcmp(q0, q1, n) == 0, "%s unpack n=%lld type=%d", isa_name(l), (long long)n, t);
            }
        }
        /* minmax + histogram */
        float mn0, mx0, mn1, mx1;
        int64_t c0[100] = {0}, c1[100] = {0};
        qt_set_isa(QT_ISA_SCALAR);
        qt_minmax(x, n, &mn0, &mx0);
        qt_histogram(x, n, -2.0f, 2.0f, c0, 100);
        for (int l = 1; l <= top; l++) {
            qt_set_isa(l);
            memset(c1, 0, sizeof(c1));
            qt_minmax(x, n, &mn1, &mx1);
            qt_histogram(x, n, -2.0f, 2.0f, c1, 100);
            CHECK(mn0 == mn1 && mx0 == mx1, "%s minmax n=%lld", isa_name(l), (long long)n);
            CHECK(memcmp(c0, c1, sizeof(c0)) == 0, "%s histogram n=%lld", isa_name(l), (long long)n);
        }
        /* block params, rows=3 */
        if (n >= 3) {
            int64_t rows = 3, cols = n / 3, nb = (cols + 31) / 32;
            float *s0 = malloc(rows * nb * 4), *s1 = malloc(rows * nb * 4);
            int32_t *z0 = malloc(rows * nb * 4), *z1 = malloc(rows * nb * 4);
            for (int sym = 0; sym < 2; sym++) {
                qt_set_isa(QT_ISA_SCALAR);
                qt_block_params_mse(x, rows, cols, 32, QT_U4, sym, 10, 0.5f, s0, z0);
                for (int l = 1; l <= top; l++) {
                    qt_set_isa(l);
                    qt_block_params_mse(x, rows, cols, 32, QT_U4, sym, 10, 0.5f, s1, z1);
                    CHECK(memcmp(s0, s1, rows * nb * 4) == 0 && memcmp(z0, z1, rows * nb * 4) == 0,
                          "%s block_params_mse sym=%d n=%lld", isa_name(l), sym, (long long)n);
                }
            }
            free(s0); free(s1); free(z0); free(z1);
        }
        free(x); free(y0); free(y1); free(q0); free(q1); free(p0); free(p1);
    }
}

static void test_gemms(void) {
    const int top = qt_isa_supported();
    const int64_t shapes[][3] = {{1, 1, 1}, {1, 33, 31}, {5, 7, 64}, {9, 13, 129}, {32, 17, 1023}};
    for (int si = 0; si < 5; si++) {
        int64_t M = shapes[si][0], N = shapes[si][1], K = shapes[si][2];
        uint8_t *A = malloc(M * K);
        int8_t *B = malloc(N * K), *zb = malloc(N);
        int32_t *C0 = malloc(M * N * 4), *C1 = malloc(M * N * 4);
        for (int64_t i = 0; i < M * K; i++) A[i] = (uint8_t)rnd();
        for (int64_t i = 0; i < N * K; i++) B[i] = (int8_t)rnd();
        for (int64_t i = 0; i < N; i++) zb[i] = (int8_t)rnd();
        A[0] = 255; B[0] = -128; /* extremes */
        qt_set_isa(QT_ISA_SCALAR);
        qt_gemm_u8s8(A, B, M, N, K, 131, zb, C0);
        for (int l = 1; l <= top; l++) {
            qt_set_isa(l);
            qt_gemm_u8s8(A, B, M, N, K, 131, zb, C1);
            CHECK(memcmp(C0, C1, M * N * 4) == 0, "%s gemm_u8s8 %lldx%lldx%lld", isa_name(l), (long long)M, (long long)N, (long long)K);
        }
        /* q4 gemm, block 16 / 32 */
        for (int64_t bs = 16; bs <= 32; bs *= 2) {
            int64_t nb = (K + bs - 1) / bs;
            float *Af = malloc(M * K * 4), *sc = malloc(N * nb * 4), *Y0 = malloc(M * N * 4), *Y1 = malloc(M * N * 4);
            uint8_t *bq = malloc(N * nb * bs / 2), *zp = malloc(N * ((nb + 1) / 2));
            for (int64_t i = 0; i < M * K; i++) Af[i] = frand(-1, 1);
            for (int64_t i = 0; i < N * nb; i++) sc[i] = frand(0.01f, 0.1f);
            for (int64_t i = 0; i < N * nb * bs / 2; i++) bq[i] = (uint8_t)rnd();
            for (int64_t i = 0; i < N * ((nb + 1) / 2); i++) zp[i] = (uint8_t)rnd();
            qt_set_isa(QT_ISA_SCALAR);
            qt_gemm_q4(Af, bq, sc, zp, M, N, K, bs, Y0);
            for (int l = 1; l <= top; l++) {
                qt_set_isa(l);
                qt_gemm_q4(Af, bq, sc, zp, M, N, K, bs, Y1);
                for (int64_t i = 0; i < M * N; i++)
                    if (fabsf(Y0[i] - Y1[i]) > 1e-4f * (1.0f + fabsf(Y0[i])) * sqrtf((float)K)) {
                        CHECK(0, "%s gemm_q4 %lldx%lldx%lld bs=%lld at %lld: %g vs %g", isa_name(l), (long long)M, (long long)N, (long long)K, (long long)bs, (long long)i, Y0[i], Y1[i]);
                        break;
                    }
            }
            free(Af); free(sc); free(Y0); free(Y1); free(bq); free(zp);
        }
        free(A); free(B); free(zb); free(C0); free(C1);
    }
}

int main(void) {
    check_seed(0x9e3779b97f4a7c15ULL);
    printf("qtool native tests: supported ISA level %s\n", isa_name(qt_isa_supported()));
    test_known_values();
    test_policy_and_args();
    test_paths_agree();
    test_gemms();
    if (g_fail) {
        fprintf(stderr, "%d check(s) failed\n", g_fail);
        return 1;
    }
    printf("all native tests passed\n");
    return 0;
}
