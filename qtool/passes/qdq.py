"""Static int8 QDQ insertion: QuantizeLinear/DequantizeLinear pairs around the selected ops.

The format onnxruntime (and most edge runtimes) pattern-match into integer kernels:
``DQ(x) -> Conv <- DQ(W) ... -> Q -> DQ`` becomes QLinearConv. Decisions, per node of
``select_nodes``:

- activations: per-tensor, ``r = s (q - z)`` from the calibrated range (uint8 asymmetric by
  default: onnxruntime's x86 kernels fuse u8 x s8);
- weights: int8 symmetric, per output channel where the op allows it;
- bias: int32 with ``s_b = s_x * s_w`` and ``z = 0``;
- Relu / Clip right after a quantized op are folded into its output range (z = qmin makes
  Q itself clip), so no QDQ pair sits between Conv and Relu;
- data-movement ops (Reshape, Transpose, MaxPool, Resize...) reuse their input's
  parameters, so onnxruntime can drop the pairs around them instead of requantizing;
- embedding-style Gather of a constant table gathers int8 rows and rescales them;
- a tensor with no calibrated range or a degenerate one stays float, with the reason.

16-bit activations (A16W8, qtool.passes.wide): the activations of the nodes a recipe
raises get uint16/int16 parameters from the same calibrated ranges; weights stay int8.

Nodes inside If/Loop/Scan subgraphs are handled like the main graph's; their activations
are rarely in a calibration table, so they usually get weight-only DQ (still 4x smaller).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.config import Recipe
from qtool.errors import UsageError
from qtool.model import iter_graphs, iter_nodes, require_opset
from qtool.passes import PassReport
from qtool.passes.control_flow import unobservable
from qtool.passes.graph import GraphBuilder, replace_uses
from qtool.passes.select import (
    FOLDABLE_ACTIVATIONS,
    excluded,
    foldable_activation,
    is_float_activation,
    select_nodes,
)
from qtool.passes.wide import qdq_domain, wide_activations
from qtool.quant.scales import (
    DegenerateRange,
    QParams,
    activation_dtype,
    activation_params,
    bias_params,
    quantize,
    weight_params,
)
from qtool.targets import placement as target_rules
from qtool.targets import placement_for, propagate
from qtool.targets.presets import FLOAT_OUTPUT_OPS

Ranges = Mapping[str, tuple[float, float]]

_DTYPES = {
    "uint8": ir.DataType.UINT8,
    "int8": ir.DataType.INT8,
    "uint16": ir.DataType.UINT16,
    "int16": ir.DataType.INT16,
    "int32": ir.DataType.INT32,
}
# A Gather table smaller than this is not worth an int8 copy.
MIN_GATHER_ELEMENTS = 4096


def dequantize_node(b: GraphBuilder, q_value: ir.Value, p: QParams, base: str,
                    shape: ir.Shape | None = None) -> ir.Node:
    scale, zp = b.qparams(p, base)
    attrs = {"axis": p.axis} if p.axis is not None else None
    return b.node("DequantizeLinear", [q_value, scale, zp], base, attributes=attrs,
                  dtype=ir.DataType.FLOAT, shape=shape, domain=qdq_domain(b.model, p.dtype))


def _first_node(graph: ir.Graph) -> ir.Node | None:
    return next(iter(graph), None)


def insert_qdq(b: GraphBuilder, value: ir.Value, p: QParams) -> ir.Node:
    """Route every use of ``value`` through Q -> DQ with ``p``; returns the DQ node.

    A graph output keeps its name: it moves to the DQ output and ``value`` is renamed.
    """
    base = value.name or "t"
    scale, zp = b.qparams(p, base)
    domain = qdq_domain(b.model, p.dtype)
    q = b.node("QuantizeLinear", [value, scale, zp], base, dtype=_DTYPES[p.dtype], shape=value.shape,
               domain=domain)
    dq = b.node("DequantizeLinear", [q.outputs[0], scale, zp], base, dtype=value.dtype,
                shape=value.shape, domain=domain)
    producer = value.producer()
    graph = producer.graph if producer is not None else value.graph
    if graph is None:  # a graph input: its owner is the graph listing it
        graph = next(g for g in iter_graphs(b.model.graph) if value in g.inputs)
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    else:
        first = _first_node(graph)
        if first is None:
            graph.extend([q, dq])
        else:
            graph.insert_before(first, [q, dq])
    replace_uses(value, dq.outputs[0], b.names, suffix="_float")
    q.replace_input_with(0, value)  # the Q itself keeps reading the float value
    return dq


def weight_axis(node: ir.Node, weight: np.ndarray, per_channel: bool) -> int | None:
    """The per-channel axis of a node's weight (output channels), or None for per-tensor."""
    if not per_channel or weight.ndim < 2:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        group = node.attributes.get_int("group", 1)
        return 1 if group == 1 else None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return weight.ndim - 1
    return None


class _StaticPlan:
    """Per-model state of one QDQ conversion: parameters chosen for each tensor."""

    def __init__(self, model: ir.Model, recipe: Recipe, ranges: Ranges, report: PassReport,
                 wide: set[ir.Value], selected: set[ir.Node]):
        q = recipe.quantize
        self.model, self.recipe, self.ranges, self.report = model, recipe, ranges, report
        self.act_type = q.activation_type
        self.wide = wide  # activations that get 16 bits (wide_activations)
        self.symmetric = q.symmetric_activations
        self.per_channel = q.per_channel
        self.b = GraphBuilder(model)
        self.params: dict[ir.Value, QParams] = {}
        self.bad: dict[str, str] = {}  # tensor name -> why it stays float
        self.weight_cache: dict[tuple, tuple[ir.Value, QParams]] = {}
        self.folds: list[tuple[ir.Node, ir.Node]] = []  # (producer, Relu/Clip)
        self.placement = placement_for(recipe)  # the --target's Q/DQ placement
        self.selected = selected  # the nodes being quantized

    # -- activations --------------------------------------------------------------------
    def range_of(self, value: ir.Value) -> tuple[float, float] | None:
        rng = self.ranges.get(value.name)
        if rng is None:
            self.bad.setdefault(value.name, unobservable(value, self.model.graph) or "no calibrated range")
        return rng

    def dtype_of(self, *values: ir.Value) -> str:
        """The activation type of a tensor: 16-bit when any of ``values`` is in the wide set."""
        bits = 16 if any(v in self.wide for v in values) else 8
        return activation_dtype(self.act_type, bits)

    def params_from(self, value: ir.Value, lo: float, hi: float) -> QParams | None:
        try:
            return target_rules.activation_qparams(self.placement, lo, hi, self.dtype_of(value), self.symmetric)
        except DegenerateRange as exc:
            self.bad[value.name] = exc.reason
            return None

    def activation(self, value: ir.Value) -> QParams | None:
        if value in self.params:
            return self.params[value]
        if value.name in self.bad:
            return None
        rng = self.range_of(value)
        if rng is None:
            return None
        p = self.params_from(value, *rng)
        if p is not None:
            self.params[value] = p
        return p

    def output(self, node: ir.Node) -> None:
        """Choose the output parameters, folding a following Relu/Clip when Q can clip."""
        out = node.outputs[0]
        if out in self.params or out.name in self.bad or not self.placement.outputs:
            return
        if out.is_graph_output() and node.op_type in FLOAT_OUTPUT_OPS:
            return  # fused with a float output (QGemm / MatMulIntegerToFloat): no rounding, any target
        if node.op_type in self.placement.float_output_ops and not self._read_quantized(out):
            return  # the same fusion; only float ops read it (MatMul-only placement, a residual Add)
        act = foldable_activation(out, self.recipe.quantize.exclude)
        rng = self.ranges.get(out.name)
        if rng is None and act is not None:
            rng = self.ranges.get(act.outputs[0].name)  # the fold only needs the ReLU's range
        if rng is None:
            self.bad.setdefault(out.name, unobservable(out, self.model.graph) or "no calibrated range")
            return
        if node.op_type == "Softmax":
            rng = (0.0, 1.0)
        if act is not None:
            folded = self._folded_params(out, act, rng)
            if folded is not None:
                self.params[out] = folded
                self.params[act.outputs[0]] = folded
                self.folds.append((node, act))
                return
        p = self.params_from(out, *rng)
        if p is not None:
            self.params[out] = p

    def _read_quantized(self, value: ir.Value) -> bool:
        """Whether a node being quantized reads ``value`` as an activation, directly or
        through data-movement ops (which keep its parameters) or a Relu/Clip its Q can fold."""
        for use in value.uses():
            reader = use.node
            if reader.op_type in FOLDABLE_ACTIVATIONS and reader.domain in ("", "ai.onnx"):
                if self._read_quantized(reader.outputs[0]):
                    return True
                continue
            rule = ops.rule_for(reader)
            if reader not in self.selected or rule is None:
                continue
            if rule.share_scale:
                if use.idx == 0 and self._read_quantized(reader.outputs[0]):
                    return True
            elif use.idx in ops.activation_inputs(reader):
                return True
        return False

    def _folded_params(self, out: ir.Value, act: ir.Node, rng: tuple[float, float]) -> QParams | None:
        lo_c, hi_c = ops.clip_bounds(act)
        if lo_c is None:
            return None
        act_rng = self.ranges.get(act.outputs[0].name)
        lo, hi = act_rng if act_rng is not None else rng
        lo, hi = float(np.clip(lo, lo_c, hi_c)), float(np.clip(hi, lo_c, hi_c))
        try:
            p = activation_params(lo, hi, self.dtype_of(out, act.outputs[0]), self.symmetric)
        except DegenerateRange:
            return None
        from qtool.quant.scales import int_range

        qmin, qmax = int_range(p.dtype)
        s, z = float(p.scale), int(p.zero_point)
        lowest, highest = s * (qmin - z), s * (qmax - z)
        # Q saturates to [lowest, highest]; that is the activation's clip only if it lies
        # inside [lo_c, hi_c] (exactly at 0 for ReLU, within half a step otherwise).
        slack = 0.0 if lo_c == 0.0 else 0.5 * s
        if lowest < lo_c - slack or highest > hi_c + 0.5 * s:
            return None
        return p

    # -- weights --------------------------------------------------------------------------
    def weight(self, node: ir.Node, index: int, axis_for: Callable | None = None) -> QParams | None:
        tensor = ops.constant_weight(node, index)
        value = node.inputs[index]
        w = tensor.numpy()
        if w.dtype != np.float32:
            return None
        per_channel = self.per_channel and target_rules.weight_axis_allowed(self.placement, node)
        axis = (axis_for or weight_axis)(node, w, per_channel)
        key = (id(value), axis, id(node.graph))
        if key not in self.weight_cache:
            try:
                p = weight_params(w, axis, self.recipe.quantize.weight_type, symmetric=True)
                p = target_rules.reduce_weight_range(self.placement, p)
            except DegenerateRange as exc:
                self.report.notes.append(f"{node.name}: weight {value.name} kept float ({exc.reason})")
                return None
            wq = self.b.initializer(quantize(w, p), f"{value.name}_quantized")
            dq = dequantize_node(self.b, wq, p, value.name, shape=value.shape)
            node.graph.insert_before(node, dq)
            self.weight_cache[key] = (dq.outputs[0], p)
        dq_value, p = self.weight_cache[key]
        node.replace_input_with(index, dq_value)
        return p

    def constant_operand(self, node: ir.Node, index: int) -> bool:
        """A constant float operand of Add/Mul/Concat: per-tensor, activation-typed."""
        tensor = ops.constant_weight(node, index)
        if tensor is None or tensor.dtype != ir.DataType.FLOAT:
            return False
        w = tensor.numpy()
        dtype = self.dtype_of(*(v for v in (*node.inputs, *node.outputs) if v is not None))
        try:
            p = activation_params(float(w.min()), float(w.max()), dtype, self.symmetric)
        except DegenerateRange:
            return False
        value = node.inputs[index]
        wq = self.b.initializer(quantize(w, p), f"{value.name}_quantized")
        dq = dequantize_node(self.b, wq, p, value.name, shape=value.shape)
        node.graph.insert_before(node, dq)
        node.replace_input_with(index, dq.outputs[0])
        return True

    def bias(self, node: ir.Node, index: int, x: QParams, w: QParams) -> bool:
        tensor = ops.constant_weight(node, index)
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 1:
            return False
        if x.per_channel or not self.placement.int32_bias:
            return False
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            return False
        b = tensor.numpy()
        n = b.shape[0]
        if w.per_channel and w.scale.shape[0] != n:
            return False
        p = bias_params(x.scale, w.scale, axis=0)  # per-tensor weights: a scalar bias scale
        if not np.all(p.scale > 0):
            return False
        q = np.rint(b.astype(np.float64) / p.scale.astype(np.float64))
        if np.abs(q).max(initial=0) > 2**31 - 1:
            self.report.notes.append(f"{node.name}: bias overflows int32 at scale s_x*s_w; kept float")
            return False
        value = node.inputs[index]
        bq = self.b.initializer(q.astype(np.int32), f"{value.name}_quantized")
        dq = dequantize_node(self.b, bq, p, value.name, shape=value.shape)
        node.graph.insert_before(node, dq)
        node.replace_input_with(index, dq.outputs[0])
        return True


def _fold(b: GraphBuilder, producer: ir.Node, act: ir.Node) -> None:
    """Remove ``act``: its uses read the producer's output (whose Q now does the clipping)."""
    b.replace_uses(act.outputs[0], producer.outputs[0])
    act.graph.remove(act, safe=True)


def _check_opset(model: ir.Model, recipe: Recipe) -> None:
    q = recipe.quantize
    need, why = (13, "per-channel QDQ") if q.per_channel else (10, "QDQ quantization")
    try:
        require_opset(model, need, why, q.allow_opset_upgrade)
    except UsageError as exc:
        hint = exc.hint
        if q.per_channel:
            hint = "pass --allow-opset-upgrade, or --per-tensor to stay at the model's opset"
        raise UsageError(exc.message, hint) from None


def quantize_static(
    model: ir.Model,
    recipe: Recipe,
    ranges: Ranges,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> PassReport:
    """Insert QDQ pairs for static int8 in place; ``ranges``: tensor name -> (min, max).

    Counts are per op type of the quantized nodes (``Conv``, ``Relu folded``...); skipped
    holds node name -> why it stays float.
    """
    report = PassReport("qdq")
    recipe = target_rules.fit_opset(placement_for(recipe), recipe, model)
    _check_opset(model, recipe)
    selection = select_nodes(model, recipe, "int8-static")
    for name, reason in selection.skipped.items():
        report.skip(name, reason)
    plan = _StaticPlan(model, recipe, ranges, report, wide_activations(selection.quantized, recipe),
                       selected=set(selection.quantized))
    if plan.wide:
        report.count("16-bit activations", len(plan.wide))
    total = len(selection.quantized)
    for done, node in enumerate(selection.quantized, 1):
        _plan_node(plan, node)
        if on_progress is not None:
            on_progress(done, total)
    if plan.placement.propagate:  # OpenVINO: one Q per int8 region (qtool.targets.propagate)
        plan.params = propagate(model, plan.params, plan.ranges, plan.params_from, is_float_activation, plan.wide)
    quantize_gathers(model, recipe, plan.b, report)
    for producer, act in plan.folds:
        _fold(plan.b, producer, act)
        report.count(f"{act.op_type} folded")
    folded_away = {act.outputs[0] for _, act in plan.folds}
    for value, p in list(plan.params.items()):
        if value in folded_away or not list(value.uses()) and not value.is_graph_output():
            continue
        insert_qdq(plan.b, value, p)
    report.count("QDQ pairs", len(plan.params) - len(folded_away))
    return report


def _plan_node(plan: _StaticPlan, node: ir.Node) -> None:
    rule = ops.rule_for(node)
    name = node.name or node.op_type
    if rule.share_scale:
        if node.op_type == "Pad" and not ops.pads_with_zero(node):
            plan.report.skip(name, "Pad that is not constant-mode with value 0")
            return
        src = node.inputs[0]
        p = plan.params.get(src)
        if p is None:
            plan.report.skip(name, "data-movement op whose input is not quantized")
            return
        plan.params.setdefault(node.outputs[0], p)
        plan.report.count(node.op_type)
        return
    not_here = target_rules.admits(plan.placement, node, is_float_activation)
    if not_here is not None:
        plan.report.skip(name, not_here)
        return
    act_ok, why = 0, []
    x_params: QParams | None = None
    for i in ops.activation_inputs(node):
        value = node.inputs[i]
        if is_float_activation(value):
            p = plan.activation(value)
            if p is None:
                why.append(f"{value.name}: {plan.bad.get(value.name, 'no range')}")
            else:
                act_ok += 1
                if i == 0:
                    x_params = p
        elif i not in rule.weights and node.op_type in ("Add", "Mul", "Concat"):
            act_ok += plan.constant_operand(node, i)
    w_params = None
    for i in rule.weights:
        if ops.constant_weight(node, i) is not None:
            w_params = plan.weight(node, i) or w_params
    if act_ok == 0 and w_params is None:
        plan.report.skip(name, "; ".join(why) or "nothing to quantize")
        return
    if act_ok == 0:
        plan.report.count(f"{node.op_type} (weights only)")
        plan.report.notes.append(f"{name}: weights only ({'; '.join(why)})")
        return
    if rule.bias is not None and x_params is not None and w_params is not None:
        plan.bias(node, rule.bias, x_params, w_params)
    plan.output(node)
    if node.outputs[0] not in plan.params and node.outputs[0].name in plan.bad:
        plan.report.notes.append(
            f"{name}: output {node.outputs[0].name} stays float ({plan.bad[node.outputs[0].name]})"
        )
    plan.report.count(node.op_type)


def quantize_gathers(
    model: ir.Model, recipe: Recipe, b: GraphBuilder, report: PassReport
) -> int:
    """Embedding lookups: Gather(int8 table) * Gather(row scales); 4x smaller tables.

    ``y = Cast(Gather(Wq, i)) * Gather(s, i)`` with ``s_v = max|W_v| / 127`` per row (axis 0,
    2-D tables), so only the gathered rows are ever rescaled.
    """
    q = recipe.quantize
    if q.op_types and "Gather" not in q.op_types:
        return 0
    done = 0
    for node in list(iter_nodes(model)):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        if excluded(node, q.exclude) or recipe.bits_for(node.name or "", "Gather", q.bits) >= 16:
            report.skip(node.name or "Gather", "excluded by --exclude / recipe")
            continue
        tensor = ops.constant_weight(node, 0)
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            continue
        if node.attributes.get_int("axis", 0) != 0 or tensor.size < MIN_GATHER_ELEMENTS:
            continue
        if ops.constant_weight(node, 1) is not None:
            continue  # constant indices: constant folding's job
        w = tensor.numpy()
        try:
            p = weight_params(w, 0, "int8", symmetric=True)
        except DegenerateRange as exc:
            report.skip(node.name or "Gather", exc.reason)
            continue
        table = node.inputs[0]
        wq = b.initializer(quantize(w, p), f"{table.name}_quantized")
        scales = b.initializer(p.scale.reshape(-1, 1), f"{table.name}_row_scale")
        base = node.name or "gather"
        rows = b.node("Gather", [wq, node.inputs[1]], base, dtype=ir.DataType.INT8)
        cast = b.node("Cast", [rows.outputs[0]], base, attributes={"to": ir.DataType.FLOAT},
                      dtype=ir.DataType.FLOAT)
        row_scale = b.node("Gather", [scales, node.inputs[1]], base + "_scale",
                           dtype=ir.DataType.FLOAT)
        mul = b.node("Mul", [cast.outputs[0], row_scale.outputs[0]], base,
                     dtype=ir.DataType.FLOAT, shape=node.outputs[0].shape)
        node.graph.insert_before(node, [rows, cast, row_scale, mul])
        b.replace_uses(node.outputs[0], mul.outputs[0])
        node.graph.remove(node, safe=True)
        report.count("Gather")
        done += 1
    return done

