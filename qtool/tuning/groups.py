"""Phase 2a of ``qtool tune``: the layer groups, and the precisions each can take.

A *group* is a set of weight layers (Conv / MatMul / Gemm, and embedding Gathers in the
weight-only scheme) that always share a precision: one layer each (``group="layer"``), or
every layer whose name is the same once its digit runs are ignored (``group="role"``:
``layers.3/mlp/down_proj`` and ``layers.17/mlp/down_proj`` are one group).

In the int8 schemes a layer at 8 bits is int8 and one below 8 bits is weight-only blocks
(MatMulNBits for MatMul/Gemm, blocked DequantizeLinear feeding a float Conv for Conv: opset
21, so a CNN below it takes 2/3/4-bit Convs only with ``allow_opset_upgrade``, which raises
the opset once with onnx's converter).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir

from qtool.errors import UsageError
from qtool.model import iter_nodes

_MIN_K = 16  # weight-only skips reductions shorter than one block of 16


@dataclass(frozen=True)
class Group:
    """Layers that share one precision; ``choices``: allowed bits, highest (32) first."""

    key: str
    members: tuple[str, ...]
    op_types: tuple[str, ...]
    params: int
    choices: tuple[int, ...]
    k: int = 0  # length of the blocked axis (K, D or C/g) shared by every member; 0: they differ


def _weight_of(node: ir.Node) -> tuple[ir.Value | None, int | None]:
    """(constant float weight, length of its blocked axis) of a weight layer, or (None, None):
    K for MatMul/Gemm, D for Gather, C/g (input channels per group) for Conv."""
    index = 0 if node.op_type == "Gather" else 1
    if len(node.inputs) <= index:
        return None, None
    w = node.inputs[index]
    if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT:
        return None, None
    shape = tuple(w.const_value.shape)
    if node.op_type == "Conv":
        return (w, shape[1]) if len(shape) >= 3 else (None, None)
    if len(shape) != 2:
        return None, None
    if node.op_type == "Gather":
        return w, shape[1]
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return w, shape[1]
    return w, shape[0]


def allowed_bits(op_type: str, k: int, scheme: str, bits: Sequence[int], block_size: int,
                 opset: int = 25) -> tuple[int, ...]:
    """The precisions a layer can take in ``scheme`` (32 always), highest first.

    Weight-only (2/3/4 bits, and 8 in the weight-only scheme) needs K >= 16; an embedding
    Gather needs D a multiple of the block size and 8 or 4 bits (GatherBlockQuantized). A
    Conv takes 8 bits as int8 in the int8 schemes; its weight-only blocks (any bits in the
    weight-only scheme, 2/3/4 in the others) need C/g >= 16 and blocked DequantizeLinear:
    ``opset`` (what the model has or may be raised to) >= 21, 25 for 2 bits.
    """
    out = {32}
    for b in bits:
        if op_type == "Conv":
            blocks_ok = k >= _MIN_K and opset >= (25 if b == 2 else 21)
            if (b == 8 and scheme != "weight-only") or blocks_ok:
                out.add(b)
            continue
        if op_type == "Gather":
            if scheme == "weight-only" and b in (8, 4) and k % block_size == 0:
                out.add(b)
            continue
        if b < 8 or scheme == "weight-only":
            if k >= _MIN_K:
                out.add(b)
        else:
            out.add(b)
    return tuple(sorted(out, reverse=True))


def role_key(name: str) -> str:
    """A layer's name with its digit runs replaced by ``#`` (its role across blocks)."""
    return re.sub(r"\d+", "#", name)


def find_groups(model: ir.Model, scheme: str, bits: Sequence[int], block_size: int, group: str,
                op_types: Sequence[str] = (), opset: int | None = None) -> list[Group]:
    """The weight layers ``scheme`` can quantize below float, grouped; in graph order.

    ``opset``: the opset the model may have for blocked Conv weights (default: its own).
    """
    if group not in ("layer", "role", "auto"):
        raise UsageError(f"unknown --group {group!r}", "use layer, role or auto")
    if opset is None:
        opset = model.opset_imports.get("", 0)
    layers: list[tuple[str, str, int, tuple[int, ...], int]] = []
    types = ("Conv", "MatMul", "Gemm") + (("Gather",) if scheme == "weight-only" else ())
    for node in iter_nodes(model):
        if node.op_type not in types or node.domain not in ("", "ai.onnx") or not node.name:
            continue
        if op_types and node.op_type not in op_types and scheme != "weight-only":
            continue
        w, k = _weight_of(node)
        if w is None:
            continue
        choices = allowed_bits(node.op_type, k, scheme, bits, block_size, opset)
        if len(choices) > 1:
            layers.append((node.name, node.op_type, int(w.const_value.size), choices, int(k)))
    if group == "auto":
        group = "layer" if len(layers) <= 32 else "role"
    buckets: dict[tuple, list] = {}
    for name, op, size, choices, k in layers:
        key = (name if group == "layer" else role_key(name), op, choices)
        buckets.setdefault(key, []).append((name, size, k))
    out = []
    for (key, op, choices), members in buckets.items():
        ks = {k for _, _, k in members}
        out.append(Group(key, tuple(n for n, _, _ in members), (op,), sum(s for _, s, _ in members), choices,
                         ks.pop() if len(ks) == 1 else 0))
    return out



@dataclass(frozen=True)
class GroupPlan:
    """The groups of a run, the model they were found in (its opset raised once when Conv
    weights may go below 8 bits), and what the user should know about them."""

    groups: list[Group]
    model: ir.Model
    notes: list[str]


def plan_groups(model: ir.Model, model_name: str, scheme: str, bits: Sequence[int], block_size: int,
                group: str, op_types: Sequence[str], may_upgrade: bool) -> GroupPlan:
    """The groups ``scheme`` can lower; a usage error when there are none."""
    from qtool.model import opset_version
    from qtool.pipeline import upgrade_opset

    opset = opset_version(model) or 0
    groups = find_groups(model, scheme, bits, block_size, group, op_types, opset=25 if may_upgrade else opset)
    if not groups:
        raise UsageError(
            f"no layer of {model_name} can take {','.join(map(str, bits))} bits in the {scheme} scheme",
            "check `qtool inspect MODEL`; Conv layers below 8 bits need opset 21 (--allow-opset-upgrade) "
            "and 16+ input channels per group, weight-only needs MatMul/Gemm weights",
        )
    notes = []
    if not may_upgrade and opset < 21:
        lifted = find_groups(model, scheme, bits, block_size, group, op_types, opset=25)
        more = sum(len(a.choices) for a in lifted if "Conv" in a.op_types) - sum(
            len(a.choices) for a in groups if "Conv" in a.op_types)
        if more:
            notes.append(f"Conv weights below 8 bits need opset 21 (the model has {opset}): "
                         "pass --allow-opset-upgrade to let them take them")
    conv_low = [b for grp in groups if "Conv" in grp.op_types for b in grp.choices
                if b < 8 or scheme == "weight-only" and b < 32]
    if conv_low and may_upgrade:
        # Once here, so each candidate's convert does not run the converter again.
        model = upgrade_opset(model, 25 if 2 in conv_low else 21, [])
    return GroupPlan(groups, model, notes)
