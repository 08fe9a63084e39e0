"""Subgraphs the OpenVINO preset leaves float (qtool.targets.patterns): squeeze-excitation
blocks (NNCF's SE_BLOCK ignored pattern), on small models built in code."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import (
    MIN_SQNR_CHAIN_DB,
    feeds_for,
    init,
    make_model,
    minmax_ranges,
    sqnr,
    vi,
)
from onnx import helper

from qtool.config import Recipe
from qtool.pipeline import convert_model
from qtool.targets import apply_target

SE_CONVS = {"se_reduce", "se_expand"}


# A generator of this module's own: the shared conftest one's state depends on which tests
# ran before, and a draw where every SE Relu output is <= 0 leaves no range to quantize.
RNG = np.random.default_rng(15)


def _w(*shape, k=0.3):
    return RNG.standard_normal(shape).astype(np.float32) * k


def _activation(kind: str, x: str, out: str) -> list[onnx.NodeProto]:
    if kind == "swish":  # x * sigmoid(x): an x * f(x) chain, as NNCF's swish pattern
        return [helper.make_node("Sigmoid", [x], [out + "_sig"], name="act_sig"),
                helper.make_node("Mul", [x, out + "_sig"], [out], name="act_mul")]
    return [helper.make_node(kind, [x], [out], name="act")]


def _se_model(pool: str = "GlobalAveragePool", act: str = "Relu", gated: str = "a") -> onnx.ModelProto:
    """stem Conv -> Relu -> a; a -> pool -> Conv(8->4) -> act -> Conv(4->8) -> HardSigmoid
    -> Mul(``gated``, gate) -> head Conv. gated="a": a squeeze-excitation block; "b": the
    gate scales another tensor (not an SE block)."""
    pool_node = (helper.make_node("ReduceMean", ["a"], ["p"], axes=[2, 3], keepdims=1, name="pool")
                 if pool == "ReduceMean" else helper.make_node(pool, ["a"], ["p"], name="pool"))
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1] * 4, name="stem"),
             helper.make_node("Relu", ["c"], ["a"], name="relu"),
             helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1] * 4, name="side"),
             pool_node,
             helper.make_node("Conv", ["p", "w1", "b1"], ["s1"], name="se_reduce"),
             *_activation(act, "s1", "h"),
             helper.make_node("Conv", ["h", "w2", "b2"], ["s2"], name="se_expand"),
             helper.make_node("HardSigmoid", ["s2"], ["g"], alpha=0.2, beta=0.5, name="gate"),
             helper.make_node("Mul", [gated, "g"], ["m"], name="excite"),
             helper.make_node("Add", ["m", "b" if gated == "a" else "a"], ["r"], name="residual"),
             helper.make_node("Conv", ["r", "w3"], ["y"], name="head")]
    return make_model(
        nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", None)],
        [init("w0", _w(8, 3, 3, 3)), init("wb", _w(8, 3, 3, 3)), init("w1", _w(4, 8, 1, 1)),
         init("b1", np.full(4, 0.5, np.float32)), init("w2", _w(8, 4, 1, 1)), init("b2", _w(8, k=0.1)),
         init("w3", _w(5, 8, 1, 1))],
    )


def _convert(proto: onnx.ModelProto, target: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """(converted model, skipped node -> why) under ``--target target``."""
    recipe = apply_target(Recipe().override("quantize", target=target))
    feeds = feeds_for(proto)
    model, reports, _summary = convert_model(ir.from_proto(proto), recipe, table=minmax_ranges(proto, feeds))
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB
    skipped = {k: v for r in reports for k, v in r.skipped.items()}
    return ir.to_proto(model), skipped


def _int8_convs(model: onnx.ModelProto) -> set[str]:
    """Names of the Convs whose data input and weight are both read through a DQ."""
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "Conv"
            and all(made_by.get(i) == "DequantizeLinear" for i in n.input[:2])}


def _input_producers(model: onnx.ModelProto, op: str) -> list[str]:
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.op_type == op)
    return [made_by.get(i, "initializer") for i in node.input]


@pytest.mark.parametrize(("pool", "act"), [("GlobalAveragePool", "Relu"), ("ReduceMean", "swish")])
def test_se_block_convs_stay_float_under_openvino(pool, act):
    """NNCF's SE_BLOCK: the two SE Convs keep float inputs and float weights; the pool
    and the Mul that applies the gate are quantized as before, so are the other Convs."""
    model, skipped = _convert(_se_model(pool, act), "openvino")
    assert _int8_convs(model) == {"stem", "side", "head"}
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for conv in (n for n in model.graph.node if n.name in SE_CONVS):
        assert conv.input[1] in floats, conv.name
        assert "SE_BLOCK" in skipped[conv.name]
    assert _input_producers(model, pool) == ["DequantizeLinear"]
    excite = next(n for n in model.graph.node if n.name == "excite")
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    assert [made_by[i] for i in excite.input] == ["DequantizeLinear", "DequantizeLinear"]


def test_se_block_convs_are_int8_on_the_cpu_target():
    """onnxruntime's placement (--target cpu-vnni) has no such rule: every Conv is int8."""
    model, _ = _convert(_se_model(), "cpu-vnni")
    assert _int8_convs(model) == {"stem", "side", "head", *SE_CONVS}


def test_a_gate_that_scales_another_tensor_is_not_an_se_block():
    """pool(a) -> Conv -> Relu -> Conv -> HardSigmoid, multiplied into b (not a): the
    pattern needs the gate to scale the squeezed tensor, so those Convs are int8."""
    model, skipped = _convert(_se_model(gated="b"), "openvino")
    assert _int8_convs(model) == {"stem", "side", "head", *SE_CONVS}
    assert not any("SE_BLOCK" in why for why in skipped.values())
