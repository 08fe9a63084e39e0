"""qtool.eval.diagnose and qtool.eval.suggest on models converted by qtool itself: each
quantized tensor is compared with the float tensor it stands for (through BatchNorm, scale
and Relu/Clip folds), and suggestions are only those a re-conversion measured to help."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.data import Dataset, input_specs
from qtool.eval.diagnose import diagnose, recipe_snippet
from qtool.model import load
from qtool.pipeline.layers import matched_tensors

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "data" / "calib"
EVAL = ROOT / "examples" / "data" / "eval"
DIAG_SAMPLES = 96  # diagnosis reads the first 96 eval samples; the independent check the rest


def _int8(reference: Path, calib: Path, out: Path, exclude: tuple[str, ...] = ()) -> Path:
    """qtool convert REFERENCE -o OUT --data CALIB [--exclude ...], through the Python API."""
    recipe = qtool.load_recipe("int8-static").override("quantize", exclude=exclude)
    qtool.convert(reference, out, recipe, data=calib)
    return out


def _output_sqnr(reference: Path, candidate: Path, ids: range) -> float:
    import onnxruntime as ort

    data = Dataset(EVAL, input_specs(load(reference)))
    x = np.concatenate([data.load_sample(i)["input"] for i in ids])
    r, c = (ort.InferenceSession(str(p)).run(None, {"input": x})[0].astype(np.float64) for p in (reference, candidate))
    return 10 * math.log10(np.sum(r * r) / np.sum((r - c) ** 2))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diagnose")
    cand = _int8(DIGITS, CALIB, tmp / "int8.onnx")
    data = Dataset(EVAL, input_specs(load(DIGITS)))
    return {"tmp": tmp, "cand": cand, "diag": diagnose(cand, DIGITS, data, limit=DIAG_SAMPLES)}


def test_digits_layers_are_compared_after_their_folded_relu(digits):
    """The digits CNN's Relus are folded into the quantized Conv/Add outputs: the candidate's
    dequantized conv2 holds Relu(conv2). Against the reference's pre-Relu conv2 its SQNR is
    ~3 dB (what SQNR(x, Relu(x)) gives); against relu2, what it stands for, ~40 dB."""
    layers = {x["node"]: x for x in digits["diag"]["layers"]}
    assert layers["conv2"]["tensor"] == "relu2"
    assert layers["conv1"]["tensor"] == "relu1"  # through the BatchNorm fold (carries) and relu1
    assert layers["fc1_add"]["tensor"] == "relu4"
    quantized = [x for x in digits["diag"]["layers"] if x["quantized"]]
    assert len(quantized) >= 8
    for layer in quantized:
        assert layer["sqnr_db"] > 30, layer
        assert layer["local_sqnr_db"] > 30, layer


def test_digits_suggestions_are_measured_and_hold_on_unseen_samples(digits):
    diag = digits["diag"]
    assert len(diag["checks"]) == 5  # the five worst layers, each re-converted without it
    for check in diag["checks"]:
        assert check["gain_db"] == pytest.approx(check["sqnr_db"] - diag["baseline_sqnr_db"])
    assert diag["suggested"], diag["advice"]
    assert diag["suggested_gain_db"] > 0
    assert diag["exclude_flags"] == [f"--exclude {n}" for n in diag["suggested"]]
    assert "measured" in diag["advice"]
    # Independent of diagnosis's own calibration split: apply the suggestion as a user would
    # (the calib folder, not the eval data), and measure on eval samples diagnosis never read.
    fixed = _int8(DIGITS, CALIB, digits["tmp"] / "fixed.onnx", exclude=tuple(diag["suggested"]))
    unseen = range(DIAG_SAMPLES, 400)
    assert _output_sqnr(DIGITS, fixed, unseen) > _output_sqnr(DIGITS, digits["cand"], unseen)


def test_low_bit_suggestions_keep_layers_at_8_bits_and_hold_on_unseen_samples(tmp_path):
    cand = tmp_path / "int4.onnx"
    recipe = qtool.load_recipe("int4-weight-only").override("weight_only", block_size=32)
    qtool.convert(DIGITS, cand, recipe)
    diag = diagnose(cand, DIGITS, Dataset(EVAL, input_specs(load(DIGITS))), limit=48)
    assert diag["suggested"] and set(diag["suggested"]) <= {"fc1_matmul", "fc2_matmul"}
    assert diag["exclude_flags"] == [f"--keep-8bit {n}" for n in diag["suggested"]]
    assert diag["suggested_gain_db"] > 0 and "bits = 8" in diag["recipe_snippet"]
    fixed = tmp_path / "fixed.onnx"
    qtool.convert(DIGITS, fixed, recipe.override("weight_only", keep_8bit=tuple(diag["suggested"])))
    unseen = range(48, 400)
    assert _output_sqnr(DIGITS, fixed, unseen) > _output_sqnr(DIGITS, cand, unseen)


def _conv_clip_model(path: Path, rng) -> Path:
    """x -> Conv -> Clip(0, 6) -> Conv -> y: qtool folds the Clip into the first Conv's Q."""
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32) * 0.5
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
         helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="clip"),
         helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_folded_clip_is_matched_to_the_clip_output(tmp_path):
    rng = np.random.default_rng(5)
    ref = _conv_clip_model(tmp_path / "ref.onnx", rng)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        np.save(data / f"s{i}.npy", (rng.standard_normal((1, 3, 6, 6)) * 3).astype(np.float32))
    cand = _int8(ref, data, tmp_path / "q.onnx")
    cand_graph = onnx.load(cand).graph
    assert "Clip" not in {n.op_type for n in cand_graph.node}  # folded: the test's premise
    matched = matched_tensors(onnx.load(ref).graph, cand_graph)
    assert "c1" not in matched and matched["a1"] != "a1"  # a1: the dequantized, clipped c1
    diag = diagnose(cand, ref, Dataset(data, input_specs(load(ref))))
    layer = next(x for x in diag["layers"] if x["tensor"] == "a1")
    assert layer["node"] == "conv1" and layer["sqnr_db"] > 30


def test_suggestions_are_withheld_without_a_recipe_to_re_convert_with(tmp_path):
    """A candidate made by another tool records no qtool.recipe: nothing can be checked, so
    nothing is suggested (the ranking is still reported)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cand = tmp_path / "ort.onnx"
    quantize_dynamic(str(DIGITS), str(cand), weight_type=QuantType.QInt8)
    diag = diagnose(cand, DIGITS, Dataset(EVAL, input_specs(load(DIGITS))), limit=8)
    assert diag["layers"] and diag["suggested"] == [] and diag["exclude_flags"] == []
    assert diag["recipe_snippet"] == "" and "withheld" in diag["advice"]


def test_recipe_snippet_parses_as_layer_overrides():
    import tomllib

    from qtool.config import recipe_from_dict

    snippet = recipe_snippet(["fc2", 'odd"name'], 32)
    recipe = recipe_from_dict(tomllib.loads(snippet))
    assert recipe.bits_for("fc2", "MatMul", 8) == 32
    assert recipe.bits_for('odd"name', "MatMul", 8) == 32


def test_ir_roundtrip_keeps_carries_metadata(digits):
    """The candidate diagnosis reads records the BatchNorm fold (conv1 carries bn1)."""
    props = ir.load(digits["cand"]).metadata_props
    assert '"conv1": "bn1"' in props["qtool.carries"]


@pytest.mark.parametrize("scheme", ["int8-weights", "fp16-weights"])
def test_weight_storage_layers_are_diagnosed_as_quantized(tmp_path, scheme):
    """Int8 and float16 weight storage quantize a layer through a Cast of its narrow weight,
    not through Q/DQ: diagnosis must still see those layers (it said "no quantized layer")."""
    cand = tmp_path / f"{scheme}.onnx"
    qtool.convert(DIGITS, cand, scheme, guard=False)
    diag = diagnose(cand, DIGITS, Dataset(EVAL, input_specs(load(DIGITS))), limit=16, check=False)
    quantized = {x["node"] for x in diag["layers"] if x["quantized"]}
    assert quantized == {"conv1", "conv2", "conv3", "fc1_matmul", "fc2_matmul"}
    floor = 30 if scheme == "int8-weights" else 55  # float16 keeps ~11 bits of each weight
    assert all(x["local_sqnr_db"] > floor for x in diag["layers"] if x["quantized"])
