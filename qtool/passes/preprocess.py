"""Pre-processing before quantization: shape inference, BatchNorm folding, constant folding.

``preprocess(model)`` works **in place** on an onnx-ir model and returns a PassReport whose
``counts`` say how often each rule fired (``shapes_inferred``, ``identity_removed``,
``dropout_removed``, ``constant_folded``, ``batchnorm_folded``, ``unused_removed``) and whose
``skipped`` maps ``"<rule>:<node>"`` to the reason a rule matched but refused to rewrite.
Post-condition: the graph is still a valid ONNX graph computing the same function (up to
float rounding of folded weights); every subgraph of If/Loop/Scan is walked too.

Nothing here needs complete shape inference. Shape inference is tolerant: when onnx's
inference fails on the whole graph it is retried non-strict (nodes it cannot infer are left
unknown), and when that fails too the model keeps the shapes it had and a note says why.
Rules that need a shape (Shape folding, MatMul BatchNorm folding) decline with a reason when
the shape is symbolic or unknown.

The opset is never changed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from qtool.model import iter_graphs
from qtool.passes import PassReport

# A rule looks at one node. It returns None when its pattern does not match (no change),
# a reason string when the pattern matched but a check refused the rewrite (no change), or
# APPLIED after rewriting the graph.
APPLIED: Literal[True] = True
Outcome = Literal[True] | str | None
Rule = Callable[[ir.Node, "_Names"], Outcome]

# Initializers larger than this are hidden from onnx's shape inference, which copies the
# whole model proto; their type and shape are still declared.
_INFERENCE_TENSOR_LIMIT = 1024
# Constant folding never creates a tensor larger than this unless it is no larger than the
# inputs it replaces (folding must not inflate the model, e.g. Expand of a scalar).
FOLD_MAX_GROWTH_BYTES = 1 << 16
_MAX_SWEEPS = 8


def preprocess(
    model: ir.Model,
    *,
    fold_batchnorm: bool = True,
    fold_constants: bool = True,
    infer_shapes: bool = True,
    remove_identity: bool = True,
    fuse_pad: bool = True,
) -> PassReport:
    """Simplify ``model`` in place before quantization; return counts per rule.

    Order: Identity/Dropout removal and constant folding (repeated until nothing changes, so
    chains such as Shape -> Gather -> Concat -> Reshape fold completely), then BatchNorm
    folding, then removal of initializers and Constant nodes nobody uses, then shape
    inference (so later passes see the shapes of the simplified graph).
    """
    report = PassReport("preprocess")
    names = _Names(model)
    rules: list[tuple[str, Rule]] = []
    if remove_identity:
        rules += [("identity_removed", remove_identity_node), ("dropout_removed", remove_dropout)]
    if fold_constants:
        rules += [("constant_folded", fold_constant_node)]
    if fuse_pad:
        rules += [("pad_fused_into_conv", fuse_pad_into_conv)]
    if infer_shapes and (fold_constants or fold_batchnorm):
        # Shape folding and MatMul+BatchNorm folding want shapes first.
        infer_shapes_tolerant(model, report)
    if rules:
        apply_rules(model, rules, report, names)
    if fold_constants and _inline_constant_ifs(model, report, names) and rules:
        apply_rules(model, rules, report, names)  # the inlined branches fold too
    if fold_batchnorm:
        apply_rules(
            model,
            [
                ("batchnorm_folded", fold_batchnorm_node),
                ("affine_folded_into_conv", fold_affine_into_conv),
                ("div_by_constant_to_mul", div_by_constant_to_mul),
                ("constant_muls_merged", merge_constant_muls),
                ("affine_folded_into_next_conv", fold_affine_into_next_conv),
            ],
            report,
            names,
        )
    removed = remove_unused(model)
    if removed:
        report.count("unused_removed", removed)
    if infer_shapes:
        infer_shapes_tolerant(model, report)
    report.carries.update(names.carries)
    record_carries(model, names.carries)
    return report


def _inline_constant_ifs(model: ir.Model, report: PassReport, names: _Names) -> int:
    from qtool.passes.control_flow import inline_constant_ifs

    result = inline_constant_ifs(model, names.taken)
    inlined = result.counts.get("if_inlined", 0)
    if inlined:
        report.count("if_inlined", inlined)
    report.skipped.update(result.skipped)  # by node name: the conversion summary's reason for an If
    return inlined


CARRIES_KEY = "qtool.carries"


def record_carries(model: ir.Model, carries: dict[str, str]) -> None:
    """Keep ``carries`` (PassReport.carries) in the model's metadata, merged with what an
    earlier run recorded, so ``qtool eval --diagnose`` compares a folded layer's output with
    the reference tensor it now stands for."""
    if not carries:
        return
    import json

    known = json.loads(model.metadata_props.get(CARRIES_KEY, "{}"))
    for carrier, original in carries.items():
        known[carrier] = known.get(original, original)
    model.metadata_props[CARRIES_KEY] = json.dumps(known, sort_keys=True)


def apply_rules(
    model: ir.Model, rules: list[tuple[str, Rule]], report: PassReport, names: _Names
) -> None:
    """The one driver: apply every rule to every node of every graph until nothing changes."""
    for _ in range(_MAX_SWEEPS):
        changed = False
        for graph in list(iter_graphs(model.graph)):
            for node in list(graph):
                for rule_name, rule in rules:
                    if node.graph is not graph:  # removed by an earlier rule
                        break
                    outcome = rule(node, names)
                    if outcome is APPLIED:
                        report.count(rule_name)
                        changed = True
                    elif isinstance(outcome, str):
                        report.skip(f"{rule_name}:{node.name or node.op_type}", outcome)
        if not changed:
            return


class _Names:
    """Fresh value names that collide with nothing in the model (subgraphs included)."""

    def __init__(self, model: ir.Model) -> None:
        self.carries: dict[str, str] = {}  # see PassReport.carries
        self.taken: set[str] = set()
        for graph in iter_graphs(model.graph):
            self.taken.update(v.name for v in graph.inputs if v.name)
            self.taken.update(graph.initializers)
            for node in graph:
                self.taken.update(v.name for v in node.outputs if v.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


# --------------------------------------------------------------------------- shapes


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


# --------------------------------------------------------------------------- helpers


def constant_of(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is a constant (an initializer that is not a graph input, or a
    Constant node's output), else None. Outer-scope constants count too."""
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if (
            producer is None
            or producer.op_type != "Constant"
            or producer.domain not in ("", "ai.onnx")
        ):
            return None
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except ValueError:
            return None
        if tensor is None:
            return None
    return tensor.numpy()


def _new_initializer(graph: ir.Graph, names: _Names, base: str, array: np.ndarray) -> ir.Value:
    array = np.asarray(array, order="C")  # ascontiguousarray would make scalars 1-d
    name = names.fresh(base)
    value = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
        const_value=ir.Tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def _rewire(old: ir.Value, new: ir.Value) -> None:
    """Point every consumer of ``old`` (subgraphs included) at ``new``."""
    for node, index in list(old.uses()):
        node.replace_input_with(index, new)


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _only_consumer(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(user is node for user, _ in value.uses())


# --------------------------------------------------------------------------- Identity / Dropout


def remove_identity_node(node: ir.Node, names: _Names) -> Outcome:
    """Identity(x) -> x: consumers read x directly."""
    if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
        return None
    (out,) = node.outputs
    if out.is_graph_output():
        return "its output is a graph output"
    if out.type is not None and not isinstance(out.type, ir.TensorType):
        return "not a tensor (sequence/optional Identity)"
    _rewire(out, node.inputs[0])
    node.graph.remove(node, safe=True)
    return APPLIED


def remove_dropout(node: ir.Node, names: _Names) -> Outcome:
    """Dropout at inference is the identity on its first output."""
    if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return "its mask output is used"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        training = constant_of(node.inputs[2])
        if training is None:
            return "training_mode is not a constant"
        if bool(training):
            return "training_mode is true"
    if any(out.is_graph_output() for out in node.outputs):
        return "its output is a graph output"
    _rewire(node.outputs[0], node.inputs[0])
    node.graph.remove(node, safe=True)
    return APPLIED


# --------------------------------------------------------------------------- constant folding


def _axes(node: ir.Node, index: int) -> list[int] | None:
    """Axes given as an attribute (old opsets) or as input ``index`` (opset 13+)."""
    if "axes" in node.attributes:
        return list(node.attributes["axes"].value)
    if index < len(node.inputs) and node.inputs[index] is not None:
        return [int(a) for a in np.asarray(constant_of(node.inputs[index])).reshape(-1)]
    return None


def Reshape(node: ir.Node, x: np.ndarray, shape: np.ndarray, *_) -> np.ndarray:
    shape = [int(s) for s in shape]
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def Transpose(node: ir.Node, x: np.ndarray) -> np.ndarray:
    perm = _attr(node, "perm", None)
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
    return np.concatenate(xs, axis=_attr(node, "axis", 0))


def Cast(node: ir.Node, x: np.ndarray) -> np.ndarray:
    target = ir.DataType(_attr(node, "to", 1))
    return x.astype(target.numpy())


def Gather(node: ir.Node, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    axis = _attr(node, "axis", 0)
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
        axes = _attr(node, "axes", None)
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


def fold_constant_node(node: ir.Node, names: _Names) -> Outcome:
    """Replace a node whose inputs are all constants by an initializer holding its output.

    Handles Shape of a value whose shape is fully static, and the ops in FOLDABLE on
    constant inputs. DequantizeLinear and everything else is left alone on purpose.
    """
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type == "Shape":
        return _fold_shape(node, names)
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
    if result.nbytes > max(in_bytes, FOLD_MAX_GROWTH_BYTES):
        return f"folding would grow the model ({result.nbytes} bytes from {in_bytes})"
    _replace_with_constant(node, result, names)
    return APPLIED


def _fold_shape(node: ir.Node, names: _Names) -> Outcome:
    data = node.inputs[0]
    if data.shape is None:
        return None
    dims = list(data.shape.dims)
    if not all(isinstance(d, int) for d in dims):
        return "input shape is not static"
    if node.outputs[0].is_graph_output():
        return "its output is a graph output"
    start = _attr(node, "start", 0)
    end = _attr(node, "end", None)
    _replace_with_constant(node, np.array(dims[start:end], dtype=np.int64), names)
    return APPLIED


def _replace_with_constant(node: ir.Node, array: np.ndarray, names: _Names) -> None:
    out = node.outputs[0]
    graph = node.graph
    const = _new_initializer(graph, names, (out.name or node.op_type) + "_folded", array)
    _rewire(out, const)
    graph.remove(node, safe=True)


# --------------------------------------------------------------------------- Pad into Conv


def fuse_pad_into_conv(node: ir.Node, names: _Names) -> Outcome:
    """Pad(x, zeros on spatial axes) -> Conv  becomes  Conv(x) with the pads added.

    Exporters write TF-style "same" padding as an explicit Pad before each Conv. onnxruntime
    folds it for float Convs but not in a quantized graph, where the Pad then runs on its own
    between a DequantizeLinear and a QuantizeLinear (a third of EfficientNet-Lite0's int8
    latency). Only zero-valued constant padding of the spatial axes is folded: that is what
    Conv's own pads compute.
    """
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx"):
        return None
    out = node.outputs[0]
    users = out.uses()
    if len(users) != 1 or out.is_graph_output():
        return None
    conv, index = next(iter(users))
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or index != 0:
        return None
    if _attr(node, "mode", "constant") not in ("constant", b"constant"):
        return "Pad mode is not constant"
    if "pads" in node.attributes:  # opset < 11
        pads, value = list(node.attributes["pads"].value), _attr(node, "value", 0.0)
    else:
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return "Pad has an axes input"
        pads_c = constant_of(node.inputs[1])
        if pads_c is None:
            return "pads are not constant"
        pads = [int(p) for p in pads_c.reshape(-1)]
        value = 0.0
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            const = constant_of(node.inputs[2])
            if const is None:
                return "constant_value is not constant"
            value = float(np.asarray(const).reshape(-1)[0]) if const.size else 0.0
    if value != 0.0:
        return f"pads with {value}, Conv pads with zeros"
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads):
        return "negative or non-spatial pads"
    if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return "pads the batch or channel axis"
    auto_pad = _attr(conv, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", b"NOTSET"):
        return f"Conv has auto_pad={auto_pad}"
    spatial = rank - 2
    old = list(_attr(conv, "pads", [0] * (2 * spatial)))
    if len(old) != 2 * spatial:
        return "Conv pads do not match the Pad's rank"
    new = [old[i] + pads[2 + i] for i in range(spatial)] + [
        old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)
    ]
    conv.attributes["pads"] = ir.AttrInt64s("pads", new)
    conv.replace_input_with(0, node.inputs[0])
    node.graph.remove(node, safe=True)
    return APPLIED


# --------------------------------------------------------------------------- BatchNorm folding


def fold_batchnorm_node(node: ir.Node, names: _Names) -> Outcome:
    """Fold BatchNormalization into the Conv / ConvTranspose / Gemm / MatMul(+Add) before it.

    With s = gamma / sqrt(var + eps) per output channel c, BN(y) = s * (y - mean) + beta,
    and y = W * x + b, the folded layer is W'[c] = s[c] * W[c], b'[c] = s[c] * (b[c] - mean[c])
    + beta[c] (b = 0 when the layer has no bias; a bias is created). Arithmetic is in float64,
    stored back in the weight's dtype.
    """
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return None
    x = node.inputs[0]
    producer = x.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    anchor = producer
    if producer.op_type == "Add" and _matmul_of_add(producer) is not None:
        anchor = producer
    elif producer.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None
    if _attr(node, "training_mode", 0):
        return "training_mode is set"
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return "running mean/var outputs are used"
    if producer.graph is not node.graph:
        return "producer is in another graph"
    if not _only_consumer(x, node):
        return f"{producer.op_type} output has other consumers"
    params = [constant_of(v) for v in node.inputs[1:5]]
    if any(p is None for p in params):
        return "scale/bias/mean/var are not constants"
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    eps = float(_attr(node, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale  # BN(y) = scale * y + shift

    if anchor.op_type in ("Conv", "ConvTranspose"):
        result = _fold_into_conv(anchor, scale, shift, names)
    elif anchor.op_type == "Gemm":
        result = _fold_into_gemm(anchor, scale, shift, names)
    else:
        result = _fold_into_matmul(anchor, scale, shift, names)
    if isinstance(result, str):
        return result
    _take_over_output(node, result, absorbed_by=names)
    return APPLIED


def fold_affine_into_conv(node: ir.Node, names: _Names) -> Outcome:
    """Conv -> Mul(per-channel constant) or Add(per-channel constant): into the Conv.

    Exporters (paddle2onnx's PP-LCNet, for one) write a BatchNorm already reduced to its
    affine form, or a learnable per-channel scale/shift, as separate Mul and Add nodes after a
    Conv. Each would otherwise be an elementwise quantized op of its own. Folded like
    BatchNorm: Mul by c is scale c, shift 0; Add of c is scale 1, shift c. The constant must
    broadcast along the output channel axis only (or be a scalar).
    """
    if node.op_type not in ("Mul", "Add") or node.domain not in ("", "ai.onnx"):
        return None
    found = _float_const_operand(node)
    if found is None:
        return None
    x, c, _ = found
    conv = x.producer()
    if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx"):
        return None
    if conv.graph is not node.graph:
        return None
    if not _only_consumer(x, node):
        return f"{conv.op_type} output has other consumers"
    w = constant_of(conv.inputs[1])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return f"{conv.op_type} weight is not a float constant"
    group = int(_attr(conv, "group", 1))
    out_ch = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * group
    per_channel = _channel_vector(c, w.ndim, out_ch)  # the output has W's rank: N, M, spatial...
    if per_channel is None:
        return f"the constant of shape {list(c.shape)} is not per output channel"
    if node.op_type == "Mul":
        scale, shift = per_channel, np.zeros(out_ch)
    else:
        scale, shift = np.ones(out_ch), per_channel
    result = _fold_into_conv(conv, scale, shift, names)
    if isinstance(result, str):
        return result
    _take_over_output(node, result, absorbed_by=names)
    return APPLIED


def _channel_vector(c: np.ndarray, rank: int, n: int) -> np.ndarray | None:
    """``c`` as n float64 values, one per channel of axis 1 of a rank-``rank`` tensor it
    broadcasts against (a scalar repeats), or None when it varies along another axis or
    has more axes than that tensor."""
    if c.ndim > rank:
        return None
    dims = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for j, d in enumerate(dims) if j != 1) or dims[1] not in (1, n):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (n,))


def _float_const_operand(node: ir.Node) -> tuple[ir.Value, np.ndarray, int] | None:
    """(the non-constant input, the constant, its input index) of a binary node, else None."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    for i in (1, 0):
        c = constant_of(node.inputs[i])
        if c is not None and constant_of(node.inputs[1 - i]) is None:
            if not np.issubdtype(c.dtype, np.floating):
                return None
            return node.inputs[1 - i], c, i
    return None


def div_by_constant_to_mul(node: ir.Node, names: _Names) -> Outcome:
    """x / c -> x * (1 / c) for a float constant c when a Mul by a constant reads the result,
    so the two merge (``merge_constant_muls``): one quantized Mul instead of a float Div
    between a dequantize/quantize pair. Other Divs stay (onnxruntime's Gelu and attention
    fusions match Div)."""
    if node.op_type != "Div" or node.domain not in ("", "ai.onnx"):
        return None
    c = constant_of(node.inputs[1])
    if c is None or not np.issubdtype(c.dtype, np.floating) or constant_of(node.inputs[0]) is not None:
        return None
    users = list(node.outputs[0].uses())
    if len(users) != 1 or users[0][0].op_type != "Mul" or _float_const_operand(users[0][0]) is None:
        return None
    if not np.all(np.isfinite(c)) or np.any(c == 0):
        return "divisor has zeros or non-finite values"
    recip = _new_initializer(node.graph, names, (node.inputs[1].name or "c") + "_reciprocal",
                             (1.0 / c.astype(np.float64)).astype(c.dtype))
    mul = ir.Node("", "Mul", [node.inputs[0], recip], name=names.fresh((node.name or "div") + "_as_mul"))
    node.graph.insert_after(node, mul)
    _take_over_output(node, mul.outputs[0])
    return APPLIED


def merge_constant_muls(node: ir.Node, names: _Names) -> Outcome:
    """(x * a) * b -> x * (a * b) for constants a, b (broadcasting is associative)."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
        return None
    outer = _float_const_operand(node)
    if outer is None:
        return None
    y, b, _ = outer
    inner_node = y.producer()
    if inner_node is None or inner_node.op_type != "Mul" or inner_node.graph is not node.graph:
        return None
    inner = _float_const_operand(inner_node)
    if inner is None or not _only_consumer(y, node):
        return None
    x, a, _ = inner
    product = (a.astype(np.float64) * b.astype(np.float64)).astype(a.dtype)
    if product.nbytes > max(a.nbytes + b.nbytes, FOLD_MAX_GROWTH_BYTES):
        return "merged constant would grow the model"
    merged = _new_initializer(node.graph, names, (node.inputs[1].name or "c") + "_merged", product)
    mul = ir.Node("", "Mul", [x, merged], name=names.fresh(node.name or "mul"))
    node.graph.insert_after(node, mul)
    _take_over_output(node, mul.outputs[0])
    inner_node.graph.remove(inner_node, safe=True)
    return APPLIED


def fold_affine_into_next_conv(node: ir.Node, names: _Names) -> Outcome:
    """x * a or x + b feeding only an unpadded Conv: into that Conv's weight and bias.

    Conv(W, x * a) = Conv(W * a, x) and Conv(W, x + b) = Conv(W, x) + sum(W * b) per output
    channel; exact only without zero padding (a padded border would see a * 0 + b), so only
    Convs with all pads 0 qualify. Scalar constants, or per-input-channel ones for group 1.
    """
    if node.op_type not in ("Mul", "Add") or node.domain not in ("", "ai.onnx"):
        return None
    found = _float_const_operand(node)
    if found is None:
        return None
    x, c, _ = found
    out = node.outputs[0]
    users = list(out.uses())
    if out.is_graph_output() or len(users) != 1:
        return None
    conv, index = users[0]
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or index != 0:
        return None
    if any(_attr(conv, "pads", [0])) or _attr(conv, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
        return "the Conv pads its input"
    w = constant_of(conv.inputs[1])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return "Conv weight is not a float constant"
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = constant_of(bias_value) if bias_value is not None else None
    if bias_value is not None and bias is None:
        return "Conv bias is not a constant"
    group = int(_attr(conv, "group", 1))
    # Per input channel of W's axis 1 (C / group): any constant for group 1, a scalar otherwise.
    per_c = _channel_vector(c, w.ndim, w.shape[1]) if group == 1 or c.size == 1 else None
    if per_c is None:
        return f"the constant of shape {list(c.shape)} is not a scalar or per input channel"
    w64 = w.astype(np.float64)
    b64 = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64).reshape(-1)
    shape = (1, -1) + (1,) * (w.ndim - 2)
    if node.op_type == "Mul":
        new_w, new_b = w64 * per_c.reshape(shape), b64
    else:
        new_w, new_b = w64, b64 + (w64 * per_c.reshape(shape)).reshape(w.shape[0], -1).sum(axis=1)
    _set_conv_params(conv, new_w.astype(w.dtype), new_b.astype(w.dtype), names, "_affine")
    conv.replace_input_with(0, x)
    node.graph.remove(node, safe=True)
    return APPLIED


def _take_over_output(old: ir.Node, new: ir.Value, absorbed_by: _Names | None = None) -> None:
    """``new`` replaces ``old``'s single output everywhere and ``old`` is removed.

    By default ``new`` (a fresh value computing the same thing) also takes the name, which
    calibration tables and recipes use. ``absorbed_by``: ``new`` is the output of the layer
    that absorbed ``old`` (a folded BatchNorm/scale); it keeps its own name and the fold is
    recorded in ``absorbed_by.carries``. A graph output always keeps its name.
    """
    out = old.outputs[0]
    graph = old.graph
    if absorbed_by is not None:
        absorbed_by.carries[new.name] = absorbed_by.carries.pop(out.name, out.name)
    _rewire(out, new)
    was_output = out.is_graph_output()
    if was_output:
        for j, value in enumerate(graph.outputs):
            if value is out:
                graph.outputs[j] = new
    if was_output or absorbed_by is None:
        name, out.name = out.name, None
        new.name = name
    graph.remove(old, safe=True)


def _matmul_of_add(add: ir.Node) -> ir.Node | None:
    """The MatMul feeding ``add`` when the other Add input is a constant, else None."""
    for i in (0, 1):
        a, b = add.inputs[i], add.inputs[1 - i]
        prod = a.producer() if a is not None else None
        if prod is not None and prod.op_type == "MatMul" and constant_of(b) is not None:
            return prod
    return None


def _scaled(weight: ir.Value, array: np.ndarray, graph: ir.Graph, names: _Names) -> ir.Value:
    return _new_initializer(
        graph, names, (weight.name or "w") + "_bnfolded", array.astype(constant_of(weight).dtype)
    )


def _channels_ok(scale: np.ndarray, n: int) -> str | None:
    if scale.size != n:
        return f"BatchNorm has {scale.size} channels, the layer produces {n}"
    return None


def _fold_into_conv(
    conv: ir.Node, scale: np.ndarray, shift: np.ndarray, names: _Names
) -> ir.Value | str:
    """Returns the value that now carries BN's output, or the reason nothing was changed."""
    w_value = conv.inputs[1]
    w = constant_of(w_value)
    if w is None:
        return f"{conv.op_type} weight is not a constant"
    group = int(_attr(conv, "group", 1))
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = constant_of(bias_value) if bias_value is not None else None
    if bias_value is not None and bias is None:
        return f"{conv.op_type} bias is not a constant"
    w64 = w.astype(np.float64)
    if conv.op_type == "Conv":  # W: [M, C/group, k...], output channel = axis 0
        out_ch = w.shape[0]
        if (reason := _channels_ok(scale, out_ch)) is not None:
            return reason
        new_w = w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    else:  # ConvTranspose W: [C, M/group, k...], output channel = g * (M/group) + j
        per_group = w.shape[1]
        out_ch = per_group * group
        if (reason := _channels_ok(scale, out_ch)) is not None:
            return reason
        grouped = w64.reshape((group, w.shape[0] // group, per_group) + w.shape[2:])
        grouped = grouped * scale.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))
        new_w = grouped.reshape(w.shape)
    b64 = np.zeros(out_ch) if bias is None else bias.astype(np.float64).reshape(-1)
    new_b = scale * b64 + shift
    _set_conv_params(conv, new_w.astype(w.dtype), new_b.astype(w.dtype), names, "_bnfolded")
    return conv.outputs[0]


def _set_conv_params(conv: ir.Node, weight: np.ndarray, bias: np.ndarray, names: _Names, suffix: str) -> None:
    """Give ``conv`` (or ConvTranspose) new weight and bias initializers, named after the old
    ones (or the node) plus ``suffix``; a Conv without a bias gets one."""
    graph = conv.graph
    w_value = conv.inputs[1]
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    conv.replace_input_with(1, _new_initializer(graph, names, (w_value.name or "w") + suffix, weight))
    b_name = bias_value.name if bias_value is not None else (conv.name or "conv") + "_bias"
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, _new_initializer(graph, names, b_name + suffix, bias))


def _fold_into_gemm(
    gemm: ir.Node, scale: np.ndarray, shift: np.ndarray, names: _Names
) -> ir.Value | str:
    """Gemm: Y = alpha * A' B' + beta * C; the BN channel is Y's axis 1 (columns of B')."""
    b_value = gemm.inputs[1]
    b = constant_of(b_value)
    if b is None:
        return "Gemm weight B is not a constant"
    trans_b = int(_attr(gemm, "transB", 0))
    out_ch = b.shape[0] if trans_b else b.shape[1]
    if (reason := _channels_ok(scale, out_ch)) is not None:
        return reason
    c_value = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    c = constant_of(c_value) if c_value is not None else None
    if c_value is not None and c is None:
        return "Gemm bias C is not a constant"
    if c is not None and c.size not in (1, out_ch):
        return "Gemm bias C is not per-channel"
    beta_attr = float(_attr(gemm, "beta", 1.0))
    c64 = (
        np.zeros(out_ch)
        if c is None
        else np.broadcast_to(c.astype(np.float64).reshape(-1), (out_ch,))
    )
    new_b = b.astype(np.float64) * (scale[:, None] if trans_b else scale[None, :])
    new_c = scale * beta_attr * c64 + shift
    graph = gemm.graph
    gemm.replace_input_with(1, _scaled(b_value, new_b, graph, names))
    c_name = c_value.name if c_value is not None else (gemm.name or "gemm") + "_bias"
    c_new = _new_initializer(graph, names, c_name + "_bnfolded", new_c.astype(b.dtype))
    if len(gemm.inputs) < 3:
        gemm.resize_inputs(3)
    gemm.replace_input_with(2, c_new)
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return gemm.outputs[0]


def _fold_into_matmul(
    anchor: ir.Node, scale: np.ndarray, shift: np.ndarray, names: _Names
) -> ir.Value | str:
    """MatMul(X, W) [+ bias] of a rank-2 X: the BN channel is the last axis (columns of W)."""
    if anchor.op_type == "Add":
        matmul = _matmul_of_add(anchor)
        if not _only_consumer(matmul.outputs[0], anchor):
            return "MatMul output has other consumers"
        bias_index = 1 if anchor.inputs[0] is matmul.outputs[0] else 0
        bias_value = anchor.inputs[bias_index]
        bias = constant_of(bias_value)
    else:
        matmul, bias_value, bias = anchor, None, None
    w_value = matmul.inputs[1]
    w = constant_of(w_value)
    if w is None or w.ndim != 2:
        return "MatMul weight is not a constant matrix"
    x_shape = matmul.inputs[0].shape
    if x_shape is None or len(x_shape) != 2:
        # BatchNorm normalises axis 1; that is W's output axis only for rank-2 MatMuls.
        return "MatMul input rank is unknown or not 2"
    out_ch = w.shape[1]
    if (reason := _channels_ok(scale, out_ch)) is not None:
        return reason
    if bias is not None and bias.size not in (1, out_ch):
        return "MatMul bias is not per-channel"
    b64 = (
        np.zeros(out_ch)
        if bias is None
        else np.broadcast_to(bias.astype(np.float64).reshape(-1), (out_ch,))
    )
    graph = matmul.graph
    matmul.replace_input_with(
        1, _scaled(w_value, w.astype(np.float64) * scale[None, :], graph, names)
    )
    new_b = _new_initializer(
        graph,
        names,
        (bias_value.name if bias_value is not None else (matmul.name or "matmul") + "_bias")
        + "_bnfolded",
        (scale * b64 + shift).astype(w.dtype),
    )
    if anchor.op_type == "Add":
        anchor.replace_input_with(bias_index, new_b)
        return anchor.outputs[0]
    # No bias yet: add one after the MatMul; the Add takes over the MatMul's consumers.
    mm_out = matmul.outputs[0]
    add_out = ir.Value(
        name=names.fresh((mm_out.name or "matmul") + "_biased"),
        type=mm_out.type,
        shape=mm_out.shape,
    )
    add = ir.Node(
        "",
        "Add",
        [mm_out, new_b],
        outputs=[add_out],
        name=names.fresh((matmul.name or "matmul") + "_bias_add"),
    )
    graph.insert_after(matmul, add)
    for user, index in list(mm_out.uses()):
        if user is not add:
            user.replace_input_with(index, add_out)
    return add_out


# --------------------------------------------------------------------------- cleanup


def remove_unused(model: ir.Model, op_types: tuple[str, ...] = ("Constant",)) -> int:
    """Drop nodes of ``op_types`` and initializers that nothing reads (graph inputs kept).

    Only side-effect-free producers belong in ``op_types`` (Constant; cleanup adds the QDQ ops).
    """
    removed = 0
    changed = True
    while changed:
        changed = False
        for graph in iter_graphs(model.graph):
            for node in reversed(list(graph)):
                if node.op_type not in op_types:
                    continue
                if any(o.uses() or o.is_graph_output() for o in node.outputs):
                    continue
                graph.remove(node, safe=True)
                removed += 1
                changed = True
            for name, value in list(graph.initializers.items()):
                if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                    del graph.initializers[name]
                    removed += 1
    return removed
