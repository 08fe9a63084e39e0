"""Quantizing one Item's weight into blocks: the orientation per kind, cache-sized row chunks,
the fused native fast path for MatMulNBits, and Conv weights as blocks of input channels."""

from __future__ import annotations

import dataclasses

import numpy as np

from qtool import kernels
from qtool.mapped import MappedTensor
from qtool.passes.weight_only.items import Item
from qtool.quant import formats
from qtool.quant.blockwise import DATA_AWARE, QuantOutcome, quantize_slabs, quantize_weight

# Row chunks of about this many weights keep a chunk's temporaries in L2 cache.
_CHUNK_ELEMENTS = 1 << 18


def weight_rows(item: Item) -> np.ndarray:
    """The weight in quantized orientation [rows, cols] (cols = reduction axis), lazily."""
    w = item.weight.const_value.numpy()
    if item.kind == "gather":
        return w  # E[V, D]: blocks along D
    if item.kind == "gemm" and item.transpose_b:
        return w  # B^T stored: [N, K]
    return w.T  # W[K, N] -> view [N, K]


def data_aware_args(item: Item, wo, algorithm: str) -> tuple | None:
    """``quantize_weight``'s arguments for a gptq/awq item that has its statistics (None
    otherwise): the whole of its work, which needs nothing else from the graph, so it can
    run on another process or node (qtool.passes.weight_only fans these out)."""
    if algorithm not in DATA_AWARE or item.kind == "gather" or item.stats is None:
        return None
    w = weight_rows(item)
    if item.alpha != 1.0:
        w = w * np.float32(item.alpha)
    return (np.ascontiguousarray(w, dtype=np.float32), item.bits, item.block or wo.block_size, wo.symmetric,
            algorithm, item.stats)


def quantize_item(item: Item, wo, algorithm: str, fmt: str = "") -> QuantOutcome:
    """Quantize one weight; row-separable algorithms run in cache-sized row chunks."""
    args = data_aware_args(item, wo, algorithm)
    if args is not None:
        return quantize_weight(*args)
    if item.block:
        wo = dataclasses.replace(wo, block_size=item.block)
    w = weight_rows(item)
    if item.alpha != 1.0:
        w = w * np.float32(item.alpha)
    rows, cols = w.shape
    alg = algorithm if algorithm not in DATA_AWARE else "mse"
    if fmt == "matmulnbits" and alg == "rtn" and item.bits in (2, 4, 8) and item.kind == "matmul":
        # The default path: one fused pass from the (memory-mapped) W[K, N] to packed
        # MatMulNBits tensors; the native kernel releases the GIL, so _pipelined overlaps tensors.
        tensor = item.weight.const_value
        k, n = tensor.shape
        # A weight mapped out of an inline model sits at any byte offset; the kernel reads
        # it in place, where numpy() would make an aligned copy (SmolLM2: 0.25 s, 538 MB).
        w = tensor.raw if isinstance(tensor, MappedTensor) else tensor.numpy()
        b, scales, zp = kernels.quantize_kn(w, item.bits, wo.block_size, wo.symmetric)
        t = formats.MatMulNBitsTensors(b, scales, zp, item.bits, wo.block_size, k, n)
        return QuantOutcome(None, float("nan"), float("nan"), tensors=t)
    if alg in ("rtn", "mse"):
        # Cache-sized slabs straight from the (memory-mapped) stored layout, native kernels.
        src = item.weight.const_value.numpy()
        k_axis = 0 if item.kind == "matmul" or (item.kind == "gemm" and not item.transpose_b) else 1
        if item.alpha != 1.0:
            src = src * np.float32(item.alpha)
        # RTN alone skips measuring its error (a dequantize pass): it is the fast default.
        bq, sse = quantize_slabs(src, item.bits, wo.block_size, wo.symmetric, alg, k_axis=k_axis, measure=alg != "rtn")
        rtn_sse = sse if alg == "rtn" else quantize_slabs(src, item.bits, wo.block_size, wo.symmetric, "rtn", k_axis=k_axis)[1]
        size = max(bq.codes.size, 1)
        return QuantOutcome(bq, sse / size, rtn_sse / size)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    codes = np.empty((rows, cols), dtype=np.uint8)
    nb = formats.n_blocks(cols, wo.block_size)
    scales = np.empty((rows, nb), dtype=np.float32)
    zps = None if wo.symmetric else np.empty((rows, nb), dtype=np.uint8)
    err = rtn_err = 0.0
    for r0 in range(0, rows, step):
        chunk = np.ascontiguousarray(w[r0 : r0 + step], dtype=np.float32)
        out = quantize_weight(chunk, item.bits, wo.block_size, wo.symmetric, alg, compare=alg != "rtn")
        codes[r0 : r0 + step] = out.bq.codes
        scales[r0 : r0 + step] = out.bq.scales
        if zps is not None:
            zps[r0 : r0 + step] = out.bq.zero_points
        err += out.weight_mse * chunk.size
        rtn_err += out.rtn_weight_mse * chunk.size
    n = max(rows * cols, 1)
    bq = formats.BlockQuant(codes, scales, zps, item.bits, wo.block_size)
    return QuantOutcome(bq, err / n, rtn_err / n)



# ---- Conv weights: blocks of input channels ----------------------------------------------


def conv_rows(w: np.ndarray) -> np.ndarray:
    """``W[M, C, k...]`` as ``[M * prod(k), C]``: a row per (output channel, kernel position),
    so blocks along the rows' columns are blocks of input channels."""
    return np.ascontiguousarray(np.moveaxis(w, 1, -1).reshape(-1, w.shape[1]), dtype=np.float32)


CONV_ALGORITHMS = ("rtn", "mse")


def quantize_conv(item: Item, wo, algorithm: str) -> QuantOutcome:
    """Quantize a Conv weight in its :func:`conv_rows` orientation with rtn or mse.

    gptq/awq would need im2col activation statistics and hqq's float zero points have no
    DequantizeLinear form, so those fall back to mse (the pass counts it).
    """
    alg = algorithm if algorithm in CONV_ALGORITHMS else "mse"
    rows = conv_rows(item.weight.const_value.numpy())
    bq, sse = quantize_slabs(rows, item.bits, wo.block_size, wo.symmetric, alg, k_axis=1, measure=alg != "rtn")
    rtn_sse = sse if alg == "rtn" else quantize_slabs(rows, item.bits, wo.block_size, wo.symmetric, "rtn", k_axis=1)[1]
    size = max(rows.size, 1)
    return QuantOutcome(bq, sse / size, rtn_sse / size)

