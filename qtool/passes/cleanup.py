"""Cleanup after quantization: pairs that buy nothing, and tensors nobody reads.

Rules, applied until nothing changes:

- ``requant_removed``: ``DQ -> Q`` with the same scale and zero point is the identity on the
  integer tensor; the Q's readers read the DQ's input instead.
- ``dangling_qdq_removed``: a ``Q -> DQ`` pair whose producer and readers are all float
  ops (no integer kernel can absorb it) only adds rounding error; it is removed.
- ``scalar_mul_absorbed``: ``DQ(q; s, z) -> Mul(c) -> Q -> DQ`` with a positive scalar
  constant ``c`` is ``DQ(q; c * s, z)``: the multiplication moves into the scale, exactly
  (no requantization, no integer Mul kernel; exporters leave such scalings after
  activations, e.g. PP-LCNet's learnable scale after each hard-swish).
- ``unused_removed``: initializers and Constant nodes that nothing reads.

Works in place; returns a PassReport with a count per rule.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.model import iter_graphs
from qtool.passes import PassReport
from qtool.passes.graph import GraphBuilder, remove_unused, replace_uses

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _producer_op(value: ir.Value | None) -> str | None:
    producer = value.producer() if value is not None else None
    return producer.op_type if producer is not None else None


def _same_params(a: ir.Node, b: ir.Node) -> bool:
    for i in (1, 2):
        va = a.inputs[i] if i < len(a.inputs) else None
        vb = b.inputs[i] if i < len(b.inputs) else None
        if va is vb:
            continue
        if va is None or vb is None or va.const_value is None or vb.const_value is None:
            return False
        if not np.array_equal(va.const_value.numpy(), vb.const_value.numpy()):
            return False
    return a.attributes.get_int("axis", 1) == b.attributes.get_int("axis", 1)


def _dequantized(value: ir.Value) -> bool:
    """A DequantizeLinear output, directly or through data movement the runtime runs on the
    integer tensor (qtool.targets.propagate moves Qs above such ops for OpenVINO)."""
    from qtool.targets.propagate import agnostic

    for _ in range(16):
        producer = value.producer()
        if producer is None:
            return False
        if producer.op_type == "DequantizeLinear":
            return True
        if not agnostic(producer) or value is not producer.outputs[0] and producer.op_type != "Split":
            return False
        value = producer.inputs[0]
    return False


def integer_ready(node: ir.Node) -> bool:
    """Whether a runtime can run ``node`` on integers: a registry op whose activation and
    weight inputs all come from DequantizeLinear (data-movement ops need just one)."""
    rule = ops.rule_for(node)
    if rule is None:
        return False
    indices = set(ops.activation_inputs(node)) | {i for i in rule.weights if i < len(node.inputs)}
    fed = [_dequantized(node.inputs[i]) for i in sorted(indices) if node.inputs[i] is not None]
    if not fed:
        return False
    return fed[0] if rule.share_scale else all(fed)


def remove_requant(graph: ir.Graph) -> int:
    removed = 0
    for q in list(graph):
        if q.op_type != "QuantizeLinear":
            continue
        dq = q.inputs[0].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or not _same_params(q, dq):
            continue
        if q.outputs[0].is_graph_output():
            continue
        replace_uses(q.outputs[0], dq.inputs[0])
        graph.remove(q, safe=True)
        removed += 1
    return removed


def remove_dangling(graph: ir.Graph) -> int:
    removed = 0
    for q in list(graph):
        # com.microsoft Q/DQ (16-bit activations below opset 21) have the same semantics.
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        uses = list(q.outputs[0].uses())
        if not uses or any(u.node.op_type != "DequantizeLinear" for u in uses):
            continue
        if q.outputs[0].is_graph_output():
            continue
        source = q.inputs[0]
        producer = source.producer()
        if producer is not None and integer_ready(producer):
            continue
        readers = [r.node for dq in (u.node for u in uses) for r in dq.outputs[0].uses()]
        if any(integer_ready(r) or r.op_type == "QuantizeLinear" for r in readers):
            continue
        for dq in [u.node for u in uses]:
            out = dq.outputs[0]
            if out.is_graph_output() and (source.is_graph_output() or source.is_graph_input()):
                continue  # keep: renaming would clash with another graph output/input
            replace_uses(out, source)  # a graph output passes its name to source
            graph.remove(dq, safe=True)
        if not q.outputs[0].uses():
            graph.remove(q, safe=True)
            removed += 1
    return removed


def _scalar_value(value: ir.Value | None) -> float | None:
    """A float scalar constant, given directly or as DequantizeLinear of constants."""
    if value is None:
        return None
    if value.const_value is not None:
        array = value.const_value.numpy()
    else:
        dq = value.producer()
        if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
            return None
        q = dq.inputs[0].const_value.numpy().astype(np.float64)
        scale = dq.inputs[1].const_value
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        if scale is None or (zp is not None and zp.const_value is None):
            return None
        z = zp.const_value.numpy().astype(np.float64) if zp is not None else 0.0
        array = (q - z) * scale.numpy().astype(np.float64)
    if array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(-1)[0])


def absorb_scalar_mul(graph: ir.Graph, b: GraphBuilder) -> int:
    absorbed = 0
    for mul in list(graph):
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2:
            continue
        for i in (0, 1):
            dq = mul.inputs[i].producer() if mul.inputs[i] is not None else None
            c = _scalar_value(mul.inputs[1 - i])
            if dq is not None and dq.op_type == "DequantizeLinear" and c is not None:
                break
        else:
            continue
        if not (c > 0 and np.isfinite(c)) or dq.inputs[0].const_value is not None:
            continue
        scale = dq.inputs[1].const_value
        if scale is None or scale.numpy().size != 1 or dq.attributes.get_int("block_size", 0):
            continue
        out = mul.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "QuantizeLinear":
            continue
        q = uses[0].node
        readers = [u.node for u in q.outputs[0].uses()]
        if q.outputs[0].is_graph_output() or not readers or any(
            r.op_type != "DequantizeLinear" or not _same_params(q, r) for r in readers
        ):
            continue
        s = scale.numpy()
        new_scale = b.initializer((s.astype(np.float64) * c).astype(s.dtype), (dq.inputs[1].name or "scale") + "_scaled")
        inputs = [dq.inputs[0], new_scale, *dq.inputs[2:]]
        for r in readers:
            new_dq = ir.Node(r.domain, "DequantizeLinear", inputs, attributes=list(r.attributes.values()),
                             name=b.name((r.name or "dq") + "_scaled"))
            graph.insert_after(r, new_dq)
            name = r.outputs[0].name
            replace_uses(r.outputs[0], new_dq.outputs[0])
            graph.remove(r, safe=True)
            new_dq.outputs[0].name = name
        graph.remove(q, safe=True)
        graph.remove(mul, safe=True)
        absorbed += 1
    return absorbed


def cleanup(model: ir.Model) -> PassReport:
    """Apply the rules above to every graph of ``model``, in place."""
    report = PassReport("cleanup")
    b = GraphBuilder(model)
    changed = True
    while changed:
        changed = False
        for graph in iter_graphs(model.graph):
            for key, rule in (("requant_removed", remove_requant),
                              ("dangling_qdq_removed", remove_dangling),
                              ("scalar_mul_absorbed", lambda g: absorb_scalar_mul(g, b))):
                n = rule(graph)
                if n:
                    report.count(key, n)
                    changed = True
    n = remove_unused(model, ("Constant", *_QDQ))
    if n:
        report.count("unused_removed", n)
    return report
