"""Choosing a tensor's range [lo, hi] from its statistics.

- ``minmax``: the exact min and max (or their moving averages).
- ``percentile``: keep ``p`` percent of the values. Symmetric: ``t`` = the p-th percentile
  of ``|x|``, range ``[-t, t]`` clipped to the data. Asymmetric: the two tails share the
  rest equally, range = [quantile((100 - p) / 200), quantile(1 - (100 - p) / 200)].
  Quantiles interpolate linearly inside a bin, so they are exact to within one bin width.
- ``entropy``: the threshold ``t`` (a bin edge) minimising KL(P || Q), where P is the
  histogram of |x| up to t with everything beyond t added to its last bin, and Q is P's
  in-range part quantized to the number of levels the target type has on that side
  (2^bits - 1 steps for one-signed data, 2^(bits-1) for data of both signs) and expanded
  back over P's non-empty bins.
- ``mse``: the threshold minimising the expected squared error of quantizing with it:
  ``E(t) = N_in(t) * delta(t)^2 / 12 + sum_{|x| > t} (|x| - t)^2`` with step
  ``delta(t) = t / (2^bits - 1)`` for one-signed data and ``2 t / (2^bits - 1)`` for data of
  both signs (units: the tensor's units squared, summed over values).

Entropy and MSE work on |x| (the histogram folded at zero, exact since zero is a bin edge)
and give ``[max(min, -t), min(max, t)]``; for one-signed data that is ``[0, t]`` or
``[-t, 0]`` clipped to the data. No candidate threshold lies at or below every |x| (it
would clip every value to one point): mse's start above the first occupied |x| bin;
entropy's start at ``levels`` bins, or, when no |x| lies in the first ``levels`` bins, at
``levels`` bins above the first occupied one.

The folded histogram is kept in its own bin range, from its first occupied |x| bin (an
offset ``base``), not from zero: the grid's bins can sit up to 2^40 bin widths from zero
(a constant tensor of ones has them at 2^39), so counting from zero would need terabytes.
"""

from __future__ import annotations

import math

import numpy as np

from qtool.calibration.observers import Histogram


def fold(hist: Histogram) -> tuple[np.ndarray, float, int]:
    """Counts of |x| on bins ``[(base + j) w, (base + j + 1) w)``, j = 0.., the bin width
    ``w`` and ``base``, the first occupied |x| bin (the bins below it are empty).

    At most ``hist.bins`` counts whatever ``start`` is: the occupied grid bins fold onto
    |x| bins no further apart than they were.
    """
    w = hist.width
    occupied = np.nonzero(hist.counts)[0]
    if occupied.size == 0:
        return np.zeros(1, dtype=np.int64), w, 0
    grid = hist.start + occupied
    # bin g < 0 covers [g w, (g + 1) w): its |x| lies in ((-g - 1) w, -g w]
    index = np.where(grid >= 0, grid, -grid - 1)
    base = int(index.min())
    folded = np.zeros(int(index.max()) - base + 1, dtype=np.int64)
    np.add.at(folded, index - base, hist.counts[occupied])
    return folded, w, base


def quantile(hist: Histogram, q: float) -> float:
    """The q-quantile (0 <= q <= 1) of the histogrammed values, linear inside a bin."""
    total = hist.total
    if total == 0:
        return 0.0
    cum = np.cumsum(hist.counts)
    target = q * total
    j = int(np.searchsorted(cum, target, side="left"))
    j = min(j, hist.bins - 1)
    before = cum[j - 1] if j > 0 else 0
    inside = hist.counts[j]
    frac = (target - before) / inside if inside else 0.0
    # Interpolate between the bin's edges, narrowed to the exact min/max in the end bins
    # (a ReLU output's zero bin then gives exactly 0, not a point inside the bin).
    left = max((hist.start + j) * hist.width, hist.lo)
    right = min((hist.start + j + 1) * hist.width, hist.hi)
    return float(left + frac * (right - left))


def _folded_quantile(counts: np.ndarray, w: float, base: int, q: float) -> float:
    """The q-quantile of |x| from ``fold``'s counts (the bins below ``base`` hold nothing,
    and q > 0, so the quantile's bin is never among them)."""
    total = counts.sum()
    cum = np.cumsum(counts)
    target = q * total
    j = min(int(np.searchsorted(cum, target, side="left")), counts.size - 1)
    before = cum[j - 1] if j > 0 else 0
    frac = (target - before) / counts[j] if counts[j] else 0.0
    return float((base + j + frac) * w)


def percentile_range(hist: Histogram, percentile: float, symmetric: bool) -> tuple[float, float]:
    if not 0 < percentile <= 100:
        raise ValueError("percentile must be in (0, 100]")
    if hist.total == 0:
        return 0.0, 0.0
    if symmetric:
        counts, w, base = fold(hist)
        t = min(_folded_quantile(counts, w, base, percentile / 100), max(abs(hist.lo), abs(hist.hi)))
        return _clip_symmetric(hist, t)
    tail = (100 - percentile) / 200
    return quantile(hist, tail), quantile(hist, 1 - tail)


def _clip_symmetric(hist: Histogram, t: float) -> tuple[float, float]:
    return max(hist.lo, -t), min(hist.hi, t)


def _one_signed(hist: Histogram) -> bool:
    return hist.lo >= 0 or hist.hi <= 0


def entropy_range(hist: Histogram, bits: int = 8) -> tuple[float, float]:
    """KL-optimal threshold (see module docstring); searches every candidate bin edge
    from the number of levels (counted from the first occupied bin for data far from
    zero) to the max, coarse-to-fine."""
    if hist.total == 0:
        return 0.0, 0.0
    counts, w, base = fold(hist)
    levels = 2**bits - 1 if _one_signed(hist) else 2 ** (bits - 1)
    n = base + counts.size  # |x| bins from zero to the last occupied one
    if n <= levels or (base >= levels and n - base <= levels):
        return hist.lo, hist.hi  # fewer occupied bins than levels: nothing to gain
    # Data far from zero (no |x| in the first `levels` bins): a candidate keeping only a
    # few bins above the first occupied one clips nearly every value into its last bin,
    # where P and Q agree (KL 0 at one bin): those would always win. Like the search from
    # zero, a candidate keeps at least `levels` bins of the data.
    first = levels if base < levels else base + levels
    if base < levels:
        # Every candidate's P then starts at bin 0: searched on the same arrays as always
        # (the sums of Q below run over them in the same order), for identical results.
        counts, base = np.concatenate([np.zeros(base, dtype=np.int64), counts]), 0
    p_all = counts.astype(np.float64)
    if _one_signed(hist) and base == 0:
        # A ReLU/Clip output piles most of its mass on exact zeros, which the zero point
        # represents exactly whatever the threshold. Left in, that spike dominates the
        # divergence and drives the threshold down to the first candidate (clipping a
        # ReLU6 at 1.0); so the first bin does not vote.
        p_all[0] = 0.0
    # p_all[j] is |x| bin base + j; candidate i (threshold i w) keeps p_all[: i - base].
    suffix = np.concatenate([np.cumsum(p_all[::-1])[::-1], [0.0]])
    scaled_index = (base + np.arange(p_all.size + 1)) * levels
    occupied = p_all > 0
    occupied_f = occupied.astype(np.float64)
    # P's total is the same for every candidate (the tail joins the last bin) and, the
    # counts being integers below 2^53, exact in any summation order: computed once.
    add = np.add.reduce  # np.sum's reduction without its Python wrapper: the same sums
    total = add(p_all)
    total = total if total < 2.0**53 else None

    # The same floating-point operations on the same operands as the textbook form (q =
    # sums[group] / nonzero[group], smoothed where p > 0 and q == 0), with what does not
    # depend on the candidate hoisted out: this search is most of entropy calibration's
    # fixed cost (50 tensors: 0.5 s before, at 32 samples a sixth of the run).
    def kl(i: int) -> float:
        kept = i - base
        ref = p_all[:kept]
        p = ref.copy()
        p[-1] += suffix[kept]
        group = scaled_index[:kept] // i
        sums = np.bincount(group, weights=ref, minlength=levels)
        nonzero = np.bincount(group, weights=occupied_f[:kept], minlength=levels)
        q = np.where(occupied[:kept], (sums / nonzero)[group], 0.0)
        mask = p > 0
        # q is 0 where p > 0 only in the last bin (the clipped tail; every other bin with
        # mass has a non-empty group): smooth Q there so the divergence is large but finite.
        if mask[-1] and q[-1] == 0:
            q[-1] = 1e-4 * p[-1] + 1e-12
        p_n, q_n = p[mask] / (add(p) if total is None else total), q[mask] / add(q)
        return float(add(p_n * np.log(p_n / q_n)))

    candidates = range(first, n + 1)
    step = max(1, len(candidates) // 128)
    with np.errstate(divide="ignore", invalid="ignore"):
        best = min(candidates[::step], key=kl)
        fine = range(max(first, best - step + 1), min(n, best + step - 1) + 1)
        best = min(fine, key=kl)
    return _clip_symmetric(hist, best * w)


def mse_range(hist: Histogram, bits: int = 8) -> tuple[float, float]:
    """Threshold minimising the expected squared quantization error (module docstring),
    among the bin edges above the first occupied |x| bin."""
    if hist.total == 0:
        return 0.0, 0.0
    counts, w, base = fold(hist)
    steps = 2**bits - 1 if _one_signed(hist) else (2**bits - 1) / 2
    c = counts.astype(np.float64)
    centers = (base + np.arange(c.size) + 0.5) * w
    # tail sums from bin base + i upward: S0 = sum c, S1 = sum c x, S2 = sum c x^2 (the
    # empty bins below base add nothing: s0[0] is the total)
    s0 = np.concatenate([np.cumsum(c[::-1])[::-1], [0.0]])
    s1 = np.concatenate([np.cumsum((c * centers)[::-1])[::-1], [0.0]])
    s2 = np.concatenate([np.cumsum((c * centers**2)[::-1])[::-1], [0.0]])
    i = np.arange(1, c.size + 1)
    t = (base + i) * w
    delta = t / steps
    inside = s0[0] - s0[i]
    err = inside * delta**2 / 12 + s2[i] - 2 * t * s1[i] + t**2 * s0[i]
    best = base + int(i[int(np.argmin(err))])
    return _clip_symmetric(hist, best * w)


def choose_range(
    method: str,
    lo: float,
    hi: float,
    hist: Histogram | None,
    *,
    percentile: float = 99.99,
    symmetric: bool = False,
    bits: int = 8,
    ema: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The range ``method`` picks for a tensor with exact ``lo``/``hi`` and ``hist``."""
    if method == "minmax":
        lo, hi = ema if ema is not None else (lo, hi)
        if symmetric:
            a = max(abs(lo), abs(hi))
            return (-a if lo < 0 else lo), a
        return lo, hi
    if hist is None:
        raise ValueError(f"method {method} needs a histogram")
    if method not in HISTOGRAM_RANGES:
        raise ValueError(f"unknown calibration method {method!r}")
    return HISTOGRAM_RANGES[method](hist, percentile=percentile, symmetric=symmetric, bits=bits)


# The registry of histogram methods (range from a histogram; the CLI's --method choices and
# the tables' method check follow it). A new method is one function and one line here.
HISTOGRAM_RANGES = {
    "percentile": lambda hist, *, percentile, symmetric, bits: percentile_range(hist, percentile, symmetric),
    "entropy": lambda hist, *, percentile, symmetric, bits: entropy_range(hist, bits),
    "mse": lambda hist, *, percentile, symmetric, bits: mse_range(hist, bits),
}
HISTOGRAM_METHODS = tuple(HISTOGRAM_RANGES)
METHODS = ("minmax", *HISTOGRAM_METHODS)


def is_finite_range(r: tuple[float, float]) -> bool:
    return all(math.isfinite(v) for v in r)
