"""Identity and Dropout removal: both are the identity at inference."""

from __future__ import annotations

import onnx_ir as ir

from qtool.passes.graph import constant_of, replace_uses
from qtool.passes.preprocess.driver import APPLIED, Outcome, RuleContext


def remove_identity_node(node: ir.Node, ctx: RuleContext) -> Outcome:
    """Identity(x) -> x: consumers read x directly."""
    (out,) = node.outputs
    if out.is_graph_output():
        return "its output is a graph output"
    if out.type is not None and not isinstance(out.type, ir.TensorType):
        return "not a tensor (sequence/optional Identity)"
    replace_uses(out, node.inputs[0])
    node.graph.remove(node, safe=True)
    return APPLIED


def remove_dropout(node: ir.Node, ctx: RuleContext) -> Outcome:
    """Dropout at inference is the identity on its first output."""
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return "its mask output is used"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        training = constant_of(node.inputs[2])
        if training is None:
            return "training_mode is not a constant"
        if bool(training):
            return "training_mode is true"
    if any(out.is_graph_output() for out in node.outputs):
        return "its output is a graph output"
    replace_uses(node.outputs[0], node.inputs[0])
    node.graph.remove(node, safe=True)
    return APPLIED

