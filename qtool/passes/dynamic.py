"""Dynamic int8: weights quantized offline, activations quantized per batch at run time.

Each MatMul/Gemm with a constant 2-D weight becomes onnxruntime's
``com.microsoft.DynamicQuantizeMatMul(A, B_q, b_scale, b_zero_point, bias)``: the CPU
provider quantizes A to uint8 per tensor at run time (``s_A = (max - min) / 255`` over
the batch) and runs a u8 x s8 integer GEMM with per-column float rescaling::

    Y = s_A * b_scale[n] * sum_k (A_q[m, k] - z_A) * (B_q[k, n] - b_zp[n]) + bias[n]

This is the form onnxruntime's MatMulIntegerToFloat fusion produces from
DynamicQuantizeLinear + MatMulInteger; emitting it directly means no fusion has to fire.
Weights are int8 symmetric per output column (``b_scale[n] = max_k |B[k, n]| / 127``).

Conv is not converted: ConvInteger has no fast u8 x s8 kernel on the CPU provider (and
cannot run some type combinations at all), so dynamic Conv would be slower than float.
Sensitive layers (the LM head, embeddings) are kept in float with ``--exclude``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qtool import ops
from qtool.config import Recipe
from qtool.model import iter_graphs, iter_nodes
from qtool.passes import PassReport
from qtool.passes.qdq import GraphBuilder, quantize_gathers
from qtool.passes.select import excluded, is_float_activation
from qtool.quant.scales import DegenerateRange, quantize, weight_params

MS_DOMAIN = "com.microsoft"
# SmoothQuant's migration strength: s_k = max|x_k|^a / max_n|W_kn|^(1-a).
# Inputs whose per-tensor int8 SQNR (estimated from calibration statistics, after smoothing)
# stays below this are kept in float. None: never. Measured on SmolLM2-135M (perplexity,
# fp32 46.73): all int8 48.70; below 20 dB kept float (5 MatMuls) 48.52; below 26 dB
# (18 MatMuls, every one a down_proj) 47.67, i.e. +2.0%.
MIN_DYNAMIC_SQNR_DB: float | None = 26.0
SMOOTH_ALPHA = 0.7  # 0.5 (the paper's default) left SmolLM2 at +15% perplexity, 0.7 at +4%
# Below this many weights the integer GEMM's quantization overhead outweighs its gain.
MIN_WEIGHT_ELEMENTS = 4096


def _gemm_weight(node: ir.Node, w: np.ndarray) -> np.ndarray | str:
    """The weight as [K, N] for Y = A @ W, or the reason the Gemm cannot be converted."""
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        return "Gemm with transA"
    if attrs.get_float("alpha", 1.0) != 1.0:
        return "Gemm with alpha != 1"
    return w.T if attrs.get_int("transB", 0) else w


def _gemm_bias(node: ir.Node, n: int) -> ir.Value | None | str:
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    tensor = ops.constant_weight(node, 2)
    if tensor is None or tuple(tensor.shape) not in ((n,), (1, n)):
        return "Gemm bias C is not a constant of shape [N]"
    if node.attributes.get_float("beta", 1.0) != 1.0:
        return "Gemm with beta != 1"
    return node.inputs[2]


def _smoothable(node: ir.Node, recipe: Recipe) -> bool:
    q = recipe.quantize
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return False
    if (q.op_types and "MatMul" not in q.op_types) or excluded(node, q.exclude):
        return False
    tensor = ops.constant_weight(node, 1)
    return (tensor is not None and tensor.dtype == ir.DataType.FLOAT and len(tensor.shape) == 2
            and tensor.size >= MIN_WEIGHT_ELEMENTS and is_float_activation(node.inputs[0]))


def smoothing_inputs(model: ir.Model, recipe: Recipe) -> list[str]:
    """Names of the MatMul inputs whose per-channel ranges ``smooth`` can use: in the main
    graph only, since onnxruntime cannot return a tensor of an If/Loop/Scan body."""
    return list(dict.fromkeys(n.inputs[0].name for n in model.graph if _smoothable(n, recipe)))


@dataclass
class ChannelStats:
    """Per input channel k (last axis): ``absmax[k] = max |x_k|``, ``mean_square[k] = E[x_k^2]``."""

    absmax: np.ndarray
    mean_square: np.ndarray


def collect_channel_absmax(model: ir.Model, dataset, names: list[str], *, limit: int = 0) -> dict[str, ChannelStats]:
    """Per input channel (last axis) max |x| and mean square of each named tensor.

    Streams one batch at a time: memory is one batch of activations plus 2K floats per tensor.
    """
    from qtool.runtime import stream_tensors

    out: dict[str, ChannelStats] = {}
    rows: dict[str, int] = {}
    for _, tensors in stream_tensors(model, dataset, names, limit=limit):
        for name, x in tensors.items():
            flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
            m, sq = np.abs(flat).max(axis=0), (flat**2).sum(axis=0)
            if name in out:
                out[name].absmax = np.maximum(out[name].absmax, m)
                out[name].mean_square += sq
            else:
                out[name] = ChannelStats(m, sq)
            rows[name] = rows.get(name, 0) + flat.shape[0]
    for name, stats in out.items():
        stats.mean_square = stats.mean_square / max(rows[name], 1)
    return out


def estimated_sqnr_db(stats: ChannelStats, s: np.ndarray) -> float:
    """SQNR of per-tensor uint8 quantization of ``x / s`` (dB), from channel statistics.

    signal power = mean_k E[(x_k/s_k)^2]; noise = step^2 / 12 with
    step = 2 max_k(max|x_k| / s_k) / 255 (a range symmetric around 0, the worst case).
    """
    signal = float(np.mean(stats.mean_square / s**2))
    step = 2.0 * float(np.max(stats.absmax / s)) / 255.0
    if signal <= 0 or step <= 0:
        return float("inf")
    return 10.0 * float(np.log10(signal / (step**2 / 12.0)))


def smooth(model: ir.Model, recipe: Recipe, absmax: dict, b: GraphBuilder,
           report: PassReport, too_noisy: dict[str, str], alpha: float = SMOOTH_ALPHA) -> None:
    """Move activation outliers into the weights before dynamic quantization (SmoothQuant).

    For an input x [.., K] read by MatMuls with weights W [K, N]: ``x W = (x / s)(s W)`` with
    ``s_k = max|x_k|^a / max_n |W_kn|^(1-a)`` over every MatMul sharing x (a = ``alpha``:
    SMOOTH_ALPHA for dynamic int8; static int8 passes its own).
    Per-tensor dynamic quantization of ``x / s`` then no longer spends its 256 levels on a
    few outlier channels. One Mul by 1/s is inserted per input tensor. An input whose
    estimated SQNR (``estimated_sqnr_db``) stays below MIN_DYNAMIC_SQNR_DB is not smoothed;
    its MatMuls go into ``too_noisy`` (node name -> reason) and stay float.
    """
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in iter_nodes(model):
        if _smoothable(node, recipe) and node.inputs[0].name in absmax:
            groups.setdefault(node.inputs[0], []).append(node)
    for x, nodes in groups.items():
        stats = absmax[x.name]
        if not isinstance(stats, ChannelStats):
            stats = ChannelStats(np.asarray(stats, np.float64), None)
        a = np.asarray(stats.absmax, np.float64)
        weights = [ops.constant_weight(n, 1).numpy() for n in nodes]
        if any(w.shape[0] != a.shape[0] for w in weights):
            continue
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
        valid = (a > 0) & (wmax > 0) & np.isfinite(a)
        s = np.ones_like(a)
        s[valid] = a[valid] ** alpha / wmax[valid] ** (1 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        if stats.mean_square is not None and MIN_DYNAMIC_SQNR_DB is not None:
            sqnr = estimated_sqnr_db(stats, s)
            if sqnr < MIN_DYNAMIC_SQNR_DB:
                for node in nodes:
                    too_noisy[node.name or ""] = (
                        f"input {x.name} would quantize at ~{sqnr:.0f} dB SQNR even after smoothing "
                        f"(< {MIN_DYNAMIC_SQNR_DB:g} dB): outliers; kept float")
                continue
        for node, w in zip(nodes, weights):
            ws = b.initializer((w * s[:, None]).astype(np.float32), f"{node.inputs[1].name}_smoothed")
            node.replace_input_with(1, ws)
        report.count("inputs smoothed")
        folded = _fold_smoothing(b, x, 1.0 / s, nodes)
        if folded:
            report.count(f"smoothing folded into {folded}")
            continue
        inv = b.initializer((1.0 / s).astype(np.float32), f"{x.name}_smooth_inv")
        mul = b.node("Mul", [x, inv], f"{x.name}_smooth", dtype=ir.DataType.FLOAT, shape=x.shape)
        nodes[0].graph.insert_before(nodes[0], mul)
        for node in nodes:
            node.replace_input_with(0, mul.outputs[0])


def _fold_smoothing(b: GraphBuilder, x: ir.Value, inv: np.ndarray, readers: list[ir.Node]) -> str | None:
    """Scale ``x`` by ``inv`` (per last-axis channel) inside the node that produces it, so no
    Mul runs at inference. Returns what absorbed it, or None (the caller inserts a Mul).

    Only when the smoothed MatMuls are x's sole readers. Producers handled: a
    LayerNormalization over the last axis (its scale and bias), a Mul by a per-channel
    constant (RMSNorm's weight), and a Mul of two activations where one comes straight from a MatMul
    with a constant weight (the gated MLP's up projection: its weight columns).
    """
    if x.is_graph_output() or any(user not in readers for user, _ in x.uses()):
        return None
    producer = x.producer()
    if producer is None or producer.domain not in ("", "ai.onnx") or producer.graph is not readers[0].graph:
        return None
    k = inv.shape[0]

    def scaled(value: ir.Value, axis_last: bool = True) -> ir.Value | None:
        tensor = ops.constant_weight(producer, _index(producer, value))
        if tensor is None:
            return None
        c = tensor.numpy()
        # A per-channel constant only: folding into a scalar (GELU's 0.5) would break
        # onnxruntime's Gelu fusion, which costs more than the Mul it saves.
        if not np.issubdtype(c.dtype, np.floating) or c.ndim == 0 or c.shape[-1] != k:
            return None
        return b.initializer((c.astype(np.float64) * inv).astype(c.dtype), f"{value.name or 'c'}_smoothed")

    if producer.op_type == "LayerNormalization":
        if producer.attributes.get_int("axis", -1) not in (-1, len(x.shape or ()) - 1):
            return None
        new = [scaled(v) if v is not None else None for v in producer.inputs[1:3]]
        if new[0] is None or (len(producer.inputs) > 2 and producer.inputs[2] is not None and new[1] is None):
            return None
        for i, value in enumerate(new, start=1):
            if value is not None:
                producer.replace_input_with(i, value)
        return "LayerNormalization"
    if producer.op_type != "Mul" or len(producer.inputs) != 2:
        return None
    for i in (0, 1):
        if ops.constant_weight(producer, i) is not None and ops.constant_weight(producer, 1 - i) is None:
            value = scaled(producer.inputs[i])
            if value is None:
                return None
            producer.replace_input_with(i, value)
            return "Mul by a constant"
    for i in (0, 1):
        mm = producer.inputs[i].producer()
        if (mm is None or mm.op_type != "MatMul" or mm.graph is not producer.graph
                or producer.inputs[i].is_graph_output()
                or any(user is not producer for user, _ in producer.inputs[i].uses())):
            continue
        w = ops.constant_weight(mm, 1)
        if w is None or w.numpy().ndim != 2 or w.numpy().shape[1] != k:
            continue
        wn = w.numpy()
        mm.replace_input_with(1, b.initializer((wn.astype(np.float64) * inv[None, :]).astype(wn.dtype),
                                               f"{mm.inputs[1].name}_smoothed_cols"))
        return "the weight of the MatMul feeding a Mul"
    return None


def _index(node: ir.Node, value: ir.Value) -> int:
    return next(i for i, v in enumerate(node.inputs) if v is value)


def quantize_dynamic(
    model: ir.Model,
    recipe: Recipe,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    absmax: dict[str, np.ndarray] | None = None,
) -> PassReport:
    """Rewrite MatMul/Gemm with constant weights into DynamicQuantizeMatMul, in place.

    ``absmax``: per-channel activation maxima of MatMul inputs (``collect_channel_absmax``,
    from ``convert --dynamic --data``); when given, inputs are smoothed first (``smooth``).
    """
    q = recipe.quantize
    report = PassReport("dynamic")
    b = GraphBuilder(model)
    too_noisy: dict[str, str] = {}
    if absmax:
        smooth(model, recipe, absmax, b, report, too_noisy)
    weight_type = q.weight_type
    nodes = [n for n in iter_nodes(model) if n.op_type in ("MatMul", "Gemm", "Conv")
             and n.domain in ("", "ai.onnx")]
    cache: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = {}
    for done, node in enumerate(nodes, 1):
        if on_progress is not None:
            on_progress(done, len(nodes))
        name = node.name or node.op_type
        if (node.name or "") in too_noisy:
            report.skip(name, too_noisy[node.name or ""])
            continue
        reason = _convert_one(b, node, recipe, weight_type, cache)
        if reason is None:
            report.count(node.op_type)
        else:
            report.skip(name, reason)
    shared = share_input_quantization(model, b)
    if shared:
        report.count("inputs quantized once for several MatMuls", shared)
    if not q.op_types or "Gather" in q.op_types:
        quantize_gathers(model, recipe, b, report)
    if report.counts:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return report


def share_input_quantization(model: ir.Model, b: GraphBuilder) -> int:
    """MatMuls reading the same activation (q/k/v, gate/up) quantize it once.

    Each DynamicQuantizeMatMul quantizes its input itself; when several read one tensor, one
    DynamicQuantizeLinear feeds ``com.microsoft.MatMulIntegerToFloat(A_q, B_q, a_scale,
    b_scale, a_zero_point, b_zero_point[, bias])`` for each of them instead (the form
    onnxruntime's own fusion makes of quantize_dynamic's output). Same arithmetic. Returns
    how many inputs were shared.
    """
    shared = 0
    for graph in iter_graphs(model.graph):
        readers: dict[ir.Value, list[ir.Node]] = {}
        for node in graph:
            if node.op_type == "DynamicQuantizeMatMul" and node.domain == MS_DOMAIN:
                readers.setdefault(node.inputs[0], []).append(node)
        for x, nodes in readers.items():
            if len(nodes) < 2:
                continue
            base = x.name or "x"
            dql = ir.Node("", "DynamicQuantizeLinear", [x], num_outputs=3, name=b.name(f"{base}_dynamic_quantize"))
            for value, suffix in zip(dql.outputs, ("quantized", "scale", "zero_point")):
                value.name = b.name(f"{base}_{suffix}")
            dql.outputs[0].dtype = ir.DataType.UINT8
            dql.outputs[1].dtype = ir.DataType.FLOAT
            dql.outputs[2].dtype = ir.DataType.UINT8
            graph.insert_before(nodes[0], dql)
            xq, xs, xz = dql.outputs
            for node in nodes:
                wq, ws, wz, *bias = node.inputs[1:]
                inputs = [xq, wq, xs, ws, xz, wz] + [v for v in bias if v is not None]
                new = ir.Node(MS_DOMAIN, "MatMulIntegerToFloat", inputs, name=node.name)
                graph.insert_before(node, new)
                new.outputs[0].name, new.outputs[0].dtype, new.outputs[0].shape = None, ir.DataType.FLOAT, node.outputs[0].shape
                b.replace_uses(node.outputs[0], new.outputs[0])
                out_name = node.outputs[0].name
                graph.remove(node, safe=True)
                if new.outputs[0].name is None:
                    new.outputs[0].name = out_name
            shared += 1
    return shared


def _convert_one(b: GraphBuilder, node: ir.Node, recipe: Recipe, weight_type: str,
                 cache: dict) -> str | None:
    q = recipe.quantize
    if node.op_type == "Conv":
        return "dynamic Conv (ConvInteger) is slower than float on onnxruntime's CPU provider; use static int8"
    if q.op_types and node.op_type not in q.op_types:
        return f"{node.op_type} not in the recipe's op_types"
    if excluded(node, q.exclude):
        return "excluded by --exclude / recipe"
    if recipe.bits_for(node.name or "", node.op_type, 8) >= 16:
        return "kept in float by a [[layer]] override"
    if not is_float_activation(node.inputs[0]) or node.inputs[0].dtype != ir.DataType.FLOAT:
        return "input A is not a float32 activation"
    tensor = ops.constant_weight(node, 1)
    if tensor is None:
        return "weight is not a constant (activation x activation MatMul)"
    if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
        return "weight is not a 2-D float32 constant"
    if tensor.size < MIN_WEIGHT_ELEMENTS:
        return f"weight has {tensor.size} elements: too small to gain from int8"
    w = tensor.numpy()
    bias = None
    if node.op_type == "Gemm":
        w = _gemm_weight(node, w)
        if isinstance(w, str):
            return w
        bias = _gemm_bias(node, w.shape[1])
        if isinstance(bias, str):
            return bias
        if node.inputs[0].shape is not None and len(node.inputs[0].shape) != 2:
            return "Gemm input is not 2-D"
    axis = 1 if q.per_channel else None
    key = (id(node.inputs[1]), node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0, axis)
    if key not in cache:
        try:
            p = weight_params(w, axis, weight_type, symmetric=True)
        except DegenerateRange as exc:
            return f"weight: {exc.reason}"
        base = node.inputs[1].name or "w"
        wq = b.initializer(quantize(w, p), base + "_quantized")
        scale = b.initializer(p.scale, base + "_scale")
        zp = b.initializer(p.zero_point, base + "_zero_point")
        cache[key] = (wq, scale, zp)
    wq, scale, zp = cache[key]
    add = None
    if bias is None and node.op_type == "MatMul":
        found = ops.bias_add_consumer(node, w.shape[1])
        if found is not None:  # MatMul + Add(bias) -> one DynamicQuantizeMatMul with a bias
            add, bias = found
    if bias is not None and tuple(bias.const_value.shape) != (w.shape[1],):
        bias = b.initializer(bias.const_value.numpy().reshape(-1), (bias.name or "bias") + "_1d")
    out = (add or node).outputs[0]
    inputs = [node.inputs[0], wq, scale, zp] + ([bias] if bias is not None else [])
    new = b.node("DynamicQuantizeMatMul", inputs, node.name or "matmul", domain=MS_DOMAIN,
                 dtype=ir.DataType.FLOAT, shape=out.shape)
    node.graph.insert_before(node, new)
    b.replace_uses(out, new.outputs[0])
    if add is not None:
        node.graph.remove(add, safe=True)
    node.graph.remove(node, safe=True)
    return None
