"""qtool.runtime's runtimes: onnxruntime and OpenVINO behind one session interface, the
missing extra, hint validation, fresh-process timing and the matrix's recommendation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import needs_extra
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import QtoolError, UsageError
from qtool.runtime import ORT_CPU, runtime

ROOT = Path(__file__).resolve().parents[1]
# Tests that run OpenVINO need the extra; the missing-extra and recommendation tests do not.
needs_openvino = needs_extra("openvino", "openvino")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Conv -> Relu -> Flatten -> Gemm, random weights: float on every runtime."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32), "w")
    g = numpy_helper.from_array(rng.normal(0, 0.3, (4 * 6 * 6, 5)).astype(np.float32), "g")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "g"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [w, g])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("runtime") / "tiny.onnx"
    onnx.save(model, path)
    return path


@needs_openvino
def test_openvino_agrees_with_onnxruntime_within_float_tolerance(tiny):
    x = np.random.default_rng(0).normal(size=(3, 2, 8, 8)).astype(np.float32)
    ov = runtime("openvino", "cpu", "f32").open(tiny, threads=1)
    ort = ORT_CPU.open(tiny, threads=1)
    assert [(p.name, p.type) for p in ov.get_inputs()] == [(p.name, p.type) for p in ort.get_inputs()]
    assert [p.name for p in ov.get_outputs()] == ["y"] and ov.precision == "f32"
    a, b = ov.run(None, {"x": x})[0], ort.run(None, {"x": x})[0]
    assert a.shape == (3, 5)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    first = ov.run(["y"], {"x": x})[0]
    ov.run(["y"], {"x": x * 2})  # the request reuses its buffers: what was returned must not change
    np.testing.assert_array_equal(first, a)


@needs_openvino
def test_default_precision_is_what_the_device_reports(tiny):
    from qtool.runtime import openvino as ov_runtime

    session = runtime("openvino").open(tiny)
    assert session.hint == "default"
    assert session.precision == ov_runtime.default_precision()


@needs_openvino
@pytest.mark.parametrize(("args", "message"), [
    (("tensorflow",), "unknown runtime 'tensorflow'"),
    (("ort", "cpu", "f32"), "--precision applies to --runtime openvino only"),
    (("ort", "nosuch"), "not available in this onnxruntime build"),
    (("openvino", "TPU9"), "OpenVINO device 'TPU9' is not available"),
    (("openvino", "CPU", "fp8"), "unknown --precision 'fp8'"),
])
def test_bad_hints_are_usage_errors_with_a_hint(args, message):
    with pytest.raises(UsageError) as info:
        runtime(*args)
    assert message in info.value.message and info.value.hint


def test_missing_openvino_names_the_extra():
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from qtool.runtime import runtime\n"
            "from qtool.errors import QtoolError\n"
            "try:\n    runtime('openvino')\nexcept QtoolError as e:\n    print(type(e).__name__, '|', e.hint)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "MissingExtraError | install the extra: pip install 'qtool[openvino]'"


def test_missing_extra_error_is_a_qtool_error(monkeypatch):
    from qtool.runtime import openvino as ov_runtime

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(QtoolError, match="openvino package"):
        ov_runtime.load_openvino()


@needs_openvino
def test_fresh_process_timing_keeps_every_round(tiny):
    from qtool.runtime import time_pairs

    feed = {"x": np.ones((1, 2, 8, 8), np.float32)}
    # One pair, two rounds (each a fresh process): every round's runs are kept.
    stats = time_pairs({"b": (str(tiny), runtime("openvino", precision="f32"))},
                       feed, mode="process", runs=4, warmup=1, threads=1, rounds=2)
    assert stats["b"].provider == "openvino:CPU:f32"
    assert stats["b"].runs == 4 and len(stats["b"].samples_ms) == 4 and stats["b"].median_ms > 0


def _deployment(model, rt, ms, precision="", shortfalls=()):
    from qtool.eval.matrix import Deployment
    from qtool.runtime.latency import summarize

    d = Deployment(model, rt, precision, shortfalls=list(shortfalls))
    times = np.full(21, ms) + np.linspace(-0.01, 0.01, 21) * ms
    d.stats = summarize(times, model=model, provider=rt.label, warmup=1, batch_size=1, threads=1, memory_mib=None)
    return d


def test_recommendation_says_when_float_on_one_runtime_beats_int8_on_another():
    from qtool.eval.matrix import recommend
    from qtool.runtime import Runtime

    ov_f32, ov_def = Runtime("openvino", "CPU", "f32"), Runtime("openvino", "CPU", "default")
    rows = [_deployment("reference", ORT_CPU, 12.5), _deployment("candidate", ORT_CPU, 8.3),
            _deployment("reference", ov_f32, 11.8, "f32"), _deployment("candidate", ov_f32, 7.6, "f32"),
            _deployment("reference", ov_def, 6.3, "bf16"),
            _deployment("candidate", ov_def, 5.0, "bf16", ["output y: SQNR 9.0 dB < 15 dB"])]
    out = recommend(rows, "int8.onnx")
    lines = out["recommendation"]
    assert lines[0].startswith("fastest at the floor: float on openvino:CPU:default (bf16), 6.300 ms")
    assert "(1.98x float on onnxruntime:cpu)" in lines[0]
    assert out["fastest"]["model"] == "reference"
    assert any(x.startswith("float on openvino:CPU:default (bf16) beats int8.onnx on onnxruntime:cpu") for x in lines)
    assert any("misses the floor" in x and "not counted" in x for x in lines)
    assert any("int8.onnx on openvino:CPU:f32 is slower than openvino's default bf16 float path" in x for x in lines)
    assert not any("beats int8.onnx on openvino" in x for x in lines)  # same runtime: said by the bf16 line


def test_nothing_at_the_floor_recommends_nothing():
    from qtool.eval.matrix import recommend

    rows = [_deployment("candidate", ORT_CPU, 1.0, shortfalls=["output y: SQNR 2 dB < 15 dB"])]
    out = recommend(rows, "c.onnx")
    assert out["fastest"] is None and out["recommendation"][-1] == "no deployment meets the floor"


@needs_openvino
def test_guard_times_candidates_on_the_chosen_runtime(tiny):
    from qtool.pipeline.guard import time_against_float

    feed = {"x": np.ones((1, 2, 8, 8), np.float32)}
    float_ms, cand_ms = time_against_float(tiny, tiny, feed, runtime("openvino", precision="f32"))
    assert float_ms > 0 and cand_ms > 0


def test_convert_runtime_is_a_guard_flag(tiny, tmp_path, capsys):
    from qtool.cli import run

    code = run(["convert", str(tiny), "-o", str(tmp_path / "o.onnx"), "--dynamic", "--runtime", "openvino"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --runtime cannot apply with no --data" in err and "hint: " in err
    assert not (tmp_path / "o.onnx").exists()


def test_latency_measure_reads_the_clock_it_is_given():
    # the guard times onnxruntime candidates by the calling thread's CPU time; a clock that
    # advances 2 ms per reading shows measure() takes every span from the clock it is given
    from qtool.runtime.latency import measure

    class Session:
        def get_outputs(self):
            return []

        def run(self, names, feed):
            return []

    readings = iter(np.arange(0, 10, 0.002))
    stats = measure({"candidate": Session}, {"x": np.zeros((1, 2), np.float32)}, runs=4, warmup=1,
                    clock=lambda: float(next(readings)))
    assert stats["candidate"].median_ms == pytest.approx(2.0)
