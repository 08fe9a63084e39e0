"""The op registry: which inputs of which ops qtool quantizes, and in which schemes.

One table, read by `inspect` (to list candidates), by calibration (to know which activations
to observe) and by the conversion passes (to know what to rewrite). An op that is not here
is left in float and reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized.

    ``activations``: input indices that carry activations (calibrated, quantized in static
    int8). ``weights``: input indices that usually hold constant weights. ``weight_axis``:
    the per-channel axis of the weight (output channels). ``bias``: index of an int32 bias.
    ``share_scale``: data-movement ops whose output reuses the input's scale instead of
    requantizing. ``schemes``: which conversions handle the op.
    """

    activations: tuple[int, ...] = ()
    weights: tuple[int, ...] = ()
    weight_axis: int | None = None
    bias: int | None = None
    share_scale: bool = False
    schemes: frozenset[str] = frozenset()


# Ops that compute on integers (quantized formats) and the ops that only move between
# float and integers: what `eval`'s integer-kernel report and diagnosis look for.
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd",
    "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere",
    "QLinearConvTranspose", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
    "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "GatherBlockQuantized",
    "NhwcQLinearConv", "QOrderedMatMul",
})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})

_STATIC = frozenset({"int8-static"})
_ALL8 = frozenset({"int8-static", "int8-dynamic"})
_WEIGHT_ONLY = frozenset({"int8-static", "int8-dynamic", "weight-only"})

OP_RULES: dict[str, OpRule] = {
    "Conv": OpRule(activations=(0,), weights=(1,), weight_axis=0, bias=2, schemes=_ALL8),
    "ConvTranspose": OpRule(activations=(0,), weights=(1,), weight_axis=1, bias=2, schemes=_STATIC),
    "MatMul": OpRule(activations=(0, 1), weights=(1,), weight_axis=1, schemes=_WEIGHT_ONLY),
    "Gemm": OpRule(activations=(0,), weights=(1,), weight_axis=1, bias=2, schemes=_WEIGHT_ONLY),
    "Gather": OpRule(activations=(), weights=(0,), weight_axis=0, schemes=_WEIGHT_ONLY),
    "Add": OpRule(activations=(0, 1), schemes=_STATIC),
    "Mul": OpRule(activations=(0, 1), schemes=_STATIC),
    "Concat": OpRule(activations=(0,), schemes=_STATIC),  # all inputs, see activation_inputs
    "MaxPool": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
    "AveragePool": OpRule(activations=(0,), schemes=_STATIC),
    "GlobalAveragePool": OpRule(activations=(0,), schemes=_STATIC),
    "Resize": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
    "Softmax": OpRule(activations=(0,), schemes=_STATIC),
    "Reshape": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
    "Transpose": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
    "Flatten": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
    "Squeeze": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
    "Unsqueeze": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
    "Slice": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
    # constant-mode Pad with value 0 (TF-style "same" padding): 0 is exact in the input's scale
    "Pad": OpRule(activations=(0,), share_scale=True, schemes=_STATIC),
}

# Ops whose weights make a model big: inspect lists these as the candidates that matter.
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather")


def rule_for(node: ir.Node) -> OpRule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return OP_RULES.get(node.op_type)


def activation_inputs(node: ir.Node) -> list[int]:
    """Indices of the inputs that carry activations for ``node`` (none if not quantizable)."""
    rule = rule_for(node)
    if rule is None:
        return []
    if node.op_type == "Concat":
        return list(range(len(node.inputs)))
    return [i for i in rule.activations if i < len(node.inputs) and node.inputs[i] is not None]


def constant_weight(node: ir.Node, index: int) -> ir.TensorProtocol | None:
    """The constant tensor at input ``index`` (an initializer or a Constant node), or None."""
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    value = node.inputs[index]
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value
    return None


def is_candidate(node: ir.Node, scheme: str | None = None) -> bool:
    """Whether qtool knows how to quantize ``node`` (in ``scheme`` when given)."""
    rule = rule_for(node)
    if rule is None:
        return False
    if scheme is not None and scheme not in rule.schemes:
        return False
    if node.op_type in WEIGHT_OPS and rule.weights:
        # Weight ops are worth quantizing when the weight is a constant.
        return any(constant_weight(node, i) is not None for i in rule.weights) or (
            node.op_type == "MatMul" and scheme in (None, "int8-static")
        )
    return True


def bias_add_consumer(node: ir.Node, n: int) -> tuple[ir.Node, ir.Value] | None:
    """The Add(node output, constant float bias of n elements) that alone reads ``node``'s
    output, and that bias; None when there is no such Add (it can then be fused as the
    bias input of MatMulNBits / DynamicQuantizeMatMul)."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is out or other is None or other.is_graph_input() or other.const_value is None:
        return None
    tensor = other.const_value
    if tensor.dtype != ir.DataType.FLOAT or tensor.size != n or tuple(tensor.shape)[-1:] != (n,):
        return None
    if out.shape is not None and len(tensor.shape) > len(out.shape):
        return None
    return add, other


def pads_with_zero(node: ir.Node) -> bool:
    """Constant-mode Pad whose fill value is 0 (exactly representable after quantization)."""
    if node.attributes.get_string("mode", "constant") != "constant":
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        tensor = constant_weight(node, 2)
        return tensor is not None and not np.any(tensor.numpy())
    return node.attributes.get_float("value", 0.0) == 0.0


def clip_bounds(act: ir.Node) -> tuple[float | None, float]:
    """[min, max] a Relu/Clip clamps to; (None, _) when the bounds are not constants."""
    if act.op_type == "Relu":
        return 0.0, float("inf")
    lo, hi = -float("inf"), float("inf")
    if "min" in act.attributes:  # opset < 11
        lo = act.attributes.get_float("min", lo)
        hi = act.attributes.get_float("max", hi)
        return lo, hi
    for index in (1, 2):
        if index < len(act.inputs) and act.inputs[index] is not None:
            tensor = constant_weight(act, index)
            if tensor is None:
                return None, hi
            bound = float(tensor.numpy().reshape(-1)[0])
            lo, hi = (bound, hi) if index == 1 else (lo, bound)
    return lo, hi
