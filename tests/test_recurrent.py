"""Recurrent ops: LSTM becomes onnxruntime's DynamicQuantizeLSTM (int8 weights, transposed,
per gate channel) and matches the float LSTM; forms it cannot take stay float with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import constant_node, onnx_model, ort_session, value_info
from onnx import TensorProto, helper, numpy_helper

from qtool.config import Recipe, load_recipe
from qtool.passes.recurrent import quantize_recurrent
from qtool.pipeline import convert_model
from qtool.quant.scales import sqnr_db

# Measured 38-41 dB on every output over 20 steps (int8 weights, uint8 inputs and hidden
# states quantized per step by onnxruntime); well below that means a wrong layout or scale.
MIN_LSTM_SQNR_DB = 30.0
MAX_LSTM_ABS_ERROR = 0.05  # on gates' outputs in [-1, 1]
HIDDEN, INPUT, STEPS, BATCH = 32, 16, 20, 3


def lstm_model(direction: str = "forward", layout: int = 0, op: str = "LSTM", seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    w = (rng.standard_normal((d, gates * HIDDEN, INPUT)) / np.sqrt(INPUT)).astype(np.float32)
    r = (rng.standard_normal((d, gates * HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    b = (rng.standard_normal((d, 2 * gates * HIDDEN)) * 0.1).astype(np.float32)
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    outputs = ["y", "y_h", "y_c"] if op == "LSTM" else ["y", "y_h"]
    node = helper.make_node(op, ["x", "W", "R", "B", "", *states], outputs, hidden_size=HIDDEN,
                            direction=direction, layout=layout, name="rnn")
    x_shape = ["T", "N", INPUT] if layout == 0 else ["N", "T", INPUT]
    h_shape = [d, "N", HIDDEN] if layout == 0 else ["N", d, HIDDEN]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))]
    return onnx_model([node], [value_info("x", x_shape)] + [value_info(s, h_shape) for s in states],
                      [value_info(o, None) for o in outputs], inits)


def _feed(proto: onnx.ModelProto, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in proto.graph.input:
        dims = [d.dim_value or {"T": STEPS, "N": BATCH}[d.dim_param] for d in inp.type.tensor_type.shape.dim]
        feed[inp.name] = (rng.standard_normal(dims) * (1.0 if inp.name == "x" else 0.5)).astype(np.float32)
    return feed


def _compare(proto: onnx.ModelProto, model: ir.Model) -> list[tuple[float, float]]:
    feed = _feed(proto)
    ref, got = ort_session(proto).run(None, feed), ort_session(model).run(None, feed)
    return [(sqnr_db(a, b), float(np.abs(a - b).max())) for a, b in zip(ref, got)]


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lstm_becomes_dynamic_quantize_lstm_and_matches_float(direction):
    proto = lstm_model(direction)
    model, reports, summary = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    assert [n.op_type for n in model.graph] == ["DynamicQuantizeLSTM"]
    node = next(iter(model.graph))
    d = 2 if direction == "bidirectional" else 1
    # ONNX W is [d, 4H, input]; the contrib op wants it transposed, int8, scales per gate channel.
    assert node.inputs[1].const_value.shape == (d, INPUT, 4 * HIDDEN)
    assert node.inputs[1].const_value.dtype == ir.DataType.INT8
    assert node.inputs[8].const_value.shape == (d, 4 * HIDDEN)
    assert summary.quantized["LSTM"] == 1
    for sqnr, err in _compare(proto, model):
        assert sqnr > MIN_LSTM_SQNR_DB and err < MAX_LSTM_ABS_ERROR
    assert len(ir.to_proto(model).SerializeToString()) < 0.4 * len(proto.SerializeToString())


def test_static_int8_quantizes_the_lstm_too():
    proto = lstm_model()
    model, _, summary = convert_model(ir.from_proto(proto), Recipe(), table={})
    assert summary.quantized["LSTM"] == 1
    assert all(s > MIN_LSTM_SQNR_DB for s, _ in _compare(proto, model))


def test_lstm_with_constant_node_weights_in_an_if_branch():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((1, 4 * HIDDEN, INPUT)) / 4).astype(np.float32)
    r = (rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) / 6).astype(np.float32)
    branch = helper.make_graph(
        [constant_node("W", w), constant_node("R", r),
         helper.make_node("LSTM", ["x", "W", "R"], ["", "y_h"], hidden_size=HIDDEN, name="lstm")],
        "then", [], [value_info("y_h", None)])
    other = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], name="mean")],
                              "else", [], [value_info("m", None)])
    proto = onnx_model([helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other, name="if")],
                       [value_info("x", ["T", "N", INPUT]), value_info("cond", [], TensorProto.BOOL)],
                       [value_info("y", None)])
    model, _, summary = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    assert summary.quantized["LSTM"] == 1
    feed = {"x": _feed(lstm_model())["x"], "cond": np.array(True)}
    ref, got = ort_session(proto).run(None, feed)[0], ort_session(model).run(None, feed)[0]
    assert sqnr_db(ref, got) > MIN_LSTM_SQNR_DB


@pytest.mark.parametrize("op, layout, reason", [
    ("LSTM", 1, "batch-first LSTM (layout = 1)"),
    ("GRU", 0, "no integer GRU kernel"),
])
def test_forms_without_a_kernel_stay_float_with_the_reason(op, layout, reason):
    proto = lstm_model(layout=layout, op=op)
    model = ir.from_proto(proto)
    report = quantize_recurrent(model, Recipe())
    assert not report.counts and reason in report.skipped["rnn"]
    _, _, summary = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    assert summary.float_[op] == 1 and any(reason in r for r in summary.reasons[op])


def test_excluded_lstm_stays_float():
    proto = lstm_model()
    report = quantize_recurrent(ir.from_proto(proto), Recipe().override("quantize", exclude=("rnn",)))
    assert report.skipped["rnn"] == "excluded by --exclude / recipe"
