"""`make demo`: the whole qtool pipeline on the bundled digits CNN, then one summary table.

Runs the real CLI, exactly as a user would type it:
inspect -> calibrate -> convert (int8, int4) -> eval (each against fp32, with a CI gate).
Outputs go to examples/out/ (git-ignored).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # commands are shown relative to the checkout, as a user would type them
MODEL = HERE / "digits_cnn.onnx"
CALIB = HERE / "data" / "calib"
EVAL = HERE / "data" / "eval"
OUT = HERE / "out"
BATCH = 32  # latency is measured on batches of 32 images: batch 1 of this tiny model is ~50 us
THREADS = 1  # one intra-op thread: the steadiest timings on a shared 2-core machine

# In a terminal Rich uses its width; in a log (CI, `make demo > log`) it would wrap at 80
# columns and fold the summary table, so there it gets room for the widest line.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def qtool(*args: object) -> None:
    argv = [sys.executable, "-m", "qtool", *map(str, args)]
    shown = (a.relative_to(ROOT) if isinstance(a, Path) and a.is_relative_to(ROOT) else a for a in args)
    console.rule(f"[bold]$ qtool {' '.join(shlex.quote(str(a)) for a in shown)}", align="left")
    code = subprocess.run(argv).returncode
    if code != 0:
        console.print(f"[red]qtool exited with {code}[/red]")
        sys.exit(code)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    start = time.perf_counter()
    table = OUT / "table.json"
    int8, int4 = OUT / "digits_int8.onnx", OUT / "digits_int4.onnx"

    qtool("inspect", MODEL, "--hw")
    qtool("calibrate", MODEL, "--data", CALIB, "-o", table)
    qtool("convert", MODEL, "-o", int8, "--calib", table)
    qtool("convert", MODEL, "-o", int4, "--bits", 4, "--block-size", 32)
    latency = ("--latency", "--batch-size", BATCH, "--runs", 100, "--threads", THREADS)
    reports = {}
    for label, candidate in (("fp32", MODEL), ("int8", int8), ("int4", int4)):
        report = OUT / f"eval_{label}.json"
        extra = () if candidate == MODEL else ("--reference", MODEL, "--max-drop", 0.01)
        qtool("eval", candidate, "--data", EVAL, *extra, *latency, "--json", report, "--quiet")
        reports[label] = json.loads(report.read_text())

    summary = Table(title="digits CNN: fp32 vs qtool int8 vs qtool int4 (400 held-out images)")
    for col in ("model", "size", "top-1", "output SQNR", f"latency (batch {BATCH})", "speed-up"):
        summary.add_column(col, justify="left" if col == "model" else "right")
    for label, report in reports.items():
        size = report["candidate"]["size_bytes"]
        top1 = next(m["candidate"] for m in report["metrics"] if m["name"] == "top1")
        sqnr = report["outputs"][0]["sqnr_db"] if report.get("outputs") else None
        ms = _median(report, "candidate")
        summary.add_row(
            label,
            f"{size / 1024:.0f} KiB",
            f"{top1:.4f}",
            "-" if sqnr is None else f"{sqnr:.1f} dB",
            f"{ms:.3f} ms",
            f"{_speedup(report):.2f}x",
        )
    console.print(summary)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs in {OUT}")


def _speedup(report: dict) -> float:
    """fp32 time / candidate time, both timed alternately in the same eval run (robust to load)."""
    ratio = report.get("latency_ratio") or {}
    return 1.0 / ratio["cpu"] if "cpu" in ratio else 1.0


def _median(report: dict, which: str) -> float:
    return next(r["median_ms"] for r in report["latency"] if r["model"] == which)


if __name__ == "__main__":
    main()
