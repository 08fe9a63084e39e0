"""AWQ for weight-only blocks (``qtool.quant.blockwise``'s ``awq`` algorithm).

Activation-aware scaling: quantize ``w[:, k] * s_k`` and feed ``x_k / s_k``, with
``s = m^alpha / sqrt(max(m^alpha) min(m^alpha))``, ``m = mean|x|`` per input channel and
alpha on a grid over [0, 1] chosen by the output error ``tr(D H D^T)`` (D = w - w_hat).

The search gives the same choice as computing every candidate's exact error (the Gram
form, qtool.quant.quadratic), without computing all of them: first each candidate's cheap
lower bound (``||D F||^2``, F the Nystrom head factor of H), then, from the lowest bound
up, exact errors, skipping a candidate whose bound exceeds the best exact error so far.
Inside an exact error the bound tightens chunk by chunk (exact on the rows done, the
bound on the rest), so a loser also stops part way. A bound must exceed the best by a
relative margin, far above the float32 rounding of either side, so a skipped candidate
could not have won by a rounding difference either: the codes are those of the full
search (bench/results/gptq_speed.md shows them identical on SmolLM2-135M).
"""

from __future__ import annotations

import numpy as np

from qtool import kernels
from qtool.quant.blockwise import ActivationStats, rtn
from qtool.quant.formats import BlockQuant
from qtool.quant.quadratic import ROWS, gram_quadratic, head_factor, sum_squares

# A bound skips a candidate only when above the best exact error by this relative margin.
_MARGIN = 1e-3
# Residuals kept between the bound and the exact pass when all candidates' fit in this.
_CACHE_BYTES = 64 << 20


def awq_scales(stats: ActivationStats, n_grid: int) -> list[np.ndarray]:
    """The candidate scales (float32 [K]) for alpha = 0, 1/(n_grid-1), ..., 1; alpha = 0
    gives all ones (RTN)."""
    m = np.maximum(stats.abs_sum / max(stats.count, 1), 1e-8)
    out = []
    for alpha in np.linspace(0.0, 1.0, n_grid):
        s = np.power(m, alpha)
        out.append((s / np.sqrt(s.max() * s.min())).astype(np.float32))
    return out


def residual(w: np.ndarray, s: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """``D = w - rtn(w * s).dequantize() / s`` (float32) in one kernel pass, bit for bit the
    composition (tests/test_awq.py)."""
    return kernels.awq_residual(w, s, block_size, bits, symmetric)


def awq(w: np.ndarray, bits: int, block_size: int, stats: ActivationStats, symmetric: bool = True,
        n_grid: int = 11) -> tuple[BlockQuant, np.ndarray | None, tuple[float, float]]:
    """AWQ on ``w[N, K]``: the quantized scaled weight, the activation factor ``1/s`` [K]
    (None when alpha = 0 won: no rescaling needed), and the relative output errors
    (the chosen candidate's, RTN's) that the search measured."""
    w = np.ascontiguousarray(w, np.float32)
    h = stats.hessian
    scales = awq_scales(stats, n_grid)
    errors = _search(w, scales, bits, block_size, symmetric, h)
    den = gram_quadratic(w, h)
    best = min(range(len(scales)), key=lambda i: (errors[i], i))  # the smallest alpha on a tie
    s = scales[best]
    bq = rtn(w * s[None, :], bits, block_size, symmetric)
    rel = tuple(e / den if den > 0 else e for e in (errors[best], errors[0]))
    return bq, (None if best == 0 else (1.0 / s).astype(np.float32)), rel


def _search(w: np.ndarray, scales: list[np.ndarray], bits: int, block_size: int, symmetric: bool,
            h: np.ndarray) -> list[float]:
    """Each candidate's exact output error, or +inf where its bound exceeded the best."""
    chunks = [(r0, min(r0 + ROWS, w.shape[0])) for r0 in range(0, w.shape[0], ROWS)]
    head = head_factor(h)
    keep = w.nbytes * len(scales) <= _CACHE_BYTES
    lows = np.zeros((len(scales), len(chunks)))
    kept: dict[tuple[int, int], np.ndarray] = {}
    if head is not None:
        for i, s in enumerate(scales):
            for c, (r0, r1) in enumerate(chunks):
                d = residual(w[r0:r1], s, bits, block_size, symmetric)
                lows[i, c] = sum_squares(d @ head)
                if keep:
                    kept[i, c] = d
    errors = [np.inf] * len(scales)
    best = np.inf
    gram = np.empty((w.shape[1], w.shape[1]))  # one buffer: a fresh K x K array costs page faults
    # alpha = 0 (RTN) first: the report needs its exact error
    for i in [0, *sorted(range(1, len(scales)), key=lambda i: lows[i].sum())]:
        if lows[i].sum() > best * (1 + _MARGIN):
            continue
        for c, (r0, r1) in enumerate(chunks):
            d = kept.pop((i, c)) if keep and head is not None else residual(w[r0:r1], scales[i], bits, block_size, symmetric)
            if c == 0:  # 0 + x is x: the same sums as adding into zeros, one pass less
                np.copyto(gram, d.T @ d)
            else:
                gram += d.T @ d
            if c + 1 < len(chunks) and best < np.inf:
                bound = float(np.einsum("ij,ij->", gram, h)) + lows[i, c + 1 :].sum()
                if bound > best * (1 + _MARGIN):
                    break
        else:  # not cut short: the exact error, as the full search computes it
            errors[i] = float(np.einsum("ij,ij->", gram, h))
            best = min(best, errors[i])
    return errors
