/* 4-bit block GEMM on the com.microsoft MatMulNBits layout:
 *   Y[m, n] = sum_k A[m, k] * (q[n, k] - zp[n, k/bs]) * scale[n, k/bs]
 * The vector paths decode 16 codes at a time into float lanes, apply zero point and
 * scale in registers, and FMA them against up to MT rows of A at once, so each decoded
 * weight chunk is reused across the row tile. */
#include "qt_internal.h"

static inline int32_t zp_at(const uint8_t *zp, int64_t row_bytes, int64_t n, int64_t j) {
    if (zp == NULL) return 8;
    uint8_t byte = zp[n * row_bytes + j / 2];
    return (j & 1) ? byte >> 4 : byte & 0x0f;
}

static void q4_scalar(const float *A, const uint8_t *b, const float *scales, const uint8_t *zp,
                      int64_t M, int64_t N, int64_t K, int64_t bs, float *Y) {
    const int64_t nb = (K + bs - 1) / bs, blob = bs / 2, zrow = (nb + 1) / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < nb; j++) {
                const uint8_t *p = b + (n * nb + j) * blob;
                float s = scales[n * nb + j];
                int32_t z = zp_at(zp, zrow, n, j);
                for (int64_t e = 0; e < bs && j * bs + e < K; e++) {
                    int32_t c = (e & 1) ? p[e / 2] >> 4 : p[e / 2] & 0x0f;
                    acc += A[m * K + j * bs + e] * ((float)(c - z) * s);
                }
            }
            Y[m * N + n] = acc;
        }
}

#if QT_X86
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* 8 packed bytes -> 16 codes in K order, as 16 bytes. */
#define DECODE16(p)                                                                     \
    ({                                                                                  \
        __m128i w_ = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(p)));          \
        _mm_or_si128(_mm_and_si128(w_, _mm_set1_epi16(0x000f)),                         \
                     _mm_and_si128(_mm_slli_epi16(w_, 4), _mm_set1_epi16(0x0f00)));     \
    })

QT_TARGET_AVX512 static ALWAYS_INLINE void q4_rows_avx512(const float *A, const uint8_t *b,
                                                          const float *scales, const uint8_t *zp,
                                                          int64_t N, int64_t n0, int64_t n1, int64_t K,
                                                          int64_t bs, float *Y, const int MT) {
    const int64_t nb = (K + bs - 1) / bs, blob = bs / 2, zrow = (nb + 1) / 2;
    for (int64_t n = n0; n < n1; n++) {
        __m512 acc[8];
        for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t j = 0; j < nb; j++) {
            const uint8_t *p = b + (n * nb + j) * blob;
            const __m512 vs = _mm512_set1_ps(scales[n * nb + j]);
            const __m512i vz = _mm512_set1_epi32(zp_at(zp, zrow, n, j));
            for (int64_t e = 0; e < bs; e += 16) {
                int64_t k = j * bs + e;
                if (k >= K) break;
                __m512 w = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(DECODE16(p + e / 2)), vz)), vs);
                if (k + 16 <= K) {
                    for (int r = 0; r < MT; r++)
                        acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(A + r * K + k), w, acc[r]);
                } else {
                    __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
                    for (int r = 0; r < MT; r++)
                        acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, A + r * K + k), w, acc[r]);
                }
            }
        }
        for (int r = 0; r < MT; r++) Y[r * N + n] = _mm512_reduce_add_ps(acc[r]);
    }
}

QT_TARGET_AVX2 static ALWAYS_INLINE void q4_rows_avx2(const float *A, const uint8_t *b,
                                                      const float *scales, const uint8_t *zp,
                                                      int64_t N, int64_t n0, int64_t n1, int64_t K,
                                                      int64_t bs, float *Y, const int MT) {
    const int64_t nb = (K + bs - 1) / bs, blob = bs / 2, zrow = (nb + 1) / 2;
    for (int64_t n = n0; n < n1; n++) {
        __m256 acc[4];
        float tail[4] = {0, 0, 0, 0};
        for (int r = 0; r < MT; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t j = 0; j < nb; j++) {
            const uint8_t *p = b + (n * nb + j) * blob;
            const float s = scales[n * nb + j];
            const int32_t z = zp_at(zp, zrow, n, j);
            const __m256 vs = _mm256_set1_ps(s);
            const __m256i vz = _mm256_set1_epi32(z);
            for (int64_t e = 0; e < bs; e += 16) {
                int64_t k = j * bs + e;
                if (k >= K) break;
                if (k + 16 > K) { /* ragged end of K */
                    for (int64_t t = 0; k + t < K; t++) {
                        int32_t c = (t & 1) ? p[(e + t) / 2] >> 4 : p[(e + t) / 2] & 0x0f;
                        float w = (float)(c - z) * s;
                        for (int r = 0; r < MT; r++) tail[r] += A[r * K + k + t] * w;
                    }
                    break;
                }
                __m128i c = DECODE16(p + e / 2);
                __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(c), vz)), vs);
                __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(c, c)), vz)), vs);
                for (int r = 0; r < MT; r++) {
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(A + r * K + k), w0, acc[r]);
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(A + r * K + k + 8), w1, acc[r]);
                }
            }
        }
        for (int r = 0; r < MT; r++) {
            __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
            s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
            Y[r * N + n] = _mm_cvtss_f32(s4) + tail[r];
        }
    }
}

#define Q4_CASE(fn, mt) case mt: fn(A + m * K, b, scales, zp, N, n0, n1, K, bs, Y + m * N, mt); break;
/* Columns in chunks of Q4_NCHUNK (their packed weights stay in L2) outside the row tiles,
 * so B streams from memory once however many row tiles M has. */
#define Q4_NCHUNK 64

QT_TARGET_AVX512 static void q4_avx512(const float *A, const uint8_t *b, const float *scales,
                                       const uint8_t *zp, int64_t M, int64_t N, int64_t K,
                                       int64_t bs, float *Y) {
    for (int64_t n0 = 0; n0 < N; n0 += Q4_NCHUNK)
    for (int64_t m = 0, n1 = N - n0 < Q4_NCHUNK ? N : n0 + Q4_NCHUNK; m < M; m += 8) {
        switch (M - m < 8 ? (int)(M - m) : 8) {
            Q4_CASE(q4_rows_avx512, 1) Q4_CASE(q4_rows_avx512, 2) Q4_CASE(q4_rows_avx512, 3)
            Q4_CASE(q4_rows_avx512, 4) Q4_CASE(q4_rows_avx512, 5) Q4_CASE(q4_rows_avx512, 6)
            Q4_CASE(q4_rows_avx512, 7) Q4_CASE(q4_rows_avx512, 8)
        }
    }
}

QT_TARGET_AVX2 static void q4_avx2(const float *A, const uint8_t *b, const float *scales,
                                   const uint8_t *zp, int64_t M, int64_t N, int64_t K, int64_t bs,
                                   float *Y) {
    for (int64_t n0 = 0; n0 < N; n0 += Q4_NCHUNK)
    for (int64_t m = 0, n1 = N - n0 < Q4_NCHUNK ? N : n0 + Q4_NCHUNK; m < M; m += 4) {
        switch (M - m < 4 ? (int)(M - m) : 4) {
            Q4_CASE(q4_rows_avx2, 1) Q4_CASE(q4_rows_avx2, 2) Q4_CASE(q4_rows_avx2, 3)
            Q4_CASE(q4_rows_avx2, 4)
        }
    }
}
#endif

int qt_gemm_q4(const float *A, const uint8_t *b, const float *scales, const uint8_t *zero_points,
               int64_t M, int64_t N, int64_t K, int64_t block_size, float *Y) {
    if (A == NULL || b == NULL || scales == NULL || Y == NULL) return QT_ERR_ARG;
    if (M < 0 || N < 0 || K < 0 || block_size < 16 || (block_size & (block_size - 1))) return QT_ERR_ARG;
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_AVX512) {
        q4_avx512(A, b, scales, zero_points, M, N, K, block_size, Y);
        return QT_OK;
    }
    if (isa >= QT_ISA_AVX2) {
        q4_avx2(A, b, scales, zero_points, M, N, K, block_size, Y);
        return QT_OK;
    }
#endif
    q4_scalar(A, b, scales, zero_points, M, N, K, block_size, Y);
    return QT_OK;
}
