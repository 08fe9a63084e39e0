"""``qtool batch``: many models through convert, eval and gates as one job.

A manifest (TOML or JSON) lists the models; a folder means every ``*.onnx`` in it. Each
model is one task on the executor: convert (the recipe, calibrated on ``data`` or with a
``calib`` table, the guard on when data is given), then eval of the result against the float
model on ``eval_data`` with the gates. A model whose convert or eval fails is reported, not
fatal: the other models still run, and the batch's exit code sums them up (1 if any model
errored, else 3 if any gate failed or convert refused, else 0).

Manifest::

    [defaults]                      # applies to every model (each may override)
    recipe = "int8-static"
    data = "calib/"                 # paths are relative to the manifest's folder
    eval_data = "eval/"
    max_drop = "1%"

    [[model]]
    name = "resnet"                 # optional: the file's stem
    path = "models/resnet.onnx"
    min_sqnr = 20

Outputs land in the output folder as ``NAME.onnx`` and ``NAME.eval.json``; on a cluster the
model, data and output paths must be on storage every node sees.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qtool.errors import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK, GateFailed, QtoolError, UsageError

PATH_KEYS = ("path", "data", "calib", "eval_data")


@dataclass
class Job:
    """One model's settings (the manifest's keys)."""

    name: str
    path: str
    output: str = ""
    recipe: str | None = None
    data: str | None = None
    calib: str | None = None
    eval_data: str | None = None
    metric: list[str] = field(default_factory=list)
    max_drop: str | float | None = None
    min_sqnr: str | float | None = None
    guard: bool = True
    threads: int = 0


KEYS = {f.name for f in fields(Job)} - {"output"}


def read_jobs(source: str | os.PathLike, out_dir: str | os.PathLike, defaults: dict) -> list[Job]:
    """The jobs of a manifest (.toml/.json) or a folder of .onnx files; ``defaults`` (from the
    command line) apply first, then the manifest's [defaults], then each [[model]]."""
    source, out_dir = Path(source), Path(out_dir)
    if source.is_dir():
        models = sorted(source.glob("*.onnx"))
        if not models:
            raise UsageError(f"{source} holds no .onnx model", "pass a folder of models or a manifest")
        entries, shared, base = [{"path": str(m)} for m in models], {}, Path.cwd()
    elif source.is_file():
        doc = _read_manifest(source)
        entries, shared, base = doc.get("model", []), doc.get("defaults", {}), source.parent
        unknown = set(doc) - {"defaults", "model"}
        if unknown or not isinstance(entries, list) or not entries:
            raise UsageError(f"{source}: a manifest has [defaults] and one or more [[model]] tables",
                             "see `qtool batch --help` for the format")
    else:
        raise UsageError(f"no manifest or folder at {source}", "pass a .toml/.json manifest or a folder of .onnx")
    jobs = [_job({**defaults, **_paths(shared, base), **_paths(e, base)}, out_dir) for e in entries]
    names = [j.name for j in jobs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"two models are named {repeated[0]!r}", "give each [[model]] a distinct name")
    return jobs


def _read_manifest(path: Path) -> dict:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        import tomllib

        return tomllib.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot read the manifest {path}: {exc}", "fix its syntax (TOML or JSON)") from None


def _paths(entry: dict, base: Path) -> dict:
    unknown = sorted(set(entry) - KEYS)
    if unknown:
        raise UsageError(f"unknown manifest key {unknown[0]!r}", f"known keys: {', '.join(sorted(KEYS))}")
    return {k: (str(base / v) if k in PATH_KEYS and v is not None else v) for k, v in entry.items()}


def _job(entry: dict, out_dir: Path) -> Job:
    from qtool.model import check_output_path

    if not entry.get("path"):
        raise UsageError("a [[model]] has no path", 'add path = "model.onnx"')
    entry.setdefault("name", Path(entry["path"]).stem)
    if isinstance(entry.get("metric"), str):
        entry["metric"] = [entry["metric"]]
    job = Job(**entry, output=str(out_dir / f"{entry['name']}.onnx"))
    check_output_path(job.output, job.path)
    return job


def run_job(job: Job) -> dict:
    """Run on a worker: convert, then eval with the gates; a row for the summary table."""
    import qtool

    start = time.perf_counter()
    row = {"name": job.name, "model": job.path, "output": job.output, "status": "error", "detail": "",
           "float_bytes": None, "bytes": None, "metric": None, "value": None, "drop": None, "sqnr_db": None}
    try:
        report = qtool.convert(job.path, job.output, job.recipe, data=job.data, calib=job.calib,
                               guard=job.guard and job.data is not None)
        row.update(float_bytes=report["size_bytes"]["input"], bytes=report["size_bytes"]["output"],
                   recipe=report["recipe"], status="converted")
        if job.eval_data is not None:
            ev = qtool.evaluate(job.output, job.eval_data, reference=job.path, metrics=job.metric,
                                max_drop=job.max_drop, min_sqnr=job.min_sqnr, threads=job.threads)
            Path(job.output).with_suffix(".eval.json").write_text(ev.to_json() + "\n")
            if ev.metrics:
                m = ev.metrics[0]
                row.update(metric=m["name"], value=m["candidate"], drop=m["drop"])
            sqnrs = [o["sqnr_db"] for o in ev.outputs if o["sqnr_db"] is not None]
            row["sqnr_db"] = min(sqnrs) if sqnrs else None
            failed = [g for g in ev.gates if not g["passed"]]
            row["status"] = "gate failed" if failed else "passed"
            row["detail"] = "; ".join(_gate_text(g) for g in failed)
    except GateFailed as exc:
        row.update(status="refused", detail=exc.message)
    except QtoolError as exc:
        row.update(status="error", detail=exc.message)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _gate_text(gate: dict) -> str:
    """``--min-sqnr: logits 27.7 (limit 60)`` for a failed gate of an eval report."""
    value = "n/a" if gate["value"] is None else f"{gate['value']:.4g}"
    return f"--{gate['gate']} failed: {gate['subject']} {value} (limit {gate['threshold']:.4g})"


def run_batch(jobs: list[Job], executor, on_done=None) -> list[dict]:  # noqa: ANN001
    """Every job on ``executor``; the rows in manifest order."""
    from qtool.executors import Task

    return executor.map([Task(f"model {j.name}", run_job, (j,)) for j in jobs], on_done)


def batch_exit_code(rows: list[dict]) -> int:
    """1 if any model errored, else 3 if a gate failed or convert refused, else 0."""
    if any(r["status"] == "error" for r in rows):
        return EXIT_ERROR
    if any(r["status"] in ("gate failed", "refused") for r in rows):
        return EXIT_GATE_FAILED
    return EXIT_OK


def job_dict(job: Job) -> dict:
    return asdict(job)
