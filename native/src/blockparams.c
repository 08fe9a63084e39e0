/* Block-wise quantization parameters: round-to-nearest (RTN) from the block range, and
 * a per-block MSE search over shrunk ranges (clipping). See qtool.h for the formulas. */
#include <math.h>

#include "qt_internal.h"

typedef struct {
    qt_qtype t;
    int sym;
    int32_t qmin, qmax;
} qspec;

/* The block RTN rule (qt_block_params_rtn in qtool.h; numpy: reference.range_params):
 * scale and zero point from the block's range lo <= 0 <= hi shrunk by f (float32
 * products), then in double rounded to float32 once. qt_quantize_kn uses it too. */
void qt__range_params(float lo, float hi, float f, int bits, int sgn, int sym, float *scale,
                      int32_t *zp) {
    const int32_t half = 1 << (bits - 1);
    const int32_t qmin = sgn ? -half : 0, qmax = sgn ? half - 1 : (1 << bits) - 1;
    float l = lo * f, h = hi * f;
    if (sym) {
        /* the signed extreme lands on code qmin (0, or -half when signed): all 2^bits
         * levels are used; the scale is negative when the extreme is > 0 */
        float m = h >= -l ? h : l;
        float s = (float)(-(double)m / (double)half);
        *scale = s == 0.0f ? 1.0f : s;
        *zp = sgn ? 0 : half;
        return;
    }
    float s = (float)(((double)h - (double)l) / (double)(qmax - qmin));
    if (s == 0.0f) s = 1.0f;
    double z = nearbyint((double)qmin - (double)l / (double)s);
    z = z < qmin ? qmin : (z > qmax ? qmax : z);
    *scale = s;
    *zp = (int32_t)z;
}

static void params_from_range(const qspec *q, float lo, float hi, float f, float *scale,
                              int32_t *zp) {
    qt__range_params(lo, hi, f, qt__bits(q->t), qt__signed(q->t), q->sym, scale, zp);
}

/* min(min x, 0) and max(max x, 0) over one block. */
static int range_scalar(const float *x, int64_t n, float *lo, float *hi) {
    float l = 0.0f, h = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        if (!qt__finite(x[i])) return QT_ERR_NONFINITE;
        l = x[i] < l ? x[i] : l;
        h = x[i] > h ? x[i] : h;
    }
    *lo = l;
    *hi = h;
    return QT_OK;
}

/* sum of (x - dequantize(quantize(x)))^2: float32 per element, double sum. */
static double sqerr_scalar(const float *x, int64_t n, float s, int32_t zp, const qspec *q) {
    double acc = 0.0;
    const float lo = (float)q->qmin, hi = (float)q->qmax, z = (float)zp;
    for (int64_t i = 0; i < n; i++) {
        float r = nearbyintf(x[i] / s) + z;
        r = r < lo ? lo : (r > hi ? hi : r);
        float d = x[i] - (r - z) * s;
        acc += (double)(d * d);
    }
    return acc;
}

#if QT_X86
QT_TARGET_AVX512 static int range_avx512(const float *x, int64_t n, float *lo, float *hi) {
    __m512 l = _mm512_setzero_ps(), h = l;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = qt__lanes16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        if ((__mmask16)(qt__finite16(v) | ~m) != 0xffff)
            return QT_ERR_NONFINITE;
        l = _mm512_min_ps(l, v);
        h = _mm512_max_ps(h, v);
    }
    *lo = _mm512_reduce_min_ps(l);
    *hi = _mm512_reduce_max_ps(h);
    return QT_OK;
}

QT_TARGET_AVX512 static double sqerr_avx512(const float *x, int64_t n, float s, int32_t zp,
                                            const qspec *q) {
    const __m512 lo = _mm512_set1_ps((float)q->qmin), hi = _mm512_set1_ps((float)q->qmax);
    const __m512 vz = _mm512_set1_ps((float)zp), vs = _mm512_set1_ps(s);
    __m512d acc0 = _mm512_setzero_pd(), acc1 = acc0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = qt__lanes16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), lo), hi);
        __m512 d = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_sub_ps(r, vz), vs));
        d = _mm512_maskz_mul_ps(m, d, d);
        acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(d)));
        acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
}
#endif

typedef int (*range_fn)(const float *, int64_t, float *, float *);
typedef double (*sqerr_fn)(const float *, int64_t, float, int32_t, const qspec *);

static int block_params(const float *x, int64_t rows, int64_t cols, int64_t block, qt_qtype t,
                        int sym, int64_t n_grid, float min_shrink, float *scale, int32_t *zp) {
    if (x == NULL || scale == NULL || zp == NULL || rows < 0 || cols < 0 || block < 1) return QT_ERR_ARG;
    if (!qt__valid_qtype(t) || n_grid < 1 || !(min_shrink > 0.0f && min_shrink <= 1.0f)) return QT_ERR_ARG;
    if (sym && qt__bits(t) < 2) return QT_ERR_ARG;
    qspec q = {t, sym != 0, qt__qmin(t), qt__qmax(t)};
    range_fn range = range_scalar;
    sqerr_fn sqerr = sqerr_scalar;
#if QT_X86
    if (qt__isa() >= QT_ISA_AVX512) {
        range = range_avx512;
        sqerr = sqerr_avx512;
    }
#endif
    const int64_t nb = (cols + block - 1) / block;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < nb; j++) {
            const float *xb = x + r * cols + j * block;
            int64_t len = cols - j * block < block ? cols - j * block : block;
            float lo, hi;
            if (range(xb, len, &lo, &hi) != QT_OK) return QT_ERR_NONFINITE;
            float best_s;
            int32_t best_z;
            params_from_range(&q, lo, hi, 1.0f, &best_s, &best_z);
            if (n_grid > 1) {
                double best_e = sqerr(xb, len, best_s, best_z, &q);
                for (int64_t g = 1; g < n_grid; g++) {
                    float f = (float)(1.0 - (double)g * (1.0 - (double)min_shrink) / (double)(n_grid - 1));
                    float s;
                    int32_t z;
                    params_from_range(&q, lo, hi, f, &s, &z);
                    double e = sqerr(xb, len, s, z, &q);
                    if (e < best_e) {
                        best_e = e;
                        best_s = s;
                        best_z = z;
                    }
                }
            }
            scale[r * nb + j] = best_s;
            zp[r * nb + j] = best_z;
        }
    }
    return QT_OK;
}

int qt_block_params_rtn(const float *x, int64_t rows, int64_t cols, int64_t block, qt_qtype qtype,
                        int symmetric, float *scale, int32_t *zero_point) {
    return block_params(x, rows, cols, block, qtype, symmetric, 1, 1.0f, scale, zero_point);
}

int qt_block_params_mse(const float *x, int64_t rows, int64_t cols, int64_t block, qt_qtype qtype,
                        int symmetric, int64_t n_grid, float min_shrink, float *scale,
                        int32_t *zero_point) {
    return block_params(x, rows, cols, block, qtype, symmetric, n_grid, min_shrink, scale, zero_point);
}
