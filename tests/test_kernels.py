"""Every kernel, on every path (numpy backend, native scalar, native vector ISAs), held to
its numpy twin in qtool.kernels.reference; packing held to ONNX / onnxruntime semantics."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import qtool.kernels as k
from qtool.errors import NativeError
from qtool.kernels import reference as ref

# Tolerances for float results whose summation order differs between paths (GEMMs).
# Everything else (codes, packed bytes, counts, min/max, scales, zero points, dequantized
# floats) must match bit for bit.
Q4_RTOL = 2e-5  # relative to sum_k |a[m,k] * w[k,n]|
Q4_ATOL = 1e-6
ORT_RTOL = 1e-4  # onnxruntime's MatMulNBits / DequantizeLinear vs ours, same scale
SIZES = [1, 31, 32, 33, 1023, 4097]
FLT_MAX = np.finfo(np.float32).max

PATHS = [("numpy", None)] + [("native", isa) for isa in k.isa_paths()]
PATH_IDS = [b if isa is None else isa for b, isa in PATHS]
NATIVE_PATHS = [p for p in PATHS if p[0] == "native"]


@contextlib.contextmanager
def on(path):
    backend, isa = path
    with k.use_backend(backend), (k.use_isa(isa) if isa else contextlib.nullcontext()):
        yield


def first_diff(got, want) -> int:
    g, w = np.asarray(got).reshape(-1), np.asarray(want).reshape(-1)
    if g.dtype.kind == "f":
        g, w = g.view(np.uint32 if g.itemsize == 4 else np.uint64), w.view(np.uint32 if w.itemsize == 4 else np.uint64)
    return int(np.flatnonzero(g != w)[0])


def assert_exact(got, want, what: str, block: int | None = None) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    same = got.tobytes() == want.tobytes()
    if not same:
        i = first_diff(got, want)
        where = f"flat index {i}" + (f" (block {i // block})" if block else "")
        pytest.fail(f"{what}: differs at {where}: got {got.reshape(-1)[i]!r}, want {want.reshape(-1)[i]!r}")


def data(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + n)
    x = (rng.standard_normal(n) * 2).astype(np.float32)
    if kind == "zeros":
        x[:] = 0
    elif kind == "negzero":
        x = np.where(rng.random(n) < 0.5, np.float32(0.0), np.float32(-0.0)).astype(np.float32)
    elif kind == "ties":  # exact .5 ties for scale 0.25
        x = ((rng.integers(-40, 40, n) + 0.5) * 0.25).astype(np.float32)
    elif kind == "outlier":
        x[n // 2] = 1e6
    elif kind == "denormal":
        x = (x * np.float32(1e-39)).astype(np.float32)
    elif kind == "fltmax":
        x[rng.random(n) < 0.3] = FLT_MAX
        x[rng.random(n) < 0.3] = -FLT_MAX
    return x


KINDS = ["normal", "zeros", "negzero", "ties", "outlier", "denormal", "fltmax"]

# ---- backend plumbing --------------------------------------------------------------


def test_backend_flag_and_isa_paths():
    assert k.BACKEND in ("native", "numpy")
    if k.native_available():
        assert k.isa_paths()[0] == "scalar"
        with k.use_isa("scalar"):
            assert k.isa_paths() == ["scalar"]
    with k.use_backend("numpy"):
        assert k.BACKEND == "numpy" and k.isa_paths() == []


# ---- 1. statistics -----------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_minmax_and_histogram(path):
    for n in SIZES:
        for kind in KINDS:
            x = data(kind, n)
            want = ref.minmax(x)
            with on(path):
                got = k.minmax(x)
            assert np.float32(got).tobytes() == np.float32(want).tobytes(), f"minmax {kind} n={n}: {got} vs {want}"
            for lo, hi, bins in [(-2.0, 2.0, 2048), (-1.0, 3.0, 7), (0.0, 1e-38, 1)]:
                want_c = ref.histogram(x, lo, hi, np.arange(bins, dtype=np.int64))
                with on(path):
                    got_c = k.histogram(x, lo, hi, np.arange(bins, dtype=np.int64))
                assert_exact(got_c, want_c, f"histogram {kind} n={n} [{lo},{hi}] bins={bins} (bin index)")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_histogram_edges(path):
    x = np.array([0.0, 1.0, -5.0, 7.0, 0.49, 0.5, 0.25], dtype=np.float32)
    with on(path):
        counts = k.histogram(x, 0.0, 1.0, np.zeros(4, dtype=np.int64))
    # 0 -> 0, 1 (== hi) -> 3, -5 -> 0 (clamped), 7 -> 3 (clamped), .49 -> 1, .5 -> 2, .25 -> 1
    assert counts.tolist() == [2, 2, 1, 2]


# (k, start, bins) for histogram_pow2: the calibration grid (2048 bins around 0), a grid
# far from 0, coarse and fine levels, bins not a power of two, one bin.
POW2_GRIDS = [(-8, -1024, 2048), (-3, 37, 100), (2, -5, 16), (-130 + 4, 0, 7),
              (40, -1, 3), (0, 0, 1)]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_histogram_pow2_matches_twin(path):
    for n in SIZES + [600_001]:  # 600_001: several sub-histogram spans
        for kind in KINDS:
            x = data(kind, n)
            for kk, start, bins in POW2_GRIDS:
                want = ref.histogram_pow2(x, kk, start, np.arange(bins, dtype=np.int64))
                with on(path):
                    got = k.histogram_pow2(x, kk, start, np.arange(bins, dtype=np.int64))
                assert_exact(got, want, f"histogram_pow2 {kind} n={n} k={kk} start={start} "
                             f"bins={bins} (bin index)")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_histogram_pow2_edges(path):
    tiny = np.float32(2.0**-149)  # the smallest subnormal
    x = np.array([0.0, -0.0, 0.25, 0.5, 0.75, 1.0, -0.25, -0.5, 2.75, 3.0, 100.0, -100.0,
                  tiny, -tiny, FLT_MAX, -FLT_MAX], dtype=np.float32)
    with on(path):
        # width 2^-2, bins [-2, 10): edges land in the bin they start; floor goes down
        c = k.histogram_pow2(x, -2, -2, np.zeros(12, dtype=np.int64))
        # width 2: -tiny / 2 rounds to -0.0 (a tie, to even), so it joins bin 0, not -1
        d = k.histogram_pow2(np.array([-tiny, tiny, -1.0], dtype=np.float32), 1, -1,
                             np.zeros(2, dtype=np.int64))
    want = np.zeros(12, dtype=np.int64)
    # 0, -0, tiny -> grid 0 -> bin 2; -tiny -> grid -1 -> bin 1; .25 -> 3; .5 -> 4; .75 -> 5;
    # 1 -> 6; -.25 -> 1; -.5 -> 0; 2.75 (grid 11, bin 13), 3, 100, FLT_MAX (x * 4 overflows
    # to inf) -> clamped to 11; -100, -FLT_MAX -> clamped to 0
    for b, n in {2: 3, 1: 2, 3: 1, 4: 1, 5: 1, 6: 1, 0: 3, 11: 4}.items():
        want[b] = n
    assert c.tolist() == want.tolist()
    assert d.tolist() == [1, 2]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_histogram_pow2_large_counts_and_bad_arguments(path):
    x = np.zeros(600_001, dtype=np.float32)  # one bin takes everything: no counter wraps
    with on(path):
        c = k.histogram_pow2(x, 0, -3, np.zeros(16, dtype=np.int64))
        assert c[3] == x.size and c.sum() == x.size
        x[-1] = np.nan  # past the first span: counts of earlier spans are taken back out
        with pytest.raises(k.NonFiniteError) as err:
            k.histogram_pow2(x, 0, -3, c)
        assert err.value.index == x.size - 1 and c[3] == x.size and c.sum() == x.size
        for kk, start, counts in [(127, 0, np.zeros(4, np.int64)), (-128, 0, np.zeros(4, np.int64)),
                                  (0, 2**24 + 1, np.zeros(4, np.int64)), (0, 2**63 - 1, np.zeros(4, np.int64)),
                                  (0.5, 0, np.zeros(4, np.int64)), (0, 0, np.zeros(0, np.int64)),
                                  (0, 0, np.zeros(4, np.int32))]:
            with pytest.raises(k.KernelArgumentError):
                k.histogram_pow2(x[:8], kk, start, counts)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_minmax_histogram_pow2_matches_twin(path):
    """The one-pass kernel: min/max as minmax gives them, counts as histogram_pow2 gives
    them when the values lie inside the bounds, counts untouched when one lies outside."""
    for n in SIZES + [600_001]:  # 600_001: several sub-histogram spans, then taken back out
        for kind in KINDS if n < 600_000 else ["normal", "outlier"]:
            x = data(kind, n)
            mn, mx = ref.minmax(x)
            # bounds holding the data (exactly, and loosely), then missing it below / above
            for lo, hi in [(mn, mx), (mn - 1, mx + 1), (mn + 0.5, mx + 1), (mn - 1, mx - 0.5)]:
                lo, hi = min(lo, hi), max(lo, hi)
                for kk, start, bins in POW2_GRIDS[:3]:
                    want_c = np.arange(bins, dtype=np.int64)
                    want = ref.minmax_histogram_pow2(x, kk, start, want_c, lo, hi)
                    got_c = np.arange(bins, dtype=np.int64)
                    with on(path):
                        got = k.minmax_histogram_pow2(x, kk, start, got_c, lo, hi)
                    what = f"minmax_histogram_pow2 {kind} n={n} [{lo}, {hi}] k={kk}"
                    assert np.float32(got[:2]).tobytes() == np.float32(want[:2]).tobytes(), what
                    assert got[2] == want[2] == (np.float32(lo) <= mn and mx <= np.float32(hi)), what
                    assert_exact(got_c, want_c, what)
                    if want[2]:
                        assert_exact(got_c, ref.histogram_pow2(x, kk, start, np.arange(bins, dtype=np.int64)), what)
                    else:
                        assert_exact(got_c, np.arange(bins, dtype=np.int64), what)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_minmax_histogram_pow2_errors(path):
    x = data("normal", 600_001)
    counts = np.zeros(16, dtype=np.int64)
    with on(path):
        x[-1] = np.nan  # past the first span: the spans already counted are taken back out
        with pytest.raises(k.NonFiniteError) as err:
            k.minmax_histogram_pow2(x, -2, -8, counts, -100.0, 100.0)
        assert err.value.index == x.size - 1 and not counts.any()
        for lo, hi in [(1.0, -1.0), (np.nan, 1.0), (-np.inf, 1.0)]:
            with pytest.raises(k.KernelArgumentError):
                k.minmax_histogram_pow2(x[:8], -2, -8, counts, lo, hi)
        with pytest.raises(k.KernelArgumentError):
            k.minmax_histogram_pow2(x[:0], -2, -8, counts, -1.0, 1.0)
        with pytest.raises(k.KernelArgumentError):
            k.minmax_histogram_pow2(x[:8], 127, -8, counts, -1.0, 1.0)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_policy(path, bad):
    for n in [1, 33, 4097]:
        x = data("normal", n)
        x[n - 1] = bad
        counts = np.zeros(16, dtype=np.int64)
        with on(path):
            for call in (lambda: k.minmax(x),
                         lambda: k.histogram(x, -1, 1, counts),
                         lambda: k.histogram_pow2(x, -4, -16, counts),
                         lambda: k.quantize(x, 0.1, 128, qtype="u8"),
                         lambda: k.block_params_rtn(x.reshape(1, -1), 32, "u4", False),
                         lambda: k.block_params_mse(x.reshape(1, -1), 32, "s4", True, 4)):
                with pytest.raises(k.NonFiniteError) as err:
                    call()
                assert err.value.index == n - 1 and isinstance(err.value, NativeError)
                assert err.value.hint
        assert not counts.any(), "histogram must leave counts unchanged on error"


# ---- 2. quantize / dequantize ------------------------------------------------------

LAYOUTS = [  # (shape from n, axis, block_size)
    ("tensor", None, 0),
    ("axis0", 0, 0),
    ("axis-1", -1, 0),
    ("block-last", -1, 32),
    ("block-first", 0, 16),
]


def layout_case(n: int, axis, block: int, qtype: str, seed=1):
    shape = (n,) if n < 4 else (3, n // 3)
    rng = np.random.default_rng(seed)
    geo = k._common.quant_geometry("t", shape, axis, block)
    _, _, qmin, qmax, _ = k._common.qtype_info(qtype)
    scale = (rng.random(geo.param_shape) * 0.5 + 0.05).astype(np.float32)
    scale.reshape(-1)[0] = 0.25  # so the "ties" data hits exact .5 ties
    zp = rng.integers(qmin, qmax + 1, geo.param_shape).astype(np.int32)
    return shape, scale, zp


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("qtype", list(k.QTYPES))
def test_quantize_dequantize(path, qtype):
    for n in SIZES:
        for name, axis, block in LAYOUTS:
            shape, scale, zp = layout_case(n, axis, block, qtype)
            for kind in ("normal", "ties", "fltmax", "denormal"):
                x = data(kind, int(np.prod(shape))).reshape(shape)
                for z in (zp, None):
                    want = ref.quantize(x, scale, z, qtype=qtype, axis=axis, block_size=block)
                    with on(path):
                        got = k.quantize(x, scale, z, qtype=qtype, axis=axis, block_size=block)
                        y = k.dequantize(want, scale, z, qtype=qtype, axis=axis, block_size=block)
                    what = f"{qtype} {name} {kind} n={n} zp={'yes' if z is not None else 'no'}"
                    assert_exact(got, want, "quantize " + what, block or None)
                    assert_exact(y, ref.dequantize(want, scale, z, qtype=qtype, axis=axis, block_size=block),
                                 "dequantize " + what, block or None)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_quantize_ties_round_half_to_even(path):
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5], dtype=np.float32)
    with on(path):
        assert k.quantize(x, 1.0, qtype="s8").tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128]
        assert k.quantize(x, 1.0, 8, qtype="u4").tolist() == [8, 10, 10, 8, 6, 6, 15, 15, 0]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_quantize_rejects_bad_parameters(path):
    x = np.ones(8, dtype=np.float32)
    with on(path):
        for kwargs in ({"scale": 0.0}, {"scale": -0.0}, {"scale": np.inf}, {"scale": np.nan},
                       {"scale": 1.0, "zero_point": 16, "qtype": "u4"},
                       {"scale": [1.0, 2.0]}, {"scale": 1.0, "qtype": "u3"}):
            kw = {"qtype": "u8", **kwargs}
            with pytest.raises(k.KernelArgumentError):
                k.quantize(x, kw.pop("scale"), kw.pop("zero_point", None), **kw)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_quantize_negative_scale(path):
    # symmetric block RTN puts a positive extreme on code 0 through a negative scale:
    # rint(x / -0.5) + 8 with ties to even, then back through the same scale
    x = np.array([4.0, 0.25, 0.75, -0.25, -3.75, -4.25, 1.0, 0.0], dtype=np.float32)
    with on(path):
        q = k.quantize(x, np.float32(-0.5), 8, qtype="u4")
        y = k.dequantize(q, np.float32(-0.5), 8, qtype="u4")
    assert q.tolist() == [0, 8, 6, 8, 15, 15, 6, 8]
    assert y.tolist() == [4.0, 0.0, 1.0, 0.0, -3.5, -3.5, 1.0, 0.0]


# ---- 3. packing --------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("qtype", list(k.QTYPES))
def test_pack_unpack(path, qtype):
    _, _, qmin, qmax, dt = k._common.qtype_info(qtype)
    for n in SIZES + [0, 64, 65, 129]:
        q = np.random.default_rng(n).integers(qmin, qmax + 1, n).astype(dt)
        want = ref.pack(q, qtype)
        with on(path):
            got = k.pack(q, qtype)
            back = k.unpack(want, n, qtype)
        assert_exact(got, want, f"pack {qtype} n={n} (byte)")
        assert_exact(back, q, f"unpack {qtype} n={n}")


def test_pack_known_bytes():
    assert ref.pack(np.array([1, 2, 3], np.uint8), "u4").tolist() == [0x21, 0x03]
    assert ref.pack(np.array([-1, 0, 1, -2, 1], np.int8), "s2").tolist() == [0x93, 0x01]
    assert ref.pack(np.array([-8, 7], np.int8), "s4").tolist() == [0x78]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_matmulnbits(path, bits):
    rng = np.random.default_rng(bits)
    for N, K, bs in [(1, 1, 16), (3, 31, 16), (5, 32, 32), (2, 33, 32), (4, 1023, 64), (2, 4097, 128)]:
        nb = -(-K // bs)
        q = rng.integers(0, 1 << bits, (N, K)).astype(np.uint8)
        zp = rng.integers(0, 1 << bits, (N, nb)).astype(np.uint8)
        for z in (zp, None):
            want = ref.pack_matmulnbits(q, bits, bs, z)
            with on(path):
                got = k.pack_matmulnbits(q, bits, bs, z)
                back = k.unpack_matmulnbits(want, K, bits, bs)
            assert_exact(got, want, f"pack_matmulnbits bits={bits} N={N} K={K} bs={bs} (byte)",
                         bs * bits // 8)
            assert_exact(back, q, f"unpack_matmulnbits bits={bits} N={N} K={K}", bs)
        want_z = ref.pack_zero_points(zp, bits)
        with on(path):
            assert_exact(k.pack_zero_points(zp, bits), want_z, f"pack_zero_points bits={bits} nb={nb}")
            assert_exact(k.unpack_zero_points(want_z, N, nb, bits), zp, f"unpack_zero_points bits={bits}")


# ---- 4. block parameters -----------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("qtype", ["u4", "s4", "u8", "s2"])
def test_block_params(path, qtype):
    for n in SIZES:
        for kind in KINDS:
            x = data(kind, n, seed=3)
            x2 = x.reshape(1, -1) if n < 64 else x[: n // 3 * 3].reshape(3, -1)
            for sym in (False, True):
                for bs in (16, 32):
                    what = f"{qtype} sym={sym} {kind} n={n} bs={bs}"
                    ws, wz = ref.block_params_rtn(x2, bs, qtype, sym)
                    with on(path):
                        gs, gz = k.block_params_rtn(x2, bs, qtype, sym)
                    assert_exact(gs, ws, "rtn scale " + what)
                    assert_exact(gz, wz, "rtn zero point " + what)
                    ws, wz = ref.block_params_mse(x2, bs, qtype, sym, 8, 0.5)
                    with on(path):
                        gs, gz = k.block_params_mse(x2, bs, qtype, sym, 8, 0.5)
                    assert_exact(gs, ws, "mse scale " + what)
                    assert_exact(gz, wz, "mse zero point " + what)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_symmetric_block_rtn_rounds_ties_half_to_even(path):
    # block 0: extreme -8 -> scale 8/8 = 1, zp 8: x / 1 = 2.5 -> 2, 3.5 -> 4, -0.5 -> -0, 0.5 -> 0
    # block 1: extreme +4 -> scale -4/8 = -0.5: x / -0.5 = 0.25 -> -0.5 -> -0, 0.75 -> -1.5 -> -2,
    # -1.25 -> 2.5 -> 2, 1.75 -> -3.5 -> -4; the extreme 4 -> -8 -> code 0
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [-8.0, 2.5, 3.5, -0.5, 0.5, 1.5]
    x[0, 16:21] = [4.0, 0.25, 0.75, -1.25, 1.75]
    with on(path):
        s, z = k.block_params_rtn(x, 16, "u4", True)
        q = k.quantize(x, s, z, qtype="u4", axis=1, block_size=16)
        ss, zs = k.block_params_rtn(x, 16, "s4", True)
        qs = k.quantize(x, ss, zs, qtype="s4", axis=1, block_size=16)
    assert s.tolist() == [[1.0, -0.5]] and z.tolist() == [[8, 8]]
    assert (q[0, :6].astype(int) - 8).tolist() == [-8, 2, 4, 0, 0, 2]
    assert (q[0, 16:21].astype(int) - 8).tolist() == [-8, 0, -2, 2, -4]
    # signed codes: the same rule with zero point 0
    assert ss.tolist() == s.tolist() and zs.tolist() == [[0, 0]]
    assert qs[0, :6].tolist() == [-8, 2, 4, 0, 0, 2] and qs[0, 16:21].tolist() == [-8, 0, -2, 2, -4]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_block_params_rtn_is_the_quantize_kn_rule(path, bits):
    """One rule: block_params_rtn + quantize + pack_matmulnbits (quantize_matmulnbits)
    gives the fused quantize_kn's bytes, symmetric (negative scales) and asymmetric."""
    for K, N in [(100, 17), (257, 70)]:
        for kind in ("normal", "outlier", "ties", "denormal"):
            w = data(kind, K * N, seed=K).reshape(K, N).copy()
            for sym in (True, False):
                with on(path):
                    b, s, z = k.quantize_matmulnbits(w, bits, 32, sym)
                    want = k.quantize_kn(w, bits, 32, sym)
                got = (b, s.reshape(N, -1), None if z is None else z.reshape(N, -1))
                assert_kn_equal(got, want, f"{kind} K={K} N={N} bits={bits} sym={sym}", 32 * bits // 8)


def test_block_params_mse_never_worse_than_rtn():
    x = data("outlier", 4096, seed=5).reshape(32, 128)
    def err(s, z):
        q = ref.quantize(x, s, z, qtype="u4", axis=1, block_size=32)
        return ((ref.dequantize(q, s, z, qtype="u4", axis=1, block_size=32) - x) ** 2).sum(axis=1)
    e_rtn = err(*ref.block_params_rtn(x, 32, "u4", False))
    e_mse = err(*ref.block_params_mse(x, 32, "u4", False, 20, 0.5))
    assert (e_mse <= e_rtn * (1 + 1e-6)).all() and e_mse.sum() < e_rtn.sum()


# ---- 5. int8 GEMM ------------------------------------------------------------------

GEMM_SHAPES = [(1, 1, 1), (1, 31, 33), (3, 32, 1023), (33, 7, 64), (5, 33, 4097), (31, 1, 32)]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_gemm_u8s8(path):
    rng = np.random.default_rng(7)
    for M, N, K in GEMM_SHAPES:
        a = rng.integers(0, 256, (M, K)).astype(np.uint8)
        b = rng.integers(-128, 128, (N, K)).astype(np.int8)
        a[0, 0], b[0, 0] = 255, -128  # the product maddubs would saturate on
        zb = rng.integers(-128, 128, N).astype(np.int8)
        exact = ((a.astype(np.int64) - 131) @ (b.astype(np.int64) - zb[:, None].astype(np.int64)).T).astype(np.int32)
        for za, z in ((0, None), (131, zb)):
            want = ref.gemm_u8s8(a, b, za, z)
            with on(path):
                got = k.gemm_u8s8(a, b, za, z)
            assert_exact(got, want, f"gemm_u8s8 {M}x{N}x{K} za={za}")
        assert_exact(want, exact, "reference gemm_u8s8 vs int64")
        mult = (rng.random(N) * 1e-3).astype(np.float32)
        for qt, zq in (("u8", 128), ("s8", -3)):
            with on(path):
                got = k.requantize(want, mult, zq, qt)
            assert_exact(got, ref.requantize(want, mult, zq, qt), f"requantize {qt} {M}x{N}")


# ---- 6. 4-bit GEMM -----------------------------------------------------------------


def q4_case(M, N, K, bs, seed=11, zp=True):
    rng = np.random.default_rng(seed)
    nb = -(-K // bs)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.integers(0, 256, (N, nb, bs // 2)).astype(np.uint8)
    s = (rng.random(N * nb) * 0.1 + 0.01).astype(np.float32)
    z = rng.integers(0, 256, N * ((nb + 1) // 2)).astype(np.uint8) if zp else None
    return a, b, s, z


def assert_q4_close(got, want, a, b, s, z, K, bs, what):
    n, nb = b.shape[0], b.shape[1]
    q = ref.unpack_matmulnbits(b, K, 4, bs).astype(np.float32)
    zz = np.full((n, nb), 8, np.uint8) if z is None else ref.unpack_zero_points(z, n, nb, 4)
    w = (q - np.repeat(zz, bs, 1)[:, :K]) * np.repeat(s.reshape(n, nb), bs, 1)[:, :K]
    bound = Q4_RTOL * (np.abs(a) @ np.abs(w).T) + Q4_ATOL
    bad = np.abs(got - want) > bound
    if bad.any():
        m, nn = np.argwhere(bad)[0]
        pytest.fail(f"{what}: Y[{m},{nn}] = {got[m, nn]} vs {want[m, nn]} (bound {bound[m, nn]:.3g})")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_gemm_q4(path):
    for M, N, K, bs in [(1, 1, 1, 16), (1, 31, 33, 16), (2, 32, 1023, 32), (9, 5, 4097, 64),
                        (33, 3, 256, 128), (10, 130, 96, 32)]:
        for zp in (True, False):
            a, b, s, z = q4_case(M, N, K, bs, zp=zp)
            want = ref.gemm_q4(a, b, s, z, K, bs)
            with on(path):
                got = k.gemm_q4(a, b, s, z, K, bs)
            assert_q4_close(got, want, a, b, s, z, K, bs, f"gemm_q4 {M}x{N}x{K} bs={bs} zp={zp}")


# ---- ONNX / onnxruntime semantics ----------------------------------------------------


def run_ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("qtype,tp", [("s4", TensorProto.INT4), ("u4", TensorProto.UINT4)])
def test_int4_initializer_matches_onnxruntime(qtype, tp):
    """Our packed bytes as an INT4/UINT4 initializer: onnx and onnxruntime decode them
    (blocked DequantizeLinear, opset 21) exactly as our unpack + dequantize."""
    K, N, bs = 37, 6, 16  # odd element count: the last byte is padded
    _, _, qmin, qmax, _ = k._common.qtype_info(qtype)
    rng = np.random.default_rng(0)
    q = rng.integers(qmin, qmax + 1, (K, N)).astype(np.int8 if qtype == "s4" else np.uint8)
    nb = -(-K // bs)
    scale = (rng.random((nb, N)) * 0.1 + 0.01).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, (nb, N)).astype(q.dtype)
    wq = helper.make_tensor("wq", tp, [K, N], k.pack(q, qtype).tobytes(), raw=True)
    wz = helper.make_tensor("wz", tp, [nb, N], k.pack(zp, qtype).tobytes(), raw=True)
    assert np.array_equal(onnx.numpy_helper.to_array(wq).astype(np.int32), q.astype(np.int32))
    node = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["y"], axis=0, block_size=bs)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [K, N])],
                              initializer=[wq, onnx.numpy_helper.from_array(scale, "ws"), wz])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    got = run_ort(model, {})
    for path in PATHS:
        with on(path):
            ours = k.dequantize(k.unpack(k.pack(q, qtype), q.size, qtype).reshape(K, N), scale,
                                zp.astype(np.int32), qtype=qtype, axis=0, block_size=bs)
        assert_exact(ours, got, f"{qtype} DequantizeLinear vs onnxruntime on {path}")


def test_quantize_matches_onnxruntime_quantizelinear():
    x = np.concatenate([data("ties", 200), data("normal", 200), [1e9, -1e9]]).astype(np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, [x.size])],
                              initializer=[onnx.numpy_helper.from_array(np.float32(0.25), "s"),
                                           onnx.numpy_helper.from_array(np.uint8(128), "z")])
    got = run_ort(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), {"x": x})
    for path in PATHS:
        with on(path):
            assert_exact(k.quantize(x, 0.25, 128, qtype="u8"), got, f"QuantizeLinear on {path}")


def matmulnbits_model(K, N, bits, bs, b, s, z):
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(s, "scales")]
    inputs = ["A", "B", "scales"]
    if z is not None:
        inits.append(onnx.numpy_helper.from_array(z, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=K, N=N,
                            bits=bits, block_size=bs)
    graph = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bits", [4, 2, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmulnbits_matches_onnxruntime(bits, symmetric):
    """A float weight quantized and packed by us, run as com.microsoft MatMulNBits on
    onnxruntime, equals our dequantize + matmul (and gemm_q4 for bits=4)."""
    K, N, M, bs = 100, 24, 3, 32  # K not a block multiple: exercises padding
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((K, N)).astype(np.float32)
    a = rng.standard_normal((M, K)).astype(np.float32)
    outs = {}
    for path in PATHS:
        with on(path):
            outs[path] = k.quantize_matmulnbits(w, bits, bs, symmetric, method="mse", n_grid=6)
    for path, got in outs.items():
        for g, wnt in zip(got, outs[PATHS[0]]):
            assert (g is None and wnt is None) or np.array_equal(g, wnt), f"quantize_matmulnbits on {path}"
    b, s, z = outs[PATHS[0]]
    try:
        y_ort = run_ort(matmulnbits_model(K, N, bits, bs, b, s, z), {"A": a})
    except Exception as exc:  # noqa: BLE001 - an older onnxruntime without this bit width
        pytest.skip(f"onnxruntime cannot run MatMulNBits bits={bits}: {exc}")
    nb = -(-K // bs)
    q = ref.unpack_matmulnbits(b, K, bits, bs).astype(np.float32)
    zz = np.full((N, nb), 1 << (bits - 1), np.uint8) if z is None else ref.unpack_zero_points(z, N, nb, bits)
    wd = (q - np.repeat(zz, bs, 1)[:, :K]) * np.repeat(s.reshape(N, nb), bs, 1)[:, :K]
    assert np.abs(wd.T - w).max() <= np.abs(w).max() / (1 << (bits - 1)) * 1.5  # sane quantization
    y_ref = a @ wd.T
    np.testing.assert_allclose(y_ort, y_ref, rtol=ORT_RTOL, atol=ORT_RTOL * np.abs(y_ref).max())
    if bits == 4:
        for path in PATHS:
            with on(path):
                y = k.gemm_q4(a, b, s, z, K, bs)
            np.testing.assert_allclose(y, y_ort, rtol=ORT_RTOL, atol=ORT_RTOL * np.abs(y_ref).max(),
                                       err_msg=f"gemm_q4 vs onnxruntime on {path}")


# ---- fused RTN: W[K, N] -> MatMulNBits ---------------------------------------------

# K not a multiple of any block, N = 1, N past whole 64- and 16-column strips (vector
# paths plus their scalar tail), K shorter than one block.
KN_SHAPES = [(1, 1), (33, 1), (100, 17), (257, 70), (512, 130), (10, 64)]
KN_BLOCKS = [16, 32, 64, 128, 256]


def kn_weight(kind: str, K: int, N: int) -> np.ndarray:
    w = data(kind, K * N, seed=K).reshape(K, N).copy()
    if kind == "normal" and K >= 16:
        w[:16, 0] = 0.0  # an all-zero block beside non-zero ones
    return w


def assert_kn_equal(got, want, what: str, block_bytes: int) -> None:
    assert_exact(got[0], want[0], f"{what} B (byte)", block=block_bytes)
    assert_exact(got[1], want[1], f"{what} scales", block=1)
    if want[2] is None:
        assert got[2] is None, f"{what}: symmetric output has zero points"
    else:
        assert_exact(got[2], want[2], f"{what} packed zero points")


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_kn_matches_twin(path, bits):
    for K, N in KN_SHAPES:
        for kind in KINDS:
            w = kn_weight(kind, K, N)
            for bs in KN_BLOCKS:
                for sym in (True, False):
                    want = ref.quantize_kn(w, bits, bs, sym)
                    with on(path):
                        got = k.quantize_kn(w, bits, bs, sym)
                    assert_kn_equal(got, want, f"quantize_kn {kind} K={K} N={N} bits={bits} bs={bs} sym={sym}",
                                    bs * bits // 8)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_quantize_kn_reads_a_misaligned_weight_in_place(path, offset):
    """A weight mapped out of a protobuf (qtool.mapped) sits at any byte offset: the kernel
    reads it where it is and gives the aligned weight's bytes."""
    w = kn_weight("normal", 257, 83)
    raw = np.zeros(w.nbytes + 4, np.uint8)
    raw[offset:offset + w.nbytes] = w.view(np.uint8).reshape(-1)
    shifted = np.frombuffer(raw.data, np.float32, count=w.size, offset=offset).reshape(w.shape)
    assert not shifted.flags.aligned
    for sym in (True, False):
        want = ref.quantize_kn(w, 4, 32, sym)
        with on(path):
            got = k.quantize_kn(shifted, 4, 32, sym)
        assert_kn_equal(got, want, f"offset {offset} sym={sym}", 16)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_kn_is_the_weight_only_rtn_rule(bits):
    """The twin equals blockwise.rtn on W^T packed by matmulnbits_tensors: the codes and
    (signed, symmetric) scales every other weight-only path produces."""
    from qtool.quant import blockwise, formats

    for K, N in KN_SHAPES:
        for kind in ("normal", "outlier", "ties", "denormal"):
            w = kn_weight(kind, K, N)
            for bs in (16, 32, 128):
                for sym in (True, False):
                    t = formats.matmulnbits_tensors(blockwise.rtn(w.T, bits, bs, sym))
                    want = (t.b, t.scales, None if t.zero_points is None else t.zero_points.reshape(N, -1))
                    assert_kn_equal(ref.quantize_kn(w, bits, bs, sym), want,
                                    f"rtn rule {kind} K={K} N={N} bits={bits} bs={bs} sym={sym}", bs * bits // 8)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_quantize_kn_known_bytes_and_ties(path):
    # one column, K = 20 with blocks of 16: the second block is padded with its zero point
    w = np.zeros((20, 1), np.float32)
    w[:8, 0] = [8.0, 0.5, 1.5, 2.5, -0.5, -1.5, -8.0, 3.0]  # symmetric: m = 8, scale = -1
    w[16:, 0] = [1.0, 2.0, 3.0, 4.0]  # asymmetric block 1: lo 0, hi 4, scale 4/15
    with on(path):
        b, s, z = k.quantize_kn(w, 4, 16, True)
        ba, sa, za = k.quantize_kn(w, 4, 16, False)
    assert s.tolist() == [[-1.0, -0.5]] and z is None
    # codes rint(x / -1) + 8: 8 -> 0, .5 -> -0 -> 8, 1.5 -> -2 -> 6, 2.5 -> -2 -> 6,
    # -.5 -> 8, -1.5 -> 10, -8 -> 16 -> 15 (clamped), 3 -> 5; then zeros -> 8
    assert b[0, 0, :4].tolist() == [0x80, 0x66, 0xA8, 0x5F]
    assert b[0, 0, 4:].tolist() == [0x88] * 4
    # block 1: 1..4 / -0.5 -> -2, -4, -6, -8 (+8) -> 6, 4, 2, 0; 12 padded rows -> 8
    assert b[0, 1].tolist() == [0x46, 0x02] + [0x88] * 6
    assert sa[0, 1] == np.float32(4.0 / 15) and za.shape == (1, 1)
    # block 0 range [-8, 8]: scale float32(16/15), zero point rint(8 / scale) = rint(7.4999996) = 7
    assert sa[0, 0] == np.float32(16 / 15) and za[0, 0] & 0xF == 7
    assert za[0, 0] >> 4 == 0  # block 1 range [0, 4]: zero point 0, padding codes 0
    assert ba[0, 1, 2:].tolist() == [0x00] * 6


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_kn_nonfinite_and_bad_arguments(path, bad):
    w = data("normal", 70 * 33).reshape(70, 33)
    w[41, 20] = bad
    with on(path), pytest.raises(k.NonFiniteError) as info:
        k.quantize_kn(w, 4, 32, True)
    assert info.value.index == 41 * 33 + 20
    ok = data("normal", 64).reshape(32, 2)
    with on(path):
        for args in [(ok, 3, 32, True), (ok, 4, 24, True), (ok, 4, 512, True), (ok.astype(np.float64), 4, 32, True),
                     (ok[:0], 4, 32, True), (ok.reshape(-1), 4, 32, True)]:
            with pytest.raises(k.KernelArgumentError):
                k.quantize_kn(*args)
