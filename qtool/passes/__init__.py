"""Graph rewrites, one per module, under one contract (:class:`QtoolPass`).

Each pass reports what it did in a :class:`PassReport`: counts per rule, nodes left alone
and why, notes, and ``carries`` (which value now stands for which original tensor).
The schemes that string passes together are declared in ``qtool.pipeline.schemes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir


@dataclass
class PassReport:
    """What a pass did: counts per rule/op type, nodes left alone and why, free-form notes."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    notes: list[str] = field(default_factory=list)
    # value name -> the name of the input-graph value whose values it now carries (a layer
    # that absorbed the BatchNorm/scale/shift after it); lets a table calibrated on the
    # input graph be applied to the rewritten one.
    carries: dict[str, str] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def skip(self, node_name: str, reason: str) -> None:
        self.skipped[node_name] = reason

    @property
    def modified(self) -> bool:
        return any(self.counts.values())


@dataclass
class PassResult(ir.passes.PassResult):
    """onnx-ir's PassResult (the model, whether it changed) plus qtool's report."""

    report: PassReport | None = None


class QtoolPass(ir.passes.PassBase):
    """The contract every qtool pass follows, on onnx-ir's pass infrastructure.

    A pass is built from the conversion context (``qtool.pipeline.context.Context``: recipe,
    ranges, statistics, progress), says whether it ``applies`` to that context, and when
    called with a model (onnx-ir's ``__call__``, which checks the promises below) returns a :class:`PassResult` whose ``report`` says what it did.
    In-place passes (the default) rewrite the model they are given and return it; a pass
    that builds a new model (an opset conversion) sets ``in_place = False``. onnx-ir checks
    both promises, and ``requires``/``ensures`` hold a pass's pre- and post-conditions.

    A pass may refine the context for the passes after it (pre-processing records which
    value carries which original tensor; a low-bit pass excludes the Convs it rewrote);
    that is the only state passes share.

    ``stage`` is "prepare" (graph preparation: opset, folds), "quantize" or "finish"
    (cleanup); the conversion summary compares the graph as the first non-"prepare" pass
    found it with the result.
    """

    name: str = "pass"
    stage: str = "quantize"
    in_place_pass: bool = True

    def __init__(self, context) -> None:  # noqa: ANN001 - qtool.pipeline.context.Context
        self.context = context

    @property
    def in_place(self) -> bool:
        return self.in_place_pass

    @property
    def changes_input(self) -> bool:
        return self.in_place_pass

    def applies(self, model: ir.Model) -> bool:
        """Whether this pass has work to do on ``model`` in this context (default: always)."""
        return True

    def call(self, model: ir.Model) -> PassResult:
        out, report = self.run(model)
        return PassResult(out, report is not None and report.modified, report)

    def run(self, model: ir.Model) -> tuple[ir.Model, PassReport | None]:
        """Rewrite ``model``; return (the model, this pass's report, or None: nothing to say)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
