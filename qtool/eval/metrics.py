"""Streaming metrics: against labels, and against a reference model's outputs.

Every metric accumulates batch by batch (``update``) and is read once at the end
(``result``), so evaluating a dataset never holds more than one batch of outputs.

Label metrics (``--metric``):

- ``top1`` / ``top5``: the label is among the k highest scores of the first output's last
  axis. Scores ``[N, C]`` (or ``[N, ..., C]``, flattened to rows), labels ``[N]`` integers
  in [0, C) (any other label is an error: it could never be predicted). Result in [0, 1].
- ``accuracy``: the prediction equals the label, where the prediction is the output itself
  for integer outputs (class ids), ``score > 0.5`` for a single score per sample, and the
  argmax of the last axis otherwise. Result in [0, 1].
- ``perplexity``: causal language models. Convention: the model has an integer input named
  ``input_ids`` ``[N, S]`` (the token ids stored in the dataset) and its first output holds
  logits ``[N, S, V]``. Position t predicts token t+1, so
  ``NLL = -mean_{n, t < S-1} log softmax(logits[n, t])[input_ids[n, t+1]]`` over every
  predicted token of the dataset (tokens where an ``attention_mask`` input is 0 are
  skipped) and ``perplexity = exp(NLL)``. Lower is better.
- ``module:function`` (or ``path/to/file.py:function``): a plugin called once per batch as
  ``function(outputs, labels, feed)`` with ``outputs`` a dict name -> array, ``labels`` the
  batch's labels or None. It returns a float (weighted by the batch size) or a pair
  ``(value_sum, count)``; the result is ``sum of value_sums / sum of counts``. A function
  attribute ``higher_is_better = False`` marks lower-is-better metrics.

Reference comparison, per output (always computed when a reference model is given; the
names ``cosine``, ``sqnr`` and ``mse`` are also accepted by ``--metric``): with r the
reference output and c the candidate's, over every element of the dataset,

- ``sqnr_db = 10 log10(sum r^2 / sum (r - c)^2)`` (dB; +inf when identical),
- ``mse = mean (r - c)^2``, ``max_abs = max |r - c|``,
- ``cosine``: mean over samples of ``<r_n, c_n> / (|r_n| |c_n|)`` (each sample flattened),
- ``argmax_agreement``: fraction of rows (last axis) whose argmax is the same, for float
  outputs whose last axis is longer than 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.errors import DataError, UsageError

LABEL_METRICS = ("top1", "top5", "accuracy", "perplexity")
COMPARISON_METRICS = ("cosine", "sqnr", "mse")
BUILTIN_METRICS = LABEL_METRICS + COMPARISON_METRICS


class Metric:
    """A streaming metric on one model's outputs. Subclasses set ``name``, ``higher_is_better``."""

    name: str = ""
    higher_is_better: bool = True
    needs_labels: bool = True

    def update(self, outputs: dict[str, np.ndarray], labels: np.ndarray | None, feed: dict) -> None:
        raise NotImplementedError

    def result(self) -> float:
        raise NotImplementedError

    def fresh(self) -> Metric:
        """A new, empty metric of the same kind (one per model evaluated)."""
        raise NotImplementedError


def _first(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(outputs.values()))


def _need_labels(name: str, labels: np.ndarray | None, scores: np.ndarray) -> np.ndarray:
    if labels is None:
        raise UsageError(
            f"metric {name} needs labels", "pass --labels FILE or put labels.txt in the --data folder"
        )
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"metric {name} needs integer class labels, got {labels.dtype} labels",
            "write one integer class id per line in labels.txt",
        )
    return labels


class TopK(Metric):
    """Fraction of samples whose label is among the k highest scores (ties: lowest index first)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.name = f"top{k}"
        self.correct = 0
        self.total = 0

    def fresh(self) -> TopK:
        return TopK(self.k)

    def update(self, outputs, labels, feed) -> None:
        scores = _first(outputs)
        labels = _need_labels(self.name, labels, scores)
        rows = scores.reshape(-1, scores.shape[-1])
        labels = labels.reshape(-1)
        if rows.shape[0] != labels.shape[0]:
            raise DataError(
                f"{self.name}: {rows.shape[0]} score rows for {labels.shape[0]} labels in a batch",
                "the first output must hold one row of class scores per label",
            )
        if rows.shape[1] < self.k:
            raise UsageError(
                f"{self.name} needs at least {self.k} classes, the output has {rows.shape[1]}",
                "use --metric top1 or accuracy",
            )
        check_label_range(self.name, labels, rows.shape[1])
        # Stable sort on -scores: among equal scores the lower class index ranks first.
        top = np.argsort(-rows, axis=1, kind="stable")[:, : self.k]
        self.correct += int(np.sum(np.any(top == labels[:, None], axis=1)))
        self.total += rows.shape[0]

    def result(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def check_label_range(metric: str, labels: np.ndarray, classes: int, what: str = "a batch's labels") -> None:
    """Class-index labels must lie in [0, classes): any other label can never be predicted,
    so the metric would silently count it wrong."""
    if labels.dtype.kind not in "iu" or labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise DataError(
            f"{metric}: labels must be class indices 0..{classes - 1} (the model's first output "
            f"has {classes} classes), but {what} run from {lo} to {hi}",
            "labels are 0-based indices into the output; shift 1-based labels by -1, or check "
            "that the labels belong to this model",
        )


class Accuracy(Metric):
    """Fraction of samples whose prediction equals the label (see the module docstring)."""

    name = "accuracy"

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def fresh(self) -> Accuracy:
        return Accuracy()

    def update(self, outputs, labels, feed) -> None:
        out = _first(outputs)
        if labels is None:
            _need_labels(self.name, labels, out)
        n = labels.shape[0]
        if out.dtype.kind in "iub":
            pred = out.reshape(n, -1)[:, 0]
        elif out.size == n:
            pred = (out.reshape(n) > 0.5).astype(np.int64)
        else:
            pred = np.argmax(out.reshape(n, -1), axis=1)
            check_label_range(self.name, labels, out.reshape(n, -1).shape[1])
        labels = labels.reshape(n)
        if labels.dtype.kind not in "iub":
            pred = pred.astype(str)
        self.correct += int(np.sum(pred == labels))
        self.total += n

    def result(self) -> float:
        return self.correct / self.total if self.total else float("nan")


class Perplexity(Metric):
    """exp(mean next-token NLL); input ``input_ids`` [N, S], first output logits [N, S, V]."""

    name = "perplexity"
    higher_is_better = False
    needs_labels = False

    def __init__(self) -> None:
        self.nll = 0.0  # nats, summed over predicted tokens
        self.tokens = 0

    def fresh(self) -> Perplexity:
        return Perplexity()

    def update(self, outputs, labels, feed) -> None:
        if "input_ids" not in feed:
            raise UsageError(
                "metric perplexity needs a model input named input_ids holding token ids",
                "store token ids [N, S] as input_ids in .npz samples (see `qtool eval --help`)",
            )
        ids = np.asarray(feed["input_ids"])
        logits = _first(outputs)
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise UsageError(
                f"perplexity needs logits [N, S, V] matching input_ids {list(ids.shape)}, "
                f"the first output has shape {list(logits.shape)}",
                "export the model so its first output is the full logits sequence",
            )
        targets = ids[:, 1:]
        scores = logits[:, :-1].astype(np.float64)
        peak = scores.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(scores - peak).sum(axis=-1)) + peak[..., 0]
        picked = np.take_along_axis(scores, targets[..., None], axis=-1)[..., 0]
        nll = log_z - picked
        mask = np.ones_like(nll, dtype=bool)
        if "attention_mask" in feed:
            am = np.asarray(feed["attention_mask"]).astype(bool)
            mask = am[:, 1:] & am[:, :-1]
        self.nll += float(nll[mask].sum())
        self.tokens += int(mask.sum())

    def result(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


class Plugin(Metric):
    """A user function ``fn(outputs, labels, feed) -> float | (value_sum, count)``."""

    needs_labels = False

    def __init__(self, spec: str, fn: Callable) -> None:
        self.spec = spec
        self.fn = fn
        self.name = spec
        self.higher_is_better = bool(getattr(fn, "higher_is_better", True))
        self.total = 0.0
        self.count = 0.0

    def fresh(self) -> Plugin:
        return Plugin(self.spec, self.fn)

    def update(self, outputs, labels, feed) -> None:
        try:
            value = self.fn(outputs, labels, feed)
        except Exception as exc:
            raise UsageError(
                f"metric {self.spec} raised {type(exc).__name__}: {str(exc)[:160]}",
                "fix the metric function; it is called as fn(outputs, labels, feed) per batch",
            ) from None
        if isinstance(value, tuple) and len(value) == 2:
            self.total += float(value[0])
            self.count += float(value[1])
        else:
            n = len(_first(outputs))
            self.total += float(value) * n
            self.count += n

    def result(self) -> float:
        return self.total / self.count if self.count else float("nan")


def load_plugin(spec: str) -> Plugin:
    """``module:function`` or ``file.py:function`` -> a Plugin metric."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"bad metric {spec!r}", f"use one of {', '.join(BUILTIN_METRICS)} or module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.exists():
                raise FileNotFoundError(str(path))
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"cannot import metric module {module_name!r}: {type(exc).__name__}: {str(exc)[:120]}",
            "check the module is importable (on PYTHONPATH) or give a path to a .py file",
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"{module_name} has no function {attr!r}", "use module:function")
    return Plugin(spec, fn)


def make_metric(name: str) -> Metric | None:
    """A fresh label metric for ``name``; None for comparison metrics (always computed)."""
    if name == "top1":
        return TopK(1)
    if name == "top5":
        return TopK(5)
    if name == "accuracy":
        return Accuracy()
    if name == "perplexity":
        return Perplexity()
    if name in COMPARISON_METRICS:
        return None
    if ":" in name:
        return load_plugin(name)
    raise UsageError(f"unknown metric {name!r}", f"use one of {', '.join(BUILTIN_METRICS)} or module:function")


@dataclass
class OutputComparison:
    """Streaming comparison of one candidate output with the reference's (formulas above)."""

    name: str
    signal: float = 0.0  # sum r^2
    noise: float = 0.0  # sum (r - c)^2
    elements: int = 0
    max_abs: float = 0.0
    cosine_sum: float = 0.0
    samples: int = 0
    agree: int = 0
    rows: int = 0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise DataError(
                f"output {self.name!r}: the candidate's shape {list(cand.shape)} differs from the "
                f"reference's {list(ref.shape)}",
                "compare a candidate with the model it was converted from",
            )
        if ref.dtype.kind not in "fc" and cand.dtype.kind not in "fc":
            r, c = ref.astype(np.float64), cand.astype(np.float64)
        else:
            r, c = ref.astype(np.float64, copy=False), cand.astype(np.float64, copy=False)
        diff = r - c
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(diff * diff))
        self.elements += diff.size
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        n = r.shape[0] if r.ndim else 1
        rf, cf = r.reshape(n, -1), c.reshape(n, -1)
        norms = np.linalg.norm(rf, axis=1) * np.linalg.norm(cf, axis=1)
        dots = np.sum(rf * cf, axis=1)
        # Two all-zero vectors are identical (cosine 1); one zero vector against another is 0.
        both_zero = (np.linalg.norm(rf, axis=1) == 0) & (np.linalg.norm(cf, axis=1) == 0)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
        self.cosine_sum += float(np.sum(cos))
        self.samples += n
        if ref.dtype.kind == "f" and ref.ndim >= 2 and ref.shape[-1] > 1:
            ra = np.argmax(ref.reshape(-1, ref.shape[-1]), axis=1)
            ca = np.argmax(cand.reshape(-1, cand.shape[-1]), axis=1)
            self.agree += int(np.sum(ra == ca))
            self.rows += ra.size

    def result(self) -> dict:
        return {
            "name": self.name,
            "sqnr_db": sqnr_db(self.signal, self.noise),
            "mse": self.noise / self.elements if self.elements else float("nan"),
            "max_abs": self.max_abs,
            "cosine": self.cosine_sum / self.samples if self.samples else float("nan"),
            "argmax_agreement": self.agree / self.rows if self.rows else None,
        }


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB; +inf when noise is 0, -inf when the signal is 0 or the
    noise infinite."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0 or math.isinf(noise):
        return float("-inf")
    return 10.0 * math.log10(signal / noise)
