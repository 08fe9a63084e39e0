"""A concatenated detector head (boxes in pixels next to class probabilities) keeps its class
rows: the Concat of inputs whose ranges differ by orders of magnitude stays float."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import constant_node, onnx_model, ort_session, value_info
from onnx import helper, numpy_helper

from qtool.config import Recipe
from qtool.passes.concat_ranges import MAX_CONCAT_SPAN_RATIO, concat_range_ratio, mismatched_concats
from qtool.pipeline import convert_model
from qtool.quant.scales import sqnr_db

# One uint8 step over [0, 1] is ~48 dB on a uniform signal; through an int8 Conv and a
# Sigmoid ~35 dB remain. One shared scale over [0, 640] leaves < 1 level: ~0 dB.
MIN_CLASS_SQNR_DB = 25.0
MIN_BOX_SQNR_DB = 25.0
BOXES, CLASSES, C, HW = 4, 10, 16, 8


def head_model() -> onnx.ModelProto:
    """x -> Conv -> Sigmoid * 640 (boxes in pixels) | Conv -> Sigmoid (class scores),
    each reshaped to [N, rows, HW*HW] and concatenated on the channel axis (YOLOv8's head)."""
    rng = np.random.default_rng(0)
    wb = (rng.standard_normal((BOXES, C, 1, 1)) / 4).astype(np.float32)
    wc = (rng.standard_normal((CLASSES, C, 1, 1)) / 4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["box_logits"], name="box_conv"),
        helper.make_node("Sigmoid", ["box_logits"], ["box_unit"], name="box_sigmoid"),
        constant_node("pixels", np.array(640.0, np.float32)),
        helper.make_node("Mul", ["box_unit", "pixels"], ["boxes"], name="box_scale"),
        helper.make_node("Reshape", ["boxes", "box_shape"], ["box_rows"], name="box_reshape"),
        helper.make_node("Conv", ["x", "wc"], ["cls_logits"], name="cls_conv"),
        helper.make_node("Sigmoid", ["cls_logits"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Reshape", ["scores", "cls_shape"], ["cls_rows"], name="cls_reshape"),
        helper.make_node("Concat", ["box_rows", "cls_rows"], ["y"], axis=1, name="head_concat"),
    ]
    inits = [numpy_helper.from_array(wb, "wb"), numpy_helper.from_array(wc, "wc"),
             numpy_helper.from_array(np.array([1, BOXES, HW * HW], np.int64), "box_shape"),
             numpy_helper.from_array(np.array([1, CLASSES, HW * HW], np.int64), "cls_shape")]
    return onnx_model(nodes, [value_info("x", [1, C, HW, HW])], [value_info("y", None)], inits)


def _minmax(proto: onnx.ModelProto, feeds: list[dict]) -> dict[str, tuple[float, float]]:
    """Min/max of every float tensor over ``feeds`` (what qtool calibrate's minmax gives)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(value_info(v, None) for n in probe.graph.node if n.op_type != "Constant"
                              for v in n.output if v not in known)
    session = ort_session(probe)
    names = [o.name for o in session.get_outputs()]
    ranges: dict[str, tuple[float, float]] = {"x": (np.inf, -np.inf)}
    for feed in feeds:
        values = dict(zip(names, session.run(None, feed)), x=feed["x"])
        for name, v in values.items():
            lo, hi = ranges.get(name, (np.inf, -np.inf))
            ranges[name] = (min(lo, float(v.min())), max(hi, float(v.max())))
    return ranges


def test_class_rows_of_a_concatenated_head_keep_their_resolution():
    proto = head_model()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, C, HW, HW)).astype(np.float32)} for _ in range(8)]
    ranges = _minmax(proto, feeds)
    model, reports, summary = convert_model(ir.from_proto(proto), Recipe(), table=ranges)
    held_out = {"x": rng.standard_normal((1, C, HW, HW)).astype(np.float32)}
    ref = ort_session(proto).run(None, held_out)[0]
    got = ort_session(model).run(None, held_out)[0]
    assert sqnr_db(ref[:, BOXES:], got[:, BOXES:]) > MIN_CLASS_SQNR_DB  # ~0 dB with one scale
    assert sqnr_db(ref[:, :BOXES], got[:, :BOXES]) > MIN_BOX_SQNR_DB
    assert summary.quantized["Conv"] == 2  # the branches themselves are still int8
    assert "kept float" in next(iter(summary.reasons["Concat"]))


def test_only_concats_of_mismatched_ranges_are_named():
    model = ir.from_proto(head_model())
    concat = next(n for n in model.graph if n.op_type == "Concat")
    assert concat_range_ratio(concat, {"box_rows": (0.0, 640.0), "cls_rows": (0.0, 1.0)}) == 640.0
    assert mismatched_concats(model, {"box_rows": (0.0, 640.0), "cls_rows": (0.0, 1.0)}).skipped
    similar = {"box_rows": (-2.0, 3.0), "cls_rows": (0.0, 5.0 * MAX_CONCAT_SPAN_RATIO / 10)}
    assert not mismatched_concats(model, similar).skipped
    assert concat_range_ratio(concat, {"box_rows": (0.0, 640.0)}) is None  # one range known
