"""The passes the schemes are made of, each a :class:`qtool.passes.QtoolPass`.

Each class binds one rewrite module to the conversion context: what it reads from the
context, when it applies, and what it leaves there for the passes after it. The rewrites
themselves live in ``qtool.passes.*``; adding a pass is one module there, one class here,
and one line in ``qtool.pipeline.schemes.SCHEMES``.
"""

from __future__ import annotations

import onnx_ir as ir

from qtool.model import iter_nodes
from qtool.passes import PassReport, QtoolPass
from qtool.passes.select import glob_escape
from qtool.pipeline.opset import conv_blocks_opset, upgrade_opset
from qtool.pipeline.tables import check_table, remap_folded_ranges, table_ranges


class PerChannelOpset(QtoolPass):
    """Per-channel int8 weights need opset 13; raise it when the user allowed upgrades."""

    name, stage, in_place_pass = "opset", "prepare", False

    def applies(self, model: ir.Model) -> bool:
        q = self.context.recipe.quantize
        return (self.context.plan.kind == "int8-static" and q.per_channel and q.allow_opset_upgrade
                and model.opset_imports.get("", 0) < 13)

    def run(self, model):
        reports: list[PassReport] = []
        return upgrade_opset(model, 13, reports), reports[0]


class WideActivationOpset(QtoolPass):
    """16-bit activation Q/DQ are standard from opset 21; raise it when the user allowed
    upgrades (otherwise they use onnxruntime's com.microsoft Q/DQ, qtool.passes.wide)."""

    name, stage, in_place_pass = "opset", "prepare", False

    def applies(self, model: ir.Model) -> bool:
        from qtool.passes.wide import WIDE_QDQ_OPSET

        ctx = self.context
        return (ctx.plan.kind == "int8-static" and ctx.recipe.wide_activations()
                and ctx.recipe.quantize.allow_opset_upgrade
                and model.opset_imports.get("", 0) < WIDE_QDQ_OPSET)

    def run(self, model):
        from qtool.passes.wide import WIDE_QDQ_OPSET

        reports: list[PassReport] = []
        return upgrade_opset(model, WIDE_QDQ_OPSET, reports), reports[0]


class ConvBlocksOpset(QtoolPass):
    """Blocked low-bit Conv weights need opset 21 (25 for 2-bit), when upgrades are allowed."""

    name, stage, in_place_pass = "opset", "prepare", False

    def _need(self, model: ir.Model) -> int:
        ctx = self.context
        if ctx.plan.kind == "weight-only":
            return conv_blocks_opset(model, ctx.recipe, ctx.recipe.quantize.bits)
        return conv_blocks_opset(model, ctx.low_bit, 4) if ctx.low_bit is not None else 0

    def applies(self, model: ir.Model) -> bool:
        return self._need(model) > model.opset_imports.get("", 0)

    def run(self, model):
        reports: list[PassReport] = []
        return upgrade_opset(model, self._need(model), reports), reports[0]


class Preprocess(QtoolPass):
    """Shape inference, constant folding, BatchNorm/scale/Pad folds (qtool.passes.preprocess)."""

    name, stage = "preprocess", "prepare"

    def applies(self, model: ir.Model) -> bool:
        return not self.context.preprocessed

    def run(self, model):
        from qtool.passes.preprocess import preprocess

        report = preprocess(model)
        self.context.carries = report.carries
        return model, report


class LowBitLayers(QtoolPass):
    """The layers a mixed int8 recipe puts at 2/3/4 bits, as weight-only blocks.

    The calibration table is matched first (it was made on the whole graph), and Convs this
    pass rewrote are excluded from the int8 pass that follows: they keep float activations.
    """

    name = "weight-only"

    def applies(self, model: ir.Model) -> bool:
        return self.context.low_bit is not None

    def run(self, model):
        from qtool.passes.weight_only import apply_weight_only
        from qtool.passes.weight_only.items import NO_CONSTANT_WEIGHT

        ctx = self.context
        if ctx.plan.kind == "int8-static" and ctx.table is not None:
            ctx.table_origin = check_table(ctx.table, ctx.raw, model)
        convs = {n.name for n in iter_nodes(model) if n.op_type == "Conv"}
        part = apply_weight_only(model, ctx.low_bit, 4, on_progress=ctx.stage("weights"))
        # Layers it left alone are the int8 pass's to judge, not "kept float".
        part.notes += [f"{name}: not weight-only ({why}); the int8 pass takes it"
                       for name, why in part.skipped.items()
                       if not why.startswith("[[layer]]") and why != NO_CONSTANT_WEIGHT]
        part.skipped = {}
        rewritten = tuple(sorted(glob_escape(n.name) for n in iter_nodes(model)
                                 if n.op_type == "Conv" and n.name not in convs))
        if rewritten:
            q = ctx.recipe.quantize
            ctx.recipe = ctx.recipe.override("quantize", exclude=q.exclude + rewritten)
        return model, part


class TableRanges(QtoolPass):
    """The calibration table's ranges, moved through folded layers when it was made on the
    input graph (reported as "table" only when something moved)."""

    name = "table"

    def applies(self, model: ir.Model) -> bool:
        return self.context.plan.kind == "int8-static"

    def run(self, model):
        ctx = self.context
        ranges = table_ranges(ctx.table)
        report = None
        if (ctx.table_origin or check_table(ctx.table, ctx.raw, model)) == "raw" and ctx.carries:
            report = PassReport("table")
            ranges = remap_folded_ranges(model, ctx.carries, ranges, report)
        ctx.ranges = ranges
        return model, report


class StaticInt8(QtoolPass):
    """Static QDQ int8 from the calibrated ranges (qtool.passes.qdq). A Concat whose inputs'
    ranges differ by orders of magnitude stays float (qtool.passes.concat_ranges)."""

    name = "qdq"

    def run(self, model):
        from qtool.passes.concat_ranges import escaped, mismatched_concats
        from qtool.passes.qdq import quantize_static

        ctx = self.context
        wide = mismatched_concats(model, ctx.ranges)
        recipe = ctx.recipe.override("quantize", exclude=ctx.recipe.quantize.exclude + tuple(map(escaped, wide.skipped)))
        report = quantize_static(model, recipe, ctx.ranges, on_progress=ctx.stage("quantize"))
        report.skipped.update(wide.skipped)  # the reason, not "excluded"
        for key, n in wide.counts.items():
            report.count(key, n)
        return model, report


class ConstantWeights(QtoolPass):
    """Weights written as Constant nodes (inside If branches too) become initializers, which
    the weight-only pass looks for (qtool.passes.control_flow)."""

    name, stage = "constant-weights", "prepare"

    def applies(self, model: ir.Model) -> bool:
        return self.context.plan.kind in ("weight-only", "int8-weights", "fp16-weights")

    def run(self, model):
        from qtool.passes.control_flow import lift_constant_weights

        report = PassReport(self.name)
        report.count("constant weights lifted", lift_constant_weights(model))
        return model, report if report.modified else None


class Recurrent(QtoolPass):
    """LSTM -> DynamicQuantizeLSTM; other recurrent forms stay float with the reason
    (qtool.passes.recurrent)."""

    name = "recurrent"

    def run(self, model):
        from qtool.passes.recurrent import quantize_recurrent

        report = quantize_recurrent(model, self.context.recipe)
        return model, report if report.counts or report.skipped else None


class SubgraphWeights(QtoolPass):
    """New weights read inside one If/Loop branch move into it (qtool.passes.control_flow), for
    schemes without Cleanup (which does it too)."""

    name, stage = "subgraph-weights", "finish"

    def run(self, model):
        from qtool.passes.control_flow import localize_initializers

        localize_initializers(model)
        return model, None


class QOperatorFormat(QtoolPass):
    """QDQ groups fused into QLinear* operators when the recipe asks for --format qoperator."""

    name = "qoperator"

    def applies(self, model: ir.Model) -> bool:
        return self.context.plan.format == "qoperator"

    def run(self, model):
        from qtool.passes.qoperator import to_qoperator

        return model, to_qoperator(model)


class DynamicInt8(QtoolPass):
    """Dynamic int8 MatMul/Gemm (and smoothing with statistics) (qtool.passes.dynamic)."""

    name = "dynamic"

    def run(self, model):
        from qtool.passes.dynamic import quantize_dynamic

        ctx = self.context
        return model, quantize_dynamic(model, ctx.recipe, on_progress=ctx.stage("quantize"),
                                       absmax=ctx.absmax)


class Cleanup(QtoolPass):
    """Requantize pairs and dangling nodes removed, scalar Muls absorbed (qtool.passes.cleanup);
    new weights read inside one If/Loop branch moved into it (qtool.passes.control_flow)."""

    name, stage = "cleanup", "finish"

    def run(self, model):
        from qtool.passes.cleanup import cleanup
        from qtool.passes.control_flow import localize_initializers

        report = cleanup(model)
        localize_initializers(model)
        return model, report


class WeightOnly(QtoolPass):
    """2/3/4-bit (and 8-bit kept) weight blocks (qtool.passes.weight_only)."""

    name = "weight-only"

    def run(self, model):
        from qtool.passes.weight_only import apply_weight_only

        ctx = self.context
        return model, apply_weight_only(model, ctx.recipe, ctx.recipe.quantize.bits,
                                        activations=ctx.activations, on_progress=ctx.stage("weights"),
                                        executor=ctx.executor)


class Int8Weights(QtoolPass):
    """Weights stored int8 behind DequantizeLinear, activations float (qtool.passes.int8_weights)."""

    name = "int8-weights"

    def run(self, model):
        from qtool.passes.int8_weights import store_int8_weights

        return model, store_int8_weights(model, self.context.recipe)


class Fp16Weights(QtoolPass):
    """Weights stored float16 behind a Cast, compute float (qtool.passes.int8_weights)."""

    name = "fp16-weights"

    def run(self, model):
        from qtool.passes.int8_weights import store_fp16_weights

        return model, store_fp16_weights(model, self.context.recipe)


class HalfPrecision(QtoolPass):
    """fp16 weights and compute where the runtime has fp16 kernels (qtool.passes.fp16)."""

    name = "fp16"

    def run(self, model):
        from qtool.passes.fp16 import convert_fp16

        return model, convert_fp16(model, self.context.recipe.fp16)


class StoreWeights(QtoolPass):
    """Fake-quant weights (float -> Q -> DQ) stored as the integers they stand for
    (qtool.passes.fake_quant): the model's outputs unchanged, its weights 4-8x smaller.
    Runs for --store-weights, and before re-targeting to QOperator (which reads integers)."""

    name, stage = "store-weights", "quantize"

    def run(self, model):
        from qtool.passes.fake_quant import fold_fake_quant

        return model, fold_fake_quant(model)


class QDQFormat(QtoolPass):
    """Integer operators (QLinearConv, QGemm...) rewritten as DQ -> float op -> Q with the same
    scales, for --format qdq on a QOperator model (qtool.passes.qoperator_to_qdq)."""

    name = "qdq-format"

    def applies(self, model: ir.Model) -> bool:
        return self.context.plan.format == "qdq"

    def run(self, model):
        from qtool.passes.qoperator_to_qdq import to_qdq

        report = to_qdq(model)
        return model, report if report.counts or report.skipped else None


class QOperatorReady(QtoolPass):
    """What a QAT export needs before QOperator fusion (qtool.passes.fake_quant): a Relu that
    its QuantizeLinear already clamps removed, DequantizeLinear moved past Flatten/Reshape,
    float biases quantized to int32 (the one step that rounds)."""

    name = "qoperator-ready"

    def applies(self, model: ir.Model) -> bool:
        return self.context.plan.format == "qoperator"

    def run(self, model):
        from qtool.passes.fake_quant import (
            drop_relu_before_quantize,
            quantize_bias,
            sink_dequantize,
        )

        report = PassReport(self.name)
        for part in (drop_relu_before_quantize(model), sink_dequantize(model), quantize_bias(model)):
            for key, n in part.counts.items():
                report.count(key, n)
            report.skipped.update(part.skipped)
        return model, report


class TargetRules(QtoolPass):
    """A --target whose runtime cannot run here (qnn, tensorrt): the converted model must keep
    the rules that runtime documents (qtool.targets.validate); a violation fails the
    conversion, naming the rule, instead of writing a model the runtime rejects."""

    name, stage = "target-rules", "finish"

    def applies(self, model: ir.Model) -> bool:
        from qtool.targets import resolve

        target = self.context.recipe.quantize.target
        return bool(target) and resolve(target).validator is not None

    def run(self, model):
        from qtool.targets import resolve
        from qtool.targets.validate import require

        name = resolve(self.context.recipe.quantize.target).validator
        require(model, name)
        return model, None
