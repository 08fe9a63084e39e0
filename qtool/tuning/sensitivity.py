"""Phase 2b of ``qtool tune``: how much the metric moves when only one layer group is quantized.

For group g (qtool.tuning.groups) at b bits, the candidate is the float model with only g quantized; it is scored
on the search split against the float model's own outputs:

- ``metric``: the task metric (top1, perplexity, ... or ``cosine``: cosine similarity of
  the first output to the float model's, 1.0 for float);
- ``drop`` = reference - candidate for higher-is-better metrics, candidate - reference
  otherwise (so a positive drop is always a loss);
- ``sqnr_db`` = 10 log10(sum r^2 / sum (r - c)^2) of the first output (r float, c
  candidate): a cheap, never-quantized proxy that still ranks layers when the metric on a
  small split does not move (one sample of 20 is 5 points of top-1).

Every measurement is cached on disk by (model, scheme, data split, metric, group members,
bits), so an interrupted or repeated run measures each (group, bits) once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qtool.errors import UsageError
from qtool.model import graph_fingerprint
from qtool.tuning.groups import Group
from qtool.tuning.options import Clock, Splits
from qtool.tuning.recipes import Builder

COMPARISON_TUNE_METRICS = ("cosine",)


@dataclass
class Score:
    """One model scored on one split."""

    metric: float
    sqnr_db: float
    seconds: float

    def to_dict(self) -> dict:
        return {"metric": self.metric, "sqnr_db": self.sqnr_db, "seconds": self.seconds}


class Scorer:
    """Scores models on one split of a dataset against the float model's outputs.

    The float model runs once (``reference``); its first output is kept in memory for the
    SQNR/cosine comparison (one split's worth: keep splits small for large vocabularies).
    """

    def __init__(self, float_path: str | os.PathLike, dataset, shard: tuple[int, int], limit: int,
                 metric: str, threads: int = 0) -> None:
        from qtool.eval.metrics import make_metric

        self.dataset, self.shard, self.limit, self.threads = dataset, shard, limit, threads
        self.metric_name = metric
        self.metric = None if metric in COMPARISON_TUNE_METRICS else make_metric(metric)
        self.higher_is_better = True if self.metric is None else self.metric.higher_is_better
        self.labels = dataset.labels()
        if self.metric is not None and self.metric.needs_labels and self.labels is None:
            raise UsageError(
                f"metric {metric} needs labels and {dataset.folder} has none",
                "add labels.txt to the data folder, or use --metric cosine (agreement with the float model)",
            )
        self.samples = sum(len(ids) for ids, _ in self._batches(load=False))
        if self.samples == 0:
            raise UsageError(
                f"the {shard[0]}/{shard[1]} split of {dataset.folder} holds no samples",
                "use a folder with at least 2 samples, or pass --eval-data for the held-out data",
            )
        self._reference: list[np.ndarray] = []
        self.reference = self.score(float_path, keep=True)

    def _batches(self, load: bool = True):
        count = len(self.dataset) if self.limit <= 0 else min(len(self.dataset), self.limit * self.shard[1])
        if not load:
            # Positions only: the shard keeps every n-th sample (batches of one).
            return [([i], None) for i in range(self.shard[0], count, self.shard[1])]
        return self.dataset.batches(1, limit=count, shard=self.shard)

    def score(self, model: str | os.PathLike | bytes, keep: bool = False, on_sample=None) -> Score:
        """Metric and first-output SQNR of ``model`` (a path or serialized bytes)."""
        from qtool import runtime

        start = time.perf_counter()
        session = runtime.open_session(model, "cpu", threads=self.threads, role="candidate")
        metric = self.metric.fresh() if self.metric is not None else None
        signal = noise = dot = cand_sq = 0.0
        for i, (ids, feed) in enumerate(self._batches()):
            outs = runtime.run(session, feed)
            first = next(iter(outs.values()))
            if keep:
                self._reference.append(first)
            ref = self._reference[i].astype(np.float64)
            c = first.astype(np.float64)
            signal += float(np.sum(ref * ref))
            noise += float(np.sum((ref - c) ** 2))
            dot += float(np.sum(ref * c))
            cand_sq += float(np.sum(c * c))
            if metric is not None:
                metric.update(outs, self.labels[ids] if self.labels is not None else None, feed)
            if on_sample is not None:
                on_sample(1)
        del session
        sqnr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
        if metric is not None:
            value = float(metric.result())
        else:
            den = np.sqrt(signal * cand_sq)
            value = float(dot / den) if den > 0 else 1.0
        return Score(value, float(sqnr), time.perf_counter() - start)

    def drop(self, score: Score) -> float:
        """reference - candidate (higher is better) or candidate - reference: a loss is > 0."""
        r = self.reference.metric
        return (r - score.metric) if self.higher_is_better else (score.metric - r)


def search_scorer(model_path: str | os.PathLike, splits: Splits, limit: int, threads: int, progress) -> Scorer:
    """The float model scored on the search split (the reference every sensitivity is against)."""
    with progress("float reference (search split)", None, "samples") as advance:
        scorer = Scorer(model_path, splits.search, splits.search_shard, limit, splits.metric, threads)
        advance(scorer.samples)
    return scorer


def data_key(dataset, shard: tuple[int, int], limit: int) -> str:
    """Identity of a data split: folder, sample names and sizes, shard and limit."""
    h = hashlib.sha256()
    h.update(str(Path(dataset.folder).resolve()).encode())
    for s in dataset.samples:
        p = Path(s.path)
        h.update(p.name.encode())
        h.update(str(p.stat().st_size if p.is_file() else 0).encode())
    h.update(f"{shard}{limit}".encode())
    return h.hexdigest()[:16]


@dataclass
class SensitivityCache:
    """Measurements on disk: one JSON file per (model, scheme, split, metric) context.

    ``path`` None keeps them in memory only. Written atomically after every measurement.
    """

    path: Path | None
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | os.PathLike | None, model: ir.Model, model_path: str | os.PathLike,
             context: dict) -> SensitivityCache:
        if folder is None:
            return cls(None)
        h = hashlib.sha256()
        h.update(graph_fingerprint(model).encode())
        h.update(str(Path(model_path).stat().st_size).encode())
        h.update(json.dumps(context, sort_keys=True, default=str).encode())
        path = Path(folder) / f"tune-{h.hexdigest()[:24]}.json"
        entries = {}
        if path.exists():
            try:
                entries = json.loads(path.read_text()).get("entries", {})
            except (json.JSONDecodeError, OSError):
                entries = {}  # a damaged cache is only a lost speed-up
        return cls(path, entries)

    @staticmethod
    def key(assignment: dict[str, int]) -> str:
        """Key of a (layer -> bits) assignment, order-free."""
        text = json.dumps(sorted(assignment.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def get(self, key: str) -> Score | None:
        e = self.entries.get(key)
        return Score(e["metric"], e["sqnr_db"], e["seconds"]) if e else None

    def put(self, key: str, score: Score, label: str = "") -> None:
        self.entries[key] = {**score.to_dict(), "label": label}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tune-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": "qtool.tuning.cache", "version": 1, "entries": self.entries}, f)
        os.replace(tmp, self.path)


@dataclass
class Measurer:
    """Scores assignments on the search split, through the cache; counts what it did."""

    builder: Builder
    scorer: Scorer
    cache: SensitivityCache
    measured: int = 0
    cached: int = 0

    def measure(self, bits: Sequence[int], label: str) -> Score:
        """Score the model ``bits`` (one per group) builds: from the cache, else measured."""
        key = self.cache.key({m: b for g, b in zip(self.builder.groups, bits) for m in g.members})
        hit = self.cache.get(key)
        if hit is not None:
            self.cached += 1
            return hit
        payload = ir.to_proto(self.builder.build(bits)).SerializeToString()
        score = self.scorer.score(payload)
        self.cache.put(key, score, label)
        self.measured += 1
        return score


@dataclass
class Sensitivities:
    """``drops[(g, bits)]`` / ``sqnrs[(g, bits)]``: group g alone at ``bits``, measured."""

    drops: dict[tuple[int, int], float] = field(default_factory=dict)
    sqnrs: dict[tuple[int, int], float] = field(default_factory=dict)
    out_of_time: bool = False
    notes: list[str] = field(default_factory=list)


def measure_sensitivities(groups: Sequence[Group], measurer: Measurer, clock: Clock, progress) -> Sensitivities:
    """Each group alone at each of its precisions below float, until ``clock`` runs short."""
    tasks = [(g, b) for g, grp in enumerate(groups) for b in grp.choices[1:]]
    found = Sensitivities()
    float_bits = [grp.choices[0] for grp in groups]
    with progress("sensitivity", len(tasks), "layers") as advance:
        for g, b in tasks:
            # Keep room for the search and the held-out check (about 8 measurements' worth).
            if clock.short_of(9):
                found.out_of_time = True
                break
            t = time.monotonic()
            bits = list(float_bits)
            bits[g] = b
            score = measurer.measure(bits, f"{groups[g].key}@{b}")
            found.drops[(g, b)] = measurer.scorer.drop(score)
            found.sqnrs[(g, b)] = score.sqnr_db
            clock.observe(time.monotonic() - t)
            advance(1)
    if found.out_of_time:
        found.notes.append(f"time budget: {len(found.drops)} of {len(tasks)} sensitivities measured; "
                           "a precision not measured is not used (those groups stay at their last measured "
                           "one, or float)")
    return found

