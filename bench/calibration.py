"""Calibration side by side: qtool vs onnxruntime's calibrators and vs plain inference.

Model: bench/zoo.py's ``resnet18_synth`` (ResNet-18-shaped CNN, 224x224, batch 1) and its
calibration samples (1024 are prepared; fewer counts take the first N). Each configuration
runs in its own process, which reports its wall time and its peak resident memory
(``ru_maxrss`` of that process), so one configuration's memory never hides another's.
Every timer starts before the tool's own imports (qtool.pipeline, onnxruntime.quantization,
onnxruntime) and stops when the ranges are computed: start-up costs count.

    python bench/calibration.py                       # writes bench/results/calibration.md
    python bench/calibration.py --samples 32 64 --methods entropy --rounds 3
    python bench/calibration.py --before ../main      # adds "qtool before": another checkout
    python bench/calibration.py --pythonpath DIR      # DIR first on the path of every child but
        # "qtool before" (which keeps the venv as it is), e.g.
        # ml_dtypes 0.6 from `pip install --target DIR --no-deps "ml_dtypes<0.7"` (pyproject's pin)

onnxruntime side: ``onnxruntime.quantization.calibrate.create_calibrator`` with the same
op types qtool quantizes in this model, ``collect_data`` over a CalibrationDataReader and
``compute_data`` (the calibration phase of ``quantize_static``; conversion not timed).
Its histogram calibrators keep every activation of a ``collect_data`` call in memory
(7.8 GB at 256 samples), so above 64 samples the reader is fed in chunks of 64 (2 GB), one
``collect_data`` per chunk (onnxruntime's own way to bound memory; histograms merge).
qtool side: ``qtool.calibrate`` (conversion not timed either).
plain: ``onnxruntime.InferenceSession`` on the model file and one ``run`` per sample, the
same files loaded the same way: the floor a calibrator that must run the model cannot beat.
"plain, no spin": the same with onnxruntime's idle threads told not to busy-wait
(``session.intra_op.allow_spinning=0``, as qtool's calibration sessions are): the lower
floor in CPU seconds, since spinning is CPU a plain run burns between its parallel sections.
"plain, 2 streams": two one-thread sessions on two threads, each running every other
sample: how qtool's calibration runs the model on 2 cores (qtool.calibration.parallel_streams),
so the floor of that way of running it.

Children run with bytecode caching on (PYTHONDONTWRITEBYTECODE dropped), as an installed
package runs: compiling qtool's sources on every start is not a cost users pay.
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
sys.path.insert(0, str(HERE))
# "qtool before" children import qtool from another checkout (bench/zoo.py stays this one's)
sys.path.insert(0, os.environ.get("QTOOL_BENCH_ROOT") or str(ROOT))

MODEL = "resnet18_synth"
QTOOL_METHODS = ("minmax", "percentile", "entropy", "mse")
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
SAMPLE_COUNTS = (32, 64, 256, 1024)
ORT_CHUNK = 64
TOOLS = ("plain", "plain, no spin", "plain, 2 streams", "onnxruntime", "qtool before", "qtool")
PYTHONPATH_FIRST = ""  # --pythonpath: a folder every child imports from first


def _paths():
    """The model and a folder of calibration samples: the zoo's 256, extended to 1024 with
    more images from the zoo's own generator (other seed) in bench/.cache, made once."""
    import zoo

    model, data = zoo.model_path(MODEL), zoo.data_dir(MODEL, "calib")
    if not model.exists() or not data.exists():
        zoo.prepare([MODEL])
    folder = HERE / ".cache" / "calib1024"
    if len(list(folder.glob("*.npy"))) < max(SAMPLE_COUNTS):
        import numpy as np
        from zoo_data import save_npy
        from zoo_export import smooth_images

        folder.mkdir(parents=True, exist_ok=True)
        own = sorted(data.glob("*.npy"))
        for f in own:
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f)
        rng = np.random.default_rng(4)
        for i in range(len(own), max(SAMPLE_COUNTS)):
            save_npy(folder, i, smooth_images(rng, 1))
    return model, folder


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_qtool(method: str, samples: int) -> dict:
    model, data = _paths()
    start, cpu = time.perf_counter(), time.process_time()  # CPU: all threads
    from qtool._deferred import defer_unused

    defer_unused()  # the start-up `qtool calibrate` has (qtool.cli does this first)
    from qtool.config import load_recipe
    from qtool.pipeline import calibrate

    recipe = load_recipe("int8-static").override(
        "calibration", method=method, samples=samples, batch_size=1
    )
    table = calibrate(model, data, recipe)
    seconds = time.perf_counter() - start
    return {"tensors": len(table.ranges()), "samples": table.samples, "seconds": seconds,
            "cpu_s": time.process_time() - cpu}


def _files(samples: int) -> list[Path]:
    _, data = _paths()
    return sorted(data.glob("*.npy"))[:samples]


def _load(f: Path):  # noqa: ANN202 - np.ndarray
    import numpy as np

    x = np.load(f)
    return x if x.ndim == 4 else x[None]


def run_plain(method: str, samples: int, spin: bool = True) -> dict:
    model, _ = _paths()
    files = _files(samples)
    start, cpu = time.perf_counter(), time.process_time()  # CPU: all threads
    import onnxruntime as ort

    options = ort.SessionOptions()
    if spin is False:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for f in files:
        session.run(None, {name: _load(f)})
    return {"samples": len(files), "seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def run_plain_streams(method: str, samples: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    model, _ = _paths()
    files = _files(samples)
    start, cpu = time.perf_counter(), time.process_time()  # CPU: all threads
    import onnxruntime as ort

    def stream(part: list[Path]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for f in part:
            session.run(None, {name: _load(f)})

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(stream, [files[0::2], files[1::2]]))
    return {"samples": len(files), "seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def _op_types() -> list[str]:
    import onnx_ir as ir

    from qtool.config import load_recipe
    from qtool.passes.select import select_nodes
    from qtool.runtime import infer_types

    model, _ = _paths()
    m = ir.load(model)
    infer_types(m)
    return sorted({n.op_type for n in select_nodes(m, load_recipe("int8-static")).quantized})


def run_ort(method: str, samples: int) -> dict:
    model, _ = _paths()
    op_types = _op_types()  # what qtool quantizes here, found before the timer starts
    files = _files(samples)
    start, cpu = time.perf_counter(), time.process_time()  # CPU: all threads
    from onnxruntime.quantization.calibrate import (
        CalibrationDataReader,
        CalibrationMethod,
        create_calibrator,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, chunk):
            self.it = iter(chunk)

        def get_next(self):
            f = next(self.it, None)
            return None if f is None else {"input": _load(f)}

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            str(model), op_types, augmented_model_path=str(Path(tmp) / "aug.onnx"),
            calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
        )
        for i in range(0, len(files), ORT_CHUNK):
            calibrator.collect_data(Reader(files[i : i + ORT_CHUNK]))
        ranges = calibrator.compute_data()
    seconds = time.perf_counter() - start
    return {"tensors": len(ranges.data), "samples": len(files), "seconds": seconds,
            "cpu_s": time.process_time() - cpu, "op_types": op_types}


RUNNERS = {"plain": run_plain, "plain, no spin": lambda m, n: run_plain(m, n, spin=False),
           "plain, 2 streams": run_plain_streams,
           "onnxruntime": run_ort, "qtool": run_qtool, "qtool before": run_qtool}


def child(tool: str, method: str, samples: int) -> None:
    result = RUNNERS[tool](method, samples)
    result.update(tool=tool, method=method, peak_mb=_peak_mb(), load1=os.getloadavg()[0])
    sys.stdout.write(json.dumps(result) + "\n")


def run_one(tool: str, method: str, samples: int, before: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # cached bytecode, as an installed package has
    if PYTHONPATH_FIRST and tool != "qtool before":  # "before": the environment as it was
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (PYTHONPATH_FIRST, env.get("PYTHONPATH"))))
    if tool == "qtool before":  # the other checkout's qtool first on the path
        env["QTOOL_BENCH_ROOT"] = str(before)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", tool, method, str(samples)],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    if proc.returncode != 0:
        return {"tool": tool, "method": method, "samples": samples, "error": proc.stderr[-400:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    # Key rows by the count asked for; keep what the child really saw beside it.
    row["samples_seen"], row["samples"] = row.get("samples"), samples
    return row


def _median(rows: list[dict], tool: str, method: str, n: int, key: str = "seconds") -> float | None:
    import statistics

    times = [r[key] for r in rows if r["tool"] == tool and r["method"] == method
             and r.get("samples") == n and key in r]
    return statistics.median(times) if times else None


def table(rows: list[dict], methods, counts) -> str:  # noqa: ANN001
    """Two tables: CPU seconds (all threads of the process; what to read on a loaded
    machine) with the ratios the targets are set in, then wall seconds and peak memory."""
    cpu = [
        "CPU seconds (median):\n",
        "| method | samples | plain | plain, no spin | onnxruntime | qtool before | qtool | "
        "qtool vs onnxruntime | qtool / plain | qtool / plain no-spin | before vs onnxruntime | before / plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    wall = [
        "\nWall seconds (median) and peak RSS:\n",
        "| method | samples | plain | plain, no spin | plain, 2 streams | onnxruntime | qtool before | qtool | "
        "qtool vs onnxruntime | qtool / plain | qtool / plain 2 streams | qtool peak (MB) | onnxruntime peak (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v):  # noqa: ANN001, ANN202
        return "n/a" if v is None else f"{v:.2f}"

    def ratio(a, b, suffix="x"):  # noqa: ANN001, ANN202
        return "n/a" if a is None or b is None else f"{a / b:.2f}{suffix}"

    def peak(tool, method, n):  # noqa: ANN001, ANN202
        ps = [r["peak_mb"] for r in rows if r["tool"] == tool and r["method"] == method
              and r.get("samples") == n and "peak_mb" in r]
        return f"{max(ps):.0f}" if ps else "n/a"

    for method in methods:
        for n in counts:
            def med(tool, key, m=method):  # noqa: ANN001, ANN202
                return _median(rows, tool, "-" if tool.startswith("plain") else m, n, key)

            if med("qtool", "seconds") is None and med("onnxruntime", "seconds") is None:
                continue
            for out, key in ((cpu, "cpu_s"), (wall, "seconds")):
                p, ps, o = med("plain", key), med("plain, no spin", key), med("onnxruntime", key)
                b, q = med("qtool before", key), med("qtool", key)
                p2 = med("plain, 2 streams", key)
                if out is cpu:
                    cells = [method, n, fmt(p), fmt(ps), fmt(o), fmt(b), fmt(q), ratio(o, q), ratio(q, p),
                             ratio(q, ps), ratio(o, b), ratio(b, p)]
                else:
                    cells = [method, n, fmt(p), fmt(ps), fmt(p2), fmt(o), fmt(b), fmt(q), ratio(o, q), ratio(q, p),
                             ratio(q, p2), peak("qtool", method, n), peak("onnxruntime", method, n)]
                out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(cpu + wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "METHOD", "SAMPLES"))
    parser.add_argument("--samples", type=int, nargs="*", default=list(SAMPLE_COUNTS))
    parser.add_argument("--methods", nargs="*", default=["entropy"], choices=QTOOL_METHODS)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (medians are reported); counts above 256 get one")
    parser.add_argument("--before", type=Path, help="another qtool checkout, timed as 'qtool before'")
    parser.add_argument("--only", choices=TOOLS)
    parser.add_argument("--pythonpath", default="",
                        help="a folder put first on the PYTHONPATH of every child but 'qtool before' (another "
                             "version of a dependency)")
    parser.add_argument("--ort-max", type=int, default=0,
                        help="skip onnxruntime above this many samples (0: never skip)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "calibration.md")
    parser.add_argument("--rows", type=Path, nargs="*",
                        help="render the table from the raw rows (JSON lines) these files hold, "
                             "e.g. the stderr of runs made side by side, instead of running")
    args = parser.parse_args(argv)
    global PYTHONPATH_FIRST  # noqa: PLW0603 - read by run_one in this process only
    PYTHONPATH_FIRST = args.pythonpath
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    if args.rows:
        rows = [json.loads(line) for f in args.rows for line in f.read_text().splitlines()
                if line.startswith("{")]
    else:
        rows = _run(args)
    return _report(args, rows)


def _run(args) -> list[dict]:  # noqa: ANN001
    _paths()
    tools = [t for t in TOOLS if (args.only in (None, t)) and (t != "qtool before" or args.before)]
    rows = []
    for rnd in range(args.rounds):
        for n in args.samples:
            if rnd > 0 and n > 256:
                continue  # one round of the long runs
            order = tools if rnd % 2 == 0 else tools[::-1]  # alternate who runs first
            for tool in order:
                for method in (["-"] if tool.startswith("plain") else args.methods):
                    if tool == "onnxruntime" and (method not in ORT_METHODS or 0 < args.ort_max < n):
                        continue
                    rows.append(run_one(tool, method, n, args.before))
                    rows[-1].update(tool=tool, method=method, round=rnd)
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _report(args, rows: list[dict]) -> int:  # noqa: ANN001
    import onnxruntime

    counts = sorted({r["samples"] for r in rows if "samples" in r})

    md = (
        "# Calibration: qtool vs onnxruntime and vs plain inference\n\n"
        f"Model: `{MODEL}` (bench/zoo.py; ResNet-18-shaped CNN, 224x224, batch 1), its calib "
        "split. Each cell is its own process: wall time from before the tool's imports to its "
        "ranges (conversion not included), median over the rounds; peak RSS of that process.\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared "
        "with other jobs while it ran (timings are noisy: rounds alternate the tools' order, "
        f"medians of {1 + max((r.get('round', 0) for r in rows), default=0)} round(s) up to 256 "
        "samples, one round above); onnxruntime "
        f"{onnxruntime.__version__}. qtool uses 2048 bins; onnxruntime its defaults (Entropy 128 "
        f"bins). Above {ORT_CHUNK} samples onnxruntime is fed in chunks of {ORT_CHUNK} (its "
        "histogram calibrators hold every activation of a chunk in memory). "
        f"qtool before: {args.before or 'not run'}. First on the path of every process but qtool before's: "
        f"{_pythonpath_note(args.pythonpath)}.\n{_load_note(rows)}\n\n"
        + table(rows, args.methods, counts)
        + "\n\nRaw rows:\n\n```json\n"
        + "\n".join(json.dumps(r) for r in rows)
        + "\n```\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(table(rows, args.methods, counts))
    return 0


def _load_note(rows: list[dict]) -> str:
    loads = sorted(r["load1"] for r in rows if "load1" in r)
    if not loads:
        return ""
    return (f"1-minute load average at the end of each run: {loads[0]:.1f} to {loads[-1]:.1f} "
            f"(median {loads[len(loads) // 2]:.1f}) on {os.cpu_count()} cores.")


def _pythonpath_note(folder: str) -> str:
    if not folder:
        return "nothing (the venv's own packages)"
    found = sorted(p.name for p in Path(folder).glob("*.dist-info"))
    return f"{folder} ({', '.join(found) or 'no packages'})"


if __name__ == "__main__":
    sys.exit(main())
