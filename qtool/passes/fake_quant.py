"""Quantized models as input: fake-quant weights stored as integers, float biases of a QDQ
graph quantized for the QOperator format, and a QDQ graph dequantized back to float.

``fold_fake_quant`` (``qtool convert --store-weights``)::

    W (float) -> QuantizeLinear(s, z) [-> Clip(lo, hi)] -> DequantizeLinear(s', z')
 =>                         W_q (int8 | int4) -> DequantizeLinear(s', z')

with ``W_q = clip(saturate(round_half_even(W / s) + z), lo, hi)``: QuantizeLinear's formula
in the ONNX spec, computed once in float32 as onnxruntime computes it on every run (the
quotient in float32, then rounded to nearest even). Every DequantizeLinear reads the integers
it read before, so the model's outputs stay the same to the bit, and the weights take 1 byte
(int8) or half a byte (int4, when QuantizeLinear produces int4) instead of 4.

``quantize_bias``: ``b_q = round_half_even(b / (s_x * s_w))`` as int32 (the convention of
onnxruntime's quantizer and the QLinearConv/QGemm contract), for Conv/Gemm whose input and
weight are dequantized but whose bias is float (PyTorch's QAT export), so the QOperator pass
can fuse them. The bias then carries its rounding error (at most s_x * s_w / 2).

``dequantize``: every DequantizeLinear of a constant becomes the float constant it computes,
and each QuantizeLinear -> DequantizeLinear pair on an activation is removed (the float
value passes through), so ``--requantize`` starts from a float model and never quantizes twice.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool.model import iter_graphs
from qtool.passes import PassReport
from qtool.passes.graph import Names, add_initializer, constant_of, drop_unused_initializers
from qtool.quantized import FakeQuantWeight, match_fake_quant, q_output_type

# Saturation range of each integer type QuantizeLinear can produce.
INT_RANGE = {
    ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15),
}
NUMPY_INT = {
    ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8, ir.DataType.INT16: np.int16,
    ir.DataType.UINT16: np.uint16, ir.DataType.INT4: np.int8, ir.DataType.UINT4: np.uint8,
}


def _broadcast(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A scale / zero point laid out as QuantizeLinear reads it: a scalar, one value per
    index of ``axis``, or (``block_size`` > 0) one per block of that many along ``axis``."""
    if param.size == 1:
        return param.reshape(())
    axis = axis % len(shape)
    if block_size > 0:
        return np.repeat(param, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return param.reshape(view)


def quantize_linear(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                    dtype: ir.DataType, axis: int = 1, block_size: int = 0) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(w / scale) + zero_point)``, the
    quotient in float32 as onnxruntime computes it. Returns int32 values in ``dtype``'s range."""
    s = _broadcast(np.asarray(scale, dtype=np.float32), w.shape, axis, block_size)
    q = np.rint(w.astype(np.float32) / s)
    if zero_point is not None:
        q = q + _broadcast(np.asarray(zero_point).astype(np.float32), w.shape, axis, block_size)
    lo, hi = INT_RANGE[dtype]
    return np.clip(q, lo, hi).astype(np.int32)


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.value) if a is not None else default


def _integer_tensor(graph: ir.Graph, names: Names, base: str, q: np.ndarray, dtype: ir.DataType) -> ir.Value:
    if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        from qtool.quant.formats import pack_bits

        packed = pack_bits(q.reshape(-1).astype(NUMPY_INT[dtype]), 4)
        return add_initializer(graph, names, base, ir.PackedTensor(packed, dtype, shape=ir.Shape(q.shape)))
    return add_initializer(graph, names, base, q.astype(NUMPY_INT[dtype]))


def _why_not(fq: FakeQuantWeight) -> str | None:
    q = fq.quantize
    if fq.weight.const_value is None and fq.weight.producer() is None:
        return "weight is not a constant"
    if constant_of(q.inputs[1]) is None:
        return "scale is not a constant"
    if len(q.inputs) > 2 and q.inputs[2] is not None and constant_of(q.inputs[2]) is None:
        return "zero point is not a constant"
    if fq.dtype not in INT_RANGE:
        return f"{fq.dtype.name.lower()} fake-quant is not stored (float8: rounding differs by runtime)"
    if constant_of(fq.weight).dtype != np.float32:
        return "weight is not float32 (its rounding on onnxruntime is not reproduced here)"
    for dq in fq.dequantize:
        if len(dq.inputs) > 2 and dq.inputs[2] is not None and constant_of(dq.inputs[2]) is None:
            return "a DequantizeLinear zero point is not a constant"
    return None


def _fold_one(graph: ir.Graph, names: Names, fq: FakeQuantWeight) -> tuple[ir.DataType, int]:
    """Store one fake-quant weight; returns (its new type, bytes saved)."""
    q = fq.quantize
    w = constant_of(fq.weight)
    zp = constant_of(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else None
    values = quantize_linear(w, constant_of(q.inputs[1]), zp, fq.dtype,
                             _attr(q, "axis", 1), _attr(q, "block_size", 0))
    if fq.clip_range is not None:
        values = np.clip(values, *fq.clip_range)
    # The type QuantizeLinear produced, even for 4-bit values in int8 (Brevitas' QCDQ): onnxruntime
    # fuses an int8 DequantizeLinear into QLinearConv/QLinearMatMul and computes an int4 one in
    # float (measured: outputs 1e-4 apart), so narrower storage would change the outputs' bits.
    dtype = fq.dtype
    stored = _integer_tensor(graph, names, (fq.weight.name or "weight") + "_quantized", values, dtype)
    old = [fq.weight, *q.inputs[1:], *(fq.clip.inputs[1:] if fq.clip is not None else [])]
    for dq in fq.dequantize:
        dq.replace_input_with(0, stored)
    for node in (fq.clip, q):
        if node is not None:
            graph.remove(node, safe=True)
    producer = fq.weight.producer()
    if producer is not None and producer.op_type == "Constant" and not fq.weight.uses():
        graph.remove(producer, safe=True)
    drop_unused_initializers(graph, [v for v in old if v is not None])
    return dtype, w.nbytes - stored.const_value.nbytes


def fold_fake_quant(model: ir.Model) -> PassReport:
    """Store every fake-quant weight of ``model`` as the integers it stands for (in place).

    Counts "stored <type>" per weight; a fake-quant pair it cannot store exactly is left as
    it was, with the reason under ``skipped``; ``notes`` give the bytes saved."""
    report = PassReport("store-weights")
    share_identity_constants(model)
    names = Names(model)
    saved = 0
    narrowable = 0
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            fq = match_fake_quant(node)
            if fq is None:
                continue
            why = _why_not(fq)
            if why is not None:
                report.skip(node.name or fq.weight.name or "QuantizeLinear", why)
                continue
            dtype, delta = _fold_one(graph, names, fq)
            saved += delta
            report.count(f"stored {dtype.name.lower()}")
            narrowable += fq.clip_range is not None and fq.bits <= 4 and dtype in (ir.DataType.INT8, ir.DataType.UINT8)
    if report.modified:
        report.notes.append(f"{saved / 1e6:.3f} MB of float weights stored as integers")
    if narrowable:
        report.notes.append(f"{narrowable} weight(s) hold 4-bit values but stay 8-bit, as their QuantizeLinear "
                            "made them: onnxruntime runs int8 and int4 weights on different kernels, so int4 "
                            "storage would change the outputs' last bits")
    return report


def _dq_operands(value: ir.Value | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) of the DequantizeLinear producing ``value`` when both are constant
    scalars; None otherwise."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = constant_of(producer.inputs[1])
    zp = constant_of(producer.inputs[2]) if len(producer.inputs) > 2 and producer.inputs[2] is not None else np.zeros(1)
    if scale is None or zp is None:
        return None
    return scale.astype(np.float32), zp


def quantize_bias(model: ir.Model) -> PassReport:
    """Float biases of Conv/Gemm with a dequantized input and weight become int32 ->
    DequantizeLinear(s_x * s_w) (see the module doc); in place."""
    report = PassReport("bias")
    names = Names(model)
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
                continue
            bias = constant_of(node.inputs[2])
            x, w = _dq_operands(node.inputs[0]), _dq_operands(node.inputs[1])
            if bias is None or bias.dtype != np.float32 or x is None or w is None or x[0].size != 1:
                continue
            if node.op_type == "Gemm" and _attr(node, "transB", 0) == 0 and w[0].size > 1:
                report.skip(node.name, "per-column weight scale with transB=0")
                continue
            scale = (x[0].reshape(()) * w[0].reshape(-1)).astype(np.float32)
            if scale.size not in (1, bias.size) or not np.all(scale > 0):
                continue
            q = np.rint(bias / scale)
            if np.abs(q).max(initial=0) >= 2**31:
                report.skip(node.name, "bias too large for int32 at this scale")
                continue
            base = (node.inputs[2].name or node.name) + "_quantized"
            bq = add_initializer(graph, names, base, q.astype(np.int32))
            s = add_initializer(graph, names, base + "_scale", scale)
            z = add_initializer(graph, names, base + "_zero_point", np.zeros(scale.shape, np.int32))
            dq = ir.node("DequantizeLinear", [bq, s, z], attributes={"axis": 0},
                         name=names.fresh(base + "/DequantizeLinear"))
            dq.outputs[0].name = names.fresh(base + "_dequantized")
            graph.insert_before(node, dq)
            old = node.inputs[2]
            node.replace_input_with(2, dq.outputs[0])
            drop_unused_initializers(graph, [old])
            report.count("int32 bias")
    return report


def _clamps_at_zero(q: ir.Node) -> bool:
    """Whether QuantizeLinear ``q`` maps every x <= 0 to the code of 0.0: its zero point is
    the lowest code of its type, so Q(Relu(x)) == Q(x) for every x."""
    zp = constant_of(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else None
    lo = INT_RANGE.get(q_output_type(q), (None,))[0]
    return zp is not None and lo is not None and zp.size == 1 and int(zp.reshape(-1)[0]) == lo


def drop_relu_before_quantize(model: ir.Model) -> PassReport:
    """Relu whose only reader is a QuantizeLinear clamping at zero (see ``_clamps_at_zero``) is
    removed, exactly, so Conv -> Q can fuse into QLinearConv (PyTorch's fused ConvReLU)."""
    report = PassReport("relu")
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            if node.op_type != "Relu" or node.outputs[0].is_graph_output():
                continue
            uses = [u.node for u in node.outputs[0].uses()]
            if len(uses) != 1 or uses[0].op_type != "QuantizeLinear" or not _clamps_at_zero(uses[0]):
                continue
            uses[0].replace_input_with(0, node.inputs[0])
            graph.remove(node, safe=True)
            report.count("Relu absorbed by QuantizeLinear")
    return report


# Ops that commute with DequantizeLinear under a positive per-tensor scale: they move elements
# (or pick the largest, which dequantizing preserves).
MOVEMENT = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool")


def sink_dequantize(model: ir.Model) -> PassReport:
    """``DQ(x; s, z) -> Flatten|Reshape|Transpose|Squeeze|Unsqueeze|MaxPool`` with a positive
    per-tensor scale becomes ``the op on x -> DQ(s, z)``: the same numbers (the op moves or
    picks elements, and DQ is increasing), and the DequantizeLinear now sits right before the
    Conv/Gemm/MatMul the QOperator pass fuses (PyTorch's export leaves MaxPool and Flatten after
    the DequantizeLinear)."""
    from qtool.passes.graph import GraphBuilder

    report = PassReport("sink-dequantize")
    b = GraphBuilder(model)
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            dq = node.inputs[0].producer() if node.op_type in MOVEMENT and node.inputs[0] is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or node.outputs[0].is_graph_output():
                continue
            scale = constant_of(dq.inputs[1])
            if scale is None or scale.size != 1 or not scale.reshape(-1)[0] > 0 \
                    or len(list(dq.outputs[0].uses())) != 1:
                continue
            if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1] is not None:
                continue  # the Indices output has no integer form
            attrs = {k: a.value for k, a in node.attributes.items()}
            moved = b.node(node.op_type, [dq.inputs[0], *node.inputs[1:]], node.name or node.op_type,
                           attributes=attrs, dtype=dq.inputs[0].dtype)
            new_dq = b.node("DequantizeLinear", [moved.outputs[0], *dq.inputs[1:]], node.name or "dq",
                            dtype=node.outputs[0].dtype, shape=node.outputs[0].shape)
            graph.insert_before(node, [moved, new_dq])
            b.replace_uses(node.outputs[0], new_dq.outputs[0])
            graph.remove([node, dq], safe=True)
            report.count(f"DequantizeLinear moved after {node.op_type}")
    return report


def _same_dequantize(readers: list[ir.Node], value: ir.Value) -> bool:
    """Whether every reader is a DequantizeLinear of ``value`` with one positive per-tensor
    scale and zero point (so one DequantizeLinear can stand for them all)."""
    first = readers[0]
    if any(r.op_type != "DequantizeLinear" or r.inputs[0] is not value for r in readers):
        return False
    scale = constant_of(first.inputs[1])
    if scale is None or scale.size != 1 or not scale.reshape(-1)[0] > 0:
        return False

    def params(r: ir.Node) -> list:
        return [None if v is None else constant_of(v) for v in r.inputs[1:3]]

    ref = params(first)
    return all(all(a is None and b is None or a is not None and b is not None and np.array_equal(a, b)
                   for a, b in zip(params(r), ref, strict=False)) and len(r.inputs) == len(first.inputs)
               for r in readers)


def lift_dequantize(model: ir.Model) -> int:
    """The inverse of ``sink_dequantize``: ``op on x -> DQ`` becomes ``DQ(x) -> op`` for the
    same ops and per-tensor scales, so a dequantized graph has no integer MaxPool/Flatten left
    (QOperator models keep them on integers). Returns how many moved."""
    from qtool.passes.graph import GraphBuilder

    b = GraphBuilder(model)
    moved = 0
    changed = True
    while changed:
        changed = False
        for graph in iter_graphs(model.graph):
            for op in list(graph):
                readers = [u.node for u in op.outputs[0].uses()] if op.outputs else []
                if (op.op_type not in MOVEMENT or not readers or op.outputs[0].is_graph_output()
                        or len(op.outputs) > 1 or not _same_dequantize(readers, op.outputs[0])):
                    continue
                dq = readers[0]
                new_dq = b.node("DequantizeLinear", [op.inputs[0], *dq.inputs[1:]], op.name or "dq",
                                dtype=dq.outputs[0].dtype)
                moved_op = b.node(op.op_type, [new_dq.outputs[0], *op.inputs[1:]], op.name or op.op_type,
                                  attributes={k: a.value for k, a in op.attributes.items()},
                                  dtype=dq.outputs[0].dtype, shape=dq.outputs[0].shape)
                graph.insert_before(op, [new_dq, moved_op])
                for reader in readers:
                    b.replace_uses(reader.outputs[0], moved_op.outputs[0])
                graph.remove([*readers, op], safe=True)
                moved += 1
                changed = True
    return moved


def share_identity_constants(model: ir.Model) -> PassReport:
    """Identity(constant) -> the constant itself (PyTorch's export shares a zero point through
    Identity nodes), so every pass sees the scale or zero point as the constant it is."""
    from qtool.passes.graph import constant_tensor, replace_uses

    report = PassReport("identity")
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            if (node.op_type != "Identity" or node.outputs[0].is_graph_output()
                    or constant_tensor(node.inputs[0]) is None):
                continue
            replace_uses(node.outputs[0], node.inputs[0])
            graph.remove(node, safe=True)
            report.count("Identity of a constant removed")
    return report


def _dequantized_constant(dq: ir.Node) -> np.ndarray | None:
    """What a DequantizeLinear of constants computes: ``(q - zero_point) * scale``."""
    q = constant_of(dq.inputs[0])
    scale = constant_of(dq.inputs[1])
    if q is None or scale is None:
        return None
    zp = constant_of(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    axis, block = _attr(dq, "axis", 1), _attr(dq, "block_size", 0)
    centred = q.astype(np.int32) - (0 if zp is None else _broadcast(zp.astype(np.int32), q.shape, axis, block))
    return (centred.astype(np.float32) * _broadcast(scale.astype(np.float32), q.shape, axis, block)).astype(np.float32)


def _fold_cast_dequant(graph: ir.Graph, names: Names, report: PassReport) -> None:
    """int weight -> Cast -> [Sub] -> Mul(scale) becomes the float constant it computes
    (numpy broadcasting is ONNX's)."""
    from qtool.passes.graph import replace_uses
    from qtool.quantized import match_cast_dequant

    for node in list(graph):
        cd = match_cast_dequant(node)
        if cd is None:
            continue
        w = constant_of(cd.weight).astype(np.float32)
        if cd.zero_point is not None:
            w = w - constant_of(cd.zero_point).astype(np.float32)
        values = (w * constant_of(cd.scale).astype(np.float32)).astype(np.float32)
        new = add_initializer(graph, names, (cd.weight.name or "weight") + "_float", values)
        replace_uses(cd.mul.outputs[0], new, names)
        for dead in (cd.mul, cd.sub, cd.cast):
            if dead is not None and not any(o.uses() or o.is_graph_output() for o in dead.outputs):
                inputs = list(dead.inputs)
                graph.remove(dead, safe=True)
                drop_unused_initializers(graph, [v for v in inputs if v is not None])
        report.count("Cast/Mul weight dequantized")


def dequantize(model: ir.Model) -> PassReport:
    """A QDQ / fake-quant graph back to float, in place (see the module doc). Integer
    operators (QOperator, dynamic, MatMulNBits) are left alone and listed under ``skipped``."""
    from qtool.quantized import INTEGER_COMPUTE

    fold_fake_quant(model)  # fake-quant weights first become integer -> DQ, handled below
    report = PassReport("dequantize")
    if moved := lift_dequantize(model):
        report.count("DequantizeLinear moved before MaxPool/Flatten/...", moved)
    names = Names(model)
    for graph in iter_graphs(model.graph):
        _fold_cast_dequant(graph, names, report)
        for node in list(graph):
            if node.op_type in INTEGER_COMPUTE or node.op_type.startswith("QLinear"):
                report.skip(node.name or node.op_type, f"{node.op_type} is an integer operator")
            if node.op_type != "DequantizeLinear":
                continue
            source = node.inputs[0]
            values = _dequantized_constant(node)
            if values is not None:
                new = add_initializer(graph, names, (source.name or "weight") + "_float", values)
            elif source.producer() is not None and source.producer().op_type == "QuantizeLinear":
                new = _clamped_input(source.producer(), names, report)
            else:
                report.skip(node.name or "DequantizeLinear", "input is neither constant nor quantized here")
                continue
            _bypass(node, new, names)
            report.count("constant dequantized" if values is not None else "activation pair removed")
    _remove_dead_quantize(model)
    return report


def _clamped_input(q: ir.Node, names: Names, report: PassReport) -> ir.Value:
    """The float value a QuantizeLinear reads, through a Relu when the QuantizeLinear clamps at
    zero and nothing before it does: quantizers fold a Relu into the Q range (zero point at the
    type's lowest code), and dropping the pair must not drop the Relu with it."""
    x = q.inputs[0]
    before = x.producer()
    if not _clamps_at_zero(q) or (before is not None and before.op_type in ("Relu", "Clip")):
        return x
    # The Q then reads the Relu: its other DequantizeLinear readers find it and add no second one.
    relu = ir.node("Relu", [x], name=names.fresh((q.name or "q") + "/Relu"))
    relu.outputs[0].name = names.fresh((x.name or "x") + "_relu")
    if x.type is not None:
        relu.outputs[0].type, relu.outputs[0].shape = x.type, x.shape
    q.graph.insert_before(q, relu)
    q.replace_input_with(0, relu.outputs[0])
    report.count("Relu restored (folded into a QuantizeLinear)")
    return relu.outputs[0]


def _bypass(dq: ir.Node, new: ir.Value, names: Names) -> None:
    from qtool.passes.graph import replace_uses

    out = dq.outputs[0]
    replace_uses(out, new, names)
    graph = dq.graph
    inputs = list(dq.inputs)
    graph.remove(dq, safe=True)
    drop_unused_initializers(graph, [v for v in inputs if v is not None])


def _remove_dead_quantize(model: ir.Model) -> None:
    for graph in iter_graphs(model.graph):
        for node in reversed(list(graph)):
            if any(o.uses() or o.is_graph_output() for o in node.outputs):
                continue
            source = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
            if node.op_type == "QuantizeLinear" or (
                    node.op_type == "Clip" and source is not None and source.op_type == "QuantizeLinear"):
                inputs = list(node.inputs)
                graph.remove(node, safe=True)
                drop_unused_initializers(graph, [v for v in inputs if v is not None])
