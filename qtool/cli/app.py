"""The Typer app and the terminal plumbing every command shares.

Results go to stdout (``--json``); tables, progress and messages go to stderr, so
``qtool inspect m.onnx --json | jq`` works while progress stays visible.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from qtool import __version__

HELP = """\
Compress ONNX models and prove the result.

\b
  qtool inspect model.onnx                      what is in a model, what can be quantized
  qtool calibrate model.onnx --data calib/ -o table.json
  qtool convert model.onnx -o int8.onnx --calib table.json
  qtool convert model.onnx -o int4.onnx --bits 4
  qtool eval int8.onnx --reference model.onnx --data eval/ --max-drop 0.01

Exit codes: 0 success, 1 error, 2 usage error, 3 a quality gate failed.
"""

app = typer.Typer(
    name="qtool",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Settings:
    verbose: bool = False
    quiet: bool = False


settings = Settings()
console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False, soft_wrap=True)


def info(message: str) -> None:
    """A line on stderr, unless --quiet."""
    if not settings.quiet:
        console.print(message)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet."""
    console.print(f"[yellow]warning:[/yellow] {message}")


def debug(message: str) -> None:
    if settings.verbose:
        console.print(f"[dim]{message}[/dim]")


def emit_json(data: Any) -> None:
    """Write a result document to stdout (the only thing commands print there)."""
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class _RateColumn(ProgressColumn):
    """items/s (or MB/s for byte counts)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        if self.unit == "B":
            return Text(f"{speed / 1e6:.0f} MB/s", style="progress.data.speed")
        return Text(f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress(description: str, total: float | None, unit: str = "samples") -> Iterator[Any]:
    """A progress bar on stderr; yields ``advance(n)`` (a no-op when --quiet)."""
    if settings.quiet:
        yield lambda n=1: None
        return
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn() if unit != "B" else TextColumn(""),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        try:
            yield lambda n=1: bar.advance(task, n)
        except BaseException:
            bar.live.transient = True  # a failed step leaves only its error: line behind
            raise


@contextlib.contextmanager
def timed() -> Iterator[dict]:
    """Measure wall time into ``result['seconds']``."""
    result: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start


def version_callback(value: bool) -> None:
    if value:
        from qtool.hardware import kernel_backend

        backend = kernel_backend()
        paths = ", ".join(backend["isa_paths"]) or "none"
        sys.stdout.write(f"qtool {__version__} (kernels: {backend['backend']}; isa: {paths})\n")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True,
        help="Print the version and the active kernel backend, then exit.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail; tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only results and errors; no progress."),
) -> None:
    settings.verbose = settings.verbose or verbose
    settings.quiet = settings.quiet or quiet
