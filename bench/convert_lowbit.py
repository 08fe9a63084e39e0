"""Low-bit weight-only conversion side by side with onnxruntime's MatMulNBitsQuantizer.

    python bench/convert_lowbit.py                 # all parts, writes bench/results/convert_lowbit.md
    python bench/convert_lowbit.py --parts a c     # speed/memory and latency only

(a) bench/zoo.py ``decoder_0p6b`` (96 MatMuls, 2048x2048 / 2048x3200, 2.3 GB fp32 in
    external data): end-to-end wall time, CPU time and peak RSS of qtool RTN and of
    onnxruntime's ``MatMulNBitsQuantizer`` (its default RTN), block 32 and 128, each in its
    own process; plus the time to read the weights once (the physical floor).
(b) ``smollm2`` (SmolLM2-135M, perplexity on 40 x 128-token windows of real news text):
    fp32, onnxruntime RTN int4 (block 32, 128), qtool with each algorithm at 4 bits and
    3/2 bits, and file sizes. Caveat: SmolLM2's published weights were Q4_1 with blocks
    of 32, so 4-bit/32 can look lossless; block 128 and other layouts are the fair test.
(d) `qtool convert MODEL -o OUT --bits 4` from the command line (RTN, default block) against
    reading the weights once, on the decoder stack (2.3 GB of external data) and on SmolLM2
    (653 MB, weights inside the .onnx): each CLI run is its own process, timed from start to
    exit; "read once" is a process reading the weight file(s) in 64 MiB reads (the floor),
    also `onnx.load` with its external data (what a script pays to get the weights at all).
    ``--before DIR`` adds another checkout's qtool; ``--pythonpath DIR`` puts DIR first on
    the path of qtool's processes (pyproject's ml_dtypes pin, installed with pip --target).
(c) latency of the decoder stack (one token and 32 tokens, 2 threads, onnxruntime CPU):
    fp32, dynamic int8 (onnxruntime's quantize_dynamic, as the int8 reference point),
    int4 at accuracy_level 0 and 4, block 32 and 128.

The machine is shared while this runs: wall times are noisy; CPU seconds (user+sys of the
worker) are reported beside them, and ratios come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results" / "convert_lowbit.md"
WORK = HERE / ".cache" / "lowbit"


def _usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_mb": r.ru_maxrss / 1024, "cpu_s": r.ru_utime + r.ru_stime}


def _size(path: Path) -> int:
    from qtool.model import model_size_bytes

    return model_size_bytes(path)


# ---- workers (each runs in its own process) ---------------------------------------------------


def work_read(src: str) -> dict:
    """Read every byte of the model's weights once (64 MiB reads into one buffer): its
    external data file, or the .onnx itself when the weights are inside it."""
    import numpy as np

    data = Path(src + ".data") if Path(src + ".data").exists() else Path(src)
    buf = np.empty(64 << 20, dtype=np.uint8)
    start, cpu = time.perf_counter(), time.process_time()
    total = 0
    with open(data, "rb", buffering=0) as f:
        while n := f.readinto(memoryview(buf)):
            total += n
    return {"seconds": time.perf_counter() - start, "bytes": total, "read_cpu_s": time.process_time() - cpu}


def work_onnx_load(src: str) -> dict:
    """onnx.load with every weight read into the protobuf (external data included)."""
    start = time.perf_counter()
    import onnx

    model = onnx.load(src)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": sum(len(t.raw_data) for t in model.graph.initializer)}


def work_qtool(src: str, dst: str, bits: int, block: int, algorithm: str, level: int, symmetric: bool,
               calib: str | None = None, external: bool = True, fmt: str = "matmulnbits") -> dict:
    start = time.perf_counter()
    from qtool._deferred import defer_unused

    defer_unused()  # the start-up `qtool convert` has (qtool.cli does this first)
    from qtool import model as qmodel
    from qtool.config import Recipe
    from qtool.passes.weight_only import apply_weight_only, collect_weight_only_stats

    t_import = time.perf_counter() - start
    verify_s = [0.0]
    verify_loads = qmodel.verify_loads

    def timed_verify(path) -> None:  # save() calls it before moving the file into place
        t = time.perf_counter()
        verify_loads(path)
        verify_s[0] += time.perf_counter() - t

    qmodel.verify_loads = timed_verify
    recipe = Recipe().override("weight_only", block_size=block, algorithm=algorithm, accuracy_level=level,
                               symmetric=symmetric, format=fmt)
    acts = None
    if calib:
        from qtool.data import Dataset, input_specs

        m0 = qmodel.load(src)
        acts = collect_weight_only_stats(src, Dataset(Path(calib), input_specs(m0)), recipe)
        del m0
    t_stats = time.perf_counter()
    model = qmodel.load(src)
    t_load = time.perf_counter()
    report = apply_weight_only(model, recipe, bits, activations=acts)
    t_quant = time.perf_counter()
    qmodel.save(model, dst, input_path=src, external_data=external)
    end = time.perf_counter()
    return {"seconds": end - start, "import_s": t_import, "stats_s": t_stats - start - t_import,
            "load_s": t_load - t_stats, "quantize_s": t_quant - t_load, "write_s": end - t_quant - verify_s[0],
            "verify_s": verify_s[0], "notes": report.notes, "counts": report.counts}


def work_ort(src: str, dst: str, block: int, level: int, symmetric: bool, external: bool = True) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    start = time.perf_counter()
    model = onnx.load(src)
    t_load = time.perf_counter() - start
    q = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=symmetric, accuracy_level=level)
    q.process()
    t_quant = time.perf_counter() - start
    q.model.save_model_to_file(dst, use_external_data_format=external)
    return {"seconds": time.perf_counter() - start, "load_s": t_load, "quantize_s": t_quant - t_load}


def work_ort_int8(src: str, dst: str) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=True)
    return {"seconds": time.perf_counter() - start}


def work_ppl(name: str, path: str) -> dict:
    import zoo

    start = time.perf_counter()
    metric = zoo.evaluate(name, path)
    return {**metric, "eval_s": time.perf_counter() - start}


def work_latency(path: str, tokens: int, runs: int) -> dict:
    import numpy as np
    import zoo

    feed = {"hidden_in": np.random.default_rng(0).standard_normal((1, tokens, 2048)).astype(np.float32)}
    return zoo.latency(path, feed, runs=runs, warmup=3, threads=2)


WORKERS = {f.__name__[5:]: f for f in (work_read, work_onnx_load, work_qtool, work_ort, work_ort_int8, work_ppl,
                                        work_latency)}


def spawn(kind: str, **kw) -> dict:
    """Run one worker in a fresh process; return its result plus wall time, CPU time and peak RSS."""
    if "dst" in kw:  # onnxruntime appends to an existing .data file: start from nothing
        for stale in (Path(kw["dst"]), Path(kw["dst"] + ".data")):
            stale.unlink(missing_ok=True)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "_worker", kind, json.dumps(kw)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    wall = time.perf_counter() - start
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": wall}
    result = json.loads(lines[-1])
    result["process_wall_s"] = wall
    if "dst" in kw:  # measured here, so the worker's wall time is the conversion alone
        result["bytes"] = _size(Path(kw["dst"]))
    print(f"  {kind} {kw.get('algorithm', '')} {kw.get('block', '')}: {json.dumps({k: v for k, v in result.items() if k not in ('notes', 'counts')})[:240]}",
          file=sys.stderr, flush=True)
    return result


# ---- parts -------------------------------------------------------------------------------------


def part_a(lines: list[str], repeat: int = 2) -> dict:
    """qtool and onnxruntime interleaved, ``repeat`` rounds; one table per round."""
    import zoo

    src = str(zoo.model_path("decoder_0p6b"))
    WORK.mkdir(parents=True, exist_ok=True)
    spawn("read", src=src)  # warm the page cache
    outs = {}
    lines += [
        "## (a) Speed and memory: synthetic 0.6 B decoder stack (2.3 GB fp32, external data)",
        "",
        ("qtool: `load` (lazy, memory-mapped) -> `apply_weight_only` (4-bit symmetric RTN, accuracy level 4, the "
         "fused native kernel straight from W[K, N] to MatMulNBits bytes) -> `save` (external data, then onnxruntime "
         "loads the result once as a check). onnxruntime: `onnx.load` -> `MatMulNBitsQuantizer(block_size, "
         "is_symmetric=True, accuracy_level=4).process()` -> `save_model_to_file(use_external_data_format=True)`. "
         "Each configuration runs in its own process; wall time is that process's, from start to exit (interpreter "
         "and imports included); CPU s = user + sys of the process; peak RSS its ru_maxrss. The rounds interleave "
         "the tools, so a ratio is taken within one round. Targets: >= 4x faster, peak < 1.2 GB, within 3x of reading "
         "the weights once."),
        "",
    ]
    for rnd in range(1, repeat + 1):
        read = spawn("read", src=src)
        rows = []
        for block in (32, 128):
            dst = str(WORK / f"dec_qtool_b{block}.onnx")
            load0 = os.getloadavg()[0]
            q = spawn("qtool", src=src, dst=dst, bits=4, block=block, algorithm="rtn", level=4, symmetric=True)
            o = spawn("ort", src=src, dst=str(WORK / f"dec_ort_b{block}.onnx"), block=block, level=4, symmetric=True)
            outs[block] = dst
            rows.append((block, q, o, load0))
        lines += [
            (f"Round {rnd}: read-once floor (warm page cache, 64 MiB reads) **{read['seconds']:.2f} s** "
             f"({read['bytes'] / read['seconds'] / 1e9:.1f} GB/s); 1-minute load average before each qtool run: "
             f"{', '.join(f'{r[3]:.1f}' for r in rows)}."),
            "",
            "| block | tool | wall s | CPU s | peak RSS MB | output MB | qtool speed-up (wall, CPU) | x read-once |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for block, q, o, _ in rows:
            if "error" in q or "error" in o:
                lines.append(f"| {block} | error | {q.get('error', '')} {o.get('error', '')} | | | | | |")
                continue
            speed = o["process_wall_s"] / q["process_wall_s"]
            lines.append(f"| {block} | onnxruntime MatMulNBitsQuantizer (RTN) | {o['process_wall_s']:.2f} | {o['cpu_s']:.1f} | "
                         f"{o['peak_mb']:.0f} | {o['bytes'] / 1e6:.0f} | | {o['process_wall_s'] / read['seconds']:.1f} |")
            lines.append(f"| {block} | qtool rtn | {q['process_wall_s']:.2f} | {q['cpu_s']:.1f} | {q['peak_mb']:.0f} | "
                         f"{q['bytes'] / 1e6:.0f} | **{speed:.1f}x** ({o['cpu_s'] / q['cpu_s']:.1f}x) | "
                         f"{q['process_wall_s'] / read['seconds']:.1f} |")
        phases = [(block, q) for block, q, _, _ in rows if "error" not in q]
        lines += ["", "qtool phases (wall s): " + "; ".join(
            f"block {b}: interpreter start and exit {q['process_wall_s'] - q['seconds']:.2f}, imports {q['import_s']:.2f}, "
            f"load {q['load_s']:.2f}, quantize {q['quantize_s']:.2f}, write {q['write_s']:.2f}, "
            f"onnxruntime check {q['verify_s']:.2f}" for b, q in phases) + ".", ""]
    return outs


def part_b(lines: list[str], only: list[str] | None = None) -> None:
    import zoo

    name = "smollm2"
    src = str(zoo.model_path(name))
    calib = str(zoo.data_dir(name, "calib"))
    WORK.mkdir(parents=True, exist_ok=True)
    configs = [("fp32", None)]
    configs += [(f"onnxruntime rtn int4 b{b}", ("ort", {"block": b, "level": 4, "symmetric": True})) for b in (32, 128)]
    for b in (128, 32):
        for alg in ("rtn", "mse", "hqq", "gptq", "awq"):
            if b == 32 and alg in ("gptq", "awq"):
                continue
            configs.append((f"qtool {alg} int4 b{b}", ("qtool", {"bits": 4, "block": b, "algorithm": alg})))
    configs.append(("qtool mse int4 b128 asym", ("qtool", {"bits": 4, "block": 128, "algorithm": "mse", "symmetric": False})))
    configs.append(("qtool hqq int4 b128 asym", ("qtool", {"bits": 4, "block": 128, "algorithm": "hqq", "symmetric": False})))
    for bits in (3, 2):
        for alg in ("mse", "hqq"):
            configs.append((f"qtool {alg} int{bits} b32 asym", ("qtool", {"bits": bits, "block": 32, "algorithm": alg, "symmetric": False})))
    configs.append(("qtool rtn int8 b128", ("qtool", {"bits": 8, "block": 128, "algorithm": "rtn"})))
    if only:  # fp32 stays: every increase is measured against it
        configs = [c for c in configs if c[0] == "fp32" or any(o in c[0] for o in only)]
    # the slow data-aware conversions last, so a long run has the rest first
    configs.sort(key=lambda c: any(a in c[0] for a in ("gptq", "awq")))
    results = []
    for label, cfg in configs:
        if cfg is None:
            path, conv = src, {"bytes": _size(Path(src)), "process_wall_s": 0.0}
        else:
            kind, kw = cfg
            path = str(WORK / f"smol_{label.replace(' ', '_')}.onnx")
            if kind == "ort":
                conv = spawn("ort", src=src, dst=path, external=False, **kw)
            else:
                kw = {"level": 4, "symmetric": True, **kw}
                if kw["algorithm"] in ("gptq", "awq"):
                    kw["calib"] = calib
                conv = spawn("qtool", src=src, dst=path, external=False, **kw)
        if "error" in conv:
            results.append((label, conv, {"error": ""}))
            continue
        ppl = spawn("ppl", name=name, path=path)
        results.append((label, conv, ppl))
    base = results[0][2].get("perplexity")
    ort128 = next((p.get("perplexity") for lab, _, p in results if lab == "onnxruntime rtn int4 b128"), None)
    lines += [
        "## (b) Quality: SmolLM2-135M perplexity (40 windows x 128 tokens, lee_background news text)",
        "",
        ("Caveat: the published SmolLM2 weights were Q4_1 with blocks of 32, so a 4-bit/32 layout can "
        "look nearly lossless; block 128 and 2/3 bits are the fair tests. Activations for gptq/awq: "
        "the 32 calibration windows (different documents from the eval windows)."),
        "",
        "| configuration | perplexity | increase vs fp32 | file MB | convert s | notes |",
        "|---|---|---|---|---|---|",
    ]
    for label, conv, ppl in results:
        p = ppl.get("perplexity")
        if p is None:
            lines.append(f"| {label} | error: {conv.get('error') or ppl.get('error')} | | | | |")
            continue
        inc = f"{p - base:+.2f}" if base else ""
        note = "; ".join(n for n in conv.get("notes", []) if "MSE" in n or "output error" in n)
        lines.append(f"| {label} | {p:.2f} | {inc} | {conv['bytes'] / 1e6:.0f} | {conv['process_wall_s']:.1f} | {note} |")
    best = min((p.get("perplexity", 1e9), lab) for lab, _, p in results if lab.startswith("qtool") and "int4 b128" in lab)
    if base and ort128:
        lines += ["", (f"Best qtool 4-bit block-128: {best[1]} at {best[0]:.2f} (+{best[0] - base:.2f}); onnxruntime RTN block 128: "
                  f"{ort128:.2f} (+{ort128 - base:.2f}); ratio of increases {(best[0] - base) / max(ort128 - base, 1e-9):.2f} (target <= 0.5)."), ""]


def part_c(lines: list[str], outs: dict) -> None:
    import zoo

    src = str(zoo.model_path("decoder_0p6b"))
    WORK.mkdir(parents=True, exist_ok=True)
    models = {"fp32": src}
    int8 = str(WORK / "dec_int8_dynamic.onnx")
    if "error" not in spawn("ort_int8", src=src, dst=int8):
        models["int8 dynamic (onnxruntime quantize_dynamic)"] = int8
    for block in (32, 128):
        for level in (0, 4):
            dst = str(WORK / f"dec_q4_b{block}_l{level}.onnx")
            if "error" not in spawn("qtool", src=src, dst=dst, bits=4, block=block, algorithm="rtn", level=level, symmetric=True):
                models[f"int4 block {block}, accuracy_level {level}"] = dst
    lines += [
        "## (c) Decode latency: decoder stack, onnxruntime CPU provider, 2 threads",
        "",
        "| model | 1 token median ms | 32 tokens median ms | size MB |",
        "|---|---|---|---|",
    ]
    for label, path in models.items():
        one = spawn("latency", path=path, tokens=1, runs=20)
        many = spawn("latency", path=path, tokens=32, runs=10)
        lines.append(f"| {label} | {one.get('median_ms', float('nan')):.1f} | {many.get('median_ms', float('nan')):.1f} | "
                     f"{_size(Path(path)) / 1e6:.0f} |")
    lines.append("")


def run_cli(root: Path, args: list[str], extra_path: str = "") -> dict:
    """``python -m qtool ARGS`` with ``root``'s qtool, in its own process: wall, CPU, peak RSS."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "QTOOL_NATIVE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (extra_path, str(root))))}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qtool", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or ["?"])[-1][:300], "wall_s": wall}
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024}


def part_d(lines: list[str], repeat: int, before: Path | None, extra_path: str) -> None:
    """CLI 4-bit conversion vs reading the weights once, interleaved rounds, medians."""
    import statistics

    import zoo

    WORK.mkdir(parents=True, exist_ok=True)
    tools = ([("before", before, "")] if before else []) + [("qtool", ROOT, "")]
    if extra_path:
        tools.append(("qtool, ml_dtypes pinned", ROOT, extra_path))
    rows: dict[tuple[str, str], list[dict]] = {}
    loads = []
    for rnd in range(repeat):
        for name in ("decoder_0p6b", "smollm2"):
            src = str(zoo.model_path(name))
            spawn("read", src=src)  # warm the page cache
            loads.append(os.getloadavg()[0])
            rows.setdefault((name, "read once"), []).append(spawn("read", src=src))
            rows.setdefault((name, "onnx.load"), []).append(spawn("onnx_load", src=src))
            for label, root, extra in (tools if rnd % 2 == 0 else tools[::-1]):
                dst = WORK / f"cli_{name}.onnx"
                for stale in (dst, Path(str(dst) + ".data")):
                    stale.unlink(missing_ok=True)
                result = run_cli(root, ["convert", src, "-o", str(dst), "--bits", "4", "--quiet"], extra)
                if "error" not in result:
                    result["bytes"] = _size(dst)
                print(f"  cli {name} {label}: {result}", file=sys.stderr, flush=True)
                rows.setdefault((name, label), []).append(result)

    def med(name: str, label: str, key: str) -> float:
        vals = [r[key] for r in rows.get((name, label), []) if key in r]
        return statistics.median(vals) if vals else float("nan")

    lines += [
        "## (d) `qtool convert --bits 4` end to end vs reading the weights once",
        "",
        ("Each cell: the median over the rounds of one process per configuration (rounds alternate the "
         "order of the qtool variants). qtool: `python -m qtool convert MODEL -o OUT --bits 4 --quiet` "
         "(RTN, block 128, the C kernels), wall time from process start to exit, CPU = user + sys of that "
         "process, peak = its ru_maxrss. read once: 64 MiB reads of the weight file into one buffer, timed "
         "inside its process (interpreter start excluded: the strict floor). onnx.load: every weight read "
         "into the protobuf, imports included. The page cache is warm for all. "
         f"{repeat} rounds; 1-minute load average at the start of each: {', '.join(f'{x:.1f}' for x in loads)} "
         "(2 cores shared with other engineers' jobs: CPU seconds are the steadier measure)."),
        "",
        "| model | configuration | wall s | CPU s | peak RSS MB | output MB | x read once (wall) | x read once (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("decoder_0p6b", "smollm2"):
        floor, floor_cpu = med(name, "read once", "seconds"), med(name, "read once", "read_cpu_s")
        size = med(name, "read once", "bytes") / 1e6
        lines.append(f"| {name} ({size:.0f} MB) | read once | {floor:.2f} | {floor_cpu:.2f} | "
                     f"{med(name, 'read once', 'peak_mb'):.0f} | | 1.0 | 1.0 |")
        lines.append(f"| | onnx.load | {med(name, 'onnx.load', 'seconds'):.2f} | {med(name, 'onnx.load', 'cpu_s'):.2f} | "
                     f"{med(name, 'onnx.load', 'peak_mb'):.0f} | | {med(name, 'onnx.load', 'seconds') / floor:.1f} | "
                     f"{med(name, 'onnx.load', 'cpu_s') / floor_cpu:.1f} |")
        for label, _, _ in tools:
            wall, cpu = med(name, label, "wall_s"), med(name, label, "cpu_s")
            lines.append(f"| | qtool convert --bits 4 ({label}) | {wall:.2f} | {cpu:.2f} | "
                         f"{med(name, label, 'peak_mb'):.0f} | {med(name, label, 'bytes') / 1e6:.0f} | "
                         f"**{wall / floor:.1f}** | {cpu / floor_cpu:.1f} |")
    lines.append("")


def _splice(path: Path, header: list[str], lines: list[str]) -> str:
    """The results file with the sections in ``lines`` ("## (x) ...") replacing the same
    sections of the file at ``path``; sections not rerun stay as they were."""
    def sections(text: str) -> dict[str, str]:
        parts = ("\n" + text).split("\n## (")
        return {p[0]: "## (" + p for p in parts[1:]}

    old = sections(path.read_text()) if path.exists() else {}
    new = sections("\n".join(lines))
    body = [new.get(key, old.get(key)) for key in sorted(set(old) | set(new), key="adcb".find)]
    return "\n".join(header).rstrip("\n") + "\n\n" + "\n".join(b.rstrip("\n") + "\n" for b in body if b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["a", "c", "b"])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", nargs="*", default=None, help="part b: run configurations whose label contains one of these")
    parser.add_argument("--repeat", type=int, default=2, help="parts a, d: interleaved rounds")
    parser.add_argument("--before", type=Path, default=None, help="part d: another checkout's qtool, timed beside")
    parser.add_argument("--pythonpath", default="",
                        help="part d: a folder put first on qtool's path for an extra row (e.g. ml_dtypes<0.7)")
    args = parser.parse_args()
    import onnxruntime

    header = [
        "# Low-bit weight-only conversion: qtool vs onnxruntime's MatMulNBitsQuantizer",
        "",
        (f"Generated by `python bench/convert_lowbit.py --parts {' '.join(args.parts)}` on {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs while it ran), onnxruntime {onnxruntime.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Sections of parts not rerun are kept from the "
        "previous file."),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    outs = {}
    for part in args.parts:  # the file is rewritten after each part, so a long run keeps results
        if part == "a":
            outs = part_a(lines, args.repeat)
        elif part == "d":
            part_d(lines, args.repeat, args.before, args.pythonpath)
        elif part == "c":
            part_c(lines, outs)
        elif part == "b":
            part_b(lines, args.only)
        text = _splice(out, header, lines)
        out.write_text(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kw = json.loads(sys.argv[3])
        if kw.get("root"):  # another checkout's qtool (bench/gptq_speed.py's "before")
            sys.path.insert(0, kw["root"])
        kw.pop("root", None)
        os.environ.setdefault("TMPDIR", tempfile.gettempdir())
        result = WORKERS[sys.argv[2]](**kw)
        result.update(_usage())
        print(json.dumps(result, default=str))
    else:
        main()
