"""A conversion that quantizes nothing, or writes a larger model, says so plainly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import onnx_model, value_info
from onnx import helper, numpy_helper

from qtool.config import load_recipe
from qtool.errors import EXIT_GATE_FAILED
from qtool.outcome import NoGain, check_conversion, conversion_problems
from qtool.pipeline import convert_model


def _conv_only():
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    return onnx_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                      [value_info("x", [1, 4, 8, 8])], [value_info("y", None)], [numpy_helper.from_array(w, "w")])


def _size(model) -> int:
    return len((ir.to_proto(model) if isinstance(model, ir.Model) else model).SerializeToString())


def test_dynamic_int8_of_a_cnn_quantizes_nothing_and_says_so():
    proto = _conv_only()
    model, _, summary = convert_model(ir.from_proto(proto), load_recipe("int8-dynamic"))
    problems = conversion_problems(summary, _size(proto), _size(model))
    assert problems[0].startswith("nothing was quantized: every node stayed float (dynamic Conv (ConvInteger)")
    with pytest.raises(NoGain) as info:
        check_conversion(summary, _size(proto), _size(model))
    assert info.value.exit_code == EXIT_GATE_FAILED and "--data" in info.value.hint


def test_a_larger_output_is_named_with_its_ratio_and_a_good_conversion_passes():
    proto = _conv_only()
    model, _, summary = convert_model(ir.from_proto(proto), load_recipe("int4-weight-only"))
    # The Conv has 4 input channels, fewer than one 4-bit block: nothing quantized here either.
    assert conversion_problems(summary, 1000, 1500) == [conversion_problems(summary, 0, 0)[0],
                                                       "the output is larger than the input: 0.00 MB from 0.00 MB (1.50x)"]
    mlp = onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [value_info("x", [2, 128])],
                     [value_info("y", None)],
                     [numpy_helper.from_array(np.ones((128, 64), np.float32), "w")])
    model, _, summary = convert_model(ir.from_proto(mlp), load_recipe("int8-dynamic"))
    assert conversion_problems(summary, _size(mlp), _size(model)) == []
    check_conversion(summary, _size(mlp), _size(model))  # no exception
