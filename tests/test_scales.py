"""Scale maths (qtool.quant.scales): ranges, zero points, per-channel weights, rounding."""

from __future__ import annotations

import numpy as np
import pytest

from qtool.quant import scales
from qtool.quant.scales import DegenerateRange, QParams, activation_params, quantize, weight_params

RNG = np.random.default_rng(0)


def test_quantize_rounds_half_to_even():
    p = QParams(np.asarray(1.0, np.float32), np.asarray(0, np.uint8), "uint8")
    assert quantize(np.array([0.5, 1.5, 2.5, 3.5], np.float32), p).tolist() == [0, 2, 2, 4]
    p8 = QParams(np.asarray(1.0, np.float32), np.asarray(0, np.int8), "int8")
    assert quantize(np.array([-0.5, -1.5, -2.5, 300.0, -300.0], np.float32), p8).tolist() == [0, -2, -2, 127, -128]


def test_activation_params_include_zero_and_round_trip():
    p = activation_params(0.5, 2.0, "uint8")  # widened to [0, 2]
    assert int(p.zero_point) == 0 and np.isclose(float(p.scale), 2.0 / 255)
    p = activation_params(-1.0, 3.0, "uint8")
    x = np.linspace(-1, 3, 101, dtype=np.float32)
    err = np.abs(scales.dequantize(quantize(x, p), p) - x).max()
    assert err <= float(p.scale) / 2 + 1e-7
    assert scales.dequantize(quantize(np.zeros(1, np.float32), p), p)[0] == 0.0  # zero is exact
    ps = activation_params(-1.0, 3.0, "int8", symmetric=True)
    assert int(ps.zero_point) == 0 and np.isclose(float(ps.scale), 3.0 / 127)


@pytest.mark.parametrize(
    "lo,hi,reason",
    [(float("nan"), 1.0, "not finite"), (-float("inf"), 0.0, "not finite"),
     (-3.4e38, 0.0, "mask or sentinel"), (0.0, 0.0, "constant zero"), (2.0, 1.0, "empty")],
)
def test_degenerate_ranges_raise_with_reason(lo, hi, reason):
    with pytest.raises(DegenerateRange, match=reason):
        activation_params(lo, hi)


def test_weight_params_per_channel_and_zero_channel():
    w = np.stack([np.full((3, 2), 0.5), np.zeros((3, 2)), np.full((3, 2), -2.0)]).astype(np.float32)
    p = weight_params(w, 0)
    assert p.scale.tolist() == pytest.approx([0.5 / 127, 1.0, 2.0 / 127])
    assert p.zero_point.dtype == np.int8 and not p.zero_point.any()
    q = quantize(w, p)
    assert q[0].max() == 127 and q[2].min() == -127 and not q[1].any()
    with pytest.raises(DegenerateRange):
        weight_params(np.array([[np.nan, 1.0]], np.float32), 0)
