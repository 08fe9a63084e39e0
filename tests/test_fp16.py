"""fp16 conversion: models built in code, run on onnxruntime, compared with float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.config import Fp16Config
from qtool.model import iter_nodes
from qtool.passes.fp16 import ORT_CPU_FP16_OPS, convert_fp16

FP16_RTOL = 2e-3  # max |fp16 - fp32| / max |fp32|: a few float16 ulps through 2-4 ops
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"
RNG = np.random.default_rng(1)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _run(proto, feed):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _convert(proto, config=None, **kw):
    config = config or Fp16Config()
    model = ir.serde.deserialize_model(proto)
    report = convert_fp16(model, config, **kw)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out, report


def _mlp():
    """x [N, 8] -> MatMul -> Add -> Relu -> Softmax."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Softmax", ["r"], ["y"], axis=-1),
    ]
    inits = [
        _init("w", RNG.normal(size=(8, 16)).astype(np.float32)),
        _init("b", RNG.normal(size=16).astype(np.float32)),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"x": RNG.normal(size=(5, 8)).astype(np.float32)}


def _close(got, expected, rtol=FP16_RTOL):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.abs(got - expected).max() <= rtol * np.abs(expected).max()


def _initializer_types(proto):
    types = {t.data_type for t in proto.graph.initializer}
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                types |= {t.data_type for t in attr.g.initializer}
    return types


def _cast_pairs(proto):
    """(Cast to float16) fed by (Cast to float32): a redundant round trip."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    pairs = 0
    for node in proto.graph.node:
        if node.op_type == "Cast" and node.attribute[0].i == TensorProto.FLOAT16:
            inner = producers.get(node.input[0])
            if inner is not None and inner.op_type == "Cast" and inner.attribute[0].i == 1:
                pairs += 1
    return pairs


def test_fp16_any_target_runs_and_matches_with_float32_io():
    proto, feed = _mlp()
    (expected,) = _run(proto, feed)
    half, report = _convert(proto, target="any")
    assert report.counts["nodes_float16"] == 4
    assert report.counts["constants_float16"] == 2
    assert _initializer_types(half) == {TensorProto.FLOAT16}
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].name == "y"
    assert [n.op_type for n in half.graph.node] == [
        "Cast",
        "MatMul",
        "Add",
        "Relu",
        "Softmax",
        "Cast",
    ]
    (got,) = _run(half, feed)
    _close(got, expected)


def test_fp16_cpu_target_keeps_compute_float_but_stores_weights_half():
    proto, feed = _mlp()
    (expected,) = _run(proto, feed)
    half, report = _convert(proto, target="cpu")
    assert report.counts["nodes_float16"] == 0
    assert report.counts["weights_stored_float16"] == 2
    assert _initializer_types(half) == {TensorProto.FLOAT16}
    assert report.skipped["MatMul"] == "no float16 kernel on onnxruntime's CPU EP"
    assert any("MatMul x1" in note for note in report.notes)
    (got,) = _run(half, feed)
    _close(got, expected)


def test_op_block_list_keeps_op_in_float_without_cast_pairs():
    proto, feed = _mlp()
    (expected,) = _run(proto, feed)
    config = Fp16Config(op_block_list=("Relu",))
    half, report = _convert(proto, config, target="any")
    assert report.skipped["Relu"] == "in op_block_list"
    ops = [n.op_type for n in half.graph.node]
    assert ops == ["Cast", "MatMul", "Add", "Cast", "Relu", "Cast", "Softmax", "Cast"]
    assert _cast_pairs(half) == 0
    (got,) = _run(half, feed)
    _close(got, expected)


def test_out_of_range_weight_keeps_its_op_in_float():
    proto, feed = _mlp()
    proto.graph.node.append(helper.make_node("Mul", ["y", "big"], ["z"]))
    proto.graph.initializer.append(_init("big", np.full(16, 1e6, np.float32)))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 16]))
    (expected,) = _run(proto, feed)
    half, report = _convert(proto, target="any")
    assert report.counts["kept_float_out_of_range"] == 1
    assert "out of float16 range" in report.skipped["Mul"]
    big = next(t for t in half.graph.initializer if t.name == "big")
    assert big.data_type == TensorProto.FLOAT
    (got,) = _run(half, feed)
    assert np.isfinite(got).all()
    _close(got, expected)


def test_keep_io_types_false_makes_io_half():
    proto, feed = _mlp()
    (expected,) = _run(proto, feed)
    half, _ = _convert(proto, Fp16Config(keep_io_types=False), target="any")
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert "Cast" not in [n.op_type for n in half.graph.node]
    (got,) = _run(half, {"x": feed["x"].astype(np.float16)})
    _close(got.astype(np.float32), expected)


def _if_model():
    w_then = RNG.normal(size=(4, 4)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_then"], ["t_mm"]),
         helper.make_node("Tanh", ["t_mm"], ["t_out"])],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 4])],
        initializer=[_init("w_then", w_then)],
    )  # fmt: skip
    else_graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["e_out"])], "else", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 4])],
    )  # fmt: skip
    nodes = [
        helper.make_node("If", ["c"], ["o"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Relu", ["o"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[_init("k", RNG.normal(size=4).astype(np.float32))],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_if_subgraph_weights_are_converted():
    proto = _if_model()
    half, report = _convert(proto, target="any")
    assert "control flow" in report.skipped["If"]
    if_node = next(n for n in half.graph.node if n.op_type == "If")
    then_branch = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert {t.data_type for t in then_branch.initializer} == {TensorProto.FLOAT16}
    assert then_branch.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert report.counts["nodes_float16"] == 4  # MatMul, Tanh, Mul inside; Relu outside
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    for c in (True, False):
        feed = {"c": np.array(c), "x": x}
        _close(_run(half, feed)[0], _run(proto, feed)[0])


def test_demo_model_fp16_agrees_with_float32():
    proto = onnx.load(str(EXAMPLE))
    x = RNG.normal(size=(32, 1, 16, 16)).astype(np.float32)
    (expected,) = _run(proto, {"input": x})
    for target in ("any", "cpu"):
        half, _ = _convert(proto, target=target)
        (got,) = _run(half, {"input": x})
        _close(got, expected, rtol=5e-3)
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    model = ir.serde.deserialize_model(half)
    assert all(n.op_type != "If" for n in iter_nodes(model))


@pytest.mark.parametrize("op, has_kernel", [("Reshape", True), ("Relu", False), ("MatMul", False)])
def test_ort_cpu_fp16_kernel_table(tmp_path, op, has_kernel):
    """Re-measure a sample of ORT_CPU_FP16_OPS: no kernel means the session inserts Casts."""
    half = TensorProto.FLOAT16
    if op == "Reshape":
        node = helper.make_node("Reshape", ["a", "shape"], ["y"])
        inputs = [helper.make_tensor_value_info("a", half, [2, 4])]
        inits = [_init("shape", np.array([4, 2], np.int64))]
    else:
        names = ["a", "b"] if op == "MatMul" else ["a"]
        node = helper.make_node(op, names, ["y"])
        inputs = [helper.make_tensor_value_info(n, half, [4, 4]) for n in names]
        inits = []
    graph = helper.make_graph(
        [node], "one", inputs, [helper.make_tensor_value_info("y", half, None)], initializer=inits
    )
    path = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "seen.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    seen = onnx.load(str(tmp_path / "seen.onnx"))
    inserted_casts = any(n.op_type == "Cast" for n in seen.graph.node)
    assert inserted_casts != has_kernel
    assert (op in ORT_CPU_FP16_OPS) == has_kernel
