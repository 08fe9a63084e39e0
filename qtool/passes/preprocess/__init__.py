"""Pre-processing before quantization: shape inference, BatchNorm folding, constant folding.

``preprocess(model)`` works **in place** on an onnx-ir model and returns a PassReport whose
``counts`` say how often each rule fired (``shapes_inferred``, ``identity_removed``,
``dropout_removed``, ``constant_folded``, ``batchnorm_folded``, ``unused_removed``) and whose
``skipped`` maps ``"<rule>:<node>"`` to the reason a rule matched but refused to rewrite.
Post-condition: the graph is still a valid ONNX graph computing the same function (up to
float rounding of folded weights); every subgraph of If/Loop/Scan is walked too.

The package, one module per seam: ``driver`` (the rule contract and the one driver),
``shapes`` (tolerant shape inference), ``constants`` (the constant evaluator),
``identity`` (Identity/Dropout removal), ``batchnorm`` and ``affine`` (folds into a Conv,
Gemm or MatMul). The rules below are data: adding one is a function plus a line here.

The opset is never changed here.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from qtool.passes import PassReport
from qtool.passes.graph import Names, remove_unused
from qtool.passes.preprocess.affine import (
    div_by_constant_to_mul,
    fold_affine_into_conv,
    fold_affine_into_next_conv,
    fold_batchnorm_node,
    fuse_pad_into_conv,
    merge_constant_muls,
)
from qtool.passes.preprocess.constants import FOLDED_OPS, fold_constant_node
from qtool.passes.preprocess.driver import Rule, RuleContext, apply_rules
from qtool.passes.preprocess.identity import remove_dropout, remove_identity_node
from qtool.passes.preprocess.shapes import infer_shapes_tolerant

__all__ = ["CARRIES_KEY", "infer_shapes_tolerant", "preprocess", "record_carries"]

IDENTITY_RULES = [
    Rule("identity_removed", frozenset({"Identity"}), remove_identity_node),
    Rule("dropout_removed", frozenset({"Dropout"}), remove_dropout),
]
CONSTANT_RULES = [Rule("constant_folded", frozenset(FOLDED_OPS), fold_constant_node)]
PAD_RULES = [Rule("pad_fused_into_conv", frozenset({"Pad"}), fuse_pad_into_conv)]
FOLD_RULES = [
    Rule("batchnorm_folded", frozenset({"BatchNormalization"}), fold_batchnorm_node),
    Rule("affine_folded_into_conv", frozenset({"Mul", "Add"}), fold_affine_into_conv),
    Rule("div_by_constant_to_mul", frozenset({"Div"}), div_by_constant_to_mul),
    Rule("constant_muls_merged", frozenset({"Mul"}), merge_constant_muls),
    Rule("affine_folded_into_next_conv", frozenset({"Mul", "Add"}), fold_affine_into_next_conv),
]


def preprocess(
    model: ir.Model,
    *,
    fold_batchnorm: bool = True,
    fold_constants: bool = True,
    infer_shapes: bool = True,
    remove_identity: bool = True,
    fuse_pad: bool = True,
) -> PassReport:
    """Simplify ``model`` in place before quantization; return counts per rule.

    Order: Identity/Dropout removal and constant folding (repeated until nothing changes, so
    chains such as Shape -> Gather -> Concat -> Reshape fold completely), then BatchNorm
    folding, then removal of initializers and Constant nodes nobody uses, then shape
    inference (so later passes see the shapes of the simplified graph).
    """
    report = PassReport("preprocess")
    ctx = RuleContext(Names(model))
    rules = (
        (IDENTITY_RULES if remove_identity else [])
        + (CONSTANT_RULES if fold_constants else [])
        + (PAD_RULES if fuse_pad else [])
    )
    if infer_shapes and (fold_constants or fold_batchnorm):
        # Shape folding and MatMul+BatchNorm folding want shapes first.
        infer_shapes_tolerant(model, report)
    if rules:
        apply_rules(model, rules, report, ctx)
    if fold_constants and _inline_constant_ifs(model, report, ctx.names) and rules:
        apply_rules(model, rules, report, ctx)  # the inlined branches fold too
    if fold_batchnorm:
        apply_rules(model, FOLD_RULES, report, ctx)
    removed = remove_unused(model)
    if removed:
        report.count("unused_removed", removed)
    if infer_shapes:
        infer_shapes_tolerant(model, report)
    report.carries.update(ctx.carries)
    record_carries(model, ctx.carries)
    return report


def _inline_constant_ifs(model: ir.Model, report: PassReport, names: Names) -> int:
    """Ifs whose condition is known replaced by their branch (qtool.passes.control_flow)."""
    from qtool.passes.control_flow import inline_constant_ifs

    result = inline_constant_ifs(model, names.taken)
    inlined = result.counts.get("if_inlined", 0)
    if inlined:
        report.count("if_inlined", inlined)
    report.skipped.update(result.skipped)  # by node name: the conversion summary's reason for an If
    return inlined


CARRIES_KEY = "qtool.carries"


def record_carries(model: ir.Model, carries: dict[str, str]) -> None:
    """Keep ``carries`` (PassReport.carries) in the model's metadata, merged with what an
    earlier run recorded, so ``qtool eval --diagnose`` compares a folded layer's output with
    the reference tensor it now stands for."""
    if not carries:
        return
    known = json.loads(model.metadata_props.get(CARRIES_KEY, "{}"))
    for carrier, original in carries.items():
        known[carrier] = known.get(original, original)
    model.metadata_props[CARRIES_KEY] = json.dumps(known, sort_keys=True)
