"""Control flow (If/Loop/Scan) made quantizable instead of a hard error.

- ``inline_constant_ifs``: an ``If`` whose condition is a constant, or folds to one through a
  short chain of comparisons, logic, casts and static shapes, is replaced by the nodes of the
  branch it always takes. Its weights and activations then live in the graph around it, where
  calibration can observe them.
- ``lift_constant_weights``: float ``Constant`` nodes read as a weight (MatMul/Gemm/Conv/Gather
  and the recurrent ops) become initializers of the graph they live in, so passes that look
  for initializers find weights written as Constant nodes inside branches too.
- ``unobservable``: why a tensor cannot be calibrated. onnxruntime can only return values of
  the main graph, so a tensor inside a subgraph that is still there stays float, with this
  reason, instead of failing calibration.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qtool.model import iter_graphs
from qtool.passes import PassReport

# How far back through the condition's producers an If's condition is evaluated.
MAX_CONDITION_DEPTH = 16

# Ops a condition is made of in exported graphs (``Equal(Gather(Shape(x), 0), 1)``,
# ``Not``, ``Cast`` to bool); evaluated with numpy on constant inputs.
_CONDITION_OPS: dict[str, Callable[..., np.ndarray]] = {
    "Equal": np.equal,
    "Greater": np.greater,
    "Less": np.less,
    "GreaterOrEqual": np.greater_equal,
    "LessOrEqual": np.less_equal,
    "Not": np.logical_not,
    "And": np.logical_and,
    "Or": np.logical_or,
    "Xor": np.logical_xor,
    "Identity": lambda x: x,
}

# Inputs that hold a weight matrix, per op type (recurrent ops: W, R and bias B).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (1,), "Gemm": (1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2), "Gather": (0,),
    "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3),
}

UNOBSERVABLE = ("inside an If/Loop/Scan subgraph: onnxruntime cannot return it for calibration, "
                "so it stays float")


def unobservable(value: ir.Value, main: ir.Graph) -> str | None:
    """Why ``value`` cannot be observed during calibration (``main``: the model's graph), or None."""
    producer = value.producer()
    graph = producer.graph if producer is not None else value.graph
    return UNOBSERVABLE if graph is not None and graph is not main else None


def split_observable(model: ir.Model, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """``names`` split into those onnxruntime can return and {name: why not} for the rest."""
    inside: set[str] = set()
    for sub in list(iter_graphs(model.graph))[1:]:
        inside.update(v.name for v in sub.inputs if v.name)
        for node in sub:
            inside.update(v.name for v in node.outputs if v is not None and v.name)
    keep = [n for n in names if n not in inside]
    return keep, {n: UNOBSERVABLE for n in names if n in inside}


# --------------------------------------------------------------------------- If inlining


def constant_condition(value: ir.Value | None, depth: int = MAX_CONDITION_DEPTH) -> bool | None:
    """The truth value of an If condition when it is known without running the model."""
    array = _evaluate(value, depth)
    if array is None or array.size != 1:
        return None
    return bool(array.reshape(()))


def _evaluate(value: ir.Value | None, depth: int) -> np.ndarray | None:
    from qtool.passes.graph import constant_of
    from qtool.passes.preprocess.constants import FOLDABLE

    if value is None or depth < 0:
        return None
    known = constant_of(value)
    if known is not None:
        return known
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type == "Gather" and node.inputs[0].producer() is not None \
            and node.inputs[0].producer().op_type == "Shape":
        return _static_dim(node, depth)
    if node.op_type in ("Shape", "Size"):
        dims = list(node.inputs[0].shape.dims) if node.inputs[0].shape is not None else [None]
        if not all(isinstance(d, int) for d in dims):
            return None
        if node.op_type == "Size":
            return np.array(int(np.prod(dims)), np.int64)
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(dims))
        return np.array(dims[start:end], np.int64)
    handler = _CONDITION_OPS.get(node.op_type)
    if handler is None and node.op_type in FOLDABLE:
        fold = FOLDABLE[node.op_type]

        def handler(*xs, _node=node, _fold=fold):
            return _fold(_node, *xs)
    if handler is None:
        return None
    inputs = []
    for v in node.inputs:
        if v is None:
            inputs.append(None)
            continue
        array = _evaluate(v, depth - 1)
        if array is None:
            return None
        inputs.append(array)
    try:
        return np.asarray(handler(*inputs))
    except Exception:  # noqa: BLE001 - a malformed condition: leave the If alone
        return None


def _static_dim(gather: ir.Node, depth: int) -> np.ndarray | None:
    """``Gather(Shape(x), i)`` when dimension i of x is known, even if others are symbolic."""
    shape_node = gather.inputs[0].producer()
    x = shape_node.inputs[0]
    index = _evaluate(gather.inputs[1], depth - 1)
    if x.shape is None or index is None or gather.attributes.get_int("axis", 0) != 0:
        return None
    start = shape_node.attributes.get_int("start", 0)
    end = shape_node.attributes.get_int("end", len(x.shape))
    dims = list(x.shape.dims)[start:end]
    picked = [dims[int(i)] for i in np.asarray(index).reshape(-1) if -len(dims) <= int(i) < len(dims)]
    if len(picked) != np.asarray(index).size or not all(isinstance(d, int) for d in picked):
        return None
    return np.array(picked, np.int64).reshape(np.asarray(index).shape)


def inline_constant_ifs(model: ir.Model, taken: set[str] | None = None) -> PassReport:
    """Replace every If whose condition is known by the branch it takes, in place.

    Works to a fixed point: a branch moved up may hold Ifs whose conditions are now known.
    Counts ``if_inlined``; ``skipped`` names the Ifs left in place and why. ``taken``: the
    value names in use (updated with the names this pass makes), when the caller tracks them.
    """
    report = PassReport("control_flow")
    taken = _names_in(model) if taken is None else taken
    changed = True
    while changed:
        changed = False
        for graph in list(iter_graphs(model.graph)):
            for node in list(graph):
                if node.op_type != "If" or node.domain not in ("", "ai.onnx") or node.graph is not graph:
                    continue
                cond = constant_condition(node.inputs[0])
                if cond is None:
                    report.skip(node.name or "If", "condition depends on the inputs: both branches kept, "
                                                   "the nodes inside them converted on their own")
                    continue
                _inline(node, "then_branch" if cond else "else_branch", taken)
                report.skipped.pop(node.name or "If", None)
                report.count("if_inlined")
                changed = True
    return report


def _names_in(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for graph in iter_graphs(model.graph):
        names.update(graph.initializers)
        names.update(v.name for v in graph.inputs if v.name)
        for node in graph:
            names.update(v.name for v in node.outputs if v is not None and v.name)
    return names


def _fresh(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _inline(node: ir.Node, attr: str, taken: set[str]) -> None:
    """Move the nodes and initializers of ``node``'s branch ``attr`` in front of it, wire the
    If's consumers to the branch outputs, and remove the If."""
    graph = node.graph
    branch: ir.Graph = node.attributes[attr].value
    results = list(branch.outputs)
    branch.outputs.clear()
    for name, value in list(branch.initializers.items()):
        del branch.initializers[name]
        if name in graph.initializers:  # a branch may reuse a name of the outer graph
            value.name = _fresh(taken, name)
        graph.register_initializer(value)
    for inner in list(branch):
        branch.remove(inner, safe=False)  # a move: inputs and uses stay as they are
        graph.insert_before(node, inner)
    for old, new in zip(node.outputs, results):
        if old.is_graph_output():
            # The graph output keeps its name; an Identity carries it when the branch result
            # is an outer value or itself an output.
            index = next(i for i, v in enumerate(graph.outputs) if v is old)
            name = old.name
            old.name = None
            if new.producer() is not None and new.producer().graph is graph and not new.is_graph_output():
                new.name = name
            else:
                identity = ir.Node("", "Identity", [new], name=_fresh(taken, f"{name}_inlined"))
                graph.insert_before(node, identity)
                identity.outputs[0].name, identity.outputs[0].dtype = name, new.dtype
                identity.outputs[0].shape = new.shape
                new = identity.outputs[0]
            graph.outputs[index] = new
        for user, i in list(old.uses()):
            user.replace_input_with(i, new)
    graph.remove(node, safe=True)


# --------------------------------------------------------------------------- Constant weights


def lift_constant_weights(model: ir.Model) -> int:
    """Float Constant nodes read as a weight become initializers of their graph, in place.

    Returns how many were lifted. The Constant node is removed when nothing else reads it.
    """
    lifted = 0
    taken = _names_in(model)
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            for index in WEIGHT_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
                if index >= len(node.inputs) or node.inputs[index] is None:
                    continue
                value = node.inputs[index]
                const = value.producer()
                if const is None or const.op_type != "Constant" or "value" not in const.attributes:
                    continue
                tensor = const.attributes["value"].value
                if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                    continue
                home = const.graph
                name = value.name if value.name and value.name not in home.initializers else _fresh(taken, "weight")
                init = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape),
                                const_value=ir.tensor(tensor.numpy(), name=name))
                if value.is_graph_output():
                    continue
                value.name = None
                home.register_initializer(init)
                for user, i in list(value.uses()):
                    user.replace_input_with(i, init)
                home.remove(const, safe=True)
                lifted += 1
    return lifted


def localize_initializers(model: ir.Model) -> int:
    """Main-graph initializers read only inside one subgraph move into that subgraph, in place.

    Passes add their new weights to the main graph, which every subgraph may read. Some of
    onnxruntime's graph transformers look for a weight only in the node's own graph (its
    DequantizeLinear -> MatMul fusion into MatMulNBits fails to load otherwise), so a weight
    belongs to the graph of the nodes that read it. Returns how many moved.
    """
    moved = 0
    main = model.graph
    for name, value in list(main.initializers.items()):
        if value.is_graph_input() or value.is_graph_output():
            continue
        homes = {id(user.graph): user.graph for user, _ in value.uses()}
        if len(homes) != 1:
            continue
        (home,) = homes.values()
        if home is None or home is main:
            continue
        del main.initializers[name]
        home.register_initializer(value)
        moved += 1
    return moved
