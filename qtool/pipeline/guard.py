"""The guard: measure each candidate conversion on held-out samples, repair, and choose.

With data, ``convert`` never trusts a conversion it has not measured. Samples the
calibration never sees are held out (``--eval-data``, or every 5th sample of ``--data``);
each candidate is measured there against the float model (``measure.py``: per-output and
per-segment SQNR, argmax agreement where it means something) and timed against float,
interleaved, on the runtime it will deploy on (``convert --runtime``; onnxruntime's CPU
provider by default, timed as 1-thread CPU time so the machine's load cannot decide). Candidates are tried cheapest first and the
search stops at the first that meets the floor without being slower than float. A
candidate below the floor is repaired, more layers each round within the time budget:
in turns, those nearest the failing output and those diagnosis (qtool.eval.diagnose: each
layer's own error, fed with float inputs) ranks costliest on the held-out samples; each set
first with its activations raised to 16 bits (static QDQ: the weights stay int8, so the
file stays small), then kept float. Both are measured, and the first round where one meets
the floor ends the search. Every attempt and its measured
effect is reported; if nothing meets the floor the conversion fails (exit 3).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx_ir as ir

from qtool.config import LayerOverride, Recipe
from qtool.passes.select import glob_escape

# Defaults, chosen from measurements (README "The guard"): a good int8 CNN sits at 25-40 dB
# on its logits; the OCR recognizer whose CER rose 16x under static int8 sat at 8.3 dB and a
# YOLO head's class rows at 0 dB. Argmax agreement below 0.9 flips 1 in 10 decisions.
DEFAULT_MIN_SQNR_DB = 15.0
DEFAULT_MIN_AGREEMENT = 0.9
MIN_AGREEMENT_POSITIONS = 20
SLOWER_MARGIN = 1.05  # a candidate is "slower than float" above this latency ratio (noise)
HOLDOUT_EVERY = 5  # every 5th sample of --data is held out when no --eval-data is given
MAX_HOLDOUT = 32
REPAIR_STEPS = (1, 2, 4, 8)  # layers kept float nearest the failing outputs, per repair round
TIMING_SECONDS = 1.0  # time spent timing each candidate/float pair


@dataclass(frozen=True)
class Floor:
    """What a conversion must keep: worst output segment SQNR and argmax agreement."""

    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    def shortfalls(self, outputs) -> list[str]:  # noqa: ANN001 - list[OutputFidelity]
        """Each way ``outputs`` miss the floor, in words (empty: it is met)."""
        missing = []
        for o in outputs:
            if o.segment_sqnr_db < self.min_sqnr_db:
                where = "" if o.segment_sqnr_db == o.sqnr_db else " (worst channel group)"
                missing.append(f"output {o.name}: SQNR {o.segment_sqnr_db:.1f} dB{where} < {self.min_sqnr_db:g} dB")
            if o.shape_kept < self.min_agreement:
                missing.append(f"output {o.name}: its shape (a length the model decides) differs from "
                               f"float's on {1 - o.shape_kept:.0%} of the batches")
            # Agreement over a handful of decisions is noise (1 of 2 flipped is 0.5): only
            # gated from MIN_AGREEMENT_POSITIONS on, always reported.
            if (o.agreement is not None and o.positions >= MIN_AGREEMENT_POSITIONS
                    and o.agreement < self.min_agreement):
                what = "mask IoU" if o.proxy == "mask IoU" else "argmax agreement"
                missing.append(f"output {o.name}: {what} {o.agreement:.3f} < {self.min_agreement:g}")
        return missing


@dataclass
class Attempt:
    """One candidate: how it was made and what was measured."""

    label: str
    recipe: Recipe
    outputs: list = field(default_factory=list)  # OutputFidelity
    shortfalls: list[str] = field(default_factory=list)
    latency_ratio: float | None = None
    float_ms: float | None = None
    candidate_ms: float | None = None
    size_bytes: int = 0  # the candidate's file (and external data) as written
    path: str | None = None  # where the guard wrote it (its temporary folder)
    seconds: float = 0.0
    error: str | None = None
    timing: str | None = None  # why the candidate was not timed, when it was not

    @property
    def meets_floor(self) -> bool:
        return self.error is None and not self.shortfalls

    @property
    def widened(self) -> bool:
        """Whether [[layer]] rules give some layers 16-bit activations (the guard's repair)."""
        return any(r.activation_bits == 16 for r in self.recipe.layer)

    @property
    def slower(self) -> bool:
        return self.latency_ratio is not None and self.latency_ratio > SLOWER_MARGIN

    @property
    def no_faster(self) -> bool:
        """Within timing noise of float or slower: the candidate buys size, not speed."""
        return self.latency_ratio is not None and self.latency_ratio * SLOWER_MARGIN > 1.0

    def worst_db(self) -> float:
        return min((o.segment_sqnr_db for o in self.outputs), default=-math.inf)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "scheme": self.recipe.name,
            "meets_floor": self.meets_floor,
            "shortfalls": self.shortfalls,
            "error": self.error,
            "latency_ratio": None if self.latency_ratio is None else round(self.latency_ratio, 3),
            "float_ms": None if self.float_ms is None else round(self.float_ms, 4),
            "candidate_ms": None if self.candidate_ms is None else round(self.candidate_ms, 4),
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 2),
            "timing": self.timing,
            "outputs": [o.to_dict() for o in self.outputs],
            "excluded": list(self.recipe.quantize.exclude),
            "activation_bits_16": [r.match for r in self.recipe.layer if r.activation_bits == 16],
        }


def split_holdout(dataset, eval_dataset=None):  # noqa: ANN001, ANN201 - qtool.data.Dataset
    """(calibration samples, held-out samples, a note) from ``dataset``.

    With ``eval_dataset`` the calibration keeps every sample. Otherwise every
    ``HOLDOUT_EVERY``-th sample (at most ``MAX_HOLDOUT``) is held out; a folder of one
    sample is measured on that sample, and the note says so.
    """
    if eval_dataset is not None:
        return dataset, eval_dataset.subset(range(min(len(eval_dataset), MAX_HOLDOUT))), "--eval-data"
    n = len(dataset)
    if n < 2:
        return dataset, dataset, "only 1 sample: measured on the calibration sample itself"
    held = [i for i in range(n) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1][:MAX_HOLDOUT] or [n - 1]
    keep = [i for i in range(n) if i not in set(held)]
    return (dataset.subset(keep), dataset.subset(held),
            f"{len(held)} of {n} samples held out (every {HOLDOUT_EVERY}th), calibrated on the other {len(keep)}")


class Reference:
    """The float model's outputs on the held-out samples, computed once."""

    def __init__(self, model_path, holdout, names: list[str] | None = None,  # noqa: ANN001
                 features: frozenset[str] = frozenset()) -> None:
        """``features``: outputs judged without the argmax proxy (measure.feature_outputs)."""
        from qtool import runtime

        self.session = runtime.open_session(model_path, "cpu", role="reference")
        outs = self.session.get_outputs()
        self.feeds = [feed for _, feed in holdout.batches(1)]
        first = runtime.run(self.session, self.feeds[0])
        self.names = names or [n for n in (o.name for o in outs)
                               if getattr(first[n], "dtype", None) is not None and first[n].dtype.kind == "f"]
        self.outputs = [first] + [runtime.run(self.session, f) for f in self.feeds[1:]]
        self.features = features

    def compare(self, candidate_session) -> list:  # noqa: ANN001
        from qtool import runtime
        from qtool.pipeline.measure import compare_outputs

        cand = [runtime.run(candidate_session, f, self.names) for f in self.feeds]
        return compare_outputs(self.outputs, cand, self.names, self.features)


# Targets whose int8 does not run on onnxruntime's CPU kernels (qtool.targets.presets).
OTHER_RUNTIME_TARGETS = ("openvino", "qnn", "tensorrt")


def measured_elsewhere(recipe: Recipe, runtime=None) -> bool:  # noqa: ANN001
    """Whether the recipe's target runs on another runtime than the one the guard has here
    (its int8 kernels are not onnxruntime CPU's, and no --runtime for it was given)."""
    from qtool.runtime import ORT_CPU

    return runtime in (None, ORT_CPU) and recipe.quantize.target in OTHER_RUNTIME_TARGETS


def open_candidate(path, recipe: Recipe, runtime=None):  # noqa: ANN001, ANN201 - a session
    """The session the guard measures a candidate's outputs with.

    On ``runtime`` (a qtool.runtime.Runtime) when it is not onnxruntime's CPU provider: the
    accuracy is the deployed runtime's. Otherwise onnxruntime's CPU provider; for a target
    that runs elsewhere (openvino, qnn, tensorrt) without its QDQ fusions ("basic"
    optimisation: Q/DQ computed as written, what those runtimes' own int8 reproduces),
    since its int8 kernels are not what will run. Those fusions also reject valid graphs
    they were not written for: onnxruntime 1.32 fails to load a 16-bit activation fed
    through Reshape/Transpose from an 8-bit one into an int8-weight MatMul (its requantize
    step makes a QuantizeLinear whose output type disagrees with its zero point).
    """
    from qtool.runtime import ORT_CPU, open_session

    if runtime not in (None, ORT_CPU):
        return runtime.open(path, role="candidate")
    basic = measured_elsewhere(recipe, runtime)
    return open_session(path, "cpu", optimization="basic" if basic else "all", role="candidate")


def time_against_float(model_path, candidate_path, feed: dict, runtime=None) -> tuple[float, float]:  # noqa: ANN001
    """(float median ms, candidate median ms), timed in turns on the same feed, on
    ``runtime`` (a qtool.runtime.Runtime; None: onnxruntime's CPU provider).

    On onnxruntime's CPU provider both run on one thread and the clock is that thread's CPU
    time: a 1-thread session computes on the calling thread, so the ratio holds while other
    processes load the machine (wall time on a loaded 2-core machine put one candidate at
    21-27x float, where CPU time put it at 0.9x). Other runtimes keep their own threads and
    are timed by the wall clock."""
    from qtool.runtime import ORT_CPU
    from qtool.runtime.latency import measure

    where = runtime or ORT_CPU
    on_ort_cpu = where == ORT_CPU
    threads, clock = (1, time.thread_time) if on_ort_cpu else (0, time.perf_counter)
    # By path, so a candidate written with external data (over 2 GB) finds its weights.
    probe = where.open(candidate_path, threads=threads, role="candidate")
    start = clock()
    probe.run(None, feed)
    once = max(clock() - start, 1e-5)
    del probe
    runs = int(min(50, max(5, TIMING_SECONDS / (2 * once))))
    stats = measure(
        {"reference": lambda: where.open(model_path, threads=threads, role="reference"),
         "candidate": lambda: where.open(candidate_path, threads=threads, role="candidate")},
        feed, runs=runs, warmup=2, provider=where.label, threads=threads, clock=clock,
    )
    return stats["reference"].median_ms, stats["candidate"].median_ms


def nearest_layers(model: ir.Model, outputs: list[str], count: int) -> list[str]:
    """Names of the ``count`` quantizable nodes nearest (by graph distance) to ``outputs``."""
    from qtool import ops
    from qtool.model import iter_nodes

    producers = {v.name: n for n in iter_nodes(model) for v in n.outputs if v is not None}
    seen, found = set(), []
    frontier = [producers[o] for o in outputs if o in producers]
    while frontier and len(found) < count:
        nxt = []
        for node in frontier:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.name and ops.is_candidate(node) and node.name not in found:
                found.append(node.name)
                if len(found) == count:
                    break
            nxt += [producers[v.name] for v in node.inputs if v is not None and v.name in producers]
        frontier = nxt
    return found


def recovery_repair(label: str, recipe: Recipe) -> Iterator[tuple[str, Recipe]]:
    """A static int8 candidate with the recovery passes of REPAIR added (none: it has them
    all already, or it is another scheme)."""
    from qtool.passes.recovery import PASSES, REPAIR
    from qtool.pipeline.plan import plan_for

    have = recipe.recovery.passes
    # bias-full is the full variant of bias: a recipe with it needs no fast one beside it
    wanted = tuple(p for p in REPAIR if not (p == "bias" and "bias-full" in have))
    if plan_for(recipe).kind != "int8-static" or all(p in have for p in wanted):
        return
    passes = tuple(p for p in PASSES if p in have or p in wanted)
    yield f"{label} + recovery ({', '.join(passes)})", recipe.override("recovery", passes=passes)


def can_widen(recipe: Recipe) -> bool:
    """Whether a repair may raise layers to 16-bit activations: static QDQ at 8 bits."""
    from qtool.pipeline.plan import plan_for

    plan = plan_for(recipe)
    return plan.kind == "int8-static" and plan.format == "qdq" and recipe.quantize.activation_bits == 8


def repairs(attempt: Attempt, model: ir.Model, ranked: list[list[str]] | None = None
            ) -> Iterator[list[tuple[str, Recipe]]]:
    """Ever larger sets of layers, from two rankings taken in turns: the layers nearest the
    outputs that missed the floor (a head whose output shares one scale), and the layers
    diagnosis ranks costliest (``ranked``: node-name groups, worst first; where the error
    starts further up). A set already tried is not tried again. Each set comes as a round of
    alternatives: its activations raised to 16 bits (static QDQ only), then kept float. Static
    int8 tries accuracy recovery first (``recovery_repair``), as a round of its own."""
    for alternative in recovery_repair(attempt.label, attempt.recipe):
        yield [alternative]
    failing = [o.name for o in attempt.outputs
               if any(s.startswith(f"output {o.name}:") for s in attempt.shortfalls)]
    rankings = [("nearest the output", lambda step: nearest_layers(model, failing, step))]
    if ranked:
        rankings.append(("diagnosis ranks costliest",
                         lambda step: list(dict.fromkeys(n for group in ranked[:step] for n in group))))
    previous = {where: 0 for where, _ in rankings}
    tried: set[frozenset[str]] = set()
    q = attempt.recipe.quantize
    widen = can_widen(attempt.recipe)
    for step in REPAIR_STEPS:
        for where, pick in rankings:
            layers = pick(step)
            if len(layers) <= previous[where] or frozenset(layers) in tried:
                continue
            previous[where] = len(layers)
            tried.add(frozenset(layers))
            patterns = tuple(glob_escape(n) for n in layers)
            found: list[tuple[str, Recipe]] = []
            if widen:
                rules = tuple(LayerOverride(p, activation_bits=16) for p in patterns)
                found.append((f"{attempt.label}, {len(layers)} layer(s) {where} at 16-bit activations",
                              dataclasses.replace(attempt.recipe, layer=rules + attempt.recipe.layer)))
            found.append((f"{attempt.label}, {len(layers)} layer(s) {where} kept float",
                          attempt.recipe.override("quantize", exclude=q.exclude + patterns)))
            yield found
