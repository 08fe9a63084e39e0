"""The Q/DQ choices a target's placement makes, as functions the static QDQ pass calls.

Kept apart from ``qtool.passes.qdq`` so the pass reads one ``Placement`` and stays the
same for every target; with the default placement each function returns what the pass
did before targets existed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtool.config import Recipe
from qtool.quant.scales import QParams, activation_params
from qtool.targets.patterns import se_block_conv, self_gated
from qtool.targets.presets import Placement

ELEMENTWISE = ("Add", "Mul", "Concat")


def activation_qparams(placement: Placement, lo: float, hi: float, dtype: str,
                       symmetric: bool) -> QParams:
    """Per-tensor parameters for an activation in [lo, hi] under ``placement``.

    "by-range": ``z = 0`` always; uint8 with ``s = hi / 255`` when ``lo >= 0`` (after ReLU),
    else int8 with ``s = max(|lo|, |hi|) / 127`` (OpenVINO's LPT and NNCF's convention:
    unsigned for non-negative tensors, signed symmetric otherwise). "signed": int8,
    ``s = max(|lo|, |hi|) / 127``. "recipe": the recipe's type and symmetry. A 16-bit
    ``dtype`` (A16W8, ``--activation-bits 16``) keeps the placement's sign rule with 16 bits:
    uint16 ``s = hi / 65535`` or int16 ``s = max(|lo|, |hi|) / 32767``, ``z = 0``.
    Raises DegenerateRange as activation_params does.
    """
    bits = "16" if dtype.endswith("16") else "8"
    if placement.activation_sign == "by-range":
        if lo >= 0.0:
            return activation_params(0.0, hi, "uint" + bits, symmetric=False)  # z = 0: lo is 0
        return activation_params(lo, hi, "int" + bits, symmetric=True)
    if placement.activation_sign == "signed":
        return activation_params(lo, hi, "int" + bits, symmetric=True)
    return activation_params(lo, hi, dtype, symmetric)


def fit_opset(placement: Placement, recipe: Recipe, model: ir.Model) -> Recipe:
    """``recipe`` with per-tensor weights when the placement keeps a model below opset 13 as
    it is (qtool's default: no silent upgrade, so no per-axis Q/DQ); else unchanged."""
    q = recipe.quantize
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if placement.per_tensor_below_13 and q.per_channel and opset < 13 and not q.allow_opset_upgrade:
        return recipe.override("quantize", per_channel=False)
    return recipe


def weight_axis_allowed(placement: Placement, node: ir.Node) -> bool:
    """Whether ``node``'s weight may be per-channel under ``placement``."""
    return placement.per_channel_ops is None or node.op_type in placement.per_channel_ops


def reduce_weight_range(placement: Placement, p: QParams) -> QParams:
    """Symmetric weight parameters rescaled so that ``|q| <= placement.weight_qmax``.

    ``s' = s * 127 / qmax``: the largest |w| of each channel then quantizes to ``qmax``
    (63 for 7-bit reduce-range). Asymmetric or unsigned parameters are returned as they are.
    """
    if placement.weight_qmax == 127 or p.dtype != "int8" or np.any(p.zero_point != 0):
        return p
    factor = np.float32(127.0 / placement.weight_qmax)
    return QParams((p.scale * factor).astype(np.float32), p.zero_point, p.dtype, p.axis)


def admits(placement: Placement, node: ir.Node, is_activation) -> str | None:  # noqa: ANN001
    """Why ``node`` gets no Q/DQ under ``placement`` (None: it does). ``is_activation``
    tells a float activation input from a constant."""
    if placement.float_se_blocks and se_block_conv(node):
        return ("squeeze-excitation Conv (pool -> Conv -> act -> Conv -> gate -> Mul) stays float on "
                "this target, as NNCF's SE_BLOCK ignored pattern leaves it")
    if placement.elementwise_constants or node.op_type not in ELEMENTWISE:
        return None
    if not all(v is not None and is_activation(v) for v in node.inputs):
        return f"{node.op_type} with a constant operand runs in float on this target (no int8 kernel to fuse)"
    if self_gated(node):
        return "x * f(x) (SiLU, GELU, hard-swish) is an activation function: no int8 kernel, no Q/DQ"
    return None
