"""Dynamic int8 (qtool.passes.dynamic): DynamicQuantizeMatMul, bias, smoothing, shared inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import (
    MIN_SQNR_CHAIN_DB,
    MIN_SQNR_DB,
    init,
    make_model,
    mlp,
    op_types,
    session,
    small_cnn,
    sqnr,
    vi,
)
from onnx import helper

from qtool.config import load_recipe
from qtool.pipeline import convert_model
from qtool.quant import scales

RNG = np.random.default_rng(0)


def test_dynamic_uses_dynamic_quantize_matmul_and_keeps_excluded_layers():
    proto = mlp()
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
    proto = small_cnn()
    _model, _reports, summary = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    assert summary.float_["Conv"] == 2
    assert any("ConvInteger" in r for r in summary.reasons["Conv"])


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


def test_fp16_weights_cast_in_the_graph_are_folded_and_quantized():
    """fp16-stored weights reach the MatMul through a Cast: folded and quantized, the file
    gets smaller, where before the fold's growth guard kept them and nothing was compressed."""
    from qtool.model import weight_bytes

    w = (RNG.standard_normal((128, 64)) * 0.1).astype(np.float32)
    proto = make_model(
        [helper.make_node("Cast", ["w16"], ["w"], to=onnx.TensorProto.FLOAT, name="cast"),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [vi("x", ["B", 128])], [vi("y", None)], [init("w16", w.astype(np.float16))])
    source = ir.from_proto(proto)
    model, _reports, summary = convert_model(source, load_recipe("int8-dynamic"))
    assert summary.quantized["MatMul"] == 1
    assert weight_bytes(model) < 0.6 * weight_bytes(source)  # int8 + scales vs fp16
    feed = {"x": RNG.standard_normal((4, 128)).astype(np.float32)}
    assert sqnr(proto, model, feed) > MIN_SQNR_DB
