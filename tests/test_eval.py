"""qtool.eval: metrics against hand-computed values, gates, report schema, latency statistics,
diagnosis, hardware check and the native backend, on models built here in 2-5 nodes."""

from __future__ import annotations

import math

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import DataError, GateFailed, ModelError, UsageError
from qtool.eval import evaluate, validate
from qtool.eval.gates import check_gates, raise_on_failure
from qtool.eval.metrics import (
    Accuracy,
    OutputComparison,
    Perplexity,
    TopK,
    load_plugin,
    make_metric,
)
from qtool.eval.report import to_markdown

SQNR_TOL = 1e-9


# ---- tiny models ---------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def float_mlp(path, w1: np.ndarray, w2: np.ndarray) -> str:
    """x [N, 4] -> MatMul w1 -> Relu -> MatMul w2 -> y [N, 3]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def qdq_weight_mlp(path, w1: np.ndarray, w2: np.ndarray, bits2: int = 8) -> str:
    """The same MLP with int8 weights through DequantizeLinear; fc2's weights use a scale
    2**(8 - bits2) times coarser (as if quantized to ``bits2`` bits)."""
    inits, nodes = [], []
    for name, w, bits in (("w1", w1, 8), ("w2", w2, bits2)):
        scale = np.float32(np.abs(w).max() / (2 ** (bits - 1) - 1))
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(np.array(scale), f"{name}_s"),
                  numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name],
                                      name=f"{name}_dq"))
    nodes += [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp_q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def _expose(path, names) -> bytes:
    m = onnx.load(path)
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return m.SerializeToString()


@pytest.fixture()
def mlp(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        np.save(data / f"s{i:02d}.npy", rng.standard_normal((1, 4)).astype(np.float32))
    ref = float_mlp(tmp_path / "ref.onnx", w1, w2)
    x = np.concatenate([np.load(data / f"s{i:02d}.npy") for i in range(12)])
    labels = np.argmax(np.maximum(x @ w1, 0) @ w2, axis=1)
    (data / "labels.txt").write_text("\n".join(map(str, labels)) + "\n")
    return {"ref": ref, "data": data, "w1": w1, "w2": w2, "tmp": tmp_path,
            "q8": qdq_weight_mlp(tmp_path / "q8.onnx", w1, w2),
            "q2": qdq_weight_mlp(tmp_path / "q2.onnx", w1, w2, bits2=2)}


# ---- metrics against hand-computed values --------------------------------------------------


def test_topk_hand_computed_and_ties():
    scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.2, 0.5]], np.float32)
    labels = np.array([2, 0])
    top1, top2 = TopK(1), TopK(2)
    for m in (top1, top2):
        m.update({"y": scores}, labels, {})
    assert top1.result() == 0.0  # argmaxes 1 and 2
    assert top2.result() == 1.0  # {1, 2} holds 2, {2, 0} holds 0
    tie = TopK(1)
    tie.update({"y": np.array([[1.0, 1.0, 0.0]])}, np.array([1]), {})
    assert tie.result() == 0.0  # equal scores: the lower class index ranks first


def test_accuracy_integer_single_score_and_argmax():
    a = Accuracy()
    a.update({"cls": np.array([3, 1, 2])}, np.array([3, 1, 0]), {})
    assert a.result() == pytest.approx(2 / 3)
    b = Accuracy()
    b.update({"p": np.array([[0.9], [0.2], [0.6], [0.4]], np.float32)}, np.array([1, 0, 0, 0]), {})
    assert b.result() == 0.75
    c = Accuracy()
    c.update({"s": np.array([[0.0, 2.0], [3.0, 1.0]])}, np.array([1, 1]), {})
    assert c.result() == 0.5


def test_perplexity_uniform_is_vocab_size_and_mask():
    ids = np.array([[0, 1, 2, 3]])
    p = Perplexity()
    p.update({"logits": np.zeros((1, 4, 5), np.float32)}, None, {"input_ids": ids})
    assert p.result() == pytest.approx(5.0)
    # position 0 predicts token 1 with p = e^2 / (e^2 + 1): NLL = log(1 + e^-2)
    logits = np.zeros((1, 2, 2), np.float32)
    logits[0, 0, 1] = 2.0
    q = Perplexity()
    q.update({"logits": logits}, None, {"input_ids": np.array([[0, 1]])})
    assert q.result() == pytest.approx(1 + math.exp(-2.0))
    masked = Perplexity()  # the masked pair must not count: only the (1 -> 2) prediction is left
    big = np.zeros((1, 3, 3), np.float32)
    big[0, 1, 2] = 50.0
    masked.update({"logits": big}, None,
                  {"input_ids": np.array([[0, 1, 2]]), "attention_mask": np.array([[0, 1, 1]])})
    assert masked.result() == pytest.approx(1.0, abs=1e-6)


def test_perplexity_needs_input_ids():
    with pytest.raises(UsageError, match="input_ids"):
        Perplexity().update({"logits": np.zeros((1, 2, 3))}, None, {"x": np.zeros((1, 2))})


def test_output_comparison_hand_computed_and_streaming():
    r = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    c = np.array([[1.0, 1.0], [0.0, 2.0]], np.float32)
    whole = OutputComparison("y")
    whole.update(r, c)
    res = whole.result()
    assert res["sqnr_db"] == pytest.approx(10 * math.log10(5.0), abs=SQNR_TOL)
    assert res["mse"] == pytest.approx(0.25)
    assert res["max_abs"] == 1.0
    assert res["cosine"] == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    assert res["argmax_agreement"] == 1.0  # [1, 1] ties to index 0, like [1, 0]
    parts = OutputComparison("y")
    parts.update(r[:1], c[:1])
    parts.update(r[1:], c[1:])
    assert parts.result() == res
    same = OutputComparison("y")
    same.update(r, r)
    assert same.result()["sqnr_db"] == math.inf
    with pytest.raises(DataError, match="shape"):
        OutputComparison("y").update(r, c[:1])


def test_plugin_metric(tmp_path):
    (tmp_path / "my_metric.py").write_text(
        "import numpy as np\n"
        "def mean_max(outputs, labels, feed):\n"
        "    y = next(iter(outputs.values()))\n"
        "    return float(y.max(axis=1).sum()), len(y)\n"
        "def lower(outputs, labels, feed):\n"
        "    return 1.0\n"
        "lower.higher_is_better = False\n"
    )
    m = load_plugin(f"{tmp_path / 'my_metric.py'}:mean_max")
    m.update({"y": np.array([[1.0, 3.0], [2.0, 0.0]])}, None, {})
    m.update({"y": np.array([[4.0, 0.0]])}, None, {})
    assert m.result() == pytest.approx((3 + 2 + 4) / 3)
    assert load_plugin(f"{tmp_path / 'my_metric.py'}:lower").higher_is_better is False
    with pytest.raises(UsageError, match="no function"):
        load_plugin(f"{tmp_path / 'my_metric.py'}:missing")
    with pytest.raises(UsageError, match="unknown metric"):
        make_metric("top3")


# ---- gates ---------------------------------------------------------------------------------


def _doc(drop=0.02, sqnr=25.0, ratio=1.5):
    return {
        "metrics": [{"name": "top1", "higher_is_better": True, "candidate": 0.9, "reference": 0.9 + drop,
                     "drop": drop}],
        "outputs": [{"name": "y", "sqnr_db": sqnr}],
        "latency_ratio": {"cpu": ratio},
    }


def test_gates_pass_and_fail_with_margin():
    ok = check_gates(_doc(), max_drop=0.05, min_sqnr=20, max_latency_ratio=2.0)
    assert [g.passed for g in ok] == [True, True, True]
    raise_on_failure(ok)
    bad = check_gates(_doc(), max_drop=0.01, min_sqnr=30, max_latency_ratio=1.0)
    assert [g.passed for g in bad] == [False, False, False]
    assert bad[0].margin == pytest.approx(-0.01)
    assert bad[1].margin == pytest.approx(-5.0)
    with pytest.raises(GateFailed) as err:
        raise_on_failure(bad)
    assert err.value.exit_code == 3
    assert "--max-drop FAILED" in err.value.message and "by 0.01" in err.value.message
    assert "below the minimum by 5 dB" in err.value.message
    exact = check_gates({**_doc(), "outputs": [{"name": "y", "sqnr_db": None}]}, min_sqnr=100)
    assert exact[0].passed  # null SQNR = identical outputs
    with pytest.raises(UsageError, match="--max-drop needs"):
        check_gates({"metrics": [], "outputs": [], "latency_ratio": {}}, max_drop=0.1)



def test_gates_take_percentages_like_tune():
    """--max-drop 2% is 2 % of the reference's value of each metric; a ratio's 150% is 1.5."""
    doc = _doc(drop=0.02)  # reference top1 0.92
    (drop,) = check_gates(doc, max_drop="2%")
    assert drop.threshold == pytest.approx(0.0184) and drop.percent == 2.0 and not drop.passed
    assert "(max 2% = 0.0184)" in drop.describe()
    (wide,) = check_gates(doc, max_drop="3%")
    assert wide.passed and wide.margin == pytest.approx(0.0276 - 0.02)
    (ratio,) = check_gates(doc, max_latency_ratio="150%")
    assert ratio.threshold == 1.5 and ratio.passed  # measured 1.5
    assert check_gates(doc, max_drop="0.05")[0].threshold == 0.05  # text without % is absolute


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_drop": -1}, "--max-drop must be a finite number >= 0"),
    ({"max_drop": "-1%"}, "--max-drop must be a finite number >= 0"),
    ({"max_drop": float("nan")}, "--max-drop must be a finite number >= 0"),
    ({"max_latency_ratio": -0.5}, "--max-latency-ratio must be a finite number >= 0"),
    ({"min_sqnr": "20%"}, "--min-sqnr is in dB"),
    ({"max_drop": "one"}, "is not a number"),
])
def test_bad_gate_thresholds_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message) as err:
        check_gates(_doc(), **kwargs)
    assert err.value.hint.startswith("e.g.")

# ---- evaluate end to end -------------------------------------------------------------------


def test_evaluate_report_validates_and_matches_numpy(mlp):
    report = evaluate(mlp["q8"], mlp["data"], reference=mlp["ref"], latency=True, runs=5, warmup=1,
                      diagnose=True, max_drop=0.5, min_sqnr=10.0)
    doc = report.to_dict()
    validate(doc)
    assert doc["passed"] and len(doc["gates"]) == 2
    names = [m["name"] for m in doc["metrics"]]
    assert names == ["top1"]  # 3 classes: top1 only by default
    assert doc["metrics"][0]["reference"] == 1.0  # labels are the float model's argmax
    # SQNR of the output recomputed in numpy from the two models' outputs
    x = np.concatenate([np.load(mlp["data"] / f"s{i:02d}.npy") for i in range(12)])
    import onnxruntime as ort

    ys = [ort.InferenceSession(p).run(None, {"x": x})[0].astype(np.float64) for p in (mlp["ref"], mlp["q8"])]
    want = 10 * math.log10(np.sum(ys[0] ** 2) / np.sum((ys[0] - ys[1]) ** 2))
    assert doc["outputs"][0]["sqnr_db"] == pytest.approx(want, rel=1e-5)
    assert {s["model"] for s in doc["latency"]} == {"candidate", "reference"}
    assert doc["size"]["compression_ratio"] > 1.0
    md = to_markdown(doc)
    assert "| top1 |" in md and "all gates passed" in md
    broken = dict(doc, schema_version=2)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_evaluate_bad_inputs(mlp, tmp_path):
    bad_labels = tmp_path / "labels.txt"
    bad_labels.write_text("0\n1\n")
    with pytest.raises(DataError, match="2 labels for 12 samples"):
        evaluate(mlp["q8"], mlp["data"], reference=mlp["ref"], labels=bad_labels)
    other = tmp_path / "other.onnx"
    m = onnx.load(mlp["ref"])
    m.graph.output[0].name = "z"
    m.graph.node[-1].output[0] = "z"
    onnx.save(m, str(other))
    with pytest.raises(DataError, match="different outputs"):
        evaluate(mlp["q8"], mlp["data"], reference=other)
    garbage = tmp_path / "broken.onnx"
    garbage.write_bytes(b"\x08\x07not a model at all")
    with pytest.raises(ModelError, match="candidate"):
        evaluate(garbage, mlp["data"], reference=mlp["ref"])
    with pytest.raises(UsageError, match="reference"):
        evaluate(mlp["q8"], mlp["data"], min_sqnr=20)


def test_latency_statistics_by_hand():
    """The statistics themselves, on known run times (no clock involved)."""
    from qtool.runtime.latency import summarize

    times = np.array([5.0, 1.0, 2.0, 4.0, 3.0, 100.0, 2.5, 3.5, 1.5])
    s = summarize(times, model="m", provider="cpu", warmup=0, batch_size=4, threads=1,
                  memory_mib=None)
    assert s.runs == 9 and s.median_ms == 3.0
    assert s.iqr_ms == np.percentile(times, 75) - np.percentile(times, 25) == 2.0
    assert s.min_ms == 1.0 and s.max_ms == 100.0
    assert s.p90_ms == np.percentile(times, 90) and s.p99_ms == np.percentile(times, 99)
    assert s.throughput == 4 / 0.003
    # 95% order-statistic interval for the median: 0-based ranks floor(4.5 - 0.98*3) = 1
    # and ceil(4.5 + 0.98*3) = 8 of the sorted times [1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 100].
    assert s.median_ci_ms == (1.5, 100.0)


def test_progress_covers_the_dataset_pass_and_every_latency_run(mlp):
    import contextlib

    seen: dict[str, list] = {}

    @contextlib.contextmanager
    def progress(description, total, unit=""):
        seen[description] = [total, unit, 0]

        def advance(n=1):
            seen[description][2] += n

        yield advance

    evaluate(mlp["q8"], mlp["data"], reference=mlp["ref"], latency=True, runs=7, warmup=2, progress=progress)
    assert seen["evaluating"] == [12, "samples", 12]
    assert seen["latency"] == [2 * (7 + 2), "runs", 2 * (7 + 2)]  # two models, warm-up + timed runs


def test_ruined_candidate_warns_without_gates(mlp, tmp_path):
    """fc2's weights negated: the output is -y (SQNR -6 dB, cosine -1). No gate is set, so
    the report passes, but it must carry a warning."""
    ruined = float_mlp(tmp_path / "ruined.onnx", mlp["w1"], -mlp["w2"])
    doc = evaluate(ruined, mlp["data"], reference=mlp["ref"]).to_dict()
    assert doc["passed"] and doc["gates"] == []
    assert doc["outputs"][0]["cosine"] == pytest.approx(-1.0)
    assert len(doc["warnings"]) == 1 and "output y is far from the reference" in doc["warnings"][0]
    fine = evaluate(mlp["q8"], mlp["data"], reference=mlp["ref"]).to_dict()
    assert fine["warnings"] == []


def test_labels_outside_the_class_range_raise(mlp, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{v}\n" for v in [3] + [0] * 11))  # 3 classes: 0..2
    with pytest.raises(DataError, match=r"class indices 0..2 .* run from 0 to 3"):
        evaluate(mlp["q8"], mlp["data"], reference=mlp["ref"], labels=labels)


def test_latency_measure_reports_consistent_statistics(mlp):
    """A real measurement: structure only. Whether two runs agree is a property of the
    machine, measured in bench/latency_repro.py, not asserted here."""
    from qtool.runtime import open_session
    from qtool.runtime.latency import measure

    feed = {"x": np.load(mlp["data"] / "s00.npy")}
    a = measure({"candidate": lambda: open_session(mlp["ref"], threads=1)}, feed, runs=50,
                warmup=5, threads=1)["candidate"]
    assert a.runs == 50 and a.threads == 1 and a.batch_size == feed["x"].shape[0]
    assert 0 < a.min_ms <= a.median_ms <= a.p90_ms <= a.p99_ms <= a.max_ms
    assert a.median_ci_ms[0] <= a.median_ms <= a.median_ci_ms[1]
    assert a.iqr_ms >= 0 and a.stdev_ms >= 0


# ---- diagnosis, hardware, native -----------------------------------------------------------


def test_diagnose_names_the_coarse_layer(mlp):
    report = evaluate(mlp["q2"], mlp["data"], reference=mlp["ref"], diagnose=True)
    diag = report.to_dict()["diagnosis"]
    assert diag["matched_tensors"] == 3  # h, r, y
    worst = diag["layers"][0]
    assert worst["node"] == "fc2" and worst["quantized"]
    # a hand-made candidate records no recipe to re-convert with: suggestions are withheld
    # (tests/test_diagnose.py checks measured suggestions on qtool-converted models)
    assert diag["suggested"] == [] and "withheld" in diag["advice"]
    # fc2's own error: fc2 alone (its DequantizeLinear + MatMul, run by onnxruntime as the
    # candidate's are) fed with the reference's r, against the reference's y
    import onnxruntime as ort

    x = np.concatenate([np.load(mlp["data"] / f"s{i:02d}.npy") for i in range(12)])
    r_ref, y_ref = ort.InferenceSession(_expose(mlp["ref"], ["r"])).run(["r", "y"], {"x": x})
    cand = onnx.load(mlp["q2"])
    layer = helper.make_graph(
        [n for n in cand.graph.node if n.name in ("w2_dq", "fc2")], "fc2_alone",
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [i for i in cand.graph.initializer if i.name.startswith("w2")],
    )
    alone = helper.make_model(layer, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    y_local = ort.InferenceSession(alone.SerializeToString()).run(None, {"r": r_ref})[0]
    want = 10 * math.log10(np.sum(y_ref.astype(np.float64) ** 2) / np.sum((y_ref - y_local.astype(np.float64)) ** 2))
    assert worst["local_sqnr_db"] == pytest.approx(want, abs=1e-6)
    fc1 = next(x for x in diag["layers"] if x["node"] == "fc1")
    assert fc1["local_sqnr_db"] > worst["local_sqnr_db"] + 10  # int8 fc1 is far better


def test_hwcheck_reports_integer_and_float_nodes(mlp, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qtool.eval.hwcheck import check, classify

    graph = onnx.load(mlp["q8"]).graph
    found = classify(graph)
    assert {n["node"] for n in found["float_after_dequantize"]} == {"fc1", "fc2"}
    assert all(n["dequantized"] == "weights" for n in found["float_after_dequantize"])
    dyn = tmp_path / "dyn.onnx"
    quantize_dynamic(mlp["ref"], str(dyn), weight_type=QuantType.QInt8)
    result = check(dyn, ["cpu"], latency_ratio={"cpu": 1.5})
    ints = result["providers"][0]["integer_nodes"]
    assert sum(ints.values()) == 2  # both MatMuls run as integer kernels
    assert result["warnings"] and "slower than the reference" in result["warnings"][0]


def test_native_backend_matches_onnxruntime_exactly(mlp, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dyn = tmp_path / "dyn.onnx"
    quantize_dynamic(mlp["ref"], str(dyn), weight_type=QuantType.QInt8)
    report = evaluate(dyn, mlp["data"], reference=mlp["ref"], backend="native")
    rows = [c for c in report.to_dict()["consistency"] if c["b"].startswith("native")]
    assert len(rows) == 2
    assert all(r["exact_match_rate"] == 1.0 and r["max_abs"] == 0.0 for r in rows)


def test_diagnosis_error_ignores_matching_infinities():
    from qtool.eval.metrics import sqnr_db
    from qtool.pipeline.layers import _energy, _error

    mask = np.array([0.0, -np.inf, 3.0], np.float32)  # an attention mask holds -inf by design
    assert _energy(mask) == 9.0
    assert _error(mask, np.array([0.0, -np.inf, 2.0], np.float32)) == 1.0
    assert _error(mask, np.array([0.0, 0.0, 3.0], np.float32)) == math.inf
    assert sqnr_db(9.0, math.inf) == -math.inf


def test_diagnosis_compares_a_folded_conv_with_the_batchnorm_it_absorbed(tmp_path):
    """Conv -> BatchNorm -> Relu converted by qtool: the Conv now outputs (under its own
    name) what the BatchNorm did. Diagnosis must compare it with the reference BatchNorm
    output (the model's qtool.carries metadata), not with the reference Conv output."""
    import onnx_ir as ir

    from qtool.config import Recipe
    from qtool.model import save
    from qtool.pipeline import calibrate, convert_model
    from qtool.pipeline.layers import matched_tensors

    rng = np.random.default_rng(3)
    c = 4
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(np.full(c, 3.0, np.float32), "gamma"),
             numpy_helper.from_array(np.full(c, 2.0, np.float32), "beta"),
             numpy_helper.from_array(np.zeros(c, np.float32), "mean"),
             numpy_helper.from_array(np.ones(c, np.float32), "var")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
         helper.make_node("Sigmoid", ["b"], ["y"], name="act")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])], inits)
    ref = tmp_path / "ref.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), ref)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        np.save(data / f"s{i}.npy", rng.standard_normal((1, 3, 6, 6)).astype(np.float32))
    table = calibrate(ref, data, Recipe())
    cand = tmp_path / "q.onnx"
    save(convert_model(ir.load(ref), Recipe(), table=table)[0], cand)
    cand_proto = onnx.load(cand)
    props = {p.key: p.value for p in cand_proto.metadata_props}
    import json

    carries = json.loads(props["qtool.carries"])
    assert carries == {"c": "b"}
    matched = matched_tensors(onnx.load(ref).graph, cand_proto.graph, carries)
    assert "c" not in matched and matched["b"] != "b"  # b: the candidate's dequantized c
    report = evaluate(cand, data, reference=ref, diagnose=True).to_dict()["diagnosis"]
    conv = next(x for x in report["layers"] if x["tensor"] == "b")
    assert conv["sqnr_db"] > 25  # int8 error only; against the pre-BatchNorm c it is ~0 dB


def test_a_larger_candidate_is_called_larger_not_smaller():
    from qtool.eval.report import size_change

    assert size_change(3.81) == "3.81x smaller"
    assert size_change(1 / 1.25) == "1.25x larger"  # was printed "0.80x smaller"
