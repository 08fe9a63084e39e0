"""QOperator format (qtool.passes.qoperator): QDQ groups fused into QLinear* ops."""

from __future__ import annotations

import numpy as np
from conftest import (
    MIN_SQNR_CHAIN_DB,
    assert_no_dangling,
    init,
    make_model,
    op_types,
    small_cnn,
    sqnr,
    static,
    vi,
)
from onnx import helper

RNG = np.random.default_rng(0)


def test_qoperator_format():
    proto = small_cnn()
    model, _reports, _summary, feeds = static(proto, format="qoperator")
    types = op_types(model)
    assert types.count("QLinearConv") == 2 and "QLinearAdd" in types and "QLinearGlobalAveragePool" in types
    assert "Conv" not in types
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB
    assert_no_dangling(model)


def test_qoperator_matmul_gemm_concat():
    proto = make_model(
        [helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"),
         helper.make_node("Relu", ["m"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["g"], transB=1, name="gemm"),
         helper.make_node("Concat", ["g", "g"], ["y"], axis=1, name="cat")],
        [vi("a", [4, 16])], [vi("y", None)],
        [init("w", RNG.standard_normal((16, 32)).astype(np.float32)),
         init("w2", RNG.standard_normal((8, 32)).astype(np.float32)),
         init("b2", RNG.standard_normal(8).astype(np.float32))],
    )
    model, _reports, _summary, feeds = static(proto, format="qoperator")
    assert op_types(model) == ["QuantizeLinear", "QLinearMatMul", "QGemm", "QLinearConcat", "DequantizeLinear"]
    assert sqnr(proto, model, feeds[0]) > MIN_SQNR_CHAIN_DB
