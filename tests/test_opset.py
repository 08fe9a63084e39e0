"""Raising a model's opset (qtool.pipeline.opset): the converter's three-op Softmax goes back
to one Softmax where that is exact, and the converted model computes the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import INT8_RNG, init, make_model, ort_session, vi
from onnx import helper, version_converter

from qtool.pipeline.opset import last_axis_softmax


def _attention_scores(axis: int) -> onnx.ModelProto:
    """Opset 12: q (reshaped to a shape computed at run time, so onnx's shape inference
    loses the rank) @ k^T -> Softmax(axis): the rank comes from Transpose's perm."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0, name="batch"),
        helper.make_node("Unsqueeze", ["b"], ["b1"], axes=[0], name="b1"),
        helper.make_node("Concat", ["b1", "rest"], ["target"], axis=0, name="target"),
        helper.make_node("Reshape", ["x", "target"], ["q"], name="reshape"),
        helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 1, 3, 2], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["y"], axis=axis, name="softmax"),
    ]
    return make_model(nodes, [vi("x", ["N", 24])], [vi("y", None)],
                      [init("zero", np.array(0, np.int64)), init("rest", np.array([2, 3, 4], np.int64))],
                      opset=12)


def _run(proto, x):
    return ort_session(proto).run(None, {"x": x})[0]


def test_last_axis_softmax_is_one_op_again_after_the_upgrade():
    proto = _attention_scores(axis=3)
    upgraded = version_converter.convert_version(proto, 13)
    assert "Flatten" in {n.op_type for n in upgraded.graph.node}  # the converter's form
    simplified = last_axis_softmax(version_converter.convert_version(proto, 13))
    ops = [n.op_type for n in simplified.graph.node]
    assert "Flatten" not in ops and ops.count("Reshape") == 1  # only the model's own Reshape
    softmax = next(n for n in simplified.graph.node if n.op_type == "Softmax")
    assert softmax.input[0] == "scores" and softmax.output[0] == "y"
    x = INT8_RNG.standard_normal((2, 24)).astype(np.float32)
    np.testing.assert_allclose(_run(simplified, x), _run(proto, x), rtol=1e-6, atol=1e-7)


def test_softmax_over_more_than_the_last_axis_keeps_the_converters_form():
    """Opset 12's Softmax(axis=2) of a rank-4 tensor normalizes over the last two axes
    together: opset 13's Softmax(axis=2) would not, so the three ops stay."""
    proto = _attention_scores(axis=2)
    simplified = last_axis_softmax(version_converter.convert_version(proto, 13))
    assert "Flatten" in {n.op_type for n in simplified.graph.node}
    x = INT8_RNG.standard_normal((2, 24)).astype(np.float32)
    np.testing.assert_allclose(_run(simplified, x), _run(proto, x), rtol=1e-6, atol=1e-7)
