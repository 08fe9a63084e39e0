"""Cleanup after quantization (qtool.passes.cleanup): dangling pairs, scalar Muls absorbed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import (
    MIN_SQNR_CHAIN_DB,
    conv_w,
    init,
    make_model,
    op_types,
    session,
    sqnr,
    static,
    vi,
)
from onnx import helper

RNG = np.random.default_rng(0)


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
