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
    __m256 lo0 = _mm256_set1_ps(x[0]), lo1 = lo0, hi0 = lo0, hi1 = lo0;
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        ok = _mm256_and_ps(ok, qt__finite8(a));
        ok = _mm256_and_ps(ok, qt__finite8(b));
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
    __m512 lo0 = _mm512_set1_ps(x[0]), lo1 = lo0, hi0 = lo0, hi1 = lo0;
    __mmask16 ok = 0xffff;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
        ok &= qt__finite16(a);
        ok &= qt__finite16(b);
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
 * do the same operations, so every path gives the same bins bit for bit). Vector paths
 * clamp before converting, so even a NaN/Inf lane yields an index in range.
 *
 * Up to HIST_SUB_BINS bins (calibration uses 2048), values are counted in 4 interleaved
 * uint16 sub-histograms on the stack (16 KiB, half of L1): consecutive values in one bin
 * update different addresses instead of serialising on one load-add-store chain. Every
 * HIST_SPAN values they are folded into counts, before a uint16 can wrap (each copy
 * takes a quarter of a span, plus at most 3 tail values: 65523 < 2^16). A span holding a
 * NaN/Inf is dropped before it is folded in, and the spans already folded in are counted
 * again and subtracted, so counts ends as it began.
 *
 * On the vector paths, spans compute bin indices 16 values at a time into a small ring
 * and count the group computed HIST_RING values earlier: index arithmetic (vector ports)
 * and counting (load/store ports) interleave instead of taking turns, and x is
 * prefetched HIST_PREFETCH values ahead. Counting is the bound: one load-add-store per
 * value. */

#define HIST_CHUNK 256     /* values per index buffer (scalar path, many bins, span tails) */
#define HIST_RING 128      /* values between computing a group's indices and counting it */
#define HIST_PREFETCH 512  /* values ahead of the group being indexed */
#define HIST_SUB_BINS 2048
#define HIST_SPAN ((int64_t)4 * 65520)

typedef struct {
    int pow2;          /* 0: affine map, 1: power-of-two grid */
    float a, b, c;     /* affine: lo, hi - lo, bins.  pow2: 2^-k, (float)start, unused */
    float bmax;        /* bins - 1 */
    float *mm;         /* running {min, max} of every value indexed (meaningless after a
                        * NaN/Inf); on the vector ports, which counting leaves idle */
} hist_map;

static inline void hist_mm_merge(const hist_map *m, float lo, float hi) {
    m->mm[0] = lo < m->mm[0] ? lo : m->mm[0];
    m->mm[1] = hi > m->mm[1] ? hi : m->mm[1];
}

typedef uint16_t hist_sub[4][HIST_SUB_BINS];

/* Bin indices of x[0..n) into idx; QT_ERR_NONFINITE (idx then unspecified) on NaN/Inf. */
typedef int (*hist_idx_fn)(const float *x, int64_t n, const hist_map *m, int32_t *idx);
/* Count x[0..n) (n a multiple of 16) into sub; QT_ERR_NONFINITE if any value was NaN/Inf
 * (sub then holds garbage, still in range). */
typedef int (*hist_span_fn)(const float *x, int64_t n, const hist_map *m, hist_sub sub);

static inline void hist_count(const int32_t *idx, int64_t n, hist_sub sub) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        /* two indices per load; which copy gets which value does not matter */
        uint64_t p, q;
        memcpy(&p, idx + i, 8);
        memcpy(&q, idx + i + 2, 8);
        sub[0][(uint32_t)p]++;
        sub[1][p >> 32]++;
        sub[2][(uint32_t)q]++;
        sub[3][q >> 32]++;
    }
    for (; i < n; i++) sub[0][idx[i]]++;
}

static inline float hist_t_scalar(float v, const hist_map *m) {
    return m->pow2 ? floorf(v * m->a) - m->b : floorf(((v - m->a) / m->b) * m->c);
}

static int hist_idx_scalar(const float *x, int64_t n, const hist_map *m, int32_t *idx) {
    float lo = m->mm[0], hi = m->mm[1];
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        if (!qt__finite(v)) return QT_ERR_NONFINITE;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        float f = hist_t_scalar(v, m);
        f = f < 0.0f ? 0.0f : f;
        f = f > m->bmax ? m->bmax : f;
        idx[i] = (int32_t)f;
    }
    hist_mm_merge(m, lo, hi);
    return QT_OK;
}

#if QT_X86
/* Each vector loop is written once per ISA: the map kind is a constant argument of an
 * always-inlined body, instantiated twice. */
#define HIST_INLINE static inline __attribute__((always_inline))

QT_TARGET_AVX2 HIST_INLINE __m256i hist_idx8(__m256 v, const hist_map *m, const int pow2) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 t = pow2 ? _mm256_sub_ps(_mm256_floor_ps(_mm256_mul_ps(v, _mm256_set1_ps(m->a))),
                                    _mm256_set1_ps(m->b))
                    : _mm256_floor_ps(_mm256_mul_ps(
                          _mm256_div_ps(_mm256_sub_ps(v, _mm256_set1_ps(m->a)), _mm256_set1_ps(m->b)),
                          _mm256_set1_ps(m->c)));
    /* max/min return the second operand for NaN: every lane lands in [0, bins - 1] */
    t = _mm256_min_ps(_mm256_max_ps(t, zero), _mm256_set1_ps(m->bmax));
    return _mm256_cvttps_epi32(t);
}

/* all-ones lanes where v is NaN or +-Inf (!(|v| <= FLT_MAX)) */
QT_TARGET_AVX2 HIST_INLINE __m256 hist_bad8(__m256 v) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return _mm256_cmp_ps(_mm256_and_ps(v, absmask), _mm256_set1_ps(3.40282347e38f), _CMP_NLE_UQ);
}

QT_TARGET_AVX2 HIST_INLINE void hist_mm_merge8(const hist_map *m, __m256 lo, __m256 hi) {
    float l[8], h[8];
    _mm256_storeu_ps(l, lo);
    _mm256_storeu_ps(h, hi);
    for (int j = 0; j < 8; j++) hist_mm_merge(m, l[j], h[j]);
}

QT_TARGET_AVX2 HIST_INLINE int hist_idx_avx2_body(const float *x, int64_t n, const hist_map *m,
                                                  int32_t *idx, const int pow2) {
    __m256 bad = _mm256_setzero_ps();
    __m256 lo = _mm256_set1_ps(m->mm[0]), hi = _mm256_set1_ps(m->mm[1]);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if ((i & 15) == 0) _mm_prefetch((const char *)(x + i + HIST_PREFETCH), _MM_HINT_T0);
        __m256 v = _mm256_loadu_ps(x + i);
        bad = _mm256_or_ps(bad, hist_bad8(v));
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
        _mm256_storeu_si256((__m256i *)(idx + i), hist_idx8(v, m, pow2));
    }
    if (_mm256_movemask_ps(bad)) return QT_ERR_NONFINITE;
    hist_mm_merge8(m, lo, hi);
    return hist_idx_scalar(x + i, n - i, m, idx + i);
}

QT_TARGET_AVX2 static int hist_idx_avx2(const float *x, int64_t n, const hist_map *m,
                                        int32_t *idx) {
    return m->pow2 ? hist_idx_avx2_body(x, n, m, idx, 1) : hist_idx_avx2_body(x, n, m, idx, 0);
}

QT_TARGET_AVX2 HIST_INLINE int hist_span_avx2_body(const float *x, int64_t n, const hist_map *m,
                                                   hist_sub sub, const int pow2) {
    _Alignas(64) int32_t ring[HIST_RING];
    __m256 bad = _mm256_setzero_ps();
    __m256 lo0 = _mm256_set1_ps(m->mm[0]), hi0 = _mm256_set1_ps(m->mm[1]), lo1 = lo0, hi1 = hi0;
    int64_t i = 0;
    for (; i < n; i += 16) {
        int32_t *r = ring + (i & (HIST_RING - 1));
        if (i >= HIST_RING) hist_count(r, 16, sub); /* group i - RING, before it is overwritten */
        _mm_prefetch((const char *)(x + i + HIST_PREFETCH), _MM_HINT_T0);
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        bad = _mm256_or_ps(bad, _mm256_or_ps(hist_bad8(v0), hist_bad8(v1)));
        lo0 = _mm256_min_ps(lo0, v0);
        lo1 = _mm256_min_ps(lo1, v1);
        hi0 = _mm256_max_ps(hi0, v0);
        hi1 = _mm256_max_ps(hi1, v1);
        _mm256_store_si256((__m256i *)r, hist_idx8(v0, m, pow2));
        _mm256_store_si256((__m256i *)(r + 8), hist_idx8(v1, m, pow2));
    }
    for (int64_t j = i < HIST_RING ? 0 : i - HIST_RING; j < n; j += 16)
        hist_count(ring + (j & (HIST_RING - 1)), 16, sub);
    if (_mm256_movemask_ps(bad)) return QT_ERR_NONFINITE;
    hist_mm_merge8(m, _mm256_min_ps(lo0, lo1), _mm256_max_ps(hi0, hi1));
    return QT_OK;
}

QT_TARGET_AVX2 static int hist_span_avx2(const float *x, int64_t n, const hist_map *m,
                                         hist_sub sub) {
    return m->pow2 ? hist_span_avx2_body(x, n, m, sub, 1) : hist_span_avx2_body(x, n, m, sub, 0);
}

QT_TARGET_AVX512 HIST_INLINE __m512i hist_idx16(__m512 v, const hist_map *m, const int pow2) {
    __m512 t = pow2 ? _mm512_sub_ps(_mm512_floor_ps(_mm512_mul_ps(v, _mm512_set1_ps(m->a))),
                                    _mm512_set1_ps(m->b))
                    : _mm512_floor_ps(_mm512_mul_ps(
                          _mm512_div_ps(_mm512_sub_ps(v, _mm512_set1_ps(m->a)), _mm512_set1_ps(m->b)),
                          _mm512_set1_ps(m->c)));
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_setzero_ps()), _mm512_set1_ps(m->bmax));
    return _mm512_cvttps_epi32(t);
}

QT_TARGET_AVX512 HIST_INLINE int hist_idx_avx512_body(const float *x, int64_t n,
                                                      const hist_map *m, int32_t *idx,
                                                      const int pow2) {
    __mmask16 bad = 0;
    __m512 lo = _mm512_set1_ps(m->mm[0]), hi = _mm512_set1_ps(m->mm[1]);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = qt__lanes16(n - i);
        _mm_prefetch((const char *)(x + i + HIST_PREFETCH), _MM_HINT_T0);
        __m512 v = _mm512_maskz_loadu_ps(k, x + i);
        bad |= qt__nonfinite16(v, k);
        lo = _mm512_mask_min_ps(lo, k, lo, v); /* lanes past n keep their value */
        hi = _mm512_mask_max_ps(hi, k, hi, v);
        _mm512_mask_storeu_epi32(idx + i, k, hist_idx16(v, m, pow2));
    }
    if (bad) return QT_ERR_NONFINITE;
    hist_mm_merge(m, _mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
    return QT_OK;
}

QT_TARGET_AVX512 static int hist_idx_avx512(const float *x, int64_t n, const hist_map *m,
                                            int32_t *idx) {
    return m->pow2 ? hist_idx_avx512_body(x, n, m, idx, 1) : hist_idx_avx512_body(x, n, m, idx, 0);
}
#endif

/* counts[b] += sign * (number of x[0..n) in bin b). Stops at the first chunk or span
 * holding a NaN/Inf: *done is then the number of values counted (all before it).
 * span_fn may be NULL (chunks of indices from idx_fn only). */
static int hist_accumulate(hist_idx_fn idx_fn, hist_span_fn span_fn, const float *x, int64_t n,
                           const hist_map *m, int64_t *counts, int64_t bins, int64_t sign,
                           int64_t *done) {
    _Alignas(64) int32_t idx[HIST_CHUNK];
    *done = 0;
    if (bins > HIST_SUB_BINS || n < 4 * bins) {
        for (int64_t s = 0; s < n; s += HIST_CHUNK) {
            int64_t len = n - s < HIST_CHUNK ? n - s : HIST_CHUNK;
            if (idx_fn(x + s, len, m, idx) != QT_OK) return QT_ERR_NONFINITE;
            for (int64_t i = 0; i < len; i++) counts[idx[i]] += sign;
            *done = s + len;
        }
        return QT_OK;
    }
    _Alignas(64) hist_sub sub;
    for (int64_t s0 = 0; s0 < n; s0 += HIST_SPAN) {
        int64_t span = n - s0 < HIST_SPAN ? n - s0 : HIST_SPAN;
        memset(sub, 0, sizeof(sub));
        int64_t s = s0;
        if (span_fn != NULL) {
            int64_t body = span & ~(int64_t)15;
            if (span_fn(x + s, body, m, sub) != QT_OK) return QT_ERR_NONFINITE; /* span dropped */
            s += body;
        }
        for (; s < s0 + span; s += HIST_CHUNK) {
            int64_t len = s0 + span - s < HIST_CHUNK ? s0 + span - s : HIST_CHUNK;
            if (idx_fn(x + s, len, m, idx) != QT_OK) return QT_ERR_NONFINITE;
            hist_count(idx, len, sub);
        }
        for (int64_t b = 0; b < bins; b++)
            counts[b] += sign * ((int64_t)sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b]);
        *done = s0 + span;
    }
    return QT_OK;
}

/* counts += sign * bins of x[0..n) on the paths this CPU has; on NaN/Inf counts is left
 * as it was found and QT_ERR_NONFINITE returned. m->mm takes in the values' min/max. */
static int hist_run(const float *x, int64_t n, const hist_map *m, int64_t *counts,
                    int64_t bins, int64_t sign) {
    hist_idx_fn idx_fn = hist_idx_scalar;
    hist_span_fn span_fn = NULL;
#if QT_X86
    int isa = qt__isa();
    /* one span loop for both levels: on Zen 4 the AVX2 one counts faster than a 512-bit
     * version (two 8-wide groups in flight; measured 5-10% more) */
    if (isa >= QT_ISA_AVX2) span_fn = hist_span_avx2;
    if (isa >= QT_ISA_AVX512) idx_fn = hist_idx_avx512;
    else if (isa >= QT_ISA_AVX2) idx_fn = hist_idx_avx2;
#endif
    int64_t done, undone;
    if (hist_accumulate(idx_fn, span_fn, x, n, m, counts, bins, sign, &done) == QT_OK) return QT_OK;
    /* leave counts as we found them: x[0..done) is finite, take its counts back out */
    hist_accumulate(idx_fn, span_fn, x, done, m, counts, bins, -sign, &undone);
    return QT_ERR_NONFINITE;
}

int qt_histogram(const float *x, int64_t n, float lo, float hi, int64_t *counts,
                 int64_t bins) {
    if (x == NULL || counts == NULL || n < 0 || bins < 1 || bins > (1 << 24)) return QT_ERR_ARG;
    float w = hi - lo;
    if (!qt__finite(lo) || !qt__finite(hi) || !qt__finite(w) || !(hi > lo)) return QT_ERR_ARG;
    float mm[2] = {INFINITY, -INFINITY};
    hist_map m = {0, lo, w, (float)bins, (float)(bins - 1), mm};
    return hist_run(x, n, &m, counts, bins, 1);
}

static int pow2_args(const float *x, int64_t n, int k, int64_t start, const int64_t *counts,
                     int64_t bins) {
    if (x == NULL || counts == NULL || n < 0 || bins < 1 || bins > (1 << 24)) return QT_ERR_ARG;
    if (k < -127 || k > 126) return QT_ERR_ARG; /* 2^-k a normal float32 */
    const int64_t lim = (int64_t)1 << 62;
    if (start < -lim || start > lim || (int64_t)(float)start != start) return QT_ERR_ARG;
    return QT_OK;
}

int qt_histogram_pow2(const float *x, int64_t n, int k, int64_t start, int64_t *counts,
                      int64_t bins) {
    if (pow2_args(x, n, k, start, counts, bins) != QT_OK) return QT_ERR_ARG;
    float mm[2] = {INFINITY, -INFINITY};
    hist_map m = {1, ldexpf(1.0f, -k), (float)start, 0.0f, (float)(bins - 1), mm};
    return hist_run(x, n, &m, counts, bins, 1);
}

/* One pass instead of qt_minmax then qt_histogram_pow2 (calibration's observers read
 * each activation once while its range stays inside the one seen so far, the common
 * case): the bins are counted while the min/max is found, and taken back out (a second
 * pass, only then) when a value fell outside [lo, hi] and the caller must regrid. */
int qt_minmax_histogram_pow2(const float *x, int64_t n, int k, int64_t start, int64_t *counts,
                             int64_t bins, float lo, float hi, float *out_min, float *out_max) {
    if (pow2_args(x, n, k, start, counts, bins) != QT_OK || n < 1) return QT_ERR_ARG;
    if (out_min == NULL || out_max == NULL || !qt__finite(lo) || !qt__finite(hi) || !(lo <= hi))
        return QT_ERR_ARG;
    float mm[2] = {INFINITY, -INFINITY};
    hist_map m = {1, ldexpf(1.0f, -k), (float)start, 0.0f, (float)(bins - 1), mm};
    int st = hist_run(x, n, &m, counts, bins, 1);
    if (st != QT_OK) return st;
    if (mm[0] < lo || mm[1] > hi) {
        float again[2] = {INFINITY, -INFINITY}; /* the same values: min/max are kept */
        m.mm = again;
        hist_run(x, n, &m, counts, bins, -1); /* finite: cannot fail */
    }
    /* -0.0 and 0.0 compare equal: report +0.0, as qt_minmax does */
    *out_min = mm[0] + 0.0f;
    *out_max = mm[1] + 0.0f;
    return QT_OK;
}
