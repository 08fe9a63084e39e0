"""QOperator back to QDQ: each integer operator becomes DequantizeLinear on its inputs, the
float op, and QuantizeLinear on its output, with the same scales and zero points (the
inverse of qtool.passes.qoperator)::

    QLinearConv(x, W, b_int32) -> y_q    =>  DQ(x), DQ(W), DQ(b; s_x * s_W) -> Conv -> Q(y)
    QLinearMatMul                        =>  DQ(a), DQ(b) -> MatMul -> Q(y)
    com.microsoft.QGemm                  =>  DQ(a), DQ(b), DQ(c; s_a * s_b) -> Gemm [-> Q(y)]
    com.microsoft.QLinearAdd|QLinearMul  =>  DQ(a), DQ(b) -> Add|Mul -> Q(y)
    com.microsoft.QLinear*Pool           =>  DQ(x) -> GlobalAveragePool|AveragePool -> Q(y)
    com.microsoft.QLinearConcat          =>  DQ(x_i) -> Concat -> Q(y)

Data-movement ops already reading integers (MaxPool, Flatten, Reshape...) stay as they are.
An operator without a rule (QLinearSigmoid, QAttention...) is left, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qtool.model import iter_graphs
from qtool.passes import PassReport
from qtool.passes.graph import GraphBuilder, constant_of, replace_uses

# op type -> (float op, [(q, scale, zero point) input indices], bias index, output (scale, zp))
Layout = tuple[str, list[tuple[int, int, int]], int | None, tuple[int, int] | None]
LAYOUTS: dict[str, Callable[[ir.Node], Layout]] = {
    "QLinearConv": lambda n: ("Conv", [(0, 1, 2), (3, 4, 5)], 8, (6, 7)),
    "QLinearMatMul": lambda n: ("MatMul", [(0, 1, 2), (3, 4, 5)], None, (6, 7)),
    "QGemm": lambda n: ("Gemm", [(0, 1, 2), (3, 4, 5)], 6, (7, 8)),
    "QLinearAdd": lambda n: ("Add", [(0, 1, 2), (3, 4, 5)], None, (6, 7)),
    "QLinearMul": lambda n: ("Mul", [(0, 1, 2), (3, 4, 5)], None, (6, 7)),
    "QLinearGlobalAveragePool": lambda n: ("GlobalAveragePool", [(0, 1, 2)], None, (3, 4)),
    "QLinearAveragePool": lambda n: ("AveragePool", [(0, 1, 2)], None, (3, 4)),
    "QLinearConcat": lambda n: ("Concat", [(i, i + 1, i + 2) for i in range(2, len(n.inputs), 3)], None, (0, 1)),
}
DROP_ATTRS = {"channels_last"}


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _weight_axis(node: ir.Node, which: int) -> int:
    """Per-channel axis of the second operand: Conv's output channels (0), MatMul's columns
    (1), Gemm's B by transB."""
    if node.op_type == "QLinearConv":
        return 0
    if node.op_type == "QGemm":
        return 0 if node.attributes.get("transB") is not None and node.attributes["transB"].value else 1
    return 1 if which == 1 else 0


def _why_not(node: ir.Node) -> str | None:
    if node.op_type not in LAYOUTS:
        return f"no QDQ form for {node.op_type} here; kept"
    if "channels_last" in node.attributes and node.attributes["channels_last"].value:
        return "channels_last pooling; kept"
    return None


def _bias(b: GraphBuilder, node: ir.Node, index: int | None, name: str) -> list[ir.Value | None]:
    """int32 bias -> DequantizeLinear at s_x * s_w (zero point 0); [] without a bias."""
    value = _input(node, index) if index is not None else None
    if value is None:
        return []
    scale = (constant_of(node.inputs[1]).astype(np.float32).reshape(()) *
             constant_of(node.inputs[4]).astype(np.float32).reshape(-1)).astype(np.float32)
    s = b.initializer(scale if scale.size > 1 else scale.reshape(()), name + "_bias_scale")
    dq = b.node("DequantizeLinear", [value, s], name + "_bias", attributes={"axis": 0},
                dtype=ir.DataType.FLOAT)
    return [dq]


def to_qdq(model: ir.Model) -> PassReport:
    """Rewrite integer operators into DQ -> float op -> Q in place; counts per op type."""
    report = PassReport("qdq-format")
    b = GraphBuilder(model)
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            if not (node.op_type.startswith("QLinear") or node.op_type == "QGemm"):
                continue
            name = node.name or node.op_type
            why = _why_not(node)
            if why is None and any(constant_of(_input(node, i)) is None
                                   for i in (1, 4) if node.op_type in ("QLinearConv", "QGemm")):
                why = "scales are not constants; kept"
            if why is not None:
                report.skip(name, why)
                continue
            float_op, operands, bias_index, out = LAYOUTS[node.op_type](node)
            new: list[ir.Node] = []
            inputs: list[ir.Value | None] = []
            for which, (q, s, z) in enumerate(operands):
                attrs = {"axis": _weight_axis(node, which)} if which == 1 else {}
                dq = b.node("DequantizeLinear", [_input(node, q), _input(node, s), _input(node, z)],
                            f"{name}_in{which}", attributes=attrs, dtype=ir.DataType.FLOAT)
                new.append(dq)
                inputs.append(dq.outputs[0])
            bias = _bias(b, node, bias_index, name)
            new += bias
            inputs += [d.outputs[0] for d in bias]
            attrs = {k: a.value for k, a in node.attributes.items() if k not in DROP_ATTRS}
            op = b.node(float_op, inputs, name, attributes=attrs, dtype=ir.DataType.FLOAT)
            new.append(op)
            result = op.outputs[0]
            if out is not None and _input(node, out[0]) is not None:
                q = b.node("QuantizeLinear", [result, _input(node, out[0]), _input(node, out[1])], name + "_out",
                           dtype=node.outputs[0].dtype, shape=node.outputs[0].shape)
                new.append(q)
                result = q.outputs[0]
            graph.insert_before(node, new)
            replace_uses(node.outputs[0], result, b.names)
            graph.remove(node, safe=True)
            report.count(f"{node.op_type} -> {float_op}")
    return report
