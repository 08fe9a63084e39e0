"""Fast paths of qtool.quant.blockwise against plain references built here (small matrices)."""

from __future__ import annotations

import numpy as np
import pytest

from qtool.quant import blockwise
from qtool.quant import gptq as gptq_module
from qtool.quant.blockwise import ActivationStats


def _case(rows=48, k=96, tokens=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)).astype(np.float32) * rng.uniform(0.1, 3.0, k).astype(np.float32)
    x[:, 5] = 0.0  # a dead input channel (diag(H) == 0)
    w = (rng.standard_normal((rows, k)) * 0.05).astype(np.float32)
    return w, ActivationStats.from_activations(x)


def _textbook_gptq(w, bits, block_size, h, symmetric, damp=0.01, act_order=True):
    """GPTQ as the paper writes it: float64, one column at a time, every later column
    updated at once, U from chol(inv(H)) computed the direct way."""
    w = np.array(w, np.float64)
    rows, k = w.shape
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = blockwise.rtn(w.astype(np.float32), bits, block_size, symmetric)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    hp = h[np.ix_(perm, perm)]
    hp[np.diag_indices(k)] += damp * np.mean(np.diag(hp))
    u = np.linalg.cholesky(np.linalg.inv(hp)).T
    w = w[:, perm]
    codes = np.zeros((rows, k), np.uint8)
    qmax = (1 << bits) - 1
    for i in range(k):
        col = perm[i]
        g = col // block_size
        s = static.scales[:, g].astype(np.float64)
        z = (1 << (bits - 1)) if symmetric else static.zero_points[:, g].astype(np.float64)
        q = np.clip(np.rint(w[:, i] / s) + z, 0, qmax)
        codes[:, col] = q
        e = (w[:, i] - (q - z) * s) / u[i, i]
        w[:, i:] -= np.outer(e, u[i, i:])
    return codes


def test_gptq_factor_is_upper_cholesky_of_inverse():
    _, st = _case()
    perm, u = gptq_module.gptq_factor(st.hessian, 0.01, True)
    h = st.hessian[np.ix_(perm, perm)]
    h[np.diag_indices_from(h)] += 0.01 * np.mean(np.diag(h))
    assert u.dtype == np.float32 and (np.tril(u, -1) == 0).all()
    assert (np.diag(u) > 0).all()
    u64 = u.astype(np.float64)  # U is computed in float64 and rounded once to float32
    np.testing.assert_allclose(u64.T @ u64, np.linalg.inv(h), rtol=1e-5, atol=1e-6 * np.abs(np.linalg.inv(h)).max())


@pytest.mark.parametrize("n", [5, 96, 97, 250])
def test_lower_inverse_by_halves_matches_numpy_inverse(n):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n))
    lower = np.linalg.cholesky(a @ a.T + n * np.eye(n))
    inv = gptq_module.lower_inverse(lower, base=32)
    assert (np.triu(inv, 1) == 0).all()
    np.testing.assert_allclose(inv, np.linalg.inv(lower), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(inv @ lower, np.eye(n), atol=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_matches_textbook_reference(symmetric):
    w, st = _case(seed=3)
    gptq_module.FACTORS.clear()
    ours = blockwise.gptq(w, 4, 32, st.hessian, symmetric, lazy_block=64)
    ref = _textbook_gptq(w, 4, 32, st.hessian, symmetric)
    # float32 columns vs float64 and a different update order: a code may flip where a value
    # sits on a rounding boundary, nowhere else
    assert np.mean(ours.codes == ref) > 0.99
    assert np.abs(ours.codes.astype(int) - ref.astype(int)).max() <= 1
    from qtool.quant.formats import BlockQuant

    rb = BlockQuant(ref, ours.scales, ours.zero_points, 4, 32)
    e_ours = blockwise.output_error(w, ours.dequantize(), st.hessian)
    e_ref = blockwise.output_error(w, rb.dequantize(), st.hessian)
    assert e_ours == pytest.approx(e_ref, rel=0.02)
    assert e_ours < blockwise.output_error(w, blockwise.rtn(w, 4, 32, symmetric).dequantize(), st.hessian)


def test_gptq_without_act_order_sets_block_params_from_updated_columns():
    w, st = _case(rows=16, k=64, seed=5)
    gptq_module.FACTORS.clear()
    ours = blockwise.gptq(w, 4, 32, st.hessian, True, act_order=False, lazy_block=32)
    e = blockwise.output_error(w, ours.dequantize(), st.hessian)
    assert e < blockwise.output_error(w, blockwise.rtn(w, 4, 32).dequantize(), st.hessian)


def test_activation_stats_float32_gemm_matches_float64():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 50, 24)).astype(np.float32)
    st = ActivationStats.from_activations(x)
    x64 = x.reshape(-1, 24).astype(np.float64)
    np.testing.assert_allclose(st.xtx, x64.T @ x64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st.abs_sum, np.abs(x64).sum(0), rtol=1e-12)
    assert st.count == 150 and st.xtx.dtype == np.float64


def test_output_errors_match_float64_definition():
    w, st = _case(seed=9)
    w_hat = blockwise.rtn(w, 4, 32).dequantize()
    d = w.astype(np.float64) - w_hat
    want = np.einsum("nk,nk->", d @ st.hessian, d) / np.einsum("nk,nk->", w.astype(np.float64) @ st.hessian, w)
    got = blockwise.output_errors(w, [w_hat, w], st.hessian)
    assert got[0] == pytest.approx(want, rel=1e-4)
    assert got[1] == 0.0
