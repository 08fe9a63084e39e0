"""AWQ's pruned search (qtool.quant.awq) against the full search, and the Nystrom lower bound
it prunes with (qtool.quant.quadratic)."""

from __future__ import annotations

import numpy as np
import pytest

from qtool.quant import awq as awq_module
from qtool.quant import quadratic
from qtool.quant.blockwise import ActivationStats, quantize_weight


def _case(rows=96, k=128, tokens=600, seed=0, outliers=4):
    """Activations with a few outlier channels (what LLM inputs look like) and a dead one."""
    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.2, 1.5, k)
    gain[rng.choice(k, outliers, replace=False)] = 30.0
    x = (rng.standard_normal((tokens, k)) * gain).astype(np.float32)
    x[:, 7] = 0.0
    w = (rng.standard_normal((rows, k)) * 0.05).astype(np.float32)
    return w, ActivationStats.from_activations(x)


def _full_search(w, stats, bits, block, symmetric):
    """Every candidate's exact error (the search before pruning): the index the full search
    chooses (first of the smallest) and all errors."""
    h = stats.hessian
    errs = [quadratic.gram_quadratic(awq_module.residual(w, s, bits, block, symmetric), h)
            for s in awq_module.awq_scales(stats, 11)]
    return int(np.argmin(errs)), errs


@pytest.mark.parametrize(("seed", "symmetric", "bits"), [(0, True, 4), (1, False, 4), (2, True, 3), (3, True, 8)])
def test_pruned_search_chooses_what_the_full_search_chooses(seed, symmetric, bits):
    w, st = _case(seed=seed)
    best, errs = _full_search(w, st, bits, 32, symmetric)
    bq, inv_scale, (err, rtn_err) = awq_module.awq(w, bits, 32, st, symmetric)
    scales = awq_module.awq_scales(st, 11)
    if best == 0:
        assert inv_scale is None
    else:
        np.testing.assert_array_equal(inv_scale, (1.0 / scales[best]).astype(np.float32))
    from qtool.quant.blockwise import rtn

    np.testing.assert_array_equal(bq.codes, rtn(w * scales[best][None, :], bits, 32, symmetric).codes)
    den = quadratic.gram_quadratic(w, st.hessian)
    # the exact errors are computed the same way as the full search's: equal to the bit
    assert err == errs[best] / den and rtn_err == errs[0] / den


def test_search_skips_candidates_and_keeps_the_smallest():
    w, st = _case(rows=200, seed=4, outliers=3)
    errors = awq_module._search(w, awq_module.awq_scales(st, 11), 4, 32, True, st.hessian)
    _, full = _full_search(w, st, 4, 32, True)
    skipped = [i for i, e in enumerate(errors) if e == np.inf]
    assert skipped, "the bound skipped no candidate on outlier-dominated activations"
    assert min(errors) == min(full)
    for i, e in enumerate(errors):  # computed ones are exact, skipped ones really are worse
        assert e == full[i] or (e == np.inf and full[i] > min(full))


def test_row_chunks_tighten_the_bound_and_keep_exact_errors(monkeypatch):
    # many row chunks: candidates also stop part way through their exact error
    monkeypatch.setattr(quadratic, "ROWS", 16)
    monkeypatch.setattr(awq_module, "ROWS", 16)
    w, st = _case(rows=160, seed=5)
    best, full = _full_search(w, st, 4, 32, True)
    errors = awq_module._search(w, awq_module.awq_scales(st, 11), 4, 32, True, st.hessian)
    assert errors[best] == full[best] and errors[0] == full[0]
    assert min(range(11), key=lambda i: (errors[i], i)) == best


def test_quantize_weight_reports_the_search_errors():
    w, st = _case(seed=6)
    out = quantize_weight(w, 4, 32, True, "awq", st)
    best, errs = _full_search(w, st, 4, 32, True)
    den = quadratic.gram_quadratic(w, st.hessian)
    assert out.output_error == errs[best] / den and out.rtn_output_error == errs[0] / den
    assert out.output_error <= out.rtn_output_error


@pytest.mark.parametrize("k", [24, 96])
def test_nystrom_head_is_a_lower_bound(k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((400, k)) * rng.uniform(0.1, 5.0, k)).astype(np.float32)
    x[:, 3] = 0.0  # a dead input: H singular
    h = ActivationStats.from_activations(x).hessian
    for r in (1, 8, k):
        f = quadratic._nystrom(h, r)
        assert f.shape == (k, r) and f.dtype == np.float32
        for _ in range(5):
            d = rng.standard_normal((30, k)).astype(np.float32)
            exact = quadratic.gram_quadratic(d, h)
            bound = quadratic.sum_squares(d @ f)
            assert bound <= exact * (1 + 1e-5)
            if r == k:  # every input in the head: the bound is the whole value
                assert bound == pytest.approx(exact, rel=1e-4)


def test_head_factor_is_none_without_finite_statistics():
    h = np.eye(8)
    h[2, 2] = np.nan
    assert quadratic.head_factor(h) is None
    w, st = _case(rows=16, k=32, seed=8)
    bad = ActivationStats(st.xtx * np.nan, st.abs_sum, st.count)
    # without a bound every candidate is evaluated exactly (NaN errors: alpha 0 stays)
    _, inv_scale, _ = awq_module.awq(w, 4, 32, bad)
    assert inv_scale is None


def _composed_residual(w, s, bits, block, symmetric):
    """The residual as the search made it before the kernel: scale, RTN, dequantize, unscale."""
    from qtool.quant.blockwise import rtn

    d = rtn(w * s[None, :], bits, block, symmetric).dequantize()
    d /= s[None, :]
    return w - d


@pytest.mark.parametrize(("bits", "symmetric", "block", "cols"), [(4, True, 32, 128), (4, False, 32, 100), (3, True, 16, 50),
                                                                  (2, False, 64, 64), (8, True, 128, 130)])
def test_awq_residual_kernel_twin_and_composition_agree_bit_for_bit(bits, symmetric, block, cols):
    from qtool import kernels
    from qtool.kernels import reference

    w, st = _case(rows=37, k=cols, seed=bits + cols)
    w[0, :5] = 0.0  # an all-zero start of a block, and a -0.0
    w[1, 3] = -0.0
    for s in awq_module.awq_scales(st, 11)[::3]:
        want = _composed_residual(w, s, bits, block, symmetric)
        np.testing.assert_array_equal(reference.awq_residual(w, s, block, bits, symmetric), want)
        if kernels.native_available():
            for isa in kernels.isa_paths() or ["scalar"]:
                with kernels.use_isa(isa):
                    np.testing.assert_array_equal(kernels.awq_residual(w, s, block, bits, symmetric), want)


def test_awq_residual_refuses_bad_input():
    from qtool import kernels
    from qtool.errors import QtoolError

    w = np.ones((2, 8), np.float32)
    with pytest.raises(QtoolError):
        kernels.awq_residual(w, np.ones(7, np.float32), 4, 4, True)
    w[1, 2] = np.inf
    with pytest.raises(QtoolError):
        kernels.awq_residual(w, np.ones(8, np.float32), 4, 4, True)
