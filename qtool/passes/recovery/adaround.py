"""Learned rounding (AdaRound, Nagel et al. 2020), per layer, in numpy.

Nearest rounding minimises each weight's own error, not the layer's output error. For one
output row w (K weights, scale s, grid offset f = floor(w / s)), the output error on
calibration inputs X is ``s^2 (f + h - w/s)^T G (f + h - w/s)`` with ``G = X^T X / rows``
and ``h`` in {0, 1} per weight (round down or up). AdaRound relaxes ``h`` to a rectified
sigmoid of a free variable V, minimises the error plus a regulariser that pushes every
``h`` to 0 or 1 (its exponent annealed from 20 to 2), with Adam, and rounds ``h`` at 0.5.

Each row then keeps whichever of the learned and the nearest rounding has the lower error
on this objective, so the result is never worse than nearest rounding on it. The chosen
integers are written back as float weights exactly on the int8 grid (``(q - z) s``), which
the static int8 pass then quantizes to those very integers.

The work per iteration is one batched matrix product ``[rows, K] x [K, K]`` per layer
(numpy's BLAS); the time budget is shared among layers by that cost, and a layer whose
budget allows only a few iterations gets fewer (never less than MIN_ITERATIONS).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)
REG_WEIGHT = 0.01  # lambda: the regulariser's weight against the (normalised) output error
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second
WARMUP = 0.2  # fraction of the iterations run without the regulariser
LEARNING_RATE = 0.05  # Adam on V; measured on ResNet-18's Convs: 0.01 moved too little in 300 steps
MAX_ITERATIONS = 1000
MIN_ITERATIONS = 30


@dataclass
class Rounding:
    """The chosen integers (rows' shape) and the objective for nearest and for the result."""

    q: np.ndarray
    nearest_error: float
    error: float
    iterations: int
    rows_kept_nearest: int


def row_errors(d: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """``d_r^T G d_r`` for each row r of ``d`` ([groups, rows, K]) with its group's G."""
    return np.einsum("gok,gok->go", d @ gram, d)


def _rectified(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sig = 1.0 / (1.0 + np.exp(-v))
    raw = sig * (ZETA - GAMMA) + GAMMA
    return np.clip(raw, 0.0, 1.0), sig, (raw > 0.0) & (raw < 1.0)


def learn_rounding(w_over_s: np.ndarray, lo: np.ndarray, hi: np.ndarray, gram: np.ndarray,
                   seconds: float, *, max_iterations: int = MAX_ITERATIONS) -> Rounding:
    """Round ``w_over_s`` ([groups, rows, K], the weight in grid steps, zero point removed)
    to integers in [lo, hi] minimising ``row_errors`` against ``gram``; see the module
    docstring. ``seconds``: the time this layer may take."""
    f = np.floor(w_over_s)
    nearest = np.clip(np.rint(w_over_s), lo, hi)
    up_only, down_only = f < lo, f + 1 > hi  # the grid's ends fix the direction
    free = ~(up_only | down_only)
    g32 = gram.astype(np.float32)
    norm = row_errors(nearest - w_over_s, gram)
    norm = np.where(norm > 0, norm, 1.0)[..., None].astype(np.float32)
    frac = np.clip((w_over_s - f - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    v = np.log(frac / (1.0 - frac)).astype(np.float32)
    m, s2 = np.zeros_like(v), np.zeros_like(v)
    target = (w_over_s - f).astype(np.float32)
    start, planned, it = time.perf_counter(), max_iterations, 0
    n_free = max(int(free.sum()), 1)
    while it < planned:
        h, sig, inside = _rectified(v)
        h = np.where(up_only, 1.0, np.where(down_only, 0.0, h))
        d = h - target
        grad = 2.0 * (d @ g32) / norm / d.shape[1] / d.shape[0]
        progress = it / max(planned - 1, 1)
        if progress >= WARMUP:
            beta = BETA[0] + (BETA[1] - BETA[0]) * (progress - WARMUP) / (1 - WARMUP)
            t = 2.0 * h - 1.0
            grad = grad - REG_WEIGHT / n_free * beta * np.abs(t) ** (beta - 1) * np.sign(t) * 2.0
        grad = grad * (ZETA - GAMMA) * sig * (1 - sig) * inside * free
        it += 1
        m = 0.9 * m + 0.1 * grad
        s2 = 0.999 * s2 + 0.001 * grad * grad
        v = v - LEARNING_RATE * (m / (1 - 0.9**it)) / (np.sqrt(s2 / (1 - 0.999**it)) + 1e-8)
        if it == 3:  # the cost of one step is known: fit the plan to the budget
            per = (time.perf_counter() - start) / it
            planned = int(min(max_iterations, max(MIN_ITERATIONS, seconds / max(per, 1e-9))))
        elif it % 16 == 0 and it >= MIN_ITERATIONS and time.perf_counter() - start > seconds:
            break  # a loaded machine slowed the steps down: the budget is a promise
    h, _, _ = _rectified(v)
    learned = f + np.where(up_only, 1.0, np.where(down_only, 0.0, (h >= 0.5).astype(np.float64)))
    learned = np.clip(learned, lo, hi)
    e_near, e_learned = row_errors(nearest - w_over_s, gram), row_errors(learned - w_over_s, gram)
    keep_nearest = e_learned > e_near
    q = np.where(keep_nearest[..., None], nearest, learned)
    return Rounding(q, float(e_near.sum()), float(np.minimum(e_near, e_learned).sum()), it,
                    int(keep_nearest.sum()))
