"""QOperator format: turn the QDQ decisions into explicit integer ops.

Runs after qtool.passes.qdq on the same graph. Each float op whose inputs all come from
DequantizeLinear and whose only reader is a QuantizeLinear becomes one integer op reading
the quantized tensors directly, with the same scales::

    DQ(x) -> Conv <- DQ(W), DQ(b)  -> Q(y)     =>  QLinearConv(x_q, W_q, b_q) -> y_q
    DQ(a), DQ(b) -> MatMul -> Q(y)             =>  QLinearMatMul
    DQ(a), DQ(b) -> Gemm   -> Q(y)             =>  com.microsoft.QGemm
    DQ(a), DQ(b) -> Add|Mul -> Q(y)            =>  com.microsoft.QLinearAdd|QLinearMul
    DQ(x) -> GlobalAveragePool|AveragePool -> Q =>  com.microsoft.QLinear*Pool
    DQ(x_i) -> Concat -> Q                     =>  com.microsoft.QLinearConcat
    DQ(x) -> Reshape|Transpose|MaxPool|... -> Q(same params)  =>  the op on x_q

The rules are a table (op type -> builder); a builder returns None to leave the node as
QDQ (the reason is recorded). What is left is still a valid QDQ graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.model import iter_graphs
from qtool.passes import PassReport
from qtool.passes.cleanup import cleanup
from qtool.passes.graph import GraphBuilder, replace_uses

MS = "com.microsoft"
QInputs = list[tuple[ir.Value, ir.Value, ir.Value]]  # (q, scale, zero_point) per input
Built = tuple[str, str, list[ir.Value | None], dict] | str  # (domain, op, inputs, attrs) | reason


def _dq_parts(value: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    zp = producer.inputs[2] if len(producer.inputs) > 2 else None
    if zp is None:
        return None
    return producer.inputs[0], producer.inputs[1], zp


def _scalar(value: ir.Value) -> bool:
    return value.const_value is not None and value.const_value.size == 1


def _attrs(node: ir.Node, *skip: str) -> dict:
    return {k: a.value for k, a in node.attributes.items() if k not in skip}


def _conv(node: ir.Node, ins: QInputs, y: tuple) -> Built:
    x, w = ins[0], ins[1]
    if not _scalar(x[1]):
        return "per-channel activation scale"
    bias = []
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = _dq_parts(node.inputs[2])
        if b is None or b[0].dtype != ir.DataType.INT32:
            return "bias is not int32"
        bias = [b[0]]
    return "", "QLinearConv", [*x, *w, y[0], y[1], *bias], _attrs(node)


def _matmul(node: ir.Node, ins: QInputs, y: tuple) -> Built:
    a, b = ins[0], ins[1]
    if not _scalar(a[1]):
        return "per-channel activation scale"
    return "", "QLinearMatMul", [*a, *b, y[0], y[1]], {}


def _gemm(node: ir.Node, ins: QInputs, y: tuple) -> Built:
    a, b = ins[0], ins[1]
    c: list[ir.Value | None] = [None]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        parts = _dq_parts(node.inputs[2])
        if parts is None or parts[0].dtype != ir.DataType.INT32:
            return "bias C is not int32"
        c = [parts[0]]
    attrs = _attrs(node, "beta")
    return MS, "QGemm", [*a, *b, *c, y[0], y[1]], attrs


def _binary(op: str) -> Callable:
    def build(node: ir.Node, ins: QInputs, y: tuple) -> Built:
        return MS, op, [*ins[0], *ins[1], y[0], y[1]], {}
    return build


def _pool(op: str) -> Callable:
    def build(node: ir.Node, ins: QInputs, y: tuple) -> Built:
        return MS, op, [*ins[0], y[0], y[1]], {**_attrs(node), "channels_last": 0}
    return build


def _concat(node: ir.Node, ins: QInputs, y: tuple) -> Built:
    flat = [v for parts in ins for v in parts]
    return MS, "QLinearConcat", [y[0], y[1], *flat], _attrs(node)


RULES: dict[str, Callable[[ir.Node, QInputs, tuple], Built]] = {
    "Conv": _conv,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Add": _binary("QLinearAdd"),
    "Mul": _binary("QLinearMul"),
    "GlobalAveragePool": _pool("QLinearGlobalAveragePool"),
    "AveragePool": _pool("QLinearAveragePool"),
    "Concat": _concat,
}


def _same(a: ir.Value, b: ir.Value) -> bool:
    if a is b:
        return True
    if a.const_value is None or b.const_value is None:
        return False
    return np.array_equal(a.const_value.numpy(), b.const_value.numpy())


def _input_indices(node: ir.Node) -> list[int]:
    rule = ops.rule_for(node)
    indices = set(ops.activation_inputs(node)) | set(rule.weights if rule else ())
    return sorted(i for i in indices if i < len(node.inputs) and node.inputs[i] is not None)


def _output_q(node: ir.Node) -> ir.Node | None:
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "QuantizeLinear":
        return None
    return uses[0].node


def to_qoperator(model: ir.Model) -> PassReport:
    """Rewrite QDQ groups into integer ops in place; counts per new op type."""
    report = PassReport("qoperator")
    b = GraphBuilder(model)
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or ops.rule_for(node) is None:
                continue
            q = _output_q(node)
            if q is None or q.outputs[0].is_graph_output():
                continue
            name = node.name or node.op_type
            indices = _input_indices(node)
            parts = [_dq_parts(node.inputs[i]) for i in indices]
            if not parts or any(p is None for p in parts):
                report.skip(name, "an input is not dequantized; kept as QDQ")
                continue
            y = (q.inputs[1], q.inputs[2])
            if ops.rule_for(node).share_scale:
                x = parts[0]
                if not (_same(x[1], y[0]) and _same(x[2], y[1])):
                    report.skip(name, "output scale differs from input scale")
                    continue
                inputs = [x[0], *node.inputs[1:]]
                domain, op, attrs = node.domain, node.op_type, _attrs(node)
            else:
                builder = RULES.get(node.op_type)
                if builder is None:
                    report.skip(name, f"no QOperator form for {node.op_type}; kept as QDQ")
                    continue
                built = builder(node, parts, y)
                if isinstance(built, str):
                    report.skip(name, built + "; kept as QDQ")
                    continue
                domain, op, inputs, attrs = built
            new = b.node(op, inputs, name, attributes=attrs, domain=domain,
                         dtype=q.outputs[0].dtype, shape=q.outputs[0].shape)
            graph.insert_before(node, new)
            replace_uses(q.outputs[0], new.outputs[0])
            graph.remove(q, safe=True)
            graph.remove(node, safe=True)
            report.count(op)
    if any(k.startswith("QLinear") and k not in ("QLinearConv", "QLinearMatMul") or k == "QGemm"
           for k in report.counts):
        model.opset_imports.setdefault(MS, 1)
    cleanup(model)
    return report
