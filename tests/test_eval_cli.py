"""`qtool eval` on the command line: exit codes, JSON on stdout, error lines, examples/ci.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_extra

from qtool.cli import run
from qtool.eval import validate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
REF = EXAMPLES / "digits_cnn.onnx"
DATA = EXAMPLES / "data" / "eval"


@pytest.fixture(scope="module")
def int8(tmp_path_factory) -> Path:
    """The demo model through onnxruntime's quantize_dynamic (a producer of test inputs)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp_path_factory.mktemp("eval_cli") / "digits_dyn.onnx"
    quantize_dynamic(str(REF), str(out), weight_type=QuantType.QInt8)
    return out


def _eval(*args: str) -> list[str]:
    return ["eval", *map(str, args)]


def test_json_on_stdout_validates(int8, capsys):
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "60", "--json", "-", "--max-drop", "0.05", "-q"))
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    validate(doc)
    assert doc["data"]["samples"] == 60
    assert doc["gates"][0]["gate"] == "max-drop" and doc["passed"]


def test_failed_gate_exits_3_and_says_by_how_much(int8, tmp_path, capsys):
    md = tmp_path / "r.md"
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "40", "--min-sqnr", "80", "--markdown", md))
    err = capsys.readouterr().err
    assert code == 3
    assert "error: --min-sqnr FAILED: output logits SQNR" in err
    assert "below the minimum by" in err and "Traceback" not in err
    assert "a gate failed" in md.read_text()


def test_latency_gate_and_report(int8, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "4", "--runs", "5", "--warmup", "1",
                     "--threads", "1", "--max-latency-ratio", "1000", "--json", report))
    assert code == 0, capsys.readouterr().err
    doc = json.loads(report.read_text())
    validate(doc)
    assert doc["latency_ratio"]["cpu"] > 0 and len(doc["latency"]) == 2
    assert doc["hardware"]["providers"][0]["integer_nodes"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--labels", "{bad_labels}"], 1, "2 labels for 400 samples"),
        (["-r", "{other_ref}"], 1, "different outputs"),
        (["--metric", "top3"], 2, "unknown metric"),
        (["--ep", "nosuch"], 2, "not available"),
        (["--min-sqnr", "20"], 2, "quality gates compare with a reference"),
        (["--runs", "0", "--latency"], 2, "at least 1"),
    ],
)
def test_bad_inputs_give_one_error_line(int8, tmp_path, capsys, args, code, message):
    bad_labels = tmp_path / "labels.txt"
    bad_labels.write_text("1\n2\n")
    import onnx

    other = onnx.load(str(REF))
    other.graph.node[-1].output[0] = "scores"
    other.graph.output[0].name = "scores"
    other_ref = tmp_path / "other.onnx"
    onnx.save(other, str(other_ref))
    args = [a.format(bad_labels=bad_labels, other_ref=other_ref) for a in args]
    got = run(_eval(int8, "-d", DATA, "--limit", "8", *args))
    err = capsys.readouterr().err
    assert got == code, err
    assert "error:" in err and message in err and "hint:" in err
    assert "Traceback" not in err


def test_candidate_that_fails_to_load(tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07 definitely not protobuf")
    code = run(_eval(broken, "-r", REF, "-d", DATA))
    err = capsys.readouterr().err
    assert code == 1 and "error: candidate model" in err and "hint:" in err


def test_ci_example_one_gate_passes_one_fails(int8, tmp_path):
    env = dict(os.environ, QTOOL=f"{sys.executable} -m qtool", OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(EXAMPLES / "ci.sh"), str(int8)], env=env, capture_output=True, check=False,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accuracy gate passed (exit 0)" in proc.stdout
    assert "sqnr gate failed as expected (exit 3)" in proc.stdout
    for name in ("accuracy.json", "sqnr.json"):
        validate(json.loads((tmp_path / name).read_text()))
    assert json.loads((tmp_path / "accuracy.json").read_text())["passed"] is True
    assert json.loads((tmp_path / "sqnr.json").read_text())["passed"] is False


# ---- reports never land on an input, and their folders are checked before any work ------


@pytest.mark.parametrize(("flag", "target"), [("--json", "candidate"), ("--markdown", "reference"),
                                              ("--json", "labels")])
def test_report_onto_an_input_is_refused_and_the_input_kept(int8, tmp_path, capsys, flag, target):
    cand, ref, labels = tmp_path / "cand.onnx", tmp_path / "ref.onnx", tmp_path / "labels.txt"
    cand.write_bytes(int8.read_bytes())
    ref.write_bytes(REF.read_bytes())
    labels.write_text((DATA / "labels.txt").read_text())
    path = {"candidate": cand, "reference": ref, "labels": labels}[target]
    before = path.read_bytes()
    code = run(_eval(cand, "-r", ref, "-d", DATA, "--labels", labels, "--limit", "4", flag, path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {flag} {path} is the" in err and "never overwrites its inputs" in err
    assert path.read_bytes() == before


def test_report_onto_the_external_data_of_a_model_is_refused(tmp_path, capsys):
    import onnx

    model = onnx.load(str(REF))
    ref = tmp_path / "ref.onnx"
    onnx.save(model, str(ref), save_as_external_data=True, location="ref.weights", size_threshold=0)
    weights = tmp_path / "ref.weights"
    before = weights.read_bytes()
    code = run(_eval(ref, "-d", DATA, "--limit", "2", "--json", weights))
    err = capsys.readouterr().err
    assert code == 2 and "external data file" in err and "never overwrites its inputs" in err
    assert weights.read_bytes() == before


def test_report_onto_a_sample_of_the_data_folder_is_refused(int8, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    np_file = data / "sample_0000.npy"
    np_file.write_bytes((DATA / "sample_0000.npy").read_bytes())
    code = run(_eval(int8, "-r", REF, "-d", data, "--markdown", np_file))
    assert code == 2 and "is a file of the dataset folder" in capsys.readouterr().err


def test_two_reports_on_one_file_are_refused(int8, tmp_path, capsys):
    out = tmp_path / "r.txt"
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--json", out, "--markdown", out))
    assert code == 2 and "name the same file" in capsys.readouterr().err


def test_unwritable_report_folder_fails_before_evaluating(int8, monkeypatch, capsys):
    """/sys is read-only even for root (permission bits would say writable): the check creates
    a file there, as the report writer would, instead of trusting os.access."""
    import tempfile

    import qtool.eval

    with pytest.raises(OSError):  # the premise: nothing can be created in /sys
        tempfile.mkstemp(dir="/sys")

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluate() ran before the report folder was checked")

    monkeypatch.setattr(qtool.eval, "evaluate", must_not_run)
    for flag in ("--json", "--markdown"):
        code = run(_eval(int8, "-r", REF, "-d", DATA, flag, "/sys/report.out"))
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"error: {flag}: cannot write to folder /sys" in err and "internal error" not in err


# ---- gates: N% everywhere, negative thresholds refused ---------------------------------------


def test_max_drop_accepts_a_percentage(int8, capsys):
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "40", "--max-drop", "1%",
                     "--max-latency-ratio", "100000%", "--runs", "3", "--warmup", "1", "--json", "-", "-q"))
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    validate(doc)
    drops = [g for g in doc["gates"] if g["gate"] == "max-drop"]
    top1 = next(m for m in doc["metrics"] if m["name"] == "top1")
    assert drops[0]["percent"] == 1.0
    assert drops[0]["threshold"] == pytest.approx(0.01 * top1["reference"])
    ratio = next(g for g in doc["gates"] if g["gate"] == "max-latency-ratio")
    assert ratio["threshold"] == 1000.0 and ratio["percent"] == 100000.0  # a timing that cannot fail on a loaded machine


@pytest.mark.parametrize(("args", "message"), [
    (["--max-drop", "-1"], "--max-drop must be a finite number >= 0"),
    (["--max-drop", "-0.5%"], "--max-drop must be a finite number >= 0"),
    (["--max-latency-ratio", "-2"], "--max-latency-ratio must be a finite number >= 0"),
    (["--min-sqnr", "30%"], "--min-sqnr is in dB"),
    (["--max-drop", "abc"], "is not a number"),
])
def test_bad_gate_values_are_usage_errors_with_a_hint(int8, capsys, args, message):
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "4", *args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "hint: e.g." in err


# ---- warnings a CI log must show, gates or not ----------------------------------------------


def test_ruined_candidate_warns_without_gates(tmp_path, capsys):
    """Every weight of the digits CNN's last layer shuffled: the output is noise. No gate is
    set, so the exit code stays 0, but the log must say the candidate is broken."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(REF))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.name == "fc2_w":
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(rng.permutation(w.reshape(-1)).reshape(w.shape), init.name))
    ruined = tmp_path / "ruined.onnx"
    onnx.save(model, str(ruined))
    code = run(_eval(ruined, "-r", REF, "-d", DATA, "--limit", "40", "--json", "-"))
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert code == 0 and doc["gates"] == []
    assert doc["outputs"][0]["sqnr_db"] < 3
    assert any("far from the reference" in w for w in doc["warnings"])
    assert "warning: output logits is far from the reference" in captured.err


def test_labels_outside_the_class_range_are_an_error(int8, tmp_path, capsys):
    labels = tmp_path / "labels.txt"  # 1-based labels: 1..10 for the 10 classes 0..9
    labels.write_text("".join(f"{int(v) + 1}\n" for v in (DATA / "labels.txt").read_text().split()))
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--labels", labels))
    err = capsys.readouterr().err
    assert code == 1, err
    assert "labels must be class indices 0..9" in err and "run from 1 to 10" in err and "hint:" in err


def test_bare_json_prints_to_stdout_like_every_command(capsys):
    assert run(["eval", str(REF), "-d", str(DATA), "--limit", "8", "--json", "-q"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metrics"] is not None
    assert run(["eval", str(REF), "-d", str(DATA), "--limit", "8", "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["samples"] == 8


# -- runtimes (--runtime, --runtimes; qtool.runtime) ---------------------------------------

needs_openvino = needs_extra("openvino", "openvino")


@needs_openvino
def test_eval_on_openvino_agrees_with_onnxruntime(int8, capsys):
    """The same candidate, evaluated on each runtime against its reference there: the same
    fidelity within float tolerance, and latency labelled with the runtime."""
    docs = {}
    for extra in ([], ["--runtime", "openvino", "--precision", "f32", "--latency", "--runs", "3", "--warmup", "1"]):
        code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "30", "--json", "-", "-q", *extra))
        assert code == 0
        docs[bool(extra)] = json.loads(capsys.readouterr().out)
    validate(docs[True])
    ort_out, ov_out = docs[False]["outputs"][0], docs[True]["outputs"][0]
    assert abs(ort_out["sqnr_db"] - ov_out["sqnr_db"]) < 0.5 and ov_out["argmax_agreement"] == 1.0
    assert {s["provider"] for s in docs[True]["latency"]} == {"openvino:CPU:f32"}
    assert docs[True]["hardware"] is None  # onnxruntime's integer-kernel check does not apply


@needs_openvino
def test_runtimes_matrix_has_both_runtimes_and_a_recommendation(int8, tmp_path, capsys):
    md, page = tmp_path / "r.md", tmp_path / "r.html"
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "20", "--runtimes", "ort,openvino", "--timing",
                     "inline", "--runs", "3", "--warmup", "1", "--threads", "1", "--json", "-", "-q",
                     "--markdown", md, "--html", page))
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    rows = doc["runtimes"]["deployments"]
    assert {(d["model"], d["runtime"]) for d in rows} == {(m, r) for m in ("reference", "candidate")
                                                          for r in ("ort", "openvino")}
    ov_f32 = next(d for d in rows if d["label"] == "openvino:CPU:f32" and d["model"] == "reference")
    assert ov_f32["precision"] == "f32" and float(ov_f32["outputs"][0]["sqnr_db"]) > 60  # float vs float
    cand = next(d for d in rows if d["label"] == "cpu" and d["model"] == "candidate")
    assert cand["meets_floor"] and abs(float(cand["outputs"][0]["sqnr_db"]) - doc["outputs"][0]["sqnr_db"]) < 0.01
    assert doc["runtimes"]["recommendation"][0].startswith("fastest at the floor: ")
    assert {s["provider"] for s in doc["latency"]} >= {"cpu", "openvino:CPU:f32"}
    assert "fastest at the floor" in md.read_text() and "Runtimes (--runtimes)" in page.read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--runtime", "tflite"], "unknown runtime 'tflite'"),
    (["--runtime", "ort", "--precision", "bf16"], "--precision applies to --runtime openvino only"),
    (["--precision", "f32"], "--precision applies to --runtime openvino only"),
    (["--runtime", "openvino", "--ep", "cpu"], "--ep chooses onnxruntime's execution providers"),
    (["--runtimes", "ort,ort"], "listed twice"),
    (["--runtimes", "ort,mlx"], "unknown runtime 'mlx' in --runtimes"),
    (["--runtimes", "ort", "--precision", "f32"], "apply to the openvino rows of --runtimes"),
    (["--timing", "process"], "nothing is timed"),
    (["--latency", "--rounds", "2"], "--rounds applies to --timing process only"),
    (["--latency", "--timing", "sometimes"], "unknown --timing 'sometimes'"),
])
def test_bad_runtime_flags_give_one_error_line_and_a_hint(int8, capsys, args, message):
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "2", *args))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[0].startswith("error: ") and message in lines[0], err
    assert lines[1].startswith("hint: ") and len(lines) == 2, err


@needs_openvino
@pytest.mark.parametrize(("args", "message"), [
    (["--runtime", "openvino", "--device", "TPU9"], "OpenVINO device 'TPU9' is not available"),
    (["--runtime", "openvino", "--precision", "fp4"], "unknown --precision 'fp4'"),
])
def test_bad_openvino_hints_give_one_error_line(int8, capsys, args, message):
    code = run(_eval(int8, "-r", REF, "-d", DATA, "--limit", "2", *args))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "\nhint: " in err


def test_eval_on_openvino_without_the_package_names_the_extra(int8):
    code = ("import sys; sys.modules['openvino'] = None\nfrom qtool.cli import run\n"
            f"sys.exit(run(['eval', {str(int8)!r}, '-r', {str(REF)!r}, '-d', {str(DATA)!r}, '--runtime', 'openvino']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "error: the OpenVINO runtime needs the openvino package" in proc.stderr
    assert "hint: install the extra: pip install 'qtool[openvino]'" in proc.stderr
