#!/usr/bin/env python3
"""Does `qtool eval --diagnose`'s top suggestion recover more than any other single layer?

For each model (the bundled digits CNN; SmolLM2-135M when bench/.cache holds it):

1. convert as a user would (digits: static int8 with --data examples/data/calib; SmolLM2:
   --dynamic --data calib, the scheme bench/convert_int8.py found best for it);
2. `evaluate(..., diagnose=True)` on the eval data: the ranking (local SQNR, worst first)
   and the suggestion, which diagnosis itself checked by re-converting (qtool.eval.suggest);
3. for each of the five worst-ranked layers: re-convert with that layer alone excluded
   (same calibration data as step 1, not diagnosis's own split) and measure output SQNR and
   the task metric (top-1 / perplexity) on the whole eval data;
4. the suggestion applied the same way.

The claim holds when the suggestion's output SQNR is at least that of excluding any other
single layer of the five. Writes bench/results/diagnose_check.md.

    .venv/bin/python bench/diagnose_check.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import qtool
from qtool.eval import evaluate

RESULT = BENCH / "results" / "diagnose_check.md"
TOP = 5


def models() -> list[dict]:
    out = [{"name": "digits CNN", "model": ROOT / "examples" / "digits_cnn.onnx",
            "calib": ROOT / "examples" / "data" / "calib", "eval": ROOT / "examples" / "data" / "eval",
            "recipe": "int8-static", "metric": "top1", "diag_limit": 0,
            "work": ROOT / "examples" / "out" / "diagnose_check"}]
    import zoo

    if zoo.is_ready("smollm2"):
        out.append({"name": "SmolLM2-135M", "model": zoo.model_path("smollm2"),
                    "calib": zoo.data_dir("smollm2", "calib"), "eval": zoo.data_dir("smollm2", "eval"),
                    "recipe": "int8-dynamic", "metric": "perplexity", "diag_limit": 4,
                    "work": zoo.CACHE / "work" / "diagnose_check"})
    return out


def convert(spec: dict, out: Path, exclude: list[str]) -> Path:
    recipe = qtool.load_recipe(spec["recipe"])
    recipe = recipe.override("quantize", exclude=tuple(recipe.quantize.exclude) + tuple(exclude))
    qtool.convert(spec["model"], out, recipe, data=spec["calib"])
    return out


def measure(spec: dict, candidate: Path) -> dict:
    doc = evaluate(candidate, spec["eval"], reference=spec["model"], metrics=[spec["metric"]]).to_dict()
    return {"sqnr_db": doc["outputs"][0]["sqnr_db"], "metric": doc["metrics"][0]["candidate"],
            "reference_metric": doc["metrics"][0]["reference"], "size": doc["size"]["candidate_bytes"]}


def check(spec: dict) -> list[str]:
    spec["work"].mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base_path = convert(spec, spec["work"] / "base.onnx", [])
    base = measure(spec, base_path)
    start = time.perf_counter()
    doc = evaluate(base_path, spec["eval"], reference=spec["model"], metrics=[spec["metric"]],
                   diagnose=True, diagnose_top=TOP, limit=spec["diag_limit"]).to_dict()
    diag, t_diag = doc["diagnosis"], time.perf_counter() - start
    ranked = [x for x in diag["layers"] if x["quantized"]][:TOP]
    rows = []
    for layer in ranked:
        names = [c["exclude"] for c in diag["checks"] if layer["node"] in c["exclude"]]
        exclude = names[0] if names else [layer["node"]]
        got = measure(spec, convert(spec, spec["work"] / f"excl_{len(rows)}.onnx", exclude))
        rows.append((layer, exclude, got))
    suggested = diag["suggested"]
    fixed = measure(spec, convert(spec, spec["work"] / "suggested.onnx", suggested)) if suggested else None
    print(f"{spec['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
    return report(spec, base, diag, t_diag, rows, suggested, fixed)


def report(spec, base, diag, t_diag, rows, suggested, fixed) -> list[str]:
    m = spec["metric"]
    lines = [
        f"## {spec['name']} ({spec['recipe']}, calibrated on {_rel(spec['calib'])})",
        "",
        f"Diagnosis on {diag['samples']} samples of {_rel(spec['eval'])} ({t_diag:.0f} s, "
        f"{diag['matched_tensors']} matched tensors). Every row below is a fresh conversion "
        f"with the calibration data above, measured on all of {_rel(spec['eval'])}; float {m}: "
        f"{base['reference_metric']:.4f}.",
        "",
        f"| candidate | rank | local SQNR dB | output SQNR dB | gain dB | {m} |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {spec['recipe']} as converted | – | – | {base['sqnr_db']:.2f} | – | {base['metric']:.4f} |",
    ]
    for i, (layer, exclude, got) in enumerate(rows, 1):
        lines.append(f"| without `{', '.join(exclude)}` | {i} | {layer['local_sqnr_db']:.2f} | "
                     f"{got['sqnr_db']:.2f} | {got['sqnr_db'] - base['sqnr_db']:+.2f} | {got['metric']:.4f} |")
    if fixed is not None:
        lines.append(f"| **suggested: without `{', '.join(suggested)}`** | – | – | **{fixed['sqnr_db']:.2f}** | "
                     f"**{fixed['sqnr_db'] - base['sqnr_db']:+.2f}** | {fixed['metric']:.4f} |")
    lines += ["", "Diagnosis's own check (calibrated on the even eval samples, measured on the odd ones): "
              f"baseline {_num(diag.get('baseline_sqnr_db'))} dB; "
              + "; ".join(f"without {', '.join(c['exclude'])}: {c['gain_db']:+.2f} dB" for c in diag["checks"]),
              "", f"Advice printed: {diag['advice']}", ""]
    if fixed is None:
        lines.append("No suggestion was printed (no exclusion measured a gain).")
        return lines
    others = [got["sqnr_db"] for _, exclude, got in rows if exclude != suggested]
    best_other = max(others) if others else float("-inf")
    verdict = "holds" if fixed["sqnr_db"] >= best_other else "does NOT hold"
    lines.append(f"**The claim {verdict}:** the suggestion gives {fixed['sqnr_db']:.2f} dB; the best "
                 f"other single exclusion of the top {TOP} gives {best_other:.2f} dB.")
    return lines


def _num(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    specs = models()
    lines = ["# Is `eval --diagnose`'s top suggestion the best single exclusion?", "",
             "bench/diagnose_check.py: convert, diagnose, then re-convert without each of the five "
             "worst-ranked layers alone and without the suggested layer(s); output SQNR is "
             "10 log10(sum r^2 / sum (r - c)^2) of the first output against the float model.", ""]
    for spec in specs:
        lines += check(spec) + [""]
    if len(specs) == 1:
        lines += ["SmolLM2-135M: not measured here, bench/.cache holds no SmolLM2 (run "
                  "`python bench/zoo.py prepare --only smollm2` first; this script then includes it).", ""]
    RESULT.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
