"""`qtool calibrate` / `qtool merge-tables`: exit codes, messages, shard + merge."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from qtool.cli import run

RNG = np.random.default_rng(7)


def _model(path):
    """x[N,4] -> MatMul -> Relu -> Add -> y."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], RNG.standard_normal(12).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.1, 0.2, 0.3])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
         helper.make_node("Relu", ["mm"], ["act"], name="relu"),
         helper.make_node("Add", ["act", "b"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def _data(folder, n=12, shape=(4,)):
    folder.mkdir()
    for i in range(n):
        np.save(folder / f"s{i:02d}.npy", RNG.standard_normal(shape).astype(np.float32))
    return str(folder)


def test_calibrate_writes_a_table_and_json_summary(tmp_path, capsys):
    model, data = _model(tmp_path / "m.onnx"), _data(tmp_path / "d")
    out = tmp_path / "t.json"
    code = run(["calibrate", model, "--data", data, "-o", str(out), "--method", "entropy",
                "--batch-size", "4", "--json", "-q"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 12 and summary["method"] == "entropy"
    table = json.loads(out.read_text())
    assert table["format"] == "qtool.calibration" and "mm" in table["tensors"]


def test_shards_then_merge_equal_one_run(tmp_path):
    model, data = _model(tmp_path / "m.onnx"), _data(tmp_path / "d", n=13)
    common = ["--data", data, "--batch-size", "2", "-q"]
    assert run(["calibrate", model, *common, "-o", str(tmp_path / "all.json")]) == 0
    for i in range(3):
        assert run(["calibrate", model, *common, "--shard", f"{i}/3",
                    "-o", str(tmp_path / f"s{i}.json")]) == 0
    assert run(["merge-tables", *(str(tmp_path / f"s{i}.json") for i in range(3)),
                "-o", str(tmp_path / "merged.json"), "-q"]) == 0
    whole = json.loads((tmp_path / "all.json").read_text())
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["samples"] == whole["samples"] == 13
    assert merged["tensors"] == whole["tensors"]


def test_workers_runs_shard_processes_and_merges(tmp_path):
    model, data = _model(tmp_path / "m.onnx"), _data(tmp_path / "d", n=8)
    out = tmp_path / "w.json"
    assert run(["calibrate", model, "--data", data, "-o", str(out), "--workers", "2", "-q"]) == 0
    table = json.loads(out.read_text())
    assert table["samples"] == 8 and sorted(table["shards"]) == ["0/2", "1/2"]


def test_bad_inputs_are_one_error_line_with_a_hint(tmp_path, capsys):
    model, data = _model(tmp_path / "m.onnx"), _data(tmp_path / "d")
    wrong = _data(tmp_path / "wrong", shape=(7,))
    other = tmp_path / "o.onnx"
    onnx.save(helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g2",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8), other)
    out = str(tmp_path / "t.json")
    assert run(["calibrate", model, "--data", data, "-o", out, "-q", "--shard", "0/2"]) == 0
    cases = [
        (["calibrate", model, "--data", data, "-o", out, "--shard", "5/2"], 2, "out of range"),
        (["calibrate", model, "--data", data, "-o", out, "--shard", "x"], 2, "bad shard"),
        (["calibrate", model, "--data", wrong, "-o", out], 1, "s00.npy"),
        (["calibrate", model, "--data", data, "-o", out, "--method", "magic"], 2, "magic"),
        (["merge-tables", out, out, "-o", str(tmp_path / "m.json")], 1, "more than once"),
        (["calibrate", str(other), "--data", data, "-o", str(tmp_path / "o.json")], 1,
         "nothing to calibrate"),
    ]
    for argv, code, words in cases:
        capsys.readouterr()
        assert run(argv) == code, argv
        err = capsys.readouterr().err
        assert "error:" in err and words in err and "Traceback" not in err, (argv, err)
