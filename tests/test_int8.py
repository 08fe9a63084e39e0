"""int8 conversion: scale maths, each op handler on 2-5 node models, dynamic, QOperator.

Every model is built in code, converted, loaded by onnxruntime and compared with the float
model on random inputs. Bounds are SQNR of the outputs in dB (float vs converted):
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.config import Recipe, load_recipe
from qtool.errors import UsageError
from qtool.passes.preprocess import preprocess
from qtool.passes.qdq import quantize_static
from qtool.pipeline import convert_model
from qtool.quant import scales
from qtool.quant.scales import DegenerateRange, QParams, activation_params, quantize, weight_params

# One 8-bit quantization step on a unit-scale signal is ~48 dB; a few requantizations and
# int8 weights cost some of it. Below these the conversion is wrong, not just lossy.
MIN_SQNR_DB = 25.0  # a single quantized op
MIN_SQNR_CHAIN_DB = 20.0  # several quantized ops in a row
RNG = np.random.default_rng(0)


# -- helpers ------------------------------------------------------------------------------

def make_model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def session(model) -> ort.InferenceSession:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def minmax_ranges(proto: onnx.ModelProto, feeds: list[dict]) -> dict[str, tuple[float, float]]:
    """Min/max of every float tensor over ``feeds`` (a stand-in for qtool calibrate)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    m = onnx.shape_inference.infer_shapes(m)
    known = {o.name for o in m.graph.output}
    for v in list(m.graph.value_info) + list(m.graph.input):
        if v.name not in known and v.type.tensor_type.elem_type == TensorProto.FLOAT:
            m.graph.output.append(vi(v.name, None))
            known.add(v.name)
    s = session(m)
    names = [o.name for o in s.get_outputs()]
    ranges: dict[str, tuple[float, float]] = {}
    for feed in feeds:
        for name, value in zip(names, s.run(None, feed)):
            if value.dtype != np.float32:
                continue
            lo, hi = float(value.min()), float(value.max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
    return ranges


def feeds_for(proto, n=4, batch=2):
    out = []
    for _ in range(n):
        feed = {}
        for inp in proto.graph.input:
            dims = [d.dim_value if d.dim_value else batch for d in inp.type.tensor_type.shape.dim]
            if inp.type.tensor_type.elem_type == TensorProto.INT64:
                feed[inp.name] = RNG.integers(0, 50, dims).astype(np.int64)
            else:
                feed[inp.name] = RNG.standard_normal(dims).astype(np.float32)
        out.append(feed)
    return out


def sqnr(proto, converted, feed) -> float:
    ref = session(proto).run(None, feed)
    got = session(converted).run(None, feed)
    return min(scales.sqnr_db(r, g) for r, g in zip(ref, got))


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.to_proto(model).graph.node]


def static(proto, recipe=None, feeds=None, **overrides):
    feeds = feeds or feeds_for(proto)
    recipe = (recipe or Recipe())
    if overrides:
        recipe = recipe.override("quantize", **overrides)
    ranges = minmax_ranges(proto, feeds)
    model, reports, summary = convert_model(ir.from_proto(proto), recipe, table=ranges)
    return model, reports, summary, feeds


def assert_no_dangling(model: ir.Model) -> None:
    proto = ir.to_proto(model)
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            assert consumers.get(node.output[0]) or node.output[0] in outputs, node.name
        if node.op_type == "DequantizeLinear":
            assert consumers.get(node.output[0]) or node.output[0] in outputs, node.name


def conv_w(cout, cin, k=3):
    return (RNG.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)


# -- scale maths --------------------------------------------------------------------------

def test_quantize_rounds_half_to_even():
    p = QParams(np.asarray(1.0, np.float32), np.asarray(0, np.uint8), "uint8")
    assert quantize(np.array([0.5, 1.5, 2.5, 3.5], np.float32), p).tolist() == [0, 2, 2, 4]
    p8 = QParams(np.asarray(1.0, np.float32), np.asarray(0, np.int8), "int8")
    assert quantize(np.array([-0.5, -1.5, -2.5, 300.0, -300.0], np.float32), p8).tolist() == [0, -2, -2, 127, -128]


def test_activation_params_include_zero_and_round_trip():
    p = activation_params(0.5, 2.0, "uint8")  # widened to [0, 2]
    assert int(p.zero_point) == 0 and np.isclose(float(p.scale), 2.0 / 255)
    p = activation_params(-1.0, 3.0, "uint8")
    x = np.linspace(-1, 3, 101, dtype=np.float32)
    err = np.abs(scales.dequantize(quantize(x, p), p) - x).max()
    assert err <= float(p.scale) / 2 + 1e-7
    assert scales.dequantize(quantize(np.zeros(1, np.float32), p), p)[0] == 0.0  # zero is exact
    ps = activation_params(-1.0, 3.0, "int8", symmetric=True)
    assert int(ps.zero_point) == 0 and np.isclose(float(ps.scale), 3.0 / 127)


@pytest.mark.parametrize(
    "lo,hi,reason",
    [(float("nan"), 1.0, "not finite"), (-float("inf"), 0.0, "not finite"),
     (-3.4e38, 0.0, "mask or sentinel"), (0.0, 0.0, "constant zero"), (2.0, 1.0, "empty")],
)
def test_degenerate_ranges_raise_with_reason(lo, hi, reason):
    with pytest.raises(DegenerateRange, match=reason):
        activation_params(lo, hi)


def test_weight_params_per_channel_and_zero_channel():
    w = np.stack([np.full((3, 2), 0.5), np.zeros((3, 2)), np.full((3, 2), -2.0)]).astype(np.float32)
    p = weight_params(w, 0)
    assert p.scale.tolist() == pytest.approx([0.5 / 127, 1.0, 2.0 / 127])
    assert p.zero_point.dtype == np.int8 and not p.zero_point.any()
    q = quantize(w, p)
    assert q[0].max() == 127 and q[2].min() == -127 and not q[1].any()
    with pytest.raises(DegenerateRange):
        weight_params(np.array([[np.nan, 1.0]], np.float32), 0)


# -- static QDQ, one op at a time -----------------------------------------------------------

def test_conv_relu_folds_relu_and_uses_int32_bias():
    proto = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [vi("x", ["N", 3, 8, 8])], [vi("y", None)],
        [init("w", conv_w(8, 3)), init("b", RNG.standard_normal(8).astype(np.float32))],
    )
    model, _reports, summary, feeds = static(proto)
    types = op_types(model)
    assert "Relu" not in types and types.count("Conv") == 1
    g = ir.to_proto(model).graph
    inits = {i.name: i for i in g.initializer}
    conv = next(n for n in g.node if n.op_type == "Conv")
    producers = {o: n for n in g.node for o in n.output}
    assert all(producers[i].op_type == "DequantizeLinear" for i in conv.input)
    bias_dq = producers[conv.input[2]]
    assert inits[bias_dq.input[0]].data_type == TensorProto.INT32
    w_dq = producers[conv.input[1]]
    assert inits[w_dq.input[0]].data_type == TensorProto.INT8 and list(inits[w_dq.input[1]].dims) == [8]
    # the output's zero point is qmin, so Q itself clips like the removed ReLU
    out_q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == conv.output[0])
    assert [o.name for o in g.output] == ["y"]  # the graph output keeps its name
    assert numpy_helper.to_array(inits[out_q.input[2]]) == 0
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB
    assert summary.quantized["Conv"] == 1 and summary.quantized["Relu"] == 1
    assert_no_dangling(model)


def test_relu6_clip_folds_and_clip_with_negative_floor_is_kept_in_range():
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip")],
        [vi("x", ["N", 4, 6, 6])], [vi("y", None)],
        [init("w", conv_w(4, 4, 1) * 4), init("lo", np.float32(0)), init("hi", np.float32(6))],
    )
    model, *_ , feeds = static(proto)
    assert "Clip" not in op_types(model)
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "GlobalAveragePool"])
def test_pools(op):
    attrs = {} if op == "GlobalAveragePool" else {"kernel_shape": [2, 2], "strides": [2, 2]}
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node(op, ["c"], ["y"], name="pool", **attrs)],
        [vi("x", ["N", 4, 8, 8])], [vi("y", None)], [init("w", conv_w(8, 4, 1))],
    )
    model, _reports, summary, feeds = static(proto)
    assert summary.quantized[op] == 1
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB
    if op == "MaxPool":  # shares the Conv output's scale: no requantization
        g = ir.to_proto(model).graph
        qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
        assert len({n.input[1] for n in qs}) == 2  # input x, conv output (shared by MaxPool)


def test_data_movement_ops_share_scale():
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1], name="tr"),
         helper.make_node("Reshape", ["t", "shape"], ["r"], name="rs"),
         helper.make_node("MatMul", ["r", "m"], ["y"], name="mm")],
        [vi("x", [2, 4, 4, 4])], [vi("y", None)],
        [init("w", conv_w(8, 4, 1)), init("shape", np.array([2, 128], np.int64)),
         init("m", RNG.standard_normal((128, 16)).astype(np.float32) * 0.1)],
    )
    model, _reports, summary, feeds = static(proto)
    g = ir.to_proto(model).graph
    scale_of = {n.output[0]: n.input[1] for n in g.node if n.op_type == "QuantizeLinear"}
    producers = {o: n for n in g.node for o in n.output}
    conv_q = next(k for k, n in producers.items() if n.op_type == "QuantizeLinear" and n.input[0] == "c")
    rs_q = next(k for k, n in producers.items() if n.op_type == "QuantizeLinear" and n.input[0] == "r")
    assert scale_of[conv_q] == scale_of[rs_q]
    assert summary.quantized["Transpose"] == summary.quantized["Reshape"] == 1
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB


def test_matmul_activation_by_activation_and_gemm_transb():
    proto = make_model(
        [helper.make_node("MatMul", ["a", "b"], ["ab"], name="mm"),
         helper.make_node("Gemm", ["ab", "w", "bias"], ["y"], transB=1, name="gemm")],
        [vi("a", [4, 8]), vi("b", [8, 16])], [vi("y", None)],
        [init("w", RNG.standard_normal((5, 16)).astype(np.float32)), init("bias", np.ones(5, np.float32))],
    )
    model, _reports, summary, feeds = static(proto)
    assert summary.quantized["MatMul"] == 1 and summary.quantized["Gemm"] == 1
    g = ir.to_proto(model).graph
    dq_axes = [a.i for n in g.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert 0 in dq_axes  # Gemm transB=1: output channels are rows of B
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


@pytest.mark.parametrize("op", ["Add", "Mul", "Concat"])
def test_binary_and_concat(op):
    attrs = {"axis": 1} if op == "Concat" else {}
    proto = make_model(
        [helper.make_node(op, ["a", "b"], ["y"], name="op", **attrs)],
        [vi("a", [2, 8]), vi("b", [2, 8])], [vi("y", None)],
    )
    model, _reports, summary, feeds = static(proto)
    assert summary.quantized[op] == 1
    assert op_types(model).count("QuantizeLinear") == 3
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


def test_add_with_constant_operand_quantizes_the_constant():
    proto = make_model(
        [helper.make_node("Add", ["a", "k"], ["y"], name="add")],
        [vi("a", [2, 8])], [vi("y", None)], [init("k", RNG.standard_normal((1, 8)).astype(np.float32))],
    )
    model, *_, feeds = static(proto)
    g = ir.to_proto(model).graph
    producers = {o: n.op_type for n in g.node for o in n.output}
    add = next(n for n in g.node if n.op_type == "Add")
    assert [producers[i] for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


def test_softmax_resize_and_conv_transpose():
    proto = make_model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["ct"], strides=[2, 2], name="deconv"),
         helper.make_node("Resize", ["ct", "", "sc"], ["rz"], mode="nearest", name="resize"),
         helper.make_node("Softmax", ["rz"], ["y"], axis=1, name="softmax")],
        [vi("x", [1, 4, 4, 4])], [vi("y", None)],
        [init("w", RNG.standard_normal((4, 3, 2, 2)).astype(np.float32) * 0.3),
         init("sc", np.array([1, 1, 2, 2], np.float32))],
    )
    model, _reports, summary, feeds = static(proto)
    for op in ("ConvTranspose", "Resize", "Softmax"):
        assert summary.quantized[op] == 1, op
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB


def test_gather_of_weights_stores_int8_rows():
    table = RNG.standard_normal((100, 64)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")],
        [vi("ids", [2, 5], TensorProto.INT64)], [vi("y", None)],
        [init("emb", table), init("w", RNG.standard_normal((64, 8)).astype(np.float32))],
    )
    model, _reports, summary, feeds = static(proto)
    g = ir.to_proto(model).graph
    assert not any(i.name == "emb" for i in g.initializer)  # the float table is gone
    assert any(i.data_type == TensorProto.INT8 and list(i.dims) == [100, 64] for i in g.initializer)
    assert summary.quantized["Gather"] == 1
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


def test_weights_inside_if_subgraph_are_quantized():
    w = conv_w(4, 4, 1)
    branch_nodes = [helper.make_node("Conv", ["x", "w_then"], ["t"], name="conv_then")]
    then_g = helper.make_graph(branch_nodes, "then", [], [vi("t", None)], [init("w_then", w)])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [], [vi("e", None)])
    proto = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
        [vi("x", [1, 4, 4, 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", None)],
    )
    feeds = [{"x": RNG.standard_normal((1, 4, 4, 4)).astype(np.float32), "cond": np.array(True)}]
    model, _reports, summary = convert_model(ir.from_proto(proto), Recipe(), table={"x": (-3.0, 3.0)})
    then = next(a.g for a in ir.to_proto(model).graph.node[-1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["DequantizeLinear", "Conv"]
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB
    assert summary.quantized["Conv"] == 1


def test_exotic_and_unknown_ops_stay_float_and_are_reported():
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Erf", ["c"], ["e"], name="erf"),
         helper.make_node("Gelu", ["e"], ["y"], domain="com.microsoft", name="custom")],
        [vi("x", [1, 4, 4, 4])], [vi("y", None)], [init("w", conv_w(4, 4, 1))],
    )
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model, _reports, summary, feeds = static(proto)
    assert summary.float_["Erf"] == 1 and summary.reasons["Erf"]
    assert "Gelu" in op_types(model) and "Erf" in op_types(model)
    session(model)  # loads
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


def test_degenerate_range_is_left_in_float_with_reason():
    # x + mask where the mask is -1e9: a sentinel range, never a zero/infinite scale
    proto = make_model(
        [helper.make_node("Add", ["x", "mask"], ["y"], name="add_mask")],
        [vi("x", [2, 8]), vi("mask", [2, 8])], [vi("y", None)],
    )
    ranges = {"x": (-1.0, 1.0), "mask": (-1e9, 0.0), "y": (-1e9, 1.0)}
    model, reports, _summary = convert_model(ir.from_proto(proto), Recipe(), table=ranges)
    notes = " ".join(n for r in reports for n in r.notes)
    assert "mask or sentinel" in notes
    for init_ in ir.to_proto(model).graph.initializer:
        assert np.all(np.isfinite(numpy_helper.to_array(init_).astype(np.float64)))
    feed = {"x": np.ones((2, 8), np.float32), "mask": np.full((2, 8), -1e9, np.float32)}
    out = session(model).run(None, feed)[0]
    assert np.all(np.isfinite(out))


def test_input_model_is_not_modified():
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [vi("x", [1, 4, 4, 4])], [vi("y", None)], [init("w", conv_w(4, 4, 1))],
    )
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    convert_model(model, Recipe(), table={"x": (-3.0, 3.0), "y": (-3.0, 3.0)})
    assert ir.to_proto(model).SerializeToString() == before


def test_per_channel_needs_opset_13_and_is_never_upgraded_silently():
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [vi("x", [1, 4, 4, 4])], [vi("y", None)], [init("w", conv_w(4, 4, 1))], opset=11,
    )
    ranges = {"x": (-3.0, 3.0), "y": (-3.0, 3.0)}
    with pytest.raises(UsageError, match="opset 13") as err:
        convert_model(ir.from_proto(proto), Recipe(), table=ranges)
    assert "--per-tensor" in err.value.hint
    model, _, _ = convert_model(ir.from_proto(proto), Recipe().override("quantize", per_channel=False), table=ranges)
    assert model.opset_imports[""] == 11
    model, _, _ = convert_model(ir.from_proto(proto), Recipe().override("quantize", allow_opset_upgrade=True), table=ranges)
    assert model.opset_imports[""] == 13


def test_static_without_table_is_a_usage_error():
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1])], [vi("y", None)])
    with pytest.raises(UsageError, match="activation ranges"):
        convert_model(ir.from_proto(proto), Recipe())


def _small_cnn():
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="c1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, name="c2"),
         helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
         helper.make_node("GlobalAveragePool", ["s"], ["y"], name="gap")],
        [vi("x", ["N", 8, 8, 8])], [vi("y", None)],
        [init("w1", conv_w(16, 8)), init("b1", np.zeros(16, np.float32)), init("w2", conv_w(16, 16))],
    )


def test_onnxruntime_fuses_the_default_qdq_into_integer_kernels(tmp_path):
    proto = _small_cnn()
    model, *_, _feeds = static(proto)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert fused.count("QLinearConv") == 2 and "QLinearAdd" in fused, fused
    assert "Conv" not in fused


def test_qoperator_format():
    proto = _small_cnn()
    model, _reports, _summary, feeds = static(proto, format="qoperator")
    types = op_types(model)
    assert types.count("QLinearConv") == 2 and "QLinearAdd" in types and "QLinearGlobalAveragePool" in types
    assert "Conv" not in types
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB
    assert_no_dangling(model)


def test_int8_activations_and_symmetric():
    proto = _small_cnn()
    model, *_, feeds = static(proto, activation_type="int8", symmetric_activations=True)
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB
    assert "Relu" in op_types(model)  # symmetric ranges cannot clip at 0: ReLU stays


def test_exclude_by_name_and_op_type():
    proto = _small_cnn()
    _model, _reports, summary, _ = static(proto, exclude=("c2", "GlobalAveragePool"))
    assert summary.float_["Conv"] == 1 and summary.quantized["Conv"] == 1
    assert summary.float_["GlobalAveragePool"] == 1
    assert "excluded by --exclude / recipe" in summary.reasons["Conv"]


# -- dynamic --------------------------------------------------------------------------------

def _mlp():
    d, f = 64, 128
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
         helper.make_node("Relu", ["h"], ["hr"], name="act"),
         helper.make_node("MatMul", ["hr", "w2"], ["o"], name="down"),
         helper.make_node("Gemm", ["o", "w3", "b3"], ["y"], transB=1, name="lm_head")],
        [vi("x", ["B", d])], [vi("y", None)],
        [init("w1", RNG.standard_normal((d, f)).astype(np.float32) * 0.1),
         init("w2", RNG.standard_normal((f, d)).astype(np.float32) * 0.1),
         init("w3", RNG.standard_normal((100, d)).astype(np.float32) * 0.1),
         init("b3", RNG.standard_normal(100).astype(np.float32))],
    )


def test_dynamic_uses_dynamic_quantize_matmul_and_keeps_excluded_layers():
    proto = _mlp()
    recipe = load_recipe("int8-dynamic").override("quantize", exclude=("lm_head",))
    model, _reports, summary = convert_model(ir.from_proto(proto), recipe)
    types = op_types(model)
    assert types.count("DynamicQuantizeMatMul") == 2 and "Gemm" in types
    assert summary.float_["Gemm"] == 1 and summary.quantized["MatMul"] == 2
    feed = {"x": RNG.standard_normal((8, 64)).astype(np.float32)}
    assert sqnr(proto, model, feed) > MIN_SQNR_CHAIN_DB
    full, *_ = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    assert op_types(full).count("DynamicQuantizeMatMul") == 3  # Gemm transB + bias too
    assert sqnr(proto, full, feed) > MIN_SQNR_CHAIN_DB


def test_dynamic_leaves_conv_in_float_with_reason():
    proto = _small_cnn()
    _model, _reports, summary = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    assert summary.float_["Conv"] == 2
    assert any("ConvInteger" in r for r in summary.reasons["Conv"])


def test_static_pass_reports_counts_directly():
    proto = _small_cnn()
    ranges = minmax_ranges(proto, feeds_for(proto))
    model = ir.from_proto(proto)
    preprocess(model)  # types known: selection only quantizes float tensors
    report = quantize_static(model, Recipe(), ranges)
    assert report.counts["Conv"] == 2 and report.counts["Relu folded"] == 1


def test_zero_pad_shares_scale_and_reflect_pad_stays_float():
    # The Pad feeds two Convs, so preprocessing cannot fold it into one of them.
    def model(mode):
        return make_model(
            [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Pad", ["c", "pads"], ["p"], mode=mode, name="pad"),
             helper.make_node("Conv", ["p", "w2"], ["y1"], name="conv2"),
             helper.make_node("Conv", ["p", "w2"], ["y2"], name="conv3"),
             helper.make_node("Add", ["y1", "y2"], ["y"], name="add")],
            [vi("x", [1, 4, 6, 6])], [vi("y", None)],
            [init("w", conv_w(4, 4, 1)), init("w2", conv_w(4, 4, 3)),
             init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
        )
    proto = model("constant")
    qmodel, _reports, summary, feeds = static(proto)
    assert summary.quantized["Pad"] == 1
    assert sqnr(proto, qmodel, feeds[0]) > MIN_SQNR_CHAIN_DB
    proto = model("reflect")
    qmodel, _reports, summary, feeds = static(proto)
    assert summary.float_["Pad"] == 1 and "constant-mode" in next(iter(summary.reasons["Pad"]))
    assert sqnr(proto, qmodel, feeds[0]) > MIN_SQNR_CHAIN_DB


def test_dynamic_smoothing_moves_outlier_channels_into_weights():
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [vi("x", ["B", 64])], [vi("y", None)],
        [init("w", RNG.standard_normal((64, 128)).astype(np.float32) * 0.1)],
    )
    gain = np.ones(64, np.float32)
    gain[:2] = 300.0  # two outlier channels, as in LLM hidden states
    feed = {"x": RNG.standard_normal((16, 64)).astype(np.float32) * gain}
    recipe = load_recipe("int8-dynamic")
    plain, _, _ = convert_model(ir.from_proto(proto), recipe)
    absmax = {"x": np.abs(feed["x"]).max(axis=0)}
    smoothed, reports, _ = convert_model(ir.from_proto(proto), recipe, absmax=absmax)
    assert next(r for r in reports if r.name == "dynamic").counts["inputs smoothed"] == 1
    assert op_types(smoothed) == ["Mul", "DynamicQuantizeMatMul"]
    assert sqnr(proto, smoothed, feed) > sqnr(proto, plain, feed) + 6.0  # 4x less noise at least


def test_dynamic_smoothing_folds_into_the_producer_when_it_can():
    # An RMSNorm-style Mul by a per-channel weight feeding the smoothed MatMul takes the
    # 1/s itself; a gated MLP's Mul(act, up) takes it in the up projection's columns; an
    # input also read by a float op (a residual Add) gets a Mul.
    k, n = 64, 96
    proto = make_model(
        [helper.make_node("Mul", ["x", "g"], ["h"], name="norm_weight"),
         helper.make_node("MatMul", ["h", "w_up"], ["up"], name="up_proj"),
         helper.make_node("MatMul", ["h", "w_gate"], ["h2"], name="gate_proj"),
         helper.make_node("Sigmoid", ["h2"], ["act"], name="act"),
         helper.make_node("Mul", ["act", "up"], ["m"], name="gated"),
         helper.make_node("MatMul", ["m", "w_down"], ["d"], name="down_proj"),
         helper.make_node("MatMul", ["d", "w_o"], ["o"], name="o_proj"),
         helper.make_node("Add", ["d", "o"], ["y"], name="residual")],
        [vi("x", ["B", k])], [vi("y", None)],
        [init("g", RNG.uniform(0.5, 2, k).astype(np.float32)),
         init("w_up", RNG.standard_normal((k, n)).astype(np.float32) * 0.1),
         init("w_gate", RNG.standard_normal((k, n)).astype(np.float32) * 0.1),
         init("w_down", RNG.standard_normal((n, k)).astype(np.float32) * 0.1),
         init("w_o", RNG.standard_normal((k, k)).astype(np.float32) * 0.1)],
    )
    gain = np.ones(k, np.float32)
    gain[:2] = 50.0
    feed = {"x": RNG.standard_normal((16, k)).astype(np.float32) * gain}
    sess = session(proto)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(vi(name, None) for name in ("h", "m", "d"))
    _, *values = session(probe).run(None, feed)
    absmax = {name: np.abs(v).max(axis=0) for name, v in zip(("h", "m", "d"), values)}
    recipe = load_recipe("int8-dynamic")
    smoothed, reports, _ = convert_model(ir.from_proto(proto), recipe, absmax=absmax)
    counts = next(r for r in reports if r.name == "dynamic").counts
    assert counts["inputs smoothed"] == 3
    assert counts["smoothing folded into Mul by a constant"] == 1
    assert counts["smoothing folded into the weight of the MatMul feeding a Mul"] == 1
    assert op_types(smoothed).count("Mul") == 3  # norm weight, gate, one inserted for d
    types = op_types(smoothed)
    assert types.count("DynamicQuantizeMatMul") + types.count("MatMulIntegerToFloat") == 4
    ref = sess.run(None, feed)[0]
    got = session(smoothed).run(None, feed)[0]
    assert scales.sqnr_db(ref, got) > MIN_SQNR_CHAIN_DB


def test_dynamic_matmul_takes_its_bias_add():
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("Add", ["b", "m"], ["y"], name="bias")],
        [vi("x", ["B", 64])], [vi("y", None)],
        [init("w", RNG.standard_normal((64, 128)).astype(np.float32)),
         init("b", RNG.standard_normal(128).astype(np.float32))],
    )
    model, _, _ = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    assert op_types(model) == ["DynamicQuantizeMatMul"]
    feed = {"x": RNG.standard_normal((8, 64)).astype(np.float32)}
    assert sqnr(proto, model, feed) > MIN_SQNR_DB


def test_cleanup_removes_dangling_pairs_and_keeps_useful_ones():
    from qtool.passes.cleanup import cleanup

    s, z = init("s", np.float32(0.1)), init("z", np.uint8(128))
    proto = make_model(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
         helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
         helper.make_node("Sigmoid", ["xd"], ["a"], name="float_op"),  # nothing integer here
         helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"], name="q2"),
         helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["ad"], name="dq2"),
         helper.make_node("MaxPool", ["ad"], ["p"], kernel_shape=[1, 1], name="pool"),
         helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"], name="q3"),
         helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["y"], name="dq3")],
        [vi("x", [1, 2, 4, 4])], [vi("y", None)], [s, z],
    )
    model = ir.from_proto(proto)
    report = cleanup(model)
    assert report.counts["dangling_qdq_removed"] == 1
    types = op_types(model)
    assert types.count("QuantizeLinear") == 2 and types[0] == "Sigmoid"  # x's pair is gone
    feed = {"x": RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)}
    ref = session(proto).run(None, feed)[0]
    got = session(model).run(None, feed)[0]
    assert np.abs(ref - got).max() <= 0.1 + 1e-5  # within one step of the remaining pairs


def test_qoperator_matmul_gemm_concat():
    proto = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"),
         helper.make_node("Relu", ["m"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["g"], transB=1, name="gemm"),
         helper.make_node("Concat", ["g", "g"], ["y"], axis=1, name="cat")],
        [vi("a", [4, 16])], [vi("y", None)],
        [init("w", RNG.standard_normal((16, 32)).astype(np.float32)),
         init("w2", RNG.standard_normal((8, 32)).astype(np.float32)),
         init("b2", RNG.standard_normal(8).astype(np.float32))],
    )
    model, _reports, _summary, feeds = static(proto, format="qoperator")
    assert op_types(model) == ["QuantizeLinear", "QLinearMatMul", "QGemm", "QLinearConcat", "DequantizeLinear"]
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB


def test_dynamic_keeps_inputs_that_would_quantize_too_noisily_in_float():
    from qtool.passes.dynamic import ChannelStats

    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [vi("x", ["B", 64])], [vi("y", None)],
        [init("w", RNG.standard_normal((64, 128)).astype(np.float32) * 0.1)],
    )
    # one channel reaches 1e4 while the typical value is 1: no smoothing rescues that
    absmax = np.ones(64)
    absmax[0] = 1e4
    stats = {"x": ChannelStats(absmax, np.full(64, 0.01))}
    _model, _reports, summary = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"), absmax=stats)
    assert summary.float_["MatMul"] == 1
    assert "dB SQNR" in next(iter(summary.reasons["MatMul"]))


def test_positive_scalar_mul_moves_into_the_scale():
    # Conv -> Relu -> Mul(1.7) -> padded Conv: the Mul cannot fold into either Conv in
    # preprocessing, but on quantized tensors it is a change of scale, not an integer op.
    def model(c):
        return make_model(
            [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
             helper.make_node("Conv", ["m", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")],
            [vi("x", [1, 4, 6, 6])], [vi("y", None)],
            [init("w", conv_w(4, 4, 1)), init("w2", conv_w(4, 4, 3)), init("k", np.array(c, np.float32))],
        )
    proto = model(1.7)
    qmodel, reports, _summary, feeds = static(proto)
    cleanup = next(r for r in reports if r.name == "cleanup")
    assert cleanup.counts["scalar_mul_absorbed"] == 1
    assert "Mul" not in op_types(qmodel)
    assert sqnr(proto, qmodel, feeds[0]) > MIN_SQNR_CHAIN_DB
    proto = model(-1.7)  # a negative scale would flip the integer range: stays a Mul
    qmodel, reports, _summary, feeds = static(proto)
    assert "Mul" in op_types(qmodel)
    assert sqnr(proto, qmodel, feeds[0]) > MIN_SQNR_CHAIN_DB


class _RawTable:
    """A calibration table made on the input graph (fingerprint of the unprocessed model)."""

    def __init__(self, proto, feeds):
        from qtool.model import graph_fingerprint

        self.fingerprint = graph_fingerprint(ir.from_proto(proto))
        self._ranges = minmax_ranges(proto, feeds)

    def ranges(self):
        return self._ranges


def test_table_of_the_input_graph_follows_folded_scale_and_shift():
    # Conv -> Mul(5) -> Add(3) -> padded Conv: preprocessing folds the Mul/Add into the first
    # Conv, whose output then carries what the Add produced. A table made on the input graph
    # has the Conv output's pre-scale range under that name: it must be replaced by the Add
    # output's range, or the Conv output would clip at a fifth of its real range.
    c = 4
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Mul", ["c", "s"], ["m"], name="scale"),
         helper.make_node("Add", ["m", "t"], ["a"], name="shift"),
         helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")],
        [vi("x", [1, c, 6, 6])], [vi("y", None)],
        [init("w", conv_w(c, c)), init("w2", conv_w(c, c)),
         init("s", np.full((c, 1, 1), 5.0, np.float32)), init("t", np.full((c, 1, 1), 3.0, np.float32))],
    )
    feeds = feeds_for(proto, batch=1)
    model, reports, _summary = convert_model(ir.from_proto(proto), Recipe(), table=_RawTable(proto, feeds))
    table = next(r for r in reports if r.name == "table")
    assert table.counts["ranges moved through folded layers"] == 1
    assert "Mul" not in op_types(model) and "Add" not in op_types(model)
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB


def test_dynamic_matmuls_sharing_an_input_quantize_it_once():
    # q/k/v-style: three MatMuls read x. One DynamicQuantizeLinear feeds three
    # MatMulIntegerToFloat; a fourth MatMul with its own input stays DynamicQuantizeMatMul.
    ws = [RNG.standard_normal((64, 64)).astype(np.float32) for _ in range(4)]
    proto = make_model(
        [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(3)]
        + [helper.make_node("Add", ["y0", "y1"], ["s"], name="add"),
           helper.make_node("Add", ["s", "y2"], ["t"], name="add2"),
           helper.make_node("MatMul", ["t", "w3"], ["y"], name="mm3")],
        [vi("x", ["B", 64])], [vi("y", None)],
        [init(f"w{i}", w) for i, w in enumerate(ws)],
    )
    model, reports, _ = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    types = op_types(model)
    assert types.count("DynamicQuantizeLinear") == 1 and types.count("MatMulIntegerToFloat") == 3
    assert types.count("DynamicQuantizeMatMul") == 1
    assert next(r for r in reports if r.name == "dynamic").counts["inputs quantized once for several MatMuls"] == 1
    feed = {"x": RNG.standard_normal((8, 64)).astype(np.float32)}
    assert sqnr(proto, model, feed) > MIN_SQNR_CHAIN_DB
