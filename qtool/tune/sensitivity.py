"""Sensitivity analysis: how much the metric moves when only one layer group is quantized.

A *group* is a set of weight layers (Conv / MatMul / Gemm, and embedding Gathers in the
weight-only scheme) that always share a precision: one layer each (``group="layer"``), or
every layer whose name is the same once its digit runs are ignored (``group="role"``:
``layers.3/mlp/down_proj`` and ``layers.17/mlp/down_proj`` are one group).

For group g at b bits, the candidate is the float model with only g quantized; it is scored
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
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qtool.errors import UsageError
from qtool.model import graph_fingerprint, iter_nodes

COMPARISON_TUNE_METRICS = ("cosine",)
_MIN_K = 16  # weight-only skips reductions shorter than one block of 16


@dataclass(frozen=True)
class Group:
    """Layers that share one precision; ``choices``: allowed bits, highest (32) first."""

    key: str
    members: tuple[str, ...]
    op_types: tuple[str, ...]
    params: int
    choices: tuple[int, ...]
    k: int = 0  # length of the blocked axis (K, D or C/g) shared by every member; 0: they differ


def _weight_of(node: ir.Node) -> tuple[ir.Value | None, int | None]:
    """(constant float weight, length of its blocked axis) of a weight layer, or (None, None):
    K for MatMul/Gemm, D for Gather, C/g (input channels per group) for Conv."""
    index = 0 if node.op_type == "Gather" else 1
    if len(node.inputs) <= index:
        return None, None
    w = node.inputs[index]
    if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT:
        return None, None
    shape = tuple(w.const_value.shape)
    if node.op_type == "Conv":
        return (w, shape[1]) if len(shape) >= 3 else (None, None)
    if len(shape) != 2:
        return None, None
    if node.op_type == "Gather":
        return w, shape[1]
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return w, shape[1]
    return w, shape[0]


def allowed_bits(op_type: str, k: int, scheme: str, bits: Sequence[int], block_size: int,
                 opset: int = 25) -> tuple[int, ...]:
    """The precisions a layer can take in ``scheme`` (32 always), highest first.

    Weight-only (2/3/4 bits, and 8 in the weight-only scheme) needs K >= 16; an embedding
    Gather needs D a multiple of the block size and 8 or 4 bits (GatherBlockQuantized). A
    Conv takes 8 bits as int8 in the int8 schemes; its weight-only blocks (any bits in the
    weight-only scheme, 2/3/4 in the others) need C/g >= 16 and blocked DequantizeLinear:
    ``opset`` (what the model has or may be raised to) >= 21, 25 for 2 bits.
    """
    out = {32}
    for b in bits:
        if op_type == "Conv":
            blocks_ok = k >= _MIN_K and opset >= (25 if b == 2 else 21)
            if (b == 8 and scheme != "weight-only") or blocks_ok:
                out.add(b)
            continue
        if op_type == "Gather":
            if scheme == "weight-only" and b in (8, 4) and k % block_size == 0:
                out.add(b)
            continue
        if b < 8 or scheme == "weight-only":
            if k >= _MIN_K:
                out.add(b)
        else:
            out.add(b)
    return tuple(sorted(out, reverse=True))


def role_key(name: str) -> str:
    """A layer's name with its digit runs replaced by ``#`` (its role across blocks)."""
    return re.sub(r"\d+", "#", name)


def find_groups(model: ir.Model, scheme: str, bits: Sequence[int], block_size: int, group: str,
                op_types: Sequence[str] = (), opset: int | None = None) -> list[Group]:
    """The weight layers ``scheme`` can quantize below float, grouped; in graph order.

    ``opset``: the opset the model may have for blocked Conv weights (default: its own).
    """
    if group not in ("layer", "role", "auto"):
        raise UsageError(f"unknown --group {group!r}", "use layer, role or auto")
    if opset is None:
        opset = model.opset_imports.get("", 0)
    layers: list[tuple[str, str, int, tuple[int, ...], int]] = []
    types = ("Conv", "MatMul", "Gemm") + (("Gather",) if scheme == "weight-only" else ())
    for node in iter_nodes(model):
        if node.op_type not in types or node.domain not in ("", "ai.onnx") or not node.name:
            continue
        if op_types and node.op_type not in op_types and scheme != "weight-only":
            continue
        w, k = _weight_of(node)
        if w is None:
            continue
        choices = allowed_bits(node.op_type, k, scheme, bits, block_size, opset)
        if len(choices) > 1:
            layers.append((node.name, node.op_type, int(w.const_value.size), choices, int(k)))
    if group == "auto":
        group = "layer" if len(layers) <= 32 else "role"
    buckets: dict[tuple, list] = {}
    for name, op, size, choices, k in layers:
        key = (name if group == "layer" else role_key(name), op, choices)
        buckets.setdefault(key, []).append((name, size, k))
    out = []
    for (key, op, choices), members in buckets.items():
        ks = {k for _, _, k in members}
        out.append(Group(key, tuple(n for n, _, _ in members), (op,), sum(s for _, s, _ in members), choices,
                         ks.pop() if len(ks) == 1 else 0))
    return out


def glob_escape(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


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
            json.dump({"format": "qtool.tune.cache", "version": 1, "entries": self.entries}, f)
        os.replace(tmp, self.path)
