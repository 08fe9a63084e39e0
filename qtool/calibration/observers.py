"""Per-tensor observers: exact min/max (optionally a moving average) and a streaming
histogram that grows its range without losing counts and merges exactly.

The histogram's bins sit on a fixed grid anchored at zero: bin ``g`` of level ``k`` covers
``[g * 2^k, (g + 1) * 2^k)`` (``g`` any integer, width ``w = 2^k`` in the tensor's units).
A histogram holds ``bins`` consecutive grid bins starting at ``start``. Which level and
start are used depends only on the values seen, never on their order:

    k     = the smallest integer >= k_floor(max|x|) such that
            floor(max x / 2^k) - floor(min x / 2^k) + 1 <= bins
    start = floor(min x / 2^k)

with ``k_floor(a) = exponent(a) - 40`` (so ``x / 2^k < 2^40`` stays an exact integer in
float32 arithmetic) and never below -126. When new values need a wider range, the level
goes up by d and bin ``g`` becomes ``g >> d``: whole bins are merged two by two, every
count is kept. Two histograms merge by lifting both to the level their union needs and
adding counts, so N shards merged give exactly the histogram of one run over all data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

K_MIN = -126
_INDEX_HEADROOM = 40  # bits of grid index range above the largest magnitude


def _kernels():
    """``qtool.kernels`` if the native kernel library is importable, else None."""
    try:
        from qtool import kernels
    except Exception:  # not built yet, or being written: numpy is the reference
        return None
    return kernels


def batch_minmax(x: np.ndarray) -> tuple[float, float]:
    """(min, max) of a float array; NaN if it holds a NaN (NaN propagates), +-Inf if Inf."""
    kernels = _kernels()
    if kernels is not None and hasattr(kernels, "minmax") and x.dtype == np.float32:
        try:
            lo, hi = kernels.minmax(x)
            return float(lo), float(hi)
        except Exception:  # a NaN/Inf status: let numpy produce the propagated value
            pass
    return float(np.min(x)), float(np.max(x))


def level_for(lo: float, hi: float, bins: int) -> int:
    """The grid level ``k`` (bin width ``2^k``) a histogram of values in [lo, hi] uses."""
    a = max(abs(lo), abs(hi))
    k = K_MIN if a == 0 else max(K_MIN, math.frexp(a)[1] - _INDEX_HEADROOM)
    span = hi - lo
    if span > 0:
        # widths w <= span / bins cannot fit: start just above them.
        k = max(k, math.frexp(span / bins)[1])
    while math.floor(math.ldexp(hi, -k)) - math.floor(math.ldexp(lo, -k)) + 1 > bins:
        k += 1
    return k


class Histogram:
    """A streaming histogram on the power-of-two grid (see the module docstring).

    ``counts[j]`` counts values in ``[(start + j) * 2^k, (start + j + 1) * 2^k)``.
    ``lo``/``hi`` are the exact min and max seen.
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16:
            raise ValueError("a histogram needs at least 16 bins")
        self.bins = int(bins)
        self.k: int | None = None
        self.start = 0
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.lo = math.inf
        self.hi = -math.inf

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.k) if self.k is not None else 0.0

    def edges(self) -> np.ndarray:
        """Bin edges (bins + 1 of them), float64, in the tensor's units."""
        return (self.start + np.arange(self.bins + 1, dtype=np.float64)) * self.width

    def _regrid(self, lo: float, hi: float) -> None:
        """Move to the level and start that [lo, hi] need, keeping every count."""
        k = level_for(lo, hi, self.bins)
        start = math.floor(math.ldexp(lo, -k))
        if self.k is None:
            self.k, self.start = k, start
            return
        if k == self.k and start == self.start:
            return
        shift = k - self.k
        nonzero = np.nonzero(self.counts)[0]
        grid = (self.start + nonzero) >> shift  # floor division by 2^shift, exact
        counts = np.zeros(self.bins, dtype=np.int64)
        np.add.at(counts, grid - start, self.counts[nonzero])
        self.k, self.start, self.counts = k, start, counts

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Count the (finite) values of ``x``; ``lo``/``hi`` are its min/max if known."""
        if x.size == 0:
            return
        if lo is None or hi is None:
            lo, hi = batch_minmax(x)
        if self.k is None or lo < self.lo or hi > self.hi:
            # a range inside the one seen so far keeps the level and start: skip the regrid
            self._regrid(min(self.lo, lo), max(self.hi, hi))
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        add_bin_counts(self.counts, x, self.k, self.start)

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram holding the counts of both (exact: equals one run over both)."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        out = self.copy()
        if other.k is None:
            return out
        if out.k is None:
            return other.copy()
        lo, hi = min(out.lo, other.lo), max(out.hi, other.hi)
        out._regrid(lo, hi)
        theirs = other.copy()
        theirs._regrid(lo, hi)
        out.counts = out.counts + theirs.counts
        out.lo, out.hi = lo, hi
        return out

    def copy(self) -> Histogram:
        h = Histogram(self.bins)
        h.k, h.start, h.counts, h.lo, h.hi = self.k, self.start, self.counts.copy(), self.lo, self.hi
        return h

    def to_dict(self) -> dict:
        """JSON form: counts trimmed to the occupied bins, with their offset."""
        nz = np.nonzero(self.counts)[0]
        first, last = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        return {
            "bins": self.bins,
            "level": self.k,
            "start": self.start,
            "offset": first,
            "counts": self.counts[first:last].tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict, lo: float, hi: float) -> Histogram:
        h = cls(int(data["bins"]))
        h.k = None if data["level"] is None else int(data["level"])
        h.start = int(data["start"])
        counts = np.asarray(data["counts"], dtype=np.int64)
        offset = int(data["offset"])
        if offset < 0 or offset + counts.size > h.bins or (counts < 0).any():
            raise ValueError("histogram counts do not fit its bins")
        h.counts[offset : offset + counts.size] = counts
        h.lo, h.hi = lo, hi
        return h


def add_bin_counts(counts: np.ndarray, x: np.ndarray, k: int, start: int) -> None:
    """``counts += bin_counts(x, k, start, counts.size)``, in place: float32 data is counted
    straight into ``counts`` by the kernel (integer sums: the same counts, no temporary)."""
    kernels = _kernels()
    if (kernels is not None and hasattr(kernels, "histogram_pow2") and x.dtype == np.float32
            and counts.dtype == np.int64 and counts.flags.c_contiguous):
        kernels.histogram_pow2(x.reshape(-1), k, start, counts)
    else:
        counts += bin_counts(x, k, start, counts.size)


def bin_counts(x: np.ndarray, k: int, start: int, bins: int) -> np.ndarray:
    """Counts per bin: ``j = clamp(floor(x / 2^k) - start, 0, bins - 1)`` (int64[bins]).

    Dividing by a power of two is exact in float (a subnormal product is rounded the same
    way by every path), so the bin of a value never depends on the backend. float32 data
    goes through the ``histogram_pow2`` kernel (native, or its numpy twin: the same bins);
    other dtypes are binned here in their own precision. The clamp only matters for a
    value outside the range the level was chosen for.
    """
    flat = x.reshape(-1)
    kernels = _kernels()
    if kernels is not None and hasattr(kernels, "histogram_pow2") and flat.dtype == np.float32:
        return kernels.histogram_pow2(flat, k, start, np.zeros(bins, dtype=np.int64))
    scaled = np.multiply(flat, math.ldexp(1.0, -k))
    np.floor(scaled, out=scaled)
    scaled -= scaled.dtype.type(start)
    np.clip(scaled, 0, bins - 1, out=scaled)
    return np.bincount(scaled.astype(np.intp), minlength=bins)


@dataclass
class MinMax:
    """Exact min/max, element and batch counts, and an optional moving average of the
    per-batch min/max: ``m <- c * m + (1 - c) * batch_min`` (c = ``moving_average``)."""

    moving_average: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    count: int = 0
    batches: int = 0
    ema_lo: float = 0.0
    ema_hi: float = 0.0

    def update(self, lo: float, hi: float, n: int) -> None:
        c = self.moving_average
        if self.batches == 0:
            self.ema_lo, self.ema_hi = lo, hi
        else:
            self.ema_lo = c * self.ema_lo + (1 - c) * lo
            self.ema_hi = c * self.ema_hi + (1 - c) * hi
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if c == 0:  # no moving average: keep the exact values, so shards merge exactly
            self.ema_lo, self.ema_hi = self.lo, self.hi
        self.count += n
        self.batches += 1

    def merge(self, other: MinMax) -> MinMax:
        """Exact for min, max and counts; the moving averages are averaged by batch count
        (a moving average depends on order, so shards cannot reproduce it exactly)."""
        b = self.batches + other.batches
        wa, wb = (self.batches / b, other.batches / b) if b else (0.5, 0.5)
        if self.moving_average == 0:
            lo, hi = min(self.lo, other.lo), max(self.hi, other.hi)
            return MinMax(0.0, lo, hi, self.count + other.count, b, lo, hi)
        return MinMax(
            self.moving_average,
            min(self.lo, other.lo),
            max(self.hi, other.hi),
            self.count + other.count,
            b,
            wa * self.ema_lo + wb * other.ema_lo,
            wa * self.ema_hi + wb * other.ema_hi,
        )


class TensorObserver:
    """Everything calibration keeps about one tensor: min/max and (for histogram
    methods) a histogram. Memory: ``bins`` int64 counts, whatever the samples."""

    def __init__(self, bins: int = 2048, histogram: bool = True, moving_average: float = 0.0):
        self.minmax = MinMax(moving_average)
        self.histogram = Histogram(bins) if histogram else None

    def merged(self, other: TensorObserver) -> TensorObserver:
        """Both observers' statistics in one: exact (one observer over both streams of
        batches) for min/max, counts and histograms; see MinMax.merge for moving averages."""
        out = TensorObserver.__new__(TensorObserver)
        out.minmax = self.minmax.merge(other.minmax)
        out.histogram = (None if self.histogram is None or other.histogram is None
                         else self.histogram.merge(other.histogram))
        return out

    def update(self, x: np.ndarray) -> tuple[float, float]:
        """Observe one batch; returns its (min, max) so the caller can check finiteness."""
        if x.size == 0:
            return 0.0, 0.0
        lo, hi, counted = self._minmax_counted(x)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return lo, hi  # the caller raises, naming the tensor and sample
        self.minmax.update(lo, hi, int(x.size))
        if self.histogram is not None and not counted:
            self.histogram.update(x, lo, hi)
        return lo, hi

    def _minmax_counted(self, x: np.ndarray) -> tuple[float, float, bool]:
        """The batch's (min, max), and whether it was already counted into the histogram.

        Once the histogram has a grid, a batch whose values stay inside the range seen so
        far (most batches: that range only grows) keeps that grid, so one pass of the
        ``minmax_histogram_pow2`` kernel finds its min/max and counts it: the activations
        are read once instead of twice. A batch that widens the range is not counted there
        and goes through ``Histogram.update`` (regrid, then count): the same counts either way.
        """
        h = self.histogram
        kernels = _kernels()
        if h is None or h.k is None or x.dtype != np.float32 or kernels is None:
            return (*batch_minmax(x), False)
        try:
            return kernels.minmax_histogram_pow2(x.reshape(-1), h.k, h.start, h.counts, h.lo, h.hi)
        except kernels.NonFiniteError:  # counts untouched; numpy gives the propagated values
            return float(np.min(x)), float(np.max(x)), False
