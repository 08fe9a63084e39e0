"""Tolerant shape inference: onnx's inference merged into the model, never raising.

Nothing in pre-processing needs complete shape inference: when onnx's inference fails on
the whole graph it is retried non-strict (nodes it cannot infer are left unknown), and when
that fails too the model keeps the shapes it had and a note says why. Rules that need a
shape (Shape folding, MatMul BatchNorm folding) decline with a reason when the shape is
symbolic or unknown.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from qtool.model import iter_graphs
from qtool.passes import PassReport

# Initializers larger than this are hidden from onnx's shape inference, which copies the
# whole model proto; their type and shape are still declared.
_INFERENCE_TENSOR_LIMIT = 1024


def infer_shapes_tolerant(model: ir.Model, report: PassReport) -> int:
    """Run onnx shape inference and merge what it learned into ``model``; never raises.

    Strict inference first; if it fails, non-strict (which skips nodes it cannot infer);
    if that fails too, shapes stay as they were and a note records the error. Only new
    information is merged: a value's shape is replaced when it had none or the inferred
    one knows more dimensions, its dtype when it had none. Returns the number of values
    that gained a shape or dtype (also counted as ``shapes_inferred``).
    """
    errors = []
    inferred = None
    for strict in (True, False):
        try:
            inferred = _run_onnx_inference(model, strict)
            break
        except Exception as exc:  # noqa: BLE001 - onnx raises InferenceError, ValidationError, ...
            errors.append(
                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            )
    if inferred is None:
        report.notes.append(f"shape inference failed, shapes left as they were: {errors[-1]}")
        return 0
    if errors:
        report.notes.append(f"strict shape inference failed ({errors[0]}); used non-strict")
    gained = _merge_shapes(model, ir.serde.deserialize_model(inferred))
    if gained:
        report.count("shapes_inferred", gained)
    return gained


def _run_onnx_inference(model: ir.Model, strict: bool) -> onnx.ModelProto:
    """onnx.shape_inference on a copy of ``model`` without its large initializers' data."""
    graph = model.graph
    hidden: list[tuple[ir.Value, ir.TensorProtocol]] = []
    n_inputs = len(graph.inputs)
    try:
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes <= _INFERENCE_TENSOR_LIMIT:
                continue
            if value.dtype is None:
                value.dtype = tensor.dtype
            if value.shape is None:
                value.shape = ir.Shape(tensor.shape)
            graph.initializers.pop(value.name)
            value.const_value = None
            hidden.append((value, tensor))
            if not value.is_graph_input():
                graph.inputs.append(value)
        proto = ir.serde.serialize_model(model)
    finally:
        while len(graph.inputs) > n_inputs:
            graph.inputs.pop()  # pop() clears the value's graph-input flag; del [a:] does not
        for value, tensor in hidden:
            value.const_value = tensor
            graph.register_initializer(value)
    return onnx.shape_inference.infer_shapes(
        proto, check_type=False, strict_mode=strict, data_prop=True
    )


def _known_dims(shape: ir.Shape | None) -> int:
    if shape is None:
        return -1
    return sum(isinstance(d, int) for d in shape.dims)


def _merge_shapes(model: ir.Model, inferred: ir.Model) -> int:
    gained = 0
    for graph, other in zip(iter_graphs(model.graph), iter_graphs(inferred.graph)):
        known = {}
        for node in other:
            for v in node.outputs:
                known[v.name] = v
        for v in other.inputs:
            known[v.name] = v
        for node in graph:
            for value in node.outputs:
                new = known.get(value.name)
                if new is None:
                    continue
                changed = False
                if new.shape is not None and (
                    value.shape is None
                    or (
                        len(new.shape) == len(value.shape)
                        and _known_dims(new.shape) > _known_dims(value.shape)
                    )
                ):
                    value.shape = new.shape
                    changed = True
                if value.dtype is None and new.dtype is not None:
                    value.dtype = new.dtype
                    changed = True
                gained += changed
    return gained

