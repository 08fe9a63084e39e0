"""Which weights the weight-only pass quantizes: one Item per MatMul/Gemm/Gather/Conv weight,
at the bits its recipe gives it, or a reason (in the report) why it stays float."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import onnx_ir as ir

from qtool.config import Recipe
from qtool.model import iter_graphs, opset_version
from qtool.passes import PassReport
from qtool.quant import formats
from qtool.quant.blockwise import ActivationStats

_FLOAT_WEIGHTS = (ir.DataType.FLOAT,)


@dataclass
class Item:
    """One weight to quantize and the nodes it replaces."""

    kind: str  # "matmul" | "gemm" | "gather" | "conv"
    node: ir.Node
    weight: ir.Value
    bits: int
    bias: ir.Value | None = None  # folded bias (MatMulNBits only)
    add: ir.Node | None = None  # the Add whose bias is folded
    transpose_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    nbytes: int = 0
    stats: ActivationStats | None = None
    block: int = 0  # a smaller block than the recipe's (Gather tables whose width it does not divide)
    outcome: dict = field(default_factory=dict)


def item_name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def _matches(patterns: tuple[str, ...], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def _const_float(value: ir.Value | None, rank: int | None = None) -> bool:
    if value is None or value.const_value is None or value.is_graph_input():
        return False
    t = value.const_value
    return t.dtype in _FLOAT_WEIGHTS and (rank is None or len(t.shape) == rank)


def dq_opset(bits: int) -> int:
    """The opset whose DequantizeLinear takes ``bits``-bit blocked weights."""
    return 25 if formats.storage_bits(bits) == 2 else 21


def _conv_refusal(model: ir.Model, node: ir.Node, weight: ir.Value, bits: int, allow_upgrade: bool) -> str | None:
    """Why a Conv weight cannot take ``bits``-bit blocks (see the module doc), or None."""
    c = weight.const_value.shape[1]
    if c < 16:
        return f"input channels per group C/g = {c} are fewer than one block (16)"
    need, have = dq_opset(bits), opset_version(model) or 0
    if have < need and not allow_upgrade:
        return (f"a {bits}-bit Conv weight needs blocked DequantizeLinear (opset {need}), the model has "
                f"opset {have}: pass --allow-opset-upgrade")
    return None


def conv_opset_needed(model: ir.Model, recipe: Recipe, bits: int) -> int:
    """The opset the Conv rewrites of this pass need (0: no Conv to rewrite).

    The caller raises the model's opset with a real converter first (qtool.convert), since
    relabelling would refuse ops whose schema changed without changing their meaning.
    """
    items = find_items(model, recipe, bits, PassReport("weight_only"))
    return max((dq_opset(i.bits) for i in items if i.kind == "conv"), default=0)


def _layer_bits(recipe: Recipe, node: ir.Node, weight: ir.Value, bits: int, report: PassReport) -> int | None:
    """The bits of one layer: a [[layer]] override, else 8 for --keep-8bit matches, else
    ``bits``; None (reported) when an override keeps it float."""
    name = item_name(node)
    layer_bits = recipe.bits_for(name, node.op_type, bits)
    if _matches(recipe.weight_only.keep_8bit, name, weight.name or "", node.outputs[0].name):
        layer_bits = 8
    if layer_bits >= 16:
        report.skip(name, f"[[layer]] override keeps it at {layer_bits} bits")
        return None
    return layer_bits


# The reason of a MatMul/Gemm/Gather/Conv with nothing to quantize: attention's
# activation x activation MatMul, a Gather indexing a shape vector.
NO_CONSTANT_WEIGHT = "no constant float weight"


def find_items(model: ir.Model, recipe: Recipe, bits: int, report: PassReport) -> list[Item]:
    wo = recipe.weight_only
    items: list[Item] = []
    for graph in iter_graphs(model.graph):
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Gather", "Conv"):
                continue
            name = item_name(node)
            if node.op_type == "Conv":
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                if not _const_float(weight) or len(weight.const_value.shape) < 3:
                    report.skip(name, NO_CONSTANT_WEIGHT)
                    continue
                layer_bits = _layer_bits(recipe, node, weight, bits, report)
                if layer_bits is None:
                    continue
                why = _conv_refusal(model, node, weight, layer_bits, recipe.quantize.allow_opset_upgrade)
                if why is not None:
                    report.skip(name, why)
                    continue
                items.append(Item("conv", node, weight, layer_bits, nbytes=weight.const_value.nbytes))
                continue
            if node.op_type == "Gather":
                if not wo.quantize_gather:
                    report.skip(name, "Gather quantization is off (quantize_gather = false)")
                    continue
                weight = node.inputs[0]
                if not _const_float(weight, 2):
                    report.skip(name, NO_CONSTANT_WEIGHT)
                    continue
                if node.attributes.get_int("axis", 0) != 0:
                    report.skip(name, "Gather on an axis other than 0 is left in float")
                    continue
                kind = "gather"
            else:
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                if not _const_float(weight, 2):
                    report.skip(name, NO_CONSTANT_WEIGHT)
                    continue
                kind = "matmul" if node.op_type == "MatMul" else "gemm"
                if kind == "gemm" and node.attributes.get_int("transA", 0):
                    report.skip(name, "Gemm with transA = 1 is left in float")
                    continue
            layer_bits = _layer_bits(recipe, node, weight, bits, report)
            if layer_bits is None:
                continue
            shape = tuple(weight.const_value.shape)
            k = shape[1] if kind == "gather" or (kind == "gemm" and node.attributes.get_int("transB", 0)) else shape[0]
            if k < 16:
                report.skip(name, f"reduction dimension {k} is smaller than one block (16)")
                continue
            item = Item(kind, node, weight, layer_bits, nbytes=weight.const_value.nbytes)
            if kind == "gemm":
                item.transpose_b = bool(node.attributes.get_int("transB", 0))
                item.alpha = node.attributes.get_float("alpha", 1.0)
                item.beta = node.attributes.get_float("beta", 1.0)
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    n = shape[0] if item.transpose_b else shape[1]
                    c = node.inputs[2]
                    if not (_const_float(c, 1) and c.const_value.shape[0] == n):
                        report.skip(name, "Gemm bias is not a constant vector [N]")
                        continue
                    item.bias = c
            items.append(item)
    return items


def weight_only_inputs(model: ir.Model, recipe: Recipe) -> list[str]:
    """Names of the activation tensors feeding the MatMul/Gemm weights this pass quantizes."""
    report = PassReport("weight_only")
    items = find_items(model, recipe, 4, report)
    return list(dict.fromkeys(i.node.inputs[0].name for i in items if i.kind in ("matmul", "gemm")))

