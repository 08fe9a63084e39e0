"""Model I/O, dataset folders, recipes and the CLI's error contract (issue 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool import model as qmodel
from qtool.cli import run
from qtool.config import Recipe, load_recipe, preset_names, recipe_from_dict
from qtool.data import Dataset, input_specs
from qtool.errors import DataError, ModelError, RecipeError, UsageError


def matmul_model(k: int = 4, n: int = 8, batch="N") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "mm.onnx"
    onnx.save(matmul_model(), path)
    return path


def cli(*args: str) -> int:
    return run([str(a) for a in args])


def assert_error(capsys, code: int, expected_code: int, fragment: str) -> None:
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("error:"), err
    assert any(ln.startswith("hint:") for ln in lines), err
    assert "Traceback" not in err
    assert fragment in err, err


# -- model I/O ---------------------------------------------------------------------------


def test_missing_file(capsys, tmp_path):
    assert_error(capsys, cli("inspect", tmp_path / "nope.onnx"), 1, "not found")


def test_not_onnx(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf, it is plain text\n" * 10)
    assert_error(capsys, cli("inspect", bad), 1, "not")


def test_truncated_onnx(capsys, tmp_path, model_path):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_error(capsys, cli("inspect", cut), 1, "cut.onnx")


def test_missing_external_data(capsys, tmp_path):
    folder = tmp_path / "ext"
    folder.mkdir()
    proto = matmul_model(64, 64)
    onnx.save(proto, folder / "m.onnx", save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    (folder / "m.onnx.data").unlink()
    assert_error(capsys, cli("inspect", folder / "m.onnx"), 1, "external data file missing")


def test_inspect_reports_model(capsys, model_path):
    assert cli("inspect", model_path, "--json") == 0
    report = json.loads(capsys.readouterr().out)["model"]
    assert report["parameters"] == 32
    assert report["op_types"] == {"MatMul": 1}
    assert report["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 4]}]
    assert report["quantization_candidates"]["MatMul"]["weight_params"] == 32


def test_inspect_hw(capsys, model_path):
    assert cli("inspect", model_path, "--hw", "--json") == 0
    hw = json.loads(capsys.readouterr().out)["hardware"]
    assert hw["runtime"]["providers"]
    assert "CPUExecutionProvider" in hw["runtime"]["providers"]
    assert hw["qtool_kernels"]["backend"] in ("native", "numpy")


def test_inspect_external_data_does_not_read_weights(tmp_path):
    """A 300 MB external initializer inspects with peak memory far below 300 MB."""
    folder = tmp_path / "big"
    folder.mkdir()
    k, n = 7680, 10240  # 78.6 M float32 = 300 MiB
    w = numpy_helper.from_array(np.zeros((1, 1), np.float32), "W")
    proto = matmul_model(1, 1)
    proto.graph.initializer[0].CopyFrom(w)
    # Write the weight bytes straight to the data file, never holding them in memory.
    data = folder / "big.onnx.data"
    with open(data, "wb") as f:
        f.truncate(k * n * 4)
    init = proto.graph.initializer[0]
    init.ClearField("raw_data")
    init.dims[:] = [k, n]
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(k * n * 4))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = k
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = n
    onnx.save(proto, folder / "big.onnx")
    # The peak is this process's own: /proc's VmHWM starts afresh at exec, while ru_maxrss
    # keeps the forking parent's (pytest's, hundreds of MB late in a full run).
    script = textwrap.dedent(f"""
        import resource, sys
        from qtool.cli import run
        code = run(["inspect", {str(folder / 'big.onnx')!r}, "--json", "-q"])
        try:
            with open("/proc/self/status") as status:
                hwm = next(line for line in status if line.startswith("VmHWM:"))
            peak_mb = int(hwm.split()[1]) / 1024
        except (OSError, StopIteration):
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("PEAK", peak_mb, code, file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    peak = float(result.stderr.split("PEAK")[1].split()[0])
    report = json.loads(result.stdout)["model"]
    assert report["parameters"] == k * n
    assert report["external_data_bytes"] == k * n * 4
    # The interpreter, numpy and onnxruntime alone take ~120 MB; the weights would add 300.
    assert peak < 250, f"inspect peaked at {peak:.0f} MB"


def test_save_is_atomic_and_refuses_input(tmp_path, model_path):
    model = qmodel.load(model_path)
    before = model_path.read_bytes()
    with pytest.raises(UsageError, match="is the input model"):
        qmodel.save(model, model_path, input_path=model_path)
    assert model_path.read_bytes() == before
    out = tmp_path / "out.onnx"
    qmodel.add_provenance(model, recipe={"name": "test"}, source=model_path.name)
    result = qmodel.save(model, out, input_path=model_path)
    assert result.path == out and out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qtool-")]
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props["qtool.version"]
    assert json.loads(props["qtool.recipe"]) == {"name": "test"}
    assert model_path.read_bytes() == before


def test_save_external_data(tmp_path, model_path):
    model = qmodel.load(model_path)
    result = qmodel.save(model, tmp_path / "ext.onnx", external_data=True)
    assert result.external_data is not None and result.external_data.exists()
    reloaded = qmodel.load(tmp_path / "ext.onnx")
    weight = reloaded.graph.initializers["W"].const_value
    np.testing.assert_array_equal(weight.numpy(), model.graph.initializers["W"].const_value.numpy())


def test_save_bad_output_dirs(tmp_path, model_path):
    model = qmodel.load(model_path)
    with pytest.raises(UsageError, match="does not exist"):
        qmodel.save(model, tmp_path / "missing" / "out.onnx")


def test_save_unwritable_output_dir(tmp_path, model_path, monkeypatch):
    """CI runs as root, which ignores mode bits: fake the access answer instead of chmod."""
    import os

    model = qmodel.load(model_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    with pytest.raises(UsageError, match="not writable"):
        qmodel.save(model, tmp_path / "out.onnx")


def test_verify_failure_writes_nothing(tmp_path, model_path):
    model = qmodel.load(model_path)
    # An op that does not exist: onnxruntime refuses the graph.
    model.graph.node(0).op_type = "NoSuchOp"
    out = tmp_path / "broken.onnx"
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        qmodel.save(model, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mm.onnx"]


def matmulnbits_model(b_shape: tuple[int, ...], k: int = 64, n: int = 8, bs: int = 32) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.full(b_shape, 0x88, np.uint8), "B"),
             numpy_helper.from_array(np.ones((n, -(-k // bs)), np.float32), "S")]
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", name="mnb",
                            K=k, N=n, bits=4, block_size=bs, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("b_shape", [(8, 3, 16), (8, 2, 8)])
def test_verify_rejects_matmulnbits_shapes_that_prepacking_would(tmp_path, b_shape):
    """verify_loads skips onnxruntime's weight prepacking (the slow part), which is where
    onnxruntime rejects a MatMulNBits B of the wrong shape; save checks those shapes itself."""
    src = tmp_path / "src.onnx"
    onnx.save(matmulnbits_model(b_shape), src)
    out = tmp_path / "out.onnx"
    with pytest.raises(ModelError, match="would fail in onnxruntime: mnb: B has shape"):
        qmodel.save(qmodel.load(src), out)
    assert not out.exists()
    good = tmp_path / "good.onnx"
    onnx.save(matmulnbits_model((8, 2, 16)), src)
    qmodel.save(qmodel.load(src), good)
    assert good.exists()


def test_fingerprint_tracks_structure(model_path):
    a = qmodel.graph_fingerprint(qmodel.load(model_path))
    assert a == qmodel.graph_fingerprint(qmodel.load(model_path))
    other = matmul_model(4, 9)
    assert a != qmodel.graph_fingerprint(qmodel.ir.from_proto(other))


# -- dataset folders ---------------------------------------------------------------------


def specs(model_path):
    return input_specs(qmodel.load(model_path))


def test_empty_dataset(tmp_path, model_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no samples"):
        Dataset(tmp_path / "empty", specs(model_path))


def test_npy_batches_and_batch_axis(tmp_path, model_path):
    folder = tmp_path / "d"
    folder.mkdir()
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(4).astype(np.float32) for _ in range(5)]  # no batch axis
    for i, a in enumerate(arrays):
        np.save(folder / f"s{i}.npy", a)
    ds = Dataset(folder, specs(model_path))
    batches = list(ds.batches(2))
    assert [ids for ids, _ in batches] == [[0, 1], [2, 3], [4]]
    np.testing.assert_array_equal(batches[0][1]["x"], np.stack(arrays[:2]))
    # Shards together see exactly the batches of one run.
    shard_ids = sorted(i for s in range(3) for ids, _ in ds.batches(2, shard=(s, 3)) for i in ids)
    assert shard_ids == [0, 1, 2, 3, 4]
    assert [ids for ids, _ in ds.batches(1, limit=2)] == [[0], [1]]
    with pytest.raises(DataError, match="out of range"):
        list(ds.batches(1, shard=(3, 3)))


def test_npz_wrong_name_dtype_shape(tmp_path, model_path):
    cases = {
        "name": ({"z": np.zeros((1, 4), np.float32)}, "no array for model input 'x'"),
        "dtype": ({"x": np.zeros((1, 4), np.int64)}, "has dtype int64"),
        "shape": ({"x": np.zeros((1, 5), np.float32)}, "dimension 1 must be 4"),
        "rank": ({"x": np.zeros((1, 1, 1, 4), np.float32)}, "has shape [1, 1, 1, 4]"),
    }
    for label, (arrays, fragment) in cases.items():
        folder = tmp_path / label
        folder.mkdir()
        np.savez(folder / "a.npz", **arrays)
        ds = Dataset(folder, specs(model_path))
        with pytest.raises(DataError) as info:
            list(ds.batches(1))
        assert fragment in info.value.message, (label, info.value.message)
        assert "a.npz" in info.value.message
        assert info.value.hint


def test_onnx_test_data_layout(tmp_path, model_path):
    for i in range(2):
        sample = tmp_path / "pb" / f"test_data_set_{i}"
        sample.mkdir(parents=True)
        tensor = numpy_helper.from_array(np.full((1, 4), i, np.float32), "x")
        (sample / "input_0.pb").write_bytes(tensor.SerializeToString())
    ds = Dataset(tmp_path / "pb", specs(model_path))
    values = [feed["x"][0, 0] for _, feed in ds.batches(1)]
    assert values == [0.0, 1.0]


def test_images_with_preprocess(tmp_path):
    from PIL import Image

    from qtool.config import PreprocessConfig
    from qtool.data import InputSpec

    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 51)).save(folder / "a.png")
    (folder / "labels.txt").write_text("7\n")
    spec = InputSpec("img", np.dtype(np.float32), (None, 3, 16, 16))
    pre = PreprocessConfig(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    ds = Dataset(folder, [spec], pre)
    (_, feed), = list(ds.batches(1))
    x = feed["img"]
    assert x.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(x[0, :, 8, 8], [1.0, -1.0, (51 / 255 - 0.5) / 0.5], atol=1e-5)
    assert ds.labels().tolist() == [7]


def test_labels_count_mismatch(tmp_path, model_path):
    folder = tmp_path / "l"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros(4, np.float32))
    (folder / "labels.txt").write_text("1\n2\n")
    with pytest.raises(DataError, match="2 labels for 1 samples"):
        Dataset(folder, specs(model_path)).labels()


# -- recipes -----------------------------------------------------------------------------


def test_presets_load():
    assert {"int8-static", "int8-dynamic", "int4-weight-only", "fp16"} <= set(preset_names())
    assert load_recipe("int8-dynamic").quantize.dynamic is True
    assert load_recipe("int4-weight-only").quantize.bits == 4


def test_unknown_recipe_keys_rejected_by_name(tmp_path):
    with pytest.raises(RecipeError, match="'quantize.bitz'"):
        recipe_from_dict({"quantize": {"bitz": 4}})
    with pytest.raises(RecipeError, match="'quantise'"):
        recipe_from_dict({"quantise": {}})
    path = tmp_path / "r.toml"
    path.write_text("[calibration]\nmethod = 'entropy'\nbinz = 3\n")
    with pytest.raises(RecipeError, match="calibration.binz") as info:
        load_recipe(path)
    assert "bins" in info.value.hint


def test_recipe_overrides_and_layers(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[quantize]\nbits = 4\n[[layer]]\nmatch = "head*"\nbits = 8\n')
    recipe = load_recipe(path)
    assert recipe.bits_for("head/MatMul", "MatMul", 4) == 8
    assert recipe.bits_for("body/MatMul", "MatMul", 4) == 4
    changed = recipe.override("quantize", bits=8, per_channel=None)
    assert changed.quantize.bits == 8 and changed.quantize.per_channel is True
    assert recipe.quantize.bits == 4  # frozen: the original is untouched
    assert Recipe().calibration.bins == 2048


def test_recipe_bad_type_and_missing(tmp_path):
    with pytest.raises(RecipeError, match="must be an integer"):
        recipe_from_dict({"quantize": {"bits": "four"}})
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe("no-such-recipe")


def test_cli_usage_error_is_one_line(capsys, model_path):
    assert_error(capsys, cli("inspect", model_path, "--no-such-flag"), 2, "--no-such-flag")


def test_cli_version(capsys):
    assert cli("--version") == 0
    assert capsys.readouterr().out.startswith("qtool ")


def test_require_opset_relabels_only_when_exact(model_path):
    model = qmodel.load(model_path)  # opset 17, one MatMul: unchanged up to 21
    with pytest.raises(UsageError, match="needs opset 21") as info:
        qmodel.require_opset(model, 21, "int4 blocks", allow_upgrade=False)
    assert "--allow-opset-upgrade" in info.value.hint
    qmodel.require_opset(model, 21, "int4 blocks", allow_upgrade=True)
    assert model.opset_imports[""] == 21
    # ReduceMean moved its axes from an attribute to an input at opset 18.
    proto = matmul_model()
    proto.graph.node.append(helper.make_node("ReduceMean", ["y"], ["m"], axes=[1], name="rm"))
    proto.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 1]))
    reduce_model = qmodel.ir.from_proto(proto)
    with pytest.raises(UsageError, match="ReduceMean"):
        qmodel.require_opset(reduce_model, 21, "int4 blocks", allow_upgrade=True)
    assert reduce_model.opset_imports[""] == 17


# -- every bad input through the real commands, input model untouched ---------------------


def test_bad_inputs_through_the_cli_leave_the_model_untouched(capsys, tmp_path, model_path, monkeypatch):
    import os

    good = tmp_path / "good"
    good.mkdir()
    np.save(good / "a.npy", np.ones((1, 4), np.float32))
    folders = {}
    for label, arrays in {
        "name": {"z": np.zeros((1, 4), np.float32)},
        "dtype": {"x": np.zeros((1, 4), np.int64)},
        "shape": {"x": np.zeros((1, 7), np.float32)},
    }.items():
        folders[label] = tmp_path / label
        folders[label].mkdir()
        np.savez(folders[label] / "s.npz", **arrays)
    (tmp_path / "empty").mkdir()
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[quantize]\nbitz = 4\n")
    out = tmp_path / "out.onnx"
    table = tmp_path / "t.json"
    before = model_path.read_bytes()
    cases = [
        (("calibrate", model_path, "--data", tmp_path / "empty", "-o", table), 1, "holds no samples"),
        (("calibrate", model_path, "--data", folders["name"], "-o", table), 1, "no array for model input 'x'"),
        (("calibrate", model_path, "--data", folders["dtype"], "-o", table), 1, "has dtype int64"),
        (("calibrate", model_path, "--data", folders["shape"], "-o", table), 1, "dimension 1 must be 4"),
        (("convert", model_path, "-o", out, "--recipe", recipe), 2, "quantize.bitz"),
        (("convert", model_path, "-o", model_path, "--bits", "4"), 2, "is the input model"),
        (("convert", model_path, "-o", tmp_path / "nodir" / "o.onnx", "--bits", "4"), 2, "does not exist"),
        (("eval", model_path, "--data", tmp_path / "empty"), 1, "holds no samples"),
    ]
    for args, code, fragment in cases:
        assert_error(capsys, cli(*args), code, fragment)
        assert model_path.read_bytes() == before, args
        assert not out.exists() and not table.exists(), args
    # An output folder that cannot be written (root ignores mode bits: fake the answer).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    assert_error(capsys, cli("convert", model_path, "-o", out, "--bits", "4"), 2, "not writable")
    monkeypatch.undo()
    # A run that could not compress anything (K=4 is below one block) says so, exit 3,
    # and writes nothing; a good run leaves the input untouched too.
    assert cli("convert", model_path, "-o", out, "--bits", "4", "--block-size", "32", "-q") == 3
    err = capsys.readouterr().err
    assert "error: nothing was quantized" in err and "smaller than one block" in err
    assert "not supported by this scheme" not in err.split("error:")[1]  # only the ops it handles
    assert model_path.read_bytes() == before and not out.exists()
    assert cli("convert", model_path, "-o", out, "--dtype", "fp16", "-q") == 0
    assert model_path.read_bytes() == before and out.exists()


def test_sympy_is_imported_only_when_used():
    """The CLI defers onnx-ir's sympy import (a third of start-up); symbolic-dimension
    arithmetic and a user's own `import sympy` still get the real module. Importing qtool
    as a library defers nothing."""
    lib = "import sys, qtool.model, onnx_ir; print(type(sys.modules['sympy']).__name__)"
    out = subprocess.run([sys.executable, "-c", lib], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "module"
    code = textwrap.dedent("""
        import sys
        import qtool.cli
        import onnx_ir as ir
        print(type(sys.modules["sympy"]).__name__)
        print(ir.SymbolicDim("n") * 2 + 1)
        import sympy
        print(sympy.Symbol("x") + 1, type(sys.modules["sympy"]).__name__)
        from sympy.core import Expr
        print(isinstance(sympy.Symbol("y"), Expr))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:4] == ["_Deferred", "2*n + 1", "x + 1 module", "True"]


def test_a_literal_minus_one_dimension_means_any_size(tmp_path):
    """Paddle and TF exporters write dynamic dimensions as -1; samples of any size fit them."""
    from qtool.data import Dataset, input_specs
    from qtool.model import load

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "a.npy", np.zeros((1, 3, 48, 192), np.float32))
    ds = Dataset(tmp_path / "d", input_specs(load(path)))
    assert ds.load_sample(0)["x"].shape == (1, 3, 48, 192)
    assert ds.inputs[0].batch_dynamic
