"""Quality gates for CI: each compares one number of the report with a user threshold.

- ``--max-drop X``: for every label metric computed on both models,
  drop = reference - candidate (higher-is-better metrics) or candidate - reference
  (lower-is-better, e.g. perplexity), in the metric's own units; passes when drop <= X.
  ``X%`` is relative, as in ``qtool tune``: X percent of the reference's value of that metric
  (``--max-drop 1%`` on a top-1 of 0.95 allows a drop of 0.0095).
- ``--min-sqnr DB``: for every output, SQNR(reference, candidate) >= DB (dB). A percentage
  has no meaning for decibels and is refused.
- ``--max-latency-ratio R``: candidate median / reference median <= R, per provider;
  ``R%`` is R / 100 (``110%`` = 1.1).

Every threshold is a finite number >= 0 (a negative drop or ratio could never pass).
A gate's ``margin`` is how far inside (positive) or outside (negative) the threshold the
value is, in the gate's units, so a failure says by how much it failed; ``percent`` keeps
the percentage a relative threshold was given as (``threshold`` is then what it came to).
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
    percent: float | None = None  # the threshold as given, when given as a percentage

    def describe(self) -> str:
        verb = "passed" if self.passed else "FAILED"
        limit = _fmt(self.threshold) if self.percent is None else f"{_fmt(self.percent)}% = {_fmt(self.threshold)}"
        if self.gate == "max-drop":
            what = f"{self.subject} dropped {_fmt(self.value)} (max {limit})"
        elif self.gate == "min-sqnr":
            what = f"output {self.subject} SQNR {_fmt(self.value)} dB (min {_fmt(self.threshold)} dB)"
        else:
            what = f"latency ratio {_fmt(self.value)} on {self.subject} (max {limit})"
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


Threshold = float | int | str | None


@dataclass(frozen=True)
class Gates:
    """Parsed thresholds: (value, is_percent) per gate, None when not asked for."""

    max_drop: tuple[float, bool] | None = None
    min_sqnr: tuple[float, bool] | None = None
    max_latency_ratio: tuple[float, bool] | None = None

    @property
    def any(self) -> bool:
        return any(g is not None for g in (self.max_drop, self.min_sqnr, self.max_latency_ratio))


def parse_threshold(value: Threshold, flag: str) -> tuple[float, bool] | None:
    """``0.01`` -> (0.01, False); ``"2%"`` -> (2.0, True); None -> None. Raises UsageError
    for text that is not a number, a non-finite or negative value, and ``--min-sqnr N%``."""
    if value is None:
        return None
    text = str(value).strip()
    percent = text.endswith("%")
    example = {"max-drop": "0.01 or 1%", "min-sqnr": "30", "max-latency-ratio": "1.0 or 110%"}[flag]
    try:
        number = float(text[:-1] if percent else text)
    except ValueError:
        raise UsageError(f"--{flag} {value!r} is not a number", f"e.g. --{flag} {example}") from None
    if percent and flag == "min-sqnr":
        raise UsageError("--min-sqnr is in dB; a percentage has no meaning there", "e.g. --min-sqnr 30")
    if not math.isfinite(number) or (number < 0 and flag != "min-sqnr"):
        why = "a drop below 0 means the candidate must beat the reference" if flag == "max-drop" else "no ratio is negative"
        raise UsageError(f"--{flag} must be a finite number >= 0, got {value} ({why})",
                         f"e.g. --{flag} {example}")
    return number, percent


def parse_gates(max_drop: Threshold = None, min_sqnr: Threshold = None,
                max_latency_ratio: Threshold = None) -> Gates:
    return Gates(parse_threshold(max_drop, "max-drop"), parse_threshold(min_sqnr, "min-sqnr"),
                 parse_threshold(max_latency_ratio, "max-latency-ratio"))


def check_gates(
    report: dict,
    *,
    max_drop: Threshold = None,
    min_sqnr: Threshold = None,
    max_latency_ratio: Threshold = None,
) -> list[GateResult]:
    """Evaluate the gates asked for against a report dict (see report.schema.json)."""
    gates = parse_gates(max_drop, min_sqnr, max_latency_ratio)
    results: list[GateResult] = []
    if gates.max_drop is not None:
        compared = [m for m in report["metrics"] if m.get("drop") is not None]
        if not compared:
            raise UsageError(
                "--max-drop needs a metric computed on both the candidate and the reference",
                "pass --reference and a label metric (--metric top1, --labels FILE) or perplexity",
            )
        value, percent = gates.max_drop
        for m in compared:
            drop = m["drop"]
            limit = value * abs(m["reference"]) / 100.0 if percent else value
            ok = not math.isnan(drop) and drop <= limit
            results.append(GateResult("max-drop", m["name"], drop, limit, ok, limit - drop,
                                      value if percent else None))
    if gates.min_sqnr is not None:
        min_sqnr = gates.min_sqnr[0]
        if not report["outputs"]:
            raise UsageError("--min-sqnr needs --reference", "pass the float model with --reference")
        for out in report["outputs"]:
            s = out["sqnr_db"]
            value = math.inf if s is None else s  # None in JSON means identical outputs
            ok = value >= min_sqnr
            results.append(GateResult("min-sqnr", out["name"], value, min_sqnr, ok, value - min_sqnr))
    if gates.max_latency_ratio is not None:
        value, percent = gates.max_latency_ratio
        max_latency_ratio = value / 100.0 if percent else value
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
                           max_latency_ratio - ratio, value if percent else None)
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
