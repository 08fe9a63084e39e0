"""Conversion targets (``convert --target``): presets of the QDQ conventions a runtime fuses.

``apply_target(recipe)`` fixes the preset's recipe values (and refuses a recipe that set
one of them to something else); ``placement_for(recipe)`` gives the Q/DQ placement the
static QDQ pass follows; ``qtool.targets.validate`` checks a converted model against the
rules a runtime documents (QNN, TensorRT), naming the rule a model breaks.
"""

from __future__ import annotations

import dataclasses

from qtool.config import QuantizeConfig, Recipe
from qtool.errors import UsageError
from qtool.targets.presets import INT8_COMPUTE_OPS, TARGET_NAMES, TARGETS, Placement, Target
from qtool.targets.propagate import propagate

__all__ = ["INT8_COMPUTE_OPS", "TARGETS", "TARGET_NAMES", "Placement", "Target", "apply_target",
           "cpu_target", "placement_for", "propagate", "resolve", "target_conflicts"]

DEFAULT_PLACEMENT = Placement()
# Recipe keys a preset decides per tensor, so that no single value can be given for them.
_PER_TENSOR_CHOICE = {"by-range": ("activation_type",), "signed": ()}


def cpu_target(features: dict[str, bool] | None = None, machine: str = "x86_64") -> str:
    """``cpu-vnni`` or ``cpu-avx2`` for a CPU with ``features`` as qtool.hardware reports
    them (None: this machine); see qtool.hardware.cpu_int8_target for the reason."""
    from qtool.hardware import cpu_features, cpu_int8_target

    if features is None:
        cpu = cpu_features()
        machine, features = cpu["machine"], cpu["features"]
    return cpu_int8_target(machine, features)["target"]


def resolve(name: str) -> Target:
    """The preset a target name selects (``cpu``: this machine's)."""
    if name == "cpu":
        name = cpu_target()
    if name not in TARGETS:
        raise UsageError(f"unknown target {name!r}", f"use one of: {', '.join(TARGET_NAMES)}")
    return TARGETS[name]


def target_conflicts(target: Target, given: dict) -> list[tuple[str, object, str]]:
    """The given [quantize] values (key -> value, None: not given) that contradict
    ``target``'s preset, as (key, value, what the target needs)."""
    out = []
    fixed_per_tensor = _PER_TENSOR_CHOICE.get(target.placement.activation_sign, ())
    for key, value in given.items():
        if value is None:
            continue
        if key in fixed_per_tensor:
            out.append((key, value, f"the {target.name} target picks it per tensor from its range"))
        elif key in target.quantize and _norm(target.quantize[key]) != _norm(value):
            out.append((key, value, f"the {target.name} target needs {_show(target.quantize[key])}"))
        elif key == "format" and value not in target.formats:
            out.append((key, value, f"the {target.name} target runs {' or '.join(target.formats)}"))
    return out


def _norm(v):  # noqa: ANN001, ANN202 - a recipe value
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _show(v) -> str:  # noqa: ANN001 - a recipe value
    return ",".join(v) if isinstance(v, (list, tuple)) else str(v).lower()


def apply_target(recipe: Recipe) -> Recipe:
    """``recipe`` with its target's preset values set (a no-op without ``quantize.target``).

    A [quantize] value the recipe set away from the default that the preset contradicts is
    an error: the recipe asked for two different things.
    """
    name = recipe.quantize.target
    if not name:
        return recipe
    target = resolve(name)
    defaults = QuantizeConfig()
    given = {f.name: getattr(recipe.quantize, f.name) for f in dataclasses.fields(QuantizeConfig)
             if f.name != "target" and getattr(recipe.quantize, f.name) != getattr(defaults, f.name)}
    conflicts = target_conflicts(target, given)
    if conflicts:
        shown = "; ".join(f"{k} = {_show(v)} ({why})" for k, v, why in conflicts)
        raise UsageError(f"target {name} contradicts the recipe's [quantize] {shown}",
                         "drop those keys, or drop the target")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in target.quantize.items()}
    return recipe.override("quantize", **values)


def placement_for(recipe: Recipe) -> Placement:
    """The Q/DQ placement of the recipe's target (onnxruntime's node units without one)."""
    name = recipe.quantize.target
    return resolve(name).placement if name else DEFAULT_PLACEMENT
