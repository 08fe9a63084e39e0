"""Static SmoothQuant: outlier channels of a MatMul's input moved into its weight before
calibration, so the per-tensor int8 range of the activation is not spent on a few channels.

The rewrite is the dynamic path's (``qtool.passes.dynamic.smooth``: ``x W = (x / s)(s W)``,
``s_k = max|x_k|^a / max_n |W_kn|^(1-a)``, the 1/s folded into a LayerNorm / RMSNorm weight
or inserted as one Mul), applied only to inputs whose channels have outliers: the largest
channel maximum at least OUTLIER_RATIO times the median one. Inputs without outliers are
left alone (smoothing them moves range into weights for nothing). It runs before
calibration, so the table sees the smoothed activations.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool.config import Recipe
from qtool.passes import PassReport
from qtool.passes.dynamic import collect_channel_absmax, smooth, smoothing_inputs
from qtool.passes.graph import GraphBuilder

# LLM activations' outlier channels sit 20-100x above the median channel (SmoothQuant's
# figure 4); a ratio of 8 leaves ordinary spread alone.
OUTLIER_RATIO = 8.0


def outlier_ratio(absmax: np.ndarray) -> float:
    a = np.asarray(absmax, np.float64)
    median = float(np.median(a)) if a.size else 0.0
    return float(a.max()) / median if median > 0 else float("inf") if a.size and a.max() > 0 else 0.0


def smooth_static(model: ir.Model, recipe: Recipe, dataset, *, limit: int = 0) -> PassReport:  # noqa: ANN001
    """Smooth the MatMul inputs of ``model`` with outlier channels (see the module docstring)."""
    report = PassReport("smoothquant")
    names = smoothing_inputs(model, recipe)
    if not names:
        report.notes.append("no MatMul with a constant weight of at least 4096 elements: nothing to smooth")
        return report
    stats = collect_channel_absmax(model, dataset, names, limit=limit)
    chosen = {}
    for name, s in stats.items():
        ratio = outlier_ratio(s.absmax)
        if ratio >= OUTLIER_RATIO:
            chosen[name] = s
        else:
            report.notes.append(f"{name}: largest channel {ratio:.1f}x the median (< {OUTLIER_RATIO:g}x): left alone")
    too_noisy: dict[str, str] = {}
    if chosen:
        smooth(model, recipe, chosen, GraphBuilder(model), report, too_noisy)
    report.notes += [f"{node}: {why.replace('; kept float', '; not smoothed')}" for node, why in too_noisy.items()]
    return report
