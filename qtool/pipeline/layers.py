"""Layer-wise error: which layers of a converted model lose the precision.

Tensors are matched by name: qtool's and onnxruntime's converters keep the float tensor
names of the original graph on the outputs of quantized layers (the DequantizeLinear or
the scale-Mul that ends a quantized group, MatMulNBits nodes keep the MatMul's output name),
through the folds conversion makes (``matched_tensors``: BatchNorm and scale folded into a
Conv, recorded as ``qtool.carries``; Relu / Clip folded into a quantized output). Every
tensor produced by a node in both graphs (float, not a weight) is a *matched tensor*.

For each matched tensor T, with r the reference's value, c the candidate's and l the
candidate's *local* value:

- ``sqnr_db``: SQNR(r, c) = 10 log10(sum r^2 / sum (r - c)^2): the error accumulated up to T;
- ``local_sqnr_db``: SQNR(r, l), where l is computed by the candidate's nodes between T and
  the previous matched tensors, fed with the *reference's* values of those tensors: the
  error this layer adds on its own. One extra session computes every l at once: the
  candidate graph with each consumer of a matched tensor rewired to a new input fed with
  the reference's value.

Layers are ranked by local SQNR, worst first (``ranked_layers``). Two users: the guard's
repairs (``costly_layers``: which layers to keep float first) and ``qtool eval --diagnose``
(qtool.eval.diagnose, which checks its suggestions by re-converting).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx

from qtool.errors import UsageError
from qtool.ops import INTEGER_OPS, QDQ_OPS
from qtool.pipeline.measure import sqnr_from_sums
from qtool.runtime import open_session

LOCAL_SUFFIX = "::qtool_reference"


FOLDED_ACTIVATIONS = ("Relu", "Clip")  # what converters fold into a quantized output
NARROW_WEIGHT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16)


def _load(path: str | os.PathLike):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _constants(graph) -> set[str]:
    names = {i.name for i in graph.initializer}
    names.update(out for n in graph.node if n.op_type == "Constant" for out in n.output)
    return names


def matched_tensors(reference_graph, candidate_graph, carries: dict[str, str] | None = None) -> dict[str, str]:
    """Reference tensor name -> the candidate tensor holding the same value, in node order.

    A tensor matches when a node produces it in both graphs (weights excluded), through the
    folds conversion makes:

    - ``carries`` (the candidate's ``qtool.carries`` metadata, written by pre-processing): a
      candidate tensor now holds another reference tensor's value; a Conv that absorbed the
      BatchNorm or scale after it produces, under its own name, what that node produced;
    - quantization: when the candidate only quantizes a tensor (every consumer is a
      QuantizeLinear feeding a DequantizeLinear), the DequantizeLinear's output is what the
      rest of the candidate sees, so that is the tensor compared;
    - Relu / Clip folded into that quantization (a zero point at the clip bound makes Q clip):
      the reference's activation is gone from the candidate, and the DequantizeLinear's
      output stands for the activation's output, not for the unclipped tensor before it.
    """
    ref_consts, cand_consts = _constants(reference_graph), _constants(candidate_graph)
    cand_outputs = {o for n in candidate_graph.node for o in n.output if o}
    consumers = _consumers(candidate_graph)
    ref_consumers = _consumers(reference_graph)
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
                alias = _dequantized_alias(name, consumers, graph_outputs)
                folded = _folded_activation(out, ref_consumers, cand_outputs) if alias != name else None
                matched[folded or out] = alias
    return matched


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _folded_activation(tensor: str, ref_consumers: dict[str, list], cand_outputs: set[str]) -> str | None:
    """The output of the reference's Relu/Clip reading only ``tensor`` when the candidate
    no longer computes it (folded into the quantization of ``tensor``), else None."""
    users = ref_consumers.get(tensor, [])
    if len(users) != 1 or users[0].op_type not in FOLDED_ACTIVATIONS or users[0].input[0] != tensor:
        return None
    out = users[0].output[0]
    return out if out not in cand_outputs else None


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


def costly_layers(candidate: str | os.PathLike, reference: str | os.PathLike, dataset, *,
                  count: int = 8, limit: int = 0, threads: int = 0) -> list[list[str]]:
    """The reference's node names of the ``count`` quantized layers that add the most error
    on their own (local SQNR, worst first), one group of names per layer: what the guard
    keeps float first when a candidate misses its floor. Not checked by re-converting."""
    ref_proto, _, layers, _ = ranked_layers(candidate, reference, dataset, batch_size=1,
                                             limit=limit, threads=threads)
    return layer_groups(layers, ref_proto, count)


def ranked_layers(candidate, reference, dataset, *, batch_size: int, limit: int, threads: int) -> tuple:
    """(reference proto, candidate proto, every matched layer worst first, samples seen)."""
    ref_proto, cand_proto, matched = _match(candidate, reference)
    matched, acc, samples = _accumulate(candidate, reference, cand_proto, matched, dataset,
                                        batch_size=batch_size, limit=limit, threads=threads)
    return ref_proto, cand_proto, _layers(ref_proto, cand_proto, matched, acc), samples


def layer_groups(layers: list[dict], ref_proto, count: int) -> list[list[str]]:
    """Node-name groups of the first ``count`` quantized layers with a finite local SQNR."""
    ranked = [x for x in layers if x["quantized"] and math.isfinite(x["local_sqnr_db"])]
    groups: list[list[str]] = []
    for layer in ranked[:count]:
        names = _quantizable(layer, ref_proto.graph)
        if names and names not in groups:
            groups.append(names)
    return groups


def _match(candidate, reference) -> tuple:
    """(reference proto, candidate proto, matched tensors); see ``matched_tensors``."""
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
    return ref_proto, cand_proto, matched


def _accumulate(candidate, reference, cand_proto, matched: dict[str, str], dataset, *,
                batch_size: int, limit: int, threads: int) -> tuple[dict, dict, int]:
    """Stream the dataset: per matched float tensor, [sum r^2, sum (r-c)^2, sum (r-l)^2].
    Returns (the matched tensors kept: float, same shape in both models; sums; samples)."""
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
    acc: dict[str, list[float]] = {}
    local = None
    samples = 0
    stream = stream_tensors(ref_ir, dataset, list(matched) + input_names, batch_size=batch_size,
                            limit=limit, check_finite=False, threads=threads, arena=False)
    for ids, tensors in stream:
        feed = {k: tensors[k] for k in input_names}
        cand_vals = dict(zip(cand_names, cand_sess.run(
            cand_names, {k: v for k, v in feed.items() if k in cand_inputs})))
        if local is None:
            # Compare float tensors of the same shape only; the rest are not layers.
            matched = {r: c for r, c in matched.items()
                       if tensors[r].dtype.kind == "f" and cand_vals[c].shape == tensors[r].shape}
            if not matched:
                raise UsageError("no float tensors are shared by the two models", "")
            acc = {r: [0.0, 0.0, 0.0] for r in matched}
            local = _local_session(cand_proto, matched, tensors, candidate, threads)
        # One set of candidate tensors at a time beside the reference's: errors of the whole
        # candidate first, then its layer-by-layer run (peak: two sets of tensors, not three).
        for r, c in matched.items():
            acc[r][0] += _energy(tensors[r])
            acc[r][1] += _error(tensors[r], cand_vals[c])
        del cand_vals
        local_inputs = {i.name for i in local.get_inputs()}
        local_feed = {k: v for k, v in feed.items() if k in local_inputs}
        local_feed.update({r + LOCAL_SUFFIX: tensors[r] for r in matched if r + LOCAL_SUFFIX in local_inputs})
        outputs = list(matched.values())
        for (r, _), value in zip(matched.items(), local.run(outputs, local_feed)):
            acc[r][2] += _error(tensors[r], value)
        samples += len(ids)
        del tensors, local_feed
    return matched, acc, samples


def _local_session(cand_proto, matched: dict[str, str], tensors: dict, candidate, threads: int):
    types = {r: _onnx_elem(tensors[r].dtype) for r in matched}
    return open_session(
        local_model(cand_proto, matched, types), threads=threads,
        external_data_dir=Path(candidate).resolve().parent, role="candidate (layer by layer)", arena=False,
    )


def _layers(ref_proto, cand_proto, matched: dict[str, str], acc: dict) -> list[dict]:
    """One entry per matched tensor: the nodes computing it, SQNRs; worst quantized first."""
    ref_stops, cand_stops = set(matched), set(matched.values())
    ref_inputs = {i.name for i in ref_proto.graph.input}
    narrow = {i.name for i in cand_proto.graph.initializer if i.data_type in NARROW_WEIGHT_TYPES}
    layers = []
    for r, c in matched.items():
        cand_nodes = _segment(cand_proto.graph, c, (cand_stops - {c}) | ref_inputs)
        ref_nodes = _segment(ref_proto.graph, r, (ref_stops - {r}) | ref_inputs)
        cand_ops = [x.op_type for x in cand_nodes]
        main = _main_node(ref_nodes)
        layers.append({
            "tensor": r,
            "candidate_tensor": c,
            "node": (main.name or main.op_type) if main is not None else r,
            "op_type": main.op_type if main is not None else "",
            "reference_nodes": [x.name for x in ref_nodes if x.name],
            "candidate_ops": cand_ops,
            # Weight storage (int8-weights, fp16-weights) quantizes a layer through a Cast of
            # its int8 / float16 initializer, not through Q/DQ.
            "quantized": any(op in QDQ_OPS or op in INTEGER_OPS for op in cand_ops)
            or any(x.op_type == "Cast" and x.input[0] in narrow for x in cand_nodes),
            "sqnr_db": sqnr_from_sums(acc[r][0], acc[r][1]),
            "local_sqnr_db": sqnr_from_sums(acc[r][0], acc[r][2]),
        })
    layers.sort(key=lambda x: (not x["quantized"], _sort_key(x["local_sqnr_db"])))
    return layers


def _sort_key(value: float) -> float:
    return math.inf if math.isnan(value) else value


# Ops whose name users pass to --exclude: the weight ops first, then anything quantizable.


_WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather")


def _main_node(nodes: list):
    """The node a layer is named after: its weight op, else the op before a folded activation."""
    for node in nodes:
        if node.op_type in _WEIGHT_OPS:
            return node
    rest = [n for n in nodes if n.op_type not in FOLDED_ACTIVATIONS]
    return (rest or nodes or [None])[0]


def _quantizable(layer: dict, graph) -> list[str]:
    from qtool.ops import OP_RULES

    by_name = {n.name: n for n in graph.node if n.name}
    names = layer["reference_nodes"]
    weight = [n for n in names if by_name[n].op_type in _WEIGHT_OPS]
    if weight:
        return weight
    return [n for n in names if by_name[n].op_type in OP_RULES][:1] or names[:1]
