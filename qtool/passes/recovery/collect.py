"""What recovery measures on the calibration samples: the inputs' second moments of each
layer (AdaRound's objective) and the mean output shift a weight change causes (bias
correction). Both stream one batch at a time through onnxruntime (qtool.runtime)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool.model import iter_nodes
from qtool.passes.graph import GraphBuilder
from qtool.passes.recovery.layers import Layer, im2col

ROWS_PER_SAMPLE = 256  # positions of a Conv's output sampled per input sample (seeded)
# Layers reading more inputs per output than this keep nearest rounding: their K x K
# products (K = 4608 in a ResNet's last stage: 20 M entries, ~10 GFLOP per step) do not fit
# a budget of minutes on a CPU. Said in the report.
MAX_K = 2304


def input_grams(model: ir.Model, layers: list[Layer], dataset, *, limit: int = 0,  # noqa: ANN001 - Dataset
                seed: int = 0, seconds: float | None = None) -> dict[str, np.ndarray]:
    """Per layer: ``G = X^T X / rows`` per group (``[groups, K, K]``, float64), X the
    patches the layer reads on the calibration samples (up to ROWS_PER_SAMPLE positions
    of each sample). ``(W' - W) G (W' - W)^T`` is then the mean squared change of the
    layer's output that replacing W by W' causes, row by row. With ``seconds``, samples stop
    being added once that much time has gone (at least one is always read)."""
    import time

    from qtool.runtime import stream_tensors

    rng = np.random.default_rng(seed)
    names = list(dict.fromkeys(layer.node.inputs[0].name for layer in layers))
    grams: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    start = time.perf_counter()
    for _, tensors in stream_tensors(model, dataset, names, limit=limit):
        if grams and seconds is not None and time.perf_counter() - start > seconds:
            break
        for layer in layers:
            if layer.rows().shape[2] > MAX_K:
                continue
            x = tensors[layer.node.inputs[0].name]
            for sample in np.split(x, x.shape[0]) if layer.node.op_type == "Conv" else [x]:
                patches = im2col(np.asarray(sample, np.float32), layer)
                if patches is None:
                    continue
                if patches.shape[1] > ROWS_PER_SAMPLE:
                    patches = patches[:, rng.choice(patches.shape[1], ROWS_PER_SAMPLE, replace=False)]
                p = patches.astype(np.float32)
                g = (p.transpose(0, 2, 1) @ p).astype(np.float64)  # batched float32 BLAS
                grams[layer.name] = grams[layer.name] + g if layer.name in grams else g
                rows[layer.name] = rows.get(layer.name, 0) + p.shape[1]
    return {name: g / rows[name] for name, g in grams.items()}


def mean_output_shift(model: ir.Model, deltas: list[tuple[Layer, np.ndarray]], dataset, *,  # noqa: ANN001
                      limit: int = 0) -> dict[str, np.ndarray]:
    """Per layer: the mean over the calibration samples (and positions) of each output
    channel of ``layer(x; delta)`` without bias, i.e. how much the output's mean moves when
    ``delta`` is added to the weight. Each layer reads its inputs in ``model`` as it is."""
    from qtool.runtime import stream_tensors

    work = model.clone()
    b = GraphBuilder(work)
    by_position = dict(zip(map(id, iter_nodes(model)), iter_nodes(work)))
    outputs: dict[str, tuple[str, int]] = {}
    for layer, delta in deltas:
        twin = by_position[id(layer.node)]
        attrs = {k: a.value for k, a in twin.attributes.items()}
        d = b.initializer(np.asarray(delta, np.float32), f"{layer.name}_delta")
        node = b.node(twin.op_type, [twin.inputs[0], d], f"{layer.name}_delta", attributes=attrs,
                      dtype=ir.DataType.FLOAT)
        twin.graph.append(node)
        outputs[layer.name] = (node.outputs[0].name, layer.channel_axis)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _, tensors in stream_tensors(work, dataset, [name for name, _ in outputs.values()], limit=limit):
        for layer_name, (name, axis) in outputs.items():
            y = np.moveaxis(np.asarray(tensors[name], np.float64), axis, -1)
            flat = y.reshape(-1, y.shape[-1])
            sums[layer_name] = sums.get(layer_name, 0.0) + flat.sum(axis=0)
            counts[layer_name] = counts.get(layer_name, 0) + flat.shape[0]
    return {name: sums[name] / counts[name] for name in sums}
