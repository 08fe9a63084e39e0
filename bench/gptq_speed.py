"""GPTQ and AWQ speed before/after on SmolLM2-135M, with perplexity (the same run).

    python bench/gptq_speed.py --before /path/to/checkout-of-main   # writes bench/results/gptq_speed.md

"before" is another checkout of qtool (a git worktree of the commit to compare against, with
its native kernels built); "after" is this tree. Each conversion runs in its own process
(bench/convert_lowbit.py's worker: statistics over the 32 calibration windows, quantize,
save), then perplexity on the 40 eval windows (other documents). Rounds alternate
before/after so that load from other jobs on the machine hits both; wall time and CPU
seconds (user + sys of the process) are reported, and the speed-up is taken within a round.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results" / "gptq_speed.md"


def main() -> None:
    import convert_lowbit as cl
    import zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="checkout of the code to compare against")
    parser.add_argument("--algorithms", nargs="*", default=["gptq", "awq"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    name = "smollm2"
    src, calib = str(zoo.model_path(name)), str(zoo.data_dir(name, "calib"))
    cl.WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for rnd in range(1, args.rounds + 1):
        for alg in args.algorithms:
            pair = {}
            for label, root in (("before", str(Path(args.before).resolve())), ("after", "")):
                dst = str(cl.WORK / f"smol_speed_{alg}_{label}.onnx")
                conv = cl.spawn("qtool", src=src, dst=dst, bits=4, block=args.block, algorithm=alg, level=4,
                                symmetric=True, calib=calib, external=False, root=root)
                ppl = cl.spawn("ppl", name=name, path=dst) if "error" not in conv else {}
                pair[label] = (conv, ppl)
            rows.append((rnd, alg, pair))
    fp32 = cl.spawn("ppl", name=name, path=src).get("perplexity")
    lines = [
        "# GPTQ / AWQ speed on SmolLM2-135M: before and after (bench/gptq_speed.py)",
        "",
        (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs while it ran (wall times are noisy; "
         f"CPU s is user + sys of the conversion process), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
         f"4-bit symmetric, block {args.block}, accuracy level 4; statistics from the 32 calibration windows, "
         f"perplexity on the 40 eval windows (fp32: {fp32 if fp32 is None else f'{fp32:.2f}'}). "
         f"before = `{args.before}`, after = this tree."),
        "",
        "| round | algorithm | before s (CPU s) | after s (CPU s) | speed-up wall (CPU) | before stats / quantize s "
        "| after stats / quantize s | perplexity before | perplexity after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rnd, alg, pair in rows:
        (cb, pb), (ca, pa) = pair["before"], pair["after"]
        if "error" in cb or "error" in ca:
            lines.append(f"| {rnd} | {alg} | {cb.get('error', '')} | {ca.get('error', '')} | | | | | |")
            continue
        lines.append(
            f"| {rnd} | {alg} | {cb['seconds']:.1f} ({cb['cpu_s']:.1f}) | {ca['seconds']:.1f} ({ca['cpu_s']:.1f}) | "
            f"{cb['seconds'] / ca['seconds']:.1f}x ({cb['cpu_s'] / ca['cpu_s']:.1f}x) | "
            f"{cb['stats_s']:.1f} / {cb['quantize_s']:.1f} | {ca['stats_s']:.1f} / {ca['quantize_s']:.1f} | "
            f"{pb.get('perplexity', float('nan')):.3f} | {pa.get('perplexity', float('nan')):.3f} |")
    notes = [f"- {alg} {label}: " + "; ".join(n for n in pair[label][0].get("notes", []) if "error" in n or "MSE" in n)
             for _, alg, pair in rows for label in ("before", "after")]
    text = "\n".join(lines + ["", "Notes reported by the pass:", ""] + notes) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
