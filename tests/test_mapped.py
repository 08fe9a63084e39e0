"""qtool.mapped: single-file models load with their weights memory-mapped, not parsed; the
results (values, re-serialised bytes, converted models) are those of the usual parser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool import mapped
from qtool import model as qmodel
from qtool.cli import run
from qtool.errors import ModelError


def _mlp(tmp_path, name="mlp.onnx", *, external=False, extra_inits=()):
    """x[1, 256] -> MatMul W0[256, 512] -> Add b -> MatMul W1[512, 512] -> y: 1.5 MiB of
    fp32, over qtool.mapped.MIN_FILE_BYTES. Names of several lengths put raw data at
    aligned and misaligned offsets."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((256, 512), dtype=np.float32), "W0"),
             numpy_helper.from_array(rng.standard_normal(512, dtype=np.float32), "bias_b"),
             numpy_helper.from_array(rng.standard_normal((512, 512), dtype=np.float32), "weight_1x"),
             numpy_helper.from_array(np.array([1, 512], np.int64), "shape"),
             *extra_inits]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
             helper.make_node("Add", ["h", "bias_b"], ["a"], name="add"),
             helper.make_node("MatMul", ["a", "weight_1x"], ["m"], name="mm1"),
             helper.make_node("Reshape", ["m", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / name
    if external:
        onnx.save(proto, path, save_as_external_data=True, location=name + ".data", size_threshold=0)
    else:
        onnx.save(proto, path)
    return path, {t.name: numpy_helper.to_array(t) for t in inits}


def _serialised(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def test_inline_weights_are_mapped_with_the_parsers_values_and_bytes(tmp_path):
    path, arrays = _mlp(tmp_path)
    model = qmodel.load(path)
    tensors = {name: v.const_value for name, v in model.graph.initializers.items()}
    assert {n for n, t in tensors.items() if isinstance(t, mapped.MappedTensor)} == {"W0", "bias_b", "weight_1x"}
    # the 16-byte shape stays in the parsed message (below MIN_TENSOR_BYTES)
    assert not isinstance(tensors["shape"], mapped.MappedTensor)
    views = [t.raw for t in tensors.values() if isinstance(t, mapped.MappedTensor)]
    assert any(not v.flags.aligned for v in views), "the fixture should exercise a misaligned view"
    for name, array in arrays.items():
        got = tensors[name].numpy()
        assert got.flags.aligned and got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)
        np.testing.assert_array_equal(np.asarray(tensors[name]), array)
    assert _serialised(model) == _serialised(ir.load(path))


def test_release_drops_pages_but_keeps_the_values(tmp_path):
    path, arrays = _mlp(tmp_path)
    tensor = qmodel.load(path).graph.initializers["weight_1x"].const_value
    np.testing.assert_array_equal(tensor.numpy(), arrays["weight_1x"])
    tensor.release()
    np.testing.assert_array_equal(tensor.numpy(), arrays["weight_1x"])


def test_tensors_with_other_fields_stay_parsed(tmp_path):
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [400], np.arange(400, dtype=np.float32).tolist())
    documented = numpy_helper.from_array(np.ones(400, np.float32), "documented")
    documented.doc_string = "kept"
    halves = numpy_helper.from_array(np.linspace(-1, 1, 1000).astype(np.float16), "halves")
    path, _ = _mlp(tmp_path, extra_inits=(typed, documented, halves))
    model = qmodel.load(path)
    inits = model.graph.initializers
    assert not isinstance(inits["typed"].const_value, mapped.MappedTensor)
    assert not isinstance(inits["documented"].const_value, mapped.MappedTensor)
    assert isinstance(inits["halves"].const_value, mapped.MappedTensor)
    np.testing.assert_array_equal(inits["typed"].const_value.numpy(), np.arange(400, dtype=np.float32))
    assert inits["documented"].const_value.doc_string == "kept"
    np.testing.assert_array_equal(inits["halves"].const_value.numpy(), numpy_helper.to_array(halves))
    assert _serialised(model) == _serialised(ir.load(path))


def test_small_files_and_broken_files_take_the_usual_path(tmp_path):
    small = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"
    assert small.stat().st_size < mapped.MIN_FILE_BYTES
    assert mapped.load_mapped(small) is None
    path, _ = _mlp(tmp_path, "cut.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    assert mapped.load_mapped(truncated) is None
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        qmodel.load(truncated)


def _convert(src, out, *flags) -> bytes:
    assert run(["convert", str(src), "-o", str(out), "-q", *flags]) == 0
    return out.read_bytes()


@pytest.mark.parametrize("flags", [("--bits", "4"), ("--dynamic",), ("--dtype", "fp16")])
def test_mapped_and_parsed_inputs_convert_to_the_same_bytes(tmp_path, monkeypatch, flags):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    path, _ = _mlp(tmp_path)
    streamed = _convert(path, tmp_path / "mapped.onnx", *flags)
    monkeypatch.setattr(mapped, "MIN_FILE_BYTES", 1 << 62)  # every file parsed as before
    parsed = _convert(path, tmp_path / "parsed.onnx", *flags)
    assert streamed == parsed


def test_external_data_model_converts_streamed_to_the_values_of_the_inline_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    inline, _ = _mlp(tmp_path, "inline.onnx")
    external, _ = _mlp(tmp_path, "external.onnx", external=True)
    _convert(inline, tmp_path / "q_inline.onnx", "--bits", "4")
    _convert(external, tmp_path / "q_external.onnx", "--bits", "4")
    assert (tmp_path / "q_external.onnx.data").exists()
    a, b = onnx.load(tmp_path / "q_inline.onnx"), onnx.load(tmp_path / "q_external.onnx")
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    values_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    values_b = {t.name: numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in b.graph.initializer}
    assert values_a.keys() == values_b.keys()
    for name, value in values_a.items():
        np.testing.assert_array_equal(values_b[name], value)


def test_input_size_from_the_loaded_model_matches_the_file_walk(tmp_path):
    for path in (_mlp(tmp_path, "e.onnx", external=True)[0], _mlp(tmp_path, "i.onnx")[0]):
        assert qmodel.model_size_bytes(path, qmodel.load(path)) == qmodel.model_size_bytes(path)
    assert qmodel.model_size_bytes(tmp_path / "e.onnx") > (tmp_path / "e.onnx").stat().st_size + 1_000_000
