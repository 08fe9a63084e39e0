"""The schemes, each a declared list of passes, and the one loop that runs them.

A pass in a list runs when it ``applies`` to the context and the model in hand; the lists
read in pipeline order: prepare (opset, pre-processing), quantize, finish (cleanup).
To add a pass: write its rewrite in ``qtool/passes/``, bind it in ``steps.py``, and put
it in the lists below where it belongs.
"""

from __future__ import annotations

from typing import NamedTuple

import onnx_ir as ir

from qtool.passes import PassReport, recovery
from qtool.pipeline import steps
from qtool.pipeline.context import Context
from qtool.pipeline.summary import (
    ACTIVATIONS_FLOAT,
    UNSUPPORTED,
    ConvertSummary,
    snapshot,
    summarize,
)

SCHEMES: dict[str, tuple[type, ...]] = {
    "fp16": (steps.HalfPrecision,),
    "weight-only": (steps.ConvBlocksOpset, steps.ConstantWeights, steps.WeightOnly, steps.SubgraphWeights),
    "int8-weights": (steps.ConstantWeights, steps.Preprocess, steps.Int8Weights, steps.Cleanup),
    "fp16-weights": (steps.ConstantWeights, steps.Preprocess, steps.Fp16Weights, steps.Cleanup),
    "int8-dynamic": (
        steps.ConvBlocksOpset, steps.Preprocess, steps.LowBitLayers, steps.DynamicInt8,
        steps.Recurrent, steps.Cleanup,
    ),
    # 16-bit activations (A16W8) are this scheme with activation_bits = 16 (the int8-a16w8
    # preset, --activation-bits 16, or per [[layer]]): same calibration, wider Q/DQ.
    "int8-static": (
        steps.WideActivationOpset, steps.PerChannelOpset, steps.ConvBlocksOpset, steps.Preprocess,
        steps.LowBitLayers, steps.TableRanges, recovery.AdaRound, recovery.BiasCorrection,
        steps.StaticInt8, steps.QOperatorFormat, steps.Recurrent, steps.Cleanup, steps.TargetRules,
    ),
    # An already-quantized model (convert --store-weights / --format): no calibration, no new
    # quantization; plan.plan_quantized_input chooses it.
    "quantized-input": (steps.StoreWeights, steps.QDQFormat, steps.QOperatorReady, steps.QOperatorFormat),
}
# Run by qtool.pipeline.flow.prepare on the pre-processed graph before it calibrates: they
# move activation ranges (when the recipe's [recovery] asks for them).
BEFORE_CALIBRATION: tuple[type, ...] = (recovery.CrossLayerEqualization, recovery.StaticSmoothQuant)


def run_passes(model: ir.Model, context: Context, classes: tuple[type, ...]) -> list[PassReport]:
    """Run those of ``classes`` that apply, in place, in order; their reports."""
    reports = []
    for cls in classes:
        step = cls(context)
        if step.applies(model):
            result = step(model)
            if result.report is not None:
                reports.append(result.report)
    return reports


class Converted(NamedTuple):
    """A converted model, the report of every pass that ran, and the per-op summary."""

    model: ir.Model
    reports: list[PassReport]
    summary: ConvertSummary


def run_scheme(model: ir.Model, context: Context, *, copy: bool = True) -> Converted:
    """Run the context's scheme on a copy of ``model`` (the input is not modified), or on
    ``model`` itself when ``copy`` is False (the caller gives it away)."""
    if copy:
        model = model.clone()
    reports: list[PassReport] = []
    before = None
    for cls in SCHEMES[context.plan.kind]:
        step = cls(context)
        if not step.applies(model):
            continue
        if before is None and step.stage != "prepare":
            before = snapshot(model)
        result = step(model)
        model = result.model
        if result.report is not None:
            reports.append(result.report)
    if before is None:
        before = snapshot(model)
    unsupported = ACTIVATIONS_FLOAT if context.plan.kind in ("int8-weights", "fp16-weights") else UNSUPPORTED
    return Converted(model, reports, summarize(before, model, reports, unsupported))
