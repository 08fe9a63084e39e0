"""The graph toolkit every pass uses: fresh names, rewiring, constants, unused removal.

One place for the plumbing each rewrite needs, so passes only say *what* they rewrite:

- ``Names``: fresh names that collide with nothing in the model (node names, value names,
  initializers; every subgraph of If/Loop/Scan included). ONNX keeps node and value names
  apart, but one namespace is simpler to read in a viewer and never wrong.
- ``GraphBuilder``: uniquely named initializers, values and nodes for one model.
- ``replace_uses``: point every user of a value (subgraphs and graph outputs included) at
  another one; a graph output keeps its name, which is the model's interface.
- ``constant_of`` / ``constant_tensor``: a value's data when it is a constant;
  ``add_initializer`` registers a new one.
- ``remove_unused`` / ``drop_unused_initializers``: what a rewrite orphaned.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from qtool.mapped import MappedTensor
from qtool.model import iter_graphs


class Names:
    """Fresh names: ``base``, else ``base_1``, ``base_2``... whichever no model name takes."""

    def __init__(self, model: ir.Model) -> None:
        self.taken: set[str] = set()
        for graph in iter_graphs(model.graph):
            self.taken.update(graph.initializers)
            self.taken.update(v.name for v in graph.inputs if v.name)
            self.taken.update(v.name for v in graph.outputs if v.name)
            for node in graph:
                if node.name:
                    self.taken.add(node.name)
                self.taken.update(v.name for v in node.outputs if v.name)

    def fresh(self, base: str) -> str:
        base = base or "qtool"
        for candidate in itertools.chain([base], (f"{base}_{i}" for i in itertools.count(1))):
            if candidate not in self.taken:
                self.taken.add(candidate)
                return candidate
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------- constants


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's tensor if it is a constant (an initializer that is not a graph input, or a
    standard Constant node's output, whatever attribute holds it), else None. Outer-scope
    constants count too."""
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is not None:
        return tensor
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in ("", "ai.onnx"):
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def constant_of(value: ir.Value | None) -> np.ndarray | None:
    """``constant_tensor(value)`` as a numpy array, or None."""
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def add_initializer(
    graph: ir.Graph, names: Names, base: str, data: np.ndarray | ir.TensorProtocol
) -> ir.Value:
    """Register ``data`` (an array, or a tensor such as a packed sub-byte one) as a new
    initializer of ``graph`` under a fresh name from ``base``; returns its value."""
    name = names.fresh(base)
    if isinstance(data, np.ndarray | np.generic):
        tensor = ir.Tensor(np.asarray(data, order="C"), name=name)  # ascontiguousarray makes 0-d 1-d
    else:
        tensor = data
        tensor.name = name
    value = ir.Value(
        name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor
    )
    graph.register_initializer(value)
    return value


# --------------------------------------------------------------------------- rewiring


def replace_uses(old: ir.Value, new: ir.Value, names: Names | None = None, *, suffix: str = "_replaced") -> None:
    """Point every user of ``old`` (subgraphs included) and every graph output listing it at
    ``new`` (onnx-ir's ``replace_all_uses_with``).

    A graph output keeps its name: ``new`` takes it, and ``old`` is renamed
    ``names.fresh(name + suffix)`` (it lives on, e.g. as the input of an inserted Q) or, without
    ``names``, loses it (its producer is about to be removed).
    """
    if not old.is_graph_output():
        old.replace_all_uses_with(new)
        return
    name = old.name
    old.name = names.fresh(f"{name}{suffix}") if names is not None else None
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    new.name = name


# --------------------------------------------------------------------------- unused removal


def remove_unused(model: ir.Model, op_types: tuple[str, ...] = ("Constant",)) -> int:
    """Drop nodes of ``op_types`` and initializers that nothing reads (graph inputs kept).

    Only side-effect-free producers belong in ``op_types`` (Constant; cleanup adds the QDQ ops).
    Not onnx-ir's RemoveUnusedNodesPass: that one removes every dead node and trims optional
    outputs, while a pass here only clears away what its own rewrites orphaned and leaves the
    rest of the user's graph as it was. Initializers of subgraphs are walked too.
    """
    removed = 0
    changed = True
    while changed:
        changed = False
        for graph in iter_graphs(model.graph):
            for node in reversed(list(graph)):
                if node.op_type not in op_types:
                    continue
                if any(o.uses() or o.is_graph_output() for o in node.outputs):
                    continue
                graph.remove(node, safe=True)
                removed += 1
                changed = True
            for name, value in list(graph.initializers.items()):
                if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                    del graph.initializers[name]
                    removed += 1
    return removed


def drop_unused_initializers(graph: ir.Graph, values: Iterable[ir.Value]) -> None:
    """Remove those of ``values`` that are initializers nobody reads any more, releasing the
    memory map of external (or memory-mapped inline) data so a streamed fp32 weight leaves
    the process's RSS."""
    for value in values:
        if value.is_initializer() and not list(value.uses()) and not value.is_graph_output():
            tensor = value.const_value
            graph.initializers.pop(value.name, None)
            if isinstance(tensor, (ir.ExternalTensor, MappedTensor)):
                try:
                    tensor.release()
                except BufferError:
                    pass


# --------------------------------------------------------------------------- builder


class GraphBuilder:
    """Makes uniquely named initializers, values and nodes for one model."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.names = Names(model)
        self._shared: dict[tuple, tuple[ir.Value, ir.Value]] = {}

    def name(self, base: str) -> str:
        return self.names.fresh(base)

    def initializer(self, array: np.ndarray, base: str) -> ir.Value:
        """A new initializer of the main graph (visible from every subgraph)."""
        return add_initializer(self.model.graph, self.names, base, np.asarray(array))

    def qparams(self, p, base: str) -> tuple[ir.Value, ir.Value]:
        """(scale, zero_point) initializers for ``p`` (a QParams); identical parameters share
        them."""
        key = p.key()
        if key not in self._shared:
            self._shared[key] = (
                self.initializer(p.scale.astype(np.float32), base + "_scale"),
                self.initializer(p.zero_point, base + "_zero_point"),
            )
        return self._shared[key]

    def node(
        self,
        op_type: str,
        inputs: list[ir.Value | None],
        base: str,
        *,
        attributes: Mapping[str, object] | None = None,
        domain: str = "",
        dtype: ir.DataType | None = None,
        shape: ir.Shape | None = None,
        num_outputs: int = 1,
    ) -> ir.Node:
        outputs = [
            ir.Value(name=self.name(f"{base}_{op_type}" + (f"_{i}" if i else "")),
                     type=ir.TensorType(dtype) if dtype is not None else None, shape=shape)
            for i in range(num_outputs)
        ]
        attrs = ir.convenience.convert_attributes(dict(attributes or {}))
        return ir.Node(domain, op_type, inputs, attrs, outputs=outputs,
                       name=self.name(f"{base}/{op_type}"))

    def replace_uses(self, old: ir.Value, new: ir.Value) -> None:
        """``replace_uses`` with this builder's names."""
        replace_uses(old, new, self.names)
