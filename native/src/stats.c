/* Statistics for calibration: min/max and histogram update. */
#include <math.h>
#include <string.h>

#include "qt_internal.h"

/* ---- min / max ------------------------------------------------------------ */

static int minmax_scalar(const float *x, int64_t n, float *mn, float *mx) {
    float lo = x[0], hi = x[0];
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        if (!qt__finite(v)) return QT_ERR_NONFINITE;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    *mn = lo;
    *mx = hi;
    return QT_OK;
}

#if QT_X86
QT_TARGET_AVX2 static int minmax_avx2(const float *x, int64_t n, float *mn, float *mx) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 fmax = _mm256_set1_ps(3.40282347e38f);
    __m256 lo0 = _mm256_set1_ps(x[0]), lo1 = lo0, hi0 = lo0, hi1 = lo0;
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        /* |v| <= FLT_MAX is false for NaN and Inf */
        ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_and_ps(a, absmask), fmax, _CMP_LE_OQ));
        ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_and_ps(b, absmask), fmax, _CMP_LE_OQ));
        lo0 = _mm256_min_ps(lo0, a);
        lo1 = _mm256_min_ps(lo1, b);
        hi0 = _mm256_max_ps(hi0, a);
        hi1 = _mm256_max_ps(hi1, b);
    }
    if (_mm256_movemask_ps(ok) != 0xff) return QT_ERR_NONFINITE;
    float l[8], h[8];
    _mm256_storeu_ps(l, _mm256_min_ps(lo0, lo1));
    _mm256_storeu_ps(h, _mm256_max_ps(hi0, hi1));
    float lo = l[0], hi = h[0];
    for (int j = 1; j < 8; j++) {
        lo = l[j] < lo ? l[j] : lo;
        hi = h[j] > hi ? h[j] : hi;
    }
    for (; i < n; i++) {
        float v = x[i];
        if (!qt__finite(v)) return QT_ERR_NONFINITE;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    *mn = lo;
    *mx = hi;
    return QT_OK;
}

QT_TARGET_AVX512 static int minmax_avx512(const float *x, int64_t n, float *mn, float *mx) {
    const __m512 fmax = _mm512_set1_ps(3.40282347e38f);
    __m512 lo0 = _mm512_set1_ps(x[0]), lo1 = lo0, hi0 = lo0, hi1 = lo0;
    __mmask16 ok = 0xffff;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
        ok &= _mm512_cmp_ps_mask(_mm512_abs_ps(a), fmax, _CMP_LE_OQ);
        ok &= _mm512_cmp_ps_mask(_mm512_abs_ps(b), fmax, _CMP_LE_OQ);
        lo0 = _mm512_min_ps(lo0, a);
        lo1 = _mm512_min_ps(lo1, b);
        hi0 = _mm512_max_ps(hi0, a);
        hi1 = _mm512_max_ps(hi1, b);
    }
    for (; i < n; i += 16) {
        int64_t left = n - i;
        __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m, x + i);
        ok &= (__mmask16)(_mm512_cmp_ps_mask(_mm512_abs_ps(a), fmax, _CMP_LE_OQ) | ~m);
        lo0 = _mm512_mask_min_ps(lo0, m, lo0, a);
        hi0 = _mm512_mask_max_ps(hi0, m, hi0, a);
    }
    if (ok != 0xffff) return QT_ERR_NONFINITE;
    *mn = _mm512_reduce_min_ps(_mm512_min_ps(lo0, lo1));
    *mx = _mm512_reduce_max_ps(_mm512_max_ps(hi0, hi1));
    return QT_OK;
}
#endif

int qt_minmax(const float *x, int64_t n, float *out_min, float *out_max) {
    if (x == NULL || out_min == NULL || out_max == NULL || n < 1) return QT_ERR_ARG;
    float lo, hi;
    int st;
    int isa = qt__isa();
#if QT_X86
    if (isa >= QT_ISA_AVX512) st = minmax_avx512(x, n, &lo, &hi);
    else if (isa >= QT_ISA_AVX2) st = minmax_avx2(x, n, &lo, &hi);
    else
#endif
        st = minmax_scalar(x, n, &lo, &hi);
    (void)isa;
    if (st != QT_OK) return st;
    /* -0.0 and 0.0 compare equal, so which one a path keeps depends on order; report
     * +0.0 so every path (and numpy) agree bit for bit. */
    *out_min = lo + 0.0f;
    *out_max = hi + 0.0f;
    return QT_OK;
}

/* ---- histogram -------------------------------------------------------------
 * Each path computes bin indices for a chunk into a small stack buffer (checking for
 * non-finite values), then the driver increments counts. On a non-finite value the
 * driver recomputes the chunks already counted and decrements them, so counts is
 * unchanged on error. */

#define HIST_CHUNK 2048

typedef int (*hist_idx_fn)(const float *x, int64_t n, float lo, float w, float fb,
                           float bmax, int32_t *idx);

static int hist_idx_scalar(const float *x, int64_t n, float lo, float w, float fb,
                           float bmax, int32_t *idx) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        if (!qt__finite(v)) return QT_ERR_NONFINITE;
        float t = ((v - lo) / w) * fb;
        float f = floorf(t);
        f = f < 0.0f ? 0.0f : f;
        f = f > bmax ? bmax : f;
        idx[i] = (int32_t)f;
    }
    return QT_OK;
}

#if QT_X86
QT_TARGET_AVX2 static int hist_idx_avx2(const float *x, int64_t n, float lo, float w,
                                        float fb, float bmax, int32_t *idx) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 fmax = _mm256_set1_ps(3.40282347e38f);
    const __m256 vlo = _mm256_set1_ps(lo), vw = _mm256_set1_ps(w), vfb = _mm256_set1_ps(fb);
    const __m256 vmax = _mm256_set1_ps(bmax), zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 ok = _mm256_cmp_ps(_mm256_and_ps(v, absmask), fmax, _CMP_LE_OQ);
        if (_mm256_movemask_ps(ok) != 0xff) return QT_ERR_NONFINITE;
        __m256 t = _mm256_mul_ps(_mm256_div_ps(_mm256_sub_ps(v, vlo), vw), vfb);
        t = _mm256_floor_ps(t);
        t = _mm256_min_ps(_mm256_max_ps(t, zero), vmax);
        _mm256_storeu_si256((__m256i *)(idx + i), _mm256_cvttps_epi32(t));
    }
    return hist_idx_scalar(x + i, n - i, lo, w, fb, bmax, idx + i);
}

QT_TARGET_AVX512 static int hist_idx_avx512(const float *x, int64_t n, float lo, float w,
                                            float fb, float bmax, int32_t *idx) {
    const __m512 fmax = _mm512_set1_ps(3.40282347e38f);
    const __m512 vlo = _mm512_set1_ps(lo), vw = _mm512_set1_ps(w), vfb = _mm512_set1_ps(fb);
    const __m512 vmax = _mm512_set1_ps(bmax), zero = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        int64_t left = n - i;
        __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        if ((__mmask16)(_mm512_cmp_ps_mask(_mm512_abs_ps(v), fmax, _CMP_LE_OQ) | ~m) != 0xffff)
            return QT_ERR_NONFINITE;
        __m512 t = _mm512_mul_ps(_mm512_div_ps(_mm512_sub_ps(v, vlo), vw), vfb);
        t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        t = _mm512_min_ps(_mm512_max_ps(t, zero), vmax);
        _mm512_mask_storeu_epi32(idx + i, m, _mm512_cvttps_epi32(t));
    }
    return QT_OK;
}
#endif

/* Undo the counts of x[0..n) (all finite, counted by an earlier pass). */
static void hist_undo(hist_idx_fn fn, const float *x, int64_t n, float lo, float w, float fb,
                      float bmax, int64_t *counts, int32_t *idx) {
    for (int64_t u = 0; u < n; u += HIST_CHUNK) {
        int64_t len = n - u < HIST_CHUNK ? n - u : HIST_CHUNK;
        fn(x + u, len, lo, w, fb, bmax, idx);
        for (int64_t i = 0; i < len; i++) counts[idx[i]]--;
    }
}

/* Up to this many bins, counting goes through 4 interleaved uint32 sub-histograms on the
 * stack: consecutive values in the same bin then update different addresses instead of
 * serialising on one load-add-store chain. A span flushes into counts before a uint32
 * could overflow. */
#define HIST_SUB_BINS 2048
#define HIST_SPAN ((int64_t)1 << 30)

int qt_histogram(const float *x, int64_t n, float lo, float hi, int64_t *counts,
                 int64_t bins) {
    if (x == NULL || counts == NULL || n < 0 || bins < 1 || bins > (1 << 24)) return QT_ERR_ARG;
    float w = hi - lo;
    if (!qt__finite(lo) || !qt__finite(hi) || !qt__finite(w) || !(hi > lo)) return QT_ERR_ARG;
    float fb = (float)bins, bmax = (float)(bins - 1);
    hist_idx_fn fn = hist_idx_scalar;
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_AVX512) fn = hist_idx_avx512;
    else if (isa >= QT_ISA_AVX2) fn = hist_idx_avx2;
#endif
    int32_t idx[HIST_CHUNK];
    if (bins <= HIST_SUB_BINS && n >= 8 * bins && fn != hist_idx_scalar) {
        uint32_t sub[4][HIST_SUB_BINS]; /* 32 KiB of stack */
        for (int64_t s0 = 0; s0 < n; s0 += HIST_SPAN) {
            int64_t span = n - s0 < HIST_SPAN ? n - s0 : HIST_SPAN;
            for (int c = 0; c < 4; c++) memset(sub[c], 0, (size_t)bins * sizeof(uint32_t));
            for (int64_t s = s0; s < s0 + span; s += HIST_CHUNK) {
                int64_t len = s0 + span - s < HIST_CHUNK ? s0 + span - s : HIST_CHUNK;
                if (fn(x + s, len, lo, w, fb, bmax, idx) != QT_OK) {
                    hist_undo(fn, x, s0, lo, w, fb, bmax, counts, idx);
                    return QT_ERR_NONFINITE;
                }
                int64_t i = 0;
                for (; i + 4 <= len; i += 4) {
                    sub[0][idx[i]]++;
                    sub[1][idx[i + 1]]++;
                    sub[2][idx[i + 2]]++;
                    sub[3][idx[i + 3]]++;
                }
                for (; i < len; i++) sub[0][idx[i]]++;
            }
            for (int64_t b = 0; b < bins; b++)
                counts[b] += (int64_t)sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b];
        }
        return QT_OK;
    }
    for (int64_t s = 0; s < n; s += HIST_CHUNK) {
        int64_t len = n - s < HIST_CHUNK ? n - s : HIST_CHUNK;
        if (fn(x + s, len, lo, w, fb, bmax, idx) != QT_OK) {
            hist_undo(fn, x, s, lo, w, fb, bmax, counts, idx);
            return QT_ERR_NONFINITE;
        }
        for (int64_t i = 0; i < len; i++) counts[idx[i]]++;
    }
    return QT_OK;
}
