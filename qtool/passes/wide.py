"""16-bit activations with 8-bit weights (A16W8): which tensors, and which Q/DQ ops carry them.

A node a recipe raises (``activation_bits = 16`` in [quantize], or a [[layer]] rule) has
every activation it reads or writes quantized to 16 bits from the same calibrated range:
uint16 when ``activation_type`` is uint8 (asymmetric, like the 8-bit default), int16 when it
is int8. A tensor between an 8-bit and a 16-bit node takes 16 bits. Weights stay int8 and
biases int32 (``s_b = s_x * s_w`` with the 16-bit input scale).

The Q/DQ ops: ONNX's QuantizeLinear/DequantizeLinear accept int16/uint16 from opset 21.
Below it the 16-bit pairs use onnxruntime's com.microsoft QuantizeLinear/DequantizeLinear
(same formula, rounding half to even and saturating; int8/uint8/int16/uint16), so the
model's opset is only raised when the user allows it (--allow-opset-upgrade raises it to
21 first; qtool.pipeline.steps.WideActivationOpset). 8-bit pairs keep the standard ops.
"""

from __future__ import annotations

import onnx_ir as ir

from qtool import ops
from qtool.config import Recipe
from qtool.passes.select import is_float_activation

WIDE_TYPES = ("uint16", "int16")
# ONNX QuantizeLinear/DequantizeLinear accept int16/uint16 from this opset on.
WIDE_QDQ_OPSET = 21
CONTRIB_DOMAIN = "com.microsoft"


def qdq_domain(model: ir.Model, dtype: str) -> str:
    """The domain of a Q/DQ of ``dtype``: standard, or com.microsoft for 16-bit types below
    opset 21 (then registered in the model's opset imports)."""
    if dtype not in WIDE_TYPES or model.opset_imports.get("", 0) >= WIDE_QDQ_OPSET:
        return ""
    model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
    return CONTRIB_DOMAIN


def wide_activations(nodes: list[ir.Node], recipe: Recipe) -> set[ir.Value]:
    """The activations (inputs and outputs) of those of ``nodes`` that ``recipe`` gives
    16-bit activations."""
    if not recipe.wide_activations():
        return set()
    wide: set[ir.Value] = set()
    for node in nodes:
        if recipe.activation_bits_for(node.name or "", node.op_type) != 16:
            continue
        wide.update(node.inputs[i] for i in ops.activation_inputs(node)
                    if is_float_activation(node.inputs[i]))
        wide.update(v for v in node.outputs if v is not None)
    return wide
