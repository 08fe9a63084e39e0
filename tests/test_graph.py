"""The graph toolkit (qtool/passes/graph.py): fresh names, rewiring, constants, unused removal.
Models are built in code (2-5 nodes) and the rewired ones checked on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qtool.passes.graph import (
    GraphBuilder,
    Names,
    add_initializer,
    constant_of,
    remove_unused,
    replace_uses,
)


def _with_subgraph() -> ir.Model:
    """y = If(cond) then Relu(x) named "branch_relu" (output "then_out") else Neg(x)."""
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["then_out"], name="branch_relu")], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_out"], name="neg")], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.ones(2, np.float32), "w")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _chain() -> ir.Model:
    """y = Relu(Add(x, c)) with c an initializer; Relu's output is the graph output."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["s"], name="add"),
         helper.make_node("Relu", ["s"], ["y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializer=[numpy_helper.from_array(np.array([1.0, -2.0, 3.0], np.float32), "c")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_names_avoid_every_name_in_the_model_subgraphs_included():
    names = Names(_with_subgraph())
    # node names, subgraph value names, initializers and graph inputs are all taken
    assert names.fresh("branch_relu") == "branch_relu_1"
    assert names.fresh("then_out") == "then_out_1"
    assert names.fresh("w") == "w_1"
    assert names.fresh("x") == "x_1"
    assert names.fresh("x") == "x_2"  # a name handed out is taken from then on
    assert names.fresh("new") == "new"
    assert names.fresh("") == "qtool"


def test_builder_names_come_from_the_same_generator():
    b = GraphBuilder(_with_subgraph())
    assert b.name("neg") == "neg_1"
    init = b.initializer(np.zeros(2, np.float32), "neg")
    assert init.name == "neg_2"
    assert b.names.fresh("neg") == "neg_3"


def test_replace_uses_moves_a_graph_output_and_keeps_its_name():
    model = _chain()
    graph = model.graph
    relu = next(n for n in graph if n.op_type == "Relu")
    old = relu.outputs[0]
    # Replace Relu(s) by Abs(s): the graph output must now be Abs's value, still named "y".
    absn = ir.Node("", "Abs", [relu.inputs[0]], name="abs")
    absn.outputs[0].dtype, absn.outputs[0].shape = old.dtype, old.shape
    graph.insert_after(relu, absn)
    replace_uses(old, absn.outputs[0], Names(model))
    graph.remove(relu, safe=True)
    assert graph.outputs[0] is absn.outputs[0]
    assert absn.outputs[0].name == "y"
    assert old.name == "y_replaced"
    x = np.array([-5.0, 0.5, -4.0], np.float32)
    np.testing.assert_array_equal(_run(model, x), np.abs(x + np.array([1.0, -2.0, 3.0], np.float32)))


def test_replace_uses_rewires_every_user_and_leaves_names_alone_for_inner_values():
    model = _chain()
    graph = model.graph
    add = next(n for n in graph if n.op_type == "Add")
    sub = ir.Node("", "Sub", list(add.inputs), name="sub")
    sub.outputs[0].dtype = ir.DataType.FLOAT
    graph.insert_after(add, sub)
    replace_uses(add.outputs[0], sub.outputs[0])
    assert not add.outputs[0].uses()
    assert add.outputs[0].name == "s"
    graph.remove(add, safe=True)
    x = np.array([-5.0, 0.5, 4.0], np.float32)
    np.testing.assert_array_equal(_run(model, x), np.maximum(x - np.array([1.0, -2.0, 3.0], np.float32), 0))


def test_constants_initializers_and_unused_removal():
    model = _chain()
    graph = model.graph
    add = next(n for n in graph if n.op_type == "Add")
    np.testing.assert_array_equal(constant_of(add.inputs[1]), [1.0, -2.0, 3.0])
    assert constant_of(add.inputs[0]) is None  # a graph input is not a constant
    const = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(np.float32(2.5)))], name="k")
    graph.insert_before(add, const)
    assert float(constant_of(const.outputs[0])) == 2.5
    scalar = add_initializer(graph, Names(model), "c", np.float32(7.0))
    assert scalar.name == "c_1" and scalar.shape == ir.Shape([]) and scalar.dtype == ir.DataType.FLOAT
    # Nothing reads the Constant or the new initializer: both go, the used "c" stays.
    assert remove_unused(model) == 2
    assert list(graph.initializers) == ["c"]
    assert [n.op_type for n in graph] == ["Add", "Relu"]
