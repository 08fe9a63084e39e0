/* int8 GEMM: C = (A - a_zp) x (B - b_zp), A u8 [M,K], B given transposed as s8 [N,K],
 * C s32 [M,N] exact; plus requantization of s32 to u8/s8.
 *
 * Vector paths compute raw dot products sum(A*B) and correct for the zero points:
 *   C = dot - zb[n]*rowsum(A[m]) - za*colsum(B[n]) + K*za*zb[n]   (mod 2^32)
 * VNNI: vpdpbusd (u8 x s8 -> s32, no intermediate saturation).
 * AVX2/AVX-512 without VNNI: widen to s16 and vpmaddwd, which is exact
 * (|u8*s8| <= 32640, a pair sums to <= 65280) -- vpmaddubsw would saturate. */
#include <math.h>

#include "qt_internal.h"

#define MCHUNK 256 /* rows of A whose sums live on the stack */

static void gemm_scalar(const uint8_t *A, const int8_t *Bt, int64_t M, int64_t N, int64_t K,
                        int32_t za, const int8_t *zb, int32_t *C) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            int64_t zbn = zb ? zb[n] : 0, acc = 0;
            const uint8_t *a = A + m * K;
            const int8_t *b = Bt + n * K;
            for (int64_t k = 0; k < K; k++) acc += ((int64_t)a[k] - za) * ((int64_t)b[k] - zbn);
            C[m * N + n] = (int32_t)(uint32_t)(uint64_t)acc;
        }
}

#if QT_X86
/* sum of bytes; `flip` xors each byte with 0x80 first (s8 -> biased u8). */
QT_TARGET_AVX2 static int64_t sum_bytes(const uint8_t *p, int64_t n, int flip) {
    const __m256i zero = _mm256_setzero_si256(), f = _mm256_set1_epi8(flip ? (char)0x80 : 0);
    __m256i acc = zero;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + i)), f), zero));
    int64_t t[4];
    _mm256_storeu_si256((__m256i *)t, acc);
    int64_t s = t[0] + t[1] + t[2] + t[3];
    for (; i < n; i++) s += (uint8_t)(p[i] ^ (flip ? 0x80 : 0));
    return flip ? s - 128 * n : s;
}

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* A tile of raw dot products out[i*4+j] = dot(A row i, B row j). With CS, also the byte sums
 * of the B rows (cs[j] = sum_k B[j][k]) from the same loads: vpdpbusd of a vector of ones
 * with B. Fusing them saves a separate pass that pulled B from memory one row at a time. */
QT_TARGET_VNNI static ALWAYS_INLINE void tile_vnni(const uint8_t *A, const int8_t *B, int64_t K,
                                                   int32_t *out, int32_t *cs, const int MR, const int NR,
                                                   const int CS) {
    __m512i acc[4][4], sum[4], a[4], b[4];
    const __m512i ones = _mm512_set1_epi8(1);
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();
    for (int j = 0; j < NR; j++) sum[j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        for (int i = 0; i < MR; i++) a[i] = _mm512_loadu_si512((const void *)(A + i * K + k));
        for (int j = 0; j < NR; j++) b[j] = _mm512_loadu_si512((const void *)(B + j * K + k));
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], a[i], b[j]);
        if (CS)
            for (int j = 0; j < NR; j++) sum[j] = _mm512_dpbusd_epi32(sum[j], ones, b[j]);
    }
    if (k < K) {
        __mmask64 m = (~0ULL) >> (64 - (K - k));
        for (int i = 0; i < MR; i++) a[i] = _mm512_maskz_loadu_epi8(m, A + i * K + k);
        for (int j = 0; j < NR; j++) b[j] = _mm512_maskz_loadu_epi8(m, B + j * K + k);
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], a[i], b[j]);
        if (CS)
            for (int j = 0; j < NR; j++) sum[j] = _mm512_dpbusd_epi32(sum[j], ones, b[j]);
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) out[i * 4 + j] = _mm512_reduce_add_epi32(acc[i][j]);
    if (CS)
        for (int j = 0; j < NR; j++) cs[j] = _mm512_reduce_add_epi32(sum[j]);
}

#define VNNI_TILE(mr, nr)                                                                            \
    QT_TARGET_VNNI static void tile_vnni_##mr##x##nr(const uint8_t *A, const int8_t *B, int64_t K,   \
                                                     int32_t *o, int32_t *cs) {                     \
        if (cs) tile_vnni(A, B, K, o, cs, mr, nr, 1);                                                \
        else tile_vnni(A, B, K, o, NULL, mr, nr, 0);                                                 \
    }
VNNI_TILE(4, 4)
VNNI_TILE(1, 4)
VNNI_TILE(1, 1)

QT_TARGET_AVX2 static ALWAYS_INLINE void tile_avx2(const uint8_t *A, const int8_t *B, int64_t K,
                                                   int32_t *out, const int MR, const int NR) {
    __m256i acc[2][4], a[2], b[4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        for (int i = 0; i < MR; i++) a[i] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(A + i * K + k)));
        for (int j = 0; j < NR; j++) b[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(B + j * K + k)));
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(a[i], b[j]));
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[i][j]), _mm256_extracti128_si256(acc[i][j], 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
            uint32_t v = (uint32_t)_mm_cvtsi128_si32(s);
            for (int64_t kk = k; kk < K; kk++) v += (uint32_t)((int32_t)A[i * K + kk] * (int32_t)B[j * K + kk]);
            out[i * 4 + j] = (int32_t)v;
        }
}

/* AVX2 tiles: B row sums (when asked) by a separate pass over the rows. */
#define AVX2_TILE(mr, nr)                                                                            \
    QT_TARGET_AVX2 static void tile_avx2_##mr##x##nr(const uint8_t *A, const int8_t *B, int64_t K,   \
                                                     int32_t *o, int32_t *cs) {                     \
        if (cs)                                                                                      \
            for (int j = 0; j < nr; j++) cs[j] = (int32_t)sum_bytes((const uint8_t *)(B + j * K), K, 1); \
        tile_avx2(A, B, K, o, mr, nr);                                                               \
    }
AVX2_TILE(2, 4)
AVX2_TILE(1, 4)
AVX2_TILE(1, 1)

typedef void (*tile_fn)(const uint8_t *, const int8_t *, int64_t, int32_t *, int32_t *);

/* Raw tiles (out[i*4+j] = dot(A row i, B row j)) with zero-point corrections. The B row
 * sums the a_zero_point correction needs come from the first tile call of each column block. */
static void gemm_tiled(const uint8_t *A, const int8_t *Bt, int64_t M, int64_t N, int64_t K,
                       int32_t za, const int8_t *zb, int32_t *C, int MR, tile_fn full,
                       tile_fn row4, tile_fn one) {
    const int NR = 4;
    int32_t rs[MCHUNK], out[16];
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        int64_t mc = M - m0 < MCHUNK ? M - m0 : MCHUNK;
        for (int64_t i = 0; i < mc; i++) rs[i] = zb ? (int32_t)sum_bytes(A + (m0 + i) * K, K, 0) : 0;
        for (int64_t n0 = 0; n0 < N; n0 += NR) {
            int nr = N - n0 < NR ? (int)(N - n0) : NR;
            int32_t cs[4] = {0, 0, 0, 0};
            uint32_t zbn[4];
            for (int j = 0; j < nr; j++) zbn[j] = zb ? (uint32_t)(int32_t)zb[n0 + j] : 0;
            for (int64_t mi = 0; mi < mc; mi += MR) {
                int mr = mc - mi < MR ? (int)(mc - mi) : MR;
                const uint8_t *a = A + (m0 + mi) * K;
                const int8_t *b = Bt + n0 * K;
                int32_t *want = (za && mi == 0) ? cs : NULL; /* column sums once per block */
                if (mr == MR && nr == NR) full(a, b, K, out, want);
                else
                    for (int i = 0; i < mr; i++) {
                        if (nr == NR) row4(a + i * K, b, K, out + i * 4, i == 0 ? want : NULL);
                        else
                            for (int j = 0; j < nr; j++)
                                one(a + i * K, b + j * K, K, out + i * 4 + j, (i == 0 && want) ? cs + j : NULL);
                    }
                for (int i = 0; i < mr; i++)
                    for (int j = 0; j < nr; j++) {
                        uint32_t v = (uint32_t)out[i * 4 + j] - zbn[j] * (uint32_t)rs[mi + i] -
                                     (uint32_t)za * (uint32_t)cs[j] + (uint32_t)K * (uint32_t)za * zbn[j];
                        C[(m0 + mi + i) * N + n0 + j] = (int32_t)v;
                    }
            }
        }
    }
}
#endif

int qt_gemm_u8s8(const uint8_t *A, const int8_t *Bt, int64_t M, int64_t N, int64_t K,
                 int32_t a_zero_point, const int8_t *b_zero_point, int32_t *C) {
    if (A == NULL || Bt == NULL || C == NULL || M < 0 || N < 0 || K < 0) return QT_ERR_ARG;
    if (a_zero_point < 0 || a_zero_point > 255) return QT_ERR_ARG;
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_VNNI) {
        gemm_tiled(A, Bt, M, N, K, a_zero_point, b_zero_point, C, 4, tile_vnni_4x4, tile_vnni_1x4, tile_vnni_1x1);
        return QT_OK;
    }
    if (isa >= QT_ISA_AVX2) {
        gemm_tiled(A, Bt, M, N, K, a_zero_point, b_zero_point, C, 2, tile_avx2_2x4, tile_avx2_1x4, tile_avx2_1x1);
        return QT_OK;
    }
#endif
    gemm_scalar(A, Bt, M, N, K, a_zero_point, b_zero_point, C);
    return QT_OK;
}

/* ---- requantize ------------------------------------------------------------- */

static void requant_row_scalar(const int32_t *acc, int64_t N, const float *mult, float z,
                               float lo, float hi, int sgn, void *out) {
    for (int64_t n = 0; n < N; n++) {
        float r = nearbyintf((float)acc[n] * mult[n]) + z;
        r = r < lo ? lo : (r > hi ? hi : r);
        if (sgn) ((int8_t *)out)[n] = (int8_t)r;
        else ((uint8_t *)out)[n] = (uint8_t)r;
    }
}

#if QT_X86
QT_TARGET_AVX512 static void requant_row_avx512(const int32_t *acc, int64_t N, const float *mult,
                                                float z, float lo, float hi, int sgn, void *out) {
    (void)sgn;
    const __m512 vz = _mm512_set1_ps(z), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    for (int64_t n = 0; n < N; n += 16) {
        int64_t left = N - n;
        __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, acc + n)),
                                 _mm512_maskz_loadu_ps(m, mult + n));
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), vlo), vhi);
        _mm512_mask_cvtepi32_storeu_epi8((uint8_t *)out + n, m, _mm512_cvtps_epi32(v));
    }
}
#endif

int qt_requantize(const int32_t *acc, int64_t M, int64_t N, const float *multiplier,
                  int32_t zero_point, qt_qtype qtype, void *out) {
    if (acc == NULL || multiplier == NULL || out == NULL || M < 0 || N < 0) return QT_ERR_ARG;
    if (qtype != QT_U8 && qtype != QT_S8) return QT_ERR_ARG;
    if (zero_point < qt__qmin(qtype) || zero_point > qt__qmax(qtype)) return QT_ERR_ARG;
    for (int64_t n = 0; n < N; n++)
        if (!qt__finite(multiplier[n])) return QT_ERR_ARG;
    void (*row)(const int32_t *, int64_t, const float *, float, float, float, int, void *) = requant_row_scalar;
#if QT_X86
    if (qt__isa() >= QT_ISA_AVX512) row = requant_row_avx512;
#endif
    for (int64_t m = 0; m < M; m++)
        row(acc + m * N, N, multiplier, (float)zero_point, (float)qt__qmin(qtype),
            (float)qt__qmax(qtype), qt__signed(qtype), (uint8_t *)out + m * N);
    return QT_OK;
}
