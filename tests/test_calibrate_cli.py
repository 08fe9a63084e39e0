"""`qtool calibrate` / `qtool merge-tables`: exit codes, messages, shard + merge."""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import onnx_model, value_info
from onnx import TensorProto, helper

from qtool.cli import run

RNG = np.random.default_rng(7)


def _model(path):
    """x[N,4] -> MatMul -> Relu -> Add -> y."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], RNG.standard_normal(12).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.1, 0.2, 0.3])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Relu", ["mm"], ["act"], name="relu"),
             helper.make_node("Add", ["act", "b"], ["y"], name="add")]
    onnx.save(onnx_model(nodes, [value_info("x", ["N", 4])], [value_info("y", ["N", 3])], [w, b]), path)
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


def _if_model(path):
    """mm (MatMul) -> If(sum(x) > 0): then a MatMul inside the branch, else Relu. The branch's
    tensors are not graph values onnxruntime can expose, so calibration cannot observe them."""
    from onnx import numpy_helper

    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "W2"], ["t_out"], name="then_mm")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 8])])
    else_g = helper.make_graph([helper.make_node("Relu", ["h"], ["e_out"], name="else_relu")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 8])])
    zero = numpy_helper.from_array(np.array(0, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="rs"),
             helper.make_node("Constant", [], ["zero"], value=zero, name="c0"),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")]
    inits = [numpy_helper.from_array(RNG.standard_normal((8, 8)).astype(np.float32), n) for n in ("W", "W2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_a_model_with_an_if_calibrates_without_pointing_to_a_missing_flag(tmp_path, capsys):
    """Tensors inside the If's branches cannot be observed: calibrate says so and keeps going
    (it used to fail with a hint to --exclude, a flag calibrate did not have). --exclude now
    exists and, as in convert, leaves the named node out altogether."""
    model, data = _if_model(tmp_path / "if.onnx"), _data(tmp_path / "d", n=4, shape=(1, 8))
    table = tmp_path / "t.json"
    assert run(["calibrate", model, "--data", data, "-o", str(table)]) == 0
    err = capsys.readouterr().err
    assert "--exclude" not in err and "error:" not in err, err
    warning = next(ln for ln in err.splitlines() if ln.startswith("warning:"))
    assert "t_out" in warning and "If/Loop/Scan" in warning and "+-inf" not in warning, warning
    assert run(["calibrate", model, "--data", data, "-o", str(table), "--exclude", "then_mm", "--json", "-q"]) == 0
    out, err = capsys.readouterr()
    assert "warning:" not in err, err
    assert json.loads(out)["tensors"] == 2  # x and h of the main graph's MatMul
    converted = tmp_path / "q.onnx"
    assert run(["convert", model, "-o", str(converted), "--calib", str(table), "--exclude", "then_mm", "-q"]) == 0
    ops = {n.op_type for n in onnx.load(converted).graph.node}
    assert "QuantizeLinear" in ops and "If" in ops


def test_exclude_reaches_the_shard_workers(tmp_path, capsys):
    model, data = _if_model(tmp_path / "if.onnx"), _data(tmp_path / "d", n=4, shape=(1, 8))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert run(["calibrate", model, "--data", data, "-o", str(one), "--exclude", "then_mm", "-q"]) == 0
    assert run(["calibrate", model, "--data", data, "-o", str(two), "--exclude", "then_mm", "--workers", "2",
                "-q"]) == 0, capsys.readouterr().err
    assert json.loads(one.read_text())["tensors"].keys() == json.loads(two.read_text())["tensors"].keys()


def test_flags_that_cannot_apply_are_usage_errors(tmp_path, capsys):
    model, data = _model(tmp_path / "m.onnx"), _data(tmp_path / "d")
    out = tmp_path / "t.json"
    cases = [
        (["--samples", "-5"], "--samples must be >= 0"),
        (["--percentile", "99"], "--percentile applies to --method percentile, not minmax"),
        (["--method", "minmax", "--bins", "512"], "--bins applies to the histogram methods"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--threads", "-1"], "--threads must be >= 0"),
    ]
    for extra, words in cases:
        assert run(["calibrate", model, "--data", data, "-o", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "hint:" in err, err
        assert not out.exists()
    # the same flags where they do apply
    assert run(["calibrate", model, "--data", data, "-o", str(out), "--method", "percentile",
                "--percentile", "99", "--bins", "512", "-q"]) == 0
    assert json.loads(out.read_text())["params"]["percentile"] == 99


def test_merge_tables_checks_its_output_before_reading_tables(tmp_path, capsys):
    model, data = _model(tmp_path / "m.onnx"), _data(tmp_path / "d")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, shard in ((a, "0/2"), (b, "1/2")):
        assert run(["calibrate", model, "--data", data, "-o", str(path), "--shard", shard, "-q"]) == 0
    capsys.readouterr()
    # a missing folder: the error names the output, exit 2, before any table is read
    assert run(["merge-tables", str(a), str(tmp_path / "nope.json"), "-o", str(tmp_path / "no" / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and "nope.json" not in err and "internal error" not in err, err
    # writing over one of its inputs
    before = a.read_text()
    assert run(["merge-tables", str(a), str(b), "-o", str(a)]) == 2
    assert "one of the tables" in capsys.readouterr().err
    assert a.read_text() == before
    assert run(["merge-tables", str(a), str(b), "-o", str(tmp_path / "m.txt")]) == 2
    assert run(["merge-tables", str(a), str(b), "-o", str(tmp_path / "m.json"), "-q"]) == 0
