"""How close a converted model's outputs are to its reference's."""

from __future__ import annotations

import os

import numpy as np

from qtool.config import Recipe
from qtool.errors import ConversionError


def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """Worst output's cosine similarity and SQNR (dB) of ``candidate`` vs ``reference``."""
    from qtool.pipeline.measure import common_part
    from qtool.quant.scales import cosine, sqnr_db

    if not reference:
        raise ConversionError("no outputs to compare", "")
    # Compared on the part both have when the model decides a length, as the guard does.
    pairs = [common_part(r, c) for r, c in zip(reference, candidate)]
    cos = [cosine(r, c) for r, c in pairs]
    sq = [sqnr_db(r, c) for r, c in pairs]
    return {"cosine": min(cos), "sqnr_db": min(sq)}


def first_sample_fidelity(reference: str | os.PathLike, candidate: str | os.PathLike, data,
                          recipe: Recipe) -> dict | None:
    """Cosine / SQNR of the float outputs on the first sample of ``data`` (None: no sample
    or no float output to compare)."""
    from qtool import runtime
    from qtool.data import Dataset, input_specs
    from qtool.model import load
    from qtool.pipeline.guard import open_candidate

    dataset = Dataset(data, input_specs(load(reference)), recipe.preprocess)
    if len(dataset) == 0:
        return None
    feed = dataset.load_sample(0)
    outs = []
    # the candidate as the guard measured it (a target that runs elsewhere: Q/DQ as written)
    for session in (runtime.open_session(reference, "cpu", role="reference"), open_candidate(candidate, recipe)):
        outs.append(list(runtime.run(session, feed).values()))
    ref = [o for o in outs[0] if getattr(o, "dtype", None) is not None and o.dtype.kind == "f"]
    cand = [o for o in outs[1] if getattr(o, "dtype", None) is not None and o.dtype.kind == "f"]
    if not ref or len(ref) != len(cand):
        return None
    return fidelity(ref, cand)

