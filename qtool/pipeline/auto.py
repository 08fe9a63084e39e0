"""Guarded conversion: candidates cheapest first, each measured, repaired, the best kept.

``--scheme auto`` (the default when data is given and no scheme flag is) tries static
int8 and dynamic int8 (dynamic first on transformer-shaped graphs, where static int8
activations are known to lose the most), then repairs of the best of them (the layers
nearest the failing output at 16-bit activations, or float), and last int8 weight storage
with float activations (smaller, not faster), also when every candidate that met the floor
runs slower than float (the choice then weighs their speed), then float16 weight storage. An explicit
scheme is measured and repaired the same way, but never swapped for another.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from qtool.config import Recipe
from qtool.errors import QtoolError
from qtool.pipeline.flow import MIN_TRANSFORMER_MATMULS, NOT_SMALLER
from qtool.pipeline.guard import (
    REPAIR_STEPS,
    Attempt,
    Floor,
    Reference,
    measured_elsewhere,
    open_candidate,
    repairs,
    split_holdout,
    time_against_float,
)
from qtool.pipeline.progress import ProgressFactory, no_progress

DEFAULT_BUDGET_SECONDS = 600.0
# Repairs stop at this share of the budget: on a heavy model (a 640x640 detector, ~70 s a
# round) they used all of it, and the weight-storage candidates after them never ran.
REPAIR_SHARE = 0.75
PER_CHANNEL_OPSET = 13
TINY_MODEL_MS = 1.0
CLEARLY_FASTER = 1.25  # a later candidate replaces an earlier one when 1.25x faster,
SAME_SPEED = 1.1  # or when as fast within timing noise (CPU time still moves ~10% under load),
SAME_SIZE = 1.1  # no larger,
MORE_ACCURATE_DB = 6.0  # and this much more accurate (worst output group SQNR)
MUCH_SMALLER = 0.5  # or as fast, at most half the size and no less accurate
OTHER_RANGES = "mse"  # the static candidate that met the floor is also calibrated this way,
OTHER_RANGES_DB = 1.0  # and that one is kept when this much more accurate on the held-out samples
SAME_GRAPH = 0.01  # (the same graph: sizes within 1%)


@dataclass
class GuardOutcome:
    """The chosen candidate (None: nothing met the floor), the best one, every attempt."""

    chosen: object | None  # qtool.pipeline.schemes.Converted
    best: object | None
    best_attempt: Attempt | None
    attempts: list[Attempt] = field(default_factory=list)
    holdout: str = ""
    holdout_samples: int = 0
    reports: list = field(default_factory=list)  # PassReports of the chosen candidate's preparation
    decision: str = ""
    ranking: list = field(default_factory=list)  # node-name groups diagnosis ranked, worst first
    ranking_note: str = ""
    timed_on: str = "cpu"  # the runtime label candidates were timed on (convert --runtime)

    def to_dict(self, floor: Floor) -> dict:
        return {
            "timed_on": self.timed_on,
            "floor": {"min_sqnr_db": floor.min_sqnr_db, "min_agreement": floor.min_agreement},
            "holdout": self.holdout,
            "holdout_samples": self.holdout_samples,
            "attempts": [a.to_dict() for a in self.attempts],
            "chosen": self.best_attempt.label if self.chosen is not None and self.best_attempt else None,
            "decision": self.decision,
            "repair_ranking": self.ranking,
            "repair_ranking_note": self.ranking_note,
        }


def transformer_shaped(model: ir.Model) -> bool:
    """Softmax, no Conv, and several MatMul/Gemm with constant weights."""
    from qtool import ops
    from qtool.model import iter_nodes

    ops_seen, weighted = set(), 0
    for node in iter_nodes(model):
        ops_seen.add(node.op_type)
        if node.op_type in ("MatMul", "Gemm") and ops.constant_weight(node, 1) is not None:
            weighted += 1
    return "Softmax" in ops_seen and "Conv" not in ops_seen and weighted >= MIN_TRANSFORMER_MATMULS


def default_static(recipe: Recipe, model: ir.Model, samples: bool = True,
                   upgrade: bool = False) -> tuple[Recipe, str]:
    """The default static recipe for ``model`` and its label, with the recovery passes
    measured to pay (qtool.passes.recovery.DEFAULT) when calibration ``samples`` are given,
    unless the recipe names its own or says auto = false.

    Per-channel Q/DQ needs opset 13. An older model gets per-tensor weights (said in the
    label), unless ``upgrade``: the guard raises the opset of its first static candidate,
    since it measures the result against the original float model anyway, and per-tensor
    weights cost old-opset models most of their accuracy (a PP-OCR recognizer at opset 11:
    CER 0.046 per-tensor, 0.0 per-channel)."""
    from qtool.passes.recovery import DEFAULT

    q = recipe.quantize
    if samples and recipe.recovery.auto and not recipe.recovery.passes:
        recipe = recipe.override("recovery", passes=DEFAULT)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if q.per_channel and opset < PER_CHANNEL_OPSET and not q.allow_opset_upgrade:
        if upgrade:
            return (recipe.override("quantize", allow_opset_upgrade=True),
                    f"int8-static (opset {opset} -> {PER_CHANNEL_OPSET} for per-channel weights)")
        return (recipe.override("quantize", per_channel=False),
                f"int8-static (per-tensor weights: opset {opset} < {PER_CHANNEL_OPSET})")
    return recipe, "int8-static"


def base_candidates(recipe: Recipe, model: ir.Model, auto: bool) -> list[tuple[str, Recipe, bool]]:
    """The schemes to try, cheapest and likeliest first, each with whether it is only a
    fallback: tried when the candidate before it failed to convert (per-tensor weights,
    when onnx's version converter cannot raise an old model's opset)."""
    if not auto:
        return [(recipe.name or "recipe", recipe, False)]
    from qtool.config import load_recipe

    q = recipe.quantize
    raised, raised_label = default_static(recipe, model, upgrade=True)
    static = [(raised_label, raised, False)]
    if raised.quantize.allow_opset_upgrade and not q.allow_opset_upgrade:
        kept, kept_label = default_static(recipe, model)
        static.append((kept_label, kept, True))
    dynamic = load_recipe("int8-dynamic").override("quantize", exclude=q.exclude or None)
    dynamic = dynamic.override("calibration", samples=recipe.calibration.samples)
    dynamic = [("int8-dynamic", dynamic, False)]
    return dynamic + static if transformer_shaped(model) else static + dynamic


WEIGHTS_LABEL = "int8-weights (activations float)"
FP16_WEIGHTS_LABEL = "fp16-weights (compute float)"


def weights_candidate(recipe: Recipe, preset: str = "int8-weights") -> Recipe:
    """The last resorts when no int8-activation candidate meets the floor: int8 weight storage,
    float activations (qtool.passes.int8_weights), about 4x smaller at float's speed, not
    faster; then float16 weight storage, 2x smaller. The user's exclusions still hold."""
    from qtool.config import load_recipe

    return load_recipe(preset).override("quantize", exclude=recipe.quantize.exclude or None)


class Guard:
    """One guarded conversion of one model (see the module docstring)."""

    def __init__(self, source: ir.Model, model_path: Path, recipe: Recipe, data, eval_data,  # noqa: ANN001
                 floor: Floor, budget_s: float, progress: ProgressFactory, runtime=None,  # noqa: ANN001
                 executor=None) -> None:  # noqa: ANN001 - qtool.executors.Executor for gptq/awq layers
        from qtool.data import Dataset, input_specs

        self.source, self.model_path, self.floor = source, model_path, floor
        self.budget_s, self.progress = budget_s, progress
        self.runtime = runtime  # where candidates are timed (qtool.runtime.Runtime; None: onnxruntime CPU)
        self.executor = executor
        specs = input_specs(source)
        full = Dataset(data, specs, recipe.preprocess)
        held = Dataset(eval_data, specs, recipe.preprocess) if eval_data is not None else None
        self.calib, self.holdout, self.holdout_note = split_holdout(full, held)
        from qtool.pipeline.measure import feature_outputs

        self.reference = Reference(model_path, self.holdout, features=feature_outputs(source))
        self.prepared: dict[str, object] = {}
        self.count = 0
        self.errors: list[Exception] = []
        from qtool.model import weight_bytes

        self.source_weights = weight_bytes(source)
        self.start = time.perf_counter()
        self.tmp = tempfile.TemporaryDirectory(prefix="qtool-guard-")

    def over_budget(self, share: float = 1.0) -> bool:
        return time.perf_counter() - self.start > share * self.budget_s

    def prepare(self, recipe: Recipe):  # noqa: ANN201 - Prepared
        """Calibration/statistics once per scheme: repairs only exclude or widen layers.

        Calibration stays on onnxruntime whatever ``self.runtime`` is: it needs every
        activation to be quantized exposed as a graph output and streamed batch by batch
        (qtool.runtime.collect), and the ranges it records belong to the float model, not to
        the runtime that will run the int8 one."""
        from qtool.pipeline.flow import prepare
        from qtool.pipeline.plan import plan_for

        plan = plan_for(recipe)
        key = _prepare_key(recipe)
        if key not in self.prepared:
            self.prepared[key] = prepare(self.source, self.model_path, recipe, plan,
                                         data=self.calib, progress=self.progress)
        return self.prepared[key]

    def attempt(self, label: str, recipe: Recipe):  # noqa: ANN201 - (Attempt, Converted | None)
        from qtool.model import model_size_bytes, save, weight_bytes
        from qtool.pipeline.flow import convert_model

        t0 = time.perf_counter()
        attempt = Attempt(label, recipe)
        try:
            prepared = self.prepare(recipe)
            with self.progress(f"converting ({label})", None, None):
                converted = convert_model(
                    prepared.model, recipe, table=prepared.table, preprocessed=prepared.preprocessed,
                    activations=prepared.activations, absmax=prepared.absmax, dataset=prepared.dataset,
                    executor=self.executor)
            path = Path(self.tmp.name) / f"candidate{self.count}.onnx"
            self.count += 1
            save(converted.model, path, verify=False)
            attempt.path = str(path)
            attempt.size_bytes = model_size_bytes(path)
            weights = weight_bytes(converted.model)
            if weights >= NOT_SMALLER * self.source_weights:
                attempt.error = (f"nothing was compressed (weights {weights / 1e6:.3f} MB "
                                 f"of {self.source_weights / 1e6:.3f} MB)")
                return attempt, converted
            with self.progress(f"measuring ({label})", None, "samples"):
                attempt.outputs = self.reference.compare(open_candidate(path, recipe, self.runtime))
                attempt.shortfalls = self.floor.shortfalls(attempt.outputs)
                float_ms = cand_ms = None
                if measured_elsewhere(recipe, self.runtime):
                    # onnxruntime's CPU kernels are not what runs this target's int8 (and its
                    # QDQ fusions may reject the graph, see open_candidate): their speed would
                    # only mislead the choice. Accuracy stands; speed is measured with --runtime.
                    target = recipe.quantize.target
                    attempt.timing = (f"not timed: target {target} does not run on onnxruntime's CPU provider"
                                      + (" (--runtime openvino times it on OpenVINO)" if target == "openvino"
                                         else f" (no runtime here runs {target})"))
                else:
                    float_ms, cand_ms = time_against_float(self.model_path, path, self.reference.feeds[0],
                                                           self.runtime)
            if float_ms is not None:
                attempt.float_ms, attempt.candidate_ms = float_ms, cand_ms
                attempt.latency_ratio = cand_ms / float_ms if float_ms > 0 else None
        except Exception as exc:  # noqa: BLE001 - a failed candidate is reported, not fatal
            attempt.error = exc.message if isinstance(exc, QtoolError) else f"{type(exc).__name__}: {exc}"
            self.errors.append(exc)
            converted = None
        finally:
            attempt.seconds = time.perf_counter() - t0
        return attempt, converted

    def other_ranges(self, results: list) -> list:
        """The static candidate that met the floor, calibrated again with MSE-optimal ranges:
        the same graph, so the same size and speed, and only the held-out fidelity decides
        (a YOLOX-style detector: 22.0 dB with min/max ranges, 23.8 dB with MSE)."""
        from qtool.pipeline.plan import plan_for

        # The search above stops at the first candidate that meets the floor and is not slower.
        last = results[-1][0] if results else None
        if last is None or not _good(last) or last.slower:
            return []
        if plan_for(last.recipe).kind != "int8-static" or last.recipe.calibration.method != "minmax":
            return []
        variant = last.recipe.override("calibration", method=OTHER_RANGES)
        return [self.attempt(f"{last.label}, {OTHER_RANGES} ranges", variant)]

    def raise_when_all_failed(self, results: list) -> None:
        """Every attempt failed to convert and one failure is the user's to fix (a flag, the
        data, the model): say it as it is, instead of "no candidate met the floor"."""
        raised = [e for e in self.errors if isinstance(e, QtoolError)]
        if raised and all(a.error is not None and a.outputs == [] for a, _ in results):
            self.tmp.cleanup()
            raise raised[0]

    def rank(self, attempt: Attempt) -> tuple[list[list[str]], str]:
        """The layers diagnosis ranks costliest in ``attempt`` on the held-out samples, and a
        note when it could not rank them (repairs then keep the layers nearest the output)."""
        from qtool.pipeline.layers import costly_layers

        if attempt.path is None:
            return [], "no candidate file to diagnose"
        try:
            with self.progress("ranking layers (diagnosis)", None, "samples"):
                ranked = costly_layers(attempt.path, self.model_path, self.holdout, count=max(REPAIR_STEPS))
        except Exception as exc:  # noqa: BLE001 - the fallback ranking is said, not fatal
            why = exc.message if isinstance(exc, QtoolError) else f"{type(exc).__name__}: {exc}"
            return [], f"diagnosis could not rank the layers ({why}); repairs keep those nearest the output"
        if not ranked:
            return [], "diagnosis found no quantized layer to rank; repairs keep those nearest the output"
        return ranked, f"ranked by diagnosis of {attempt.label} on the held-out samples"

    def run(self, recipe: Recipe, auto: bool) -> GuardOutcome:
        """Try, repair, choose; see the module docstring."""
        outcome = GuardOutcome(None, None, None, holdout=self.holdout_note, holdout_samples=len(self.holdout),
                               timed_on=self.runtime.label if self.runtime is not None else "cpu")
        results: list[tuple[Attempt, object]] = []
        for label, candidate, fallback in base_candidates(recipe, self.source, auto):
            if results and self.over_budget():
                break
            if fallback and results[-1][0].error is None:
                continue
            results.append(self.attempt(label, candidate))
            if _good(results[-1][0]) and not results[-1][0].slower:
                break
        # A target fixes the scheme, not the ranges: MSE ranges are tried for it as for auto.
        if (auto or recipe.quantize.target) and not self.over_budget():
            results += self.other_ranges(results)
        if not auto:
            self.raise_when_all_failed(results)
        if not any(_good(a) for a, _ in results):
            base = max((r for r in results if r[0].error is None), key=lambda r: r[0].worst_db(), default=None)
            if base is not None:
                model = self.prepare(base[0].recipe).model
                outcome.ranking, outcome.ranking_note = self.rank(base[0])
                for alternatives in repairs(base[0], model, outcome.ranking):
                    if self.over_budget(REPAIR_SHARE):
                        break
                    # Both repairs of a round are measured, so the choice below can weigh
                    # their speed (the 16-bit one keeps int8 weights: it comes first).
                    results += [self.attempt(label, repaired) for label, repaired in alternatives]
                    if any(_good(a) for a, _ in results[-len(alternatives):]):
                        break
        # A candidate that meets the floor but runs no faster than float (a 16-bit repair, whose
        # layers onnxruntime's CPU provider runs in float; int8 activations in a model too small
        # to gain from them: a text-angle classifier at 1.55x float's time; a recognizer's
        # static int8 at 0.98x float's speed that lost 1.3% of its characters) still lets the
        # last resort be measured: the choice then weighs their speed, size and accuracy.
        # With nothing at the floor they are tried whatever the time spent: each is one
        # conversion and one measurement, and the only way left to deliver a model.
        nothing = not any(_good(a) for a, _ in results)
        if auto and not any(_good(a) and not a.no_faster for a, _ in results) and (nothing or not self.over_budget()):
            results.append(self.attempt(WEIGHTS_LABEL, weights_candidate(recipe)))
            # Weights that do not survive int8 either (a model 1e-3 of weight noise moves by
            # 20 dB): float16 storage, 2x smaller at float speed, is the last thing to try.
            if not any(_good(a) for a, _ in results):
                results.append(self.attempt(FP16_WEIGHTS_LABEL, weights_candidate(recipe, "fp16-weights")))
        # Auto mode raises only now: weight storage, which needs no calibration, may still
        # deliver where every int8-activation candidate failed (a Loop body's tensors).
        self.raise_when_all_failed(results)
        outcome.attempts = [a for a, _ in results]
        good = [r for r in results if _good(r[0])]
        if good:
            chosen = _choose(good)
            outcome.chosen = outcome.best = chosen[1]
            outcome.best_attempt = chosen[0]
            outcome.decision = _decision(chosen[0], len(results))
        else:
            ranked = [r for r in results if r[1] is not None]
            if ranked:
                best = max(ranked, key=lambda r: r[0].worst_db())
                outcome.best, outcome.best_attempt = best[1], best[0]
            outcome.decision = f"no candidate met the floor in {len(results)} attempt(s)"
        if outcome.best_attempt is not None:
            prepared = self.prepared.get(_prepare_key(outcome.best_attempt.recipe))
            outcome.reports = list(getattr(prepared, "reports", []))
        self.tmp.cleanup()
        return outcome


def _choose(good: list[tuple[Attempt, object]]) -> tuple[Attempt, object]:
    """The first candidate (cheapest first) that meets the floor, unless a later one is
    clearly faster (by CLEARLY_FASTER): timing noise alone must not change the result; or as
    fast within noise (SAME_SPEED), no larger (SAME_SIZE) and clearly more accurate (by
    MORE_ACCURATE_DB): a recognizer whose static int8 ran no faster than float lost 1.3% of
    its characters at 16 dB, where int8 weight storage, as fast and smaller, lost none; or as
    fast, at most MUCH_SMALLER the size and no less accurate (a file-type classifier's dynamic
    int8 at float's speed kept its float Convs: 0.89x the size, against 0.26x for weight
    storage). Candidates neither of which was timed count as the same speed."""
    chosen = good[0]
    for other in good[1:]:
        a, b = chosen[0].latency_ratio, other[0].latency_ratio
        if (a is None) != (b is None):
            continue
        if a is None:  # neither timed (a target that runs elsewhere): the same speed, unknown
            a = b = 1.0
        if b * CLEARLY_FASTER < a:
            chosen = other
        elif (b <= a * SAME_SPEED and other[0].size_bytes <= chosen[0].size_bytes * MUCH_SMALLER
              and other[0].worst_db() >= chosen[0].worst_db()):
            chosen = other  # same speed: the smaller file is what the user gets from compressing
        elif b <= a * SAME_SPEED and other[0].size_bytes <= chosen[0].size_bytes * SAME_SIZE:
            # The same graph with other ranges (sizes within SAME_GRAPH): only accuracy differs.
            same_graph = abs(other[0].size_bytes - chosen[0].size_bytes) <= SAME_GRAPH * chosen[0].size_bytes
            if other[0].worst_db() >= chosen[0].worst_db() + (OTHER_RANGES_DB if same_graph else MORE_ACCURATE_DB):
                chosen = other
    return chosen


def _good(attempt: Attempt) -> bool:
    return attempt.meets_floor


def _prepare_key(recipe: Recipe) -> tuple:
    """What a preparation depends on: the scheme, and the recovery passes that run before
    calibration (repairs that only exclude layers share it)."""
    from qtool.passes.recovery import BEFORE_CALIBRATION_NAMES
    from qtool.pipeline.plan import plan_for

    return (plan_for(recipe).kind, recipe.calibration.method,
            tuple(p for p in recipe.recovery.passes if p in BEFORE_CALIBRATION_NAMES))



def _decision(attempt: Attempt, tried: int) -> str:
    speed = ""
    if attempt.latency_ratio is not None and attempt.latency_ratio > 0:
        speed = f", {1 / attempt.latency_ratio:.2f}x float's speed"
    text = f"chose {attempt.label} after {tried} attempt(s): meets the floor{speed}"
    if attempt.slower:
        text += (f"; it is slower than float ({attempt.candidate_ms:.3f} vs {attempt.float_ms:.3f} ms "
                 "per sample) and no candidate that meets the floor was faster: "
                 + slower_reason(attempt))
    return text


def slower_reason(attempt: Attempt) -> str:
    """Why a quantized model can run slower than float here, from what was measured."""
    if attempt.float_ms is not None and attempt.float_ms < TINY_MODEL_MS:
        return ("the float model runs in under a millisecond, where quantizing and dequantizing "
                "activations costs more than int8 arithmetic saves; it is smaller, not faster")
    if attempt.recipe.quantize.weights_only:
        stored = "float16" if attempt.recipe.quantize.dtype == "fp16" else "int8"
        return (f"its weights are stored {stored} and every activation stays float (no int8-activation "
                "candidate met the floor): it is smaller, not faster")
    if attempt.widened:
        return ("the layers with 16-bit activations run in float on onnxruntime's CPU provider (it has "
                "no 16-bit integer kernels), between 16-bit quantize/dequantize steps")
    if attempt.recipe.quantize.exclude:
        return ("the layers kept float add quantize/dequantize steps at every boundary with "
                "int8 layers (see `qtool eval --json` integer-kernel report for which nodes run int8)")
    return ("onnxruntime does not fuse some of its quantized nodes into integer kernels on this "
            "CPU (see the integer-kernel report of `qtool eval --json`)")


def guarded(source: ir.Model, model_path: Path, recipe: Recipe, *, data, eval_data=None,  # noqa: ANN001
            floor: Floor | None = None, auto: bool = False, budget_s: float = DEFAULT_BUDGET_SECONDS,
            progress: ProgressFactory = no_progress, runtime=None, executor=None) -> GuardOutcome:  # noqa: ANN001
    """Run the guard (see the module docstring) and return its outcome; ``runtime`` (a
    qtool.runtime.Runtime) is where candidates are timed against float."""
    guard = Guard(source, Path(model_path), recipe, data, eval_data, floor or Floor(), budget_s, progress, runtime,
                  executor)
    return guard.run(recipe, auto)
