/* Fused RTN block quantization of a MatMul weight W[K, N] straight into the
 * com.microsoft MatMulNBits layout (qt_quantize_kn in qtool.h).
 *
 * W is stored with K (the blocked, reduction axis) as rows, but MatMulNBits wants each
 * output column's codes contiguous along K. One pass over W: for a strip of QT_KN_STRIP
 * columns and one block of K rows, the block range is a vertical min/max over rows
 * (whole vector loads, no horizontal reductions), the codes of each row are shifted into
 * 32-bit words per column (a word holds 32/bits consecutive K rows, low bits first), and
 * only those words are transposed out: 1/(32/bits) of the elements a float transpose
 * would move. The strip's rows stay in L1 between the range and the quantize loops.
 *
 * w may sit at any byte offset (a weight memory-mapped out of a protobuf, whose raw data
 * has no alignment): the vector paths use unaligned loads and the scalar path reads each
 * element through memcpy, so no aligned copy of the weight is needed.
 */
#include <math.h>
#include <string.h>

#include "qt_internal.h"

#define QT_KN_STRIP 16       /* columns per strip: one AVX-512 vector, two AVX2 vectors */
#define QT_KN_WIDE 64        /* columns per AVX-512 strip: four vectors */
#define QT_KN_MAX_WORDS 64   /* words per column per block: 256 * 8 / 32 */

typedef struct {
    const float *w;
    int64_t K, N, bs, nb;
    int bits, sym, per; /* per: codes per 32-bit word */
    int32_t qmax;
    uint8_t *b;
    float *scales;
    uint8_t *zp;
    int64_t blob, zrow; /* bytes per block in b; bytes per row of zp */
} kn_job;

/* Scale and zero point from the block's range lo = min(min x, 0), hi = max(max x, 0)
 * (the vector paths start their min/max at 0): the block RTN rule, qt__range_params. */
static void kn_params(const kn_job *j, float lo, float hi, float *scale, float *zero) {
    int32_t z;
    qt__range_params(lo, hi, 1.0f, j->bits, 0, j->sym, scale, &z);
    *zero = (float)z;
}

/* Write one strip's results: words[w * ld + lane] (w < wpb) for block jb, columns c..c+n. */
static void kn_store(const kn_job *j, int64_t jb, int64_t c, int n, const uint32_t *words,
                     int ld, const float *scale, const float *zero) {
    const int64_t wpb = j->blob / 4;
    for (int i = 0; i < n; i++) {
        uint8_t *dst = j->b + ((c + i) * j->nb + jb) * j->blob;
        for (int64_t w = 0; w < wpb; w++) memcpy(dst + 4 * w, &words[w * ld + i], 4);
        j->scales[(c + i) * j->nb + jb] = scale[i];
        if (!j->sym) {
            uint8_t *z = j->zp + (c + i) * j->zrow + jb * j->bits / 8;
            unsigned v = (unsigned)zero[i] << ((jb * j->bits) % 8);
            /* blocks arrive in order: the first code of a byte sets it, later ones OR in */
            *z = (uint8_t)(((jb * j->bits) % 8 == 0) ? v : (*z | v));
        }
    }
}

/* w[i] for a w of any alignment */
static inline float kn_load(const float *w, int64_t i) {
    float v;
    memcpy(&v, (const unsigned char *)w + i * (int64_t)sizeof(float), sizeof v);
    return v;
}

/* One strip of n <= QT_KN_STRIP columns starting at c, block jb (rows k0..k0+kr). */
static int kn_strip_scalar(const kn_job *j, int64_t jb, int64_t c, int n) {
    const int64_t k0 = jb * j->bs, kr = (j->K - k0) < j->bs ? (j->K - k0) : j->bs;
    float lo[QT_KN_STRIP] = {0}, hi[QT_KN_STRIP] = {0}, s[QT_KN_STRIP], z[QT_KN_STRIP];
    uint32_t words[QT_KN_MAX_WORDS][QT_KN_STRIP];
    for (int64_t r = 0; r < kr; r++) {
        const int64_t row = (k0 + r) * j->N + c;
        for (int i = 0; i < n; i++) {
            float v = kn_load(j->w, row + i);
            if (!qt__finite(v)) return QT_ERR_NONFINITE;
            lo[i] = v < lo[i] ? v : lo[i];
            hi[i] = v > hi[i] ? v : hi[i];
        }
    }
    for (int i = 0; i < n; i++) kn_params(j, lo[i], hi[i], &s[i], &z[i]);
    const float qmax = (float)j->qmax;
    const int64_t wpb = j->blob / 4;
    for (int64_t wi = 0, r = 0; wi < wpb; wi++) {
        for (int i = 0; i < n; i++) words[wi][i] = 0;
        for (int e = 0; e < j->per; e++, r++) {
            if (r >= kr) { /* rows past K pad with the zero point (weight exactly 0) */
                for (int i = 0; i < n; i++) words[wi][i] |= (uint32_t)z[i] << (e * j->bits);
                continue;
            }
            const int64_t row = (k0 + r) * j->N + c;
            for (int i = 0; i < n; i++) {
                float q = nearbyintf(kn_load(j->w, row + i) / s[i]) + z[i];
                q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
                words[wi][i] |= (uint32_t)q << (e * j->bits);
            }
        }
    }
    kn_store(j, jb, c, n, &words[0][0], QT_KN_STRIP, s, z);
    return QT_OK;
}

#if QT_X86
/* kn_params on 16 lanes: the same operations in the same precision, so the same bits. */
QT_TARGET_AVX512 static void kn_params_avx512(const kn_job *j, __m512 lo, __m512 hi,
                                              __m512 *scale, __m512 *zero) {
    const __m512 one = _mm512_set1_ps(1.0f), fz = _mm512_setzero_ps();
    __m512 s;
    if (j->sym) {
        const float half = (float)(1 << (j->bits - 1));
        __mmask16 pos = _mm512_cmp_ps_mask(hi, _mm512_sub_ps(fz, lo), _CMP_GE_OQ);
        __m512 m = _mm512_mask_blend_ps(pos, lo, hi);
        /* -m / half: dividing by a power of two is exact in double and in float
         * (correctly rounded either way, subnormals included) */
        s = _mm512_mul_ps(m, _mm512_set1_ps(-1.0f / half));
        *scale = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, fz, _CMP_EQ_OQ), s, one);
        *zero = _mm512_set1_ps(half);
        return;
    }
    const __m512d qmax = _mm512_set1_pd((double)j->qmax), dz = _mm512_setzero_pd();
    __m512d lo0 = _mm512_cvtps_pd(_mm512_castps512_ps256(lo));
    __m512d lo1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(lo, 1));
    __m512d hi0 = _mm512_cvtps_pd(_mm512_castps512_ps256(hi));
    __m512d hi1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(hi, 1));
    __m256 s0 = _mm512_cvtpd_ps(_mm512_div_pd(_mm512_sub_pd(hi0, lo0), qmax));
    __m256 s1 = _mm512_cvtpd_ps(_mm512_div_pd(_mm512_sub_pd(hi1, lo1), qmax));
    s = _mm512_insertf32x8(_mm512_castps256_ps512(s0), s1, 1);
    s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, fz, _CMP_EQ_OQ), s, one);
    const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m512d z0 = _mm512_roundscale_pd(
        _mm512_div_pd(_mm512_sub_pd(dz, lo0), _mm512_cvtps_pd(_mm512_castps512_ps256(s))), rn);
    __m512d z1 = _mm512_roundscale_pd(
        _mm512_div_pd(_mm512_sub_pd(dz, lo1), _mm512_cvtps_pd(_mm512_extractf32x8_ps(s, 1))), rn);
    z0 = _mm512_min_pd(_mm512_max_pd(z0, dz), qmax);
    z1 = _mm512_min_pd(_mm512_max_pd(z1, dz), qmax);
    *scale = s;
    *zero = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(z0)), _mm512_cvtpd_ps(z1), 1);
}

/* 64 columns (4 vectors): each row contributes 256 contiguous bytes, which keeps the
 * strided walk down K friendly to the prefetchers and the TLB. */
QT_TARGET_AVX512 static int kn_strip_avx512(const kn_job *j, int64_t jb, int64_t c) {
    enum { V = QT_KN_WIDE / 16 };
    const int64_t k0 = jb * j->bs, kr = (j->K - k0) < j->bs ? (j->K - k0) : j->bs;
    __m512 lo[V], hi[V], vs[V], vz[V];
    __m512i zcode[V];
    __mmask16 finite = 0xffff;
    for (int v = 0; v < V; v++) lo[v] = hi[v] = _mm512_setzero_ps();
    const float *p = j->w + k0 * j->N + c;
    /* the rows of the strip after next, fetched while this one is read: the walk down K
     * is a stride the hardware prefetchers do not follow (two strips ahead measured ~20%
     * less CPU than one ahead, ~25% less than none, on 2048x3200 weights) */
    const int ahead = c + 3 * QT_KN_WIDE <= j->N;
    for (int64_t r = 0; r < kr; r++, p += j->N) {
        if (ahead)
            for (int v = 0; v < V; v++) _mm_prefetch((const char *)(p + 2 * QT_KN_WIDE + 16 * v), _MM_HINT_T1);
        for (int v = 0; v < V; v++) {
            __m512 x = _mm512_loadu_ps(p + 16 * v);
            finite &= qt__finite16(x);
            lo[v] = _mm512_min_ps(lo[v], x);
            hi[v] = _mm512_max_ps(hi[v], x);
        }
    }
    if (finite != 0xffff) return QT_ERR_NONFINITE;
    for (int v = 0; v < V; v++) {
        kn_params_avx512(j, lo[v], hi[v], &vs[v], &vz[v]);
        zcode[v] = _mm512_cvttps_epi32(vz[v]);
    }
    const __m512 zero = _mm512_setzero_ps(), vmax = _mm512_set1_ps((float)j->qmax);
    const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    uint32_t words[QT_KN_MAX_WORDS][QT_KN_WIDE];
    const int64_t wpb = j->blob / 4;
    int64_t r = 0;
    p = j->w + k0 * j->N + c;
    for (int64_t wi = 0; wi < wpb; wi++) {
        __m512i acc[V];
        for (int v = 0; v < V; v++) acc[v] = _mm512_setzero_si512();
        for (int e = 0; e < j->per; e++, r++) {
            const __m128i sh = _mm_cvtsi32_si128(e * j->bits);
            for (int v = 0; v < V; v++) {
                __m512i q = zcode[v]; /* rows past K pad with the zero point (weight 0) */
                if (r < kr) {
                    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(p + 16 * v), vs[v]), rn);
                    t = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(t, vz[v]), zero), vmax);
                    q = _mm512_cvttps_epi32(t);
                }
                acc[v] = _mm512_or_si512(acc[v], _mm512_sll_epi32(q, sh));
            }
            if (r < kr) p += j->N;
        }
        for (int v = 0; v < V; v++) _mm512_storeu_si512((void *)&words[wi][16 * v], acc[v]);
    }
    float s[QT_KN_WIDE], z[QT_KN_WIDE];
    for (int v = 0; v < V; v++) {
        _mm512_storeu_ps(s + 16 * v, vs[v]);
        _mm512_storeu_ps(z + 16 * v, vz[v]);
    }
    kn_store(j, jb, c, QT_KN_WIDE, &words[0][0], QT_KN_WIDE, s, z);
    return QT_OK;
}

QT_TARGET_AVX2 static int kn_strip_avx2(const kn_job *j, int64_t jb, int64_t c) {
    const int64_t k0 = jb * j->bs, kr = (j->K - k0) < j->bs ? (j->K - k0) : j->bs;
    __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    const float *p = j->w + k0 * j->N + c;
    for (int64_t r = 0; r < kr; r++, p += j->N) {
        __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
        ok = _mm256_and_ps(ok, qt__finite8(v0));
        ok = _mm256_and_ps(ok, qt__finite8(v1));
        lo0 = _mm256_min_ps(lo0, v0);
        hi0 = _mm256_max_ps(hi0, v0);
        lo1 = _mm256_min_ps(lo1, v1);
        hi1 = _mm256_max_ps(hi1, v1);
    }
    if (_mm256_movemask_ps(ok) != 0xff) return QT_ERR_NONFINITE;
    float l[QT_KN_STRIP], h[QT_KN_STRIP], s[QT_KN_STRIP], z[QT_KN_STRIP];
    _mm256_storeu_ps(l, lo0);
    _mm256_storeu_ps(l + 8, lo1);
    _mm256_storeu_ps(h, hi0);
    _mm256_storeu_ps(h + 8, hi1);
    for (int i = 0; i < QT_KN_STRIP; i++) kn_params(j, l[i], h[i], &s[i], &z[i]);
    const __m256 vs0 = _mm256_loadu_ps(s), vs1 = _mm256_loadu_ps(s + 8);
    const __m256 vz0 = _mm256_loadu_ps(z), vz1 = _mm256_loadu_ps(z + 8);
    const __m256 zero = _mm256_setzero_ps(), vmax = _mm256_set1_ps((float)j->qmax);
    const __m256i zc0 = _mm256_cvttps_epi32(vz0), zc1 = _mm256_cvttps_epi32(vz1);
    const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    uint32_t words[QT_KN_MAX_WORDS][QT_KN_STRIP];
    const int64_t wpb = j->blob / 4;
    int64_t r = 0;
    p = j->w + k0 * j->N + c;
    for (int64_t wi = 0; wi < wpb; wi++) {
        __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
        for (int e = 0; e < j->per; e++, r++) {
            __m256i q0 = zc0, q1 = zc1;
            if (r < kr) {
                __m256 t0 = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vs0), rn);
                __m256 t1 = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p + 8), vs1), rn);
                t0 = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t0, vz0), zero), vmax);
                t1 = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t1, vz1), zero), vmax);
                q0 = _mm256_cvttps_epi32(t0);
                q1 = _mm256_cvttps_epi32(t1);
                p += j->N;
            }
            const __m128i sh = _mm_cvtsi32_si128(e * j->bits);
            acc0 = _mm256_or_si256(acc0, _mm256_sll_epi32(q0, sh));
            acc1 = _mm256_or_si256(acc1, _mm256_sll_epi32(q1, sh));
        }
        _mm256_storeu_si256((__m256i *)words[wi], acc0);
        _mm256_storeu_si256((__m256i *)(words[wi] + 8), acc1);
    }
    kn_store(j, jb, c, QT_KN_STRIP, &words[0][0], QT_KN_STRIP, s, z);
    return QT_OK;
}
#endif

int qt_quantize_kn(const float *w, int64_t K, int64_t N, int64_t block_size, int bits,
                   int symmetric, uint8_t *b, float *scales, uint8_t *zero_points) {
    if (w == NULL || b == NULL || scales == NULL || K < 1 || N < 1) return QT_ERR_ARG;
    if (bits != 2 && bits != 4 && bits != 8) return QT_ERR_ARG;
    if (block_size < 16 || block_size > 256 || (block_size & (block_size - 1))) return QT_ERR_ARG;
    if (!symmetric && zero_points == NULL) return QT_ERR_ARG;
    kn_job j = {w, K, N, block_size, (K + block_size - 1) / block_size, bits, symmetric != 0,
                32 / bits, (1 << bits) - 1, b, scales, zero_points, block_size * bits / 8, 0};
    j.zrow = (j.nb * bits + 7) / 8;
    const int isa = qt__isa();
    (void)isa;
    /* Each output column's block is written whole (>= 4 bytes) per strip; rows of blocks
     * go in order, which the zero-point packing in kn_store relies on. */
    for (int64_t jb = 0; jb < j.nb; jb++) {
        int64_t c = 0;
#if QT_X86
        if (isa >= QT_ISA_AVX512) {
            for (; c + QT_KN_WIDE <= N; c += QT_KN_WIDE)
                if (kn_strip_avx512(&j, jb, c) != QT_OK) return QT_ERR_NONFINITE;
        }
        if (isa >= QT_ISA_AVX2) { /* and the AVX-512 path's last < 64 columns */
            for (; c + QT_KN_STRIP <= N; c += QT_KN_STRIP)
                if (kn_strip_avx2(&j, jb, c) != QT_OK) return QT_ERR_NONFINITE;
        }
#endif
        for (; c < N; c += QT_KN_STRIP) {
            int n = (N - c) < QT_KN_STRIP ? (int)(N - c) : QT_KN_STRIP;
            if (kn_strip_scalar(&j, jb, c, n) != QT_OK) return QT_ERR_NONFINITE;
        }
    }
    return QT_OK;
}
