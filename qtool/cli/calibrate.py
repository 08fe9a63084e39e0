"""`qtool calibrate` and `qtool merge-tables`: streaming calibration into mergeable tables."""

from __future__ import annotations

import os
import resource
import time
from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from qtool.calibration.thresholds import METHODS
from qtool.cli.app import (
    app,
    console,
    emit_json,
    info,
    progress,
    settings,
    warn,
    warn_if_workers_cannot_help,
)
from qtool.executors import EXECUTOR_HELP

# The choices are the calibration registry's, so a new method needs no CLI edit.
Method = Enum("Method", {name: name for name in METHODS}, type=str)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (and of finished child processes), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024  # Linux reports KiB


@app.command("calibrate")
def calibrate_command(
    model: Path = typer.Argument(..., help="The float .onnx model (never modified)."),
    data: Path = typer.Option(..., "--data", metavar="DIR", help="Folder of calibration samples."),
    output: Path = typer.Option(..., "-o", "--output", metavar="TABLE.json", help="Where to write the table."),
    method: Method = typer.Option(None, "--method", help="Range choice [default: the recipe's, minmax for int8-static]."),
    percentile: float = typer.Option(None, "--percentile", metavar="P", help="With --method percentile: the percentile kept, in (0, 100] [default: 99.99]."),
    bins: int = typer.Option(None, "--bins", metavar="B", help="With a histogram method (percentile, entropy, mse): bins per tensor [default: 2048]."),
    samples: int = typer.Option(None, "--samples", metavar="N", help="Use the first N samples, 0 for all [default: 0]."),
    batch_size: int = typer.Option(None, "--batch-size", metavar="B", help="Samples per onnxruntime run [default: 1]."),
    exclude: list[str] = typer.Option(None, "--exclude", metavar="PATTERN", help="Node name, glob or op type that convert keeps float, so it needs no range (repeatable)."),
    recipe: str = typer.Option("int8-static", "--recipe", metavar="NAME|FILE", help="Preset name or .toml path."),
    shard: str = typer.Option("0/1", "--shard", metavar="I/N", help="Observe every N-th batch from batch I."),
    workers: int = typer.Option(1, "--workers", metavar="K", help="Run K shard processes here and merge."),
    executor: str = typer.Option(None, "--executor", metavar="local|ray|ray://HOST:PORT", help=EXECUTOR_HELP + " One shard per worker, merged exactly."),
    ship_data: bool = typer.Option(False, "--ship-data", help="With --executor/--workers: read the samples here and send each shard's arrays to its worker (Ray's object store), for workers that cannot see --data."),
    threads: int = typer.Option(0, "--threads", metavar="T", help="onnxruntime threads per process. 0 (auto): on 2+ cores, from 32 batches, two sessions of half the cores each run every other batch (the same table, faster); a number gives one session of that many threads."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Observe the activations the recipe quantizes and write their ranges to a table.

    Memory stays flat in the number of samples: each batch's activations are folded into
    per-tensor histograms and dropped. Shard tables (--shard I/N, e.g. one per CI job)
    merge with `qtool merge-tables` into exactly the statistics of one run.

    Example: qtool calibrate examples/digits_cnn.onnx --data examples/data/calib -o table.json
    """
    from qtool.calibration import calibration_params, parse_shard, shard_samples
    from qtool.config import load_recipe
    from qtool.errors import UsageError
    from qtool.model import check_output_path
    from qtool.pipeline import calibrate

    r = load_recipe(recipe).override(
        "calibration",
        method=method.value if method is not None else None,
        percentile=percentile,
        bins=bins,
        samples=samples,
        batch_size=batch_size,
    )
    if exclude:
        r = r.override("quantize", exclude=tuple(r.quantize.exclude) + tuple(exclude))
    _check_flags(r, percentile=percentile, bins=bins, samples=samples, batch_size=batch_size,
                 threads=threads)
    calibration_params(r)  # validate flags before any work
    shard_spec = parse_shard(shard)
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}", "e.g. --workers 2")
    fan_out = workers > 1 or executor is not None
    if fan_out and shard_spec != (0, 1):
        raise UsageError("--workers/--executor and --shard cannot be combined", "use one or the other")
    if ship_data and not fan_out:
        raise UsageError("--ship-data sends samples to workers, and there are none",
                         "add --executor ray (or --workers K), or drop --ship-data")
    if output.suffix != ".json":
        raise UsageError(f"the table is JSON: -o {output} should end in .json", "e.g. -o table.json")
    check_output_path(output, model)

    start = time.perf_counter()
    if fan_out:
        table = _run_workers(model, data, r, executor, workers, threads, ship_data)
    else:
        from qtool.data import Dataset, input_specs
        from qtool.model import load

        # Size the bar before the run (the dataset scan is cheap; samples are not read).
        ds = Dataset(data, input_specs(load(model)), r.preprocess)
        count = len(ds) if r.calibration.samples <= 0 else min(r.calibration.samples, len(ds))
        total = shard_samples(count, max(1, r.calibration.batch_size), shard_spec)
        with progress("calibrating", total, "samples") as advance:
            seen = 0

            def on_progress(p):  # noqa: ANN001
                nonlocal seen
                advance(p.done - seen)
                seen = p.done

            table = calibrate(model, data, r, shard=shard_spec, on_progress=on_progress,
                              threads=threads)
    seconds = time.perf_counter() - start
    table.save(output)
    summary = _summary(table, output, seconds)
    if json_out:
        emit_json(summary)
    if not settings.quiet:
        _print_summary(summary)
    skipped = table.info.get("skipped", {})
    if skipped:
        names = list(skipped)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        # The reasons differ (+-inf from attention-mask arithmetic, a tensor inside an If/Loop
        # body that onnxruntime cannot return): the table's info carries each one.
        warn(escape(f"{len(names)} tensor(s) have no range and stay float: {shown}; "
                    f"{names[0]}: {skipped[names[0]]} (every reason is in the table's info)"))


def _check_flags(r, *, percentile, bins, samples, batch_size, threads) -> None:  # noqa: ANN001
    """Flags with values that cannot work, or that the chosen method would ignore (exit 2)."""
    from qtool.calibration import HISTOGRAM_METHODS
    from qtool.errors import UsageError

    method = r.calibration.method
    if percentile is not None and method != "percentile":
        raise UsageError(f"--percentile applies to --method percentile, not {method}",
                         "add --method percentile, or drop --percentile")
    if bins is not None and method not in HISTOGRAM_METHODS:
        raise UsageError(f"--bins applies to the histogram methods ({', '.join(HISTOGRAM_METHODS)}), "
                         f"not {method}", "drop --bins, or choose one of those with --method")
    if samples is not None and samples < 0:
        raise UsageError(f"--samples must be >= 0, got {samples}", "0 uses every sample; e.g. --samples 128")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}", "e.g. --batch-size 8")
    if threads < 0:
        raise UsageError(f"--threads must be >= 0, got {threads}", "0 lets onnxruntime choose")


def _run_workers(model, data, r, executor, workers, threads, ship_data) -> object:  # noqa: ANN001
    """One shard per worker (local processes or Ray), then an exact merge of their tables."""
    from qtool.executors import make_executor
    from qtool.executors.calibrate import calibrate_sharded

    with make_executor(executor, workers) as ex:
        warn_if_workers_cannot_help(ex)
        per = threads or max(1, (os.cpu_count() or 1) // ex.workers)
        with progress(f"calibrating ({ex.describe()})", ex.workers, "shards") as advance:
            return calibrate_sharded(model, data, r, ex, threads=per, ship=ship_data,
                                     on_done=lambda task: advance(1))


def _summary(table, output: Path, seconds: float) -> dict:  # noqa: ANN001
    ranges = table.ranges()
    widest = sorted(ranges.items(), key=lambda kv: kv[1][1] - kv[1][0], reverse=True)
    return {
        "table": str(output),
        "method": table.method,
        "params": table.params,
        "samples": table.samples,
        "shards": list(table.shards),
        "tensors": len(ranges),
        "seconds": round(seconds, 3),
        "samples_per_second": round(table.samples / seconds, 2) if seconds > 0 else None,
        "peak_memory_mb": round(_peak_rss_mb(), 1),
        "widest": [
            {"tensor": n, "range": [lo, hi], "min": table.tensors[n].minmax.lo,
             "max": table.tensors[n].minmax.hi}
            for n, (lo, hi) in widest[:8]
        ],
    }


def _print_summary(s: dict) -> None:
    t = Table(title=f"widest chosen ranges ({s['method']})", title_justify="left", show_edge=False)
    for col in ("tensor", "chosen lo", "chosen hi", "min", "max"):
        t.add_column(col, justify="left" if col == "tensor" else "right")
    for w in s["widest"]:
        t.add_row(escape(w["tensor"]), f"{w['range'][0]:.4g}", f"{w['range'][1]:.4g}",
                  f"{w['min']:.4g}", f"{w['max']:.4g}")
    console.print(t)
    info(
        f"{s['tensors']} tensors observed over {s['samples']} samples in {s['seconds']:.1f} s "
        f"({s['samples_per_second']} samples/s), peak memory {s['peak_memory_mb']:.0f} MiB "
        f"-> {escape(s['table'])}"
    )


@app.command("merge-tables")
def merge_tables_command(
    tables: list[Path] = typer.Argument(..., help="Calibration tables (.json) to merge."),
    output: Path = typer.Option(..., "-o", "--output", metavar="TABLE.json", help="Where to write the merged table."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Merge shard tables into one: counts, min/max and histograms add exactly, so the
    result equals one calibration run over all the shards' samples.

    Example: qtool merge-tables shard0.json shard1.json -o table.json
    """
    from qtool.calibration import CalibrationTable
    from qtool.errors import UsageError
    from qtool.model import check_output_path, same_file

    if len(tables) < 2:
        raise UsageError("merge-tables needs at least two tables", "pass A.json B.json ... -o OUT.json")
    if output.suffix != ".json":
        raise UsageError(f"the table is JSON: -o {output} should end in .json", "e.g. -o table.json")
    check_output_path(output, None)  # before reading any table: a bad -o fails at once
    for table in tables:
        if same_file(output, table):
            raise UsageError(f"-o {output} is one of the tables to merge",
                             "qtool never overwrites its inputs; choose another -o path")
    start = time.perf_counter()
    merged = CalibrationTable.merge([CalibrationTable.load(p) for p in tables])
    merged.save(output)
    summary = _summary(merged, output, time.perf_counter() - start)
    if json_out:
        emit_json(summary)
    if not settings.quiet:
        _print_summary(summary)
