"""Timing several (model, runtime) pairs honestly.

Two ways, both alternating and both reporting medians:

- ``inline``: every session in this process, timed in turns (A, B, C, A, B, C, ...) by
  qtool.runtime.latency.measure. Cheap, but two compiled models in one process share
  thread pools, caches and (OpenVINO) a CPU plugin, and distort each other.
- ``process``: each pair is timed in a fresh Python process of its own, one after the
  other, for ``rounds`` rounds (the order reversed every other round, so neither first nor
  last is always the same pair). Each child loads one model, warms up and times ``runs``
  runs; the reported samples are all the rounds' samples together and the per-round
  medians are kept. Costs a process start (~1-2 s of imports) per pair and round.

Measured (bench/results/runtimes.md, a shared 2-core machine): with onnxruntime and
OpenVINO sessions in one process the timings are wrong, not noisy. On the digits CNN float
on OpenVINO took 28 ms inline against 0.15 ms in its own process, and float on onnxruntime
0.33 ms against 0.041 ms, which turned "int8 is 0.95x float" into "1.74x"; on
EfficientNet-Lite0 int8 on OpenVINO f32 read 0.99x float-on-onnxruntime inline against
2.40x alone. So ``process`` is the default of ``qtool eval --runtimes``. Two models on the
same runtime (``--latency``, the guard) stay ``inline`` by default: there the candidate /
float ratio moved as much between two repeats of either mode as between the modes
(EfficientNet-Lite0 on OpenVINO, load average ~40: 0.52/0.48 inline, 0.49/0.47 process at
f32), and a process per model would cost the guard seconds per candidate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError
from qtool.runtime.latency import LatencyStats, measure, rss_bytes, summarize
from qtool.runtime.runtimes import Runtime

MODES = ("process", "inline")
DEFAULT_ROUNDS = 3


def planned_runs(mode: str, runs: int, warmup: int, rounds: int) -> int:
    """Runs (warm-up included) each pair gets from time_pairs: what a progress bar counts."""
    if mode == "inline":
        return runs + max(1, warmup)
    return rounds * (max(1, -(-runs // rounds)) + max(1, warmup))


def time_pairs(jobs: dict[str, tuple[str, Runtime]], feed: dict[str, np.ndarray], *, mode: str = "process",
               runs: int = 50, warmup: int = 5, threads: int = 0, rounds: int = DEFAULT_ROUNDS,
               on_run: Callable[[int], None] | None = None) -> dict[str, LatencyStats]:
    """Latency of each job ``label -> (model path, runtime)`` on ``feed`` (see the module
    docstring for ``mode``). In ``process`` mode ``runs`` is split over the rounds."""
    if mode == "inline":
        factories = {label: (lambda p=path, r=rt, lb=label: r.open(p, threads=threads, role=lb))
                     for label, (path, rt) in jobs.items()}
        stats = measure(factories, feed, runs=runs, warmup=warmup, threads=threads, on_run=on_run)
        return {label: _relabel(s, jobs[label][1]) for label, s in stats.items()}
    per_round = max(1, -(-runs // rounds))
    samples: dict[str, list[float]] = {label: [] for label in jobs}
    memory: dict[str, float | None] = {}
    order = list(jobs)
    with tempfile.TemporaryDirectory(prefix="qtool-timing-") as tmp:
        feed_path = Path(tmp) / "feed.npz"
        np.savez(feed_path, **feed)
        for r in range(rounds):
            for label in (order if r % 2 == 0 else order[::-1]):
                path, rt = jobs[label]
                result = _child(path, rt, feed_path, per_round, warmup, threads)
                samples[label] += result["times_ms"]
                memory[label] = max(memory.get(label) or 0.0, result["memory_mib"] or 0.0) or None
                if on_run is not None:
                    on_run(per_round + max(1, warmup))  # planned_runs() counts the same
    batch = next(iter(feed.values())).shape[0] if feed else 1
    return {label: summarize(np.asarray(samples[label]), model=label, provider=jobs[label][1].label,
                             warmup=warmup, batch_size=batch, threads=threads, memory_mib=memory[label])
            for label in jobs}


def _relabel(stats: LatencyStats, rt: Runtime) -> LatencyStats:
    from dataclasses import replace

    return replace(stats, provider=rt.label)


def _child(path: str, rt: Runtime, feed_path: Path, runs: int, warmup: int, threads: int) -> dict:
    """Time one model on one runtime in a fresh interpreter running this module."""
    spec = {"model": str(path), "runtime": rt.name, "device": rt.device, "precision": rt.precision,
            "feed": str(feed_path), "runs": runs, "warmup": warmup, "threads": threads}
    root = str(Path(__file__).resolve().parents[2])  # the qtool package's parent, for the child
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-m", "qtool.runtime.timing", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise QtoolError(f"timing {path} on {rt.label} in a fresh process failed: "
                         f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}",
                         "run it with --timing inline to see the error in this process")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(spec: dict) -> dict:
    """The child's side: open, warm up, time; times in ms and memory growth in MiB."""
    import time

    with np.load(spec["feed"]) as z:
        feed = {k: z[k] for k in z.files}
    rt = Runtime(spec["runtime"], spec["device"], spec["precision"])
    base = rss_bytes()
    session = rt.open(spec["model"], threads=spec["threads"], role="timed")
    names = [o.name for o in session.get_outputs()]
    for _ in range(max(1, spec["warmup"])):
        session.run(names, feed)
    peak = rss_bytes()
    times = []
    for _ in range(spec["runs"]):
        start = time.perf_counter()
        session.run(names, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return {"times_ms": times, "memory_mib": (peak - base) / 2**20 if base else None}


if __name__ == "__main__":  # pragma: no cover - run by _child in a fresh process
    print(json.dumps(child_main(json.loads(sys.argv[1]))))
