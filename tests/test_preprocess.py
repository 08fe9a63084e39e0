"""Pre-processing passes: BatchNorm folding, constant folding, Identity/Dropout removal,
tolerant shape inference. Models are built in code and checked on onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.model import iter_nodes
from qtool.passes.preprocess import preprocess

BN_RTOL = 1e-5  # max |folded - original| / max |original|
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"
RNG = np.random.default_rng(0)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _run(proto: onnx.ModelProto, feed):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _preprocess(proto: onnx.ModelProto, **kw):
    model = ir.serde.deserialize_model(proto)
    report = preprocess(model, **kw)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out, report


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _bn_inits(c):
    return [
        _init("gamma", RNG.uniform(0.5, 2, c).astype(np.float32)),
        _init("beta", RNG.normal(size=c).astype(np.float32)),
        _init("mean", RNG.normal(size=c).astype(np.float32)),
        _init("var", RNG.uniform(0.1, 3, c).astype(np.float32)),
    ]


BN = helper.make_node(
    "BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"], epsilon=1e-3
)


def _conv_bn(op, group, bias):
    c_in, c_out = 4, 6
    if op == "Conv":
        w = RNG.normal(size=(c_out, c_in // group, 3, 3)).astype(np.float32)
    else:
        w = RNG.normal(size=(c_in, c_out // group, 3, 3)).astype(np.float32)
    inits = [_init("w", w), *_bn_inits(c_out)]
    ins = ["x", "w"]
    if bias:
        inits.append(_init("b", RNG.normal(size=c_out).astype(np.float32)))
        ins.append("b")
    conv = helper.make_node(op, ins, ["y"], group=group, pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["z"], ["out"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 5, 5])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", c_out, 5, 5])
    feed = {"x": RNG.normal(size=(2, c_in, 5, 5)).astype(np.float32)}
    return _model([conv, BN, relu], [x], [out], inits), feed


def _gemm_bn(trans_b, bias):
    w = RNG.normal(size=(6, 8) if trans_b else (8, 6)).astype(np.float32)
    inits = [_init("w", w), *_bn_inits(6)]
    ins = ["x", "w"] + (["b"] if bias else [])
    if bias:
        inits.append(_init("b", RNG.normal(size=6).astype(np.float32)))
    gemm = helper.make_node("Gemm", ins, ["y"], transB=trans_b, alpha=0.5, beta=2.0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6])
    return _model([gemm, BN], [x], [out], inits), {"x": RNG.normal(size=(3, 8)).astype(np.float32)}


def _matmul_bn(bias):
    inits = [_init("w", RNG.normal(size=(8, 6)).astype(np.float32)), *_bn_inits(6)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm" if bias else "y"])]
    if bias:
        inits.append(_init("b", RNG.normal(size=6).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["b", "mm"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6])
    return _model([*nodes, BN], [x], [out], inits), {
        "x": RNG.normal(size=(3, 8)).astype(np.float32)
    }


CASES = {
    "conv": lambda: _conv_bn("Conv", 1, bias=False),
    "conv_bias_grouped": lambda: _conv_bn("Conv", 2, bias=True),
    "convtranspose_grouped": lambda: _conv_bn("ConvTranspose", 2, bias=False),
    "convtranspose_bias": lambda: _conv_bn("ConvTranspose", 1, bias=True),
    "gemm": lambda: _gemm_bn(0, bias=False),
    "gemm_transb_bias": lambda: _gemm_bn(1, bias=True),
    "matmul": lambda: _matmul_bn(bias=False),
    "matmul_add": lambda: _matmul_bn(bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batchnorm_folds_and_keeps_outputs(case):
    proto, feed = CASES[case]()
    (expected,) = _run(proto, feed)
    folded, report = _preprocess(proto)
    assert report.counts["batchnorm_folded"] == 1
    assert "BatchNormalization" not in _ops(folded)
    (got,) = _run(folded, feed)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= BN_RTOL * np.abs(expected).max()
    # Graph output names survive the fold.
    assert [o.name for o in folded.graph.output] == [o.name for o in proto.graph.output]


def test_batchnorm_not_folded_when_conv_output_is_shared():
    proto, feed = _conv_bn("Conv", 1, bias=True)
    proto.graph.node.append(helper.make_node("Sigmoid", ["y"], ["side"]))
    proto.graph.output.append(
        helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 6, 5, 5])
    )
    expected = _run(proto, feed)
    folded, report = _preprocess(proto)
    assert "batchnorm_folded" not in report.counts
    assert "Conv output has other consumers" in report.skipped.values()
    for a, b in zip(_run(folded, feed), expected):
        np.testing.assert_array_equal(a, b)


def test_batchnorm_on_matmul_of_unknown_rank_is_left_with_reason():
    # x is [N, T, 8]: BatchNorm's channel axis (1) is T, not the MatMul's output columns.
    proto, _ = _matmul_bn(bias=False)
    proto.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])
    )
    proto.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6, 6])
    )
    folded, report = _preprocess(proto)
    assert "BatchNormalization" in _ops(folded)
    assert "MatMul input rank is unknown or not 2" in report.skipped.values()


def test_demo_model_folds_exactly_one_batchnorm():
    proto = onnx.load(str(EXAMPLE))
    feed = {"input": RNG.normal(size=(4, 1, 16, 16)).astype(np.float32)}
    (expected,) = _run(proto, feed)
    folded, report = _preprocess(proto)
    assert report.counts["batchnorm_folded"] == 1
    assert _ops(folded).count("BatchNormalization") == 0
    first_conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert len(first_conv.input) == 3  # the bias the fold created
    (got,) = _run(folded, feed)
    assert np.abs(got - expected).max() <= BN_RTOL * np.abs(expected).max()
    assert onnx.load(str(EXAMPLE)).SerializeToString() == proto.SerializeToString()


def _shape_chain_model():
    """x [2, 3, 4] reshaped to [shape(x)[0], 12] via Shape/Gather/Unsqueeze/Concat, then
    scaled by a constant computed as Mul(Cast(int c), 0.5); plus a DequantizeLinear of a
    constant that must stay."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "twelve"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["cf", "half"], ["k"]),
        helper.make_node("DequantizeLinear", ["q", "qs"], ["dq"]),
        helper.make_node("Mul", ["r", "k"], ["rk"]),
        helper.make_node("Add", ["rk", "dq"], ["out"]),
    ]
    inits = [
        _init("zero", np.array(0, np.int64)),
        _init("axes0", np.array([0], np.int64)),
        _init("twelve", np.array([12], np.int64)),
        _init("ci", np.arange(12, dtype=np.int32)),
        _init("half", np.array(0.5, np.float32)),
        _init("q", np.arange(12, dtype=np.int8)),
        _init("qs", np.array(0.25, np.float32)),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 12])
    return _model(nodes, [x], [out], inits)


def test_constant_folding_counts_and_keeps_outputs():
    proto = _shape_chain_model()
    feed = {"x": RNG.normal(size=(2, 3, 4)).astype(np.float32)}
    (expected,) = _run(proto, feed)
    folded, report = _preprocess(proto)
    # Shape, Gather, Unsqueeze, Concat, Cast, Mul(constants): six folds.
    assert report.counts["constant_folded"] == 6
    assert _ops(folded) == ["Reshape", "DequantizeLinear", "Mul", "Add"]
    (got,) = _run(folded, feed)
    np.testing.assert_array_equal(got, expected)


def test_constant_folding_off_changes_nothing_but_shapes():
    proto = _shape_chain_model()
    folded, report = _preprocess(proto, fold_constants=False, fold_batchnorm=False)
    assert "constant_folded" not in report.counts
    assert _ops(folded) == _ops(proto)


def test_symbolic_dims_and_uninferable_node_still_preprocess():
    # Reshape to a runtime shape: its output shape cannot be inferred; Shape of a symbolic
    # input cannot be folded. Identity and Dropout still go away.
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("Reshape", ["xi", "target"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"]),
        helper.make_node("Shape", ["d"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["sf"], ["out"], keepdims=0),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    target = helper.make_tensor_value_info("target", TensorProto.INT64, [2])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [])
    proto = _model(nodes, [x, target], [out])
    feed = {
        "x": RNG.normal(size=(2, 3, 4)).astype(np.float32),
        "target": np.array([6, 4], np.int64),
    }
    (expected,) = _run(proto, feed)
    folded, report = _preprocess(proto)
    assert report.counts["identity_removed"] == 1
    assert report.counts["dropout_removed"] == 1
    assert "constant_folded" not in report.counts
    assert _ops(folded) == ["Reshape", "Shape", "Cast", "ReduceSum"]
    (got,) = _run(folded, feed)
    np.testing.assert_array_equal(got, expected)


def test_failed_shape_inference_is_a_note_not_an_error():
    # A declared value_info that contradicts the real shape makes onnx's inference raise.
    proto, _ = _matmul_bn(bias=True)
    proto.graph.value_info.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, [5, 5, 5]))
    model = ir.serde.deserialize_model(proto)
    report = preprocess(model, fold_batchnorm=False)
    assert any("shape inference" in note for note in report.notes)


def test_passes_walk_into_if_subgraphs():
    then_nodes = [
        helper.make_node("Identity", ["w"], ["wi"]),
        helper.make_node("Add", ["wi", "one"], ["w1"]),
        helper.make_node("Mul", ["x", "w1"], ["t_out"]),
    ]
    then_graph = helper.make_graph(
        then_nodes,
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 4])],
        initializer=[_init("one", np.ones(4, np.float32))],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 4])],
    )
    node = helper.make_node("If", ["c"], ["out"], then_branch=then_graph, else_branch=else_graph)
    inputs = [
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])
    proto = _model([node], inputs, [out], [_init("w", np.arange(4, dtype=np.float32))])
    folded, report = _preprocess(proto)
    assert report.counts["identity_removed"] == 1
    assert report.counts["constant_folded"] == 1
    model = ir.serde.deserialize_model(folded)
    assert sorted(n.op_type for n in iter_nodes(model)) == ["If", "Mul", "Neg"]
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    for c in (True, False):
        feed = {"c": np.array(c), "x": x}
        np.testing.assert_array_equal(_run(folded, feed)[0], _run(proto, feed)[0])


def _pad_conv(pads, value=0.0, mode="constant", conv_pads=(0, 1, 0, 1), computed=False):
    """x -> Pad -> Conv(3x3). ``computed``: the pads come from the ConstantOfShape/Concat/
    Slice/Transpose chain torch.onnx.export writes for F.pad (folded first, then fused)."""
    w = RNG.normal(size=(5, 3, 3, 3)).astype(np.float32)
    inits = [_init("w", w), _init("cv", np.array(value, np.float32))]
    nodes = []
    if computed:
        # pads in torch order (last axis first, begin/end pairs) -> ONNX order via the
        # exporter's Reshape/Slice(step -1)/Transpose/Reshape dance.
        p = np.asarray(pads).reshape(2, 4)  # [begins, ends] per ONNX axis order
        torch_pairs = np.stack([p[0][::-1], p[1][::-1]], axis=1).reshape(-1)[:4]
        inits += [_init("tp", torch_pairs.astype(np.int64)), _init("zshape", np.array([4], np.int64)),
                  _init("r1", np.array([-1, 2], np.int64)), _init("st", np.array([-1], np.int64)),
                  _init("en", np.array([-(2**63) + 1], np.int64)), _init("ax", np.array([0], np.int64)),
                  _init("sp", np.array([-1], np.int64)), _init("r2", np.array([-1], np.int64))]
        nodes += [
            helper.make_node("ConstantOfShape", ["zshape"], ["zeros"],
                             value=numpy_helper.from_array(np.zeros(1, np.int64))),
            helper.make_node("Concat", ["tp", "zeros"], ["all"], axis=0),
            helper.make_node("Reshape", ["all", "r1"], ["pairs"]),
            helper.make_node("Slice", ["pairs", "st", "en", "ax", "sp"], ["rev"]),
            helper.make_node("Transpose", ["rev"], ["tr"], perm=[1, 0]),
            helper.make_node("Reshape", ["tr", "r2"], ["pads"]),
        ]
    else:
        inits.append(_init("pads", np.asarray(pads, np.int64)))
    nodes += [
        helper.make_node("Pad", ["x", "pads", "cv"], ["xp"], mode=mode),
        helper.make_node("Conv", ["xp", "w"], ["y"], pads=list(conv_pads), strides=[2, 2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, "H", "W"])
    feed = {"x": RNG.normal(size=(2, 3, 9, 10)).astype(np.float32)}
    return _model(nodes, [x], [y], inits), feed


@pytest.mark.parametrize("computed", [False, True])
def test_zero_pad_folds_into_conv(computed):
    proto, feed = _pad_conv([0, 0, 1, 0, 0, 0, 2, 1], computed=computed)
    (expected,) = _run(proto, feed)
    fused, report = _preprocess(proto)
    assert _ops(fused) == ["Conv"]
    assert report.counts["pad_fused_into_conv"] == 1
    conv = fused.graph.node[0]
    pads = next(a for a in conv.attribute if a.name == "pads").ints
    assert list(pads) == [1, 1, 2, 2]  # Conv's own (0, 1, 0, 1) plus the Pad's spatial pads
    (got,) = _run(fused, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kw, why",
    [
        ({"value": 0.5}, "pads with 0.5"),
        ({"mode": "reflect"}, "mode is not constant"),
        ({"pads": [1, 0, 0, 0, 0, 0, 0, 0]}, "batch or channel axis"),
    ],
)
def test_pad_that_conv_cannot_express_stays(kw, why):
    args = {"pads": [0, 0, 1, 1, 0, 0, 1, 1], **kw}
    proto, feed = _pad_conv(**args)
    (expected,) = _run(proto, feed)
    kept, report = _preprocess(proto)
    assert _ops(kept) == ["Pad", "Conv"]
    assert any(why in reason for reason in report.skipped.values()), report.skipped
    (got,) = _run(kept, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _lcnet_block(next_pads):
    """PP-LCNet's pattern as paddle2onnx writes it: Conv -> Mul(c) -> Add(c) (BatchNorm in
    affine form), hard-swish x * Clip(x + 3, 0, 6) / 6, a learnable scalar scale and shift,
    then the next Conv (1x1 unpadded: the scale/shift fold into it; padded: they stay)."""
    c = 6
    inits = [
        _init("w", RNG.normal(size=(c, 3, 3, 3)).astype(np.float32)),
        _init("bn_s", RNG.uniform(0.5, 2, (1, c, 1, 1)).astype(np.float32)),
        _init("bn_b", RNG.normal(size=(1, c, 1, 1)).astype(np.float32)),
        _init("three", np.array(3.0, np.float32)), _init("zero", np.array(0.0, np.float32)),
        _init("six", np.array(6.0, np.float32)), _init("a", np.array(1.3, np.float32)),
        _init("b", np.array(-0.4, np.float32)),
        _init("w2", RNG.normal(size=(4, c, 1, 1) if not next_pads else (4, c, 3, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["bn_s", "c0"], ["c1"]),
        helper.make_node("Add", ["c1", "bn_b"], ["c2"]),
        helper.make_node("Add", ["c2", "three"], ["h0"]),
        helper.make_node("Clip", ["h0", "zero", "six"], ["h1"]),
        helper.make_node("Mul", ["c2", "h1"], ["h2"]),
        helper.make_node("Div", ["h2", "six"], ["h3"]),
        helper.make_node("Mul", ["a", "h3"], ["h4"]),
        helper.make_node("Add", ["h4", "b"], ["h5"]),
        helper.make_node("Conv", ["h5", "w2"], ["y"], pads=[next_pads] * 4),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])
    return _model(nodes, [x], [y], inits), {"x": RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)}


def test_affine_and_constant_scalings_fold_into_convs():
    proto, feed = _lcnet_block(next_pads=0)
    (expected,) = _run(proto, feed)
    folded, report = _preprocess(proto)
    # The BatchNorm-style Mul/Add went into the first Conv, /6 and *a merged and, with +b,
    # folded into the unpadded second Conv: only the hard-swish itself is left.
    assert _ops(folded) == ["Conv", "Add", "Clip", "Mul", "Conv"]
    assert report.counts["affine_folded_into_conv"] == 2
    assert report.counts["div_by_constant_to_mul"] == 1
    assert report.counts["constant_muls_merged"] == 1
    assert report.counts["affine_folded_into_next_conv"] == 2
    (got,) = _run(folded, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())


def test_scale_and_shift_before_a_padded_conv_stay():
    proto, feed = _lcnet_block(next_pads=1)
    (expected,) = _run(proto, feed)
    folded, report = _preprocess(proto)
    assert _ops(folded) == ["Conv", "Add", "Clip", "Mul", "Mul", "Add", "Conv"]
    assert any("pads its input" in r for r in report.skipped.values()), report.skipped
    (got,) = _run(folded, feed)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())
