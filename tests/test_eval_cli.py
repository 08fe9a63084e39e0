"""`qtool eval` on the command line: exit codes, JSON on stdout, error lines, examples/ci.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
