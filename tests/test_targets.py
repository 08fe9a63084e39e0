"""Conversion targets (qtool.targets): each preset's structural rules on small models, the
QNN/TensorRT validators naming the rule a model breaks, and --target flag conflicts."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import INT8_RNG, feeds_for, init, make_model, minmax_ranges, mlp, small_cnn, sqnr, vi
from onnx import TensorProto, helper

from qtool.cli import run
from qtool.config import Recipe, recipe_from_dict
from qtool.errors import ConversionError, UsageError
from qtool.pipeline import convert_model
from qtool.targets import TARGETS, apply_target, cpu_target
from qtool.targets.validate import check

MIN_SQNR_DB = 20.0  # a few quantized ops in a row (as conftest.MIN_SQNR_CHAIN_DB)


def _convert(proto, target: str | None, feeds=None):
    recipe = Recipe()
    if target is not None:
        recipe = apply_target(recipe.override("quantize", target=target))
    feeds = feeds or feeds_for(proto)
    model, _reports, _summary = convert_model(ir.from_proto(proto), recipe, table=minmax_ranges(proto, feeds))
    return model, feeds


def _nodes(model: ir.Model, op: str) -> list[onnx.NodeProto]:
    return [n for n in ir.to_proto(model).graph.node if n.op_type == op]


def _inits(model: ir.Model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in ir.to_proto(model).graph.initializer}


def _producers(model: ir.Model) -> dict[str, onnx.NodeProto]:
    return {o: n for n in ir.to_proto(model).graph.node for o in n.output}


# -- presets -------------------------------------------------------------------------------


def test_cpu_vnni_is_todays_default_node_for_node():
    proto = small_cnn()
    feeds = feeds_for(proto)
    default, _ = _convert(proto, None, feeds)
    vnni, _ = _convert(proto, "cpu-vnni", feeds)
    a, b = ir.to_proto(default), ir.to_proto(vnni)
    assert a.graph.SerializeToString() == b.graph.SerializeToString()


def test_openvino_puts_symmetric_qdq_only_on_int8_op_inputs():
    proto = small_cnn()  # x -> Conv -> Relu -> Conv -> Add(residual) -> GlobalAveragePool
    model, feeds = _convert(proto, "openvino")
    inits = _inits(model)
    producers = _producers(model)
    # Every zero point is 0: LPT's symmetric int8 (unsigned after ReLU, signed otherwise).
    for q in _nodes(model, "QuantizeLinear") + _nodes(model, "DequantizeLinear"):
        assert not inits[q.input[2]].any(), q.name
    types = {q.input[0]: inits[q.input[2]].dtype for q in _nodes(model, "QuantizeLinear")}
    assert types["x"] == np.int8  # a standard-normal input is signed
    relu_out = next(n.output[0] for n in proto.graph.node if n.op_type == "Relu")
    assert types[relu_out] == np.uint8  # non-negative after ReLU
    # The residual Add's output gets a Q only because GlobalAveragePool reads it in int8
    # (NNCF's CPU config quantizes AVG_POOL inputs); no int32 bias.
    add_out = next(n.output[0] for n in proto.graph.node if n.op_type == "Add")
    gap = next(n for n in ir.to_proto(model).graph.node if n.op_type == "GlobalAveragePool")
    assert add_out in types and producers[gap.input[0]].op_type == "DequantizeLinear"
    assert not any(a.dtype == np.int32 for a in inits.values())
    # Each Conv reads DQ on its activation and its weight; the Add reads DQ on both inputs.
    for node in ir.to_proto(model).graph.node:
        if node.op_type in ("Conv", "Add"):
            assert all(producers[i].op_type == "DequantizeLinear" for i in node.input[:2]), node.name
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


def test_openvino_a16w8_keeps_the_sign_rule_with_16_bit_activations():
    """--target openvino --activation-bits 16: every activation Q is 16-bit with zero
    point 0 (uint16 after ReLU, int16 otherwise), weights stay int8, and the result is
    closer to float than the 8-bit conversion of the same model (int8 weights still bound it)."""
    proto = small_cnn()
    feeds = feeds_for(proto)
    ranges = minmax_ranges(proto, feeds)
    recipe = apply_target(Recipe().override("quantize", target="openvino"))
    a8, _, _ = convert_model(ir.from_proto(proto), recipe, table=ranges)
    a16, _, _ = convert_model(ir.from_proto(proto), recipe.override("quantize", activation_bits=16), table=ranges)
    inits = _inits(a16)
    types = {q.input[0]: inits[q.input[2]].dtype for q in _nodes(a16, "QuantizeLinear")}
    relu_out = next(n.output[0] for n in proto.graph.node if n.op_type == "Relu")
    assert types["x"] == np.int16 and types[relu_out] == np.uint16
    assert set(types.values()) == {np.dtype(np.int16), np.dtype(np.uint16)}
    assert not any(inits[q.input[2]].any() for q in _nodes(a16, "QuantizeLinear"))
    weights = [inits[d.input[0]] for d in _nodes(a16, "DequantizeLinear") if d.input[0] in inits]
    assert weights and all(w.dtype == np.int8 for w in weights)
    assert sqnr(proto, a16, feeds[0]) > sqnr(proto, a8, feeds[0]) + 1.0


def test_openvino_leaves_bias_adds_and_constant_muls_float():
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
         helper.make_node("Mul", ["hb", "k"], ["y"], name="scale")],
        [vi("x", ["B", 32])], [vi("y", None)],
        [init("w", INT8_RNG.standard_normal((32, 48)).astype(np.float32) * 0.2),
         init("b", INT8_RNG.standard_normal(48).astype(np.float32)), init("k", np.float32(0.5))],
    )
    model, feeds = _convert(proto, "openvino")
    producers = _producers(model)
    add = _nodes(model, "Add")[0]
    assert producers[add.input[0]].op_type == "MatMul"  # no Q/DQ between MatMul and its bias
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in add.input)
    assert len(_nodes(model, "QuantizeLinear")) == 1  # the MatMul's activation input only
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


def test_cpu_avx2_weights_cannot_saturate_vpmaddubsw():
    """u8 activations x s8 weights summed in pairs into int16 (VPMADDUBSW): with 7-bit
    weights the worst pair 255 * (|w_a| + |w_b|) stays <= 32767; with 8-bit ones it need not."""
    proto = mlp()
    feeds = feeds_for(proto)

    def worst_pair(model):
        worst = 0
        for dq in _nodes(model, "DequantizeLinear"):
            w = _inits(model).get(dq.input[0])
            if w is None or w.dtype != np.int8:
                continue
            k_major = np.abs(w.astype(np.int32)).reshape(-1, w.shape[-1])  # MatMul: K rows
            pairs = k_major[: k_major.shape[0] // 2 * 2].reshape(-1, 2, k_major.shape[1]).sum(axis=1)
            worst = max(worst, int(pairs.max()) * 255)
        return worst

    vnni, _ = _convert(proto, "cpu-vnni", feeds)
    avx2, _ = _convert(proto, "cpu-avx2", feeds)
    assert worst_pair(vnni) > 32767  # full-range int8 weights reach 127 + 127
    assert worst_pair(avx2) <= 32767
    assert max(int(np.abs(a.astype(np.int32)).max()) for a in _inits(avx2).values() if a.dtype == np.int8) <= 63
    assert sqnr(proto, avx2, feeds[0]) > MIN_SQNR_DB - 6  # one bit less on the weights


@pytest.mark.parametrize(("features", "machine", "expected"), [
    ({"AVX2": True, "AVX-512 VNNI": True}, "x86_64", "cpu-vnni"),
    ({"AVX2": True, "AVX-VNNI": True}, "x86_64", "cpu-vnni"),
    ({"AVX2": True}, "x86_64", "cpu-avx2"),
    ({"NEON": True, "dot-product": True}, "aarch64", "cpu-vnni"),
])
def test_cpu_target_follows_the_machine(features, machine, expected):
    assert cpu_target(features, machine) == expected


def test_qnn_and_tensorrt_presets_pass_their_own_validators():
    for proto in (small_cnn(), mlp()):
        qnn, _ = _convert(proto, "qnn")
        trt, _ = _convert(proto, "tensorrt")
        assert check(qnn, "qnn") == []
        assert check(trt, "tensorrt") == []
        # MatMul weights stay per tensor for QNN; TensorRT's Q/DQ are all signed int8.
        producers = _producers(qnn)
        for mm in _nodes(qnn, "MatMul"):
            dq = producers[mm.input[1]]
            assert _inits(qnn)[dq.input[1]].ndim == 0, mm.name
        assert all(_inits(trt)[q.input[2]].dtype == np.int8 for q in _nodes(trt, "QuantizeLinear"))


# -- validators ------------------------------------------------------------------------------


def _rules(model, target):
    return {v.rule.id for v in check(model, target)}


def test_tensorrt_validator_rejects_asymmetric_uint8_and_int32_bias():
    default, _ = _convert(small_cnn(), None)  # onnxruntime's u8 asymmetric + int32 bias
    rules = _rules(default, "tensorrt")
    assert {"TRT-SYMMETRIC", "TRT-SIGNED-INT8"} <= rules


def _qdq_model(dq_axis_on_activation=False, opset=17, q_type=TensorProto.INT8):
    """x -> Q -> DQ -> MatMul(DQ(w per-channel)); optional per-channel on the activation."""
    w = INT8_RNG.integers(-100, 100, (16, 8)).astype(np.int8)
    n_act = 16 if dq_axis_on_activation else 1
    act_scale = np.full(n_act, 0.05, np.float32) if dq_axis_on_activation else np.float32(0.05)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(q_type)
    act_zp = np.zeros(n_act, np_type) if dq_axis_on_activation else np.zeros((), np_type)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq", **({"axis": 1} if dq_axis_on_activation else {})),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="xd", **({"axis": 1} if dq_axis_on_activation else {})),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1, name="wd"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    inits = [init("xs", act_scale), init("xz", act_zp), init("w", w),
             init("ws", np.full(8, 0.01, np.float32)), init("wz", np.zeros(8, np.int8))]
    return ir.from_proto(make_model(nodes, [vi("x", ["B", 16])], [vi("y", None)], inits, opset=opset))


def test_tensorrt_validator_names_activation_axis_and_old_opset():
    assert "TRT-PER-CHANNEL-WEIGHTS" in _rules(_qdq_model(dq_axis_on_activation=True), "tensorrt")
    assert "TRT-OPSET" in _rules(_qdq_model(opset=12), "tensorrt")
    assert _rules(_qdq_model(), "tensorrt") == set()  # per-channel MatMul weights on axis 1 are fine


def test_qnn_validator_rejects_per_channel_matmul_and_16_bit_in_the_onnx_domain():
    assert "QNN-MATMUL-PER-TENSOR" in _rules(_qdq_model(), "qnn")
    wide = _qdq_model(q_type=TensorProto.UINT16)
    assert "QNN-WIDE-TYPES-DOMAIN" in _rules(wide, "qnn")
    assert "QNN-WIDE-TYPES-DOMAIN" not in _rules(_qdq_model(q_type=TensorProto.UINT16, opset=21), "qnn")


def test_qnn_validator_checks_the_fixed_16_bit_sigmoid_encoding():
    def sigmoid(scale, zp):
        nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
                 helper.make_node("QuantizeLinear", ["s", "sc", "zp"], ["q"], name="sq"),
                 helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["y"], name="sd")]
        inits = [init("sc", np.float32(scale)), init("zp", np.array(zp, np.uint16))]
        return ir.from_proto(make_model(nodes, [vi("x", ["B", 4])], [vi("y", None)], inits, opset=21))

    assert "QNN-SIGMOID-TANH-16" in _rules(sigmoid(1.0 / 65535.0, 0), "qnn")
    assert "QNN-SIGMOID-TANH-16" not in _rules(sigmoid(1.0 / 65536.0, 0), "qnn")


def test_violation_names_the_rule_and_its_source():
    v = check(_qdq_model(), "qnn")[0]
    assert "QNN-MATMUL-PER-TENSOR" in str(v) and "quant_config.py" in str(v) and "wd" in str(v)


def test_convert_for_qnn_fails_loudly_when_the_preset_would_break_a_rule(monkeypatch):
    """A preset that let MatMul weights go per-channel would break QNN's rule: the
    conversion's own check refuses to return that model, naming the rule."""
    broken = dataclasses.replace(TARGETS["qnn"], placement=dataclasses.replace(TARGETS["qnn"].placement,
                                                                                per_channel_ops=None))
    monkeypatch.setitem(TARGETS, "qnn", broken)
    with pytest.raises(ConversionError, match="QNN-MATMUL-PER-TENSOR"):
        _convert(mlp(), "qnn")


# -- recipes and flags -----------------------------------------------------------------------


def test_recipe_key_target_applies_the_preset_and_refuses_contradictions():
    r = apply_target(recipe_from_dict({"quantize": {"target": "tensorrt"}}))
    assert (r.quantize.activation_type, r.quantize.symmetric_activations) == ("int8", True)
    with pytest.raises(UsageError, match="per_channel"):
        apply_target(recipe_from_dict({"quantize": {"target": "tensorrt", "per_channel": False}}))
    with pytest.raises(UsageError, match="activation_type"):
        apply_target(recipe_from_dict({"quantize": {"target": "openvino", "activation_type": "int8"}}))
    with pytest.raises(UsageError, match="unknown target"):
        apply_target(recipe_from_dict({"quantize": {"target": "tpu"}}))


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "openvino", "--activation-type", "uint8"], "--activation-type"),
    (["--target", "tensorrt", "--per-tensor"], "--per-channel false"),
    (["--target", "openvino", "--format", "qoperator"], "--format qoperator"),
    (["--target", "qnn", "--dynamic"], "--dynamic"),
    (["--target", "cpu", "--bits", "4"], "--bits 4"),
    (["--target", "cpu", "--activation-type", "int8"], "--activation-type int8"),
    (["--target", "tensorrt", "--activation-bits", "16"], "activation_bits = 16"),
])
def test_target_with_a_flag_it_contradicts_is_a_usage_error(tmp_path, capsys, args, message):
    proto = small_cnn()
    onnx.save(proto, tmp_path / "m.onnx")
    assert run(["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "hint:" in err
    assert not (tmp_path / "o.onnx").exists()


def test_openvino_leaves_a_silu_after_conv_to_the_conv():
    """YOLO-style Conv -> x * sigmoid(x) -> Conv: the SiLU is an activation function (fused
    into the first Conv), so only the second Conv's input (the SiLU output) gets a Q/DQ pair."""
    proto = make_model(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="c1"),
         helper.make_node("Sigmoid", ["c1"], ["g"], name="gate"),
         helper.make_node("Mul", ["c1", "g"], ["silu"], name="silu"),
         helper.make_node("Conv", ["silu", "w2"], ["y"], pads=[1] * 4, name="c2")],
        [vi("x", ["N", 4, 6, 6])], [vi("y", None)],
        [init("w1", INT8_RNG.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3),
         init("w2", INT8_RNG.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2)],
    )
    model, feeds = _convert(proto, "openvino")
    quantized = {q.input[0] for q in _nodes(model, "QuantizeLinear")}
    assert quantized == {"x", "silu"}
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB


def test_openvino_leaves_gelu_float_but_quantizes_a_gate_from_elsewhere():
    """x * 0.5 * (1 + erf(x / sqrt 2)) is GELU (no Q/DQ); x * sigmoid(MatMul(x)) is a gate
    computed by another weighted op (an SE block), whose two inputs are quantized."""
    r2 = np.float32(np.sqrt(2.0))
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Div", ["h", "r2"], ["hd"], name="div"),
         helper.make_node("Erf", ["hd"], ["e"], name="erf"),
         helper.make_node("Add", ["e", "one"], ["e1"], name="add1"),
         helper.make_node("Mul", ["h", "half"], ["hh"], name="half"),
         helper.make_node("Mul", ["hh", "e1"], ["gelu"], name="gelu"),
         helper.make_node("MatMul", ["gelu", "w2"], ["s"], name="se"),
         helper.make_node("Sigmoid", ["s"], ["g"], name="gate"),
         helper.make_node("Mul", ["gelu", "g"], ["y"], name="scale")],
        [vi("x", ["B", 16])], [vi("y", None)],
        [init("w", INT8_RNG.standard_normal((16, 16)).astype(np.float32) * 0.3),
         init("w2", INT8_RNG.standard_normal((16, 16)).astype(np.float32) * 0.3),
         init("r2", r2), init("one", np.float32(1.0)), init("half", np.float32(0.5))],
    )
    model, feeds = _convert(proto, "openvino")
    quantized = {q.input[0] for q in _nodes(model, "QuantizeLinear")}
    assert quantized == {"x", "gelu", "g"}
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_DB
