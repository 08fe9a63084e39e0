"""The Python API (``import qtool``) does what the command line does, byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx_ir as ir
import pytest

import qtool
from qtool.cli import run
from qtool.errors import UsageError
from qtool.pipeline import SCHEMES, convert_model, plan_for
from qtool.pipeline.steps import Cleanup, Preprocess

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "data" / "calib"
EVAL = ROOT / "examples" / "data" / "eval"


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")


@pytest.mark.parametrize("flags, recipe", [
    (["--scheme", "int8-static"], "int8-static"),
    (["--dynamic"], "int8-dynamic"),
    (["--bits", "4"], "int4-weight-only"),
    (["--dtype", "fp16"], "fp16"),
])
def test_convert_matches_cli_bytes(tmp_path, flags, recipe):
    data = ["--data", str(CALIB)] if recipe == "int8-static" else []
    assert run(["-q", "convert", str(MODEL), "-o", str(tmp_path / "cli.onnx"), *data, *flags]) == 0
    # The scheme is named on both sides: with data alone the guard may pick by measured
    # speed, which two runs need not agree on (tests/test_guard.py covers that choice).
    report = qtool.convert(MODEL, tmp_path / "api.onnx", recipe, data=CALIB if data else None)
    assert (tmp_path / "cli.onnx").read_bytes() == (tmp_path / "api.onnx").read_bytes()
    assert report["mode"] == plan_for(qtool.load_recipe(recipe)).kind


def test_calibrate_convert_evaluate_match_cli(tmp_path):
    assert run(["-q", "calibrate", str(MODEL), "--data", str(CALIB), "-o", str(tmp_path / "cli.json")]) == 0
    table = qtool.calibrate(MODEL, CALIB)
    table.save(tmp_path / "api.json")
    cli_table = json.loads((tmp_path / "cli.json").read_text())
    api_table = json.loads((tmp_path / "api.json").read_text())
    for doc in (cli_table, api_table):
        doc.get("info", {}).pop("seconds", None)  # wall time of the run
    assert cli_table == api_table

    assert run(["-q", "convert", str(MODEL), "-o", str(tmp_path / "cli.onnx"),
                "--calib", str(tmp_path / "cli.json")]) == 0
    qtool.convert(MODEL, tmp_path / "api.onnx", calib=tmp_path / "api.json")
    assert (tmp_path / "cli.onnx").read_bytes() == (tmp_path / "api.onnx").read_bytes()

    out = tmp_path / "cli_eval.json"
    assert run(["-q", "eval", str(tmp_path / "cli.onnx"), "--data", str(EVAL), "--reference", str(MODEL),
                "--labels", str(EVAL / "labels.txt"), "--json", str(out)]) == 0
    result = qtool.evaluate(tmp_path / "api.onnx", EVAL, reference=MODEL, labels=EVAL / "labels.txt")
    cli_metrics = json.loads(out.read_text())["metrics"]
    assert result.to_dict()["metrics"] == cli_metrics
    assert cli_metrics[0]["candidate"] > 0.9


def test_api_refuses_what_the_cli_refuses(tmp_path):
    with pytest.raises(UsageError, match="static int8 needs activation ranges"):
        qtool.convert(MODEL, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "int8.onnx").exists() and (tmp_path / "table.json").exists()


def test_every_scheme_ends_with_cleanup_or_is_one_pass():
    # The declared lists are what runs: static and dynamic int8 pre-process, then clean up;
    # only a check that rewrites nothing (a --target's documented rules) may follow.
    from qtool.pipeline.steps import TargetRules

    for kind in ("int8-static", "int8-dynamic"):
        rewrites = [s for s in SCHEMES[kind] if s is not TargetRules]
        assert Preprocess in rewrites and rewrites[-1] is Cleanup


def test_convert_model_leaves_its_input_alone():
    model = qtool.load(MODEL)
    before = ir.to_proto(model).SerializeToString()
    converted = convert_model(model, qtool.load_recipe("int8-dynamic"))
    assert ir.to_proto(model).SerializeToString() == before
    assert converted.summary.quantized["Gemm"] + converted.summary.quantized["MatMul"] > 0
    assert [r.name for r in converted.reports] == ["preprocess", "dynamic", "cleanup"]


def test_tune_is_the_command_line_tune(tmp_path):
    import qtool.tuning  # importing the sub-package must not shadow the API function

    assert callable(qtool.tune) and qtool.tune is not qtool.tuning
    result = qtool.tune(MODEL, CALIB, tmp_path / "t.onnx", metric="cosine", max_drop=0.01, bits="8")
    assert (tmp_path / "t.onnx").exists() and result is not None
