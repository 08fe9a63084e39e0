"""Int8 weight storage: weights become int8 initializers read through DequantizeLinear,
activations stay float.

``Conv/ConvTranspose/MatMul/Gemm(X, W const)`` -> ``op(X, DequantizeLinear(W_q int8,
scale, 0, axis))``: symmetric int8 (-127..127), per output channel from opset 13, per tensor
below it (DequantizeLinear has no ``axis`` before 13). The float op still runs, so the model
is as fast as float (plus one dequantization of each weight per run) and about 4x smaller,
with the accuracy of float activations: a good int8-per-channel weight sits at 40+ dB.

This is the guard's last resort for models whose activations do not survive 8 bits (a
DB text detector's probability map, a small face detector's score map): where static and
dynamic int8 both miss the floor, it still delivers a smaller model that works, and says it
is not faster. Shared weights are quantized once. Nodes inside If/Loop/Scan bodies are
included: their weights live in the main graph or in Constant nodes already lifted by the
scheme's ConstantWeights step.
"""

from __future__ import annotations

import onnx_ir as ir

from qtool import ops
from qtool.config import Recipe
from qtool.model import iter_nodes
from qtool.passes import PassReport
from qtool.passes.graph import GraphBuilder
from qtool.passes.qdq import dequantize_node, weight_axis
from qtool.passes.select import excluded
from qtool.quant.scales import DegenerateRange, quantize, weight_params

WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis attribute
MIN_ELEMENTS = 16  # smaller weights (a scalar, a 2x2 matrix) cost more in scales than they save


def store_int8_weights(model: ir.Model, recipe: Recipe) -> PassReport:
    """Rewrite ``model`` in place (see the module docstring); counts per op type."""
    report = PassReport("int8-weights")
    q = recipe.quantize
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    per_channel = q.per_channel and opset >= PER_CHANNEL_OPSET
    if q.per_channel and not per_channel:
        report.notes.append(f"per-tensor weights: DequantizeLinear's axis needs opset "
                            f"{PER_CHANNEL_OPSET}, the model has {opset}")
    b = GraphBuilder(model)
    done: dict[tuple, ir.Value] = {}
    for node in list(iter_nodes(model)):
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.op_type
        tensor = ops.constant_weight(node, 1)
        if tensor is None or tensor.dtype != ir.DataType.FLOAT:
            continue
        if excluded(node, q.exclude) or recipe.bits_for(name, node.op_type, 8) >= 16:
            report.skip(name, "kept float by --exclude / the recipe")
            continue
        value = node.inputs[1]
        w = tensor.numpy()
        if w.size < MIN_ELEMENTS:
            report.skip(name, f"weight of {w.size} elements (< {MIN_ELEMENTS})")
            continue
        axis = weight_axis(node, w, per_channel)
        key = (id(value), axis, id(node.graph))
        if key not in done:
            try:
                p = weight_params(w, axis, "int8", symmetric=True)
            except DegenerateRange as exc:
                report.skip(name, f"weight {value.name}: {exc.reason}")
                continue
            wq = b.initializer(quantize(w, p), f"{value.name}_quantized")
            dq = dequantize_node(b, wq, p, value.name, shape=value.shape)
            node.graph.insert_before(node, dq)
            done[key] = dq.outputs[0]
        node.replace_input_with(1, done[key])
        report.count(node.op_type)
    return report

