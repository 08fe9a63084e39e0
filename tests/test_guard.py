"""The guard of `qtool convert --data`: measured on held-out samples, repaired, or exit 3.

Every model here is a few nodes built in code and stands for a class of real models:
a detector head that concatenates boxes in pixels with class probabilities, a layer whose
input has one outlier channel, and a floor no candidate can meet.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qtool.cli import run
from qtool.pipeline.measure import OutputAccumulator, channel_axis

RNG = np.random.default_rng(5)


def _save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def _data(folder, shape, n=40, scale=1.0):
    folder.mkdir()
    for i in range(n):
        np.save(folder / f"s{i}.npy", (RNG.standard_normal(shape) * scale).astype(np.float32))
    return str(folder)


def _detector_head(path):
    """x[N,64,128] (64 anchors) -> trunk -> box branch (x640: pixels) and class branch
    (Sigmoid), concatenated on the last axis: y[N, 64, 4+6], as YOLO heads write their output."""
    w0 = (RNG.standard_normal((128, 128)) * 0.1).astype(np.float32)
    wb = (RNG.standard_normal((128, 4)) * 0.15).astype(np.float32)
    wc = (RNG.standard_normal((128, 6)) * 0.25).astype(np.float32)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(wb, "wb"),
             numpy_helper.from_array(wc, "wc"), numpy_helper.from_array(np.array(640.0, np.float32), "px")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["t0"], name="trunk"),
         helper.make_node("Relu", ["t0"], ["t"], name="trunk_relu"),
         helper.make_node("MatMul", ["t", "wb"], ["b0"], name="box_fc"),
         helper.make_node("Sigmoid", ["b0"], ["b1"], name="box_sigmoid"),
         helper.make_node("Mul", ["b1", "px"], ["boxes"], name="box_pixels"),
         helper.make_node("MatMul", ["t", "wc"], ["c0"], name="cls_fc"),
         helper.make_node("Sigmoid", ["c0"], ["scores"], name="cls_sigmoid"),
         helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=2, name="head_concat")],
        "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 10])], inits)
    return _save(graph, path)


def _outlier_mlp(path):
    """x[N,32] -> fc0 -> Relu -> fc1 -> Relu -> fc2, where fc2's input has one channel 1000x
    the others: one int8 scale for it leaves the other 255 channels a handful of levels."""
    w0 = (RNG.standard_normal((32, 256)) * 0.3).astype(np.float32)
    w1 = (RNG.standard_normal((256, 256)) * 0.1).astype(np.float32)
    w1[:, 0] = np.abs(w1[:, 0]) * 2000.0  # channel 0 of fc1's output is huge
    w2 = (RNG.standard_normal((256, 10)) * 0.1).astype(np.float32)
    w2[0, :] = 0.0  # and carries nothing to the output: everything fc2 says comes from the rest
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(w2, "w2")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
         helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
         helper.make_node("MatMul", ["r0", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return _save(graph, path)


def _convert(model, out, *flags):
    code = run(["convert", model, "-o", str(out), "--json", "-q", *flags])
    return code


def _report(capsys):
    return json.loads(capsys.readouterr().out)


def test_segments_split_a_concatenated_head_by_magnitude():
    acc = OutputAccumulator("y")
    ref = np.concatenate([RNG.uniform(0, 640, (2, 4, 16)), RNG.uniform(0, 1, (2, 6, 16))], axis=1)
    noisy = ref.copy()
    noisy[:, 4:] = RNG.uniform(0, 1, (2, 6, 16))  # class rows replaced by noise
    acc.add(ref, noisy)
    result = acc.result()
    assert channel_axis(ref.shape) == 1
    assert result.sqnr_db > 25  # the whole tensor looks fine: boxes dominate it
    assert result.segment_sqnr_db < 5  # the class-score group alone is ruined
    assert [s["channels"] for s in result.segments] == [4, 6]


def test_guard_protects_the_class_branch_of_a_concatenated_head(tmp_path, capsys):
    model = _detector_head(tmp_path / "head.onnx")
    data = _data(tmp_path / "d", (64, 128), scale=2.0)
    out = tmp_path / "q.onnx"
    assert _convert(model, out, "--data", data, "--scheme", "int8-static") == 0
    report = _report(capsys)
    chosen = next(a for a in report["guard"]["attempts"] if a["label"] == report["guard"]["chosen"])
    assert chosen["meets_floor"] and chosen["outputs"][0]["segment_sqnr_db"] >= 15
    # Checked independently: the class rows of the written model against float.
    x = np.stack([np.load(f"{data}/s{i}.npy") for i in range(4, 40, 5)])
    ref = ort.InferenceSession(model).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    cls_err = np.sum((ref[..., 4:] - got[..., 4:]) ** 2) / np.sum(ref[..., 4:] ** 2)
    assert 10 * np.log10(1 / cls_err) >= 15


def test_guard_repairs_by_keeping_the_costly_layer_float(tmp_path, capsys):
    model = _outlier_mlp(tmp_path / "mlp.onnx")
    data = _data(tmp_path / "d", (32,))
    out = tmp_path / "q.onnx"
    assert _convert(model, out, "--data", data, "--scheme", "int8-static") == 0
    guard = _report(capsys)["guard"]
    first, last = guard["attempts"][0], guard["attempts"][-1]
    assert not first["meets_floor"] and first["shortfalls"]  # plain static int8 misses the floor
    assert last["meets_floor"] and "fc2" in last["excluded"]  # the repair kept the head float
    assert "fc0" not in last["excluded"]  # and only as much of it as it had to
    assert guard["chosen"] == last["label"] and "kept float" in last["label"]
    assert out.exists()


def test_a_floor_nothing_meets_exits_3_and_writes_only_when_asked(tmp_path, capsys):
    model = _outlier_mlp(tmp_path / "mlp.onnx")
    data = _data(tmp_path / "d", (32,))
    out = tmp_path / "q.onnx"
    assert _convert(model, out, "--data", data, "--min-sqnr", "200") == 3
    report = _report(capsys)
    assert not report["passed"] and "below the floor" in report["failure"]
    assert len(report["guard"]["attempts"]) >= 2 and not out.exists()
    assert _convert(model, out, "--data", data, "--min-sqnr", "200", "--write-best") == 3
    assert out.exists() and _report(capsys)["output"] == str(out)


def test_auto_prefers_dynamic_on_a_transformer_and_static_on_a_cnn(tmp_path):
    from qtool.config import load_recipe
    from qtool.model import load
    from qtool.pipeline.auto import base_candidates

    mlp = load(_outlier_mlp(tmp_path / "mlp.onnx"))
    assert [label for label, *_ in base_candidates(load_recipe("int8-static"), mlp, auto=True)] == [
        "int8-static", "int8-dynamic"]
    assert [label for label, *_ in base_candidates(load_recipe("int8-static"), mlp, auto=False)] == [
        "int8-static"]


def _old_opset_conv(path):
    """An opset-11 Conv (old exports often are): per-channel int8 weights need opset 13."""
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [numpy_helper.from_array(w, "w")])
    return _save(graph, path, opset=11)


def test_auto_raises_an_old_opset_for_per_channel_weights_and_falls_back_when_it_cannot(
        tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from qtool.config import load_recipe
    from qtool.model import iter_nodes, load
    from qtool.pipeline.auto import Guard, base_candidates
    from qtool.pipeline.guard import Floor
    from qtool.pipeline.progress import no_progress

    model = _old_opset_conv(tmp_path / "old.onnx")
    data = _data(tmp_path / "d", (4, 16, 16))
    raised, kept = "int8-static (opset 11 -> 13 for per-channel weights)", "int8-static (per-tensor weights: opset 11 < 13)"
    recipe = load_recipe("int8-static")
    candidates = base_candidates(recipe, load(model), auto=True)
    assert [(label, fallback) for label, _, fallback in candidates] == [
        (raised, False), (kept, True), ("int8-dynamic", False)]
    guard = Guard(load(model), Path(model), recipe, data, None, Floor(), 60.0, no_progress)
    attempt, converted = guard.attempt(raised, candidates[0][1])
    assert attempt.error is None and converted.model.opset_imports[""] == 13
    dq = next(n for n in iter_nodes(converted.model) if n.op_type == "DequantizeLinear"
              and n.inputs[0].const_value is not None)
    assert dq.inputs[1].const_value.numpy().shape == (8,)  # one scale per output channel
    assert onnx.load(model).opset_import[0].version == 11  # the input is untouched

    from qtool.errors import ConversionError

    def cannot(*_):
        raise ConversionError("could not convert the model from opset 11 to 13: test", "hint")

    monkeypatch.setattr("qtool.pipeline.steps.upgrade_opset", cannot)
    assert _convert(model, tmp_path / "q.onnx", "--data", data) == 0
    attempts = _report(capsys)["guard"]["attempts"]
    assert [a["label"] for a in attempts[:2]] == [raised, kept]
    assert "opset 11 to 13" in attempts[0]["error"] and attempts[1]["error"] is None


def test_guard_flags_that_cannot_apply_are_errors(tmp_path, capsys):
    model = _outlier_mlp(tmp_path / "mlp.onnx")
    data = _data(tmp_path / "d", (32,))
    cases = [
        (["--data", data, "--no-guard", "--min-sqnr", "20"], "cannot apply with --no-guard"),
        (["--dynamic", "--min-sqnr", "20"], "cannot apply with no --data"),
        (["--data", data, "--dynamic", "--scheme", "auto"], "--scheme auto chooses the scheme itself"),
        (["--data", data, "--scheme", "int9"], "is not a scheme"),
    ]
    for flags, message in cases:
        assert run(["convert", model, "-o", str(tmp_path / "x.onnx"), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_auto_on_an_old_opset_measures_an_upgrade_and_no_guard_keeps_it_per_tensor(tmp_path, capsys):
    """Opset 11/12 models (Paddle and older exporters) cannot hold per-channel Q/DQ. The
    guard raises the opset of its static candidate (it measures against the original float
    model); without the guard, auto never upgrades unasked and takes per-tensor weights."""
    proto = onnx.load(_outlier_mlp(tmp_path / "mlp.onnx"))
    proto.opset_import[0].version = 11
    old = tmp_path / "old.onnx"
    onnx.save(proto, old)
    data = _data(tmp_path / "d", (32,))
    code = _convert(str(old), tmp_path / "q.onnx", "--data", data)
    labels = [a["label"] for a in _report(capsys)["guard"]["attempts"]]
    assert labels[0] == "int8-static (opset 11 -> 13 for per-channel weights)"
    assert code in (0, 3)  # measured either way; never the opset usage error
    assert _convert(str(old), tmp_path / "n.onnx", "--data", data, "--no-guard") == 0
    assert onnx.load(tmp_path / "n.onnx").opset_import[0].version == 11
    # Asked for per-channel static explicitly, the same model is still a usage error.
    assert run(["convert", str(old), "-o", str(tmp_path / "x.onnx"), "--data", data,
                "--scheme", "int8-static"]) == 2


def test_an_already_quantized_model_is_refused_not_quantized_twice(tmp_path, capsys):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _outlier_mlp(tmp_path / "mlp.onnx")
    quantize_dynamic(model, str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8)
    before = (tmp_path / "int8.onnx").read_bytes()
    for flags in ([], ["--dynamic"], ["--bits", "4"], ["--dtype", "fp16"]):
        data = ["--data", _data(tmp_path / f"d{len(flags)}{flags[:1]}", (32,))] if not flags else []
        assert run(["convert", str(tmp_path / "int8.onnx"), "-o", str(tmp_path / "x.onnx"), *data, *flags]) == 1
        err = capsys.readouterr().err
        assert "already quantized" in err and "MatMulInteger" in err and "hint:" in err
    assert (tmp_path / "int8.onnx").read_bytes() == before and not (tmp_path / "x.onnx").exists()


def test_a_probability_map_is_judged_by_mask_iou_which_sqnr_hides():
    # a text-detection map: mostly background near 0, text regions near 1; the candidate
    # shifts the values around the 0.5 edge of every region, a small error in SQNR terms
    from qtool.pipeline.guard import Floor

    ref = np.zeros((2, 1, 32, 32))
    ref[:, :, 8:24, 4:28] = 0.9
    ref[:, :, 6:8, 4:28] = 0.55  # soft edges just above the threshold
    ref[:, :, 24:26, 4:28] = 0.55
    cand = ref.copy()
    cand[:, :, 6:8, 4:28] = 0.45  # the edges fall below it
    cand[:, :, 24:26, 4:28] = 0.45
    acc = OutputAccumulator("maps")
    acc.add(ref, cand)
    result = acc.result()
    inside, edges = 16 * 24, 4 * 24
    assert result.agreement == inside / (inside + edges)  # 0.8: a fifth of the mask lost
    assert result.proxy == "mask IoU" and result.positions == 2 * (inside + edges)
    assert result.sqnr_db > 20  # while SQNR passes the 15 dB floor
    shortfalls = Floor().shortfalls([result])
    assert shortfalls == ["output maps: mask IoU 0.800 < 0.9"]


def test_maps_with_values_outside_0_1_or_many_channels_get_no_mask_proxy():
    acc = OutputAccumulator("features")
    ref = RNG.standard_normal((2, 1, 16, 16))  # a regression map, not probabilities
    acc.add(ref, ref * 1.01)
    assert acc.result().agreement is None
    acc = OutputAccumulator("features")
    ref = RNG.uniform(0, 1, (2, 8, 16, 16))  # 8 channels: a feature map
    acc.add(ref, ref)
    assert acc.result().agreement is None



def test_ctc_scores_are_judged_on_the_positions_that_are_not_blank():
    # a CTC recognizer's [N, T, V] scores: float picks the blank (class 0) at 30 of 40
    # positions; the candidate loses 3 of the 10 characters to the blank
    from qtool.pipeline.guard import Floor

    ref = RNG.standard_normal((2, 40, 20))
    ref[:, :30, 0] += 10.0  # blank
    ref[:, 30:, 5] += 10.0  # a character
    cand = ref.copy()
    cand[:, 37:, 0] += 20.0  # the last three characters become blanks
    acc = OutputAccumulator("logits")
    acc.add(ref[:1], cand[:1])
    acc.add(ref[1:], cand[1:])  # the background is decided over all batches
    result = acc.result()
    assert result.positions == 2 * 10 and result.agreement == 14 / 20  # over all positions: 74/80
    assert "output logits: argmax agreement 0.700 < 0.9" in Floor().shortfalls([result])
    # no class dominates: every position counts
    even = RNG.standard_normal((2, 40, 20))
    acc = OutputAccumulator("tokens")
    acc.add(even, even)
    assert acc.result().positions == 80 and acc.result().agreement == 1.0

def test_a_guard_on_few_held_out_samples_says_so(tmp_path, capsys):
    model = _detector_head(tmp_path / "head.onnx")
    few = _data(tmp_path / "few", (64, 128), n=10, scale=2.0)  # every 5th held out: 2 samples
    assert _convert(model, tmp_path / "q.onnx", "--data", few) == 0
    report = _report(capsys)
    assert report["guard"]["holdout_samples"] == 2
    assert any("only 2 held-out sample(s)" in w for w in report["warnings"])
    many = _data(tmp_path / "many", (64, 128), n=40, scale=2.0)  # 8 held out
    assert _convert(model, tmp_path / "q2.onnx", "--data", many) == 0
    assert not any("held-out sample" in w for w in _report(capsys)["warnings"])


def test_choice_weighs_speed_then_size_and_accuracy():
    from qtool.config import load_recipe
    from qtool.pipeline.auto import _choose
    from qtool.pipeline.guard import Attempt
    from qtool.pipeline.measure import OutputFidelity

    def attempt(label, ratio, size, db):
        a = Attempt(label, load_recipe("int8-static"), latency_ratio=ratio, size_bytes=size)
        a.outputs = [OutputFidelity("y", db, db, None, 0)]
        return a, label

    static = attempt("static", 1.07, 1_365_000, 16.3)
    # as fast within noise, smaller, 12 dB more accurate: it wins (the recognizer's case)
    assert _choose([static, attempt("dynamic", 1.08, 2_793_000, 40.2), attempt("weights", 1.13, 1_241_000, 28.5)])[1] \
        == "weights"
    # larger (dynamic, 2x the bytes) is not chosen for accuracy alone
    assert _choose([static, attempt("dynamic", 1.08, 2_793_000, 40.2)])[1] == "static"
    # as fast, under half the size and no less accurate: the smaller file wins (magika's case)
    dynamic = attempt("dynamic", 1.01, 2_803_000, 26.4)
    assert _choose([dynamic, attempt("weights", 1.05, 837_000, 26.4)])[1] == "weights"
    assert _choose([dynamic, attempt("weights", 1.05, 837_000, 25.0)])[1] == "dynamic"  # less accurate
    assert _choose([dynamic, attempt("weights", 1.05, 1_500_000, 30.0)])[1] == "dynamic"  # not half
    # a faster first candidate is not given up for accuracy at float's speed (the detector's case)
    assert _choose([attempt("static", 0.5, 5_240_000, 20.5), attempt("weights", 1.0, 5_100_000, 34.9)])[1] == "static"
    # clearly faster always wins; a little more accurate does not
    assert _choose([static, attempt("fast", 0.8, 2_000_000, 16.0)])[1] == "fast"
    assert _choose([static, attempt("same", 1.07, 1_300_000, 19.0)])[1] == "static"
    # the same graph with other calibration ranges (sizes within 1%): only accuracy decides
    assert _choose([static, attempt("mse ranges", 1.08, 1_364_000, 17.5)])[1] == "mse ranges"
    assert _choose([static, attempt("mse ranges", 1.08, 1_364_000, 16.8)])[1] == "static"  # within 1 dB
    # untimed (a target that runs elsewhere): the same speed, so size and accuracy decide alike
    untimed = attempt("static", None, 5_190_000, 21.9)
    assert _choose([untimed, attempt("mse ranges", None, 5_190_000, 26.4)])[1] == "mse ranges"
    assert _choose([untimed, attempt("mse ranges", None, 5_190_000, 22.2)])[1] == "static"  # within 1 dB
    assert _choose([untimed, attempt("timed", 0.5, 5_000_000, 30.0)])[1] == "static"  # not comparable


def test_an_output_whose_length_the_model_decides_is_compared_on_its_common_part():
    # a TTS model's audio: its length follows predicted durations, so a candidate may
    # return a few samples more or less; the common part is compared, and a length that
    # moves on more than a tenth of the batches misses the floor
    from qtool.pipeline.fidelity import fidelity
    from qtool.pipeline.guard import Floor

    acc = OutputAccumulator("audio")
    waves = [RNG.standard_normal((1, 400 + 10 * i)) for i in range(4)]
    acc.add(waves[0], waves[0][:, :390] * 1.001)  # 10 samples shorter
    for w in waves[1:]:
        acc.add(w, w * 1.001)
    result = acc.result()
    assert result.shape_kept == 0.75 and result.sqnr_db > 50
    assert any("differs from float's on 25% of the batches" in m for m in Floor().shortfalls([result]))
    same = OutputAccumulator("audio")
    for w in waves:
        same.add(w, w * 1.001)
    assert same.result().shape_kept == 1.0 and Floor().shortfalls([same.result()]) == []
    assert fidelity([waves[1]], [waves[1][:, :300]])["sqnr_db"] == np.inf  # identical on the common part


def test_a_static_candidate_that_meets_the_floor_is_also_calibrated_with_mse_ranges(tmp_path, capsys, monkeypatch):
    # The same graph with MSE-optimal ranges costs one more calibration and is kept only when
    # the held-out samples say it is more accurate (a YOLOX-style detector: 22.0 -> 23.8 dB).
    # Timings are fixed (static int8 at half float's time): the test is about the ranges.
    from pathlib import Path

    monkeypatch.setattr("qtool.pipeline.auto.time_against_float", lambda *args, **kwargs: (1.0, 0.5))

    root = Path(__file__).resolve().parents[1]
    model, data = str(root / "examples" / "digits_cnn.onnx"), str(root / "examples" / "data" / "calib")
    assert _convert(model, tmp_path / "q.onnx", "--data", data) == 0
    guard = _report(capsys)["guard"]
    static, other = guard["attempts"][:2]
    assert static["scheme"] == "int8-static" and static["meets_floor"]
    assert other["label"] == static["label"] + ", mse ranges"
    assert abs(other["size_bytes"] - static["size_bytes"]) <= 0.01 * static["size_bytes"]
    gain = other["outputs"][0]["segment_sqnr_db"] - static["outputs"][0]["segment_sqnr_db"]
    assert guard["chosen"] == (other["label"] if gain >= 1.0 and other["meets_floor"]
                               and other["latency_ratio"] <= 1.1 * static["latency_ratio"] else static["label"])


def _reject_fused_candidates(monkeypatch):
    """onnxruntime as it was on PP-OCR with 16-bit activations under --target openvino: the
    candidate is a valid graph, but its QDQ fusions ("extended"/"all" optimisation) fail
    to load it. Only the failure is simulated; every model still runs for real."""
    from qtool.errors import ModelError
    from qtool.runtime import sessions

    real = sessions.open_session
    seen = []

    def open_session(model, provider="cpu", *, optimization="all", role="model", **kw):  # noqa: ANN001, ANN202
        seen.append((role, optimization))
        if role == "candidate" and optimization in ("all", "extended"):
            raise ModelError("onnxruntime cannot load the candidate model: [TypeInferenceError] (simulated)", "")
        return real(model, provider, optimization=optimization, role=role, **kw)

    monkeypatch.setattr(sessions, "open_session", open_session)
    import qtool.runtime as runtime_pkg
    monkeypatch.setattr(runtime_pkg, "open_session", open_session)
    return seen


def test_a_target_that_runs_elsewhere_is_measured_with_qdq_as_written(tmp_path, capsys, monkeypatch):
    """--target openvino: the guard measures candidates on onnxruntime without its QDQ
    fusions (OpenVINO's int8 is not onnxruntime's kernels), so a graph those fusions reject
    is still measured and can be chosen, untimed, with why; on --target cpu the same
    failure stays a failed candidate."""
    model = _outlier_mlp(tmp_path / "mlp.onnx")
    data = _data(tmp_path / "d", (32,))
    seen = _reject_fused_candidates(monkeypatch)
    out = tmp_path / "ov.onnx"
    assert _convert(model, out, "--data", data, "--target", "openvino") == 0
    report = _report(capsys)
    chosen = next(a for a in report["guard"]["attempts"] if a["label"] == report["guard"]["chosen"])
    assert chosen["meets_floor"] and chosen["error"] is None
    assert chosen["latency_ratio"] is None and "not timed" in chosen["timing"] and "--runtime" in chosen["timing"]
    assert ("candidate", "basic") in seen
    assert report["fidelity"]["sqnr_db"] > 15  # measured on the written model the same way
    assert out.exists()

    seen.clear()
    out_cpu = tmp_path / "cpu.onnx"
    assert _convert(model, out_cpu, "--data", data, "--scheme", "int8-static", "--target", "cpu") == 1
    assert "cannot load the candidate" in capsys.readouterr().err  # no candidate loads: the error itself
    assert not out_cpu.exists()
    assert ("candidate", "basic") not in seen


def test_runtime_openvino_measures_and_times_candidates_on_openvino(tmp_path, capsys, monkeypatch):
    """--runtime openvino: the guard's candidates are opened on OpenVINO for their outputs
    too, not only for timing (the float reference stays on onnxruntime)."""
    from qtool.runtime import openvino

    model = _outlier_mlp(tmp_path / "mlp.onnx")
    data = _data(tmp_path / "d", (32,))
    real = openvino.open_session
    roles = []

    def spy(model_path, **kw):  # noqa: ANN001, ANN202
        roles.append(kw.get("role"))
        return real(model_path, **kw)

    monkeypatch.setattr(openvino, "open_session", spy)
    out = tmp_path / "ov.onnx"
    assert _convert(model, out, "--data", data, "--target", "openvino", "--runtime", "openvino") == 0
    guard = _report(capsys)["guard"]
    measured = [a for a in guard["attempts"] if a["outputs"]]
    assert measured and guard["timed_on"].startswith("openvino")
    assert all(a["timing"] is None and a["latency_ratio"] is not None for a in measured)
    # each measured candidate: once for its outputs, then a probe and a timed session
    assert roles.count("candidate") >= 3 * len(measured)


def _encoder_outputs(path, decomposed_softmax=False):
    """x[N,6,32] -> projection -> residual Add -> LayerNormalization: the hidden state [N,6,32];
    its mean over tokens, L2-normalised: a sentence embedding [N,32]; a classifier head on
    the embedding (MatMul + bias): logits [N,4]; and token probabilities [N,6,32], by a
    Softmax op or spelled out as exp over its sum."""
    w = (RNG.standard_normal((32, 32)) * 0.2).astype(np.float32)
    wc = (RNG.standard_normal((32, 4)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wc, "wc"),
             numpy_helper.from_array(np.ones(32, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(32, np.float32), "beta"),
             numpy_helper.from_array(np.full(4, 0.1, np.float32), "bc"),
             numpy_helper.from_array(np.array([1], np.int64), "t_axis")]
    probs = ([helper.make_node("Exp", ["hidden"], ["e"]),
              helper.make_node("ReduceSum", ["e", "minus1"], ["z"], keepdims=1),
              helper.make_node("Div", ["e", "z"], ["probs"])] if decomposed_softmax
             else [helper.make_node("Softmax", ["hidden"], ["probs"], axis=-1)])
    if decomposed_softmax:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "minus1"))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Add", ["x", "p"], ["res"]),
         helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["ln"], axis=-1),
         helper.make_node("Identity", ["ln"], ["hidden"]),
         helper.make_node("ReduceMean", ["hidden", "t_axis"], ["pooled0"], keepdims=0),
         helper.make_node("ReduceL2", ["pooled0", "minus1b"], ["norm"], keepdims=1),
         helper.make_node("Div", ["pooled0", "norm"], ["embedding"]),
         helper.make_node("Concat", ["embedding", "embedding"], ["pair"], axis=-1),  # sentence-transformers' style
         helper.make_node("MatMul", ["embedding", "wc"], ["l0"]), helper.make_node("Add", ["l0", "bc"], ["logits"]),
         *probs],
        "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 32])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", 6, 32]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 32]),
         helper.make_tensor_value_info("pair", TensorProto.FLOAT, ["N", 64]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 6, 32])],
        [*inits, numpy_helper.from_array(np.array([-1], np.int64), "minus1b")])
    return _save(graph, path, opset=18)


def test_outputs_the_graph_shows_to_be_features_get_no_argmax_proxy(tmp_path):
    from qtool.model import load
    from qtool.pipeline.measure import compare_outputs, feature_outputs

    for decomposed in (False, True):
        model = load(_encoder_outputs(tmp_path / f"enc{decomposed}.onnx", decomposed))
        assert feature_outputs(model) == {"hidden", "embedding", "pair"}  # logits and probs are scores
    # logits divided by a constant temperature are still logits (Div by a constant is affine)
    logits = model.graph.outputs[3]
    assert logits.name == "logits"
    scaled = ir.node("Div", [logits, ir.Value(name="t", const_value=ir.tensor(np.float32(2.0)))])
    model.graph.append(scaled)
    model.graph.outputs.append(scaled.outputs[0])
    assert feature_outputs(model) == {"hidden", "embedding", "pair"}
    # A feature's largest component decides nothing: near-ties flip under noise no one sees.
    ref = np.tile(np.linspace(1.0, 1.001, 32, dtype=np.float32), (8, 1))
    cand = ref + RNG.standard_normal(ref.shape).astype(np.float32) * 1e-3
    as_scores, as_features = (compare_outputs([{"o": ref}], [{"o": cand}], ["o"], features)[0]
                              for features in (frozenset(), frozenset({"o"})))
    assert as_scores.agreement is not None and as_scores.agreement < 0.5
    assert as_features.agreement is None and as_features.sqnr_db == as_scores.sqnr_db


def test_the_guard_judges_an_embedding_by_sqnr_not_by_its_largest_component(tmp_path, capsys):
    model = _encoder_outputs(tmp_path / "enc.onnx")
    data = _data(tmp_path / "d", (6, 32), n=20)
    assert _convert(model, tmp_path / "q.onnx", "--data", data) == 0
    attempt = _report(capsys)["guard"]["attempts"][0]
    by_name = {o["name"]: o for o in attempt["outputs"]}
    assert by_name["hidden"]["agreement"] is None and by_name["embedding"]["agreement"] is None
    assert by_name["pair"]["agreement"] is None
    assert by_name["logits"]["agreement"] is not None and by_name["probs"]["agreement"] is not None


def test_eval_reports_no_argmax_agreement_for_features(tmp_path):
    """`qtool eval -r` reports each output's argmax agreement, except where the graph shows
    features (the guard's rule), on one process and sharded."""
    from qtool.eval import evaluate
    from qtool.eval.sharded import evaluate_sharded
    from qtool.executors import InlineExecutor

    model = _encoder_outputs(tmp_path / "enc.onnx")
    data = _data(tmp_path / "d", (6, 32), n=4)
    for report in (evaluate(model, data, reference=model),
                   evaluate_sharded(model, data, executor=InlineExecutor(), reference=model)):
        agreement = {o["name"]: o["argmax_agreement"] for o in report.outputs}
        assert agreement == {"hidden": None, "embedding": None, "pair": None, "logits": 1.0, "probs": 1.0}
