"""Stream intermediate activations out of onnxruntime, one batch at a time.

One session is built with the requested tensors added as extra graph outputs; every batch
of the dataset runs through it and its tensors are handed to the caller, who is expected
to fold them into small statistics and drop them. Nothing accumulates here, so memory is
the model, the session's working set and one batch of activations, whatever the number of
samples.

Weights are never duplicated: the graph is serialised on its own, initializers stored as
external data keep pointing at the original files (onnxruntime is told their folder with
the session config key ``session.model_external_initializers_file_folder_path``), and
nothing is written to disk.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qtool.data import Dataset
from qtool.errors import CalibrationError, ModelError
from qtool.runtime.sessions import session_options

EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# In-memory weights at least this large reach onnxruntime as buffers (add_external_initializers,
# which copies each once into its graph) instead of inside the serialised model, which would
# hold two more copies of every weight while the session is built.
SHARED_WEIGHT_BYTES = 1 << 16
_PLACEHOLDER = "qtool_shared_weights.bin"
# build_session swaps the model's large weights for placeholders while it serialises the
# graph, then puts them back: sessions built from one model on several threads (calibration's
# two streams) take turns, or one would serialise the other's placeholders.
_SWAP_LOCK = threading.Lock()


def infer_types(model: ir.Model) -> bool:
    """Fill in missing dtypes/shapes of intermediate values (in place); True if it ran.

    Activation selection needs each value's element type, which exporters often leave
    out. onnx's shape inference runs on the graph only (onnx-ir strips weight data).
    """
    missing = any(
        v.dtype is None for node in model.graph for v in node.outputs if v is not None
    )
    if not missing:
        return False
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(strict_mode=False)(model)
    return True


def _external_folder(model: ir.Model) -> str | None:
    folders = {
        str(Path(v.const_value.base_dir).resolve())
        for graph in model.graphs()
        for v in graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if len(folders) > 1:
        raise ModelError(
            "the model's external data lives in several folders: " + ", ".join(sorted(folders)),
            "save the model once with qtool or onnx so that its data files sit beside it",
        )
    return folders.pop() if folders else None


def build_session(
    model: ir.Model,
    tensor_names: Sequence[str],
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    arena: bool = True,
    *,
    only_requested: bool = False,
):
    """An onnxruntime session whose outputs are the model's outputs plus ``tensor_names``
    (``arena``: see qtool.runtime.sessions.session_options). ``only_requested``: the
    outputs are ``tensor_names`` alone, and nodes none of them depends on are left out
    (a decoder's vocabulary projection, when only the MatMul inputs are wanted).

    Returns ``(session, output_names)``. The input model is not modified: the extra
    outputs are added to the serialised copy of the graph.
    """
    import onnx
    import onnxruntime as ort

    extra, main_values = _extra_outputs(model, tensor_names)
    folder = _external_folder(model)
    with _SWAP_LOCK:
        proto, shared, placeholder_dir = _serialized(model, folder)
    for name in extra:
        value = main_values[name]
        info = onnx.ValueInfoProto(name=name)
        if value.dtype is not None:
            # Only the element type: onnxruntime infers the shape, and a stale symbolic
            # shape here would be an error.
            info.type.tensor_type.elem_type = int(value.dtype)
        proto.graph.output.append(info)
    if only_requested:
        read = _keep_only(proto.graph, set(tensor_names))
        shared = {name: entry for name, entry in shared.items() if name in read}

    # no spinning: idle threads busy-waiting would take the core the caller's statistics need
    options = session_options(threads, arena=arena, inter_op=False, spin=False)
    if folder is not None or placeholder_dir is not None:
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, folder or placeholder_dir)
    buffers = [ort.OrtValue.ortvalue_from_numpy(array) for _, array in shared.values()]
    if shared:
        # Replaces the placeholder references before any graph optimisation reads them
        # (add_initializer would not: optimisers would read the empty placeholder file).
        options.add_external_initializers(list(shared), buffers)
    data = proto.SerializeToString()
    del proto
    try:
        session = ort.InferenceSession(data, options, providers=list(providers))
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ModelError(
            f"onnxruntime cannot run the model: {(text[0] if text else type(exc).__name__)[:200]}",
            "check that `onnxruntime` runs the original model; calibration needs it to",
        ) from None
    finally:
        if placeholder_dir is not None:
            shutil.rmtree(placeholder_dir, ignore_errors=True)
    return session, [o.name for o in session.get_outputs()]


def _extra_outputs(model: ir.Model, tensor_names: Sequence[str]) -> tuple[list[str], dict[str, ir.Value]]:
    """The names to add as graph outputs (not already outputs or inputs), in order, and the
    main graph's values by name; a name no main-graph node makes is an error naming why."""
    main_values: dict[str, ir.Value] = {}
    for node in model.graph:
        for value in node.outputs:
            if value is not None:
                main_values[value.name] = value
    graph_inputs = {v.name for v in model.graph.inputs}
    subgraph_values = set()
    for sub in model.graph.subgraphs():
        for node in sub:
            subgraph_values.update(v.name for v in node.outputs if v is not None)

    existing = [v.name for v in model.graph.outputs]
    extra = []
    for name in tensor_names:
        if name in existing or name in graph_inputs or name in extra:
            continue
        if name not in main_values:
            if name in subgraph_values:
                raise CalibrationError(
                    f"tensor {name!r} lives inside an If/Loop/Scan subgraph and cannot be observed",
                    "exclude the node that consumes it (--exclude) or inline the control flow",
                )
            raise CalibrationError(
                f"tensor {name!r} is not produced by any node of the model",
                "check the tensor name (`qtool inspect MODEL` lists the graph)",
            )
        extra.append(name)
    return extra, main_values


def _keep_only(graph, names: set[str]) -> set[str]:  # noqa: ANN001 - onnx.GraphProto
    """Make ``names`` the graph's only outputs and drop the nodes none of them needs (a
    node's subgraphs count every name they read as its input), and the initializers no
    node left reads. In place; returns the names the kept nodes and outputs read."""
    outputs = [o for o in graph.output if o.name in names] or list(graph.output[:1])  # a graph needs one
    outputs = [type(o).FromString(o.SerializeToString()) for o in outputs]  # kept past the clear below
    needed = {o.name for o in outputs} | names
    kept = []
    for node in reversed(graph.node):  # ONNX graphs are topologically sorted
        if not any(o in needed for o in node.output):
            continue
        kept.append(node)
        needed |= _reads(node)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    del graph.output[:]
    graph.output.extend(outputs)
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in needed:
            del graph.initializer[i]
    return needed


def _reads(node) -> set[str]:  # noqa: ANN001 - onnx.NodeProto
    """The names ``node`` reads: its inputs, and those of every node in its subgraphs."""
    read = set(node.input)
    for attr in node.attribute:
        for sub in [attr.g] * attr.HasField("g") + list(attr.graphs):
            for inner in sub.node:
                read |= _reads(inner)
    return read


def _serialized(model: ir.Model, folder: str | None):  # noqa: ANN202 - (ModelProto, shared, placeholder dir)
    """The model's proto, its large inline weights named by a placeholder data file instead of
    copied into the proto (``shared``: name -> (value, array), for add_external_initializers),
    and that file's folder (None when nothing is shared). Call under _SWAP_LOCK: the model's
    weights are swapped for the placeholders while it is serialised."""
    shared = _shareable_weights(model) if folder is None else {}
    placeholder_dir = None
    if shared:
        # The serialised graph names a placeholder data file for the shared weights (onnxruntime
        # checks that it exists); add_external_initializers then supplies their values.
        placeholder_dir = tempfile.mkdtemp(prefix="qtool-")
        Path(placeholder_dir, _PLACEHOLDER).touch()
    originals = {}
    try:
        for name, (value, array) in shared.items():
            originals[name] = value.const_value
            value.const_value = ir.ExternalTensor(
                _PLACEHOLDER, 0, array.nbytes, value.const_value.dtype, shape=value.const_value.shape,
                name=name, base_dir=placeholder_dir,
            )
        return ir.serde.serialize_model(model), shared, placeholder_dir
    except Exception as exc:
        if placeholder_dir is not None:
            shutil.rmtree(placeholder_dir, ignore_errors=True)
        raise ModelError(f"cannot serialise the model for onnxruntime: {exc}", "") from None
    finally:
        for name, tensor in originals.items():
            shared[name][0].const_value = tensor


def _shareable_weights(model: ir.Model) -> dict[str, tuple[ir.Value, np.ndarray]]:
    """Main-graph initializers held in memory, large enough to share, as C-contiguous
    numeric arrays onnxruntime can use in place."""
    shared = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or value.is_graph_input():
            continue
        if tensor.nbytes < SHARED_WEIGHT_BYTES:
            continue
        array = tensor.numpy()
        if array.dtype.kind not in "fiub" or not array.flags.c_contiguous:
            continue
        shared[name] = (value, array)
    return shared


def stream_tensors(
    model: ir.Model,
    dataset: Dataset,
    tensor_names: list[str],
    *,
    batch_size: int = 1,
    limit: int = 0,
    shard: tuple[int, int] = (0, 1),
    providers: Sequence[str] = ("CPUExecutionProvider",),
    check_finite: bool = True,
    threads: int = 0,
    arena: bool = True,
    reuse: int = 0,
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Yield ``(sample indices, {tensor name: array})`` for each batch of ``dataset``.

    ``tensor_names`` may name graph inputs, graph outputs or any intermediate value of the
    main graph. ``limit``/``shard`` select samples as ``Dataset.batches`` does.
    With ``check_finite`` a NaN or Inf raises CalibrationError naming the tensor and the
    sample file; callers that compute min/max anyway can pass False and check themselves
    with ``raise_non_finite``.
    ``reuse=R`` (R >= 1): onnxruntime writes the outputs into R sets of buffers allocated
    once and used in turn (no allocation, page faults or copy per batch); a batch's arrays
    are then valid only until R more batches have been yielded, so the caller must have
    finished with them by then. 0: fresh arrays every batch.
    """
    if not 0 <= shard[0] < shard[1]:
        raise CalibrationError(
            f"shard {shard[0]}/{shard[1]} is out of range", "use I/N with 0 <= I < N, e.g. 0/4"
        )
    # only the requested tensors: nothing after the last of them runs
    session, outputs = build_session(model, tensor_names, providers, threads, arena, only_requested=True)
    input_names = {i.name for i in session.get_inputs()}
    wanted = list(dict.fromkeys(tensor_names))
    bound = _BoundOutputs(session, outputs, reuse) if reuse else None
    for ids, feed in dataset.batches(batch_size, limit=limit, shard=shard):
        try:
            inputs = {k: v for k, v in feed.items() if k in input_names}
            results = bound.run(inputs) if bound is not None else session.run(outputs, inputs)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            names = ", ".join(dataset.samples[i].path.name for i in ids[:3])
            raise CalibrationError(
                f"onnxruntime failed on sample {names}: {(text[0] if text else '')[:200]}",
                "check that the samples match the model's inputs (shape, dtype, value range)",
            ) from None
        by_name = dict(zip(outputs, results))
        tensors = {name: by_name[name] if name in by_name else feed[name] for name in wanted}
        del results, by_name
        if check_finite:
            for name, array in tensors.items():
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise_non_finite(name, array, ids, dataset)
        yield ids, tensors


def fold_behind(stream: Iterator[tuple[list[int], dict[str, np.ndarray]]],
                fold: Callable[[list[int], dict[str, np.ndarray]], None]) -> Iterator[int]:
    """Call ``fold(ids, tensors)`` for every batch of ``stream`` on one worker thread while
    onnxruntime runs the next batch; yield each batch's sample count once its fold is done.

    ``stream`` must come from :func:`stream_tensors` with ``reuse=2`` (or 0): the buffers
    of batch i are refilled by batch i + 2, which the stream starts only after batch i's
    fold has finished. Folds run one at a time, in order, so sums come out as a plain loop
    makes them. A fold's exception is raised here; an early exit cancels what is pending.
    numpy's products and qtool's kernels release the GIL, so folding overlaps inference.
    """
    from concurrent.futures import ThreadPoolExecutor

    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtool-fold") as pool:
        try:
            for ids, tensors in stream:
                if pending is not None:
                    pending[1].result()
                    yield pending[0]
                pending = (len(ids), pool.submit(fold, ids, tensors))
                del tensors
            if pending is not None:
                n, future = pending
                pending = None
                future.result()
                yield n
        finally:
            if pending is not None:
                pending[1].cancel()


class _BoundOutputs:
    """Runs a session with its outputs bound to ``sets`` rounds of pre-allocated buffers.

    The first batch of each input shape runs normally to learn the output shapes and
    dtypes; later batches of that shape write straight into the buffers (onnxruntime's
    I/O binding). A batch of another shape (the short last batch) runs normally. Values
    are the same either way: only where onnxruntime puts them changes.
    """

    def __init__(self, session, outputs: list[str], sets: int) -> None:  # noqa: ANN001
        self.session, self.outputs, self.sets = session, outputs, max(1, sets)
        self.key = None
        self.bindings: list = []
        self.turn = 0

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple((k, v.shape, v.dtype.str) for k, v in inputs.items())
        if key != self.key:
            results = self.session.run(self.outputs, inputs)
            if self.key is None and all(isinstance(r, np.ndarray) and r.dtype.kind in "fiub"
                                        for r in results):
                self.key = key
                self.bindings = [self._bind(results) for _ in range(self.sets)]
            return results
        binding, buffers = self.bindings[self.turn]
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        try:
            self.session.run_with_iobinding(binding)
        except Exception:
            # an output whose shape depends on the values (NonZero, data-dependent Reshape):
            # fixed buffers cannot hold it, so this session goes back to plain runs
            self.key, self.bindings = ("unbound",), []
            return self.session.run(self.outputs, inputs)
        self.turn = (self.turn + 1) % self.sets
        return buffers

    def _bind(self, like: list[np.ndarray]):  # noqa: ANN202 - (IOBinding, buffers)
        binding = self.session.io_binding()
        buffers = [np.empty_like(a, order="C") for a in like]
        for name, buf in zip(self.outputs, buffers):
            binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        return binding, buffers


def first_non_finite_sample(array: np.ndarray, ids: list[int]) -> int:
    """The dataset index of the first sample of the batch whose values are NaN/Inf."""
    if array.ndim >= 1 and array.shape[0] == len(ids):
        for row, index in enumerate(ids):
            if not np.isfinite(array[row]).all():
                return index
    return ids[0]


def raise_non_finite(name: str, array: np.ndarray, ids: list[int], dataset: Dataset) -> None:
    """Raise CalibrationError naming ``name`` and the first sample whose values are NaN/Inf."""
    sample = first_non_finite_sample(array, ids)
    bad = array[~np.isfinite(array)]
    kind = "NaN" if np.isnan(bad).any() else "Inf"
    raise CalibrationError(
        f"tensor {name!r} holds {kind} values for sample {dataset.samples[sample].path.name} "
        f"(#{sample})",
        "check that sample (corrupt or out-of-range input?) or remove it from the folder; "
        "a model that overflows in float32 cannot be calibrated",
    )
