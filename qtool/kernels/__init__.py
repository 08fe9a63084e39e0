"""Kernels for calibration and conversion, on the native library or on numpy.

Every function below has a numpy twin of the same name in ``qtool.kernels.reference``
(the definition) and, when the cffi extension was built at install time, a C kernel
``qt_<name>`` in native/ (see native/include/qtool.h). The C paths are held to the twins
bit for bit (float GEMMs within rounding) by tests/test_kernels.py.

Backend: ``BACKEND`` is "native" or "numpy". ``QTOOL_NATIVE=0`` forces numpy;
``use_backend("numpy")`` switches for a block of code (tests, benchmarks).
``isa_paths()`` lists the native vector paths in use; ``QTOOL_ISA=scalar|avx2|avx512|vnni``
or ``use_isa(...)`` caps them.

Errors: bad arguments raise ``KernelArgumentError``, NaN/Inf in float input to a
statistics or quantization kernel raises ``NonFiniteError`` (with ``.index``), both
subclasses of ``qtool.errors.NativeError``; both backends raise the same errors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

from qtool.errors import NativeError
from qtool.kernels import reference
from qtool.kernels._common import (
    QTYPES,
    KernelArgumentError,
    NonFiniteError,
    arg_error,
    check_gptq,
    nbits_check,
    qtype_info,
    quant_geometry,
    quant_params,
    raise_nonfinite,
)

try:
    from qtool.kernels._qtool_native import ffi as _ffi
    from qtool.kernels._qtool_native import lib as _lib
except ImportError:  # extension not built: numpy only
    _ffi = _lib = None

__all__ = [
    "BACKEND", "ISA_LEVELS", "KernelArgumentError", "NonFiniteError", "QTYPES",
    "native_available", "isa_paths", "use_backend", "use_isa",
    "minmax", "histogram", "histogram_pow2", "minmax_histogram_pow2", "quantize", "dequantize", "pack", "unpack",
    "pack_matmulnbits", "unpack_matmulnbits", "pack_zero_points", "unpack_zero_points",
    "block_params_rtn", "block_params_mse", "gemm_u8s8", "requantize", "gemm_q4",
    "quantize_matmulnbits", "quantize_kn", "gptq_rows", "awq_residual",
]

ISA_LEVELS = ("scalar", "avx2", "avx512", "vnni")

BACKEND = "native" if _lib is not None and os.environ.get("QTOOL_NATIVE", "1") != "0" else "numpy"


def native_available() -> bool:
    """True if the C extension was built and imported."""
    return _lib is not None


def isa_paths() -> list[str]:
    """Native code paths in use, e.g. ["scalar", "avx2", "avx512", "vnni"]; [] on numpy."""
    if BACKEND != "native":
        return []
    return list(ISA_LEVELS[: _lib.qt_isa_active() + 1])


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block on "native" or "numpy" kernels (KernelArgumentError if unavailable)."""
    global BACKEND
    if name not in ("native", "numpy") or (name == "native" and _lib is None):
        raise arg_error("use_backend", f"backend {name!r} is not available")
    saved, BACKEND = BACKEND, name
    try:
        yield
    finally:
        BACKEND = saved


@contextlib.contextmanager
def use_isa(level: str) -> Iterator[None]:
    """Cap the native vector paths for a block ("scalar", "avx2", "avx512", "vnni")."""
    if _lib is None or level not in ISA_LEVELS:
        raise arg_error("use_isa", f"ISA level {level!r} is not available")
    saved = _lib.qt_isa_active()
    # the cap, not the active level, is what we restore: re-read it through set_isa
    _lib.qt_set_isa(ISA_LEVELS.index(level))
    try:
        yield
    finally:
        _lib.qt_set_isa(max(saved, 0))


def _native() -> bool:
    return BACKEND == "native"


def _buf(ctype: str, arr: np.ndarray):
    return _ffi.from_buffer(ctype, arr, require_writable=False)


def _check(status: int, kernel: str, x: np.ndarray | None = None) -> None:
    if status == 0:
        return
    if status == _lib.QT_ERR_NONFINITE and x is not None:
        raise_nonfinite(kernel, x)
    msg = _ffi.string(_lib.qt_strerror(status)).decode()
    raise NativeError(f"{kernel}: native kernel failed: {msg}", hint="this is a bug in qtool; "
                      "rerun with QTOOL_NATIVE=0 to use the numpy kernels")


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# ---- 1. statistics ----------------------------------------------------------------


def minmax(x: np.ndarray) -> tuple[float, float]:
    """(min(x), max(x)) of a non-empty float32 tensor; -0.0 reported as 0.0.
    NonFiniteError on NaN/Inf. Used by min/max calibration observers."""
    if not _native():
        return reference.minmax(x)
    x = _f32(x)
    if x.size == 0:
        raise arg_error("minmax", "empty tensor has no min/max")
    out = _ffi.new("float[2]")
    _check(_lib.qt_minmax(_buf("float[]", x), x.size, out, out + 1), "minmax", x)
    return float(out[0]), float(out[1])


def histogram(x: np.ndarray, lo: float, hi: float, counts: np.ndarray) -> np.ndarray:
    """Add x's counts to ``counts`` (int64 [bins], in place) and return it:
    bin = clamp(floor(((x - lo) / (hi - lo)) * bins), 0, bins-1) in float32; x == hi in
    the last bin, outside values in the edge bins. On NaN/Inf: NonFiniteError and counts
    unchanged."""
    if not _native():
        return reference.histogram(x, lo, hi, counts)
    bins = reference.check_histogram(counts, lo, hi)
    x = _f32(x)
    st = _lib.qt_histogram(_buf("float[]", x), x.size, float(np.float32(lo)),
                           float(np.float32(hi)), _ffi.from_buffer("int64_t[]", counts), bins)
    _check(st, "histogram", x)
    return counts


def histogram_pow2(x: np.ndarray, k: int, start: int, counts: np.ndarray) -> np.ndarray:
    """Add x's counts on the power-of-two grid to ``counts`` (int64 [bins], in place) and
    return it: bin = clamp(floor(x * 2^-k) - start, 0, bins-1) in float32 (bin j covers
    [(start + j) * 2^k, (start + j + 1) * 2^k)). Used by the calibration histograms.
    On NaN/Inf: NonFiniteError and counts unchanged."""
    if not _native():
        return reference.histogram_pow2(x, k, start, counts)
    bins = reference.check_histogram_pow2(counts, k, start)
    x = _f32(x)
    st = _lib.qt_histogram_pow2(_buf("float[]", x), x.size, int(k), int(start),
                                _ffi.from_buffer("int64_t[]", counts), bins)
    _check(st, "histogram_pow2", x)
    return counts


def minmax_histogram_pow2(x: np.ndarray, k: int, start: int, counts: np.ndarray, lo, hi) -> tuple:
    """``minmax(x)`` and, only if every value lies in [lo, hi], ``histogram_pow2(x, k,
    start, counts)`` in one pass over x: (min, max, counted). NaN/Inf: NonFiniteError."""
    name = "minmax_histogram_pow2"
    if not _native():
        return reference.minmax_histogram_pow2(x, k, start, counts, lo, hi)
    bins = reference.check_histogram_pow2(counts, k, start, name)
    (lo32, hi32), x, out = reference.check_bounds(name, lo, hi), _f32(x), _ffi.new("float[2]")
    if x.size == 0:
        raise arg_error(name, "empty tensor has no min/max")
    st = _lib.qt_minmax_histogram_pow2(_buf("float[]", x), x.size, int(k), int(start),
                                       _ffi.from_buffer("int64_t[]", counts), bins,
                                       float(lo32), float(hi32), out, out + 1)
    _check(st, name, x)
    return float(out[0]), float(out[1]), bool(lo32 <= out[0] and out[1] <= hi32)


# ---- 2. quantize / dequantize ----------------------------------------------------


def quantize(x, scale, zero_point=None, *, qtype: str = "u8", axis: int | None = None,
             block_size: int = 0) -> np.ndarray:
    """q = saturate(rint(x / scale) + zero_point) (ONNX QuantizeLinear, float32 divide).

    Per-tensor (axis None), per-axis (scale [x.shape[axis]]) or block-wise along axis
    (block_size > 0; scale shaped like x with that dim ceil(dim / block_size)).
    Returns codes of x's shape, one per byte: uint8 for u8/u4/u2, int8 for s8/s4/s2.
    """
    if not _native():
        return reference.quantize(x, scale, zero_point, qtype=qtype, axis=axis, block_size=block_size)
    x = _f32(x)
    _, _, _, _, dt = qtype_info(qtype)
    geo = quant_geometry("quantize", x.shape, axis, block_size)
    s, z = quant_params("quantize", geo, scale, zero_point, qtype)
    q = np.empty(x.shape, dtype=dt)
    st = _lib.qt_quantize(_buf("float[]", x), geo.outer, geo.axis_len, geo.inner, geo.block,
                          _buf("float[]", s), _ffi.NULL if z is None else _buf("int32_t[]", z),
                          QTYPES[qtype][2], _ffi.from_buffer(q))
    _check(st, "quantize", x)
    return q


def dequantize(q, scale, zero_point=None, *, qtype: str = "u8", axis: int | None = None,
               block_size: int = 0) -> np.ndarray:
    """y = float32(q - zero_point) * scale (ONNX DequantizeLinear); layouts as quantize."""
    if not _native():
        return reference.dequantize(q, scale, zero_point, qtype=qtype, axis=axis, block_size=block_size)
    _, _, _, _, dt = qtype_info(qtype)
    q = np.asarray(q)
    if q.dtype != dt:
        raise arg_error("dequantize", f"codes of {qtype} must be {dt}, got {q.dtype}")
    q = np.ascontiguousarray(q)
    geo = quant_geometry("dequantize", q.shape, axis, block_size)
    s, z = quant_params("dequantize", geo, scale, zero_point, qtype)
    y = np.empty(q.shape, dtype=np.float32)
    st = _lib.qt_dequantize(_ffi.from_buffer(q), geo.outer, geo.axis_len, geo.inner, geo.block,
                            _buf("float[]", s), _ffi.NULL if z is None else _buf("int32_t[]", z),
                            QTYPES[qtype][2], _ffi.from_buffer("float[]", y))
    _check(st, "dequantize")
    return y


# ---- 3. packing ------------------------------------------------------------------


def pack(q, qtype: str) -> np.ndarray:
    """ONNX INT4/UINT4/INT2/UINT2 layout of the flattened codes: element i in byte
    i*bits//8 at bit (i*bits) % 8 (first element in the low bits), zero padded;
    codes masked to `bits`. Returns uint8 [ceil(n*bits/8)]."""
    if not _native():
        return reference.pack(q, qtype)
    bits, _, _, _, dt = qtype_info(qtype)
    q = np.asarray(q)
    if q.dtype != dt:
        raise arg_error("pack", f"codes of {qtype} must be {dt}, got {q.dtype}")
    q = np.ascontiguousarray(q)
    out = np.empty(-(-q.size * bits // 8), dtype=np.uint8)
    _check(_lib.qt_pack(_ffi.from_buffer(q), q.size, QTYPES[qtype][2], _ffi.from_buffer(out)), "pack")
    return out


def unpack(packed, n: int, qtype: str) -> np.ndarray:
    """Inverse of pack: the first n codes, one per byte, sign-extended for s* types."""
    if not _native():
        return reference.unpack(packed, n, qtype)
    bits, _, _, _, dt = qtype_info(qtype)
    p = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if p.size < -(-n * bits // 8):
        raise arg_error("unpack", f"{p.size} bytes cannot hold {n} {qtype} codes")
    out = np.empty(n, dtype=dt)
    _check(_lib.qt_unpack(_buf("uint8_t[]", p), n, QTYPES[qtype][2], _ffi.from_buffer(out)), "unpack")
    return out


def pack_matmulnbits(q, bits: int, block_size: int, zero_points=None) -> np.ndarray:
    """com.microsoft MatMulNBits weight: codes q uint8 [N, K] (W transposed) -> uint8
    [N, ceil(K/block_size), block_size*bits/8], blocks along K packed low bits first,
    K padded with the block's zero point (zero_points uint8 [N, n_blocks] or None for
    2**(bits-1))."""
    if not _native():
        return reference.pack_matmulnbits(q, bits, block_size, zero_points)
    nbits_check("pack_matmulnbits", bits, block_size)
    q = np.asarray(q)
    if q.dtype != np.uint8 or q.ndim != 2:
        raise arg_error("pack_matmulnbits", "q must be uint8 [N, K]")
    q = np.ascontiguousarray(q)
    n, k = q.shape
    nb = -(-k // block_size)
    zp = None if zero_points is None else np.ascontiguousarray(
        reference.zero_points_or_default(zero_points, n, nb, bits))
    b = np.empty((n, nb, block_size * bits // 8), dtype=np.uint8)
    st = _lib.qt_pack_matmulnbits(_buf("uint8_t[]", q), n, k, block_size, bits,
                                  _ffi.NULL if zp is None else _buf("uint8_t[]", zp), _ffi.from_buffer(b))
    _check(st, "pack_matmulnbits")
    return b


def unpack_matmulnbits(b, K: int, bits: int, block_size: int) -> np.ndarray:
    """Inverse of pack_matmulnbits: b [N, n_blocks, blob] -> codes uint8 [N, K]."""
    if not _native():
        return reference.unpack_matmulnbits(b, K, bits, block_size)
    nbits_check("unpack_matmulnbits", bits, block_size)
    b = np.ascontiguousarray(b, dtype=np.uint8)
    nb = -(-K // block_size)
    if b.ndim != 3 or b.shape[1:] != (nb, block_size * bits // 8):
        raise arg_error("unpack_matmulnbits", f"b must be [N, {nb}, {block_size * bits // 8}]")
    q = np.empty((b.shape[0], K), dtype=np.uint8)
    _check(_lib.qt_unpack_matmulnbits(_buf("uint8_t[]", b), b.shape[0], K, block_size, bits,
                                      _ffi.from_buffer(q)), "unpack_matmulnbits")
    return q


def pack_zero_points(zp, bits: int) -> np.ndarray:
    """MatMulNBits zero points uint8 [N, n_blocks] -> uint8 [N * ceil(n_blocks*bits/8)]."""
    if not _native():
        return reference.pack_zero_points(zp, bits)
    zp = np.asarray(zp)
    if zp.dtype != np.uint8 or zp.ndim != 2:
        raise arg_error("pack_zero_points", "zero points must be uint8 [N, n_blocks]")
    nbits_check("pack_zero_points", bits, 16)
    zp = np.ascontiguousarray(zp)
    out = np.empty(zp.shape[0] * (-(-zp.shape[1] * bits // 8)), dtype=np.uint8)
    _check(_lib.qt_pack_zero_points(_buf("uint8_t[]", zp), zp.shape[0], zp.shape[1], bits,
                                    _ffi.from_buffer(out)), "pack_zero_points")
    return out


def unpack_zero_points(packed, N: int, n_blocks: int, bits: int) -> np.ndarray:
    """Inverse of pack_zero_points -> uint8 [N, n_blocks]."""
    if not _native():
        return reference.unpack_zero_points(packed, N, n_blocks, bits)
    nbits_check("unpack_zero_points", bits, 16)
    p = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if p.size != N * (-(-n_blocks * bits // 8)):
        raise arg_error("unpack_zero_points", f"expected {N * (-(-n_blocks * bits // 8))} bytes")
    out = np.empty((N, n_blocks), dtype=np.uint8)
    _check(_lib.qt_unpack_zero_points(_buf("uint8_t[]", p), N, n_blocks, bits,
                                      _ffi.from_buffer(out)), "unpack_zero_points")
    return out


# ---- 4. block-wise parameters ---------------------------------------------------


def _block_params(kernel, x, block_size, qtype, symmetric, n_grid, min_shrink):
    x = np.asarray(x)
    if x.ndim != 2 or block_size < 1:
        raise arg_error(kernel, "x must be [rows, cols] and block_size >= 1")
    if n_grid < 1 or not 0.0 < float(np.float32(min_shrink)) <= 1.0:
        raise arg_error(kernel, "need n_grid >= 1 and 0 < min_shrink <= 1")
    qtype_info(qtype)
    x = _f32(x)
    rows, cols = x.shape
    nb = -(-cols // block_size)
    s = np.empty((rows, nb), dtype=np.float32)
    z = np.empty((rows, nb), dtype=np.int32)
    st = _lib.qt_block_params_mse(_buf("float[]", x), rows, cols, block_size, QTYPES[qtype][2],
                                  int(bool(symmetric)), n_grid, float(np.float32(min_shrink)),
                                  _ffi.from_buffer("float[]", s), _ffi.from_buffer("int32_t[]", z))
    _check(st, kernel, x)
    return s, z


def block_params_rtn(x, block_size: int, qtype: str, symmetric: bool):
    """Round-to-nearest (scale float32 [rows, nb], zero_point int32 [rows, nb]) for blocks
    of block_size along the last axis of x [rows, cols]; lo = min(min x, 0),
    hi = max(max x, 0), in double rounded once to float32 (reference.range_params):
      symmetric:  scale = -m / 2**(bits-1), m the signed extreme (negative when m > 0),
                  zp = 0 (s*) or 2**(bits-1) (u*)
      asymmetric: scale = (hi - lo) / (qmax - qmin), zp = clamp(rint(qmin - lo / scale))
    A zero scale becomes 1.0. NonFiniteError on NaN/Inf."""
    if not _native():
        return reference.block_params_rtn(x, block_size, qtype, symmetric)
    return _block_params("block_params_rtn", x, block_size, qtype, symmetric, 1, 1.0)


def block_params_mse(x, block_size: int, qtype: str, symmetric: bool, n_grid: int = 20,
                     min_shrink: float = 0.5):
    """Like block_params_rtn, but per block keeps the range shrink
    f_j = 1 - j*(1 - min_shrink)/(n_grid - 1), j = 0..n_grid-1, with the least squared
    quantize->dequantize error (first j on ties)."""
    if not _native():
        return reference.block_params_mse(x, block_size, qtype, symmetric, n_grid, min_shrink)
    return _block_params("block_params_mse", x, block_size, qtype, symmetric, n_grid, min_shrink)


def quantize_kn(w, bits: int, block_size: int, symmetric: bool):
    """RTN of a MatMul weight W[K, N] (float32, blocks along K) fused into MatMulNBits
    tensors: (b uint8 [N, n_blocks, block_size*bits/8], scales float32 [N, n_blocks],
    zero_points packed uint8 [N, ceil(n_blocks*bits/8)] or None when symmetric).
    Symmetric: scale = -m / 2**(bits-1) with m the block's signed extreme, z = 2**(bits-1);
    asymmetric: scale = (hi - lo) / qmax, z = clamp(rint(-lo / scale)); formulas in
    reference.quantize_kn. One pass over w, no float transpose; releases the GIL. w may
    be misaligned (a weight mapped out of a protobuf): it is read in place, not copied."""
    if not _native():
        return reference.quantize_kn(w, bits, block_size, symmetric)
    w = np.ascontiguousarray(reference.check_kn(w, bits, block_size))
    k, n = w.shape
    nb = -(-k // block_size)
    b = np.empty((n, nb, block_size * bits // 8), dtype=np.uint8)
    s = np.empty((n, nb), dtype=np.float32)
    zp = None if symmetric else np.empty((n, -(-nb * bits // 8)), dtype=np.uint8)
    st = _lib.qt_quantize_kn(_buf("float[]", w), k, n, block_size, bits, int(bool(symmetric)),
                             _ffi.from_buffer(b), _ffi.from_buffer("float[]", s),
                             _ffi.NULL if zp is None else _ffi.from_buffer(zp))
    _check(st, "quantize_kn", w)
    return b, s, zp


# ---- 5. int8 GEMM -----------------------------------------------------------------


def gemm_u8s8(a, b_t, a_zero_point: int = 0, b_zero_point=None) -> np.ndarray:
    """C[m, n] = sum_k (a[m, k] - a_zero_point) * (b_t[n, k] - b_zero_point[n]), exact int32.
    a uint8 [M, K]; b_t int8 [N, K] (B transposed: one row per output channel);
    b_zero_point int8 [N] or None. Single-threaded; VNNI when the CPU has it."""
    if not _native():
        return reference.gemm_u8s8(a, b_t, a_zero_point, b_zero_point)
    a, b_t, zb = reference.check_gemm(a, b_t, a_zero_point, b_zero_point)
    a, b_t = np.ascontiguousarray(a), np.ascontiguousarray(b_t)
    c = np.empty((a.shape[0], b_t.shape[0]), dtype=np.int32)
    zbp = _ffi.NULL if b_zero_point is None else _buf("int8_t[]", np.ascontiguousarray(zb))
    st = _lib.qt_gemm_u8s8(_buf("uint8_t[]", a), _buf("int8_t[]", b_t), a.shape[0], b_t.shape[0],
                           a.shape[1], int(a_zero_point), zbp, _ffi.from_buffer("int32_t[]", c))
    _check(st, "gemm_u8s8")
    return c


def requantize(acc, multiplier, zero_point: int, qtype: str = "u8") -> np.ndarray:
    """out = saturate(rint(float32(acc) * multiplier[n]) + zero_point) for acc int32
    [M, N], multiplier float32 [N]; qtype u8 or s8."""
    if not _native():
        return reference.requantize(acc, multiplier, zero_point, qtype)
    acc, mult = reference.check_requantize(acc, multiplier, zero_point, qtype)
    acc = np.ascontiguousarray(acc)
    out = np.empty(acc.shape, dtype=qtype_info(qtype)[4])
    st = _lib.qt_requantize(_buf("int32_t[]", acc), acc.shape[0], acc.shape[1], _buf("float[]", mult),
                            int(zero_point), QTYPES[qtype][2], _ffi.from_buffer(out))
    _check(st, "requantize")
    return out


# ---- 6. 4-bit block GEMM ----------------------------------------------------------


def gemm_q4(a, b, scales, zero_points, K: int, block_size: int) -> np.ndarray:
    """Y = a @ W with W[k, n] = float32(q[n, k] - zp[n, k//bs]) * scales[n, k//bs]: the
    MatMulNBits (bits=4) product. a float32 [M, K]; b uint8 [N, n_blocks, block_size/2];
    scales float32 [N * n_blocks]; zero_points packed uint8 [N * ceil(n_blocks/2)] or None
    (8). Returns float32 [M, N]. Single-threaded."""
    if not _native():
        return reference.gemm_q4(a, b, scales, zero_points, K, block_size)
    a, b, s, zp = reference.check_q4(a, b, scales, zero_points, K, block_size)
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    y = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    st = _lib.qt_gemm_q4(_buf("float[]", a), _buf("uint8_t[]", b), _buf("float[]", s),
                         _ffi.NULL if zp is None else _buf("uint8_t[]", zp), a.shape[0], b.shape[0],
                         K, block_size, _ffi.from_buffer("float[]", y))
    _check(st, "gemm_q4")
    return y


# ---- 7. GPTQ ----------------------------------------------------------------------


def gptq_rows(w, u, cols, block_size: int, bits: int, symmetric: bool, dynamic: bool, scales,
              zero_points=None) -> np.ndarray:
    """GPTQ on the rows of w [rows, K] (float32) with u the upper Cholesky factor of the
    damped inverse Hessian in quantization order and cols the original column of each
    position -> codes uint8 [rows, K] in original order. Block parameters scales/zero_points [rows, nb] are inputs, or
    outputs when ``dynamic`` (formulas in reference.gptq_rows). Single-threaded;
    releases the GIL."""
    if not _native():
        return reference.gptq_rows(w, u, cols, block_size, bits, symmetric, dynamic, scales, zero_points)
    w, u, cols = check_gptq(w, u, cols, block_size, bits, symmetric, dynamic, scales, zero_points)
    codes = np.empty(w.shape, dtype=np.uint8)
    work = np.empty((min(w.shape[0], _lib.QT_GPTQ_TILE), w.shape[1]), dtype=np.float32)
    st = _lib.qt_gptq_rows(_buf("float[]", w), w.shape[0], w.shape[1], _buf("float[]", u), _buf("int64_t[]", cols),
                           block_size, bits, int(bool(symmetric)), int(bool(dynamic)), _ffi.from_buffer("float[]", scales),
                           _ffi.NULL if zero_points is None else _ffi.from_buffer(zero_points), _ffi.from_buffer(codes),
                           _ffi.from_buffer("float[]", work))
    _check(st, "gptq_rows", w)
    return codes


def awq_residual(w, s, block_size: int, bits: int, symmetric: bool) -> np.ndarray:
    """``w - dequantize(rtn(w * s)) / s`` float32 [rows, cols] for s [cols] in one pass (AWQ's
    search; formulas in reference.awq_residual). Releases the GIL."""
    if not _native():
        return reference.awq_residual(w, s, block_size, bits, symmetric)
    w, s = _f32(w), _f32(s)
    if w.ndim != 2 or s.shape != (w.shape[1],) or block_size < 1 or not 2 <= bits <= 8:
        raise arg_error("awq_residual", "need w [rows, cols], s [cols], block_size >= 1 and bits in [2, 8]")
    out = np.empty(w.shape, dtype=np.float32)
    st = _lib.qt_awq_residual(_buf("float[]", w), w.shape[0], w.shape[1], _buf("float[]", s), block_size, bits,
                              int(bool(symmetric)), _ffi.from_buffer("float[]", out))
    _check(st, "awq_residual", w)
    return out


# A composite of the kernels above (its own module: one job, and this one stays short).
from qtool.kernels.composite import quantize_matmulnbits  # noqa: E402
