"""Structural checks of a QDQ model against the rules a runtime documents (QNN, TensorRT).

Neither runtime runs here, so a preset for them is held to what their documentation says a
QDQ model must look like. Each rule has an id, the rule in one line, and where it is
documented; ``check(model, target)`` returns every violation with the node that breaks it,
``require(model, target)`` raises ConversionError naming the first rules broken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.errors import ConversionError
from qtool.model import iter_nodes

QDQ = ("QuantizeLinear", "DequantizeLinear")
_EIGHT_BIT = (ir.DataType.UINT8, ir.DataType.INT8)
_WIDE = (ir.DataType.UINT16, ir.DataType.INT16, ir.DataType.UINT4, ir.DataType.INT4)


@dataclass(frozen=True)
class Rule:
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class Violation:
    rule: Rule
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule.id} at {self.node}: {self.detail} (rule: {self.rule.text}; {self.rule.source})"


_ORT_QNN = "onnxruntime quantization/execution_providers/qnn/quant_config.py (get_qnn_qdq_config)"
_QNN_DOC = "onnxruntime docs, QNN Execution Provider"
_TRT_DOC = "TensorRT developer guide, Working with Quantized Types: Explicit Quantization"

QNN_RULES = {
    "QNN-MATMUL-PER-TENSOR": Rule("QNN-MATMUL-PER-TENSOR", "MatMul weights are quantized per tensor",
                                  _ORT_QNN + ': "QNN does not support per-channel MatMul"'),
    "QNN-PER-CHANNEL-OPS": Rule("QNN-PER-CHANNEL-OPS",
                                "per-channel weights only on Conv (axis 0) and ConvTranspose (axis 1), and their bias (axis 0)",
                                _ORT_QNN + " (the per_channel option's op and axis list)"),
    "QNN-PER-CHANNEL-SYMMETRIC": Rule("QNN-PER-CHANNEL-SYMMETRIC",
                                      "per-channel weights are signed and symmetric (zero point 0)",
                                      _ORT_QNN + " (weight_symmetric for signed weight types); " + _QNN_DOC),
    "QNN-WIDE-TYPES-DOMAIN": Rule("QNN-WIDE-TYPES-DOMAIN",
                                  "16-bit and 4-bit Q/DQ below opset 21 use the com.microsoft domain",
                                  _ORT_QNN + ' ("ONNX opset < 21 does not support 16-bit quantization")'),
    "QNN-SIGMOID-TANH-16": Rule("QNN-SIGMOID-TANH-16",
                                "a 16-bit Sigmoid/Tanh output has QNN's fixed scale and zero point "
                                "(Sigmoid u16 1/65536, 0; Tanh u16 1/32768, 32768; s16 1/32768, 0)",
                                _ORT_QNN + " (_process_sigmoid, _process_tanh)"),
    "QNN-ACTIVATION-TYPES": Rule("QNN-ACTIVATION-TYPES", "activations are 8- or 16-bit integers",
                                 _QNN_DOC + " (HTP runs 8-bit and 16-bit quantized networks)"),
}

TRT_RULES = {
    "TRT-SYMMETRIC": Rule("TRT-SYMMETRIC", "Q/DQ zero points are 0 (symmetric quantization only)",
                          _TRT_DOC + ': "symmetric uniform quantization"; IQuantizeLayer zero point must be 0'),
    "TRT-SIGNED-INT8": Rule("TRT-SIGNED-INT8", "Q/DQ use signed INT8 (no uint8, 16-bit or int32 Q/DQ; "
                            "int4 only for weights)", _TRT_DOC + ': "quantized values are represented in signed INT8"'),
    "TRT-PER-CHANNEL-WEIGHTS": Rule("TRT-PER-CHANNEL-WEIGHTS",
                                    "per-channel scales only on constant weights, along the output-channel axis",
                                    _TRT_DOC + " (per-channel quantization is for weights; activations per tensor)"),
    "TRT-OPSET": Rule("TRT-OPSET", "per-axis Q/DQ needs opset >= 13",
                      "ONNX QuantizeLinear-13 introduced the axis attribute; TensorRT's ONNX parser reads opset 13+ Q/DQ"),
    "TRT-SCALE": Rule("TRT-SCALE", "Q/DQ scales are positive and finite", _TRT_DOC),
}

# The output-channel axis of each weighted op's weight (input 1), as the runtimes read it.
_OUTPUT_AXIS = {"Conv": 0, "ConvTranspose": 1}
# (op, input) -> the per-channel axis QNN accepts: weights and their int32 bias (axis 0).
_QNN_PER_CHANNEL = {("Conv", 1): 0, ("ConvTranspose", 1): 1, ("Conv", 2): 0, ("ConvTranspose", 2): 0}
_SIGNED = (ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT4, ir.DataType.INT32)


def _weight_axis(op: ir.Node, index: int, ndim: int) -> int | None:
    """The output-channel axis of input ``index`` of ``op`` (None: not a weight input)."""
    if index != 1:
        return None
    if op.op_type in _OUTPUT_AXIS:
        return _OUTPUT_AXIS[op.op_type]
    if op.op_type == "MatMul":
        return ndim - 1
    if op.op_type == "Gemm":
        return 0 if op.attributes.get_int("transB", 0) else 1
    return None


@dataclass
class _QDQ:
    """One Q or DQ node and what the checks need to know about it."""

    node: ir.Node
    qtype: ir.DataType | None
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int | None
    weight_of: list[tuple[ir.Node, int]]  # (consumer, input index) when a DQ of a constant

    @property
    def name(self) -> str:
        return self.node.name or self.node.op_type


def _const(node: ir.Node, index: int) -> np.ndarray | None:
    t = ops.constant_weight(node, index)
    return None if t is None else t.numpy()


def _qdq_nodes(model: ir.Model) -> Iterator[_QDQ]:
    for node in iter_nodes(model):
        if node.op_type not in QDQ:
            continue
        scale, zp = _const(node, 1), _const(node, 2)
        zp_t = ops.constant_weight(node, 2)
        if zp_t is not None:  # the zero point's type is the quantized type
            qtype = zp_t.dtype
        elif node.op_type == "QuantizeLinear":
            qtype = node.outputs[0].dtype
        else:
            qtype = node.inputs[0].dtype if node.inputs[0] is not None else None
        per_axis = scale is not None and scale.ndim == 1 and scale.size > 1
        axis = node.attributes.get_int("axis", 1) if per_axis else None
        weight_of = []
        if node.op_type == "DequantizeLinear" and ops.constant_weight(node, 0) is not None:
            weight_of = [(u.node, u.idx) for u in node.outputs[0].uses()]
        yield _QDQ(node, qtype, scale, zp, axis, weight_of)


def _wide(q: _QDQ) -> bool:
    return q.qtype in _WIDE


def check_qnn(model: ir.Model) -> list[Violation]:
    """Violations of the QNN EP's documented QDQ rules (QNN_RULES)."""
    r, out = QNN_RULES, []
    opset = model.opset_imports.get("", 0)
    for q in _qdq_nodes(model):
        if _wide(q) and opset < 21 and q.node.domain != "com.microsoft":
            out.append(Violation(r["QNN-WIDE-TYPES-DOMAIN"], q.name, f"{q.qtype.name} Q/DQ in the ai.onnx domain at opset {opset}"))
        if q.qtype is not None and q.qtype not in _EIGHT_BIT + _WIDE and not q.weight_of:
            out.append(Violation(r["QNN-ACTIVATION-TYPES"], q.name, f"activation Q/DQ of type {q.qtype.name}"))
        if q.axis is None:
            continue
        for op, index in q.weight_of or [(None, -1)]:
            if op is not None and op.op_type == "MatMul":
                out.append(Violation(r["QNN-MATMUL-PER-TENSOR"], op.name or "MatMul", f"weight {q.name} is per-channel"))
            elif op is None or q.axis != _QNN_PER_CHANNEL.get((op.op_type, index)):
                where = "an activation" if op is None else f"{op.op_type} input {index}"
                out.append(Violation(r["QNN-PER-CHANNEL-OPS"], q.name, f"per-channel (axis {q.axis}) on {where}"))
        if q.qtype not in _SIGNED or (
                q.zero_point is not None and np.any(q.zero_point != 0)):
            out.append(Violation(r["QNN-PER-CHANNEL-SYMMETRIC"], q.name,
                                 f"per-channel {q.qtype.name if q.qtype else '?'} weight with non-zero zero points"
                                 if q.zero_point is not None and np.any(q.zero_point != 0)
                                 else f"per-channel weight of unsigned type {q.qtype.name if q.qtype else '?'}"))
    out.extend(_qnn_fixed_outputs(model))
    return out


# (op, Q type) -> (scale, zero point) QNN fixes for 16-bit outputs.
_FIXED_16 = {
    ("Sigmoid", ir.DataType.UINT16): (1.0 / 65536.0, 0),
    ("Sigmoid", ir.DataType.INT16): (1.0 / 32768.0, 0),
    ("Tanh", ir.DataType.UINT16): (1.0 / 32768.0, 32768),
    ("Tanh", ir.DataType.INT16): (1.0 / 32768.0, 0),
}


def _qnn_fixed_outputs(model: ir.Model) -> list[Violation]:
    out = []
    for node in iter_nodes(model):
        if node.op_type not in ("Sigmoid", "Tanh"):
            continue
        for use in node.outputs[0].uses():
            q = use.node
            if q.op_type != "QuantizeLinear":
                continue
            zp_t = ops.constant_weight(q, 2)
            qtype = zp_t.dtype if zp_t is not None else q.outputs[0].dtype
            want = _FIXED_16.get((node.op_type, qtype))
            scale, zp = _const(q, 1), _const(q, 2)
            if want is None or scale is None:
                continue
            zp_v = 0 if zp is None else int(np.asarray(zp).reshape(-1)[0])
            if not np.isclose(float(np.asarray(scale).reshape(-1)[0]), want[0], rtol=1e-6, atol=0.0) or zp_v != want[1]:
                out.append(Violation(QNN_RULES["QNN-SIGMOID-TANH-16"], q.name or "QuantizeLinear",
                                     f"{node.op_type} output quantized with scale {float(np.asarray(scale).reshape(-1)[0]):g}, "
                                     f"zero point {zp_v}; QNN needs {want[0]:g}, {want[1]}"))
    return out


def check_tensorrt(model: ir.Model) -> list[Violation]:
    """Violations of TensorRT's documented explicit-quantization rules (TRT_RULES)."""
    r, out = TRT_RULES, []
    opset = model.opset_imports.get("", 0)
    for q in _qdq_nodes(model):
        if q.zero_point is not None and np.any(q.zero_point != 0):
            out.append(Violation(r["TRT-SYMMETRIC"], q.name, "non-zero zero point"))
        signed_ok = q.qtype == ir.DataType.INT8 or (q.qtype == ir.DataType.INT4 and q.weight_of)
        if q.qtype is not None and not signed_ok:
            out.append(Violation(r["TRT-SIGNED-INT8"], q.name, f"Q/DQ of type {q.qtype.name}"))
        if q.scale is not None and not (np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)):
            out.append(Violation(r["TRT-SCALE"], q.name, "a scale that is zero, negative or not finite"))
        if q.axis is None:
            continue
        if opset < 13:
            out.append(Violation(r["TRT-OPSET"], q.name, f"per-axis Q/DQ at opset {opset}"))
        for op, index in q.weight_of or [(None, -1)]:
            w = ops.constant_weight(q.node, 0)
            ndim = len(w.shape) if w is not None else 0
            want = None if op is None else _weight_axis(op, index, ndim)
            if want is None or q.axis % max(ndim, 1) != want:
                where = "an activation" if op is None else f"{op.op_type} input {index}"
                out.append(Violation(r["TRT-PER-CHANNEL-WEIGHTS"], q.name,
                                     f"per-channel axis {q.axis} on {where}" + (f" (needs axis {want})" if want is not None else "")))
    return out


VALIDATORS: dict[str, Callable[[ir.Model], list[Violation]]] = {"qnn": check_qnn, "tensorrt": check_tensorrt}


def check(model: ir.Model, target: str) -> list[Violation]:
    """Every violation of ``target``'s documented rules in ``model`` ([] for targets without a
    validator: those are measured instead)."""
    fn = VALIDATORS.get(target)
    return [] if fn is None else fn(model)


def require(model: ir.Model, target: str) -> None:
    """ConversionError naming the broken rules when ``model`` violates ``target``'s rules."""
    found = check(model, target)
    if not found:
        return
    rules = sorted({v.rule.id for v in found})
    shown = "; ".join(str(v) for v in found[:3])
    more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
    raise ConversionError(
        f"the model breaks {target} rule{'s' if len(rules) > 1 else ''} {', '.join(rules)}: {shown}{more}",
        f"exclude the nodes named (--exclude NAME) or convert for another --target; "
        f"`qtool.targets.validate.check(model, '{target}')` lists every violation",
    )
