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

    def new_observer() -> TensorObserver:
        return TensorObserver(c.bins, histogram, c.moving_average)

    start = time.perf_counter()
    skipped: dict[str, str] = {}
    per_stream = parallel_streams(model, names, batch_size=batch_size, batches=-(-total // batch_size),
                                  moving_average=c.moving_average, threads=threads)
    observers: dict[str, TensorObserver] = {}  # filled by the streams' merge
    if per_stream:
        done = _observe_parallel(model, dataset, names, new_observer, observers, skipped, batch_size=batch_size,
                                 limit=count, shard=shard, threads=per_stream, total=total, start=start,
                                 on_progress=on_progress)
    else:
        observers.update((n, new_observer()) for n in names)
        # Two rounds of output buffers: onnxruntime fills one while a worker thread folds the
        # other into the observers (the kernels release the GIL), so observing overlaps the
        # next batch's inference. Batches are folded one at a time, in order: the same table.
        stream = stream_tensors(
            model, dataset, names, batch_size=batch_size, limit=count, shard=shard,
            check_finite=False, threads=threads, reuse=2,
        )
        done = _observe_pipelined(stream, observers, skipped, dataset, total, start, on_progress)
    info = {"seconds": round(time.perf_counter() - start, 3), "batch_size": batch_size}
    if skipped:
        info["skipped"] = skipped
    return CalibrationTable.from_observers(
        fingerprint, c.method, params, done, observers, (f"{shard[0]}/{shard[1]}",), info
    )


# Two streams need enough batches to pay for their second session (measured on 4 corpus
# models, identical tables either way: at 16 samples two streams were 6-50% slower, at 32
# 3-7% faster, at 64 4-13%), and hold a second copy of the weights a session loads itself
# (only large inline weights are shared).
PARALLEL_MIN_BATCHES = 32
PARALLEL_MAX_WEIGHT_BYTES = 256 << 20
# A second stream holds a second batch of observed tensors and a second arena: on a layout
# detector observing 710 MB per batch, 3.1 GB peak against 2.4 for one stream, and no faster.
PARALLEL_MAX_BATCH_BYTES = 512 << 20


def parallel_streams(model: ir.Model, names: list[str], *, batch_size: int, batches: int,
                     moving_average: float, threads: int) -> int:
    """The onnxruntime threads of each of two calibration streams, or 0 for one stream.

    One session on every core spends much of each run in serial sections (the reorders that
    expose the observed tensors out of onnxruntime's blocked layout, the copies out), where
    the other core idles or folds statistics: measured on a ResNet-18-shaped CNN at 256
    samples on 2 cores, 4.72-4.78 s against 4.37 s for two one-thread sessions each folding
    every other batch. Two streams when that is exact and affordable: no moving average
    (it depends on the batch order), no explicit ``threads`` (a worker of a sharded run
    already has its share of the cores), at least two cores, enough batches, weights small
    enough to hold twice, observed tensors (as far as their shapes are known) small enough to
    hold two batches of.
    """
    from qtool.hardware import available_cores
    from qtool.model import initializer_bytes

    cores = available_cores()
    if (threads > 0 or moving_average or cores < 2 or batches < PARALLEL_MIN_BATCHES
            or initializer_bytes(model) > PARALLEL_MAX_WEIGHT_BYTES
            or known_batch_bytes(model, names, batch_size) > PARALLEL_MAX_BATCH_BYTES):
        return 0
    return cores // 2


def known_batch_bytes(model: ir.Model, names: list[str], batch_size: int) -> int:
    """Bytes of one batch of the tensors ``names``, counting those whose inferred shape is
    known (a symbolic first axis is the batch); a tensor with another unknown axis (an image
    size the input leaves open) counts 0, so this is a lower bound."""
    from qtool.model import iter_nodes

    wanted = set(names)
    values = {v.name: v for v in model.graph.inputs if v.name in wanted}
    values.update((v.name, v) for node in iter_nodes(model) for v in node.outputs if v.name in wanted)
    total = 0
    for value in values.values():
        if value.shape is None or value.dtype is None:
            continue
        dims = [batch_size if axis == 0 and not isinstance(d, int) else d for axis, d in enumerate(value.shape)]
        if all(isinstance(d, int) for d in dims):
            total += math.prod(dims) * value.dtype.itemsize
    return total


def _observe_parallel(model: ir.Model, dataset: Dataset, names: list[str],
                      new_observer: Callable[[], TensorObserver], observers: dict, skipped: dict, *,
                      batch_size: int, limit: int, shard: tuple[int, int], threads: int, total: int,
                      start: float, on_progress: Callable[[Progress], None] | None) -> int:
    """Observe ``shard``'s batches in two streams (shards ``(i, 2n)`` and ``(i + n, 2n)``,
    which together are shard ``(i, n)``), each a session of ``threads`` threads folding its
    own batches into its own observers; then merge them into ``observers`` (exact: min/max
    and histograms do not depend on the order), leaving out the ``skipped`` tensors. A stream's error stops the other and is raised
    here. Returns the number of samples observed."""
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    i, n = shard
    parts = [({name: new_observer() for name in names}, {}) for _ in range(2)]
    counts: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def run(sub: tuple[int, int], part_observers: dict, part_skipped: dict) -> None:
        stream = stream_tensors(model, dataset, names, batch_size=batch_size, limit=limit, shard=sub,
                                check_finite=False, threads=threads, reuse=1)
        try:
            for ids, tensors in stream:
                if stop.is_set():
                    return
                _fold(ids, tensors, part_observers, part_skipped, dataset)
                counts.put(len(ids))
        finally:
            stream.close()

    done = 0
    with ThreadPoolExecutor(2, thread_name_prefix="qtool-calibrate") as pool:
        pending = [pool.submit(run, sub, *part) for sub, part in zip(((i, 2 * n), (i + n, 2 * n)), parts)]
        try:
            while pending or not counts.empty():
                try:
                    done += counts.get(timeout=0.05)
                except queue.Empty:
                    pass
                else:
                    if on_progress is not None:
                        on_progress(Progress(done, total, time.perf_counter() - start))
                for future in [f for f in pending if f.done()]:
                    future.result()  # a stream's error (non-finite values, onnxruntime) is raised here
                    pending.remove(future)
        except BaseException:
            stop.set()  # the other stream ends after its current batch
            raise
    for part_skipped in (parts[0][1], parts[1][1]):
        for name, why in part_skipped.items():
            skipped.setdefault(name, why)
    for name in names:
        if name not in skipped:
            observers[name] = parts[0][0][name].merged(parts[1][0][name])
    return done


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

