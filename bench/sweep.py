#!/usr/bin/env python3
"""Sweep: every corpus model (bench/corpus.py) through qtool and onnxruntime's quantizer.

For each model, side by side on the same calibration and held-out evaluation inputs:

* ``qtool convert MODEL --data CALIB -o OUT``: qtool's default, exactly as a user types it
  (a subprocess of this checkout; its exit code and last report lines are recorded);
* qtool's explicit flag sets, each exactly as typed: ``--scheme int8-static --data CALIB
  --no-guard`` (with ``--per-tensor`` when the opset needs it; for a model the default refuses,
  this is the candidate the guard refused), ``--scheme int8-weights`` and ``--dynamic``; the
  table's "qtool best explicit" is the best of them that exited 0, with its flags;
* onnxruntime ``quantize_dynamic`` with its defaults (s8 weights, per-tensor) and with u8
  weights;
* onnxruntime ``quantize_static`` with its defaults (QDQ, s8 activations and weights,
  per-tensor), and ``quant_pre_process`` then ``quantize_static`` QDQ with u8 activations and s8
  per-channel weights (the settings its documentation recommends for x86), calibrated on the
  same CALIB samples (without the pre-process step when that step fails).

Each output model is run on the eval split and scored by the corpus: the task metric (CER
against the rendered text, accuracy against known labels, VAD accuracy, ...) or its proxy,
and the SQNR and cosine of every output against fp32 (the worst output is reported: a
concatenated or multi-head model cannot hide a broken output behind a healthy one). Latency
is measured in turns with the fp32 model (zoo_metrics.latency_interleaved). Results:
``bench/results/sweep.md`` and ``bench/results/sweep.json`` (``--tag T``: ``sweep_T.md``, with the
hand-written findings of ``sweep_T_notes.md`` at the top).

``python bench/sweep.py [--only NAME ...] [--rounds N]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import corpus
from zoo_data import feeds_reader
from zoo_metrics import latency_interleaved

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = corpus.CORPUS / "sweep"  # --tag T: corpus/sweep-T and results/sweep_T.md
RESULTS = HERE / "results"

# Differences smaller than these are noise on 16-32 evaluation samples (one sample of 32 is
# 0.031 of accuracy; 0.3 of perplexity is 1% of SmolLM2's on 256 tokens); the verdict only calls a
# difference beyond them.
NOISE = {"cer": 0.01, "cer_vs_fp32": 0.01, "accuracy": 0.035, "top1_agreement": 0.035, "mask_iou": 0.01,
         "score_sqnr_db": 1.0, "cosine": 0.002, "pairwise_spearman": 0.01, "mel_sqnr_db": 1.0,
         "perplexity": 0.3}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def qtool_cli(src: Path, dst: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "qtool", "convert", str(src), *args, "-o", str(dst), "--json"],
                          capture_output=True, text=True, env=env, timeout=1800)
    # progress bars are not part of the report; --json puts the report alone on stdout
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and "━" not in ln][-6:]
    row = {"exit": proc.returncode, "report": tail}
    try:
        rep = json.loads(proc.stdout)
    except ValueError:  # exit 1/2 before any conversion: no report, the error is on stderr
        return row
    guard = rep.get("guard") or {}
    row.update(mode=rep.get("mode"), format=rep.get("format"), passed=rep.get("passed"),
               failure=rep.get("failure"), chosen=guard.get("chosen"), decision=guard.get("decision"),
               attempts=[{k: a.get(k) for k in ("label", "meets_floor", "shortfalls", "error", "latency_ratio",
                                                 "size_bytes")} for a in guard.get("attempts", [])])
    return row


def _reader(name: str):
    return feeds_reader(lambda: corpus.samples(name, "calib"))


def ort_dynamic(src: Path, dst: Path, u8: bool) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8 if u8 else QuantType.QInt8)
    return {}


def ort_static_defaults(name: str, src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import quantize_static

    quantize_static(str(src), str(dst), _reader(name))  # QDQ, s8 activations and weights, per-tensor
    return {}


def ort_static(name: str, src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name("pre.onnx")
    note = {}
    try:
        quant_pre_process(str(src), str(pre))
        model = pre
    except Exception as exc:  # noqa: BLE001 - its pre-process is optional: go on without it
        note["pre_process"] = f"failed ({type(exc).__name__}), skipped"
        model = src
    try:
        quantize_static(str(model), str(dst), _reader(name), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        for p in dst.parent.glob("pre.onnx*"):
            p.unlink()
    return note


def qtool_static(src: Path, dst: Path, calib: Path) -> dict:
    """Explicit static int8 with the guard off, per-tensor when the opset needs it (the user's
    retry after the "needs opset 13" error). For a model the default refuses, this is the
    candidate the guard refused: what the refusal cost or saved on the task."""
    args = ("--scheme", "int8-static", "--data", str(calib), "--no-guard")
    row = qtool_cli(src, dst, *args)
    if row["exit"] == 2 and any("opset 13" in ln for ln in row["report"]):
        row = {**qtool_cli(src, dst, *args, "--per-tensor"), "args": "--per-tensor"}
    return row


DEFAULT = "qtool default (--data)"
# qtool's explicit rows: flag sets a user can pick by hand. "qtool best explicit" is the best of
# them that exited 0 (bench/results/sweep_*.md names its flags).
EXPLICIT = ("qtool --scheme int8-static --no-guard (--data)", "qtool --scheme int8-weights", "qtool --dynamic")


def configs(name: str, calib: Path):
    return [
        (DEFAULT, lambda s, d: qtool_cli(s, d, "--data", str(calib))),
        (EXPLICIT[0], lambda s, d: qtool_static(s, d, calib)),
        (EXPLICIT[1], lambda s, d: qtool_cli(s, d, "--scheme", "int8-weights")),
        (EXPLICIT[2], lambda s, d: qtool_cli(s, d, "--dynamic")),
        ("ort quantize_dynamic (defaults)", lambda s, d: ort_dynamic(s, d, u8=False)),
        ("ort quantize_dynamic (u8 weights)", lambda s, d: ort_dynamic(s, d, u8=True)),
        ("ort quantize_static (defaults)", lambda s, d: ort_static_defaults(name, s, d)),
        ("ort pre_process + quantize_static (QDQ u8/s8 per-channel)", lambda s, d: ort_static(name, s, d)),
    ]


def _worst(outputs: dict) -> tuple[float | None, float | None]:
    sq = [o["sqnr_db"] for o in outputs.values() if "sqnr_db" in o]
    co = [o["cosine"] for o in outputs.values() if "cosine" in o]
    return (min(sq) if sq else None), (min(co) if co else None)


def sweep_model(name: str, rounds: int, reuse: dict | None = None) -> dict:
    """One model through every config; with ``reuse`` (an earlier run's result for it), only
    qtool's default runs again and the other rows are that run's, re-timed beside it."""
    src = corpus.fetch(name)
    e = corpus.entry(name)
    work = WORK / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    calib = corpus.write_dataset(name, "calib", work / "calib")
    evals, labels = corpus.samples(name, "eval"), corpus.labels(name, "eval")
    t0 = time.perf_counter()
    ref = corpus.run_model(src, evals)
    per_run = (time.perf_counter() - t0) / len(evals)
    base = corpus.score(name, ref, ref, labels)
    rows = [{"config": "fp32", "path": str(src), "size": _size(src), "metric": _headline(e, base, fp32=True),
             "proxy": {k: v for k, v in base.items() if k != "outputs"}}]
    todo = list(configs(name, calib))
    if reuse is not None:
        todo = todo[:1]
        kept = [r for r in reuse["rows"] if r["config"] not in ("fp32", DEFAULT)]
        for r in kept:
            r.setdefault("from_run", f"{reuse.get('tag', '?')} at {reuse['qtool_commit']}")  # where it was first run
            if r.get("path") and not Path(r["path"]).exists():
                r.pop("path")
    for i, (label, fn) in enumerate(todo):
        dst = work / f"c{i}" / "model.onnx"
        dst.parent.mkdir()
        t0 = time.perf_counter()
        row = {"config": label}
        try:
            row.update(fn(src, dst) or {})
        except Exception as exc:  # noqa: BLE001 - a failing tool is a result, not a crash of the sweep
            row["error"] = f"{type(exc).__name__}: {str(exc)[:240]}"
            traceback.print_exc()
        row["convert_s"] = round(time.perf_counter() - t0, 1)
        if "error" not in row and dst.exists():
            try:
                out = corpus.run_model(dst, evals)
                res = corpus.score(name, ref, out, labels)
                row.update(path=str(dst), size=_size(dst), metric=_headline(e, res),
                           proxy={k: v for k, v in res.items() if k != "outputs"}, outputs=res["outputs"])
                row["worst_sqnr_db"], row["worst_cosine"] = _worst(res["outputs"])
            except Exception as exc:  # noqa: BLE001 - an output that does not run is a result too
                row["error"] = f"does not run: {type(exc).__name__}: {str(exc)[:240]}"
        elif "error" not in row:
            row["error"] = "no output written"
        print(f"[sweep] {name} | {label}: "
              f"{json.dumps({k: v for k, v in row.items() if k not in ('outputs', 'path')}, default=str)}",
              file=sys.stderr, flush=True)
        rows.append(row)
    if reuse is not None:
        rows += kept
    timed = [r for r in rows if "path" in r]
    try:
        # Heavy models (a 640x640 detector takes seconds a run on a loaded 2-core machine) get
        # fewer rounds: about a minute of timing per model, never under 3 rounds.
        budget = max(3, int(60 / max(per_run * len(timed) * 2, 1e-3)))
        n = min(rounds, budget)
        lats = latency_interleaved([r["path"] for r in timed], evals[0], rounds=n, warmup=1 if n < rounds else 3)
        for r in timed:
            r["latency_rounds"] = n
        for r, lat in zip(timed, lats):
            r["latency_ms"], r["cpu_ms"] = lat["median_ms"], lat["cpu_ms"]
    except Exception as exc:  # noqa: BLE001
        print(f"[sweep] {name}: latency failed: {exc}", file=sys.stderr)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"model": name, "qtool_commit": commit, "metric": e.metric, "higher_is_better": e.higher_is_better, "family": e.family,
              "features": e.features, "rows": rows, "load_avg": round(os.getloadavg()[0], 2)}
    (work / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def _headline(e: corpus.Entry, res: dict, fp32: bool = False) -> float | None:
    if fp32 and f"fp32_{e.metric}" in res:
        return res[f"fp32_{e.metric}"]
    return res.get(e.metric)


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _better(e_hib: bool, a: float, b: float, tol: float) -> bool:
    """a is worse than b beyond tol."""
    return (b - a > tol) if e_hib else (a - b > tol)


def _why(row: dict) -> str:
    """The reason a qtool row did not succeed: the report's failure, else the CLI's error line."""
    if row.get("failure"):
        return row["failure"]
    line = next((ln for ln in row.get("report", []) if ln.startswith("error:")), "")
    return line[7:] or row.get("error", "")


def _refusal_class(failure: str) -> str:
    """The guard's reason reduced to its class: what the best candidate fell short on."""
    best = failure.split("best was ", 1)[-1]
    if "nothing was compressed" in best:
        return "nothing was compressed (no float weight qtool quantizes)"
    if "SQNR" in best or "agreement" in best:
        return "every candidate below the accuracy floor"
    return best.split(";")[0][:90]


def _ort_best(res: dict) -> dict | None:
    ort = [r for k, r in ((r["config"], r) for r in res["rows"]) if k.startswith("ort") and r.get("metric") is not None]
    return (max if res["higher_is_better"] else min)(ort, key=lambda r: r["metric"]) if ort else None


def _explicit_best(res: dict) -> dict | None:
    """The best qtool row other than the default that exited 0 (ties: the smaller model)."""
    rows = [r for r in res["rows"] if r["config"].startswith("qtool ") and r["config"] != DEFAULT
            and not r.get("exit") and r.get("metric") is not None]
    sign = 1 if res["higher_is_better"] else -1
    return max(rows, key=lambda r: (sign * r["metric"], -r.get("size", 0))) if rows else None


def _flags(row: dict) -> str:
    """A qtool row's flags as the user types them (CALIB for the data folder)."""
    flags = row["config"].removeprefix("qtool ").replace("(--data)", "--data CALIB").replace(
        " (the refused static candidate)", " --data CALIB")
    return f"{flags} {row['args']}" if row.get("args") else flags


def summary(results: list[dict]) -> list[str]:
    """The counts the lead asks for: exit 0 at fp32, exit 3 and exit 1/2 by reason, at onnxruntime's best."""
    meet, below, refused, failed, ge_ort, below_ort, no_ort = [], [], {}, {}, [], [], []
    explicit_ge = []
    for res in results:
        ex, ob = _explicit_best(res), _ort_best(res)
        if ex is not None and (ob is None or not _better(res["higher_is_better"], ex["metric"], ob["metric"],
                                                         NOISE.get(res["metric"], 0.01))):
            explicit_ge.append(res["model"])
        rows = {r["config"]: r for r in res["rows"]}
        d, fp = rows["qtool default (--data)"], rows["fp32"]
        tol, hib, name = NOISE.get(res["metric"], 0.01), res["higher_is_better"], res["model"]
        if d.get("exit") == 3:
            refused.setdefault(_refusal_class(_why(d)), []).append(name)
            continue
        if d.get("exit", 1) != 0 or "metric" not in d:
            failed.setdefault(f"exit {d.get('exit', '–')}: {_why(d).split(' (')[0][:110]}", []).append(name)
            continue
        (below if _better(hib, d["metric"], fp["metric"], tol) else meet).append(name)
        best = _ort_best(res)
        if best is None:
            no_ort.append(name)
        else:
            (below_ort if _better(hib, d["metric"], best["metric"], tol) else ge_ort).append(name)
    n = len(results)
    out = [f"- exit 0 and at fp32's metric within noise: **{len(meet)} of {n}** ({', '.join(f'`{m}`' for m in meet)})"
           + (f"; exit 0 but below fp32: {len(below)} ({', '.join(f'`{m}`' for m in below)})" if below else ""),
           f"- exit 0 and at least onnxruntime's best metric (within noise): **{len(ge_ort)} of {n}** "
           f"(exit 0 but below it: {', '.join(f'`{m}`' for m in below_ort) or 'none'})"
           + (f" (no onnxruntime setting produced a runnable model for {', '.join(f'`{m}`' for m in no_ort)})"
              if no_ort else ""),
           f"- refused by the guard (exit 3, nothing written): **{sum(map(len, refused.values()))} of {n}**"]
    out += [f"  - {why}: {', '.join(f'`{m}`' for m in ms)}" for why, ms in refused.items()]
    out.append(f"- failed before or during conversion (exit 1/2): **{sum(map(len, failed.values()))} of {n}**")
    out += [f"  - {why}: {', '.join(f'`{m}`' for m in ms)}" for why, ms in failed.items()]
    not_ge = [f"`{r['model']}`" for r in results if r["model"] not in explicit_ge]
    out.append(f"- qtool's best explicit flag set (exit 0) at least onnxruntime's best (within noise): "
               f"**{len(explicit_ge)} of {n}** (not: {', '.join(not_ge) or 'none'})")
    return out


def _ratio(row: dict, fp: dict, key: str) -> float | None:
    return row[key] / fp[key] if row.get(key) and fp.get(key) else None


def verdict(res: dict) -> str:
    rows = {r["config"]: r for r in res["rows"]}
    d = rows["qtool default (--data)"]
    fp = rows["fp32"]
    tol = NOISE.get(res["metric"], 0.01)
    if d.get("exit") == 3:  # the guard's refusal: a decision with a reason, not a crash
        return f"refused (exit 3): {_why(d)[:110]}"
    if d.get("exit", 1) != 0 or "metric" not in d:
        return f"default FAILS (exit {d.get('exit', '–')}: {_why(d)[:110]})"
    ort = [r for k, r in rows.items() if k.startswith("ort") and r.get("metric") is not None]
    best = None
    if ort:
        best = (max if res["higher_is_better"] else min)(ort, key=lambda r: r["metric"])
    notes = []
    if _better(res["higher_is_better"], d["metric"], fp["metric"], tol):
        notes.append(f"below fp32 ({_fmt(d['metric'])} vs {_fmt(fp['metric'])})")
    # onnxruntime's rounding can land above fp32 by chance on a few samples: the default is
    # only called worse than onnxruntime when it is also below fp32.
    if (best is not None and _better(res["higher_is_better"], d["metric"], best["metric"], tol)
            and _better(res["higher_is_better"], d["metric"], fp["metric"], tol)):
        notes.append(f"worse than ort best ({best['config'].split('(')[0].strip()}: {_fmt(best['metric'])})")
    ex = _explicit_best(res)
    if (ex is not None and _better(res["higher_is_better"], d["metric"], ex["metric"], tol)
            and _better(res["higher_is_better"], d["metric"], fp["metric"], tol)):
        notes.append(f"an explicit flag set does better ({_flags(ex)}: {_fmt(ex['metric'])})")
    if d.get("size", 0) >= fp.get("size", 1):
        notes.append("not smaller than fp32")
    wall, cpu = _ratio(d, fp, "latency_ms"), _ratio(d, fp, "cpu_ms")
    # Slower only when both clocks agree: 2-thread wall time swings with the machine's load (the
    # sweep shares 2 cores), 1-thread CPU time barely does.
    if wall is not None and wall > 1.05 and (cpu is None or cpu > 1.05):
        notes.append(f"slower than fp32 ({wall:.2f}x wall, {_fmt(cpu, 2)}x CPU)")
    return "; ".join(notes) if notes else "ok"


def render(results: list[dict], notes: list[str] = ()) -> str:
    """The results as markdown; notes (the hand-written findings, results/<stem>_notes.md) go first."""
    import onnxruntime

    notes = [*notes, ""] if notes else []

    commits = sorted({r.get("qtool_commit", "?") for r in results})
    lines = [
        "# Sweep: the corpus through qtool and onnxruntime",
        "",
        f"Written by `python bench/sweep.py` (qtool at commit {', '.join(commits)}; "
        f"{len(results)} models of bench/corpus.md; onnxruntime "
        f"{onnxruntime.__version__} CPU, 2 cores shared with other work). Calibration on the corpus "
        "`calib` split, every number measured on the separate `eval` split. qtool rows are the CLI "
        "as a user runs it (`python -m qtool convert MODEL --data CALIB -o OUT`, and the explicit flag sets "
        "named in each row); "
        "their exit code is recorded. Metric: the model's task metric or proxy (bench/corpus.md); "
        "worst SQNR / cosine: of the model's outputs, the lowest median over samples. Size and "
        "latency are relative to fp32 (latency: median of interleaved runs, 2 threads, wall time; CPU: "
        "median thread CPU time of a 1-thread session in the same rounds, which other processes barely "
        "disturb). Verdict: "
        "qtool's default against fp32 and the best onnxruntime row, beyond the noise of 16-32 "
        "samples (" + ", ".join(f"{k} {v}" for k, v in NOISE.items()) + ").",
        "",
        *notes,
        "## Summary",
        "",
        *summary(results),
        "",
        "| model | family | metric | fp32 | qtool default (size, latency vs fp32: 2-thread wall / 1-thread CPU; convert s) "
        "| guard's choice "
        "| qtool best explicit (flags) | best onnxruntime | verdict on the default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        rows = {r["config"]: r for r in res["rows"]}
        ort = [r for k, r in rows.items() if k.startswith("ort") and r.get("metric") is not None]
        best = (max if res["higher_is_better"] else min)(ort, key=lambda r: r["metric"]) if ort else None

        def cell(r):
            if r is None:
                return "–"
            if "metric" not in r:
                return f"error (exit {r.get('exit', '–')})"
            ex = f", exit {r['exit']}" if r.get("exit") else ""
            return f"{_fmt(r['metric'])} ({r['size'] / rows['fp32']['size']:.2f}x size{ex})"

        best_cell = (f"{cell(best)[:-1]}, {best['config'].replace('ort ', '')})" if best else "all failed")
        ex = _explicit_best(res)
        ex_cell = f"{cell(ex)[:-1]}, `{_flags(ex)}`)" if ex else "all failed"
        d = rows.get(DEFAULT)
        d_cell = cell(d)
        if d is not None and "metric" in d:
            fp = rows["fp32"]
            wall, cpu = _ratio(d, fp, "latency_ms"), _ratio(d, fp, "cpu_ms")
            lat = f", {wall:.2f}x wall / {_fmt(cpu, 2)}x CPU" if wall is not None else ""
            d_cell = f"{d_cell[:-1]}{lat}; {_fmt(d.get('convert_s'), 0)} s)"
        elif d is not None:
            d_cell = f"{d_cell[:-1]}; {_fmt(d.get('convert_s'), 0)} s)"
        lines.append(f"| `{res['model']}` | {res['family']} | {res['metric']} "
                     f"({'higher' if res['higher_is_better'] else 'lower'} is better) | {_fmt(rows['fp32']['metric'])} "
                     f"| {d_cell} "
                     f"| {rows.get(DEFAULT, {}).get('chosen') or '–'} "
                     f"| {ex_cell} "
                     f"| {best_cell} | {verdict(res)} |")
    n_ok = sum(1 for r in results if verdict(r) == "ok")
    lines += ["", f"Fully ok (at fp32's metric and onnxruntime's best within noise, smaller, not slower): "
              f"{n_ok} of {len(results)}.", ""]
    lines += ["## Every configuration", ""]
    for res in results:
        fp = res["rows"][0]
        lines += [f"### `{res['model']}` ({res['family']}; {res['features']}; qtool at {res.get('qtool_commit', '?')})", "",
                  f"| config | exit | {res['metric']} | proxy | worst SQNR dB | worst cosine | size vs fp32 "
                  "| latency vs fp32 | CPU vs fp32 | convert s | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            proxy = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in r.get("proxy", {}).items() if k != res["metric"])
            size = f"{r['size'] / fp['size']:.2f}x" if "size" in r else "–"
            lat = (f"{r['latency_ms'] / fp['latency_ms']:.2f}x" if r.get("latency_ms") and fp.get("latency_ms")
                   else "–")
            cpu = f"{r['cpu_ms'] / fp['cpu_ms']:.2f}x" if r.get("cpu_ms") and fp.get("cpu_ms") else "–"
            if r["config"] == "fp32":
                lat = f"{fp['latency_ms']:.2f} ms" if fp.get("latency_ms") else "–"
                cpu = f"{fp['cpu_ms']:.2f} ms" if fp.get("cpu_ms") else "–"
                size = f"{fp['size'] / 1e6:.1f} MB"
            note = r.get("error") or r.get("pre_process") or (f"with {r['args']}" if r.get("args") else "")
            if r.get("chosen") and not r.get("exit"):
                note = f"guard chose {r['chosen']} after {len(r.get('attempts', []))} attempt(s)"
            if r.get("exit") == 3 and r.get("failure"):
                note = (note + " " + r["failure"]).strip()
            elif r.get("exit"):
                report = [ln for ln in r.get("report", []) if "━" not in ln]
                note = (note + " " + " / ".join(report[-2:])).strip()
            if r.get("from_run"):
                note = f"(run {r['from_run']}) {note}".strip()
            note = note.replace("|", "/").replace("\n", " ")[:220]
            lines.append(f"| {r['config']} | {r.get('exit', '')} | {_fmt(r.get('metric'))} | {proxy} "
                         f"| {_fmt(r.get('worst_sqnr_db'), 1)} | {_fmt(r.get('worst_cosine'))} | {size} | {lat} | {cpu} "
                         f"| {_fmt(r.get('convert_s'), 1)} | {note} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=corpus.NAMES, metavar="NAME")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved latency rounds per model")
    ap.add_argument("--render", action="store_true", help="only re-render from the cached results")
    ap.add_argument("--tag", default="", help="keep this run apart: its own work folder and sweep_TAG.md")
    ap.add_argument("--default-only", metavar="TAG[,TAG...]", default="",
                    help="run only qtool's default; take the other rows from the last of these earlier runs "
                         "that has the model (re-timed beside it, each row saying which run it came from)")
    args = ap.parse_args(argv)
    global WORK
    if args.tag:
        WORK = corpus.CORPUS / f"sweep-{args.tag}"
    stem = f"sweep_{args.tag}" if args.tag else "sweep"
    names = args.only or corpus.NAMES
    # onnxruntime's calibrator leaves <uuid>.data files in the working directory: keep them
    # in the cache, not in the checkout.
    WORK.mkdir(parents=True, exist_ok=True)
    os.chdir(WORK)
    results = []
    for n in names:
        cached = WORK / n / "result.json"
        if args.render:
            if cached.exists():
                results.append(json.loads(cached.read_text()))
            continue
        t0 = time.perf_counter()
        reuse = None
        for tag in args.default_only.split(",") if args.default_only else ():
            earlier = corpus.CORPUS / f"sweep-{tag}" / n / "result.json"
            if earlier.exists():
                reuse = {**json.loads(earlier.read_text()), "tag": tag}
        if args.default_only and reuse is None:
            print(f"[sweep] {n}: no earlier run in {args.default_only}; running every config", file=sys.stderr)
        results.append(sweep_model(n, args.rounds, reuse))
        print(f"[sweep] {n} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    if not args.only or args.render:
        notes = RESULTS / f"{stem}_notes.md"
        (RESULTS / f"{stem}.md").write_text(render(results, notes.read_text().splitlines() if notes.exists() else []))
        (RESULTS / f"{stem}.json").write_text(json.dumps(
            [{**r, "rows": [{k: v for k, v in row.items() if k not in ("path", "outputs")} for row in r["rows"]]}
             for r in results], indent=1, default=str))
    else:
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
