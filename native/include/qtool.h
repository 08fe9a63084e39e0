/* qtool.h -- the contract of qtool's native kernel library.
 *
 * Conventions (every function):
 *   - The caller allocates every buffer; no kernel allocates memory.
 *   - Sizes and counts are int64_t; buffers are dense, C order, no strides.
 *   - Each function returns an int status: QT_OK (0) or a QT_ERR_* code;
 *     qt_strerror() turns a code into a sentence.
 *   - On a non-zero status the output buffers are unspecified (partially written),
 *     except the histogram kernels, which leave `counts` as they found it.
 *   - Every kernel has a numpy twin of the same name (minus `qt_`) in
 *     qtool/kernels/reference.py; that twin is the definition, and the scalar path
 *     here matches it bit for bit (float GEMM results: within rounding only).
 *
 * NaN / Inf policy:
 *   Kernels that derive statistics or integer codes from float data (minmax,
 *   histogram, quantize, block_params_*) return QT_ERR_NONFINITE if ANY input
 *   element is NaN or +-Inf, so calibration can say which tensor is broken. Scales
 *   must be finite and non-zero (QT_ERR_ARG otherwise; negative scales are what
 *   symmetric block RTN produces). The float GEMM (qt_gemm_q4) does
 *   not check: NaN in activations propagates to the output, as in onnxruntime.
 *
 * Rounding: round half to even (ONNX QuantizeLinear), i.e. nearbyintf() under the
 * default rounding mode, _MM_FROUND_TO_NEAREST_INT in the vector paths.
 *
 * ISA dispatch: each kernel has a scalar path and vector paths (AVX2+FMA, AVX-512
 * F/BW/VL/DQ, AVX-512 VNNI) chosen at run time from CPU features. qt_set_isa()
 * caps the level (tests force the scalar path with qt_set_isa(QT_ISA_SCALAR)).
 * The env var QTOOL_ISA=scalar|avx2|avx512|vnni does the same at first use.
 */
#ifndef QTOOL_H
#define QTOOL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes ------------------------------------------------------- */
#define QT_OK 0
#define QT_ERR_ARG 1         /* NULL pointer, negative/zero size, bad enum, bad scale */
#define QT_ERR_NONFINITE 2   /* a NaN or +-Inf in float input data */
#define QT_ERR_UNSUPPORTED 3 /* valid request that this build does not implement */

const char *qt_strerror(int status);

/* ---- ISA levels --------------------------------------------------------- */
#define QT_ISA_SCALAR 0
#define QT_ISA_AVX2 1   /* AVX2 + FMA */
#define QT_ISA_AVX512 2 /* AVX-512 F, BW, VL, DQ */
#define QT_ISA_VNNI 3   /* AVX-512 VNNI on top of QT_ISA_AVX512 */

/* Highest level this CPU supports (QT_ISA_SCALAR on non-x86). */
int qt_isa_supported(void);
/* Level the kernels use now: min(supported, cap). */
int qt_isa_active(void);
/* Cap the level (QT_ISA_SCALAR..QT_ISA_VNNI); returns the level now active,
 * or -QT_ERR_ARG for an out-of-range level. */
int qt_set_isa(int max_level);

/* ---- quantized types ---------------------------------------------------- */
/* Unpacked codes are one value per byte: uint8_t for QT_U*, int8_t for QT_S*. */
typedef enum {
    QT_U8 = 0, /* [0, 255]    */
    QT_S8 = 1, /* [-128, 127] */
    QT_U4 = 2, /* [0, 15]     */
    QT_S4 = 3, /* [-8, 7]     */
    QT_U2 = 4, /* [0, 3]      */
    QT_S2 = 5  /* [-2, 1]     */
} qt_qtype;

/* ---- 1. statistics ------------------------------------------------------ */

/* min and max over x[0..n). n >= 1. */
int qt_minmax(const float *x, int64_t n, float *out_min, float *out_max);

/* counts[b] += number of x with bin b, for bins over [lo, hi]:
 *   b = clamp(floor(((x - lo) / (hi - lo)) * bins), 0, bins - 1)
 * evaluated in float32 in exactly that order. x == hi lands in the last bin,
 * values outside [lo, hi] are clamped into the edge bins (the caller grows the range
 * first). Requires lo < hi, hi - lo finite, 1 <= bins <= 2^24.
 * On QT_ERR_NONFINITE, counts is left unchanged. */
int qt_histogram(const float *x, int64_t n, float lo, float hi, int64_t *counts,
                 int64_t bins);

/* The same on the power-of-two grid calibration uses (bin width 2^k, first bin `start`):
 *   b = clamp(floor(x * 2^-k) - start, 0, bins - 1)
 * in float32 in exactly that order ((float)start subtracted). Scaling by 2^-k is exact
 * unless the product is subnormal or overflows; it is rounded as IEEE multiplication
 * rounds it. Requires -127 <= k <= 126 (2^-k a normal float32), start exactly
 * representable in float32 and |start| <= 2^62, 1 <= bins <= 2^24.
 * On QT_ERR_NONFINITE, counts is left unchanged. */
int qt_histogram_pow2(const float *x, int64_t n, int k, int64_t start, int64_t *counts,
                      int64_t bins);

/* qt_minmax and qt_histogram_pow2 in one pass over x: out_min/out_max as qt_minmax
 * reports them, and counts updated as qt_histogram_pow2 would, but only when every value
 * lies in [lo, hi] (lo <= out_min and out_max <= hi); otherwise counts is left unchanged
 * (the caller moves its grid first, then counts). n >= 1; lo <= hi, both finite; the
 * grid arguments as for qt_histogram_pow2. On QT_ERR_NONFINITE, counts is unchanged. */
int qt_minmax_histogram_pow2(const float *x, int64_t n, int k, int64_t start, int64_t *counts,
                             int64_t bins, float lo, float hi, float *out_min, float *out_max);

/* ---- 2. quantize / dequantize -------------------------------------------
 * x is viewed as [outer, axis_len, inner]; the quantization axis is the middle one.
 *   block == 0: per-axis; scale/zero_point have axis_len entries.
 *               (per-tensor: outer = 1, axis_len = 1, inner = n.)
 *   block >= 1: block-wise, blocks of `block` along the axis (the last block may be
 *               short); scale/zero_point are [outer, ceil(axis_len/block), inner].
 * quantize:   q = saturate(round_half_even(x / scale) + zero_point)   (float32 divide)
 * dequantize: y = (float)(q - zero_point) * scale                     (float32)
 * zero_point may be NULL (all zero). q is uint8_t or int8_t, one code per byte. */
int qt_quantize(const float *x, int64_t outer, int64_t axis_len, int64_t inner,
                int64_t block, const float *scale, const int32_t *zero_point,
                qt_qtype qtype, void *q);
int qt_dequantize(const void *q, int64_t outer, int64_t axis_len, int64_t inner,
                  int64_t block, const float *scale, const int32_t *zero_point,
                  qt_qtype qtype, float *y);

/* ---- 3. packing ----------------------------------------------------------
 * ONNX layout (INT4/UINT4, INT2/UINT2 tensors): element i sits in byte i*bits/8 at
 * bit offset (i*bits)%8 -- the first element in the LOW bits. An incomplete last byte
 * is padded with zero bits. Codes are masked to `bits` when packing (an s4 value -1
 * packs as 0xF) and sign-extended when unpacking a signed type.
 * packed has ceil(n*bits/8) bytes. qtype must be a 2- or 4-bit type (8-bit: a copy). */
int qt_pack(const void *q, int64_t n, qt_qtype qtype, uint8_t *packed);
int qt_unpack(const uint8_t *packed, int64_t n, qt_qtype qtype, void *q);

/* com.microsoft MatMulNBits layout. The logical weight is W[K, N]; the caller passes
 * its codes TRANSPOSED, q[N, K] (one unsigned code in [0, 2^bits) per byte).
 *   n_blocks  = ceil(K / block_size), blob_size = block_size * bits / 8
 *   b[N, n_blocks, blob_size]: each block's codes along K, packed low bits first.
 *   K is padded to n_blocks*block_size with the block's zero point (the padded rows
 *   are zero-valued weights). zero_points: unpacked uint8 [N, n_blocks], or NULL for
 *   the default 2^(bits-1).
 * bits in {2, 4, 8}; block_size a power of two >= 16. */
int qt_pack_matmulnbits(const uint8_t *q, int64_t N, int64_t K, int64_t block_size,
                        int bits, const uint8_t *zero_points, uint8_t *b);
/* Inverse: b[N, n_blocks, blob_size] -> q[N, K] (padding dropped). */
int qt_unpack_matmulnbits(const uint8_t *b, int64_t N, int64_t K, int64_t block_size,
                          int bits, uint8_t *q);
/* MatMulNBits zero points: zp[N, n_blocks] (one code per byte) <->
 * packed[N, ceil(n_blocks*bits/8)], each row packed low bits first, zero padded. */
int qt_pack_zero_points(const uint8_t *zp, int64_t N, int64_t n_blocks, int bits,
                        uint8_t *packed);
int qt_unpack_zero_points(const uint8_t *packed, int64_t N, int64_t n_blocks, int bits,
                          uint8_t *zp);

/* ---- 4. block-wise quantization parameters --------------------------------
 * x[rows, cols], blocks of `block` along cols (last block may be short);
 * outputs scale[rows, nb] (float32) and zero_point[rows, nb] (int32), nb =
 * ceil(cols/block). lo = min(min x, 0), hi = max(max x, 0); in double, rounded to
 * float32 once (the rule of qt_quantize_kn; half = 2^(bits-1)):
 *   symmetric:  m = hi >= -lo ? hi : lo (the signed extreme); scale = -m / half;
 *               zero_point = 0 (signed type) or half (unsigned type). The extreme lands
 *               on code qmin, all 2^bits levels are used, and the scale is NEGATIVE
 *               when m > 0 (DequantizeLinear and MatMulNBits only multiply by it).
 *   asymmetric: scale = (hi - lo) / (qmax - qmin);
 *               zero_point = clamp(round_half_even(qmin - lo / scale), qmin, qmax)
 *   A scale that comes out 0 (all-zero block, or underflow) is replaced by 1.0. */
int qt_block_params_rtn(const float *x, int64_t rows, int64_t cols, int64_t block,
                        qt_qtype qtype, int symmetric, float *scale,
                        int32_t *zero_point);

/* Like qt_block_params_rtn, but for each block tries the range shrunk by
 *   f_j = (float)(1 - j * (1 - min_shrink) / (n_grid - 1)),  j = 0..n_grid-1
 * (lo -> f_j*lo and hi -> f_j*hi in float32, then the rule above) and keeps the f_j whose
 * quantize->dequantize error sum((x - y)^2) is least (first j on ties). The error of
 * an element is computed in float32 and summed in double. n_grid >= 1,
 * 0 < min_shrink <= 1. */
int qt_block_params_mse(const float *x, int64_t rows, int64_t cols, int64_t block,
                        qt_qtype qtype, int symmetric, int64_t n_grid, float min_shrink,
                        float *scale, int32_t *zero_point);

/* RTN straight from a MatMul weight to MatMulNBits, fused (one pass over w):
 * w: float32 W[K, N] row-major (blocks of block_size along K, per output column n;
 * the last block may be short). n_blocks = ceil(K / block_size).
 * Per block, lo = min(min x, 0), hi = max(max x, 0) (float32), then in double rounded
 * once to float32 (half = 2^(bits-1), qmax = 2^bits - 1):
 *   symmetric:  m = hi >= -lo ? hi : lo (the signed extreme);  scale = -m / half;
 *               z = half. The extreme lands on code 0 and all 2^bits levels are used;
 *               the scale is NEGATIVE when m > 0 (MatMulNBits only multiplies by it).
 *   asymmetric: scale = (hi - lo) / qmax; z = clamp(round_half_even(-lo / scale), 0, qmax)
 *   A scale that comes out 0 becomes 1.0.
 * codes: q = clamp(round_half_even(x / scale) + z, 0, qmax)   (float32 divide)
 * Outputs (qt_pack_matmulnbits layout, K padded with each block's z):
 *   b[N, n_blocks, block_size*bits/8], scales[N, n_blocks],
 *   zero_points packed uint8 [N, ceil(n_blocks*bits/8)] (asymmetric only; not written,
 *   and may be NULL, when symmetric: the op's default 2^(bits-1) is the z used).
 * bits in {2, 4, 8}; block_size a power of two in [16, 256].
 * w need not be aligned (any byte offset: a weight mapped from a protobuf file).
 * QT_ERR_NONFINITE on NaN/Inf in w. */
int qt_quantize_kn(const float *w, int64_t K, int64_t N, int64_t block_size, int bits,
                   int symmetric, uint8_t *b, float *scales, uint8_t *zero_points);

/* ---- 5. int8 GEMM ----------------------------------------------------------
 * C[m, n] = sum_k (A[m, k] - a_zero_point) * (Bt[n, k] - b_zero_point[n])
 * A: uint8 [M, K]. B is passed TRANSPOSED, Bt: int8 [N, K] (each output channel's
 * weights contiguous). b_zero_point: int8 [N] or NULL (all zero). C: int32 [M, N],
 * exact; wraps modulo 2^32 on overflow (cannot happen for K < 2^15). */
int qt_gemm_u8s8(const uint8_t *A, const int8_t *Bt, int64_t M, int64_t N, int64_t K,
                 int32_t a_zero_point, const int8_t *b_zero_point, int32_t *C);

/* out[m, n] = saturate(round_half_even((float)acc[m, n] * multiplier[n]) + zero_point)
 * acc: int32 [M, N]; multiplier: float32 [N]; out: uint8/int8 [M, N] (QT_U8/QT_S8). */
int qt_requantize(const int32_t *acc, int64_t M, int64_t N, const float *multiplier,
                  int32_t zero_point, qt_qtype qtype, void *out);

/* ---- 6. 4-bit block GEMM (MatMulNBits, bits = 4) ------------------------------
 * Y[m, n] = sum_k A[m, k] * W[k, n], W[k, n] = (float)(q[n, k] - zp[n, k/bs]) * scale[n, k/bs]
 * A: float32 [M, K]; b: uint8 [N, n_blocks, block_size/2] (qt_pack_matmulnbits layout);
 * scales: float32 [N, n_blocks]; zero_points: packed uint8 [N, ceil(n_blocks/2)] or
 * NULL (8). Y: float32 [M, N]. Summation order differs between paths: compare with
 * a tolerance. block_size a power of two >= 16. */
int qt_gemm_q4(const float *A, const uint8_t *b, const float *scales,
               const uint8_t *zero_points, int64_t M, int64_t N, int64_t K,
               int64_t block_size, float *Y);

/* ---- 7. GPTQ ------------------------------------------------------------------
 * GPTQ on the rows of w[rows, K] (float32, row-major, original column order). u: float32
 * [K, K], the upper Cholesky factor of the damped inverse Hessian in quantization order
 * (only the upper triangle is read; the diagonal must be finite and non-zero). cols:
 * int64 [K], the original column quantized at position i. For each row, with x = the
 * row in quantization order (x[i] = w[r, cols[i]]), for i = 0..K-1 in order, with
 * g = cols[i] / block_size, half = 2^(bits-1), qmax = 2^bits - 1, z = half (symmetric)
 * or zero_points[r, g]:
 *   q = clamp(round_half_even(x[i] / s) + z, 0, qmax)         s = scales[r, g]
 *   codes[r, cols[i]] = q;  e = (x[i] - (q - z) * s) / u[i, i]
 *   x[t] = x[t] - e * u[i, t]  for t > i   (float32, product rounded, no FMA)
 * dynamic == 0: scales[rows, nb] (and zero_points[rows, nb] when asymmetric) are inputs
 * (finite, non-zero scales). dynamic != 0: cols must be 0..K-1 and the block parameters
 * are outputs, taken when position i starts a block from the row's current
 * x[i : i + block_size] by the RTN rule of qt_block_params_rtn. zero_points is NULL
 * exactly when symmetric. codes: uint8 [rows, K] in original column order. bits in
 * [2, 8]. work: float32 [min(rows, QT_GPTQ_TILE), K], scratch (rows are processed in
 * tiles of QT_GPTQ_TILE). Every element is updated in the order above whatever the vector
 * path, so all paths agree bit for bit. QT_ERR_NONFINITE on NaN/Inf in w. */
#define QT_GPTQ_TILE 32
int qt_gptq_rows(const float *w, int64_t rows, int64_t K, const float *u, const int64_t *cols,
                 int64_t block_size, int bits, int symmetric, int dynamic, float *scales,
                 uint8_t *zero_points, uint8_t *codes, float *work);

/* AWQ's residual of one candidate scale: out = w - dequantize(rtn(w * s)) / s, float32
 * [rows, cols], s [cols] (finite, non-zero). Per row and block of `block` columns of
 * x = w * s (float32 products): scale, zero point from the block range by the RTN rule of
 * qt_block_params_rtn (unsigned bits-wide codes, bits in [2, 8]); q = clamp(round_half_even(
 * x / scale) + zp, 0, 2^bits - 1); out = w - (((float)(q - zp)) * scale) / s. The same float32
 * operations as quantize, dequantize and numpy's division and subtraction, so every path
 * agrees bit for bit with reference.awq_residual. QT_ERR_NONFINITE on NaN/Inf in w * s. */
int qt_awq_residual(const float *w, int64_t rows, int64_t cols, const float *s, int64_t block,
                    int bits, int symmetric, float *out);

#ifdef __cplusplus
}
#endif

#endif /* QTOOL_H */
