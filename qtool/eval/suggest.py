"""Checking diagnosis suggestions by measuring them before anyone is told to apply them.

A layer that adds the most error on its own is not always the one whose exclusion recovers
the most: its error may be averaged away downstream, or leaving it float may move the
quantization of its neighbours. So each candidate exclusion is applied for real:

1. the recipe recorded in the candidate (``qtool.recipe`` metadata, written by
   ``qtool convert``) is read back; a candidate made by another tool has none, and its
   suggestions are withheld (the layer ranking still stands);
2. the dataset is split: even positions calibrate (static int8 ranges), odd positions
   measure (one sample: it does both); dynamic int8 smoothing maxima and gptq/awq statistics
   are collected as ``qtool convert --data`` would, on the dataset;
3. the reference is re-converted with that recipe as it is (the baseline) and once per
   candidate exclusion (``quantize.exclude`` for int8, ``weight_only.keep_8bit`` for
   low-bit models), through ``qtool.convert`` exactly as ``qtool convert`` would;
4. each conversion's output SQNR (worst output, 10 log10(sum r^2 / sum (r - c)^2) in dB,
   summed over the measuring samples) is compared with the baseline's: the gain in dB.

A suggestion is kept only when its gain is at least ``MIN_GAIN_DB``; kept ones are sorted
by gain. When several are kept, all of them together are measured too, and the advice is
whichever of "the best single one" and "all together" measured higher.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from qtool.eval import metrics as metrics_mod
from qtool.passes.select import glob_escape
from qtool.runtime import open_session, run

MIN_GAIN_DB = 0.05  # a re-measured gain below this is noise of the split, not a suggestion
RECIPE_KEY = "qtool.recipe"


def check_suggestions(
    reference: str | os.PathLike,
    recipe_json: str | None,
    candidates: Sequence[Sequence[str]],
    dataset,
    *,
    count: int,
    low_bit: bool,
    threads: int = 0,
) -> dict:
    """Measure each exclusion in ``candidates`` (lists of node names) against the baseline.

    Returns ``{"baseline_sqnr_db", "checks": [{"exclude", "sqnr_db", "gain_db"}...],
    "suggested", "suggested_sqnr_db", "suggested_gain_db", "note"}``; ``suggested`` is empty
    when nothing improved by ``MIN_GAIN_DB`` or when nothing could be checked.
    """
    result = {"baseline_sqnr_db": None, "checks": [], "suggested": [], "suggested_sqnr_db": None,
              "suggested_gain_db": None, "note": ""}
    if not candidates:
        return result
    if recipe_json is None:
        result["note"] = ("suggestions withheld: they are checked by re-converting with the recipe "
                          "qtool convert records in the model, and this candidate has none")
        return result
    from qtool.config import recipe_from_dict

    recipe = recipe_from_dict(json.loads(recipe_json))
    calib, measure_ids = _split(count)
    build = _builder(reference, recipe, dataset, calib, low_bit)
    score = _scorer(reference, dataset, measure_ids, threads)
    baseline = score(build([]))
    result["baseline_sqnr_db"] = baseline
    for names in candidates:
        sqnr = score(build(list(names)))
        result["checks"].append({"exclude": list(names), "sqnr_db": sqnr, "gain_db": sqnr - baseline})
    kept = sorted((c for c in result["checks"] if c["gain_db"] >= MIN_GAIN_DB), key=lambda c: -c["gain_db"])
    if not kept:
        result["note"] = f"no checked exclusion raised the output SQNR by {MIN_GAIN_DB} dB or more"
        return result
    best = kept[0]
    if len(kept) > 1:
        together = list(dict.fromkeys(n for c in kept for n in c["exclude"]))
        sqnr = score(build(together))
        if sqnr > best["sqnr_db"]:
            best = {"exclude": together, "sqnr_db": sqnr, "gain_db": sqnr - baseline}
    result.update(suggested=best["exclude"], suggested_sqnr_db=best["sqnr_db"], suggested_gain_db=best["gain_db"])
    return result


def _split(count: int) -> tuple[tuple[int, int], list[int]]:
    """(calibration shard, measuring sample ids): even positions calibrate, odd ones measure."""
    if count < 2:
        return (0, 1), list(range(count))
    return (0, 2), list(range(1, count, 2))


def _builder(reference, recipe, dataset, shard: tuple[int, int], low_bit: bool) -> Callable[[list[str]], bytes]:
    """A function: extra names to leave out -> the re-converted model, serialized. What
    conversion needs from data (static ranges on the calibration split; smoothing maxima
    or gptq/awq statistics, as ``qtool convert --data`` collects them) is collected once."""
    import onnx_ir as ir

    from qtool.model import load
    from qtool.pipeline import calibrate, convert_model, plan_for, prepare

    plan = plan_for(recipe)
    if plan.kind == "int8-static":
        calib_recipe = recipe.override("calibration", batch_size=1, samples=0)
        table = calibrate(reference, dataset.folder, calib_recipe, shard=shard)
        prepared = {"table": table}
        source = load(reference)
    else:
        ready = prepare(load(reference), reference, recipe, plan, data=dataset.folder)
        prepared = {"table": ready.table, "preprocessed": ready.preprocessed,
                    "activations": ready.activations, "absmax": ready.absmax}
        source = ready.model

    def build(names: list[str]) -> bytes:
        patterns = tuple(glob_escape(n) for n in names)  # names, not globs
        if low_bit:
            r = recipe.override("weight_only", keep_8bit=tuple(recipe.weight_only.keep_8bit) + patterns)
        else:
            r = recipe.override("quantize", exclude=tuple(recipe.quantize.exclude) + patterns)
        return ir.to_proto(convert_model(source, r, **prepared).model).SerializeToString()

    return build


def _scorer(reference, dataset, ids: list[int], threads: int) -> Callable[[bytes], float]:
    """A function: serialized candidate -> its worst output SQNR (dB) on samples ``ids``."""
    ref_session = open_session(reference, threads=threads, role="reference")
    folder = Path(reference).resolve().parent

    def score(model: bytes) -> float:
        session = open_session(model, threads=threads, external_data_dir=folder, role="re-converted")
        comps: dict[str, metrics_mod.OutputComparison] = {}
        for i in ids:
            feed = dataset.load_sample(i)
            ref, cand = run(ref_session, feed), run(session, feed)
            for name, r in ref.items():
                if r.dtype.kind == "f" and name in cand:
                    comps.setdefault(name, metrics_mod.OutputComparison(name)).update(r, cand[name])
        return min((c.result()["sqnr_db"] for c in comps.values()), default=float("nan"))

    return score
