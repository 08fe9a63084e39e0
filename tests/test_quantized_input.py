"""Quantized models as input: recognition of each format (qtool.quantized), fake-quant weights
stored as integers bit for bit (qtool.passes.fake_quant), and what `qtool convert` does with
an already-quantized model (refuse / --store-weights / --format qoperator / --requantize)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import conv_w, init, make_model, session, vi
from onnx import TensorProto, helper

from qtool.cli import run
from qtool.passes.fake_quant import fold_fake_quant, quantize_linear
from qtool.quantized import recognize

RNG = np.random.default_rng(17)


def _fake_quant(w_name, w, scale, zp, *, axis=0, clip=None, out_type=TensorProto.INT8):
    """``w`` (float initializer) -> QuantizeLinear [-> Clip] -> DequantizeLinear, as QAT exports
    write it; returns (nodes, initializers, the dequantized name)."""
    zp_arr = helper.make_tensor(w_name + "_zp", out_type, list(np.shape(zp)), np.asarray(zp).reshape(-1).tolist())
    nodes = [helper.make_node("QuantizeLinear", [w_name, w_name + "_s", w_name + "_zp"], [w_name + "_q"],
                              axis=axis, name=w_name + "/Q")]
    q = w_name + "_q"
    inits = [init(w_name, w), init(w_name + "_s", scale), zp_arr]
    if clip is not None:
        inits += [init(w_name + "_lo", np.int8(clip[0])), init(w_name + "_hi", np.int8(clip[1]))]
        nodes.append(helper.make_node("Clip", [q, w_name + "_lo", w_name + "_hi"], [w_name + "_c"], name=w_name + "/Clip"))
        q = w_name + "_c"
    nodes.append(helper.make_node("DequantizeLinear", [q, w_name + "_s", w_name + "_zp"], [w_name + "_dq"],
                                  axis=axis, name=w_name + "/DQ"))
    return nodes, inits, w_name + "_dq"


def _act_qdq(x, name, scale=0.05, zp=128):
    """Activation fake-quant (uint8) on ``x``."""
    return ([helper.make_node("QuantizeLinear", [x, name + "_s", name + "_zp"], [name + "_q"], name=name + "/Q"),
             helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_zp"], [name + "_dq"], name=name + "/DQ")],
            [init(name + "_s", np.float32(scale)), init(name + "_zp", np.uint8(zp))], name + "_dq")


def qat_cnn(bits=8, opset=13, clip=False):
    """Conv -> Relu -> MatMul with per-channel fake-quant weights and uint8 activations: the
    shape of a PyTorch QAT export. ``bits`` 4: 4-bit weights as int4 Q output (opset 21,
    ModelOpt) or, with ``clip``, int8 Q narrowed by a Clip to [-8, 7] (Brevitas' QCDQ)."""
    qmax = 2 ** (bits - 1) - 1
    w1, w2 = conv_w(16, 4), RNG.standard_normal((16 * 36, 10)).astype(np.float32) * 0.05
    s1 = (np.abs(w1).reshape(16, -1).max(1) / qmax).astype(np.float32)
    s2 = (np.abs(w2).max(0) / qmax).astype(np.float32)
    q_type = TensorProto.INT4 if bits == 4 and not clip else TensorProto.INT8
    rng = (-qmax - 1, qmax) if clip else None
    n1, i1, d1 = _fake_quant("w1", w1, s1, np.zeros(16, np.int8), axis=0, clip=rng, out_type=q_type)
    n2, i2, d2 = _fake_quant("w2", w2, s2, np.zeros(10, np.int8), axis=1, clip=rng, out_type=q_type)
    na, ia, xa = _act_qdq("x", "a0")
    nb, ib, xb = _act_qdq("r", "a1", 0.02, 0)
    nc, ic, xc = _act_qdq("y0", "a2", 0.05, 128)
    nodes = [*na, *n1, helper.make_node("Conv", [xa, d1, "b1"], ["c"], pads=[1] * 4, name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), *nb,
             helper.make_node("Flatten", [xb], ["f"], name="flat"), *n2,
             helper.make_node("MatMul", ["f", d2], ["y0"], name="fc"), *nc,
             helper.make_node("Identity", [xc], ["y"], name="out")]
    return make_model(nodes, [vi("x", [2, 4, 6, 6])], [vi("y", None)],
                      [*i1, *i2, *ia, *ib, *ic, init("b1", RNG.standard_normal(16).astype(np.float32) * 0.1)],
                      opset=opset)


def qdq_mlp():
    """Static QDQ as onnxruntime's quantizer writes it: int8 weights -> DQ."""
    w = RNG.integers(-127, 128, (32, 16)).astype(np.int8)
    na, ia, xa = _act_qdq("x", "a0")
    return make_model(
        [*na, helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="w/DQ"),
         helper.make_node("MatMul", [xa, "w"], ["y"], name="fc")],
        [vi("x", [2, 32])], [vi("y", None)], [*ia, init("w_q", w), init("w_s", np.float32(0.01))])


def _feed(proto):
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {"x": RNG.standard_normal(shape).astype(np.float32)}


# ---- recognition --------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "opset", "clip", "weights"), [
    (8, 13, False, {"int8": 2}),
    (4, 21, False, {"int4": 2}),
    (4, 13, True, {"int4": 2}),
])
def test_fake_quant_is_recognised_with_its_bit_width(bits, opset, clip, weights):
    found = recognize(ir.from_proto(qat_cnn(bits, opset, clip)))
    assert found.schemes == ["fake-quant"] and found.fake_quant == 2
    assert dict(found.weight_types) == weights
    assert dict(found.activation_types) == {"uint8": 3}
    assert found.float_weight_share == 0.0
    assert found.compute["fake-quant"].params == 16 * 4 * 9 + 16 * 36 * 10


def test_qdq_and_float_share():
    """A QDQ MatMul beside a float one: the float share counts weights and MACs."""
    proto = qdq_mlp()
    proto.graph.node.append(helper.make_node("MatMul", ["y", "w2"], ["z"], name="float_fc"))
    proto.graph.initializer.append(init("w2", np.ones((16, 16), np.float32)))
    proto.graph.output[0].name = "z"
    found = recognize(ir.from_proto(proto))
    assert found.schemes == ["qdq"] and dict(found.weight_types) == {"int8": 1}
    assert found.float_weight_share == pytest.approx(256 / (512 + 256))
    assert found.float_mac_share == pytest.approx(256 / (512 + 256))


def test_qoperator_dynamic_and_matmulnbits_are_recognised():
    u8 = TensorProto.UINT8
    qop = make_model(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
         helper.make_node("QLinearMatMul", ["xq", "s", "z", "w", "ws", "wz", "s", "z"], ["yq"]),
         helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])],
        [vi("x", [2, 8])], [vi("y", None)],
        [init("s", np.float32(0.1)), init("z", np.uint8(128)), init("w", np.ones((8, 4), np.int8)),
         init("ws", np.float32(0.1)), init("wz", np.int8(0))])
    dyn = make_model(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
         helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["yi"]),
         helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT)],
        [vi("x", [2, 8])], [vi("y", None)], [init("w", np.ones((8, 4), np.uint8))])
    lstm = helper.make_node("DynamicQuantizeLSTM", ["x", "W", "R", "", "", "", "", "", "ws", "wz", "rs", "rz"],
                            ["h"], domain="com.microsoft", hidden_size=4)
    nbits = helper.make_node("MatMulNBits", ["h", "b", "bs"], ["y"], domain="com.microsoft",
                             K=64, N=32, bits=4, block_size=32)
    low = make_model([lstm, nbits], [vi("x", [1, 1, 8])], [vi("y", None)],
                     [init("W", np.ones((1, 8, 16), np.int8)), init("R", np.ones((1, 4, 16), np.int8)),
                      init("b", np.ones((32, 2, 16), np.uint8)), init("bs", np.ones(64, np.float32))])
    found = {name: recognize(ir.from_proto(p)) for name, p in (("qop", qop), ("dyn", dyn), ("low", low))}
    assert found["qop"].schemes == ["qoperator"] and found["qop"].weight_types == {"int8": 1}
    assert found["dyn"].schemes == ["dynamic"] and found["dyn"].activation_types == {"uint8 (dynamic)": 1}
    assert dict(found["dyn"].weight_types) == {"uint8": 1}
    assert found["low"].schemes == ["matmulnbits", "dynamic"]  # heaviest first: 2048 vs 192 weights
    assert found["low"].weight_types == {"uint4": 1, "int8": 2}
    assert found["low"].compute["matmulnbits"].params == 64 * 32
    assert not recognize(ir.from_proto(make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1])],
                                                  [vi("y", [1])]))).quantized
    assert u8  # the activation type above is uint8 by onnxruntime's convention


def test_int8_weights_dequantized_by_cast_and_mul_are_recognised_and_requantizable():
    """int8 initializer -> Cast -> Sub(zp) -> Mul(scale) -> MatMul (an "int8" transformer as some
    exporters ship it): recognised, and dequantize folds it to the float weight it computes."""
    from qtool.passes.fake_quant import dequantize

    w = RNG.integers(-128, 128, (16, 8)).astype(np.int8)
    proto = make_model(
        [helper.make_node("Cast", ["w_q"], ["w_c"], to=TensorProto.FLOAT),
         helper.make_node("Sub", ["w_c", "zp"], ["w_s"]),
         helper.make_node("Mul", ["w_s", "scale"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        [vi("x", [2, 16])], [vi("y", None)],
        [init("w_q", w), init("zp", np.float32(3)), init("scale", np.full(8, 0.02, np.float32))])
    model = ir.from_proto(proto)
    found = recognize(model)
    assert found.schemes == ["cast-dequant"] and found.quantized and dict(found.weight_types) == {"int8": 1}
    feed = {"x": RNG.standard_normal((2, 16)).astype(np.float32)}
    before = session(proto).run(None, feed)[0]
    assert dequantize(model).counts == {"Cast/Mul weight dequantized": 1}
    assert [n.op_type for n in model.graph] == ["MatMul"] and not recognize(model).quantized
    np.testing.assert_allclose(session(model).run(None, feed)[0], before, rtol=1e-6, atol=1e-6)


def test_qtools_own_int8_weights_output_is_not_quantized_again(tmp_path, capsys):
    """The int8-weights scheme writes Cast(int8) x scale: converting its output again is
    refused like any quantized model, and --requantize starts from the float weights."""
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [vi("x", [2, 256])],
                       [vi("y", None)], [init("w", RNG.standard_normal((256, 256)).astype(np.float32))])
    src, first = _save(proto, tmp_path / "f.onnx"), tmp_path / "w8.onnx"
    assert run(["convert", src, "-o", str(first), "--scheme", "int8-weights"]) == 0
    capsys.readouterr()
    assert run(["convert", str(first), "-o", str(tmp_path / "x.onnx"), "--dynamic"]) == 1
    assert "already quantized (cast-dequant" in capsys.readouterr().err
    assert run(["convert", str(first), "-o", str(tmp_path / "rq.onnx"), "--requantize", "--dynamic"]) == 0
    ops = [n.op_type for n in onnx.load(tmp_path / "rq.onnx").graph.node]
    assert "Cast" not in ops and any(op in ops for op in ("DynamicQuantizeMatMul", "MatMulInteger"))


# ---- folding --------------------------------------------------------------------------------


def test_quantize_linear_rounds_half_to_even_in_float32():
    w = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], np.float32)
    q = quantize_linear(w, np.float32(1.0), np.int8(0), ir.DataType.INT8)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]
    blocked = quantize_linear(np.arange(8, dtype=np.float32).reshape(1, 8), np.array([[1.0, 2.0]], np.float32),
                              None, ir.DataType.UINT8, axis=1, block_size=4)
    assert blocked.tolist() == [[0, 1, 2, 3, 2, 2, 3, 4]]  # 5/2 = 2.5 -> 2, 7/2 = 3.5 -> 4


@pytest.mark.parametrize(("bits", "opset", "clip", "stored"), [
    (8, 13, False, "stored int8"),
    (4, 21, False, "stored int4"),
    (4, 13, True, "stored int8"),  # 4-bit values kept in int8 as Q made them: a note says why
    (4, 21, True, "stored int8"),
])
def test_folding_is_bit_identical_on_onnxruntime_and_smaller(bits, opset, clip, stored, tmp_path):
    proto = qat_cnn(bits, opset, clip)
    feed = _feed(proto)
    before = session(proto).run(None, feed)[0]
    model = ir.from_proto(proto)
    report = fold_fake_quant(model)
    assert report.counts == {stored: 2} and not report.skipped
    assert ("stay 8-bit" in " ".join(report.notes)) == clip
    after = session(model).run(None, feed)[0]
    assert before.tobytes() == after.tobytes()
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") == 3 and "Clip" not in ops  # only the activations' Q remain
    found = recognize(model)
    assert found.schemes == ["qdq"] and found.fake_quant == 0
    onnx.save(proto, tmp_path / "a.onnx")
    ir.save(model, tmp_path / "b.onnx")
    ratio = (tmp_path / "b.onnx").stat().st_size / (tmp_path / "a.onnx").stat().st_size
    assert ratio < (0.2 if stored == "stored int4" else 0.3)


def test_a_fake_quant_value_with_a_non_dequantize_reader_is_left_alone():
    proto = qat_cnn()
    proto.graph.node.append(helper.make_node("Cast", ["w1_q"], ["w1_cast"], to=TensorProto.FLOAT))
    proto.graph.output.append(vi("w1_cast", None))
    model = ir.from_proto(proto)
    assert fold_fake_quant(model).counts == {"stored int8": 1}  # w2 only


# ---- convert --------------------------------------------------------------------------------


def _save(proto, path):
    onnx.save(proto, path)
    return str(path)


def _data(folder, shape, n=6):
    folder.mkdir()
    for i in range(n):
        np.save(folder / f"s{i}.npy", RNG.standard_normal(shape).astype(np.float32))
    return str(folder)


def test_convert_refuses_a_quantized_model_without_a_flag_and_names_the_options(tmp_path, capsys):
    model = _save(qat_cnn(), tmp_path / "qat.onnx")
    before = open(model, "rb").read()
    for flags in ([], ["--dynamic"], ["--data", _data(tmp_path / "d", [1, 4, 6, 6])]):
        assert run(["convert", model, "-o", str(tmp_path / "x.onnx"), *flags]) == 1
        err = capsys.readouterr().err
        assert "already quantized (fake-quant" in err and "would quantize twice" in err
        assert all(opt in err for opt in ("hint:", "--store-weights", "--format", "--requantize"))
    assert open(model, "rb").read() == before and not (tmp_path / "x.onnx").exists()


def test_convert_store_weights_writes_the_same_numbers_smaller(tmp_path, capsys):
    model = _save(qat_cnn(), tmp_path / "qat.onnx")
    data = _data(tmp_path / "d", [2, 4, 6, 6])
    out = tmp_path / "int8.onnx"
    assert run(["convert", model, "-o", str(out), "--store-weights", "--data", data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical"] is True and report["size_ratio"] < 0.3
    assert report["quantized"]["output"]["schemes"] == ["qdq"]
    feed = {"x": np.load(tmp_path / "d" / "s3.npy")}
    assert session(onnx.load(model)).run(None, feed)[0].tobytes() == session(onnx.load(out)).run(None, feed)[0].tobytes()


def test_convert_format_qoperator_retargets_a_qat_model(tmp_path, capsys):
    model = _save(qat_cnn(), tmp_path / "qat.onnx")
    out = tmp_path / "qop.onnx"
    assert run(["convert", model, "-o", str(out), "--format", "qoperator", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantized"]["output"]["schemes"] == ["qoperator"]
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "QLinearConv" in ops and "QLinearMatMul" in ops and "Relu" not in ops
    feed = _feed(qat_cnn())
    ref, got = session(onnx.load(model)).run(None, feed)[0], session(onnx.load(out)).run(None, feed)[0]
    # The only rounding added is the int32 bias (<= half a step of s_x * s_w) and QOperator's
    # own requantization: a few output steps at most.
    assert np.abs(ref - got).max() <= 0.05 * np.abs(ref).max()


def test_format_qdq_turns_a_qoperator_model_back_and_requantize_accepts_it(tmp_path, capsys):
    """QOperator -> QDQ keeps every scale: onnxruntime gives the same outputs; --requantize on
    the QOperator model dequantizes it (integer MaxPool/Flatten included) and quantizes once."""
    model = _save(qat_cnn(), tmp_path / "qat.onnx")
    qop, back, rq = tmp_path / "qop.onnx", tmp_path / "back.onnx", tmp_path / "rq.onnx"
    assert run(["convert", model, "-o", str(qop), "--format", "qoperator"]) == 0
    assert run(["convert", str(qop), "-o", str(back), "--format", "qdq", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantized"]["output"]["schemes"] == ["qdq"]
    (fmt,) = [p for p in report["passes"] if p["name"] == "qdq-format"]
    assert fmt["counts"] == {"QLinearConv -> Conv": 1, "QLinearMatMul -> MatMul": 1}
    feed = _feed(qat_cnn())
    outs = [session(onnx.load(p)).run(None, feed)[0] for p in (qop, back)]
    assert np.abs(outs[0] - outs[1]).max() <= 0.05  # at most one output step (scale 0.05) apart
    assert run(["convert", str(qop), "-o", str(tmp_path / "x.onnx"), "--format", "qoperator"]) == 2
    data = _data(tmp_path / "d", [2, 4, 6, 6], n=10)
    assert run(["convert", str(qop), "-o", str(rq), "--requantize", "--data", data, "--no-guard"]) == 0
    ops = [n.op_type for n in onnx.load(rq).graph.node]
    assert "QLinearConv" not in ops and ops.count("QuantizeLinear") <= 4


def test_inspect_reports_the_quantization(tmp_path, capsys):
    model = _save(qat_cnn(), tmp_path / "qat.onnx")
    assert run(["inspect", model, "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["model"]["quantization"]
    assert q["schemes"] == ["fake-quant"] and q["weight_types"] == {"int8": 2}
    assert q["compute"]["fake-quant"]["macs"] == 16 * 4 * 9 * 36 + 16 * 36 * 10  # shapes inferred
    assert run(["inspect", model]) == 0  # the human report prints the same (rich console)


@pytest.mark.parametrize(("flags", "code", "words"), [
    (["--store-weights", "--bits", "4"], 2, "--bits chooses how to quantize"),
    (["--store-weights", "--requantize"], 2, "pick one"),
    (["--format", "qdq"], 2, "nothing to re-target"),
])
def test_flags_that_cannot_apply_to_a_quantized_model_are_errors(tmp_path, capsys, flags, code, words):
    model = _save(qat_cnn(), tmp_path / "qat.onnx")
    assert run(["convert", model, "-o", str(tmp_path / "x.onnx"), *flags]) == code
    assert words in capsys.readouterr().err


def test_store_weights_and_requantize_on_a_float_model_are_errors(tmp_path, capsys):
    float_model = _save(make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 8])],
                                   [vi("y", None)], [init("w", np.ones((8, 4), np.float32))]), tmp_path / "f.onnx")
    for flag in ("--store-weights", "--requantize"):
        assert run(["convert", float_model, "-o", str(tmp_path / "x.onnx"), flag, "--dynamic"]) == 2
        assert "not quantized" in capsys.readouterr().err


def test_store_weights_on_a_qdq_model_without_fake_quant_says_so(tmp_path, capsys):
    model = _save(qdq_mlp(), tmp_path / "qdq.onnx")
    assert run(["convert", model, "-o", str(tmp_path / "x.onnx"), "--store-weights"]) == 1
    assert "no fake-quant weights" in capsys.readouterr().err


def test_requantize_on_a_qdq_model_quantizes_once(tmp_path, capsys):
    """--requantize dequantizes first: the result has one level of Q/DQ (no Q reads a DQ, no
    DQ reads a Q of a constant), exactly as many QuantizeLinear as converting the float graph."""
    model = _save(qat_cnn(), tmp_path / "qat.onnx")
    data = _data(tmp_path / "d", [2, 4, 6, 6], n=10)
    out = tmp_path / "rq.onnx"
    assert run(["convert", model, "-o", str(out), "--requantize", "--data", data, "--no-guard", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passes"][0]["name"] == "dequantize"
    assert report["passes"][0]["counts"] == {"constant dequantized": 2, "activation pair removed": 3}
    graph = onnx.load(out).graph
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        src = producer.get(node.input[0])
        if node.op_type == "QuantizeLinear":
            assert src is None or src.op_type != "DequantizeLinear", node.name
        if node.op_type == "DequantizeLinear":
            assert src is None or src.op_type != "QuantizeLinear" or src.input[0] not in {i.name for i in graph.initializer}
    weights = [i for i in graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) > 1]
    assert len(weights) == 2  # each weight quantized once, stored as int8
    feed = {"x": np.load(tmp_path / "d" / "s1.npy")}
    ref, got = session(onnx.load(model)).run(None, feed)[0], session(onnx.load(out)).run(None, feed)[0]
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 20  # the same function, requantized


def test_dequantize_keeps_a_relu_folded_into_the_quantize_range():
    """Quantizers drop a Relu into the output Q (zero point 0: negatives clamp to 0); removing
    the Q/DQ pair must put the Relu back, or --requantize would change the function."""
    from qtool.passes.fake_quant import dequantize

    proto = qdq_mlp()
    na, ia, xa = _act_qdq("y0", "out", 0.05, 0)
    proto.graph.node[-1].output[0] = "y0"
    proto.graph.node.extend([*na, helper.make_node("Identity", [xa], ["y"])])
    proto.graph.initializer.extend(ia)
    feed = {"x": RNG.standard_normal((2, 32)).astype(np.float32)}
    before = session(proto).run(None, feed)[0]
    model = ir.from_proto(proto)
    report = dequantize(model)
    assert report.counts["Relu restored (folded into a QuantizeLinear)"] == 1
    assert not recognize(model).quantized
    after = session(model).run(None, feed)[0]
    assert after.min() >= 0 and np.abs(after - before).max() <= 0.05 * 4  # a few output steps


def test_eval_compares_a_qat_model_with_its_float_parent(tmp_path, capsys):
    """A QAT export is a candidate like any other: `qtool eval QAT --reference FLOAT`."""
    proto = qat_cnn()
    qat = _save(proto, tmp_path / "qat.onnx")
    model = ir.from_proto(proto)
    from qtool.passes.fake_quant import dequantize

    dequantize(model)
    parent = tmp_path / "float.onnx"
    ir.save(model, parent)
    data = _data(tmp_path / "d", [2, 4, 6, 6])
    assert run(["eval", qat, "--reference", str(parent), "--data", data, "--json"]) == 0
    (out,) = json.loads(capsys.readouterr().out)["outputs"]
    # Same weights, uint8 activations: close to the parent, not equal to it.
    assert 20 < out["sqnr_db"] < 80 and out["argmax_agreement"] is not None
