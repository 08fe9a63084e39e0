"""Accuracy recovery for static int8 (qtool.passes.recovery), each pass against numpy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import init, make_model, session, vi
from onnx import helper

from qtool.config import Recipe, recipe_from_dict
from qtool.data import Dataset, input_specs
from qtool.errors import RecipeError, UsageError
from qtool.passes.recovery import parse_passes
from qtool.passes.recovery.adaround import learn_rounding, row_errors
from qtool.passes.recovery.equalize import equalize
from qtool.passes.recovery.layers import target_layers
from qtool.passes.recovery.smoothquant import smooth_static
from qtool.passes.recovery.weights import adaround, bias_correct
from qtool.quant.scales import quantize, weight_params
from qtool.runtime import infer_types

RNG = np.random.default_rng(7)


def _uneven(cout, cin, k):
    """Conv weights whose output channels' ranges differ by up to 100x (what CLE fixes)."""
    w = RNG.standard_normal((cout, cin, k, k)).astype(np.float32)
    return (w * np.logspace(-1, 1, cout).astype(np.float32)[:, None, None, None] / np.sqrt(cin * k * k)).astype(np.float32)


def _cnn():
    """Conv -> Relu -> depthwise Conv -> LeakyRelu -> Conv -> Clip(0, 6) -> Conv."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, group=8, name="dw"),
        helper.make_node("LeakyRelu", ["c2"], ["r2"], alpha=0.1, name="r2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="c3"),
        helper.make_node("Clip", ["c3", "lo", "hi"], ["r3"], name="relu6"),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["y"], name="c4"),
    ]
    inits = [init("w1", _uneven(8, 3, 3)), init("b1", RNG.standard_normal(8).astype(np.float32) * 0.1),
             init("w2", _uneven(8, 1, 3)), init("w3", _uneven(6, 8, 1)),
             init("b3", RNG.standard_normal(6).astype(np.float32) * 0.1),
             init("lo", np.float32(0)), init("hi", np.float32(6)), init("w4", _uneven(4, 6, 1)),
             init("b4", np.zeros(4, np.float32))]
    return make_model(nodes, [vi("x", ["N", 3, 10, 10])], [vi("y", None)], inits)


def _data(tmp_path, shape, n=8, mean=0.0, outlier=None):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(n):
        x = RNG.standard_normal(shape).astype(np.float32) + mean
        if outlier is not None:
            x[..., outlier] *= 60.0
        np.save(folder / f"s{i:02d}.npy", x)
    return folder


def _dataset(model: ir.Model, folder) -> Dataset:
    return Dataset(folder, input_specs(model))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return session(model).run(None, {"x": x})[0]


def test_equalization_keeps_the_float_function_and_balances_ranges():
    proto = _cnn()
    model = ir.from_proto(proto)
    x = RNG.standard_normal((2, 3, 10, 10)).astype(np.float32)
    before = _run(proto, x)
    report = equalize(model)
    after = _run(model, x)
    assert np.abs(after - before).max() <= 1e-5 * max(1.0, np.abs(before).max())
    assert report.counts["Conv pairs equalized"] == 2  # c1 -> dw, dw -> c3
    assert any("upper bound 6" in why for why in report.skipped.values())  # c3 -> Clip(0, 6) -> c4
    weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    # Conv1's output channel i and depthwise input channel i now span the same range.
    r1 = np.abs(weights["w1"]).reshape(8, -1).max(axis=1)
    r2 = np.abs(weights["w2"]).reshape(8, -1).max(axis=1)
    before_spread = np.abs(_uneven_spread(proto))
    assert np.max(np.abs(np.log(r1 / r2))) < 0.05 < before_spread


def _uneven_spread(proto) -> float:
    w = {t.name: t for t in proto.graph.initializer}
    from onnx import numpy_helper

    r1 = np.abs(numpy_helper.to_array(w["w1"])).reshape(8, -1).max(axis=1)
    r2 = np.abs(numpy_helper.to_array(w["w2"])).reshape(8, -1).max(axis=1)
    return float(np.max(np.abs(np.log(r1 / r2))))


def test_bias_correction_removes_the_measured_mean_shift(tmp_path):
    k, n = 48, 16
    w = (RNG.standard_normal((n, k)) * np.logspace(-2, 0, k)).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")],
                       [vi("x", ["N", k])], [vi("y", None)], [init("w", w)])
    folder = _data(tmp_path, (k,), n=16, mean=2.0)  # inputs of non-zero mean: the shift shows
    model = ir.from_proto(proto)
    recipe = Recipe()
    report = bias_correct(model, recipe, _dataset(model, folder))
    assert report.counts["biases corrected"] == 1
    # numpy reference: the quantized-weight layer's mean output now equals the float one's.
    x = np.stack([np.load(p) for p in sorted(folder.glob("*.npy"))]).astype(np.float64)
    wq = target_layers(model, recipe)[0][0].quantized(recipe)
    bias = next(v for v in model.graph.initializers.values() if v.name != "w").const_value.numpy()
    float_mean = (x @ w.T.astype(np.float64)).mean(axis=0)
    shift = (x @ wq.T).mean(axis=0) - float_mean
    assert np.abs(shift).max() > 1e-3  # there was a shift to remove
    corrected = (x @ wq.T + bias).mean(axis=0)
    assert np.allclose(corrected, float_mean, atol=1e-5)


def test_bias_correction_on_a_conv_without_bias_adds_one(tmp_path):
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, name="c")],
                       [vi("x", ["N", 4, 6, 6])], [vi("y", None)], [init("w", _uneven(8, 4, 3))])
    folder = _data(tmp_path, (4, 6, 6), mean=1.0)
    model = ir.from_proto(proto)
    recipe = Recipe()
    layer = target_layers(model, recipe)[0][0]
    bias_correct(model, recipe, _dataset(model, folder))
    assert len(model.graph.node(0).inputs) == 3
    quantized = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 4)],
                           [vi("x", ["N", 4, 6, 6])], [vi("y", None)],
                           [init("w", layer.quantized(recipe).astype(np.float32)),
                            init("b", model.graph.node(0).inputs[2].const_value.numpy())])
    x = np.stack([np.load(p) for p in sorted(folder.glob("*.npy"))])
    ref, got = _run(proto, x), _run(quantized, x)
    assert np.allclose(got.mean(axis=(0, 2, 3)), ref.mean(axis=(0, 2, 3)), atol=1e-5)


def test_learned_rounding_is_never_worse_than_nearest():
    k = 32
    basis = RNG.standard_normal((k, k))
    gram = (basis @ basis.T / k + np.outer(np.ones(k), np.ones(k)))[None]  # correlated inputs
    w_over_s = RNG.uniform(-20, 20, (1, 24, k))
    result = learn_rounding(w_over_s, -127, 127, gram, seconds=2.0, max_iterations=300)
    nearest = row_errors(np.rint(w_over_s) - w_over_s, gram)
    learned = row_errors(result.q - w_over_s, gram)
    assert np.all(learned <= nearest + 1e-12)  # row by row
    assert learned.sum() < 0.8 * nearest.sum()  # and it found better roundings on this one
    assert np.all(np.abs(result.q - np.floor(w_over_s) - 0.5) <= 0.5)  # only floor or ceil


def test_adaround_pass_writes_weights_on_the_int8_grid_and_lowers_output_error(tmp_path):
    proto = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 4, name="c")],
                       [vi("x", ["N", 4, 6, 6])], [vi("y", None)],
                       [init("w", _uneven(8, 4, 3)), init("b", np.zeros(8, np.float32))])
    folder = _data(tmp_path, (4, 6, 6), mean=0.5)
    model = ir.from_proto(proto)
    recipe = Recipe()
    w_float = target_layers(model, recipe)[0][0].weight
    floats = {}
    report = adaround(model, recipe, _dataset(model, folder), seconds=2.0, float_weights=floats)
    assert report.counts["layers rounded"] == 1 and "c" in floats
    w_new = model.graph.node(0).inputs[1].const_value.numpy()
    p = weight_params(w_new, 0)
    # The int8 pass quantizes the written weight to exactly the chosen grid points.
    assert np.array_equal(quantize(w_new, p).astype(np.float32) * p.scale[:, None, None, None], w_new)
    x = np.stack([np.load(p) for p in sorted(folder.glob("*.npy"))])
    nearest = target_layers(ir.from_proto(proto), recipe)[0][0].quantized(recipe).astype(np.float32)

    def err(weight):
        m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)],
                       [vi("x", ["N", 4, 6, 6])], [vi("y", None)], [init("w", weight)])
        ref = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)],
                         [vi("x", ["N", 4, 6, 6])], [vi("y", None)], [init("w", w_float)])
        return float(np.mean((_run(m, x) - _run(ref, x)) ** 2))

    assert err(w_new) <= err(nearest) * 1.02  # sampled positions: equal within sampling noise


def test_static_smoothquant_keeps_the_function_and_shrinks_the_outlier_range(tmp_path):
    d, f = 64, 96
    proto = make_model(
        [helper.make_node("LayerNormalization", ["x", "g", "beta"], ["h"], axis=-1, name="ln"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")],
        [vi("x", ["N", 5, d])], [vi("y", None)],
        [init("g", np.ones(d, np.float32)), init("beta", np.zeros(d, np.float32)),
         init("w", (RNG.standard_normal((d, f)) * 0.1).astype(np.float32))], opset=17)
    gamma = np.ones(d, np.float32)
    gamma[3] = 40.0  # the LayerNorm's weight makes channel 3 an outlier
    proto.graph.initializer[0].CopyFrom(init("g", gamma))
    folder = _data(tmp_path, (5, d))
    model = ir.from_proto(proto)
    infer_types(model)  # as pre-processing leaves it: the MatMul's input is known to be float
    report = smooth_static(model, Recipe(), _dataset(model, folder))
    assert report.counts.get("inputs smoothed") == 1
    x = np.stack([np.load(p) for p in sorted(folder.glob("*.npy"))])
    assert np.allclose(_run(model, x), _run(proto, x), rtol=1e-4, atol=1e-4)
    ln = model.graph.node(0)
    h_before = _ln(x, gamma)
    h_after = _ln(x, ln.inputs[1].const_value.numpy())
    ch_before, ch_after = np.abs(h_before).max(axis=(0, 1)), np.abs(h_after).max(axis=(0, 1))
    assert ch_after.max() / np.median(ch_after) < 0.5 * ch_before.max() / np.median(ch_before)


def _ln(x, gamma):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * gamma


def test_recovery_names_and_recipe_keys():
    assert parse_passes("bias, cle") == ("cle", "bias")
    assert parse_passes("all") == ("cle", "smoothquant", "adaround", "bias")
    assert parse_passes("none") == ()
    with pytest.raises(UsageError, match="unknown recovery pass 'adaroud'"):
        parse_passes("cle,adaroud")
    r = recipe_from_dict({"recovery": {"passes": ["cle", "bias"], "samples": 16}})
    assert r.recovery.passes == ("cle", "bias") and r.recovery.samples == 16
    with pytest.raises(RecipeError, match="recovery.passes = 'clee'"):
        recipe_from_dict({"recovery": {"passes": ["clee"]}})


def _cnn_file(tmp_path):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(_cnn(), path)
    return str(path)


@pytest.mark.parametrize("args,message", [
    (["--recover", "cle,adaroud"], "unknown recovery pass 'adaroud'"),
    (["--recover", "bias", "--dynamic"], "--recover applies to static int8"),
    (["--recover", "cle", "--calib", "t.json"], "--recover cannot use a --calib table"),
])
def test_recover_flag_errors(tmp_path, capsys, monkeypatch, args, message):
    from qtool.cli import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.json").write_text("{}")
    assert run(["convert", _cnn_file(tmp_path), "-o", "out.onnx", *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "hint:" in err
    assert not (tmp_path / "out.onnx").exists()


def test_convert_with_recovery_reports_each_pass_and_keeps_fidelity(tmp_path, capsys):
    import json

    from qtool.cli import run

    data = _data(tmp_path, (3, 10, 10), n=10)
    out = tmp_path / "q.onnx"
    assert run(["convert", _cnn_file(tmp_path), "-o", str(out), "--data", str(data), "--no-guard",
                "--recover", "cle,bias", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    passes = {p["name"]: p["counts"] for p in report["passes"]}
    assert passes["equalize"] == {"Conv pairs equalized": 2}
    assert passes["bias-correction"]["biases corrected"] >= 3
    assert report["fidelity"]["sqnr_db"] > 20
    import onnx

    assert session(onnx.load(out)).run(None, {"x": np.load(data / "s00.npy")[None]})[0].shape == (1, 4, 10, 10)


def test_guard_tries_recovery_on_static_candidates_only():
    from qtool.config import load_recipe
    from qtool.pipeline.guard import recovery_repair

    label, recipe = next(recovery_repair("int8-static", load_recipe("int8-static")))
    assert recipe.recovery.passes == ("cle", "smoothquant", "bias") and "recovery" in label
    assert list(recovery_repair("int8-dynamic", load_recipe("int8-dynamic"))) == []
    done = load_recipe("int8-static").override("recovery", passes=("cle", "smoothquant", "adaround", "bias"))
    assert list(recovery_repair("int8-static", done)) == []
    # bias-full stands in for bias: the repair adds the others, not the fast variant beside it
    full = load_recipe("int8-static").override("recovery", passes=("bias-full",))
    label, recipe = next(recovery_repair("int8-static", full))
    assert recipe.recovery.passes == ("cle", "smoothquant", "bias-full") and "bias," not in label


def test_auto_mode_runs_the_default_recovery_and_none_switches_it_off(tmp_path, capsys):
    import json

    from qtool.cli import run
    from qtool.passes.recovery import DEFAULT

    data, model = _data(tmp_path, (3, 10, 10), n=10), _cnn_file(tmp_path)
    names = {"bias": "bias-correction", "cle": "equalize", "adaround": "adaround", "smoothquant": "smoothquant"}
    for extra, expected in (([], {names[p] for p in DEFAULT}), (["--recover", "none"], set())):
        out = tmp_path / f"q{len(extra)}.onnx"
        assert run(["convert", model, "-o", str(out), "--data", str(data), "--no-guard", "--json", "-q",
                    *extra]) == 0
        ran = {p["name"] for p in json.loads(capsys.readouterr().out)["passes"]}
        assert ran & set(names.values()) == expected
