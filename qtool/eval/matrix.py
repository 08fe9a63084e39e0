"""``qtool eval --runtimes ort,openvino``: reference and candidate on each runtime, timed
and compared with the float reference, and which deployment is fastest at the floor.

Deployments: each runtime runs the float reference and the candidate. OpenVINO runs each
at its ``f32`` hint and, when the device's default float precision is not f32 (bf16 on
AMX CPUs), at its default too: that is the float path a user of OpenVINO gets without
asking, and the one an int8 candidate has to beat there. ``--precision`` picks one.

Agreement: every deployment's outputs are compared with the float reference run by
onnxruntime's CPU provider (fp32, the ground truth), with the guard's measures (worst
output segment SQNR, argmax agreement; qtool.pipeline.measure) and the guard's floor
(15 dB, 0.9 agreement; ``--min-sqnr`` replaces the SQNR floor). With labels, each
deployment's metrics are computed too and ``--max-drop`` is part of the floor. A
deployment that misses the floor does not count for "fastest".

Timing: qtool.runtime.timing (fresh processes by default, alternating rounds, medians).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qtool.eval import metrics as metrics_mod
from qtool.runtime.runtimes import ORT_CPU, Runtime


@dataclass
class Deployment:
    """One model (``reference`` or ``candidate``) on one runtime, and what was measured."""

    model: str
    runtime: Runtime
    precision: str = ""  # the float precision really used (openvino), "" for onnxruntime
    outputs: list = field(default_factory=list)  # OutputFidelity
    comparisons: list = field(default_factory=list)  # OutputComparison.result()
    metrics: dict = field(default_factory=dict)
    shortfalls: list[str] = field(default_factory=list)
    stats: object | None = None  # LatencyStats

    @property
    def key(self) -> str:
        return f"{self.model}@{self.runtime.label}"

    @property
    def where(self) -> str:
        text = self.runtime.display
        if self.runtime.name == "openvino" and (self.runtime.precision or "default") == "default":
            text += f" ({self.precision})"
        return text

    def to_dict(self) -> dict:
        s = self.stats
        return {
            "model": self.model, "runtime": self.runtime.name, "device": self.runtime.device,
            "label": self.runtime.label, "precision_hint": self.runtime.precision,
            "precision": self.precision or None, "meets_floor": not self.shortfalls,
            "shortfalls": self.shortfalls,
            "median_ms": None if s is None else s.median_ms,
            "median_ci_ms": None if s is None else list(s.median_ci_ms),
            "outputs": [{**o.to_dict(), "cosine": c["cosine"]} for o, c in zip(self.outputs, self.comparisons)],
            "metrics": self.metrics,
        }


def deployments(runtimes: list[str], *, ep: str = "cpu", device: str | None = None,
                precision: str | None = None) -> list[Runtime]:
    """The runtime/precision combinations to run, in the order given (see the docstring)."""
    from qtool.runtime.runtimes import runtime

    out = []
    for name in runtimes:
        if name == "ort":
            out.append(runtime("ort", ep))
            continue
        from qtool.runtime import openvino

        if precision is not None:
            out.append(runtime("openvino", device, precision))
            continue
        out.append(runtime("openvino", device, "f32"))
        if openvino.default_precision(device) != "f32":
            out.append(runtime("openvino", device, "default"))
    return out


def run_matrix(run, runtimes: list[Runtime], *, floor, max_drop, threads: int, runs: int,  # noqa: ANN001, PLR0913
               warmup: int, timing: str, rounds: int, progress) -> tuple[dict, list[Deployment]]:
    """Measure every deployment (``run``: evaluate's set-up, with dataset and metrics);
    returns the report's ``runtimes`` section and the deployments (with their latency)."""
    from qtool.pipeline.measure import OutputAccumulator
    from qtool.runtime.timing import planned_runs, time_pairs

    rows = [Deployment(m, rt) for rt in runtimes for m in ("reference", "candidate")]
    paths = {"reference": run.reference, "candidate": run.candidate}
    truth = ORT_CPU.open(run.reference, threads=threads, role="reference")
    sessions = []
    for row in rows:
        s = row.runtime.open(paths[row.model], threads=threads, role=row.model)
        row.precision = getattr(s, "precision", "")
        sessions.append(s)
    # features are judged without the argmax proxy, as the guard does
    accs = [{n: OutputAccumulator(n, features=n in run.features) for n in run.outputs} for _ in rows]
    comps = [{n: metrics_mod.OutputComparison(n) for n in run.outputs} for _ in rows]
    metric_sets = [[m.fresh() for m in run.cand_metrics] for _ in rows]
    truth_metrics = [m.fresh() for m in run.cand_metrics]
    first_feed, floats = None, {}  # floats: the float outputs, in the model's order (dict as ordered set)
    with progress("runtimes: agreement", run.count, "samples") as advance:
        for ids, feed in run.dataset.batches(run.report.data["batch_size"], limit=run.count):
            first_feed = feed if first_feed is None else first_feed
            labels = run.labels[ids] if run.labels is not None else None
            ref = dict(zip([o.name for o in truth.get_outputs()], truth.run(None, feed)))
            for m in truth_metrics:
                m.update(ref, labels, feed)
            for i, s in enumerate(sessions):
                out = dict(zip(run.outputs, s.run(run.outputs, feed)))
                for n in run.outputs:
                    if ref[n].dtype.kind == "f":
                        floats[n] = True
                        accs[i][n].add(ref[n], out[n])
                        comps[i][n].update(ref[n], out[n])
                for m in metric_sets[i]:
                    m.update(out, labels, feed)
            advance(len(ids))
    del sessions, truth
    reference_metrics = {m.name: m.result() for m in truth_metrics}
    for i, row in enumerate(rows):
        row.outputs = [accs[i][n].result() for n in floats]
        row.comparisons = [comps[i][n].result() for n in floats]
        row.metrics = {m.name: m.result() for m in metric_sets[i]}
        row.shortfalls = floor.shortfalls(row.outputs) + _drop_shortfalls(
            row.metrics, reference_metrics, run.cand_metrics, max_drop)
    if first_feed is not None:
        jobs = {row.key: (str(paths[row.model]), row.runtime) for row in rows}
        total = len(rows) * planned_runs(timing, runs, warmup, rounds)
        with progress(f"runtimes: latency ({timing})", total, "runs") as adv:
            stats = time_pairs(jobs, first_feed, mode=timing, runs=runs, warmup=warmup, threads=threads,
                               rounds=rounds, on_run=adv)
        for row in rows:
            row.stats = stats[row.key]
    section = _section(rows, floor, max_drop, timing, rounds, runs, Path(str(run.candidate)).name, reference_metrics)
    return section, rows


def _drop_shortfalls(values: dict, reference: dict, protos: list, max_drop) -> list[str]:  # noqa: ANN001
    """--max-drop as part of the floor: each metric's drop against the reference on onnxruntime."""
    from qtool.eval.gates import parse_threshold

    limit = parse_threshold(max_drop, "max-drop") if max_drop is not None else None
    if limit is None:
        return []
    out = []
    for m in protos:
        ref, got = reference.get(m.name), values.get(m.name)
        if ref is None or got is None:
            continue
        drop = (ref - got) if m.higher_is_better else (got - ref)
        allowed = limit[0] / 100.0 * abs(ref) if limit[1] else limit[0]
        if drop > allowed:
            out.append(f"{m.name} drop {drop:.4g} > {allowed:.4g}")
    return out


def _section(rows: list[Deployment], floor, max_drop, timing: str, rounds: int, runs: int,  # noqa: ANN001
             candidate_name: str, reference_metrics: dict) -> dict:
    return {
        "timing": {"mode": timing, "rounds": rounds if timing == "process" else 1, "runs": runs},
        "truth": "float reference on onnxruntime:cpu (fp32)",
        "floor": {"min_sqnr_db": floor.min_sqnr_db, "min_agreement": floor.min_agreement,
                  "max_drop": None if max_drop is None else str(max_drop)},
        "reference_metrics": reference_metrics,
        "deployments": [r.to_dict() for r in rows],
        **recommend(rows, candidate_name),
    }


def recommend(rows: list[Deployment], candidate_name: str) -> dict:
    """The fastest deployment that meets the floor, and the comparisons a reader needs:
    float on one runtime beating the candidate on another, and the candidate against a
    runtime's default (bf16) float path."""
    timed = [r for r in rows if r.stats is not None]
    ok = [r for r in timed if not r.shortfalls]
    lines: list[str] = []

    def name(r: Deployment) -> str:
        return ("float" if r.model == "reference" else candidate_name) + f" on {r.where}"

    for r in timed:
        if r.shortfalls:
            lines.append(f"{name(r)} misses the floor ({'; '.join(r.shortfalls[:2])}): not counted")
    if not ok:
        return {"fastest": None, "recommendation": lines + ["no deployment meets the floor"]}
    best = min(ok, key=lambda r: r.stats.median_ms)
    base = next((r for r in timed if r.model == "reference" and r.runtime == ORT_CPU), None)
    head = f"fastest at the floor: {name(best)}, {best.stats.median_ms:.3f} ms"
    if base is not None and base is not best:
        head += f" ({base.stats.median_ms / best.stats.median_ms:.2f}x float on onnxruntime:cpu)"
    lines.insert(0, head)
    floats = [r for r in ok if r.model == "reference"]
    cands = [r for r in ok if r.model == "candidate"]
    for f in floats:
        for c in cands:
            if f.runtime.name != c.runtime.name and f.stats.median_ms < c.stats.median_ms:
                lines.append(f"float on {f.where} beats {candidate_name} on {c.where}: "
                             f"{f.stats.median_ms:.3f} vs {c.stats.median_ms:.3f} ms{_tie(f, c)}")
    for c in cands:  # bf16 awareness: the runtime's own default float path
        low = [f for f in floats if f.runtime.name == c.runtime.name and f.precision not in ("", "f32")]
        for f in low:
            verdict = "faster" if c.stats.median_ms < f.stats.median_ms else "slower"
            lines.append(f"{candidate_name} on {c.where} is {verdict} than {c.runtime.name}'s default "
                         f"{f.precision} float path ({c.stats.median_ms:.3f} vs {f.stats.median_ms:.3f} ms)"
                         f"{_tie(c, f)}")
    return {"fastest": best.to_dict() | {"summary": head}, "recommendation": lines}


def _tie(a: Deployment, b: Deployment) -> str:
    """Say so when the two medians' confidence intervals overlap (within measured noise)."""
    (alo, ahi), (blo, bhi) = a.stats.median_ci_ms, b.stats.median_ci_ms
    return "; within timing noise (median intervals overlap)" if alo <= bhi and blo <= ahi else ""


def table_rows(section: dict) -> list[list[str]]:
    """One row per deployment, as text: model, runtime, float precision, median ms, worst
    output SQNR (dB), lowest argmax agreement, floor (the Markdown and HTML reports' table)."""
    rows = []
    for d in section["deployments"]:
        worst = [o["segment_sqnr_db"] for o in d["outputs"]]
        worst_db = min((float(x) for x in worst), default=None)
        agree = [o["agreement"] for o in d["outputs"] if o["agreement"] is not None]
        rows.append([
            d["model"], d["label"], d["precision"] or "model types",
            "–" if d["median_ms"] is None else f"{d['median_ms']:.4g}",
            "–" if worst_db is None else ("exact" if worst_db == float("inf") else f"{worst_db:.2f}"),
            f"{min(agree):.3f}" if agree else "–",
            "meets" if d["meets_floor"] else "misses: " + "; ".join(d["shortfalls"][:2]),
        ])
    return rows


TABLE_HEAD = ["model", "runtime", "float runs in", "median ms", "worst SQNR dB", "agreement", "floor"]
