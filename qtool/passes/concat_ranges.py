"""Concatenations of tensors whose ranges differ by orders of magnitude stay float.

A detector head often concatenates box coordinates in pixels ([0, 640]) with class
probabilities ([0, 1]) into one output. One int8 scale for the Concat's output spends its
256 levels on the pixels: the probabilities get ``255 * 1 / 640 < 1`` level and all round to
zero (0 dB on those rows, while the output's SQNR looks fine because the boxes dominate it).
Such a Concat is kept float: each input keeps the scale of its own range, and the output is
exact. Which inputs are compared: the calibrated ranges, widened to contain 0 as
``activation_params`` does, so ``span = max(hi, 0) - min(lo, 0)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from qtool.model import iter_nodes
from qtool.passes import PassReport

# Above this ratio of the widest input span to the narrowest one, the narrowest input would
# keep fewer than 255 / 10 ~ 25 levels of the shared scale: an order of magnitude.
MAX_CONCAT_SPAN_RATIO = 10.0


def _span(rng: tuple[float, float]) -> float:
    lo, hi = rng
    return max(hi, 0.0) - min(lo, 0.0)


def concat_range_ratio(node: ir.Node, ranges: Mapping[str, tuple[float, float]]) -> float | None:
    """Widest / narrowest span among the Concat's calibrated inputs (None: fewer than two known)."""
    spans = [_span(ranges[v.name]) for v in node.inputs if v is not None and v.name in ranges]
    spans = [s for s in spans if s > 0]
    if len(spans) < 2:
        return None
    return max(spans) / min(spans)


def mismatched_concats(model: ir.Model, ranges: Mapping[str, tuple[float, float]],
                       max_ratio: float = MAX_CONCAT_SPAN_RATIO) -> PassReport:
    """The Concats that must not share one scale, as ``skipped`` (node name -> reason).

    An unnamed Concat is given a name (``Concat``, ``Concat_1``...) so that the int8 pass can
    be told to leave it alone. Does not otherwise change the model.
    """
    report = PassReport("concat_ranges")
    taken = {n.name for n in iter_nodes(model) if n.name}
    for node in iter_nodes(model):
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        ratio = concat_range_ratio(node, ranges)
        if ratio is None or ratio <= max_ratio:
            continue
        if not node.name:
            name, i = "Concat", 1
            while name in taken:
                name, i = f"Concat_{i}", i + 1
            node.name = name
            taken.add(name)
        report.skip(node.name, f"inputs' ranges differ {ratio:.0f}x (> {max_ratio:g}x): one int8 scale "
                               "would erase the narrow inputs; kept float")
        report.count("Concat kept float")
    return report


def escaped(name: str) -> str:
    """``name`` as an exclude pattern that matches only itself (fnmatch syntax)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)
