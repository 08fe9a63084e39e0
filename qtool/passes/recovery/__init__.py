"""Accuracy recovery for static int8: four passes a recipe (``[recovery] passes``) or
``convert --recover`` selects, and the guard tries as a repair.

- ``cle``: cross-layer equalization of Conv -> (Relu/none) -> Conv pairs, depthwise included
  (``equalize.py``; needs no data, keeps the float function);
- ``smoothquant``: static SmoothQuant of MatMul inputs with outlier channels
  (``smoothquant.py``, the dynamic path's rewrite; keeps the float function);
- ``adaround``: learned up/down rounding of each layer's weights against its float output
  on the calibration samples (``adaround.py``), under a time budget;
- ``bias``: empirical bias correction, the mean output shift per channel that quantizing
  the weights causes, folded into the bias (``weights.py``);
- ``bias-full``: full bias correction, layer after layer: the mean shift of each layer's
  output measured on the quantized model (quantized activations and the corrections made
  upstream included) against the float model (``bias_full.py``; slower: a run per wave).

``cle`` and ``smoothquant`` change the activations' ranges, so they run before calibration
(``BEFORE_CALIBRATION``); ``adaround`` then ``bias`` run after it, just before the int8 pass,
on the weights it will quantize. All but ``cle`` read the calibration samples, so recovery
needs ``--data`` (a table made beforehand, ``--calib``, was measured on the graph before
equalization and cannot be used).
"""

from __future__ import annotations

import onnx_ir as ir

from qtool.errors import UsageError
from qtool.passes import QtoolPass

PASSES = ("cle", "smoothquant", "adaround", "bias", "bias-full")
ALL = ("cle", "smoothquant", "adaround", "bias")  # "all": one bias correction, the fast one
# What the guard tries on a static int8 candidate below its floor, before keeping layers
# float, and what static int8 runs by default in auto mode (bench/results/recovery.md).
# On the random-weight ResNet-18 (where int8 loses the most) smoothquant's Gemm smoothing
# took top-1 agreement with fp32 from 0.19 to 0.69 and smoothquant + bias to 0.84
# (-6.6 -> +17.8 dB); it smooths only where the estimated output noise halves, so it left
# the other bench models as they were. Bias correction: +3 to +10 dB output SQNR for one
# more pass over 32 samples. CLE gained 0.03-0.6 dB where it found pairs; AdaRound within
# its budget gained nothing measurable; bias-full (NNCF's full variant) matched NNCF on
# ppocrv6_tiny_det but costs a run per wave: all three opt-in.
REPAIR = ("cle", "smoothquant", "bias")
DEFAULT = ("smoothquant", "bias")
BEFORE_CALIBRATION_NAMES = ("cle", "smoothquant")
NEEDS_DATA_HINT = "pass --data DIR (recovery reads the calibration samples), or drop --recover"


def parse_passes(text: str) -> tuple[str, ...]:
    """``"cle,bias"`` -> ("cle", "bias") in pipeline order; "all" and "none" as said.
    Raises UsageError naming the valid choices."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words == ["none"]:
        return ()
    if words == ["all"]:
        return ALL
    unknown = [w for w in words if w not in PASSES]
    if unknown or not words:
        raise UsageError(f"unknown recovery pass {', '.join(map(repr, unknown)) or repr(text)}",
                         f"use a comma-separated list of {', '.join(PASSES)}, or all / none")
    if "bias" in words and "bias-full" in words:
        raise UsageError("bias and bias-full are two forms of one correction: choose one",
                         "bias-full measures on the quantized model (slower); bias on float inputs")
    return tuple(p for p in PASSES if p in words)


class _RecoveryPass(QtoolPass):
    key = ""

    def applies(self, model: ir.Model) -> bool:
        ctx = self.context
        return ctx.plan.kind == "int8-static" and self.key in ctx.recipe.recovery.passes

    def dataset(self):  # noqa: ANN201 - qtool.data.Dataset
        ctx = self.context
        if ctx.dataset is None:
            raise UsageError(f"recovery pass {self.key!r} reads the calibration samples, and none were given",
                             NEEDS_DATA_HINT)
        return ctx.dataset

    @property
    def limit(self) -> int:
        return self.context.recipe.recovery.samples


class CrossLayerEqualization(_RecoveryPass):
    """Balance per-channel weight ranges across Conv pairs (qtool.passes.recovery.equalize)."""

    name, key, stage = "cle", "cle", "prepare"

    def run(self, model):
        from qtool.passes.recovery.equalize import equalize

        self.dataset()  # ranges move: the table must be made after this, from data
        return model, equalize(model)


class StaticSmoothQuant(_RecoveryPass):
    """Outlier channels of MatMul inputs moved into the weights (qtool.passes.recovery.smoothquant)."""

    name, key, stage = "smoothquant", "smoothquant", "prepare"

    def run(self, model):
        from qtool.passes.recovery.smoothquant import smooth_static

        return model, smooth_static(model, self.context.recipe, self.dataset(), limit=self.limit)


class AdaRound(_RecoveryPass):
    """Learned rounding of the int8 weights (qtool.passes.recovery.adaround)."""

    name, key = "adaround", "adaround"

    def run(self, model):
        from qtool.passes.recovery.weights import adaround

        ctx = self.context
        floats = ctx.recovery.setdefault("float_weights", {})
        return model, adaround(model, ctx.recipe, self.dataset(), seconds=ctx.recipe.recovery.adaround_seconds,
                               limit=self.limit, float_weights=floats, on_progress=ctx.stage("adaround"))


class BiasCorrection(_RecoveryPass):
    """The mean output shift of quantized weights folded into the biases (qtool.passes.recovery.weights)."""

    name, key = "bias-correction", "bias"

    def applies(self, model: ir.Model) -> bool:
        ctx = self.context
        return ctx.plan.kind == "int8-static" and bool({"bias", "bias-full"} & set(ctx.recipe.recovery.passes))

    def run(self, model):
        from qtool.passes.recovery.bias_full import bias_correct_full
        from qtool.passes.recovery.weights import bias_correct

        ctx = self.context
        floats = ctx.recovery.get("float_weights")
        if "bias-full" in ctx.recipe.recovery.passes:
            return model, bias_correct_full(model, ctx.recipe, ctx.ranges or {}, self.dataset(), limit=self.limit,
                                            float_weights=floats, on_progress=ctx.stage("bias correction"))
        return model, bias_correct(model, ctx.recipe, self.dataset(), limit=self.limit, float_weights=floats)
