"""``evaluate``: one pass over a dataset that fills an EvalReport (metrics, comparison,
consistency), then latency, hardware checks, diagnosis and gates when asked."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from qtool import runtime
from qtool.config import PreprocessConfig
from qtool.errors import DataError, UsageError
from qtool.eval import gates as gates_mod
from qtool.eval import metrics as metrics_mod
from qtool.eval.report import EvalReport


def default_metrics(output_shape: Sequence, has_labels: bool, input_names: Sequence[str]) -> list[str]:
    """top1 (+ top5 with more than 5 classes) with labels; perplexity for input_ids + [N,S,V] logits."""
    if "input_ids" in input_names and len(output_shape) == 3:
        return ["perplexity"]
    if has_labels:
        classes = output_shape[-1] if output_shape else None
        if isinstance(classes, int) and classes > 5:
            return ["top1", "top5"]
        return ["top1"] if isinstance(classes, int) and classes > 1 else ["accuracy"]
    return []


def _load_ir(path: str | os.PathLike, role: str):
    from qtool.errors import ModelError
    from qtool.model import load

    try:
        return load(path)
    except ModelError as exc:
        raise ModelError(f"{role} model: {exc.message}", exc.hint) from None


def evaluate(
    candidate: str | os.PathLike,
    data: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    metrics: Sequence[str] = (),
    providers: Sequence[str] = ("cpu",),
    batch_size: int = 1,
    limit: int = 0,
    latency: bool = False,
    runs: int = 50,
    warmup: int = 5,
    threads: int = 0,
    diagnose: bool = False,
    diagnose_top: int = 5,
    backend: str = "onnxruntime",
    max_drop: float | None = None,
    min_sqnr: float | None = None,
    max_latency_ratio: float | None = None,
    preprocess: PreprocessConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EvalReport:
    """Evaluate ``candidate`` (against ``reference`` when given) on the dataset folder ``data``.

    Never raises for a failed gate: the gates' results are in ``report.gates`` and
    ``report.passed``; ``qtool.eval.gates.raise_on_failure`` turns them into exit 3.
    """
    from qtool.data import Dataset, input_specs, read_labels_file
    from qtool.model import model_size_bytes

    if backend not in ("onnxruntime", "native"):
        raise UsageError(f"unknown backend {backend!r}", "use --backend onnxruntime or native")
    if (max_drop is not None or min_sqnr is not None or max_latency_ratio is not None) and reference is None:
        raise UsageError("quality gates compare with a reference model", "pass --reference FLOAT_MODEL")
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise UsageError(
            f"--runs and --batch-size must be at least 1, --warmup at least 0 (got runs={runs}, "
            f"batch size={batch_size}, warmup={warmup})",
            "e.g. --runs 50 --warmup 5 --batch-size 1",
        )
    providers = list(providers) or ["cpu"]
    for p in providers:
        runtime.provider_name(p)

    cand_ir = _load_ir(candidate, "candidate")
    specs = input_specs(cand_ir)
    ref_ir = _load_ir(reference, "reference") if reference is not None else None
    cand_outputs = [v.name for v in cand_ir.graph.outputs]
    if ref_ir is not None:
        _check_same_interface(cand_ir, ref_ir)
    dataset = Dataset(data, specs, preprocess)
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))

    if labels is not None:
        label_array = read_labels_file(Path(labels), [s.path for s in dataset.samples])
        label_source = str(labels)
    else:
        label_array = dataset.labels()
        label_source = str(dataset.folder / "labels.*") if label_array is not None else None

    first_out = cand_ir.graph.outputs[0]
    out_shape = tuple(first_out.shape) if first_out.shape is not None else ()
    names = list(metrics) or default_metrics(out_shape, label_array is not None, [s.name for s in specs])
    metric_objs = [m for m in (metrics_mod.make_metric(n) for n in names) if m is not None]
    for m in metric_objs:
        if m.needs_labels and label_array is None:
            raise UsageError(
                f"metric {m.name} needs labels and {dataset.folder} has none",
                "pass --labels FILE (one label per sample, in sorted file order)",
            )
    cand_metrics = [m.fresh() for m in metric_objs]
    ref_metrics = [m.fresh() for m in metric_objs] if ref_ir is not None else []

    report = EvalReport(
        candidate={"path": str(candidate), "size_bytes": model_size_bytes(candidate)},
        reference={"path": str(reference), "size_bytes": model_size_bytes(reference)} if reference else None,
        data={"folder": str(data), "samples": count, "labels": label_source, "batch_size": batch_size},
    )
    ref_bytes = report.reference["size_bytes"] if report.reference else None
    report.size = {
        "candidate_bytes": report.candidate["size_bytes"],
        "reference_bytes": ref_bytes,
        "compression_ratio": ref_bytes / report.candidate["size_bytes"] if ref_bytes else None,
    }

    cand_sessions = [
        runtime.open_session(candidate, p, threads=threads, role="candidate") for p in providers
    ]
    ref_session = (
        runtime.open_session(reference, providers[0], threads=threads, role="reference")
        if reference is not None else None
    )
    comparisons = {n: metrics_mod.OutputComparison(n) for n in cand_outputs} if ref_session else {}
    across = {
        (providers[0], p, n): metrics_mod.OutputComparison(n)
        for p in providers[1:] for n in cand_outputs
    }
    native_backend = None
    if backend == "native":
        from qtool.eval import native

        native_backend = native.NativeComparison(candidate, threads=threads)

    first_feed = None
    for ids, feed, outs in runtime.stream(cand_sessions, dataset, batch_size, count):
        if first_feed is None:
            first_feed = feed
        batch_labels = label_array[ids] if label_array is not None else None
        cand_out = outs[0]
        for m in cand_metrics:
            m.update(cand_out, batch_labels, feed)
        if ref_session is not None:
            ref_out = runtime.run(ref_session, feed)
            for m in ref_metrics:
                m.update(ref_out, batch_labels, feed)
            for n, comp in comparisons.items():
                comp.update(ref_out[n], cand_out[n])
        for (_, p, n), comp in across.items():
            comp.update(cand_out[n], outs[providers.index(p)][n])
        if native_backend is not None:
            native_backend.update(feed)
        if on_batch is not None:
            on_batch(len(ids))

    for i, m in enumerate(cand_metrics):
        entry = {"name": m.name, "higher_is_better": m.higher_is_better, "candidate": m.result(),
                 "reference": None, "drop": None}
        if ref_metrics:
            r = ref_metrics[i].result()
            entry["reference"] = r
            entry["drop"] = (r - entry["candidate"]) if m.higher_is_better else (entry["candidate"] - r)
        report.metrics.append(entry)
    report.outputs = [c.result() for c in comparisons.values()]
    for (a, b, n), comp in across.items():
        res = comp.result()
        report.consistency.append({"a": f"onnxruntime:{a}", "b": f"onnxruntime:{b}", "output": n,
                                   "sqnr_db": res["sqnr_db"], "max_abs": res["max_abs"],
                                   "argmax_agreement": res["argmax_agreement"]})
    if native_backend is not None:
        report.consistency.extend(native_backend.results())
        report.warnings.extend(native_backend.warnings)
    del cand_sessions, ref_session

    if (latency or max_latency_ratio is not None) and first_feed is not None:
        from qtool.eval import hwcheck
        from qtool.eval.latency import measure

        for p in providers:
            factories = {"candidate": lambda p=p: runtime.open_session(candidate, p, threads=threads, role="candidate")}
            if reference is not None:
                factories["reference"] = lambda p=p: runtime.open_session(
                    reference, p, threads=threads, role="reference")
            stats = measure(factories, first_feed, runs=runs, warmup=warmup, provider=p, threads=threads)
            report.latency.extend(s.to_dict() for s in stats.values())
            if "reference" in stats and stats["reference"].median_ms > 0:
                report.latency_ratio[p] = stats["candidate"].median_ms / stats["reference"].median_ms
        report.hardware = hwcheck.check(candidate, providers, threads=threads,
                                        latency_ratio=report.latency_ratio)
        report.warnings.extend(report.hardware.get("warnings", []))

    if diagnose:
        if reference is None:
            raise UsageError("--diagnose compares layers with the reference", "pass --reference FLOAT_MODEL")
        from qtool.eval.diagnose import diagnose as run_diagnosis

        report.diagnosis = run_diagnosis(
            candidate, reference, dataset, batch_size=batch_size, limit=count, top=diagnose_top,
            threads=threads,
        )

    doc = report.to_dict()
    results = gates_mod.check_gates(doc, max_drop=max_drop, min_sqnr=min_sqnr,
                                    max_latency_ratio=max_latency_ratio)
    report.gates = [r.to_dict() for r in results]
    return report


def _check_same_interface(cand_ir, ref_ir) -> None:
    """The reference must have the candidate's outputs and inputs (by name)."""
    cand_out = [v.name for v in cand_ir.graph.outputs]
    ref_out = [v.name for v in ref_ir.graph.outputs]
    missing = [n for n in cand_out if n not in ref_out]
    if missing:
        raise DataError(
            f"the reference has different outputs ({', '.join(ref_out)}) than the candidate "
            f"({', '.join(cand_out)}); missing in the reference: {', '.join(missing)}",
            "pass the float model the candidate was converted from as --reference",
        )
    cand_in = {v.name for v in cand_ir.graph.inputs if not v.is_initializer()}
    ref_in = {v.name for v in ref_ir.graph.inputs if not v.is_initializer()}
    if cand_in != ref_in:
        raise DataError(
            f"the reference's inputs ({', '.join(sorted(ref_in))}) differ from the candidate's "
            f"({', '.join(sorted(cand_in))})",
            "pass the float model the candidate was converted from as --reference",
        )


