"""Weight-only block quantization pass: MatMul/Gemm/Gather/Conv weights -> 2/3/4/8-bit blocks.

Rewrites (pattern -> replacement), each counted in the PassReport:

- ``MatMul(A, W[K, N] const)`` [``+ Add(bias[N] const)``] -> ``com.microsoft.MatMulNBits(A,
  B, scales, [zero_points], , [bias])`` (format ``matmulnbits``), or ``MatMul(A,
  DequantizeLinear(x[K, N], scale[K/bs, N], [zp], axis=0, block_size))`` (format ``qdq``,
  opset 21 for int4/uint4, opset 25 for int2/uint2; any ONNX runtime reads it).
- ``Gemm(A, B const, [C])`` (transA = 0; transB, alpha and beta folded into the weight and
  bias) -> the same as MatMul.
- ``Gather(E[V, D] const, ids)`` (axis 0) -> ``com.microsoft.GatherBlockQuantized`` (uint8
  packed, blocks along D) or ``Gather(DequantizeLinear(E_q, axis=1), ids)`` for ``qdq``.
- ``Conv(X, W[M, C/g, k...] const, [B])`` -> ``Conv(X, DequantizeLinear(W_q, scale[M,
  ceil((C/g)/bs), k...], [zp], axis=1, block_size), [B])`` in either format (onnxruntime has
  no low-bit Conv kernel: the weight is dequantized and the Conv runs in float). A block is
  ``bs`` input channels at one (output channel, kernel position); when bs does not divide
  C/g the last block is shorter, as the ONNX spec allows (scale dimension ceil(C/g / bs)).
  Refused with a reason: C/g < 16 (depthwise and RGB-input convs: a block of fewer than 16
  weights costs more in scales than 4 bits save), and a model below opset 21 (25 for 2-bit)
  without ``allow_opset_upgrade``.

Streaming: weights are read one tensor at a time (external data stays memory-mapped until
then), quantized in row chunks, and each fp32 tensor is released as soon as its quantized
replacement is in the graph, so peak memory is about the largest weight plus the
quantized model (1/8 of fp32 at 4 bits). Progress is reported in bytes of fp32 weights.

Defaults follow measurements on x86 with onnxruntime 1.32 (bench/results/convert_lowbit.md):
MatMulNBits at accuracy_level 4 (int8 activations) is the fast path; level 0 (fp32
activations) was 2.5-3.8x slower for 1 and 32 tokens, so choosing 0 or 1 adds a note.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qtool import kernels, ops
from qtool.config import Recipe
from qtool.errors import UsageError
from qtool.model import iter_graphs, opset_version, require_opset
from qtool.passes import PassReport
from qtool.quant import formats
from qtool.quant.blockwise import (
    ALGORITHMS,
    DATA_AWARE,
    ActivationStats,
    QuantOutcome,
    quantize_slabs,
    quantize_weight,
)

MS_DOMAIN = "com.microsoft"
_FLOAT_WEIGHTS = (ir.DataType.FLOAT,)
# Row chunks of about this many weights keep a chunk's temporaries in L2 cache.
_CHUNK_ELEMENTS = 1 << 18
_SLOW_LEVEL_NOTE = (
    "accuracy_level {level}: MatMulNBits then multiplies with float activations, measured "
    "2.5-3.8x slower than level 4 on this x86 CPU (onnxruntime 1.32, 1 and 32 tokens, "
    "bench/results/convert_lowbit.md); --accuracy-level 4 is the fast default"
)


@dataclass
class _Item:
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


def _name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def _matches(patterns: tuple[str, ...], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def _const_float(value: ir.Value | None, rank: int | None = None) -> bool:
    if value is None or value.const_value is None or value.is_graph_input():
        return False
    t = value.const_value
    return t.dtype in _FLOAT_WEIGHTS and (rank is None or len(t.shape) == rank)


def _dq_opset(bits: int) -> int:
    """The opset whose DequantizeLinear takes ``bits``-bit blocked weights."""
    return 25 if formats.storage_bits(bits) == 2 else 21


def _conv_refusal(model: ir.Model, node: ir.Node, weight: ir.Value, bits: int, allow_upgrade: bool) -> str | None:
    """Why a Conv weight cannot take ``bits``-bit blocks (see the module doc), or None."""
    c = weight.const_value.shape[1]
    if c < 16:
        return f"input channels per group C/g = {c} are fewer than one block (16)"
    need, have = _dq_opset(bits), opset_version(model) or 0
    if have < need and not allow_upgrade:
        return (f"a {bits}-bit Conv weight needs blocked DequantizeLinear (opset {need}), the model has "
                f"opset {have}: pass --allow-opset-upgrade")
    return None


def conv_opset_needed(model: ir.Model, recipe: Recipe, bits: int) -> int:
    """The opset the Conv rewrites of this pass need (0: no Conv to rewrite).

    The caller raises the model's opset with a real converter first (qtool.convert), since
    relabelling would refuse ops whose schema changed without changing their meaning.
    """
    items = _find_items(model, recipe, bits, PassReport("weight_only"))
    return max((_dq_opset(i.bits) for i in items if i.kind == "conv"), default=0)


def _layer_bits(recipe: Recipe, node: ir.Node, weight: ir.Value, bits: int, report: PassReport) -> int | None:
    """The bits of one layer: a [[layer]] override, else 8 for --keep-8bit matches, else
    ``bits``; None (reported) when an override keeps it float."""
    name = _name(node)
    layer_bits = recipe.bits_for(name, node.op_type, bits)
    if _matches(recipe.weight_only.keep_8bit, name, weight.name or "", node.outputs[0].name):
        layer_bits = 8
    if layer_bits >= 16:
        report.skip(name, f"[[layer]] override keeps it at {layer_bits} bits")
        return None
    return layer_bits


def _find_items(model: ir.Model, recipe: Recipe, bits: int, report: PassReport) -> list[_Item]:
    wo = recipe.weight_only
    items: list[_Item] = []
    for graph in iter_graphs(model.graph):
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Gather", "Conv"):
                continue
            name = _name(node)
            if node.op_type == "Conv":
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                if not _const_float(weight) or len(weight.const_value.shape) < 3:
                    continue
                layer_bits = _layer_bits(recipe, node, weight, bits, report)
                if layer_bits is None:
                    continue
                why = _conv_refusal(model, node, weight, layer_bits, recipe.quantize.allow_opset_upgrade)
                if why is not None:
                    report.skip(name, why)
                    continue
                items.append(_Item("conv", node, weight, layer_bits, nbytes=weight.const_value.nbytes))
                continue
            if node.op_type == "Gather":
                if not wo.quantize_gather:
                    report.skip(name, "Gather quantization is off (quantize_gather = false)")
                    continue
                weight = node.inputs[0]
                if not _const_float(weight, 2):
                    continue
                if node.attributes.get_int("axis", 0) != 0:
                    report.skip(name, "Gather on an axis other than 0 is left in float")
                    continue
                kind = "gather"
            else:
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                if not _const_float(weight, 2):
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
            item = _Item(kind, node, weight, layer_bits, nbytes=weight.const_value.nbytes)
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


def _weight_rows(item: _Item) -> np.ndarray:
    """The weight in quantized orientation [rows, cols] (cols = reduction axis), lazily."""
    w = item.weight.const_value.numpy()
    if item.kind == "gather":
        return w  # E[V, D]: blocks along D
    if item.kind == "gemm" and item.transpose_b:
        return w  # B^T stored: [N, K]
    return w.T  # W[K, N] -> view [N, K]


def _quantize_item(item: _Item, wo, algorithm: str, fmt: str = "") -> QuantOutcome:
    """Quantize one weight; row-separable algorithms run in cache-sized row chunks."""
    if item.block:
        wo = dataclasses.replace(wo, block_size=item.block)
    w = _weight_rows(item)
    if item.alpha != 1.0:
        w = w * np.float32(item.alpha)
    rows, cols = w.shape
    stats = item.stats
    if algorithm in DATA_AWARE and item.kind != "gather" and stats is not None:
        return quantize_weight(np.ascontiguousarray(w, dtype=np.float32), item.bits, wo.block_size, wo.symmetric, algorithm, stats)
    alg = algorithm if algorithm not in DATA_AWARE else "mse"
    if fmt == "matmulnbits" and alg == "rtn" and item.bits in (2, 4, 8) and item.kind == "matmul":
        # The default path: one fused pass from the (memory-mapped) W[K, N] to packed
        # MatMulNBits tensors; the native kernel releases the GIL, so _pipelined overlaps tensors.
        k, n = item.weight.const_value.shape
        b, scales, zp = kernels.quantize_kn(item.weight.const_value.numpy(), item.bits, wo.block_size, wo.symmetric)
        t = formats.MatMulNBitsTensors(b, scales, zp, item.bits, wo.block_size, k, n)
        return QuantOutcome(None, float("nan"), float("nan"), tensors=t)
    if alg in ("rtn", "mse"):
        # Cache-sized slabs straight from the (memory-mapped) stored layout, native kernels.
        src = item.weight.const_value.numpy()
        k_axis = 0 if item.kind == "matmul" or (item.kind == "gemm" and not item.transpose_b) else 1
        if item.alpha != 1.0:
            src = src * np.float32(item.alpha)
        # RTN alone skips measuring its error (a dequantize pass): it is the fast default.
        bq, sse = quantize_slabs(src, item.bits, wo.block_size, wo.symmetric, alg, k_axis=k_axis, measure=alg != "rtn")
        rtn_sse = sse if alg == "rtn" else quantize_slabs(src, item.bits, wo.block_size, wo.symmetric, "rtn", k_axis=k_axis)[1]
        size = max(bq.codes.size, 1)
        return QuantOutcome(bq, sse / size, rtn_sse / size)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    codes = np.empty((rows, cols), dtype=np.uint8)
    nb = formats.n_blocks(cols, wo.block_size)
    scales = np.empty((rows, nb), dtype=np.float32)
    zps = None if wo.symmetric else np.empty((rows, nb), dtype=np.uint8)
    err = rtn_err = 0.0
    for r0 in range(0, rows, step):
        chunk = np.ascontiguousarray(w[r0 : r0 + step], dtype=np.float32)
        out = quantize_weight(chunk, item.bits, wo.block_size, wo.symmetric, alg, compare=alg != "rtn")
        codes[r0 : r0 + step] = out.bq.codes
        scales[r0 : r0 + step] = out.bq.scales
        if zps is not None:
            zps[r0 : r0 + step] = out.bq.zero_points
        err += out.weight_mse * chunk.size
        rtn_err += out.rtn_weight_mse * chunk.size
    n = max(rows * cols, 1)
    bq = formats.BlockQuant(codes, scales, zps, item.bits, wo.block_size)
    return QuantOutcome(bq, err / n, rtn_err / n)


def _init(graph: ir.Graph, name: str, array: np.ndarray | None = None, packed: tuple | None = None) -> ir.Value:
    """Register an initializer (numpy array, or (bytes, dtype, shape) for packed sub-byte types)."""
    name = _unique(graph, name)
    if packed is not None:
        data, dtype, shape = packed
        tensor = ir.PackedTensor(data, dtype, shape=ir.Shape(shape), name=name)
    else:
        tensor = ir.Tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, name: str) -> str:
    if name not in graph.initializers:
        return name
    i = 1
    while f"{name}_{i}" in graph.initializers:
        i += 1
    return f"{name}_{i}"


_DQ_TYPES = {
    (4, True): ir.DataType.INT4,
    (4, False): ir.DataType.UINT4,
    (2, True): ir.DataType.INT2,
    (2, False): ir.DataType.UINT2,
    (8, True): ir.DataType.INT8,
    (8, False): ir.DataType.UINT8,
}


def _dq_value(graph: ir.Graph, base: str, t: formats.BlockedDQTensors, axis: int, new_nodes: list) -> ir.Value:
    dtype = _DQ_TYPES[(t.bits, t.signed)]
    if t.bits == 8:
        codes = t.packed.view(np.int8 if t.signed else np.uint8).reshape(t.shape)
        x = _init(graph, base + "_q", codes)
        zp = None if t.zero_point_packed is None else _init(graph, base + "_zp", t.zero_point_packed.reshape(t.scale.shape))
    else:
        x = _init(graph, base + "_q", packed=(t.packed, dtype, t.shape))
        zp = (
            None
            if t.zero_point_packed is None
            else _init(graph, base + "_zp", packed=(t.zero_point_packed, dtype, t.scale.shape))
        )
    scale = _init(graph, base + "_scale", t.scale)
    inputs = [x, scale] + ([zp] if zp is not None else [])
    dq = ir.node("DequantizeLinear", inputs, attributes={"axis": axis, "block_size": t.block_size}, name=base + "_dq")
    new_nodes.append(dq)
    return dq.outputs[0]


# ---- Conv weights: blocks of input channels ----------------------------------------------


def _conv_rows(w: np.ndarray) -> np.ndarray:
    """``W[M, C, k...]`` as ``[M * prod(k), C]``: a row per (output channel, kernel position),
    so blocks along the rows' columns are blocks of input channels."""
    return np.ascontiguousarray(np.moveaxis(w, 1, -1).reshape(-1, w.shape[1]), dtype=np.float32)


CONV_ALGORITHMS = ("rtn", "mse")


def _quantize_conv(item: _Item, wo, algorithm: str) -> QuantOutcome:
    """Quantize a Conv weight in its :func:`_conv_rows` orientation with rtn or mse.

    gptq/awq would need im2col activation statistics and hqq's float zero points have no
    DequantizeLinear form, so those fall back to mse (the pass counts it).
    """
    alg = algorithm if algorithm in CONV_ALGORITHMS else "mse"
    rows = _conv_rows(item.weight.const_value.numpy())
    bq, sse = quantize_slabs(rows, item.bits, wo.block_size, wo.symmetric, alg, k_axis=1, measure=alg != "rtn")
    rtn_sse = sse if alg == "rtn" else quantize_slabs(rows, item.bits, wo.block_size, wo.symmetric, "rtn", k_axis=1)[1]
    size = max(rows.size, 1)
    return QuantOutcome(bq, sse / size, rtn_sse / size)


def _conv_dq_tensors(bq: formats.BlockQuant, shape: tuple[int, ...]) -> formats.BlockedDQTensors:
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


def _rewrite(graph: ir.Graph, item: _Item, outcome: QuantOutcome, wo, fmt: str) -> list[ir.Value]:
    """Replace ``item``'s node(s); returns the old values that may now be unused."""
    node = item.node
    base = (item.weight.name or _name(node)).replace("/", "_")
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
            data = _init(graph, base + "_q", formats.pack_bits(bq.codes, bits))
            scales = _init(graph, base + "_scale", bq.scales)
            inputs = [data, ids, scales]
            if zp is not None:
                inputs.append(_init(graph, base + "_zp", formats.pack_bits(zp, bits)))
            new = ir.node(
                "GatherBlockQuantized",
                inputs,
                attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": bq.block_size, "bits": bits},
                domain=MS_DOMAIN,
                name=_name(node) + "_q",
            )
        else:
            t = formats.blocked_dq_tensors(bq, transpose=False)
            table = _dq_value(graph, base, t, 1, new_nodes)
            new = ir.node("Gather", [table, ids], attributes={"axis": 0}, name=_name(node) + "_q")
        new_nodes.append(new)
    elif item.kind == "conv":
        t = _conv_dq_tensors(bq, tuple(item.weight.const_value.shape))
        w = _dq_value(graph, base, t, 1, new_nodes)
        new = ir.node("Conv", [node.inputs[0], w, *node.inputs[2:]], attributes=dict(node.attributes),
                      name=_name(node) + "_q")
        new_nodes.append(new)
    else:
        a = node.inputs[0]
        if outcome.input_scale is not None:
            inv = _init(graph, base + "_awq_scale", outcome.input_scale)
            mul = ir.node("Mul", [a, inv], name=_name(node) + "_awq")
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
            inputs = [a, _init(graph, base + "_q", t.b), _init(graph, base + "_scale", t.scales)]
            inputs.append(_init(graph, base + "_zp", t.zero_points) if t.zero_points is not None else None)
            if bias is not None:
                inputs += [None, _init(graph, base + "_bias", bias)]
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
                name=_name(node) + "_q",
            )
            new_nodes.append(new)
        else:
            t = formats.blocked_dq_tensors(bq)
            w = _dq_value(graph, base, t, 0, new_nodes)
            new = ir.node("MatMul", [a, w], name=_name(node) + "_q")
            new_nodes.append(new)
            if bias is not None:
                new = ir.node("Add", [new.outputs[0], _init(graph, base + "_bias", bias)], name=_name(node) + "_bias")
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


def _drop_unused_initializers(graph: ir.Graph, values: list[ir.Value]) -> None:
    for value in values:
        if value.is_initializer() and not list(value.uses()) and not value.is_graph_output():
            tensor = value.const_value
            graph.initializers.pop(value.name, None)
            if isinstance(tensor, ir.ExternalTensor):
                try:
                    tensor.release()  # unmap the fp32 weight: its pages leave our RSS
                except BufferError:
                    pass


def _check(recipe: Recipe, bits: int, fmt: str, algorithm: str) -> None:
    wo = recipe.weight_only
    formats.check_bits(bits, wo.block_size)
    if fmt not in ("matmulnbits", "qdq"):
        raise UsageError(f"unknown weight-only format {fmt!r}", "use --format matmulnbits or --format qdq")
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {algorithm!r}", f"use one of: {', '.join(ALGORITHMS)}")
    if wo.accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(
            f"accuracy level {wo.accuracy_level} is not one of 0, 1, 2, 3, 4",
            "use --accuracy-level 4 (int8 activations, fastest on x86) or 0 (float activations)",
        )


def _threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def apply_weight_only(
    model: ir.Model,
    recipe: Recipe,
    bits: int,
    *,
    activations: dict[str, np.ndarray | ActivationStats] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PassReport:
    """Quantize the constant weights of MatMul, Gemm and Gather in place (see module doc).

    ``bits``: 2, 3, 4 or 8 (per-layer ``[[layer]]`` overrides and ``keep_8bit`` patterns
    win). ``activations``: for gptq/awq, per MatMul input tensor name either sample rows
    [..., K] or accumulated :class:`ActivationStats` (``collect_weight_only_stats``).
    ``on_progress(done_bytes, total_bytes)`` counts fp32 weight bytes processed.
    Modifies ``model`` in place; the caller saves it (never over the input file).
    """
    wo = recipe.weight_only
    fmt, algorithm = wo.format, wo.algorithm
    _check(recipe, bits, fmt, algorithm)
    report = PassReport("weight_only")
    items = _find_items(model, recipe, bits, report)
    if algorithm in DATA_AWARE and not activations:
        raise UsageError(
            f"--algorithm {algorithm} needs calibration activations",
            "pass --data DIR (sample inputs), or use a data-free algorithm: rtn, mse or hqq",
        )
    stats = {}
    for name, value in (activations or {}).items():
        stats[name] = value if isinstance(value, ActivationStats) else ActivationStats.from_activations(value)
    for item in items:
        if item.kind in ("matmul", "gemm"):
            item.stats = stats.get(item.node.inputs[0].name)
            if algorithm in DATA_AWARE and item.stats is None:
                report.count(f"{algorithm} without activations (mse used)")
        elif item.kind == "conv" and algorithm not in CONV_ALGORITHMS:
            report.count(f"Conv: {algorithm} has no Conv form (mse used)")
    if fmt == "matmulnbits":
        for item in items:
            if item.kind == "matmul":
                _, n = item.weight.const_value.shape
                found = ops.bias_add_consumer(item.node, n)
                if found is not None:
                    item.add, item.bias = found
    # Conv weights are blocked DequantizeLinear in either format.
    dq_items = items if fmt == "qdq" else [i for i in items if i.kind == "conv"]
    if dq_items:
        need = max(_dq_opset(i.bits) for i in dq_items)
        require_opset(model, need, f"blocked DequantizeLinear with {min(i.bits for i in dq_items)}-bit weights",
                      recipe.quantize.allow_opset_upgrade)
        model.ir_version = max(model.ir_version or 0, 10 if need == 21 else 13)
    if fmt == "matmulnbits" and len(dq_items) < len(items):
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    gathers = [i for i in items if i.kind == "gather"]
    if fmt == "matmulnbits":
        for item in gathers:
            d = item.weight.const_value.shape[1]
            block = wo.block_size
            while block >= 16 and d % block:  # GatherBlockQuantized needs whole blocks along D
                block //= 2
            if item.bits == 2 or block < 16:
                report.skip(_name(item.node), f"GatherBlockQuantized needs 4/8 bits and a block (>= 16) dividing {d}")
                items.remove(item)
            elif block != wo.block_size:
                item.block = block
                report.notes.append(f"{_name(item.node)}: table width {d} is not a multiple of {wo.block_size}; blocks of {block}")

    total = sum(i.nbytes for i in items)
    done = 0
    weight_err = rtn_err = 0.0
    out_errs: list[tuple[float, float]] = []
    if on_progress is not None:
        on_progress(0, total)

    def work(it: _Item) -> QuantOutcome:
        return _quantize_conv(it, wo, algorithm) if it.kind == "conv" else _quantize_item(it, wo, algorithm, fmt)

    for item, outcome in _pipelined(items, work):
        graph = item.node.graph
        freed = _rewrite(graph, item, outcome, wo, fmt)
        _drop_unused_initializers(graph, freed)
        key = {"matmul": "MatMul", "gemm": "Gemm", "gather": "Gather", "conv": "Conv"}[item.kind]
        target = {
            ("matmul", "matmulnbits"): "MatMulNBits",
            ("gemm", "matmulnbits"): "MatMulNBits",
            ("gather", "matmulnbits"): "GatherBlockQuantized",
        }.get((item.kind, fmt), "DequantizeLinear")
        report.count(f"{key} -> {target} ({item.bits}-bit)")
        if item.add is not None:
            report.count("bias Add folded into MatMulNBits")
        if outcome.input_scale is not None:
            report.count("awq activation scale (Mul) inserted")
        size = item.nbytes // 4
        weight_err += outcome.weight_mse * size
        rtn_err += outcome.rtn_weight_mse * size
        if outcome.output_error is not None:
            out_errs.append((outcome.output_error, outcome.rtn_output_error))
        done += item.nbytes
        if on_progress is not None:
            on_progress(done, total)

    if items and algorithm == "rtn" and np.isnan(weight_err):
        report.notes.append(f"rtn: {len(items)} tensors (error not measured on the fast path; any other algorithm reports it vs RTN)")
    elif items:
        n_weights = total // 4
        report.notes.append(
            f"{algorithm}: weight MSE {weight_err / n_weights:.3e} vs RTN {rtn_err / n_weights:.3e} "
            f"({(weight_err / rtn_err if rtn_err else 1.0):.3f}x) over {len(items)} tensors"
            if algorithm != "rtn"
            else f"rtn: weight MSE {weight_err / n_weights:.3e} over {len(items)} tensors"
        )
        if out_errs:
            ours = float(np.mean([o for o, _ in out_errs]))
            base = float(np.mean([r for _, r in out_errs]))
            report.notes.append(
                f"{algorithm}: relative output error {ours:.3e} vs RTN {base:.3e} ({ours / base if base else 1.0:.3f}x)"
            )
    if fmt == "matmulnbits" and wo.accuracy_level in (0, 1) and any(i.kind in ("matmul", "gemm") for i in items):
        report.notes.append(_SLOW_LEVEL_NOTE.format(level=wo.accuracy_level))
    if any(i.bits == 3 for i in items):
        report.notes.append("3-bit codes are stored in 4-bit containers (ONNX has no 3-bit type): no size gain over 4-bit")
    return report


def _pipelined(items: list[_Item], work: Callable[[_Item], QuantOutcome]) -> Iterator[tuple[_Item, QuantOutcome]]:
    """Yield (item, work(item)) in order, computing up to ``_threads()`` items ahead.

    numpy and the native kernels (cffi calls) release the GIL, so tensors quantize in
    parallel while at most that many fp32 weights are resident.
    """
    threads = _threads()
    if threads == 1 or len(items) < 2:
        for item in items:
            yield item, work(item)
        return
    with ThreadPoolExecutor(threads) as pool:
        futures = []
        nxt = 0
        for i in range(len(items)):
            while nxt < len(items) and nxt < i + threads:
                futures.append(pool.submit(work, items[nxt]))
                nxt += 1
            outcome = futures[i].result()
            futures[i] = None
            yield items[i], outcome


def weight_only_inputs(model: ir.Model, recipe: Recipe) -> list[str]:
    """Names of the activation tensors feeding the MatMul/Gemm weights this pass quantizes."""
    report = PassReport("weight_only")
    items = _find_items(model, recipe, 4, report)
    return list(dict.fromkeys(i.node.inputs[0].name for i in items if i.kind in ("matmul", "gemm")))


def collect_weight_only_stats(
    model_path,
    dataset,
    recipe: Recipe,
    *,
    batch_size: int = 1,
    limit: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, ActivationStats]:
    """Stream ``dataset`` through the model and accumulate, per quantized MatMul input,
    ``X^T X``, ``sum |X|`` and the row count (what gptq and awq need). Memory: O(K^2) per
    input tensor plus one batch, independent of the number of samples.
    """
    from qtool.model import load
    from qtool.runtime import stream_tensors

    model = load(model_path)
    names = weight_only_inputs(model, recipe)
    if not names:
        return {}
    stats: dict[str, ActivationStats] = {}
    total = limit or len(getattr(dataset, "samples", [])) or 0
    done = 0
    for ids, tensors in stream_tensors(model, dataset, names, batch_size=batch_size, limit=limit):
        for name in names:
            s = ActivationStats.from_activations(tensors[name])
            stats[name] = s if name not in stats else stats[name].merged(s)
        done += len(ids)
        if on_progress is not None:
            on_progress(done, total)
    return stats
