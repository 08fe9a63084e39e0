"""Phase 1 of ``qtool tune``: the run's options checked, its base recipe, its data splits.

The search split is every other sample of ``data`` (positions 0, 2, 4, ...), the held-out
split the rest (1, 3, 5, ...), or all of ``data`` / all of ``eval_data`` when held-out data
is given. Calibration (static int8) and sensitivities use only the search split; only the
final check reads the held-out split.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qtool.config import Recipe, load_recipe
from qtool.errors import UsageError

if TYPE_CHECKING:
    from qtool.data import Dataset


def parse_bits(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"8,4"`` -> (8, 4): the candidate precisions below float (32 is always allowed)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = sorted({int(str(v).strip()) for v in items if str(v).strip()}, reverse=True)
    except ValueError:
        raise UsageError(f"--bits {text!r} is not a list of integers", "e.g. --bits 8,4") from None
    if 16 in values:
        raise UsageError(
            "--bits 16 (fp16 per layer) is not supported by convert's mixed precision yet",
            "use --bits 8,4 (or 8,4,2); float layers stay at 32 bits",
        )
    values = [v for v in values if v != 32]
    bad = [v for v in values if v not in (8, 4, 3, 2)]
    if bad or not values:
        raise UsageError(f"--bits {text!r}: each precision must be 8, 4, 3 or 2", "e.g. --bits 8,4")
    return tuple(values)


def parse_budget(text: str | float | None) -> tuple[float, bool]:
    """``"0.01"`` -> (0.01, False) in metric units; ``"2%"`` -> (2.0, True): percent of the
    float model's metric on the split."""
    if text is None:
        return 1.0, True
    s = str(text).strip()
    relative = s.endswith("%")
    try:
        value = float(s[:-1] if relative else s)
    except ValueError:
        raise UsageError(f"--max-drop {text!r} is not a number", "e.g. --max-drop 0.01 or --max-drop 2%") from None
    if value < 0 or not math.isfinite(value):
        raise UsageError(f"--max-drop must be >= 0, got {text}", "e.g. --max-drop 0.01")
    return value, relative


@dataclass(frozen=True)
class Budget:
    """What the tuned model must meet: a metric drop (``max-drop``) or a size (``target-size``)."""

    mode: str  # "max-drop" | "target-size"
    drop_value: float  # metric units, or percent of the float metric when ``relative``
    relative: bool
    target_mb: float | None

    def limit(self, float_metric: float) -> float:
        """The budget on a split whose float model scores ``float_metric``: metric units
        (max-drop) or bytes (target-size)."""
        if self.mode == "target-size":
            return self.target_mb * 1e6
        return self.drop_value * abs(float_metric) / 100.0 if self.relative else self.drop_value


def check_budget(max_drop: str | float | None, target_mb: float | None,
                 plot_path: str | os.PathLike | None) -> Budget:
    """The budget the options ask for; usage errors for contradictory or out-of-range ones."""
    if max_drop is not None and target_mb is not None:
        raise UsageError("--max-drop and --target-size are alternatives", "pass one budget: accuracy or size")
    if target_mb is not None and target_mb <= 0:
        raise UsageError(f"--target-size must be > 0 MB, got {target_mb}", "e.g. --target-size 5")
    if plot_path is not None and Path(plot_path).suffix.lower() not in (".svg", ".png"):
        raise UsageError(f"--plot {plot_path}: unknown image type {Path(plot_path).suffix or '(none)'}",
                         "use a .svg or .png path")
    drop_value, relative = parse_budget(max_drop)
    return Budget("target-size" if target_mb is not None else "max-drop", drop_value, relative, target_mb)


@dataclass
class Clock:
    """The wall-clock budget and the slowest measurement so far (None until one was timed)."""

    deadline: float = math.inf
    per_measure: float | None = None

    @classmethod
    def start(cls, start: float, budget_minutes: float | None) -> Clock:
        if budget_minutes is not None and budget_minutes <= 0:
            raise UsageError(f"--budget-minutes must be > 0, got {budget_minutes}", "e.g. --budget-minutes 10")
        return cls(start + budget_minutes * 60 if budget_minutes else math.inf)

    def observe(self, seconds: float) -> None:
        if seconds > 0.05:  # a cache hit says nothing about the cost of a measurement
            self.per_measure = seconds if self.per_measure is None else max(self.per_measure, seconds)

    def short_of(self, measurements: int) -> bool:
        """True when ``measurements`` more (at the slowest rate seen) would pass the deadline."""
        return self.per_measure is not None and time.monotonic() + self.per_measure * measurements > self.deadline

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


def default_base(model) -> Recipe:
    """int8-static for models with Conv weights (CNNs), else 4-bit weight-only (transformers)."""
    from qtool.model import iter_nodes

    has_conv = any(n.op_type == "Conv" and len(n.inputs) > 1 and n.inputs[1] is not None
                   and n.inputs[1].const_value is not None for n in iter_nodes(model))
    return load_recipe("int8-static" if has_conv else "int4-weight-only")


def base_recipe(model, recipe: str | Recipe | None, candidate_bits: Sequence[int], allow_opset_upgrade: bool,
                limit: int, held_out_given: bool) -> tuple[Recipe, str, list[str]]:
    """(the recipe every candidate starts from, its scheme, notes).

    Weight-only runs quantize at the lowest candidate precision by default; the int8 schemes
    at 8 bits, calibrating on at most ``limit`` samples of the search split.
    """
    from qtool.pipeline import plan_for

    notes = []
    if isinstance(recipe, Recipe):
        base = recipe
    else:
        base = load_recipe(recipe) if recipe is not None else default_base(model)
    if base.layer:
        notes.append(f"the recipe's {len(base.layer)} [[layer]] overrides were replaced by the tuned ones")
    if allow_opset_upgrade:
        base = base.override("quantize", allow_opset_upgrade=True)
    scheme = plan_for(base).kind
    if scheme == "fp16":
        raise UsageError("tune needs an integer recipe, not fp16", "use --recipe int8-static, int8-dynamic or int4-weight-only")
    if scheme == "weight-only":
        base = base.override("quantize", bits=min(candidate_bits), format="matmulnbits"
                             if base.weight_only.format == "matmulnbits" else base.quantize.format)
    else:
        base = base.override("quantize", bits=8)
        if limit:
            base = base.override("calibration", samples=limit * (1 if held_out_given else 2))
    return base, scheme, notes


@dataclass(frozen=True)
class Splits:
    """The search and held-out splits: a dataset each and its (index, count) shard."""

    search: Dataset
    search_shard: tuple[int, int]
    held: Dataset
    held_shard: tuple[int, int]
    metric: str


def make_splits(model, data: str | os.PathLike, eval_data: str | os.PathLike | None, base: Recipe,
                metric: str | None) -> Splits:
    """The two splits (see the module doc) and the metric: ``metric``, or the model's default."""
    from qtool.data import Dataset, input_specs
    from qtool.eval.evaluate import default_metrics

    specs = input_specs(model)
    search = Dataset(data, specs, base.preprocess)
    if eval_data is not None:
        held, search_shard, held_shard = Dataset(eval_data, specs, base.preprocess), (0, 1), (0, 1)
    else:
        held, search_shard, held_shard = search, (0, 2), (1, 2)
        if len(search) < 2:
            raise UsageError(f"{data} holds {len(search)} sample: tune needs 2 or more to hold some out",
                             "add samples, or pass --eval-data DIR for the held-out check")
    if metric is None:
        first = model.graph.outputs[0]
        shape = tuple(first.shape) if first.shape is not None else ()
        found = default_metrics(shape, search.labels() is not None, [s.name for s in specs])
        metric = found[0] if found else "cosine"
    return Splits(search, search_shard, held, held_shard, metric)
