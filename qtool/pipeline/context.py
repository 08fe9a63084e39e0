"""The context a scheme's passes are built from, and refine for the passes after them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import onnx_ir as ir

from qtool.config import Recipe
from qtool.pipeline.plan import ConvertPlan, plan_for, weight_only_part
from qtool.pipeline.tables import RangeTable

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Context:
    """Everything a pass may read: the recipe and its plan, the untouched input graph (to
    match a calibration table), statistics gathered before conversion, and progress.

    Fields below the line are filled in by passes as the scheme runs: ``carries`` by
    pre-processing, ``table_origin`` and ``ranges`` by table matching, and ``recipe`` is
    replaced when a low-bit pass hands Convs it rewrote back to the int8 pass as excluded.
    """

    recipe: Recipe
    raw: ir.Model
    table: RangeTable | Mapping | None = None
    preprocessed: bool = False
    activations: dict | None = None  # gptq/awq statistics (collect_weight_only_stats)
    absmax: dict | None = None  # per-channel maxima for dynamic int8 smoothing
    on_progress: StageProgress | None = None
    dataset: object | None = None  # the calibration samples (qtool.data.Dataset), for recovery
    executor: object | None = None  # qtool.executors.Executor for gptq/awq layer work (None: here)
    plan: ConvertPlan = field(init=False)
    low_bit: Recipe | None = field(init=False)
    # -- filled in by passes --
    carries: dict[str, str] = field(default_factory=dict)
    table_origin: str | None = None
    ranges: dict[str, tuple[float, float]] | None = None
    recovery: dict = field(default_factory=dict)  # what one recovery pass leaves the next

    def __post_init__(self) -> None:
        self.plan = plan_for(self.recipe)
        self.low_bit = weight_only_part(self.recipe) if self.plan.kind.startswith("int8") else None

    def stage(self, name: str) -> Callable[[int, int], None] | None:
        """A ``(done, total)`` callback reporting progress as stage ``name``."""
        if self.on_progress is None:
            return None
        report = self.on_progress
        return lambda done, total: report(name, done, total)
