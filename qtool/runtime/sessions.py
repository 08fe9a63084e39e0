"""onnxruntime sessions per execution provider (the one place their options are built), and
streaming a dataset through them.

Only one batch of inputs and outputs is alive at a time; metrics accumulate as batches go.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qtool.errors import ModelError, UsageError

# Short names users type for --ep, and the onnxruntime provider they mean.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
}


def provider_name(short: str) -> str:
    """``cpu`` -> ``CPUExecutionProvider``; full names pass through. Must be available here."""
    import onnxruntime as ort

    full = PROVIDERS.get(short.lower(), short)
    available = ort.get_available_providers()
    if full not in available:
        names = [k for k, v in PROVIDERS.items() if v in available]
        raise UsageError(
            f"execution provider {short!r} is not available in this onnxruntime build",
            f"available here: {', '.join(names) or ', '.join(available)}",
        )
    return full


def session_options(threads: int = 0, optimization: str = "all", optimized_path: str | None = None,
                    arena: bool = True, *, inter_op: bool = True, prepacking: bool = True,
                    spin: bool = True):
    """The one place qtool builds onnxruntime SessionOptions.

    ``threads`` intra-op threads (0: onnxruntime's default); ``inter_op`` False leaves the
    inter-op pool at its default when ``threads`` is set (calibration sessions).
    ``arena`` False: memory goes back to the system after each run instead of staying in
    onnxruntime's arena (for sessions that return very many tensors once per batch).
    ``prepacking`` False skips weight re-layout (a load check, not a session to time).
    ``spin`` False: idle intra-op threads sleep instead of busy-waiting for the next
    parallel section (onnxruntime spins by default, which burns a core between and after
    runs: a third of plain inference's CPU time on 2 cores). Sessions whose caller works
    on each batch's outputs (calibration's histograms) need that core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    if threads > 0:
        options.intra_op_num_threads = threads
        if inter_op:
            options.inter_op_num_threads = 1
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[optimization]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def open_session(
    model: str | os.PathLike | bytes,
    provider: str = "cpu",
    *,
    threads: int = 0,
    optimization: str = "all",
    optimized_path: str | None = None,
    external_data_dir: str | os.PathLike | None = None,
    role: str = "model",
    arena: bool = True,
):
    """An InferenceSession on ``provider``; a model that fails to load raises ModelError.

    ``model`` may be serialized bytes (a modified copy that exposes intermediate tensors);
    ``external_data_dir`` then says where its external weights live, so they are read in
    place instead of being copied.
    """
    import onnxruntime as ort

    options = session_options(threads, optimization, optimized_path, arena)
    if external_data_dir is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_data_dir)
        )
    where = "the model bytes" if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).exists():
        raise ModelError(f"{role} model not found: {model}", "check the path")
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), options,
            providers=[provider_name(provider)],
        )
    except UsageError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"onnxruntime cannot load the {role} model {where}: {first}",
            "check that the file is a complete ONNX model and that this onnxruntime supports its ops",
        ) from None


def run(session, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run one batch; returns output name -> array (all outputs when ``names`` is None)."""
    names = list(names) if names is not None else [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feed)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ModelError(
            f"onnxruntime failed while running the model: {first}",
            "check that the dataset matches the model's inputs (qtool inspect MODEL)",
        ) from None
    return dict(zip(names, values))


def stream(
    sessions: Sequence, dataset, batch_size: int = 1, limit: int = 0
) -> Iterator[tuple[list[int], dict, list[dict[str, np.ndarray]]]]:
    """For each batch: (sample ids, feed, [outputs of each session]); one batch alive at a time."""
    for ids, feed in dataset.batches(batch_size, limit=limit):
        yield ids, feed, [run(s, feed) for s in sessions]
