"""BatchNormalization folding into the Conv / ConvTranspose / Gemm / MatMul(+Add) before it,
and the per-channel weight rewrite the affine folds share (``fold_into_conv``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool.passes.graph import constant_of, replace_uses
from qtool.passes.preprocess.driver import (
    APPLIED,
    Outcome,
    RuleContext,
    attr,
    only_consumer,
    take_over_output,
)


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
    b_value = gemm.inputs[1]
    b = constant_of(b_value)
    if b is None:
        return "Gemm weight B is not a constant"
    trans_b = int(attr(gemm, "transB", 0))
    out_ch = b.shape[0] if trans_b else b.shape[1]
    if (reason := _channels_ok(scale, out_ch)) is not None:
        return reason
    c_value = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    c = constant_of(c_value) if c_value is not None else None
    if c_value is not None and c is None:
        return "Gemm bias C is not a constant"
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
    gemm.replace_input_with(1, _scaled(b_value, new_b, graph, ctx))
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


