/* The residual of block RTN on a column-scaled weight (qt_awq_residual in qtool.h):
 * AWQ's search makes one per candidate scale, so it is one pass here instead of six
 * numpy/kernel passes (scale, block range, quantize, dequantize, unscale, subtract). */
#include <math.h>

#include "qt_internal.h"

/* One block of n columns: out = w - ((q - z) * scale) / s, x = w * s. */
static int residual_scalar(const float *w, const float *s, int64_t n, int bits, int sym,
                           float *out) {
    float lo = 0.0f, hi = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float x = w[i] * s[i];
        if (!qt__finite(x)) return QT_ERR_NONFINITE;
        out[i] = x;
        lo = x < lo ? x : lo;
        hi = x > hi ? x : hi;
    }
    float sc;
    int32_t zp;
    qt__range_params(lo, hi, 1.0f, bits, 0, sym, &sc, &zp);
    const float qmax = (float)((1 << bits) - 1), z = (float)zp;
    for (int64_t i = 0; i < n; i++) {
        float r = nearbyintf(out[i] / sc) + z;
        r = r < 0.0f ? 0.0f : (r > qmax ? qmax : r);
        float deq = (float)((int32_t)r - zp) * sc;
        out[i] = w[i] - deq / s[i];
    }
    return QT_OK;
}

#if QT_X86
QT_TARGET_AVX512 static int residual_avx512(const float *w, const float *s, int64_t n, int bits,
                                            int sym, float *out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 l = _mm512_setzero_ps(), h = l;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = qt__lanes16(n - i);
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_mask_loadu_ps(one, m, s + i));
        if (qt__nonfinite16(x, m)) return QT_ERR_NONFINITE;
        _mm512_mask_storeu_ps(out + i, m, x);
        l = _mm512_min_ps(l, x); /* lanes past n hold 0 * 1 = 0: the range includes 0 anyway */
        h = _mm512_max_ps(h, x);
    }
    float sc;
    int32_t zp;
    qt__range_params(_mm512_reduce_min_ps(l), _mm512_reduce_max_ps(h), 1.0f, bits, 0, sym, &sc, &zp);
    const __m512 vs = _mm512_set1_ps(sc), vz = _mm512_set1_ps((float)zp), zero = _mm512_setzero_ps();
    const __m512 qmax = _mm512_set1_ps((float)((1 << bits) - 1));
    const __m512i vzi = _mm512_set1_epi32(zp);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = qt__lanes16(n - i);
        __m512 x = _mm512_maskz_loadu_ps(m, out + i);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(x, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), zero), qmax);
        __m512 deq = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtps_epi32(r), vzi)), vs);
        __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_div_ps(deq, _mm512_mask_loadu_ps(one, m, s + i)));
        _mm512_mask_storeu_ps(out + i, m, d);
    }
    return QT_OK;
}
#endif

int qt_awq_residual(const float *w, int64_t rows, int64_t cols, const float *s, int64_t block,
                    int bits, int symmetric, float *out) {
    if (w == NULL || s == NULL || out == NULL || rows < 0 || cols < 0 || block < 1 || bits < 2 || bits > 8)
        return QT_ERR_ARG;
    int (*run)(const float *, const float *, int64_t, int, int, float *) = residual_scalar;
#if QT_X86
    if (qt__isa() >= QT_ISA_AVX512) run = residual_avx512;
#endif
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j0 = 0; j0 < cols; j0 += block) {
            int64_t n = cols - j0 < block ? cols - j0 : block;
            int st = run(w + r * cols + j0, s + j0, n, bits, symmetric != 0, out + r * cols + j0);
            if (st != QT_OK) return st;
        }
    }
    return QT_OK;
}
