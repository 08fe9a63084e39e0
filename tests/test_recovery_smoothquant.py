"""Static SmoothQuant of Gemm inputs (qtool.passes.recovery.smoothquant.smooth_gemms): a
classifier head whose weight columns differ by decades (it divides features by their spread)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import init, make_model, session, vi
from onnx import helper

from qtool.config import Recipe
from qtool.data import Dataset, input_specs
from qtool.passes import PassReport
from qtool.passes.recovery.smoothquant import output_noise, smooth_gemms
from qtool.quant.scales import sqnr_db
from qtool.runtime import infer_types

RNG = np.random.default_rng(5)
C, N = 32, 10


def _head():
    """x [N, C, 4, 4] -> GlobalAveragePool -> Flatten -> Gemm: features of large mean and
    small, uneven spread, standardised by the head's weights (W / sigma, b = -W mu / sigma)."""
    sigma = np.logspace(-3, 0, C).astype(np.float32)
    mu = np.linspace(1, 3, C).astype(np.float32)
    w = (RNG.standard_normal((N, C)) / sigma).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1, name="fc")]
    proto = make_model(nodes, [vi("x", ["N", C, 4, 4])], [vi("y", None)],
                       [init("w", w), init("b", (-(w @ mu)).astype(np.float32))])
    return proto, mu, sigma


def _data(tmp_path, mu, sigma, n=12):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(n):
        x = mu[:, None, None] + sigma[:, None, None] * RNG.standard_normal((C, 4, 4))
        np.save(folder / f"s{i:02d}.npy", x.astype(np.float32))
    return folder


def test_gemm_smoothing_keeps_the_function_and_recovers_int8(tmp_path):
    proto, mu, sigma = _head()
    folder = _data(tmp_path, mu, sigma)
    model = ir.from_proto(proto)
    infer_types(model)
    report = PassReport("smoothquant")
    smooth_gemms(model, Recipe(), Dataset(folder, input_specs(model)), report)
    assert report.counts["Gemm inputs smoothed"] == 1
    smoothed = ir.to_proto(model)
    # the 1/s runs as a float Div on the feature map, before the pooling
    assert [n.op_type for n in smoothed.graph.node][:2] == ["Div", "GlobalAveragePool"]
    x = np.stack([np.load(p) for p in sorted(folder.glob("*.npy"))])
    before, after = session(proto).run(None, {"x": x})[0], session(smoothed).run(None, {"x": x})[0]
    # within float32 rounding of the head's terms (|W| up to 1e3 times features of ~3, summed)
    terms = float(np.abs(onnx.numpy_helper.to_array(proto.graph.initializer[0])).sum(axis=1).max() * mu.max())
    assert np.abs(after - before).max() <= 1e-6 * terms

    # int8 of each (the pipeline: calibrated on the same samples) against the float outputs
    from qtool.cli import run

    def int8(path, out):
        onnx.save(path, str(tmp_path / "in.onnx"))
        assert run(["convert", str(tmp_path / "in.onnx"), "-o", str(out), "--data", str(folder),
                    "--no-guard", "--recover", "none", "-q"]) == 0
        return session(onnx.load(str(out))).run(None, {"x": x})[0]

    plain = sqnr_db(before, int8(proto, tmp_path / "plain.onnx"))
    smooth = sqnr_db(before, int8(smoothed, tmp_path / "smooth.onnx"))
    assert smooth > plain + 10.0, (plain, smooth)


def test_output_noise_matches_a_simulated_int8_layer():
    k, n = 64, 16
    x = (RNG.standard_normal((4096, k)) * np.logspace(-1, 1, k)).astype(np.float64)
    w = RNG.standard_normal((k, n)) * np.logspace(1, -1, k)[:, None]
    s = np.sqrt(np.abs(x).max(0) / np.abs(w).max(1))
    estimate = output_noise(np.abs(x).max(0), (x**2).mean(0), w, s, per_channel=True)
    xs, ws = x / s, w * s[:, None]
    step = np.abs(xs).max() / 255.0  # as the estimate: a range of max|x / s| (one side)
    wstep = np.abs(ws).max(axis=0) / 127.0
    xq = np.round(xs / step) * step
    wq = np.round(ws / wstep) * wstep
    measured = float(((xq @ wq - x @ w) ** 2).mean())
    assert 0.5 < estimate / measured < 2.0, (estimate, measured)


def test_a_balanced_gemm_is_left_alone(tmp_path):
    w = (RNG.standard_normal((N, C)) / np.sqrt(C)).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")],
                       [vi("x", ["N", C])], [vi("y", None)], [init("w", w)])
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(6):
        np.save(folder / f"s{i}.npy", RNG.standard_normal((2, C)).astype(np.float32))
    model = ir.from_proto(proto)
    infer_types(model)
    report = PassReport("smoothquant")
    smooth_gemms(model, Recipe(), Dataset(folder, input_specs(model)), report)
    assert not report.modified and "left alone" in report.notes[0]


def test_matmul_smoothing_converts_end_to_end(tmp_path, capsys):
    """Smoothing a MatMul replaces its weight: the model must still calibrate and convert
    (the old weight, left unread, once made onnxruntime's calibration session fail)."""
    import json

    from qtool.cli import run

    k, n = 128, 160  # over 64 KiB: a weight the calibration session shares in place
    w = (RNG.standard_normal((k, n)) / 8).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", ["N", 4, k])], [vi("y", None)], [init("w", w)])
    onnx.save(proto, str(tmp_path / "m.onnx"))
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(6):
        x = RNG.standard_normal((1, 4, k)).astype(np.float32)
        x[..., 3] *= 80.0  # an outlier channel
        np.save(folder / f"s{i}.npy", x)
    assert run(["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--data", str(folder),
                "--no-guard", "--recover", "smoothquant", "--json", "-q"]) == 0
    passes = {p["name"]: p["counts"] for p in json.loads(capsys.readouterr().out)["passes"]}
    assert passes["smoothquant"] == {"inputs smoothed": 1}


def test_gated_mlp_smoothing_twice_leaves_no_orphan_weight(tmp_path, capsys):
    """x -> up/gate MatMuls -> Sigmoid(gate) * up -> down MatMul, with outliers in x and in
    the product: the up projection's weight is smoothed for x, then scaled again to absorb the
    down projection's 1/s. The first replacement, unread, must not reach calibration."""
    import json

    from qtool.cli import run

    k, f = 96, 192
    wu = (RNG.standard_normal((k, f)) / 8).astype(np.float32)
    wu[:, 5] *= 60.0  # makes channel 5 of the product an outlier
    proto = make_model(
        [helper.make_node("MatMul", ["x", "wu"], ["up"], name="up"),
         helper.make_node("MatMul", ["x", "wg"], ["gate"], name="gate"),
         helper.make_node("Sigmoid", ["gate"], ["act"], name="act"),
         helper.make_node("Mul", ["act", "up"], ["h"], name="glu"),
         helper.make_node("MatMul", ["h", "wd"], ["y"], name="down")],
        [vi("x", ["N", 4, k])], [vi("y", None)],
        [init("wu", wu), init("wg", (RNG.standard_normal((k, f)) / 8).astype(np.float32)),
         init("wd", (RNG.standard_normal((f, k)) / 8).astype(np.float32))])
    onnx.save(proto, str(tmp_path / "m.onnx"))
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(6):
        x = RNG.standard_normal((1, 4, k)).astype(np.float32)
        x[..., 3] *= 80.0
        np.save(folder / f"s{i}.npy", x)
    assert run(["convert", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--data", str(folder),
                "--no-guard", "--recover", "smoothquant", "--json", "-q"]) == 0
    passes = {p["name"]: p["counts"] for p in json.loads(capsys.readouterr().out)["passes"]}
    counts = passes["smoothquant"]
    assert counts["inputs smoothed"] == 2 and any(key.startswith("smoothing folded") for key in counts)
