"""kernels.gptq_rows (C: qt_gptq_rows) held to its numpy twin reference.gptq_rows bit for
bit on every path, the twin to the formula worked by hand, and gptq() on the C kernel held
to gptq() on the blocked numpy fallback."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import qtool.kernels as k
from qtool.kernels import KernelArgumentError, NonFiniteError
from qtool.kernels import reference as ref
from qtool.quant import blockwise
from qtool.quant import gptq as gptq_module
from qtool.quant.blockwise import ActivationStats

PATHS = [("numpy", None)] + [("native", isa) for isa in k.isa_paths()]
if k.native_available() and not k.isa_paths():  # QTOOL_NATIVE=0: the C paths still exist
    with k.use_backend("native"):
        PATHS += [("native", isa) for isa in k.isa_paths()]
PATH_IDS = [b if isa is None else isa for b, isa in PATHS]


@contextlib.contextmanager
def on(path):
    backend, isa = path
    with k.use_backend(backend), (k.use_isa(isa) if isa else contextlib.nullcontext()):
        yield


def _factor(k_cols: int, rng, permute: bool) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((3 * k_cols, k_cols)) * rng.uniform(0.1, 3.0, k_cols)
    h = x.T @ x / len(x)
    perm = rng.permutation(k_cols) if permute else np.arange(k_cols)
    return gptq_module.gptq_factor(h[np.ix_(perm, perm)], 0.01, False)[1], perm


# rows not a multiple of the C tile (32), K not a multiple of the panel (16), blocks that
# do not divide K, 3-bit codes, and dynamic blocks that are not a multiple of the panel
CASES = [
    # rows, K, block, bits, symmetric, dynamic
    (37, 100, 16, 4, True, False),
    (33, 129, 32, 4, False, False),
    (5, 70, 64, 3, False, False),
    (40, 96, 32, 2, True, False),
    (9, 300, 128, 8, False, False),
    (64, 256, 128, 4, True, True),
    (11, 90, 24, 4, False, True),
    (3, 40, 8, 4, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_gptq_rows_every_path_equals_the_twin_bit_for_bit(case):
    rows, kc, block, bits, symmetric, dynamic = case
    rng = np.random.default_rng(rows * kc)
    w = rng.standard_normal((rows, kc)).astype(np.float32) * np.float32(0.1)
    u, perm = _factor(kc, rng, permute=not dynamic)
    nb = -(-kc // block)
    s0 = (rng.uniform(0.005, 0.05, (rows, nb)) * rng.choice([-1, 1], (rows, nb))).astype(np.float32)
    z0 = None if symmetric else rng.integers(0, 1 << bits, (rows, nb)).astype(np.uint8)
    want_s, want_z = s0.copy(), None if z0 is None else z0.copy()
    want = ref.gptq_rows(w, u, perm, block, bits, symmetric, dynamic, want_s, want_z)
    assert want.max() <= (1 << bits) - 1
    for path in PATHS:
        s, z = s0.copy(), None if z0 is None else z0.copy()
        with on(path):
            got = k.gptq_rows(w, u, perm, block, bits, symmetric, dynamic, s, z)
        assert got.tobytes() == want.tobytes(), f"{path}: codes differ from the twin"
        assert s.tobytes() == want_s.tobytes(), f"{path}: scales differ from the twin"
        if z0 is not None:
            assert z.tobytes() == want_z.tobytes(), f"{path}: zero points differ from the twin"


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_gptq_rows_worked_example(path):
    """Two columns, scale 0.25, z = 8: column 0 is 0.625 / 0.25 = 2.5, a tie, rounded to
    even (2 -> code 10); its error 0.125 / u00 = 0.0625 times u01 = 4 moves column 1 from
    0.2 to -0.05, which rounds to code 8 where RTN gives 9. With the columns swapped (cols
    [1, 0]) column 1 goes first (0.8 -> code 9) and pushes (0.2 - 0.25) / 2 * 4 = -0.1 onto
    column 0: 0.725 / 0.25 = 2.9 -> code 11."""
    u = np.array([[2.0, 4.0], [0.0, 1.0]], np.float32)
    w = np.array([[0.625, 0.2]], np.float32)
    with on(path):
        s = np.full((1, 1), 0.25, np.float32)
        assert k.gptq_rows(w, u, [0, 1], 2, 4, True, False, s).tolist() == [[10, 8]]
        assert k.gptq_rows(w, u, [1, 0], 2, 4, True, False, s).tolist() == [[11, 9]]
        # dynamic: the block's scale comes from the row itself, -0.625 / 8
        s = np.zeros((1, 1), np.float32)
        assert k.gptq_rows(w, u, [0, 1], 2, 4, True, True, s)[0, 0] == 0
        assert s[0, 0] == np.float32(-0.625 / 8)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_gptq_rows_rejects_bad_arguments_on_every_path(path):
    rng = np.random.default_rng(1)
    u, perm = _factor(20, rng, permute=True)
    w = rng.standard_normal((4, 20)).astype(np.float32)
    s = np.full((4, 2), 0.1, np.float32)
    z = np.full((4, 2), 8, np.uint8)
    bad = [
        dict(cols=np.r_[perm[:-1], perm[0]]),  # not a permutation
        dict(dynamic=True),  # dynamic needs the identity order
        dict(u=u - np.diag(np.diag(u))),  # zero diagonal
        dict(symmetric=False),  # asymmetric without zero points
        dict(zero_points=z),  # symmetric with zero points
        dict(scales=s.astype(np.float64)),  # written in place: the exact dtype
        dict(scales=np.zeros((4, 2), np.float32)),
        dict(bits=1),
    ]
    with on(path):
        for change in bad:
            kw = dict(w=w, u=u, cols=perm, block_size=16, bits=4, symmetric=True, dynamic=False,
                      scales=s.copy(), zero_points=None)
            kw.update(change)
            with pytest.raises(KernelArgumentError):
                k.gptq_rows(**kw)
        w_nan = w.copy()
        w_nan[2, 7] = np.nan
        with pytest.raises(NonFiniteError) as err:
            k.gptq_rows(w_nan, u, perm, 16, 4, True, False, s.copy())
        assert err.value.index == 2 * 20 + 7


def _stats_case(rows, kc, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * kc, kc)).astype(np.float32) * rng.uniform(0.1, 3.0, kc).astype(np.float32)
    x[:, 3] = 0.0  # a dead input channel
    w = (rng.standard_normal((rows, kc)) * 0.05).astype(np.float32)
    return w, ActivationStats.from_activations(x)


@pytest.mark.skipif(not k.native_available(), reason="the C kernels are not built")
@pytest.mark.parametrize("act_order,symmetric", [(True, True), (True, False), (False, True), (False, False)])
def test_gptq_on_the_kernel_matches_the_blocked_numpy_form(act_order, symmetric):
    """The C path (one column at a time, tiled) and the numpy fallback (BLAS lazy blocks)
    differ only in float rounding: a code flips only at a rounding boundary, by one step."""
    w, st = _stats_case(70, 160, seed=11)
    gptq_module.FACTORS.clear()
    with k.use_backend("native"):
        c = blockwise.gptq(w, 4, 32, st.hessian, symmetric, act_order=act_order)
    with k.use_backend("numpy"):
        n = blockwise.gptq(w, 4, 32, st.hessian, symmetric, act_order=act_order, lazy_block=64)
    assert np.mean(c.codes == n.codes) > 0.99
    assert np.abs(c.codes.astype(int) - n.codes.astype(int)).max() <= 1
    if act_order:  # static parameters: the same RTN rule on the same weights
        np.testing.assert_array_equal(c.scales, n.scales)
    e_c = blockwise.output_error(w, c.dequantize(), st.hessian)
    e_n = blockwise.output_error(w, n.dequantize(), st.hessian)
    assert e_c == pytest.approx(e_n, rel=0.02)
    assert e_c < blockwise.output_error(w, blockwise.rtn(w, 4, 32, symmetric).dequantize(), st.hessian)


def test_the_pass_quantizes_with_one_blas_thread(monkeypatch):
    """Tensors quantize in parallel threads; BLAS's own threads would oversubscribe the
    cores (and spin), so the pass holds BLAS to one thread meanwhile and restores it."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    import qtool.passes.weight_only as wo
    from qtool.config import Recipe

    if wo._threads() < 2:
        pytest.skip("one CPU: tensors quantize in this thread, BLAS keeps its threads")
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 64])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    before, seen = blas_threads(), []
    if not before:
        pytest.skip("threadpoolctl finds no BLAS library")
    original = wo.quantize_item

    def spy(*args, **kw):
        seen.append(blas_threads())
        return original(*args, **kw)

    monkeypatch.setattr(wo, "quantize_item", spy)
    report = wo.apply_weight_only(model, Recipe(), 4)
    assert len(seen) == 3 and all(s == [1] * len(before) for s in seen)
    assert blas_threads() == before
    assert sum(report.counts.values()) >= 3
