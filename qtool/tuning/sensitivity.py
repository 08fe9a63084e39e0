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

import copy
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
from qtool.executors import Executor, Shared, Task
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
        start = time.perf_counter()
        states = self.sample_states(model, keep=keep, on_sample=on_sample)
        return self.fold(states, time.perf_counter() - start)

    def sample_states(self, model, part: tuple[int, int] = (0, 1), keep: bool = False, on_sample=None) -> list[dict]:  # noqa: ANN001
        """What each sample of the split (every ``part[1]``-th from ``part[0]``) adds to the
        sums behind the score; ``fold`` adds them in sample order, as one pass would."""
        from qtool import runtime
        from qtool.eval.sharded import batch_state

        if isinstance(model, Shared):
            model = model.get()
        session = runtime.open_session(model, "cpu", threads=self.threads, role="candidate")
        states = []
        for k, (ids, feed) in enumerate(self._batches(load=part == (0, 1))):
            if k % part[1] != part[0]:
                continue
            if feed is None:
                feed = self.dataset.load_sample(ids[0])  # what a batch of one holds
            first = next(iter((outs := runtime.run(session, feed)).values()))
            if keep:
                self._reference.append(first)
            ref = self._reference[k].astype(np.float64)
            c = first.astype(np.float64)
            state = {"k": k, "signal": float(np.sum(ref * ref)), "noise": float(np.sum((ref - c) ** 2)),
                     "dot": float(np.sum(ref * c)), "cand_sq": float(np.sum(c * c))}
            if self.metric is not None:
                state["metric"] = batch_state(self.metric, outs, self.labels[ids] if self.labels is not None else None,
                                              feed)
            states.append(state)
            if on_sample is not None:
                on_sample(1)
        del session
        return states

    def fold(self, states: list[dict], seconds: float) -> Score:
        """The score from every sample's state, added in sample order (exact, whatever the parts)."""
        from qtool.eval.sharded import merge_batches

        states = sorted(states, key=lambda st: st["k"])
        signal = noise = dot = cand_sq = 0.0
        for st in states:
            signal += st["signal"]
            noise += st["noise"]
            dot += st["dot"]
            cand_sq += st["cand_sq"]
        sqnr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
        if self.metric is not None:
            value = float(merge_batches(self.metric, [st["metric"] for st in states]).result())
        else:
            den = np.sqrt(signal * cand_sq)
            value = float(dot / den) if den > 0 else 1.0
        return Score(value, float(sqnr), seconds)

    def score_on(self, executor: Executor, shared_self: Shared, model, label: str) -> Score:  # noqa: ANN001
        """``score`` with the split's samples in one part per worker (``shared_self``: this
        scorer, shared once); identical to ``score``."""
        start = time.perf_counter()
        n = max(1, min(executor.workers, self.samples))
        tasks = [Task(f"{label} (part {p}/{n})", score_part, (shared_self, model, (p, n))) for p in range(n)]
        states = [st for part in executor.map(tasks) for st in part]
        return self.fold(states, time.perf_counter() - start)

    def for_workers(self) -> Scorer:
        """A copy whose samples travel with it (workers need not see the data folder)."""
        from qtool.executors.data import HeldDataset

        clone = copy.copy(self)
        clone.dataset = HeldDataset.of(self.dataset, [ids[0] for ids, _ in self._batches(load=False)])
        return clone

    def drop(self, score: Score) -> float:
        """reference - candidate (higher is better) or candidate - reference: a loss is > 0."""
        r = self.reference.metric
        return (r - score.metric) if self.higher_is_better else (score.metric - r)


def score_part(scorer: Shared, model, part: tuple[int, int]) -> list[dict]:  # noqa: ANN001
    """Run on a worker: one part of a split's per-sample states (see Scorer.score_on)."""
    return scorer.get().sample_states(model, part)


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
class Bench:
    """What a worker needs to build and score any candidate, shared with it once: the
    prepared model (serialized; rebuilt once per worker), the builder's settings and the
    search scorer with its samples and the float model's outputs."""

    model: bytes
    base: object
    groups: Sequence[Group]
    table: object
    scorer: Scorer
    _builder: Builder | None = None

    def builder(self) -> Builder:
        if self._builder is None:
            import onnx

            model = ir.from_proto(onnx.load_from_string(self.model))
            self._builder = Builder.create(self.base, self.groups, model, self.table)
        return self._builder


def score_candidate(bench: Shared, bits: Sequence[int]) -> Score:
    """Run on a worker: build the candidate ``bits`` assigns and score it on the search split."""
    b = bench.get()
    payload = ir.to_proto(b.builder().build(bits)).SerializeToString()
    return b.scorer.score(payload)


@dataclass
class Measurer:
    """Scores assignments on the search split, through the cache; counts what it did.
    With an ``executor``, ``measure_many`` builds and scores the candidates on its workers."""

    builder: Builder
    scorer: Scorer
    cache: SensitivityCache
    measured: int = 0
    cached: int = 0
    executor: Executor | None = None
    _bench: Shared | None = None

    def measure(self, bits: Sequence[int], label: str) -> Score:
        """Score the model ``bits`` (one per group) builds: from the cache, else measured."""
        return self.measure_many([(bits, label)])[0]

    def measure_many(self, items: Sequence[tuple[Sequence[int], str]]) -> list[Score]:
        """``measure`` for each (bits, label); the misses run on the executor when there is one."""
        keys = [self.cache.key({m: b for g, b in zip(self.builder.groups, bits) for m in g.members})
                for bits, _ in items]
        scores: list[Score | None] = [self.cache.get(k) for k in keys]
        self.cached += sum(s is not None for s in scores)
        todo = [i for i, s in enumerate(scores) if s is None]
        if self.executor is None:
            fresh = [self.scorer.score(ir.to_proto(self.builder.build(items[i][0])).SerializeToString())
                     for i in todo]
        else:
            bench = self._shared_bench()
            fresh = self.executor.map([Task(f"candidate {items[i][1]}", score_candidate, (bench, list(items[i][0])))
                                       for i in todo])
        for i, score in zip(todo, fresh):
            self.cache.put(keys[i], score, items[i][1])
            scores[i] = score
            self.measured += 1
        return scores

    def _shared_bench(self) -> Shared:
        if self._bench is None:
            b = self.builder
            model = ir.to_proto(b.model).SerializeToString()
            self._bench = self.executor.share(Bench(model, b.base, list(b.groups), b.table, self.scorer.for_workers()))
        return self._bench


@dataclass
class Sensitivities:
    """``drops[(g, bits)]`` / ``sqnrs[(g, bits)]``: group g alone at ``bits``, measured."""

    drops: dict[tuple[int, int], float] = field(default_factory=dict)
    sqnrs: dict[tuple[int, int], float] = field(default_factory=dict)
    out_of_time: bool = False
    notes: list[str] = field(default_factory=list)


def measure_sensitivities(groups: Sequence[Group], measurer: Measurer, clock: Clock, progress) -> Sensitivities:
    """Each group alone at each of its precisions below float, until ``clock`` runs short.
    With an executor the candidates go out in waves of one per worker; the clock is checked
    between waves, and a wave's wall time counts as one measurement's."""
    tasks = [(g, b) for g, grp in enumerate(groups) for b in grp.choices[1:]]
    found = Sensitivities()
    float_bits = [grp.choices[0] for grp in groups]
    wave = measurer.executor.workers if measurer.executor is not None else 1
    with progress("sensitivity", len(tasks), "layers") as advance:
        for start in range(0, len(tasks), wave):
            # Keep room for the search and the held-out check (about 8 measurements' worth).
            if clock.short_of(9):
                found.out_of_time = True
                break
            t = time.monotonic()
            batch = tasks[start:start + wave]
            items = []
            for g, b in batch:
                bits = list(float_bits)
                bits[g] = b
                items.append((bits, f"{groups[g].key}@{b}"))
            for (g, b), score in zip(batch, measurer.measure_many(items)):
                found.drops[(g, b)] = measurer.scorer.drop(score)
                found.sqnrs[(g, b)] = score.sqnr_db
            clock.observe(time.monotonic() - t)
            advance(len(batch))
    if found.out_of_time:
        found.notes.append(f"time budget: {len(found.drops)} of {len(tasks)} sensitivities measured; "
                           "a precision not measured is not used (those groups stay at their last measured "
                           "one, or float)")
    return found
