"""The layers recovery works on, seen the same way by every recovery pass.

A target layer is a Conv, Gemm or 2-D-weight MatMul that static int8 will quantize (not
excluded, not put at other bits by a ``[[layer]]`` rule) with a constant float32 weight.
Its weight is viewed as rows ``[groups, outputs per group, K]`` (one row per output
channel, K = the inputs one output reads), so Conv, depthwise Conv, Gemm and MatMul share
one code path; its inputs are viewed as patches ``[groups, positions, K]`` (im2col).
The int8 grid of a weight is the one ``qtool.passes.qdq`` will use (``weight_params``,
symmetric, per output channel when the recipe says so), so a weight moved onto that grid
here is quantized to exactly the chosen integers there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.config import Recipe
from qtool.model import iter_nodes
from qtool.passes.graph import GraphBuilder
from qtool.passes.qdq import weight_axis
from qtool.passes.select import excluded, is_float_activation
from qtool.quant.scales import QParams, int_range, weight_params

OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Layer:
    node: ir.Node
    weight: np.ndarray  # float32, as stored

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def groups(self) -> int:
        return self.node.attributes.get_int("group", 1) if self.node.op_type == "Conv" else 1

    @property
    def channel_axis(self) -> int:
        """The axis of the layer's output that holds its output channels."""
        return 1 if self.node.op_type == "Conv" else -1

    def rows(self, w: np.ndarray | None = None) -> np.ndarray:
        """``w`` (default: the layer's weight) as ``[groups, outputs per group, K]``."""
        w = self.weight if w is None else w
        if self.node.op_type == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if self.node.op_type == "Gemm" and self.node.attributes.get_int("transB", 0):
            return w[None]
        return w.T[None]

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """The inverse of ``rows``: an array of the stored weight's shape."""
        if self.node.op_type == "Conv":
            return rows.reshape(self.weight.shape)
        if self.node.op_type == "Gemm" and self.node.attributes.get_int("transB", 0):
            return rows[0]
        return rows[0].T

    def params(self, recipe: Recipe, w: np.ndarray | None = None) -> QParams:
        """The int8 parameters static int8 gives this weight (as qtool.passes.qdq does)."""
        w = self.weight if w is None else w
        q = recipe.quantize
        return weight_params(w, weight_axis(self.node, w, q.per_channel), q.weight_type, symmetric=True)

    def grid(self, recipe: Recipe, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(scale, zero point) broadcast to the rows' shape, and the integer bounds."""
        w = self.weight if w is None else w
        p = self.params(recipe, w)
        scale, zp = (np.broadcast_to(self._along(a, w), w.shape) for a in (p.scale, p.zero_point.astype(np.int64)))
        qmin, qmax = int_range(p.dtype, narrow=True)
        return self.rows(scale).astype(np.float64), self.rows(zp), qmin, qmax

    def _along(self, values: np.ndarray, w: np.ndarray) -> np.ndarray:
        axis = weight_axis(self.node, w, values.ndim == 1)
        if axis is None or values.ndim == 0:
            return values.reshape(())
        shape = [1] * w.ndim
        shape[axis] = -1
        return values.reshape(shape)

    def quantized(self, recipe: Recipe, w: np.ndarray | None = None) -> np.ndarray:
        """``w`` as static int8 will see it: quantized to nearest and dequantized (float64)."""
        w = self.weight if w is None else w
        scale, zp, qmin, qmax = self.grid(recipe, w)
        q = np.clip(np.rint(self.rows(w).astype(np.float64) / scale) + zp, qmin, qmax)
        return self.from_rows((q - zp) * scale)


def target_layers(model: ir.Model, recipe: Recipe) -> tuple[list[Layer], dict[str, str]]:
    """The layers static int8 will quantize with a float32 constant weight, and the
    Conv/Gemm/MatMul nodes left out with the reason."""
    q = recipe.quantize
    found, skipped = [], {}
    for node in iter_nodes(model):
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.graph is not model.graph:
            # Recovery reads each layer's output on the data; onnxruntime cannot return one
            # from an If/Loop/Scan body (a greedy decoder's Loop), so those keep their weights.
            skipped[node.name or ""] = "inside an If/Loop/Scan body, whose tensors cannot be observed"
            continue
        if (q.op_types and node.op_type not in q.op_types) or excluded(node, q.exclude):
            continue
        if recipe.bits_for(node.name or "", node.op_type, 8) != 8:
            continue
        tensor = ops.constant_weight(node, 1)
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or not is_float_activation(node.inputs[0]):
            continue
        w = tensor.numpy()
        why = _unsupported(node, w)
        if why:
            skipped[node.name or ""] = why
            continue
        found.append(Layer(node, np.asarray(w, np.float32)))
    return found, skipped


def _unsupported(node: ir.Node, w: np.ndarray) -> str | None:
    a = node.attributes
    if node.op_type == "Gemm" and (a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0):
        return "Gemm with transA or alpha != 1"
    if node.op_type in ("Gemm", "MatMul") and w.ndim != 2:
        return f"{w.ndim}-D weight"
    if node.op_type == "Conv" and w.ndim < 3:
        return "Conv weight of rank < 3"
    return None


def set_weight(b: GraphBuilder, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> None:
    """Give ``node`` input ``index`` the constant ``array``: rewritten in place when this node
    is its only reader (the initializer keeps its name), a new initializer otherwise."""
    value = node.inputs[index] if index < len(node.inputs) else None
    array = np.asarray(array, np.float32)
    if (value is not None and value.is_initializer() and not value.is_graph_input()
            and len(list(value.uses())) == 1):
        value.const_value = ir.tensor(array, name=value.name)
        return
    base = value.name if value is not None and value.name else (node.name or "w")
    new = b.initializer(array, f"{base}_{suffix}")
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)


def bias_of(layer: Layer) -> tuple[np.ndarray | None, str | None]:
    """The layer's bias (None: it has none but one can be added) or the reason it cannot
    take one. A MatMul's bias is the constant of the Add that alone reads its output."""
    node, n = layer.node, output_channels(layer)
    if node.op_type == "MatMul":
        found = ops.bias_add_consumer(node, n)
        if found is None:
            return None, "MatMul with no bias Add after it"
        return np.asarray(found[1].const_value.numpy(), np.float32).reshape(-1), None
    if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
        return None, "Gemm with beta != 1"
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None, None
    tensor = ops.constant_weight(node, 2)
    if tensor is None or tensor.size != n:
        return None, "bias is not a constant of one value per output channel"
    return np.asarray(tensor.numpy(), np.float32).reshape(-1), None


def set_bias(b: GraphBuilder, layer: Layer, bias: np.ndarray) -> None:
    node = layer.node
    if node.op_type == "MatMul":
        add, value = ops.bias_add_consumer(node, output_channels(layer))
        shape = tuple(value.const_value.shape)
        set_weight(b, add, next(i for i, v in enumerate(add.inputs) if v is value), bias.reshape(shape), "corrected")
        return
    set_weight(b, node, 2, bias, "corrected")


def output_channels(layer: Layer) -> int:
    rows = layer.rows()
    return rows.shape[0] * rows.shape[1]


def im2col(x: np.ndarray, layer: Layer) -> np.ndarray | None:
    """The patches a 2-D Conv reads, ``[groups, N*H_out*W_out, C/groups*kh*kw]`` in the
    order of the weight's rows; a Gemm/MatMul's input as ``[1, rows, K]``. None: a Conv
    form this does not unfold (not 2-D, or auto_pad)."""
    node = layer.node
    if node.op_type != "Conv":
        return x.reshape(1, -1, x.shape[-1])
    a = node.attributes
    if layer.weight.ndim != 4 or a.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    kh, kw = layer.weight.shape[2:]
    t, left, bottom, right = (list(a.get_ints("pads", [0, 0, 0, 0])) + [0] * 4)[:4]
    sh, sw = a.get_ints("strides", [1, 1])
    dh, dw = a.get_ints("dilations", [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (t, bottom), (left, right)))
    n, c, hp, wp = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), np.float32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    g = layer.groups
    return cols.reshape(n, g, (c // g) * kh * kw, ho * wo).transpose(1, 0, 3, 2).reshape(g, n * ho * wo, -1)
