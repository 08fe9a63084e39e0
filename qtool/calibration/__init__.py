"""Streaming calibration: observe the activations conversion needs, in flat memory.

    table = qtool.calibrate("model.onnx", "calib/", "int8-static")   # qtool.pipeline
    table.save("table.json")
    ranges = CalibrationTable.load("table.json").ranges()   # {tensor: (lo, hi)}

Batches flow through one onnxruntime session with the needed tensors exposed
(``collect.stream_tensors``); per-tensor observers (``observers``) fold each batch into
min/max and a fixed-size histogram and the batch is dropped, so memory does not grow with
the number of samples. Ranges are chosen at the end (``thresholds``) and stored in a
versioned, mergeable JSON table (``table``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qtool.calibration.observers import TensorObserver
from qtool.calibration.table import CalibrationTable, TensorStats
from qtool.calibration.thresholds import HISTOGRAM_METHODS, METHODS
from qtool.config import Recipe
from qtool.data import Dataset
from qtool.errors import CalibrationError, UsageError
from qtool.runtime.collect import first_non_finite_sample, raise_non_finite, stream_tensors

__all__ = [
    "CalibrationTable",
    "TensorStats",
    "METHODS",
    "calibrate_prepared",
    "calibration_params",
    "parse_shard",
    "shard_samples",
    "stream_tensors",
]


def calibration_params(recipe: Recipe) -> dict:
    """The settings that define a table's statistics (shards must agree on all of them)."""
    c = recipe.calibration
    if c.method not in METHODS:
        raise UsageError(
            f"unknown calibration method {c.method!r}", f"choose one of: {', '.join(METHODS)}"
        )
    if not 0 < c.percentile <= 100:
        raise UsageError(f"percentile must be in (0, 100], got {c.percentile}", "e.g. 99.99")
    if not 16 <= c.bins <= 1 << 20:
        raise UsageError(f"bins must be between 16 and 1048576, got {c.bins}", "e.g. 2048")
    if not 0 <= c.moving_average < 1:
        raise UsageError(
            f"moving_average must be in [0, 1), got {c.moving_average}", "0 disables it; e.g. 0.9"
        )
    params = {"bins": c.bins, "symmetric": c.symmetric, "bits": recipe.quantize.bits,
              "moving_average": c.moving_average, "batch_size": c.batch_size}
    if c.method == "percentile":
        params["percentile"] = c.percentile
    return params


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), checked: 0 <= I < N."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise UsageError(f"bad shard {text!r}", "write it as I/N, e.g. --shard 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"shard {text} is out of range", "use I/N with 0 <= I < N, e.g. 3/4")
    return i, n


def shard_samples(count: int, batch_size: int, shard: tuple[int, int]) -> int:
    """How many of ``count`` samples shard (i, n) sees with batches of ``batch_size``."""
    i, n = shard
    return sum(
        min(batch_size, count - start)
        for g, start in enumerate(range(0, count, batch_size))
        if g % n == i
    )


@dataclass
class Progress:
    """What ``on_progress`` receives after each batch."""

    done: int  # samples observed so far
    total: int  # samples this run (this shard) will observe
    seconds: float


def calibrate_prepared(
    model: ir.Model,
    data_dir: str | os.PathLike | Dataset,
    recipe: Recipe,
    names: list[str],
    *,
    shard: tuple[int, int] = (0, 1),
    on_progress: Callable[[Progress], None] | None = None,
    threads: int = 0,
) -> CalibrationTable:
    """Observe the tensors ``names`` of ``model`` over the samples in ``data_dir`` (a folder,
    or a ``qtool.data.Dataset`` already opened on one).

    ``model`` is the graph conversion will rewrite (already pre-processed, value types
    known); it is not modified. The table is stored under its fingerprint.
    Memory: the model, one batch of activations, and per tensor ``bins`` int64 counts
    (16 KiB at 2048 bins), independent of the number of samples. ``shard=(i, n)`` observes
    every n-th batch starting at i; merging the n tables equals one run.
    ``qtool.calibrate`` (qtool.pipeline) loads, pre-processes and selects the tensors.
    """
    from qtool.data import input_specs
    from qtool.model import graph_fingerprint

    params = calibration_params(recipe)
    c = recipe.calibration
    if not 0 <= shard[0] < shard[1]:
        raise CalibrationError(
            f"shard {shard[0]}/{shard[1]} is out of range", "use I/N with 0 <= I < N, e.g. 0/4"
        )
    fingerprint = graph_fingerprint(model)  # structure only: inferred types do not change it
    dataset = (data_dir if isinstance(data_dir, Dataset)
               else Dataset(data_dir, input_specs(model), recipe.preprocess))
    count = len(dataset) if c.samples <= 0 else min(c.samples, len(dataset))
    batch_size = max(1, c.batch_size)
    if batch_size > 1 and any(not s.batch_dynamic for s in dataset.inputs if s.shape):
        batch_size = 1  # Dataset.batches does the same for fixed-batch models
    total = shard_samples(count, batch_size, shard)
    if total == 0:
        raise CalibrationError(
            f"shard {shard[0]}/{shard[1]} gets no samples ({count} samples in batches of "
            f"{batch_size})",
            "use fewer shards or a smaller --batch-size",
        )

    histogram = c.method in HISTOGRAM_METHODS
    observers = {n: TensorObserver(c.bins, histogram, c.moving_average) for n in names}
    start = time.perf_counter()
    # Two rounds of output buffers: onnxruntime fills one while a worker thread folds the
    # other into the observers (the kernels release the GIL), so observing overlaps the
    # next batch's inference. Batches are folded one at a time, in order: the same table.
    stream = stream_tensors(
        model, dataset, names, batch_size=batch_size, limit=count, shard=shard,
        check_finite=False, threads=threads, reuse=2,
    )
    skipped: dict[str, str] = {}
    done = _observe_pipelined(stream, observers, skipped, dataset, total, start, on_progress)
    info = {"seconds": round(time.perf_counter() - start, 3), "batch_size": batch_size}
    if skipped:
        info["skipped"] = skipped
    return CalibrationTable.from_observers(
        fingerprint, c.method, params, done, observers, (f"{shard[0]}/{shard[1]}",), info
    )


def _fold(ids: list[int], tensors: dict, observers: dict, skipped: dict, dataset: Dataset) -> None:
    """Fold one batch into the observers (a tensor holding +-inf is dropped, with why)."""
    for name, array in tensors.items():
        if name in skipped:
            continue
        lo, hi = observers[name].update(array)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            if np.isnan(array).any():
                raise_non_finite(name, array, ids, dataset)  # NaN: a real fault
            # +-Inf without NaN is deliberate arithmetic (attention masks use -inf): no
            # int8 range can hold it, so the tensor stays float, with the reason.
            sample = dataset.samples[first_non_finite_sample(array, ids)].path.name
            skipped[name] = f"holds +-inf (sample {sample}): left in float"
            del observers[name]


def _observe_pipelined(stream, observers: dict, skipped: dict, dataset: Dataset, total: int,  # noqa: ANN001
                       start: float, on_progress: Callable[[Progress], None] | None) -> int:
    """Fold every batch of ``stream`` (made with ``reuse=2``) on one worker thread while the
    next batch runs; returns the number of samples observed."""
    from qtool.runtime.collect import fold_behind

    done = 0
    for n in fold_behind(stream, lambda ids, tensors: _fold(ids, tensors, observers, skipped, dataset)):
        done += n
        if on_progress is not None:
            on_progress(Progress(done, total, time.perf_counter() - start))
    return done

