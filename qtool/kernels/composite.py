"""A float MatMul weight to com.microsoft MatMulNBits inputs, from the kernels of
``qtool.kernels`` (block parameters, quantize, pack): each step runs on the backend in use."""

from __future__ import annotations

import numpy as np

from qtool.kernels import (
    block_params_mse,
    block_params_rtn,
    pack_matmulnbits,
    pack_zero_points,
    quantize,
)
from qtool.kernels._common import arg_error, nbits_check


def quantize_matmulnbits(w, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                         method: str = "rtn", n_grid: int = 20, min_shrink: float = 0.5):
    """Float weight W [K, N] of a MatMul -> (B, scales, zero_points) for com.microsoft
    MatMulNBits(K, N, bits, block_size): B uint8 [N, n_blocks, block_size*bits/8],
    scales float32 [N * n_blocks], zero_points packed uint8 [N * ceil(n_blocks*bits/8)]
    (None when symmetric: the op's default 2**(bits-1) is then exact).

    Blocks run along K per output column n; parameters by RTN or the MSE search
    (method "mse"); codes unsigned, W ~= (q - zp) * scale. With method "rtn" the result
    equals quantize_kn (one rule: reference.range_params)."""
    nbits_check("quantize_matmulnbits", bits, block_size)
    if method not in ("rtn", "mse"):
        raise arg_error("quantize_matmulnbits", f"method must be 'rtn' or 'mse', got {method!r}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise arg_error("quantize_matmulnbits", "w must be [K, N]")
    qtype = {2: "u2", 4: "u4", 8: "u8"}[bits]
    wt = np.ascontiguousarray(w.T)  # [N, K]: blocks become contiguous rows
    if method == "rtn":
        s, z = block_params_rtn(wt, block_size, qtype, symmetric)
    else:
        s, z = block_params_mse(wt, block_size, qtype, symmetric, n_grid, min_shrink)
    q = quantize(wt, s, z, qtype=qtype, axis=1, block_size=block_size)
    zu8 = z.astype(np.uint8)
    b = pack_matmulnbits(q, bits, block_size, zu8)
    return b, s.reshape(-1), (None if symmetric else pack_zero_points(zu8, bits))
