/* Internal helpers shared by the kernel sources (not part of the contract). */
#ifndef QT_INTERNAL_H
#define QT_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "qtool.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QT_X86 1
#include <immintrin.h>
#define QT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define QT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define QT_TARGET_VNNI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#else
#define QT_X86 0
#endif

/* The level to use now (reads QTOOL_ISA on first call). */
int qt__isa(void);

/* The block RTN rule (blockparams.c): scale and zero point of a block from its range
 * lo = min(min x, 0), hi = max(max x, 0) shrunk by f; bits-wide codes, signed or not. */
void qt__range_params(float lo, float hi, float f, int bits, int sgn, int sym, float *scale,
                      int32_t *zp);

static inline int qt__bits(qt_qtype t) { return t <= QT_S8 ? 8 : (t <= QT_S4 ? 4 : 2); }
static inline int qt__signed(qt_qtype t) { return (int)t & 1; }
static inline int32_t qt__qmin(qt_qtype t) {
    return qt__signed(t) ? -(1 << (qt__bits(t) - 1)) : 0;
}
static inline int32_t qt__qmax(qt_qtype t) {
    return qt__signed(t) ? (1 << (qt__bits(t) - 1)) - 1 : (1 << qt__bits(t)) - 1;
}
static inline int qt__valid_qtype(int t) { return t >= QT_U8 && t <= QT_S2; }

/* |x| <= FLT_MAX, false for NaN and +-Inf, without libm. */
static inline int qt__finite(float x) {
    union { float f; uint32_t u; } v = {x};
    return (v.u & 0x7f800000u) != 0x7f800000u;
}

#if QT_X86
/* AVX-512 loop prologue: the mask of the lanes [i, min(i + 16, n)) given left = n - i,
 * and the lanes of v (within mask k) that hold NaN or +-Inf. */
QT_TARGET_AVX512 static inline __mmask16 qt__lanes16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}
/* The lanes of v holding a finite value (|v| <= FLT_MAX, false for NaN and +-Inf): an
 * all-ones/zero lane mask for AVX2, a bit mask for AVX-512. */
QT_TARGET_AVX2 static inline __m256 qt__finite8(__m256 v) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return _mm256_cmp_ps(_mm256_and_ps(v, absmask), _mm256_set1_ps(3.40282347e38f), _CMP_LE_OQ);
}
QT_TARGET_AVX512 static inline __mmask16 qt__finite16(__m512 v) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(3.40282347e38f), _CMP_LE_OQ);
}
QT_TARGET_AVX512 static inline __mmask16 qt__nonfinite16(__m512 v, __mmask16 k) {
    /* !(|v| <= FLT_MAX): true for NaN and +-Inf */
    return _mm512_mask_cmp_ps_mask(k, _mm512_abs_ps(v), _mm512_set1_ps(3.40282347e38f),
                                   _CMP_NLE_UQ);
}
#endif

#endif
