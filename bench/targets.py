#!/usr/bin/env python3
"""Deployment targets side by side (issue 15): float and int8 on onnxruntime and OpenVINO.

For each model (CNNs, a detector, an OCR recognizer, a transformer), in one run:

* float on onnxruntime's CPU provider;
* float on OpenVINO, with the f32 precision hint and with its default precision (bf16 on AMX);
* qtool ``convert --target cpu`` on onnxruntime;
* qtool ``convert --target openvino`` on OpenVINO (f32 hint and default precision);
* NNCF's int8 (``nncf.quantize``, its recommended preset per model type: the transformer
  model type for minilm, the default performance preset otherwise) on OpenVINO, the anchor.

All quantizers calibrate on the same calibration split; metrics are taken on the eval split.
qtool converts once (--no-guard), as nncf.quantize does: the metrics compare placements.
Latency: batch 1, 2 threads, each measurement a fresh process per model (two compiled models
in one process distort each other), rounds alternate the order, medians of --rounds rounds.
Writes bench/results/targets.md. Runs in the shared venv (openvino, nncf).

    QTOOL_BENCH_CACHE=/work/bench_cache python bench/targets.py [--only NAME ...] [--rounds 3]

OpenVINO is driven through its Python API directly (``openvino.Core``) on purpose: this
bench measures the runtime, not qtool's runtime layer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from zoo_data import CACHE, DATA, MODELS, THREADS  # noqa: E402

ROOT = HERE.parent
WORK = CACHE / "targets"
RESULTS = HERE / "results" / "targets.md"
CORPUS_DIR = Path(os.environ.get("QTOOL_CORPUS_DIR", "/work/wt/corpus/bench/.cache/corpus"))
# Each timing process runs at least RUNS inferences and at least SECONDS of them: on a loaded
# machine 25 runs of a 5 ms model are one scheduling accident away from a wrong median.
RUNS, WARMUP, SECONDS = 25, 3, 3.0

# name -> (kind, source): "zoo" models come from bench/zoo.py, "corpus" ones from bench/corpus.py.
MODELS_USED = {
    "efficientnet_lite0": ("CNN", "zoo"),
    "resnet18_synth": ("CNN", "zoo"),
    "mnist_cnn": ("CNN", "zoo"),
    "ddddocr_det": ("detector", "corpus"),
    "ppocr_rec": ("OCR", "zoo"),
    "minilm": ("transformer", "zoo"),
}
# (label, runtime, precision hint, which file)
CONFIGS = [
    ("float ORT", "ort", None, "float"),
    ("float OV f32", "ov", "f32", "float"),
    ("float OV default", "ov", "default", "float"),
    ("qtool cpu ORT", "ort", None, "qtool_cpu"),
    ("qtool openvino OV f32", "ov", "f32", "qtool_openvino"),
    ("qtool openvino OV default", "ov", "default", "qtool_openvino"),
    ("NNCF OV f32", "ov", "f32", "nncf"),
    ("NNCF OV default", "ov", "default", "nncf"),
]
# --a16w8 NAME: qtool --target openvino --activation-bits 16 (A16W8: 16-bit activations,
# int8 weights) on each runtime, for its speed beside the int8 rows.
A16_KEY = "qtool_openvino_a16"
A16_CONFIGS = [
    ("qtool openvino A16W8 ORT", "ort", None, A16_KEY),
    ("qtool openvino A16W8 OV f32", "ov", "f32", A16_KEY),
    ("qtool openvino A16W8 OV default", "ov", "default", A16_KEY),
]


def configs_for(p: dict) -> list[tuple]:
    """The configurations of one prepared model: CONFIGS, plus A16W8's when it was made."""
    return CONFIGS + (A16_CONFIGS if A16_KEY in p["files"] else [])


def log(msg: str) -> None:
    print(f"[targets] {msg}", file=sys.stderr, flush=True)


# ---- sessions ------------------------------------------------------------------------


class OVSession:
    """An OpenVINO compiled model behind onnxruntime's session calls (run, get_outputs)."""

    def __init__(self, path: Path, hint: str, threads: int = THREADS):
        import openvino as ov

        cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if hint != "default":
            cfg["INFERENCE_PRECISION_HINT"] = hint
        self.compiled = ov.Core().compile_model(str(path), "CPU", cfg)
        self.request = self.compiled.create_infer_request()

    def get_outputs(self):
        return [SimpleNamespace(name=o.any_name) for o in self.compiled.outputs]

    def get_inputs(self):
        return [SimpleNamespace(name=i.any_name) for i in self.compiled.inputs]

    def run(self, _names, feed: dict) -> list[np.ndarray]:
        # Copies of the request's own output tensors. Building and dropping the OVDict that
        # infer() returns cost qtool's PP-OCR model 0.3-0.7 ms more per inference than
        # NNCF's: OpenVINO reallocated its output each time (13 distinct output buffers
        # against 3 over 400 runs; see bench/results/targets.md).
        self.request.infer(feed)
        return [self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]


def open_session(runtime: str, hint: str | None, path: Path, threads: int = THREADS):
    if runtime == "ov":
        return OVSession(path, hint, threads)
    from zoo_metrics import session

    return session(path, threads)


# ---- data and models -----------------------------------------------------------------


def corpus_module():
    import corpus

    corpus.CORPUS = CORPUS_DIR  # the shared corpus cache (read-only here)
    return corpus


def float_model(name: str) -> Path:
    if MODELS_USED[name][1] == "corpus":
        return CORPUS_DIR / "models" / name / "model.onnx"
    return MODELS / f"{name}.onnx"


def calib_dir(name: str) -> Path:
    if MODELS_USED[name][1] == "zoo":
        return DATA / name / "calib"
    folder = WORK / name / "calib"
    if not folder.exists():
        corpus_module().write_dataset(name, "calib", folder)
    return folder


def read_feeds(folder: Path, input_names: list[str]) -> list[dict[str, np.ndarray]]:
    feeds = []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".npz":
            with np.load(f) as z:
                feeds.append({k: z[k] for k in z.files})
        elif f.suffix == ".npy":
            feeds.append({input_names[0]: np.load(f)})
    return feeds


def eval_feeds(name: str) -> list[dict[str, np.ndarray]]:
    if MODELS_USED[name][1] == "corpus":
        return corpus_module().samples(name, "eval")
    from zoo_data import load_split

    return load_split(name, "eval")


def graph_inputs(path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


# Bias correction: what `convert --data` runs by default (--scheme auto) and what
# nncf.quantize runs by default (fast bias correction), so neither side gets a recovery
# pass the other lacks. --no-guard keeps the one-shot conversion nncf.quantize also is.
QTOOL_RECOVERY = ("--recover", "bias")


def qtool_convert(name: str, target: str, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """qtool convert --target TARGET, one shot on the calibration split (--no-guard) with
    bias correction, as nncf.quantize is run: the metric columns then compare placements."""
    cmd = [sys.executable, "-m", "qtool", "--quiet", "convert", str(float_model(name)), "-o", str(out),
           "--data", str(calib_dir(name)), "--target", target, "--no-guard", *QTOOL_RECOVERY, *extra, "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"qtool --target {target} failed on {name}: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    return {"seconds": seconds, "fidelity": report.get("fidelity"), "flags": " ".join((*QTOOL_RECOVERY, *extra))}


def nncf_quantize(name: str, out: Path) -> dict:
    """nncf.quantize on the ONNX model with the calibration split; transformer model type
    for the transformer (NNCF's recommended setting), its defaults otherwise."""
    import nncf
    import onnx

    src = float_model(name)
    feeds = read_feeds(calib_dir(name), graph_inputs(src))
    kwargs = {"subset_size": len(feeds)}
    if MODELS_USED[name][0] == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    t0 = time.perf_counter()
    quantized = nncf.quantize(onnx.load(str(src)), nncf.Dataset(feeds), **kwargs)
    onnx.save(quantized, str(out))
    return {"seconds": time.perf_counter() - t0, "model_type": str(kwargs.get("model_type", "default"))}


def prepare(name: str, fresh: bool, remake: tuple[str, ...] = (), a16: bool = False) -> dict:
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    files = {"float": float_model(name)}
    notes: dict = {}
    notes_path = folder / "notes.json"
    if notes_path.exists() and not fresh:
        notes = json.loads(notes_path.read_text())
    makers = [("qtool_cpu", lambda p: qtool_convert(name, "cpu", p)),
              ("qtool_openvino", lambda p: qtool_convert(name, "openvino", p)),
              ("nncf", lambda p: nncf_quantize(name, p))]
    if a16:
        makers.append((A16_KEY, lambda p: qtool_convert(name, "openvino", p, ("--activation-bits", "16"))))
    for key, make in makers:
        path = folder / f"{key}.onnx"
        if fresh or key in remake or not path.exists() or key not in notes:
            log(f"{name}: making {key}")
            notes[key] = make(path)
            notes_path.write_text(json.dumps(notes, indent=1))
        files[key] = path
    feed = eval_feeds(name)[0]
    np.savez(folder / "feed.npz", **feed)
    return {"files": files, "notes": notes, "feed": folder / "feed.npz"}


# ---- metrics -------------------------------------------------------------------------


def metric(name: str, runtime: str, hint: str | None, path: Path) -> dict:
    """The model's task metric on the eval split, computed on the runtime it is deployed on."""
    sess = open_session(runtime, hint, path)
    if MODELS_USED[name][1] == "zoo":
        from zoo_specs import spec_of

        spec = spec_of(name)
        res = spec.evaluate(name, sess, "eval")
        return {"value": res[spec.metric], "key": spec.metric, "detail": res}
    corpus = corpus_module()
    feeds = eval_feeds(name)
    ref_sess = open_session("ort", None, float_model(name))
    ref = [ref_sess.run(None, f) for f in feeds]
    out = [sess.run(None, f) for f in feeds]
    res = corpus.score(name, ref, out, corpus.labels(name, "eval"))
    key = corpus.entry(name).metric
    return {"value": res[key], "key": key, "detail": res}


# ---- timing --------------------------------------------------------------------------


def time_one(runtime: str, hint: str, path: str, feed_path: str, threads: str = str(THREADS)) -> None:
    """Child process: median and min wall time of RUNS inferences, printed as JSON."""
    with np.load(feed_path) as z:
        feed = {k: z[k] for k in z.files}
    sess = open_session(runtime, None if hint == "-" else hint, Path(path), int(threads))
    for _ in range(WARMUP):
        sess.run(None, feed)
    times, cpu = [], []
    end = time.perf_counter() + SECONDS
    while len(times) < RUNS or time.perf_counter() < end:
        t0, c0 = time.perf_counter(), time.process_time()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    # CPU time of the process (all its threads) per inference: unlike wall time it does not
    # count the time the other engineers' jobs hold the cores, so it ranks configurations
    # on a loaded machine (it does count a thread pool's spinning).
    print(json.dumps({"median_ms": float(np.median(times)), "min_ms": float(min(times)),
                      "p10_ms": float(np.percentile(times, 10)), "cpu_ms": float(np.median(cpu))}))


def timed_rounds(prepared: dict, rounds: int) -> dict[str, list[dict]]:
    """Every (model, config) once per round in a fresh process; the order rotates per round."""
    jobs = [(name, cfg) for name in prepared for cfg in configs_for(prepared[name])]
    out: dict[str, list[dict]] = {}
    for r in range(rounds):
        shift = (r * len(jobs)) // max(rounds, 1)
        order = jobs[shift:] + jobs[:shift]
        if r % 2:
            order = order[::-1]
        for name, (label, runtime, hint, key) in order:
            p = prepared[name]
            cmd = [sys.executable, str(Path(__file__)), "_time", runtime, hint or "-",
                   str(p["files"][key]), str(p["feed"])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                log(f"{name} {label}: timing failed: {done.stderr[-500:]}")
                continue
            out.setdefault(f"{name}|{label}", []).append(json.loads(done.stdout.strip().splitlines()[-1]))
        log(f"round {r + 1}/{rounds} done")
    return out


# ---- int16 saturation of u8 x s8 without VNNI (emulated) ---------------------------------

INT16_MAX = 32767
SAT_POSITIONS = 64  # output positions sampled per Conv and sample
SAT_CHANNELS = 64  # output channels sampled per Conv (bounds memory: positions x channels x K)


def _conv_units(model) -> list[tuple[str, tuple, np.ndarray, dict]]:
    """(u8 activation tensor, weight shape, int8 weight [Cout, K], attributes) for each
    group-1 Conv that reads DQ(Q(x) as uint8) and DQ(int8 weight) in a QDQ model."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    units = []
    for n in model.graph.node:
        attrs = {a.name: list(a.ints) or a.i for a in n.attribute}
        if n.op_type != "Conv" or attrs.get("group", 1) != 1 or len(n.input) < 2:
            continue
        dx, dw = prod.get(n.input[0]), prod.get(n.input[1])
        if dx is None or dw is None or dx.op_type != "DequantizeLinear" or dw.op_type != "DequantizeLinear":
            continue
        w = inits.get(dw.input[0])
        if w is None or w.dtype != np.int8 or inits.get(dx.input[2], np.int8(0)).dtype != np.uint8:
            continue
        if w.ndim != 4:
            continue
        units.append((dx.input[0], w.shape, w.reshape(w.shape[0], -1).astype(np.int32), attrs))
    return units


def _patches(xq: np.ndarray, zp: int, w_shape, attrs: dict, rng) -> np.ndarray:
    """[positions, K] u8 im2col rows (padding with the zero point) at sampled positions."""
    kh, kw = w_shape[-2:]
    pads = attrs.get("pads") or [0, 0, 0, 0]
    sh, sw = (attrs.get("strides") or [1, 1])[:2]
    x = np.pad(xq[0], ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=zp)
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
    c, oh, ow = win.shape[:3]
    pick = rng.choice(oh * ow, size=min(SAT_POSITIONS, oh * ow), replace=False)
    flat = win.reshape(c, oh * ow, kh * kw)[:, pick]  # [C, P, kh*kw]
    return np.moveaxis(flat, 1, 0).reshape(len(pick), -1).astype(np.int32)  # K order: (c, kh, kw)


def saturation(path: Path, feeds: list[dict]) -> dict:
    """Share of VPMADDUBSW pair sums x[k]w[k] + x[k+1]w[k+1] outside int16, and the SQNR of
    the Conv accumulators when they saturate, over group-1 Convs of a u8 x s8 QDQ model."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    units = _conv_units(model)
    for name in {u[0] for u in units}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    pairs = saturated = 0
    err = ref = 0.0
    zps = {n.input[0]: n.input[2] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for feed in feeds:
        got = dict(zip(names, sess.run(None, feed)))
        for xname, shape, w_all, attrs in units:
            zp = int(inits[zps[xname]]) if xname in zps else 0
            x = _patches(got[xname], zp, shape, attrs, rng)  # [P, K]
            w = w_all[rng.choice(len(w_all), size=min(SAT_CHANNELS, len(w_all)), replace=False)]
            k2 = w.shape[1] // 2 * 2
            prod = x[:, None, :k2] * w[None, :, :k2]  # [P, Cout, K]
            pair = prod[..., 0::2] + prod[..., 1::2]
            clipped = np.clip(pair, -INT16_MAX - 1, INT16_MAX)
            pairs += pair.size
            saturated += int((clipped != pair).sum())
            exact = pair.sum(-1, dtype=np.int64)
            err += float(((clipped.sum(-1, dtype=np.int64) - exact) ** 2).sum())
            ref += float((exact.astype(np.float64) ** 2).sum())
    return {"convs": len(units), "pairs": pairs, "saturated": saturated,
            "sqnr_db": float("inf") if err == 0 else 10 * np.log10(ref / err)}


def saturation_section(names: list[str]) -> str:
    """Emulated non-VNNI u8 x s8 on the CNNs: --target cpu-vnni weights (8-bit) against
    cpu-avx2 (7-bit), plus each one's metric on onnxruntime (exact here: VNNI)."""
    lines = ["## Without VNNI: int16 saturation of u8 x s8 (emulated), cpu-vnni vs cpu-avx2", "",
             "This machine has VNNI, so onnxruntime's AVX2 path (VPMADDUBSW: two u8*s8 products summed "
             "into a saturating int16) cannot run here; it is emulated in numpy on the real u8 "
             "activations of 4 eval samples at "
             f"{SAT_POSITIONS} sampled output positions x {SAT_CHANNELS} sampled output channels per group-1 Conv. The metric column is the "
             "converted model on onnxruntime here (exact int32 accumulation): the accuracy cost of 7-bit "
             "weights alone.", "",
             "| model | target | pair sums outside int16 | accumulator SQNR with saturation | metric (ORT, exact) |",
             "|---|---|---:|---:|---:|"]
    for name in names:
        folder = WORK / name
        folder.mkdir(parents=True, exist_ok=True)
        feeds = eval_feeds(name)[:4]
        for target in ("cpu-vnni", "cpu-avx2"):
            path = folder / f"qtool_{target.replace('-', '_')}.onnx"
            if target == cpu_target_here() and (folder / "qtool_cpu.onnx").exists():
                path = folder / "qtool_cpu.onnx"  # --target cpu on this machine is this one
            if not path.exists():
                qtool_convert(name, target, path)
            sat = saturation(path, feeds)
            m = metric(name, "ort", None, path)
            share = sat["saturated"] / max(sat["pairs"], 1)
            lines.append(f"| {name} | {target} | {share:.2e} ({sat['saturated']} of {sat['pairs']}) | "
                         f"{sat['sqnr_db']:.1f} dB | {m['key']} {m['value']:.4f} |")
    return "\n".join(lines) + "\n"


def cpu_target_here() -> str:
    sys.path.insert(0, str(ROOT))
    from qtool.targets import cpu_target

    return cpu_target()


# ---- report --------------------------------------------------------------------------


def render(prepared: dict, metrics: dict, times: dict, rounds: int, load: str) -> str:
    lines = [
        "# Deployment targets: float and int8 on onnxruntime and OpenVINO",
        "",
        "`python bench/targets.py` (issue 15). Batch 1, 2 threads; latency = median over "
        f"{rounds} rounds of the per-process median of at least {RUNS} runs and {SECONDS:.0f} s (each round a fresh process "
        "per model and configuration, order rotated and reversed between rounds); min = the "
        "fastest single run seen; cpu = median process CPU time per inference (all threads), "
        "which the other engineers' jobs do not inflate the way they inflate wall time. The "
        f"machine is shared (load average at start: {load}, at the end: {_load()}); ratios "
        "between rows of one model are the reliable part, CPU-time ratios most of all.",
        "qtool converts once with --no-guard and --recover bias (the bias correction `convert "
        "--data` runs by default), NNCF runs nncf.quantize once (its default includes fast bias "
        "correction), both on the same calibration split; metrics on the eval split, on the "
        "runtime named in the row.",
        "",
        "## Issue 15's targets: qtool --target openvino against OpenVINO's float and NNCF",
        "",
        "Each side at its faster precision hint (f32 or default, by median wall time); "
        "ratios > 1 mean qtool is faster. wall / cpu / p10 (the medians over rounds of each "
        "process's median wall time, CPU time per inference, and 10th-percentile wall time: "
        "the p10 is the least disturbed by the other engineers' jobs).",
        "",
        "| model | qtool OV ms (hint) | vs OV f32 float | vs OV default float | vs NNCF int8 | metric qtool / NNCF |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [_verdict(name, times, metrics) for name in prepared]
    lines.append("")
    for name, p in prepared.items():
        lines += _model_table(name, p, metrics, times)
    return "\n".join(lines) + "\n"


def _load() -> str:
    return open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "?"


def _stats(name: str, label: str, times: dict) -> dict:
    """Medians over rounds of one configuration: wall (per-process median), p10, cpu."""
    t = times.get(f"{name}|{label}")
    return {"wall": _median(t), "p10": _median(t, "p10_ms"), "cpu": _median(t, "cpu_ms")}


def _best(name: str, times: dict, labels: tuple[str, ...]) -> tuple[str, dict | None]:
    """The label among ``labels`` with the lowest median wall time, and its medians."""
    got = [(label, _stats(name, label, times)) for label in labels]
    got = [g for g in got if g[1]["wall"] is not None]
    return min(got, key=lambda g: g[1]["wall"]) if got else ("-", None)


def _verdict(name: str, times: dict, metrics: dict) -> str:
    label, q = _best(name, times, ("qtool openvino OV f32", "qtool openvino OV default"))
    nncf_label, n = _best(name, times, ("NNCF OV f32", "NNCF OV default"))
    f32, dflt = _stats(name, "float OV f32", times), _stats(name, "float OV default", times)

    def ratio(other: dict | None) -> str:
        if q is None or other is None or not other["wall"]:
            return "-"
        return " / ".join(f"{other[k] / q[k]:.2f}x" if other.get(k) and q.get(k) else "-"
                          for k in ("wall", "cpu", "p10"))

    mq, mn = metrics.get(f"{name}|{label}", {}), metrics.get(f"{name}|{nncf_label}", {})
    hint = label.rsplit(" ", 1)[-1]
    return (f"| {name} | {_fmt(q and q['wall'])} ({hint}) | {ratio(f32)} | {ratio(dflt)} | {ratio(n)} | "
            f"{mq.get('key', '')} {_fmt(mq.get('value'), 4)} / {_fmt(mn.get('value'), 4)} |")


def _model_table(name: str, p: dict, metrics: dict, times: dict) -> list[str]:
    kind = MODELS_USED[name][0]
    f32 = _median(times.get(f"{name}|float OV f32"))
    f32_cpu = _median(times.get(f"{name}|float OV f32"), "cpu_ms")
    lines = [f"## {name} ({kind})", "",
             "| configuration | latency ms (median) | p10 ms | min ms | cpu ms | vs OV f32 (wall / cpu) | metric | size MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, _runtime, _hint, key in configs_for(p):
        t = times.get(f"{name}|{label}")
        med, cpu, p10 = _median(t), _median(t, "cpu_ms"), _median(t, "p10_ms")
        mins = min((x["min_ms"] for x in t), default=None) if t else None
        m = metrics.get(f"{name}|{label}", {})
        size = Path(p["files"][key]).stat().st_size / 1e6
        speed = f"{f32 / med:.2f}x" if med and f32 else "-"
        speed += f" / {f32_cpu / cpu:.2f}x" if cpu and f32_cpu else ""
        lines.append(f"| {label} | {_fmt(med)} | {_fmt(p10)} | {_fmt(mins)} | {_fmt(cpu)} | {speed} | "
                     f"{m.get('key', '')} {_fmt(m.get('value'), 4)} | {size:.2f} |")
    notes = p["notes"]
    lines += ["", "conversion time: " + "; ".join(
        f"qtool --target {k.split('_')[1]}{' --activation-bits 16' if k == A16_KEY else ''} "
        f"{v.get('seconds', 0):.0f} s" for k, v in notes.items() if k.startswith("qtool")) + "; "
        f"NNCF (model type {notes.get('nncf', {}).get('model_type')}) "
        f"{notes.get('nncf', {}).get('seconds', 0):.0f} s.", ""]
    return lines


def _median(t: list[dict] | None, key: str = "median_ms") -> float | None:
    vals = [x[key] for x in t or () if key in x]
    return float(np.median(vals)) if vals else None


def _fmt(v, digits: int = 2) -> str:  # noqa: ANN001 - float or None
    return "-" if v is None else f"{v:.{digits}f}"


# ---- which layers OpenVINO ran in f32 (its compiled model's runtime info) -----------------

QUIET_LAYERS = ("Const", "Input", "Output", "Reshape", "ShapeOf")  # no work, or no data


def f32_layers(path: Path, hint: str) -> list[str]:
    """The layers of OpenVINO's compiled model (``get_runtime_model()``) that compute in f32
    (runtimePrecision) although the model is int8, as "type: original layer names"."""
    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": THREADS}
    if hint != "default":
        cfg["INFERENCE_PRECISION_HINT"] = hint
    runtime = ov.Core().compile_model(str(path), "CPU", cfg).get_runtime_model()
    out = []
    for op in runtime.get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        if precision == "f32" and kind not in QUIET_LAYERS:
            names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
            out.append(f"{kind}: {names or op.get_friendly_name()}")
    return out


def compiled_layers(path: Path, hint: str) -> dict[tuple[str, str, str], int]:
    """(layer type, kernel, runtime precision) -> count over OpenVINO's compiled model
    (runtime info), constants left out: two models with equal counts run the same kernels."""
    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": THREADS}
    if hint != "default":
        cfg["INFERENCE_PRECISION_HINT"] = hint
    runtime = ov.Core().compile_model(str(path), "CPU", cfg).get_runtime_model()
    out: dict[tuple[str, str, str], int] = {}
    for op in runtime.get_ordered_ops():
        info = op.get_rt_info()
        key = tuple(info[k].astype(str) if k in info else "?"
                    for k in ("layerType", "primitiveType", "runtimePrecision"))
        if key[0] != "Const":
            out[key] = out.get(key, 0) + 1
    return out


def graph_difference(a: dict, b: dict) -> str:
    """How two compiled_layers counts differ, as "identical (N layers)" or the surplus of each."""
    if a == b:
        return f"identical ({sum(a.values())} layers)"

    def surplus(x: dict, y: dict) -> str:
        got = [f"{k[0]} {k[1]} x{x.get(k, 0) - y.get(k, 0)}" for k in sorted(x) if x.get(k, 0) > y.get(k, 0)]
        return ", ".join(got) or "nothing"

    return f"{sum(a.values())} vs {sum(b.values())} layers; qtool only: {surplus(a, b)}; NNCF only: {surplus(b, a)}"


def layers_section(names: list[str]) -> str:
    """Per model, the f32 layers of qtool --target openvino and of NNCF's int8 (f32 hint),
    and how the two compiled graphs differ (layer type, kernel, precision)."""
    lines = ["## Layers OpenVINO ran in f32 in the int8 models (f32 hint)", "",
             "From the compiled model's runtime info (`get_runtime_model()`, runtimePrecision), "
             f"leaving out {', '.join(QUIET_LAYERS)}. A FakeQuantize in this list is a Q/DQ pair "
             "OpenVINO did not fuse into the op before it. The last column compares every "
             "compiled layer's (type, kernel, runtime precision) between the two models.", "",
             "| model | qtool --target openvino | NNCF | compiled graphs, qtool vs NNCF |", "|---|---|---|---|"]
    for name in names:
        cells, paths = [], [WORK / name / f"{key}.onnx" for key in ("qtool_openvino", "nncf")]
        for path in paths:
            got = f32_layers(path, "f32") if path.exists() else ["(not converted)"]
            kinds: dict[str, int] = {}
            for layer in got:
                kinds[layer.split(":")[0]] = kinds.get(layer.split(":")[0], 0) + 1
            cells.append(", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none")
        diff = graph_difference(*(compiled_layers(p, "f32") for p in paths)) if all(p.exists() for p in paths) else "-"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {diff} |")
    return "\n".join(lines) + "\n"


def ab_rounds(files: dict[str, Path], feed: Path, threads: int, rounds: int) -> dict[str, list[dict]]:
    """Each file on OpenVINO (f32 hint) once per round in a fresh process, the order
    reversed every other round."""
    out: dict[str, list[dict]] = {}
    labels = list(files)
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            cmd = [sys.executable, str(Path(__file__)), "_time", "ov", "f32", str(files[label]), str(feed), str(threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                out.setdefault(label, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def ab_section(names: list[str], threads: list[int], rounds: int, extra: dict[str, dict[str, Path]]) -> str:
    """qtool --target openvino against NNCF's int8 alone (no other configuration between
    them), per thread count: which one is faster once the float rows are out of the way."""
    lines = ["## A/B: qtool --target openvino against NNCF's int8 on OpenVINO (f32 hint)", "",
             f"`bench/targets.py ab`: only these models, alternating fresh processes, {rounds} rounds "
             f"of at least {SECONDS:.0f} s each; medians over rounds. With 1 thread, CPU time per "
             "inference is the model's own work (no sibling thread spinning while it waits). "
             f"Load average at start: {_load()}.", "",
             "| model | threads | model file | wall ms | p10 ms | cpu ms | NNCF / this (wall / p10 / cpu) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name in names:
        files = {"qtool --target openvino": WORK / name / "qtool_openvino.onnx", "NNCF": WORK / name / "nncf.onnx",
                 **extra.get(name, {})}
        for t in threads:
            got = ab_rounds(files, WORK / name / "feed.npz", t, rounds)
            ref = {k: _median(got.get("NNCF"), k) for k in ("median_ms", "p10_ms", "cpu_ms")}
            for label in files:
                mine = {k: _median(got.get(label), k) for k in ("median_ms", "p10_ms", "cpu_ms")}
                ratio = " / ".join(f"{ref[k] / mine[k]:.2f}x" if ref[k] and mine[k] else "-" for k in mine)
                lines.append(f"| {name} | {t} | {label} | {_fmt(mine['median_ms'])} | {_fmt(mine['p10_ms'])} | "
                             f"{_fmt(mine['cpu_ms'])} | {ratio} |")
    lines += ["", f"Load average at the end: {_load()}."]
    return "\n".join(lines) + "\n"


def _saturation_kept(out: Path) -> str:
    """The saturation section of an earlier results file (`targets.py saturation`), if any."""
    marker = "## Without VNNI"
    text = out.read_text() if out.exists() else ""
    if marker not in text:
        return ""
    section = text[text.index(marker):]
    if "\n## " in section:  # the sections `layers` and `ab` append after it are re-made, not kept
        section = section[:section.index("\n## ") + 1]
    note = "(kept from an earlier `bench/targets.py saturation` run; not re-run with the tables above)"
    return "\n" + section if note in section else "\n" + section.replace("\n", "\n\n" + note + "\n", 1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_time":
        time_one(*argv[1:6])
        return 0
    if argv and argv[0] == "layers":  # appends the f32-layer section to the results file
        names = [a for a in argv[1:] if a in MODELS_USED] or list(MODELS_USED)
        with RESULTS.open("a") as f:
            f.write("\n" + layers_section(names))
        log(f"appended the f32-layer section to {RESULTS}")
        return 0
    if argv and argv[0] == "ab":  # appends its section to the results file
        ab = argparse.ArgumentParser(prog="targets.py ab")
        ab.add_argument("names", nargs="+", choices=list(MODELS_USED))
        ab.add_argument("--threads", nargs="+", type=int, default=[1, THREADS])
        ab.add_argument("--rounds", type=int, default=6)
        ab.add_argument("--extra", nargs="*", default=[], metavar="NAME:LABEL=PATH",
                        help="another model file of NAME to time beside qtool's and NNCF's")
        a = ab.parse_args(argv[1:])
        extra: dict[str, dict[str, Path]] = {}
        for item in a.extra:
            name, _, rest = item.partition(":")
            label, _, path = rest.partition("=")
            extra.setdefault(name, {})[label] = Path(path)
        with RESULTS.open("a") as f:
            f.write("\n" + ab_section(a.names, a.threads, a.rounds, extra))
        log(f"appended the A/B section to {RESULTS}")
        return 0
    if argv and argv[0] == "saturation":  # appends its section to the results file (or --out)
        rest = argv[1:]
        out = Path(rest[rest.index("--out") + 1]) if "--out" in rest else RESULTS
        names = [a for a in rest if a in MODELS_USED] or [n for n, (k, _) in MODELS_USED.items() if k == "CNN"]
        with out.open("a") as f:
            f.write("\n" + saturation_section(names))
        log(f"appended the saturation section to {out}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(MODELS_USED), default=list(MODELS_USED))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="convert again even when cached")
    parser.add_argument("--remake", nargs="*", default=[], choices=["qtool_cpu", "qtool_openvino", "nncf", A16_KEY],
                        help="convert these again (e.g. after a placement change), keep the rest")
    parser.add_argument("--a16w8", nargs="*", default=[], choices=list(MODELS_USED),
                        help="also time qtool --target openvino --activation-bits 16 on these models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load = _load()
    prepared = {}
    for name in args.only:
        if not float_model(name).exists():
            log(f"{name}: {float_model(name)} missing (bench/zoo.py prepare / bench/corpus.py check); skipped")
            continue
        prepared[name] = prepare(name, args.fresh, tuple(args.remake), a16=name in args.a16w8)
    metrics = {}
    for name, p in prepared.items():
        for label, runtime, hint, key in configs_for(p):
            log(f"{name}: metric of {label}")
            metrics[f"{name}|{label}"] = metric(name, runtime, hint, p["files"][key])
    times = timed_rounds(prepared, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = _saturation_kept(args.out)  # `targets.py saturation` appends it; not re-run here
    args.out.write_text(render(prepared, metrics, times, args.rounds, load) + kept)
    (WORK / "last_run.json").write_text(json.dumps({"metrics": metrics, "times": times}, default=str, indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
