"""Bit widths, block layouts and packing for weight-only quantization.

One module describes every low-bit layout qtool writes; the bytes of each come from
qtool.kernels, whose numpy twins (kernels/reference.py) are the definition and whose C
kernels are held to them byte for byte. Codes are always handled *unsigned*,
one per byte, ``q in [0, 2^bits)``, with a zero point ``z`` (``2^(bits-1)`` when symmetric):

    w ~= (q - z) * s                       (s: float32 scale of the block)

Orientation: a quantized weight is held as ``[rows, cols]`` with blocks of ``block_size``
consecutive elements along ``cols`` (the *reduction* axis). For a MatMul weight ``W[K, N]``
that is ``W^T[N, K]`` (rows = output channels); for an embedding table ``E[V, D]`` it is
``E`` itself (blocks along D).

Layouts written (bits per weight include the fp32 scale; zero points add bits/block):

- com.microsoft ``MatMulNBits`` (bits 2, 4, 8): ``B[N, n_blocks, block_size*bits/8]``
  uint8, each block's codes along K packed *low bits first*; K is padded to a block
  multiple with the block's zero point (padded weights are exactly 0). ``scales[N,
  n_blocks]``; ``zero_points`` packed uint8 ``[N, ceil(n_blocks*bits/8)]`` (same packing)
  or absent (default ``2^(bits-1)``). 4-bit at block 32: 4 + 32/32 = 5.0 bits/weight.
- ONNX ``DequantizeLinear`` blocked (opset 21: int4/uint4, opset 25: int2/uint2):
  ``x[K, N]`` with ``axis=0``, ``block_size``; ``scale[ceil(K/bs), N]``; element i of the
  flattened tensor sits in byte ``i*bits/8`` at bit ``(i*bits) % 8`` (first element in the
  low bits). Signed types store ``q - z`` with the symmetric zero point folded away.
- ``GatherBlockQuantized`` (com.microsoft, uint8 data, bits 4/8): ``data[V, D*bits/8]``
  packed along the last axis, ``scales[V, D/bs]``, zero points packed like data.

3-bit codes have no storage type in ONNX or onnxruntime: they are stored in 4-bit
containers (8 of 16 levels used), which saves nothing on disk over 4-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qtool import kernels
from qtool.errors import UsageError

SUPPORTED_BITS = (2, 3, 4, 8)
MATMULNBITS_BITS = (2, 4, 8)  # onnxruntime 1.32 schema: "supported values: 2, 4, 8"
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class BlockQuant:
    """A block-quantized 2-D weight: ``w[r, c] ~= (codes[r, c] - zp[r, c // bs]) * scales[r, c // bs]``.

    ``codes``: uint8 [rows, cols] in [0, 2^bits). ``scales``: float32 [rows, n_blocks].
    ``zero_points``: uint8 [rows, n_blocks] (integer) or float32 (HQQ, MatMulNBits only);
    ``None`` means symmetric with the default ``2^(bits-1)``.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.codes.shape[1]

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    def zero_point_array(self) -> np.ndarray:
        """Zero points as [rows, n_blocks] (the symmetric default filled in)."""
        if self.zero_points is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)
        return self.zero_points

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols]: ``(q - z) * s`` evaluated in float32 (kernels.dequantize;
        float zero points, which no kernel type holds, by dequantize_blocks)."""
        zp = self.zero_point_array()
        if zp.dtype.kind == "f":
            return dequantize_blocks(self.codes, self.scales, zp, self.block_size)
        return kernels.dequantize(self.codes, self.scales, zp.astype(np.int32), qtype="u8", axis=1,
                                  block_size=self.block_size)


def check_bits(bits: int, block_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise UsageError(
            f"weight-only quantization supports --bits 2, 3, 4 or 8, not {bits}",
            "use --bits 4 (the usual choice for language models)",
        )
    if block_size not in BLOCK_SIZES:
        raise UsageError(
            f"block size {block_size} is not supported",
            "use --block-size 32, 64, 128 or 256 (MatMulNBits needs a power of two >= 16)",
        )


def n_blocks(cols: int, block_size: int) -> int:
    return -(-cols // block_size)


def pad_cols(x: np.ndarray, block_size: int, value: float = 0) -> np.ndarray:
    """``x[rows, cols]`` padded along cols to a multiple of ``block_size`` (a view if none needed)."""
    rows, cols = x.shape
    padded = n_blocks(cols, block_size) * block_size
    if padded == cols:
        return x
    out = np.full((rows, padded), value, dtype=x.dtype)
    out[:, :cols] = x
    return out


def dequantize_blocks(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int
) -> np.ndarray:
    """``(q - z) * s`` in float32 for codes [rows, cols] and per-block s, z [rows, n_blocks]."""
    rows, cols = codes.shape
    nb = scales.shape[1]
    q = pad_cols(codes, block_size).reshape(rows, nb, block_size).astype(np.float32)
    zp = zero_points.astype(np.float32)[:, :, None]
    y = (q - zp) * scales.astype(np.float32)[:, :, None]
    return y.reshape(rows, nb * block_size)[:, :cols]


# ---- packing -------------------------------------------------------------------------
# Each layout is defined once, by qtool.kernels (the C kernel, or its numpy twin in
# kernels/reference.py, which is the definition); this module only shapes arrays for it.

_UNSIGNED = {2: "u2", 4: "u4", 8: "u8"}


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, low bits first (ONNX and MatMulNBits order).

    ``codes[..., n]`` (values < 2^bits) -> uint8 ``[..., ceil(n*bits/8)]``: a 1-D array is
    packed as ONNX packs a flattened tensor (``kernels.pack``); higher ranks row by row,
    each row zero padded to whole bytes (``kernels.pack_zero_points``: the layout of
    MatMulNBits zero points and of GatherBlockQuantized data). Codes are masked to
    ``bits``, so int8 values pack as two's complement.
    """
    if bits not in _UNSIGNED:
        raise ValueError(f"pack_bits: bits must be 2, 4 or 8, got {bits}")
    q = np.asarray(codes).astype(np.uint8, copy=False)  # int8 -> its two's complement byte
    if q.ndim <= 1:
        return kernels.pack(q.reshape(-1), _UNSIGNED[bits])
    width = -(-q.shape[-1] * bits // 8)
    rows = q.reshape(-1, q.shape[-1])
    return kernels.pack_zero_points(rows, bits).reshape(*q.shape[:-1], width)


def storage_bits(bits: int) -> int:
    """Bits of the container a code of ``bits`` is stored in (3 -> 4)."""
    return 4 if bits == 3 else bits


def container_zero_points(bq: BlockQuant) -> np.ndarray | None:
    """Zero points as stored (uint8 or HQQ float32 [rows, n_blocks]), None for the
    container's default 2^(storage_bits - 1). 3-bit symmetric codes centre on 4, not on
    the 4-bit container's default 8, so they carry an explicit zero point of 4."""
    if bq.zero_points is None and bq.bits == 3:
        return np.full(bq.scales.shape, 4, dtype=np.uint8)
    return bq.zero_points


# ---- tensors for each format ---------------------------------------------------------


@dataclass(frozen=True)
class MatMulNBitsTensors:
    b: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # packed uint8 [N, ceil(nb*bits/8)], or float32 [N, nb]
    bits: int  # storage bits (the MatMulNBits `bits` attribute)
    block_size: int
    k: int
    n: int


def matmulnbits_tensors(bq: BlockQuant) -> MatMulNBitsTensors:
    """Tensors of a MatMulNBits node from a weight quantized as W^T [N, K]."""
    bits = storage_bits(bq.bits)
    if bits not in MATMULNBITS_BITS:
        raise UsageError(f"MatMulNBits cannot store {bq.bits}-bit weights", "use --bits 2, 3, 4 or 8")
    zp = container_zero_points(bq)
    # K is padded with each block's zero point (HQQ's float ones rounded), so padded
    # weights dequantize to exactly 0
    pad_zp = None if zp is None else np.rint(zp).astype(np.uint8)
    codes = np.ascontiguousarray(bq.codes, dtype=np.uint8)
    b = kernels.pack_matmulnbits(codes, bits, bq.block_size, pad_zp)
    if zp is None:
        packed_zp = None
    elif zp.dtype == np.uint8:
        packed_zp = pack_bits(zp, bits)
    else:
        packed_zp = zp.astype(np.float32)
    return MatMulNBitsTensors(
        b=b,
        scales=bq.scales.astype(np.float32),
        zero_points=packed_zp,
        bits=bits,
        block_size=bq.block_size,
        k=bq.cols,
        n=bq.rows,
    )


@dataclass(frozen=True)
class GatherBlockQuantizedTensors:
    """Inputs of a com.microsoft GatherBlockQuantized (gather_axis 0, quantize_axis 1)
    over a table quantized as ``E[V, D]`` (blocks along D)."""

    data: np.ndarray  # uint8 [V, ceil(D*bits/8)], each row packed low bits first
    scales: np.ndarray  # float32 [V, n_blocks]
    zero_points: np.ndarray | None  # uint8 [V, ceil(n_blocks*bits/8)], packed like data
    bits: int  # storage bits (the op's `bits` attribute)
    block_size: int


def gather_block_quantized_tensors(bq: BlockQuant) -> GatherBlockQuantizedTensors:
    """GatherBlockQuantized tensors for a table quantized as ``E[V, D]`` (not transposed)."""
    bits = storage_bits(bq.bits)
    zp = container_zero_points(bq)
    return GatherBlockQuantizedTensors(
        data=pack_bits(bq.codes, bits),
        scales=bq.scales.astype(np.float32),
        zero_points=None if zp is None else pack_bits(zp, bits),
        bits=bits,
        block_size=bq.block_size,
    )


@dataclass(frozen=True)
class BlockedDQTensors:
    """Inputs of an ONNX blocked DequantizeLinear with axis=0 over a weight x[K, N].

    ``packed``: the flattened [K, N] codes packed low-first (bytes of an INT4/UINT4/INT2/
    UINT2 tensor). ``signed``: the codes are ``q - z`` (zero point dropped).
    """

    packed: np.ndarray
    scale: np.ndarray  # float32 [n_blocks, N]
    zero_point_packed: np.ndarray | None  # same element type as x, [n_blocks, N], packed
    bits: int  # storage bits: 2 or 4 (or 8)
    signed: bool
    block_size: int
    shape: tuple[int, int]  # (K, N)


def blocked_dq_tensors(bq: BlockQuant, transpose: bool = True) -> BlockedDQTensors:
    """DequantizeLinear (axis 0, block_size) tensors for a weight quantized as W^T [N, K].

    Symmetric weights become signed (``int4``: q - 8) with no zero point; asymmetric ones
    stay unsigned with a packed zero point of the same type. ``transpose=False`` keeps the
    quantized orientation (rows become axis 0 of the stored tensor).
    """
    bits = storage_bits(bq.bits)
    if bq.zero_points is not None and bq.zero_points.dtype != np.uint8:
        raise UsageError(
            "the qdq format needs integer zero points; HQQ's float zero points only fit MatMulNBits",
            "use --format matmulnbits with --algorithm hqq, or another algorithm",
        )
    codes = bq.codes.T if transpose else bq.codes
    scale = bq.scales.T if transpose else bq.scales
    if bq.zero_points is None:
        signed_codes = (codes.astype(np.int16) - (1 << (bq.bits - 1))).astype(np.int8)
        return BlockedDQTensors(
            packed=kernels.pack(signed_codes, f"s{bits}"),
            scale=np.ascontiguousarray(scale, dtype=np.float32),
            zero_point_packed=None,
            bits=bits,
            signed=True,
            block_size=bq.block_size,
            shape=codes.shape,
        )
    zp = bq.zero_points.T if transpose else bq.zero_points
    return BlockedDQTensors(
        packed=kernels.pack(codes, f"u{bits}"),
        scale=np.ascontiguousarray(scale, dtype=np.float32),
        zero_point_packed=kernels.pack(zp, f"u{bits}"),
        bits=bits,
        signed=False,
        block_size=bq.block_size,
        shape=codes.shape,
    )


def bits_per_weight(bits: int, block_size: int, has_zero_points: bool) -> float:
    """Storage cost: container bits + a float32 scale (+ a packed zero point) per block."""
    b = storage_bits(bits)
    return b + 32 / block_size + (b / block_size if has_zero_points else 0.0)
