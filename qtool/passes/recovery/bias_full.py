"""Full (sequential) bias correction: each layer's bias moved so that its output's mean per
channel, computed by the *quantized* model, equals the float model's.

The empirical variant (``weights.bias_correct``) removes only the shift that quantizing a
layer's own weight causes, measured on float inputs. Here the shift is measured on the
quantized model itself (its Q/DQ pairs, int8 weights and activations, and the corrections
already made upstream), so it also takes in what quantizing the activations and the layers
before it did to the layer's input (NNCF's "full" bias correction does the same).

How: a twin of the model is quantized exactly as the int8 pass will quantize it (same
recipe, same calibrated ranges), and every target layer's output gets an ``Add`` of a
correction fed as a graph input. Layers are corrected in waves by depth (the number of target
layers on the longest path from the inputs): a wave's layers are not upstream of each
other, so one run of the twin, cut after the wave's outputs, measures them all, and the next
wave is measured with their corrections in place. Cost: one float run, then about half a
quantized run per wave on the correction samples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qtool.config import Recipe
from qtool.passes import PassReport
from qtool.passes.graph import GraphBuilder
from qtool.passes.recovery.layers import (
    Layer,
    bias_of,
    output_channels,
    set_bias,
    set_weight,
    target_layers,
)

MIN_SHIFT = 1e-9  # as weights.MIN_SHIFT: a shift inside float32's noise is not corrected
CORRECTION_SUFFIX = "_bias_full_correction"


def bias_correct_full(model: ir.Model, recipe: Recipe, ranges: dict, dataset, *, limit: int = 0,  # noqa: ANN001
                      float_weights: dict[str, np.ndarray] | None = None,
                      on_progress: Callable[[int, int], None] | None = None) -> PassReport:
    """Correct the biases of ``model``'s target layers in place (see the module docstring).
    ``ranges``: the calibrated activation ranges the int8 pass will use; ``float_weights``:
    weights before learned rounding (the float reference is the model with those)."""
    report = PassReport("bias-correction-full")
    layers, skipped = target_layers(model, recipe)
    report.skipped.update(skipped)
    chosen: list[Layer] = []
    for layer in layers:
        _, why = bias_of(layer)
        if why is None and layer.node.graph is model.graph:
            chosen.append(layer)
        else:
            report.skip(layer.name, why or "inside a subgraph")
    if not chosen:
        return report
    waves = depth_waves(model, chosen)
    outputs = {layer.name: layer.node.outputs[0].name for layer in chosen}
    axes = {layer.node.outputs[0].name: layer.channel_axis for layer in chosen}
    float_means = _means(_float_reference(model, float_weights or {}), dataset, axes, limit)
    twin = QuantizedTwin(model, recipe, ranges, chosen)
    corrections = {layer.name: np.zeros(float_means[outputs[layer.name]].shape, np.float64) for layer in chosen}
    for i, wave in enumerate(waves):
        measured = twin.means([la.name for la in wave], corrections, dataset, limit)
        for layer in wave:
            if layer.name in measured:  # the measured output is before the correction's Add
                corrections[layer.name] = float_means[outputs[layer.name]] - measured[layer.name]
        if on_progress is not None:
            on_progress(i + 1, len(waves))
    b = GraphBuilder(model)
    worst, where = 0.0, ""
    for layer in chosen:
        shift = corrections[layer.name]
        if not np.any(np.abs(shift) > MIN_SHIFT):
            continue
        bias, _ = bias_of(layer)
        base = np.zeros(shift.shape, np.float64) if bias is None else bias.astype(np.float64)
        set_bias(b, layer, (base + shift).astype(np.float32))
        report.count("biases corrected")
        if float(np.abs(shift).max()) > worst:
            worst, where = float(np.abs(shift).max()), layer.name
    report.count("waves", len(waves))
    if report.modified:
        report.notes.append(f"largest mean shift removed: {worst:.3g} (in {where}); measured on the quantized "
                            f"model, {len(waves)} waves")
    return report


def depth_waves(model: ir.Model, layers: list[Layer]) -> list[list[Layer]]:
    """``layers`` grouped by depth: wave d holds the layers with d target layers on the
    longest path from the graph's inputs to them (none of a wave is upstream of another)."""
    by_node = {id(layer.node): layer for layer in layers}
    depth_of_value: dict[int, int] = {}
    waves: dict[int, list[Layer]] = {}
    for node in model.graph:  # topologically sorted, as ONNX requires
        d = max((depth_of_value.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            waves.setdefault(d, []).append(layer)
            d += 1
        for v in node.outputs:
            depth_of_value[id(v)] = d
    return [waves[d] for d in sorted(waves)]


def _float_reference(model: ir.Model, float_weights: dict[str, np.ndarray]) -> ir.Model:
    """``model``, or a copy with the weights learned rounding replaced put back."""
    if not float_weights:
        return model
    copy = model.clone()
    b = GraphBuilder(copy)
    for node in copy.graph:
        name = node.name or (node.outputs[0].name if node.outputs else "")
        if name in float_weights:
            set_weight(b, node, 1, float_weights[name], "float")
    return copy


def _means(model: ir.Model, dataset, axes: dict[str, int], limit: int) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Per tensor of ``axes`` (name -> its channel axis): its mean per channel over the samples."""
    from qtool.runtime import stream_tensors

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _, tensors in stream_tensors(model, dataset, list(axes), limit=limit):
        _accumulate(tensors, axes, sums, counts)
    return {name: sums[name] / counts[name] for name in sums}


def _accumulate(tensors: dict[str, np.ndarray], axes: dict[str, int], sums: dict, counts: dict) -> None:
    for name, y in tensors.items():
        y = np.moveaxis(np.asarray(y, np.float64), axes[name], -1)  # Conv: [N, C, ...]; Gemm/MatMul: [..., C]
        flat = y.reshape(-1, y.shape[-1])
        sums[name] = sums.get(name, 0.0) + flat.sum(axis=0)
        counts[name] = counts.get(name, 0) + flat.shape[0]


class QuantizedTwin:
    """A copy of the model quantized as the int8 pass will quantize it, with an ``Add`` of a
    per-channel correction (a graph input) after each target layer's output."""

    def __init__(self, model: ir.Model, recipe: Recipe, ranges: dict, layers: list[Layer]) -> None:
        from qtool.passes.concat_ranges import escaped, mismatched_concats
        from qtool.passes.qdq import quantize_static

        twin = model.clone()
        twins = dict(zip(map(id, model.graph), twin.graph))  # the clone keeps the node order
        wide = mismatched_concats(twin, ranges)  # what the int8 pass keeps float, kept float here too
        quantize_static(twin, recipe.override("quantize", exclude=recipe.quantize.exclude
                                              + tuple(map(escaped, wide.skipped))), ranges)
        b = GraphBuilder(twin)
        self.measured: dict[str, str] = {}  # layer -> the tensor measured (its output before the Add)
        self.axes: dict[str, int] = {}  # that tensor -> its channel axis
        self.inputs: dict[str, tuple[str, tuple[int, ...]]] = {}  # layer -> (graph input of its correction, shape)
        for layer in layers:
            node = twins[id(layer.node)]  # still in the graph: quantize_static only adds Q/DQ around it
            out = node.outputs[0]
            # one value per output channel, broadcast along the channel axis of the output
            shape = (output_channels(layer),) + (1,) * (layer.weight.ndim - 2 if node.op_type == "Conv" else 0)
            corr = ir.Value(name=b.name(f"{layer.name}{CORRECTION_SUFFIX}"), type=ir.TensorType(ir.DataType.FLOAT),
                            shape=ir.Shape(shape))
            twin.graph.inputs.append(corr)
            add = b.node("Add", [out, corr], f"{layer.name}_corrected", dtype=ir.DataType.FLOAT)
            twin.graph.insert_after(node, add)
            if out.is_graph_output():
                b.replace_uses(out, add.outputs[0])  # the Add's own input too: put it back
                add.replace_input_with(0, out)
            else:
                for user, i in [(user, i) for user, i in out.uses() if user is not add]:
                    user.replace_input_with(i, add.outputs[0])
            self.measured[layer.name] = out.name
            self.axes[out.name] = layer.channel_axis
            self.inputs[layer.name] = (corr.name, shape)
        self.proto = ir.serde.serialize_model(twin)

    def means(self, names: list[str], corrections: dict[str, np.ndarray], dataset, limit: int  # noqa: ANN001
              ) -> dict[str, np.ndarray]:
        """The mean per channel of the named layers' outputs (before their correction Add),
        with ``corrections`` fed to every layer's Add."""
        from qtool.runtime.sessions import open_session

        wanted = [self.measured[n] for n in names if n in self.measured]
        session = open_session(cut(self.proto, wanted).SerializeToString())
        feeds_for = {i.name for i in session.get_inputs()}
        extra = {name: np.asarray(corrections[layer], np.float32).reshape(shape)
                 for layer, (name, shape) in self.inputs.items() if name in feeds_for}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for _, feed in dataset.batches(1, limit=limit):
            inputs = {k: v for k, v in feed.items() if k in feeds_for}
            _accumulate(dict(zip(wanted, session.run(wanted, {**inputs, **extra}))), self.axes, sums, counts)
        by_tensor = {name: sums[name] / counts[name] for name in sums}
        return {n: by_tensor[self.measured[n]] for n in names if n in self.measured}


def cut(proto, outputs: list[str]):  # noqa: ANN001, ANN201 - onnx.ModelProto
    """A copy of ``proto`` whose outputs are ``outputs`` and which keeps only the nodes they
    need (a model with subgraphs keeps every node: their outer-scope reads are implicit)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return model
    needed, keep = set(outputs), []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    inputs = [i for i in g.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model
