"""Full (sequential) bias correction (qtool.passes.recovery.bias_full) against numpy: the
quantized model's mean output per channel equals the float model's at every layer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import init, make_model, session, vi
from onnx import helper

from qtool.config import Recipe
from qtool.data import Dataset, input_specs
from qtool.passes.qdq import quantize_static
from qtool.passes.recovery import parse_passes
from qtool.passes.recovery.bias_full import bias_correct_full, cut, depth_waves
from qtool.passes.recovery.layers import target_layers
from qtool.passes.recovery.weights import bias_correct
from qtool.runtime import infer_types

RNG = np.random.default_rng(11)
K, H, N = 24, 16, 8


def _mlp():
    """x -> Gemm -> Relu -> Gemm -> h2 -> Relu -> Gemm -> y, and x -> Gemm -> side (a
    second layer at depth 0)."""
    w1 = (RNG.standard_normal((H, K)) * np.logspace(-1.5, 0, K)).astype(np.float32)
    w2 = (RNG.standard_normal((H, H)) / 4).astype(np.float32)
    w3 = (RNG.standard_normal((N, H)) / 4).astype(np.float32)
    ws = (RNG.standard_normal((N, K)) / 5).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=1, name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3"], ["y"], transB=1, name="fc3"),
             helper.make_node("Gemm", ["x", "ws"], ["side"], transB=1, name="side")]
    inits = [init("w1", w1), init("b1", np.full(H, 0.3, np.float32)), init("w2", w2),
             init("b2", np.zeros(H, np.float32)), init("w3", w3), init("ws", ws)]
    return make_model(nodes, [vi("x", ["N", K])], [vi("y", None), vi("side", None)], inits)


def _samples(tmp_path, n=16):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(n):
        x = (RNG.standard_normal((4, K)) + 1.5).astype(np.float32)
        x[:, 0] *= 25.0  # one wide channel: the activation's int8 step is coarse for the others
        np.save(folder / f"s{i:02d}.npy", x)
    return folder


def _model(proto) -> ir.Model:
    model = ir.from_proto(proto)
    infer_types(model)  # as pre-processing does: the layers' inputs are known to be float
    return model


TENSORS = ("h1", "r1", "h2", "r2", "y", "side")


def _float_tensors(proto, x):
    probe = make_model(list(proto.graph.node), [vi("x", ["N", K])], [vi(t, None) for t in TENSORS],
                       list(proto.graph.initializer))
    return dict(zip(TENSORS, session(probe).run(list(TENSORS), {"x": x})))


def _quantized_means(model: ir.Model, recipe: Recipe, ranges, x):
    """Mean per channel of each Gemm's output (before its Relu) in the int8 model."""
    q = model.clone()
    quantize_static(q, recipe, ranges)
    proto = ir.to_proto(q)
    by_layer = {n.name: n.output[0] for n in proto.graph.node if n.op_type == "Gemm"}
    probe = cut(proto, list(by_layer.values()))
    out = session(probe).run(list(by_layer.values()), {"x": x})
    return {name: o.mean(axis=0) for name, o in zip(by_layer, out)}


def test_full_bias_correction_matches_the_float_means_of_the_quantized_model(tmp_path):
    proto = _mlp()
    folder = _samples(tmp_path)
    x = np.concatenate([np.load(p) for p in sorted(folder.glob("*.npy"))])
    floats = _float_tensors(proto, x)
    ranges = {"x": (float(x.min()), float(x.max()))}
    ranges.update({t: (float(v.min()), float(v.max())) for t, v in floats.items()})
    recipe = Recipe()
    float_means = {"fc1": floats["h1"].mean(0), "fc2": floats["h2"].mean(0), "fc3": floats["y"].mean(0),
                   "side": floats["side"].mean(0)}

    def residual(model):
        got = _quantized_means(model, recipe, ranges, x)
        return {name: float(np.abs(got[name] - float_means[name]).max()) for name in float_means}

    plain = residual(_model(proto))
    empirical = _model(proto)
    bias_correct(empirical, recipe, Dataset(folder, input_specs(empirical)))
    after_empirical = residual(empirical)
    full = _model(proto)
    report = bias_correct_full(full, recipe, ranges, Dataset(folder, input_specs(full)))
    after_full = residual(full)

    assert report.counts["biases corrected"] == 4 and report.counts["waves"] == 3
    scale = {name: float(np.abs(float_means[name]).max()) for name in float_means}
    for name in float_means:
        assert plain[name] > 1e-3 * scale[name]  # quantization moved every layer's mean
        # Only the int32 rounding of the corrected bias is left (s_x * s_w / 2 per channel).
        assert after_full[name] <= 2e-3 * scale[name], (name, after_full[name], plain[name])
    # Downstream of quantized activations, measuring on float inputs leaves a shift the
    # sequential measurement removes.
    assert after_full["fc2"] < 0.5 * after_empirical["fc2"]
    assert after_full["fc3"] < 0.5 * after_empirical["fc3"]


def test_waves_group_layers_by_depth():
    model = _model(_mlp())
    layers, _ = target_layers(model, Recipe())
    waves = depth_waves(model, layers)
    assert [sorted(la.name for la in wave) for wave in waves] == [["fc1", "side"], ["fc2"], ["fc3"]]


def test_bias_full_is_a_recovery_choice_but_not_beside_bias():
    import pytest

    from qtool.errors import UsageError

    assert parse_passes("cle,bias-full") == ("cle", "bias-full")
    assert "bias-full" not in parse_passes("all")
    with pytest.raises(UsageError, match="choose one"):
        parse_passes("bias,bias-full")


def test_full_bias_correction_of_a_matmul_with_3d_activations(tmp_path):
    """A MatMul's channels are its output's last axis; its bias is the Add after it."""
    w = (RNG.standard_normal((K, H)) * np.logspace(-1.5, 0, K)[:, None]).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                        helper.make_node("Add", ["m", "b"], ["y"], name="bias")],
                       [vi("x", ["N", 4, K])], [vi("y", None)], [init("w", w), init("b", np.zeros(H, np.float32))])
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(8):
        x = (RNG.standard_normal((1, 4, K)) + 1.0).astype(np.float32)
        x[..., 0] *= 25.0
        np.save(folder / f"s{i}.npy", x)
    x = np.concatenate([np.load(p) for p in sorted(folder.glob("*.npy"))])
    ref = x.astype(np.float64) @ w.astype(np.float64)
    ranges = {"x": (float(x.min()), float(x.max())), "m": (float(ref.min()), float(ref.max())),
              "y": (float(ref.min()), float(ref.max()))}
    model = _model(proto)
    report = bias_correct_full(model, Recipe(), ranges, Dataset(folder, input_specs(model)))
    assert report.counts["biases corrected"] == 1
    q = model.clone()
    quantize_static(q, Recipe(), ranges)
    got = session(ir.to_proto(q)).run(["y"], {"x": x})[0].reshape(-1, H).mean(axis=0)
    plain = ir.from_proto(proto)
    infer_types(plain)
    quantize_static(plain, Recipe(), ranges)
    before = session(ir.to_proto(plain)).run(["y"], {"x": x})[0].reshape(-1, H).mean(axis=0)
    want = ref.reshape(-1, H).mean(axis=0)
    assert np.abs(before - want).max() > 10 * np.abs(got - want).max()
