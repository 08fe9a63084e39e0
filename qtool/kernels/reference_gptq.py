"""The numpy twin of ``qt_gptq_rows`` (native/src/gptq.c), re-exported by
``qtool.kernels.reference`` beside the other twins."""

from __future__ import annotations

import numpy as np

from qtool.kernels._common import check_finite, check_gptq
from qtool.kernels.reference import block_params_bits

_F32 = np.float32


def gptq_rows(w, u, cols, block_size: int, bits: int, symmetric: bool, dynamic: bool, scales,
              zero_points=None) -> np.ndarray:
    """GPTQ on the rows of w [rows, K] (float32, original column order) -> codes uint8
    [rows, K] in original column order. u float32 [K, K]: the upper Cholesky factor of the damped inverse Hessian in
    quantization order; cols int64 [K]: the original column quantized at position i.
    With x = w[:, cols] and, for i = 0..K-1, g = cols[i] // block_size, z = 2**(bits-1)
    (symmetric) or zero_points[:, g]:

        q = clip(rint(x[:, i] / s) + z, 0, 2**bits - 1),  s = scales[:, g]
        codes[:, cols[i]] = q;  e = (x[:, i] - (q - z) * s) / u[i, i];  x[:, i] = e
        x[:, t] = x[:, t] - e * u[i, t]  for t > i   (float32, one column at a time)

    dynamic: cols is the identity and scales / zero_points [rows, nb] are written when i
    starts a block, by the RTN rule (range_params) on the current x[:, i:i+block_size];
    otherwise they are inputs. One column at a time is the definition (the C kernel
    applies the same updates in the same order, tiled); qtool.quant.gptq has a blocked
    numpy form for speed."""
    w, u, cols = check_gptq(w, u, cols, block_size, bits, symmetric, dynamic, scales, zero_points)
    check_finite("gptq_rows", w)
    rows, k = w.shape
    xt = np.ascontiguousarray(w[:, cols].T)  # [K, rows]: a column is a contiguous row
    codes = np.empty((rows, k), dtype=np.uint8)
    qmax, mid = _F32((1 << bits) - 1), _F32(1 << (bits - 1))
    for i in range(k):
        col = int(cols[i])
        g = col // block_size
        if dynamic and col % block_size == 0:
            s, z = block_params_bits(np.ascontiguousarray(xt[i : i + block_size].T), block_size, bits, symmetric)
            scales[:, g] = s[:, 0]
            if zero_points is not None:
                zero_points[:, g] = z[:, 0]
        s = scales[:, g]
        z = mid if zero_points is None else zero_points[:, g].astype(_F32)
        x = xt[i]
        q = np.rint(x / s) + z
        np.clip(q, 0, qmax, out=q)
        codes[:, col] = q
        e = (x - (q - z) * s) / u[i, i]
        xt[i] = e
        xt[i + 1 :] -= np.multiply.outer(u[i, i + 1 :], e)
    return codes
