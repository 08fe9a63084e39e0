"""Scale-out on one machine: 1 vs 2 workers, local processes vs Ray, and a simulated cluster.

    QTOOL_BENCH_CACHE=/work/bench_cache python bench/scale.py      # writes bench/results/scale.md
    python bench/scale.py --only calibration --rounds 1

Workloads (each result compared bit for bit across the executors that ran it):

- calibration: resnet18_synth (ResNet-18-shaped, 224x224), entropy, 1024 samples. The zoo
  has 256 calibration samples; the other 768 are generated from them (flipped left-right,
  up-down, both), written once under the bench work folder.
- tune's sensitivity: SmolLM2-135M, 4-bit candidates per role group, perplexity on a few
  search samples (``--tune-limit``), ``uniform=False``; the whole tune is timed, and the
  sensitivity phase is most of it.
- gptq: SmolLM2-135M to 4 bits (blocks of 128) from its 32 calibration windows; the
  statistics run here, the 211 layers on the executor; the written initializers compared.
- cluster: 2 Ray nodes started here (``ray start --head --num-cpus 1`` and ``ray start
  --address ... --num-cpus 1``, each with its own object store), the driver connecting
  through Ray Client (``ray://127.0.0.1:PORT``); calibration by path and with shipped data,
  compared with the single-process table.

Configurations: ``1 process`` (this process, onnxruntime on every core), ``local x2``
(two worker processes, one onnxruntime thread each), ``ray x2`` (a private 2-CPU Ray
instance). Rounds alternate the configurations (the machine is shared); medians are quoted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

WORK = Path(os.environ.get("QTOOL_SCALE_WORK", Path(tempfile.gettempdir()) / "qtool-scale"))
RAY_BIN = str(Path(sys.executable).with_name("ray"))


def _zoo(name: str, split: str) -> tuple[Path, Path]:
    import zoo_data

    model, data = zoo_data.model_path(name), zoo_data.data_dir(name, split)
    if not model.exists() or not data.exists():
        raise SystemExit(f"{name} is not prepared: python bench/zoo.py prepare --only {name}")
    return model, data


def calib_1024(samples: int) -> tuple[Path, Path]:
    """resnet18_synth and a folder of ``samples`` calibration samples (real, then flipped)."""
    import numpy as np

    model, real = _zoo("resnet18_synth", "calib")
    files = sorted(real.glob("*.npy"))
    if len(files) >= samples:
        return model, real
    folder = WORK / f"resnet18_calib_{samples}"
    if len(list(folder.glob("*.npy"))) == samples:
        return model, folder
    folder.mkdir(parents=True, exist_ok=True)
    flips = [lambda a: a, lambda a: a[..., ::-1], lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, ::-1]]
    for i in range(samples):
        a = np.load(files[i % len(files)])
        np.save(folder / f"{i:05d}.npy", np.ascontiguousarray(flips[(i // len(files)) % 4](a)))
    return model, folder


def table_key(table) -> str:
    path = WORK / "t.json"
    table.save(path)
    doc = json.loads(path.read_text())
    return json.dumps(doc["tensors"], sort_keys=True)


def run_calibration(executor_name: str, model: Path, data: Path, samples: int) -> tuple[float, str]:
    from qtool.config import load_recipe
    from qtool.executors.calibrate import calibrate_sharded
    from qtool.pipeline import calibrate

    recipe = load_recipe("int8-static").override("calibration", method="entropy", samples=samples)
    start = time.perf_counter()
    if executor_name == "1 process":
        table = calibrate(model, data, recipe, threads=0)
    else:
        table = calibrate_sharded(model, data, recipe, EXECUTORS[executor_name], threads=1)
    return time.perf_counter() - start, table_key(table)


TUNE_METRIC = {"smollm2": ("perplexity", "10%"), "minilm": ("cosine", "0.01")}


def run_tune(executor_name: str, limit: int, name: str) -> tuple[float, str]:
    from qtool.tuning import tune

    model, calib = _zoo(name, "calib")
    _, held = _zoo(name, "eval")
    out = WORK / f"tuned-{executor_name.replace(' ', '')}" / f"{name}.tuned.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    metric, drop = TUNE_METRIC[name]
    start = time.perf_counter()
    result = tune(model, calib, out, eval_data=held, metric=metric, max_drop=drop, bits="4",
                  limit=limit, uniform=False, executor=EXECUTORS.get(executor_name))
    seconds = time.perf_counter() - start
    key = json.dumps([(c.label, c.metric, c.sqnr_db) for c in result.candidates] + [result.bits])
    shutil.rmtree(out.parent, ignore_errors=True)
    return seconds, key + f"|{result.measured} measured"


def run_gptq(executor_name: str) -> tuple[float, str]:
    import hashlib

    from qtool.config import load_recipe
    from qtool.model import load
    from qtool.pipeline import convert_model, plan_for, prepare

    model, calib = _zoo("smollm2", "calib")
    recipe = load_recipe("int4-weight-only").override("weight_only", algorithm="gptq", block_size=128)
    start = time.perf_counter()
    prepared = prepare(load(model), model, recipe, plan_for(recipe), data=calib)
    converted = convert_model(prepared.model, recipe, activations=prepared.activations, copy=False,
                              executor=EXECUTORS.get(executor_name))
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name, value in sorted(converted.model.graph.initializers.items()):
        digest.update(name.encode() + value.const_value.numpy().tobytes())
    return seconds, digest.hexdigest()


EXECUTORS: dict = {}


def open_executors(names: list[str]) -> None:
    from qtool.executors import LocalExecutor, make_executor

    if "local x2" in names:
        EXECUTORS["local x2"] = LocalExecutor(2)
    if "ray x2" in names:
        import ray

        # "local": a private instance, even while a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        EXECUTORS["ray x2"] = make_executor("ray")


def close_executors() -> None:
    for ex in EXECUTORS.values():
        ex.close()
    EXECUTORS.clear()
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


def measure(workload, names: list[str], rounds: int, *args) -> dict:  # noqa: ANN001
    """{name: {"seconds": [...], "key": result identity}}; the first round is a warm-up of
    each executor's workers (imports, pool start), timed separately."""
    out = {n: {"seconds": [], "key": None, "first": None} for n in names}
    for r in range(rounds + 1):
        order = names if r % 2 == 0 else list(reversed(names))
        for n in order:
            seconds, key = workload(n, *args)
            print(f"  {workload.__name__} {n} round {r}: {seconds:.1f} s", flush=True)
            if r == 0:
                out[n]["first"] = seconds
            else:
                out[n]["seconds"].append(seconds)
            out[n]["key"] = out[n]["key"] or key
            if out[n]["key"] != key:
                raise SystemExit(f"{workload.__name__}: {n} gave a different result between rounds")
    return out


# -- the simulated cluster --------------------------------------------------------------


def start_cluster(nodes: int, port: int) -> list[subprocess.Popen]:
    """``nodes`` Ray nodes on this machine, one CPU each, each its own raylet and object
    store; ``ray start --block`` keeps each in the foreground so we stop exactly those."""
    common = ["--num-cpus", "1", "--object-store-memory", str(300 * 1024 * 1024), "--block"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    procs = [subprocess.Popen([RAY_BIN, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                               "--disable-usage-stats", *common],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(8)
    for _ in range(nodes - 1):
        procs.append(subprocess.Popen([RAY_BIN, "start", "--address", f"127.0.0.1:{port}", *common],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(8)
    return procs


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):  # workers first, the head last
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def cluster_run(model: Path, data: Path, samples: int, nodes: int) -> dict:
    """Calibration on the started cluster, the driver joining it at the head's GCS address
    (Ray Client, ``ray://``, timed out here under load: the same tasks either way)."""
    from qtool.config import load_recipe
    from qtool.executors import make_executor
    from qtool.executors.calibrate import calibrate_sharded

    recipe = load_recipe("int8-static").override("calibration", method="entropy", samples=samples)
    procs = start_cluster(nodes, 6391)
    if procs[0].poll() is not None:
        stop_cluster(procs)
        raise SystemExit("the Ray head did not start (run its `ray start --head` by hand to see why)")
    try:
        os.environ["RAY_ADDRESS"] = "127.0.0.1:6391"
        with make_executor("ray") as ex:
            # Wait for every node: with one CPU per node and per task, the shards then run
            # one per node, at the same time.
            deadline = time.monotonic() + 180
            while len([n for n in ex.ray.nodes() if n.get("Alive")]) < nodes and time.monotonic() < deadline:
                time.sleep(2)
            ex.workers = max(1, int(ex.ray.cluster_resources().get("CPU", 1)))
            described = ex.describe()
            start = time.perf_counter()
            by_path = table_key(calibrate_sharded(model, data, recipe, ex, shards=nodes, threads=1))
            path_s = time.perf_counter() - start
            start = time.perf_counter()
            shipped = table_key(calibrate_sharded(model, data, recipe, ex, shards=nodes, threads=1, ship=True))
            ship_s = time.perf_counter() - start
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        stop_cluster(procs)
    return {"cluster": described, "by_path": (path_s, by_path), "shipped": (ship_s, shipped)}


def write_report(path: Path, results: dict, args) -> None:  # noqa: ANN001
    lines = ["# Scale-out: local processes vs Ray, and a simulated cluster", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other engineers "
             f"(load average {os.getloadavg()[0]:.1f} at the end); Python {platform.python_version()}. "
             "`python bench/scale.py`: each configuration runs once (the first run, with its workers' start-up), "
             "then the timed rounds in alternating order; medians of the timed rounds (of the first run when "
             "there are none).", ""]
    for name, title in (("calibration", f"Calibration: resnet18_synth, entropy, {args.samples} samples"),
                        ("tune", f"tune (sensitivity, 4-bit candidates, --limit "
                                 f"{results.get('tune_limit', args.tune_limit)}, uniform off, "
                                 f"{results.get('tune_rounds', args.rounds)} timed round(s) after the first): "
                                 f"{results.get('tune_model', args.tune_model)}"),
                        ("gptq", f"gptq: SmolLM2-135M, 4 bits, blocks of 128, 32 calibration windows "
                                 f"(statistics in this process, layers on the executor; "
                                 f"{results.get('gptq_rounds', args.rounds)} timed round(s) after the first)")):
        if name not in results:
            continue
        res = results[name]

        def med(r: dict) -> float:  # rounds 0: the first (only) run
            return statistics.median(r["seconds"]) if r["seconds"] else r["first"]

        base = med(res["1 process"])
        local = med(res["local x2"]) if "local x2" in res else None
        lines += [f"## {title}", "", "| executor | first run (s, with worker start-up) | median (s) | speed-up vs 1 process | "
                  "vs local x2 | identical result |", "|---|---:|---:|---:|---:|---|"]
        for n, r in res.items():
            m = med(r)
            vs_local = f"{m / local:.2f}x" if local and n != "1 process" else ""
            lines.append(f"| {n} | {r['first']:.1f} | {m:.1f} | {base / m:.2f}x | {vs_local} | "
                         f"{'yes' if r['key'] == res['1 process']['key'] else 'NO'} |")
        lines.append("")
    if "cluster" in results:
        c = results["cluster"]
        same = c["by_path"][1] == c["shipped"][1] == results.get("cluster_reference")
        lines += ["## Simulated cluster", "",
                  f"{args.nodes} Ray nodes on this machine ({c['cluster']}), each `--num-cpus 1` with its own "
                  f"300 MB object store; the driver joins at the head's address; calibration of "
                  f"{results.get('cluster_samples', args.samples)} samples, one shard per node.", "",
                  "| data | seconds | table identical to 1 process |", "|---|---:|---|",
                  f"| by path (shared storage) | {c['by_path'][0]:.1f} | {'yes' if same else 'NO'} |",
                  f"| shipped through the object store | {c['shipped'][0]:.1f} | {'yes' if same else 'NO'} |", ""]
    lines += [MODEL_TEXT]
    path.write_text("\n".join(lines) + "\n")


MODEL_TEXT = """## How each workload scales to N nodes

- **Calibration** shards by batch: node i observes every N-th batch. Serial: the driver's
  plan (load + pre-process the model once to size the shards) and the merge (per tensor, add
  N histograms of `bins` counts: milliseconds). Over the network: the model to each node once
  (or read from shared storage), the samples (by path: each node reads only its 1/N; shipped:
  the driver reads everything and sends 1/N to each node), and back one table per shard
  (~16 KiB per observed tensor at 2048 bins). The model pass over the samples, the part that
  costs, divides by N; the per-node fixed cost (worker start, session creation, pre-processing
  the graph) does not, so shards smaller than a few hundred samples gain little.
- **tune's sensitivity** fans out candidates: each (group, precision) is built and scored on
  a worker. Serial: the float reference on the search split, the greedy chain search (each
  prefix depends on the previous) and the held-out checks (each split over the N workers by
  sample). Over the network: once per node, the prepared model and the search split with the
  float model's first outputs (for an LLM the logits dominate: samples x tokens x vocabulary
  x 4 bytes, so keep `--limit` small); per candidate only the bit assignment goes out and a
  score (three floats) comes back. Speed-up is bounded by candidates / N waves and by the
  serial search + verify.
- **eval** shards batches like calibration; each batch's accumulators (counts, sums, max) come
  back and are added in batch order, so the merge is exact and tiny. Latency is timed on one
  worker, alone, after the shards: it measures a node, not the cluster.
- **batch** runs one model per task: embarrassingly parallel up to the number of models;
  its longest model is the floor. Models, data and outputs go by path (shared storage).
- **GPTQ/AWQ** fan out per layer: qtool records every layer's input statistics (X^T X,
  sum |X|) from the float model in one pass, so given those the layers are independent.
  Serial: that statistics pass (the float model over the calibration windows, on the driver)
  and rewriting the graph. Over the network: per layer its fp32 weight and its K x K
  statistics out (SmolLM2: 1.3-3.5 MB of weight and 2.7-19 MB of float64 statistics per layer),
  its codes and scales back; a few layers per worker are in flight at a time. The quantize
  phase divides by N; the statistics pass does not (fan the windows out as calibration does
  to go further).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the first (0: the first run only)")
    ap.add_argument("--tune-limit", type=int, default=4)
    ap.add_argument("--tune-model", choices=sorted(TUNE_METRIC), default="smollm2")
    ap.add_argument("--cluster-samples", type=int, default=0, help="calibration samples on the cluster [default: --samples]")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--only", choices=("calibration", "tune", "gptq", "cluster"), action="append")
    ap.add_argument("--keep", action="store_true", help="keep the other workloads' results of the last run "
                    "(the work folder's scale.json) in the report")
    ap.add_argument("--from", dest="sources", type=Path, action="append",
                    help="only write the report, from these saved results (scale.json files, merged in order)")
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "scale.md")
    args = ap.parse_args()
    if args.sources:
        merged: dict = {}
        for source in args.sources:
            merged.update(json.loads(source.read_text()))
        write_report(args.output, merged, args)
        print(args.output.read_text())
        return
    only = args.only or ["calibration", "tune", "gptq", "cluster"]
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    names = ["1 process", "local x2", "ray x2"]
    saved = WORK / "scale.json"
    results: dict = json.loads(saved.read_text()) if args.keep and saved.exists() else {}
    if "calibration" in only or "cluster" in only:
        model, data = calib_1024(args.samples)
    open_executors(names)
    try:
        if "calibration" in only:
            results["calibration"] = measure(run_calibration, names, args.rounds, model, data, args.samples)
            saved.write_text(json.dumps(results, default=str))
        if "tune" in only:
            results["tune"] = measure(run_tune, names, args.rounds, args.tune_limit, args.tune_model)
            results.update(tune_model=args.tune_model, tune_limit=args.tune_limit, tune_rounds=args.rounds)
            saved.write_text(json.dumps(results, default=str))
        if "gptq" in only:
            results["gptq"] = measure(run_gptq, names, args.rounds)
            results["gptq_rounds"] = args.rounds
            saved.write_text(json.dumps(results, default=str))
    finally:
        close_executors()
    if "cluster" in only:
        n = args.cluster_samples or args.samples
        if "calibration" in results and n == args.samples:
            results["cluster_reference"] = results["calibration"]["1 process"]["key"]
        else:
            results["cluster_reference"] = run_calibration("1 process", model, data, n)[1]
        results["cluster"] = cluster_run(model, data, n, args.nodes)
        results["cluster_samples"] = n
    saved.write_text(json.dumps(results, default=str))
    write_report(args.output, results, args)
    print(args.output.read_text())


if __name__ == "__main__":
    main()
