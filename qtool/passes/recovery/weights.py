"""The two recovery steps that run after calibration, on the weights static int8 will use:
learned rounding (``adaround``) and empirical bias correction (``bias_correct``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qtool.config import Recipe
from qtool.passes import PassReport
from qtool.passes.graph import GraphBuilder
from qtool.passes.recovery.adaround import MIN_ITERATIONS, learn_rounding
from qtool.passes.recovery.collect import MAX_K, ROWS_PER_SAMPLE, input_grams, mean_output_shift
from qtool.passes.recovery.layers import Layer, bias_of, set_bias, set_weight, target_layers

ROWS_SAMPLES = 1024  # "every sample": the estimate assumes this many
# Correcting a shift well inside the int32 bias's own step changes nothing.
MIN_SHIFT = 1e-9


def adaround(model: ir.Model, recipe: Recipe, dataset, *, seconds: float, limit: int = 0,  # noqa: ANN001
             float_weights: dict[str, np.ndarray] | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> PassReport:
    """Learn each target layer's rounding on ``dataset`` within ``seconds`` overall (see
    qtool.passes.recovery.adaround) and write the rounded weights back on the int8 grid.
    ``float_weights`` receives each layer's weight before rounding (bias correction
    measures the shift against it)."""
    report = PassReport("adaround")
    layers, skipped = target_layers(model, recipe)
    report.skipped.update(skipped)
    start = time.perf_counter()
    samples = min(limit or len(dataset), len(dataset)) if hasattr(dataset, "__len__") else limit or ROWS_SAMPLES
    layers, over = affordable(layers, seconds, samples)
    for layer in over:
        report.skip(layer.name, f"over the time budget ({seconds:g} s for the model; the largest layers go first): "
                                "nearest rounding")
    grams = input_grams(model, layers, dataset, limit=limit, seconds=seconds / 3)
    left = max(seconds - (time.perf_counter() - start), 0.0)
    cost = {layer.name: _cost(layer, grams) for layer in layers if layer.name in grams}
    total = sum(cost.values()) or 1.0
    b = GraphBuilder(model)
    near_sum = learned_sum = 0.0
    for i, layer in enumerate(layers):
        if layer.name not in grams:
            k = layer.rows().shape[2]
            report.skip(layer.name, f"{k} inputs per output: over AdaRound's size limit ({MAX_K}); nearest rounding"
                        if k > MAX_K else "a Conv form the patch extraction does not unfold (auto_pad or not 2-D)")
            continue
        scale, zp, qmin, qmax = layer.grid(recipe)
        w_over_s = layer.rows().astype(np.float64) / scale
        result = learn_rounding(w_over_s, qmin - zp, qmax - zp, grams[layer.name],
                                left * cost[layer.name] / total)
        # The objective in output units: each row's error times its scale squared.
        s2 = scale[..., 0] ** 2
        near = float((s2 * _errs(np.clip(np.rint(w_over_s), qmin - zp, qmax - zp) - w_over_s, grams[layer.name])).sum())
        learned = float((s2 * _errs(result.q - w_over_s, grams[layer.name])).sum())
        near_sum, learned_sum = near_sum + near, learned_sum + learned
        if float_weights is not None:
            float_weights[layer.name] = layer.weight
        set_weight(b, layer.node, 1, layer.from_rows(result.q * scale), "adarounded")
        report.count("layers rounded")
        report.notes.append(f"{layer.name}: output error {_ratio(learned, near)} of nearest rounding's "
                            f"({result.iterations} steps, {result.rows_kept_nearest} rows kept nearest)")
        if on_progress is not None:
            on_progress(i + 1, len(layers))
    if near_sum > 0:
        report.notes.insert(0, f"all layers: output error {_ratio(learned_sum, near_sum)} of nearest rounding's")
    return report


def affordable(layers: list[Layer], seconds: float, samples: int) -> tuple[list[Layer], list[Layer]]:
    """(layers to round, layers left at nearest): the cheapest layers whose estimated cost
    (their input Gram plus MIN_ITERATIONS steps, at this machine's measured BLAS speed)
    fits half of ``seconds``; the other half is for the steps themselves."""
    flops_per_s = _blas_speed()
    chosen, over, spent = [], [], 0.0
    for layer in sorted(layers, key=_flops_per_step):
        g, o, k = layer.rows().shape
        rows = samples * ROWS_PER_SAMPLE if layer.node.op_type == "Conv" else samples * 64
        cost = (2.0 * rows * k * k * g + MIN_ITERATIONS * _flops_per_step(layer)) / flops_per_s
        if k <= MAX_K and spent + cost <= seconds / 2:
            chosen.append(layer)
            spent += cost
        else:
            over.append(layer)
    order = {id(layer): i for i, layer in enumerate(layers)}
    return sorted(chosen, key=lambda la: order[id(la)]), [la for la in over if la.rows().shape[2] <= MAX_K]


def _flops_per_step(layer: Layer) -> float:
    g, o, k = layer.rows().shape
    return 2.0 * g * o * k * k


def _blas_speed() -> float:
    """Floating-point operations per second of a float64 matrix product here, now (the
    median of 3; a quarter of it, since a shared machine's load comes and goes)."""
    a = np.ones((384, 384))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return 2 * 384**3 / max(float(np.median(times)), 1e-6) / 4


def _errs(d: np.ndarray, gram: np.ndarray) -> np.ndarray:
    from qtool.passes.recovery.adaround import row_errors

    return row_errors(d, gram)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b > 0 else "0 (exact)"


def _cost(layer: Layer, grams: dict[str, np.ndarray]) -> float:
    g, k, _ = grams[layer.name].shape
    return float(layer.rows().shape[1] * g * k * k) + 1e5  # + a fixed cost per layer


def bias_correct(model: ir.Model, recipe: Recipe, dataset, *, limit: int = 0,  # noqa: ANN001
                 float_weights: dict[str, np.ndarray] | None = None) -> PassReport:
    """Fold into each target layer's bias the mean output shift (per channel, over
    ``dataset``) that quantizing its weight causes: ``b -= mean(layer(x; Q(W) - W))``.
    ``W`` is the float weight (before learned rounding when that ran: ``float_weights``).
    A layer with no bias gets one (Conv, Gemm); a MatMul needs a bias Add after it."""
    report = PassReport("bias-correction")
    layers, skipped = target_layers(model, recipe)
    report.skipped.update(skipped)
    float_weights = float_weights or {}
    deltas, biases = [], {}
    for layer in layers:
        bias, why = bias_of(layer)
        if why is not None:
            report.skip(layer.name, why)
            continue
        reference = float_weights.get(layer.name, layer.weight)
        delta = layer.quantized(recipe) - reference
        if not np.any(delta):
            continue
        deltas.append((layer, delta))
        biases[layer.name] = bias
    if not deltas:
        return report
    shifts = mean_output_shift(model, deltas, dataset, limit=limit)
    b = GraphBuilder(model)
    worst, where = 0.0, ""
    for layer, _ in deltas:
        shift = shifts[layer.name]
        if not np.any(np.abs(shift) > MIN_SHIFT):
            continue
        bias = biases[layer.name]
        base = np.zeros(shift.shape, np.float64) if bias is None else bias.astype(np.float64)
        set_bias(b, layer, (base - shift).astype(np.float32))
        report.count("biases corrected")
        if float(np.abs(shift).max()) > worst:
            worst, where = float(np.abs(shift).max()), layer.name
    if report.modified:
        report.notes.append(f"largest mean shift removed: {worst:.3g} (in {where})")
    return report
