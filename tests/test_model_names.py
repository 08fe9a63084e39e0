"""Unnamed nodes get stable names at load (qtool.model.load), so every command works on them.

Node names are optional in ONNX and many exporters and hand-built graphs leave them out;
recipes, tune's groups and reports address layers by name.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from conftest import onnx_model, value_info
from onnx import TensorProto, helper, numpy_helper

from qtool.cli import run
from qtool.model import iter_nodes, load

K = 64


def _unnamed_mlp(path):
    """x[N,64] -> MatMul -> Add -> Relu -> MatMul -> Relu -> MatMul -> y[N,10]; no node has a name."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.full(K, 0.1, np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((K, K)) / np.sqrt(K)).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal((K, 10)) / np.sqrt(K)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["y"]),
    ]
    onnx.save(onnx_model(nodes, [value_info("x", ["N", K])], [value_info("y", ["N", 10])], inits), path)
    return path


def _data(folder, n=16):
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(n):
        np.save(folder / f"s{i:02d}.npy", rng.standard_normal((1, K)).astype(np.float32))
    return folder


def _outputs(path, data):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": np.load(f)})[0] for f in sorted(data.glob("*.npy"))])


def _op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_unnamed_nodes_get_op_type_names_stable_across_loads(tmp_path):
    path = _unnamed_mlp(tmp_path / "m.onnx")
    assert all(not n.name for n in onnx.load(str(path)).graph.node)
    first = [n.name for n in iter_nodes(load(path))]
    second = [n.name for n in iter_nodes(load(path))]
    assert first == second == ["MatMul_0", "Add_0", "Relu_0", "MatMul_1", "Relu_1", "MatMul_2"]


def test_generated_names_skip_names_taken_anywhere_including_subgraphs(tmp_path):
    """A branch of an If already holds ``Relu_0`` and the main graph ``Neg_0``: neither is reused."""
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"], name="Relu_0"), helper.make_node("Neg", ["t"], ["t2"])],
        "then", [], [helper.make_tensor_value_info("t2", TensorProto.FLOAT, [2])])
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="Neg_0"),
        helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "if.onnx")

    names = [n.name for n in iter_nodes(load(tmp_path / "if.onnx"))]
    # Numbered in iter_nodes order: the main graph first, then the If's branches.
    assert sorted(names) == sorted(["Relu_1", "ReduceSum_0", "Neg_0", "If_0", "Relu_0", "Neg_1", "Relu_2"])
    assert len(set(names)) == len(names)
    assert names == [n.name for n in iter_nodes(load(tmp_path / "if.onnx"))]


def test_a_model_whose_nodes_all_have_names_is_unchanged(tmp_path):
    path = _unnamed_mlp(tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    for i, node in enumerate(proto.graph.node):
        node.name = f"layer{i}"
    onnx.save(proto, tmp_path / "named.onnx")
    loaded = ir.to_proto(load(tmp_path / "named.onnx")).SerializeToString()
    assert loaded == ir.to_proto(ir.load(tmp_path / "named.onnx")).SerializeToString()


def test_convert_static_dynamic_and_4bit_on_unnamed_nodes(tmp_path):
    path = _unnamed_mlp(tmp_path / "m.onnx")
    data = _data(tmp_path / "d")
    ref = _outputs(path, data)
    cases = {
        "static": (["--data", str(data), "--scheme", "int8-static"], "QuantizeLinear", 0.99),
        "dynamic": (["--dynamic"], "DynamicQuantizeMatMul", 0.99),
        "int4": (["--bits", "4"], "MatMulNBits", 0.95),  # 4-bit RTN of Gaussian weights: about 0.98
    }
    for label, (flags, op, floor) in cases.items():
        out = tmp_path / f"{label}.onnx"
        assert run(["convert", str(path), "-o", str(out), "-q", *flags]) == 0, label
        assert op in _op_types(out), label
        got = _outputs(out, data)
        cos = float(np.sum(ref * got) / np.sqrt(np.sum(ref * ref) * np.sum(got * got)))
        assert cos > floor, (label, cos)
    # A per-layer rule addresses a generated name: MatMul_1 stays float, the others go 4-bit.
    recipe = tmp_path / "r.toml"
    recipe.write_text('[quantize]\nbits = 4\nformat = "matmulnbits"\n\n[[layer]]\nmatch = "MatMul_1"\nbits = 32\n')
    out = tmp_path / "mixed.onnx"
    assert run(["convert", str(path), "-o", str(out), "-q", "--recipe", str(recipe)]) == 0
    kinds = [n.op_type for n in onnx.load(str(out)).graph.node if n.op_type in ("MatMul", "MatMulNBits")]
    assert sorted(kinds) == ["MatMul", "MatMulNBits", "MatMulNBits"]


def test_inspect_calibrate_and_diagnose_on_unnamed_nodes(tmp_path, capsys):
    path = _unnamed_mlp(tmp_path / "m.onnx")
    data = _data(tmp_path / "d")
    assert run(["inspect", str(path), "--json"]) == 0
    capsys.readouterr()
    assert run(["calibrate", str(path), "--data", str(data), "-o", str(tmp_path / "t.json"), "-q"]) == 0
    out = tmp_path / "q.onnx"
    assert run(["convert", str(path), "-o", str(out), "-q", "--calib", str(tmp_path / "t.json")]) == 0
    capsys.readouterr()
    assert run(["eval", str(out), "--reference", str(path), "--data", str(data), "--diagnose",
                "--json", "-", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["diagnosis"]["layers"], report.get("diagnosis")


def test_tune_on_unnamed_nodes(tmp_path, capsys):
    """Before names were given at load, tune found no layer: "no layer ... can take 8,4 bits"."""
    path = _unnamed_mlp(tmp_path / "m.onnx")
    data = _data(tmp_path / "d", n=20)
    out = tmp_path / "t.onnx"
    code = run(["tune", str(path), "--data", str(data), "-o", str(out), "--metric", "cosine",
                "--max-drop", "0.05", "--bits", "8,4", "--no-cache", "--no-uniform", "--json", "-q"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert {g["key"] for g in result["groups"]} == {"MatMul_0", "MatMul_1", "MatMul_2"}
    assert any(g["bits"] < 32 for g in result["groups"])
    # The recipe tune wrote reproduces the tuned model on the unnamed source, byte for byte.
    again = tmp_path / "again.onnx"
    assert run(["convert", str(path), "-o", str(again), "-q", "--recipe", str(tmp_path / "t.recipe.toml")]) == 0
    a, b = onnx.load(str(out)), onnx.load(str(again))
    for m in (a, b):
        del m.metadata_props[:]
    assert a.SerializeToString() == b.SerializeToString()
