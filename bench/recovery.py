#!/usr/bin/env python3
"""Accuracy recovery for static int8 (qtool.passes.recovery) against onnxruntime and NNCF.

For each CNN / detector model, side by side, calibrated on the same `calib` samples and
scored on the separate `eval` samples:

* qtool static int8 as the default chooses it (``convert MODEL --data CALIB --no-guard``:
  per-tensor weights below opset 13), then the same plus each recovery pass
  (``--recover cle`` / ``smoothquant`` / ``adaround`` / ``bias``), ``cle,bias`` and all of them;
* the same with ``--target openvino`` (NNCF's placement: only the inputs of weighted ops), plain
  and with ``bias`` / ``cle,bias``, run on onnxruntime like NNCF's models;
* onnxruntime ``quantize_static``: its defaults (QDQ s8/s8 per-tensor), its recommended x86
  settings (``quant_pre_process``, QDQ u8 activations, s8 per-channel weights) and, on models
  with MatMul/Gemm weights, the same with its static SmoothQuant (needs neural_compressor 2.x on
  PYTHONPATH; see ``ort_smoothquant``); "ort best" is the best of them on the metric;
* NNCF 3.4 ``nncf.quantize`` on the ONNX model (its default preset PERFORMANCE with
  fast_bias_correction, preset MIXED, and fast_bias_correction=False: its full bias
  correction), run on onnxruntime.

Models: the zoo's mnist_cnn, resnet18_synth, efficientnet_lite0, minilm, smollm2 (perplexity,
lower is better; QTOOL_BENCH_CACHE) and the
corpus's CNN classifiers and detectors (QTOOL_CORPUS, default the corpus helper's cache).
Metric: the task metric where there are labels, else the corpus proxy or top-1 agreement with
fp32; "SQNR" is the worst output's median SQNR against fp32 on the eval samples. Latency:
median ms per sample (2 threads) of interleaved runs of fp32, plain int8, qtool's best,
onnxruntime's best and NNCF's default, so machine load hits them alike (this machine is
shared: ratios, not absolute numbers, carry).

``python bench/recovery.py [--only NAME ...] [--adaround-seconds S]`` writes
``bench/results/recovery.md`` and ``recovery.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import corpus  # noqa: E402
import zoo_data  # noqa: E402
from zoo_metrics import latency_interleaved  # noqa: E402

corpus.CORPUS = Path(os.environ.get("QTOOL_CORPUS", "/work/wt/corpus/bench/.cache/corpus"))
RESULTS = HERE / "results"
WORK = Path(os.environ.get("QTOOL_RECOVERY_WORK", "/tmp/qtool-recovery-bench"))
ZOO = ("mnist_cnn", "resnet18_synth", "efficientnet_lite0", "minilm", "smollm2")
# Transformers: static SmoothQuant's case (MatMuls whose inputs have outlier channels); scored
# by the zoo's own metric, and NNCF's transformer preset (model_type=TRANSFORMER) added.
TRANSFORMERS = {"minilm": "pearson", "smollm2": "perplexity"}
LOWER_IS_BETTER = ("perplexity",)
CORPUS_MODELS = ("ppocr_mobile_v2_cls", "ppocrv6_tiny_det", "ppocrv6_small_det", "ddddocr_det", "mtcnn_pnet",
                 "layout_cdla")
QTOOL_ROWS = (("qtool int8", ()), ("+ cle", ("cle",)), ("+ smoothquant", ("smoothquant",)),
              ("+ adaround", ("adaround",)), ("+ bias", ("bias",)), ("+ bias-full", ("bias-full",)),
              ("+ cle,bias", ("cle", "bias")), ("+ smoothquant,bias", ("smoothquant", "bias")),
              ("+ smoothquant,bias-full", ("smoothquant", "bias-full")),
              ("+ all", ("cle", "smoothquant", "adaround", "bias")))
MATMUL_ONLY_ROWS = (("qtool int8 MatMul only", ()), ("MatMul only + smoothquant", ("smoothquant",)))
# `--target openvino`: NNCF's own placement (only the inputs of weighted ops, SE blocks and
# gates float, per-channel weights at opset 13), run here on onnxruntime like NNCF's models.
OPENVINO_ROWS = (("qtool --target openvino", ()), ("openvino + bias", ("bias",)),
                 ("openvino + cle,bias", ("cle", "bias")))
# The same passes on MSE-optimal ranges (the calibration the guard tries second) instead of min/max.
MSE_ROWS = (("+ bias, mse ranges", ("bias",), ""), ("openvino + bias, mse ranges", ("bias",), "openvino"))
ORT_ROWS = ("ort defaults", "ort recommended", "ort smoothquant")
MAX_EVAL = 200
MAX_CALIB = 64  # every converter calibrates on the same first 64 calib samples (time: a loaded machine)


# ---------------------------------------------------------------------------- models


class Bench:
    """One model: its file, calibration folder and feeds, eval feeds and scorer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.work = WORK / name
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        if name in ZOO:
            self.src = zoo_data.CACHE / "models" / f"{name}.onnx"
            self.calib_dir = zoo_data.DATA / name / "calib"
            self.calib = zoo_data.load_split(name, "calib")[:MAX_CALIB]
            evals = zoo_data.load_split(name, "eval")
            step = max(1, len(evals) // MAX_EVAL)  # evenly: a split may be sorted by label
            self.evals = evals[::step][:MAX_EVAL]
            labels = zoo_data.meta(name).get("labels", {}).get("eval")
            self.labels = labels[::step][:MAX_EVAL] if labels else None
            self.metric = TRANSFORMERS.get(name) or ("top1" if self.labels else "top1_agreement")
        else:
            self.src = corpus.fetch(name)
            self.calib_dir = corpus.write_dataset(name, "calib", self.work / "calib")
            self.calib = corpus.samples(name, "calib")[:MAX_CALIB]
            self.evals, self.labels = corpus.samples(name, "eval"), corpus.labels(name, "eval")
            self.metric = corpus.entry(name).metric
        self.ref = corpus.run_model(self.src, self.evals)

    def score(self, path: Path) -> dict:
        out = corpus.run_model(path, self.evals)
        sq = [float(np.median([corpus.sqnr_db(r[k], o[k]) for r, o in zip(self.ref, out)]))
              for k in range(len(self.ref[0])) if np.issubdtype(self.ref[0][k].dtype, np.floating)]
        res = {"sqnr_db": min(sq) if sq else None}
        if self.name in TRANSFORMERS:
            import zoo_metrics

            evaluate = zoo_metrics.eval_perplexity if self.metric == "perplexity" else zoo_metrics.eval_lee
            res["metric"] = evaluate(self.name, _session(path), "eval")[self.metric]
        elif self.name in ZOO:
            top = [int(np.argmax(o[0])) for o in out]
            if self.labels:
                res["metric"] = float(np.mean([t == lab for t, lab in zip(top, self.labels)]))
            else:
                res["metric"] = float(np.mean([t == int(np.argmax(r[0])) for t, r in zip(top, self.ref)]))
        else:
            res["metric"] = corpus.entry(self.name).proxy(self.ref, out, self.labels)[self.metric]
        return res

    def fp32_metric(self) -> float:
        return self.score(self.src)["metric"]


def _session(path: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------- converters


def qtool_row(b: Bench, dst: Path, passes: tuple[str, ...], seconds: float, op_types: tuple[str, ...] = (),
              target: str = "", method: str = "") -> dict:
    from qtool.config import load_recipe
    from qtool.pipeline import convert_file

    recipe = load_recipe("int8-static").override("recovery", passes=passes, adaround_seconds=seconds, auto=False)
    recipe = recipe.override("calibration", samples=len(b.calib))
    if op_types:
        recipe = recipe.override("quantize", op_types=op_types)
    if method:
        recipe = recipe.override("calibration", method=method)
    if target:
        from qtool.targets import apply_target

        recipe = apply_target(recipe.override("quantize", target=target))
    report = convert_file(b.src, dst, recipe, data=b.calib_dir, auto=True)
    notes = []
    for p in report["passes"]:
        if p["name"] in ("equalize", "smoothquant", "adaround", "bias-correction", "bias-correction-full"):
            counts = ", ".join(f"{k} {v}" for k, v in p["counts"].items()) or "nothing changed"
            notes.append(f"{p['name']}: {counts}" + (f" ({p['notes'][0]})" if p["notes"] else ""))
    return {"notes": notes}


def qtool_default(b: Bench, dst: Path) -> dict:
    """What a user gets: ``qtool convert MODEL --data CALIB`` (scheme, recovery and guard as the
    default chooses them; the guard holds out part of CALIB), through the command line."""
    from sweep import qtool_cli

    row = qtool_cli(b.src, dst, "--data", str(b.calib_dir))
    if row["exit"] != 0:
        raise RuntimeError(f"exit {row['exit']}: {' '.join(row['report'][-2:])[:200]}")
    return {"notes": [f"chosen: {row.get('chosen')}"]}


class _Reader:
    """onnxruntime's CalibrationDataReader protocol; also iterable, as its SmoothQuant (which
    deep-copies the reader and loops over it) needs."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds, self.next = list(feeds), 0

    def __iter__(self):  # noqa: ANN204
        return iter(self.feeds)

    def get_next(self):  # noqa: ANN201
        self.next += 1
        return self.feeds[self.next - 1] if self.next <= len(self.feeds) else None

    def rewind(self) -> None:  # pragma: no cover - not used by quantize_static
        pass


def ort_defaults(b: Bench, dst: Path) -> dict:
    from onnxruntime.quantization import quantize_static

    quantize_static(str(b.src), str(dst), _Reader(b.calib))
    return {}


def ort_recommended(b: Bench, dst: Path) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, note, model = dst.with_name("pre.onnx"), {}, b.src
    try:
        quant_pre_process(str(b.src), str(pre))
        model = pre
    except Exception as exc:  # noqa: BLE001 - its pre-process is optional
        note["notes"] = [f"pre_process failed ({type(exc).__name__}), skipped"]
    quantize_static(str(model), str(dst), _Reader(b.calib), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return note


def ort_smoothquant(b: Bench, dst: Path) -> dict:
    """onnxruntime's static SmoothQuant (``extra_options={"SmoothQuant": True}``) on its recommended
    x86 settings. It calls neural_compressor 2.x's ONNX adaptor, which qtool's venv does not carry:
    ``pip install --target DIR --no-deps neural-compressor==2.6`` (plus its imports schema,
    py-cpuinfo, prettytable, opencv-python-headless, pycocotools) and put DIR on PYTHONPATH."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(b.src), str(dst), _Reader(_same_length(b.calib)), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5})
    return {}


def _same_length(feeds: list[dict]) -> list[dict]:
    """Token feeds zero-padded to the longest (attention mask 0 on the padding): neural_compressor
    stacks the activations of all samples, so variable-length samples fail with "all input arrays
    must have the same shape". Feeds of one shape are returned as they are."""
    shapes = {tuple(v.shape) for f in feeds for v in f.values()}
    if len(shapes) <= 1 or any(v.ndim != 2 for f in feeds for v in f.values()):
        return feeds
    n = max(v.shape[1] for f in feeds for v in f.values())
    return [{k: np.pad(v, ((0, 0), (0, n - v.shape[1]))) for k, v in f.items()} for f in feeds]


def nncf_row(b: Bench, dst: Path, preset: str | None, fast_bias_correction: bool, transformer: bool = False) -> dict:
    import nncf
    import onnx

    model = onnx.load(str(b.src))
    kwargs = {"subset_size": len(b.calib), "fast_bias_correction": fast_bias_correction}
    if preset is not None:
        kwargs["preset"] = getattr(nncf.QuantizationPreset, preset)
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(model, nncf.Dataset(b.calib), **kwargs)
    onnx.save(quantized, str(dst))
    return {}


def has_matmul_weights(path: Path) -> bool:
    """Whether static SmoothQuant has anything to look at (a MatMul or Gemm with a constant weight)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return any(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits for n in model.graph.node)


def configs(b: Bench, seconds: float, wanted: list[str] | None = None):
    smoothable = has_matmul_weights(b.src)
    for label, passes in QTOOL_ROWS:
        if wanted is not None and label not in wanted:
            continue
        if "smoothquant" in passes and not smoothable and len(passes) == 1:
            continue  # no MatMul/Gemm with a constant weight: the row would be plain int8 again
        yield label, (lambda dst, p=passes: qtool_row(b, dst, p, seconds))
    if b.name in TRANSFORMERS:  # NNCF's transformer preset quantizes MatMul inputs only: the same placement
        for label, passes in MATMUL_ONLY_ROWS:
            if wanted is None or label in wanted:
                yield label, (lambda dst, p=passes: qtool_row(b, dst, p, seconds, op_types=("MatMul",)))
    if b.name not in TRANSFORMERS:
        for label, passes in OPENVINO_ROWS:
            if wanted is None or label in wanted:
                yield label, (lambda dst, p=passes: qtool_row(b, dst, p, seconds, target="openvino"))
    for label, passes, target in MSE_ROWS:
        if (wanted is None or label in wanted) and (b.name not in TRANSFORMERS or not target):
            yield label, (lambda dst, p=passes, t=target: qtool_row(b, dst, p, seconds, target=t, method="mse"))
    if wanted is None or "qtool default" in wanted:
        yield "qtool default", lambda dst: qtool_default(b, dst)
    others = (("ort defaults", lambda dst: ort_defaults(b, dst)),
              ("ort recommended", lambda dst: ort_recommended(b, dst)),
              ("ort smoothquant", lambda dst: ort_smoothquant(b, dst)),
              ("nncf default", lambda dst: nncf_row(b, dst, None, True)),
              ("nncf MIXED", lambda dst: nncf_row(b, dst, "MIXED", True)),
              ("nncf full bias correction", lambda dst: nncf_row(b, dst, None, False)))
    if b.name in TRANSFORMERS:
        others = others[:4] + (("nncf transformer", lambda dst: nncf_row(b, dst, None, True, transformer=True)),)
    for label, fn in others:
        if label == "ort smoothquant" and not smoothable:
            continue  # it smooths MatMul/Gemm inputs: the row would be "ort recommended" again
        if wanted is None or label in wanted:
            yield label, fn


# ---------------------------------------------------------------------------- the run


def bench_model(name: str, seconds: float, wanted: list[str] | None = None) -> dict:
    b = Bench(name)
    rows = [{"config": "fp32", "path": str(b.src), **b.score(b.src), "convert_s": 0.0}]
    for i, (label, fn) in enumerate(configs(b, seconds, wanted)):
        dst = b.work / f"c{i}" / "model.onnx"
        dst.parent.mkdir()
        row = {"config": label}
        t0 = time.perf_counter()
        try:
            row.update(fn(dst) or {})
            row["convert_s"] = time.perf_counter() - t0
            row.update(b.score(dst), path=str(dst))
        except Exception as exc:  # noqa: BLE001 - a failing converter is a result
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            traceback.print_exc()
        rows.append(row)
        print(f"[{name}] {label}: {row.get('metric')} sqnr {row.get('sqnr_db')} "
              f"({row.get('convert_s', 0):.1f}s) {row.get('error', '')}", flush=True)
    _latency(b, rows)
    return {"name": name, "metric": b.metric, "rows": rows, "eval_samples": len(b.evals),
            "calib_samples": len(b.calib)}


def _best(rows: list[dict], labels: tuple[str, ...], metric: str = "") -> dict | None:
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    ok = [r for r in rows if r["config"] in labels and "metric" in r]
    return max(ok, key=lambda r: (sign * r["metric"], r["sqnr_db"] or -1e9), default=None)


def _latency(b: Bench, rows: list[dict]) -> None:
    m = b.metric
    picks = [rows[0], _best(rows, ("qtool int8",), m), _best(rows, tuple(r for r, _ in QTOOL_ROWS[1:]), m),
             _best(rows, ORT_ROWS, m), _best(rows, ("nncf default",), m)]
    picks = [p for i, p in enumerate(picks) if p is not None and p not in picks[:i]]
    stats = latency_interleaved([p["path"] for p in picks], b.evals[0], rounds=15)
    for p, s in zip(picks, stats):
        p["latency_ms"] = s["median_ms"]


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _won_back(fp32: float | None, plain: float | None, best: float | None, lower: bool = False) -> str:
    if None in (fp32, plain, best) or (plain - fp32 if lower else fp32 - plain) <= 0:
        return "no loss"
    return f"{(best - plain) / (fp32 - plain):.0%}"


def _summary(results: dict) -> list[str]:
    lines = ["## Summary", "",
             "Best qtool recovery row: the highest metric (then SQNR) among `+ ...` rows. Won back: "
             "(best recovery - plain) / (fp32 - plain) on the metric, and the same on SQNR where fp32's is "
             "infinite (plain's loss then counted from 60 dB).", "",
             "`qtool default` is `qtool convert MODEL --data CALIB` as a user runs it (its guard may choose "
             "another scheme than static int8, named in the model's table).", "",
             "| model | fp32 | qtool int8 | best qtool recovery | won back (metric / SQNR) | qtool default | ort best "
             "| NNCF best |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        if "error" in res:
            continue
        rows = res["rows"]
        m = res["metric"]
        fp32, plain = rows[0], _best(rows, ("qtool int8",), m)
        recovery = QTOOL_ROWS[1:] + MATMUL_ONLY_ROWS + OPENVINO_ROWS + MSE_ROWS
        rec = _best(rows, tuple(label for label, *_ in recovery), m)
        ort = _best(rows, ORT_ROWS, m)
        nncf = _best(rows, ("nncf default", "nncf MIXED", "nncf full bias correction", "nncf transformer"), m)
        default = _best(rows, ("qtool default",), m)

        def cell(r):  # noqa: ANN001, ANN202
            return "–" if r is None else f"{_fmt(r.get('metric'))} / {_fmt(r.get('sqnr_db'), 1)} dB"

        sq = [min(r.get("sqnr_db") or 0.0, 60.0) if r else None for r in (fp32, plain, rec)]
        # A metric in dB (score SQNR) is infinite for fp32: its loss is counted from 60 dB too.
        cap = 60.0 if fp32.get("metric") == float("inf") else float("inf")
        met = [min(r["metric"], cap) if r and r.get("metric") is not None else None for r in (fp32, plain, rec)]
        won = f"{_won_back(*met, m in LOWER_IS_BETTER)} / {_won_back(*sq)}"
        lines.append(f"| {name} | {cell(fp32)} | {cell(plain)} | {cell(rec)} ({rec['config'] if rec else ''}) | "
                     f"{won} | {cell(default)} | {cell(ort)} ({ort['config'] if ort else ''}) | {cell(nncf)} "
                     f"({nncf['config'] if nncf else ''}) |")
    return lines + [""]


def render(results: dict, seconds: float) -> str:
    lines = ["# Accuracy recovery for static int8: qtool, onnxruntime, NNCF", "",
             f"Written by `python bench/recovery.py` (AdaRound budget {seconds:g} s per model). Calibrated on "
             "each model's `calib` split, scored on its `eval` split; SQNR: the worst output's median SQNR "
             "against fp32 (dB); latency: median ms, interleaved runs (2 threads, a shared 2-core machine: "
             "compare within a model and run: rows from an earlier run show none). qtool rows are `convert MODEL --data CALIB --no-guard "
             "[--recover ...]`.", ""]
    notes = RESULTS / "recovery_notes.md"  # hand-written findings of the last run, if any
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    lines += _summary(results)
    for name, res in results.items():
        lines += [f"## {name}", ""]
        if "error" in res:
            lines += [f"error: {res['error']}", ""]
            continue
        lines += [f"metric: {res['metric']} (higher is better); {res['calib_samples']} calibration, "
                  f"{res['eval_samples']} eval samples", "",
                  "| config | metric | SQNR dB | latency ms | convert s | notes |", "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            notes = r.get("error") or "; ".join(r.get("notes", []))
            lines.append(f"| {r['config']} | {_fmt(r.get('metric'))} | {_fmt(r.get('sqnr_db'), 1)} | "
                         f"{_fmt(r.get('latency_ms'), 2)} | {_fmt(r.get('convert_s'), 1)} | {notes} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def merged_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """The rows of a partial run (``--configs``) in table order, the others from the last run."""
    fresh = {r["config"]: r for r in new}
    qtool_rows = QTOOL_ROWS + MATMUL_ONLY_ROWS + OPENVINO_ROWS + MSE_ROWS
    order = ["fp32", *(label for label, *_ in qtool_rows), "qtool default", *ORT_ROWS, "nncf default",
             "nncf MIXED", "nncf full bias correction", "nncf transformer"]
    # An earlier run's latency was timed against other rows under another load: not comparable.
    rows = {r["config"]: {**r, "latency_ms": None, "notes": r.get("notes", []) + ["earlier run"]}
            for r in old if "earlier run" not in r.get("notes", [])}
    rows.update({r["config"]: {**r, "latency_ms": None} for r in old if "earlier run" in r.get("notes", [])})
    rows.update(fresh)
    return [rows[label] for label in order if label in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--adaround-seconds", type=float, default=30.0)
    ap.add_argument("--configs", nargs="*", default=None,
                    help="run only these rows (labels as in the tables); the model's other rows are kept "
                         "from the last run on the same data (marked 'earlier run')")
    args = ap.parse_args(argv)
    names = args.only or list(CORPUS_MODELS + ZOO)
    out_json = RESULTS / "recovery.json"
    if not args.only and out_json.exists():
        out_json.unlink()
    results: dict = {}
    for name in names:
        try:
            res = bench_model(name, args.adaround_seconds, args.configs)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        # Read again before writing: two runs with --only may share the file.
        results = json.loads(out_json.read_text()) if out_json.exists() else {}
        if args.configs and "rows" in res and "rows" in results.get(name, {}):
            res["rows"] = merged_rows(results[name]["rows"], res["rows"])
        results[name] = res
        out_json.write_text(json.dumps(results, indent=1, default=str))
    (RESULTS / "recovery.md").write_text(render(results, args.adaround_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
