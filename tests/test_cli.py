"""The command line as a user and a CI log see it: help text, bare `qtool`, output in a
non-terminal, progress units, Ctrl-C, and exit codes that match the README (issue 14)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.cli import run

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "data" / "calib"
EVAL = ROOT / "examples" / "data" / "eval"
COMMANDS = ["inspect", "calibrate", "merge-tables", "convert", "eval", "tune"]


def qtool(*args: object, cwd: Path | None = None, env: dict | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in its own process with stdout and stderr piped, as in a CI job."""
    if env is None:
        env = dict(os.environ)
        env.pop("COLUMNS", None)  # a log's width is the default under test
    env = dict(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


# -- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_values_not_python_types(command, capsys):
    assert run([command, "--help"]) == 0
    text = capsys.readouterr().out
    usage = text.splitlines()[0]
    assert re.fullmatch(r"Usage: qtool [a-z-]+ \[OPTIONS\]( [A-Z_]+(\.\.\.)?)+", usage), usage
    assert "{" not in usage
    for bad in ("<list", "<path>", "<str>", "<int>", "<float>", "list[str]"):
        assert bad not in text, (bad, text)


def test_help_shows_defaults(capsys):
    assert run(["calibrate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--recipe NAME|FILE", "[default: int8-static]", "--workers K", "[default: 1]",
                     "--shard I/N", "[default: 0/1]", "--method [minmax|percentile|entropy|mse]",
                     "[default: 2048]"):
        assert fragment in text, fragment


def test_bare_qtool_prints_the_help_and_exits_2():
    result = qtool()
    assert result.returncode == 2
    assert result.stderr.startswith("Usage: qtool [OPTIONS] COMMAND"), result.stderr
    assert "error:" not in result.stderr
    for command in COMMANDS:
        assert command in result.stderr


def test_a_command_without_arguments_prints_its_help_and_exits_2(capsys):
    assert run(["convert"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: qtool convert [OPTIONS] MODEL"), err
    assert "error:" not in err


def test_help_exits_0_on_stdout():
    result = qtool("--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: qtool")


# -- output in a CI log --------------------------------------------------------------------


def test_log_output_is_not_wrapped(tmp_path):
    """A warning longer than 80 columns stays one line when stderr is not a terminal."""
    out = tmp_path / "int8.onnx"
    result = qtool("convert", MODEL, "-o", out, "--calib", _table(tmp_path), "--activation-type", "int8")
    assert result.returncode == 0, result.stderr
    warning = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1, result.stderr
    assert warning[0].endswith("--activation-type uint8 is the fast choice on this CPU"), warning
    assert len(warning[0]) > 200
    assert "…" not in result.stderr


def test_columns_still_sets_the_width(tmp_path):
    out = tmp_path / "int8.onnx"
    result = qtool("convert", MODEL, "-o", out, "--calib", _table(tmp_path), "--activation-type",
                   "int8", env=dict(os.environ, COLUMNS="60"))
    assert result.returncode == 0, result.stderr
    assert max(len(ln) for ln in result.stderr.splitlines()) <= 60


def _table(tmp_path: Path) -> Path:
    table = tmp_path / "table.json"
    if not table.exists():
        assert run(["calibrate", str(MODEL), "--data", str(CALIB), "-o", str(table), "-q"]) == 0
    return table


# -- progress ------------------------------------------------------------------------------


def test_progress_counts_in_the_callers_unit(tmp_path):
    result = qtool("calibrate", MODEL, "--data", CALIB, "-o", tmp_path / "t.json", "--samples", "16")
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stderr.splitlines() if "calibrating" in ln)
    assert "16/16 samples" in line and "samples/s" in line, line


def test_progress_without_a_unit_shows_no_count_or_rate(tmp_path):
    """`convert` counts weight bytes or nodes through a bar opened without a unit: it must not
    print them as samples (it printed "534528/? 276010781.7 samples/s")."""
    result = qtool("convert", MODEL, "-o", tmp_path / "int4.onnx", "--bits", "4", "--block-size", "32")
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stderr.splitlines() if "converting" in ln)
    assert "samples" not in line and "/?" not in line and "/s" not in line, line


def test_progress_total_learned_late_and_bytes_in_mb(capsys, monkeypatch):
    from qtool.cli.app import progress, settings

    monkeypatch.setattr(settings, "quiet", False)
    with progress("packing", None, "B") as advance:
        advance(0, total=4_000_000)
        advance(3_000_000)
        advance(1_000_000)
    err = capsys.readouterr().err
    assert "4.0/4.0 MB" in err and "100%" in err, err


# -- Ctrl-C --------------------------------------------------------------------------------


def _wide_mlp(path: Path, data: Path, width: int = 2048, layers: int = 2) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) * 0.02).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    data.mkdir()
    for i in range(8):
        np.save(data / f"s{i}.npy", rng.standard_normal((4, width)).astype(np.float32))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process and its threads (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ctrl_c_stops_fast_with_one_line_and_writes_nothing(tmp_path):
    """GPTQ quantizes tensors in worker threads that cannot be interrupted; Ctrl-C used to
    wait for them (13-19 s on a 67 MB model) and printed nothing."""
    model, data, out = tmp_path / "mlp.onnx", tmp_path / "d", tmp_path / "out" / "q.onnx"
    # 8 layers: GPTQ got about 3x faster (qtool.quant.gptq), 2 could finish before the signal
    _wide_mlp(model, data, layers=8)
    out.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "qtool", "convert", str(model), "-o", str(out), "--bits", "4",
                             "--algorithm", "gptq", "--data", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # Past start-up and statistics, GPTQ running in worker threads: judged by the CPU time the
    # process has used (about 2 s to import, 1-2 s of statistics), not by the wall clock,
    # which a loaded machine stretches many times over.
    deadline = time.monotonic() + 120
    while _cpu_seconds(proc.pid) < 4.5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    start = time.perf_counter()
    _, err = proc.communicate(timeout=60)
    stopped = time.perf_counter() - start
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted, nothing was written", err
    assert "Traceback" not in err
    assert stopped < 5, f"took {stopped:.1f} s to stop"
    assert list(out.parent.iterdir()) == []


# -- exit codes as the README's table says -------------------------------------------------


def _readme_exit_codes() -> dict[int, str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Exit codes", 1)[1].split("\n\n", 2)[1]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (.*) \|$", table, re.M)}


def test_missing_inputs_exit_1_as_documented(tmp_path, capsys):
    codes = _readme_exit_codes()
    assert "missing" in codes[1] and "data folder" in codes[1] and "labels file" in codes[1]
    cases = [
        ["calibrate", MODEL, "--data", tmp_path / "nope", "-o", tmp_path / "t.json"],
        ["eval", MODEL, "--data", tmp_path / "nope"],
        ["eval", MODEL, "--data", EVAL, "--labels", tmp_path / "nope.txt"],
        ["tune", MODEL, "--data", tmp_path / "nope", "-o", tmp_path / "t.onnx"],
        ["inspect", tmp_path / "nope.onnx"],
    ]
    for argv in cases:
        code = run([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 1, (argv, err)
        assert err.startswith("error:") and "\nhint:" in err, err


def test_usage_errors_exit_2_as_documented(tmp_path, capsys):
    codes = _readme_exit_codes()
    assert "cannot apply" in codes[2] and "recipe" in codes[2]
    assert codes[130].startswith("interrupted")
    cases = [
        (["calibrate", MODEL, "--data", CALIB, "-o", tmp_path / "t.json", "--samples", "-5"], "--samples must be >= 0"),
        (["calibrate", MODEL, "--data", CALIB, "-o", tmp_path / "t.json", "--percentile", "99"], "--percentile applies to --method percentile"),
        (["calibrate", MODEL, "--data", CALIB, "-o", tmp_path / "t.json", "--method", "minmax", "--bins", "512"], "--bins applies"),
        (["calibrate", MODEL, "--data", CALIB, "-o", tmp_path / "t.json", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["tune", MODEL, "--data", CALIB, "-o", tmp_path / "t.onnx", "--limit", "-1"], "--limit must be >= 0"),
        (["tune", MODEL, "--data", CALIB, "-o", tmp_path / "t.onnx", "--max-drop", "-1"], "--max-drop must be >= 0"),
    ]
    for argv, fragment in cases:
        code = run([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert fragment in err and "\nhint:" in err, err
        assert not (tmp_path / "t.json").exists()


def test_ctrl_c_during_start_up_is_one_line_too(tmp_path):
    """Importing the CLI takes seconds on a loaded machine; an interrupt then used to print
    a traceback from the middle of an import."""
    code = ("import builtins\n"
            "real = builtins.__import__\n"
            "def interrupting(name, *a, **k):\n"
            "    if name == 'qtool.cli':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = interrupting\n"
            "from qtool.__main__ import run\n"
            "run()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, "convert"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 130
    assert proc.stderr.strip() == "interrupted, nothing was written"
