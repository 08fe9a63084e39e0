"""CalibrationTable: the result of calibration, as versioned JSON that merges exactly.

Layout (``version`` 1)::

    {"format": "qtool.calibration", "version": 1,
     "fingerprint": "<qtool.model.graph_fingerprint>",
     "method": "percentile", "params": {"percentile": 99.999, "bins": 2048, ...},
     "samples": 256, "shards": ["0/1"],
     "tensors": {"relu1": {"min": 0.0, "max": 6.1, "count": 123, "batches": 4,
                           "ema": [0.0, 5.9], "range": [0.0, 5.7],
                           "histogram": {"bins": 2048, "level": -9, "start": 0,
                                         "offset": 0, "counts": [...]}}}}

``range`` is the chosen [lo, hi] in the tensor's units; it need not contain 0 (conversion
widens it to). Histograms and min/max are kept so that tables from shards merge into
exactly the statistics of one run, and the range is recomputed from the merged ones.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qtool.calibration.observers import Histogram, MinMax, TensorObserver
from qtool.calibration.thresholds import HISTOGRAM_METHODS, METHODS, choose_range
from qtool.errors import CalibrationError, UsageError
from qtool.fileio import write_text_atomic

FORMAT = "qtool.calibration"
VERSION = 1


@dataclass(frozen=True)
class TensorStats:
    """What is known about one tensor, and the range chosen from it."""

    minmax: MinMax
    histogram: Histogram | None
    range: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        m = self.minmax
        out = {
            "min": m.lo,
            "max": m.hi,
            "count": m.count,
            "batches": m.batches,
            "ema": [m.ema_lo, m.ema_hi],
            "range": list(self.range),
        }
        if self.histogram is not None:
            out["histogram"] = self.histogram.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], moving_average: float) -> TensorStats:
        m = MinMax(
            moving_average,
            float(data["min"]),
            float(data["max"]),
            int(data["count"]),
            int(data["batches"]),
            float(data["ema"][0]),
            float(data["ema"][1]),
        )
        hist = None
        if data.get("histogram") is not None:
            hist = Histogram.from_dict(data["histogram"], m.lo, m.hi)
        lo, hi = data["range"]
        return cls(m, hist, (float(lo), float(hi)))


@dataclass(frozen=True)
class CalibrationTable:
    """Per-tensor ranges for one model graph, with the statistics they came from."""

    fingerprint: str
    method: str
    params: dict[str, Any]
    samples: int
    tensors: dict[str, TensorStats]
    shards: tuple[str, ...] = ("0/1",)
    info: dict[str, Any] = field(default_factory=dict)  # not part of equality of stats

    # -- building ------------------------------------------------------------------------

    @classmethod
    def from_observers(
        cls,
        fingerprint: str,
        method: str,
        params: dict[str, Any],
        samples: int,
        observers: dict[str, TensorObserver],
        shards: tuple[str, ...] = ("0/1",),
        info: dict[str, Any] | None = None,
    ) -> CalibrationTable:
        tensors = {
            name: _stats(method, params, obs.minmax, obs.histogram)
            for name, obs in observers.items()
        }
        return cls(fingerprint, method, dict(params), samples, tensors, shards, info or {})

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The chosen [lo, hi] per tensor name."""
        return {name: s.range for name, s in self.tensors.items()}

    # -- checks --------------------------------------------------------------------------

    def check_model(self, model: ir.Model) -> None:
        """Raise CalibrationError unless this table was made for ``model``'s graph."""
        from qtool.model import graph_fingerprint

        found = graph_fingerprint(model)
        if found != self.fingerprint:
            raise CalibrationError(
                f"the calibration table was made for another model graph "
                f"(table fingerprint {self.fingerprint}, model {found})",
                "run `qtool calibrate` on this model (the graph changed since the table "
                "was made, or the table belongs to a different model)",
            )

    # -- merging -------------------------------------------------------------------------

    @staticmethod
    def merge(tables: list[CalibrationTable]) -> CalibrationTable:
        """One table with the statistics of all: exact for counts, min/max and histograms
        (so equal to a single run over the union); ranges are recomputed."""
        if not tables:
            raise UsageError("nothing to merge", "pass two or more tables")
        first = tables[0]
        for t in tables[1:]:
            if t.fingerprint != first.fingerprint:
                raise CalibrationError(
                    f"cannot merge tables of different model graphs "
                    f"({first.fingerprint} and {t.fingerprint})",
                    "merge only tables made from the same model",
                )
            if t.method != first.method or t.params != first.params:
                raise CalibrationError(
                    f"cannot merge tables made with different settings "
                    f"({first.method} {first.params} and {t.method} {t.params})",
                    "calibrate every shard with the same --method, --bins, --percentile and recipe",
                )
        # A tensor one shard found to hold +-inf stays float in the merged table too.
        skipped = {k: v for t in tables for k, v in t.info.get("skipped", {}).items()}
        for t in tables[1:]:
            if set(t.tensors) - set(skipped) != set(first.tensors) - set(skipped):
                raise CalibrationError(
                    "cannot merge tables that observed different tensors",
                    "calibrate every shard with the same recipe",
                )
        shards = [s for t in tables for s in t.shards]
        repeated = sorted({s for s in shards if shards.count(s) > 1 and not s.endswith("/1")})
        if repeated:
            raise CalibrationError(
                f"shard {repeated[0]} appears more than once among the tables",
                "merge each shard's table once; its samples would be counted twice",
            )
        ma = float(first.params.get("moving_average", 0.0))
        tensors = {}
        for name in first.tensors:
            if name in skipped:
                continue
            stats = [t.tensors[name] for t in tables]
            minmax = MinMax(ma)
            hist = None
            for s in stats:
                minmax = minmax.merge(s.minmax) if minmax.batches else _copy_minmax(s.minmax)
                if s.histogram is not None:
                    hist = s.histogram.copy() if hist is None else hist.merge(s.histogram)
            tensors[name] = _stats(first.method, first.params, minmax, hist)
        return CalibrationTable(
            first.fingerprint,
            first.method,
            dict(first.params),
            sum(t.samples for t in tables),
            tensors,
            tuple(shards),
            {"merged_from": len(tables), **({"skipped": skipped} if skipped else {})},
        )

    # -- JSON ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "method": self.method,
            "params": self.params,
            "samples": self.samples,
            "shards": list(self.shards),
            "info": self.info,
            "tensors": {name: s.to_dict() for name, s in self.tensors.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON atomically (a temporary file renamed into place)."""
        text = json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=True)
        return write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationTable:
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration table not found: {path}", "check the path")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibrationError(
                f"{path} is not a calibration table (invalid JSON: {exc})",
                "make one with `qtool calibrate MODEL --data DIR -o TABLE.json`",
            ) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "table") -> CalibrationTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(
                f"{source} is not a qtool calibration table",
                "make one with `qtool calibrate MODEL --data DIR -o TABLE.json`",
            )
        if data.get("version") != VERSION:
            raise CalibrationError(
                f"{source} is calibration table version {data.get('version')}; this qtool reads "
                f"version {VERSION}",
                "re-run `qtool calibrate` with this version of qtool",
            )
        try:
            params = dict(data["params"])
            ma = float(params.get("moving_average", 0.0))
            tensors = {
                str(name): TensorStats.from_dict(t, ma) for name, t in data["tensors"].items()
            }
            method = str(data["method"])
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}")
            return cls(
                str(data["fingerprint"]),
                method,
                params,
                int(data["samples"]),
                tensors,
                tuple(str(s) for s in data.get("shards", ["0/1"])),
                dict(data.get("info", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CalibrationError(
                f"{source} is a damaged calibration table ({type(exc).__name__}: {exc})",
                "re-run `qtool calibrate` to make it again",
            ) from None


def _copy_minmax(m: MinMax) -> MinMax:
    return MinMax(m.moving_average, m.lo, m.hi, m.count, m.batches, m.ema_lo, m.ema_hi)


def _stats(method: str, params: dict, minmax: MinMax, hist: Histogram | None) -> TensorStats:
    if minmax.batches == 0:
        return TensorStats(minmax, hist, (0.0, 0.0))
    ema = (minmax.ema_lo, minmax.ema_hi) if params.get("moving_average") else None
    r = choose_range(
        method,
        minmax.lo,
        minmax.hi,
        hist if method in HISTOGRAM_METHODS else None,
        percentile=float(params.get("percentile", 99.99)),
        symmetric=bool(params.get("symmetric", False)),
        bits=int(params.get("bits", 8)),
        ema=ema,
    )
    return TensorStats(minmax, hist, (float(r[0]), float(r[1])))


def is_valid_range(r: tuple[float, float]) -> bool:
    return math.isfinite(r[0]) and math.isfinite(r[1]) and r[0] <= r[1]
