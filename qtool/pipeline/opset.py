"""Raising a model's opset, only when the user allowed it (--allow-opset-upgrade)."""

from __future__ import annotations

import onnx_ir as ir

from qtool.config import Recipe
from qtool.errors import ConversionError
from qtool.passes import PassReport


def conv_blocks_opset(model: ir.Model, recipe: Recipe, bits: int) -> int:
    """The opset the recipe's low-bit Conv weights need (0: none), when upgrades are allowed.

    Without ``allow_opset_upgrade`` the weight-only pass leaves those Convs float and says why.
    """
    if not recipe.quantize.allow_opset_upgrade:
        return 0
    from qtool.passes.weight_only import conv_opset_needed

    return conv_opset_needed(model, recipe, bits)


def upgrade_opset(model: ir.Model, version: int, reports: list[PassReport] | None = None) -> ir.Model:
    """The model converted to default-domain opset ``version`` by onnx's version converter.

    Only called when the user allowed it (--allow-opset-upgrade). Ops whose signature
    changed (Squeeze/Unsqueeze/Split/Reduce* axes, Softmax) are rewritten by the converter,
    not just relabelled. Returns ``model`` itself when it is already new enough; appends an
    "opset" report to ``reports`` when it converted.
    """
    current = model.opset_imports.get("", 0)
    if current >= version:
        return model
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(ir.to_proto(model), version)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise ConversionError(
            f"could not convert the model from opset {current} to {version}: {str(exc).splitlines()[0][:160]}",
            "convert the model to opset 13 with your exporter, or use --per-tensor",
        ) from None
    if reports is not None:
        report = PassReport("opset")
        report.count(f"opset {current} -> {version}")
        reports.append(report)
    return ir.from_proto(proto)
