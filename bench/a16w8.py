#!/usr/bin/env python3
"""A16W8 (16-bit activations, int8 weights) against static int8, on the models where 8-bit
activations lose the most, side by side with onnxruntime's quantizer in one run.

    QTOOL_BENCH_CACHE=/work/bench_cache QTOOL_CORPUS=DIR python bench/a16w8.py [--only NAME ...]
    python bench/a16w8.py --report          # only rebuild bench/results/a16w8.md

Models: the corpus models the guard refuses for low fidelity under static int8
(bench/results/sweep_main.md: ppocrv5_det, ppocrv4_seal_det, layout_cdla, mtcnn_pnet; corpus
from bench/corpus.py, its cache folder in QTOOL_CORPUS) and the bench zoo's efficientnet_lite0
and ppocr_rec (bench/zoo.py, QTOOL_BENCH_CACHE). Every tool calibrates on the ``calib`` split
and every number is measured on the ``eval`` split.

Rows per model: fp32; qtool static int8 (the int8-static recipe; per-tensor weights below
opset 13, as the default does); qtool A16W8 (the same recipe and calibration table with
``--activation-bits 16``: com.microsoft Q/DQ below opset 21); qtool A16W8 with
``--allow-opset-upgrade`` (standard Q/DQ at opset 21, per-channel weights); onnxruntime
``quantize_static`` QDQ u8/s8 per-channel (its x86 setting) and its A16W8 option
(``activation_type=QuantType.QUInt16``, s8 per-channel weights), both after its
``quant_pre_process`` (skipped when that step fails; per-tensor when per-channel fails).

Columns: the task metric (or proxy) and the worst output SQNR against fp32 (median over
samples); "recovered" = the share of static int8's loss that A16W8 wins back (onnxruntime's A16W8
against onnxruntime's u8 row), on the metric and on the worst SQNR: for a metric,
(m_a16 - m_int8) / (m_fp32 - m_int8); for an SQNR (fp32 = inf), 1 - NSR_a16 / NSR_int8 with
NSR = 10^(-SQNR/10), the error energy. Latency on onnxruntime's CPU provider (2 threads,
interleaved rounds, median wall time; and the median thread CPU time of a 1-thread session,
which other processes on a loaded machine barely disturb; zoo_metrics.latency_interleaved) and on OpenVINO's CPU plugin
(each model in a fresh process, 2 threads, its default precision hint, rounds alternating
between models, median of the per-process medians). A model OpenVINO cannot read is said so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import zoo  # noqa: E402

if os.environ.get("QTOOL_CORPUS"):  # the corpus cache of another checkout (read-only here)
    corpus.CORPUS = Path(os.environ["QTOOL_CORPUS"])
RESULTS = HERE / "results" / "a16w8.md"
WORK = Path(os.environ.get("A16W8_WORK", HERE / ".cache" / "work" / "a16w8"))
CORPUS_MODELS = ["ppocrv5_det", "ppocrv4_seal_det", "layout_cdla", "mtcnn_pnet"]
ZOO_MODELS = ["efficientnet_lite0", "ppocr_rec"]
MODELS = CORPUS_MODELS + ZOO_MODELS
INT8, A16, A16_21 = "qtool static int8", "qtool A16W8", "qtool A16W8 (--allow-opset-upgrade: opset 21)"
ORT8, ORT16 = "onnxruntime static QDQ u8/s8", "onnxruntime static QDQ A16W8 (QUInt16/QInt8)"
OV_ROUNDS = 3


# -- the two sources of models and data --------------------------------------------------


class Source:
    """A model, its calib folder, its eval feeds and its scorer (corpus or zoo)."""

    def __init__(self, name: str, work: Path) -> None:
        self.name, self.is_zoo = name, name in ZOO_MODELS
        if self.is_zoo:
            self.src = zoo.model_path(name)
            self.calib_dir = zoo.data_dir(name, "calib")
            self.calib = list(zoo.iter_split(name, "calib"))
            self.evals = list(zoo.iter_split(name, "eval"))
            self.labels = None
        else:
            self.src = corpus.fetch(name)
            self.calib_dir = corpus.write_dataset(name, "calib", work / "calib")
            self.calib = corpus.samples(name, "calib")
            self.evals, self.labels = corpus.samples(name, "eval"), corpus.labels(name, "eval")
            self.entry = corpus.entry(name)
        self.ref = corpus.run_model(self.src, self.evals)

    def score(self, path: Path, float_matmul: bool = False) -> dict:
        """{"metric": name, "value": v, "higher": bool, "worst_sqnr_db": dB}; ``float_matmul``:
        with the session option that keeps onnxruntime's int8-weight MatMulNBits from
        quantizing its input to int8 (MATMUL_OPTION)."""
        sess = _session(path, float_matmul)
        out = [sess.run(None, f) for f in self.evals]
        worst = min(float(np.median([corpus.sqnr_db(r[i], o[i]) for r, o in zip(self.ref, out)]))
                    for i in range(len(self.ref[0])) if np.asarray(self.ref[0][i]).dtype.kind == "f")
        if self.is_zoo:
            from zoo_specs import spec_of

            key, value = _zoo_metric(spec_of(self.name).evaluate(self.name, sess, "eval"))
            return {"metric": key, "value": value, "higher": key != "cer", "worst_sqnr_db": worst}
        res = corpus.score(self.name, self.ref, out, self.labels)
        value = res.get(self.entry.metric)
        return {"metric": self.entry.metric, "value": None if value is None else float(value),
                "higher": self.entry.higher_is_better, "worst_sqnr_db": worst}


MATMUL_OPTION = ("session.qdq_matmulnbits_accuracy_level", "0")


def _session(path: Path, float_matmul: bool):
    """A 2-thread CPU session (as corpus.run_model and zoo.session make)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.log_severity_level = 3
    if float_matmul:
        opts.add_session_config_entry(*MATMUL_OPTION)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _zoo_metric(result: dict) -> tuple[str, float]:
    for key in ("top1", "cer", "accuracy"):
        if key in result:
            return key, float(result[key])
    key = next(k for k, v in result.items() if isinstance(v, float))
    return key, float(result[key])


# -- the conversions ---------------------------------------------------------------------


def qtool_rows(source: Source, out: Path) -> dict[str, Path]:
    """qtool int8 and A16W8 from one calibration table (what `convert --data` computes)."""
    from qtool.config import load_recipe
    from qtool.model import load, save
    from qtool.passes.preprocess import preprocess
    from qtool.pipeline import calibrate, convert_model
    from qtool.pipeline.auto import default_static

    model = load(source.src)
    recipe, _ = default_static(load_recipe("int8-static"), model)
    preprocess(model)
    table = calibrate(model, source.calib_dir, recipe)
    made = {}
    for label, r in ((INT8, recipe), (A16, recipe.override("quantize", activation_bits=16)),
                     (A16_21, load_recipe("int8-a16w8").override("quantize", allow_opset_upgrade=True))):
        dst = out / f"{len(made)}.onnx"
        t0 = time.perf_counter()
        converted = convert_model(model, r, table=table, preprocessed=True)
        save(converted.model, dst)
        made[label] = (dst, round(time.perf_counter() - t0, 1))
    return made


def ort_row(source: Source, dst: Path, activation_16: bool) -> str:
    """onnxruntime quantize_static after its pre-process; returns what was used."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, note = dst.with_name(dst.stem + ".pre.onnx"), []
    try:
        quant_pre_process(str(source.src), str(pre))
        model = pre
    except Exception as exc:  # noqa: BLE001 - its pre-process is optional
        note.append(f"pre_process failed ({type(exc).__name__}), skipped")
        model = source.src
    act = QuantType.QUInt16 if activation_16 else QuantType.QUInt8
    for per_channel in (True, False):
        try:
            quantize_static(str(model), str(dst), zoo.feeds_reader(lambda: source.calib), quant_format=QuantFormat.QDQ,
                            activation_type=act, weight_type=QuantType.QInt8, per_channel=per_channel)
            corpus.run_model(dst, source.evals[:1])
            note.append("per-channel" if per_channel else "per-tensor (per-channel output failed)")
            break
        except Exception as exc:  # noqa: BLE001 - try per-tensor, then report
            if not per_channel:
                raise
            note.append(f"per-channel failed: {type(exc).__name__}: {str(exc)[:120]}")
    pre.unlink(missing_ok=True)
    return "; ".join(note)


# -- OpenVINO timing (a fresh process per model) -----------------------------------------


def ov_time(path: str, feed_npz: str, runs: int) -> None:
    """Child process: compile ``path`` on OpenVINO's CPU plugin, print the median ms."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
    with np.load(feed_npz) as z:
        feed = {k: z[k] for k in z.files}
    request = compiled.create_infer_request()
    for _ in range(3):
        request.infer(feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        request.infer(feed)
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": float(np.median(times))}))


def ov_latency(paths: list[Path], feed: dict, work: Path, runs: int) -> list[dict]:
    npz = work / "feed.npz"
    np.savez(npz, **feed)
    got: list[list[float]] = [[] for _ in paths]
    errors: list[str | None] = [None] * len(paths)
    for _ in range(OV_ROUNDS):
        for i, p in enumerate(paths):
            if errors[i]:
                continue
            proc = subprocess.run([sys.executable, __file__, "--ov-time", str(p), str(npz), str(runs)],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
                errors[i] = (lines[-1] if lines else f"exit {proc.returncode}")[:200]
                continue
            got[i].append(json.loads(proc.stdout.strip().splitlines()[-1])["median_ms"])
    return [{"ov_ms": float(np.median(t)) if t else None, "ov_error": e} for t, e in zip(got, errors)]


# -- one model ---------------------------------------------------------------------------


def run_model(name: str, with_ov: bool) -> dict:
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    source = Source(name, work)
    rows = [{"config": "fp32", "path": str(source.src), "convert_s": None}]
    try:
        for label, (path, seconds) in qtool_rows(source, work).items():
            rows.append({"config": label, "path": str(path), "convert_s": seconds})
    except Exception as exc:  # noqa: BLE001 - a failing tool is a result
        traceback.print_exc()
        rows.append({"config": "qtool", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    for label, a16 in ((ORT8, False), (ORT16, True)):
        dst = work / ("ort16.onnx" if a16 else "ort8.onnx")
        t0 = time.perf_counter()
        try:
            note = ort_row(source, dst, a16)
            rows.append({"config": label, "path": str(dst), "note": note,
                         "convert_s": round(time.perf_counter() - t0, 1)})
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"config": label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    for r in rows:
        if "error" in r:
            continue
        try:
            r.update(source.score(Path(r["path"])))
            r["size"] = zoo_size(Path(r["path"]))
            if r["config"] in (A16, A16_21, ORT16):
                alt = source.score(Path(r["path"]), float_matmul=True)
                r["float_matmul"] = {"value": alt["value"], "worst_sqnr_db": alt["worst_sqnr_db"]}
        except Exception as exc:  # noqa: BLE001 - an output that does not run is a result too
            r["error"] = f"does not run: {type(exc).__name__}: {str(exc)[:200]}"
        print(f"[a16w8] {name} | {json.dumps(r, default=str)}", file=sys.stderr, flush=True)
    timed = [r for r in rows if "error" not in r]
    feed = source.evals[0]
    t0 = time.perf_counter()
    corpus.run_model(source.src, [feed])
    rounds = max(3, min(30, int(60 / max((time.perf_counter() - t0) * len(timed) * 3, 1e-3))))
    for r, lat in zip(timed, zoo.latency_interleaved([r["path"] for r in timed], feed, rounds=rounds, warmup=2)):
        r.update(ort_ms=lat["median_ms"], ort_cpu_ms=lat["cpu_ms"], ort_rounds=rounds)
    if with_ov:
        for r, lat in zip(timed, ov_latency([Path(r["path"]) for r in timed], feed, work, rounds)):
            r.update(lat)
    result = {"model": name, "rows": rows, "load_avg": round(os.getloadavg()[0], 2)}
    (work / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def zoo_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


# -- the report --------------------------------------------------------------------------


def recovered(fp32: dict, int8: dict, a16: dict, key: str = "value") -> float | None:
    """The share of int8's loss that A16W8 wins back (see the module docstring), on the
    metric (``key="value"``) or on the worst output SQNR (``key="worst_sqnr_db"``)."""
    if any(r.get(key) is None for r in (fp32, int8, a16)):
        return None
    f, i, a = fp32[key], int8[key], a16[key]
    if math.isinf(f):  # an SQNR against fp32: compare error energies
        nsr = lambda db: 10 ** (-db / 10)  # noqa: E731
        return 1 - nsr(a) / nsr(i) if nsr(i) > 0 else None
    loss = (f - i) if fp32["higher"] else (i - f)
    if abs(loss) < 1e-9:
        return None
    return ((a - i) if fp32["higher"] else (i - a)) / loss


def _fmt(v, digits=4) -> str:  # noqa: ANN001
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_report() -> str:
    import onnxruntime

    lines = ["# A16W8: 16-bit activations with int8 weights, against static int8",
             "",
             f"Written by `python bench/a16w8.py` (onnxruntime {onnxruntime.__version__}, "
             f"{_ov_version()}; 2 cores shared with other work). " + __doc__.split("Rows per model:")[1]
             .split("A model OpenVINO")[0].replace("\n", " ").strip(), ""]
    for name in MODELS:
        path = WORK / name / "result.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = {r["config"]: r for r in data["rows"]}
        fp32 = rows["fp32"]
        lines += [f"## {name}", "", f"metric: {fp32.get('metric')} ({'higher' if fp32.get('higher') else 'lower'} "
                  f"is better); load average {data['load_avg']}" + (f". {data['note']}" if data.get("note") else ""), "",
                  "| config | metric | worst SQNR dB | recovered of int8's loss: metric / SQNR | size MB "
                  "| ORT ms, 2-thread wall / 1-thread CPU (vs fp32) | OpenVINO ms (vs fp32) | note |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for label, r in rows.items():
            if "error" in r:
                lines.append(f"| {label} | error | | | | | | {r['error'][:160]} |")
                continue
            rec = "–"
            if label in (A16, A16_21, ORT16):
                base = rows.get(ORT8 if label == ORT16 else INT8, {})
                if "error" not in base:
                    rec = " / ".join("–" if v is None else f"{v:.0%}" for v in
                                     (recovered(fp32, base, r), recovered(fp32, base, r, "worst_sqnr_db")))
            ort = (f"{r['ort_ms']:.2f} ({r['ort_ms'] / fp32['ort_ms']:.2f}x) / {r['ort_cpu_ms']:.2f} "
                   f"({r['ort_cpu_ms'] / fp32['ort_cpu_ms']:.2f}x)" if r.get("ort_ms") else "–")
            ov = (f"{r['ov_ms']:.2f} ({r['ov_ms'] / fp32['ov_ms']:.2f}x)" if r.get("ov_ms") and fp32.get("ov_ms")
                  else ("failed: " + r["ov_error"][:100] if r.get("ov_error") else "not measured"))
            note = r.get("note", "")
            alt = r.get("float_matmul")
            if alt and (alt["value"], alt["worst_sqnr_db"]) != (r.get("value"), r.get("worst_sqnr_db")):
                note = (f"with `{'='.join(MATMUL_OPTION)}`: metric {_fmt(alt['value'])}, worst SQNR "
                        f"{_fmt(alt['worst_sqnr_db'], 1)} dB" + (f"; {note}" if note else ""))
            lines.append(f"| {label} | {_fmt(r.get('value'))} | {_fmt(r.get('worst_sqnr_db'), 1)} | "
                         f"{rec} | {r['size'] / 1e6:.2f} | {ort} | {ov} | {note} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    notes = HERE / "results" / "a16w8_notes.md"
    if notes.exists():
        text = text.replace("\n## ", "\n" + notes.read_text() + "\n## ", 1)
    RESULTS.write_text(text)
    return text


def _ov_version() -> str:
    try:
        import openvino

        return f"OpenVINO {openvino.get_version()}"
    except ImportError:
        return "OpenVINO not installed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--ov-time", nargs=3, metavar=("MODEL", "FEED", "RUNS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ov_time:
        ov_time(args.ov_time[0], args.ov_time[1], int(args.ov_time[2]))
        return 0
    if not args.report:
        for name in args.only or MODELS:
            run_model(name, with_ov=not args.no_openvino)
    print(write_report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
