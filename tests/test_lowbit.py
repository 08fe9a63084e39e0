"""Weight-only low-bit quantization: packing, layouts, algorithms, the pass, streaming."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

from qtool import kernels
from qtool import model as qmodel
from qtool.config import LayerOverride, Recipe
from qtool.errors import UsageError
from qtool.passes.weight_only import apply_weight_only
from qtool.quant import blockwise, formats

# Tolerances, named once.
EXACT_DEQUANT_ATOL = 2e-5  # float32 GEMM of exact dequantized weights vs numpy
TWIN_ATOL = 1e-4  # MatMulNBits vs its DequantizeLinear twin, both at float accuracy

RNG = np.random.default_rng(1234)


def outlier_weight(rows=48, cols=256, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    mask = rng.random(w.shape) < 0.01
    w[mask] *= 25.0
    return w


def correlated_activations(rows: int, k: int, seed: int) -> np.ndarray:
    """Low-rank-plus-noise inputs with channel scales spread over two decades, like LLM activations."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k // 4)) @ rng.standard_normal((k // 4, k)) / np.sqrt(k / 4)
    x += 0.1 * rng.standard_normal((rows, k))
    return (x * np.geomspace(0.05, 5, k)).astype(np.float32)


def session(model_or_path, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:  # onnxruntime would fuse DequantizeLinear+MatMul into MatMulNBits at int8 accuracy
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def make_model(nodes, inits, inputs, opset=21, ms=False, ir_version=10) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    ops = [oh.make_opsetid("", opset)] + ([oh.make_opsetid("com.microsoft", 1)] if ms else [])
    m = oh.make_model(graph, opset_imports=ops)
    m.ir_version = ir_version
    return m


def packed_tensor(name: str, dtype: int, shape, packed: np.ndarray) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = dtype
    t.dims.extend(shape)
    t.raw_data = packed.tobytes()
    return t


# ---- packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 31, 67])
def test_pack_unpack_round_trip_every_width_and_odd_length(bits, n):
    codes = RNG.integers(0, 1 << bits, size=(5, n)).astype(np.uint8)
    packed = formats.pack_bits(codes, bits)
    assert packed.shape == (5, -(-n * bits // 8))
    np.testing.assert_array_equal(kernels.unpack_zero_points(packed, 5, n, bits), codes)
    for row in range(5):  # each row on its own, as a 1-D tensor of n codes
        np.testing.assert_array_equal(packed[row], formats.pack_bits(codes[row], bits))


def test_pack_order_is_low_bits_first_and_pads_with_zero():
    assert formats.pack_bits(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]
    assert formats.pack_bits(np.array([1, 2, 3, 0, 1], np.uint8), 2).tolist() == [0b00111001, 0b01]
    # signed codes pack as two's complement and unpack sign-extended
    s = np.array([-8, 7, -1], np.int8)
    packed = formats.pack_bits(s.view(np.uint8), 4)
    assert packed.tolist() == [0x78, 0x0F]
    np.testing.assert_array_equal(kernels.unpack(packed, 3, "s4"), s)


def random_block_quant(rows: int, cols: int, bits: int, block: int, symmetric: bool, seed: int):
    """Arbitrary codes, scales of both signs and (asymmetric) zero points: layouts must
    store any of them, not only what an algorithm happens to produce."""
    rng = np.random.default_rng(seed)
    nb = -(-cols // block)
    codes = rng.integers(0, 1 << bits, (rows, cols)).astype(np.uint8)
    scales = (rng.uniform(0.5, 2.0, (rows, nb)) * rng.choice([-1, 1], (rows, nb))).astype(np.float32)
    zp = None if symmetric else rng.integers(0, 1 << bits, (rows, nb)).astype(np.uint8)
    return formats.BlockQuant(codes, scales, zp, bits, block)


LAYOUT_CASES = [(bits, sym) for bits in (2, 3, 4, 8) for sym in (True, False)]


@pytest.mark.parametrize(("bits", "symmetric"), LAYOUT_CASES)
def test_matmulnbits_packing_round_trips_through_onnxruntime(bits, symmetric):
    # A = I: onnxruntime's MatMulNBits returns the weight it unpacked, W[K, N] = deq(bq)^T
    k, n, block = 67, 5, 16  # K not a block multiple: padded blocks
    bq = random_block_quant(n, k, bits, block, symmetric, seed=bits)
    t = formats.matmulnbits_tensors(bq)
    inits = [nh.from_array(t.b, "B"), nh.from_array(t.scales, "S")]
    if t.zero_points is not None:
        inits.append(nh.from_array(t.zero_points, "Z"))
    node = oh.make_node("MatMulNBits", ["A", "B", "S"] + (["Z"] if t.zero_points is not None else []), ["Y"],
                        domain="com.microsoft", K=k, N=n, bits=t.bits, block_size=block, accuracy_level=0)
    m = make_model([node], inits, [oh.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])], ms=True)
    got = session(m).run(None, {"A": np.eye(k, dtype=np.float32)})[0]
    np.testing.assert_allclose(got, bq.dequantize().T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("bits", "symmetric"), [c for c in LAYOUT_CASES if c[0] != 2])
def test_gather_block_quantized_packing_round_trips_through_onnxruntime(bits, symmetric):
    v, d, block = 7, 96, 32  # onnxruntime's GatherBlockQuantized takes 4- and 8-bit data
    bq = random_block_quant(v, d, bits, block, symmetric, seed=10 + bits)
    t = formats.gather_block_quantized_tensors(bq)
    inits = [nh.from_array(t.data, "D"), nh.from_array(t.scales, "S")]
    if t.zero_points is not None:
        inits.append(nh.from_array(t.zero_points, "Z"))
    node = oh.make_node("GatherBlockQuantized", ["D", "ids", "S"] + (["Z"] if t.zero_points is not None else []),
                        ["Y"], domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=t.bits)
    m = make_model([node], inits, [oh.make_tensor_value_info("ids", TensorProto.INT64, [v])], ms=True)
    ids = np.arange(v, dtype=np.int64)[::-1].copy()
    got = session(m).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, bq.dequantize()[ids])


@pytest.mark.parametrize(("bits", "symmetric"), [c for c in LAYOUT_CASES if c[0] != 8])
def test_blocked_dq_packing_round_trips_through_onnx_reference_and_onnxruntime(bits, symmetric):
    k, n, block = 67, 10, 16
    bq = random_block_quant(n, k, bits, block, symmetric, seed=20 + bits)
    t = formats.blocked_dq_tensors(bq)
    dtype = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
             (2, True): TensorProto.INT2, (2, False): TensorProto.UINT2}[(t.bits, t.signed)]
    inits = [packed_tensor("X", dtype, t.shape, t.packed), nh.from_array(t.scale, "S")]
    if t.zero_point_packed is not None:
        inits.append(packed_tensor("Z", dtype, t.scale.shape, t.zero_point_packed))
    node = oh.make_node("DequantizeLinear", [i.name for i in inits], ["Y"], axis=0, block_size=block)
    m = make_model([node], inits, [], opset=21 if t.bits == 4 else 25, ir_version=10 if t.bits == 4 else 13)
    want = bq.dequantize().T
    np.testing.assert_array_equal(ReferenceEvaluator(m).run(None, {})[0], want)
    np.testing.assert_array_equal(session(m, optimize=False).run(None, {})[0], want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [16, 67, 129])
def test_matmulnbits_layout_round_trip_and_padding(bits, k):
    block = 32
    w = RNG.standard_normal((9, k)).astype(np.float32)
    bq = blockwise.rtn(w, bits, block, symmetric=False)
    t = formats.matmulnbits_tensors(bq)
    nb = -(-k // block)
    assert t.b.shape == (9, nb, block * t.bits // 8)
    np.testing.assert_array_equal(kernels.unpack_matmulnbits(t.b, k, t.bits, block), bq.codes)
    # padded K positions hold the block's zero point, so they dequantize to exactly 0
    full = kernels.unpack_zero_points(t.b.reshape(9, -1), 9, nb * block, t.bits)
    zp = kernels.unpack_zero_points(t.zero_points, 9, nb, t.bits)
    assert (full[:, k:] == zp[:, -1:]).all()
    assert t.zero_points.shape == (9, -(-nb * t.bits // 8))


def test_rtn_rounds_half_to_even():
    # symmetric 4-bit: the extreme -8 -> scale exactly 1; 2.5 -> 2, 3.5 -> 4, -0.5 -> 0, 0.5 -> 0
    w = np.array([[-8.0, 2.5, 3.5, -0.5, 0.5, 1.5] + [0.0] * 10], np.float32)
    bq = blockwise.rtn(w, 4, 16, symmetric=True)
    assert bq.scales[0, 0] == 1.0
    assert (bq.codes[0, :6].astype(int) - 8).tolist() == [-8, 2, 4, 0, 0, 2]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_uses_every_level_and_hits_the_extreme_exactly(bits):
    # the largest-magnitude value (here positive) lands on code 0 via a negative scale
    w = np.linspace(-0.9, 1.0, 64, dtype=np.float32)[None, :]
    bq = blockwise.rtn(w, bits, 64, symmetric=True)
    assert bq.scales[0, 0] < 0
    assert bq.dequantize()[0, -1] == pytest.approx(1.0, abs=1e-6)
    assert bq.codes.min() == 0
    if bits < 8:  # -0.9 is beyond the last level for 2-4 bits: the top code is used too
        assert bq.codes.max() == (1 << bits) - 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_native_and_numpy_paths_give_identical_codes(symmetric):
    w = outlier_weight(rows=40, cols=200, seed=4)
    results = []
    for backend in ("native", "numpy") if kernels.native_available() else ("numpy",):
        with kernels.use_backend(backend):
            for method in ("rtn", "mse"):
                for k_axis, arr in ((0, np.ascontiguousarray(w.T)), (1, w)):
                    bq, sse = blockwise.quantize_slabs(arr, 4, 32, symmetric, method, k_axis=k_axis, chunk=32 if k_axis == 0 else 7)
                    ref = (blockwise.rtn if method == "rtn" else blockwise.mse)(w, 4, 32, symmetric)
                    np.testing.assert_array_equal(bq.codes, ref.codes)
                    np.testing.assert_array_equal(bq.scales, ref.scales)
                    assert sse == pytest.approx(float(((ref.dequantize() - w) ** 2).sum()), rel=1e-4)
                    results.append(formats.matmulnbits_tensors(bq).b)
    assert all((r == results[i % 4]).all() for i, r in enumerate(results))


# ---- ONNX semantics ---------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "symmetric", "opset"), [(4, True, 21), (4, False, 21), (2, True, 25), (2, False, 25), (3, True, 21)])
def test_blocked_dq_packing_matches_onnx_reference(bits, symmetric, opset):
    k, n, block = 67, 10, 16  # odd K: the last block is short
    w = RNG.standard_normal((k, n)).astype(np.float32)
    bq = blockwise.rtn(w.T, bits, block, symmetric)
    t = formats.blocked_dq_tensors(bq)
    dtype = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (2, True): TensorProto.INT2, (2, False): TensorProto.UINT2}[
        (t.bits, t.signed)
    ]
    inits = [packed_tensor("X", dtype, t.shape, t.packed), nh.from_array(t.scale, "S")]
    ins = ["X", "S"]
    if t.zero_point_packed is not None:
        inits.append(packed_tensor("Z", dtype, t.scale.shape, t.zero_point_packed))
        ins.append("Z")
    node = oh.make_node("DequantizeLinear", ins, ["Y"], axis=0, block_size=block)
    m = make_model([node], inits, [], opset=opset, ir_version=13 if opset == 25 else 10)
    got = ReferenceEvaluator(m).run(None, {})[0]
    np.testing.assert_array_equal(got, bq.dequantize().T)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (2, False), (8, True)])
def test_matmulnbits_and_its_dq_twin_agree_on_onnxruntime(bits, symmetric, tmp_path):
    k, n = 100, 24  # K not a multiple of the block: padding is exercised
    w = RNG.standard_normal((k, n)).astype(np.float32)
    a = RNG.standard_normal((3, k)).astype(np.float32)
    src = tmp_path / "m.onnx"
    m = make_model([oh.make_node("MatMul", ["A", "W"], ["Y"])], [nh.from_array(w, "W")],
                   [oh.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])], opset=21 if bits != 2 else 25,
                   ir_version=10 if bits != 2 else 13)
    onnx.save(m, src)
    outs = {}
    for fmt in ("matmulnbits", "qdq"):
        recipe = Recipe().override("weight_only", format=fmt, block_size=32, symmetric=symmetric, accuracy_level=0)
        model = qmodel.load(src)
        report = apply_weight_only(model, recipe, bits)
        assert sum(report.counts.values()) == 1
        dst = tmp_path / f"{fmt}.onnx"
        qmodel.save(model, dst, input_path=src)
        ops = [node.op_type for node in onnx.load(dst).graph.node]
        assert ("MatMulNBits" in ops) == (fmt == "matmulnbits")
        outs[fmt] = session(dst, optimize=fmt == "matmulnbits").run(None, {"A": a})[0]
    expect = a @ blockwise.rtn(w.T, bits, 32, symmetric).dequantize().T
    scale = np.abs(expect).max()
    np.testing.assert_allclose(outs["matmulnbits"], expect, atol=EXACT_DEQUANT_ATOL * scale)
    np.testing.assert_allclose(outs["matmulnbits"], outs["qdq"], atol=TWIN_ATOL * scale)


def test_matmulnbits_default_zero_point_is_2_pow_bits_minus_1():
    # symmetric weights carry no zero_points input; onnxruntime must assume 8 (4-bit)
    k, n = 32, 4
    w = RNG.standard_normal((k, n)).astype(np.float32)
    bq = blockwise.rtn(w.T, 4, 32, symmetric=True)
    t = formats.matmulnbits_tensors(bq)
    assert t.zero_points is None
    node = oh.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=32, accuracy_level=0)
    m = make_model([node], [nh.from_array(t.b, "B"), nh.from_array(t.scales, "S")],
                   [oh.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])], ms=True)
    a = np.eye(1, k, dtype=np.float32)
    got = session(m).run(None, {"A": a})[0]
    np.testing.assert_allclose(got, a @ bq.dequantize().T, atol=1e-6)


# ---- algorithms ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("algorithm", ["mse", "hqq"])
def test_data_free_algorithms_beat_rtn_on_outliers(algorithm, bits):
    w = outlier_weight()
    for symmetric in (True, False):
        out = blockwise.quantize_weight(w, bits, 32, symmetric, algorithm)
        assert out.weight_mse < 0.99 * out.rtn_weight_mse, (symmetric, out.weight_mse / out.rtn_weight_mse)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_data_aware_algorithms_beat_rtn_output_error(algorithm):
    w = outlier_weight(rows=32, cols=128)
    x = correlated_activations(512, 128, seed=5)
    stats = blockwise.ActivationStats.from_activations(x)
    out = blockwise.quantize_weight(w, 4, 32, True, algorithm, stats)
    assert out.output_error < 0.95 * out.rtn_output_error
    # the output error is what it says: || X W^T - X W_hat^T ||^2 / || X W^T ||^2
    w_hat = out.bq.dequantize() * (out.input_scale[None, :] if out.input_scale is not None else 1)
    direct = np.sum((x @ (w - w_hat).T) ** 2) / np.sum((x @ w.T) ** 2)
    assert direct == pytest.approx(out.output_error, rel=1e-3)


def test_gptq_without_act_order_and_asymmetric_run_and_beat_rtn():
    w = outlier_weight(rows=16, cols=96, seed=3)
    x = np.random.default_rng(2).standard_normal((300, 96)).astype(np.float32)
    x[:, :8] *= 10
    h = blockwise.ActivationStats.from_activations(x).hessian
    for kw in ({"act_order": False}, {"symmetric": False}):
        bq = blockwise.gptq(w, 4, 32, h, **kw)
        sym = kw.get("symmetric", True)
        assert blockwise.output_error(w, bq.dequantize(), h) < blockwise.output_error(w, blockwise.rtn(w, 4, 32, sym).dequantize(), h)


# ---- the pass ----------------------------------------------------------------------------


def _lm_like(tmp_path, opset=21):
    """Gather(embedding) -> MatMul + Add(bias) -> Gemm(transB, alpha) head."""
    rng = np.random.default_rng(7)
    v, d, n, o = 40, 64, 48, 20
    inits = {
        "E": rng.standard_normal((v, d)).astype(np.float32),
        "W": rng.standard_normal((d, n)).astype(np.float32) * 0.1,
        "b": rng.standard_normal(n).astype(np.float32),
        "G": rng.standard_normal((o, n)).astype(np.float32) * 0.1,
        "c": rng.standard_normal(o).astype(np.float32),
    }
    nodes = [
        oh.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
        oh.make_node("MatMul", ["x", "W"], ["y0"], name="proj"),
        oh.make_node("Add", ["y0", "b"], ["y1"], name="proj_add"),
        oh.make_node("Gemm", ["y1", "G", "c"], ["Y"], transB=1, alpha=0.5, name="lm_head"),
    ]
    m = make_model(nodes, [nh.from_array(a, k) for k, a in inits.items()],
                   [oh.make_tensor_value_info("ids", TensorProto.INT64, [6])], opset=opset)
    path = tmp_path / "lm.onnx"
    onnx.save(m, path)
    return path, inits


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_pass_converts_gather_matmul_bias_and_gemm_exactly(fmt, tmp_path):
    path, w = _lm_like(tmp_path)
    before = path.read_bytes()
    recipe = Recipe().override("weight_only", format=fmt, block_size=32, accuracy_level=0, algorithm="rtn")
    model = qmodel.load(path)
    seen = []
    report = apply_weight_only(model, recipe, 4, on_progress=lambda d, t: seen.append((d, t)))
    dst = tmp_path / "q.onnx"
    qmodel.save(model, dst, input_path=path)
    assert path.read_bytes() == before  # input never modified
    assert seen[-1][0] == seen[-1][1] == sum(a.nbytes for k, a in w.items() if k in "EWG")
    ops = [n.op_type for n in onnx.load(dst).graph.node]
    if fmt == "matmulnbits":
        assert sorted(ops) == ["GatherBlockQuantized", "MatMulNBits", "MatMulNBits"]  # Add folded
        assert report.counts["bias Add folded into MatMulNBits"] == 1
    else:
        assert ops.count("DequantizeLinear") == 3 and "MatMulNBits" not in ops
    assert not {"E", "W", "G"} & {i.name for i in onnx.load(dst).graph.initializer}
    ids = np.array([0, 5, 39, 7, 7, 12], np.int64)
    def deq(a):
        return blockwise.rtn(a, 4, 32, True).dequantize()
    x = deq(w["E"])[ids]
    y1 = x @ deq(w["W"].T).T + w["b"]
    expect = y1 @ deq(0.5 * w["G"]).T + w["c"]
    got = session(dst, optimize=fmt == "matmulnbits").run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, expect, atol=1e-4 * np.abs(expect).max())


def test_keep_8bit_and_layer_overrides(tmp_path):
    path, _ = _lm_like(tmp_path)
    recipe = Recipe().override("weight_only", keep_8bit=("lm_*",), block_size=32)
    recipe = Recipe(weight_only=recipe.weight_only, layer=(LayerOverride("proj", 32),))
    model = qmodel.load(path)
    report = apply_weight_only(model, recipe, 4)
    assert report.counts == {"Gather -> GatherBlockQuantized (4-bit)": 1, "Gemm -> MatMulNBits (8-bit)": 1}
    assert "proj" in report.skipped
    bits = {n.name: n.attributes["bits"].value for n in model.graph if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert bits == {"lm_head_q": 8, "embed_q": 4}


def test_slow_accuracy_level_is_noted(tmp_path):
    path, _ = _lm_like(tmp_path)
    for level, noted in ((0, True), (4, False)):
        report = apply_weight_only(qmodel.load(path), Recipe().override("weight_only", accuracy_level=level, block_size=32), 4)
        assert any("accuracy_level" in n for n in report.notes) == noted


def test_gptq_through_the_pass_uses_activations(tmp_path):
    k, n = 128, 32
    w = outlier_weight(rows=n, cols=k, seed=9).T.copy()
    path = tmp_path / "mm.onnx"
    onnx.save(make_model([oh.make_node("MatMul", ["A", "W"], ["Y"])], [nh.from_array(w, "W")],
                         [oh.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])]), path)
    x = correlated_activations(256, k, seed=12)
    ref = x @ w
    errs = {}
    for alg in ("rtn", "gptq", "awq"):
        model = qmodel.load(path)
        report = apply_weight_only(model, Recipe().override("weight_only", algorithm=alg, block_size=32, accuracy_level=0), 4,
                                   activations={"A": x} if alg != "rtn" else None)
        dst = tmp_path / f"{alg}.onnx"
        qmodel.save(model, dst, input_path=path)
        errs[alg] = float(np.sum((session(dst).run(None, {"A": x})[0] - ref) ** 2))
        if alg != "rtn":
            assert any("output error" in note for note in report.notes)
    assert errs["gptq"] < 0.95 * errs["rtn"] and errs["awq"] < errs["rtn"]


def test_user_mistakes_raise_usage_errors(tmp_path):
    path, _ = _lm_like(tmp_path)
    with pytest.raises(UsageError, match="--bits"):
        apply_weight_only(qmodel.load(path), Recipe(), 5)
    with pytest.raises(UsageError, match="block size"):
        apply_weight_only(qmodel.load(path), Recipe().override("weight_only", block_size=48), 4)
    with pytest.raises(UsageError, match="calibration activations") as exc:
        apply_weight_only(qmodel.load(path), Recipe().override("weight_only", algorithm="gptq"), 4)
    assert "--data" in exc.value.hint
    with pytest.raises(UsageError, match="opset 25") as exc:  # int2 DQ needs opset 25; never upgraded silently
        apply_weight_only(qmodel.load(path), Recipe().override("weight_only", format="qdq", block_size=32), 2)
    assert "--allow-opset-upgrade" in exc.value.hint


# ---- streaming -------------------------------------------------------------------------------

_STREAM_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from qtool import model as qmodel
    from qtool.config import Recipe
    from qtool.passes.weight_only import apply_weight_only
    src, dst = sys.argv[1], sys.argv[2]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = qmodel.load(src)
    apply_weight_only(model, Recipe().override("weight_only", block_size=32), 4)
    qmodel.save(model, dst, input_path=src)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(base * 1024, peak * 1024)
    """
)


def test_external_data_model_converts_with_bounded_memory(tmp_path):
    layers, k, n = 8, 1024, 6144  # 8 x 24 MiB = 192 MiB of fp32 weights in external data
    nodes, inits = [], []
    rng = np.random.default_rng(0)
    prev = "A"
    for i in range(layers):
        w = rng.standard_normal((k, n), dtype=np.float32)
        inits.append(nh.from_array(w, f"W{i}"))
        nodes.append(oh.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        nodes.append(oh.make_node("Slice", [f"h{i}", "st", "en", "ax"], [f"s{i}" if i < layers - 1 else "Y"]))
        prev = f"s{i}"
    inits += [nh.from_array(np.array([v], np.int64), x) for x, v in (("st", 0), ("en", k), ("ax", 1))]
    m = make_model(nodes, inits, [oh.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])])
    src = tmp_path / "big.onnx"
    onnx.save(m, src, save_as_external_data=True, location="big.onnx.data")
    model_bytes = layers * k * n * 4
    out = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(src), str(tmp_path / "q.onnx")],
                         check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    base, peak = map(int, out.stdout.split())
    # Whole-model loading would add >= 192 MiB; streaming holds ~2 weights in flight + 1/8 output.
    assert peak - base < 0.5 * model_bytes, f"conversion added {(peak - base) / 2**20:.0f} MiB"
    q = session(tmp_path / "q.onnx")
    a = rng.standard_normal((1, k), dtype=np.float32)
    assert q.run(None, {"A": a})[0].shape == (1, k)
    # The CLI writes the output of a model with external data as external data too (inline,
    # the whole output protobuf would be built in memory).
    from qtool.cli import run

    assert run(["convert", str(src), "-o", str(tmp_path / "cli.onnx"), "--bits", "4", "-q"]) == 0
    assert (tmp_path / "cli.onnx.data").stat().st_size > (tmp_path / "cli.onnx").stat().st_size
    assert session(tmp_path / "cli.onnx").run(None, {"A": a})[0].shape == (1, k)


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_convert_bits4_writes_matmulnbits_and_reports_errors(tmp_path, capsys):
    from qtool.cli import run

    path, _ = _lm_like(tmp_path)
    out = tmp_path / "q4.onnx"
    code = run(["convert", str(path), "-o", str(out), "--bits", "4",
               "--block-size", "32", "--algorithm", "hqq", "--keep-8bit", "lm_*", "--json"])
    assert code == 0, capsys.readouterr().err
    ops = sorted(n.op_type for n in onnx.load(out).graph.node)
    assert ops == ["GatherBlockQuantized", "MatMulNBits", "MatMulNBits"]
    report = capsys.readouterr().out
    assert "hqq: weight MSE" in report and "8-bit" in report
    # a user mistake is one error line and a hint, exit 2, nothing written
    bad = tmp_path / "bad.onnx"
    assert run(["convert", str(path), "-o", str(bad), "--bits", "4", "--block-size", "48"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "hint:" in err and "Traceback" not in err and not bad.exists()


def test_gather_whose_width_the_block_does_not_divide_uses_a_smaller_block(tmp_path):
    rng = np.random.default_rng(3)
    e = rng.standard_normal((30, 96)).astype(np.float32)  # 96 = 3 x 32: blocks of 64/128 do not fit
    path = tmp_path / "emb.onnx"
    onnx.save(make_model([oh.make_node("Gather", ["E", "ids"], ["Y"], name="embed")], [nh.from_array(e, "E")],
                         [oh.make_tensor_value_info("ids", TensorProto.INT64, [4])]), path)
    model = qmodel.load(path)
    report = apply_weight_only(model, Recipe().override("weight_only", block_size=128), 4)
    assert any("blocks of 32" in n for n in report.notes)
    dst = tmp_path / "q.onnx"
    qmodel.save(model, dst, input_path=path)
    ids = np.array([0, 29, 3, 3], np.int64)
    expect = blockwise.rtn(e, 4, 32, True).dequantize()[ids]
    np.testing.assert_allclose(session(dst).run(None, {"ids": ids})[0], expect, atol=1e-6)


# ---- Conv weights: blocked DequantizeLinear along the input channels -------------------------

# Output SQNR (dB) of one Conv with N(0, 1) weights in blocks of 32, vs float: about 6 dB per
# bit minus the block-extreme overhead; measured 47.7 / 22.3 / 10.2 (symmetric), floors below.
CONV_MIN_SQNR = {8: 40.0, 4: 18.0, 2: 7.0}


def _conv_model(tmp_path, opset=21, c=48, with_flatten=False):
    """x[1, c, 6, 6] -> Conv(16 x c x 3x3, bias) -> depthwise Conv (16 groups) [-> Flatten]."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((16, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    nodes = [
        oh.make_node("Conv", ["X", "W", "B"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["c1", "DW"], ["Y" if not with_flatten else "c2"], name="depthwise", group=16),
    ]
    if with_flatten:
        nodes.append(oh.make_node("Flatten", ["c2"], ["Y"], name="flatten"))
    m = make_model(nodes, [nh.from_array(w, "W"), nh.from_array(b, "B"), nh.from_array(dw, "DW")],
                   [oh.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, 6, 6])], opset=opset,
                   ir_version=13 if opset >= 25 else 10 if opset >= 21 else 8)
    path = tmp_path / f"conv{opset}.onnx"
    onnx.save(m, path)
    return path, w, b, dw


def _float_conv(w, b, dw, x):
    nodes = [oh.make_node("Conv", ["X", "W", "B"], ["c1"], pads=[1, 1, 1, 1]),
             oh.make_node("Conv", ["c1", "DW"], ["Y"], group=16)]
    m = make_model(nodes, [nh.from_array(w, "W"), nh.from_array(b, "B"), nh.from_array(dw, "DW")],
                   [oh.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))], opset=17, ir_version=8)
    return session(m).run(None, {"X": x})[0]


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (4, True), (4, False), (2, True), (2, False)])
def test_conv_weight_becomes_blocked_dq_of_input_channel_blocks(bits, symmetric, tmp_path):
    """48 input channels in blocks of 32: the second block is short (16), as the spec allows."""
    opset = 25 if bits == 2 else 21
    path, w, b, dw = _conv_model(tmp_path, opset)
    model = qmodel.load(path)
    recipe = Recipe().override("weight_only", block_size=32, symmetric=symmetric)
    for fmt in ("matmulnbits", "qdq"):  # Conv has one form whatever the MatMul format
        model = qmodel.load(path)
        report = apply_weight_only(model, recipe.override("weight_only", format=fmt), bits)
        assert report.counts == {f"Conv -> DequantizeLinear ({bits}-bit)": 1}
        assert "fewer than one block" in report.skipped["depthwise"]  # C/g = 1
    dst = tmp_path / "q.onnx"
    qmodel.save(model, dst, input_path=path)
    saved = onnx.load(dst)
    assert [n.op_type for n in saved.graph.node] == ["DequantizeLinear", "Conv", "Conv"]
    dq = saved.graph.node[0]
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": 32}
    inits = {t.name: t for t in saved.graph.initializer}
    x_q, scale = inits[dq.input[0]], inits[dq.input[1]]
    assert list(x_q.dims) == [16, 48, 3, 3] and list(scale.dims) == [16, 2, 3, 3]
    want_type = {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2}[bits]
    assert x_q.data_type == (want_type if symmetric else {8: TensorProto.UINT8, 4: TensorProto.UINT4,
                                                           2: TensorProto.UINT2}[bits])
    assert "W" not in inits  # the float weight is gone
    # Exactly the reference blocks: rows (output channel, kernel position), blocks along C.
    rows = np.moveaxis(w, 1, -1).reshape(-1, 48)
    w_hat = np.moveaxis(blockwise.rtn(rows, bits, 32, symmetric).dequantize().reshape(16, 3, 3, 48), -1, 1)
    x = RNG.standard_normal((1, 48, 6, 6)).astype(np.float32)
    got = session(dst).run(None, {"X": x})[0]
    expect = _float_conv(w_hat, b, dw, x)
    np.testing.assert_allclose(got, expect, atol=EXACT_DEQUANT_ATOL * np.abs(expect).max())
    ref = _float_conv(w, b, dw, x)
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) > CONV_MIN_SQNR[bits]


def test_conv_below_opset_21_stays_float_unless_the_upgrade_is_allowed(tmp_path):
    from qtool.config import load_recipe
    from qtool.pipeline import convert_model

    path, *_ = _conv_model(tmp_path, opset=17, with_flatten=True)  # Flatten changed in opset 21
    report = apply_weight_only(qmodel.load(path), Recipe(), 4)
    assert not report.counts and "--allow-opset-upgrade" in report.skipped["conv"]
    recipe = load_recipe("int4-weight-only").override("quantize", allow_opset_upgrade=True)
    out, reports, _ = convert_model(qmodel.load(path), recipe)
    assert out.opset_imports[""] == 21 and reports[0].counts == {"opset 17 -> 21": 1}  # onnx's converter
    assert [n.op_type for n in out.graph] == ["DequantizeLinear", "Conv", "Conv", "Flatten"]
    x = RNG.standard_normal((1, 48, 6, 6)).astype(np.float32)
    ref = session(str(path)).run(None, {"X": x})[0]
    got = session(ir.to_proto(out)).run(None, {"X": x})[0]
    assert got.shape == ref.shape == (1, 16 * 4 * 4)
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) > CONV_MIN_SQNR[4]
