"""cffi API-mode build of ``qtool.kernels._qtool_native`` from native/src/*.c.

Run by setuptools through ``setup(cffi_modules=["qtool/kernels/_build.py:ffibuilder"])``;
``python qtool/kernels/_build.py`` builds it in place for development.
"""

from __future__ import annotations

import glob
import os
import sys

from cffi import FFI

_ROOT = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

CDEF = """
#define QT_OK 0
#define QT_ERR_ARG 1
#define QT_ERR_NONFINITE 2
#define QT_ERR_UNSUPPORTED 3
#define QT_ISA_SCALAR 0
#define QT_ISA_AVX2 1
#define QT_ISA_AVX512 2
#define QT_ISA_VNNI 3
typedef enum { QT_U8 = 0, QT_S8 = 1, QT_U4 = 2, QT_S4 = 3, QT_U2 = 4, QT_S2 = 5 } qt_qtype;

const char *qt_strerror(int status);
int qt_isa_supported(void);
int qt_isa_active(void);
int qt_set_isa(int max_level);

int qt_minmax(const float *x, int64_t n, float *out_min, float *out_max);
int qt_histogram(const float *x, int64_t n, float lo, float hi, int64_t *counts, int64_t bins);
int qt_histogram_pow2(const float *x, int64_t n, int k, int64_t start, int64_t *counts,
                      int64_t bins);
int qt_quantize(const float *x, int64_t outer, int64_t axis_len, int64_t inner, int64_t block,
                const float *scale, const int32_t *zero_point, qt_qtype qtype, void *q);
int qt_dequantize(const void *q, int64_t outer, int64_t axis_len, int64_t inner, int64_t block,
                  const float *scale, const int32_t *zero_point, qt_qtype qtype, float *y);
int qt_pack(const void *q, int64_t n, qt_qtype qtype, uint8_t *packed);
int qt_unpack(const uint8_t *packed, int64_t n, qt_qtype qtype, void *q);
int qt_pack_matmulnbits(const uint8_t *q, int64_t N, int64_t K, int64_t block_size, int bits,
                        const uint8_t *zero_points, uint8_t *b);
int qt_unpack_matmulnbits(const uint8_t *b, int64_t N, int64_t K, int64_t block_size, int bits,
                          uint8_t *q);
int qt_pack_zero_points(const uint8_t *zp, int64_t N, int64_t n_blocks, int bits, uint8_t *packed);
int qt_unpack_zero_points(const uint8_t *packed, int64_t N, int64_t n_blocks, int bits, uint8_t *zp);
int qt_block_params_rtn(const float *x, int64_t rows, int64_t cols, int64_t block, qt_qtype qtype,
                        int symmetric, float *scale, int32_t *zero_point);
int qt_block_params_mse(const float *x, int64_t rows, int64_t cols, int64_t block, qt_qtype qtype,
                        int symmetric, int64_t n_grid, float min_shrink, float *scale,
                        int32_t *zero_point);
int qt_quantize_kn(const float *w, int64_t K, int64_t N, int64_t block_size, int bits,
                   int symmetric, uint8_t *b, float *scales, uint8_t *zero_points);
int qt_gemm_u8s8(const uint8_t *A, const int8_t *Bt, int64_t M, int64_t N, int64_t K,
                 int32_t a_zero_point, const int8_t *b_zero_point, int32_t *C);
int qt_requantize(const int32_t *acc, int64_t M, int64_t N, const float *multiplier,
                  int32_t zero_point, qt_qtype qtype, void *out);
int qt_gemm_q4(const float *A, const uint8_t *b, const float *scales, const uint8_t *zero_points,
               int64_t M, int64_t N, int64_t K, int64_t block_size, float *Y);
"""

_unix = sys.platform != "win32"

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "qtool.kernels._qtool_native",
    '#include "qtool.h"',
    sources=sorted(glob.glob(os.path.join(_ROOT, "native", "src", "*.c"))),
    include_dirs=[os.path.join(_ROOT, "native", "include"), os.path.join(_ROOT, "native", "src")],
    # -ffp-contract=off: no FMA contraction, so float results match numpy bit for bit.
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"] if _unix else [],
    libraries=["m"] if _unix else [],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
