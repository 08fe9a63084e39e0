"""The evaluation report: a dataclass, its versioned JSON form, and a Markdown summary.

The JSON layout is described by ``report.schema.json`` beside this file (JSON Schema draft
2020-12); ``SCHEMA_VERSION`` changes whenever a field is renamed or removed. Non-finite
numbers are not JSON: an SQNR of +inf (identical outputs) is written as null.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool import __version__

SCHEMA_NAME = "qtool.eval.report"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "report.schema.json"


@dataclass
class EvalReport:
    candidate: dict  # {"path", "size_bytes"}
    reference: dict | None = None  # {"path", "size_bytes"}
    data: dict = field(default_factory=dict)  # {"folder", "samples", "labels"}
    metrics: list[dict] = field(default_factory=list)  # name, higher_is_better, candidate, reference, drop
    outputs: list[dict] = field(default_factory=list)  # per-output comparison with the reference
    latency: list[dict] = field(default_factory=list)  # LatencyStats.to_dict() per model and provider
    latency_ratio: dict[str, float] = field(default_factory=dict)  # provider -> cand/ref median
    size: dict = field(default_factory=dict)  # candidate_bytes, reference_bytes, compression_ratio
    consistency: list[dict] = field(default_factory=list)  # outputs across providers/backends
    hardware: dict | None = None  # hwcheck.check(...) result
    diagnosis: dict | None = None  # diagnose.diagnose(...) result
    runtimes: dict | None = None  # qtool.eval.matrix section (--runtimes)
    gates: list[dict] = field(default_factory=list)  # GateResult.to_dict()
    warnings: list[str] = field(default_factory=list)
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    @property
    def passed(self) -> bool:
        return all(g["passed"] for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "qtool_version": __version__,
            "created": self.created,
            "candidate": self.candidate,
            "reference": self.reference,
            "data": self.data,
            "metrics": self.metrics,
            "outputs": self.outputs,
            "latency": self.latency,
            "latency_ratio": self.latency_ratio,
            "size": self.size,
            "consistency": self.consistency,
            "hardware": self.hardware,
            "diagnosis": self.diagnosis,
            "runtimes": self.runtimes,
            "gates": self.gates,
            "passed": self.passed,
            "warnings": self.warnings,
        }
        return _json_safe(doc)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)



def size_change(ratio: float) -> str:
    """"3.81x smaller" for reference/candidate bytes above 1, "1.12x larger" below it."""
    if ratio >= 1.0:
        return f"{ratio:.2f}x smaller"
    return f"{1 / ratio:.2f}x larger" if ratio > 0 else "larger"

def _json_safe(value: Any) -> Any:
    """Replace inf/nan by None and numpy scalars/tuples by plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate(doc: dict) -> None:
    """Raise jsonschema.ValidationError if ``doc`` does not follow report.schema.json."""
    import jsonschema

    jsonschema.validate(doc, load_schema())


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MiB"


def to_markdown(doc: dict) -> str:
    """A pull-request comment: verdict, metrics, outputs, latency, size, gates, diagnosis."""
    lines = []
    verdict = "✅ all gates passed" if doc["passed"] else "❌ a gate failed"
    if not doc["gates"]:
        verdict = "no gates set"
    cand = Path(doc["candidate"]["path"]).name
    ref = Path(doc["reference"]["path"]).name if doc["reference"] else None
    lines.append(f"### qtool eval: `{cand}`" + (f" vs `{ref}`" if ref else "") + f" — {verdict}")
    lines.append("")
    data = doc["data"]
    lines.append(f"{data.get('samples', 0)} samples from `{data.get('folder', '')}`.")
    lines.append("")
    if doc["metrics"]:
        lines += ["| metric | candidate | reference | drop |", "|---|---:|---:|---:|"]
        for m in doc["metrics"]:
            lines.append(f"| {m['name']} | {_num(m['candidate'])} | {_num(m['reference'])} | {_num(m['drop'])} |")
        lines.append("")
    if doc["outputs"]:
        lines += ["| output | SQNR dB | cosine | max abs | argmax agree |", "|---|---:|---:|---:|---:|"]
        for o in doc["outputs"]:
            sqnr = "exact" if o["sqnr_db"] is None else f"{o['sqnr_db']:.2f}"
            lines.append(
                f"| {o['name']} | {sqnr} | {_num(o['cosine'], 6)} | {_num(o['max_abs'])} | "
                f"{_num(o['argmax_agreement'])} |"
            )
        lines.append("")
    if doc["latency"]:
        lines += [
            "| model | provider | median ms | p90 | p99 | IQR | throughput/s | memory MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in doc["latency"]:
            lines.append(
                f"| {s['model']} | {s['provider']} | {s['median_ms']:.3f} | {s['p90_ms']:.3f} | "
                f"{s['p99_ms']:.3f} | {s['iqr_ms']:.3f} | {s['throughput']:.1f} | {_num(s['memory_mib'], 3)} |"
            )
        for provider, ratio in doc["latency_ratio"].items():
            lines.append(f"\nlatency ratio (candidate/reference) on {provider}: **{ratio:.3f}**")
        lines.append("")
    lines += _runtimes_markdown(doc.get("runtimes"))
    size = doc["size"]
    if size:
        line = f"size: {_mib(size.get('candidate_bytes'))}"
        if size.get("reference_bytes"):
            line += f" vs {_mib(size['reference_bytes'])} ({size_change(size['compression_ratio'])})"
        lines += [line, ""]
    if doc["gates"]:
        lines += ["| gate | subject | value | threshold | result |", "|---|---|---:|---:|---|"]
        for g in doc["gates"]:
            lines.append(
                f"| --{g['gate']} | {g['subject']} | {_num(g['value'])} | {_num(g['threshold'])} | "
                f"{'pass' if g['passed'] else '**FAIL**'} |"
            )
        lines.append("")
    diag = doc.get("diagnosis")
    if diag and diag.get("layers"):
        lines += ["#### worst layers", "", "| layer | op | local SQNR dB | SQNR dB |", "|---|---|---:|---:|"]
        for layer in diag["layers"][: diag.get("top", 10)]:
            lines.append(
                f"| `{layer['node']}` | {layer['op_type']} | {_num(layer['local_sqnr_db'])} | "
                f"{_num(layer['sqnr_db'])} |"
            )
        if diag.get("checks"):
            lines += ["", f"Checked by re-converting (baseline output SQNR {_num(diag['baseline_sqnr_db'])} dB):", "",
                      "| left out | output SQNR dB | gain dB |", "|---|---:|---:|"]
            for c in diag["checks"]:
                lines.append(f"| `{', '.join(c['exclude'])}` | {_num(c['sqnr_db'])} | {c['gain_db']:+.2f} |")
        if diag.get("exclude_flags"):
            lines += ["", "Suggested: `qtool convert ... " + " ".join(diag["exclude_flags"]) + "`"]
        if diag.get("advice"):
            lines += ["", diag["advice"]]
        lines.append("")
    for w in doc["warnings"]:
        lines.append(f"> ⚠️ {w}")
    return "\n".join(lines).rstrip() + "\n"


def _runtimes_markdown(section: dict | None) -> list[str]:
    """--runtimes: the deployments table and the recommendation, first line in bold."""
    if not section:
        return []
    from qtool.eval.matrix import TABLE_HEAD, table_rows

    lines = [f"#### runtimes (agreement with the {section['truth']}; timing: {section['timing']['mode']}, "
             f"{section['timing']['rounds']} round(s))", "",
             "| " + " | ".join(TABLE_HEAD) + " |", "|---|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(section)]
    recommendation = section.get("recommendation") or []
    if recommendation:
        lines += ["", f"**{recommendation[0]}**"] + [f"- {x}" for x in recommendation[1:]]
    return lines + [""]

