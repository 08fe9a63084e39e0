"""Output error ``tr(D H D^T)`` (D = w - w_hat, H the input Hessian) and a cheap lower bound.

``gram_quadratic`` is the exact value every report and AWQ's choice use: the Gram matrix
D^T D by float32 products of row chunks of D with themselves (BLAS's symmetric rank-k
update), summed in float64, then its inner product with H in float64.

``head_factor`` gives a Nystrom factor F [K, r] of H from the r inputs of largest
diag(H): ``F F^T = H[:, P] H[P, P]^-1 H[P, :]``, and H - F F^T is the Schur complement of
H[P, P] in H, positive semi-definite, so ``||D F||^2 <= tr(D H D^T)`` for every D, at
r/K of the Gram matrix's work (one GEMM of D with F). LLM activations put most of H's
weight on a few inputs (outlier channels), so the bound is close: 0.5-0.95 of the exact
value on SmolLM2-135M at r = 64. AWQ's search (qtool.quant.awq) uses it to skip the exact
error of candidates that cannot win.
"""

from __future__ import annotations

import threading

import numpy as np

# Row chunks: a chunk of D and its Gram product stay in cache; each chunk's float32 Gram
# matrix is summed in float64.
ROWS = 2048


def gram_quadratic(d: np.ndarray, h: np.ndarray) -> float:
    """``tr(D H D^T) = <H, D^T D>`` for ``d`` [N, K] (see the module doc)."""
    d = np.ascontiguousarray(d, dtype=np.float32)
    gram = np.zeros((d.shape[1], d.shape[1]))
    for r0 in range(0, d.shape[0], ROWS):
        part = d[r0 : r0 + ROWS]
        gram += part.T @ part
    return float(np.einsum("ij,ij->", gram, h))


def sum_squares(y: np.ndarray) -> float:
    """Sum of squares of a float32 matrix: per row in float32 (SIMD, a few hundred terms),
    the rows in float64."""
    return float(np.einsum("ij,ij->i", y, y).sum(dtype=np.float64))


_CACHE: list[tuple[np.ndarray, np.ndarray | None]] = []  # MatMuls sharing an input share H
_LOCK = threading.Lock()


def head_width(k: int) -> int:
    """r: 64 inputs, 128 for wide inputs (K > 1024: MLP down projections)."""
    return min(k, 64 if k <= 1024 else 128)


def head_factor(h: np.ndarray) -> np.ndarray | None:
    """The Nystrom factor F (float32 [K, r]) of ``h`` (float64 [K, K], symmetric positive
    semi-definite), cached for the last few Hessians; None when ``h`` is not finite or the
    head block cannot be factored even with damping (no bound: callers evaluate exactly)."""
    with _LOCK:
        for key, factor in _CACHE:
            if key.shape == h.shape and np.array_equal(key, h):
                return factor
    factor = _nystrom(h, head_width(h.shape[0]))
    with _LOCK:
        _CACHE.insert(0, (h.copy(), factor))
        del _CACHE[3:]
    return factor


def _nystrom(h: np.ndarray, r: int) -> np.ndarray | None:
    if r == 0 or not np.isfinite(h).all():
        return None
    diag = np.diag(h)
    piv = np.argsort(-diag, kind="stable")[:r]
    block = h[np.ix_(piv, piv)]
    scale = float(np.mean(np.abs(diag))) or 1.0
    # Damping only lowers the bound (H[P, P] + delta I >= H[P, P], so its inverse is
    # smaller): it stays a lower bound. H is a sum of float32 products, so a zero
    # eigenvalue (a dead input) can come out slightly negative.
    for rel in (1e-9, 1e-6, 1e-3):
        try:
            lower = np.linalg.cholesky(block + rel * scale * np.eye(r))
        except np.linalg.LinAlgError:
            continue
        # F = H[:, P] L^-T, so F F^T = H[:, P] (L L^T)^-1 H[P, :]
        return np.ascontiguousarray(np.linalg.solve(lower, h[piv, :]).T, dtype=np.float32)
    return None
