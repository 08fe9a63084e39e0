"""The conversion entry point: one function that dispatches a recipe to its passes.

``convert(model, recipe, table=...)`` returns a new model and the PassReports of every
pass that ran; the input model is not modified (it is cloned first). Dispatch:

- ``quantize.dtype == "fp16"``                      -> qtool.passes.fp16
- ``bits in (2, 3, 4)`` or ``format == "matmulnbits"`` -> qtool.passes.weight_only
- ``bits == 8`` and ``dynamic``                     -> preprocess, qtool.passes.dynamic
- ``bits == 8``                                     -> preprocess, qtool.passes.qdq (needs a
  calibration table), then qtool.passes.qoperator when ``format == "qoperator"``

every int8 path ends with qtool.passes.cleanup.

Mixed precision (``[[layer]]`` overrides, as ``qtool tune`` writes them): an int8 recipe
whose overrides put some layers at 2/3/4 bits first runs qtool.passes.weight_only on those
layers alone (``weight_only_part``), then the int8 pass on the rest; layers at 32 (or 16)
bits stay float. A weight-only recipe handles 8-bit layers itself (8-bit blocks). A Conv at
2/3/4 bits becomes ``DequantizeLinear(blocked weight) -> Conv`` with float activations: the
int8 pass leaves the rewritten Conv alone. Blocked DequantizeLinear needs opset 21 (25 for
2-bit); with ``allow_opset_upgrade`` onnx's version converter raises it first.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from qtool.config import LayerOverride, Recipe
from qtool.errors import CalibrationError, ConversionError, UsageError
from qtool.model import graph_fingerprint, iter_nodes
from qtool.passes import PassReport

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class RangeTable(Protocol):
    """What convert needs from a calibration table (qtool.calibration.CalibrationTable)."""

    def ranges(self) -> dict[str, tuple[float, float]]: ...


@dataclass(frozen=True)
class ConvertPlan:
    """Which pipeline a recipe selects, decided before any model is loaded."""

    kind: str  # "fp16" | "weight-only" | "int8-dynamic" | "int8-static"
    needs_table: bool
    format: str


def plan_for(recipe: Recipe) -> ConvertPlan:
    """The pipeline for ``recipe``; raises UsageError for combinations that make no sense."""
    q = recipe.quantize
    if q.dtype == "fp16":
        return ConvertPlan("fp16", False, "fp16")
    if q.dtype != "int":
        raise UsageError(f"unknown dtype {q.dtype!r}", "use --dtype int or --dtype fp16")
    if q.bits in (2, 3, 4) or q.format == "matmulnbits":
        if q.dynamic:
            raise UsageError("--dynamic is an int8 mode", "drop --dynamic for weight-only 4/3/2-bit")
        if q.format == "qoperator":
            raise UsageError(
                "--format qoperator is an int8 format",
                "use --format matmulnbits or qdq for 4/3/2-bit weights",
            )
        fmt = "matmulnbits" if q.format == "matmulnbits" else recipe.weight_only.format
        return ConvertPlan("weight-only", False, fmt)
    if q.bits != 8:
        raise UsageError(f"--bits {q.bits} is not supported", "use --bits 8, 4, 3 or 2, or --dtype fp16")
    if q.activation_type not in ("uint8", "int8") or q.weight_type not in ("int8", "uint8"):
        raise UsageError(
            f"activation type {q.activation_type!r} / weight type {q.weight_type!r} not supported",
            "use uint8 or int8",
        )
    if q.dynamic:
        if q.format == "qoperator":
            raise UsageError(
                "--dynamic already emits integer ops; --format qoperator is for static int8",
                "drop --format, or drop --dynamic and pass --calib/--data",
            )
        return ConvertPlan("int8-dynamic", False, "dynamic")
    return ConvertPlan("int8-static", True, q.format)


@dataclass
class ConvertSummary:
    """Per op type: nodes quantized, nodes left in float, and why (reason -> count)."""

    quantized: Counter = field(default_factory=Counter)
    float_: Counter = field(default_factory=Counter)
    reasons: dict[str, Counter] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        ops = sorted(set(self.quantized) | set(self.float_))
        return {
            op: {
                "quantized": self.quantized.get(op, 0),
                "float": self.float_.get(op, 0),
                "reasons": dict(self.reasons.get(op, {})),
            }
            for op in ops
        }


_NOT_COMPUTE = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Constant", "Cast",
    "Identity", "Shape",
}


NodeInfo = tuple[str, str, str]  # (name, op_type, domain)


def snapshot(model: ir.Model) -> list[NodeInfo]:
    """The (name, op type, domain) of every node: what ``summarize`` compares against."""
    return [(n.name or "", n.op_type, n.domain) for n in iter_nodes(model)]


def summarize(before: list[NodeInfo], after: ir.Model, reports: list[PassReport]) -> ConvertSummary:
    """Count, per op type of the model given to the passes, what became of each node.

    A node is "quantized" when it is gone from the output (replaced by an integer op, or
    folded into one) or now reads a dequantized/quantized input; otherwise it is float, with
    the reason the passes gave (or "not supported" when no pass looked at it).
    """
    summary = ConvertSummary()
    after_nodes = {n.name: n for n in iter_nodes(after) if n.name}
    skipped: dict[str, str] = {}
    for report in reports:
        skipped.update(report.skipped)
    for name, op, domain in before:
        if op in _NOT_COMPUTE or domain not in ("", "ai.onnx"):
            continue
        now = after_nodes.get(name)
        if now is None and name:
            summary.quantized[op] += 1
            continue
        if now is not None and name not in skipped and _reads_quantized(now):
            summary.quantized[op] += 1
            continue
        summary.float_[op] += 1
        reason = skipped.get(name, "not supported by this scheme")
        summary.reasons.setdefault(op, Counter())[reason] += 1
    return summary


def _reads_quantized(node: ir.Node) -> bool:
    """A registry op reading a dequantized input (weights-only counts too)."""
    from qtool import ops

    if ops.rule_for(node) is None:
        return False
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type in ("DequantizeLinear", "DynamicQuantizeLinear"):
            return True
    return False


def weight_only_part(recipe: Recipe) -> Recipe | None:
    """The recipe that quantizes only the layers a mixed int8 recipe puts at 2/3/4 bits.

    Overrides keep their order (first match wins); those at 8 bits or more become 32 and a
    final ``*`` = 32 keeps every other node float. None when no override is below 8 bits.
    """
    if not any(rule.bits < 8 for rule in recipe.layer):
        return None
    rules = tuple(r if r.bits < 8 else LayerOverride(r.match, 32) for r in recipe.layer)
    return dataclasses.replace(recipe, layer=rules + (LayerOverride("*", 32),))


def _table_ranges(table: RangeTable | Mapping | None) -> dict[str, tuple[float, float]]:
    if table is None:
        raise UsageError(
            "static int8 needs activation ranges and none were given",
            "pass --calib TABLE.json (from qtool calibrate) or --data DIR to calibrate inline, "
            "or --dynamic for weights-only calibration-free int8",
        )
    if isinstance(table, Mapping):
        return {str(k): (float(v[0]), float(v[1])) for k, v in table.items()}
    return {str(k): (float(v[0]), float(v[1])) for k, v in table.ranges().items()}


def check_table(table: Any, raw: ir.Model, prepared: ir.Model) -> str:
    """Which graph the table was made on: "prepared" (after pre-processing, as ``qtool
    calibrate`` and ``convert --data`` calibrate) or "raw" (the input graph itself).

    Raises CalibrationError when it matches neither.
    """
    fingerprint = getattr(table, "fingerprint", None)
    if fingerprint is None or isinstance(table, Mapping):
        return "prepared"
    if fingerprint == graph_fingerprint(prepared):
        return "prepared"
    if fingerprint == graph_fingerprint(raw):
        return "raw"
    from qtool.passes.preprocess import preprocess

    again = raw.clone()
    preprocess(again)
    if fingerprint == graph_fingerprint(again):
        return "prepared"  # pre-processed before an opset upgrade changed the graph
    checker = getattr(table, "check_model", None)
    if checker is not None:
        checker(raw)  # raises CalibrationError with the calibration module's own message
    raise CalibrationError(
        "the calibration table was made for a different model",
        "re-run qtool calibrate on this model",
    )


def remap_folded_ranges(
    prepared: ir.Model, carries: Mapping[str, str], ranges: dict[str, tuple[float, float]], report: PassReport
) -> dict[str, tuple[float, float]]:
    """Ranges of a table made on the input graph, made valid for the pre-processed graph.

    Folding makes ``Conv -> c -> BN/Mul/Add -> b`` into ``Conv -> c`` where ``c`` now carries
    what ``b`` did (``carries[c] == b``, from the preprocess report): ``c`` takes ``b``'s
    range when the table has it, else its stale range is dropped and that tensor stays float
    (a following ReLU's own range still lets the Conv output be quantized through the fold).
    """
    ranges = dict(ranges)
    present = {v.name for n in iter_nodes(prepared) for v in n.outputs}
    for carrier, original in carries.items():
        if carrier == original or carrier not in present:
            continue
        if original in ranges:
            ranges[carrier] = ranges[original]
            report.count("ranges moved through folded layers")
        elif ranges.pop(carrier, None) is not None:
            report.count("stale ranges dropped (folded layers)")
    return ranges


def convert(
    model: ir.Model,
    recipe: Recipe,
    *,
    table: RangeTable | Mapping | None = None,
    on_progress: Progress | None = None,
    preprocessed: bool = False,
    activations: dict | None = None,
    absmax: dict | None = None,
) -> tuple[ir.Model, list[PassReport]]:
    """Convert ``model`` as ``recipe`` says; return (new model, reports of every pass).

    ``table``: a CalibrationTable (or a plain ``{tensor: (lo, hi)}`` mapping) for static
    int8, made on this model. ``preprocessed``: the model has already been through
    qtool.passes.preprocess (as ``convert --data`` does before calibrating).
    ``activations``: gptq/awq statistics for weight-only (collect_weight_only_stats).
    ``absmax``: per-channel maxima of MatMul inputs for dynamic int8 smoothing
    (qtool.passes.dynamic.collect_channel_absmax on the pre-processed model).
    """
    converted, reports, _ = convert_with_summary(
        model, recipe, table=table, on_progress=on_progress, preprocessed=preprocessed,
        activations=activations, absmax=absmax,
    )
    return converted, reports


def convert_with_summary(
    model: ir.Model,
    recipe: Recipe,
    *,
    table: RangeTable | Mapping | None = None,
    on_progress: Progress | None = None,
    preprocessed: bool = False,
    activations: dict | None = None,
    absmax: dict | None = None,
) -> tuple[ir.Model, list[PassReport], ConvertSummary]:
    """``convert`` plus the per-op-type summary of what was quantized and what stayed float."""
    plan = plan_for(recipe)
    raw = model
    model = model.clone()
    reports: list[PassReport] = []

    def stage(name: str) -> Callable[[int, int], None] | None:
        if on_progress is None:
            return None
        return lambda done, total: on_progress(name, done, total)

    if plan.kind == "fp16":
        from qtool.passes.fp16 import convert_fp16

        before = snapshot(model)
        reports.append(convert_fp16(model, recipe.fp16))
        return model, reports, summarize(before, model, reports)
    if plan.kind == "weight-only":
        from qtool.passes.weight_only import apply_weight_only

        model = opset_for_conv_blocks(model, recipe, recipe.quantize.bits, reports)
        before = snapshot(model)
        reports.append(apply_weight_only(model, recipe, recipe.quantize.bits,
                                         activations=activations, on_progress=stage("weights")))
        return model, reports, summarize(before, model, reports)

    q = recipe.quantize
    if plan.kind == "int8-static" and q.per_channel and q.allow_opset_upgrade:
        model = upgrade_opset(model, 13, reports)
    low_bit = weight_only_part(recipe)
    if low_bit is not None:
        model = opset_for_conv_blocks(model, low_bit, 4, reports)
    carries: dict[str, str] = {}
    if not preprocessed:
        from qtool.passes.preprocess import preprocess

        pre = preprocess(model)
        reports.append(pre)
        carries = pre.carries
    before = snapshot(model)
    origin = None
    if low_bit is not None:
        # The table was made on the whole graph: match it before weight-only rewrites it.
        if plan.kind == "int8-static" and table is not None:
            origin = check_table(table, raw, model)
        from qtool.passes.weight_only import apply_weight_only

        part = apply_weight_only(model, low_bit, 4, on_progress=stage("weights"))
        # Layers it left alone are the int8 pass's to judge, not "kept float".
        part.notes += [f"{name}: not weight-only ({why}); the int8 pass takes it"
                       for name, why in part.skipped.items() if not why.startswith("[[layer]]")]
        part.skipped = {}
        reports.append(part)
        # Convs now reading a dequantized low-bit weight keep float activations.
        convs = {name for name, op, _ in before if op == "Conv"}
        rewritten = tuple(sorted(re.sub(r"([\[\]*?])", r"[\1]", n.name) for n in iter_nodes(model)
                                 if n.op_type == "Conv" and n.name not in convs))
        if rewritten:
            recipe = recipe.override("quantize", exclude=q.exclude + rewritten)
    if plan.kind == "int8-dynamic":
        from qtool.passes.dynamic import quantize_dynamic

        reports.append(quantize_dynamic(model, recipe, on_progress=stage("quantize"), absmax=absmax))
    else:
        ranges = _table_ranges(table)
        if (origin or check_table(table, raw, model)) == "raw" and carries:
            remap = PassReport("table")
            ranges = remap_folded_ranges(model, carries, ranges, remap)
            reports.append(remap)
        from qtool.passes.qdq import quantize_static

        reports.append(quantize_static(model, recipe, ranges, on_progress=stage("quantize")))
        if plan.format == "qoperator":
            from qtool.passes.qoperator import to_qoperator

            reports.append(to_qoperator(model))
    from qtool.passes.cleanup import cleanup

    reports.append(cleanup(model))
    return model, reports, summarize(before, model, reports)


def opset_for_conv_blocks(model: ir.Model, recipe: Recipe, bits: int, reports: list[PassReport]) -> ir.Model:
    """``model`` at the opset its low-bit Conv weights need, when the recipe allows upgrades.

    Without ``allow_opset_upgrade`` the weight-only pass leaves those Convs float and says why.
    """
    if not recipe.quantize.allow_opset_upgrade:
        return model
    from qtool.passes.weight_only import conv_opset_needed

    need = conv_opset_needed(model, recipe, bits)
    return upgrade_opset(model, need, reports) if need else model


def upgrade_opset(model: ir.Model, version: int, reports: list[PassReport]) -> ir.Model:
    """The model converted to default-domain opset ``version`` by onnx's version converter.

    Only called when the user allowed it (--allow-opset-upgrade). Ops whose signature
    changed (Squeeze/Unsqueeze/Split/Reduce* axes, Softmax) are rewritten by the converter,
    not just relabelled. Returns ``model`` itself when it is already new enough.
    """
    current = model.opset_imports.get("", 0)
    if current >= version:
        return model
    import onnx
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(ir.to_proto(model), version)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise ConversionError(
            f"could not convert the model from opset {current} to {version}: {str(exc).splitlines()[0][:160]}",
            "convert the model to opset 13 with your exporter, or use --per-tensor",
        ) from None
    del onnx
    report = PassReport("opset")
    report.count(f"opset {current} -> {version}")
    reports.append(report)
    return ir.from_proto(proto)


def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """Worst output's cosine similarity and SQNR (dB) of ``candidate`` vs ``reference``."""
    from qtool.quant.scales import cosine, sqnr_db

    if not reference:
        raise ConversionError("no outputs to compare", "")
    cos = [cosine(r, c) for r, c in zip(reference, candidate)]
    sq = [sqnr_db(r, c) for r, c in zip(reference, candidate)]
    return {"cosine": min(cos), "sqnr_db": min(sq)}
