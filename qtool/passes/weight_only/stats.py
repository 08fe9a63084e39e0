"""Activation statistics for gptq/awq, streamed through the float model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from qtool.config import Recipe
from qtool.passes.weight_only.items import weight_only_inputs
from qtool.quant.blockwise import ActivationStats, batch_moments


def collect_weight_only_stats(
    model_path,
    dataset,
    recipe: Recipe,
    *,
    batch_size: int = 1,
    limit: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, ActivationStats]:
    """Stream ``dataset`` through the model and accumulate, per quantized MatMul input,
    ``X^T X``, ``sum |X|`` and the row count (what gptq and awq need). Memory: O(K^2) per
    input tensor plus one batch, independent of the number of samples.
    """
    from qtool.model import load

    model = load(model_path)
    names = weight_only_inputs(model, recipe)
    if not names:
        return {}
    with one_blas_thread():
        return _accumulate(model, dataset, names, batch_size, limit, on_progress)


def _accumulate(model, dataset, names: list[str], batch_size: int, limit: int,
                on_progress: Callable[[int, int], None] | None) -> dict[str, ActivationStats]:
    from concurrent.futures import ThreadPoolExecutor

    from qtool.runtime.collect import fold_behind, stream_tensors

    # Sums kept in place (adding into the first batch's arrays: the same left-to-right
    # sums as chaining ActivationStats.merged, without a new K x K array per batch).
    sums: dict[str, list] = {}
    total = limit or len(getattr(dataset, "samples", [])) or 0
    halves: list[list[str]] = []

    def fold_names(part: list[str], tensors: dict) -> None:
        for name in part:
            xtx, abs_sum, count = batch_moments(tensors[name])
            if name not in sums:
                sums[name] = [xtx.astype(np.float64), abs_sum, count]
            else:
                acc = sums[name]
                np.add(acc[0], xtx, out=acc[0])  # float32 into the float64 sum, no temporary
                acc[1] += abs_sum
                acc[2] += count

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtool-moments") as helper:
        def fold(ids: list[int], tensors: dict) -> None:
            if not halves:
                halves.extend(_balanced_halves(names, tensors))
            other = helper.submit(fold_names, halves[1], tensors)
            fold_names(halves[0], tensors)
            other.result()

        # Each batch is folded (its inputs in two halves, on two threads) while onnxruntime
        # runs the next one (two rounds of output buffers). Every input's sums still take
        # the batches in order: the same sums as a plain loop.
        stream = stream_tensors(model, dataset, names, batch_size=batch_size, limit=limit, reuse=2)
        done = 0
        for n in fold_behind(stream, fold):
            done += n
            if on_progress is not None:
                on_progress(done, total)
    return {name: ActivationStats(*sums[name]) for name in names if name in sums}


def _balanced_halves(names: list[str], tensors: dict) -> list[list[str]]:
    """``names`` in two lists of about equal X^T X work (K^2 per row), largest first."""
    halves: list[list[str]] = [[], []]
    work = [0, 0]
    for name in sorted(names, key=lambda n: -np.shape(tensors[n])[-1]):
        side = 0 if work[0] <= work[1] else 1
        halves[side].append(name)
        work[side] += np.shape(tensors[name])[-1] ** 2
    return halves


def one_blas_thread():
    """BLAS held to one thread (threadpoolctl) where numpy products are many and small, or
    where qtool's own threads already keep the cores busy. OpenBLAS's threads otherwise
    oversubscribe the cores and spin while they wait: on SmolLM2's gptq, the quantize phase
    took 90 CPU s against 18 with one BLAS thread, and the statistics' X^T X of one
    128-token batch at K = 576 8.5 ms of CPU against 0.64 (2 cores, loaded)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a declared dependency; without it nothing changes
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")
