"""A16W8: 16-bit activations with int8 weights (qtool.passes.wide, --activation-bits 16).

Checked against an independent numpy reference of QuantizeLinear/DequantizeLinear, on the
standard ops (opset 21) and onnxruntime's com.microsoft ops (below 21); per layer through
[[layer]] activation_bits; as the guard's repair; and the flags that cannot go with it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import conv_w, init, make_model, minmax_ranges, mlp, session, static, vi
from onnx import TensorProto, helper

from qtool.cli import run
from qtool.config import Recipe, recipe_from_dict
from qtool.errors import RecipeError, UsageError
from qtool.pipeline import plan_for

RNG = np.random.default_rng(16)
WIDE = {TensorProto.UINT16, TensorProto.INT16}


def _outlier_feeds(n=6, batch=8, d=16):
    """Unit-scale inputs whose channel 0 sits near 100: an 8-bit step (~0.4) is coarse for
    the other channels, a 16-bit step (~0.0016) is not."""
    feeds = []
    for _ in range(n):
        x = RNG.standard_normal((batch, d)).astype(np.float32)
        x[:, 0] = 100.0 + RNG.standard_normal(batch).astype(np.float32)
        feeds.append({"x": x})
    return feeds


def _two_layer(opset=17):
    """x -> up (MatMul) -> Relu -> down (MatMul) -> y; channel 0 of x carries no weight, so
    the output depends on the small channels only."""
    w1 = (RNG.standard_normal((16, 32)) * 0.3).astype(np.float32)
    w1[0] = 0.0
    w2 = (RNG.standard_normal((32, 8)) * 0.3).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
         helper.make_node("Relu", ["h"], ["hr"], name="act"),
         helper.make_node("MatMul", ["hr", "w2"], ["y"], name="down")],
        [vi("x", ["B", 16])], [vi("y", None)], [init("w1", w1), init("w2", w2)], opset=opset)


# -- an independent numpy reference of the ONNX formulas -----------------------------------


def _act_qdq(x, lo, hi, qmax=65535):
    """Asymmetric uint16 (or uint8 with qmax=255): DequantizeLinear(QuantizeLinear(x))."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = np.float32((hi - lo) / qmax)
    z = float(np.clip(np.rint(-lo / s), 0, qmax))
    q = np.clip(np.rint(x.astype(np.float32) / s) + z, 0, qmax)  # np.rint: half to even
    return ((q - z) * s).astype(np.float32)


def _weight_qdq(w):
    """Symmetric int8 per output channel (the last axis of a MatMul weight), -127..127."""
    s = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    return (np.clip(np.rint(w / s), -127, 127) * s).astype(np.float32)


def _formula_session(model) -> ort.InferenceSession:
    """onnxruntime running the Q/DQ ops as written (basic optimizations: no QDQ fusion).

    At its default level onnxruntime fuses an int8-weight DequantizeLinear -> MatMul into
    MatMulNBits, whose accuracy_level 4 (the session default) quantizes the MatMul's input
    to int8 again; the README's A16W8 section and bench/results/a16w8.md say so."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _reference(proto, ranges, x, qmax=65535):
    w1, w2 = (onnx.numpy_helper.to_array(t) for t in proto.graph.initializer)
    xq = _act_qdq(x, *ranges["x"], qmax=qmax)
    h = xq @ _weight_qdq(w1)
    lo, hi = ranges["hr"]  # ReLU folded into the Q after `up`: its range, clipped at 0
    hq = _act_qdq(h, max(lo, 0.0), hi, qmax=qmax)
    return hq @ _weight_qdq(w2)


def _sqnr(ref, got):
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))


@pytest.mark.parametrize("opset", [17, 21])
def test_a16w8_matches_the_numpy_reference_and_recovers_what_int8_activations_lose(opset):
    proto = _two_layer(opset)
    feeds = _outlier_feeds()
    ranges = minmax_ranges(proto, feeds)
    a16, *_ = static(proto, feeds=feeds, activation_bits=16)
    a8, *_ = static(proto, feeds=feeds)
    x = _outlier_feeds(n=1)[0]["x"]
    fp32 = session(proto).run(None, {"x": x})[0]
    got16 = _formula_session(a16).run(None, {"x": x})[0]
    got8 = _formula_session(a8).run(None, {"x": x})[0]
    ref16 = _reference(proto, ranges, x)
    ref8 = _reference(proto, ranges, x, qmax=255)
    # onnxruntime computes what the formulas say, to float rounding of the matmuls.
    assert np.abs(got16 - ref16).max() <= 1e-4 * np.abs(ref16).max()
    assert np.abs(got8 - ref8).max() <= 1e-4 * np.abs(ref8).max()
    # 16-bit activations remove the activation error: only the int8 weights' remains.
    assert _sqnr(fp32, got16) > _sqnr(fp32, got8) + 15
    assert _sqnr(fp32, got16) > 30


def _qdq_nodes(model: ir.Model):
    proto = ir.to_proto(model)
    zero_points = {t.name: t.data_type for t in proto.graph.initializer}
    return proto, [(n, zero_points.get(n.input[2])) for n in proto.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_opset_21_uses_the_standard_ops_and_below_it_onnxruntime_contrib_ops():
    feeds = _outlier_feeds()
    x = feeds[0]["x"]
    for opset, allow, want_opset, want_domain in ((21, False, 21, ""), (17, False, 17, "com.microsoft"),
                                                  (17, True, 21, "")):
        proto = _two_layer(opset)
        model, *_ = static(proto, feeds=feeds, activation_bits=16, allow_opset_upgrade=allow or None)
        out, nodes = _qdq_nodes(model)
        assert model.opset_imports[""] == want_opset
        wide = [n for n, t in nodes if t in WIDE]
        assert wide and {n.domain for n in wide} == {want_domain}, (opset, allow)
        # int8 weights keep the standard DequantizeLinear at every opset.
        assert {n.domain for n, t in nodes if t == TensorProto.INT8} == {""}
        assert ("com.microsoft" in model.opset_imports) == (want_domain == "com.microsoft")
        if want_domain == "":
            onnx.checker.check_model(out, full_check=True)  # the ONNX spec accepts uint16 Q/DQ
        session(model).run(None, {"x": x})  # onnxruntime loads and runs it as optimized
        got = _formula_session(model).run(None, {"x": x})[0]
        ref = session(proto).run(None, {"x": x})[0]
        assert _sqnr(ref, got) > 30


def test_int16_with_int8_activation_type_is_symmetric_signed():
    proto = _two_layer(21)
    model, *_ = static(proto, feeds=_outlier_feeds(), activation_bits=16, activation_type="int8",
                       symmetric_activations=True)
    out, nodes = _qdq_nodes(model)
    wide = {t for _, t in nodes if t in WIDE}
    assert wide == {TensorProto.INT16}
    zps = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert all(not zps[n.input[2]].any() for n, t in nodes if t == TensorProto.INT16)


def test_a_layer_rule_raises_exactly_the_matching_layers():
    proto = mlp()  # x -> up -> Relu -> down -> lm_head
    recipe = recipe_from_dict({"layer": [{"match": "down", "activation_bits": 16}]})
    assert recipe.bits_for("down", "MatMul", 8) == 8  # an activation_bits rule sets no weight bits
    model, reports, *_ = static(proto, recipe=recipe)
    _, nodes = _qdq_nodes(model)
    quantized = {n.input[0]: t for n, t in nodes if n.op_type == "QuantizeLinear"}
    # down reads up's (ReLU-folded) output and writes o: those two are 16-bit; x stays 8-bit.
    assert quantized == {"h": TensorProto.UINT16, "o": TensorProto.UINT16, "x": TensorProto.UINT8}
    qdq = next(r for r in reports if r.name == "qdq")
    assert qdq.counts["16-bit activations"] == 2


def test_recipe_keys_are_checked():
    assert recipe_from_dict({"quantize": {"activation_bits": 16}}).quantize.activation_bits == 16
    for bad in ({"quantize": {"activation_bits": 12}},
                {"layer": [{"match": "x", "activation_bits": 4}]},
                {"layer": [{"match": "x"}]}):
        with pytest.raises(RecipeError):
            recipe_from_dict(bad)
    dynamic = recipe_from_dict({"quantize": {"dynamic": True}, "layer": [{"match": "fc*", "activation_bits": 16}]})
    with pytest.raises(UsageError, match="activation-bits 16 cannot apply"):
        plan_for(dynamic)
    assert plan_for(Recipe().override("quantize", activation_bits=16)).kind == "int8-static"


def test_flags_that_cannot_go_with_16_bit_activations_are_errors(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(_two_layer(), model)
    cases = [
        (["--dynamic"], "--activation-bits 16 and --dynamic"),
        (["--bits", "4"], "--activation-bits 16 and --bits 4"),
        (["--dtype", "fp16"], "--activation-bits 16 and --dtype fp16"),
        (["--format", "qoperator"], "--activation-bits 16 and --format qoperator"),
        (["--scheme", "auto", "--data", str(tmp_path)], "--scheme auto chooses the scheme itself"),
    ]
    for flags, message in cases:
        assert run(["convert", str(model), "-o", str(tmp_path / "o.onnx"), "--activation-bits", "16", *flags]) == 2
        assert message in capsys.readouterr().err, flags
    assert run(["convert", str(model), "-o", str(tmp_path / "o.onnx"), "--activation-bits", "12"]) == 2
    assert "--activation-bits 12 is not supported" in capsys.readouterr().err


def _conv_pair():
    """x[N,4,8,8] -> c1 (Conv) -> Relu -> c2 (Conv) -> y; channel 0 of x carries no weight."""
    w1 = conv_w(8, 4)
    w1[:, 0] = 0.0
    return make_model(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1] * 4, name="c1"),
         helper.make_node("Relu", ["h"], ["hr"], name="act"),
         helper.make_node("Conv", ["hr", "w2"], ["y"], pads=[1] * 4, name="c2")],
        [vi("x", ["N", 4, 8, 8])], [vi("y", None)], [init("w1", w1), init("w2", conv_w(4, 8))])


def test_the_guard_repairs_with_16_bit_activations_beside_keeping_layers_float(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(_conv_pair(), model)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
        x[:, 0] += 100.0
        np.save(data / f"s{i}.npy", x)
    out = tmp_path / "q.onnx"
    code = run(["convert", str(model), "-o", str(out), "--data", str(data), "--scheme", "int8-static",
                "--min-sqnr", "30", "--json"])
    guard = json.loads(capsys.readouterr().out)["guard"]
    assert code == 0, guard
    attempts = {a["label"]: a for a in guard["attempts"]}
    first = guard["attempts"][0]
    assert not first["meets_floor"]  # 8-bit activations lose the small channels
    raised = [a for a in guard["attempts"] if a["activation_bits_16"] and a["meets_floor"]]
    assert raised and not raised[0]["excluded"] and "c1" in raised[0]["activation_bits_16"]
    # Its twin (the same layers kept float) was measured in the same round, for the choice.
    twin = raised[0]["label"].replace("at 16-bit activations", "kept float")
    assert twin in attempts
    assert guard["chosen"] in (raised[0]["label"], twin) and attempts[guard["chosen"]]["meets_floor"]
    assert out.exists()


def test_int8_weights_and_16_bit_activations_cannot_go_together():
    with pytest.raises(UsageError, match="activation-bits 16 cannot apply"):
        plan_for(Recipe().override("quantize", weights_only=True, activation_bits=16))


def test_convert_says_16_bit_activations_are_not_a_cpu_speed_up():
    from qtool.pipeline.plan import SLOW_WIDE_ACTIVATIONS, speed_warnings

    wide = Recipe().override("quantize", activation_bits=16)
    assert SLOW_WIDE_ACTIVATIONS in speed_warnings(wide, plan_for(wide))
    assert SLOW_WIDE_ACTIVATIONS not in speed_warnings(Recipe(), plan_for(Recipe()))
