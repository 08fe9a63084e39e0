"""Which quantized nodes really run as integer kernels, per provider, and why int8 can be slow.

onnxruntime fuses ``DequantizeLinear -> op -> QuantizeLinear`` groups into integer kernels
while optimizing the graph. We let it write the optimized graph
(``SessionOptions.optimized_model_filepath``, EXTENDED level: the hardware-independent
fusions, without layout-specific rewrites) and read it back:

- ``integer_nodes``: op type -> count of integer kernels (QLinearConv, MatMulInteger,
  MatMulNBits, ...);
- ``float_after_dequantize``: compute nodes that still run in float on dequantized inputs —
  ``activations`` when an activation was dequantized (an unfused QDQ pair: the int8 model
  pays for Q/DQ and still computes in float), ``weights`` when only a constant weight was
  (weight-only storage: smaller, not integer arithmetic).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

from qtool.ops import INTEGER_OPS, QDQ_OPS

COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Sub", "Div", "Gather", "Attention",
    "AveragePool", "GlobalAveragePool", "Softmax", "Concat", "FusedConv", "FusedMatMul", "FusedGemm",
})


def optimized_graph(model: str | os.PathLike, provider: str = "cpu", threads: int = 0):
    """The ONNX graph onnxruntime runs for ``model`` on ``provider`` (an onnx.ModelProto)."""
    import onnx

    from qtool.runtime import open_session

    with tempfile.TemporaryDirectory(prefix="qtool-hw-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        open_session(model, provider, threads=threads, optimization="extended",
                     optimized_path=str(out), role="candidate")
        return onnx.load(str(out), load_external_data=False)


def classify(graph) -> dict:
    """Integer kernels and float-after-dequantize nodes of an (optimized) onnx GraphProto."""
    producers = {out: node for node in graph.node for out in node.output}
    constants = {init.name for init in graph.initializer}
    integer = Counter()
    float_nodes = []
    qdq = Counter()
    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            integer[node.op_type] += 1
            continue
        if node.op_type in QDQ_OPS:
            qdq[node.op_type] += 1
            continue
        if node.op_type not in COMPUTE_OPS:
            continue
        kinds = set()
        for name in node.input:
            src = producers.get(name)
            if src is None or src.op_type != "DequantizeLinear":
                continue
            weight = src.input[0] in constants or (
                src.input[0] in producers and producers[src.input[0]].op_type == "Constant")
            kinds.add("weights" if weight else "activations")
        if kinds:
            float_nodes.append({
                "node": node.name, "op_type": node.op_type,
                "dequantized": "activations" if "activations" in kinds else "weights",
            })
    return {"integer_nodes": dict(integer), "float_after_dequantize": float_nodes, "qdq_nodes": dict(qdq)}


def _activation_types(model: str | os.PathLike) -> set[str]:
    """Element types of the zero points of non-constant QuantizeLinear inputs (activations)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    types = set()
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is not None:
                types.add(onnx.TensorProto.DataType.Name(zp.data_type).lower())
        if node.op_type == "DynamicQuantizeLinear":
            types.add("uint8")
    return types


def check(
    candidate: str | os.PathLike,
    providers: list[str],
    *,
    threads: int = 0,
    latency_ratio: dict[str, float] | None = None,
) -> dict:
    """Per-provider integer/float node report, CPU features, and causes when int8 is slower."""
    from qtool.hardware import cpu_features

    cpu = cpu_features()
    result = {"providers": [], "cpu_features": cpu["features"], "causes": [], "warnings": []}
    for p in providers:
        graph = optimized_graph(candidate, p, threads).graph
        entry = {"provider": p, **classify(graph)}
        result["providers"].append(entry)

    first = result["providers"][0] if result["providers"] else None
    causes = []
    if first is not None:
        unfused = [n for n in first["float_after_dequantize"] if n["dequantized"] == "activations"]
        if unfused:
            names = ", ".join(n["node"] or n["op_type"] for n in unfused[:5])
            causes.append(
                f"{len(unfused)} quantized node(s) still run in float after DequantizeLinear "
                f"(unfused QDQ pairs: {names}{' ...' if len(unfused) > 5 else ''}); they pay for "
                "Q/DQ without integer arithmetic"
            )
        if first["qdq_nodes"].get("DynamicQuantizeLinear"):
            causes.append(
                "dynamic quantization computes activation scales at run time "
                "(DynamicQuantizeLinear); on small layers that costs more than the int8 GEMM saves"
            )
    features = cpu["features"]
    if cpu["machine"] in ("x86_64", "AMD64") and not (
        features.get("AVX-512 VNNI") or features.get("AVX-VNNI") or features.get("AMX-INT8")
    ):
        causes.append("this CPU has no VNNI: int8 dot products take 3 instructions instead of 1")
    if "int8" in _activation_types(candidate) and cpu["machine"] in ("x86_64", "AMD64"):
        causes.append(
            "activations are signed int8: x86 int8 kernels are fastest with uint8 activations "
            "(convert with activation_type = \"uint8\")"
        )
    result["causes"] = causes
    for p, ratio in (latency_ratio or {}).items():
        if ratio > 1.0:
            why = "; ".join(causes) if causes else "no cause found in the graph (small model: run overhead?)"
            result["warnings"].append(
                f"the candidate is slower than the reference on {p} ({ratio:.2f}x): {why}"
            )
    return result
