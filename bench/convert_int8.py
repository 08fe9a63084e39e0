"""int8 conversion side by side with onnxruntime's quantizer, on the real models of bench/zoo.py.

    python bench/convert_int8.py                         # every prepared model
    python bench/convert_int8.py --only efficientnet_lite0 ppocr_rec
    python bench/convert_int8.py --report                # only rebuild the Markdown table

For each model, in one run: fp32; onnxruntime ``quantize_static`` (QDQ, its defaults: int8
activations and weights, per tensor; and the x86-friendly u8 activations / s8 per-channel
weights); onnxruntime ``quantize_dynamic`` (int8 weights, per tensor and per channel); qtool
static (its default recipe ``int8-static``) and, for transformer models, qtool dynamic.
Static variants calibrate on the model's ``calib`` split (same samples for both tools, min/max
for onnxruntime, qtool's recipe default for qtool) and are evaluated on the ``eval`` split.

Columns: file size, the model's metric and its change vs fp32, onnxruntime CPU latency
(median of many runs of one eval sample, 2 intra-op threads), and conversion time including
calibration. The machine is shared with other engineers while this runs: latencies are noisy,
ratios come from the same run. Each model's results are cached as JSON in
``bench/.cache/work/convert_int8/`` and the table is written to
``bench/results/convert_int8.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import zoo

RESULTS = HERE / "results" / "convert_int8.md"
WORK = zoo.CACHE / "work" / "convert_int8"
MODELS = ["resnet18_synth", "mnist_cnn", "efficientnet_lite0", "ppocr_rec", "minilm", "smollm2"]
TRANSFORMERS = {"minilm", "smollm2"}
# onnxruntime's MinMax calibrator keeps every intermediate tensor of every sample in memory;
# on SmolLM2 (thousands of tensors of 128 x 576+ floats) that does not fit: static onnxruntime
# runs on fewer samples there, and says so in the table.
ORT_STATIC_SAMPLES = {"smollm2": 4}
LATENCY_RUNS = {"smollm2": 12, "minilm": 30, "ppocr_rec": 30}
METRIC_DIRECTION = {"cer": -1, "perplexity": -1, "rel_l2": -1}


def _size(path: Path) -> int:
    from qtool.model import model_size_bytes

    return model_size_bytes(path)


def _metric(name: str, result: dict) -> tuple[str, float]:
    for key in ("top1", "cer", "pearson", "perplexity", "accuracy", "cosine"):
        if key in result:
            return key, float(result[key])
    key = next(k for k, v in result.items() if isinstance(v, float))
    return key, float(result[key])


class _Reader:
    """onnxruntime CalibrationDataReader over the zoo's calib split."""

    def __init__(self, name: str, limit: int | None) -> None:
        self.feeds = iter(list(zoo.iter_split(name, "calib"))[:limit])

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # pragma: no cover - newer onnxruntime asks for it
        pass


def ort_static(name: str, src: Path, dst: Path, *, u8: bool, per_channel: bool) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = _Reader(name, ORT_STATIC_SAMPLES.get(name))
    CalibrationDataReader.register(_Reader)
    quantize_static(
        str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8 if u8 else QuantType.QInt8,
        weight_type=QuantType.QInt8, per_channel=per_channel,
        use_external_data_format=_size(src) > 1.8e9,
    )


def ort_preprocessed_static(name: str, src: Path, dst: Path) -> None:
    """onnxruntime's recommended flow: its quant_pre_process (symbolic shape inference and
    its graph optimizer), then static QDQ with its x86-friendly settings."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre))
        ort_static(name, pre, dst, u8=True, per_channel=True)
    finally:
        pre.unlink(missing_ok=True)


def ort_dynamic(name: str, src: Path, dst: Path, *, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)


def qtool_convert(name: str, src: Path, dst: Path, *, dynamic: bool, smooth: bool = False,
                  exclude: tuple[str, ...] = ()) -> dict:
    from qtool.config import load_recipe
    from qtool.model import add_provenance, load, save
    from qtool.passes.preprocess import preprocess
    from qtool.pipeline import calibrate, convert_model

    model = load(src)
    if dynamic:
        recipe = load_recipe("int8-dynamic").override("quantize", exclude=exclude or None)
        absmax = None
        if smooth:  # what `qtool convert --dynamic --data calib/` does
            from qtool.data import Dataset, input_specs
            from qtool.passes.dynamic import collect_channel_absmax, smoothing_inputs

            preprocess(model)
            dataset = Dataset(zoo.data_dir(name, "calib"), input_specs(model), recipe.preprocess)
            absmax = collect_channel_absmax(model, dataset, smoothing_inputs(model, recipe))
        converted, reports, summary = convert_model(model, recipe, absmax=absmax,
                                                           preprocessed=smooth)
    else:
        recipe = load_recipe("int8-static")
        if (model.opset_imports.get("") or 0) < 13:  # what the CLI's hint tells a user to do
            recipe = recipe.override("quantize", allow_opset_upgrade=True)
        preprocess(model)
        table = calibrate(model, zoo.data_dir(name, "calib"), recipe)
        converted, reports, summary = convert_model(model, recipe, table=table, preprocessed=True)
    add_provenance(converted, recipe.to_dict(), source=str(src))
    save(converted, dst, input_path=src)
    return {"ops": summary.to_dict(), "passes": [{"name": r.name, "counts": r.counts} for r in reports]}


def _configs(name: str) -> list[tuple[str, callable]]:
    configs = [
        ("onnxruntime static QDQ (defaults: s8 act, per-tensor)",
         lambda s, d: ort_static(name, s, d, u8=False, per_channel=False)),
        ("onnxruntime static QDQ (u8 act, s8 per-channel)",
         lambda s, d: ort_static(name, s, d, u8=True, per_channel=True)),
        ("onnxruntime dynamic (per-tensor)", lambda s, d: ort_dynamic(name, s, d, per_channel=False)),
        ("onnxruntime dynamic (per-channel)", lambda s, d: ort_dynamic(name, s, d, per_channel=True)),
        ("qtool static (default int8-static)", lambda s, d: qtool_convert(name, s, d, dynamic=False)),
        # (models below opset 13 get --allow-opset-upgrade, as the error's hint says)
    ]
    if name in TRANSFORMERS:
        configs.append(("qtool dynamic (int8-dynamic, no data)",
                        lambda s, d: qtool_convert(name, s, d, dynamic=True)))
        configs.append(("qtool dynamic + smoothing (--data calib)",
                        lambda s, d: qtool_convert(name, s, d, dynamic=True, smooth=True)))
    if name not in TRANSFORMERS:  # appended last: earlier configs keep their output files
        configs.append(("onnxruntime quant_pre_process, then static QDQ (u8 act, s8 per-channel)",
                        lambda s, d: ort_preprocessed_static(name, s, d)))
    if name == "smollm2":
        configs.append(("qtool dynamic + smoothing, --exclude '*down_proj*'",
                        lambda s, d: qtool_convert(name, s, d, dynamic=True, smooth=True,
                                                   exclude=("*down_proj*",))))
    return configs


def run_model(name: str, skip: set[str]) -> dict:
    src = zoo.model_path(name)
    out_dir = WORK / name
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = LATENCY_RUNS.get(name, 50)
    rows = []

    def measure(label: str, path: Path, seconds: float | None, extra: dict | None = None) -> dict:
        t0 = time.perf_counter()
        metric = zoo.evaluate(name, path)
        eval_s = time.perf_counter() - t0
        row = {"config": label, "path": str(path), "size": _size(path), "metric": metric,
               "convert_s": seconds, "eval_s": round(eval_s, 1)}
        if extra:
            row.update(extra)
        print(f"[convert_int8] {name} | {label}: {json.dumps({k: v for k, v in row.items() if k != 'ops'})}",
              file=sys.stderr, flush=True)
        return row

    previous = {}
    if (WORK / f"{name}.json").exists():  # --skip keeps the earlier run's rows of those configs
        previous = {r["config"]: r for r in json.loads((WORK / f"{name}.json").read_text())["rows"]}
    rows.append(measure("fp32", src, None))
    for i, (label, fn) in enumerate(_configs(name)):
        if any(s in label for s in skip):
            if label in previous:
                rows.append({**previous[label], "from_earlier_run": True, "path": str(out_dir / f"c{i}.onnx")})
            continue
        dst = out_dir / f"c{i}.onnx"
        for stale in (dst, dst.with_name(dst.name + ".data")):
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            extra = fn(src, dst) or {}
        except Exception as exc:  # noqa: BLE001 - a failing tool is a result, not a crash of the bench
            rows.append({"config": label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            traceback.print_exc()
            continue
        seconds = round(time.perf_counter() - t0, 1)
        try:
            rows.append(measure(label, dst, seconds, extra))
        except Exception as exc:  # noqa: BLE001 - an output that does not run is a result too
            rows.append({"config": label, "convert_s": seconds,
                         "error": f"does not run: {type(exc).__name__}: {str(exc)[:200]}"})
    result = {"model": name, "rows": rows, "latency_runs": runs,
              "ort_static_samples": ORT_STATIC_SAMPLES.get(name)}
    measure_latency(name, result)
    return result


def measure_latency(name: str, result: dict) -> None:
    """Latency of every row's model, in turns (zoo.latency_interleaved), into ``result``."""
    feed = next(zoo.iter_split(name, "eval"))
    for r in result["rows"]:
        if r["config"] == "fp32":
            r["path"] = str(zoo.model_path(name))
    rows = [r for r in result["rows"] if "error" not in r and Path(r.get("path", "")).exists()]
    lats = zoo.latency_interleaved([r["path"] for r in rows], feed, rounds=LATENCY_RUNS.get(name, 50))
    for r, lat in zip(rows, lats):
        r.update(latency_ms=lat["median_ms"], latency_min_ms=lat["min_ms"], cpu_ms=lat["cpu_ms"])
        r.pop("from_earlier_run_latency", None)
    result["latency_load"] = round(os.getloadavg()[0], 2)
    (WORK / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


def _fmt_metric(key: str, value: float) -> str:
    return f"{key} {value:.4f}" if abs(value) < 100 else f"{key} {value:,.1f}"


def write_report() -> str:
    lines = [
        "# int8 conversion: qtool vs onnxruntime's quantizer",
        "",
        "Written by `python bench/convert_int8.py`. onnxruntime "
        + _ort_version() + ", CPU provider, 2 intra-op threads; latency = median over many rounds "
        "of one eval sample, all configs of a model measured in turns; CPU ms = median thread CPU time "
        "of a 1-thread session (steady under machine load); convert time includes calibration. Calibration on the `calib` split, "
        "metric on the `eval` split (bench/zoo.py). Shared machine: latencies are noisy, compare "
        "ratios within one model.",
        "",
    ]
    for name in MODELS:
        path = WORK / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = data["rows"]
        fp32 = next(r for r in rows if r["config"] == "fp32")
        key, base = _metric(name, fp32["metric"])
        lines += [f"## {name}", "",
                  "| config | size MB | " + key + " | change vs fp32 | latency ms (2 threads) | speed-up | "
                  "CPU ms (1 thread) | speed-up (CPU) | convert s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['config']} | | failed: {r['error'][:120]} | | | | | | {r.get('convert_s') or ''} |")
                continue
            _, value = _metric(name, r["metric"])
            change = value - base
            speed = fp32["latency_ms"] / r["latency_ms"] if r.get("latency_ms") else float("nan")
            cpu = r.get("cpu_ms")
            cpu_speed = fp32["cpu_ms"] / cpu if cpu and fp32.get("cpu_ms") else float("nan")
            label = r["config"] + (" *(converted in an earlier run)*" if r.get("from_earlier_run") else "")
            lines.append(
                f"| {label} | {r['size'] / 1e6:.1f} | {_fmt_metric(key, value)} | {change:+.4f} | "
                f"{r.get('latency_ms', float('nan')):.2f} | {speed:.2f}x | "
                f"{cpu if cpu is not None else float('nan'):.2f} | {cpu_speed:.2f}x | "
                f"{r['convert_s'] if r['convert_s'] is not None else ''} |"
            )
        if data.get("ort_static_samples"):
            lines.append(f"\nonnxruntime static calibrated on {data['ort_static_samples']} samples "
                         "(its calibrator holds every activation of every sample in memory).")
        if any(r.get("from_earlier_run") for r in rows):
            lines.append("\nRows marked *(converted in an earlier run)* reuse that run's model and metric; "
                         "their latency was measured with the others, in turns.")
        if data.get("latency_load") is not None:
            lines.append(f"\nLatency measured in turns (every model once per round, {data.get('latency_runs')} "
                         f"rounds); 1-minute load average {data['latency_load']} at the end.")
        lines.append("")
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return text


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="model names (default: all prepared)")
    parser.add_argument("--skip", nargs="*", default=[], help="skip configs whose label contains this")
    parser.add_argument("--report", action="store_true", help="only rebuild the Markdown table")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-measure latency of the models converted by an earlier run (e.g. on a quiet machine)")
    args = parser.parse_args()
    if args.latency_only:
        for name in args.only or MODELS:
            path = WORK / f"{name}.json"
            if path.exists():
                measure_latency(name, json.loads(path.read_text()))
    elif not args.report:
        WORK.mkdir(parents=True, exist_ok=True)
        for name in args.only or MODELS:
            if not zoo.model_path(name).exists():
                print(f"[convert_int8] {name} not prepared; run: python bench/zoo.py prepare --only {name}",
                      file=sys.stderr)
                continue
            run_model(name, set(args.skip))
    print(write_report())


if __name__ == "__main__":
    main()
