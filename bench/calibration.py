"""Calibration side by side: qtool vs onnxruntime's calibrators, same model, same data.

Model: bench/zoo.py's ``resnet18_synth`` (ResNet-18-shaped CNN, 224x224, batch 1) and its
256 calibration samples. Each configuration runs in its own process, which reports its
calibration wall time and its peak resident memory (``ru_maxrss`` of that process), so
one configuration's memory never hides another's.

    python bench/calibration.py            # all configurations, writes bench/results/calibration.md
    python bench/calibration.py --samples 32 --only qtool

onnxruntime side: ``onnxruntime.quantization.calibrate.create_calibrator`` with the same
op types qtool quantizes in this model, ``collect_data`` over a CalibrationDataReader and
``compute_data`` (the calibration phase of ``quantize_static``; conversion not timed).
qtool side: ``qtool.calibration.calibrate`` (conversion not timed either).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

MODEL = "resnet18_synth"
QTOOL_METHODS = ("minmax", "percentile", "entropy", "mse")
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
SAMPLE_COUNTS = (32, 256)


def _paths():
    import zoo

    model, data = zoo.model_path(MODEL), zoo.data_dir(MODEL, "calib")
    if not model.exists() or not data.exists():
        zoo.prepare([MODEL])
    return model, data


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_qtool(method: str, samples: int) -> dict:
    from qtool.config import load_recipe
    from qtool.pipeline import calibrate

    model, data = _paths()
    recipe = load_recipe("int8-static").override(
        "calibration", method=method, samples=samples, batch_size=1
    )
    start = time.perf_counter()
    table = calibrate(model, data, recipe)
    seconds = time.perf_counter() - start
    return {"tensors": len(table.ranges()), "samples": table.samples, "seconds": seconds}


def run_ort(method: str, samples: int) -> dict:
    import numpy as np
    import onnx_ir as ir
    from onnxruntime.quantization.calibrate import (
        CalibrationDataReader,
        CalibrationMethod,
        create_calibrator,
    )

    from qtool.config import load_recipe
    from qtool.passes.select import select_nodes

    model, data = _paths()
    m = ir.load(model)
    from qtool.runtime import infer_types

    infer_types(m)
    op_types = sorted({n.op_type for n in select_nodes(m, load_recipe("int8-static")).quantized})
    del m
    files = sorted(data.glob("*.npy"))[:samples]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(files)

        def get_next(self):
            f = next(self.it, None)
            if f is None:
                return None
            x = np.load(f)
            return {"input": x if x.ndim == 4 else x[None]}

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            str(model), op_types, augmented_model_path=str(Path(tmp) / "aug.onnx"),
            calibrate_method=getattr(CalibrationMethod, method),
        )
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
    seconds = time.perf_counter() - start
    return {"tensors": len(ranges.data), "samples": len(files), "seconds": seconds,
            "op_types": op_types}


def child(tool: str, method: str, samples: int) -> None:
    result = (run_qtool if tool == "qtool" else run_ort)(method, samples)
    result.update(tool=tool, method=method, peak_mb=_peak_mb())
    sys.stdout.write(json.dumps(result) + "\n")


def run_one(tool: str, method: str, samples: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", tool, method, str(samples)],
        capture_output=True, text=True, cwd=ROOT,
    )
    if proc.returncode != 0:
        return {"tool": tool, "method": method, "samples": samples, "error": proc.stderr[-400:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    # Key rows by the count asked for; keep what the child really saw beside it.
    row["samples_seen"], row["samples"] = row.get("samples"), samples
    return row


def table(rows: list[dict]) -> str:
    by = {(r["tool"], r["method"].lower(), r.get("samples")): r for r in rows}
    lines = [
        "| method | samples | onnxruntime time (s) | qtool time (s) | speed-up | "
        "onnxruntime peak (MB) | qtool peak (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in QTOOL_METHODS:
        for n in SAMPLE_COUNTS:
            q = by.get(("qtool", method, n))
            o = by.get(("onnxruntime", method, n))
            if q is None and o is None:
                continue

            def f(r, key, fmt):  # noqa: ANN001
                return fmt.format(r[key]) if r and key in r else ("failed" if r else "n/a")

            ratio = (f"{o['seconds'] / q['seconds']:.1f}x" if q and o and "seconds" in q
                     and "seconds" in o else "n/a")
            lines.append(
                f"| {method} | {n} | {f(o, 'seconds', '{:.1f}')} | {f(q, 'seconds', '{:.1f}')} "
                f"| {ratio} | {f(o, 'peak_mb', '{:.0f}')} | {f(q, 'peak_mb', '{:.0f}')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "METHOD", "SAMPLES"))
    parser.add_argument("--samples", type=int, nargs="*", default=list(SAMPLE_COUNTS))
    parser.add_argument("--only", choices=("qtool", "onnxruntime"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "calibration.md")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    _paths()
    rows = []
    for n in args.samples:
        if args.only != "onnxruntime":
            for method in QTOOL_METHODS:
                rows.append(run_one("qtool", method, n))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.only != "qtool":
            for method in ORT_METHODS:
                r = run_one("onnxruntime", method, n)
                r["tool"] = "onnxruntime"
                rows.append(r)
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    import onnxruntime

    md = (
        "# Calibration: qtool vs onnxruntime\n\n"
        f"Model: `{MODEL}` (bench/zoo.py; ResNet-18-shaped CNN, 224x224, batch 1), its calib "
        "split. Each cell is its own process: calibration wall time (conversion not "
        "included) and that process's peak RSS.\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other work: timings are noisy); onnxruntime {onnxruntime.__version__}.\n"
        "onnxruntime has no MSE calibrator (n/a). qtool uses 2048 bins by default; "
        "onnxruntime's defaults (Entropy 128 bins, Percentile 2048 bins, 99.999).\n\n"
        + table(rows)
        + "\n\nRaw rows:\n\n```json\n"
        + "\n".join(json.dumps(r) for r in rows)
        + "\n```\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
