"""The OpenVINO preset's quantizer propagation (qtool.targets.propagate): where its Q/DQ
pairs sit on small models built in code, and that the result still computes the model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import INT8_RNG, feeds_for, init, make_model, minmax_ranges, sqnr, vi
from onnx import helper

from qtool.config import Recipe
from qtool.pipeline import convert_model
from qtool.targets import apply_target

MIN_SQNR_DB = 20.0  # a few quantized ops in a row (conftest.MIN_SQNR_CHAIN_DB)


def _openvino(proto):
    recipe = apply_target(Recipe().override("quantize", target="openvino"))
    feeds = feeds_for(proto)
    model, _reports, _summary = convert_model(ir.from_proto(proto), recipe, table=minmax_ranges(proto, feeds))
    out = ir.to_proto(model)
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB
    return out


def _quantized(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Activation name -> its QuantizeLinear (weights are stored quantized, with no Q)."""
    return {q.input[0]: q for q in model.graph.node if q.op_type == "QuantizeLinear"}


def _producer(model: onnx.ModelProto, name: str) -> str:
    return next(n.op_type for n in model.graph.node if name in n.output)


def _scale(model: onnx.ModelProto, q: onnx.NodeProto) -> float:
    return float(next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == q.input[1]))


def _w(*shape, k=0.3):
    return INT8_RNG.standard_normal(shape).astype(np.float32) * k


def test_q_moves_above_reshape_and_transpose_to_the_matmul_that_made_the_tensor():
    """MatMul -> Reshape -> Transpose -> MatMul: one Q, on the first MatMul's output, so
    OpenVINO fuses it into that MatMul and moves int8 through Reshape/Transpose."""
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
         helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1], name="transpose"),
         helper.make_node("MatMul", ["t", "w2"], ["y"], name="mm2")],
        [vi("x", [2, 24])], [vi("y", None)],
        [init("w1", _w(24, 24)), init("shape", np.array([2, 4, 6], np.int64)), init("w2", _w(4, 5))],
    )
    model = _openvino(proto)
    assert set(_quantized(model)) == {"x", "h"}
    assert _producer(model, "r") == "Reshape"
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    assert _producer(model, reshape.input[0]) == "DequantizeLinear"


def test_concat_inputs_share_one_scale_and_the_concat_runs_on_int8():
    """Conv a, Conv b -> Concat -> Conv: NNCF's unified scales. Both Concat inputs are
    quantized with one scale (the union of their ranges); the Concat output has no Q."""
    proto = make_model(
        [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1] * 4, name="ca"),
         helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1] * 4, name="cb"),
         helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"),
         helper.make_node("Conv", ["cat", "wc"], ["y"], name="cc")],
        [vi("x", ["N", 3, 6, 6])], [vi("y", None)],
        [init("wa", _w(4, 3, 3, 3)), init("wb", _w(4, 3, 3, 3, k=1.0)),  # b: a wider range
         init("wc", _w(5, 8, 1, 1))],
    )
    model = _openvino(proto)
    qs = _quantized(model)
    assert {"a", "b"} <= set(qs) and "cat" not in qs
    assert _scale(model, qs["a"]) == _scale(model, qs["b"])
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    assert all(_producer(model, i) == "DequantizeLinear" for i in cat.input)


def test_spp_maxpools_and_their_concat_share_the_one_q_before_them():
    """YOLO's SPP: x -> MaxPool(5), MaxPool(9); Concat(x, p5, p9) -> Conv. MaxPool
    commutes with Q, so a single Q on x serves the pools and the Concat."""
    proto = make_model(
        [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1] * 4, name="c0"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("MaxPool", ["r"], ["p5"], kernel_shape=[5, 5], pads=[2] * 4, name="p5"),
         helper.make_node("MaxPool", ["r"], ["p9"], kernel_shape=[9, 9], pads=[4] * 4, name="p9"),
         helper.make_node("Concat", ["r", "p5", "p9"], ["cat"], axis=1, name="cat"),
         helper.make_node("Conv", ["cat", "w1"], ["y"], name="c1")],
        [vi("x", ["N", 3, 10, 10])], [vi("y", None)],
        [init("w0", _w(4, 3, 3, 3)), init("w1", _w(6, 12, 1, 1))],
    )
    model = _openvino(proto)
    assert set(_quantized(model)) == {"x", "r"}
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    assert [_producer(model, i) for i in cat.input] == ["DequantizeLinear", "MaxPool", "MaxPool"]
    for pool in (n for n in model.graph.node if n.op_type == "MaxPool"):
        assert _producer(model, pool.input[0]) == "DequantizeLinear", pool.name


def test_q_stays_below_a_branch_that_reads_the_tensor_in_float():
    """h feeds a Transpose -> MatMul and a Sigmoid (float): moving the Q above the
    Transpose would add rounding to the Sigmoid's input, so it stays after the Transpose."""
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0], name="transpose"),
         helper.make_node("MatMul", ["t", "w2"], ["y"], name="mm2"),
         helper.make_node("Sigmoid", ["h"], ["s"], name="sig")],
        [vi("x", [8, 16])], [vi("y", None), vi("s", None)],
        [init("w1", _w(16, 16)), init("w2", _w(8, 4))],
    )
    model = _openvino(proto)
    assert set(_quantized(model)) == {"x", "t"}
    sig = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    assert _producer(model, sig.input[0]) == "MatMul"


def test_attention_keeps_one_q_per_projection_and_one_after_the_query_scaling():
    """qkv = MatMul(x, W) -> Split -> q * c, k, v -> MatMul(q, kT) -> Softmax -> MatMul(., v):
    as NNCF places them: a Q on qkv (fused into its MatMul; Split/Transpose run on int8), a Q
    after the positive scaling of q, a Q after Softmax; none after Split or Transpose."""
    proto = make_model(
        [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="proj"),
         helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=1, name="split"),
         helper.make_node("Mul", ["q", "c"], ["qs"], name="scale"),
         helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0], name="kt"),
         helper.make_node("MatMul", ["qs", "kt"], ["logits"], name="qk"),
         helper.make_node("Softmax", ["logits"], ["p"], axis=-1, name="softmax"),
         helper.make_node("MatMul", ["p", "v"], ["y"], name="pv")],
        [vi("x", [6, 16])], [vi("y", None)],
        [init("wqkv", _w(16, 24)), init("sizes", np.array([8, 8, 8], np.int64)),
         init("c", np.float32(1 / np.sqrt(8)))],
    )
    model = _openvino(proto)
    assert set(_quantized(model)) == {"x", "qkv", "qs", "p"}
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert _producer(model, split.input[0]) == "DequantizeLinear"


def test_global_pool_and_layer_norm_inputs_are_quantized():
    """AVG_POOL and REDUCE_MEAN/MVN read int8 in NNCF's CPU config: the Conv before a
    GlobalAveragePool and the residual Add before a LayerNorm's ReduceMean get a Q, and the
    Q for the Gemm after the pool moves above its Flatten."""
    proto = make_model(
        [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1] * 4, name="c0"),
         helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "w1"], ["h"], name="fc"),
         helper.make_node("Add", ["h", "f"], ["res"], name="residual"),
         helper.make_node("ReduceMean", ["res"], ["mu"], axes=[-1], name="mean"),
         helper.make_node("Sub", ["res", "mu"], ["y"], name="center")],
        [vi("x", ["N", 4, 6, 6])], [vi("y", None)],
        [init("w0", _w(8, 4, 3, 3)), init("w1", _w(8, 8))],
    )
    model = _openvino(proto)
    assert set(_quantized(model)) == {"x", "c", "g", "h", "res"}
    for op in ("GlobalAveragePool", "ReduceMean"):
        node = next(n for n in model.graph.node if n.op_type == op)
        assert _producer(model, node.input[0]) == "DequantizeLinear", op
