"""qtool.runtime.collect: outputs bound to reused buffers give the same arrays as plain runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import onnx_model, value_info
from onnx import TensorProto, helper

from qtool.data import Dataset, input_specs
from qtool.model import load
from qtool.runtime.collect import stream_tensors

RNG = np.random.default_rng(11)


def _write(tmp_path, nodes, outputs, inits=(), n=11, shape=(4,)):
    path = tmp_path / "m.onnx"
    onnx.save(onnx_model(nodes, [value_info("x", ["N", 4])], outputs, list(inits)), path)
    data = tmp_path / "d"
    data.mkdir()
    for i in range(n):
        np.save(data / f"s{i:03d}.npy", RNG.standard_normal(shape).astype(np.float32))
    return path, data


def _collect(path, data, names, reuse, batch_size):
    model = load(path)
    ds = Dataset(data, input_specs(model))
    out = []
    for ids, tensors in stream_tensors(model, ds, names, batch_size=batch_size, reuse=reuse):
        out.append((ids, {k: v.copy() for k, v in tensors.items()}))  # buffers are reused
    return out


def _same(a, b):
    assert [i for i, _ in a] == [i for i, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k])


def test_reused_buffers_equal_plain_runs(tmp_path):
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], RNG.standard_normal(12).tolist())
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Relu", ["mm"], ["act"], name="relu"),
             helper.make_node("ArgMax", ["act"], ["y"], name="am", axis=1)]
    path, data = _write(tmp_path, nodes, [value_info("y", ["N", 1], TensorProto.INT64)], [w])
    names = ["x", "mm", "act", "y"]
    plain = _collect(path, data, names, 0, 3)  # 11 samples: batches of 3, then a short one
    for reuse in (1, 2):
        got = _collect(path, data, names, reuse, 3)
        _same(got, plain)
    model = load(path)
    ds = Dataset(data, input_specs(model))
    seen = []
    for _, tensors in stream_tensors(model, ds, ["mm"], batch_size=2, reuse=2):
        seen.append(tensors["mm"])
    # batch 0 learns the shapes; then two buffer sets in turn; the short last batch is fresh
    assert seen[1] is not seen[2] and seen[1] is seen[3] and seen[2] is seen[4]
    assert seen[5] is not seen[1] and seen[5].shape[0] == 1


def test_value_dependent_output_shapes_fall_back_to_plain_runs(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("NonZero", ["r"], ["nz"], name="nz"),
             helper.make_node("Identity", ["r"], ["y"], name="id")]
    path, data = _write(tmp_path, nodes, [value_info("y", ["N", 4])])
    plain = _collect(path, data, ["r", "nz"], 0, 1)
    _same(_collect(path, data, ["r", "nz"], 2, 1), plain)
    assert len({t["nz"].shape for _, t in plain}) > 1  # the case is real: shapes vary


def test_collection_sessions_do_not_spin(tmp_path, monkeypatch):
    """Collection sessions keep onnxruntime's idle threads from busy-waiting (the caller's
    statistics need that core); other sessions keep onnxruntime's default."""
    from qtool.runtime import collect, sessions

    built = []
    real = collect.session_options

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(collect, "session_options", spy)
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    path, _ = _write(tmp_path, nodes, [value_info("y", ["N", 4])], n=1)
    session, outputs = collect.build_session(load(path), ["y"])
    assert outputs == ["y"] and len(built) == 1
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert built[0].get_session_config_entry(key) == "0"
    with pytest.raises(Exception, match="does not have configuration"):  # onnxruntime's default
        sessions.session_options(2).get_session_config_entry("session.intra_op.allow_spinning")
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    assert np.array_equal(session.run(None, {"x": x})[0], np.maximum(x, 0))


def test_only_the_requested_tensors_are_computed(tmp_path):
    """stream_tensors' session returns the requested tensors alone and runs nothing past
    the last of them: a large head after them (a decoder's vocabulary projection, whose
    weight is a shared in-memory buffer) is dropped, with the same values as a full run."""
    import onnxruntime as ort

    from qtool.runtime.collect import SHARED_WEIGHT_BYTES, build_session

    side = 128
    assert side * side * 4 >= SHARED_WEIGHT_BYTES  # the head's weight is handed over as a buffer
    w = RNG.standard_normal((4, side)).astype(np.float32)
    head = RNG.standard_normal((side, side)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
             helper.make_node("Relu", ["mm"], ["act"], name="relu"),
             helper.make_node("MatMul", ["act", "H"], ["logits"], name="head")]
    inits = [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(head, "H")]
    path, data = _write(tmp_path, nodes, [value_info("logits", ["N", side])], inits)
    model = load(path)
    session, outputs = build_session(model, ["mm", "act"], only_requested=True)
    assert outputs == ["mm", "act"]
    full, full_outputs = build_session(model, ["mm", "act"])
    assert full_outputs == ["logits", "mm", "act"]
    x = {"x": RNG.standard_normal((3, 4)).astype(np.float32)}
    for got, want in zip(session.run(outputs, x), full.run(["mm", "act"], x)):
        assert np.array_equal(got, want)
    with pytest.raises(Exception, match="logits"):  # no node is left to make the head's output
        session.run(["logits"], x)
    # the stream's arrays are the float model's values
    feeds = np.stack([np.load(f) for f in sorted(data.glob("*.npy"))])
    for _, tensors in stream_tensors(model, Dataset(data, input_specs(model)), ["act"], batch_size=11):
        assert np.allclose(tensors["act"], np.maximum(feeds @ w, 0), rtol=1e-5, atol=1e-5)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert plain.run(None, {"x": feeds})[0].shape == (11, side)  # the model itself still has its head


def test_requested_graph_inputs_alone_keep_one_output(tmp_path):
    """Asking only for a graph input leaves the graph one output (a graph needs one)."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    path, data = _write(tmp_path, nodes, [value_info("y", ["N", 4])])
    got = _collect(path, data, ["x"], 0, 4)
    assert [ids for ids, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert np.array_equal(got[0][1]["x"][0], np.load(data / "s000.npy"))


def test_weight_only_statistics_equal_a_plain_loop_over_the_samples(tmp_path):
    """gptq/awq statistics fold each batch on two threads while the next batch runs; every
    input's sums must still be the in-order float64 sums of each batch's float32 X^T X."""
    from qtool.config import Recipe
    from qtool.passes.weight_only import collect_weight_only_stats
    from qtool.quant.blockwise import batch_moments

    w1 = RNG.standard_normal((4, 64)).astype(np.float32)
    w2 = RNG.standard_normal((64, 32)).astype(np.float32)
    w3 = RNG.standard_normal((32, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu"),
             helper.make_node("MatMul", ["a1", "W2"], ["h2"], name="mm2"),
             helper.make_node("MatMul", ["h2", "W3"], ["y"], name="mm3")]
    inits = [onnx.numpy_helper.from_array(w, n) for w, n in ((w1, "W1"), (w2, "W2"), (w3, "W3"))]
    path, data = _write(tmp_path, nodes, [value_info("y", ["N", 16])], inits, n=9, shape=(3, 4))
    recipe = Recipe().override("weight_only", block_size=16, algorithm="gptq")
    got = collect_weight_only_stats(path, Dataset(data, input_specs(load(path))), recipe, batch_size=2)
    assert list(got) == ["a1", "h2"]  # x: K = 4 is below one block, that MatMul stays float
    xs = [np.load(f) for f in sorted(data.glob("*.npy"))]
    acts = {"a1": [np.maximum(x @ w1, 0) for x in xs]}
    acts["h2"] = [a @ w2 for a in acts["a1"]]
    for name, samples in acts.items():
        batches = [np.concatenate(samples[i:i + 2]) for i in range(0, len(samples), 2)]
        want = None
        for b in batches:  # onnxruntime's values, so compare within float32 rounding...
            xtx = batch_moments(b)[0]
            want = xtx.astype(np.float64) if want is None else want + xtx
        assert got[name].count == 9 * 3
        np.testing.assert_allclose(got[name].xtx, want, rtol=1e-5, atol=1e-4)
    # ...and exactly the sums a plain loop makes of the arrays onnxruntime returns
    plain = {}
    model = load(path)
    for _, tensors in stream_tensors(model, Dataset(data, input_specs(model)), ["a1", "h2"], batch_size=2):
        for name, t in tensors.items():
            xtx = batch_moments(t)[0]
            plain[name] = xtx.astype(np.float64) if name not in plain else plain[name] + xtx
    for name in plain:
        assert np.array_equal(got[name].xtx, plain[name])


def test_a_failing_fold_is_raised_and_the_rest_cancelled(tmp_path):
    from qtool.runtime.collect import fold_behind

    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    path, data = _write(tmp_path, nodes, [value_info("y", ["N", 4])])
    model = load(path)
    seen = []

    def fold(ids, tensors):  # noqa: ANN001, ANN202
        seen.append(ids)
        if len(seen) == 2:
            raise ValueError("bad batch")

    stream = stream_tensors(model, Dataset(data, input_specs(model)), ["y"], batch_size=3, reuse=2)
    with pytest.raises(ValueError, match="bad batch"):
        list(fold_behind(stream, fold))
    assert seen[:2] == [[0, 1, 2], [3, 4, 5]] and len(seen) <= 3
