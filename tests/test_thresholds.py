"""Range choice from histograms (qtool/calibration/thresholds.py): the fold of |x| and the
entropy / mse / percentile thresholds on histograms whose bins sit far from zero."""

from __future__ import annotations

import numpy as np
import pytest

from qtool.calibration.observers import Histogram
from qtool.calibration.thresholds import choose_range, fold

RNG = np.random.default_rng(77)
HISTOGRAM_CASES = [("entropy", {}), ("mse", {}), ("percentile", {"symmetric": True}),
                   ("percentile", {"symmetric": False})]


def _hist(x: np.ndarray, bins: int = 2048) -> Histogram:
    h = Histogram(bins)
    for part in np.array_split(x, 3):
        h.update(part)
    return h


def _dense_fold(h: Histogram) -> np.ndarray:
    """|x| counts from bin 0 to the last occupied one, bin by bin (only for grids near 0)."""
    out: dict[int, int] = {}
    for j in np.nonzero(h.counts)[0]:
        g = h.start + int(j)
        idx = g if g >= 0 else -g - 1
        out[idx] = out.get(idx, 0) + int(h.counts[j])
    dense = np.zeros(max(out) + 1, dtype=np.int64)
    for idx, c in out.items():
        dense[idx] = c
    return dense


@pytest.mark.parametrize("x", [
    RNG.standard_normal(50_000).astype(np.float32),  # both signs, grid across zero
    np.maximum(RNG.standard_normal(50_000), 0).astype(np.float32),  # ReLU: zeros
    (0.01 + RNG.random(50_000)).astype(np.float32),  # one-signed, starting off zero
    -(0.3 + RNG.random(50_000)).astype(np.float32),  # negative only
])
def test_fold_equals_the_bin_by_bin_fold_from_zero(x):
    h = _hist(x)
    counts, w, base = fold(h)
    assert w == h.width
    assert counts[0] > 0 and counts[-1] > 0 and counts.size <= h.bins
    assert np.array_equal(np.concatenate([np.zeros(base, np.int64), counts]), _dense_fold(h))


FAR = {
    # the corpus case: paraphrase_minilm_l3's attention mask cast to float, all ones. Its
    # grid sits 2^39 bins from zero: folding from zero asked for 4 TiB.
    "constant_ones": np.ones(4_000, np.float32),
    "around_1e6": (1e6 + RNG.random(60_000)).astype(np.float32),
    "around_minus_1e6": (-1e6 - RNG.random(60_000)).astype(np.float32),
    "around_1e6_float64": 1e6 + RNG.random(60_000),
}


@pytest.mark.parametrize("name", sorted(FAR))
def test_histogram_far_from_zero_folds_into_its_own_bins(name):
    x = FAR[name]
    h = _hist(x)
    assert abs(h.start) > 2**29  # the grid is far from zero
    counts, w, base = fold(h)
    assert counts.size <= h.bins
    assert int(counts.sum()) == x.size
    a = np.abs(x.astype(np.float64))
    assert base * w <= a.min() <= (base + 1) * w  # <=: a negative bin holds its upper edge
    assert (base + counts.size - 1) * w <= a.max() <= (base + counts.size) * w


def _expected_squared_error(x: np.ndarray, t: float, steps: float) -> float:
    """The mse method's objective on the values themselves (module docstring)."""
    a = np.abs(x.astype(np.float64))
    inside = a <= t
    return float(inside.sum() * (t / steps) ** 2 / 12 + np.sum((a[~inside] - t) ** 2))


@pytest.mark.parametrize("name", sorted(FAR))
@pytest.mark.parametrize(("method", "kw"), HISTOGRAM_CASES)
def test_far_from_zero_ranges_are_ordered_and_right(name, method, kw):
    x = FAR[name]
    h = _hist(x)
    lo, hi = choose_range(method, h.lo, h.hi, h, **kw)
    assert h.lo <= lo <= hi <= h.hi, (lo, hi)
    if h.lo == h.hi:
        assert (lo, hi) == (h.lo, h.hi)
        return
    kept = np.mean((x >= lo) & (x <= hi))
    if method == "percentile" and kw["symmetric"]:
        # 99.99 % of |x| kept: the clipped end is numpy's quantile of |x|, to within a bin
        clipped = hi if h.lo > 0 else -lo
        assert abs(clipped - np.quantile(np.abs(x.astype(np.float64)), 0.9999)) <= 2 * h.width
    elif method == "percentile":
        tails = np.quantile(x.astype(np.float64), [0.00005, 0.99995])
        assert np.allclose((lo, hi), tails, rtol=0, atol=2 * h.width), ((lo, hi), tails)
    elif method == "entropy":
        # uniform data without outliers: the KL threshold keeps the bulk
        assert kept > 0.85, kept
    else:
        # zero-anchored 8-bit steps are ~4000 here: clipping everything to one level just
        # above the minimum is what minimises the expected error, and it does
        t = hi if h.lo > 0 else -lo
        assert _expected_squared_error(x, t, 255) <= _expected_squared_error(x, abs(h.hi if h.lo > 0 else h.lo), 255)
        assert t >= np.abs(x).min()


@pytest.mark.parametrize("x", [
    # a HardSigmoid output in a narrow band (ppocrv5_cls): no |x| in the first 255 bins
    RNG.uniform(0.25, 0.26, 60_000).astype(np.float32),
    # both signs, nothing near zero (ppocrv5_cls's p2o.MatMul.1): no |x| in the first 128 bins
    (np.sign(RNG.standard_normal(60_000)) * RNG.uniform(2.0, 3.3, 60_000)).astype(np.float32),
])
def test_entropy_never_picks_a_threshold_below_every_value(x):
    """The search used to start at `levels` bins from zero whatever the data: every such
    candidate clipped all values into one bin (KL exactly 0) and won, giving an inverted
    range ([0.25, 0.06]) or one that clipped everything ([-2, 2] for |x| in [2, 3.3])."""
    h = _hist(x)
    _, _, base = fold(h)
    assert base >= 255
    lo, hi = choose_range("entropy", h.lo, h.hi, h)
    assert h.lo <= lo <= hi <= h.hi
    assert np.mean((x >= lo) & (x <= hi)) > 0.9
