"""Calibration fanned out: one shard per task, tables merged exactly in shard order.

Shard i of n observes every n-th batch from batch i (``qtool calibrate --shard``), and the
tables' counts, min/max and histograms add exactly, so the merged table equals one run's.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from qtool.config import Recipe
from qtool.executors.base import Executor, Task
from qtool.executors.data import HeldDataset, effective_batch_size, shard_positions


def calibrate_shard(model: str, data, recipe: Recipe, shard: tuple[int, int], threads: int):  # noqa: ANN001, ANN201
    """One shard's table (runs on a worker). ``data``: a folder path or a HeldDataset."""
    from qtool.pipeline import calibrate

    return calibrate(model, data, recipe, shard=shard, threads=threads)


def calibrate_sharded(model: str | os.PathLike, data: str | os.PathLike, recipe: Recipe, executor: Executor, *,
                      shards: int = 0, threads: int = 0, ship: bool = False,
                      on_done: Callable[[Task], None] | None = None):  # noqa: ANN201 - a CalibrationTable
    """``recipe``'s calibration of ``model`` over ``data`` in ``shards`` tasks (0: one per
    worker), merged. ``ship``: the driver reads each shard's samples and sends them through
    the executor's object store instead of the workers reading ``data`` by path."""
    from qtool.calibration import CalibrationTable

    n = shards or executor.workers
    payloads = [str(data)] * n
    if ship:
        payloads = _shipped(model, data, recipe, n, executor)
    tasks = [Task(f"calibration shard {i}/{n}", calibrate_shard, (str(model), payloads[i], recipe, (i, n), threads))
             for i in range(n)]
    tables = executor.map(tasks, on_done)
    return tables[0] if n == 1 else CalibrationTable.merge(tables)


def _shipped(model, data, recipe: Recipe, n: int, executor: Executor) -> list:  # noqa: ANN001
    from qtool.data import Dataset, input_specs
    from qtool.model import load

    dataset = Dataset(data, input_specs(load(model)), recipe.preprocess)
    c = recipe.calibration
    count = len(dataset) if c.samples <= 0 else min(c.samples, len(dataset))
    size = effective_batch_size(dataset, c.batch_size)
    return [executor.put(HeldDataset.of(dataset, shard_positions(count, size, (i, n)))) for i in range(n)]
