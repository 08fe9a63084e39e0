"""Static SmoothQuant: outlier channels of a MatMul's input moved into its weight before
calibration, so the per-tensor int8 range of the activation is not spent on a few channels;
and the same rewrite on a Gemm input where it lowers the estimated output noise of int8
(``smooth_gemms``: uneven weight columns, e.g. a classifier head that normalises features).

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

from qtool import ops
from qtool.config import Recipe
from qtool.passes import PassReport
from qtool.passes.dynamic import collect_channel_absmax, smooth, smoothing_inputs
from qtool.passes.graph import GraphBuilder, drop_unused_initializers
from qtool.passes.recovery.layers import set_weight

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
    smooth_gemms(model, recipe, dataset, report, limit=limit)
    names = smoothing_inputs(model, recipe)
    if not names:
        report.notes.append("no MatMul with a constant weight of at least 4096 elements")
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
        unread = {v for v in model.graph.initializers.values() if not v.uses()}
        smooth(model, recipe, chosen, GraphBuilder(model), report, too_noisy, alpha=STATIC_MATMUL_ALPHA)
        # The smoothed weights are new initializers: the old ones, now unread, would make
        # onnxruntime's session for calibration fail (it is handed every initializer). So would
        # a smoothed weight that a later fold replaced again (the gated MLP's up projection,
        # smoothed for its own input, then scaled for the down projection's).
        drop_unused_initializers(model.graph, [v for v in model.graph.initializers.values() if v not in unread])
    report.notes += [f"{node}: {why.replace('; kept float', '; not smoothed')}" for node, why in too_noisy.items()]
    return report


# Static ranges hold every calibration sample's outliers, so the migration that suits dynamic
# int8 (SMOOTH_ALPHA 0.7, ranges per batch) leaves the activation side too wide. NNCF's
# transformer preset moves 0.95 of it into MatMul weights (its AdvancedSmoothQuantParameters);
# on SmolLM2 (MatMul-only static int8, perplexity; fp32 46.7, NNCF 52.5): 0.7 gave 82.8, the
# alpha with the lowest ``output_noise`` estimate per input 77.5, 0.95 gave 53.0.
STATIC_MATMUL_ALPHA = 0.95


# ---------------------------------------------------------------------------- Gemm inputs

# Smoothing a Gemm pays when it at least halves the estimated output noise (3 dB).
MIN_NOISE_GAIN = 2.0
ALPHAS = (0.25, 0.5, 0.75)  # migration strengths tried; the lowest estimated noise wins
POOLING = ("GlobalAveragePool",)


def noise_terms(absmax: np.ndarray, mean_square: np.ndarray, w: np.ndarray, s: np.ndarray,
                per_channel: bool) -> tuple[float, float]:
    """Estimated mean squared error of ``y = x W`` (W as [K, N]) when ``x / s`` is
    quantized per tensor to 8 bits and ``s W`` per output column (or per tensor): each
    side's rounding noise (step^2 / 12) carried through the other side's values, as
    (activation part, weight part)."""
    ws = w * s[:, None]
    step_x = float(np.max(absmax / s)) / 255.0
    act = step_x**2 / 12.0 * (ws**2).sum(axis=0)
    wmax = np.abs(ws).max(axis=0) if per_channel else np.full(ws.shape[1], np.abs(ws).max())
    weight = (wmax / 127.0) ** 2 / 12.0 * float((mean_square / s**2).sum())
    return float(np.mean(act)), float(np.mean(weight))


def output_noise(absmax: np.ndarray, mean_square: np.ndarray, w: np.ndarray, s: np.ndarray,
                 per_channel: bool) -> float:
    """The sum of ``noise_terms``."""
    return sum(noise_terms(absmax, mean_square, w, s, per_channel))


def smooth_gemms(model: ir.Model, recipe: Recipe, dataset, report: PassReport, *, limit: int = 0) -> None:  # noqa: ANN001
    """Static SmoothQuant of Gemm inputs (``x W = (x / s)(s W)``, ``s_k = max|x_k|^a /
    max_n |W_kn|^(1-a)``) where that at least halves the estimated output noise
    (``output_noise``): a classifier whose weight columns differ by orders of magnitude
    (a head that normalises its features) loses most of them to per-row int8 otherwise.
    The 1/s Mul goes before a GlobalAveragePool -> Flatten feeding the Gemm when there is
    one (the pooled average then quantizes at the smoothed range), else right before it."""
    nodes = [n for n in model.graph if _gemm_candidate(n, recipe)]  # If/Loop bodies cannot be observed
    if not nodes:
        return
    stats = collect_channel_absmax(model, dataset, [n.inputs[0].name for n in nodes], limit=limit)
    b = GraphBuilder(model)
    per_channel = recipe.quantize.per_channel
    for node in nodes:
        st = stats.get(node.inputs[0].name)
        w = _as_kn(node)
        if st is None or st.absmax.shape[0] != w.shape[0]:
            continue
        valid = (st.absmax > 0) & (np.abs(w).max(axis=1) > 0)
        act, weight = noise_terms(st.absmax, st.mean_square, w, np.ones(w.shape[0]), per_channel)
        base, best, best_s = act + weight, act + weight, None
        # Without a pooling to put the Div before, x itself stays quantized at its own range
        # (its producer's output) and x / s is quantized again: both activation noises count.
        kept = 0.0 if _pooled(node) is not None else act
        for a in ALPHAS:
            s = np.ones(w.shape[0])
            s[valid] = st.absmax[valid] ** a / np.abs(w[valid]).max(axis=1) ** (1 - a)
            s = np.clip(s / np.exp(np.mean(np.log(s))), 1e-4, 1e4)  # geometric mean 1: ranges stay put
            noise = kept + output_noise(st.absmax, st.mean_square, w, s, per_channel)
            if noise < best:
                best, best_s = noise, s
        if best_s is None or base < MIN_NOISE_GAIN * best:
            report.notes.append(f"{node.name}: smoothing would not halve the estimated output noise: left alone")
            continue
        _apply(b, node, w, best_s)
        report.count("Gemm inputs smoothed")
        report.notes.append(f"{node.name}: estimated output noise {best / base:.3g}x of unsmoothed")


def _gemm_candidate(node: ir.Node, recipe: Recipe) -> bool:
    from qtool.passes.select import excluded, is_float_activation

    q = recipe.quantize
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or excluded(node, q.exclude):
        return False
    if q.op_types and "Gemm" not in q.op_types:
        return False
    a = node.attributes
    if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0:
        return False
    tensor = ops.constant_weight(node, 1)
    return (tensor is not None and tensor.dtype == ir.DataType.FLOAT and len(tensor.shape) == 2
            and is_float_activation(node.inputs[0]) and len(list(node.inputs[1].uses())) == 1)


def _as_kn(node: ir.Node) -> np.ndarray:
    w = np.asarray(ops.constant_weight(node, 1).numpy(), np.float64)
    return w.T if node.attributes.get_int("transB", 0) else w


def _apply(b: GraphBuilder, node: ir.Node, w_kn: np.ndarray, s: np.ndarray) -> None:
    scaled = w_kn * s[:, None]
    new = scaled.T if node.attributes.get_int("transB", 0) else scaled
    set_weight(b, node, 1, new, "smoothed")  # in place: the old weight would linger unused
    x = node.inputs[0]
    pool = _pooled(node)
    # A Div, not a Mul by 1/s: the int8 pass quantizes a Mul's constant operand per tensor
    # (1/s spans decades: most of it would round to 0) and has no Div rule, so the Div runs
    # in float and only its output is quantized, at the smoothed range.
    inv = s.astype(np.float32)
    if pool is not None:
        # x / s = Flatten(GAP(t / s)): the Mul by a [C, 1, 1] constant reads the feature map
        rank = len(pool.inputs[0].shape) if pool.inputs[0].shape is not None else 4
        c = b.initializer(inv.reshape((-1,) + (1,) * (rank - 2)), f"{x.name}_smooth_scale")
        mul = b.node("Div", [pool.inputs[0], c], f"{x.name}_smooth", dtype=ir.DataType.FLOAT,
                     shape=pool.inputs[0].shape)
        pool.graph.insert_before(pool, mul)
        pool.replace_input_with(0, mul.outputs[0])
        return
    c = b.initializer(inv, f"{x.name}_smooth_scale")
    mul = b.node("Div", [x, c], f"{x.name}_smooth", dtype=ir.DataType.FLOAT, shape=x.shape)
    node.graph.insert_before(node, mul)
    node.replace_input_with(0, mul.outputs[0])


def _pooled(node: ir.Node) -> ir.Node | None:
    """The GlobalAveragePool of ``GAP -> Flatten -> node`` (each read only by the next), if so."""
    x = node.inputs[0]
    flatten = x.producer()
    if flatten is None or flatten.op_type != "Flatten" or flatten.attributes.get_int("axis", 1) != 1:
        return None
    pool = flatten.inputs[0].producer()
    if pool is None or pool.op_type not in POOLING:
        return None
    return pool if _sole_reader(x, node) and _sole_reader(flatten.inputs[0], flatten) else None


def _sole_reader(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(user is node for user, _ in value.uses())
