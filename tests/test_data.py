"""qtool.data: sample order. Numbered files and folders are read in natural (numeric-aware)
order, so labels.txt lines pair with the samples they were written for (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.cli import run
from qtool.data import Dataset, InputSpec

SPEC = [InputSpec("x", np.dtype(np.float32), (None, 4))]


def _classifier(path: Path) -> Path:
    """x[N,4] -> logits[N,12], logits[c] = c * x0 - c^2 / 2 * x1: see _sample."""
    w = np.zeros((4, 12), np.float32)
    w[0] = np.arange(12, dtype=np.float32)
    w[1] = -0.5 * np.arange(12, dtype=np.float32) ** 2
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 12])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _sample(label: int) -> np.ndarray:
    # logits[c] = c * label - c^2 / 2, largest at c == label: the model predicts `label`.
    return np.array([[label, 1.0, 0.0, 0.0]], np.float32)


def _pb_folder(root: Path, count: int) -> Path:
    """ONNX test-data layout, test_data_set_0 .. test_data_set_{count-1}, unpadded numbers."""
    for i in range(count):
        folder = root / f"test_data_set_{i}"
        folder.mkdir(parents=True)
        (folder / "input_0.pb").write_bytes(numpy_helper.from_array(_sample(i % 12), "x").SerializeToString())
    (root / "labels.txt").write_text("".join(f"{i % 12}\n" for i in range(count)))
    return root


def test_natural_key_orders_numbers_by_value():
    from qtool.data import natural_key

    names = ["test_data_set_10", "test_data_set_2", "test_data_set_1", "img10.png", "img9.png",
             "a01.npy", "a1.npy", "b.npy"]
    assert sorted(names, key=natural_key) == [
        "a01.npy", "a1.npy", "b.npy", "img9.png", "img10.png",
        "test_data_set_1", "test_data_set_2", "test_data_set_10",
    ]


def test_onnx_test_data_folders_in_numeric_order(tmp_path):
    folder = _pb_folder(tmp_path / "pb", 12)
    ds = Dataset(folder, SPEC)
    assert [s.path.name for s in ds.samples] == [f"test_data_set_{i}" for i in range(12)]
    values = [int(feed["x"][0, 0]) for _, feed in ds.batches(1)]
    assert values == list(range(12))
    assert ds.labels().tolist() == values


def test_npy_files_in_numeric_order(tmp_path):
    folder = tmp_path / "npy"
    folder.mkdir()
    for i in range(11):
        np.save(folder / f"sample_{i}.npy", _sample(i))
    ds = Dataset(folder, SPEC)
    assert [int(v) for _, feed in ds.batches(4) for v in feed["x"][:, 0]] == list(range(11))


def test_input_pb_files_in_numeric_order(tmp_path):
    """A model with 11 inputs: input_10.pb is the 11th input, not the 3rd."""
    names = [f"in{i}" for i in range(11)]
    folder = tmp_path / "multi" / "test_data_set_0"
    folder.mkdir(parents=True)
    for i in range(11):
        tensor = numpy_helper.from_array(np.full((1, 1), i, np.float32))  # unnamed: by position
        (folder / f"input_{i}.pb").write_bytes(tensor.SerializeToString())
    specs = [InputSpec(n, np.dtype(np.float32), (None, 1)) for n in names]
    (_, feed), = list(Dataset(tmp_path / "multi", specs).batches(1))
    assert [int(feed[n][0, 0]) for n in names] == list(range(11))


def test_labels_json_map_follows_the_same_order(tmp_path):
    folder = tmp_path / "j"
    folder.mkdir()
    for i in (1, 2, 10):
        np.save(folder / f"s{i}.npy", _sample(i))
    (folder / "labels.json").write_text(json.dumps({"s10.npy": 10, "s2.npy": 2, "s1.npy": 1}))
    assert Dataset(folder, SPEC).labels().tolist() == [1, 2, 10]


def test_eval_top1_is_exact_on_unpadded_test_data_sets(tmp_path, capsys):
    """The float model scores 1.0 against labels that are its own predictions; string order
    would pair test_data_set_10 with label 2 and report a wrong top-1 with exit 0."""
    model = _classifier(tmp_path / "m.onnx")
    folder = _pb_folder(tmp_path / "eval", 12)
    assert run(["eval", str(model), "--data", str(folder), "--metric", "top1", "--json", "-", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    top1 = next(m for m in report["metrics"] if m["name"] == "top1")
    assert top1["candidate"] == pytest.approx(1.0)
