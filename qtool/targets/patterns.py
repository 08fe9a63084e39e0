"""Subgraphs the OpenVINO preset leaves in float, found on the float model before Q/DQ.

Two patterns, after NNCF (the quantizer OpenVINO's authors ship), in our own code:

* x * f(x) activations (SiLU x*sigmoid(x), GELU x*0.5*(1+erf(x/sqrt2)), hard-swish): the
  runtime computes them in float or fuses them into the op before; a Q/DQ between their
  halves is float quantize-dequantize work (NNCF's fused activation patterns,
  nncf/onnx/hardware/fused_patterns.py, ``atomic_activations_operations``).
* squeeze-excitation blocks, NNCF's ``IgnoredPatternNames.SE_BLOCK``
  (nncf/onnx/quantization/ignored_patterns.py, ``create_se_block``, and the same rule in
  nncf/openvino/quantization/ignored_patterns.py)::

      x -> ReduceMean | GlobalAveragePool -> Conv -> activation -> Conv
        -> Sigmoid | HardSigmoid -> Mul(x, gate)

  NNCF ignores the two Convs, the activation and the gate (they stay float, weights
  included); the pool and the Mul are marked "PATTERN_NODE_TO_EXCLUDE", so they are
  quantized as usual. The two Convs run on a 1x1 map: an int8 version saves nothing and
  adds a requantization between them (OpenVINO's runtime info on PP-OCR: NNCF's SE Convs
  run as f32 brgconv, qtool's as int8 with a FakeQuantize of the Relu output).
  NNCF's matcher also refuses a match whose inner nodes feed anything outside it; the
  pool, the Convs and the gate here must each have one use.
"""

from __future__ import annotations

import onnx_ir as ir

# Element-wise ops an x * f(x) activation is built from.
ELEMENTWISE_CHAIN = ("Sigmoid", "HardSigmoid", "Tanh", "Erf", "Relu", "Clip", "Add", "Sub", "Mul", "Div")
GATE_DEPTH = 6
# The squeeze of an SE block (global mean over the spatial axes).
SQUEEZES = ("GlobalAveragePool", "ReduceMean")
# Single-op activations between the two SE Convs: NNCF's ATOMIC_ACTIVATIONS_OPERATIONS
# (nncf/onnx/graph/metatypes/groups.py); an x * f(x) chain is accepted too (self_gated).
ACTIVATIONS = ("Relu", "LeakyRelu", "ThresholdedRelu", "Elu", "PRelu", "Sigmoid", "HardSigmoid",
               "HardSwish", "Selu")
GATES = ("Sigmoid", "HardSigmoid")


def _onnx(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in ops


def self_gated(node: ir.Node) -> bool:
    """``Mul(g(x), f(x))`` with f and g chains of at most GATE_DEPTH element-wise ops of the
    same x (their other operands constant): x * sigmoid(x), (x * 0.5) * (1 + erf(x / c))."""
    if node.op_type != "Mul" or len(node.inputs) != 2 or None in node.inputs:
        return False
    a, b = node.inputs
    return bool(chain(a) & chain(b))


def chain(value: ir.Value) -> set[ir.Value]:
    """``value`` and the values it is an element-wise function of, up to GATE_DEPTH ops."""
    seen = {value}
    for _ in range(GATE_DEPTH):
        p = value.producer()
        if p is None or p.op_type not in ELEMENTWISE_CHAIN:
            break
        moving = [v for v in p.inputs if v is not None and v.const_value is None
                  and not (v.producer() is not None and v.producer().op_type == "Constant")]
        if len(moving) != 1:
            break
        value = moving[0]
        seen.add(value)
    return seen


def _only_use(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` (None: several, none, or a graph output)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _activation_output(a: ir.Value) -> ir.Value | None:
    """The output of the activation applied to ``a`` (the first SE Conv's output): one op
    of ACTIVATIONS, or an x * f(x) chain of ``a`` (swish, hard-swish, GELU)."""
    node = _only_use(a)
    if _onnx(node, *ACTIVATIONS):
        return node.outputs[0]
    frontier = [a]
    for _ in range(GATE_DEPTH + 1):
        reached = []
        for v in frontier:
            for use in v.uses():
                n = use.node
                if _onnx(n, "Mul") and self_gated(n) and all(a in chain(i) for i in n.inputs):
                    return n.outputs[0]
                if _onnx(n, *ELEMENTWISE_CHAIN):
                    reached.extend(n.outputs)
        frontier = reached
    return None


def _block_from(first: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(first, second) Conv of the SE block whose first Conv is ``first``, or None."""
    if not first.inputs or first.inputs[0] is None:
        return None
    pool = first.inputs[0].producer()
    if not _onnx(pool, *SQUEEZES) or not pool.inputs or _only_use(pool.outputs[0]) is not first:
        return None
    x = pool.inputs[0]
    h = _activation_output(first.outputs[0])
    second = _only_use(h) if h is not None else None
    if not _onnx(second, "Conv") or second.inputs[0] is not h:
        return None
    gate = _only_use(second.outputs[0])
    if not _onnx(gate, *GATES):
        return None
    mul = _only_use(gate.outputs[0])
    if not _onnx(mul, "Mul") or len(mul.inputs) != 2 or x not in mul.inputs:
        return None  # the excitation must scale the very tensor that was squeezed
    return first, second


def _first_conv_before(conv: ir.Node) -> ir.Node | None:
    """The Conv an activation before ``conv`` reads (walking back through element-wise
    ops, at most GATE_DEPTH + 1 of them), or None."""
    value = conv.inputs[0] if conv.inputs else None
    for _ in range(GATE_DEPTH + 1):
        p = value.producer() if value is not None else None
        if p is None:
            return None
        if _onnx(p, "Conv"):
            return p
        if not _onnx(p, *ACTIVATIONS, *ELEMENTWISE_CHAIN) or not p.inputs:
            return None
        value = p.inputs[0]
    return None


def se_block_conv(node: ir.Node) -> bool:
    """Whether ``node`` is one of the two Convs of a squeeze-excitation block (module doc)."""
    if not _onnx(node, "Conv") or not node.inputs or node.inputs[0] is None:
        return False
    for first in (node, _first_conv_before(node)):
        block = _block_from(first) if first is not None else None
        if block is not None and node in block:
            return True
    return False
