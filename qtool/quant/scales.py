"""Scale and zero-point maths for linear (affine) integer quantization.

Every quantized tensor in qtool follows ONNX's QuantizeLinear / DequantizeLinear::

    q = saturate(round_half_even(r / s) + z)        r = s (q - z)

with ``s`` a positive float32 scale (real units per integer step) and ``z`` an integer zero
point of the same type as ``q``. Per-tensor parameters are scalars; per-channel parameters
are 1-D arrays along one ``axis`` of the tensor.

Ranges are never silently turned into NaN or infinite scales: a range that is empty,
non-finite, or so wide that it can only be a mask/sentinel raises ``DegenerateRange`` with a
reason, and the passes leave that tensor in float and report the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qtool.errors import ConversionError

# |value| above this is a mask or sentinel (-1e9, finfo.min...), not a signal worth 256 levels.
SENTINEL_MAGNITUDE = 1e6
# A range narrower than this (in absolute units) carries no information at 8 bits.
MIN_RANGE = 1e-12

_INT_TYPES = {
    "uint8": (np.uint8, 0, 255),
    "int8": (np.int8, -128, 127),
    # 16-bit activations (A16W8): standard QuantizeLinear from opset 21, onnxruntime's
    # com.microsoft QuantizeLinear below it.
    "uint16": (np.uint16, 0, 65535),
    "int16": (np.int16, -32768, 32767),
    "int32": (np.int32, -(2**31), 2**31 - 1),
}


class DegenerateRange(ConversionError):
    """A tensor whose range cannot be quantized (empty, non-finite, sentinel-sized)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "the tensor is left in float; exclude the node to silence this")
        self.reason = reason


@dataclass(frozen=True)
class QParams:
    """Quantization parameters: ``r = scale * (q - zero_point)``.

    ``scale``: float32, shape () per tensor or (C,) per channel, in real units per step.
    ``zero_point``: same shape, numpy integer dtype ``dtype``. ``axis``: the channel axis of
    the quantized tensor for per-channel parameters, else None.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str  # "uint8" | "int8" | "uint16" | "int16" | "int32"
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    def key(self) -> tuple:
        """Hashable identity: equal keys quantize identically."""
        return (self.dtype, self.axis, self.scale.tobytes(), self.zero_point.tobytes())


def int_range(dtype: str, narrow: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of an integer type; ``narrow`` drops the most negative value (-127..127)."""
    if dtype not in _INT_TYPES:
        raise ConversionError(f"unsupported quantized type {dtype!r}", "use uint8 or int8 (uint16/int16 for 16-bit activations)")
    _, lo, hi = _INT_TYPES[dtype]
    if narrow and lo < 0:
        lo += 1
    return lo, hi


def np_dtype(dtype: str) -> type:
    return _INT_TYPES[dtype][0]


WIDE_ACTIVATION_TYPES = {"uint8": "uint16", "int8": "int16"}


def activation_dtype(activation_type: str, bits: int) -> str:
    """The integer type of an activation at ``bits`` (8 or 16) with the signedness of
    ``activation_type``: uint8 -> uint16, int8 -> int16 at 16 bits."""
    if bits == 16:
        return WIDE_ACTIVATION_TYPES.get(activation_type, activation_type)
    return activation_type


def check_range(lo: float, hi: float) -> None:
    """Raise DegenerateRange when [lo, hi] cannot carry an 8- or 16-bit quantized signal."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DegenerateRange(f"range [{lo:g}, {hi:g}] is not finite")
    if lo > hi:
        raise DegenerateRange(f"range [{lo:g}, {hi:g}] is empty (min > max)")
    if max(abs(lo), abs(hi)) > SENTINEL_MAGNITUDE:
        raise DegenerateRange(
            f"range [{lo:g}, {hi:g}] reaches {SENTINEL_MAGNITUDE:g}: a mask or sentinel value"
        )
    if max(abs(lo), abs(hi)) < MIN_RANGE:
        raise DegenerateRange(f"range [{lo:g}, {hi:g}] is constant zero")


def activation_params(
    lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False
) -> QParams:
    """Per-tensor parameters for an activation observed in [lo, hi] (real units).

    The range is first widened to contain 0 so that zero is exactly representable (padding,
    ReLU). Asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = round_half_even(qmin - lo/s)``.
    Symmetric: ``a = max(|lo|, |hi|)``; int8 uses ``s = a / 127, z = 0``; uint8 uses
    ``s = 2a / 255, z = 128``. 16-bit types follow the same rules with their own range
    (int16 ``s = a / 32767``; uint16 ``s = 2a / 65535, z = 32768``): the same calibrated
    range, 256 times finer steps.
    """
    lo, hi = float(lo), float(hi)
    check_range(lo, hi)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = int_range(dtype)
    if symmetric:
        a = max(-lo, hi)
        if qmin < 0:
            scale, zp = a / float(qmax), 0
        else:
            scale, zp = 2.0 * a / (qmax - qmin), (qmax + qmin + 1) // 2
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
    scale = np.float32(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise DegenerateRange(f"range [{lo:g}, {hi:g}] gives scale {scale}")
    return QParams(np.asarray(scale, np.float32), np.asarray(zp, np_dtype(dtype)), dtype)


def weight_params(w: np.ndarray, axis: int | None, dtype: str = "int8", symmetric: bool = True) -> QParams:
    """Parameters for a constant weight, per channel along ``axis`` (None: per tensor).

    Symmetric int8 uses the narrow range -127..127: ``s_c = max|w_c| / 127``, ``z = 0``.
    Asymmetric: ``s_c = (max_c - min_c) / (qmax - qmin)`` over a range widened to contain 0.
    A channel that is all zeros gets ``s = 1`` (it quantizes to exact zeros).
    """
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise DegenerateRange("weight holds NaN or infinite values")
    if axis is None:
        flat = w.reshape(1, -1)
    else:
        axis = axis % w.ndim
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    qmin, qmax = int_range(dtype, narrow=symmetric)
    if flat.size == 0:
        raise DegenerateRange("weight is empty")
    if symmetric:
        a = np.abs(flat).max(axis=1)
        if dtype == "int8":
            scale = a / qmax
            zp = np.zeros_like(scale)
        else:
            scale = 2.0 * a / (qmax - qmin)
            zp = np.full_like(scale, (qmax + qmin + 1) // 2)
    else:
        lo = np.minimum(flat.min(axis=1), 0.0)
        hi = np.maximum(flat.max(axis=1), 0.0)
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - lo / safe), qmin, qmax)
    zero = ~(scale > np.finfo(np.float32).tiny)
    scale = np.where(zero, 1.0, scale).astype(np.float32)
    zp = np.where(zero, 0 if qmin < 0 else zp, zp)
    zp = zp.astype(np_dtype(dtype))
    if axis is None:
        return QParams(scale.reshape(()), zp.reshape(()), dtype)
    return QParams(scale, zp, dtype, axis)


def _broadcast(p: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    if p.axis is None:
        return p.scale, p.zero_point.astype(np.int64)
    shape = [1] * ndim
    shape[p.axis % ndim] = -1
    return p.scale.reshape(shape), p.zero_point.astype(np.int64).reshape(shape)


_KERNEL_QTYPES = {"uint8": "u8", "int8": "s8"}


def quantize(x: np.ndarray, p: QParams) -> np.ndarray:
    """``q = saturate(round_half_even(x / s) + z)`` as ``p.dtype`` (float32 divide).

    8-bit goes through qtool.kernels (C when built, its numpy twin otherwise); 16-bit and
    int32 (bias) are computed here (``np.rint`` rounds half to even).
    """
    if p.dtype in _KERNEL_QTYPES and np.ndim(x) > 0:
        from qtool import kernels

        axis = None if p.axis is None else p.axis % np.ndim(x)
        return kernels.quantize(np.asarray(x, np.float32), p.scale, p.zero_point.astype(np.int32),
                                qtype=_KERNEL_QTYPES[p.dtype], axis=axis)
    scale, zp = _broadcast(p, np.ndim(x))
    qmin, qmax = int_range(p.dtype)
    q = np.rint(np.asarray(x, np.float32) / scale).astype(np.int64) + zp
    return np.clip(q, qmin, qmax).astype(np_dtype(p.dtype))


def dequantize(q: np.ndarray, p: QParams) -> np.ndarray:
    """``r = s (q - z)`` as float32."""
    scale, zp = _broadcast(p, np.ndim(q))
    return ((q.astype(np.int64) - zp) * scale).astype(np.float32)


def bias_params(input_scale: np.ndarray, weight_scale: np.ndarray, axis: int | None = 0) -> QParams:
    """int32 bias parameters: ``s_b = s_x * s_w`` (per output channel), ``z = 0``."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    zp = np.zeros(scale.shape, np.int32)
    return QParams(scale, zp, "int32", axis if scale.ndim == 1 else None)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum r^2 / sum (r - c)^2)``."""
    r = np.asarray(reference, np.float64).ravel()
    c = np.asarray(candidate, np.float64).ravel()
    noise = float(np.sum((r - c) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine similarity of the two tensors, flattened (1.0 when both are zero)."""
    r = np.asarray(reference, np.float64).ravel()
    c = np.asarray(candidate, np.float64).ravel()
    den = float(np.linalg.norm(r) * np.linalg.norm(c))
    if den == 0.0:
        return 1.0 if not r.any() and not c.any() else 0.0
    return float(np.dot(r, c) / den)
