"""What both kernel backends share: quantized types, tensor geometry, argument checks
and the kernel exceptions. Checks live here so the numpy and native backends reject
exactly the same inputs with exactly the same errors."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from qtool.errors import NativeError

# name -> (bits, signed, enum value in qtool.h)
QTYPES: dict[str, tuple[int, bool, int]] = {
    "u8": (8, False, 0),
    "s8": (8, True, 1),
    "u4": (4, False, 2),
    "s4": (4, True, 3),
    "u2": (2, False, 4),
    "s2": (2, True, 5),
}


class KernelArgumentError(NativeError):
    """A kernel was called with arguments it cannot accept (shape, dtype, range)."""


class NonFiniteError(NativeError):
    """Float input to a statistics/quantization kernel holds NaN or +-Inf.

    ``index`` is the flat index of the first non-finite element.
    """

    def __init__(self, kernel: str, index: int, value: float) -> None:
        super().__init__(
            f"{kernel}: input holds a non-finite value ({value}) at flat index {index}",
            hint="the tensor feeding this step has NaN/Inf; fix the model or the input data "
            "(qtool cannot calibrate or quantize non-finite values)",
        )
        self.index = index
        self.value = value


def arg_error(kernel: str, what: str) -> KernelArgumentError:
    return KernelArgumentError(f"{kernel}: {what}", hint="this is a bug in the caller of qtool.kernels")


def qtype_info(qtype: str) -> tuple[int, bool, int, int, np.dtype]:
    """(bits, signed, qmin, qmax, code dtype) of a quantized type name."""
    if qtype not in QTYPES:
        raise arg_error("qtype", f"unknown quantized type {qtype!r} (one of {', '.join(QTYPES)})")
    bits, signed, _ = QTYPES[qtype]
    return code_range(bits, signed)


def code_range(bits: int, signed: bool) -> tuple[int, bool, int, int, np.dtype]:
    """qtype_info for any code width in [1, 8]: 3-bit codes have no qtype and no C
    kernel, but the block rule (reference.range_params) quantizes them too."""
    if not 1 <= bits <= 8:
        raise arg_error("code_range", f"bits must be in [1, 8], got {bits}")
    if signed:
        return bits, True, -(1 << (bits - 1)), (1 << (bits - 1)) - 1, np.dtype(np.int8)
    return bits, False, 0, (1 << bits) - 1, np.dtype(np.uint8)


def raise_nonfinite(kernel: str, x: np.ndarray) -> None:
    """Raise NonFiniteError naming the first NaN/Inf of x (x is known to hold one)."""
    flat = x.reshape(-1)
    i = int(np.flatnonzero(~np.isfinite(flat))[0])
    raise NonFiniteError(kernel, i, float(flat[i]))


def check_finite(kernel: str, x: np.ndarray) -> None:
    if x.size and not np.isfinite(x).all():
        raise_nonfinite(kernel, x)


class Geometry(NamedTuple):
    """x viewed as [outer, axis_len, inner]; block == 0 means per-axis."""

    outer: int
    axis_len: int
    inner: int
    block: int
    param_shape: tuple[int, ...]


def quant_geometry(kernel: str, shape: tuple[int, ...], axis: int | None, block_size: int) -> Geometry:
    """Geometry for per-tensor (axis None), per-axis (block_size 0) or block-wise layouts.

    Parameter shapes: per-tensor (1,); per-axis (shape[axis],); block-wise ``shape`` with
    ``shape[axis]`` replaced by ``ceil(shape[axis] / block_size)`` (ONNX blocked layout).
    """
    size = math.prod(shape)
    if axis is None:
        if block_size:
            raise arg_error(kernel, "block_size needs an axis")
        return Geometry(1, 1, size, 0, (1,))
    if not -len(shape) <= axis < len(shape):
        raise arg_error(kernel, f"axis {axis} out of range for shape {shape}")
    axis %= len(shape)
    outer, c, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    if block_size < 0:
        raise arg_error(kernel, f"block_size must be >= 0, got {block_size}")
    if block_size == 0:
        return Geometry(outer, c, inner, 0, (c,))
    nb = -(-c // block_size)
    return Geometry(outer, c, inner, block_size, shape[:axis] + (nb,) + shape[axis + 1 :])


def quant_params(kernel: str, geo: Geometry, scale, zero_point, qtype: str):
    """Scale (float32) and zero point (int32 or None) as contiguous arrays of the right size."""
    _, _, qmin, qmax, _ = qtype_info(qtype)
    size = math.prod(geo.param_shape)
    s = np.ascontiguousarray(scale, dtype=np.float32)
    if s.size != size:
        raise arg_error(kernel, f"scale has {s.size} values, expected shape {geo.param_shape}")
    # negative scales are valid (symmetric block RTN puts a positive extreme on code qmin)
    if size and not (np.isfinite(s).all() and (s != 0).all()):
        raise arg_error(kernel, "scale must be finite and non-zero")
    s = s.reshape(geo.param_shape)
    if zero_point is None:
        return s, None
    zp_in = np.asarray(zero_point)
    if zp_in.size != size or not np.issubdtype(zp_in.dtype, np.integer):
        raise arg_error(kernel, f"zero_point must be integers of shape {geo.param_shape}")
    z = np.ascontiguousarray(zp_in, dtype=np.int32).reshape(geo.param_shape)
    if size and (z.min() < qmin or z.max() > qmax):
        raise arg_error(kernel, f"zero_point outside [{qmin}, {qmax}] for {qtype}")
    return s, z


def nbits_check(kernel: str, bits: int, block_size: int) -> None:
    if bits not in (2, 4, 8):
        raise arg_error(kernel, f"bits must be 2, 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise arg_error(kernel, f"block_size must be a power of two >= 16, got {block_size}")


# ---- argument checks shared by a C kernel and its twin ----------------------------

_F32 = np.float32


def check_counts(kernel: str, counts) -> int:
    """The bins of a histogram kernel's ``counts`` argument, checked as the C kernels check it."""
    if not (isinstance(counts, np.ndarray) and counts.dtype == np.int64 and counts.ndim == 1
            and counts.flags.c_contiguous and counts.flags.writeable):
        raise arg_error(kernel, "counts must be a writable contiguous int64 1-D array")
    bins = counts.shape[0]
    if not 1 <= bins <= 1 << 24:
        raise arg_error(kernel, f"bins must be in [1, 2**24], got {bins}")
    return bins


def check_histogram_pow2(counts, k, start, kernel: str = "histogram_pow2") -> int:
    bins = check_counts(kernel, counts)
    if not isinstance(k, (int, np.integer)) or not -127 <= k <= 126:
        raise arg_error(kernel, f"level k must be an integer in [-127, 126], got {k}")
    if (not isinstance(start, (int, np.integer)) or abs(int(start)) > 1 << 62
            or int(_F32(start)) != start):
        raise arg_error(kernel, f"start must be an integer exact in float32, got {start}")
    return bins


def check_bounds(kernel: str, lo, hi) -> tuple[np.float32, np.float32]:
    """``lo``/``hi`` as float32, checked as the C kernel checks them: finite, lo <= hi."""
    lo32, hi32 = _F32(lo), _F32(hi)
    if not (np.isfinite(lo32) and np.isfinite(hi32) and lo32 <= hi32):
        raise arg_error(kernel, f"need finite bounds lo <= hi, got [{lo}, {hi}]")
    return lo32, hi32


def check_histogram(counts, lo, hi) -> int:
    bins = check_counts("histogram", counts)
    lo32, hi32 = _F32(lo), _F32(hi)
    with np.errstate(over="ignore"):
        w = hi32 - lo32
    if not (np.isfinite(lo32) and np.isfinite(hi32) and np.isfinite(w) and hi32 > lo32):
        raise arg_error("histogram", f"need finite lo < hi, got [{lo}, {hi}]")
    return bins


def check_gemm(a, b_t, a_zero_point, b_zero_point):
    a, b_t = np.asarray(a), np.asarray(b_t)
    if a.dtype != np.uint8 or b_t.dtype != np.int8 or a.ndim != 2 or b_t.ndim != 2 \
            or a.shape[1] != b_t.shape[1]:
        raise arg_error("gemm_u8s8", "need a uint8 [M, K] and b_t int8 [N, K]")
    if not 0 <= int(a_zero_point) <= 255:
        raise arg_error("gemm_u8s8", "a_zero_point must be in [0, 255]")
    if b_zero_point is None:
        zb = np.zeros(b_t.shape[0], dtype=np.int8)
    else:
        zb = np.asarray(b_zero_point)
        if zb.dtype != np.int8 or zb.shape != (b_t.shape[0],):
            raise arg_error("gemm_u8s8", "b_zero_point must be int8 [N]")
    return a, b_t, zb


def check_requantize(acc, multiplier, zero_point, qtype):
    _, _, qmin, qmax, _ = qtype_info(qtype)
    acc = np.asarray(acc)
    mult = np.ascontiguousarray(multiplier, dtype=_F32).reshape(-1)
    if qtype not in ("u8", "s8") or acc.dtype != np.int32 or acc.ndim != 2:
        raise arg_error("requantize", "need acc int32 [M, N] and qtype u8/s8")
    if mult.shape != (acc.shape[1],) or not np.isfinite(mult).all():
        raise arg_error("requantize", "multiplier must be finite float32 [N]")
    if not qmin <= int(zero_point) <= qmax:
        raise arg_error("requantize", f"zero_point outside [{qmin}, {qmax}]")
    return acc, mult


def check_q4(a, b, scales, zero_points, K, block_size):
    nbits_check("gemm_q4", 4, block_size)
    a, b = np.asarray(a, dtype=_F32), np.asarray(b)
    nb = -(-K // block_size)
    if a.ndim != 2 or a.shape[1] != K:
        raise arg_error("gemm_q4", f"a must be float32 [M, {K}]")
    if b.dtype != np.uint8 or b.ndim != 3 or b.shape[1:] != (nb, block_size // 2):
        raise arg_error("gemm_q4", f"b must be uint8 [N, {nb}, {block_size // 2}]")
    n = b.shape[0]
    s = np.ascontiguousarray(scales, dtype=_F32)
    if s.size != n * nb:
        raise arg_error("gemm_q4", f"scales must hold N*n_blocks = {n * nb} values")
    zp = None
    if zero_points is not None:
        zp = np.ascontiguousarray(zero_points, dtype=np.uint8).reshape(-1)
        if zp.size != n * ((nb + 1) // 2):
            raise arg_error("gemm_q4", f"packed zero_points must hold {n * ((nb + 1) // 2)} bytes")
    return a, b, s.reshape(n, nb), zp


def check_kn(w, bits: int, block_size: int) -> np.ndarray:
    nbits_check("quantize_kn", bits, block_size)
    if block_size > 256:
        raise arg_error("quantize_kn", f"block_size must be at most 256, got {block_size}")
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype != _F32 or 0 in w.shape:
        raise arg_error("quantize_kn", f"w must be a non-empty float32 [K, N], got {w.dtype} {w.shape}")
    return w


def zero_points_or_default(zero_points, n: int, nb: int, bits: int) -> np.ndarray:
    if zero_points is None:
        return np.full((n, nb), 1 << (bits - 1), dtype=np.uint8)
    zp = np.asarray(zero_points)
    if zp.shape != (n, nb) or zp.dtype != np.uint8:
        raise arg_error("pack_matmulnbits", f"zero_points must be uint8 [{n}, {nb}]")
    return zp


def check_gptq(w, u, cols, block_size: int, bits: int, symmetric: bool, dynamic: bool,
               scales, zero_points):
    """gptq_rows' arguments -> (w, u, cols) as contiguous float32 / int64 arrays. scales and
    zero_points are written in place, so they must be writable contiguous arrays of the
    exact dtype (no silent copies)."""
    def inplace(a, dtype, shape, what):
        if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == shape
                and a.flags.c_contiguous and a.flags.writeable):
            raise arg_error("gptq_rows", f"{what} must be a writable contiguous {np.dtype(dtype)} array of shape {shape}")

    w = np.ascontiguousarray(w, dtype=_F32)
    if w.ndim != 2 or w.shape[1] < 1:
        raise arg_error("gptq_rows", "w must be float32 [rows, K] with K >= 1")
    rows, k = w.shape
    if not 2 <= bits <= 8 or block_size < 1:
        raise arg_error("gptq_rows", f"need bits in [2, 8] and block_size >= 1, got {bits}, {block_size}")
    nb = -(-k // block_size)
    inplace(scales, _F32, (rows, nb), "scales")
    if symmetric != (zero_points is None):
        raise arg_error("gptq_rows", "zero_points must be given exactly when asymmetric")
    if zero_points is not None:
        inplace(zero_points, np.uint8, (rows, nb), "zero_points")
    u = np.ascontiguousarray(u, dtype=_F32)
    cols = np.ascontiguousarray(cols, dtype=np.int64)
    d = np.diagonal(u) if u.shape == (k, k) else None
    if d is None or not (np.isfinite(d).all() and (d != 0).all()):
        raise arg_error("gptq_rows", f"u must be float32 [{k}, {k}] with a finite non-zero diagonal")
    if cols.shape != (k,) or not np.array_equal(np.sort(cols), np.arange(k)) \
            or (dynamic and not np.array_equal(cols, np.arange(k))):
        raise arg_error("gptq_rows", "cols must be a permutation of 0..K-1 (the identity when dynamic)")
    if not dynamic and not (np.isfinite(scales).all() and (scales != 0).all()):
        raise arg_error("gptq_rows", "scales must be finite and non-zero")
    return w, u, cols
