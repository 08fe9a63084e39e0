"""qtool tune and mixed-precision convert, on MLPs / small CNNs built in code.

The MLP has one deliberately sensitive layer: ``fc2``'s weight holds one huge value per
output column (8x the largest other) on an input row that is always zero after ``relu1``. The
float output does not see it, but 4-bit blocks scale to it and round every other weight
of the block to zero, while 8 bits keep them. Tune must keep fc2 at 8 bits and put the
rest at 4. ``sensitive_cnn`` plays the same trick on a Conv (``convB``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tomllib
from conftest import onnx_model, value_info
from onnx import TensorProto, helper, numpy_helper

from qtool.config import LayerOverride, Recipe, load_recipe
from qtool.errors import UsageError
from qtool.passes.select import glob_escape
from qtool.pipeline import convert_model, weight_only_part
from qtool.tuning import parse_bits, parse_budget, recipe_toml, tune
from qtool.tuning.frontier import Candidate, mark_frontier, svg
from qtool.tuning.groups import Group, role_key
from qtool.tuning.options import Clock, check_budget
from qtool.tuning.search import group_bytes, order_moves

K = 128  # one 4-bit block of 128 per column
OUTLIER = 8.0
DEAD = 7  # the input feature of fc2 that relu1 always zeroes


def mlp(path: Path) -> Path:
    """x[1,128] -> fc1 -> relu1 -> fc2 (sensitive) -> relu2 -> fc3 -> fc4 -> y[1,10]."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
    w1[:, DEAD] = 0.0
    b1 = np.full(K, 0.1, np.float32)
    b1[DEAD] = -1.0  # relu1's output DEAD is always 0
    w2 = (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
    w2[DEAD, :] = OUTLIER * np.abs(w2).max()
    w3 = (rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32)
    w4 = (rng.standard_normal((K, 10)) / np.sqrt(K)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="bias1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="fc3"),
        helper.make_node("MatMul", ["h3", "w4"], ["y"], name="fc4"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"), (w4, "w4"))]
    onnx.save(onnx_model(nodes, [value_info("x", ["N", K])], [value_info("y", ["N", 10])], inits), path)
    return path


def samples(folder: Path, model: Path, n: int = 40, shape=(1, K)) -> Path:
    """``n`` samples and labels.txt: the float model's argmax (float top-1 = 1.0)."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    sess = ort.InferenceSession(str(model))
    labels = []
    for i in range(n):
        x = rng.standard_normal(shape).astype(np.float32)
        np.save(folder / f"{i:03d}.npy", x)
        labels.append(int(sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(-1).argmax()))
    (folder / "labels.txt").write_text("\n".join(map(str, labels)) + "\n")
    return folder


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))


def run(model: Path | bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model))
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def ops(model: ir.Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph:
        key = n.op_type + (f"/{n.attributes.get_int('bits', 0)}" if n.op_type == "MatMulNBits" else "")
        out[key] = out.get(key, 0) + 1
    return out


@pytest.fixture()
def mlp_case(tmp_path):
    model = mlp(tmp_path / "mlp.onnx")
    return model, samples(tmp_path / "data", model)


# -- mixed precision in convert ---------------------------------------------------------


def test_weight_only_recipe_mixes_8_4_and_float(mlp_case):
    model_path, _ = mlp_case
    recipe = dataclasses.replace(load_recipe("int4-weight-only"),
                                 layer=(LayerOverride("fc2", 8), LayerOverride("fc4", 32)))
    out, _, _ = convert_model(ir.load(model_path), recipe)
    assert ops(out) == {"MatMulNBits/4": 2, "MatMulNBits/8": 1, "MatMul": 1, "Relu": 2}  # bias folded
    x = np.random.default_rng(5).standard_normal((4, K)).astype(np.float32)
    ref = run(model_path, x)
    got = run(ir.to_proto(out).SerializeToString(), x)
    assert sqnr(ref, got) > 12.0  # two 4-bit layers (~19 dB each) and fc2 at 8 bits (~23 dB)


def test_int8_recipe_with_4bit_layers_runs_weight_only_first(mlp_case):
    model_path, _ = mlp_case
    recipe = load_recipe("int8-dynamic")
    recipe = dataclasses.replace(recipe, layer=(LayerOverride("fc1", 4), LayerOverride("fc4", 32)))
    part = weight_only_part(recipe)
    assert part.layer[-1] == LayerOverride("*", 32) and part.layer[1] == LayerOverride("fc4", 32)
    out, reports, _ = convert_model(ir.load(model_path), recipe)
    counts = ops(out)
    assert counts["MatMulNBits/4"] == 1 and counts["DynamicQuantizeMatMul"] == 2 and counts["MatMul"] == 1
    assert {r.name for r in reports} >= {"weight_only", "dynamic"}
    x = np.random.default_rng(6).standard_normal((2, K)).astype(np.float32)
    ref = run(model_path, x)
    assert sqnr(ref, run(ir.to_proto(out).SerializeToString(), x)) > 15.0
    assert weight_only_part(load_recipe("int8-dynamic")) is None


def cnn(path: Path) -> Path:
    """x[1,3,8,8] -> conv (8 ch) -> relu -> flatten -> head MatMul [512, 10]."""
    rng = np.random.default_rng(2)
    wc = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    wh = (rng.standard_normal((512, 10)) / np.sqrt(512)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "wh"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(wc, "wc"), numpy_helper.from_array(wh, "wh")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_static_int8_conv_with_4bit_head(tmp_path):
    from qtool.pipeline import calibrate

    model_path = cnn(tmp_path / "cnn.onnx")
    data = samples(tmp_path / "data", model_path, n=16, shape=(1, 3, 8, 8))
    recipe = dataclasses.replace(load_recipe("int8-static"), layer=(LayerOverride("head", 4),))
    table = calibrate(model_path, data, recipe)
    out, _, _ = convert_model(ir.load(model_path), recipe, table=table)
    counts = ops(out)
    assert counts.get("MatMulNBits/4") == 1 and counts.get("MatMul", 0) == 0
    assert counts["QuantizeLinear"] >= 1 and counts["DequantizeLinear"] >= 2  # the Conv is int8 QDQ
    x = np.load(data / "000.npy")
    ref = run(model_path, x)
    assert sqnr(ref, run(ir.to_proto(out).SerializeToString(), x)) > 15.0


# -- pieces of tune ----------------------------------------------------------------------


def test_parsers():
    assert parse_bits("8,4") == (8, 4) and parse_bits("2,8,32") == (8, 2)
    with pytest.raises(UsageError):
        parse_bits("16,8")
    with pytest.raises(UsageError):
        parse_bits("5")
    assert parse_budget("2%") == (2.0, True) and parse_budget("0.01") == (0.01, False)
    with pytest.raises(UsageError):
        parse_budget("-1")


def test_budget_limits_per_split_and_the_clock_ignores_cache_hits():
    import math
    import time

    assert check_budget("2%", None, None).limit(0.5) == pytest.approx(0.01)  # 2% of this split's float metric
    assert check_budget("0.01", None, None).limit(123.0) == 0.01
    assert check_budget(None, 5.0, None).limit(0.9) == 5e6  # bytes
    with pytest.raises(UsageError):
        check_budget("1%", 5.0, None)
    with pytest.raises(UsageError):
        check_budget(None, None, "frontier.pdf")
    with pytest.raises(UsageError):
        Clock.start(0.0, 0)
    assert Clock.start(0.0, None).deadline == math.inf
    clock = Clock(deadline=time.monotonic() + 10.0)
    assert not clock.short_of(1000)  # nothing timed yet: no estimate to stop on
    clock.observe(0.01)  # a cache hit says nothing about the cost of a measurement
    assert clock.per_measure is None
    clock.observe(2.0)
    clock.observe(1.0)
    assert clock.per_measure == 2.0  # the slowest so far
    assert clock.short_of(9) and not clock.short_of(1)


def test_groups_by_role_and_escaping():
    assert role_key("/layers.12/mlp/down_proj/MatMul") == "/layers.#/mlp/down_proj/MatMul"
    assert glob_escape("a[1]*?") == "a[[]1[]][*][?]"


def test_chain_lowers_cheap_large_groups_first():
    big = Group("big", ("big",), ("MatMul",), 10_000, (32, 8, 4))
    touchy = Group("touchy", ("touchy",), ("MatMul",), 10_000, (32, 8, 4))
    drops = {(0, 8): 0.0, (0, 4): 0.001, (1, 8): 0.0, (1, 4): 0.5}
    sqnrs = {(0, 8): 40.0, (0, 4): 25.0, (1, 8): 38.0, (1, 4): 3.0}
    chain = order_moves([big, touchy], drops, sqnrs, 0.01, "weight-only", 128)
    assert [(m.group, m.dst) for m in chain][-1] == (1, 4)  # the sensitive 4-bit move comes last
    assert group_bytes(big, 4, "weight-only", 128) == 10_000 * 0.5 + 4 * 10_000 / 128


def test_frontier_and_svg():
    cands = [Candidate("a", "held-out", 10.0, 0.9, 0.0, 40, "8:1"),
             Candidate("b", "held-out", 5.0, 0.9, 0.0, 30, "4:1"),
             Candidate("c", "held-out", 7.0, 0.8, 0.1, 20, "4:1")]
    mark_frontier(cands)
    assert [c.frontier for c in cands] == [False, True, False]
    assert svg(cands, "top1").startswith("<svg")


def test_recipe_toml_round_trips(tmp_path):
    recipe = dataclasses.replace(load_recipe("int8-static"), layer=(LayerOverride("a[[]1]", 4), LayerOverride("*", 32)))
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(recipe, "header"))
    tomllib.loads(path.read_text())
    assert load_recipe(str(path)) == dataclasses.replace(recipe, name=recipe.name)


# -- tune end to end ---------------------------------------------------------------------


def test_tune_keeps_the_sensitive_layer_at_8_bits(mlp_case, tmp_path):
    model_path, data = mlp_case
    out = tmp_path / "out" / "mlp.tuned.onnx"
    out.parent.mkdir()
    before = model_path.read_bytes()
    result = tune(model_path, data, out, metric="cosine", max_drop="0.03", bits="8,4",
                  cache_dir=tmp_path / "cache", plot_path=tmp_path / "out" / "frontier.svg")
    bits = {g.members[0]: b for g, b in zip(result.groups, result.bits)}
    assert bits["fc2"] == 8  # the sensitive layer stays at higher precision
    assert bits["fc1"] == bits["fc3"] == bits["fc4"] == 4  # the rest is quantized to 4
    assert result.within_budget and result.drop <= 0.03
    assert model_path.read_bytes() == before  # the input model is never modified
    # the written recipe reproduces the model through convert
    recipe = load_recipe(str(result.recipe_path))
    again, _, _ = convert_model(ir.load(model_path), recipe)
    x = np.random.default_rng(9).standard_normal((3, K)).astype(np.float32)
    np.testing.assert_array_equal(run(ir.to_proto(again).SerializeToString(), x), run(out, x))
    # the frontier compares with uniform int8 and int4; the tuned model beats uniform 4
    labels = {c.label: c for c in result.candidates if c.split == "held-out"}
    assert {"float", "uniform 8", "uniform 4", "tuned"} <= set(labels)
    assert labels["tuned"].size_bytes < labels["uniform 8"].size_bytes
    assert labels["tuned"].drop < labels["uniform 4"].drop
    assert result.frontier_path.read_text().count("| tuned |") == 1
    assert (tmp_path / "out" / "frontier.svg").read_text().startswith("<svg")
    # a second run measures nothing again: everything comes from the cache
    again_result = tune(model_path, data, out, metric="cosine", max_drop="0.03", bits="8,4",
                        cache_dir=tmp_path / "cache", uniform=False)
    assert again_result.measured == 0 and again_result.bits == result.bits


def test_tune_target_size_and_top1(mlp_case, tmp_path):
    model_path, data = mlp_case
    out = tmp_path / "small.onnx"
    float_mb = model_path.stat().st_size / 1e6
    result = tune(model_path, data, out, target_mb=float_mb * 0.3, bits="8,4", uniform=False)
    assert result.metric == "top1"  # labels.txt present: the default metric
    assert result.size_bytes <= float_mb * 0.3 * 1e6
    assert out.stat().st_size == result.size_bytes


def margin_split(model: Path, folder: Path, wide: bool, n: int = 12) -> Path:
    """Samples whose top-2 logits are far apart (wide) or nearly tied, labelled by argmax."""
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((2000, K)).astype(np.float32)
    y = run(model, xs)
    top2 = np.sort(y, axis=1)[:, -2:]
    order = np.argsort(top2[:, 1] - top2[:, 0])
    pick = order[-n:] if wide else order[:n]
    folder.mkdir()
    for i, j in enumerate(pick):
        np.save(folder / f"{i:03d}.npy", xs[j : j + 1])
    (folder / "labels.txt").write_text("\n".join(str(int(y[j].argmax())) for j in pick) + "\n")
    return folder


def test_tune_fallback_when_held_out_drop_exceeds_budget(tmp_path):
    """top-1 cannot move on wide-margin search samples, so the search lowers everything;
    nearly tied held-out samples flip, and the fallback raises groups until none flips."""
    model_path = mlp(tmp_path / "mlp.onnx")
    search = margin_split(model_path, tmp_path / "wide", wide=True)
    held = margin_split(model_path, tmp_path / "tied", wide=False)
    result = tune(model_path, search, tmp_path / "t.onnx", eval_data=held, metric="top1", max_drop=0.0,
                  bits="4", uniform=False)
    verified = [c for c in result.candidates if c.split == "held-out"]
    assert verified[0].label == "tuned" and verified[0].drop > 0.0  # the search split was fooled
    assert result.fallback_steps >= 1 and verified[-1].label == f"tuned, fallback {result.fallback_steps}"
    assert result.within_budget and result.drop <= 0.0
    assert result.bits[result.groups.index(next(g for g in result.groups if g.key == "fc2"))] == 32


def test_tune_budget_minutes_is_respected(mlp_case, tmp_path):
    import time

    model_path, data = mlp_case
    start = time.monotonic()
    result = tune(model_path, data, tmp_path / "t.onnx", metric="cosine", max_drop="1%", bits="8,4,2",
                  budget_minutes=0.02, uniform=True)
    assert time.monotonic() - start < 0.02 * 60 + 5  # one measurement of slack
    assert result.output.exists()


# -- the command line --------------------------------------------------------------------


def test_cli_tune_json_and_usage_errors(mlp_case, tmp_path, capsys):
    import json

    from qtool.cli import run

    model_path, data = mlp_case
    out = tmp_path / "cli.onnx"
    assert run(["tune", str(model_path), "--data", str(data), "-o", str(out), "--metric", "cosine",
                "--max-drop", "0.03", "--no-cache", "--no-uniform", "--json", "-q"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["within_budget"] and doc["groups_per_bits"] == {"8": 1, "4": 3}
    assert Path(doc["recipe"]).exists() and out.exists()
    cases = [
        (["--bits", "16,8"], 2, "fp16 per layer"),
        (["--max-drop", "0.1", "--target-size", "1"], 2, "alternatives"),
        (["--max-drop", "lots"], 2, "not a number"),
        (["--plot", str(tmp_path / "f.gif")], 2, "unknown image type"),
        (["--metric", "top1", "--data", str(tmp_path)], 1, "holds no samples"),
    ]
    for extra, code, text in cases:
        argv = ["tune", str(model_path), "--data", str(data), "-o", str(tmp_path / "x.onnx"), "--no-cache", *extra]
        assert run(argv) == code, extra
        err = capsys.readouterr().err
        assert "error:" in err and text in err and "Traceback" not in err, err
    assert run(["tune", str(tmp_path / "missing.onnx"), "--data", str(data), "-o", str(out)]) == 1
    assert run(["tune", str(model_path), "--data", str(data), "-o", str(model_path)]) != 0  # never overwrite the input


def test_role_groups_become_one_glob_and_a_3_channel_conv_takes_8_bits_only(tmp_path):
    from qtool.tuning import tuned_recipe
    from qtool.tuning.groups import find_groups

    model = ir.load(cnn(tmp_path / "cnn.onnx"))
    static = find_groups(model, "int8-static", (8, 4), 128, "layer")
    assert {g.key: g.choices for g in static} == {"conv": (32, 8), "head": (32, 8, 4)}
    assert [g.key for g in find_groups(model, "weight-only", (8, 4), 128, "layer")] == ["head"]

    mlp_model = ir.load(mlp(tmp_path / "mlp.onnx"))
    for i, node in enumerate(n for n in mlp_model.graph if n.op_type == "MatMul"):
        node.name = f"block.{i}/fc" if i < 3 else "head"
    groups = find_groups(mlp_model, "weight-only", (8, 4), 128, "role")
    assert [(g.key, len(g.members)) for g in groups] == [("block.#/fc", 3), ("head", 1)]
    names = [n.name for n in mlp_model.graph]
    recipe = tuned_recipe(Recipe(), groups, [8, 4], names)
    assert [(r.match, r.bits) for r in recipe.layer] == [("block.*/fc", 8), ("head", 4), ("*", 32)]


# -- Conv below 8 bits in the int8-static scheme -----------------------------------------

C = 32  # channels: one block of input channels per (output channel, kernel position)


def sensitive_cnn(path: Path) -> Path:
    """x[1,16,8,8] -> convA 3x3 -> relu -> convB 1x1 (sensitive) -> relu -> convC 3x3 -> relu
    -> GlobalAveragePool -> Flatten -> head MatMul [32, 10]; opset 17 (Flatten changes in 21).

    convB is the MLP's trick in a Conv: convA's channel DEAD is always 0 after the ReLU, and
    convB's weights on that input channel are OUTLIER x its largest other weight. 4-bit blocks
    of input channels scale to the outlier and round every other weight to 0; int8 keeps them.
    """
    rng = np.random.default_rng(5)
    wa = (rng.standard_normal((C, 16, 3, 3)) / np.sqrt(16 * 9)).astype(np.float32)
    ba = np.full(C, 0.1, np.float32)
    wa[DEAD] = 0.0
    ba[DEAD] = -1.0
    wb = (rng.standard_normal((C, C, 1, 1)) / np.sqrt(C)).astype(np.float32)
    wb[:, DEAD] = OUTLIER * np.abs(wb).max()
    wc = (rng.standard_normal((C, C, 3, 3)) / np.sqrt(C * 9)).astype(np.float32)
    wh = (rng.standard_normal((C, 10)) / np.sqrt(C)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="reluA"),
        helper.make_node("Conv", ["ra", "wb"], ["b"], name="convB"),
        helper.make_node("Relu", ["b"], ["rb"], name="reluB"),
        helper.make_node("Conv", ["rb", "wc"], ["c"], name="convC", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["rc"], name="reluC"),
        helper.make_node("GlobalAveragePool", ["rc"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "wh"], ["y"], name="head"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((wa, "wa"), (ba, "ba"), (wb, "wb"), (wc, "wc"), (wh, "wh"))]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_int8_recipe_with_a_4bit_conv_dequantizes_its_weight_and_keeps_float_activations(tmp_path):
    from qtool.pipeline import calibrate

    model_path = sensitive_cnn(tmp_path / "cnn.onnx")
    data = samples(tmp_path / "data", model_path, n=16, shape=(1, 16, 8, 8))
    recipe = dataclasses.replace(load_recipe("int8-static"), layer=(LayerOverride("convC", 4),))
    table = calibrate(model_path, data, recipe)
    out, reports, _ = convert_model(ir.load(model_path), recipe, table=table)
    assert all(r.counts.get("Conv -> DequantizeLinear (4-bit)", 0) == 0 for r in reports)  # opset 17: refused
    notes = next(r for r in reports if r.name == "weight_only").notes
    assert any(n.startswith("convC: not weight-only") and "--allow-opset-upgrade" in n for n in notes)
    conv_c = next(n for n in out.graph if n.name == "convC")  # int8 instead, like the others
    assert conv_c.inputs[1].producer().inputs[0].const_value.dtype == ir.DataType.INT8
    recipe = recipe.override("quantize", allow_opset_upgrade=True)
    out, reports, _ = convert_model(ir.load(model_path), recipe, table=table)
    assert out.opset_imports[""] == 21
    conv = next(n for n in out.graph if n.op_type == "Conv" and n.name == "convC_q")
    dq = conv.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value.dtype == ir.DataType.INT4
    assert dq.attributes.get_int("axis") == 1
    assert "convC_q" in next(r for r in reports if r.name == "qdq").skipped  # the int8 pass leaves it float
    assert conv.outputs[0].uses()[0].node.op_type == "Relu"  # no QuantizeLinear on its output
    others = [n for n in out.graph if n.op_type == "Conv" and n is not conv]
    assert len(others) == 2 and all(n.inputs[1].producer().inputs[0].const_value.dtype == ir.DataType.INT8
                                    for n in others)  # convA, convB: int8 QDQ
    x = np.load(data / "000.npy")
    assert sqnr(run(model_path, x), run(ir.to_proto(out).SerializeToString(), x)) > 15.0


def test_tune_keeps_the_sensitive_conv_at_8_bits_and_lowers_the_rest_to_4(tmp_path):
    model_path = sensitive_cnn(tmp_path / "cnn.onnx")
    data = samples(tmp_path / "data", model_path, n=24, shape=(1, 16, 8, 8))
    out = tmp_path / "cnn.tuned.onnx"
    # Without the upgrade, the opset-17 model's Convs take 8 bits only, and tune says why.
    kept = tune(model_path, data, out, metric="cosine", max_drop="0.03", bits="8,4", uniform=False)
    assert {g.key: g.choices for g in kept.groups}["convB"] == (32, 8)
    assert any("--allow-opset-upgrade" in n for n in kept.notes)
    result = tune(model_path, data, out, metric="cosine", max_drop="0.03", bits="8,4", allow_opset_upgrade=True,
                  cache_dir=tmp_path / "cache")
    assert {g.key: g.choices for g in result.groups} == {k: (32, 8, 4) for k in ("convA", "convB", "convC", "head")}
    bits = {g.key: b for g, b in zip(result.groups, result.bits)}
    assert bits == {"convA": 4, "convB": 8, "convC": 4, "head": 4}
    assert result.within_budget and result.drop <= 0.03
    labels = {c.label: c for c in result.candidates if c.split == "held-out"}
    assert labels["tuned"].size_bytes < labels["uniform 8"].size_bytes
    assert labels["tuned"].drop < labels["uniform 4"].drop
    # the written recipe (allow_opset_upgrade = true) and table reproduce the model
    recipe = load_recipe(str(result.recipe_path))
    from qtool.calibration import CalibrationTable

    table = CalibrationTable.load(result.table_path)
    again, _, _ = convert_model(ir.load(model_path), recipe, table=table)
    x = np.load(data / "001.npy")
    np.testing.assert_array_equal(run(ir.to_proto(again).SerializeToString(), x), run(out, x))
    assert ops(ir.load(out))["Conv"] == 3 and ir.load(out).opset_imports[""] == 21


def test_conv_group_bytes_count_a_scale_per_block_of_input_channels():
    # W[64, 24, 3, 3] in blocks of 16: ceil(24 / 16) = 2 scales per (output channel, position)
    g = Group("conv", ("conv",), ("Conv",), 64 * 24 * 9, (32, 8, 4), k=24)
    assert group_bytes(g, 4, "int8-static", 16) == 64 * 24 * 9 / 2 + 4 * 64 * 9 * 2
    assert group_bytes(g, 8, "int8-static", 16) == 64 * 24 * 9  # int8 (per-channel scales ignored)


def test_cli_tune_allow_opset_upgrade_lets_convs_take_4_bits(tmp_path, capsys):
    import json

    from qtool.cli import run as cli

    model_path = sensitive_cnn(tmp_path / "cnn.onnx")
    data = samples(tmp_path / "data", model_path, n=16, shape=(1, 16, 8, 8))
    argv = ["tune", str(model_path), "--data", str(data), "-o", str(tmp_path / "t.onnx"), "--metric", "cosine",
            "--max-drop", "0.03", "--no-cache", "--no-uniform", "--json", "-q"]
    assert cli(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(g["bits"] >= 8 for g in doc["groups"] if g["op_type"] == "Conv")  # opset 17: no 4-bit Conv
    assert cli([*argv, "--allow-opset-upgrade"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["groups_per_bits"] == {"8": 1, "4": 3} and doc["within_budget"]
    assert {g["key"]: g["bits"] for g in doc["groups"]}["convB"] == 8
