"""Activation statistics for gptq/awq, streamed through the float model."""

from __future__ import annotations

from collections.abc import Callable

from qtool.config import Recipe
from qtool.passes.weight_only.items import weight_only_inputs
from qtool.quant.blockwise import ActivationStats


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
    from qtool.runtime import stream_tensors

    model = load(model_path)
    names = weight_only_inputs(model, recipe)
    if not names:
        return {}
    stats: dict[str, ActivationStats] = {}
    total = limit or len(getattr(dataset, "samples", [])) or 0
    done = 0
    for ids, tensors in stream_tensors(model, dataset, names, batch_size=batch_size, limit=limit):
        for name in names:
            s = ActivationStats.from_activations(tensors[name])
            stats[name] = s if name not in stats else stats[name].merged(s)
        done += len(ids)
        if on_progress is not None:
            on_progress(done, total)
    return stats

