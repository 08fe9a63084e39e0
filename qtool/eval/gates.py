"""Quality gates for CI: each compares one number of the report with a user threshold.

- ``--max-drop X``: for every label metric computed on both models,
  drop = reference - candidate (higher-is-better metrics) or candidate - reference
  (lower-is-better, e.g. perplexity), in the metric's own units; passes when drop <= X.
- ``--min-sqnr DB``: for every output, SQNR(reference, candidate) >= DB (dB).
- ``--max-latency-ratio R``: candidate median / reference median <= R, per provider.

A gate's ``margin`` is how far inside (positive) or outside (negative) the threshold the
value is, in the gate's units, so a failure says by how much it failed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from qtool.errors import GateFailed, UsageError


@dataclass(frozen=True)
class GateResult:
    gate: str  # the flag: max-drop | min-sqnr | max-latency-ratio
    subject: str  # what was measured: a metric, an output, a provider
    value: float | None
    threshold: float
    passed: bool
    margin: float | None

    def describe(self) -> str:
        verb = "passed" if self.passed else "FAILED"
        if self.gate == "max-drop":
            what = f"{self.subject} dropped {_fmt(self.value)} (max {_fmt(self.threshold)})"
        elif self.gate == "min-sqnr":
            what = f"output {self.subject} SQNR {_fmt(self.value)} dB (min {_fmt(self.threshold)} dB)"
        else:
            what = f"latency ratio {_fmt(self.value)} on {self.subject} (max {_fmt(self.threshold)})"
        if not self.passed and self.margin is not None:
            short = "below the minimum" if self.gate == "min-sqnr" else "over the limit"
            what += f", {short} by {_fmt(-self.margin)}" + (" dB" if self.gate == "min-sqnr" else "")
        return f"--{self.gate} {verb}: {what}"

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4g}"


def check_gates(
    report: dict,
    *,
    max_drop: float | None = None,
    min_sqnr: float | None = None,
    max_latency_ratio: float | None = None,
) -> list[GateResult]:
    """Evaluate the gates asked for against a report dict (see report.schema.json)."""
    results: list[GateResult] = []
    if max_drop is not None:
        compared = [m for m in report["metrics"] if m.get("drop") is not None]
        if not compared:
            raise UsageError(
                "--max-drop needs a metric computed on both the candidate and the reference",
                "pass --reference and a label metric (--metric top1, --labels FILE) or perplexity",
            )
        for m in compared:
            drop = m["drop"]
            ok = not math.isnan(drop) and drop <= max_drop
            results.append(GateResult("max-drop", m["name"], drop, max_drop, ok, max_drop - drop))
    if min_sqnr is not None:
        if not report["outputs"]:
            raise UsageError("--min-sqnr needs --reference", "pass the float model with --reference")
        for out in report["outputs"]:
            s = out["sqnr_db"]
            value = math.inf if s is None else s  # None in JSON means identical outputs
            ok = value >= min_sqnr
            results.append(GateResult("min-sqnr", out["name"], value, min_sqnr, ok, value - min_sqnr))
    if max_latency_ratio is not None:
        ratios = report.get("latency_ratio") or {}
        if not ratios:
            raise UsageError(
                "--max-latency-ratio needs latency measured on both models",
                "pass --reference (latency is measured when a latency gate is set)",
            )
        for provider, ratio in ratios.items():
            ok = ratio <= max_latency_ratio
            results.append(
                GateResult("max-latency-ratio", provider, ratio, max_latency_ratio, ok,
                           max_latency_ratio - ratio)
            )
    return results


def raise_on_failure(results: list[GateResult]) -> None:
    """Raise GateFailed (exit 3) naming every failed gate and by how much."""
    failed = [r for r in results if not r.passed]
    if failed:
        raise GateFailed(
            "; ".join(r.describe() for r in failed),
            "the candidate does not meet the thresholds; see the report, or run with --diagnose",
        )
