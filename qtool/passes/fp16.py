"""Half-precision conversion: float32 weights and compute -> float16.

``convert_fp16(model, config)`` works **in place** on an onnx-ir model and returns a
PassReport. Each node is put in one of three modes:

- *half*: its float32 inputs and outputs become float16 (the op's ONNX schema must allow
  float16 for them; inputs typed ``tensor(float)`` by the schema, such as Resize's scales,
  stay float32);
- *float*: kept in float32 -- ops in ``config.op_block_list`` (op type or node-name glob),
  If/Loop/Scan at their boundary (their subgraphs are converted inside), ops of other
  domains, ops whose output type is unknown, ops with a constant input outside the float16
  range (|w| > 65504), and, with ``target="cpu"``, ops onnxruntime's CPU EP has no float16
  kernel for (see ORT_CPU_FP16_OPS). The reason is in ``report.skipped``;
- *neutral*: no float32 tensor in or out (Shape of an int tensor, ...): untouched.

Then every edge whose producer and consumer disagree gets a Cast on the consumer's side
(one per value, target type and graph), or, for constants, a converted copy of the
constant. Graph inputs and outputs keep float32 when ``config.keep_io_types`` (subgraph
inputs and outputs always keep their type, so If/Loop/Scan signatures never change).
Cast pairs float16 -> float32 -> float16 are removed (they are exact round trips).

Constants: float32 -> float16 rounds to nearest even (numpy's astype); values below
2**-24 become 0; counts per kind are in ``report.counts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from qtool.config import Fp16Config
from qtool.model import iter_graphs
from qtool.passes import PassReport
from qtool.passes.graph import Names, add_initializer, constant_of, remove_unused, replace_uses
from qtool.passes.preprocess.shapes import infer_shapes_tolerant
from qtool.passes.select import excluded

FLOAT = ir.DataType.FLOAT
HALF = ir.DataType.FLOAT16
FP16_MAX = 65504.0

# Ops for which onnxruntime 1.32's CPU EP registers a float16 kernel, measured by building
# one-node float16 models (opset 17) and checking that the session inserts no Cast
# (tests/test_fp16.py::test_ort_cpu_fp16_kernel_table re-measures a sample). Conv, MatMul,
# Gemm, Add, Mul, Relu, Softmax, pooling and most element-wise ops are NOT in it: on x86
# CPUs onnxruntime computes them in float32 behind Casts it inserts itself.
ORT_CPU_FP16_OPS = frozenset(
    {
        "LayerNormalization", "Reshape", "Transpose", "Concat", "Flatten", "Gather", "Slice",
        "Clip", "Max", "Min", "Split", "Unsqueeze", "Squeeze", "Identity", "Expand", "Cast",
        "Shape", "Size",
    }
)  # fmt: skip
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_TYPE_FROM_ATTRIBUTE = frozenset(
    {"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
     "Multinomial", "Bernoulli", "ConstantOfShape", "Constant"}
)  # fmt: skip

Target = Literal["cpu", "any"]


@dataclass
class _Plan:
    half: dict[ir.Node, tuple[set[int], set[int]]] = field(default_factory=dict)  # ins, outs
    store_half_weights: set[ir.Node] = field(default_factory=set)


def convert_fp16(model: ir.Model, config: Fp16Config, *, target: Target = "cpu") -> PassReport:
    """Convert ``model`` to float16 in place; return counts and the nodes kept in float32.

    ``target="cpu"`` (default) keeps ops without an onnxruntime CPU float16 kernel in
    float32 and runs data-movement ops in float16 only when their input already is, so a
    CPU session does not bounce between types; those float32 ops still get their weights
    stored as float16 plus one Cast each (onnxruntime folds the Cast when it loads the
    model: half the file size, float32 compute). ``target="any"`` converts every op whose
    schema allows float16 (for GPU EPs; onnxruntime's CPU EP still runs it, casting around
    each op it lacks a float16 kernel for).
    """
    report = PassReport("fp16")
    if target not in ("cpu", "any"):
        raise ValueError(f"target must be 'cpu' or 'any', not {target!r}")
    graphs = list(iter_graphs(model.graph))
    if any(v.dtype is None for g in graphs for n in g for v in n.outputs):
        infer_shapes_tolerant(model, report)
        report.counts.pop("shapes_inferred", None)
    orig = _original_dtypes(graphs)
    names = Names(model)
    plan = _decide(model, graphs, orig, config, target, report)

    # Retype what half nodes produce, and the main graph's inputs unless they are kept.
    for node, (_, half_outs) in plan.half.items():
        for i in half_outs:
            node.outputs[i].dtype = HALF
        if node.op_type == "Cast" and half_outs:
            node.attributes["to"] = ir.AttrInt64("to", HALF.value)
    if not config.keep_io_types:
        for value in model.graph.inputs:
            if orig.get(value) == FLOAT and not value.is_initializer():
                value.dtype = HALF
                report.count("inputs_float16")

    _fix_edges(graphs, orig, plan, names, report)
    _fix_outputs(model, graphs, orig, config, names, report)
    removed = _remove_cast_pairs(graphs)
    if removed:
        report.count("cast_pairs_removed", removed)
    remove_unused(model)
    _remove_dead_casts(graphs)
    report.count("nodes_float16", len(plan.half))
    return report


def _original_dtypes(graphs: list[ir.Graph]) -> dict[ir.Value, ir.DataType | None]:
    orig: dict[ir.Value, ir.DataType | None] = {}
    for graph in graphs:
        for value in [*graph.inputs, *graph.initializers.values()]:
            orig[value] = value.dtype
        for node in graph:
            for value in node.outputs:
                orig[value] = value.dtype
    return orig


# --------------------------------------------------------------------------- decisions


def _schema(node: ir.Node, opsets: dict[str, int]) -> onnx.defs.OpSchema | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    try:
        return onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        return None


def _half_slots(params, n: int, allowed: dict[str, set[str]]) -> list[bool | None]:
    """Per slot: True if it may be float16, False if its type is fixed to float32 by the
    schema, None if float16 is impossible for a type variable."""
    out: list[bool | None] = []
    for i in range(n):
        if not params:
            out.append(None)
            continue
        formal = params[min(i, len(params) - 1)]
        type_str = formal.type_str
        if type_str in allowed:
            out.append(True if "tensor(float16)" in allowed[type_str] else None)
        else:
            out.append(False)
    return out


def _decide(
    model: ir.Model,
    graphs: list[ir.Graph],
    orig: dict,
    config: Fp16Config,
    target: Target,
    report: PassReport,
) -> _Plan:
    plan = _Plan()
    fp16_graph_inputs = set() if config.keep_io_types else set(model.graph.inputs)
    no_cpu_kernel: dict[str, int] = {}
    for graph in graphs:
        for node in graph:
            name = node.name or node.op_type
            float_ins = [
                i for i, v in enumerate(node.inputs) if v is not None and orig.get(v) == FLOAT
            ]
            float_outs = [i for i, v in enumerate(node.outputs) if orig.get(v) == FLOAT]
            if not float_ins and not float_outs:
                if any(v.dtype is None for v in node.outputs) and node.op_type not in _CONTROL_FLOW:
                    pass  # unknown output type: leave it, nothing we touch feeds it
                continue
            reason = _float_reason(node, config, float_ins, orig)
            slots = None
            if reason is None:
                schema = _schema(node, model.opset_imports)
                if schema is None:
                    reason = "no ONNX schema for this op"
                else:
                    allowed = {
                        c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints
                    }
                    ins = _half_slots(schema.inputs, len(node.inputs), allowed)
                    outs = _half_slots(schema.outputs, len(node.outputs), allowed)
                    if any(ins[i] is None for i in float_ins) or any(
                        outs[i] is None for i in float_outs
                    ):
                        reason = "the op has no float16 version"
                    else:
                        slots = (
                            {i for i in float_ins if ins[i]},
                            {i for i in float_outs if outs[i]},
                        )
            if reason is None and target == "cpu":
                if node.op_type not in ORT_CPU_FP16_OPS:
                    reason = "no float16 kernel on onnxruntime's CPU EP"
                    no_cpu_kernel[node.op_type] = no_cpu_kernel.get(node.op_type, 0) + 1
                    plan.store_half_weights.add(node)
                elif not any(
                    node.inputs[i] in fp16_graph_inputs
                    or (
                        node.inputs[i].producer() is not None
                        and node.inputs[i].producer() in plan.half
                    )
                    for i in slots[0]
                ):
                    reason = "data movement on float32 data (stays float32 on CPU)"
                    plan.store_half_weights.add(node)  # e.g. a Gather on an embedding table
            if reason is None and slots is not None and (slots[0] or slots[1]):
                plan.half[node] = slots
            else:
                report.skip(name, reason or "no float32 tensor the op can take in float16")
                if reason is not None and reason.startswith("a constant input"):
                    report.count("kept_float_out_of_range")
    if no_cpu_kernel:
        listed = ", ".join(f"{op} x{n}" for op, n in sorted(no_cpu_kernel.items()))
        report.notes.append(
            f"kept in float32 (no float16 kernel on onnxruntime's CPU EP; weights stored "
            f"float16): {listed}; use target='any' for GPU execution providers"
        )
    return plan


def _float_reason(
    node: ir.Node, config: Fp16Config, float_ins: list[int], orig: dict
) -> str | None:
    if excluded(node, tuple(config.op_block_list)):
        return "in op_block_list"
    if node.op_type in _CONTROL_FLOW:
        return "control flow: converted inside, float32 at its boundary"
    if node.domain not in ("", "ai.onnx"):
        return f"op of domain {node.domain!r}"
    if node.op_type in _TYPE_FROM_ATTRIBUTE:
        return "output type set by an attribute"
    for value in [*node.inputs, *node.outputs]:
        if (
            value is not None
            and value.type is not None
            and not isinstance(value.type, ir.TensorType)
        ):
            return "sequence/optional values"
    if any(v.dtype is None for v in node.outputs):
        return "output type unknown (shape inference could not type it)"
    for i in float_ins:
        data = constant_of(node.inputs[i])
        if data is not None and data.size and np.nanmax(np.abs(data)) > FP16_MAX:
            return f"a constant input is out of float16 range (max |w| = {np.nanmax(np.abs(data)):.4g})"
    return None


# --------------------------------------------------------------------------- rewriting


def _fix_edges(
    graphs: list[ir.Graph], orig: dict, plan: _Plan, names: Names, report: PassReport
) -> None:
    casts: dict[tuple[ir.Value, ir.DataType, ir.Graph], ir.Value] = {}
    copies: dict[tuple[ir.Value, ir.DataType, ir.Graph], ir.Value] = {}
    for graph in graphs:
        for node in list(graph):
            if node.graph is not graph:
                continue
            half_ins = plan.half[node][0] if node in plan.half else set()
            for i, value in enumerate(list(node.inputs)):
                if value is None or orig.get(value) != FLOAT:
                    continue
                want = HALF if i in half_ins else FLOAT
                data = constant_of(value)
                if (
                    data is not None
                    and want == FLOAT
                    and node in plan.store_half_weights
                    and data.size > 1
                ):
                    # float32 compute, float16 storage: Cast(half weight) folded at load time.
                    half = _constant_copy(value, HALF, graph, names, copies, report)
                    node.replace_input_with(
                        i, _cast(half, FLOAT, graph, node, names, casts, report)
                    )
                    report.count("weights_stored_float16")
                    continue
                if value.dtype == want:
                    continue
                if data is not None:
                    node.replace_input_with(
                        i, _constant_copy(value, want, graph, names, copies, report)
                    )
                else:
                    node.replace_input_with(
                        i, _cast(value, want, graph, node, names, casts, report)
                    )


def _constant_copy(value, dtype, graph, names, copies, report) -> ir.Value:
    key = (value, dtype, graph)
    if key not in copies:
        array = constant_of(value).astype(dtype.numpy())
        base = f"{value.name or 'const'}_{'fp16' if dtype == HALF else 'fp32'}"
        copies[key] = add_initializer(graph, names, base, array)
        report.count("constants_float16" if dtype == HALF else "constants_float32_copy")
    return copies[key]


def _cast(value, dtype, graph, before, names, casts, report) -> ir.Value:
    key = (value, dtype, graph)
    if key not in casts:
        out = ir.Value(
            name=names.fresh(f"{value.name or 'v'}_{'fp16' if dtype == HALF else 'fp32'}"),
            type=ir.TensorType(dtype),
            shape=value.shape,
        )
        cast = ir.Node(
            "", "Cast", [value], [ir.AttrInt64("to", dtype.value)], outputs=[out],
            name=names.fresh(f"{value.name or 'v'}_cast_{'fp16' if dtype == HALF else 'fp32'}"),
        )  # fmt: skip
        graph.insert_before(before, cast)
        casts[key] = out
        report.count("casts_inserted")
    return casts[key]


def _fix_outputs(model, graphs, orig, config, names, report) -> None:
    """Graph outputs get their original type back (main graph: only with keep_io_types)."""
    for graph in graphs:
        keep = config.keep_io_types or graph is not model.graph
        for index, value in enumerate(list(graph.outputs)):
            if orig.get(value) != FLOAT:
                continue
            want = FLOAT if keep else HALF
            if value.dtype == want:
                continue
            producer = value.producer()
            # The Cast takes over the output's name; the half value is renamed.
            name = value.name
            value.name = names.fresh(f"{name}_fp16" if value.dtype == HALF else f"{name}_fp32")
            out = ir.Value(name=name, type=ir.TensorType(want), shape=value.shape)
            cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", want.value)], outputs=[out])
            cast.name = names.fresh(f"{name}_cast")
            if producer is not None and producer.graph is graph:
                graph.insert_after(producer, cast)
            elif len(graph):
                graph.insert_before(next(iter(graph)), cast)
            else:
                graph.append(cast)
            graph.outputs[index] = out
            report.count("casts_inserted")


def _remove_cast_pairs(graphs: list[ir.Graph]) -> int:
    """Cast(to=float16) of Cast(to=float32) of a float16 value is that value (exact)."""
    removed = 0
    for graph in graphs:
        for node in list(graph):
            if node.op_type != "Cast" or node.attributes["to"].value != HALF.value:
                continue
            inner = node.inputs[0].producer()
            if (
                inner is None
                or inner.op_type != "Cast"
                or inner.attributes["to"].value != FLOAT.value
            ):
                continue
            source = inner.inputs[0]
            if source.dtype != HALF or node.outputs[0].is_graph_output():
                continue
            replace_uses(node.outputs[0], source)
            graph.remove(node, safe=True)
            removed += 1
    return removed


def _remove_dead_casts(graphs: list[ir.Graph]) -> None:
    for graph in reversed(graphs):
        for node in reversed(list(graph)):
            out = node.outputs[0] if node.outputs else None
            if (
                node.op_type == "Cast"
                and out is not None
                and not out.uses()
                and not out.is_graph_output()
            ):
                graph.remove(node, safe=True)
