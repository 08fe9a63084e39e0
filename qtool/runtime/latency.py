"""Latency, throughput and session memory, measured the same way for every model.

Sessions are timed interleaved (A, B, A, B, ...) after warm-up, so background load on a
shared machine hits every model alike and the candidate/reference ratio stays meaningful.
Statistics are over single ``session.run`` calls on one fixed batch, in milliseconds:
median, p90, p99 (linear interpolation between order statistics), mean, stdev (sample),
IQR = p75 - p25, min and max. ``median_ci_ms`` is a distribution-free ~95 % confidence
interval of the median (order statistics n/2 +- 0.98 sqrt(n)): two runs of the same model
whose intervals overlap agree within the measured dispersion.
Throughput = batch size / median, in samples per second.
Memory: growth of the process's resident set from before the session was created to the
largest value sampled during warm-up and runs, in MiB (an upper bound on what the session
itself holds; it includes the arena onnxruntime allocates for activations).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes (0 if unknown)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil missing: fall back to /proc
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except Exception:
            return 0


@dataclass(frozen=True)
class LatencyStats:
    model: str  # "candidate" | "reference"
    provider: str
    runs: int
    warmup: int
    batch_size: int
    threads: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    median_ci_ms: tuple[float, float]
    throughput: float  # samples / s
    memory_mib: float | None
    samples_ms: tuple[float, ...] = ()  # every timed run, in order (the HTML report draws them)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["median_ci_ms"] = list(self.median_ci_ms)
        d["samples_ms"] = [round(t, 5) for t in self.samples_ms]
        return d


def summarize(times_ms: np.ndarray, **fields) -> LatencyStats:
    """Statistics of one model's run times (milliseconds); see the module docstring."""
    t = np.sort(np.asarray(times_ms, dtype=np.float64))
    n = t.size
    p25, p50, p75, p90, p99 = np.percentile(t, [25, 50, 75, 90, 99])
    half = 0.98 * math.sqrt(n)
    lo = t[max(0, math.floor(n / 2 - half))]
    hi = t[min(n - 1, math.ceil(n / 2 + half))]
    return LatencyStats(
        runs=n,
        median_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=float(t.mean()),
        stdev_ms=float(t.std(ddof=1)) if n > 1 else 0.0,
        iqr_ms=float(p75 - p25),
        min_ms=float(t[0]),
        max_ms=float(t[-1]),
        median_ci_ms=(float(lo), float(hi)),
        throughput=fields["batch_size"] / (p50 / 1000.0) if p50 > 0 else float("inf"),
        samples_ms=tuple(float(x) for x in np.asarray(times_ms, dtype=np.float64)),
        **fields,
    )


def measure(
    factories: dict[str, Callable[[], object]],
    feed: dict[str, np.ndarray],
    *,
    runs: int = 50,
    warmup: int = 5,
    provider: str = "cpu",
    threads: int = 0,
    on_run: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, LatencyStats]:
    """Time each model ``runs`` times on ``feed`` after ``warmup`` runs, interleaved.

    ``clock`` is wall time by default; ``time.thread_time`` measures the CPU time of the
    calling thread, which is all of a 1-thread onnxruntime session's work and barely moves
    when other processes load the machine.

    ``factories`` maps a label ("candidate", "reference") to a function creating its
    session, so memory growth is measured from just before each session exists.
    ``on_run(1)`` is called after every warm-up and timed run (outside the timed span).
    """
    tick = on_run or (lambda n: None)
    sessions, memory, base, names = {}, {}, {}, {}
    # Each session is created and warmed up alone, so its memory growth is its own.
    for label, make in factories.items():
        gc.collect()
        base[label] = rss_bytes()
        sessions[label] = make()
        names[label] = [o.name for o in sessions[label].get_outputs()]
        memory[label] = rss_bytes()
        for _ in range(max(1, warmup)):
            sessions[label].run(names[label], feed)
            memory[label] = max(memory[label], rss_bytes())
            tick(1)
    batch = next(iter(feed.values())).shape[0] if feed else 1
    times = {label: np.empty(runs) for label in sessions}
    for i in range(runs):
        for label, s in sessions.items():
            start = clock()
            s.run(names[label], feed)
            times[label][i] = (clock() - start) * 1000.0
            tick(1)
    return {
        label: summarize(
            times[label], model=label, provider=provider, warmup=warmup, batch_size=batch,
            threads=threads,
            memory_mib=(memory[label] - base[label]) / 2**20 if base[label] else None,
        )
        for label in sessions
    }
