"""Constant folding: a small constant evaluator, one numpy handler per op.

A node whose inputs are all constants is replaced by an initializer holding its output, as
is Shape of a value whose shape is static, so chains such as Shape -> Gather -> Concat ->
Reshape fold completely. Handlers are named after the op and read ONNX's own attribute names.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qtool.passes.graph import constant_of, replace_uses
from qtool.passes.preprocess.driver import APPLIED, Outcome, RuleContext, attr

# Constant folding never creates a tensor larger than this unless it is no larger than the
# inputs it replaces (folding must not inflate the model, e.g. Expand of a scalar).
FOLD_MAX_GROWTH_BYTES = 1 << 16
WEIGHT_CHAIN_DEPTH = 4  # Cast -> Mul -> Reshape -> Transpose before the weight, at most


def _axes(node: ir.Node, index: int) -> list[int] | None:
    """Axes given as an attribute (old opsets) or as input ``index`` (opset 13+)."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].value)
    if index < len(node.inputs) and node.inputs[index] is not None:
        return [int(a) for a in np.asarray(constant_of(node.inputs[index])).reshape(-1)]
    return None


def Reshape(node: ir.Node, x: np.ndarray, shape: np.ndarray, *_) -> np.ndarray:
    shape = [int(s) for s in shape]
    if not attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def Transpose(node: ir.Node, x: np.ndarray) -> np.ndarray:
    perm = attr(node, "perm", None)
    return np.transpose(x, None if perm is None else list(perm))


def Unsqueeze(node: ir.Node, x: np.ndarray, *_) -> np.ndarray:
    axes = _axes(node, 1)
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = np.expand_dims(x, axis)
    return x


def Squeeze(node: ir.Node, x: np.ndarray, *_) -> np.ndarray:
    axes = _axes(node, 1)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def Concat(node: ir.Node, *xs: np.ndarray) -> np.ndarray:
    return np.concatenate(xs, axis=attr(node, "axis", 0))


def Cast(node: ir.Node, x: np.ndarray) -> np.ndarray:
    target = ir.DataType(attr(node, "to", 1))
    return x.astype(target.numpy())


def Gather(node: ir.Node, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    axis = attr(node, "axis", 0)
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take(x, indices, axis=axis)


def Add(node: ir.Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a + b).astype(a.dtype)


def Sub(node: ir.Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a - b).astype(a.dtype)


def Mul(node: ir.Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).astype(a.dtype)


def Div(node: ir.Node, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer):
        if np.any(b == 0):
            raise ZeroDivisionError("integer division by zero")
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer Div truncates toward zero
    return (a / b).astype(a.dtype)


def Slice(node: ir.Node, x: np.ndarray, starts=None, ends=None, axes=None, steps=None) -> np.ndarray:
    if "starts" in node.attributes:  # opset < 10: attributes, no steps
        starts = node.attributes["starts"].value
        ends = node.attributes["ends"].value
        axes = attr(node, "axes", None)
    starts = [int(v) for v in np.asarray(starts).reshape(-1)]
    ends = [int(v) for v in np.asarray(ends).reshape(-1)]
    axes = list(range(len(starts))) if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
    index = [slice(None)] * x.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step == 0:
            raise ValueError("Slice step 0")
        # Python slicing clamps out-of-range starts/ends exactly as ONNX Slice specifies.
        index[axis % x.ndim] = slice(start, end, step)
    return x[tuple(index)]


def ConstantOfShape(node: ir.Node, shape: np.ndarray) -> np.ndarray:
    attr = node.attributes.get("value")
    fill = np.zeros(1, np.float32) if attr is None else attr.value.numpy().reshape(-1)
    return np.full([int(d) for d in np.asarray(shape).reshape(-1)], fill[0], dtype=fill.dtype)


# Op handlers named after the op, reading ONNX's own attribute names.
FOLDABLE: dict[str, Callable[..., np.ndarray]] = {
    f.__name__: f
    for f in (Reshape, Transpose, Unsqueeze, Squeeze, Concat, Cast, Gather, Add, Sub, Mul, Div,
              Slice, ConstantOfShape)
}
FOLDED_OPS = ("Shape", *FOLDABLE)


def feeds_only_weights(value: ir.Value, depth: int = WEIGHT_CHAIN_DEPTH) -> bool:
    """Whether every use of ``value`` is the weight input of a quantizable op, directly or
    through foldable ops on constants (fp16 weights Cast to float32; int8 weights Cast and
    scaled in the graph). Such a fold grows the float graph only until the weight is
    quantized, which makes it smaller than the stored weight was."""
    from qtool import ops

    uses = list(value.uses())
    if not uses or depth < 0 or value.is_graph_output():
        return False
    for node, index in uses:
        rule = ops.rule_for(node)
        if rule is not None and index in rule.weights:
            continue
        if node.op_type in FOLDABLE and len(node.outputs) == 1 and all(
                v is None or v is value or constant_of(v) is not None for v in node.inputs):
            if feeds_only_weights(node.outputs[0], depth - 1):
                continue
        return False
    return True


def fold_constant_node(node: ir.Node, ctx: RuleContext) -> Outcome:
    """Replace a node whose inputs are all constants by an initializer holding its output.

    Handles Shape of a value whose shape is fully static, and the ops in FOLDABLE on
    constant inputs. DequantizeLinear and everything else is left alone on purpose.
    """
    if len(node.outputs) != 1:
        return None
    if node.op_type == "Shape":
        return _fold_shape(node, ctx)
    handler = FOLDABLE.get(node.op_type)
    if handler is None:
        return None
    inputs = [constant_of(v) if v is not None else None for v in node.inputs]
    if any(a is None and v is not None for a, v in zip(inputs, node.inputs)):
        return None  # not all inputs constant: not this rule's pattern
    out = node.outputs[0]
    if out.is_graph_output():
        return "its output is a graph output"
    try:
        result = np.asarray(handler(node, *inputs))
    except Exception as exc:  # noqa: BLE001 - a malformed node: onnxruntime will report it
        return f"cannot evaluate: {exc}"
    in_bytes = sum(a.nbytes for a in inputs if a is not None)
    if result.nbytes > max(in_bytes, FOLD_MAX_GROWTH_BYTES) and not feeds_only_weights(out):
        return f"folding would grow the model ({result.nbytes} bytes from {in_bytes})"
    _replace_with_constant(node, result, ctx)
    return APPLIED


def _fold_shape(node: ir.Node, ctx: RuleContext) -> Outcome:
    data = node.inputs[0]
    if data.shape is None:
        return None
    dims = list(data.shape.dims)
    if not all(isinstance(d, int) for d in dims):
        return "input shape is not static"
    if node.outputs[0].is_graph_output():
        return "its output is a graph output"
    start = attr(node, "start", 0)
    end = attr(node, "end", None)
    _replace_with_constant(node, np.array(dims[start:end], dtype=np.int64), ctx)
    return APPLIED


def _replace_with_constant(node: ir.Node, array: np.ndarray, ctx: RuleContext) -> None:
    out = node.outputs[0]
    graph = node.graph
    const = ctx.initializer(graph, (out.name or node.op_type) + "_folded", array)
    replace_uses(out, const)
    graph.remove(node, safe=True)

