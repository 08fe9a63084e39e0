"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), no data needed.

For ``Conv1 -> act -> Conv2`` where ``act`` is positively homogeneous per channel (``act(x / s)
= act(x) / s`` for ``s > 0``: none, Relu, LeakyRelu, PRelu, Clip(0, inf), MaxPool,
AveragePool, up to MAX_BETWEEN of them in a row), output channel i of
Conv1 is divided by ``s_i`` (its weights and bias) and input channel i of Conv2 multiplied
by ``s_i``: the float function is unchanged. With ``s_i = sqrt(r1_i / r2_i)`` (``r1_i`` the
range of Conv1's output channel i weights, ``r2_i`` of Conv2's input channel i weights)
both become ``sqrt(r1_i r2_i)``: per-channel weight ranges are balanced, so one int8 scale
per channel (and per tensor for activations) wastes fewer levels. Depthwise Convs take part
(as Conv1 or Conv2); chains of three (expand -> depthwise -> project) are balanced by
repeating the pairwise step until the scales settle.

ReLU6 / Clip(0, 6) are skipped, with the reason: the bound is one scalar for every channel,
so after scaling channel i by ``1/s_i`` it would have to saturate at ``6/s_i``; rewriting
the graph to do that (a per-channel Min) would cost a float op per block, and replacing it
with Relu (what AIMET recommends) changes the float function.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.model import iter_nodes
from qtool.passes import PassReport
from qtool.passes.graph import GraphBuilder
from qtool.passes.recovery.layers import set_weight

ROUNDS = 20  # pairwise passes over the model; chains of three settle in a few
SETTLED = 1e-3  # stop when no scale moves a channel by more than 0.1%
SCALE_BOUNDS = (1e-4, 1e4)  # a dead channel (range ~0) must not blow the other side up
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "Identity", "Dropout")
MAX_BETWEEN = 3  # ops walked through between the two Convs (Relu -> MaxPool, say)


def _single_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _activation_ok(node: ir.Node) -> str | None:
    """None when ``act(x / s) = act(x) / s`` for s > 0, else the reason it is not."""
    if node.op_type in HOMOGENEOUS:
        if node.op_type == "PRelu" and ops.constant_weight(node, 1) is None:
            return "PRelu with a non-constant slope"
        return None
    if node.op_type == "Clip":
        lo = ops.constant_weight(node, 1)
        hi = ops.constant_weight(node, 2)
        if node.attributes.get("min") is not None or node.attributes.get("max") is not None:
            return "Clip with min/max attributes (opset < 11)"
        if lo is not None and float(np.asarray(lo.numpy())) == 0.0 and (len(node.inputs) < 3 or node.inputs[2] is None):
            return None
        if hi is not None:
            return (f"Clip/ReLU6 with upper bound {float(np.asarray(hi.numpy())):g}: one scalar bound cannot "
                    "follow per-channel scales")
    return f"{node.op_type} is not scale-equivariant"


def find_pairs(model: ir.Model, report: PassReport) -> list[tuple[ir.Node, ir.Node]]:
    """(Conv1, Conv2) pairs linked directly or through up to MAX_BETWEEN single-reader ops
    that commute with a positive per-channel scale (activations, pooling)."""
    pairs = []
    for conv1 in iter_nodes(model):
        if conv1.op_type != "Conv" or ops.constant_weight(conv1, 1) is None:
            continue
        link, nxt, why = conv1.outputs[0], _single_reader(conv1.outputs[0]), None
        for _ in range(MAX_BETWEEN):
            if nxt is None or nxt.op_type == "Conv":
                break
            why = why or _activation_ok(nxt)
            link = nxt.outputs[0]
            nxt = _single_reader(link)
        if nxt is None or nxt.op_type != "Conv" or nxt.inputs[0] is not link or ops.constant_weight(nxt, 1) is None:
            continue
        why = why or _pair_problem(conv1, nxt)
        if why:
            report.skip(f"{conv1.name} -> {nxt.name}", why)
            continue
        pairs.append((conv1, nxt))
    return pairs


def _pair_problem(conv1: ir.Node, conv2: ir.Node) -> str | None:
    for node in (conv1, conv2):
        tensor = ops.constant_weight(node, 1)
        if tensor.dtype != ir.DataType.FLOAT:
            return f"{node.name}: weight is not float32"
        if len(list(node.inputs[1].uses())) != 1:
            return f"{node.name}: weight shared with another node"
    if len(conv1.inputs) > 2 and conv1.inputs[2] is not None and ops.constant_weight(conv1, 2) is None:
        return f"{conv1.name}: bias is not a constant"
    c = ops.constant_weight(conv1, 1).shape[0]
    w2 = ops.constant_weight(conv2, 1)
    if w2.shape[1] * conv2.attributes.get_int("group", 1) != c:
        return "channel counts do not match"
    return None


def _input_ranges(w2: np.ndarray, groups: int) -> np.ndarray:
    """max |W2| over the weights reading each input channel of Conv2."""
    cout, cg = w2.shape[:2]
    per = np.abs(w2).reshape(groups, cout // groups, cg, -1).max(axis=(1, 3))  # [groups, cg]
    return per.reshape(-1)


def _scale_pair(conv1: ir.Node, conv2: ir.Node, b: GraphBuilder) -> float:
    """Equalize one pair in place; return the largest relative change made."""
    w1 = ops.constant_weight(conv1, 1).numpy().astype(np.float64)
    w2 = ops.constant_weight(conv2, 1).numpy().astype(np.float64)
    groups = conv2.attributes.get_int("group", 1)
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = _input_ranges(w2, groups)
    s = np.ones_like(r1)
    live = (r1 > 0) & (r2 > 0)
    s[live] = np.clip(np.sqrt(r1[live] / r2[live]), *SCALE_BOUNDS)
    change = float(np.max(np.abs(np.log(s)))) if s.size else 0.0
    if change < SETTLED:
        return change
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    set_weight(b, conv1, 1, w1 / s.reshape(shape1), "equalized")
    if len(conv1.inputs) > 2 and conv1.inputs[2] is not None:
        set_weight(b, conv1, 2, ops.constant_weight(conv1, 2).numpy().astype(np.float64) / s, "equalized")
    cout, cg = w2.shape[:2]
    s2 = s.reshape(groups, 1, cg, *([1] * (w2.ndim - 2)))
    w2 = (w2.reshape(groups, cout // groups, cg, *w2.shape[2:]) * s2).reshape(w2.shape)
    set_weight(b, conv2, 1, w2, "equalized")
    return change


def equalize(model: ir.Model) -> PassReport:
    """Cross-layer equalize every eligible Conv pair of ``model`` (see the module docstring)."""
    report = PassReport("equalize")
    pairs = find_pairs(model, report)
    b = GraphBuilder(model)
    touched: set[tuple[str, str]] = set()
    for _ in range(ROUNDS):
        moved = 0.0
        for conv1, conv2 in pairs:
            change = _scale_pair(conv1, conv2, b)
            if change >= SETTLED:
                touched.add((conv1.name, conv2.name))
            moved = max(moved, change)
        if moved < SETTLED:
            break
    report.count("Conv pairs equalized", len(touched))
    return report
