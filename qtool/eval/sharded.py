"""``eval`` over an executor: the dataset in shards, metrics merged exactly, latency on one worker.

Shard i of n evaluates every n-th batch from batch i. For each batch a worker records what
that batch adds to each accumulator (a fresh metric updated on the batch alone: correct/total
counts, perplexity's NLL sum and token count, a plugin's value sum; each output comparison's
signal, noise, cosine sums and argmax counts, and its largest error). The driver adds the
batches' contributions in batch order, which is the order one process adds them in, so every
metric is bit-identical to a single-process ``qtool eval`` whatever the shard count or the
order the workers finished in.

Latency is not sharded: it is timed on one worker, after the shards finished (so no shard
competes with it on that node), by the ordinary ``evaluate`` on one batch; the report's
``data.executor`` says so. Diagnosis, several providers and the native backend are single-
process features: asking for them with an executor is a usage error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from qtool.errors import UsageError
from qtool.eval import gates as gates_mod
from qtool.eval import metrics as metrics_mod
from qtool.executors import Executor, Task
from qtool.executors.data import HeldDataset, effective_batch_size, shard_positions

# Accumulators that combine by max, not by sum (every other numeric field starting at 0 adds).
MAX_FIELDS = ("max_abs",)


def accumulator_state(obj) -> dict:  # noqa: ANN001 - a Metric or OutputComparison
    """The numeric accumulators of ``obj`` (the fields a fresh one starts at 0)."""
    return {k: v for k, v in vars(obj).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def add_state(obj, state: dict, fresh: dict) -> None:  # noqa: ANN001
    """Fold one batch's ``state`` into ``obj``: sums add, ``max_abs`` takes the max; fields
    that do not start at 0 in ``fresh`` (a top-k's k) are settings and stay."""
    for k, v in state.items():
        if fresh.get(k) != 0:
            continue
        current = getattr(obj, k)
        setattr(obj, k, max(current, v) if k in MAX_FIELDS else current + v)


def merge_batches(template, states: Sequence[dict]):  # noqa: ANN001, ANN201
    """A fresh copy of ``template`` with ``states`` (one per batch, in batch order) folded in."""
    merged = template.fresh() if hasattr(template, "fresh") else type(template)(template.name)
    fresh = accumulator_state(merged)
    for s in states:
        add_state(merged, s, fresh)
    return merged


def batch_state(template, *batch) -> dict:  # noqa: ANN001, ANN002
    """What one batch adds: a fresh accumulator, updated by ``acc.update(*batch)``, read back."""
    acc = template.fresh() if hasattr(template, "fresh") else type(template)(template.name)
    acc.update(*batch)
    return accumulator_state(acc)


def eval_shard(candidate: str, reference: str | None, data, labels, metric_names: Sequence[str],  # noqa: ANN001
               batch_size: int, count: int, shard: tuple[int, int], threads: int, preprocess) -> list[dict]:
    """Run on a worker: one record per batch of this shard, with its first sample and the
    per-batch states of every candidate metric, reference metric and output comparison."""
    from qtool import runtime
    from qtool.data import Dataset, input_specs
    from qtool.model import load

    dataset = data if isinstance(data, Dataset) else Dataset(data, input_specs(load(candidate)), preprocess)
    cand = runtime.open_session(candidate, "cpu", threads=threads, role="candidate")
    ref = runtime.open_session(reference, "cpu", threads=threads, role="reference") if reference else None
    templates = [m for m in (metrics_mod.make_metric(n) for n in metric_names) if m is not None]
    records = []
    for ids, feed in dataset.batches(batch_size, limit=count, shard=shard):
        out = runtime.run(cand, feed)
        batch_labels = labels[ids] if labels is not None else None
        # A batch is known by its first sample's position: unique, and in one run's order.
        rec = {"first": int(ids[0]), "samples": len(ids),
               "cand": [batch_state(m, out, batch_labels, feed) for m in templates]}
        if ref is not None:
            ref_out = runtime.run(ref, feed)
            rec["ref"] = [batch_state(m, ref_out, batch_labels, feed) for m in templates]
            rec["outputs"] = {n: batch_state(metrics_mod.OutputComparison(n), ref_out[n], out[n]) for n in out}
        records.append(rec)
    return records


def latency_report(candidate: str, data, kwargs: dict):  # noqa: ANN001, ANN201
    """Run on one worker: the ordinary evaluate on the first batch, with latency when asked.
    Shipped data is written to a scratch folder there first (evaluate reads folders)."""
    import tempfile

    from qtool.eval import evaluate

    if not isinstance(data, HeldDataset):
        return evaluate(candidate, data, **kwargs)
    with tempfile.TemporaryDirectory(prefix="qtool-latency-") as folder:
        _write_samples(data, kwargs["limit"], folder)
        return evaluate(candidate, folder, **{**kwargs, "labels": None})


def _write_samples(data: HeldDataset, count: int, folder: str) -> None:
    """The first ``count`` held samples as .npz files (and their labels as labels.npy)."""
    import numpy as np

    for i in range(count):
        np.savez(os.path.join(folder, f"sample_{i:06d}.npz"), **data.load_sample(i))
    labels = data.labels()
    if labels is not None:
        np.save(os.path.join(folder, "labels.npy"), labels[:count])


def evaluate_sharded(candidate: str | os.PathLike, data: str | os.PathLike, *, executor: Executor,
                     reference: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
                     metrics: Sequence[str] = (), providers: Sequence[str] = ("cpu",), batch_size: int = 1,
                     limit: int = 0, latency: bool = False, runs: int = 50, warmup: int = 5, threads: int = 0,
                     diagnose: bool = False, backend: str = "onnxruntime", max_drop=None, min_sqnr=None,  # noqa: ANN001
                     max_latency_ratio=None, preprocess=None, shards: int = 0, ship: bool = False,  # noqa: ANN001
                     progress=None, **_ignored):  # noqa: ANN001, ANN003, ANN201 - an EvalReport
    """``qtool.eval.evaluate`` with the dataset pass fanned out over ``executor`` in ``shards``
    tasks (0: one per worker); see the module doc. ``ship``: send each shard's samples
    through the object store instead of the workers reading ``data`` by path."""
    from qtool.eval.evaluate import fidelity_warnings, without_feature_agreement

    if diagnose or backend != "onnxruntime" or list(providers) not in ([], ["cpu"]):
        raise UsageError("--executor shards the dataset pass on CPU workers; --diagnose, --backend native "
                         "and --ep other than cpu run in one process", "drop --executor, or those flags")
    gates = gates_mod.parse_gates(max_drop, min_sqnr, max_latency_ratio)
    plan = _plan(candidate, data, labels, metrics, batch_size, limit, preprocess)
    n = shards or executor.workers
    payloads = [str(data)] * n
    if ship:
        size = effective_batch_size(plan["dataset"], batch_size)
        payloads = [executor.put(HeldDataset.of(plan["dataset"], shard_positions(plan["count"], size, (i, n))))
                    for i in range(n)]
    ref = str(reference) if reference is not None else None
    tasks = [Task(f"eval shard {i}/{n}", eval_shard, (str(candidate), ref, payloads[i], plan["labels"],
                                                       plan["metrics"], batch_size, plan["count"], (i, n), threads,
                                                       preprocess)) for i in range(n)]
    with _bar(progress, f"evaluating ({executor.describe()})", n, "shards") as advance:
        parts = executor.map(tasks, lambda t: advance(1))
    records = sorted((r for part in parts for r in part), key=lambda r: r["first"])
    # The ordinary evaluate on one batch, alone on one worker: latency, hardware, sizes, checks.
    one = {"reference": reference, "labels": labels, "metrics": plan["metrics"], "batch_size": batch_size,
           "limit": min(plan["count"], batch_size), "latency": latency or gates.max_latency_ratio is not None,
           "runs": runs, "warmup": warmup, "threads": threads, "preprocess": preprocess}
    with _bar(progress, "latency (one worker)", None, "runs"):
        report = executor.map([Task("latency", latency_report, (str(candidate), payloads[0], one))])[0]
    _fill(report, records, plan["metrics"], reference is not None)
    if ref is not None:
        from qtool.model import load
        from qtool.pipeline.measure import feature_outputs

        report.outputs = without_feature_agreement(report.outputs, feature_outputs(load(ref)))
    report.data["samples"] = plan["count"]
    report.data["folder"] = str(data)
    report.data["labels"] = (str(labels) if labels is not None
                             else str(plan["dataset"].folder / "labels.*") if plan["labels"] is not None else None)
    report.data["executor"] = {"kind": executor.kind, "shards": n, "shipped": ship,
                               "latency": "measured on one worker only, after the shards finished"}
    report.warnings = list((report.hardware or {}).get("warnings", [])) + fidelity_warnings(report.outputs)
    results = gates_mod.check_gates(report.to_dict(), max_drop=max_drop, min_sqnr=min_sqnr,
                                    max_latency_ratio=max_latency_ratio)
    report.gates = [r.to_dict() for r in results]
    return report


def _plan(candidate, data, labels, metrics, batch_size, limit, preprocess) -> dict:  # noqa: ANN001
    """The dataset, sample count, labels and metric names, chosen as evaluate chooses them."""
    from pathlib import Path

    from qtool.data import Dataset, input_specs, read_labels_file
    from qtool.eval.evaluate import default_metrics
    from qtool.model import load

    model = load(candidate)
    specs = input_specs(model)
    dataset = Dataset(data, specs, preprocess)
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))
    label_array = (read_labels_file(Path(labels), [s.path for s in dataset.samples]) if labels is not None
                   else dataset.labels())
    first = model.graph.outputs[0]
    shape = tuple(first.shape) if first.shape is not None else ()
    names = list(metrics) or default_metrics(shape, label_array is not None, [s.name for s in specs])
    return {"dataset": dataset, "count": count, "labels": label_array, "metrics": names}


def _fill(report, records: list[dict], metric_names: Sequence[str], has_reference: bool) -> None:  # noqa: ANN001
    """The report's metrics and output comparisons from every batch's states, in batch order."""
    templates = [m for m in (metrics_mod.make_metric(n) for n in metric_names) if m is not None]
    report.metrics = []
    for i, t in enumerate(templates):
        cand = merge_batches(t, [r["cand"][i] for r in records])
        entry = {"name": cand.name, "higher_is_better": cand.higher_is_better, "candidate": cand.result(),
                 "reference": None, "drop": None}
        if has_reference:
            r = merge_batches(t, [rec["ref"][i] for rec in records]).result()
            entry["reference"] = r
            entry["drop"] = (r - entry["candidate"]) if cand.higher_is_better else (entry["candidate"] - r)
        report.metrics.append(entry)
    if has_reference and records:
        names = list(records[0]["outputs"])
        report.outputs = [merge_batches(metrics_mod.OutputComparison(n), [r["outputs"][n] for r in records]).result()
                          for n in names]


def _bar(progress, description: str, total, unit: str):  # noqa: ANN001, ANN202
    import contextlib

    if progress is None:
        return contextlib.nullcontext(lambda n=1: None)
    return progress(description, total, unit)


def with_executor(spec: str) -> Callable:
    """``evaluate``'s signature, run by ``evaluate_sharded`` on the executor ``spec`` names
    (``local``: one process per CPU of this machine)."""
    from qtool.executors import make_executor, parse_executor

    kind, _ = parse_executor(spec)

    def run(candidate, data, **kwargs):  # noqa: ANN001, ANN003, ANN202
        workers = (os.cpu_count() or 1) if kind == "local" else 1
        with make_executor(spec, workers) as executor:
            return evaluate_sharded(candidate, data, executor=executor, **kwargs)

    return run
