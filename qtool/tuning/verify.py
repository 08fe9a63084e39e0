"""Phase 4 of ``qtool tune``: the chosen model written and checked on held-out data.

The chosen model is written to ``output`` and scored on the held-out split. When its drop
exceeds the budget, the most sensitive lowered group goes one precision up and the check
repeats (the fallback), down to all-float if need be; in target-size mode a file above the
size takes one more move of the chain. A percentage budget is of the float metric on the
split being checked, so it is recomputed on the held-out split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qtool.tuning.frontier import Candidate
from qtool.tuning.options import Budget, Clock, Splits
from qtool.tuning.recipes import Builder
from qtool.tuning.search import ChainSearch, raise_most_sensitive
from qtool.tuning.sensitivity import Score, Scorer, Sensitivities


def held_out_scorer(model_path: Path, splits: Splits, limit: int, threads: int, progress) -> Scorer:
    """The float model scored on the held-out split (its reference for every check)."""
    with progress("float reference (held-out)", None, "samples") as advance:
        held = Scorer(model_path, splits.held, splits.held_shard, limit, splits.metric, threads)
        advance(held.samples)
    return held


@dataclass
class Verified:
    """The model written to ``output``, as checked: its bits per group, score, drop and size."""

    bits: list[int]
    budget: float  # on the held-out split: metric units (max-drop) or bytes (target-size)
    mode: str  # "max-drop" | "target-size"
    score: Score | None = None
    drop: float = 0.0
    size: int = 0
    fallback: int = 0
    candidates: list[Candidate] = field(default_factory=list)
    out_of_time: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def within(self) -> bool:
        return self.drop <= self.budget if self.mode == "max-drop" else self.size <= self.budget


def verify(builder: Builder, held: Scorer, found: ChainSearch, sens: Sensitivities, spec: Budget,
           search_ref: float, output: Path, model_path: str | os.PathLike, clock: Clock, progress,
           executor=None) -> Verified:  # noqa: ANN001 - a qtool.executors.Executor
    """Write and check the search's choice, falling back (see the module doc) while over budget.
    With an ``executor`` each check scores the held-out samples in one part per worker."""
    from qtool.model import model_size_bytes, save

    held_ref = held.reference.metric
    result = Verified(found.assignment(found.k), spec.limit(held_ref), spec.mode)
    if spec.mode == "max-drop" and spec.relative:
        result.notes.append(f"budget {spec.drop_value}% of the float {held.metric_name}: {found.budget:.4g} on the "
                            f"search split (float {search_ref:.4f}), {result.budget:.4g} on held-out data "
                            f"(float {held_ref:.4f})")
    k = found.k
    shared = executor.share(held.for_workers()) if executor is not None else None
    while True:
        save(builder.build(result.bits), output, input_path=model_path)
        result.size = model_size_bytes(output)
        with progress("verify (held-out)", held.samples, "samples") as advance:
            if executor is None:
                result.score = held.score(output, on_sample=advance)
            else:
                # By path on this machine; a cluster's workers get the file's bytes.
                model = str(output) if executor.kind == "local" else executor.share(output.read_bytes())
                result.score = held.score_on(executor, shared, model, "verify")
                advance(held.samples)
        result.drop = held.drop(result.score)
        label = "tuned" if result.fallback == 0 else f"tuned, fallback {result.fallback}"
        result.candidates.append(Candidate.scored(label, "held-out", result.size, result.score, result.drop,
                                                  result.bits))
        if spec.mode == "max-drop" and result.drop > result.budget:
            raised = raise_most_sensitive(builder.groups, result.bits, sens.drops, sens.sqnrs)
            if raised is None:
                break
            if clock.expired():
                result.notes.append("time budget: stopped during the fallback with the drop above budget")
                result.out_of_time = True
                break
            result.bits, result.fallback = raised, result.fallback + 1
            continue
        if spec.mode == "target-size" and result.size > result.budget and k < len(found.chain):
            k += 1
            result.bits, result.fallback = found.assignment(k), result.fallback + 1
            continue
        break
    return result
