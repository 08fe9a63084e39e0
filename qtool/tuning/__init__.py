"""``qtool tune``: the smallest mixed-precision model within an accuracy budget.

Phases, one module each (each reports progress through ``progress(description, total,
unit)``, a context manager yielding ``advance(n)``, as qtool.cli.app.progress):

1. options (qtool.tuning.options): the budget, the base recipe and the two splits. The search
   split is every other sample of ``data`` (positions 0, 2, 4, ...), the held-out split the
   rest (1, 3, 5, ...), or all of ``data`` / all of ``eval_data`` when held-out data is
   given. Calibration (static int8) and sensitivities use only the search split; only the
   final check reads the held-out split.
2. groups (qtool.tuning.groups): the weight layers the scheme can lower, grouped. In the int8
   schemes a layer at 8 bits is int8 and one below 8 bits is weight-only blocks (MatMulNBits
   for MatMul/Gemm, blocked DequantizeLinear feeding a float Conv for Conv: opset 21, so a
   CNN below it takes 2/3/4-bit Convs only with ``allow_opset_upgrade``, which raises the
   opset once with onnx's converter).
3. sensitivity (qtool.tuning.sensitivity): each layer group alone at each candidate precision,
   scored on the search split, cached on disk.
4. search (qtool.tuning.search): greedy chain of moves; prefixes of it are measured on the
   search split and the longest within the budget (``max_drop``) or the shortest within the
   size (``target_mb``) is kept.
5. verify (qtool.tuning.verify): the chosen model is written to ``output`` and scored on the
   held-out split; when its drop exceeds the budget, the most sensitive lowered group goes
   one precision up and the check repeats (the fallback), down to all-float if need be.
6. frontier (qtool.tuning.frontier): uniform candidates (every group at each of ``bits``)
   scored on held-out data when time allows, so the table compares tuned against uniform
   int8 / int4; the Pareto frontier of every candidate, as a table and a plot.

Candidate models come from qtool.tuning.recipes: every group gets a ``[[layer]]`` override and
a final ``*`` = 32 keeps all other nodes float, so the tuned model quantizes exactly the
layers the search chose. The output recipe reproduces the model: ``qtool convert MODEL
--recipe OUT.recipe.toml`` (static int8 also ``--calib OUT.calib.json``, the table tune
calibrated on the search split).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qtool.config import Recipe
from qtool.tuning.frontier import Candidate, mix, plot, uniform_candidates, write_frontier
from qtool.tuning.groups import Group, plan_groups
from qtool.tuning.options import (
    Clock,
    base_recipe,
    check_budget,
    make_splits,
    parse_bits,
    parse_budget,
)
from qtool.tuning.recipes import Builder, recipe_toml, sidecar, tuned_recipe, write_recipe
from qtool.tuning.search import SizeModel, search
from qtool.tuning.sensitivity import (
    Measurer,
    SensitivityCache,
    data_key,
    measure_sensitivities,
    search_scorer,
)
from qtool.tuning.verify import Verified, held_out_scorer, verify

__all__ = ["TuneResult", "parse_bits", "parse_budget", "recipe_toml", "tune", "tuned_recipe"]

ProgressFactory = Callable[[str, float | None, str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _no_progress(description: str, total: float | None, unit: str = "") -> Iterator[Callable[[int], None]]:
    yield lambda n=1, total=None: None


@dataclass
class TuneResult:
    output: Path
    recipe_path: Path
    frontier_path: Path
    table_path: Path | None
    plot_path: Path | None
    recipe: Recipe
    scheme: str
    metric: str
    higher_is_better: bool
    budget: float  # metric units (max-drop mode) or bytes (target-size mode)
    mode: str  # "max-drop" | "target-size"
    groups: list[Group]
    bits: list[int]
    reference_metric: float  # float model, held-out split
    tuned_metric: float
    drop: float
    size_bytes: int
    float_bytes: int
    within_budget: bool
    fallback_steps: int
    measured: int
    cached: int
    out_of_time: bool
    seconds: float
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        per_bits = Counter(self.bits)
        return {
            "output": str(self.output), "recipe": str(self.recipe_path), "frontier": str(self.frontier_path),
            "calibration_table": str(self.table_path) if self.table_path else None,
            "plot": str(self.plot_path) if self.plot_path else None,
            "scheme": self.scheme, "metric": self.metric, "higher_is_better": self.higher_is_better,
            "mode": self.mode, "budget": self.budget,
            "reference_metric": self.reference_metric, "tuned_metric": self.tuned_metric, "drop": self.drop,
            "size_bytes": self.size_bytes, "float_bytes": self.float_bytes,
            "within_budget": self.within_budget, "fallback_steps": self.fallback_steps,
            "groups": [{"key": g.key, "members": len(g.members), "op_type": g.op_types[0], "params": g.params,
                        "bits": b} for g, b in zip(self.groups, self.bits)],
            "groups_per_bits": {str(k): v for k, v in sorted(per_bits.items(), reverse=True)},
            "measured": self.measured, "cached": self.cached, "out_of_time": self.out_of_time,
            "seconds": round(self.seconds, 2),
            "candidates": [c.to_dict() for c in self.candidates], "notes": list(self.notes),
        }


def tune(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    eval_data: str | os.PathLike | None = None,
    metric: str | None = None,
    max_drop: str | float | None = None,
    target_mb: float | None = None,
    bits: str | Sequence[int] = (8, 4),
    budget_minutes: float | None = None,
    recipe: str | Recipe | None = None,
    group: str = "auto",
    limit: int = 0,
    cache_dir: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    uniform: bool = True,
    threads: int = 0,
    allow_opset_upgrade: bool = False,
    progress: ProgressFactory | None = None,
    executor=None,  # noqa: ANN001 - a qtool.executors.Executor
) -> TuneResult:
    """Tune ``model_path`` (see the module doc); writes ``output`` and its sidecar files.

    ``max_drop``: the largest metric loss allowed (metric units, or ``"2%"`` of the float
    metric); ``target_mb``: the largest size in MB (then accuracy is maximised within it).
    ``limit``: at most this many samples per split (0: all). ``budget_minutes``: stop
    measuring sensitivities in time to verify; the run ends within about one measurement
    of the budget. ``executor`` (qtool.executors): sensitivity candidates are built and
    scored on its workers, and each held-out check is split over them; results are identical.
    """
    from qtool.model import check_output_path, load, model_size_bytes

    start = time.monotonic()
    clock = Clock.start(start, budget_minutes)
    progress = progress or _no_progress
    model_path, output = Path(model_path), Path(output)
    check_output_path(output, model_path)
    spec = check_budget(max_drop, target_mb, plot_path)
    candidate_bits = parse_bits(bits)

    # 1-2. options, splits, groups, and the cached measurer the later phases score through.
    model = load(model_path)
    base, scheme, notes = base_recipe(model, recipe, candidate_bits, allow_opset_upgrade, limit, bool(eval_data))
    block_size = base.weight_only.block_size
    splits = make_splits(model, data, eval_data, base, metric)
    plan = plan_groups(model, model_path.name, scheme, candidate_bits, block_size, group, base.quantize.op_types,
                       base.quantize.allow_opset_upgrade)
    groups = plan.groups
    float_bytes = model_size_bytes(model_path)
    size = SizeModel(groups, max(float_bytes - sum(4.0 * g.params for g in groups), 0.0), scheme, block_size)
    scorer = search_scorer(model_path, splits, limit, threads, progress)
    budget = spec.limit(scorer.reference.metric)
    table = _calibrate(model_path, data, base, splits, threads, progress) if scheme == "int8-static" else None
    builder = Builder.create(base, groups, plan.model, table)
    context = {"scheme": scheme, "recipe": base.to_dict(), "metric": splits.metric, "split": splits.search_shard,
               "data": data_key(splits.search, splits.search_shard, limit)}
    measurer = Measurer(builder, scorer, SensitivityCache.open(cache_dir, plan.model, model_path, context),
                        executor=executor)

    # 3-6. sensitivity, search, verify on held-out data, uniform candidates and the frontier.
    sens = measure_sensitivities(groups, measurer, clock, progress)
    found = search(sens, size, measurer, budget, spec, clock, progress)
    held = held_out_scorer(model_path, splits, limit, threads, progress)
    checked = verify(builder, held, found, sens, spec, scorer.reference.metric, output, model_path, clock, progress,
                     executor)
    candidates = found.candidates + checked.candidates
    uniform_notes: list[str] = []
    if uniform:
        more, uniform_notes = uniform_candidates(builder, held, candidate_bits, float_bytes, clock, progress,
                                                 output.parent)
        candidates += more

    final = _final_recipe(builder, checked, output.stem, splits.metric, held.reference.metric, float_bytes)
    recipe_path = write_recipe(final, output, model_path.name, table is not None)
    table_path = table.save(sidecar(output, ".calib.json")) if table is not None else None
    frontier_path = write_frontier(candidates, sidecar(output, ".frontier.md"), model_path.name, splits.metric,
                                   scorer.higher_is_better)
    return TuneResult(
        output=output, recipe_path=recipe_path, frontier_path=frontier_path, table_path=table_path,
        plot_path=plot(candidates, plot_path, splits.metric) if plot_path is not None else None,
        recipe=final, scheme=scheme, metric=splits.metric, higher_is_better=scorer.higher_is_better,
        budget=checked.budget, mode=spec.mode, groups=list(groups), bits=list(checked.bits),
        reference_metric=held.reference.metric, tuned_metric=checked.score.metric, drop=checked.drop,
        size_bytes=int(checked.size), float_bytes=int(float_bytes), within_budget=checked.within,
        fallback_steps=checked.fallback, measured=measurer.measured, cached=measurer.cached,
        out_of_time=sens.out_of_time or found.out_of_time or checked.out_of_time,
        seconds=time.monotonic() - start, candidates=candidates,
        notes=notes + plan.notes + sens.notes + found.notes + checked.notes + uniform_notes,
    )


def _calibrate(model_path: Path, data, base: Recipe, splits, threads: int, progress):
    """Static int8's calibration table, from the search split only."""
    from qtool.pipeline import calibrate

    with progress("calibrate (search split)", None, "samples") as advance:
        table = calibrate(model_path, data, base, shard=splits.search_shard, threads=threads)
        advance(table.samples if hasattr(table, "samples") else 0)
    return table


def _final_recipe(builder: Builder, checked: Verified, name: str, metric: str, float_metric: float,
                  float_bytes: int) -> Recipe:
    """The recipe of the model written, named after it, its held-out result in its description."""
    return dataclasses.replace(
        builder.recipe(checked.bits), name=name,
        description=f"qtool tune: {metric} {checked.score.metric:.4f} (float {float_metric:.4f}) on held-out data, "
                    f"{checked.size / 1e6:.2f} MB ({float_bytes / 1e6:.2f} MB float); {mix(checked.bits)}",
    )
