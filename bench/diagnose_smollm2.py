#!/usr/bin/env python3
"""`qtool eval --diagnose` on SmolLM2-135M quantized by onnxruntime's quantize_dynamic.

1. fp32 SmolLM2 (bench/zoo.py) -> onnxruntime `quantize_dynamic` int8 (its defaults).
2. `qtool.eval.evaluate`: perplexity of both on the eval split (40 windows x 128 tokens).
3. `--diagnose` on the first DIAG_SAMPLES windows: per-layer SQNR, worst layers, suggested
   exclusions.
4. Re-convert with those exclusions (quantize_dynamic's nodes_to_exclude, same producer, so
   the only difference is the exclusions; and `qtool convert --dynamic --exclude` when the
   command exists) and measure perplexity again.
5. Write bench/results/diagnose.md.

    .venv/bin/python bench/diagnose_smollm2.py [--top 10] [--diag-samples 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import zoo

from qtool.eval import evaluate

WORK = zoo.CACHE / "work" / "diagnose"
RESULT = BENCH / "results" / "diagnose.md"


def ort_dynamic(src: Path, dst: Path, exclude: list[str] = ()) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    if not dst.exists():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))
    return time.perf_counter() - start


def perplexity(candidate: Path, reference: Path, data: Path) -> dict:
    report = evaluate(candidate, data, reference=reference, metrics=["perplexity"]).to_dict()
    m = report["metrics"][0]
    return {"candidate": m["candidate"], "reference": m["reference"], "sqnr_db": report["outputs"][0]["sqnr_db"],
            "size": report["size"]["candidate_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--diag-samples", type=int, default=4)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    ref = zoo.model_path("smollm2")
    data = zoo.data_dir("smollm2", "eval")
    lines = []

    dyn = WORK / "smollm2_ort_dynamic.onnx"
    t = ort_dynamic(ref, dyn)
    print(f"quantize_dynamic: {t:.0f} s", flush=True)
    base = perplexity(dyn, ref, data)
    print("perplexity fp32 %.2f  ort dynamic int8 %.2f" % (base["reference"], base["candidate"]), flush=True)

    start = time.perf_counter()
    report = evaluate(dyn, data, reference=ref, metrics=["perplexity"], limit=args.diag_samples,
                      diagnose=True, diagnose_top=args.top).to_dict()
    diag = report["diagnosis"]
    t_diag = time.perf_counter() - start
    (WORK / "diagnosis.json").write_text(json.dumps(diag, indent=1))
    suggested = diag["suggested"]
    print(f"diagnosis: {t_diag:.0f} s, {diag['matched_tensors']} matched tensors; suggested: {suggested}",
          flush=True)

    fixed = WORK / f"smollm2_ort_dynamic_excl{len(suggested)}.onnx"
    ort_dynamic(ref, fixed, suggested)
    after = perplexity(fixed, ref, data)
    print("perplexity with exclusions: %.2f" % after["candidate"], flush=True)

    qtool_rows = []
    for label, extra in (("qtool convert --dynamic", []),
                         ("qtool convert --dynamic + suggested --exclude",
                          [a for s in suggested for a in ("--exclude", s)])):
        out = WORK / ("smollm2_qtool_dynamic%s.onnx" % ("_excl" if extra else ""))
        cmd = [sys.executable, "-m", "qtool", "convert", str(ref), "-o", str(out), "--dynamic", "-q", *extra]
        if not out.exists():
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                qtool_rows.append((label, None, proc.stderr.strip().splitlines()[-1:] or [""]))
                continue
        res = perplexity(out, ref, data)
        qtool_rows.append((label, res, None))
        print(f"{label}: perplexity {res['candidate']:.2f}", flush=True)

    rec = (base["candidate"] - after["candidate"]) / (base["candidate"] - base["reference"])
    lines += [
        "# `qtool eval --diagnose` on SmolLM2-135M (dynamic int8)",
        "",
        f"Model: bench/.cache/models/smollm2.onnx (fp32, no KV cache). Data: {data.relative_to(BENCH.parent)} "
        "(40 windows x 128 tokens). Perplexity = exp(mean next-token NLL) by `qtool.eval` "
        "(metric `perplexity`). Diagnosis on the first "
        f"{args.diag_samples} windows ({t_diag:.0f} s, {diag['matched_tensors']} matched tensors).",
        "",
        "| model | perplexity | logits SQNR dB | size MiB |",
        "|---|---:|---:|---:|",
        f"| fp32 | {base['reference']:.2f} | – | {ref.stat().st_size / 2**20:.0f} |",
        f"| onnxruntime quantize_dynamic (defaults) | {base['candidate']:.2f} | {base['sqnr_db']:.2f} | "
        f"{base['size'] / 2**20:.0f} |",
        f"| same + nodes_to_exclude = {len(suggested)} layers suggested by --diagnose | "
        f"{after['candidate']:.2f} | {after['sqnr_db']:.2f} | {after['size'] / 2**20:.0f} |",
    ]
    for label, res, err in qtool_rows:
        if res is None:
            lines.append(f"| {label} | failed: {err[0][:80]} | – | – |")
        else:
            lines.append(f"| {label} | {res['candidate']:.2f} | {res['sqnr_db']:.2f} | {res['size'] / 2**20:.0f} |")
    lines += [
        "",
        f"Excluding the suggested layers recovers **{100 * rec:.0f} %** of the perplexity lost to "
        "onnxruntime's dynamic int8.",
    ]
    if len(qtool_rows) == 2 and all(r[1] is not None for r in qtool_rows):
        q0, q1 = qtool_rows[0][1]["candidate"], qtool_rows[1][1]["candidate"]
        lines.append(f"With qtool's own dynamic int8 the same exclusions recover "
                     f"**{100 * (q0 - q1) / (q0 - base['reference']):.0f} %**.")
    lines += [
        "",
        "## worst layers (local SQNR: the error each quantized layer adds on its own)",
        "",
        "| layer | op | local SQNR dB | SQNR dB (accumulated) |",
        "|---|---|---:|---:|",
    ]
    for layer in [x for x in diag["layers"] if x["quantized"]][:15]:
        lines.append(f"| `{layer['node']}` | {layer['op_type']} | {layer['local_sqnr_db']:.2f} | "
                     f"{layer['sqnr_db']:.2f} |")
    lines += ["", "Suggested:", "", "```", " ".join(diag["exclude_flags"]), "```", "", "```toml",
              diag["recipe_snippet"].rstrip(), "```", ""]
    RESULT.write_text("\n".join(lines))
    print(RESULT.read_text())


if __name__ == "__main__":
    main()
