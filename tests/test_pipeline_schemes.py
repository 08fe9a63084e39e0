"""The int8 schemes as the pipeline runs them (qtool.pipeline): tables, opset, inputs kept."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import (
    MIN_SQNR_CHAIN_DB,
    conv_w,
    feeds_for,
    init,
    make_model,
    minmax_ranges,
    op_types,
    sqnr,
    vi,
)
from onnx import helper

from qtool.config import Recipe
from qtool.errors import UsageError
from qtool.pipeline import convert_model

RNG = np.random.default_rng(0)


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
