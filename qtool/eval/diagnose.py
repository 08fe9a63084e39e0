"""Layer-wise diagnosis: which layers of the candidate lose the precision, and what to do.

Tensors are matched by name: qtool's and onnxruntime's converters keep the float tensor
names of the original graph on the outputs of quantized layers (the DequantizeLinear or
the scale-Mul that ends a quantized group, MatMulNBits nodes keep the MatMul's output name).
Every tensor produced by a node in both graphs (float, not a weight) is a *matched tensor*.

For each matched tensor T, with r the reference's value, c the candidate's and l the
candidate's *local* value:

- ``sqnr_db``: SQNR(r, c) = 10 log10(sum r^2 / sum (r - c)^2): the error accumulated up to T;
- ``local_sqnr_db``: SQNR(r, l), where l is computed by the candidate's nodes between T and
  the previous matched tensors, fed with the *reference's* values of those tensors: the
  error this layer adds on its own. One extra session computes every l at once: the
  candidate graph with each consumer of a matched tensor rewired to a new input fed with
  the reference's value.

Layers are ranked by local SQNR, worst first; the quantized ones standing out (local SQNR
``OUTLIER_MARGIN_DB`` below the median, at most ``top``) are suggested for
``--exclude`` (int8 candidates: keep them in float) or for ``bits = 8`` (4-bit and lower
candidates), as flags and as a ready-to-paste recipe snippet of ``[[layer]]`` overrides.
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

import numpy as np

from qtool.errors import UsageError
from qtool.eval.hwcheck import INTEGER_OPS, QDQ_OPS
from qtool.eval.metrics import sqnr_db
from qtool.runtime import open_session

LOCAL_SUFFIX = "::qtool_reference"
OUTLIER_MARGIN_DB = 3.0  # a layer stands out when its local SQNR is this far below the median
_LOW_BIT_TYPES = {21, 22, 23, 24, 25, 26}  # UINT4, INT4, FLOAT4E2M1, ... (onnx TensorProto)


def _load(path: str | os.PathLike):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _constants(graph) -> set[str]:
    names = {i.name for i in graph.initializer}
    names.update(out for n in graph.node if n.op_type == "Constant" for out in n.output)
    return names


def matched_tensors(reference_graph, candidate_graph, carries: dict[str, str] | None = None) -> dict[str, str]:
    """Reference tensor name -> the candidate tensor holding the same value, in node order.

    A tensor matches when a node produces it in both graphs (weights excluded), except where
    ``carries`` (the candidate's ``qtool.carries`` metadata, written by pre-processing) says
    a candidate tensor now holds another reference tensor's value: a Conv that absorbed the
    BatchNorm after it produces, under its own output name, what the BatchNorm produced. When the
    candidate only quantizes it (every consumer is a QuantizeLinear feeding a
    DequantizeLinear), the DequantizeLinear's output is what the rest of the candidate sees,
    so that is the tensor compared: converters may fold a Relu into the quantization
    (zero point 0 clips negatives), leaving the name on the unclipped value.
    """
    ref_consts, cand_consts = _constants(reference_graph), _constants(candidate_graph)
    cand_outputs = {o for n in candidate_graph.node for o in n.output if o}
    consumers: dict[str, list] = {}
    for node in candidate_graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in candidate_graph.output}
    carries = carries or {}
    stands_for = {original: carrier for carrier, original in carries.items() if carrier in cand_outputs}
    matched = {}
    for node in reference_graph.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            if not out or out in ref_consts:
                continue
            name = stands_for.get(out, out)
            if name in carries and name == out:
                continue  # the candidate's tensor of this name holds another value now
            if name in cand_outputs and name not in cand_consts:
                matched[out] = _dequantized_alias(name, consumers, graph_outputs)
    return matched


def _dequantized_alias(name: str, consumers: dict[str, list], graph_outputs: set[str]) -> str:
    users = consumers.get(name, [])
    if not users or name in graph_outputs or any(u.op_type != "QuantizeLinear" for u in users):
        return name
    for q in users:
        for dq in consumers.get(q.output[0], []):
            if dq.op_type == "DequantizeLinear":
                return dq.output[0]
    return name


def local_model(candidate_proto, matched: dict[str, str], types: dict[str, int]) -> bytes:
    """The candidate with every consumer of a matched tensor reading the reference's value.

    ``matched`` maps reference names to candidate names; consumers of candidate tensor C
    (matched to reference tensor T) read a new input ``T::qtool_reference`` instead. The
    outputs are the matched candidate tensors, each computed by the candidate's own nodes
    from the reference's values of the matched tensors before it.
    """
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(candidate_proto)
    to_ref = {c: r for r, c in matched.items()}
    used = []
    for node in copy.graph.node:
        for i, name in enumerate(node.input):
            if name in to_ref:
                if to_ref[name] not in used:
                    used.append(to_ref[name])
                node.input[i] = to_ref[name] + LOCAL_SUFFIX
    copy.graph.input.extend(
        helper.make_tensor_value_info(r + LOCAL_SUFFIX, types[r], None) for r in used
    )
    del copy.graph.output[:]
    copy.graph.output.extend(helper.make_empty_tensor_value_info(c) for c in matched.values())
    return copy.SerializeToString()


def _segment(graph, tensor: str, stops: set[str]) -> list:
    """Nodes computing ``tensor`` back to the ``stops`` tensors, graph inputs and weights."""
    producers = {out: node for node in graph.node for out in node.output if out}
    seen, order, todo = set(), [], [tensor]
    while todo:
        name = todo.pop()
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type != "Constant":
            order.append(node)
        for inp in node.input:
            if inp and inp not in stops:
                todo.append(inp)
    return order


def _energy(ref: np.ndarray) -> float:
    """sum r^2 over the finite elements (attention masks hold -inf by design)."""
    r = ref.astype(np.float64, copy=False)
    return float(np.sum(np.square(r, where=np.isfinite(r), out=np.zeros_like(r))))


def _error(ref: np.ndarray, got: np.ndarray) -> float:
    """sum (r - c)^2, where equal values (the same infinities included) count 0."""
    r, c = ref.astype(np.float64, copy=False), got.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore"):
        diff = np.where(r == c, 0.0, r - c)
    return float(np.sum(diff * diff))


def _onnx_elem(dtype: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _is_low_bit(candidate_proto) -> bool:
    if any(n.op_type == "MatMulNBits" for n in candidate_proto.graph.node):
        return True
    return any(i.data_type in _LOW_BIT_TYPES for i in candidate_proto.graph.initializer)


def diagnose(
    candidate: str | os.PathLike,
    reference: str | os.PathLike,
    dataset,
    *,
    batch_size: int = 1,
    limit: int = 0,
    top: int = 5,
    threads: int = 0,
) -> dict:
    """Per-layer SQNR of ``candidate`` against ``reference`` on ``dataset``; see the module doc."""
    import json

    from qtool.passes.preprocess import CARRIES_KEY

    ref_proto, cand_proto = _load(reference), _load(candidate)
    props = {p.key: p.value for p in cand_proto.metadata_props}
    matched = matched_tensors(ref_proto.graph, cand_proto.graph, json.loads(props.get(CARRIES_KEY, "{}")))
    if not matched:
        raise UsageError(
            "the candidate shares no intermediate tensor names with the reference",
            "diagnosis matches layers by tensor name; compare a model with the one it was converted from",
        )
    from qtool.model import load
    from qtool.runtime import build_session, infer_types, stream_tensors

    ref_ir, cand_ir = load(reference), load(candidate)
    infer_types(cand_ir)
    cand_names = list(dict.fromkeys(matched.values()))
    # Each session returns every matched tensor of a batch: without onnxruntime's arena that
    # memory is released after the batch instead of being held by all three sessions.
    cand_sess, _ = build_session(cand_ir, cand_names, threads=threads, arena=False)
    cand_inputs = {i.name for i in cand_sess.get_inputs()}
    input_names = [v.name for v in ref_ir.graph.inputs if not v.is_initializer()]
    cand_dir = Path(candidate).resolve().parent

    acc: dict[str, list[float]] = {}  # ref name -> [sum r^2, sum (r-c)^2, sum (r-l)^2]
    local_sess = local_inputs = None
    samples = 0
    stream = stream_tensors(ref_ir, dataset, list(matched) + input_names, batch_size=batch_size,
                            limit=limit, check_finite=False, threads=threads, arena=False)
    for ids, tensors in stream:
        feed = {k: tensors[k] for k in input_names}
        cand_vals = dict(zip(cand_names, cand_sess.run(
            cand_names, {k: v for k, v in feed.items() if k in cand_inputs})))
        if local_sess is None:
            # Compare float tensors of the same shape only; the rest are not layers.
            matched = {r: c for r, c in matched.items()
                       if tensors[r].dtype.kind == "f" and cand_vals[c].shape == tensors[r].shape}
            if not matched:
                raise UsageError("no float tensors are shared by the two models", "")
            acc = {r: [0.0, 0.0, 0.0] for r in matched}
            local_sess = open_session(
                local_model(cand_proto, matched, {r: _onnx_elem(tensors[r].dtype) for r in matched}),
                threads=threads, external_data_dir=cand_dir, role="candidate (layer by layer)", arena=False,
            )
            local_inputs = {i.name for i in local_sess.get_inputs()}
            local_outputs = list(matched.values())
        # One set of candidate tensors at a time beside the reference's: errors of the whole
        # candidate first, then its layer-by-layer run (peak: two sets of tensors, not three).
        for r, c in matched.items():
            acc[r][0] += _energy(tensors[r])
            acc[r][1] += _error(tensors[r], cand_vals[c])
        del cand_vals
        local_feed = {k: v for k, v in feed.items() if k in local_inputs}
        for r in matched:
            if r + LOCAL_SUFFIX in local_inputs:
                local_feed[r + LOCAL_SUFFIX] = tensors[r]
        local_vals = dict(zip(local_outputs, local_sess.run(local_outputs, local_feed)))
        for r, c in matched.items():
            acc[r][2] += _error(tensors[r], local_vals[c])
        samples += len(ids)
        del tensors, local_vals, local_feed

    ref_stops, cand_stops = set(matched), set(matched.values())
    ref_inputs = {i.name for i in ref_proto.graph.input}
    layers = []
    for r, c in matched.items():
        cand_nodes = _segment(cand_proto.graph, c, (cand_stops - {c}) | ref_inputs)
        ref_nodes = _segment(ref_proto.graph, r, (ref_stops - {r}) | ref_inputs)
        cand_ops = [x.op_type for x in cand_nodes]
        quantized = any(op in QDQ_OPS or op in INTEGER_OPS for op in cand_ops)
        main = _main_node(ref_nodes)
        layers.append({
            "tensor": r,
            "candidate_tensor": c,
            "node": (main.name or main.op_type) if main is not None else r,
            "op_type": main.op_type if main is not None else "",
            "reference_nodes": [x.name for x in ref_nodes if x.name],
            "candidate_ops": cand_ops,
            "quantized": quantized,
            "sqnr_db": sqnr_db(acc[r][0], acc[r][1]),
            "local_sqnr_db": sqnr_db(acc[r][0], acc[r][2]),
        })
    layers.sort(key=lambda x: (not x["quantized"], _sort_key(x["local_sqnr_db"])))
    ranked = [x for x in layers if x["quantized"] and math.isfinite(x["local_sqnr_db"])]
    worst = outliers(ranked, top)
    suggested = []
    for layer in worst:
        for name in _quantizable(layer, ref_proto.graph):
            if name not in suggested:
                suggested.append(name)
    low_bit = _is_low_bit(cand_proto)
    bits = 8 if low_bit else 32
    return {
        "samples": samples,
        "matched_tensors": len(matched),
        "top": top,
        "layers": layers,
        "suggested": suggested,
        # qtool convert flags: keep in float (int8 candidates) or at 8 bits (low-bit ones)
        "exclude_flags": [f"{'--keep-8bit' if low_bit else '--exclude'} {shlex.quote(s)}" for s in suggested],
        "recipe_snippet": recipe_snippet(suggested, bits),
        "advice": (
            f"the {len(suggested)} layer(s) adding the most error on their own: "
            + ("keep them at 8 bits (--keep-8bit)" if low_bit else "leave them in float (--exclude)")
            + " and re-convert; then re-run qtool eval to check the gain"
        ) if suggested else "no quantized layer stands out",
    }


def _sort_key(value: float) -> float:
    return math.inf if math.isnan(value) else value


def outliers(ranked: list[dict], top: int, margin_db: float = OUTLIER_MARGIN_DB) -> list[dict]:
    """The layers (worst first) whose local SQNR is ``margin_db`` below the median of all
    quantized layers, at most ``top``; the single worst one when none stands out."""
    if not ranked:
        return []
    median = float(np.median([x["local_sqnr_db"] for x in ranked]))
    chosen = [x for x in ranked if x["local_sqnr_db"] <= median - margin_db][:top]
    return chosen or ranked[:1]


# Ops whose name users pass to --exclude: the weight ops first, then anything quantizable.
_WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather")


def _main_node(nodes: list):
    for node in nodes:
        if node.op_type in _WEIGHT_OPS:
            return node
    return nodes[0] if nodes else None


def _quantizable(layer: dict, graph) -> list[str]:
    from qtool.ops import OP_RULES

    by_name = {n.name: n for n in graph.node if n.name}
    names = layer["reference_nodes"]
    weight = [n for n in names if by_name[n].op_type in _WEIGHT_OPS]
    if weight:
        return weight
    return [n for n in names if by_name[n].op_type in OP_RULES][:1] or names[:1]


def recipe_snippet(nodes: list[str], bits: int) -> str:
    """``[[layer]]`` overrides for ``nodes`` (see qtool.config.LayerOverride)."""
    if not nodes:
        return ""
    what = "in float" if bits == 32 else f"at {bits} bits"
    lines = [f"# from qtool eval --diagnose: keep {what} the layers that lose the most precision"]
    for n in nodes:
        lines += ["[[layer]]", f"match = {_toml_str(n)}", f"bits = {bits}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
