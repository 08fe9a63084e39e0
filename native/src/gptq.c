/* GPTQ over the rows of a weight (qt_gptq_rows in qtool.h).
 *
 * Each row of W is quantized column by column and every column's scaled error is pushed
 * onto the later columns through U. Rows never interact, so they are processed in tiles
 * of TILE rows (a tile of W stays in L2) and the columns in panels of SUB: a panel's SUB
 * rows of U are applied to each row of the tile while they are hot in cache (GPTQ's lazy
 * batch update, here with no extra rounding: every element still receives its updates
 * one column at a time, in column order, as a rounded product then a rounded
 * difference). So the result does not depend on TILE, SUB or the vector path, and
 * equals the numpy twin reference.gptq_rows bit for bit. */
#include <math.h>

#include "qt_internal.h"

#define SUB 16
#define TILE QT_GPTQ_TILE

/* w[t] = w[t] - e[i] * u[i * ldu + t] for i = 0..n-1 in order, t in [0, len). */
typedef void (*panel_fn)(float *w, const float *e, int n, const float *u, int64_t ldu, int64_t len);

static void panel_scalar(float *w, const float *e, int n, const float *u, int64_t ldu,
                         int64_t len) {
    for (int64_t t = 0; t < len; t++) {
        float a = w[t];
        for (int i = 0; i < n; i++) a = a - e[i] * u[i * ldu + t];
        w[t] = a;
    }
}

#if QT_X86
/* Each element's updates form one dependent chain (their order is the definition), so
 * throughput comes from CHAINS vectors of elements in flight at once. */
#define CHAINS 8

QT_TARGET_AVX2 static void panel_avx2(float *w, const float *e, int n, const float *u,
                                      int64_t ldu, int64_t len) {
    int64_t t = 0;
    for (; t + 8 * CHAINS <= len; t += 8 * CHAINS) {
        __m256 a[CHAINS];
        for (int c = 0; c < CHAINS; c++) a[c] = _mm256_loadu_ps(w + t + 8 * c);
        for (int i = 0; i < n; i++) {
            const __m256 ei = _mm256_broadcast_ss(e + i);
            const float *ui = u + i * ldu + t;
            for (int c = 0; c < CHAINS; c++)
                a[c] = _mm256_sub_ps(a[c], _mm256_mul_ps(ei, _mm256_loadu_ps(ui + 8 * c)));
        }
        for (int c = 0; c < CHAINS; c++) _mm256_storeu_ps(w + t + 8 * c, a[c]);
    }
    for (; t + 8 <= len; t += 8) {
        __m256 a = _mm256_loadu_ps(w + t);
        for (int i = 0; i < n; i++)
            a = _mm256_sub_ps(a, _mm256_mul_ps(_mm256_broadcast_ss(e + i), _mm256_loadu_ps(u + i * ldu + t)));
        _mm256_storeu_ps(w + t, a);
    }
    panel_scalar(w + t, e, n, u + t, ldu, len - t);
}

QT_TARGET_AVX512 static void panel_avx512(float *w, const float *e, int n, const float *u,
                                          int64_t ldu, int64_t len) {
    __m512 ev[SUB];
    for (int i = 0; i < n; i++) ev[i] = _mm512_set1_ps(e[i]);
    int64_t t = 0;
    for (; t + 16 * CHAINS <= len; t += 16 * CHAINS) {
        __m512 a[CHAINS];
        for (int c = 0; c < CHAINS; c++) a[c] = _mm512_loadu_ps(w + t + 16 * c);
        for (int i = 0; i < n; i++) {
            const float *ui = u + i * ldu + t;
            for (int c = 0; c < CHAINS; c++)
                a[c] = _mm512_sub_ps(a[c], _mm512_mul_ps(ev[i], _mm512_loadu_ps(ui + 16 * c)));
        }
        for (int c = 0; c < CHAINS; c++) _mm512_storeu_ps(w + t + 16 * c, a[c]);
    }
    for (; t < len; t += 16) {
        __mmask16 m = qt__lanes16(len - t);
        __m512 a = _mm512_maskz_loadu_ps(m, w + t);
        for (int i = 0; i < n; i++)
            a = _mm512_sub_ps(a, _mm512_mul_ps(ev[i], _mm512_maskz_loadu_ps(m, u + i * ldu + t)));
        _mm512_mask_storeu_ps(w + t, m, a);
    }
}
#endif

typedef struct {
    int64_t K, block, nb;
    const float *u;
    const int64_t *cols;
    int sym, dynamic;
    float qmax, mid;
    int bits;
} gptq_spec;

/* Block parameters of row w (length K) for the block starting at position i, from the
 * row's current (updated) values: the RTN rule (qt__range_params). */
static void dynamic_params(const gptq_spec *g, const float *w, int64_t i, float *s, uint8_t *z) {
    int64_t len = g->K - i < g->block ? g->K - i : g->block;
    float lo = 0.0f, hi = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        lo = w[i + t] < lo ? w[i + t] : lo;
        hi = w[i + t] > hi ? w[i + t] : hi;
    }
    int32_t zp;
    qt__range_params(lo, hi, 1.0f, g->bits, 0, g->sym, s, &zp);
    if (z != NULL) *z = (uint8_t)zp;
}

/* Columns [j1, j1 + n) of the rows [r0, r0 + nr) of a tile, transposed into p[i][r]:
 * quantize each column, keep its scaled error, update the rest of the panel (the columns
 * after the panel are the caller's panel update). Loops run along the rows, so the
 * compiler vectorizes them in each ISA's copy below; lanes are rows, so the arithmetic of
 * every element is the same in every copy. */
static inline __attribute__((always_inline)) void columns_body(
    const gptq_spec *g, float p[SUB][TILE], int nr, int n, int64_t j1, int64_t r0,
    const float *scales, const uint8_t *zps, uint8_t *codes) {
    float sv[TILE], zv[TILE], qv[TILE];
    for (int i = 0; i < n; i++) {
        const int64_t col = g->cols[j1 + i], grp = col / g->block;
        const float *ui = g->u + (j1 + i) * g->K + j1;
        const float d = ui[i], qmax = g->qmax;
        for (int r = 0; r < nr; r++) {
            sv[r] = scales[(r0 + r) * g->nb + grp];
            zv[r] = zps ? (float)zps[(r0 + r) * g->nb + grp] : g->mid;
        }
        for (int r = 0; r < nr; r++) {
            const float x = p[i][r];
            float q = nearbyintf(x / sv[r]) + zv[r];
            q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
            qv[r] = q;
            p[i][r] = (x - (q - zv[r]) * sv[r]) / d;
        }
        for (int r = 0; r < nr; r++) codes[(r0 + r) * g->K + col] = (uint8_t)qv[r];
        for (int t = i + 1; t < n; t++) {
            const float ut = ui[t];
            for (int r = 0; r < nr; r++) p[t][r] = p[t][r] - p[i][r] * ut;
        }
    }
}

typedef void (*columns_fn)(const gptq_spec *, float[SUB][TILE], int, int, int64_t, int64_t,
                           const float *, const uint8_t *, uint8_t *);

static void columns_scalar(const gptq_spec *g, float p[SUB][TILE], int nr, int n, int64_t j1,
                           int64_t r0, const float *s, const uint8_t *z, uint8_t *codes) {
    columns_body(g, p, nr, n, j1, r0, s, z, codes);
}
#if QT_X86
QT_TARGET_AVX2 static void columns_avx2(const gptq_spec *g, float p[SUB][TILE], int nr, int n,
                                        int64_t j1, int64_t r0, const float *s, const uint8_t *z,
                                        uint8_t *codes) {
    columns_body(g, p, nr, n, j1, r0, s, z, codes);
}
QT_TARGET_AVX512 static void columns_avx512(const gptq_spec *g, float p[SUB][TILE], int nr,
                                            int n, int64_t j1, int64_t r0, const float *s,
                                            const uint8_t *z, uint8_t *codes) {
    columns_body(g, p, nr, n, j1, r0, s, z, codes);
}
#endif

int qt_gptq_rows(const float *w, int64_t rows, int64_t K, const float *u, const int64_t *cols,
                 int64_t block_size, int bits, int symmetric, int dynamic, float *scales,
                 uint8_t *zero_points, uint8_t *codes, float *work) {
    if (w == NULL || u == NULL || cols == NULL || scales == NULL || codes == NULL || work == NULL)
        return QT_ERR_ARG;
    if (rows < 0 || K < 1 || block_size < 1 || bits < 2 || bits > 8) return QT_ERR_ARG;
    if ((zero_points == NULL) != (symmetric != 0)) return QT_ERR_ARG;
    for (int64_t i = 0; i < K; i++) {
        if (cols[i] < 0 || cols[i] >= K || (dynamic && cols[i] != i)) return QT_ERR_ARG;
        float d = u[i * K + i];
        if (!qt__finite(d) || d == 0.0f) return QT_ERR_ARG;
    }
    for (int64_t i = 0; i < rows * K; i++)
        if (!qt__finite(w[i])) return QT_ERR_NONFINITE;
    const int64_t nb = (K + block_size - 1) / block_size;
    for (int64_t i = 0; !dynamic && i < rows * nb; i++)
        if (!qt__finite(scales[i]) || scales[i] == 0.0f) return QT_ERR_ARG;
    gptq_spec g = {K, block_size, nb, u, cols, symmetric != 0,
                   dynamic != 0, (float)((1 << bits) - 1), (float)(1 << (bits - 1)), bits};
    panel_fn panel = panel_scalar;
    columns_fn columns = columns_scalar;
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_AVX512) {
        panel = panel_avx512;
        columns = columns_avx512;
    } else if (isa >= QT_ISA_AVX2) {
        panel = panel_avx2;
        columns = columns_avx2;
    }
#endif
    float p[SUB][TILE];
    for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
        const int nr = (int)(rows - r0 < TILE ? rows - r0 : TILE);
        /* the tile's rows in quantization order, in the working copy (it stays in cache) */
        for (int64_t r = 0; r < nr; r++)
            for (int64_t i = 0; i < K; i++) work[r * K + i] = w[(r0 + r) * K + cols[i]];
        for (int64_t j1 = 0, j2; j1 < K; j1 = j2) {
            j2 = j1 + SUB < K ? j1 + SUB : K;
            /* dynamic parameters read a whole block: a panel never straddles two blocks,
             * so the block's columns have every earlier column's update when it starts */
            if (dynamic && j2 > (j1 / block_size + 1) * block_size) j2 = (j1 / block_size + 1) * block_size;
            const int n = (int)(j2 - j1);
            for (int r = 0; r < nr; r++) {
                const float *wr = work + r * K;
                if (dynamic && j1 % block_size == 0) {
                    const int64_t grp = j1 / block_size, at = (r0 + r) * g.nb + grp;
                    dynamic_params(&g, wr, j1, scales + at, zero_points ? zero_points + at : NULL);
                }
                for (int i = 0; i < n; i++) p[i][r] = wr[j1 + i];
            }
            columns(&g, p, nr, n, j1, r0, scales, zero_points, codes);
            for (int r = 0; r < nr; r++) {
                float *wr = work + r * K;
                for (int i = 0; i < n; i++) wr[j1 + i] = p[i][r];
                if (j2 < K) panel(wr + j2, wr + j1, n, u + j1 * K + j2, K, K - j2);
            }
        }
    }
    return QT_OK;
}
