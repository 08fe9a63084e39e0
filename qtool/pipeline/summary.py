"""What became of each node: quantized, or float and why (the table ``qtool convert`` prints)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from qtool.model import iter_nodes
from qtool.passes import PassReport


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

    def count(self, op: str) -> int:
        """Nodes of ``op`` in the graph the passes were given, quantized or not."""
        return self.quantized.get(op, 0) + self.float_.get(op, 0)


_NOT_COMPUTE = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Constant", "Cast",
    "Identity", "Shape",
}

NodeInfo = tuple[str, str, str]  # (name, op_type, domain)

# The reasons of a node no pass looked at: its op is outside the scheme (an Unsqueeze under
# weight-only), or, for the weight-storage schemes, an op whose activations stay float.
UNSUPPORTED = "not supported by this scheme"
ACTIVATIONS_FLOAT = "activations stay float in this scheme"
GENERIC_REASONS = frozenset({UNSUPPORTED, ACTIVATIONS_FLOAT})


def snapshot(model: ir.Model) -> list[NodeInfo]:
    """The (name, op type, domain) of every node: what ``summarize`` compares against."""
    return [(n.name or "", n.op_type, n.domain) for n in iter_nodes(model)]


def summarize(before: list[NodeInfo], after: ir.Model, reports: list[PassReport],
              unsupported: str = UNSUPPORTED) -> ConvertSummary:
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
        reason = skipped.get(name, unsupported)
        summary.reasons.setdefault(op, Counter())[reason] += 1
    return summary


def _reads_quantized(node: ir.Node) -> bool:
    """A registry op reading a dequantized input (weights-only counts too)."""
    from qtool import ops
    from qtool.quantized import match_cast_dequant

    if ops.rule_for(node) is None:
        return False
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type in ("DequantizeLinear", "DynamicQuantizeLinear"):
            return True
        if producer is not None and match_cast_dequant(producer) is not None:
            return True  # integer weight storage: Mul(Cast(int8), scale)
    return False
