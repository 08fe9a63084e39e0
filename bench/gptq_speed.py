"""GPTQ and AWQ speed before/after on SmolLM2-135M, with perplexity (one run, alternating).

    python bench/gptq_speed.py --before /path/to/checkout-of-main [--parts layers model e2e]

"before" is another checkout of qtool (a git worktree of the commit to compare against, with
its native kernels built); "after" is this tree. Every measurement runs in its own process,
before and after alternating within a round so that load from other jobs hits both.

- ``layers``: every distinct weight shape of the model (decoder layers 0, 15 and 29: q 576x576,
  k/v 192x576, o 576x576, gate/up 1536x576, down 576x1536; and lm_head 49152x576) quantized
  by ``quantize_weight`` (the pass's per-tensor call: the algorithm, its RTN comparison and
  output errors) from statistics of the 32 calibration windows, in CPU seconds of one
  process with OPENBLAS_NUM_THREADS=1 (the algorithm's own work, which load inflates far
  less than wall time). Model mix = 10 x (the three layers) + lm_head (30 layers).
- ``model``: the whole model's quantize phase (``apply_weight_only`` as ``qtool convert``
  runs it, default threads) from one shared set of statistics, then perplexity of the saved
  model on the 40 eval windows (other documents), next to fp32 and plain RTN.
- ``e2e``: ``qtool convert``'s whole work (statistics, quantize, save) per algorithm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results" / "gptq_speed.md"
LAYERS = (0, 15, 29)


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- workers (each in its own process, with ``root``'s qtool first on sys.path) -----------------


def work_stats(out: str) -> dict:
    """Statistics of the calibration split for every MatMul input; saved for the other workers."""
    import numpy as np
    import zoo

    from qtool import model as qmodel
    from qtool.config import Recipe
    from qtool.data import Dataset, input_specs
    from qtool.passes import PassReport
    from qtool.passes.weight_only import collect_weight_only_stats
    from qtool.passes.weight_only.items import find_items
    from qtool.passes.weight_only.quantize import weight_rows

    src = str(zoo.model_path("smollm2"))
    recipe = Recipe().override("weight_only", block_size=128, algorithm="gptq", symmetric=True)
    m = qmodel.load(src)
    acts = collect_weight_only_stats(src, Dataset(zoo.data_dir("smollm2", "calib"), input_specs(m)), recipe)
    items = [it for it in find_items(m, recipe, 4, PassReport("weight_only")) if it.kind == "matmul"]
    keep = [it for it in items if any(f"/layers.{n}/" in it.node.name for n in LAYERS)] + items[-1:]
    arrays = {"names": np.array(list(acts)), "tensors": np.array([it.node.name for it in keep]),
              "inputs": np.array([it.node.inputs[0].name for it in keep])}
    for i, name in enumerate(acts):
        arrays[f"xtx{i}"], arrays[f"abs{i}"], arrays[f"n{i}"] = acts[name].xtx, acts[name].abs_sum, acts[name].count
    for j, it in enumerate(keep):
        arrays[f"w{j}"] = np.ascontiguousarray(weight_rows(it), dtype=np.float32)
    np.savez(out, **arrays)
    return {"tensors": len(keep)}


def _load_stats(path: str):
    import numpy as np

    from qtool.quant.blockwise import ActivationStats

    d = np.load(path)
    acts = {str(n): ActivationStats(d[f"xtx{i}"], d[f"abs{i}"], int(d[f"n{i}"])) for i, n in enumerate(d["names"])}
    return d, acts


def work_layers(stats: str, algorithm: str, codes: str) -> dict:
    """quantize_weight on each kept tensor in model order (q/k/v and gate/up share a factor)."""
    import numpy as np

    from qtool.quant.blockwise import quantize_weight

    d, acts = _load_stats(stats)
    rows, out = [], {}
    for j, (name, inp) in enumerate(zip(d["tensors"], d["inputs"])):
        w = d[f"w{j}"]
        c0 = _cpu()
        o = quantize_weight(w, 4, 128, True, algorithm, acts[str(inp)])
        rows.append({"tensor": str(name), "shape": list(w.shape), "cpu_s": _cpu() - c0,
                     "output_error": o.output_error, "rtn_output_error": o.rtn_output_error})
        out[f"c{j}"] = o.bq.codes
        out[f"s{j}"] = o.input_scale if o.input_scale is not None else np.zeros(0, np.float32)
    np.savez(codes, **out)
    return {"rows": rows}


def work_model(stats: str, algorithm: str, dst: str) -> dict:
    """apply_weight_only on the whole model from the shared statistics, then save."""
    import zoo

    from qtool import model as qmodel
    from qtool.config import Recipe
    from qtool.passes.weight_only import apply_weight_only

    _, acts = _load_stats(stats)
    src = str(zoo.model_path("smollm2"))
    recipe = Recipe().override("weight_only", block_size=128, algorithm=algorithm, accuracy_level=4,
                               symmetric=True, format="matmulnbits")
    model = qmodel.load(src)
    c0, t0 = _cpu(), time.perf_counter()
    report = apply_weight_only(model, recipe, 4, activations=acts if algorithm != "rtn" else None)
    c1, t1 = _cpu(), time.perf_counter()
    qmodel.save(model, dst, input_path=src, external_data=False)
    return {"quant_cpu_s": c1 - c0, "quant_s": t1 - t0,
            "notes": [n for n in report.notes if "error" in n or "MSE" in n]}


def work_ppl(path: str) -> dict:
    import zoo

    return zoo.evaluate("smollm2", path)


WORKERS = {f.__name__[5:]: f for f in (work_stats, work_layers, work_model, work_ppl)}


def spawn(kind: str, root: str = "", env: dict | None = None, **kw) -> dict:
    """One worker in a fresh process; its result plus wall time and the process's CPU s."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "_worker", kind, root, json.dumps(kw)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(lines[-1])
    result["process_wall_s"] = time.perf_counter() - start
    print(f"  {kind} {root or 'after'} {kw.get('algorithm', '')}: "
          f"{ {k: v for k, v in result.items() if k in ('quant_cpu_s', 'quant_s', 'perplexity', 'process_wall_s', 'cpu_s')} }",
          file=sys.stderr, flush=True)
    return result


# ---- parts ------------------------------------------------------------------------------------


def _shape_key(shape) -> str:
    return f"{shape[0]} x {shape[1]}"


def part_layers(lines: list[str], before: str, stats: str, rounds: int, work: Path,
                algorithms: tuple[str, ...] = ("gptq", "awq")) -> None:
    import numpy as np

    single = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for _rnd in range(rounds):
        for alg in algorithms:
            for label, root in (("before", before), ("after", "")):
                codes = str(work / f"layers_{alg}_{label}.npz")
                runs.setdefault((alg, label), []).append(spawn("layers", root, single, stats=stats, algorithm=alg, codes=codes))
    lines += ["## Every distinct shape, per tensor (quantize_weight, CPU s, OPENBLAS_NUM_THREADS=1)", "",
              f"Median of {rounds} round(s), before/after alternating. Tensors of decoder layers {', '.join(map(str, LAYERS))} "
              "and lm_head, real SmolLM2 weights, statistics of the 32 calibration windows.", ""]
    for alg in algorithms:
        b, a = runs[(alg, "before")], runs[(alg, "after")]
        if any("error" in r for r in b + a):
            lines += [f"{alg}: " + "; ".join(r.get("error", "") for r in b + a if "error" in r), ""]
            continue
        med = lambda rs, i: float(np.median([r["rows"][i]["cpu_s"] for r in rs]))  # noqa: E731
        per_shape: dict[str, list[float]] = {}
        layer_b = layer_a = head_b = head_a = 0.0
        n = len(b[0]["rows"])
        for i in range(n):
            row = b[0]["rows"][i]
            mb, ma = med(b, i), med(a, i)
            per_shape.setdefault(_shape_key(row["shape"]), [0.0, 0.0, 0])
            ps = per_shape[_shape_key(row["shape"])]
            ps[0], ps[1], ps[2] = ps[0] + mb, ps[1] + ma, ps[2] + 1
            if i == n - 1:
                head_b, head_a = mb, ma
            else:
                layer_b, layer_a = layer_b + mb, layer_a + ma
        same = _codes_agreement(work, alg, n)
        lines += [f"| {alg}: shape [rows, K] | tensors | before CPU s (mean) | after CPU s (mean) | speed-up |",
                  "|---|---:|---:|---:|---:|"]
        for key, (sb, sa, cnt) in per_shape.items():
            lines.append(f"| {key} | {cnt} | {sb / cnt:.4f} | {sa / cnt:.4f} | {sb / sa:.1f}x |")
        est_b = 10 * layer_b + head_b
        est_a = 10 * layer_a + head_a
        lines += [f"| 3 decoder layers | 21 | {layer_b:.3f} | {layer_a:.3f} | {layer_b / layer_a:.1f}x |",
                  f"| lm_head | 1 | {head_b:.3f} | {head_a:.3f} | {head_b / head_a:.1f}x |",
                  f"| **model mix (estimate: 10 x 3 layers + lm_head)** | 211 | **{est_b:.1f}** | **{est_a:.1f}** | **{est_b / est_a:.1f}x** |",
                  "", f"{alg} codes after vs before: {same}", ""]
        errs = [(r["output_error"], r2["output_error"]) for r, r2 in zip(b[0]["rows"], a[0]["rows"])]
        worst = max(abs(x - y) / max(abs(x), 1e-30) for x, y in errs)
        lines += [f"{alg} relative output errors after vs before: largest relative difference {worst:.2e} "
                  f"(lm_head {errs[-1][0]:.6f} before, {errs[-1][1]:.6f} after)", ""]


def _codes_agreement(work: Path, alg: str, n: int) -> str:
    import numpy as np

    b, a = np.load(work / f"layers_{alg}_before.npz"), np.load(work / f"layers_{alg}_after.npz")
    total = equal = 0
    worst = 0
    scales_same = True
    for j in range(n):
        cb, ca = b[f"c{j}"].astype(int), a[f"c{j}"].astype(int)
        total += cb.size
        equal += int((cb == ca).sum())
        worst = max(worst, int(np.abs(cb - ca).max()))
        scales_same &= np.array_equal(b[f"s{j}"], a[f"s{j}"])
    out = f"{equal / total:.5%} of {total} codes equal, largest difference {worst} step(s)"
    return out + ("; AWQ activation scales identical" if alg == "awq" and scales_same else "")


def part_model(lines: list[str], before: str, stats: str, rounds: int, work: Path,
               algorithms: tuple[str, ...] = ("gptq", "awq")) -> None:
    import numpy as np

    res = {}
    for rnd in range(rounds):
        for alg in algorithms:
            for label, root in (("before", before), ("after", "")):
                dst = str(work / f"smol_{alg}_{label}.onnx")
                r = spawn("model", root, stats=stats, algorithm=alg, dst=dst)
                if rnd == rounds - 1 and "error" not in r:
                    r.update(spawn("ppl", path=dst))
                res.setdefault((alg, label), []).append(r)
    rtn = spawn("model", "", stats=stats, algorithm="rtn", dst=str(work / "smol_rtn.onnx"))
    rtn_ppl = spawn("ppl", path=str(work / "smol_rtn.onnx")).get("perplexity", float("nan"))
    import zoo

    fp32 = spawn("ppl", path=str(zoo.model_path("smollm2"))).get("perplexity", float("nan"))
    lines += ["## The whole model's quantize phase and perplexity", "",
              "apply_weight_only on all 211 MatMuls from one shared set of statistics (default threads, the machine "
              "shared), then the saved model's perplexity on the 40 eval windows. Median over rounds.", "",
              "| algorithm | before CPU s (wall s) | after CPU s (wall s) | speed-up CPU (wall) | perplexity before | perplexity after |",
              "|---|---:|---:|---:|---:|---:|"]
    for alg in algorithms:
        b, a = res[(alg, "before")], res[(alg, "after")]
        if any("error" in r for r in b + a):
            lines.append(f"| {alg} | " + "; ".join(r.get("error", "") for r in b + a if "error" in r) + " | | | | |")
            continue
        cb, ca = (float(np.median([r["quant_cpu_s"] for r in x])) for x in (b, a))
        wb, wa = (float(np.median([r["quant_s"] for r in x])) for x in (b, a))
        lines.append(f"| {alg} | {cb:.1f} ({wb:.1f}) | {ca:.1f} ({wa:.1f}) | {cb / ca:.1f}x ({wb / wa:.1f}x) | "
                     f"{b[-1].get('perplexity', float('nan')):.3f} | {a[-1].get('perplexity', float('nan')):.3f} |")
    lines += [f"| rtn (this tree) | | {rtn.get('quant_cpu_s', float('nan')):.1f} ({rtn.get('quant_s', float('nan')):.1f}) | | "
              f"{rtn_ppl:.3f} | |", "", f"fp32 perplexity: {fp32:.3f}", ""]
    for alg in algorithms:
        for label in ("before", "after"):
            notes = res[(alg, label)][-1].get("notes", [])
            lines.append(f"- {alg} {label}: " + "; ".join(notes))
    lines.append("")


def part_e2e(lines: list[str], before: str, rounds: int, block: int, algorithms: tuple[str, ...] = ("gptq", "awq")) -> None:
    import convert_lowbit as cl
    import zoo

    name = "smollm2"
    src, calib = str(zoo.model_path(name)), str(zoo.data_dir(name, "calib"))
    cl.WORK.mkdir(parents=True, exist_ok=True)
    lines += ["## End to end (statistics, quantize, save: bench/convert_lowbit.py's worker)", "",
              "| round | algorithm | before s (CPU s) | after s (CPU s) | speed-up wall (CPU) | before stats / quantize s "
              "| after stats / quantize s | load average (before, after) |", "|---|---|---|---|---|---|---|---|"]
    for rnd in range(1, rounds + 1):
        for alg in algorithms:
            pair, load = {}, {}
            for label, root in (("before", before), ("after", "")):
                load[label] = os.getloadavg()[0]
                dst = str(cl.WORK / f"smol_speed_{alg}_{label}.onnx")
                pair[label] = cl.spawn("qtool", src=src, dst=dst, bits=4, block=block, algorithm=alg, level=4,
                                       symmetric=True, calib=calib, external=False, root=root)
            cb, ca = pair["before"], pair["after"]
            if "error" in cb or "error" in ca:
                lines.append(f"| {rnd} | {alg} | {cb.get('error', '')} | {ca.get('error', '')} | | | | |")
                continue
            lines.append(
                f"| {rnd} | {alg} | {cb['seconds']:.1f} ({cb['cpu_s']:.1f}) | {ca['seconds']:.1f} ({ca['cpu_s']:.1f}) | "
                f"{cb['seconds'] / ca['seconds']:.1f}x ({cb['cpu_s'] / ca['cpu_s']:.1f}x) | "
                f"{cb['stats_s']:.1f} / {cb['quantize_s']:.1f} | {ca['stats_s']:.1f} / {ca['quantize_s']:.1f} | "
                f"{load['before']:.1f}, {load['after']:.1f} |")
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="checkout of the code to compare against")
    parser.add_argument("--parts", nargs="*", default=["layers", "model"], choices=["layers", "model", "e2e"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--block", type=int, default=128, help="block size of the e2e part")
    parser.add_argument("--algorithms", nargs="*", default=["gptq", "awq"], choices=["gptq", "awq"])
    parser.add_argument("--reuse-stats", action="store_true", help="keep the statistics file of an earlier run")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    before = str(Path(args.before).resolve())
    work = HERE / ".cache" / "gptq_speed"
    work.mkdir(parents=True, exist_ok=True)
    stats = str(work / "stats.npz")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["# GPTQ / AWQ speed on SmolLM2-135M: before and after (bench/gptq_speed.py)", "",
             f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average {load:.1f} at the start), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. 4-bit symmetric, block 128. before = `{args.before}`, "
             "after = this tree.", ""]
    if {"layers", "model"} & set(args.parts) and not (args.reuse_stats and Path(stats).exists()):
        s = spawn("stats", out=stats)
        if "error" in s:
            raise SystemExit(f"statistics failed: {s['error']}")
    if "layers" in args.parts:
        part_layers(lines, before, stats, args.rounds, work, tuple(args.algorithms))
    if "model" in args.parts:
        part_model(lines, before, stats, args.rounds, work, tuple(args.algorithms))
    if "e2e" in args.parts:
        part_e2e(lines, before, args.rounds, args.block, tuple(args.algorithms))
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        if sys.argv[3]:  # another checkout's qtool (the "before")
            sys.path.insert(0, sys.argv[3])
        result = WORKERS[sys.argv[2]](**json.loads(sys.argv[4]))
        result["cpu_s"] = _cpu()
        print(json.dumps(result, default=str))
    else:
        main()
