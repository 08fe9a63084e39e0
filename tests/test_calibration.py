"""Calibration library: histograms, thresholds, streaming, tables, shards, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import onnx_model, value_info
from onnx import TensorProto, helper

from qtool import kernels
from qtool.calibration import CalibrationTable, stream_tensors
from qtool.calibration.observers import Histogram, level_for
from qtool.calibration.thresholds import choose_range, percentile_range, quantile
from qtool.config import Recipe
from qtool.data import Dataset, input_specs
from qtool.errors import CalibrationError, DataError
from qtool.model import load as qmodel_load
from qtool.pipeline import calibrate

RNG = np.random.default_rng(1234)


def _gauss_with_outliers(n=400_000, outliers=8):
    x = RNG.standard_normal(n).astype(np.float32)
    x[:outliers] = np.float32(40.0) * np.sign(RNG.standard_normal(outliers)).astype(np.float32)
    x[0] = 50.0
    return x


def _hist(x, bins=2048, chunks=5):
    h = Histogram(bins)
    for part in np.array_split(x, chunks):
        h.update(part)
    return h


# -- histograms ------------------------------------------------------------------------


def test_histogram_counts_every_value_and_bins_exactly():
    x = _gauss_with_outliers()
    h = _hist(x)
    assert h.total == x.size
    assert (h.lo, h.hi) == (float(x.min()), float(x.max()))
    edges = h.edges()
    expected, _ = np.histogram(x.astype(np.float64), bins=edges)
    assert np.array_equal(h.counts, expected)


def test_histogram_growth_is_order_independent():
    # Small values first, then a wide batch forces several doublings.
    x = np.concatenate([RNG.uniform(0, 0.01, 5000), RNG.uniform(-300, 900, 5000)]).astype(np.float32)
    grown = _hist(x, chunks=2)
    once = Histogram(2048)
    once.update(x[::-1].copy())
    assert (grown.k, grown.start) == (once.k, once.start) == (level_for(x.min(), x.max(), 2048),
                                                              grown.start)
    assert np.array_equal(grown.counts, once.counts)


@pytest.mark.parametrize("backend", ["native", "numpy"] if kernels.native_available() else ["numpy"])
def test_one_pass_observer_equals_minmax_then_histogram(backend):
    """TensorObserver reads a batch once (min/max and counts in one kernel pass) while its
    range stays inside the one seen so far, and regrids + recounts a batch that widens it:
    the same min/max and counts as finding the min/max first and then counting, batch by
    batch, through ranges that grow, stay and grow again."""
    from qtool.calibration.observers import TensorObserver, batch_minmax

    rng = np.random.default_rng(7)
    scales = [0.01, 0.005, 1.0, 0.5, 0.9, 30.0, 1.0, 0.2, 31.0]
    batches = [(rng.standard_normal(20_000) * s).astype(np.float32) for s in scales]
    batches[4] = np.maximum(batches[4], 0)  # a ReLU-like batch inside the range
    with kernels.use_backend(backend):
        obs = TensorObserver(2048, True)
        ref = Histogram(2048)
        for x in batches:
            assert obs.update(x) == batch_minmax(x)
            ref.update(x, *batch_minmax(x))
            assert (obs.histogram.k, obs.histogram.start) == (ref.k, ref.start)
            assert np.array_equal(obs.histogram.counts, ref.counts)
        bad = batches[0].copy()
        bad[5] = np.inf
        before = obs.histogram.counts.copy()
        assert obs.update(bad)[1] == np.inf  # the caller names the tensor; nothing counted
        assert np.array_equal(obs.histogram.counts, before)
    assert (obs.minmax.lo, obs.minmax.hi) == (min(float(b.min()) for b in batches), max(float(b.max()) for b in batches))
    assert obs.histogram.total == sum(b.size for b in batches)


def test_merge_of_two_halves_equals_one_run():
    x = _gauss_with_outliers()
    a, b = _hist(x[: x.size // 3]), _hist(x[x.size // 3 :])
    merged = a.merge(b)
    whole = _hist(x, chunks=1)
    assert (merged.k, merged.start, merged.lo, merged.hi) == (whole.k, whole.start, whole.lo, whole.hi)
    assert np.array_equal(merged.counts, whole.counts)


# -- thresholds ------------------------------------------------------------------------


def test_percentile_matches_numpy_within_a_bin():
    x = _gauss_with_outliers()
    h = _hist(x)
    for q in (0.001, 0.25, 0.5, 0.9, 0.9999):
        assert abs(quantile(h, q) - np.quantile(x, q)) <= h.width
    lo, hi = percentile_range(h, 99.9, symmetric=False)
    assert abs(lo - np.quantile(x, 0.0005)) <= h.width
    assert abs(hi - np.quantile(x, 0.9995)) <= h.width
    lo, hi = percentile_range(h, 99.9, symmetric=True)
    assert hi == -lo and abs(hi - np.quantile(np.abs(x), 0.999)) <= h.width


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_outliers(method):
    x = _gauss_with_outliers(outliers=3)
    h = _hist(x)
    lo, hi = choose_range(method, h.lo, h.hi, h)
    # Entropy clips hard; MSE weighs the outliers' squared error against the rounding
    # error of 400k Gaussian values and lands near half the max.
    assert 2.5 < hi < (0.25 if method == "entropy" else 0.6) * h.hi, (lo, hi)
    assert lo == -hi


def test_entropy_one_signed_data_gives_zero_based_range():
    x = np.maximum(_gauss_with_outliers(outliers=3), 0)
    h = _hist(x)
    lo, hi = choose_range("entropy", h.lo, h.hi, h)
    assert lo == 0.0 and 1.0 < hi < 0.5 * h.hi


def test_minmax_moving_average_and_symmetric():
    assert choose_range("minmax", -1.0, 3.0, None, symmetric=True) == (-3.0, 3.0)
    assert choose_range("minmax", -1.0, 3.0, None, ema=(-0.5, 2.0)) == (-0.5, 2.0)


# -- streaming over a model built in code ------------------------------------------------


def _model(path, nan_on_negative_input=False):
    """x[N,4] -> MatMul(W) -> Relu -> Add(b) -> y; optionally Log(x) first (NaN for x<0)."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], RNG.standard_normal(12).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.5, -0.5, 1.0])
    nodes = []
    src = "x"
    if nan_on_negative_input:
        nodes.append(helper.make_node("Log", ["x"], ["logx"], name="log"))
        src = "logx"
    nodes += [
        helper.make_node("MatMul", [src, "W"], ["mm"], name="mm"),
        helper.make_node("Relu", ["mm"], ["act"], name="relu"),
        helper.make_node("Add", ["act", "b"], ["y"], name="add"),
    ]
    onnx.save(onnx_model(nodes, [value_info("x", ["N", 4])], [value_info("y", ["N", 3])], [w, b]), path)
    return path


def _data(folder, n=24, shape=(4,), positive=True):
    folder.mkdir()
    for i in range(n):
        x = RNG.standard_normal(shape).astype(np.float32)
        np.save(folder / f"s{i:03d}.npy", np.abs(x) + 0.1 if positive else x)
    return folder


def _recipe(method="percentile", **kw):
    return Recipe().override("calibration", method=method, **kw)


def test_stream_tensors_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    path = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d")
    ds = Dataset(data, input_specs(ir.load(path)))
    seen = []
    for ids, tensors in stream_tensors(qmodel_load(path), ds, ["x", "mm", "y"], batch_size=5):
        assert set(tensors) == {"x", "mm", "y"}
        seen += ids
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = sess.run(["y"], {"x": tensors["x"]})
        np.testing.assert_allclose(tensors["y"], y, rtol=1e-6)
        w = onnx.numpy_helper.to_array(onnx.load(path).graph.initializer[0])
        np.testing.assert_allclose(tensors["mm"], tensors["x"] @ w, rtol=1e-5, atol=1e-6)
    assert seen == list(range(24))


def test_calibrate_observes_selected_tensors_and_roundtrips(tmp_path):
    path = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d")
    table = calibrate(path, data, _recipe("minmax", batch_size=4))
    assert table.samples == 24
    assert set(table.ranges()) >= {"x", "mm"}
    xs = np.stack([np.load(p) for p in sorted(data.glob("*.npy"))])
    assert table.ranges()["x"] == (float(xs.min()), float(xs.max()))
    table.save(tmp_path / "t.json")
    again = CalibrationTable.load(tmp_path / "t.json")
    assert again.ranges() == table.ranges()
    assert again.fingerprint == table.fingerprint and again.samples == 24
    assert again.to_dict()["tensors"] == table.to_dict()["tensors"]


def _conv_relu_model(path, activation):
    """x[1,2,6,6] -> Conv -> Relu/Clip(0, 1.5) -> Conv -> y: a pre-activation output read
    only by its activation."""
    w1 = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((3, 4, 1, 1)).astype(np.float32)
    act = (helper.make_node("Relu", ["c1"], ["a1"], name="act") if activation == "Relu"
           else helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), act,
             helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2")]
    inits = [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2"),
             onnx.numpy_helper.from_array(np.float32(0.0), "lo"), onnx.numpy_helper.from_array(np.float32(1.5), "hi")]
    onnx.save(onnx_model(nodes, [value_info("x", [1, 2, 6, 6])], [value_info("y", [1, 3, 6, 6])], inits), path)
    return path


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_pre_activation_output_takes_its_activations_range_unobserved(tmp_path, monkeypatch, activation):
    """A Conv output read only by its Relu/Clip is not returned by the calibration session
    (that would stop onnxruntime fusing them): it takes the activation's statistics, and the
    int8 model is byte for byte the one made from a table that observed it."""
    import qtool.calibration as calibration_lib
    from qtool.pipeline import convert_model
    from qtool.runtime import infer_types

    path = _conv_relu_model(tmp_path / "m.onnx", activation)
    data = _data(tmp_path / "d", n=8, shape=(1, 2, 6, 6), positive=False)
    observed = []
    real = calibration_lib.calibrate_prepared

    def spy(model, data_dir, recipe, names, **kw):  # noqa: ANN001, ANN202
        observed.append(list(names))
        return real(model, data_dir, recipe, names, **kw)

    monkeypatch.setattr(calibration_lib, "calibrate_prepared", spy)
    table = calibrate(path, data, _recipe("minmax"))
    assert observed == [["x", "a1", "y"]]
    assert list(table.tensors) == ["x", "c1", "a1", "y"]  # graph order, as before
    assert table.tensors["c1"] == table.tensors["a1"]

    # The table as it was made before: the pre-activation output observed on its own.
    model = qmodel_load(path)
    infer_types(model)
    full = real(model, data, _recipe("minmax"), ["x", "c1", "a1", "y"])
    assert full.tensors["c1"].range[0] < 0 < full.tensors["a1"].range[0] + 1e-6  # it did differ
    recipe = Recipe()
    got = convert_model(model, recipe, table=table).model
    want = convert_model(model, recipe, table=full).model
    assert ir.to_proto(got).SerializeToString() == ir.to_proto(want).SerializeToString()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_shards_merge_to_one_run(tmp_path, method):
    path = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d", n=30, positive=False)
    recipe = _recipe(method, batch_size=4)
    whole = calibrate(path, data, recipe)
    shards = [calibrate(path, data, recipe, shard=(i, 3)) for i in range(3)]
    assert sum(s.samples for s in shards) == 30
    merged = CalibrationTable.merge(shards[::-1])
    assert merged.samples == whole.samples
    assert merged.ranges() == whole.ranges()
    for name, stats in whole.tensors.items():
        m = merged.tensors[name]
        assert (m.minmax.lo, m.minmax.hi, m.minmax.count) == (stats.minmax.lo, stats.minmax.hi,
                                                               stats.minmax.count)
        if stats.histogram is not None:
            assert np.array_equal(m.histogram.counts, stats.histogram.counts)


def _streams(monkeypatch, on: bool) -> list:
    """Force calibration to one stream or two (whatever this machine's cores), and record
    how many sessions each run opened."""
    import qtool.calibration as calibration
    import qtool.hardware as hardware
    from qtool.runtime import collect

    monkeypatch.setattr(hardware, "available_cores", lambda: 2 if on else 1)
    opened = []
    real = collect.build_session

    def counted(*args, **kwargs):
        opened.append(kwargs.get("threads", args[3] if len(args) > 3 else 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(collect, "build_session", counted)
    monkeypatch.setattr(calibration, "PARALLEL_MIN_BATCHES", 4)
    return opened


def _same_tables(a: CalibrationTable, b: CalibrationTable) -> None:
    assert (a.samples, a.ranges(), a.shards) == (b.samples, b.ranges(), b.shards)
    for name, stats in a.tensors.items():
        other = b.tensors[name]
        assert (stats.minmax.lo, stats.minmax.hi, stats.minmax.count, stats.minmax.batches) == (
            other.minmax.lo, other.minmax.hi, other.minmax.count, other.minmax.batches)
        if stats.histogram is not None:
            assert (stats.histogram.k, stats.histogram.start) == (other.histogram.k, other.histogram.start)
            assert np.array_equal(stats.histogram.counts, other.histogram.counts)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_two_streams_give_the_one_stream_table(tmp_path, monkeypatch, method):
    """Two one-thread sessions folding every other batch into their own observers, merged:
    the table of one session over every batch in order, for a whole run and for a shard."""
    path = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d", n=30, positive=False)
    recipe = _recipe(method, batch_size=3)
    opened = _streams(monkeypatch, on=False)
    one, one_shard = calibrate(path, data, recipe), calibrate(path, data, recipe, shard=(1, 2))
    assert opened == [0, 0]
    opened = _streams(monkeypatch, on=True)
    seen = []
    two = calibrate(path, data, recipe, on_progress=lambda p: seen.append((p.done, p.total)))
    two_shard = calibrate(path, data, recipe, shard=(1, 2))
    assert opened == [1, 1, 1, 1]  # two sessions of one thread per run
    _same_tables(one, two)
    _same_tables(one_shard, two_shard)
    assert [d for d, _ in seen] == list(range(3, 31, 3)) and {t for _, t in seen} == {30}


def test_two_streams_only_where_exact_and_affordable(tmp_path, monkeypatch):
    path = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d", n=30, positive=False)
    opened = _streams(monkeypatch, on=True)
    calibrate(path, data, _recipe("minmax", batch_size=3, moving_average=0.9))  # order-dependent
    calibrate(path, data, _recipe("minmax", batch_size=3), threads=2)  # the caller chose the threads
    calibrate(path, data, _recipe("minmax", batch_size=10))  # 3 batches: a second session costs more
    assert opened == [0, 2, 0]
    # one batch of the observed tensors (known shapes, batch 3): x [3,4] and mm/act [3,3] float32
    import qtool.calibration as calibration
    from qtool.calibration import known_batch_bytes
    from qtool.passes.preprocess import preprocess
    from qtool.runtime import infer_types

    model = qmodel_load(path)
    preprocess(model)
    infer_types(model)
    assert known_batch_bytes(model, ["x", "mm", "act"], 3) == (12 + 9 + 9) * 4
    monkeypatch.setattr(calibration, "PARALLEL_MAX_BATCH_BYTES", 12 * 4)  # two batches would not fit
    opened.clear()
    calibrate(path, data, _recipe("minmax", batch_size=3))
    assert opened == [0]


def test_two_streams_raise_a_streams_error_and_keep_its_skipped_tensors(tmp_path, monkeypatch):
    _streams(monkeypatch, on=True)
    path = _model(tmp_path / "m.onnx", nan_on_negative_input=True)
    data = _data(tmp_path / "d", n=12)
    np.save(data / "s007.npy", np.array([0.0, 1.0, 1.0, 1.0], np.float32))  # log(0) = -inf
    table = calibrate(path, data, _recipe(batch_size=1))
    assert "s007.npy" in table.info["skipped"]["logx"] and "logx" not in table.ranges()
    assert table.samples == 12
    np.save(data / "s010.npy", np.array([1.0, -2.0, 1.0, 1.0], np.float32))  # log(-2): NaN
    with pytest.raises(CalibrationError) as err:
        calibrate(path, data, _recipe(batch_size=1))
    assert "'logx'" in err.value.message and "s010.npy" in err.value.message


# -- bad inputs --------------------------------------------------------------------------


def test_non_finite_activation_names_tensor_and_sample(tmp_path):
    path = _model(tmp_path / "m.onnx", nan_on_negative_input=True)
    data = _data(tmp_path / "d", n=6)
    np.save(data / "s003.npy", np.array([1.0, -2.0, 1.0, 1.0], np.float32))
    with pytest.raises(CalibrationError) as err:
        calibrate(path, data, _recipe(batch_size=4))
    assert "'logx'" in err.value.message and "s003.npy" in err.value.message
    assert "NaN" in err.value.message and err.value.hint


def test_infinite_activation_stays_float_with_its_sample_named(tmp_path):
    """+-inf without NaN is deliberate arithmetic (attention masks): the tensor is left out of
    the table with the reason, calibration goes on, and shards merge the same way."""
    path = _model(tmp_path / "m.onnx", nan_on_negative_input=True)
    data = _data(tmp_path / "d", n=6)
    np.save(data / "s003.npy", np.array([0.0, 1.0, 1.0, 1.0], np.float32))  # log(0) = -inf
    table = calibrate(path, data, _recipe(batch_size=2))
    skipped = table.info["skipped"]
    assert "logx" in skipped and "s003.npy" in skipped["logx"]
    assert "logx" not in table.ranges()
    assert table.samples == 6
    shards = [calibrate(path, data, _recipe(batch_size=2), shard=(i, 2)) for i in range(2)]
    merged = CalibrationTable.merge(shards)
    assert set(merged.info["skipped"]) == set(skipped)
    assert merged.ranges() == table.ranges()


def test_dataset_that_does_not_match_the_model(tmp_path):
    path = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d", shape=(5,))
    with pytest.raises(DataError) as err:
        calibrate(path, data, _recipe())
    assert "s000.npy" in err.value.message and err.value.hint


def test_table_for_another_model_is_refused(tmp_path):
    path = _model(tmp_path / "m.onnx")
    other = _model(tmp_path / "o.onnx", nan_on_negative_input=True)
    table = calibrate(path, _data(tmp_path / "d"), _recipe("minmax"))
    table.check_model(ir.load(path))
    with pytest.raises(CalibrationError) as err:
        table.check_model(ir.load(other))
    assert "another model" in err.value.message and "qtool calibrate" in err.value.hint


def test_bad_shard_and_bad_merges(tmp_path):
    path = _model(tmp_path / "m.onnx")
    data = _data(tmp_path / "d")
    with pytest.raises(CalibrationError):
        calibrate(path, data, _recipe(), shard=(3, 3))
    a = calibrate(path, data, _recipe(batch_size=4), shard=(0, 2))
    with pytest.raises(CalibrationError, match="more than once"):
        CalibrationTable.merge([a, a])
    other = calibrate(path, data, _recipe("entropy", batch_size=4), shard=(1, 2))
    with pytest.raises(CalibrationError, match="different settings"):
        CalibrationTable.merge([a, other])


def test_damaged_or_foreign_table_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "v9.json").write_text(json.dumps({"format": "qtool.calibration", "version": 9}))
    for name, words in (("bad.json", "invalid JSON"), ("foreign.json", "not a qtool"),
                        ("v9.json", "version 9")):
        with pytest.raises(CalibrationError, match=words):
            CalibrationTable.load(tmp_path / name)


def test_entropy_does_not_collapse_on_a_relu_spike_at_zero():
    """A ReLU6 output: 70% exact zeros, the rest |N(0, 1)| capped at 6. The zero spike is
    represented exactly by the zero point, so it must not drag the threshold down: it used
    to pick the first candidate (~1.0, clipping a third of the non-zero values), which took
    EfficientNet-Lite0's top-1 to 0."""
    from qtool.calibration.thresholds import entropy_range

    x = np.zeros(200_000, np.float32)
    x[:60_000] = np.minimum(np.abs(RNG.standard_normal(60_000)), 6).astype(np.float32)
    x[:50] = 6.0
    lo, hi = entropy_range(_hist(x))
    assert lo == 0.0
    # Clips the sparse tail (well inside the max) but keeps the bulk of the non-zeros.
    assert 2.5 < hi < 6.0, hi


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.skipif(not kernels.native_available(), reason="native kernels not built")
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_native_and_numpy_kernels_give_identical_tables(method):
    """A real run (the bundled CNN, its 128 calibration samples): every histogram update
    goes through the histogram_pow2 kernel, so the C paths and the numpy twins must build
    the same table bit for bit, including grids that do not start at 0."""
    recipe = _recipe(method, batch_size=8)
    tables = {}
    for backend in ("native", "numpy"):
        with kernels.use_backend(backend):
            t = calibrate(EXAMPLES / "digits_cnn.onnx", EXAMPLES / "data" / "calib", recipe)
        tables[backend] = {k: v for k, v in t.to_dict().items() if k != "info"}  # info: timings
    assert json.dumps(tables["native"]) == json.dumps(tables["numpy"])
    starts = [s["histogram"]["start"] for s in tables["native"]["tensors"].values()]
    assert len(starts) > 10 and any(s != 0 for s in starts)


def test_large_in_memory_weights_reach_onnxruntime_as_shared_buffers(tmp_path, monkeypatch):
    """Weights of at least SHARED_WEIGHT_BYTES are handed to onnxruntime as buffers (a
    placeholder data file in a temporary folder, replaced by add_external_initializers before
    onnxruntime's optimisers read them: its Conv+Add fusion reads the Conv weight here). The
    observed tensors equal those of the weights serialised inline, and the temporary folder
    is gone afterwards."""
    import tempfile

    from onnx import numpy_helper

    from qtool.runtime import collect

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.1, "w1"),  # 144 KiB
             numpy_helper.from_array(rng.standard_normal((1, 64, 1, 1)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((8, 64, 1, 1)).astype(np.float32), "w2")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["c", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = tmp_path / "d"
    data.mkdir()
    for i in range(3):
        np.save(data / f"{i}.npy", rng.standard_normal((64, 6, 6)).astype(np.float32))
    model = ir.load(path)
    assert set(collect._shareable_weights(model)) == {"w1"}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    dataset = Dataset(data, input_specs(model))
    shared = [t for _, t in stream_tensors(model, dataset, ["r", "y"])]
    assert list((tmp_path / "tmp").iterdir()) == []  # the placeholder folder was removed
    assert not isinstance(model.graph.initializers["w1"].const_value, ir.ExternalTensor)  # model restored
    monkeypatch.setattr(collect, "SHARED_WEIGHT_BYTES", 1 << 40)
    inline = [t for _, t in stream_tensors(model, dataset, ["r", "y"])]
    for a, b in zip(shared, inline):
        for name in ("r", "y"):
            np.testing.assert_array_equal(a[name], b[name])


def test_sessions_built_from_one_model_on_two_threads_share_its_weights_safely(tmp_path, monkeypatch):
    """Calibration's two streams build their sessions from one model at once. build_session
    swaps the large weights for placeholders while it serialises: the threads take turns, so
    neither serialises the other's placeholders (it did: onnxruntime then read an empty file)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from qtool.runtime import collect

    rng = np.random.default_rng(6)
    w = rng.standard_normal((128, 128)).astype(np.float32)  # 64 KiB: shared
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    path = tmp_path / "m.onnx"
    onnx.save(onnx_model(nodes, [value_info("x", ["N", 128])], [value_info("y", ["N", 128])],
                         [onnx.numpy_helper.from_array(w, "w")]), path)
    model = ir.load(path)
    assert set(collect._shareable_weights(model)) == {"w"}
    real, inside = ir.serde.serialize_model, []

    def slow(m):  # noqa: ANN001, ANN202 - widens the window the swap is open
        inside.append(threading.get_ident())
        time.sleep(0.1)
        return real(m)

    monkeypatch.setattr(ir.serde, "serialize_model", slow)
    with ThreadPoolExecutor(2) as pool:
        built = list(pool.map(lambda _: collect.build_session(model, ["h"]), range(2)))
    assert len(set(inside)) == 2  # both threads serialised
    x = rng.standard_normal((3, 128)).astype(np.float32)
    for session, outputs in built:
        got = dict(zip(outputs, session.run(outputs, {"x": x})))
        np.testing.assert_allclose(got["h"], x @ w, rtol=1e-4, atol=1e-4)
    assert model.graph.initializers["w"].const_value.numpy() is not None
    assert not isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
