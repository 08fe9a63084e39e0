"""What a model is: inputs, outputs, opsets, op histogram, parameters, quantization candidates.

Reads only the graph and tensor metadata; initializers stored as external data are never read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir

from qtool import ops
from qtool.model import graph_fingerprint, iter_graphs, iter_initializers, iter_nodes, model_inputs


def _shape(value: ir.Value) -> list[int | str] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (str(d) if d is not None else "?") for d in value.shape]


def _dtype(value: ir.Value) -> str:
    return value.dtype.name.lower() if value.dtype is not None else "?"


def summarize(model: ir.Model, path: str | Path | None = None) -> dict:
    """A JSON-ready description of ``model`` (see ``qtool inspect``)."""
    op_counts = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in iter_nodes(model)
    )
    params = 0
    by_dtype: dict[str, dict[str, int]] = {}
    external = 0
    for tensor in iter_initializers(model):
        count = tensor.size
        params += count
        entry = by_dtype.setdefault(tensor.dtype.name.lower(), {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += count
        entry["bytes"] += tensor.nbytes
        if isinstance(tensor, ir.ExternalTensor):
            external += tensor.nbytes

    candidates: dict[str, dict[str, int]] = {}
    weight_bytes_candidates = 0
    for node in iter_nodes(model):
        if not ops.is_candidate(node):
            continue
        rule = ops.rule_for(node)
        entry = candidates.setdefault(node.op_type, {"nodes": 0, "weight_params": 0})
        entry["nodes"] += 1
        for index in rule.weights:
            weight = ops.constant_weight(node, index)
            if weight is not None:
                entry["weight_params"] += weight.size
                weight_bytes_candidates += weight.nbytes
    subgraphs = sum(1 for _ in iter_graphs(model.graph)) - 1

    return {
        "path": str(path) if path is not None else None,
        "ir_version": model.ir_version,
        "opsets": {(d or "ai.onnx"): v for d, v in sorted(model.opset_imports.items())},
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x) or None,
        "fingerprint": graph_fingerprint(model),
        "inputs": [{"name": v.name, "dtype": _dtype(v), "shape": _shape(v)} for v in model_inputs(model)],
        "outputs": [{"name": v.name, "dtype": _dtype(v), "shape": _shape(v)} for v in model.graph.outputs],
        "nodes": sum(op_counts.values()),
        "subgraphs": subgraphs,
        "op_types": dict(op_counts.most_common()),
        "parameters": params,
        "parameters_by_dtype": by_dtype,
        "external_data_bytes": external,
        "quantization_candidates": dict(sorted(candidates.items())),
        "candidate_weight_bytes": weight_bytes_candidates,
        "metadata": dict(model.metadata_props),
    }
