"""qtool.executors: the same answer on 1 process, 2 local processes and Ray.

Calibration tables, tune's sensitivities and held-out checks, and eval metrics must be bit-
identical whatever executor ran them; a worker killed mid-run is retried to the same result;
a failing shard names itself; Ctrl-C ends the tasks the run started; without Ray the error
names the extra. One Ray instance (2 CPUs) serves the whole module.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import onnx_model, require_extra, value_info
from onnx import TensorProto, helper, numpy_helper

from qtool.config import load_recipe
from qtool.errors import UsageError
from qtool.eval import evaluate
from qtool.eval.sharded import evaluate_sharded
from qtool.executors import InlineExecutor, LocalExecutor, ShardError, Task, make_executor
from qtool.executors.calibrate import calibrate_shard, calibrate_sharded
from qtool.pipeline import calibrate

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def local2():
    """Two local worker processes, started once for the module (a pool start costs seconds)."""
    with LocalExecutor(2) as executor:
        yield executor


@pytest.fixture(scope="module")
def ray_executor():
    ray = require_extra("ray", "ray")
    # Workers import qtool and this module (the crash helper) by name.
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    # "local": a private instance even when this machine runs a `ray start` cluster.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    executor = make_executor("ray")
    yield executor
    ray.shutdown()


def cnn(path: Path) -> str:
    """x[N,2,8,8] -> Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> MatMul -> y[N,6]."""
    w1 = numpy_helper.from_array(RNG.standard_normal((4, 2, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(RNG.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(RNG.standard_normal((4, 6)).astype(np.float32), "w3")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w3"], ["y"], name="fc")]
    onnx.save(onnx_model(nodes, [value_info("x", ["N", 2, 8, 8])], [value_info("y", ["N", 6])], [w1, w2, w3]),
              path)
    return str(path)


def images(folder: Path, n: int = 24, labels: bool = True) -> str:
    folder.mkdir()
    for i in range(n):
        np.save(folder / f"s{i:03d}.npy", RNG.standard_normal((1, 2, 8, 8)).astype(np.float32))
    if labels:
        (folder / "labels.txt").write_text("\n".join(str(int(v)) for v in RNG.integers(0, 6, n)) + "\n")
    return str(folder)


def crash_once(marker: str, fn, *args):  # noqa: ANN001, ANN002, ANN201
    """The first attempt kills its own worker process (as an OOM kill would); later ones run."""
    if not os.path.exists(marker):
        Path(marker).write_text("killed once")
        os._exit(1)
    return fn(*args)


def sleep_forever(pid_file: str) -> None:
    # written whole or not at all: the test reads it as soon as the name appears
    tmp = Path(f"{pid_file}.{os.getpid()}.tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, pid_file)
    time.sleep(60)


def quick(value: int) -> int:
    return value * 2


def table_doc(table, path: Path) -> dict:
    table.save(path)
    doc = json.loads(path.read_text())
    return {k: doc[k] for k in ("tensors", "samples", "method", "params")}


# -- calibration ------------------------------------------------------------------------


def test_calibration_is_identical_on_one_two_processes_and_ray(tmp_path, local2, ray_executor):
    model, data = cnn(tmp_path / "m.onnx"), images(tmp_path / "d", labels=False)
    recipe = load_recipe("int8-static").override("calibration", method="entropy", batch_size=2)
    one = table_doc(calibrate(model, data, recipe), tmp_path / "one.json")
    two = table_doc(calibrate_sharded(model, data, recipe, local2), tmp_path / "two.json")
    by_path = table_doc(calibrate_sharded(model, data, recipe, ray_executor), tmp_path / "ray.json")
    shipped = table_doc(calibrate_sharded(model, data, recipe, ray_executor, shards=3, ship=True),
                        tmp_path / "ship.json")
    assert one["samples"] == 24
    assert one == two == by_path == shipped


def test_a_killed_worker_is_retried_to_the_same_table(tmp_path, local2, ray_executor):
    model, data = cnn(tmp_path / "m.onnx"), images(tmp_path / "d", labels=False)
    recipe = load_recipe("int8-static").override("calibration", method="minmax")
    undisturbed = table_doc(calibrate(model, data, recipe), tmp_path / "one.json")
    for name, executor in (("local", local2), ("ray", ray_executor)):
        marker = tmp_path / f"{name}.killed"
        tasks = [Task(f"calibration shard {i}/2", crash_once if i == 0 else calibrate_shard,
                      ((str(marker), calibrate_shard) if i == 0 else ()) + (model, data, recipe, (i, 2), 1))
                 for i in range(2)]
        from qtool.calibration import CalibrationTable

        merged = CalibrationTable.merge(executor.map(tasks))
        assert marker.exists()  # the first attempt did die
        assert table_doc(merged, tmp_path / f"{name}.json") == undisturbed, name


def test_a_failed_shard_names_itself(tmp_path, local2, ray_executor):
    model, data = cnn(tmp_path / "m.onnx"), images(tmp_path / "d", n=4, labels=False)
    np.save(Path(data) / "s003.npy", np.zeros((1, 3, 8, 8), np.float32))  # wrong channels, in shard 1
    recipe = load_recipe("int8-static")
    for executor in (local2, ray_executor):
        with pytest.raises(ShardError, match=r"calibration shard 1/2 failed: .*s003\.npy") as err:
            calibrate_sharded(model, data, recipe, executor, shards=2)
        assert err.value.hint


def test_calibrate_cli_executor_flags(tmp_path, capsys, monkeypatch):
    import qtool.hardware
    from qtool.cli import run

    model, data = cnn(tmp_path / "m.onnx"), images(tmp_path / "d", labels=False)
    single, two = tmp_path / "one.json", tmp_path / "two.json"
    assert run(["calibrate", model, "--data", data, "-o", str(single), "-q"]) == 0
    monkeypatch.setattr(qtool.hardware, "available_cores", lambda: 2)
    capsys.readouterr()
    assert run(["calibrate", model, "--data", data, "-o", str(two), "--executor", "local", "--workers", "2",
                "--ship-data", "-q"]) == 0
    # two local workers on two cores are said to be no faster, even with -q
    assert "warning: 2 local workers on 2 cores: one process already uses every core" in capsys.readouterr().err
    assert json.loads(single.read_text())["tensors"] == json.loads(two.read_text())["tensors"]
    monkeypatch.setattr(qtool.hardware, "available_cores", lambda: 8)
    assert run(["calibrate", model, "--data", data, "-o", str(two), "--workers", "2", "-q"]) == 0
    assert "local workers" not in capsys.readouterr().err
    assert run(["calibrate", model, "--data", data, "-o", str(two), "--ship-data", "-q"]) == 2
    assert run(["calibrate", model, "--data", data, "-o", str(two), "--executor", "slurm", "-q"]) == 2


# -- eval -------------------------------------------------------------------------------


def tiny_lm(path: Path, vocab: int = 11, dim: int = 6) -> str:
    """input_ids[N,S] -> Gather(embedding) -> MatMul -> logits[N,S,V]."""
    emb = numpy_helper.from_array(RNG.standard_normal((vocab, dim)).astype(np.float32), "emb")
    out = numpy_helper.from_array(RNG.standard_normal((dim, vocab)).astype(np.float32), "out")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "out"], ["logits"], name="head")]
    onnx.save(onnx_model(nodes, [value_info("input_ids", ["N", "S"], TensorProto.INT64)],
                         [value_info("logits", ["N", "S", vocab])], [emb, out]), path)
    return str(path)


def report_numbers(report) -> str:
    doc = report.to_dict()
    return json.dumps({"metrics": doc["metrics"], "outputs": doc["outputs"], "samples": doc["data"]["samples"]})


def test_eval_metrics_are_identical_on_one_two_processes_and_ray(tmp_path, local2, ray_executor):
    from qtool import convert

    model, data = cnn(tmp_path / "m.onnx"), images(tmp_path / "d", n=22)
    cand, table = tmp_path / "c.onnx", tmp_path / "t.json"
    calibrate(model, data, load_recipe("int8-static")).save(table)
    convert(model, cand, "int8-static", calib=table, guard=False)
    lm = tiny_lm(tmp_path / "lm.onnx")
    tokens = tmp_path / "tok"
    tokens.mkdir()
    for i in range(9):
        np.savez(tokens / f"t{i}.npz", input_ids=RNG.integers(0, 11, (1, 7)).astype(np.int64))
    cases = [(str(cand), data, {"reference": model, "batch_size": 4}),
             (lm, str(tokens), {"reference": lm, "metrics": ["perplexity"], "batch_size": 2})]
    for candidate, folder, kwargs in cases:
        one = evaluate(candidate, folder, **kwargs)
        two = evaluate_sharded(candidate, folder, executor=local2, **kwargs)
        on_ray = evaluate_sharded(candidate, folder, executor=ray_executor, shards=3, ship=True, **kwargs)
        assert report_numbers(one) == report_numbers(two) == report_numbers(on_ray)
        assert on_ray.data["executor"]["latency"].startswith("measured on one worker")
    assert one.metrics[0]["name"] == "perplexity" and np.isfinite(one.metrics[0]["candidate"])
    with pytest.raises(UsageError, match="--diagnose"):
        evaluate_sharded(str(cand), data, executor=ray_executor, reference=model, diagnose=True)
    from qtool.cli import run

    # The CLI reaches the sharded pass (which refuses --diagnose before any worker starts).
    assert run(["eval", str(cand), "-r", model, "-d", data, "--executor", "local", "--diagnose", "-q"]) == 2
    assert run(["tune", model, "--data", data, "-o", str(tmp_path / "t.onnx"), "--executor", "yarn", "-q"]) == 2


# -- tune -------------------------------------------------------------------------------


def test_tune_sensitivities_and_verification_are_identical(tmp_path, local2, ray_executor):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_tune import mlp, samples

    from qtool.tuning import tune

    model = mlp(tmp_path / "mlp.onnx")
    data = samples(tmp_path / "data", model, n=16)
    results = {}
    for name, executor in (("one", None), ("local", local2), ("ray", ray_executor)):
        cache = tmp_path / f"cache-{name}"
        result = tune(model, data, tmp_path / f"{name}.onnx", metric="top1", max_drop="0.1", bits="8,4",
                      cache_dir=cache, uniform=False, executor=executor)
        entries = json.loads(next(cache.iterdir()).read_text())["entries"]
        measured = {k: (e["metric"], e["sqnr_db"], e["label"]) for k, e in entries.items()}
        checked = [(c.label, c.metric, c.sqnr_db, c.drop) for c in result.candidates]
        results[name] = (measured, checked, result.bits)
    assert len(results["one"][0]) >= 4  # 4 groups at 8 and 4 bits, plus the chain
    assert results["one"] == results["local"] == results["ray"]


# -- gptq / awq layers -------------------------------------------------------------------


class CountingExecutor(InlineExecutor):
    """Runs tasks here and records their names: proof the work went through an executor."""

    def __init__(self):
        super().__init__()
        self.names = []

    def map(self, tasks, on_done=None):
        self.names += [t.name for t in tasks]
        return super().map(tasks, on_done)


def test_gptq_and_awq_layers_are_identical_on_one_two_processes_and_ray(tmp_path, local2, ray_executor):
    from qtool.model import load
    from qtool.pipeline import convert_model, plan_for, prepare

    k = 64
    weights = [numpy_helper.from_array((RNG.standard_normal((k, k)) * 0.2).astype(np.float32), f"w{i}")
               for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="fc1"),
             helper.make_node("MatMul", ["h1", "w2"], ["y"], name="fc2")]
    model = tmp_path / "mlp.onnx"
    onnx.save(onnx_model(nodes, [value_info("x", ["N", k])], [value_info("y", ["N", k])], weights), model)
    data = tmp_path / "d"
    data.mkdir()
    for i in range(12):
        np.save(data / f"s{i:02d}.npy", RNG.standard_normal((4, k)).astype(np.float32))
    for algorithm in ("gptq", "awq"):
        recipe = load_recipe("int4-weight-only").override("weight_only", algorithm=algorithm, block_size=32)
        prepared = prepare(load(model), model, recipe, plan_for(recipe), data=data)
        written = {}
        for name, executor in (("one", None), ("local", local2), ("ray", ray_executor)):
            converted = convert_model(prepared.model, recipe, activations=prepared.activations, executor=executor)
            written[name] = {n: v.const_value.numpy().tobytes()
                             for n, v in converted.model.graph.initializers.items()}
        assert len(written["one"]) >= 6  # packed codes and scales of the three MatMuls
        assert written["one"] == written["local"] == written["ray"], algorithm
        counted = CountingExecutor()
        convert_model(prepared.model, recipe, activations=prepared.activations, executor=counted)
        assert counted.names == [f"{algorithm} fc0", f"{algorithm} fc1", f"{algorithm} fc2"]  # all fanned out
    from qtool.cli import run

    # gptq's layers on 2 local processes through the CLI; anything else cannot fan out
    out = tmp_path / "q.onnx"
    assert run(["convert", str(model), "-o", str(out), "--bits", "4", "--block-size", "32", "--algorithm", "gptq",
                "--data", str(data), "--workers", "2", "--no-guard", "-q"]) == 0 and out.exists()
    assert run(["convert", str(model), "-o", str(tmp_path / "r.onnx"), "--bits", "4", "--workers", "2", "-q"]) == 2


# -- batch ------------------------------------------------------------------------------


def test_local_workers_hold_blas_to_their_share_of_the_cores(monkeypatch):
    """Each of K local workers gets cores // K BLAS threads: left at its default, every
    worker's OpenBLAS took every core and spun (gptq's layers on 2 workers ran at 0.54x)."""
    from threadpoolctl import threadpool_info

    import qtool.hardware

    monkeypatch.setattr(qtool.hardware, "available_cores", lambda: 2)  # read when the pool starts
    with LocalExecutor(2) as executor:
        infos = executor.map([Task(f"blas {i}", threadpool_info, ()) for i in range(2)])
    blas = [pool for info in infos for pool in info if pool["user_api"] == "blas"]
    assert blas and {pool["num_threads"] for pool in blas} == {1}


def test_batch_runs_every_model_and_sums_up_in_one_exit_code(tmp_path, local2):
    from qtool.cli import run
    from qtool.executors import InlineExecutor
    from qtool.executors.batch import batch_exit_code, read_jobs, run_batch

    cnn(tmp_path / "a.onnx")
    calib, held = images(tmp_path / "calib", labels=False), images(tmp_path / "eval", n=8)
    (tmp_path / "zoo.toml").write_text(
        '[defaults]\ndata = "calib"\neval_data = "eval"\nrecipe = "int8-static"\nguard = false\n\n'
        '[[model]]\npath = "a.onnx"\nmax_drop = "100%"\n\n'
        '[[model]]\nname = "strict"\npath = "a.onnx"\nmin_sqnr = 200\n\n'
        '[[model]]\nname = "gone"\npath = "missing.onnx"\n')
    (tmp_path / "out").mkdir()
    jobs = read_jobs(tmp_path / "zoo.toml", tmp_path / "out", {})
    rows = run_batch(jobs, InlineExecutor())
    assert [r["status"] for r in rows] == ["passed", "gate failed", "error"]
    assert "min-sqnr" in rows[1]["detail"] and "missing.onnx" in rows[2]["detail"]
    assert batch_exit_code(rows) == 1 and batch_exit_code(rows[:2]) == 3 and batch_exit_code(rows[:1]) == 0
    assert (tmp_path / "out" / "a.eval.json").exists()
    again = run_batch(jobs, local2)  # the same rows from worker processes
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "a.onnx").rename(models / "a.onnx")
    assert run(["batch", str(models), "-o", str(tmp_path / "o2"), "--recipe", "int8-static", "--data", calib,
                "--eval-data", held, "--min-sqnr", "200", "-q"]) == 3
    assert run(["batch", str(tmp_path / "zoo.toml"), "-o", str(tmp_path / "o3"), "--executor", "ray",
                "--workers", "2", "-q"]) == 2


# -- failures, Ctrl-C, missing Ray ------------------------------------------------------


def interrupt_after_first(executor, tmp_path: Path) -> int:
    pid_file = tmp_path / f"{executor.kind}.pid"
    tasks = [Task("quick", quick, (1,)), Task("slow", sleep_forever, (str(pid_file),))]

    def stop(task):  # noqa: ANN001, ANN202 - Ctrl-C arriving while the run waits
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        executor.map(tasks, on_done=stop)
    return int(pid_file.read_text())


def gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_ends_the_tasks_it_started(tmp_path, local2, ray_executor):
    assert gone(interrupt_after_first(local2, tmp_path))
    pid = interrupt_after_first(ray_executor, tmp_path)
    if not gone(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the Ray task kept running after Ctrl-C")
    assert ray_executor.map([Task("after", quick, (3,))]) == [6]  # the cluster still serves


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UsageError) as err:
        from qtool.executors.rayexec import RayExecutor

        RayExecutor()
    assert "qtool[ray]" in err.value.hint
    with pytest.raises(UsageError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(UsageError, match="--workers"):
        make_executor("ray", workers=2)
