"""``evaluate``: one pass over a dataset that fills an EvalReport (metrics, comparison,
consistency), then latency, hardware checks, diagnosis and gates when asked."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
    max_drop: gates_mod.Threshold = None,
    min_sqnr: gates_mod.Threshold = None,
    max_latency_ratio: gates_mod.Threshold = None,
    preprocess: PreprocessConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
    progress: ProgressFactory | None = None,
    runtime: str = "ort",
    device: str | None = None,
    precision: str | None = None,
    runtimes: Sequence[str] = (),
    timing: str | None = None,
    rounds: int | None = None,
) -> EvalReport:
    """Evaluate ``candidate`` (against ``reference`` when given) on the dataset folder ``data``.

    Phases: check the arguments, set up (models, dataset, labels, metrics), one pass over
    the dataset (metrics, comparisons), latency and hardware checks, diagnosis, gates and
    warnings. Gates take a number or ``"N%"`` (qtool.eval.gates). ``progress``: a factory
    ``progress(description, total, unit)`` of context managers yielding ``advance(n)``
    (as qtool.cli.app.progress) for the dataset pass and the latency runs; ``on_batch``
    is called with the samples of each batch of the dataset pass.

    ``runtime`` (``ort`` | ``openvino``) with ``device``/``precision`` hints runs and times
    both models there (qtool.runtime.runtimes; a hint that does not apply is a UsageError).
    ``runtimes`` (e.g. ``["ort", "openvino"]``) adds the matrix of qtool.eval.matrix:
    reference and candidate on each runtime, compared with the float reference on
    onnxruntime, timed (``timing``: ``process`` by default there, ``rounds`` rounds;
    ``inline`` in one process, the default for the single-runtime latency), and the fastest
    deployment at the floor in ``report.runtimes``.

    Never raises for a failed gate: the gates' results are in ``report.gates`` and
    ``report.passed``; ``qtool.eval.gates.raise_on_failure`` turns them into exit 3.
    Whatever the gates, an output whose fidelity is catastrophic (``CATASTROPHIC_SQNR_DB``,
    ``CATASTROPHIC_COSINE``) adds a warning.
    """
    gates = gates_mod.parse_gates(max_drop, min_sqnr, max_latency_ratio)
    _check_arguments(reference, gates, runs, warmup, batch_size, backend, diagnose)
    specs = _runtimes(providers, runtime, device, precision, runtimes, reference)
    timed = bool(runtimes) or latency or gates.max_latency_ratio is not None
    timing, rounds = _check_timing(timing, rounds, timed, bool(runtimes))
    progress = progress or _no_progress
    run = _setup(candidate, data, reference, labels, metrics, batch_size, limit, preprocess)
    with progress("evaluating", run.count, "samples") as advance:
        def step(n: int) -> None:
            advance(n)
            if on_batch is not None:
                on_batch(n)

        first_feed = _dataset_pass(run, specs, threads, backend, step)
    report = run.report
    if runtimes:
        _matrix_phase(run, list(runtimes), providers, device, precision, gates, max_drop,
                      threads=threads, runs=runs, warmup=warmup, timing=timing, rounds=rounds,
                      progress=progress)
    elif (latency or gates.max_latency_ratio is not None) and first_feed is not None:
        _latency_phase(report, candidate, reference, specs, first_feed, runs=runs, warmup=warmup,
                       threads=threads, progress=progress, timing=timing, rounds=rounds)
    if diagnose:
        from qtool.eval.diagnose import diagnose as run_diagnosis

        with progress("diagnosing (layers, then re-converting)", None, "samples"):
            report.diagnosis = run_diagnosis(candidate, reference, run.dataset, batch_size=batch_size,
                                             limit=run.count, top=diagnose_top, threads=threads)
    results = gates_mod.check_gates(report.to_dict(), max_drop=max_drop, min_sqnr=min_sqnr,
                                    max_latency_ratio=max_latency_ratio)
    report.gates = [r.to_dict() for r in results]
    report.warnings.extend(fidelity_warnings(report.outputs))
    return report


ProgressFactory = Callable[[str, float | None, str], contextlib.AbstractContextManager]

# An output this far from the reference is ruined, not degraded: SQNR 3 dB means noise half as
# strong as the signal (int8 sits near 30-45 dB, 4-bit weights near 15-25 dB); cosine 0.9 is
# already ~25 degrees between the output vectors. Either one warns, with or without gates.
CATASTROPHIC_SQNR_DB = 3.0
CATASTROPHIC_COSINE = 0.9


def without_feature_agreement(outputs: list[dict], features: frozenset[str]) -> list[dict]:
    """``outputs`` with no argmax agreement for ``features``: the outputs the reference's graph
    shows to be features (qtool.pipeline.measure.feature_outputs: a hidden state, a sentence
    embedding), whose largest component decides nothing; the guard judges them the same way."""
    return [{**o, "argmax_agreement": None} if o["name"] in features else o for o in outputs]


def fidelity_warnings(outputs: Sequence[dict]) -> list[str]:
    """A warning per output whose SQNR or cosine to the reference is catastrophic."""
    warnings = []
    for o in outputs:
        sqnr, cos = o["sqnr_db"], o["cosine"]
        bad_sqnr = sqnr is not None and not sqnr >= CATASTROPHIC_SQNR_DB  # NaN counts as bad
        bad_cos = cos is not None and not cos >= CATASTROPHIC_COSINE
        if bad_sqnr or bad_cos:
            warnings.append(
                f"output {o['name']} is far from the reference (SQNR {sqnr:.2f} dB, cosine {cos:.3f}; "
                f"warned below {CATASTROPHIC_SQNR_DB:g} dB or cosine {CATASTROPHIC_COSINE:g}): the "
                "candidate is broken, not just degraded; gate CI with --min-sqnr or --max-drop"
            )
    return warnings


@contextlib.contextmanager
def _no_progress(description: str, total: float | None, unit: str = "") -> Iterator[Callable[[int], None]]:
    yield lambda n=1, total=None: None


def _check_arguments(reference, gates, runs, warmup, batch_size, backend, diagnose) -> None:
    """UsageErrors for flags that cannot work together."""
    if backend not in ("onnxruntime", "native"):
        raise UsageError(f"unknown backend {backend!r}", "use --backend onnxruntime or native")
    if gates.any and reference is None:
        raise UsageError("quality gates compare with a reference model", "pass --reference FLOAT_MODEL")
    if diagnose and reference is None:
        raise UsageError("--diagnose compares layers with the reference", "pass --reference FLOAT_MODEL")
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise UsageError(
            f"--runs and --batch-size must be at least 1, --warmup at least 0 (got runs={runs}, "
            f"batch size={batch_size}, warmup={warmup})",
            "e.g. --runs 50 --warmup 5 --batch-size 1",
        )


def _check_timing(timing: str | None, rounds: int | None, timed: bool, matrix: bool) -> tuple[str, int]:
    """(timing mode, rounds): ``process`` for --runtimes, ``inline`` otherwise, unless given;
    either flag without anything timed, or --rounds with inline timing, is an error."""
    from qtool.runtime.timing import DEFAULT_ROUNDS, MODES

    if timing is not None and timing not in MODES:
        raise UsageError(f"unknown --timing {timing!r}", f"use one of {', '.join(MODES)}")
    if (timing is not None or rounds is not None) and not timed:
        raise UsageError("--timing and --rounds choose how latency is measured, and nothing is timed",
                         "add --latency (or --runtimes), or drop them")
    timing = timing or ("process" if matrix else "inline")
    if rounds is not None and timing != "process":
        raise UsageError("--rounds applies to --timing process only", "add --timing process, or drop --rounds")
    if rounds is not None and rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}", "e.g. --rounds 3")
    return timing, rounds or DEFAULT_ROUNDS


def _runtimes(providers, name, device, precision, matrix, reference) -> list:  # noqa: ANN001
    """The runtimes the dataset pass and latency use (one per --ep for onnxruntime), after
    refusing hints that cannot apply."""
    from qtool.runtime.runtimes import canonical

    providers = list(providers) or ["cpu"]
    if matrix:
        if reference is None:
            raise UsageError("--runtimes compares each runtime with the float reference",
                             "pass --reference FLOAT_MODEL")
        if name not in ("ort", None):
            raise UsageError("--runtime and --runtimes cannot be combined",
                             "--runtime X evaluates on one runtime; --runtimes ort,openvino compares several")
        if (device is not None or precision is not None) and "openvino" not in matrix:
            raise UsageError("--device and --precision apply to the openvino rows of --runtimes",
                             "add openvino to --runtimes, or drop them")
        return [runtime.runtime("ort", p) for p in providers]
    if canonical(name or "ort") == "ort":
        if device is not None and providers != ["cpu"]:
            raise UsageError("--device and --ep both choose onnxruntime's execution provider", "give one of them")
        return [runtime.runtime("ort", p, precision) for p in ([device] if device else providers)]
    if providers != ["cpu"]:
        raise UsageError(f"--ep chooses onnxruntime's execution providers, not {name}'s device",
                         "use --device with --runtime openvino (e.g. --device CPU)")
    return [runtime.runtime(name, device, precision)]


@dataclass
class _Run:
    """What the dataset pass needs, set up once."""

    report: EvalReport
    dataset: object
    count: int
    candidate: str | os.PathLike
    reference: str | os.PathLike | None
    outputs: list[str]
    labels: object
    cand_metrics: list
    ref_metrics: list
    features: frozenset[str] = frozenset()  # the reference's feature outputs (measure.feature_outputs)


def _setup(candidate, data, reference, labels, metrics, batch_size, limit, preprocess) -> _Run:
    from qtool.data import Dataset, input_specs, read_labels_file
    from qtool.model import model_size_bytes
    from qtool.pipeline.measure import feature_outputs

    cand_ir = _load_ir(candidate, "candidate")
    specs = input_specs(cand_ir)
    features: frozenset[str] = frozenset()
    if reference is not None:
        ref_ir = _load_ir(reference, "reference")
        _check_same_interface(cand_ir, ref_ir)
        features = feature_outputs(ref_ir)
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
    scores = first_out.dtype is not None and first_out.dtype.is_floating_point()
    classes = out_shape[-1] if scores and out_shape and isinstance(out_shape[-1], int) else 0
    if label_array is not None and classes > 1 and any(isinstance(m, (metrics_mod.TopK, metrics_mod.Accuracy))
                                                   for m in metric_objs):
        # Up front, over every label (the metrics check each batch too, for dynamic shapes).
        metrics_mod.check_label_range(metric_objs[0].name, label_array, classes, "the labels")
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
    return _Run(report, dataset, count, candidate, reference, [v.name for v in cand_ir.graph.outputs],
                label_array, [m.fresh() for m in metric_objs],
                [m.fresh() for m in metric_objs] if reference is not None else [], features)


def _dataset_pass(run: _Run, specs: list, threads: int, backend: str,
                  step: Callable[[int], None]) -> dict | None:
    """Stream the dataset through every session once; fill metrics, outputs, consistency.
    Returns the first batch's feed (what latency is timed on)."""
    cand_sessions = [s.open(run.candidate, threads=threads, role="candidate") for s in specs]
    ref_session = (specs[0].open(run.reference, threads=threads, role="reference")
                   if run.reference is not None else None)
    providers = [s.device for s in specs]
    comparisons = {n: metrics_mod.OutputComparison(n) for n in run.outputs} if ref_session else {}
    across = {(providers[0], p, n): metrics_mod.OutputComparison(n) for p in providers[1:] for n in run.outputs}
    native_backend = None
    if backend == "native":
        from qtool.eval import native

        native_backend = native.NativeComparison(run.candidate, threads=threads)
    first_feed = None
    for ids, feed, outs in runtime.stream(cand_sessions, run.dataset, run.report.data["batch_size"], run.count):
        first_feed = feed if first_feed is None else first_feed
        batch_labels = run.labels[ids] if run.labels is not None else None
        for m in run.cand_metrics:
            m.update(outs[0], batch_labels, feed)
        if ref_session is not None:
            ref_out = runtime.run(ref_session, feed)
            for m in run.ref_metrics:
                m.update(ref_out, batch_labels, feed)
            for n, comp in comparisons.items():
                comp.update(ref_out[n], outs[0][n])
        for (_, p, n), comp in across.items():
            comp.update(outs[0][n], outs[providers.index(p)][n])
        if native_backend is not None:
            native_backend.update(feed)
        step(len(ids))
    _collect(run, comparisons, across, native_backend)
    return first_feed


def _collect(run: _Run, comparisons: dict, across: dict, native_backend) -> None:
    report = run.report
    for i, m in enumerate(run.cand_metrics):
        entry = {"name": m.name, "higher_is_better": m.higher_is_better, "candidate": m.result(),
                 "reference": None, "drop": None}
        if run.ref_metrics:
            r = run.ref_metrics[i].result()
            entry["reference"] = r
            entry["drop"] = (r - entry["candidate"]) if m.higher_is_better else (entry["candidate"] - r)
        report.metrics.append(entry)
    report.outputs = without_feature_agreement([c.result() for c in comparisons.values()], run.features)
    for (a, b, n), comp in across.items():
        res = comp.result()
        report.consistency.append({"a": f"onnxruntime:{a}", "b": f"onnxruntime:{b}", "output": n,
                                   "sqnr_db": res["sqnr_db"], "max_abs": res["max_abs"],
                                   "argmax_agreement": res["argmax_agreement"]})
    if native_backend is not None:
        report.consistency.extend(native_backend.results())
        report.warnings.extend(native_backend.warnings)


def _latency_phase(report: EvalReport, candidate, reference, specs: list, feed: dict, *, runs: int,
                   warmup: int, threads: int, progress: ProgressFactory, timing: str, rounds: int) -> None:
    """Latency per runtime (qtool.runtime.timing), then onnxruntime's hardware check."""
    from qtool.eval import hwcheck
    from qtool.runtime.timing import planned_runs, time_pairs

    models = 1 if reference is None else 2
    with progress("latency", len(specs) * models * planned_runs(timing, runs, warmup, rounds), "runs") as advance:
        for spec in specs:
            jobs = {"candidate": (candidate, spec)}
            if reference is not None:
                jobs["reference"] = (reference, spec)
            stats = time_pairs(jobs, feed, mode=timing, runs=runs, warmup=warmup, threads=threads,
                               rounds=rounds, on_run=advance)
            report.latency.extend(s.to_dict() for s in stats.values())
            if "reference" in stats and stats["reference"].median_ms > 0:
                report.latency_ratio[spec.label] = stats["candidate"].median_ms / stats["reference"].median_ms
    ort = [s.device for s in specs if s.name == "ort"]
    if ort:  # which quantized nodes ran as integer kernels: an onnxruntime question
        report.hardware = hwcheck.check(candidate, ort, threads=threads, latency_ratio=report.latency_ratio)
        report.warnings.extend(report.hardware.get("warnings", []))


def _matrix_phase(run: _Run, names: list[str], providers, device, precision, gates, max_drop, *,  # noqa: ANN001
                  threads: int, runs: int, warmup: int, timing: str, rounds: int, progress: ProgressFactory) -> None:
    """--runtimes: every deployment measured (qtool.eval.matrix); its timings fill the
    latency table and ratios, per runtime label."""
    from qtool.eval.matrix import deployments, run_matrix
    from qtool.pipeline.guard import Floor

    floor = Floor() if gates.min_sqnr is None else Floor(min_sqnr_db=gates.min_sqnr[0])
    specs = deployments(names, ep=(list(providers) or ["cpu"])[0], device=device, precision=precision)
    section, rows = run_matrix(run, specs, floor=floor, max_drop=max_drop, threads=threads, runs=runs,
                               warmup=warmup, timing=timing, rounds=rounds, progress=progress)
    report = run.report
    report.runtimes = section
    by = {(r.model, r.runtime.label): r.stats for r in rows if r.stats is not None}
    for (model, label), stats in by.items():
        report.latency.append(stats.to_dict() | {"model": model, "provider": label})
        ref = by.get(("reference", label))
        if model == "candidate" and ref is not None and ref.median_ms > 0:
            report.latency_ratio[label] = stats.median_ms / ref.median_ms


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


