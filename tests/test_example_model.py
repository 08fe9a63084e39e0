"""The bundled demo model (examples/digits_cnn.onnx), its data folders, and the numpy layers that trained it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL = EXAMPLES / "digits_cnn.onnx"
CALIB = EXAMPLES / "data" / "calib"
EVAL = EXAMPLES / "data" / "eval"

MIN_ACCURACY = 0.93  # the committed model reaches ~0.99; this leaves room for a retrain
GRAD_RTOL = 1e-6  # max |analytic - numeric| / max |numeric|, float64 central differences
FD_STEP = 1e-6
SAMPLE_SHAPE = (1, 1, 16, 16)


def _load_train_digits():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLES / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _samples(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npy"))


def test_model_graph_contract():
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input" and out.name == "logits"
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["N", 1, 16, 16] and out_dims == ["N", 10]
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" in ops  # preprocessing needs something to fold
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            k = weights[node.input[1]].dims[0]
            assert k % 32 == 0, f"{node.name}: K={k} is not a multiple of 32"
    assert max(t.dims[0] * t.dims[1] for t in weights.values() if len(t.dims) == 2) >= 512 * 256


@pytest.mark.parametrize("folder, count", [(CALIB, 128), (EVAL, None)])
def test_data_folder_files(folder, count):
    files = _samples(folder)
    assert files, f"no .npy files in {folder}"
    if count is not None:
        assert len(files) == count
    for f in files:
        arr = np.load(f)
        assert arr.shape == SAMPLE_SHAPE and arr.dtype == np.float32, f.name
        assert 0.0 <= arr.min() and arr.max() <= 1.0, f.name


def test_eval_labels_match_files():
    labels = (EVAL / "labels.txt").read_text().split()
    assert len(labels) == len(_samples(EVAL))
    assert {int(v) for v in labels} == set(range(10))


def test_eval_accuracy_on_onnxruntime():
    x = np.concatenate([np.load(f) for f in _samples(EVAL)])
    y = np.array([int(v) for v in (EVAL / "labels.txt").read_text().split()])
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    assert logits.shape == (len(y), 10)
    accuracy = float((logits.argmax(axis=1) == y).mean())
    assert accuracy >= MIN_ACCURACY, f"held-out accuracy {accuracy:.4f} < {MIN_ACCURACY}"


def test_calib_and_eval_are_disjoint():
    calib = {np.load(f).tobytes() for f in _samples(CALIB)}
    held_out = {np.load(f).tobytes() for f in _samples(EVAL)}
    assert not calib & held_out


def test_numpy_backprop_matches_finite_differences():
    td = _load_train_digits()
    rng = np.random.default_rng(1)
    p = td.init_params(rng, channels=(2, 3, 3), hidden=4, image=8, classes=3, dtype=np.float64)
    # Move BN and biases off their identity/zero init so every term of the backward pass is exercised.
    p["bn_gamma"] = rng.uniform(0.5, 1.5, 2)
    p["bn_beta"] = rng.normal(size=2)
    for k in ("conv2_b", "conv3_b", "fc1_b", "fc2_b"):
        p[k] = rng.normal(size=p[k].shape) * 0.1
    x = rng.normal(size=(3, 1, 8, 8))
    y = np.array([0, 2, 1])
    _, grads, _ = td.loss_and_grads(p, x, y)

    for name in (*td.TRAINABLE, "input"):
        arr = x if name == "input" else p[name]
        numeric = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            orig = arr[i]
            arr[i] = orig + FD_STEP
            plus = td.loss_and_grads(p, x, y)[0]
            arr[i] = orig - FD_STEP
            minus = td.loss_and_grads(p, x, y)[0]
            arr[i] = orig
            numeric[i] = (plus - minus) / (2 * FD_STEP)
        err = np.abs(grads[name] - numeric).max() / np.abs(numeric).max()
        worst = np.unravel_index(np.abs(grads[name] - numeric).argmax(), arr.shape)
        assert err < GRAD_RTOL, f"{name}: relative error {err:.2e} at index {worst}"


def test_bilinear_matrix_rows_are_convex_weights():
    td = _load_train_digits()
    a = td.bilinear_matrix(8, 16)
    assert np.allclose(a.sum(axis=1), 1.0)  # so a constant image stays constant
    assert (a >= 0).all()


def test_demo_prints_readable_tables_not_json(tmp_path):
    """`make demo` as a user sees it: each step's human report, then one summary table. No
    JSON document in between (the int8 conversion used to dump its 75-line report)."""
    import os
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns("out", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent))
    result = subprocess.run([sys.executable, str(copy / "demo.py")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert not [ln for ln in lines if ln.lstrip().startswith(("{", "}", '"'))], result.stderr
    assert any(ln.startswith("$ qtool convert examples/digits_cnn.onnx -o examples/out/digits_int8.onnx")
               for ln in lines), result.stderr
    assert any("int8-static (qdq)" in ln for ln in lines)  # convert's own table
    summary = lines.index(next(ln for ln in lines if "digits CNN: fp32 vs qtool int8 vs qtool int4" in ln))
    assert [ln for ln in lines[summary:] if ln.startswith(("│ fp32", "│ int8", "│ int4"))]
