"""Matching a calibration table to the graph being converted, and its ranges."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import onnx_ir as ir

from qtool.errors import CalibrationError, UsageError
from qtool.model import graph_fingerprint, iter_nodes
from qtool.passes import PassReport


class RangeTable(Protocol):
    """What convert needs from a calibration table (qtool.calibration.CalibrationTable)."""

    def ranges(self) -> dict[str, tuple[float, float]]: ...


def table_ranges(table: RangeTable | Mapping | None) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` from a table or a plain mapping; UsageError when there is none."""
    if table is None:
        raise UsageError(
            "static int8 needs activation ranges and none were given",
            "pass --calib TABLE.json (from qtool calibrate) or --data DIR to calibrate inline, "
            "or --dynamic for weights-only calibration-free int8",
        )
    if isinstance(table, Mapping):
        return {str(k): (float(v[0]), float(v[1])) for k, v in table.items()}
    return {str(k): (float(v[0]), float(v[1])) for k, v in table.ranges().items()}


def check_table(table: Any, raw: ir.Model, prepared: ir.Model) -> str:
    """Which graph the table was made on: "prepared" (after pre-processing, as ``qtool
    calibrate`` and ``convert --data`` calibrate) or "raw" (the input graph itself).

    Raises CalibrationError when it matches neither.
    """
    fingerprint = getattr(table, "fingerprint", None)
    if fingerprint is None or isinstance(table, Mapping):
        return "prepared"
    if fingerprint == graph_fingerprint(prepared):
        return "prepared"
    if fingerprint == graph_fingerprint(raw):
        return "raw"
    from qtool.passes.preprocess import preprocess

    again = raw.clone()
    preprocess(again)
    if fingerprint == graph_fingerprint(again):
        return "prepared"  # pre-processed before an opset upgrade changed the graph
    checker = getattr(table, "check_model", None)
    if checker is not None:
        checker(raw)  # raises CalibrationError with the calibration module's own message
    raise CalibrationError(
        "the calibration table was made for a different model",
        "re-run qtool calibrate on this model",
    )


def remap_folded_ranges(
    prepared: ir.Model, carries: Mapping[str, str], ranges: dict[str, tuple[float, float]], report: PassReport
) -> dict[str, tuple[float, float]]:
    """Ranges of a table made on the input graph, made valid for the pre-processed graph.

    Folding makes ``Conv -> c -> BN/Mul/Add -> b`` into ``Conv -> c`` where ``c`` now carries
    what ``b`` did (``carries[c] == b``, from the preprocess report): ``c`` takes ``b``'s
    range when the table has it, else its stale range is dropped and that tensor stays float
    (a following ReLU's own range still lets the Conv output be quantized through the fold).
    """
    ranges = dict(ranges)
    present = {v.name for n in iter_nodes(prepared) for v in n.outputs}
    for carrier, original in carries.items():
        if carrier == original or carrier not in present:
            continue
        if original in ranges:
            ranges[carrier] = ranges[original]
            report.count("ranges moved through folded layers")
        elif ranges.pop(carrier, None) is not None:
            report.count("stale ranges dropped (folded layers)")
    return ranges
