/* Quantize / dequantize: per-tensor, per-axis and block-wise (ONNX QuantizeLinear /
 * DequantizeLinear semantics, round half to even, saturate). */
#include <math.h>

#include "qt_internal.h"

/* A run is n consecutive elements starting at element `off`; the parameters either
 * stay fixed over the run (stride 0) or advance with it (stride 1). */
typedef int (*run_fn)(const void *in, int64_t off, int64_t n, const float *s,
                      const int32_t *zp, int stride, qt_qtype t, void *out);

static inline void store_code(void *q, int64_t i, int sgn, int32_t v) {
    if (sgn) ((int8_t *)q)[i] = (int8_t)v;
    else ((uint8_t *)q)[i] = (uint8_t)v;
}

static int quant_run_scalar(const void *in, int64_t off, int64_t n, const float *s,
                            const int32_t *zp, int stride, qt_qtype t, void *q) {
    const float *x = (const float *)in + off;
    const float lo = (float)qt__qmin(t), hi = (float)qt__qmax(t);
    const int sgn = qt__signed(t);
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        if (!qt__finite(v)) return QT_ERR_NONFINITE;
        int64_t p = i * stride;
        float r = nearbyintf(v / s[p]) + (zp ? (float)zp[p] : 0.0f);
        r = r < lo ? lo : (r > hi ? hi : r);
        store_code(q, off + i, sgn, (int32_t)r);
    }
    return QT_OK;
}

static int dequant_run_scalar(const void *in, int64_t off, int64_t n, const float *s,
                              const int32_t *zp, int stride, qt_qtype t, void *out) {
    float *y = (float *)out + off;
    const int sgn = qt__signed(t);
    for (int64_t i = 0; i < n; i++) {
        int32_t c = sgn ? ((const int8_t *)in)[off + i] : ((const uint8_t *)in)[off + i];
        int64_t p = i * stride;
        y[i] = (float)(c - (zp ? zp[p] : 0)) * s[p];
    }
    return QT_OK;
}

#if QT_X86
QT_TARGET_AVX2 static int quant_run_avx2(const void *in, int64_t off, int64_t n,
                                         const float *s, const int32_t *zp, int stride,
                                         qt_qtype t, void *q) {
    const float *x = (const float *)in + off;
    const __m256 lo = _mm256_set1_ps((float)qt__qmin(t)), hi = _mm256_set1_ps((float)qt__qmax(t));
    const int sgn = qt__signed(t);
    __m256 vs = _mm256_set1_ps(s[0]);
    __m256 vz = _mm256_set1_ps(zp ? (float)zp[0] : 0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 ok = qt__finite8(v);
        if (_mm256_movemask_ps(ok) != 0xff) return QT_ERR_NONFINITE;
        if (stride) {
            vs = _mm256_loadu_ps(s + i);
            if (zp) vz = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(zp + i)));
        }
        __m256 r = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, vz), lo), hi);
        __m256i w = _mm256_cvtps_epi32(r);
        __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        h = sgn ? _mm_packs_epi16(h, h) : _mm_packus_epi16(h, h);
        _mm_storel_epi64((__m128i *)((uint8_t *)q + off + i), h);
    }
    return quant_run_scalar(in, off + i, n - i, s + i * stride, zp ? zp + i * stride : NULL,
                            stride, t, q);
}

QT_TARGET_AVX2 static int dequant_run_avx2(const void *in, int64_t off, int64_t n,
                                           const float *s, const int32_t *zp, int stride,
                                           qt_qtype t, void *out) {
    float *y = (float *)out + off;
    const uint8_t *qb = (const uint8_t *)in + off;
    const int sgn = qt__signed(t);
    __m256 vs = _mm256_set1_ps(s[0]);
    __m256i vz = _mm256_set1_epi32(zp ? zp[0] : 0);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i b = _mm_loadl_epi64((const __m128i *)(qb + i));
        __m256i c = sgn ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
        if (stride) {
            vs = _mm256_loadu_ps(s + i);
            if (zp) vz = _mm256_loadu_si256((const __m256i *)(zp + i));
        }
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, vz)), vs));
    }
    return dequant_run_scalar(in, off + i, n - i, s + i * stride, zp ? zp + i * stride : NULL,
                              stride, t, out);
}

QT_TARGET_AVX512 static int quant_run_avx512(const void *in, int64_t off, int64_t n,
                                             const float *s, const int32_t *zp, int stride,
                                             qt_qtype t, void *q) {
    const float *x = (const float *)in + off;
    uint8_t *qb = (uint8_t *)q + off;
    const __m512 lo = _mm512_set1_ps((float)qt__qmin(t)), hi = _mm512_set1_ps((float)qt__qmax(t));
    __m512 vs = _mm512_set1_ps(s[0]);
    __m512 vz = _mm512_set1_ps(zp ? (float)zp[0] : 0.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = qt__lanes16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        if ((__mmask16)(qt__finite16(v) | ~m) != 0xffff)
            return QT_ERR_NONFINITE;
        if (stride) {
            vs = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, s + i);
            if (zp) vz = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, zp + i));
        }
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), lo), hi);
        _mm512_mask_cvtepi32_storeu_epi8(qb + i, m, _mm512_cvtps_epi32(r));
    }
    return QT_OK;
}

QT_TARGET_AVX512 static int dequant_run_avx512(const void *in, int64_t off, int64_t n,
                                               const float *s, const int32_t *zp, int stride,
                                               qt_qtype t, void *out) {
    float *y = (float *)out + off;
    const uint8_t *qb = (const uint8_t *)in + off;
    const int sgn = qt__signed(t);
    __m512 vs = _mm512_set1_ps(s[0]);
    __m512i vz = _mm512_set1_epi32(zp ? zp[0] : 0);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = qt__lanes16(n - i);
        __m128i b = _mm_maskz_loadu_epi8(m, qb + i);
        __m512i c = sgn ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
        if (stride) {
            vs = _mm512_maskz_loadu_ps(m, s + i);
            if (zp) vz = _mm512_maskz_loadu_epi32(m, zp + i);
        }
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, vz)), vs));
    }
    return QT_OK;
}
#endif

/* Walk [outer, axis_len, inner] as runs sharing parameters (see qtool.h). */
static int walk(run_fn run, const void *in, int64_t outer, int64_t C, int64_t inner,
                int64_t block, const float *s, const int32_t *zp, qt_qtype t, void *out) {
    int st;
    if (block == 0) {
        for (int64_t o = 0; o < outer; o++) {
            if (inner == 1) {
                if ((st = run(in, o * C, C, s, zp, 1, t, out))) return st;
                continue;
            }
            for (int64_t c = 0; c < C; c++)
                if ((st = run(in, (o * C + c) * inner, inner, s + c, zp ? zp + c : NULL, 0, t, out)))
                    return st;
        }
        return QT_OK;
    }
    int64_t nb = (C + block - 1) / block;
    for (int64_t o = 0; o < outer; o++) {
        if (inner == 1) {
            for (int64_t b = 0; b < nb; b++) {
                int64_t len = C - b * block < block ? C - b * block : block;
                int64_t p = o * nb + b;
                if ((st = run(in, o * C + b * block, len, s + p, zp ? zp + p : NULL, 0, t, out)))
                    return st;
            }
            continue;
        }
        for (int64_t c = 0; c < C; c++) {
            int64_t p = (o * nb + c / block) * inner;
            if ((st = run(in, (o * C + c) * inner, inner, s + p, zp ? zp + p : NULL, 1, t, out)))
                return st;
        }
    }
    return QT_OK;
}

static int check_args(const void *in, int64_t outer, int64_t C, int64_t inner, int64_t block,
                      const float *s, const int32_t *zp, int t, const void *out) {
    if (in == NULL || s == NULL || out == NULL || !qt__valid_qtype(t)) return QT_ERR_ARG;
    if (outer < 0 || C < 0 || inner < 0 || block < 0) return QT_ERR_ARG;
    int64_t np = block == 0 ? C : outer * ((C + block - 1) / block) * inner;
    if (outer == 0 || inner == 0) np = 0;
    for (int64_t i = 0; i < np; i++) {
        if (s[i] == 0.0f || !qt__finite(s[i])) return QT_ERR_ARG; /* < 0 is fine: symmetric RTN */
        if (zp && (zp[i] < qt__qmin((qt_qtype)t) || zp[i] > qt__qmax((qt_qtype)t))) return QT_ERR_ARG;
    }
    return QT_OK;
}

int qt_quantize(const float *x, int64_t outer, int64_t axis_len, int64_t inner, int64_t block,
                const float *scale, const int32_t *zero_point, qt_qtype qtype, void *q) {
    int st = check_args(x, outer, axis_len, inner, block, scale, zero_point, qtype, q);
    if (st) return st;
    if (outer == 0 || axis_len == 0 || inner == 0) return QT_OK;
    run_fn run = quant_run_scalar;
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_AVX512) run = quant_run_avx512;
    else if (isa >= QT_ISA_AVX2) run = quant_run_avx2;
#endif
    return walk(run, x, outer, axis_len, inner, block, scale, zero_point, qtype, q);
}

int qt_dequantize(const void *q, int64_t outer, int64_t axis_len, int64_t inner, int64_t block,
                  const float *scale, const int32_t *zero_point, qt_qtype qtype, float *y) {
    int st = check_args(q, outer, axis_len, inner, block, scale, zero_point, qtype, y);
    if (st) return st;
    if (outer == 0 || axis_len == 0 || inner == 0) return QT_OK;
    run_fn run = dequant_run_scalar;
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_AVX512) run = dequant_run_avx512;
    else if (isa >= QT_ISA_AVX2) run = dequant_run_avx2;
#endif
    return walk(run, q, outer, axis_len, inner, block, scale, zero_point, qtype, y);
}
