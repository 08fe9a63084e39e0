"""Replacing an Item's node(s) with their quantized form: MatMulNBits, GatherBlockQuantized,
or blocked DequantizeLinear feeding the original op."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qtool.passes.graph import Names, add_initializer
from qtool.passes.weight_only.items import Item, item_name
from qtool.quant import formats
from qtool.quant.blockwise import QuantOutcome

MS_DOMAIN = "com.microsoft"


def _init(graph: ir.Graph, names: Names, base: str, array: np.ndarray | None = None, packed: tuple | None = None) -> ir.Value:
    """Register an initializer (numpy array, or (codes, dtype, shape) for packed sub-byte types)."""
    if packed is not None:
        data, dtype, shape = packed
        return add_initializer(graph, names, base, ir.PackedTensor(data, dtype, shape=ir.Shape(shape)))
    return add_initializer(graph, names, base, np.asarray(array))


_DQ_TYPES = {
    (4, True): ir.DataType.INT4,
    (4, False): ir.DataType.UINT4,
    (2, True): ir.DataType.INT2,
    (2, False): ir.DataType.UINT2,
    (8, True): ir.DataType.INT8,
    (8, False): ir.DataType.UINT8,
}


def _dq_value(graph: ir.Graph, names: Names, base: str, t: formats.BlockedDQTensors, axis: int, new_nodes: list) -> ir.Value:
    dtype = _DQ_TYPES[(t.bits, t.signed)]
    if t.bits == 8:
        codes = t.packed.view(np.int8 if t.signed else np.uint8).reshape(t.shape)
        x = _init(graph, names, base + "_q", codes)
        zp = None if t.zero_point_packed is None else _init(graph, names, base + "_zp", t.zero_point_packed.reshape(t.scale.shape))
    else:
        x = _init(graph, names, base + "_q", packed=(t.packed, dtype, t.shape))
        zp = (
            None
            if t.zero_point_packed is None
            else _init(graph, names, base + "_zp", packed=(t.zero_point_packed, dtype, t.scale.shape))
        )
    scale = _init(graph, names, base + "_scale", t.scale)
    inputs = [x, scale] + ([zp] if zp is not None else [])
    dq = ir.node("DequantizeLinear", inputs, attributes={"axis": axis, "block_size": t.block_size}, name=names.fresh(base + "_dq"))
    new_nodes.append(dq)
    return dq.outputs[0]



def conv_dq_tensors(bq: formats.BlockQuant, shape: tuple[int, ...]) -> formats.BlockedDQTensors:
    """DequantizeLinear (axis 1) tensors for ``W[M, C, k...]`` from its [M * prod(k), C] blocks:
    ``x`` of W's shape, ``scale[M, ceil(C / bs), k...]``."""
    m, c, *k = shape
    nb = bq.n_blocks

    def back(a: np.ndarray, last: int) -> np.ndarray:  # [M * prod(k), last] -> [M, last * prod(k)]
        return np.moveaxis(a.reshape(m, *k, last), -1, 1).reshape(m, -1)

    zp = None if bq.zero_points is None else back(bq.zero_points, nb)
    flat = formats.BlockQuant(back(bq.codes, c), back(bq.scales, nb), zp, bq.bits, bq.block_size)
    t = formats.blocked_dq_tensors(flat, transpose=False)
    return dataclasses.replace(t, scale=t.scale.reshape(m, nb, *k), shape=tuple(shape))


def rewrite(graph: ir.Graph, names: Names, item: Item, outcome: QuantOutcome, wo, fmt: str) -> list[ir.Value]:
    """Replace ``item``'s node(s); returns the old values that may now be unused."""
    node = item.node
    base = (item.weight.name or item_name(node)).replace("/", "_")
    bq = outcome.bq
    new_nodes: list[ir.Node] = []
    old_nodes = [node] + ([item.add] if item.add is not None else [])
    old_out = (item.add or node).outputs[0]

    if item.kind == "gather":
        ids = node.inputs[1]
        if fmt == "matmulnbits":
            bits = formats.storage_bits(bq.bits)
            zp = bq.zero_points
            if zp is None and bq.bits == 3:
                zp = np.full(bq.scales.shape, 4, dtype=np.uint8)
            data = _init(graph, names, base + "_q", formats.pack_bits(bq.codes, bits))
            scales = _init(graph, names, base + "_scale", bq.scales)
            inputs = [data, ids, scales]
            if zp is not None:
                inputs.append(_init(graph, names, base + "_zp", formats.pack_bits(zp, bits)))
            new = ir.node(
                "GatherBlockQuantized",
                inputs,
                attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": bq.block_size, "bits": bits},
                domain=MS_DOMAIN,
                name=names.fresh(item_name(node) + "_q"),
            )
        else:
            t = formats.blocked_dq_tensors(bq, transpose=False)
            table = _dq_value(graph, names, base, t, 1, new_nodes)
            new = ir.node("Gather", [table, ids], attributes={"axis": 0}, name=names.fresh(item_name(node) + "_q"))
        new_nodes.append(new)
    elif item.kind == "conv":
        t = conv_dq_tensors(bq, tuple(item.weight.const_value.shape))
        w = _dq_value(graph, names, base, t, 1, new_nodes)
        new = ir.node("Conv", [node.inputs[0], w, *node.inputs[2:]], attributes=dict(node.attributes),
                      name=names.fresh(item_name(node) + "_q"))
        new_nodes.append(new)
    else:
        a = node.inputs[0]
        if outcome.input_scale is not None:
            inv = _init(graph, names, base + "_awq_scale", outcome.input_scale)
            mul = ir.node("Mul", [a, inv], name=names.fresh(item_name(node) + "_awq"))
            new_nodes.append(mul)
            a = mul.outputs[0]
        bias = None
        if item.bias is not None:
            b = item.bias.const_value.numpy().astype(np.float32).reshape(-1)  # [1, .., N] -> [N]
            if item.beta != 1.0:
                b = b * np.float32(item.beta)
            bias = b
        if fmt == "matmulnbits":
            t = outcome.tensors if outcome.tensors is not None else formats.matmulnbits_tensors(bq)
            inputs = [a, _init(graph, names, base + "_q", t.b), _init(graph, names, base + "_scale", t.scales)]
            inputs.append(_init(graph, names, base + "_zp", t.zero_points) if t.zero_points is not None else None)
            if bias is not None:
                inputs += [None, _init(graph, names, base + "_bias", bias)]
            while inputs[-1] is None:
                inputs.pop()
            new = ir.node(
                "MatMulNBits",
                inputs,
                attributes={
                    "K": t.k,
                    "N": t.n,
                    "bits": t.bits,
                    "block_size": t.block_size,
                    "accuracy_level": wo.accuracy_level,
                },
                domain=MS_DOMAIN,
                name=names.fresh(item_name(node) + "_q"),
            )
            new_nodes.append(new)
        else:
            t = formats.blocked_dq_tensors(bq)
            w = _dq_value(graph, names, base, t, 0, new_nodes)
            new = ir.node("MatMul", [a, w], name=names.fresh(item_name(node) + "_q"))
            new_nodes.append(new)
            if bias is not None:
                new = ir.node("Add", [new.outputs[0], _init(graph, names, base + "_bias", bias)], name=names.fresh(item_name(node) + "_bias"))
                new_nodes.append(new)
    final = new_nodes[-1].outputs[0]
    for n in new_nodes:  # every value we create is float32 (intermediates untyped otherwise)
        for v in n.outputs:
            v.dtype = ir.DataType.FLOAT
    if old_out.shape is not None:
        final.shape = old_out.shape
    freed = [v for n in old_nodes for v in n.inputs if v is not None]  # removal detaches them
    ir.convenience.replace_nodes_and_values(graph, node, old_nodes, new_nodes, [old_out], [final])
    return freed

