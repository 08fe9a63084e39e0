"""Kernel benchmark: native vs numpy vs onnxruntime, against this machine's bandwidth.

    python bench/kernels.py [--quick]

Prints a Markdown table and writes it to bench/results/kernels.md. Everything runs on
one thread (our kernels are single-threaded; onnxruntime gets intra_op_num_threads=1).
Bandwidth kernels report GB/s of bytes read + written; GEMMs report GOPS = 2*M*N*K / t.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import qtool.kernels as k

OUT = Path(__file__).resolve().parent / "results" / "kernels.md"


def best_time(fn, reps: int, budget_s: float = 3.0) -> float:
    """Fastest of up to `reps` runs (after one warm-up), stopping after budget_s."""
    fn()
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def memory_bandwidth(gb: float) -> float:
    """Single-thread read bandwidth in GB/s: numpy sum over a `gb` GB float32 array."""
    a = np.ones(int(gb * 1e9) // 4, dtype=np.float32)
    t = best_time(lambda: a.sum(), 3, budget_s=10)
    return a.nbytes / t / 1e9


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_matmulinteger(b: np.ndarray, zb: np.ndarray) -> ort.InferenceSession:
    K, N = b.shape
    node = helper.make_node("MatMulInteger", ["A", "B", "za", "zb"], ["Y"])
    graph = helper.make_graph(
        [node], "mmi", [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", N])],
        initializer=[onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(np.uint8(128), "za"),
                     onnx.numpy_helper.from_array(zb, "zb")])
    return ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def ort_matmulnbits(K, N, bs, b, s, z) -> ort.InferenceSession:
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=bs, accuracy_level=0)
    graph = helper.make_graph(
        [node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        initializer=[onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(s, "scales"),
                     onnx.numpy_helper.from_array(z, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort_session(model)


def numpy_and_native(fn, reps_native: int, reps_numpy: int) -> tuple[float, float]:
    """Fastest native and numpy times of fn, their runs interleaved (one numpy run every
    reps_native // reps_numpy native runs, after a warm-up of each) so that other work on
    the machine weighs on both alike."""
    best = {"native": float("inf"), "numpy": float("inf")}

    def run(backend: str) -> None:
        with k.use_backend(backend):
            t = time.perf_counter()
            fn()
            best[backend] = min(best[backend], time.perf_counter() - t)

    for backend in best:
        with k.use_backend(backend):
            fn()
    every = max(1, reps_native // reps_numpy)
    for i in range(reps_native):
        run("native")
        if i % every == 0:
            run("numpy")
    return best["native"], best["numpy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller arrays, fewer shapes")
    args = ap.parse_args()
    if not k.native_available():
        print("error: the native kernels are not built (pip install -e .)", file=sys.stderr)
        return 1
    n = (16 if args.quick else 64) * 2**20  # float32 elements
    load_start = os.getloadavg()[0]
    bw = memory_bandwidth(0.5 if args.quick else 2.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    codes = rng.integers(0, 16, n).astype(np.uint8)

    rows = []  # (kernel, shape, native, numpy, ort, unit, notes)
    for name, fn, nbytes in [
        ("minmax", lambda: k.minmax(x), 4 * n),
        ("histogram 2048 bins", lambda: k.histogram(x, -4.0, 4.0, np.zeros(2048, np.int64)), 4 * n),
        # calibration's grid: bins of 2^-8 from -4 (what the observers call per update)
        ("histogram_pow2 2048 bins", lambda: k.histogram_pow2(x, -8, -1024, np.zeros(2048, np.int64)),
         4 * n),
        ("quantize u8 per-tensor", lambda: k.quantize(x, 0.05, 128, qtype="u8"), 5 * n),
        ("pack u4", lambda: k.pack(codes, "u4"), n + n // 2),
    ]:
        t_nat, t_np = numpy_and_native(fn, 10, 2)
        g_nat, g_np = nbytes / t_nat / 1e9, nbytes / t_np / 1e9
        rows.append((name, f"{n // 2**20}M elems", g_nat, g_np, None, "GB/s",
                     f"{g_nat / g_np:.1f}x numpy, {100 * g_nat / bw:.0f}% of bandwidth"))

    shapes = [(1, 2048, 2048), (32, 2048, 2048)] if args.quick else \
        [(1, 2048, 2048), (32, 2048, 2048), (1, 4096, 4096), (32, 4096, 4096)]
    for M, K, N in shapes:
        ops = 2.0 * M * N * K
        a = rng.integers(0, 256, (M, K)).astype(np.uint8)
        b = rng.integers(-128, 128, (K, N)).astype(np.int8)
        zb = rng.integers(-4, 4, N).astype(np.int8)
        bt = np.ascontiguousarray(b.T)
        t_nat, t_np = numpy_and_native(lambda: k.gemm_u8s8(a, bt, 128, zb), 20, 2)
        sess = ort_matmulinteger(b, zb)
        t_ort = best_time(lambda: sess.run(None, {"A": a}), 20)
        ours = k.gemm_u8s8(a, bt, 128, zb)
        assert np.array_equal(ours, sess.run(None, {"A": a})[0]), "int8 GEMM differs from onnxruntime"
        rows.append(("gemm_u8s8", f"M={M} K={K} N={N}", ops / t_nat / 1e9, ops / t_np / 1e9,
                     ops / t_ort / 1e9, "GOPS", f"{t_ort / t_nat:.2f}x onnxruntime MatMulInteger"))

    for M, K, N in shapes:
        ops, bs = 2.0 * M * N * K, 32
        w = rng.standard_normal((K, N)).astype(np.float32)
        bq, s, z = k.quantize_matmulnbits(w, 4, bs)
        a = rng.standard_normal((M, K)).astype(np.float32)
        t_nat, t_np = numpy_and_native(lambda: k.gemm_q4(a, bq, s, z, K, bs), 20, 2)
        sess = ort_matmulnbits(K, N, bs, bq, s, z)
        t_ort = best_time(lambda: sess.run(None, {"A": a}), 20)
        y_ort = sess.run(None, {"A": a})[0]
        err = np.abs(k.gemm_q4(a, bq, s, z, K, bs) - y_ort).max() / np.abs(y_ort).max()
        rows.append(("gemm_q4 (bs=32)", f"M={M} K={K} N={N}", ops / t_nat / 1e9, ops / t_np / 1e9,
                     ops / t_ort / 1e9, "GOPS",
                     f"{t_ort / t_nat:.2f}x onnxruntime MatMulNBits (max rel diff {err:.1e})"))

    cpu = platform.processor() or platform.machine()
    lines = [
        "# qtool kernel benchmark",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores; native ISA paths {k.isa_paths()}; numpy {np.__version__}, "
        f"onnxruntime {ort.__version__}. One thread everywhere. Load average (1 min) at the start "
        f"{load_start:.1f}, at the end {os.getloadavg()[0]:.1f} (other work on the machine skews "
        "the numbers; native and numpy runs are interleaved so it weighs on both).",
        f"Measured single-thread memory bandwidth (numpy sum over {0.5 if args.quick else 2.0} GB): **{bw:.1f} GB/s**.",
        "",
        "| kernel | shape | native | numpy | onnxruntime | unit | notes |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name, shape, nat, npy, o, unit, note in rows:
        lines.append(f"| {name} | {shape} | {nat:.2f} | {npy:.2f} | {'' if o is None else f'{o:.2f}'} | {unit} | {note} |")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text + _kept_notes())
    return 0


NOTES_MARK = "\nNotes (by hand"


def _kept_notes() -> str:
    """The hand-written notes under the table of the previous results file, kept as they are."""
    if not OUT.exists():
        return ""
    old = OUT.read_text()
    at = old.find(NOTES_MARK)
    return old[at:] if at >= 0 else ""


if __name__ == "__main__":
    sys.exit(main())
