"""Affine folds: BatchNorm, constant scales and shifts, and zero padding, moved into a layer.

Each saves an op that would otherwise run on its own in the quantized graph (an elementwise
quantized op, or a float op between a DequantizeLinear and a QuantizeLinear):

- BatchNormalization into the Conv / ConvTranspose / Gemm / MatMul(+Add) before it;
- Mul/Add by a per-channel constant into the Conv before it, or (unpadded) after it;
- Div by a constant into a Mul that merges with the next Mul by a constant;
- Pad of zeros into the Conv after it.

Arithmetic is in float64, stored back in the weight's dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool.passes.graph import constant_of, replace_uses
from qtool.passes.preprocess.constants import FOLD_MAX_GROWTH_BYTES
from qtool.passes.preprocess.driver import (
    APPLIED,
    Outcome,
    RuleContext,
    attr,
    only_consumer,
    take_over_output,
)


def _optional_constant(node: ir.Node, index: int) -> tuple[ir.Value | None, np.ndarray | None] | None:
    """(value, data) of the optional input ``index``: (None, None) when the node has none,
    None when it has one that is not a constant."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return None, None
    data = constant_of(value)
    return None if data is None else (value, data)


# --------------------------------------------------------------------------- BatchNorm


def fold_batchnorm_node(node: ir.Node, ctx: RuleContext) -> Outcome:
    """Fold BatchNormalization into the Conv / ConvTranspose / Gemm / MatMul(+Add) before it.

    With s = gamma / sqrt(var + eps) per output channel c, BN(y) = s * (y - mean) + beta,
    and y = W * x + b, the folded layer is W'[c] = s[c] * W[c], b'[c] = s[c] * (b[c] - mean[c])
    + beta[c] (b = 0 when the layer has no bias; a bias is created). Arithmetic is in float64,
    stored back in the weight's dtype.
    """
    x = node.inputs[0]
    producer = x.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    anchor = producer
    if producer.op_type == "Add" and matmul_of_add(producer) is not None:
        anchor = producer
    elif producer.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None
    if attr(node, "training_mode", 0):
        return "training_mode is set"
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return "running mean/var outputs are used"
    if producer.graph is not node.graph:
        return "producer is in another graph"
    if not only_consumer(x, node):
        return f"{producer.op_type} output has other consumers"
    params = [constant_of(v) for v in node.inputs[1:5]]
    if any(p is None for p in params):
        return "scale/bias/mean/var are not constants"
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    eps = float(attr(node, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale  # BN(y) = scale * y + shift

    if anchor.op_type in ("Conv", "ConvTranspose"):
        result = fold_into_conv(anchor, scale, shift, ctx)
    elif anchor.op_type == "Gemm":
        result = _fold_into_gemm(anchor, scale, shift, ctx)
    else:
        result = _fold_into_matmul(anchor, scale, shift, ctx)
    if isinstance(result, str):
        return result
    take_over_output(node, result, absorbed_by=ctx)
    return APPLIED




def matmul_of_add(add: ir.Node) -> ir.Node | None:
    """The MatMul feeding ``add`` when the other Add input is a constant, else None."""
    for i in (0, 1):
        a, b = add.inputs[i], add.inputs[1 - i]
        prod = a.producer() if a is not None else None
        if prod is not None and prod.op_type == "MatMul" and constant_of(b) is not None:
            return prod
    return None


def _scaled(weight: ir.Value, array: np.ndarray, graph: ir.Graph, ctx: RuleContext) -> ir.Value:
    return ctx.initializer(
        graph, (weight.name or "w") + "_bnfolded", array.astype(constant_of(weight).dtype)
    )


def _channels_ok(scale: np.ndarray, n: int) -> str | None:
    if scale.size != n:
        return f"BatchNorm has {scale.size} channels, the layer produces {n}"
    return None


def fold_into_conv(
    conv: ir.Node, scale: np.ndarray, shift: np.ndarray, ctx: RuleContext
) -> ir.Value | str:
    """Returns the value that now carries BN's output, or the reason nothing was changed."""
    w_value = conv.inputs[1]
    w = constant_of(w_value)
    if w is None:
        return f"{conv.op_type} weight is not a constant"
    group = int(attr(conv, "group", 1))
    if (found := _optional_constant(conv, 2)) is None:
        return f"{conv.op_type} bias is not a constant"
    bias_value, bias = found
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
    set_conv_params(conv, new_w.astype(w.dtype), new_b.astype(w.dtype), ctx, "_bnfolded")
    return conv.outputs[0]


def set_conv_params(conv: ir.Node, weight: np.ndarray, bias: np.ndarray, ctx: RuleContext, suffix: str) -> None:
    """Give ``conv`` (or ConvTranspose) new weight and bias initializers, named after the old
    ones (or the node) plus ``suffix``; a Conv without a bias gets one."""
    graph = conv.graph
    w_value = conv.inputs[1]
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    conv.replace_input_with(1, ctx.initializer(graph, (w_value.name or "w") + suffix, weight))
    b_name = bias_value.name if bias_value is not None else (conv.name or "conv") + "_bias"
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, ctx.initializer(graph, b_name + suffix, bias))


def _fold_into_gemm(
    gemm: ir.Node, scale: np.ndarray, shift: np.ndarray, ctx: RuleContext
) -> ir.Value | str:
    """Gemm: Y = alpha * A' B' + beta * C; the BN channel is Y's axis 1 (columns of B')."""
    b = constant_of(gemm.inputs[1])
    if b is None:
        return "Gemm weight B is not a constant"
    trans_b = int(attr(gemm, "transB", 0))
    out_ch = b.shape[0] if trans_b else b.shape[1]
    if (reason := _channels_ok(scale, out_ch)) is not None:
        return reason
    if (found := _optional_constant(gemm, 2)) is None:
        return "Gemm bias C is not a constant"
    c_value, c = found
    if c is not None and c.size not in (1, out_ch):
        return "Gemm bias C is not per-channel"
    beta_attr = float(attr(gemm, "beta", 1.0))
    c64 = (
        np.zeros(out_ch)
        if c is None
        else np.broadcast_to(c.astype(np.float64).reshape(-1), (out_ch,))
    )
    new_b = b.astype(np.float64) * (scale[:, None] if trans_b else scale[None, :])
    new_c = scale * beta_attr * c64 + shift
    graph = gemm.graph
    gemm.replace_input_with(1, _scaled(gemm.inputs[1], new_b, graph, ctx))
    c_name = c_value.name if c_value is not None else (gemm.name or "gemm") + "_bias"
    c_new = ctx.initializer(graph, c_name + "_bnfolded", new_c.astype(b.dtype))
    if len(gemm.inputs) < 3:
        gemm.resize_inputs(3)
    gemm.replace_input_with(2, c_new)
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return gemm.outputs[0]


def _fold_into_matmul(
    anchor: ir.Node, scale: np.ndarray, shift: np.ndarray, ctx: RuleContext
) -> ir.Value | str:
    """MatMul(X, W) [+ bias] of a rank-2 X: the BN channel is the last axis (columns of W)."""
    if anchor.op_type == "Add":
        matmul = matmul_of_add(anchor)
        if not only_consumer(matmul.outputs[0], anchor):
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
        1, _scaled(w_value, w.astype(np.float64) * scale[None, :], graph, ctx)
    )
    new_b = ctx.initializer(
        graph,
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
        name=ctx.fresh((mm_out.name or "matmul") + "_biased"),
        type=mm_out.type,
        shape=mm_out.shape,
    )
    replace_uses(mm_out, add_out)  # before the Add exists, so the Add still reads mm_out
    add = ir.Node(
        "",
        "Add",
        [mm_out, new_b],
        outputs=[add_out],
        name=ctx.fresh((matmul.name or "matmul") + "_bias_add"),
    )
    graph.insert_after(matmul, add)
    return add_out


# --------------------------------------------------------------------------- scale / shift


def fold_affine_into_conv(node: ir.Node, ctx: RuleContext) -> Outcome:
    """Conv -> Mul(per-channel constant) or Add(per-channel constant): into the Conv.

    Exporters (paddle2onnx's PP-LCNet, for one) write a BatchNorm already reduced to its
    affine form, or a learnable per-channel scale/shift, as separate Mul and Add nodes after a
    Conv. Each would otherwise be an elementwise quantized op of its own. Folded like
    BatchNorm: Mul by c is scale c, shift 0; Add of c is scale 1, shift c. The constant must
    broadcast along the output channel axis only (or be a scalar).
    """
    found = float_const_operand(node)
    if found is None:
        return None
    x, c, _ = found
    conv = x.producer()
    if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx"):
        return None
    if conv.graph is not node.graph:
        return None
    if not only_consumer(x, node):
        return f"{conv.op_type} output has other consumers"
    w = constant_of(conv.inputs[1])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return f"{conv.op_type} weight is not a float constant"
    group = int(attr(conv, "group", 1))
    out_ch = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * group
    per_channel = channel_vector(c, w.ndim, out_ch)  # the output has W's rank: N, M, spatial...
    if per_channel is None:
        return f"the constant of shape {list(c.shape)} is not per output channel"
    if node.op_type == "Mul":
        scale, shift = per_channel, np.zeros(out_ch)
    else:
        scale, shift = np.ones(out_ch), per_channel
    result = fold_into_conv(conv, scale, shift, ctx)
    if isinstance(result, str):
        return result
    take_over_output(node, result, absorbed_by=ctx)
    return APPLIED


def channel_vector(c: np.ndarray, rank: int, n: int) -> np.ndarray | None:
    """``c`` as n float64 values, one per channel of axis 1 of a rank-``rank`` tensor it
    broadcasts against (a scalar repeats), or None when it varies along another axis or
    has more axes than that tensor."""
    if c.ndim > rank:
        return None
    dims = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for j, d in enumerate(dims) if j != 1) or dims[1] not in (1, n):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (n,))


def float_const_operand(node: ir.Node) -> tuple[ir.Value, np.ndarray, int] | None:
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


def div_by_constant_to_mul(node: ir.Node, ctx: RuleContext) -> Outcome:
    """x / c -> x * (1 / c) for a float constant c when a Mul by a constant reads the result,
    so the two merge (``merge_constant_muls``): one quantized Mul instead of a float Div
    between a dequantize/quantize pair. Other Divs stay (onnxruntime's Gelu and attention
    fusions match Div)."""
    c = constant_of(node.inputs[1])
    if c is None or not np.issubdtype(c.dtype, np.floating) or constant_of(node.inputs[0]) is not None:
        return None
    users = list(node.outputs[0].uses())
    if len(users) != 1 or users[0][0].op_type != "Mul" or float_const_operand(users[0][0]) is None:
        return None
    if not np.all(np.isfinite(c)) or np.any(c == 0):
        return "divisor has zeros or non-finite values"
    recip = ctx.initializer(node.graph, (node.inputs[1].name or "c") + "_reciprocal",
                             (1.0 / c.astype(np.float64)).astype(c.dtype))
    mul = ir.Node("", "Mul", [node.inputs[0], recip], name=ctx.fresh((node.name or "div") + "_as_mul"))
    node.graph.insert_after(node, mul)
    take_over_output(node, mul.outputs[0])
    return APPLIED


def merge_constant_muls(node: ir.Node, ctx: RuleContext) -> Outcome:
    """(x * a) * b -> x * (a * b) for constants a, b (broadcasting is associative)."""
    outer = float_const_operand(node)
    if outer is None:
        return None
    y, b, _ = outer
    inner_node = y.producer()
    if inner_node is None or inner_node.op_type != "Mul" or inner_node.graph is not node.graph:
        return None
    inner = float_const_operand(inner_node)
    if inner is None or not only_consumer(y, node):
        return None
    x, a, _ = inner
    product = (a.astype(np.float64) * b.astype(np.float64)).astype(a.dtype)
    if product.nbytes > max(a.nbytes + b.nbytes, FOLD_MAX_GROWTH_BYTES):
        return "merged constant would grow the model"
    merged = ctx.initializer(node.graph, (node.inputs[1].name or "c") + "_merged", product)
    mul = ir.Node("", "Mul", [x, merged], name=ctx.fresh(node.name or "mul"))
    node.graph.insert_after(node, mul)
    take_over_output(node, mul.outputs[0])
    inner_node.graph.remove(inner_node, safe=True)
    return APPLIED


def fold_affine_into_next_conv(node: ir.Node, ctx: RuleContext) -> Outcome:
    """x * a or x + b feeding only an unpadded Conv: into that Conv's weight and bias.

    Conv(W, x * a) = Conv(W * a, x) and Conv(W, x + b) = Conv(W, x) + sum(W * b) per output
    channel; exact only without zero padding (a padded border would see a * 0 + b), so only
    Convs with all pads 0 qualify. Scalar constants, or per-input-channel ones for group 1.
    """
    found = float_const_operand(node)
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
    if any(attr(conv, "pads", [0])) or attr(conv, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
        return "the Conv pads its input"
    w = constant_of(conv.inputs[1])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return "Conv weight is not a float constant"
    if (found := _optional_constant(conv, 2)) is None:
        return "Conv bias is not a constant"
    bias_value, bias = found
    group = int(attr(conv, "group", 1))
    # Per input channel of W's axis 1 (C / group): any constant for group 1, a scalar otherwise.
    per_c = channel_vector(c, w.ndim, w.shape[1]) if group == 1 or c.size == 1 else None
    if per_c is None:
        return f"the constant of shape {list(c.shape)} is not a scalar or per input channel"
    w64 = w.astype(np.float64)
    b64 = np.zeros(w.shape[0]) if bias is None else bias.astype(np.float64).reshape(-1)
    shape = (1, -1) + (1,) * (w.ndim - 2)
    if node.op_type == "Mul":
        new_w, new_b = w64 * per_c.reshape(shape), b64
    else:
        new_w, new_b = w64, b64 + (w64 * per_c.reshape(shape)).reshape(w.shape[0], -1).sum(axis=1)
    set_conv_params(conv, new_w.astype(w.dtype), new_b.astype(w.dtype), ctx, "_affine")
    conv.replace_input_with(0, x)
    node.graph.remove(node, safe=True)
    return APPLIED


# --------------------------------------------------------------------------- Pad


def fuse_pad_into_conv(node: ir.Node, ctx: RuleContext) -> Outcome:
    """Pad(x, zeros on spatial axes) -> Conv  becomes  Conv(x) with the pads added.

    Exporters write TF-style "same" padding as an explicit Pad before each Conv. onnxruntime
    folds it for float Convs but not in a quantized graph, where the Pad then runs on its own
    between a DequantizeLinear and a QuantizeLinear (a third of EfficientNet-Lite0's int8
    latency). Only zero-valued constant padding of the spatial axes is folded: that is what
    Conv's own pads compute.
    """
    out = node.outputs[0]
    users = out.uses()
    if len(users) != 1 or out.is_graph_output():
        return None
    conv, index = next(iter(users))
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or index != 0:
        return None
    if attr(node, "mode", "constant") not in ("constant", b"constant"):
        return "Pad mode is not constant"
    if "pads" in node.attributes:  # opset < 11
        pads, value = list(node.attributes["pads"].value), attr(node, "value", 0.0)
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
    auto_pad = attr(conv, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", b"NOTSET"):
        return f"Conv has auto_pad={auto_pad}"
    spatial = rank - 2
    old = list(attr(conv, "pads", [0] * (2 * spatial)))
    if len(old) != 2 * spatial:
        return "Conv pads do not match the Pad's rank"
    new = [old[i] + pads[2 + i] for i in range(spatial)] + [
        old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)
    ]
    conv.attributes["pads"] = ir.AttrInt64s("pads", new)
    conv.replace_input_with(0, node.inputs[0])
    node.graph.remove(node, safe=True)
    return APPLIED
