"""Choose which nodes a static int8 conversion quantizes, and so which tensors to calibrate.

Calibration and conversion both call ``select_nodes`` with the same recipe, so the table
holds exactly the ranges that conversion will ask for.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import onnx_ir as ir

from qtool import ops
from qtool.config import Recipe
from qtool.model import iter_nodes

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# Activations the static int8 pass folds into the Q of the op before them (qtool.passes.qdq)
FOLDABLE_ACTIVATIONS = ("Relu", "Clip")
_HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class Selection:
    quantized: list[ir.Node] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    activation_tensors: list[str] = field(default_factory=list)  # to calibrate, in graph order


def glob_escape(name: str) -> str:
    """``name`` as an exclude pattern (fnmatch) that matches only itself."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def excluded(node: ir.Node, patterns: tuple[str, ...]) -> bool:
    """A node is excluded when a pattern equals its op type or glob-matches its name."""
    name = node.name or ""
    return any(p == node.op_type or fnmatch.fnmatchcase(name, p) for p in patterns)


def foldable_activation(out: ir.Value, exclude: tuple[str, ...]) -> ir.Node | None:
    """The Relu/Clip that is the only reader of ``out`` (in the same graph, not excluded,
    ``out`` not a graph output), whose clipping the Q of ``out``'s producer can do; or None."""
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    act = uses[0].node
    if act.op_type not in FOLDABLE_ACTIVATIONS or act.domain not in ("", "ai.onnx"):
        return None
    producer = out.producer()
    if producer is None or act.graph is not producer.graph or excluded(act, exclude):
        return None
    return act


def folded_ranges(model: ir.Model, names: list[str], exclude: tuple[str, ...]) -> dict[str, str]:
    """Tensors among ``names`` whose range can be taken from the Relu/Clip after them:
    {pre-activation output: that activation's output}, for activation outputs also in
    ``names``.

    Such an output is read only by its activation. Quantized with the activation's range,
    the values the activation passes are represented the same (the Q folds the clip, or
    the activation clips what a Q let through), so observing it would only cost time: a
    returned graph output also stops onnxruntime from fusing the op with its activation
    (ResNet-18 inference ran 25% slower with its 17 pre-ReLU outputs returned).
    """
    wanted = set(names)
    aliases = {}
    for node in iter_nodes(model):
        for out in node.outputs:
            if out is None or out.name not in wanted:
                continue
            act = foldable_activation(out, exclude)
            if act is not None and act.outputs[0].name in wanted:
                aliases[out.name] = act.outputs[0].name
    return aliases


def is_float_activation(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.dtype in _FLOAT_TYPES
        and not value.is_initializer()
        and value.const_value is None
        and not (value.producer() is not None and value.producer().op_type == "Constant")
    )


def select_nodes(model: ir.Model, recipe: Recipe, scheme: str = "int8-static") -> Selection:
    """The nodes ``recipe`` quantizes in ``scheme`` and the activations they touch."""
    q = recipe.quantize
    selection = Selection()
    seen: set[str] = set()

    def want(value: ir.Value | None) -> None:
        if is_float_activation(value) and value.name not in seen:
            seen.add(value.name)
            selection.activation_tensors.append(value.name)

    for node in iter_nodes(model):
        name = node.name or f"{node.op_type}_{id(node)}"
        if ops.rule_for(node) is None:
            continue
        if not ops.is_candidate(node, scheme):
            selection.skipped[name] = f"{node.op_type} is not quantized in {scheme}"
            continue
        if q.op_types and node.op_type not in q.op_types:
            selection.skipped[name] = f"{node.op_type} not in the recipe's op_types"
            continue
        if excluded(node, q.exclude):
            selection.skipped[name] = "excluded by --exclude / recipe"
            continue
        if recipe.bits_for(name, node.op_type, q.bits) >= 16:
            selection.skipped[name] = "kept in float by a [[layer]] override"
            continue
        inputs = [node.inputs[i] for i in ops.activation_inputs(node)]
        if not any(is_float_activation(v) for v in inputs):
            selection.skipped[name] = "no float activation input"
            continue
        if any(v is not None and v.dtype in _HALF_TYPES for v in [*inputs, *node.outputs]):
            # QuantizeLinear takes float16 only from opset 19, and onnxruntime's int8 kernels
            # read float32: a float16-compute model's Q/DQ made an invalid graph (an ASR model).
            selection.skipped[name] = "float16 activations stay float (int8 Q/DQ of them needs opset 19 and float32 kernels)"
            continue
        selection.quantized.append(node)
        for value in inputs:
            want(value)
        for value in node.outputs:
            want(value)
    return selection
