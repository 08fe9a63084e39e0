"""Candidate models of ``qtool tune``: a precision per group becomes a recipe, then a model.

Every group gets a ``[[layer]]`` override and a final ``*`` = 32 keeps all other nodes
float, so a candidate quantizes exactly the layers its assignment lowers. The output recipe
reproduces the tuned model: ``qtool convert MODEL --recipe OUT.recipe.toml`` (static int8
also ``--calib OUT.calib.json``, the table tune calibrated on the search split).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from qtool.config import LayerOverride, Recipe
from qtool.passes.select import glob_escape
from qtool.tuning.groups import Group, role_key


def sidecar(output: Path, suffix: str) -> Path:
    """``out/m.onnx`` -> ``out/m.recipe.toml`` etc."""
    return output.with_name(output.stem + suffix)


def _patterns(group: Group, all_names: Sequence[str]) -> list[str]:
    """The [[layer]] patterns for a group: one glob when it matches exactly the members."""
    if len(group.members) > 1:
        glob = role_key(glob_escape(group.members[0])).replace("#", "*")
        hits = {n for n in all_names if fnmatch.fnmatchcase(n, glob)}
        if hits == set(group.members):
            return [glob]
    return [glob_escape(m) for m in group.members]


def tuned_recipe(base: Recipe, groups: Sequence[Group], bits: Sequence[int], all_names: Sequence[str],
                 name: str = "tuned", description: str = "") -> Recipe:
    """``base`` with one [[layer]] per group at its bits, and ``*`` = 32 last."""
    rules = []
    for group, b in zip(groups, bits):
        rules += [LayerOverride(p, int(b)) for p in _patterns(group, all_names)]
    rules.append(LayerOverride("*", 32))
    return dataclasses.replace(base, name=name, description=description, layer=tuple(rules))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def recipe_toml(recipe: Recipe, header: str = "") -> str:
    """``recipe`` as TOML that qtool.config.load_recipe reads back to an equal Recipe."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"name = {_toml_value(recipe.name)}", f"description = {_toml_value(recipe.description)}", ""]
    for section in ("quantize", "weight_only", "calibration", "fp16", "preprocess", "eval"):
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(recipe, section)):
            value = getattr(getattr(recipe, section), f.name)
            if value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    for rule in recipe.layer:
        lines += ["[[layer]]", f"match = {_toml_value(rule.match)}", f"bits = {rule.bits}", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Builder:
    """Turns an assignment (bits per group, in group order) into a recipe and a model.

    ``all_names``: every named node of ``model``, which a group's glob must match only the
    members of; ``table``: the search split's calibration table (static int8), else None.
    """

    base: Recipe
    groups: Sequence[Group]
    model: ir.Model
    all_names: Sequence[str]
    table: object | None = None

    @classmethod
    def create(cls, base: Recipe, groups: Sequence[Group], model: ir.Model, table=None) -> Builder:
        from qtool.model import iter_nodes

        return cls(base, groups, model, [n.name for n in iter_nodes(model) if n.name], table)

    def recipe(self, bits: Sequence[int]) -> Recipe:
        return tuned_recipe(self.base, self.groups, bits, self.all_names)

    def build(self, bits: Sequence[int]) -> ir.Model:
        from qtool.pipeline import convert_model

        converted, _, _ = convert_model(self.model, self.recipe(bits), table=self.table)
        return converted


def write_recipe(recipe: Recipe, output: Path, model_name: str, with_table: bool) -> Path:
    """``OUT.recipe.toml`` beside ``output``, headed by the command that reproduces it."""
    path = sidecar(output, ".recipe.toml")
    header = (f"Written by qtool tune for {model_name}. Reproduce with:\n"
              f"  qtool convert {model_name} --recipe {path.name} -o {output.name}"
              + (f" --calib {sidecar(output, '.calib.json').name}" if with_table else ""))
    path.write_text(recipe_toml(recipe, header))
    return path
