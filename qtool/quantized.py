"""Recognise a model that is already quantized: which schemes it uses, at which bit widths,
and how much of it is still float.

One reading of the graph, shared by ``qtool inspect`` (the report) and ``qtool convert``
(which refuses to quantize twice, or folds / re-targets / requantizes on request). The
schemes, by what marks them in the graph:

    qdq         integer weight initializer -> DequantizeLinear -> Conv/MatMul/Gemm
    fake-quant  FLOAT weight initializer -> QuantizeLinear [-> Clip] -> DequantizeLinear
                -> Conv/MatMul/Gemm (PyTorch QAT export, NNCF, ModelOpt, Brevitas "QCDQ")
    qoperator   QLinearConv, QLinearMatMul, QGemm, QLinearAdd... (integer in, integer out)
    dynamic     DynamicQuantizeLinear + MatMulInteger/ConvInteger, DynamicQuantizeMatMul,
                MatMulIntegerToFloat, DynamicQuantizeLSTM
    matmulnbits MatMulNBits, GatherBlockQuantized (2-8 bit weight blocks)
    cast-dequant integer weight initializer -> Cast -> [Sub(zero point)] -> Mul(scale) ->
                MatMul/Gemm/Gather (int8 weights dequantized by plain ops, as some exporters
                ship "int8" transformers)

Only graph structure and tensor metadata are read (plus the scalars of a Clip between a
QuantizeLinear and its DequantizeLinear): weights kept as external data stay on disk.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

from qtool.model import iter_nodes

# Ops that only a quantized model holds (QDQ pairs, integer kernels, low-bit blocks).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "DynamicQuantizeLSTM", "MatMulNBits", "GatherBlockQuantized", "QGemm", "QLinearAdd",
    "QLinearMul", "QAttention", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
})
FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather"})
RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
# Integer compute ops: scheme and the input index of their weight.
INTEGER_COMPUTE: dict[str, tuple[str, int]] = {
    "QLinearConv": ("qoperator", 3), "QLinearMatMul": ("qoperator", 3), "QGemm": ("qoperator", 3),
    "QAttention": ("qoperator", 1),
    "MatMulInteger": ("dynamic", 1), "ConvInteger": ("dynamic", 1),
    "DynamicQuantizeMatMul": ("dynamic", 1), "MatMulIntegerToFloat": ("dynamic", 1),
    "DynamicQuantizeLSTM": ("dynamic", 1),
    "MatMulNBits": ("matmulnbits", 1), "GatherBlockQuantized": ("matmulnbits", 0),
}
DTYPE_BITS = {
    ir.DataType.INT8: 8, ir.DataType.UINT8: 8, ir.DataType.INT16: 16, ir.DataType.UINT16: 16,
    ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT32: 32,
    ir.DataType.FLOAT8E4M3FN: 8, ir.DataType.FLOAT8E4M3FNUZ: 8, ir.DataType.FLOAT8E5M2: 8,
    ir.DataType.FLOAT8E5M2FNUZ: 8,
}
SCHEME_ORDER = ("fake-quant", "qdq", "qoperator", "dynamic", "matmulnbits", "cast-dequant")
INTEGER_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4,
                           ir.DataType.INT16, ir.DataType.UINT16})


def dtype_name(dtype: ir.DataType | None) -> str:
    return dtype.name.lower() if dtype is not None else "?"


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    """An initializer (not a graph input) or a Constant node's tensor; None otherwise."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Identity" and producer.domain in ("", "ai.onnx"):
        return _const(producer.inputs[0])  # PyTorch's export shares a constant through Identity
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        try:
            return ir.convenience.get_const_tensor(value)
        except ValueError:
            return None
    return None


def q_output_type(q: ir.Node) -> ir.DataType:
    """The integer type a QuantizeLinear produces: its zero point's, its ``output_dtype``
    attribute (opset 21), else uint8 (the spec's default)."""
    if len(q.inputs) > 2 and q.inputs[2] is not None and q.inputs[2].dtype is not None:
        return q.inputs[2].dtype
    attr = q.attributes.get("output_dtype")
    if attr is not None and attr.value:
        return ir.DataType(attr.value)
    return q.outputs[0].dtype or ir.DataType.UINT8


@dataclass(frozen=True)
class FakeQuantWeight:
    """FLOAT weight -> QuantizeLinear [-> Clip(lo, hi)] -> DequantizeLinear(s): one weight whose
    integer values the graph recomputes on every run. ``clip``: the integer range a Clip between
    Q and DQ narrows it to (Brevitas' QCDQ export of sub-8-bit weights), or None."""

    weight: ir.Value
    quantize: ir.Node
    clip: ir.Node | None
    clip_range: tuple[int, int] | None
    dequantize: tuple[ir.Node, ...]

    @property
    def dtype(self) -> ir.DataType:
        return q_output_type(self.quantize)

    @property
    def bits(self) -> int:
        if self.clip_range is not None:
            lo, hi = self.clip_range
            return max(1, math.ceil(math.log2(hi - lo + 1)))
        return DTYPE_BITS.get(self.dtype, 8)

    @property
    def type_name(self) -> str:
        """``int8``, ``uint8``, ``int4``... (the range a Clip narrows to, when there is one)."""
        if self.clip_range is None:
            return dtype_name(self.dtype)
        return f"{'int' if self.clip_range[0] < 0 else 'uint'}{self.bits}"


def _clip_range(clip: ir.Node) -> tuple[int, int] | None:
    bounds = []
    for i in (1, 2):
        t = _const(clip.inputs[i]) if i < len(clip.inputs) else None
        if t is None or t.size != 1:
            return None
        bounds.append(int(t.numpy().reshape(-1)[0]))
    return bounds[0], bounds[1]


def match_fake_quant(q: ir.Node) -> FakeQuantWeight | None:
    """The fake-quant pattern starting at QuantizeLinear ``q``, or None. Every reader of the
    quantized value must be a DequantizeLinear (through one Clip at most), and the input a
    float constant: otherwise folding would change what some reader sees."""
    if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
        return None
    weight = q.inputs[0]
    tensor = _const(weight)
    if tensor is None or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16,
                                              ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
        return None
    out = q.outputs[0]
    if out.is_graph_output():
        return None
    uses = [u.node for u in out.uses()]
    clip, clip_range = None, None
    if len(uses) == 1 and uses[0].op_type == "Clip":
        clip = uses[0]
        clip_range = _clip_range(clip)
        if clip_range is None or clip.outputs[0].is_graph_output():
            return None
        uses = [u.node for u in clip.outputs[0].uses()]
    if not uses or any(n.op_type != "DequantizeLinear" or n.inputs[0] is not (clip or q).outputs[0]
                       for n in uses):
        return None
    return FakeQuantWeight(weight, q, clip, clip_range, tuple(uses))


@dataclass(frozen=True)
class CastDequantWeight:
    """int weight -> Cast(float) -> [Sub(zero point)] -> Mul(scale): a weight stored as integers
    and dequantized by plain ops. ``zero_point`` is None without the Sub."""

    weight: ir.Value
    cast: ir.Node
    sub: ir.Node | None
    mul: ir.Node
    zero_point: ir.Value | None
    scale: ir.Value


def match_cast_dequant(mul: ir.Node) -> CastDequantWeight | None:
    """The cast-dequant pattern ending at Mul ``mul`` (constant operands only), or None."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2:
        return None
    for i in (0, 1):
        scale, x = mul.inputs[1 - i], mul.inputs[i]
        if x is None or _const(scale) is None:
            continue
        node = x.producer()
        sub, zp = None, None
        if node is not None and node.op_type == "Sub" and _const(node.inputs[1]) is not None:
            sub, zp = node, node.inputs[1]
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if node is None or node.op_type != "Cast":
            continue
        weight = _const(node.inputs[0])
        if weight is not None and weight.dtype in INTEGER_TYPES:
            return CastDequantWeight(node.inputs[0], node, sub, mul, zp, scale)
    return None


def fake_quant_weights(model: ir.Model) -> list[FakeQuantWeight]:
    """Every fake-quant weight of ``model`` (subgraphs included), in graph order."""
    found = []
    for node in iter_nodes(model):
        match = match_fake_quant(node)
        if match is not None:
            found.append(match)
    return found


@dataclass
class Tally:
    """Compute nodes of one kind, their weight parameters and multiply-accumulates."""

    nodes: int = 0
    params: int = 0
    macs: int = 0

    def add(self, params: int, macs: int) -> None:
        self.nodes += 1
        self.params += params
        self.macs += macs


@dataclass
class Recognition:
    """What ``recognize`` found. ``compute``: per kind ("float" or a scheme), the compute
    nodes, weight parameters and MACs per sample (symbolic dimensions counted as 1);
    ``weight_types`` / ``activation_types``: integer types by tensor count; ``ops``: the
    quantized op histogram."""

    compute: dict[str, Tally] = field(default_factory=dict)
    weight_types: Counter = field(default_factory=Counter)
    activation_types: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    fake_quant: int = 0

    @property
    def quantized(self) -> bool:
        return bool(self.ops) or bool(self.compute.get("cast-dequant", Tally()).nodes)

    @property
    def schemes(self) -> list[str]:
        """The schemes present, weights-heaviest first (activation-only QDQ counts as qdq)."""
        found = {k: t for k, t in self.compute.items() if k != "float" and t.nodes}
        if not found and self.ops:
            found = {"qdq": Tally()}
        return sorted(found, key=lambda k: (-found[k].params, SCHEME_ORDER.index(k)))

    def _share(self, attr: str) -> float | None:
        total = sum(getattr(t, attr) for t in self.compute.values())
        return None if total == 0 else getattr(self.compute.get("float", Tally()), attr) / total

    @property
    def float_weight_share(self) -> float | None:
        return self._share("params")

    @property
    def float_mac_share(self) -> float | None:
        return self._share("macs")

    def summary(self) -> str:
        """One line: "fake-quant: 3 weights int8 (per-channel), activations uint8; 12% of
        weights still float" (empty for a float model)."""
        if not self.quantized:
            return ""
        parts = [", ".join(self.schemes)]
        if self.weight_types:
            parts.append("weights " + ", ".join(f"{n} {t}" for t, n in self.weight_types.most_common()))
        if self.activation_types:
            parts.append("activations " + ", ".join(sorted(self.activation_types)))
        share = self.float_weight_share
        if share is not None:
            parts.append(f"{share:.0%} of weights and {self.float_mac_share or 0:.0%} of MACs still float")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "quantized": self.quantized,
            "schemes": self.schemes,
            "ops": dict(self.ops.most_common()),
            "weight_types": dict(self.weight_types.most_common()),
            "activation_types": dict(self.activation_types.most_common()),
            "fake_quant_weights": self.fake_quant,
            "compute": {k: vars(t) for k, t in sorted(self.compute.items())},
            "float_weight_share": _rounded(self.float_weight_share),
            "float_mac_share": _rounded(self.float_mac_share),
            "summary": self.summary(),
        }


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _size(value: ir.Value | None) -> int:
    """Elements of a value from its static shape (symbolic dimensions count 1), or 0."""
    if value is None or value.shape is None:
        t = _const(value) if value is not None else None
        return t.size if t is not None else 0
    return math.prod(d if isinstance(d, int) else 1 for d in value.shape)


def _positions(node: ir.Node, weight_params: int, weight: ir.Value | None) -> int:
    """How many times a weight is applied per sample: output elements / output channels."""
    out = node.outputs[0] if node.outputs else None
    if out is None or out.shape is None or weight is None or weight.shape is None or not len(weight.shape):
        return 1
    elems = _size(out)
    shape = out.shape
    if shape and isinstance(shape[0], int) and len(shape) > 1:
        elems //= max(shape[0], 1)  # per sample: the batch dimension out
    channels = weight.shape[-1] if node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul") else weight.shape[0]
    return max(1, elems // channels) if isinstance(channels, int) and channels else 1


def _weight_origin(value: ir.Value | None) -> tuple[str, str | None, ir.Value] | None:
    """("fake-quant" | "qdq" | "float", integer type name, the stored constant) for a weight
    input, None when the input is an activation."""
    if value is None:
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        source = producer.inputs[0]
        up = source.producer() if source is not None else None
        if up is not None and up.op_type == "Clip":
            up = up.inputs[0].producer() if up.inputs[0] is not None else None
        if up is not None and (fq := match_fake_quant(up)) is not None:
            return "fake-quant", fq.type_name, fq.weight
        if _const(source) is not None:
            return "qdq", dtype_name(source.dtype), source
        return None  # a dequantized activation (MatMul of two activations)
    if producer is not None and (cd := match_cast_dequant(producer)) is not None:
        return "cast-dequant", dtype_name(cd.weight.dtype), cd.weight
    tensor = _const(value)
    if tensor is not None and tensor.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return "float", None, value
    return None


def _integer_weight(node: ir.Node, index: int) -> tuple[int, str]:
    """(parameters, type name) of an integer op's weight; packed blocks counted unpacked."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if node.op_type == "MatMulNBits":
        k, n = node.attributes["K"].value, node.attributes["N"].value
        bits = node.attributes["bits"].value if "bits" in node.attributes else 4
        return k * n, f"uint{bits}"
    params = _size(value)
    if node.op_type == "GatherBlockQuantized":
        bits = node.attributes["bits"].value if "bits" in node.attributes else 4
        if value is not None and value.dtype == ir.DataType.UINT8:
            params = params * 8 // bits
        return params, f"{'uint' if value is not None and value.dtype == ir.DataType.UINT8 else 'int'}{bits}"
    if node.op_type == "DynamicQuantizeLSTM" and len(node.inputs) > 2:
        params += _size(node.inputs[2])
    return params, dtype_name(value.dtype if value is not None else None)


def _tally_node(node: ir.Node, found: Recognition) -> None:
    """Add one compute node to ``found`` (float, or the scheme its weight is stored in)."""
    if node.op_type in INTEGER_COMPUTE:
        scheme, index = INTEGER_COMPUTE[node.op_type]
        params, type_name = _integer_weight(node, index)
        weight = node.inputs[index] if index < len(node.inputs) else None
        if node.op_type != "DynamicQuantizeLSTM":
            found.weight_types[type_name] += 1
        else:
            found.weight_types[type_name] += 2
        macs = 0 if node.op_type == "GatherBlockQuantized" else params * _positions(node, params, weight)
        found.compute.setdefault(scheme, Tally()).add(params, macs)
        return
    if node.op_type in RECURRENT:
        params = sum(_size(node.inputs[i]) for i in (1, 2) if i < len(node.inputs))
        found.compute.setdefault("float", Tally()).add(params, params)
        return
    index = 0 if node.op_type == "Gather" else 1
    weight = node.inputs[index] if index < len(node.inputs) else None
    origin = _weight_origin(weight)
    if origin is None:
        return  # activation x activation (attention scores) or a non-constant Gather table
    kind, type_name, stored = origin
    params = _size(stored)
    macs = 0 if node.op_type == "Gather" else params * _positions(node, params, stored)
    found.compute.setdefault(kind, Tally()).add(params, macs)
    if type_name is not None:
        found.weight_types[type_name] += 1


def recognize(model: ir.Model) -> Recognition:
    """What in ``model`` is quantized, how, and how much is still float (see the module doc)."""
    found = Recognition()
    for node in iter_nodes(model):
        if node.domain in ("", "ai.onnx", "com.microsoft") and node.op_type in QUANTIZED_OPS:
            found.ops[node.op_type] += 1
        if node.op_type in FLOAT_COMPUTE or node.op_type in INTEGER_COMPUTE or node.op_type in RECURRENT:
            _tally_node(node, found)
        if node.op_type == "QuantizeLinear":
            if match_fake_quant(node) is not None:
                found.fake_quant += 1
            elif _const(node.inputs[0]) is None:
                found.activation_types[dtype_name(q_output_type(node))] += 1
        elif node.op_type in ("DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"):
            found.activation_types["uint8 (dynamic)"] += 1
        elif node.op_type == "MatMulNBits" and "accuracy_level" in node.attributes \
                and node.attributes["accuracy_level"].value == 4:
            found.activation_types["int8 (accuracy_level 4)"] += 1
    return found
