"""`qtool eval --runtimes ort,openvino` on real models: fp32 vs qtool's default int8 on
onnxruntime's CPU provider and on OpenVINO (f32 hint and its default precision, bf16 on AMX),
timed two ways (fresh processes vs one process), with what the report recommends.

    python bench/runtimes.py [--only digits_cnn,efficientnet_lite0,ppocr_rec] [--limit N]

For each model: `qtool convert FP32 -o INT8 --data calib` (the default: the guard chooses
and checks the scheme on held-out calib samples), then on the eval split
`qtool eval INT8 -r FP32 --runtimes ort,openvino --threads 2` twice, once with
`--timing process` (each model on each runtime in a fresh process, 3 alternating rounds)
and once with `--timing inline` (all six sessions in one process, timed in turns); which
of the two runs first alternates from model to model, so neither always meets a cooler or
warmer machine. Agreement is against the float model on onnxruntime's CPU provider over
the eval split (never calibrated on); EfficientNet-Lite0 also gets top-1 from its labels.
The machine is shared with other jobs: quote ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

WORK = HERE / ".cache" / "work" / "runtimes"
RESULTS = HERE / "results" / "runtimes.md"
MODELS = ("digits_cnn", "efficientnet_lite0", "ppocr_rec")
THREADS = 2


def qtool(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "qtool", *args], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode not in (0, 3):
        raise SystemExit(f"qtool {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out, time.perf_counter() - start


def sources(name: str) -> tuple[Path, Path, Path, Path | None]:
    """(fp32 model, calib folder, eval folder, labels file or None)."""
    if name == "digits_cnn":
        ex = ROOT / "examples"
        return ex / "digits_cnn.onnx", ex / "data" / "calib", ex / "data" / "eval", None
    import zoo

    meta = zoo.meta(name)
    labels = None
    found = meta.get("labels", {}).get("eval") or []
    if found and all(isinstance(x, int) for x in found):  # class ids (the OCR labels are text: no metric)
        labels = WORK / f"{name}.labels.txt"
        labels.write_text("\n".join(str(x) for x in found) + "\n")
    return zoo.model_path(name), zoo.data_dir(name, "calib"), zoo.data_dir(name, "eval"), labels


def run_model(name: str, index: int, limit: int) -> dict:
    fp32, calib, evald, labels = sources(name)
    int8 = WORK / f"{name}.int8.onnx"
    out, secs = qtool("convert", str(fp32), "-o", str(int8), "--data", str(calib), "--json", "-q")
    conv = json.loads(out.stdout)
    guard = conv.get("guard") or {}
    result = {"name": name, "convert_s": secs, "scheme": guard.get("chosen"), "decision": guard.get("decision")}
    modes = ("process", "inline") if index % 2 == 0 else ("inline", "process")
    for mode in modes:
        args = ["eval", str(int8), "-r", str(fp32), "-d", str(evald), "--runtimes", "ort,openvino",
                "--threads", str(THREADS), "--timing", mode, "--json", "-", "-q"]
        if labels is not None:
            args += ["--labels", str(labels)]
        if limit:
            args += ["--limit", str(limit)]
        out, secs = qtool(*args)
        result[mode] = json.loads(out.stdout)
        result[mode + "_s"] = secs
        print(f"[runtimes] {name} {mode}: {secs:.0f} s", file=sys.stderr)
    return result


def _worst(d: dict) -> str:
    vals = [float(o["segment_sqnr_db"]) for o in d["outputs"]]
    w = min(vals) if vals else None
    return "–" if w is None else ("exact" if w == float("inf") else f"{w:.1f}")


def _agree(d: dict) -> str:
    a = [o["agreement"] for o in d["outputs"] if o["agreement"] is not None]
    return f"{min(a):.3f}" if a else "–"


def section(r: dict) -> list[str]:
    proc, inl = r["process"]["runtimes"], r["inline"]["runtimes"]
    inline_ms = {(d["model"], d["label"]): d["median_ms"] for d in inl["deployments"]}
    base = next(d["median_ms"] for d in proc["deployments"] if d["model"] == "reference" and d["label"] == "cpu")
    base_inl = inline_ms[("reference", "cpu")]
    lines = [f"### {r['name']}", "",
             f"qtool's default int8: {r['scheme']} ({r['decision']}). Eval split: "
             f"{r['process']['data']['samples']} samples.", "",
             "| model | runtime | float runs in | process ms | vs fp32 ORT | inline ms | vs fp32 ORT | "
             "worst SQNR dB | agreement | metric | floor |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for d in proc["deployments"]:
        ms, ims = d["median_ms"], inline_ms[(d["model"], d["label"])]
        metric = ", ".join(f"{k} {v:.3f}" for k, v in d["metrics"].items()) or "–"
        lines.append(f"| {'fp32' if d['model'] == 'reference' else 'int8'} | {d['label']} | "
                     f"{d['precision'] or 'model types'} | {ms:.3f} | {base / ms:.2f}x | {ims:.3f} | "
                     f"{base_inl / ims:.2f}x | {_worst(d)} | {_agree(d)} | {metric} | "
                     f"{'meets' if d['meets_floor'] else 'misses'} |")
    lines += ["", "Recommendation (`--timing process`):", ""]
    lines += [f"- {x}" for x in proc["recommendation"]]
    lines += ["", "Recommendation (`--timing inline`):", ""]
    lines += [f"- {x}" for x in inl["recommendation"]]
    lines += ["", f"Wall time: process {r['process_s']:.0f} s, inline {r['inline_s']:.0f} s; convert "
              f"{r['convert_s']:.0f} s.", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(MODELS))
    ap.add_argument("--limit", type=int, default=0, help="eval samples per model (0: all)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    import openvino

    load = [os.getloadavg()[0]]
    results = [run_model(n, i, args.limit) for i, n in enumerate(args.only.split(","))]
    load.append(os.getloadavg()[0])
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    import onnxruntime

    lines = ["# Runtimes: fp32 vs qtool int8 on onnxruntime and OpenVINO", "",
             f"`python bench/runtimes.py` ({time.strftime('%Y-%m-%d')}), onnxruntime {onnxruntime.__version__}, "
             f"OpenVINO {openvino.__version__}, {THREADS} threads, batch 1, on a shared 2-core x86 machine with "
             "AMX (OpenVINO's CPU default float precision here: bf16). Each row is `qtool eval INT8 -r FP32 "
             "--runtimes ort,openvino` (50 timed runs per deployment). \"process\": every deployment timed in "
             "fresh processes, 3 alternating rounds (the default of `--runtimes`); \"inline\": all six "
             "sessions in one process, timed in turns. Agreement with the float model on onnxruntime's CPU "
             "provider over the eval split; floor = the guard's (worst output segment >= 15 dB, argmax "
             "agreement >= 0.9).", "",
             f"Load average (1 min) at the start and end of the run: {load[0]:.1f}, {load[1]:.1f} "
             "(other jobs share the machine: absolute times are inflated, compare within a model).", ""]
    for r in results:
        lines += section(r)
    RESULTS.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
