"""What both kernel backends share: quantized types, tensor geometry, argument checks
and the kernel exceptions. Checks live here so the numpy and native backends reject
exactly the same inputs with exactly the same errors."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from qtool.errors import NativeError

# name -> (bits, signed, enum value in qtool.h)
QTYPES: dict[str, tuple[int, bool, int]] = {
    "u8": (8, False, 0),
    "s8": (8, True, 1),
    "u4": (4, False, 2),
    "s4": (4, True, 3),
    "u2": (2, False, 4),
    "s2": (2, True, 5),
}


class KernelArgumentError(NativeError):
    """A kernel was called with arguments it cannot accept (shape, dtype, range)."""


class NonFiniteError(NativeError):
    """Float input to a statistics/quantization kernel holds NaN or +-Inf.

    ``index`` is the flat index of the first non-finite element.
    """

    def __init__(self, kernel: str, index: int, value: float) -> None:
        super().__init__(
            f"{kernel}: input holds a non-finite value ({value}) at flat index {index}",
            hint="the tensor feeding this step has NaN/Inf; fix the model or the input data "
            "(qtool cannot calibrate or quantize non-finite values)",
        )
        self.index = index
        self.value = value


def arg_error(kernel: str, what: str) -> KernelArgumentError:
    return KernelArgumentError(f"{kernel}: {what}", hint="this is a bug in the caller of qtool.kernels")


def qtype_info(qtype: str) -> tuple[int, bool, int, int, np.dtype]:
    """(bits, signed, qmin, qmax, code dtype) of a quantized type name."""
    if qtype not in QTYPES:
        raise arg_error("qtype", f"unknown quantized type {qtype!r} (one of {', '.join(QTYPES)})")
    bits, signed, _ = QTYPES[qtype]
    if signed:
        return bits, True, -(1 << (bits - 1)), (1 << (bits - 1)) - 1, np.dtype(np.int8)
    return bits, False, 0, (1 << bits) - 1, np.dtype(np.uint8)


def raise_nonfinite(kernel: str, x: np.ndarray) -> None:
    """Raise NonFiniteError naming the first NaN/Inf of x (x is known to hold one)."""
    flat = x.reshape(-1)
    i = int(np.flatnonzero(~np.isfinite(flat))[0])
    raise NonFiniteError(kernel, i, float(flat[i]))


def check_finite(kernel: str, x: np.ndarray) -> None:
    if x.size and not np.isfinite(x).all():
        raise_nonfinite(kernel, x)


class Geometry(NamedTuple):
    """x viewed as [outer, axis_len, inner]; block == 0 means per-axis."""

    outer: int
    axis_len: int
    inner: int
    block: int
    param_shape: tuple[int, ...]


def quant_geometry(kernel: str, shape: tuple[int, ...], axis: int | None, block_size: int) -> Geometry:
    """Geometry for per-tensor (axis None), per-axis (block_size 0) or block-wise layouts.

    Parameter shapes: per-tensor (1,); per-axis (shape[axis],); block-wise ``shape`` with
    ``shape[axis]`` replaced by ``ceil(shape[axis] / block_size)`` (ONNX blocked layout).
    """
    size = math.prod(shape)
    if axis is None:
        if block_size:
            raise arg_error(kernel, "block_size needs an axis")
        return Geometry(1, 1, size, 0, (1,))
    if not -len(shape) <= axis < len(shape):
        raise arg_error(kernel, f"axis {axis} out of range for shape {shape}")
    axis %= len(shape)
    outer, c, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    if block_size < 0:
        raise arg_error(kernel, f"block_size must be >= 0, got {block_size}")
    if block_size == 0:
        return Geometry(outer, c, inner, 0, (c,))
    nb = -(-c // block_size)
    return Geometry(outer, c, inner, block_size, shape[:axis] + (nb,) + shape[axis + 1 :])


def quant_params(kernel: str, geo: Geometry, scale, zero_point, qtype: str):
    """Scale (float32) and zero point (int32 or None) as contiguous arrays of the right size."""
    _, _, qmin, qmax, _ = qtype_info(qtype)
    size = math.prod(geo.param_shape)
    s = np.ascontiguousarray(scale, dtype=np.float32)
    if s.size != size:
        raise arg_error(kernel, f"scale has {s.size} values, expected shape {geo.param_shape}")
    # negative scales are valid (symmetric block RTN puts a positive extreme on code qmin)
    if size and not (np.isfinite(s).all() and (s != 0).all()):
        raise arg_error(kernel, "scale must be finite and non-zero")
    s = s.reshape(geo.param_shape)
    if zero_point is None:
        return s, None
    zp_in = np.asarray(zero_point)
    if zp_in.size != size or not np.issubdtype(zp_in.dtype, np.integer):
        raise arg_error(kernel, f"zero_point must be integers of shape {geo.param_shape}")
    z = np.ascontiguousarray(zp_in, dtype=np.int32).reshape(geo.param_shape)
    if size and (z.min() < qmin or z.max() > qmax):
        raise arg_error(kernel, f"zero_point outside [{qmin}, {qmax}] for {qtype}")
    return s, z


def nbits_check(kernel: str, bits: int, block_size: int) -> None:
    if bits not in (2, 4, 8):
        raise arg_error(kernel, f"bits must be 2, 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise arg_error(kernel, f"block_size must be a power of two >= 16, got {block_size}")
