"""The one rule driver of pre-processing, and what every rule shares.

A rule is data: the op types its pattern starts from, and a rewrite function that looks at
one node of those types. The function returns None when the rest of its pattern does not
match (no change), a reason string when the pattern matched but a check refused the
rewrite (no change; the report records the reason), or APPLIED after rewriting the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from qtool.model import iter_graphs
from qtool.passes import PassReport
from qtool.passes.graph import Names, add_initializer, replace_uses

APPLIED: Literal[True] = True
Outcome = Literal[True] | str | None
_MAX_SWEEPS = 8
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class RuleContext:
    """What rules share while rewriting one model: fresh names, and which values now carry
    the output of a layer they absorbed (PassReport.carries)."""

    names: Names
    carries: dict[str, str] = field(default_factory=dict)

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def initializer(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, self.names, base, np.asarray(array))


@dataclass(frozen=True)
class Rule:
    """``name``: the report's count key; ``op_types``: the standard-domain ops the pattern
    starts from; ``rewrite(node, ctx)``: the check and the rewrite (see the module doc)."""

    name: str
    op_types: frozenset[str]
    rewrite: Callable[[ir.Node, RuleContext], Outcome]


def apply_rules(model: ir.Model, rules: list[Rule], report: PassReport, ctx: RuleContext) -> None:
    """The one driver: apply every rule to every node of every graph until nothing changes."""
    for _ in range(_MAX_SWEEPS):
        changed = False
        for graph in list(iter_graphs(model.graph)):
            for node in list(graph):
                for r in rules:
                    if node.graph is not graph:  # removed by an earlier rule
                        break
                    if node.op_type not in r.op_types or node.domain not in STANDARD_DOMAINS:
                        continue
                    outcome = r.rewrite(node, ctx)
                    if outcome is APPLIED:
                        report.count(r.name)
                        changed = True
                    elif isinstance(outcome, str):
                        report.skip(f"{r.name}:{node.name or node.op_type}", outcome)
        if not changed:
            return


# --------------------------------------------------------------------------- shared helpers


def attr(node: ir.Node, name: str, default):
    """The value of attribute ``name``, or ``default`` when the node does not set it."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def only_consumer(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(user is node for user, _ in value.uses())


def take_over_output(old: ir.Node, new: ir.Value, absorbed_by: RuleContext | None = None) -> None:
    """``new`` replaces ``old``'s single output everywhere and ``old`` is removed.

    By default ``new`` (a fresh value computing the same thing) also takes the name, which
    calibration tables and recipes use. ``absorbed_by``: ``new`` is the output of the layer
    that absorbed ``old`` (a folded BatchNorm/scale); it keeps its own name and the fold is
    recorded in ``absorbed_by.carries``. A graph output always keeps its name.
    """
    out = old.outputs[0]
    if absorbed_by is not None:
        absorbed_by.carries[new.name] = absorbed_by.carries.pop(out.name, out.name)
    was_output = out.is_graph_output()
    replace_uses(out, new)  # a graph output passes its name on
    if not was_output and absorbed_by is None:
        name, out.name = out.name, None
        new.name = name
    old.graph.remove(old, safe=True)
