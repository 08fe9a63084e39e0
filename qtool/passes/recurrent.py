"""Recurrent ops (LSTM, GRU, RNN) quantized, or left float with the reason; never skipped silently.

An ONNX ``LSTM`` with constant weights becomes onnxruntime's
``com.microsoft.DynamicQuantizeLSTM(X, W_q, R_q, B, sequence_lens, initial_h, initial_c, P,
W_scale, W_zero_point, R_scale, R_zero_point)``. Its CPU kernel quantizes each step's input
and hidden state to uint8 at run time and runs integer GEMMs against the int8 weights::

    gates = s_x s_W[c] sum_k (x_q[k] - z_x) W_q[k, c] + s_h s_R[c] sum_k (h_q[k] - z_h) R_q[k, c] + B[c]

Weights are int8 symmetric per gate channel c (``s_W[d, c] = max_k |W[d, c, k]| / 127``,
``z = 0``), stored transposed from ONNX's layout: ``W_q`` is ``[num_directions, input_size,
4*hidden_size]`` where ONNX's ``W`` is ``[num_directions, 4*hidden_size, input_size]``
(and likewise ``R_q``). Every LSTM attribute carries over except ``layout``, which the
contrib op does not have: batch-first LSTMs stay float, with that reason.

GRU and RNN have no integer kernel in onnxruntime; they stay float with the reason. int8
weights behind a DequantizeLinear would make them smaller but slower: onnxruntime runs the
DequantizeLinear on every call (a GRU of hidden size 32 over 20 steps: 375 -> 616 us).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.config import Recipe
from qtool.passes import PassReport
from qtool.passes.qdq import GraphBuilder
from qtool.passes.select import excluded
from qtool.quant.scales import DegenerateRange, quantize, weight_params

MS_DOMAIN = "com.microsoft"
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
_NO_KERNEL = ("onnxruntime has no integer {op} kernel (only DynamicQuantizeLSTM), and dequantized "
              "int8 weights run slower than float: kept float")


def quantize_recurrent(model: ir.Model, recipe: Recipe) -> PassReport:
    """Rewrite every LSTM with constant W and R into DynamicQuantizeLSTM, in place.

    Counts ``LSTM``; ``skipped`` holds node name -> why a recurrent op stays float.
    """
    report = PassReport("recurrent")
    b = GraphBuilder(model)
    cache: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
    from qtool.model import iter_nodes

    for node in [n for n in iter_nodes(model) if n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx")]:
        reason = _refusal(node, recipe)
        if reason is None:
            reason = _rewrite(b, node, cache)
        if reason is None:
            report.count(node.op_type)
        else:
            report.skip(node.name or node.op_type, reason)
    if report.counts:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return report


def _refusal(node: ir.Node, recipe: Recipe) -> str | None:
    """Why ``node`` cannot become DynamicQuantizeLSTM, or None."""
    q = recipe.quantize
    if node.op_type != "LSTM":
        return _NO_KERNEL.format(op=node.op_type)
    if q.op_types and "LSTM" not in q.op_types:
        return "LSTM not in the recipe's op_types"
    if excluded(node, q.exclude):
        return "excluded by --exclude / recipe"
    if recipe.bits_for(node.name or "", node.op_type, 8) >= 16:
        return "kept in float by a [[layer]] override"
    if node.attributes.get_int("layout", 0) != 0:
        return "batch-first LSTM (layout = 1): DynamicQuantizeLSTM has no layout attribute"
    if node.inputs[0] is None or node.inputs[0].dtype not in (ir.DataType.FLOAT, None):
        return "input X is not float32"
    for index, what in ((1, "W"), (2, "R")):
        tensor = ops.constant_weight(node, index)
        if tensor is None:
            return f"{what} is not a constant"
        if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 3:
            return f"{what} is not a 3-D float32 constant"
    return None


def _quantized_weight(b: GraphBuilder, node: ir.Node, index: int, cache: dict) -> tuple[ir.Value, ...] | str:
    """(W_q transposed, scale, zero point) for input ``index`` (1: W, 2: R), shared between
    LSTMs reading the same constant."""
    value = node.inputs[index]
    if id(value) in cache:
        return cache[id(value)]
    w = ops.constant_weight(node, index).numpy()  # [num_directions, 4*hidden, K]
    d, gates, k = w.shape
    try:
        p = weight_params(w.reshape(d * gates, k), 0, "int8", symmetric=True)
    except DegenerateRange as exc:
        return f"{'W' if index == 1 else 'R'}: {exc.reason}"
    q = quantize(w.reshape(d * gates, k), p).reshape(d, gates, k)
    base = value.name or ("W" if index == 1 else "R")
    cache[id(value)] = (
        b.initializer(np.ascontiguousarray(q.transpose(0, 2, 1)), base + "_quantized"),
        b.initializer(p.scale.astype(np.float32).reshape(d, gates), base + "_scale"),
        b.initializer(p.zero_point.astype(np.int8).reshape(d, gates), base + "_zero_point"),
    )
    return cache[id(value)]


def _rewrite(b: GraphBuilder, node: ir.Node, cache: dict) -> str | None:
    weights = [_quantized_weight(b, node, i, cache) for i in (1, 2)]
    for w in weights:
        if isinstance(w, str):
            return w
    (wq, ws, wz), (rq, rs, rz) = weights
    optional = [node.inputs[i] if i < len(node.inputs) else None for i in range(3, 8)]
    attributes = [a for name, a in node.attributes.items() if name != "layout"]
    new = ir.Node(MS_DOMAIN, "DynamicQuantizeLSTM", [node.inputs[0], wq, rq, *optional, ws, wz, rs, rz],
                  attributes=attributes, num_outputs=len(node.outputs),
                  name=b.name(f"{node.name or 'LSTM'}_quantized"))
    node.graph.insert_before(node, new)
    names = [old.name for old in node.outputs]
    for old, value in zip(node.outputs, new.outputs):
        if old.type is not None:
            value.type, value.shape = old.type, old.shape
        old.replace_all_uses_with(value, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    for name, value in zip(names, new.outputs):
        value.name = name  # graph outputs and tensors a table knows keep their names; "" stays omitted
    return None
