"""numpy twins of the native kernels: the definition of every kernel in native/.

Each function here has the name of a C kernel minus ``qt_`` and the same public
signature as ``qtool.kernels``. Integer and packed results of the C paths match these bit
for bit; float GEMM results match within rounding. Arithmetic is float32 unless a
docstring says double, rounding is half to even (``np.rint``), codes saturate.
"""

from __future__ import annotations

import math

import numpy as np

from qtool.kernels._common import (
    arg_error,
    check_bounds,
    check_finite,
    check_gemm,
    check_histogram,
    check_histogram_pow2,
    check_kn,
    check_q4,
    check_requantize,
    code_range,
    nbits_check,
    qtype_info,
    quant_geometry,
    quant_params,
    zero_points_or_default,
)

_F32 = np.float32

# ---- 1. statistics ----------------------------------------------------------------


def minmax(x: np.ndarray) -> tuple[float, float]:
    """(min(x), max(x)) of a non-empty float32 tensor; -0.0 is reported as 0.0.

    Raises NonFiniteError on NaN/Inf.
    """
    x = np.asarray(x, dtype=_F32)
    if x.size == 0:
        raise arg_error("minmax", "empty tensor has no min/max")
    check_finite("minmax", x)
    return float(x.min() + _F32(0)), float(x.max() + _F32(0))


def histogram(x: np.ndarray, lo: float, hi: float, counts: np.ndarray) -> np.ndarray:
    """Add x's bin counts to ``counts`` (int64 [bins], updated in place) and return it.

    bin = clamp(floor(((x - lo) / (hi - lo)) * bins), 0, bins - 1), in float32: x == hi goes
    to the last bin, values outside [lo, hi] to the edge bins. Needs lo < hi (float32),
    hi - lo finite, 1 <= bins <= 2**24. On NaN/Inf raises NonFiniteError, counts untouched.
    """
    x = np.asarray(x, dtype=_F32).reshape(-1)
    bins = check_histogram(counts, lo, hi)
    check_finite("histogram", x)
    lo32, hi32 = _F32(lo), _F32(hi)
    with np.errstate(over="ignore", invalid="ignore"):
        t = ((x - lo32) / (hi32 - lo32)) * _F32(bins)
    idx = np.clip(np.floor(t), 0, bins - 1).astype(np.int64)
    counts += np.bincount(idx, minlength=bins)
    return counts


def histogram_pow2(x: np.ndarray, k: int, start: int, counts: np.ndarray) -> np.ndarray:
    """Add x's counts on the power-of-two grid to ``counts`` (int64 [bins], in place).

    bin = clamp(floor(x * 2^-k) - start, 0, bins - 1), in float32 in that order: bin j
    covers [(start + j) * 2^k, (start + j + 1) * 2^k); values outside go to the edge bins.
    The product is exact unless it is subnormal (then rounded as IEEE multiplies).
    Needs -127 <= k <= 126, start exactly a float32 with |start| <= 2**62,
    1 <= bins <= 2**24. On NaN/Inf raises NonFiniteError, counts untouched.
    """
    x = np.asarray(x, dtype=_F32).reshape(-1)
    bins = check_histogram_pow2(counts, k, start)
    check_finite("histogram_pow2", x)
    with np.errstate(over="ignore"):
        t = np.multiply(x, _F32(math.ldexp(1.0, -k)))
    np.floor(t, out=t)
    t -= _F32(start)
    np.clip(t, 0, bins - 1, out=t)
    counts += np.bincount(t.astype(np.int64), minlength=bins)
    return counts


def minmax_histogram_pow2(x: np.ndarray, k: int, start: int, counts: np.ndarray, lo: float,
                          hi: float) -> tuple[float, float, bool]:
    """``minmax(x)``, and ``histogram_pow2(x, k, start, counts)`` only if every value lies
    in [lo, hi] (float32): returns (min, max, counted). Not counted (counts untouched)
    when a value lies outside: the caller moves its grid, then counts. Needs a non-empty
    x, finite lo <= hi, the grid arguments of histogram_pow2. On NaN/Inf raises
    NonFiniteError, counts untouched. (The C kernel does it in one pass over x.)
    """
    x = np.asarray(x, dtype=_F32).reshape(-1)
    check_histogram_pow2(counts, k, start, "minmax_histogram_pow2")
    lo32, hi32 = check_bounds("minmax_histogram_pow2", lo, hi)
    if x.size == 0:
        raise arg_error("minmax_histogram_pow2", "empty tensor has no min/max")
    check_finite("minmax_histogram_pow2", x)
    mn, mx = minmax(x)
    counted = bool(lo32 <= mn and mx <= hi32)
    if counted:
        histogram_pow2(x, k, start, counts)
    return mn, mx, counted


# ---- 2. quantize / dequantize ----------------------------------------------------


def _broadcast(p: np.ndarray, geo) -> np.ndarray:
    """Parameters laid out against x viewed as [outer, axis_len, inner]."""
    if geo.block == 0:
        return p.reshape(1, -1, 1)
    p = p.reshape(geo.outer, -1, geo.inner)
    return np.repeat(p, geo.block, axis=1)[:, : geo.axis_len, :]


def quantize(x, scale, zero_point=None, *, qtype: str = "u8", axis: int | None = None,
             block_size: int = 0) -> np.ndarray:
    """q = saturate(rint(x / scale) + zero_point), float32 divide (ONNX QuantizeLinear).

    Layout: per-tensor (axis None, one scale), per-axis (scale [x.shape[axis]]) or
    block-wise (block_size > 0: scale has x's shape with the axis dim ceil(dim/block_size)).
    Returns one code per byte (uint8 for u*, int8 for s*) in x's shape.
    Raises NonFiniteError on NaN/Inf in x.
    """
    x = np.asarray(x, dtype=_F32)
    _, _, qmin, qmax, dt = qtype_info(qtype)
    geo = quant_geometry("quantize", x.shape, axis, block_size)
    s, z = quant_params("quantize", geo, scale, zero_point, qtype)
    check_finite("quantize", x)
    xv = x.reshape(geo.outer, geo.axis_len, geo.inner)
    with np.errstate(over="ignore"):
        r = np.rint(xv / _broadcast(s, geo))
    if z is not None:
        r = r + _broadcast(z, geo).astype(_F32)
    return np.clip(r, qmin, qmax).astype(dt).reshape(x.shape)


def dequantize(q, scale, zero_point=None, *, qtype: str = "u8", axis: int | None = None,
               block_size: int = 0) -> np.ndarray:
    """y = float32(q - zero_point) * scale (ONNX DequantizeLinear); layouts as quantize."""
    _, _, _, _, dt = qtype_info(qtype)
    q = np.asarray(q)
    if q.dtype != dt:
        raise arg_error("dequantize", f"codes of {qtype} must be {dt}, got {q.dtype}")
    geo = quant_geometry("dequantize", q.shape, axis, block_size)
    s, z = quant_params("dequantize", geo, scale, zero_point, qtype)
    c = q.reshape(geo.outer, geo.axis_len, geo.inner).astype(np.int32)
    if z is not None:
        c = c - _broadcast(z, geo)
    return (c.astype(_F32) * _broadcast(s, geo)).reshape(q.shape)


# ---- 3. packing ------------------------------------------------------------------


def pack(q, qtype: str) -> np.ndarray:
    """ONNX sub-byte layout: element i in byte i*bits//8 at bit (i*bits) % 8 (first element
    in the low bits), last byte zero padded. Codes are masked to `bits`. Returns uint8
    [ceil(n*bits/8)] for the flattened q; 8-bit types are copied."""
    bits, _, _, _, dt = qtype_info(qtype)
    q = np.asarray(q)
    if q.dtype != dt:
        raise arg_error("pack", f"codes of {qtype} must be {dt}, got {q.dtype}")
    u = q.reshape(-1).view(np.uint8)
    if bits == 8:
        return u.copy()
    per = 8 // bits
    n = u.size
    padded = np.zeros(-(-n // per) * per, dtype=np.uint8)
    padded[:n] = u & ((1 << bits) - 1)
    groups = padded.reshape(-1, per).astype(np.uint32)
    shifts = np.arange(per, dtype=np.uint32) * bits
    return (groups << shifts).sum(axis=1, dtype=np.uint32).astype(np.uint8)


def unpack(packed, n: int, qtype: str) -> np.ndarray:
    """Inverse of pack: the first n codes (one per byte), sign-extended for s* types."""
    bits, signed, _, _, dt = qtype_info(qtype)
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if p.size < -(-n * bits // 8):
        raise arg_error("unpack", f"{p.size} bytes cannot hold {n} {qtype} codes")
    if bits == 8:
        return p[:n].view(dt).copy()
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    v = ((p[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n].astype(np.uint8)
    if signed:
        sign = np.uint8(1 << (bits - 1))
        v = (v ^ sign) - sign  # uint8 wrap-around = two's complement sign extension
    return v.view(dt)


def pack_matmulnbits(q, bits: int, block_size: int, zero_points=None) -> np.ndarray:
    """com.microsoft MatMulNBits weight: codes q [N, K] (uint8, W transposed) ->
    uint8 [N, ceil(K/block_size), block_size*bits/8], each block packed low bits first.
    K is padded to a block multiple with the block's zero point (zero_points uint8
    [N, n_blocks], default 2**(bits-1)), i.e. with zero-valued weights."""
    nbits_check("pack_matmulnbits", bits, block_size)
    q = np.asarray(q)
    if q.dtype != np.uint8 or q.ndim != 2:
        raise arg_error("pack_matmulnbits", "q must be uint8 [N, K]")
    n, k = q.shape
    nb = -(-k // block_size)
    zp = zero_points_or_default(zero_points, n, nb, bits)
    full = np.empty((n, nb * block_size), dtype=np.uint8)
    full[:, :k] = q
    full[:, k:] = zp[:, -1:] if nb else 0
    qt = {2: "u2", 4: "u4", 8: "u8"}[bits]
    return pack(full, qt).reshape(n, nb, block_size * bits // 8)


def unpack_matmulnbits(b, K: int, bits: int, block_size: int) -> np.ndarray:
    """Inverse of pack_matmulnbits: b [N, n_blocks, blob] -> codes [N, K] (padding dropped)."""
    nbits_check("unpack_matmulnbits", bits, block_size)
    b = np.asarray(b, dtype=np.uint8)
    nb = -(-K // block_size)
    if b.ndim != 3 or b.shape[1:] != (nb, block_size * bits // 8):
        raise arg_error("unpack_matmulnbits", f"b must be [N, {nb}, {block_size * bits // 8}]")
    n = b.shape[0]
    qt = {2: "u2", 4: "u4", 8: "u8"}[bits]
    return unpack(b, n * nb * block_size, qt).reshape(n, nb * block_size)[:, :K].copy()


def pack_zero_points(zp, bits: int) -> np.ndarray:
    """MatMulNBits zero points: uint8 [N, n_blocks] -> uint8 [N * ceil(n_blocks*bits/8)],
    each row packed low bits first and zero padded to a whole byte."""
    zp = np.asarray(zp)
    if zp.dtype != np.uint8 or zp.ndim != 2:
        raise arg_error("pack_zero_points", "zero points must be uint8 [N, n_blocks]")
    nbits_check("pack_zero_points", bits, 16)
    qt = {2: "u2", 4: "u4", 8: "u8"}[bits]
    return np.concatenate([pack(row, qt) for row in zp]) if zp.shape[0] else np.zeros(0, np.uint8)


def unpack_zero_points(packed, N: int, n_blocks: int, bits: int) -> np.ndarray:
    """Inverse of pack_zero_points -> uint8 [N, n_blocks]."""
    nbits_check("unpack_zero_points", bits, 16)
    row = -(-n_blocks * bits // 8)
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if p.size != N * row:
        raise arg_error("unpack_zero_points", f"expected {N * row} bytes, got {p.size}")
    qt = {2: "u2", 4: "u4", 8: "u8"}[bits]
    out = np.empty((N, n_blocks), dtype=np.uint8)
    for i in range(N):
        out[i] = unpack(p[i * row : (i + 1) * row], n_blocks, qt)
    return out


# ---- 4. block-wise parameters ---------------------------------------------------


def _blocks(kernel: str, x, block_size: int) -> np.ndarray:
    x = np.asarray(x, dtype=_F32)
    if x.ndim != 2 or block_size < 1:
        raise arg_error(kernel, "x must be [rows, cols] and block_size >= 1")
    check_finite(kernel, x)
    rows, cols = x.shape
    nb = -(-cols // block_size)
    # zero padding changes neither the range (which includes 0) nor the error (0 -> 0)
    xb = np.zeros((rows, nb * block_size), dtype=_F32)
    xb[:, :cols] = x
    return xb.reshape(rows, nb, block_size)


def range_params(lo, hi, bits: int, symmetric: bool, signed: bool = False, shrink: float = 1.0):
    """The RTN rule of every block quantizer (qt_block_params_*, qt_quantize_kn, quant.blockwise):
    block range lo = min(min x, 0), hi = max(max x, 0) (float32) -> (scale float32,
    zero_point int32); half = 2**(bits-1), codes in [qmin, qmax] ([0, 2**bits - 1], or
    [-half, half - 1] when signed). l = lo*f, h = hi*f in float32 (f = float32(shrink)),
    then in double rounded to float32 once:

      symmetric:  m = h if h >= -l else l (the signed extreme); scale = -m / half;
                  zero_point = 0 (signed) or half. The extreme lands exactly on code qmin
                  and all 2**bits levels are used; the scale is negative when m > 0.
      asymmetric: scale = (h - l) / (qmax - qmin);
                  zero_point = clamp(rint(qmin - l / scale), qmin, qmax)

    A zero scale becomes 1.0. Why this symmetric rule: DequantizeLinear, MatMulNBits and
    GatherBlockQuantized only multiply by the scale, so its sign is free, and the 16th
    level matters: max|x| / (half - 1) lost 15 perplexity points on SmolLM2 at 4-bit/128.
    """
    _, _, qmin, qmax, _ = code_range(bits, signed)
    f = _F32(shrink)
    l = np.asarray(lo, dtype=_F32) * f  # noqa: E741 - the formula's name
    h = np.asarray(hi, dtype=_F32) * f
    if symmetric:
        half = 1 << (bits - 1)
        m = np.where(h >= -l, h, l).astype(np.float64)
        s = (-m / half).astype(_F32)
        s = np.where(s == 0, _F32(1), s)
        return s, np.full(s.shape, 0 if signed else half, dtype=np.int32)
    l64, h64 = l.astype(np.float64), h.astype(np.float64)
    s = ((h64 - l64) / (qmax - qmin)).astype(_F32)
    s = np.where(s == 0, _F32(1), s)
    z = np.clip(np.rint(qmin - l64 / s.astype(np.float64)), qmin, qmax)
    return s, z.astype(np.int32)


def _sqerr(xb, s, z, qmin: int, qmax: int) -> np.ndarray:
    s3, z3 = s[..., None], z[..., None].astype(_F32)
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.clip(np.rint(xb / s3) + z3, qmin, qmax)
        d = xb - (r - z3) * s3
        return (d * d).astype(np.float64).sum(axis=-1)


def block_params_rtn(x, block_size: int, qtype: str, symmetric: bool):
    """Round-to-nearest parameters for blocks of block_size along the last axis of
    x [rows, cols] -> (scale float32 [rows, nb], zero_point int32 [rows, nb]), by
    range_params (lo = min(min x, 0), hi = max(max x, 0) per block)."""
    return block_params_mse(x, block_size, qtype, symmetric, n_grid=1, min_shrink=1.0)


def block_params_mse(x, block_size: int, qtype: str, symmetric: bool, n_grid: int = 20,
                     min_shrink: float = 0.5):
    """Per-block clipping search: for f_j = float32(1 - j*(1 - min_shrink)/(n_grid - 1)),
    j = 0..n_grid-1, shrink the range (lo*f, hi*f in float32), derive parameters as
    block_params_rtn and keep the f_j with the least sum((x - dequantize(quantize(x)))**2)
    (float32 per element, summed in double; first j on ties)."""
    bits, signed, _, _, _ = qtype_info(qtype)
    return block_params_bits(x, block_size, bits, symmetric, n_grid, min_shrink, signed)


def block_params_bits(x, block_size: int, bits: int, symmetric: bool, n_grid: int = 1,
                      min_shrink: float = 1.0, signed: bool = False):
    """block_params_mse for a code width instead of a qtype: any bits in [1, 8] (1 only
    asymmetric). The definition behind both block_params kernels; 3-bit weights use it
    directly."""
    if n_grid < 1 or not 0.0 < float(_F32(min_shrink)) <= 1.0:
        raise arg_error("block_params_mse", "need n_grid >= 1 and 0 < min_shrink <= 1")
    _, _, qmin, qmax, _ = code_range(bits, signed)
    if symmetric and bits < 2:
        raise arg_error("block_params", "symmetric codes need at least 2 bits")
    xb = _blocks("block_params", x, block_size)
    lo = np.minimum(xb.min(axis=-1, initial=0), _F32(0)) if xb.size else np.zeros(xb.shape[:2], _F32)
    hi = np.maximum(xb.max(axis=-1, initial=0), _F32(0)) if xb.size else np.zeros(xb.shape[:2], _F32)
    best_s, best_z = range_params(lo, hi, bits, symmetric, signed)
    if n_grid == 1:
        return best_s, best_z
    best_e = _sqerr(xb, best_s, best_z, qmin, qmax)
    ms = float(_F32(min_shrink))
    for g in range(1, n_grid):
        f = 1.0 - g * (1.0 - ms) / (n_grid - 1)
        s, z = range_params(lo, hi, bits, symmetric, signed, f)
        e = _sqerr(xb, s, z, qmin, qmax)
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    return best_s, best_z


def quantize_kn(w, bits: int, block_size: int, symmetric: bool):
    """RTN of a MatMul weight W[K, N] (blocks of block_size along K, per column n) straight
    into MatMulNBits tensors -> (b uint8 [N, n_blocks, block_size*bits/8], scales float32
    [N, n_blocks], zero_points packed uint8 [N, ceil(n_blocks*bits/8)] or None when
    symmetric).

    Per block, scale and z by range_params (unsigned codes, no shrink): symmetric
    scale = -m / 2**(bits-1) with m the signed extreme, z = 2**(bits-1); asymmetric
    scale = (hi - lo) / qmax, z = clamp(rint(-lo / scale), 0, qmax), qmax = 2**bits - 1.
    Codes q = clamp(rint(x / scale) + z, 0, qmax) (float32
    divide); K is padded to whole blocks with z (zero-valued weights), as in
    pack_matmulnbits. Works through slabs of whole blocks of K rows, so only uint8 codes
    are ever transposed. NonFiniteError on NaN/Inf.
    """
    w = check_kn(w, bits, block_size)
    k, n = w.shape
    nb = -(-k // block_size)
    qmax = (1 << bits) - 1
    codes = np.empty((n, nb * block_size), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=_F32)
    zps = None if symmetric else np.empty((n, nb), dtype=np.uint8)
    step = max(1, (1 << 18) // (n * block_size)) * block_size  # about 1 MiB of floats
    for k0 in range(0, nb * block_size, step):
        k1 = min(k0 + step, nb * block_size)
        x = np.zeros((k1 - k0, n), dtype=_F32)  # zero rows past K change neither range
        x[: max(0, min(k1, k) - k0)] = w[k0:k1]
        check_finite("quantize_kn", x)
        xb = x.reshape(-1, block_size, n)  # [blocks, rows in block, N]
        lo = np.minimum(xb.min(axis=1), _F32(0))
        hi = np.maximum(xb.max(axis=1), _F32(0))
        s, z = range_params(lo, hi, bits, symmetric)
        z = z.astype(_F32)
        q = np.clip(np.rint(xb / s[:, None, :]) + z[:, None, :], 0, qmax).astype(np.uint8)
        pad = np.arange(k0, k1).reshape(-1, block_size) >= k  # rows past K: the zero point
        q = np.where(pad[:, :, None], z[:, None, :].astype(np.uint8), q)
        codes[:, k0:k1] = q.reshape(k1 - k0, n).T
        scales[:, k0 // block_size : k1 // block_size] = s.T
        if zps is not None:
            zps[:, k0 // block_size : k1 // block_size] = z.T.astype(np.uint8)
    qt = {2: "u2", 4: "u4", 8: "u8"}[bits]
    b = pack(codes, qt).reshape(n, nb, block_size * bits // 8)
    zp = None if zps is None else pack_zero_points(zps, bits).reshape(n, -1)
    return b, scales, zp


# ---- 5. int8 GEMM -----------------------------------------------------------------


def gemm_u8s8(a, b_t, a_zero_point: int = 0, b_zero_point=None) -> np.ndarray:
    """C[m, n] = sum_k (a[m, k] - a_zero_point) * (b_t[n, k] - b_zero_point[n]), exact int32.

    a: uint8 [M, K]; b_t: int8 [N, K] (B transposed); b_zero_point: int8 [N] or None.
    Wraps modulo 2**32 on overflow (not reachable for K < 2**15).
    """
    a, b_t, zb = check_gemm(a, b_t, a_zero_point, b_zero_point)
    # float64 products and sums are exact here (|term| < 2**17, K < 2**36)
    c = (a.astype(np.float64) - a_zero_point) @ (b_t.astype(np.float64) - zb[:, None]).T
    return c.astype(np.int64).astype(np.int32)


def requantize(acc, multiplier, zero_point: int, qtype: str = "u8") -> np.ndarray:
    """out[m, n] = saturate(rint(float32(acc[m, n]) * multiplier[n]) + zero_point), float32.

    acc int32 [M, N], multiplier float32 [N], qtype u8 or s8."""
    acc, mult = check_requantize(acc, multiplier, zero_point, qtype)
    _, _, qmin, qmax, dt = qtype_info(qtype)
    with np.errstate(over="ignore"):
        r = np.rint(acc.astype(_F32) * mult[None, :]) + _F32(zero_point)
    return np.clip(r, qmin, qmax).astype(dt)


# ---- 6. 4-bit block GEMM ----------------------------------------------------------


def gemm_q4(a, b, scales, zero_points, K: int, block_size: int) -> np.ndarray:
    """Y = a @ W, W[k, n] = float32(q[n, k] - zp[n, k // bs]) * scales[n, k // bs].

    a float32 [M, K]; b uint8 [N, n_blocks, block_size/2] (MatMulNBits, bits=4); scales
    float32 [N, n_blocks] (or flat); zero_points packed uint8 [N * ceil(n_blocks/2)] or
    None (8). Returns float32 [M, N]; summation order is BLAS's."""
    a, b, s, zp = check_q4(a, b, scales, zero_points, K, block_size)
    n, nb = b.shape[0], b.shape[1]
    q = unpack_matmulnbits(b, K, 4, block_size).astype(np.int32)
    z = (np.full((n, nb), 8, np.uint8) if zp is None else unpack_zero_points(zp, n, nb, 4))
    rep = lambda p: np.repeat(p, block_size, axis=1)[:, :K]  # noqa: E731
    w = (q - rep(z).astype(np.int32)).astype(_F32) * rep(s)
    return (a @ w.T).astype(_F32)


# ---- 8. AWQ -----------------------------------------------------------------------


def awq_residual(w, s, block_size: int, bits: int, symmetric: bool) -> np.ndarray:
    """AWQ's residual of one candidate scale: float32 [rows, cols] ``w - dequantize(rtn(w *
    s)) / s`` for w [rows, cols], s [cols] (finite, non-zero). x = w * s (float32); per row
    and block of x, scale and zero point by the RTN rule (range_params, unsigned codes);
    q = clip(rint(x / scale) + zp, 0, 2**bits - 1); out = w - ((q - zp) * scale) / s, each
    operation in float32. NonFiniteError on NaN/Inf in x."""
    w = np.ascontiguousarray(w, dtype=_F32)
    s = np.ascontiguousarray(s, dtype=_F32)
    if w.ndim != 2 or s.shape != (w.shape[1],) or block_size < 1 or not 2 <= bits <= 8:
        raise arg_error("awq_residual", "need w [rows, cols], s [cols], block_size >= 1 and bits in [2, 8]")
    rows, cols = w.shape
    xb = _blocks("awq_residual", w * s[None, :], block_size)
    sc, zp = block_params_bits(xb.reshape(rows, -1), block_size, bits, symmetric)
    z = zp.astype(_F32)[..., None]
    q = np.clip(np.rint(xb / sc[..., None]) + z, 0, _F32((1 << bits) - 1))
    deq = ((q - z) * sc[..., None]).reshape(rows, -1)[:, :cols]
    return w - deq / s[None, :]


# ---- 7. GPTQ (its own module: the column loop is long) ---------------------------
from qtool.kernels.reference_gptq import gptq_rows  # noqa: E402, F401 - the twins are read as reference.<name>
