"""Raising a model's opset, only when the user allowed it (--allow-opset-upgrade)."""

from __future__ import annotations

import onnx_ir as ir

from qtool.config import Recipe
from qtool.errors import ConversionError
from qtool.passes import PassReport


def conv_blocks_opset(model: ir.Model, recipe: Recipe, bits: int) -> int:
    """The opset the recipe's low-bit Conv weights need (0: none), when upgrades are allowed.

    Without ``allow_opset_upgrade`` the weight-only pass leaves those Convs float and says why.
    """
    if not recipe.quantize.allow_opset_upgrade:
        return 0
    from qtool.passes.weight_only import conv_opset_needed

    return conv_opset_needed(model, recipe, bits)


def upgrade_opset(model: ir.Model, version: int, reports: list[PassReport] | None = None) -> ir.Model:
    """The model converted to default-domain opset ``version`` by onnx's version converter.

    Only called when the user allowed it (--allow-opset-upgrade). Ops whose signature
    changed (Squeeze/Unsqueeze/Split/Reduce* axes, Softmax) are rewritten by the converter,
    not just relabelled. Returns ``model`` itself when it is already new enough; appends an
    "opset" report to ``reports`` when it converted.
    """
    current = model.opset_imports.get("", 0)
    if current >= version:
        return model
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(ir.to_proto(model), version)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise ConversionError(
            f"could not convert the model from opset {current} to {version}: {str(exc).splitlines()[0][:160]}",
            "convert the model to opset 13 with your exporter, or use --per-tensor",
        ) from None
    proto = last_axis_softmax(proto)
    if reports is not None:
        report = PassReport("opset")
        report.count(f"opset {current} -> {version}")
        reports.append(report)
    return ir.from_proto(proto)


# Ops whose output has the rank of their (first) input, and element-wise ops (the largest
# input rank, by broadcasting): enough to follow attention scores back to a Transpose.
_SAME_RANK = frozenset({"Relu", "Sigmoid", "Tanh", "Softmax", "Clip", "Cast", "Slice", "Erf", "Sqrt",
                        "Identity", "Conv", "BatchNormalization", "HardSigmoid", "HardSwish", "Neg"})
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min"})


def _ranks(proto) -> dict[str, int]:  # noqa: ANN001 - onnx.ModelProto
    """Tensor name -> rank, from onnx's shape inference and, where it gives up (a Reshape to a
    computed shape), from the ops that fix a rank (Transpose's perm, Squeeze/Unsqueeze axes)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shapes unknown: rules below only
        inferred = proto
    rank = {v.name: len(v.type.tensor_type.shape.dim)
            for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
            if v.type.tensor_type.HasField("shape")}
    rank.update({t.name: len(t.dims) for t in proto.graph.initializer})
    values = {t.name: t for t in proto.graph.initializer}
    values.update({n.output[0]: n.attribute[0].t for n in proto.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    rank.update({name: len(t.dims) for name, t in values.items()})
    for n in proto.graph.node:  # a Transpose's perm also gives its input's rank
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if n.op_type == "Transpose" and perm:
            rank.setdefault(n.input[0], len(perm))
    for n in proto.graph.node:
        if not n.output or n.output[0] in rank:
            continue
        ins = [rank.get(i) for i in n.input if i]
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if n.op_type == "Transpose" and perm:
            rank[n.output[0]] = len(perm)
        elif n.op_type in _SAME_RANK and ins and ins[0] is not None:
            rank[n.output[0]] = ins[0]
        elif n.op_type in _BROADCAST | {"MatMul"} and ins and None not in ins:
            rank[n.output[0]] = max(ins)
        elif n.op_type in ("Squeeze", "Unsqueeze") and ins and ins[0] is not None:
            axes = next((list(a.ints) for a in n.attribute if a.name == "axes"), None)
            if axes is None and len(n.input) > 1 and n.input[1] in values:
                axes = list(onnx.numpy_helper.to_array(values[n.input[1]]).reshape(-1))
            if axes is not None:
                rank[n.output[0]] = ins[0] + (len(axes) if n.op_type == "Unsqueeze" else -len(axes))
    return rank


def last_axis_softmax(proto):  # noqa: ANN001, ANN201 - onnx.ModelProto
    """The converter writes an opset < 13 Softmax as Flatten(axis) -> Softmax(1) ->
    Reshape(Shape(x)), which is exact for every axis. When ``axis`` is x's last one that is
    just Softmax(x, axis=-1): one op again, which runtimes fuse into attention (OpenVINO's
    CPU plugin runs MatMul-Softmax-MatMul as one int8 kernel; the three ops kept it apart)."""
    import onnx

    nodes = list(proto.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in proto.graph.output}
    rank, drop = None, set()
    for sm in nodes:
        flat = producer.get(sm.input[0]) if sm.op_type == "Softmax" else None
        if flat is None or flat.op_type != "Flatten" or len(readers.get(flat.output[0], [])) != 1:
            continue
        reads = readers.get(sm.output[0], [])
        reshape = reads[0] if len(reads) == 1 and sm.output[0] not in outputs else None
        shape = producer.get(reshape.input[1]) if reshape is not None and reshape.op_type == "Reshape" else None
        x = flat.input[0]
        if shape is None or shape.op_type != "Shape" or shape.input[0] != x or len(shape.attribute):
            continue
        rank = _ranks(proto) if rank is None else rank
        axis = next((a.i for a in flat.attribute if a.name == "axis"), 1)
        if x not in rank or axis not in (-1, rank[x] - 1):
            continue
        sm.input[0] = x
        del sm.attribute[:]
        sm.attribute.append(onnx.helper.make_attribute("axis", -1))
        sm.output[0] = reshape.output[0]
        drop.update({id(flat), id(reshape)} | ({id(shape)} if len(readers[shape.output[0]]) == 1 else set()))
    if drop:
        kept = [n for n in nodes if id(n) not in drop]
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
    return proto
