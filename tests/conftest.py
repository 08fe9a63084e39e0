"""Shared builders for tests: small ONNX models made in code, run on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qtool.config import Recipe
from qtool.pipeline import convert_model
from qtool.quant import scales

# -- structural (control flow, recurrent ops, concatenated heads) ---------------------------


def value_info(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def constant_node(name: str, array) -> onnx.NodeProto:
    """A Constant node producing ``name`` (how exporters write weights inside branches)."""
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name + "_value"),
                            name=name + "_constant")


def onnx_model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def ort_session(model) -> ort.InferenceSession:
    """An onnxruntime CPU session for an onnx or onnx-ir model."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


# -- int8 builders (qdq, dynamic, qoperator, cleanup, schemes) -----------------------------

# One 8-bit quantization step on a unit-scale signal is ~48 dB; a few requantizations and
# int8 weights cost some of it. Below these the conversion is wrong, not just lossy.
MIN_SQNR_DB = 25.0  # a single quantized op
MIN_SQNR_CHAIN_DB = 20.0  # several quantized ops in a row
INT8_RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def session(model) -> ort.InferenceSession:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def minmax_ranges(proto: onnx.ModelProto, feeds: list[dict]) -> dict[str, tuple[float, float]]:
    """Min/max of every float tensor over ``feeds`` (a stand-in for qtool calibrate)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    m = onnx.shape_inference.infer_shapes(m)
    known = {o.name for o in m.graph.output}
    for v in list(m.graph.value_info) + list(m.graph.input):
        if v.name not in known and v.type.tensor_type.elem_type == TensorProto.FLOAT:
            m.graph.output.append(vi(v.name, None))
            known.add(v.name)
    s = session(m)
    names = [o.name for o in s.get_outputs()]
    ranges: dict[str, tuple[float, float]] = {}
    for feed in feeds:
        for name, value in zip(names, s.run(None, feed)):
            if value.dtype != np.float32:
                continue
            lo, hi = float(value.min()), float(value.max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
    return ranges


def feeds_for(proto, n=4, batch=2):
    out = []
    for _ in range(n):
        feed = {}
        for inp in proto.graph.input:
            dims = [d.dim_value if d.dim_value else batch for d in inp.type.tensor_type.shape.dim]
            if inp.type.tensor_type.elem_type == TensorProto.INT64:
                feed[inp.name] = INT8_RNG.integers(0, 50, dims).astype(np.int64)
            else:
                feed[inp.name] = INT8_RNG.standard_normal(dims).astype(np.float32)
        out.append(feed)
    return out


def sqnr(proto, converted, feed) -> float:
    ref = session(proto).run(None, feed)
    got = session(converted).run(None, feed)
    return min(scales.sqnr_db(r, g) for r, g in zip(ref, got))


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.to_proto(model).graph.node]


def static(proto, recipe=None, feeds=None, **overrides):
    feeds = feeds or feeds_for(proto)
    recipe = (recipe or Recipe())
    if overrides:
        recipe = recipe.override("quantize", **overrides)
    ranges = minmax_ranges(proto, feeds)
    model, reports, summary = convert_model(ir.from_proto(proto), recipe, table=ranges)
    return model, reports, summary, feeds


def assert_no_dangling(model: ir.Model) -> None:
    proto = ir.to_proto(model)
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            assert consumers.get(node.output[0]) or node.output[0] in outputs, node.name
        if node.op_type == "DequantizeLinear":
            assert consumers.get(node.output[0]) or node.output[0] in outputs, node.name


def conv_w(cout, cin, k=3):
    return (INT8_RNG.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)


def small_cnn():
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="c1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, name="c2"),
         helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
         helper.make_node("GlobalAveragePool", ["s"], ["y"], name="gap")],
        [vi("x", ["N", 8, 8, 8])], [vi("y", None)],
        [init("w1", conv_w(16, 8)), init("b1", np.zeros(16, np.float32)), init("w2", conv_w(16, 16))],
    )


def mlp():
    d, f = 64, 128
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
         helper.make_node("Relu", ["h"], ["hr"], name="act"),
         helper.make_node("MatMul", ["hr", "w2"], ["o"], name="down"),
         helper.make_node("Gemm", ["o", "w3", "b3"], ["y"], transB=1, name="lm_head")],
        [vi("x", ["B", d])], [vi("y", None)],
        [init("w1", INT8_RNG.standard_normal((d, f)).astype(np.float32) * 0.1),
         init("w2", INT8_RNG.standard_normal((f, d)).astype(np.float32) * 0.1),
         init("w3", INT8_RNG.standard_normal((100, d)).astype(np.float32) * 0.1),
         init("b3", INT8_RNG.standard_normal(100).astype(np.float32))],
    )


def require_extra(module: str, extra: str):
    """Import an optional extra's module for a test. Without it the test is skipped on a
    developer's machine, but CI (`.ci/run` installs every extra and sets
    QTOOL_REQUIRE_EXTRAS=1) fails instead: no test of an extra goes green by skipping."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("QTOOL_REQUIRE_EXTRAS"):
            raise
        pytest.skip(f"needs the {extra!r} extra: pip install 'qtool[{extra}]'")


def needs_extra(module: str, extra: str):
    """A skipif mark for tests of an optional extra: skipped without it on a developer's
    machine, run (and failing) in CI, where QTOOL_REQUIRE_EXTRAS=1 (see require_extra)."""
    import importlib.util
    import os

    import pytest

    missing = importlib.util.find_spec(module) is None and not os.environ.get("QTOOL_REQUIRE_EXTRAS")
    return pytest.mark.skipif(missing, reason=f"needs the {extra!r} extra: pip install 'qtool[{extra}]'")
