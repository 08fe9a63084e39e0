"""Block quantization algorithms for weight-only compression.

Every algorithm takes a weight in the quantized orientation ``w[rows, cols]`` (blocks of
``block_size`` along cols, the reduction axis K; see :mod:`qtool.quant.formats`) and
returns a :class:`~qtool.quant.formats.BlockQuant` with unsigned codes:

    w ~= (q - z) * s,   q = clamp(round_half_even(w / s) + z, 0, 2^bits - 1)

Scales and zero points come from one rule, :func:`qtool.kernels.reference.range_params`
(the numpy twin of the C kernels ``qt_block_params_*`` and ``qt_quantize_kn``). Symmetric:
``m`` = the block's value of largest magnitude (with its sign), ``s = -m / 2^(bits-1)``,
``z = 2^(bits-1)``: the extreme lands exactly on code 0 and all 2^bits levels are used
(the scale is negative when m > 0). Asymmetric: ``lo = min(min w, 0)``,
``hi = max(max w, 0)``, ``s = (hi - lo) / (2^bits - 1)``,
``z = clamp(round_half_even(-lo / s), 0, 2^bits - 1)``. Parameters and codes come from
the kernels (C when built); 3-bit codes, which have no kernel type, take their parameters
from the numpy twin and their codes from the 4-bit kernel clamped to 7.

Algorithms (``ALGORITHMS``):

- ``rtn``: the formulas above.
- ``mse``: per block, the clipping range shrunk by f in [min_shrink, 1] (``n_grid`` steps)
  that minimises ``sum (w - w_hat)^2``.
- ``hqq``: half-quadratic optimisation of the zero point with an l_p (p < 1) error model,
  then a least-squares scale refit ``s = <w, q - z> / <q - z, q - z>`` per block; zero
  points stay integers so every format and onnxruntime's fast kernels can use them.
- ``gptq``: column-by-column quantization that pushes each column's error onto the not yet
  quantized columns through the inverse Hessian ``H = 2 X^T X`` of the layer's input.
- ``awq``: activation-aware per-input-channel scaling ``w[:, k] * s_k`` (undone on the
  activations), ``s = mean|x|^alpha`` with alpha searched on the calibration Hessian.

Search-based algorithms keep, per block, whichever of their result and RTN's is better,
so they never do worse than RTN on the error they minimise.
Errors are reported as mean squared weight error (units: weight^2) and, for data-aware
methods, output error ``tr(D H D^T) / tr(W H W^T)`` (relative, D = W - W_hat).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qtool import kernels
from qtool.errors import UsageError
from qtool.kernels.reference import block_params_bits
from qtool.quant.formats import BlockQuant, n_blocks, pad_cols
from qtool.quant.quadratic import gram_quadratic


@dataclass(frozen=True)
class ActivationStats:
    """Second moments of one MatMul input, accumulated over calibration rows.

    ``xtx``: float64 [K, K] = sum_i x_i x_i^T; ``abs_sum``: float64 [K] = sum_i |x_i|;
    ``count``: number of rows x_i (tokens) seen.
    """

    xtx: np.ndarray
    abs_sum: np.ndarray
    count: int

    @classmethod
    def from_activations(cls, x: np.ndarray) -> ActivationStats:
        """One batch's moments: ``X^T X`` by a float32 GEMM (half a float64 one's time; a
        batch is a few thousand rows at most, so float32 sums keep ~6 digits), held in
        float64 so that summing many batches loses nothing more."""
        xtx, abs_sum, count = batch_moments(x)
        return cls(xtx.astype(np.float64), abs_sum, count)

    def merged(self, other: ActivationStats) -> ActivationStats:
        return ActivationStats(self.xtx + other.xtx, self.abs_sum + other.abs_sum, self.count + other.count)

    @property
    def hessian(self) -> np.ndarray:
        """``H = 2 X^T X / n`` (float64 [K, K])."""
        return 2.0 * self.xtx / max(self.count, 1)


def batch_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(``X^T X`` float32 [K, K], ``sum |X|`` float64 [K], rows) of one batch ``x[..., K]``.

    The product is a GEMM of a transposed copy with X: with X^T X written as X.T @ X,
    numpy takes BLAS's symmetric rank-k update, which took twice as long at K = 1536 on
    128-row batches (SmolLM2's down_proj input). Callers keep sums in float64; adding
    this float32 result into them directly (``np.add(acc, xtx, out=acc)``) avoids a float64
    temporary per batch and gives the same sums."""
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
    return np.ascontiguousarray(x2.T) @ x2, np.abs(x2).sum(0, dtype=np.float64), x2.shape[0]


@dataclass(frozen=True)
class QuantOutcome:
    """An algorithm's result and how close it got, next to RTN's.

    ``weight_mse``/``rtn_weight_mse``: mean of (w - w_hat)^2. ``output_error``/
    ``rtn_output_error``: relative output error (data-aware only, else None).
    ``input_scale``: AWQ's per-input-channel factor [K]; the activations must be
    multiplied by it before the quantized MatMul (None: no scaling).
    ``tensors``: MatMulNBits tensors made directly by a fast path (then ``bq`` is None).
    """

    bq: BlockQuant | None
    weight_mse: float
    rtn_weight_mse: float
    output_error: float | None = None
    rtn_output_error: float | None = None
    input_scale: np.ndarray | None = None
    tensors: object | None = None


# ---- RTN -------------------------------------------------------------------------------


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    rows, cols = w.shape
    return pad_cols(np.asarray(w, dtype=np.float32), block_size).reshape(rows, n_blocks(cols, block_size), block_size)


# code widths with a kernel qtype; 3-bit codes are quantized in a 4-bit container
_QTYPES = {2: "u2", 3: "u4", 4: "u4", 8: "u8"}


def block_params(w: np.ndarray, bits: int, block_size: int, symmetric: bool, n_grid: int = 1,
                 min_shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block scale (float32 [rows, nb]) and zero point (uint8, None when symmetric) of
    ``w[rows, cols]``: RTN (``n_grid=1``) or the kernels' MSE clipping search."""
    if bits == 3:
        s, z = block_params_bits(w, block_size, bits, symmetric, n_grid, min_shrink)
    else:
        s, z = kernels.block_params_mse(w, block_size, _QTYPES[bits], symmetric, n_grid, min_shrink)
    return s, (None if symmetric else z.astype(np.uint8))


def quantize_codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int,
                   block_size: int) -> np.ndarray:
    """Codes uint8 ``[rows, cols]`` = clamp(round_half_even(w / s) + z, 0, 2^bits - 1)."""
    z = np.full(scale.shape, 1 << (bits - 1), np.int32) if zp is None else zp.astype(np.int32)
    q = kernels.quantize(w, scale, z, qtype=_QTYPES[bits], axis=1, block_size=block_size)
    if bits == 3:  # clamp(clamp(r, 0, 15), 0, 7) == clamp(r, 0, 7)
        np.minimum(q, 7, out=q)
    return q


def quantize_blocks(xb: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int) -> np.ndarray:
    """Codes uint8 [rows, nb, bs] = clamp(round_half_even(x / s) + z, 0, 2^bits - 1)."""
    qmax = (1 << bits) - 1
    z = np.float32(1 << (bits - 1)) if zp is None else zp[..., None].astype(np.float32)
    q = np.rint(xb / scale[..., None]) + z
    np.clip(q, 0, qmax, out=q)
    return q.astype(np.uint8)


def _dequant(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int) -> np.ndarray:
    z = np.float32(1 << (bits - 1)) if zp is None else zp[..., None].astype(np.float32)
    return (q.astype(np.float32) - z) * scale[..., None]


def _block_sse(xb: np.ndarray, q: np.ndarray, scale, zp, bits) -> np.ndarray:
    d = xb - _dequant(q, scale, zp, bits)
    return np.einsum("rbk,rbk->rb", d, d, dtype=np.float64)


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> BlockQuant:
    """Round-to-nearest block quantization of ``w[rows, cols]`` (formulas in the module doc)."""
    return mse(w, bits, block_size, symmetric, n_grid=1, min_shrink=1.0)


def quantize_slabs(
    w: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool = True,
    method: str = "rtn",
    k_axis: int = 1,
    chunk: int = 0,
    measure: bool = True,
) -> tuple[BlockQuant, float]:
    """RTN or MSE-clipped block quantization of a 2-D weight, one cache-sized slab at a time.

    ``k_axis=0``: ``w`` is a MatMul weight ``W[K, N]`` (blocks along K); slabs are whole
    blocks of K rows, transposed in cache, so no full float transpose is ever made.
    ``k_axis=1``: ``w`` is already ``[rows, K]``; slabs are groups of rows.
    Each slab goes through ``rtn``/``mse``, so codes equal theirs on the [N, K] orientation
    exactly. Streams a memory-mapped weight (each slab is read once).

    Returns (BlockQuant in the [rows, K] orientation, sum of squared weight errors; NaN
    when ``measure`` is False, which saves a dequantize pass).
    """
    if k_axis == 0:
        k, n = w.shape
    else:
        n, k = w.shape
    nb = n_blocks(k, block_size)
    codes = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=np.float32)
    zps = None if symmetric else np.empty((n, nb), dtype=np.uint8)
    if not chunk:  # a float slab of about 512 KiB stays in L2
        if k_axis == 0:
            chunk = max(block_size, (1 << 17) // max(n, 1) // block_size * block_size)
        else:
            chunk = max(1, (1 << 17) // max(k, 1))
    extent = k if k_axis == 0 else n
    sse = 0.0
    for i0 in range(0, extent, chunk):
        i1 = min(i0 + chunk, extent)
        if k_axis == 0:
            x = np.ascontiguousarray(np.asarray(w[i0:i1], dtype=np.float32).T)  # [N, chunk]
            rows, cols = slice(None), slice(i0, i1)
            blocks = slice(i0 // block_size, n_blocks(i1, block_size))
        else:
            x = np.ascontiguousarray(w[i0:i1], dtype=np.float32)  # [chunk, K]
            rows, cols, blocks = slice(i0, i1), slice(None), slice(None)
        part = mse(x, bits, block_size, symmetric) if method == "mse" else rtn(x, bits, block_size, symmetric)
        codes[rows, cols] = part.codes
        scales[rows, blocks] = part.scales
        if zps is not None:
            zps[rows, blocks] = part.zero_points
        if measure:
            y = part.dequantize()
            y -= x
            sse += float(np.einsum("ij,ij->", y, y))
    return BlockQuant(codes, scales, zps, bits, block_size), (sse if measure else float("nan"))


# ---- MSE clipping search -----------------------------------------------------------------


def mse(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True, n_grid: int = 20,
        min_shrink: float = 0.5) -> BlockQuant:
    """Per block, the range ``f * range`` (f_j = 1 - j (1 - min_shrink)/(n_grid - 1)) with the
    least ``sum (w - w_hat)^2`` (the kernels' block_params_mse); f = 1 is RTN, so the result
    is never worse than RTN."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    scale, zp = block_params(w, bits, block_size, symmetric, n_grid, min_shrink)
    return BlockQuant(quantize_codes(w, scale, zp, bits, block_size), scale, zp, bits, block_size)


# ---- HQQ ---------------------------------------------------------------------------------


def _ls_scale(xb, q, zp, bits, fallback):
    """Least-squares scale for fixed codes: s = <w, q - z> / <q - z, q - z> (per block)."""
    z = np.float32(1 << (bits - 1)) if zp is None else zp[..., None].astype(np.float32)
    d = q.astype(np.float32) - z
    num = np.einsum("rbk,rbk->rb", xb, d, dtype=np.float64)
    den = np.einsum("rbk,rbk->rb", d, d, dtype=np.float64)
    ok = (den > 0) & (num != 0) & (np.sign(num) == np.sign(fallback))
    s = np.where(ok, num / np.where(ok, den, 1.0), fallback).astype(np.float32)
    return s


def hqq(
    w: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool = False,
    iterations: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> BlockQuant:
    """Half-quadratic optimisation of the zero point, then a least-squares scale refit.

    With the scale fixed at RTN's, alternate (HQQ, p < 1 makes outliers cheap):
        q = clamp(round(w/s + z)),  e = shrink_p(w - (q - z) s, beta),
        z = mean_block(q - (w - e)/s),  beta *= kappa
    where shrink_p(x, beta) = sign(x) max(|x| - |x|^(p-1)/beta, 0). Then z is rounded to an
    integer, codes recomputed, and s refitted by least squares (twice). Symmetric weights
    keep z = 2^(bits-1) and only get the alternating scale refit.
    Per block the better of this and RTN (by squared weight error) is kept.
    """
    xb = _blocks(w, block_size)
    qmax = (1 << bits) - 1
    base = rtn(w, bits, block_size, symmetric)
    scale = base.scales.copy()
    zp = base.zero_points
    if not symmetric:
        zf = zp.astype(np.float32)
        inv_s = (1.0 / scale)[..., None]
        for _ in range(iterations):
            q = np.clip(np.rint(xb * inv_s + zf[..., None]), 0, qmax)
            r = xb - (q - zf[..., None]) * scale[..., None]
            a = np.abs(r)
            e = np.sign(r) * np.maximum(a - np.power(np.maximum(a, 1e-12), p - 1) / beta, 0)
            zf = np.mean(q - (xb - e) * inv_s, axis=-1)
            beta *= kappa
        zp = np.clip(np.rint(zf), 0, qmax).astype(np.uint8)
    for _ in range(3):
        q = quantize_blocks(xb, scale, zp, bits)
        scale = _ls_scale(xb, q, zp, bits, scale)
    q = quantize_blocks(xb, scale, zp, bits)
    # Keep RTN where it is better (per block).
    q0 = pad_cols(base.codes, block_size).reshape(q.shape)
    err = _block_sse(xb, q, scale, zp, bits)
    err0 = _block_sse(xb, q0, base.scales, base.zero_points, bits)
    better = err <= err0
    q = np.where(better[..., None], q, q0)
    scale = np.where(better, scale, base.scales).astype(np.float32)
    if zp is not None:
        zp = np.where(better, zp, base.zero_points)
    codes = np.ascontiguousarray(q.reshape(w.shape[0], -1)[:, : w.shape[1]])
    return BlockQuant(codes, scale, zp, bits, block_size)


# ---- GPTQ: qtool.quant.gptq (it builds on rtn/block_params above) ------------------------


def gptq(w: np.ndarray, bits: int, block_size: int, hessian: np.ndarray, symmetric: bool = True,
         **kw) -> BlockQuant:
    """GPTQ on ``w[N, K]`` (see :func:`qtool.quant.gptq.gptq`)."""
    from qtool.quant import gptq as gptq_module

    return gptq_module.gptq(w, bits, block_size, hessian, symmetric, **kw)


# ---- output errors and AWQ (qtool.quant.quadratic, qtool.quant.awq) ------------------------


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """Relative output error ``tr(D H D^T) / tr(W H W^T)`` for D = w - w_hat, w [N, K]."""
    return output_errors(w, [w_hat], hessian)[0]


def output_errors(w: np.ndarray, w_hats: list[np.ndarray], hessian: np.ndarray) -> list[float]:
    """``output_error`` of several reconstructions of one ``w`` (its denominator once)."""
    w = np.asarray(w, np.float32)
    h = np.asarray(hessian, np.float64)
    den = gram_quadratic(w, h)
    nums = [gram_quadratic(w - np.asarray(w_hat, np.float32), h) for w_hat in w_hats]
    return [num / den if den > 0 else num for num in nums]


def awq(w: np.ndarray, bits: int, block_size: int, stats: ActivationStats, symmetric: bool = True,
        n_grid: int = 11) -> tuple[BlockQuant, np.ndarray | None, tuple[float, float]]:
    """AWQ on ``w[N, K]`` (see :func:`qtool.quant.awq.awq`)."""
    from qtool.quant import awq as awq_module

    return awq_module.awq(w, bits, block_size, stats, symmetric, n_grid)


# ---- dispatch ----------------------------------------------------------------------------


def quantize_weight(
    w: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    algorithm: str,
    stats: ActivationStats | None = None,
    compare: bool = True,
) -> QuantOutcome:
    """Quantize ``w[rows, cols]`` with ``algorithm`` and measure it against RTN.

    ``compare=False`` skips RTN's error (used for ``rtn`` itself on large models: the
    comparison would cost a second pass).
    """
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {algorithm!r}", f"choose one of {', '.join(ALGORITHMS)}")
    if algorithm in DATA_AWARE and stats is None:
        raise UsageError(
            f"--algorithm {algorithm} needs calibration activations",
            "pass --data DIR with sample inputs, or use --algorithm mse / hqq (data-free)",
        )
    w = np.asarray(w, dtype=np.float32)
    bq, input_scale, measured = REGISTRY[algorithm].run(w, bits, block_size, symmetric, stats)
    d = _difference(w, bq, input_scale)
    err = _mean_square(d)
    if not compare and algorithm == "rtn":
        return QuantOutcome(bq, err, err)
    # RTN's residual in one kernel pass (per-column scale 1: bit for bit w - rtn(w).dequantize())
    d_rtn = d if algorithm == "rtn" else kernels.awq_residual(w, np.ones(w.shape[1], np.float32), block_size, bits,
                                                              symmetric)
    rtn_err = _mean_square(d_rtn)
    out_err = rtn_out = None
    if measured is not None:  # the algorithm's search measured both (awq)
        out_err, rtn_out = measured
    elif stats is not None and algorithm in DATA_AWARE:
        h = stats.hessian
        den = gram_quadratic(w, h)
        out_err, rtn_out = ((gram_quadratic(x, h) / den if den > 0 else gram_quadratic(x, h)) for x in (d, d_rtn))
    return QuantOutcome(bq, err, rtn_err, out_err, rtn_out, input_scale)


def _difference(w: np.ndarray, bq: BlockQuant, input_scale: np.ndarray | None) -> np.ndarray:
    """``w - w_hat`` (float32), made in the dequantized array (one temporary, not three)."""
    d = bq.dequantize()
    if input_scale is not None:
        d *= input_scale[None, :]
    return np.subtract(w, d, out=d)


def _mean_square(d: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", d, d, dtype=np.float64)) / max(d.size, 1)


@dataclass(frozen=True)
class Algorithm:
    """A weight-only algorithm: ``run(w, bits, block_size, symmetric, stats)`` returns the
    blocks, for activation-aware scaling the per-input-channel scale (else None), and the
    relative output errors (its own, RTN's) when its search measured them (else None)."""

    run: Callable[..., tuple[BlockQuant, np.ndarray | None, tuple[float, float] | None]]
    needs_data: bool  # reads calibration activations (ActivationStats)


# The registry: the CLI's --algorithm choices and the data checks follow it. A new algorithm
# is one function and one line here.
REGISTRY: dict[str, Algorithm] = {
    "rtn": Algorithm(lambda w, b, bs, sym, st: (rtn(w, b, bs, sym), None, None), needs_data=False),
    "mse": Algorithm(lambda w, b, bs, sym, st: (mse(w, b, bs, sym), None, None), needs_data=False),
    "hqq": Algorithm(lambda w, b, bs, sym, st: (hqq(w, b, bs, sym), None, None), needs_data=False),
    "gptq": Algorithm(lambda w, b, bs, sym, st: (gptq(w, b, bs, st.hessian, sym), None, None), needs_data=True),
    "awq": Algorithm(lambda w, b, bs, sym, st: awq(w, b, bs, st, sym), needs_data=True),
}
ALGORITHMS = tuple(REGISTRY)
DATA_AWARE = tuple(name for name, a in REGISTRY.items() if a.needs_data)
