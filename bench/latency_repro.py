"""Are qtool eval's latency figures reproducible? Two back-to-back runs of the same model.

Runs `qtool eval --latency` twice on the demo's int8 model (built first if missing) and
reports whether the two medians agree within the reported dispersion (IQR). Writes
bench/results/latency_repro.md. A property of the machine, so a benchmark, not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def qtool(*args: object) -> str:
    return subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], check=True,
                          capture_output=True, text=True).stdout


def main() -> int:
    out = EXAMPLES / "out"
    out.mkdir(exist_ok=True)
    model = out / "digits_int8.onnx"
    if not model.exists():
        qtool("convert", EXAMPLES / "digits_cnn.onnx", "-o", model, "--data", EXAMPLES / "data" / "calib", "-q")
    rows = []
    for batch in (1, 32):
        runs = []
        for _ in range(2):
            doc = json.loads(qtool("eval", model, "--data", EXAMPLES / "data" / "eval", "--limit", 64,
                                   "--latency", "--runs", 300, "--batch-size", batch, "--threads", 1,
                                   "--json", "-", "-q"))
            runs.append(doc["latency"][0])
        a, b = runs
        spread = max(a["iqr_ms"], b["iqr_ms"])
        agree = abs(a["median_ms"] - b["median_ms"]) <= spread
        rows.append(f"| {batch} | {a['median_ms']:.4f} | {b['median_ms']:.4f} | {spread:.4f} | "
                    f"{'yes' if agree else 'no'} |")
    load = os.getloadavg()[0]
    md = ("# Latency reproducibility: two back-to-back `qtool eval --latency` runs\n\n"
          f"Demo int8 model, 300 runs after warm-up, 1 thread; 1-minute load {load:.1f}.\n\n"
          "| batch | run 1 median ms | run 2 median ms | larger IQR ms | agree within IQR |\n"
          "|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n")
    (ROOT / "bench" / "results" / "latency_repro.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
