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
        __mmask16 m = qt__lanes16(n - i);
        __m512 a = _mm512_maskz_loadu_ps(m, x + i);
        ok &= (__mmask16)~qt__nonfinite16(a, m);
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
 * Two bin maps share one counting driver:
 *   affine (qt_histogram):      t = floor(((x - lo) / (hi - lo)) * bins)
 *   pow2   (qt_histogram_pow2): t = floor(x * 2^-k) - start
 * then b = clamp(t, 0, bins - 1), all in float32 in exactly that order (the numpy twins
 * do the same operations, so every path gives the same bins bit for bit).
 *
 * A path turns a chunk of x into bin indices in a stack buffer and reports whether the
 * chunk held a NaN/Inf; the driver counts a chunk only once it is known to be finite.
 * Vector paths clamp before converting, so a NaN/Inf lane still yields an index in
 * range (it is never counted). */

/* Values per chunk, and how far ahead of the chunk being indexed x is prefetched: the
 * counting of a chunk does not touch x, so without it memory would idle meanwhile. */
#define HIST_CHUNK 256
#define HIST_PREFETCH (2 * HIST_CHUNK)

typedef struct {
    int pow2;          /* 0: affine map, 1: power-of-two grid */
    float a, b, c;     /* affine: lo, hi - lo, bins.  pow2: 2^-k, (float)start, unused */
    float bmax;        /* bins - 1 */
} hist_map;

typedef int (*hist_idx_fn)(const float *x, int64_t n, const hist_map *m, int32_t *idx);

static inline float hist_t_scalar(float v, const hist_map *m) {
    return m->pow2 ? floorf(v * m->a) - m->b : floorf(((v - m->a) / m->b) * m->c);
}

static int hist_idx_scalar(const float *x, int64_t n, const hist_map *m, int32_t *idx) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        if (!qt__finite(v)) return QT_ERR_NONFINITE;
        float f = hist_t_scalar(v, m);
        f = f < 0.0f ? 0.0f : f;
        f = f > m->bmax ? m->bmax : f;
        idx[i] = (int32_t)f;
    }
    return QT_OK;
}

#if QT_X86
/* Each vector path is one loop per map, written once: the map is a constant argument
 * of an always-inlined body. */
#define HIST_INLINE static inline __attribute__((always_inline))

QT_TARGET_AVX2 HIST_INLINE int hist_idx_avx2_body(const float *x, int64_t n, const hist_map *m,
                                                  int32_t *idx, const int pow2) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 fmax = _mm256_set1_ps(3.40282347e38f);
    const __m256 va = _mm256_set1_ps(m->a), vb = _mm256_set1_ps(m->b), vc = _mm256_set1_ps(m->c);
    const __m256 vmax = _mm256_set1_ps(m->bmax), zero = _mm256_setzero_ps();
    __m256 bad = zero;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if ((i & 15) == 0) _mm_prefetch((const char *)(x + i + HIST_PREFETCH), _MM_HINT_T0);
        __m256 v = _mm256_loadu_ps(x + i);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(v, absmask), fmax, _CMP_NLE_UQ));
        __m256 t = pow2 ? _mm256_sub_ps(_mm256_floor_ps(_mm256_mul_ps(v, va)), vb)
                        : _mm256_floor_ps(_mm256_mul_ps(_mm256_div_ps(_mm256_sub_ps(v, va), vb), vc));
        /* max/min return the second operand for NaN: any lane lands in [0, bins - 1] */
        t = _mm256_min_ps(_mm256_max_ps(t, zero), vmax);
        _mm256_storeu_si256((__m256i *)(idx + i), _mm256_cvttps_epi32(t));
    }
    if (_mm256_movemask_ps(bad)) return QT_ERR_NONFINITE;
    return hist_idx_scalar(x + i, n - i, m, idx + i);
}

QT_TARGET_AVX2 static int hist_idx_avx2(const float *x, int64_t n, const hist_map *m,
                                        int32_t *idx) {
    return m->pow2 ? hist_idx_avx2_body(x, n, m, idx, 1) : hist_idx_avx2_body(x, n, m, idx, 0);
}

QT_TARGET_AVX512 HIST_INLINE int hist_idx_avx512_body(const float *x, int64_t n,
                                                      const hist_map *m, int32_t *idx,
                                                      const int pow2) {
    const __m512 va = _mm512_set1_ps(m->a), vb = _mm512_set1_ps(m->b), vc = _mm512_set1_ps(m->c);
    const __m512 vmax = _mm512_set1_ps(m->bmax), zero = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = qt__lanes16(n - i);
        _mm_prefetch((const char *)(x + i + HIST_PREFETCH), _MM_HINT_T0);
        __m512 v = _mm512_maskz_loadu_ps(k, x + i);
        bad |= qt__nonfinite16(v, k);
        __m512 t = pow2 ? _mm512_sub_ps(_mm512_floor_ps(_mm512_mul_ps(v, va)), vb)
                        : _mm512_floor_ps(_mm512_mul_ps(_mm512_div_ps(_mm512_sub_ps(v, va), vb), vc));
        t = _mm512_min_ps(_mm512_max_ps(t, zero), vmax);
        _mm512_mask_storeu_epi32(idx + i, k, _mm512_cvttps_epi32(t));
    }
    return bad ? QT_ERR_NONFINITE : QT_OK;
}

QT_TARGET_AVX512 static int hist_idx_avx512(const float *x, int64_t n, const hist_map *m,
                                            int32_t *idx) {
    return m->pow2 ? hist_idx_avx512_body(x, n, m, idx, 1) : hist_idx_avx512_body(x, n, m, idx, 0);
}
#endif

/* Up to this many bins, counting goes through 4 interleaved uint16 sub-histograms on the
 * stack (16 KiB, half of L1): consecutive values in the same bin then update different
 * addresses instead of serialising on one load-add-store chain. Every HIST_SPAN values
 * they are folded into counts, before a uint16 can overflow (each copy takes a quarter
 * of a span, plus at most 3 tail values: 65523 < 2^16). */
#define HIST_SUB_BINS 2048
#define HIST_SPAN ((int64_t)4 * 65520)

/* counts[b] += sign * (number of x[0..n) in bin b). Stops at the first chunk holding a
 * NaN/Inf: *done is then the number of values counted (all before that chunk). */
static int hist_accumulate(hist_idx_fn fn, const float *x, int64_t n, const hist_map *m,
                           int64_t *counts, int64_t bins, int64_t sign, int64_t *done) {
    _Alignas(64) int32_t idx[HIST_CHUNK];
    *done = 0;
    if (bins > HIST_SUB_BINS || n < 4 * bins) {
        for (int64_t s = 0; s < n; s += HIST_CHUNK) {
            int64_t len = n - s < HIST_CHUNK ? n - s : HIST_CHUNK;
            if (fn(x + s, len, m, idx) != QT_OK) return QT_ERR_NONFINITE;
            for (int64_t i = 0; i < len; i++) counts[idx[i]] += sign;
            *done = s + len;
        }
        return QT_OK;
    }
    _Alignas(64) uint16_t sub[4][HIST_SUB_BINS];
    for (int64_t s0 = 0; s0 < n; s0 += HIST_SPAN) {
        int64_t span = n - s0 < HIST_SPAN ? n - s0 : HIST_SPAN;
        memset(sub, 0, sizeof(sub));
        for (int64_t s = s0; s < s0 + span; s += HIST_CHUNK) {
            int64_t len = s0 + span - s < HIST_CHUNK ? s0 + span - s : HIST_CHUNK;
            if (fn(x + s, len, m, idx) != QT_OK) return QT_ERR_NONFINITE; /* span dropped */
            int64_t i = 0;
            for (; i + 4 <= len; i += 4) {
                /* two indices per load; which copy gets which value does not matter */
                uint64_t p, q;
                memcpy(&p, idx + i, 8);
                memcpy(&q, idx + i + 2, 8);
                sub[0][(uint32_t)p]++;
                sub[1][p >> 32]++;
                sub[2][(uint32_t)q]++;
                sub[3][q >> 32]++;
            }
            for (; i < len; i++) sub[0][idx[i]]++;
        }
        for (int64_t b = 0; b < bins; b++)
            counts[b] += sign * ((int64_t)sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b]);
        *done = s0 + span;
    }
    return QT_OK;
}

static int hist_run(const float *x, int64_t n, const hist_map *m, int64_t *counts,
                    int64_t bins) {
    hist_idx_fn fn = hist_idx_scalar;
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_AVX512) fn = hist_idx_avx512;
    else if (isa >= QT_ISA_AVX2) fn = hist_idx_avx2;
#endif
    int64_t done, undone;
    if (hist_accumulate(fn, x, n, m, counts, bins, 1, &done) == QT_OK) return QT_OK;
    /* leave counts as we found them: x[0..done) is finite, take its counts back out */
    hist_accumulate(fn, x, done, m, counts, bins, -1, &undone);
    return QT_ERR_NONFINITE;
}

int qt_histogram(const float *x, int64_t n, float lo, float hi, int64_t *counts,
                 int64_t bins) {
    if (x == NULL || counts == NULL || n < 0 || bins < 1 || bins > (1 << 24)) return QT_ERR_ARG;
    float w = hi - lo;
    if (!qt__finite(lo) || !qt__finite(hi) || !qt__finite(w) || !(hi > lo)) return QT_ERR_ARG;
    hist_map m = {0, lo, w, (float)bins, (float)(bins - 1)};
    return hist_run(x, n, &m, counts, bins);
}

int qt_histogram_pow2(const float *x, int64_t n, int k, int64_t start, int64_t *counts,
                      int64_t bins) {
    if (x == NULL || counts == NULL || n < 0 || bins < 1 || bins > (1 << 24)) return QT_ERR_ARG;
    if (k < -127 || k > 126) return QT_ERR_ARG; /* 2^-k a normal float32 */
    const int64_t lim = (int64_t)1 << 62;
    if (start < -lim || start > lim || (int64_t)(float)start != start) return QT_ERR_ARG;
    hist_map m = {1, ldexpf(1.0f, -k), (float)start, 0.0f, (float)(bins - 1)};
    return hist_run(x, n, &m, counts, bins);
}
