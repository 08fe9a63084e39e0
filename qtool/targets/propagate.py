"""Quantizer propagation for the OpenVINO target: one Q/DQ pair per int8 region, as high up
as the data allows, so OpenVINO's CPU plugin runs data movement in int8 and fuses the Q
into the op that produced the tensor.

The static QDQ pass first asks for a Q/DQ pair on every activation input of an op the
target runs in int8 (Conv, MatMul, Add...). A pair that sits right after a Transpose, a
Slice or a Concat is a FakeQuantize OpenVINO executes in f32 on its own, after an f32
Transpose/Slice/Concat, with the producer before it writing f32 too (seen in the compiled
model's runtime info, ``get_runtime_model()``: ``runtimePrecision`` f32 on those layers).
NNCF, the quantizer OpenVINO's authors ship, avoids this with quantizer propagation:

* quantizers move up through "quantization-agnostic" ops (Reshape, Transpose, Squeeze,
  Unsqueeze, Flatten, Split, Slice, Gather, MaxPool, Pad, nearest Resize, ...), which
  OpenVINO runs on int8 data as they are (NNCF's CPU hardware config,
  nncf/common/hardware/setups/cpu.py, lists them as ops without a quantization space;
  nncf/common/quantization/quantizer_propagation/solver.py moves quantizers up through them);
* quantizers of a Concat's output move up to all of its inputs with one shared scale
  ("unified scales": cpu.py sets ``attributes={SCALES: UNIFIED}`` on CONCAT), so the Concat
  itself runs in int8;
* a quantizer stops at a branching point when a branch does not need it: NNCF merges
  branch quantizers only when every branch is quantized (solver.py, "merge" of
  quantizers at a branching node), so a float consumer never sees quantization noise it
  did not see before.

qtool's version, on the pass's own plan (value -> parameters): a value asked for is
replaced by the input of its producer when the producer is agnostic and every other use
of that input is already quantized, shape-only, or another agnostic op whose outputs are
asked for. Values moved into one place form a group with one scale from the union of
their calibrated ranges: for the agnostic ops this union covers every element any int8
consumer reads (Transpose/Reshape keep the values, Slice/Split/Gather pick some, MaxPool
commutes with a monotone Q), so no new calibration is needed. This is our own code after
NNCF's rules, not NNCF's implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qtool.quant.scales import QParams

# Ops whose output elements are input elements (moved, picked, or the max of some):
# a Q before them equals a Q after them on every element a consumer reads.
AGNOSTIC = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity",
                      "Slice", "Split", "Gather", "MaxPool", "DepthToSpace", "SpaceToDepth",
                      "Tile", "Expand", "Pad", "Resize"})
# Uses that read only a tensor's shape: quantizing the tensor does not change them.
SHAPE_ONLY = frozenset({"Shape", "Size"})

MakeParams = Callable[[ir.Value, float, float], "QParams | None"]
IsActivation = Callable[["ir.Value | None"], bool]


def agnostic(node: ir.Node | None) -> bool:
    """Whether a Q on ``node``'s data input can replace Qs on its outputs (see AGNOSTIC)."""
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in AGNOSTIC:
        return False
    if not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and list(node.outputs[1].uses()):
        return False  # the indices output reads positions, not values
    if node.op_type == "Resize":
        # nearest picks input elements; linear/cubic interpolate between them (their own op)
        return node.attributes.get_string("mode", "nearest") == "nearest"
    if node.op_type == "Pad":
        return _pads_zero(node)
    return True


def _pads_zero(node: ir.Node) -> bool:
    """Constant-mode Pad with fill 0 (0 is exact in a symmetric grid), given as no value."""
    if node.attributes.get_string("mode", "constant") != "constant":
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return False  # a given fill value: leave the Q after the Pad
    return node.attributes.get_float("value", 0.0) == 0.0


def _is_concat(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Concat" and node.domain in ("", "ai.onnx")


class _Groups:
    """Union-find over values: one group shares one scale (union of members' ranges)."""

    def __init__(self) -> None:
        self.parent: dict[ir.Value, ir.Value] = {}
        self.range: dict[ir.Value, tuple[float, float]] = {}

    def find(self, v: ir.Value) -> ir.Value:
        self.parent.setdefault(v, v)
        while self.parent[v] is not v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def add(self, v: ir.Value, rng: tuple[float, float] | None) -> None:
        root = self.find(v)
        if rng is not None:
            lo, hi = self.range.get(root, rng)
            self.range[root] = (min(lo, rng[0]), max(hi, rng[1]))

    def union(self, a: ir.Value, b: ir.Value) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        self.parent[rb] = ra
        if rb in self.range:
            self.add(ra, self.range.pop(rb))


def _uses_covered(u: ir.Value, via: ir.Node, asked: dict[ir.Value, None],
                  after: set[ir.Value]) -> bool:
    """Every use of ``u`` other than ``via`` reads a quantized ``u`` already, only its shape,
    or is another agnostic op whose outputs are all asked for once this move is done
    (``after``; that op moves up too: SPP's MaxPools beside their Concat)."""
    if u in asked:
        return True  # all of u's uses read its DQ already
    if u.is_graph_output():
        return False
    for use in u.uses():
        node = use.node
        if node is via or node.op_type in SHAPE_ONLY:
            continue
        if use.idx == 0 and agnostic(node) and _outputs_asked(node, after):
            continue
        return False
    return True


def _outputs_asked(node: ir.Node, asked) -> bool:  # noqa: ANN001 - a set or dict of values
    """Each output of ``node`` is asked for, or only its shape is read (or it is unused)."""
    for out in node.outputs:
        if out in asked:
            continue
        if out.is_graph_output() or any(u.node.op_type not in SHAPE_ONLY for u in out.uses()):
            return False
    return True


def positive_scaling(node: ir.Node, is_activation: IsActivation) -> float | None:
    """``c`` when ``node`` is ``x * c`` or ``x / (1/c)`` with a positive scalar constant:
    Q(x * c; s) = Q(x; s / c), so x can be quantized before it (the 1/sqrt(d) scaling of
    attention queries). None otherwise."""
    from qtool import ops

    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    indices = (1,) if node.op_type == "Div" else (1, 0)
    for i in indices:
        const = ops.constant_weight(node, i)
        if const is None or not is_activation(node.inputs[1 - i]):
            continue
        array = const.numpy()
        if array.size != 1:
            return None
        c = float(array.reshape(-1)[0])
        if not (c > 0 and np.isfinite(c)):
            return None
        return c if node.op_type == "Mul" else 1.0 / c
    return None


@dataclass
class _Moves:
    """One propagation: the values asked for (an ordered set), their scale groups, the
    values not to move (16-bit) and the pass's float-activation test."""

    asked: dict[ir.Value, None]
    groups: _Groups
    keep: set[ir.Value]
    is_activation: IsActivation


def _scaled_input(v: ir.Value, m: _Moves) -> bool:
    """NNCF quantizes the activation input of Multiply as well as its output (cpu.py gives
    MULTIPLY an activation space): ask for ``x`` of ``v = x * c`` (c > 0) with v's range
    divided by c, so the Q on x can move up on its own while v keeps its Q."""
    node = v.producer()
    c = positive_scaling(node, m.is_activation) if node is not None else None
    if c is None:
        return False
    x = next(i for i in node.inputs if m.is_activation(i))
    rng = m.groups.range.get(m.groups.find(v))
    if x in m.groups.parent or x in m.keep or rng is None:
        return False
    if not _uses_covered(x, node, m.asked, set(m.asked) | {x}):
        return False
    if not (agnostic(x.producer()) or _is_concat(x.producer())):
        return False  # x's Q would stay right there: one more requantization, no gain
    m.asked[x] = None
    m.groups.add(x, (rng[0] / c, rng[1] / c))
    return True


def _step(v: ir.Value, m: _Moves) -> bool:
    """Move the quantizer of ``v`` up one op when the rules allow it; True if it moved."""
    node = v.producer()
    if node is None:
        return False
    if positive_scaling(node, m.is_activation) is not None:
        return _scaled_input(v, m)
    if _is_concat(node):
        sources = list(node.inputs)
    elif agnostic(node):
        sources = [node.inputs[0]]
    else:
        return False
    if not all(m.is_activation(s) and s not in m.keep for s in sources):
        return False  # a constant or 16-bit input: the Concat/op stays where it is
    if not _outputs_asked(node, m.asked):
        return False
    after = (set(m.asked) - set(node.outputs)) | set(sources)
    if not all(_uses_covered(s, node, m.asked, after) for s in sources):
        return False
    for out in node.outputs:
        if out in m.asked:
            m.groups.union(out, sources[0])
            del m.asked[out]
    for s in sources:
        m.groups.union(sources[0], s)
        m.asked[s] = None
    return True


def int8_reads(model: ir.Model, params: dict[ir.Value, QParams], ranges: dict[str, tuple[float, float]],
               make: MakeParams, is_activation: IsActivation) -> dict[ir.Value, QParams]:
    """``params`` plus the inputs of ops OpenVINO runs on int8 data that qtool's op table has
    no rule for: ReduceMean (NNCF's CPU config gives REDUCE_MEAN and MVN an activation
    space; a LayerNorm ``x - mean(x)`` whose x is quantized becomes an int8 MVN, else f32).
    Only where x has a calibrated range (it is the output of a quantized op)."""
    from qtool.model import iter_nodes

    out = dict(params)
    for node in iter_nodes(model):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        x = node.inputs[0]
        if x in out or not is_activation(x) or x.name not in ranges:
            continue
        p = make(x, *ranges[x.name])
        if p is not None:
            out[x] = p
    return out


def propagate(model: ir.Model, params: dict[ir.Value, QParams], ranges: dict[str, tuple[float, float]],
              make: MakeParams, is_activation: IsActivation,
              keep: Iterable[ir.Value] = ()) -> dict[ir.Value, QParams]:
    """The plan's activation parameters with quantizers moved up (see the module doc).

    ``params``: value -> parameters the pass chose for the inputs of int8 ops (int8_reads
    adds the ReduceMean inputs); ``ranges``:
    calibrated (lo, hi) by tensor name; ``make(value, lo, hi)``: parameters for a range
    (None: that group stays where it was); ``is_activation``: the pass's float-activation
    test (qtool.passes.select); ``keep``: values not to move or merge (16-bit
    activations). Values that did not move keep their parameters unchanged.
    """
    params = int8_reads(model, params, ranges, make, is_activation)
    # an ordered set: the output keeps the plan's order
    m = _Moves(dict.fromkeys(params), _Groups(), set(keep), is_activation)
    groups, asked = m.groups, m.asked
    for v in params:
        groups.add(v, ranges.get(v.name))
    moved = True
    while moved:
        moved = False
        for v in list(asked):
            if v in asked and v not in m.keep and _step(v, m):
                moved = True
    members: dict[ir.Value, int] = {}
    for v in groups.parent:
        root = groups.find(v)
        members[root] = members.get(root, 0) + 1
    out: dict[ir.Value, QParams] = {}
    for v in asked:
        root = groups.find(v)
        if v in params and members.get(root, 1) == 1:
            out[v] = params[v]  # never moved nor merged: the pass's own parameters
            continue
        rng = groups.range.get(root)
        p = make(v, *rng) if rng is not None else None
        if p is not None:
            out[v] = p
    return out
